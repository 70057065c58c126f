"""The TOML configuration file, loaded into typed and validated settings.

Every mistake is a :class:`ConfigError` naming the file, the key, the problem
and the fix, so an operator never has to read a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from mailplat.addresses import AddressError, validate_address, validate_domain

__all__ = [
    "BackendSettings",
    "ConfigError",
    "ListenerNames",
    "POP3Settings",
    "RelaySettings",
    "Settings",
    "SMTPLimits",
    "TLSSettings",
    "load",
]

# The listener names of [listen], in the order they are started.
ListenerNames = ("smtp", "submission", "submissions", "pop3", "pop3s")


class ConfigError(Exception):
    """A mistake in the configuration: which file, which key, what, and the fix.

    A backend's ``build`` raises it with only ``key`` (its option name); the
    loader adds the file and the section.
    """

    def __init__(self, key: str, problem: str, fix: str = "", file: str = "") -> None:
        super().__init__(key, problem, fix, file)
        self.key = key
        self.problem = problem
        self.fix = fix
        self.file = file

    def within(self, file: str, section: str) -> ConfigError:
        """This error, placed in ``file`` under ``[section]``."""
        key = self.key
        if section and not key.startswith("["):
            # A section may come already written out: "[filter] #2 (spamd)".
            where = section if section.startswith("[") else f"[{section}]"
            key = f"{where} {key}" if key else where
        return ConfigError(key, self.problem, self.fix, self.file or file)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        text = f"{where}: {self.problem}" if where else self.problem
        if self.fix:
            text += f"; fix: {self.fix}"
        return text


@dataclass(frozen=True)
class BackendSettings:
    """A ``backend = ...`` table: the name and the options for the backend."""

    section: str
    name: str
    options: dict[str, Any]
    # Where errors point when the section is not enough (several [[filter]] tables).
    label: str = ""


@dataclass(frozen=True)
class FilterSettings:
    """One ``[[filter]]`` table: the backend, plus what mailplat itself applies."""

    backend: BackendSettings
    timeout: float = 30.0
    # "tempfail": a filter that fails or times out gives 451 (fail closed).
    on_error: str = "tempfail"
    listeners: tuple[str, ...] = ("smtp",)


@dataclass(frozen=True)
class DKIMSettings:
    """``[dkim."example.org"]``: how mail from a domain's users is signed."""

    domain: str
    selector: str
    key: str  # path of the PEM private key (RSA or Ed25519)


@dataclass(frozen=True)
class TLSSettings:
    certificate: str
    key: str


@dataclass(frozen=True)
class SMTPLimits:
    """[smtp]: every limit a client could otherwise abuse, with safe defaults."""

    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_command_line: int = 512
    max_text_line: int = 1000
    idle_timeout: float = 300.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_errors: int = 20
    max_received_headers: int = 30


@dataclass(frozen=True)
class POP3Settings:
    """[pop3]: login safety, limits and what happens to mail after download."""

    auth_failure_delay: float = 2.0
    max_login_failures: int = 10
    login_block_time: float = 300.0
    idle_timeout: float = 600.0
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    # None: never; otherwise retrieved messages are removed after this many days.
    expire_days: float | None = None
    on_delete: str = "remove"
    trash_days: float = 30.0


@dataclass(frozen=True)
class RelaySettings:
    """[relay]: how queued mail reaches other domains, and for how long we try."""

    tls: str = "opportunistic"
    port: int = 25
    retry_initial: float = 60.0
    retry_max: float = 3600.0
    max_age: float = 5 * 86400.0
    username: str = ""
    password: str = ""
    # PEM file of the authorities that tls = "verify" trusts ("": the system's).
    ca_file: str = ""
    # RFC 5321 4.5.3.2, in seconds.
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_done_timeout: float = 600.0


@dataclass(frozen=True)
class Settings:
    path: str
    hostname: str
    data_dir: str
    domains: tuple[str, ...]
    listen: dict[str, str]
    tls: TLSSettings | None
    auth: BackendSettings
    mailbox: BackendSettings
    delivery: BackendSettings
    aliases: dict[str, tuple[str, ...]]
    smarthost: str
    smtp: SMTPLimits = field(default_factory=SMTPLimits)
    workers: int = 1
    pop3: POP3Settings = field(default_factory=POP3Settings)
    relay: RelaySettings = field(default_factory=lambda: RelaySettings())
    dns_servers: tuple[str, ...] = ()
    filters: tuple[FilterSettings, ...] = ()
    dkim: dict[str, DKIMSettings] = field(default_factory=dict)

    @property
    def config_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def describe(self) -> str:
        """The effective settings, as TOML an operator can read back."""
        lines = [
            f"# effective configuration of {self.path}",
            f"hostname = {_toml(self.hostname)}",
            f"data_dir = {_toml(self.data_dir)}",
            f"domains = {_toml(list(self.domains))}",
            f"workers = {self.workers}",
            "",
            "[listen]",
            *(f"{name} = {_toml(value)}" for name, value in self.listen.items()),
        ]
        if self.tls:
            lines += ["", "[tls]", f"certificate = {_toml(self.tls.certificate)}", f"key = {_toml(self.tls.key)}"]
        for backend in (self.auth, self.mailbox, self.delivery):
            lines += ["", f"[{backend.section}]", f"backend = {_toml(backend.name)}"]
            lines += [f"{_key(k)} = {_toml(v)}" for k, v in backend.options.items()]
        for d in self.dkim.values():
            lines += ["", f"[dkim.{_toml(d.domain)}]", f"selector = {_toml(d.selector)}", f"key = {_toml(d.key)}"]
        for f in self.filters:
            lines += ["", "[[filter]]", f"backend = {_toml(f.backend.name)}", f"timeout = {_toml(f.timeout)}"]
            lines += [f"on_error = {_toml(f.on_error)}", f"listeners = {_toml(list(f.listeners))}"]
            lines += [f"{_key(k)} = {_toml(v)}" for k, v in f.backend.options.items()]
        lines += ["", "[aliases]"]
        lines += [f"{_toml(k)} = {_toml(list(v))}" for k, v in self.aliases.items()]
        lines += ["", "[relay]", f"smarthost = {_toml(self.smarthost)}"]
        lines += [f"{k} = {_toml(v if k != 'password' or not v else '(set)')}" for k, v in vars(self.relay).items()]
        lines += ["", "[dns]", f"servers = {_toml(list(self.dns_servers))}", "", "[smtp]"]
        lines += [f"{k} = {_toml(v)}" for k, v in vars(self.smtp).items()]
        lines += ["", "[pop3]"]
        lines += [f"{k} = {_toml(v)}" for k, v in vars(self.pop3).items() if v is not None]
        return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    # TOML basic strings may not hold control characters (a tab excepted) raw.
    text = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", text)
    return f'"{text}"'


def _key(key: str) -> str:
    """A key as TOML: bare when it may be, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml(key)


# --- reading ---------------------------------------------------------------


class _Reader:
    """Pops keys off one table, so whatever is left over is an unknown key."""

    def __init__(self, file: str, section: str, table: dict[str, Any]) -> None:
        self.file = file
        self.section = section
        self.table = dict(table)

    def error(self, key: str, problem: str, fix: str = "") -> ConfigError:
        return ConfigError(key, problem, fix).within(self.file, self.section)

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ..., example: str = "") -> Any:
        if key not in self.table:
            if default is ...:
                raise self.error(key, "is required", f"add e.g. {key} = {example}")
            return default
        value = self.table.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are ints to Python; never let true pass as a number.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(
                key,
                f"must be {wanted}, not {_TYPE_NAMES.get(type(value), type(value).__name__)} {value!r}",
                f"e.g. {key} = {example}" if example else "",
            )
        return value

    def positive(self, key: str, default: float, kind: type = int) -> Any:
        kinds: tuple[type, ...] = (int, float) if kind is float else (int,)
        value = self.take(key, kinds, default, example=str(default))
        if value <= 0:
            raise self.error(key, f"must be greater than 0, not {value!r}", f"e.g. {key} = {default}")
        return kind(value)

    def finish(self, known: list[str]) -> None:
        """Refuse whatever was not taken: an unknown key, with a hint."""
        for key in self.table:
            raise self.unknown(key, known)

    def reject_unknown(self, known: list[str]) -> None:
        """Refuse keys not in ``known`` before reading any value."""
        for key in self.table:
            if key not in known:
                raise self.unknown(key, known)

    def unknown(self, key: str, known: list[str]) -> ConfigError:
        hint = difflib.get_close_matches(key, known, n=1)
        where = (self.section if self.section.startswith("[") else f"[{self.section}]") + " " if self.section else ""
        fix = f"did you mean {hint[0]!r}?" if hint else f"known keys here: {', '.join(known)}"
        return ConfigError(f"{where}{key}", "unknown key", fix, self.file)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a table"}


def load(path: str) -> Settings:
    """Read and check the configuration file; raise ConfigError on any mistake."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", "no such file", "give the path of a mailplat.toml with --config or MAILPLAT_CONFIG", path)
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", "check the path and its permissions", path)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"not valid TOML: {e}", "see https://toml.io for the syntax", path)
    except UnicodeDecodeError as e:
        # tomllib decodes the bytes itself and lets this one through.
        raise ConfigError("", f"not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r})", "save the file as UTF-8", path)
    return _parse(path, data)


def _parse(path: str, data: dict[str, Any]) -> Settings:
    config_dir = os.path.dirname(path)

    def relative(p: str) -> str:
        return os.path.normpath(os.path.join(config_dir, os.path.expanduser(p)))

    top = _Reader(path, "", data)
    top.reject_unknown(_TOP_LEVEL_KEYS)  # a typo is the likeliest mistake: report it first
    given = "hostname" in top.table
    hostname = top.take("hostname", str, socket.getfqdn(), example='"mail.example.org"').strip().lower()
    try:
        validate_domain(hostname)
    except AddressError as e:
        problem = str(e) if given else f"not set, and this machine's name {hostname!r} is not a fully qualified domain name"
        raise top.error("hostname", problem, 'set the name clients see, e.g. hostname = "mail.example.org"')
    data_dir = relative(top.take("data_dir", str, "var", example='"var"'))
    workers = top.positive("workers", 1)
    if workers > 64:
        raise top.error("workers", f"{workers} is more than 64", "use about one worker per CPU core")

    raw_domains = top.take("domains", list, example='["example.org"]')
    if not raw_domains:
        raise top.error("domains", "is empty: mailplat would accept no mail", 'list your domains, e.g. domains = ["example.org"]')
    domains: list[str] = []
    for entry in raw_domains:
        if not isinstance(entry, str):
            raise top.error("domains", f"must be a list of strings; {entry!r} is not", 'e.g. domains = ["example.org"]')
        domain = entry.strip().lower()
        try:
            validate_domain(domain)
        except AddressError as e:
            raise top.error("domains", f"{entry!r}: {e}", 'e.g. domains = ["example.org"]')
        if domain in domains:
            raise top.error("domains", f"{entry!r} is listed twice", "remove the second entry")
        domains.append(domain)

    listen = _listen(_Reader(path, "listen", top.take("listen", dict, {})))
    tls = _tls(_Reader(path, "tls", top.take("tls", dict)), relative) if "tls" in top.table else None
    needs_tls = [name for name in ("submission", "submissions", "pop3", "pop3s") if name in listen]
    if tls is None and needs_tls:
        raise ConfigError(
            f"[listen] {needs_tls[0]}", "needs a TLS certificate: passwords never cross the wire in clear",
            'add a [tls] table with certificate = "..." and key = "..."', path,
        )

    auth = _backend(path, "auth", top.take("auth", dict, example='{ backend = "passwd-file" }'))
    mailbox = _backend(path, "mailbox", top.take("mailbox", dict, example='{ backend = "maildir" }'))
    delivery = _backend(path, "delivery", top.take("delivery", dict, {"backend": "local"}))
    aliases = _aliases(_Reader(path, "aliases", top.take("aliases", dict, {})), domains)

    relay_reader = _Reader(path, "relay", top.take("relay", dict, {}))
    smarthost = relay_reader.take("smarthost", str, "", example='"smtp.example.net:587"')
    if smarthost and not _is_host_port(smarthost):
        raise relay_reader.error("smarthost", f"{smarthost!r} is not host:port", 'e.g. smarthost = "smtp.example.net:587"')
    relay = _relay_settings(relay_reader)
    dns = _Reader(path, "dns", top.take("dns", dict, {}))
    servers = dns.take("servers", list, [], example='["127.0.0.1:53"]')
    for server in servers:
        if not isinstance(server, str) or not _is_host_port(server):
            raise dns.error("servers", f"{server!r} is not ip:port", 'e.g. servers = ["127.0.0.1:53"], or leave it out for the system resolvers')
    dns.finish(["servers"])

    dkim = _dkim(path, top.take("dkim", dict, {}), domains, relative)
    filters = _filters(path, top.take("filter", list, [], example='[{ backend = "spamd" }] (write it as a [[filter]] table)'), listen)
    smtp = _smtp_limits(_Reader(path, "smtp", top.take("smtp", dict, {})))
    pop3 = _pop3_settings(_Reader(path, "pop3", top.take("pop3", dict, {})))
    top.finish(_TOP_LEVEL_KEYS)
    return Settings(
        path=path, hostname=hostname, data_dir=data_dir, domains=tuple(domains), listen=listen, tls=tls,
        auth=auth, mailbox=mailbox, delivery=delivery, aliases=aliases, smarthost=smarthost, smtp=smtp, workers=workers, pop3=pop3,
        relay=relay, dns_servers=tuple(servers), filters=filters, dkim=dkim,
    )


_TOP_LEVEL_KEYS = [
    "hostname", "data_dir", "workers", "domains", "listen", "tls", "auth", "mailbox", "delivery", "aliases", "relay", "dns", "smtp",
    "pop3", "filter", "dkim",
]


def _listen(table: _Reader) -> dict[str, str]:
    from twisted.internet import endpoints, reactor

    listen: dict[str, str] = {}
    for name in ListenerNames:
        value = table.take(name, str, None, example='"tcp:25"')
        if value is None:
            continue
        try:
            # Parsing builds the endpoint object without listening on it.
            endpoint = endpoints.serverFromString(reactor, value)
        except Exception as e:  # Twisted raises ValueError, TypeError, KeyError...
            raise table.error(
                name, f"{value!r} is not a Twisted endpoint: {e}",
                'e.g. "tcp:25" or "tcp:2525:interface=127.0.0.1"; TLS comes from [tls], not the endpoint',
            )
        # Twisted takes any integer as a TCP port; the kernel then refuses it at bind time.
        port = getattr(endpoint, "_port", 0)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise table.error(name, f"{value!r}: {port} is not a TCP port (0 to 65535)", 'e.g. "tcp:25"')
        listen[name] = value
    table.finish(list(ListenerNames))
    return listen


def _tls(table: _Reader, relative: Any) -> TLSSettings:
    paths = {}
    for key, example in (("certificate", '"tls/fullchain.pem"'), ("key", '"tls/privkey.pem"')):
        value = relative(table.take(key, str, example=example))
        if not os.path.isfile(value):
            raise table.error(key, f"no such file: {value}", f"point it at a PEM file, e.g. {key} = {example} (relative to this file)")
        if not os.access(value, os.R_OK):
            raise table.error(key, f"cannot read {value}", "let the user mailplat runs as read it")
        paths[key] = value
    table.finish(["certificate", "key"])
    from mailplat.tls import load_server_context

    try:
        load_server_context(paths["certificate"], paths["key"])
    except Exception as e:
        raise table.error("certificate", f"the certificate and key do not load: {e}", "give a PEM certificate chain and its matching private key")
    return TLSSettings(paths["certificate"], paths["key"])


def _backend(path: str, section: str, table: dict[str, Any]) -> BackendSettings:
    options = dict(table)
    name = options.pop("backend", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"[{section}] backend", "is required and must be a backend name", f'e.g. backend = "{_DEFAULT_BACKENDS[section]}"', path)
    return BackendSettings(section, name, options)


def _dkim(path: str, table: dict[str, Any], domains: list[str], relative: Any) -> dict[str, DKIMSettings]:
    keys: dict[str, DKIMSettings] = {}
    for domain, entry in table.items():
        name = domain.strip().lower()
        where = f"[dkim.{_toml(domain)}]"
        if name not in domains:
            raise ConfigError(where, f"{domain} is not one of the domains", "sign only for domains listed in domains", path)
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table", f'{where} with selector = "mail" and key = "dkim/{name}.key"', path)
        reader = _Reader(path, where, dict(entry))
        selector = reader.take("selector", str, example='"mail"')
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", selector):
            raise reader.error("selector", f"{selector!r} is not a DNS label", 'e.g. selector = "mail"')
        key = relative(reader.take("key", str, example=f'"dkim/{name}.key"'))
        try:
            from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            with open(key, "rb") as f:
                private = load_pem_private_key(f.read(), None)
        except OSError as e:
            raise reader.error("key", f"cannot read {key}: {e.strerror}", f"create it with: mailplat --config FILE dkim keygen {name}")
        except (ValueError, TypeError) as e:
            raise reader.error("key", f"{key} is not an unencrypted PEM private key: {e}", f"create one with: mailplat --config FILE dkim keygen {name}")
        if not isinstance(private, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise reader.error("key", f"{key} is neither an RSA nor an Ed25519 key", "DKIM signs with rsa-sha256 or ed25519-sha256")
        if isinstance(private, rsa.RSAPrivateKey) and private.key_size < 1024:
            raise reader.error("key", f"{key} is a {private.key_size}-bit RSA key; verifiers ignore keys under 1024 bits", "use 2048 bits")
        reader.finish(["selector", "key"])
        keys[name] = DKIMSettings(name, selector, key)
    return keys


def _filters(path: str, tables: list[Any], listen: dict[str, str]) -> tuple[FilterSettings, ...]:
    filters = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise ConfigError("filter", f"entry {number} is not a table", 'write each filter as a [[filter]] table with backend = "..."', path)
        reader = _Reader(path, f"[filter] #{number}", dict(table))
        name = reader.take("backend", str, example='"spamd"')
        timeout = reader.positive("timeout", FilterSettings.timeout, float)
        on_error = reader.take("on_error", str, "tempfail", example='"tempfail"')
        if on_error not in ("tempfail", "accept"):
            raise reader.error("on_error", f'must be "tempfail" or "accept", not {on_error!r}', 'on_error = "tempfail" fails closed (451)')
        listeners = reader.take("listeners", list, ["smtp"], example='["smtp"]')
        for listener in listeners:
            if listener not in ("smtp", "submission", "submissions"):
                raise reader.error("listeners", f"{listener!r} is not an SMTP listener", 'choose among "smtp", "submission" and "submissions"')
        # What is left are the backend's own options.
        label = f"[filter] #{number} ({name})"
        filters.append(FilterSettings(BackendSettings("filter", name, reader.table, label), timeout, on_error, tuple(listeners)))
    return tuple(filters)


_DEFAULT_BACKENDS = {"auth": "passwd-file", "mailbox": "maildir", "delivery": "local"}


def _aliases(table: _Reader, domains: list[str]) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for source in list(table.table):
        targets = table.take(source, (str, list), example='"alice@example.org"')
        targets = [targets] if isinstance(targets, str) else targets
        key = source.strip().lower()
        try:
            if key.startswith("@"):
                validate_domain(key[1:])
                domain = key[1:]
            else:
                domain = validate_address(key).split("@")[1]
        except AddressError as e:
            raise table.error(_quote(source), str(e), 'e.g. "postmaster@example.org" = "alice@example.org", or "@example.org" for a catch-all')
        if domain not in domains:
            raise table.error(_quote(source), f"{domain} is not one of the domains", f"add {domain!r} to domains, or remove the alias")
        if key in aliases:
            raise table.error(_quote(source), "is listed twice (addresses are case-insensitive)", "keep one entry")
        if not targets:
            raise table.error(_quote(source), "has no targets", 'give one address or a list, e.g. ["alice@example.org"]')
        checked = []
        for target in targets:
            try:
                address = validate_address(str(target).strip().lower())
            except AddressError as e:
                raise table.error(_quote(source), f"target {target!r}: {e}", 'e.g. "alice@example.org"')
            if address.split("@")[1] not in domains:
                raise table.error(
                    _quote(source), f"target {address} is not in one of the domains; forwarding to other domains is not supported",
                    "point the alias at a local mailbox",
                )
            checked.append(address)
        aliases[key] = tuple(checked)
    return aliases


def _quote(key: str) -> str:
    return f'"{key}"'


def _smtp_limits(table: _Reader) -> SMTPLimits:
    d = SMTPLimits()
    limits = SMTPLimits(
        max_message_size=table.positive("max_message_size", d.max_message_size),
        max_recipients=table.positive("max_recipients", d.max_recipients),
        max_command_line=table.positive("max_command_line", d.max_command_line),
        max_text_line=table.positive("max_text_line", d.max_text_line),
        idle_timeout=table.positive("idle_timeout", d.idle_timeout, float),
        max_connections=table.positive("max_connections", d.max_connections),
        max_connections_per_ip=table.positive("max_connections_per_ip", d.max_connections_per_ip),
        max_errors=table.positive("max_errors", d.max_errors),
        max_received_headers=table.positive("max_received_headers", d.max_received_headers),
    )
    if limits.max_command_line < 512:
        raise table.error("max_command_line", "must be at least 512 (RFC 5321 4.5.3.1.4)", "max_command_line = 512")
    if limits.max_text_line < 1000:
        raise table.error("max_text_line", "must be at least 1000 (RFC 5321 4.5.3.1.6)", "max_text_line = 1000")
    table.finish(list(vars(d)))
    return limits


def _relay_settings(table: _Reader) -> RelaySettings:
    d = RelaySettings()
    tls = table.take("tls", str, d.tls, example='"opportunistic"')
    if tls not in ("opportunistic", "required", "verify"):
        raise table.error("tls", f"must be \"opportunistic\", \"required\" or \"verify\", not {tls!r}", 'tls = "opportunistic"')
    port = table.positive("port", d.port)
    if port > 65535:
        raise table.error("port", f"{port} is not a TCP port", "port = 25")
    settings = RelaySettings(
        tls=tls,
        port=port,
        retry_initial=table.positive("retry_initial", d.retry_initial, float),
        retry_max=table.positive("retry_max", d.retry_max, float),
        max_age=table.positive("max_age", d.max_age, float),
        username=table.take("username", str, "", example='"relay-user"'),
        password=table.take("password", str, "", example='"secret"'),
        ca_file=_ca_file(table),
        **{key: table.positive(key, getattr(d, key), float) for key in _RELAY_TIMEOUTS},
    )
    table.finish(["smarthost", *vars(d)])
    return settings


_RELAY_TIMEOUTS = ("connect_timeout", "greeting_timeout", "command_timeout", "data_timeout", "data_block_timeout", "data_done_timeout")


def _ca_file(table: _Reader) -> str:
    path = table.take("ca_file", str, "", example='"/etc/ssl/certs/ca-certificates.crt"')
    if not path:
        return ""
    path = os.path.normpath(os.path.join(os.path.dirname(table.file), os.path.expanduser(path)))
    try:
        from twisted.internet import ssl

        with open(path, "rb") as f:
            ssl.Certificate.loadPEM(f.read())
    except OSError as e:
        raise table.error("ca_file", f"cannot read {path}: {e.strerror}", "point it at a PEM file of trusted certificates")
    except Exception as e:
        raise table.error("ca_file", f"{path} is not a PEM certificate: {e}", "point it at a PEM file of trusted certificates")
    return path


def _pop3_settings(table: _Reader) -> POP3Settings:
    d = POP3Settings()
    delay = table.take("auth_failure_delay", (int, float), d.auth_failure_delay, example="2")
    if delay < 0:
        raise table.error("auth_failure_delay", "must not be negative", "auth_failure_delay = 2")
    expire = table.take("expire_days", (int, float), None, example="30")
    if expire is not None and expire <= 0:
        raise table.error("expire_days", "must be greater than 0", "leave it out to keep retrieved mail, or e.g. expire_days = 30")
    on_delete = table.take("on_delete", str, d.on_delete, example='"trash"')
    if on_delete not in ("remove", "trash"):
        raise table.error("on_delete", f"must be \"remove\" or \"trash\", not {on_delete!r}", 'on_delete = "trash" keeps deleted mail in .Trash')
    settings = POP3Settings(
        auth_failure_delay=float(delay),
        max_login_failures=table.positive("max_login_failures", d.max_login_failures),
        login_block_time=table.positive("login_block_time", d.login_block_time, float),
        idle_timeout=table.positive("idle_timeout", d.idle_timeout, float),
        max_connections=table.positive("max_connections", d.max_connections),
        max_connections_per_ip=table.positive("max_connections_per_ip", d.max_connections_per_ip),
        expire_days=float(expire) if expire is not None else None,
        on_delete=on_delete,
        trash_days=table.positive("trash_days", d.trash_days, float),
    )
    table.finish(list(vars(d)))
    return settings


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
