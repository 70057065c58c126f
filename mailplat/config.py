"""The TOML configuration file, loaded into typed and validated settings.

Every mistake is a :class:`ConfigError` naming the file, the key, the problem
and the fix, so an operator never has to read a traceback.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from mailplat.addresses import AddressError, canonical, validate_address, validate_domain
from mailplat.numerals import is_digits

# ConfigError lives beside the reader that raises it; plugin authors import it from here.
from mailplat.options import ConfigError, OptionReader, toml_value

__all__ = [
    "BackendSettings",
    "ConfigError",
    "ListenerNames",
    "LoginSettings",
    "IMAPSettings",
    "POP3Settings",
    "RelaySettings",
    "SMTPLimits",
    "Settings",
    "TLSSettings",
    "load",
]

log = Logger()

# The listener names of [listen], in the order they are started.
ListenerNames = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")


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
    # Seconds for a client to finish its TLS handshake (on 465, or after STARTTLS).
    tls_handshake_timeout: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_errors: int = 20
    max_received_headers: int = 30
    max_header_fields: int = 1000


@dataclass(frozen=True)
class LoginSettings:
    """[login]: the guard every listener that takes a password shares."""

    # Seconds before a failed login is answered.
    auth_failure_delay: float = 2.0
    # Failed logins from one address within login_block_time; then it is refused that long.
    max_login_failures: int = 10
    login_block_time: float = 300.0


@dataclass(frozen=True)
class SubmissionSettings:
    """[submission]: what an authenticated user may send, on both submission listeners."""

    # Per account, counted in each process: a burst of this many, then this
    # many an hour as the hour goes by; 0 turns the limit off.
    max_messages_per_hour: int = 500
    max_recipients_per_hour: int = 2000
    # Account -> addresses it may also send as (MAIL FROM and the From:
    # header), beyond its own and the aliases that resolve to it.
    send_as: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class POP3Settings:
    """[pop3]: limits and what happens to mail after download."""

    idle_timeout: float = 600.0
    # Seconds for a client to finish its TLS handshake (on 995, or after STLS).
    tls_handshake_timeout: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    # Invalid commands in a session before login, and after it; then -ERR
    # and the connection is closed (Dovecot's limits).
    max_errors_before_login: int = 10
    max_errors: int = 20
    # None: never; otherwise retrieved messages are removed after this many days.
    expire_days: float | None = None
    on_delete: str = "remove"
    trash_days: float = 30.0


@dataclass(frozen=True)
class IMAPSettings:
    """[imap]: limits of the IMAP listeners."""

    # RFC 9051 5.4: an idle client is not logged out in less than 30 minutes.
    idle_timeout: float = 1800.0
    tls_handshake_timeout: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    # Sessions of one user from one address (Dovecot's mail_max_userip_connections).
    max_connections_per_user_ip: int = 10
    # Octets of a command line outside literals (RFC 7162 4 asks for at least 8192).
    max_line_length: int = 65536
    # The largest APPEND, in octets: a bigger literal is refused before it is read.
    max_message_size: int = 64 * 1024 * 1024
    # Invalid commands before login, and after it; then BYE.
    max_errors_before_login: int = 10
    max_errors: int = 20
    # Commands per user (or per address before login) a minute, over all its
    # sessions: past a burst of this many, further commands wait their turn
    # (are paced, not refused); 0 turns it off.
    max_commands_per_minute: int = 20000


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
class ForwardingSettings:
    """[forwarding]: how mail an alias sends to another domain is signed (SRS)."""

    # Bounces to forwarded mail come back to SRS0=...@srs_domain: its MX (or A) must be us.
    srs_domain: str = ""
    # One secret a line, the first signs; "" until loaded: data_dir/srs.secret, made at first start.
    srs_secret_file: str = ""
    # False: the default file, which the server makes when it is missing.
    secret_given: bool = False


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
    imap: IMAPSettings = field(default_factory=IMAPSettings)
    # [mailbox] quota: octets each account may store (0: no limit); read by
    # mailplat, not by the backend.
    mailbox_quota: int = 0
    login: LoginSettings = field(default_factory=LoginSettings)
    submission: SubmissionSettings = field(default_factory=lambda: SubmissionSettings())
    relay: RelaySettings = field(default_factory=lambda: RelaySettings())
    dns_servers: tuple[tuple[str, int], ...] = ()
    filters: tuple[FilterSettings, ...] = ()
    dkim: dict[str, DKIMSettings] = field(default_factory=dict)
    forwarding: ForwardingSettings = field(default_factory=lambda: ForwardingSettings())

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
            if backend is self.mailbox:
                # As the operator would write it: "2G" rather than 2147483648 (0 is no limit).
                q = self.mailbox_quota
                unit = next((u for u in "TGMK" if q and q % _SIZE_UNITS[u] == 0), "")
                lines += [f"quota = {_toml(f'{q // _SIZE_UNITS[unit]}{unit}') if unit else q}"]
        for d in self.dkim.values():
            lines += ["", f"[dkim.{_toml(d.domain)}]", f"selector = {_toml(d.selector)}", f"key = {_toml(d.key)}"]
        for f in self.filters:
            lines += ["", "[[filter]]", f"backend = {_toml(f.backend.name)}", f"timeout = {_toml(f.timeout)}"]
            lines += [f"on_error = {_toml(f.on_error)}", f"listeners = {_toml(list(f.listeners))}"]
            lines += [f"{_key(k)} = {_toml(v)}" for k, v in f.backend.options.items()]
        lines += ["", "[aliases]"]
        lines += [f"{_toml(k)} = {_toml(list(v))}" for k, v in self.aliases.items()]
        lines += ["", "[forwarding]", f"srs_domain = {_toml(self.forwarding.srs_domain)}"]
        secret = f"srs_secret_file = {_toml(self.forwarding.srs_secret_file)}"
        # The default file may not exist yet (the server makes it): written out, it would have to.
        lines += [secret if self.forwarding.secret_given else f"# {secret} (the default, made at the first start)"]
        lines += ["", "[relay]", f"smarthost = {_toml(self.smarthost)}"]
        lines += [f"{k} = {_toml(v if k != 'password' or not v else '(set)')}" for k, v in vars(self.relay).items()]
        from mailplat.wire.dns import format_server

        lines += ["", "[dns]", f"servers = {_toml([format_server(s) for s in self.dns_servers])}", "", "[smtp]"]
        lines += [f"{k} = {_toml(v)}" for k, v in vars(self.smtp).items()]
        lines += ["", "[pop3]"]
        lines += [f"{k} = {_toml(v)}" for k, v in vars(self.pop3).items() if v is not None]
        lines += ["", "[imap]"]
        lines += [f"{k} = {_toml(v)}" for k, v in vars(self.imap).items()]
        lines += ["", "[login]"]
        lines += [f"{k} = {_toml(v)}" for k, v in vars(self.login).items()]
        submission = self.submission
        lines += ["", "[submission]", f"max_messages_per_hour = {submission.max_messages_per_hour}"]
        lines += [f"max_recipients_per_hour = {submission.max_recipients_per_hour}", "", "[submission.send_as]"]
        lines += [f"{_toml(k)} = {_toml(list(v))}" for k, v in submission.send_as.items()]
        return "\n".join(lines) + "\n"


_toml = toml_value


def _key(key: str) -> str:
    """A key as TOML: bare when it may be, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml(key)


# --- reading ---------------------------------------------------------------


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
    except RecursionError:
        # tomllib reads nested arrays and inline tables by recursion.
        raise ConfigError("", "arrays or inline tables are nested too deeply to read", "nest them only a few levels deep", path)
    except Exception as e:
        # Whatever else tomllib lets through, e.g. the ValueError of an
        # integer longer than the 4300 digits int() converts.
        problem = str(e).split("; use sys.set_int_max_str_digits")[0]
        raise ConfigError("", f"cannot be read as TOML: {problem}", "see https://toml.io for the syntax; TOML integers are 64-bit", path)
    return _parse(path, data)


def _parse(path: str, data: dict[str, Any]) -> Settings:
    config_dir = os.path.dirname(path)

    def relative(p: str) -> str:
        return os.path.normpath(os.path.join(config_dir, os.path.expanduser(p)))

    top = OptionReader(data, file=path, folder=config_dir)
    top.reject_unknown(_TOP_LEVEL_KEYS)  # a typo is the likeliest mistake: report it first
    given = "hostname" in top.options
    hostname = top.take("hostname", str, socket.getfqdn(), example='"mail.example.org"').strip().lower()
    try:
        validate_domain(hostname)
    except AddressError as e:
        problem = str(e) if given else f"not set, and this machine's name {hostname!r} is not a fully qualified domain name"
        raise top.error("hostname", problem, 'set the name clients see, e.g. hostname = "mail.example.org"')
    data_dir = top.path("data_dir", "var", what="mailplat's state folder", example='"var"')
    workers = top.integer("workers", 1, at_most=64, fix="use about one worker per CPU core, e.g. workers = 4")

    raw_domains = top.strings("domains", example='["example.org"]')
    if not raw_domains:
        raise top.error("domains", "is empty: mailplat would accept no mail", 'list your domains, e.g. domains = ["example.org"]')
    domains: list[str] = []
    for entry in raw_domains:
        domain = entry.strip().lower()
        try:
            validate_domain(domain)
        except AddressError as e:
            raise top.error("domains", f"{entry!r}: {e}", 'e.g. domains = ["example.org"]')
        if domain in domains:
            raise top.error("domains", f"{entry!r} is listed twice", "remove the second entry")
        domains.append(domain)

    listen = _listen(top.table("listen"))
    tls = _tls(top.table("tls")) if "tls" in top.options else None
    needs_tls = [name for name in ("submission", "submissions", "pop3", "pop3s", "imap", "imaps") if name in listen]
    if tls is None and needs_tls:
        raise ConfigError(
            f"[listen] {needs_tls[0]}", "needs a TLS certificate: passwords never cross the wire in clear",
            'add a [tls] table with certificate = "..." and key = "..."', path,
        )

    auth = _backend(path, "auth", top.take("auth", dict, example='{ backend = "passwd-file" }'))
    mailbox_table = dict(top.take("mailbox", dict, example='{ backend = "maildir" }'))
    mailbox_quota = _quota(OptionReader({"quota": mailbox_table.pop("quota")} if "quota" in mailbox_table else {}, file=path, section="[mailbox]"))
    mailbox = _backend(path, "mailbox", mailbox_table)
    delivery = _backend(path, "delivery", top.take("delivery", dict, {"backend": "local"}))
    forwarding = _forwarding(top.table("forwarding"), hostname, data_dir)
    aliases = _aliases(top.table("aliases"), domains, {hostname, forwarding.srs_domain})

    relay_reader = top.table("relay")
    smarthost = relay_reader.take("smarthost", str, "", example='"smtp.example.net:587"')
    if smarthost and not _is_host_port(smarthost):
        raise relay_reader.error("smarthost", f"{smarthost!r} is not host:port", 'e.g. smarthost = "smtp.example.net:587"')
    relay = _relay_settings(relay_reader)
    dns = top.table("dns")
    from mailplat.wire.dns import parse_server

    servers = []
    for server in dns.take("servers", list, [], example='["127.0.0.1:53"]'):
        try:
            servers.append(parse_server(server if isinstance(server, str) else repr(server)))
        except ValueError as e:
            raise dns.error(
                "servers", str(e), 'e.g. servers = ["127.0.0.1:53", "[::1]:53"] (IP addresses), or leave it out for the system resolvers'
            )
    dns.finish(["servers"])

    dkim = _dkim(path, top.take("dkim", dict, {}), domains, relative)
    filters = _filters(path, top.take("filter", list, [], example='[{ backend = "spamd" }] (write it as a [[filter]] table)'), listen)
    smtp = _smtp_limits(top.table("smtp"))
    submission = _submission_settings(top.table("submission"), domains)
    pop3_reader = top.table("pop3")
    login = _login_settings(top.table("login"), pop3_reader)
    pop3 = _pop3_settings(pop3_reader)
    imap = _imap_settings(top.table("imap"))
    top.finish(_TOP_LEVEL_KEYS)
    return Settings(
        path=path, hostname=hostname, data_dir=data_dir, domains=tuple(domains), listen=listen, tls=tls,
        auth=auth, mailbox=mailbox, delivery=delivery, aliases=aliases, smarthost=smarthost, smtp=smtp, workers=workers, pop3=pop3,
        imap=imap, mailbox_quota=mailbox_quota, submission=submission,
        relay=relay, dns_servers=tuple(servers), filters=filters, dkim=dkim, login=login, forwarding=forwarding,
    )


_TOP_LEVEL_KEYS = [
    "hostname", "data_dir", "workers", "domains", "listen", "tls", "login", "auth", "mailbox", "delivery", "aliases", "forwarding",
    "relay", "dns", "smtp", "submission", "pop3", "imap", "filter", "dkim",
]


def _listen(table: OptionReader) -> dict[str, str]:
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


def _tls(table: OptionReader) -> TLSSettings:
    paths = {}
    for key, example in (("certificate", '"tls/fullchain.pem"'), ("key", '"tls/privkey.pem"')):
        value = table.path(key, what="a PEM file", example=example)
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
        reader = OptionReader(entry, file=path, section=where)
        selector = reader.take("selector", str, example='"mail"')
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", selector):
            raise reader.error("selector", f"{selector!r} is not a DNS label", 'e.g. selector = "mail"')
        key = relative(reader.path("key", what="a PEM private key", example=f'"dkim/{name}.key"'))
        from mailplat.mailauth.dkim import KeyFileError, load_private_key

        try:
            load_private_key(key, name)
        except OSError as e:
            raise reader.error("key", f"cannot read {key}: {e.strerror}", f"create it with: mailplat --config FILE dkim keygen {name}")
        except KeyFileError as e:
            raise reader.error("key", e.problem, e.fix)
        reader.finish(["selector", "key"])
        keys[name] = DKIMSettings(name, selector, key)
    return keys


def _filters(path: str, tables: list[Any], listen: dict[str, str]) -> tuple[FilterSettings, ...]:
    filters = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise ConfigError("filter", f"entry {number} is not a table", 'write each filter as a [[filter]] table with backend = "..."', path)
        reader = OptionReader(table, file=path, section=f"[filter] #{number}")
        name = reader.take("backend", str, example='"spamd"')
        timeout = reader.number("timeout", FilterSettings.timeout, unit="of seconds")
        on_error = reader.choice("on_error", ("tempfail", "accept"), "tempfail", fix='on_error = "tempfail" fails closed (451)')
        listeners = reader.strings("listeners", ["smtp"], example='["smtp"]')
        for listener in listeners:
            if listener not in ("smtp", "submission", "submissions"):
                raise reader.error("listeners", f"{listener!r} is not an SMTP listener", 'choose among "smtp", "submission" and "submissions"')
        # What is left are the backend's own options.
        label = f"[filter] #{number} ({name})"
        filters.append(FilterSettings(BackendSettings("filter", name, reader.options, label), timeout, on_error, tuple(listeners)))
    return tuple(filters)


_DEFAULT_BACKENDS = {"auth": "passwd-file", "mailbox": "maildir", "delivery": "local"}


def _aliases(table: OptionReader, domains: list[str], own_names: set[str]) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for source in list(table.options):
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
            target_domain = address.split("@")[1]
            if target_domain not in domains and target_domain in own_names:
                # Not one of the domains, yet its mail would come back here: a loop.
                raise table.error(
                    _quote(source), f"target {address} is at this server's own name but {target_domain} is not one of the domains",
                    f"point the alias at a mailbox in {domains[0]}, or add {target_domain!r} to domains",
                )
            checked.append(address)
        aliases[key] = tuple(checked)
    _refuse_alias_loops(table, aliases)
    return aliases


def _refuse_alias_loops(table: OptionReader, aliases: dict[str, tuple[str, ...]]) -> None:
    """An alias chain that comes back to where it started would take no mail at all."""

    def alias_of(address: str) -> str | None:
        return next((key for key in (address, canonical(address)) if key in aliases), None)

    done: set[str] = set()

    def visit(key: str, chain: list[str]) -> None:
        if key in chain:
            loop = " -> ".join([*chain[chain.index(key):], key])
            raise table.error(_quote(key), f"alias loop: {loop}", "point one alias of the loop at a mailbox")
        if key in done:
            return
        for target in aliases[key]:
            following = alias_of(target)
            if following is not None:
                visit(following, [*chain, key])
        done.add(key)

    for key in aliases:
        visit(key, [])


def _forwarding(table: OptionReader, hostname: str, data_dir: str) -> ForwardingSettings:
    srs_domain = table.take("srs_domain", str, hostname, example=f'"{hostname}"').strip().lower()
    try:
        validate_domain(srs_domain)
    except AddressError as e:
        raise table.error("srs_domain", str(e), f'a name whose MX or A record points at this server, e.g. srs_domain = "{hostname}"')
    given = "srs_secret_file" in table.options
    path = table.path("srs_secret_file", os.path.join(data_dir, "srs.secret"), what="a file of SRS secrets", example='"srs.secret"')
    if given:
        from mailplat.forwarding import load_secrets

        try:
            load_secrets(path, create=False)
        except OSError as e:
            raise table.error(
                "srs_secret_file", f"cannot read {path}: {e.strerror}",
                "create it with a long random line, e.g. `openssl rand -base64 32 > FILE; chmod 600 FILE`, or leave the key out "
                "to have mailplat make one under data_dir",
            )
        except (ValueError, UnicodeDecodeError):
            raise table.error("srs_secret_file", f"{path} holds no secret", "write a long random line into it, e.g. `openssl rand -base64 32`")
    table.finish(["srs_domain", "srs_secret_file"])
    return ForwardingSettings(srs_domain, path, given)


def _quote(key: str) -> str:
    return f'"{key}"'


def _smtp_limits(table: OptionReader) -> SMTPLimits:
    d = SMTPLimits()
    limits = SMTPLimits(
        max_message_size=table.integer("max_message_size", d.max_message_size, unit="of octets"),
        max_recipients=table.integer("max_recipients", d.max_recipients),
        max_command_line=table.integer(
            "max_command_line", d.max_command_line, at_least=512, unit="of octets", fix="max_command_line = 512 (RFC 5321 4.5.3.1.4)",
        ),
        max_text_line=table.integer("max_text_line", d.max_text_line, at_least=1000, unit="of octets", fix="max_text_line = 1000 (RFC 5321 4.5.3.1.6)"),
        idle_timeout=table.number("idle_timeout", d.idle_timeout, unit="of seconds"),
        tls_handshake_timeout=table.number("tls_handshake_timeout", d.tls_handshake_timeout, unit="of seconds"),
        max_connections=table.integer("max_connections", d.max_connections),
        max_connections_per_ip=table.integer("max_connections_per_ip", d.max_connections_per_ip),
        max_errors=table.integer("max_errors", d.max_errors),
        max_received_headers=table.integer("max_received_headers", d.max_received_headers),
        max_header_fields=table.integer("max_header_fields", d.max_header_fields),
    )
    table.finish(list(vars(d)))
    return limits


def _relay_settings(table: OptionReader) -> RelaySettings:
    d = RelaySettings()
    settings = RelaySettings(
        tls=table.choice("tls", ("opportunistic", "required", "verify"), d.tls),
        port=table.integer("port", d.port, at_most=65535),
        retry_initial=table.number("retry_initial", d.retry_initial, unit="of seconds"),
        retry_max=table.number("retry_max", d.retry_max, unit="of seconds"),
        max_age=table.number("max_age", d.max_age, unit="of seconds"),
        username=table.take("username", str, "", example='"relay-user"'),
        password=table.take("password", str, "", example='"secret"'),
        ca_file=_ca_file(table),
        **{key: table.number(key, getattr(d, key), unit="of seconds") for key in _RELAY_TIMEOUTS},
    )
    table.finish(["smarthost", *vars(d)])
    return settings


_RELAY_TIMEOUTS = ("connect_timeout", "greeting_timeout", "command_timeout", "data_timeout", "data_block_timeout", "data_done_timeout")


def _ca_file(table: OptionReader) -> str:
    path: str = table.path("ca_file", "", what="a PEM file of trusted certificates", example='"/etc/ssl/certs/ca-certificates.crt"')
    if not path:
        return ""
    try:
        from twisted.internet import ssl

        with open(path, "rb") as f:
            ssl.Certificate.loadPEM(f.read())
    except OSError as e:
        raise table.error("ca_file", f"cannot read {path}: {e.strerror}", "point it at a PEM file of trusted certificates")
    except Exception as e:
        raise table.error("ca_file", f"{path} is not a PEM certificate: {e}", "point it at a PEM file of trusted certificates")
    return path


def _session_limits(table: OptionReader, d: POP3Settings | IMAPSettings, idle_at_least: float | None = None, idle_fix: str = "") -> dict[str, Any]:
    """The limits [pop3] and [imap] both have, read the same way."""
    return {
        "idle_timeout": table.number("idle_timeout", d.idle_timeout, unit="of seconds", at_least=idle_at_least, fix=idle_fix),
        "tls_handshake_timeout": table.number("tls_handshake_timeout", d.tls_handshake_timeout, unit="of seconds"),
        "max_connections": table.integer("max_connections", d.max_connections),
        "max_connections_per_ip": table.integer("max_connections_per_ip", d.max_connections_per_ip),
        "max_errors_before_login": table.integer("max_errors_before_login", d.max_errors_before_login),
        "max_errors": table.integer("max_errors", d.max_errors),
    }


def _pop3_settings(table: OptionReader) -> POP3Settings:
    d = POP3Settings()
    settings = POP3Settings(
        **_session_limits(table, d),
        expire_days=table.number(
            "expire_days", None, unit="of days", fix="leave it out to keep retrieved mail, or e.g. expire_days = 30",
        ),
        on_delete=table.choice("on_delete", ("remove", "trash"), d.on_delete, fix='on_delete = "trash" keeps deleted mail in .Trash'),
        trash_days=table.number("trash_days", d.trash_days, unit="of days"),
    )
    table.finish(list(vars(d)))
    return settings


def _imap_settings(table: OptionReader) -> IMAPSettings:
    d = IMAPSettings()
    settings = IMAPSettings(
        **_session_limits(table, d, idle_at_least=1800.0, idle_fix="RFC 9051 5.4: at least 30 minutes, e.g. idle_timeout = 1800"),
        max_connections_per_user_ip=table.integer("max_connections_per_user_ip", d.max_connections_per_user_ip),
        max_line_length=table.integer("max_line_length", d.max_line_length, at_least=8192, fix="RFC 7162 4: at least 8192, e.g. max_line_length = 65536"),
        max_message_size=table.integer("max_message_size", d.max_message_size, unit="of octets"),
        max_commands_per_minute=table.integer(
            "max_commands_per_minute", d.max_commands_per_minute, at_least=0, fix="e.g. max_commands_per_minute = 20000, or 0 for no limit",
        ),
    )
    table.finish(list(vars(d)))
    return settings


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _quota(table: OptionReader) -> int:
    """[mailbox] quota: octets as an integer, or a string such as "500M" or "2G"; 0 is no limit."""
    value = table.take("quota", (int, str), 0, example='"2G"')
    table.finish(["quota"])
    if isinstance(value, bool):
        raise table.error("quota", f"{value!r} is not a size", 'e.g. quota = "2G", or leave it out for no limit')
    if isinstance(value, int):
        if value < 0:
            raise table.error("quota", f"{value} is negative", 'e.g. quota = "2G", or 0 for no limit')
        return value
    match = re.fullmatch(r"\s*([0-9]{1,15})\s*([KMGT]?)I?B?\s*", value.upper())
    if not match:
        raise table.error("quota", f"{value!r} is not a size", 'e.g. quota = "500M" or "2G" (K, M, G, T are powers of 1024)')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _submission_settings(table: OptionReader, domains: list[str]) -> SubmissionSettings:
    d = SubmissionSettings()
    hourly = {
        key: table.integer(key, getattr(d, key), at_least=0, fix=f"e.g. {key} = {getattr(d, key)}, or 0 for no limit")
        for key in ("max_messages_per_hour", "max_recipients_per_hour")
    }
    send_as = _send_as(table.table("send_as", example='{ "alice@example.org" = ["alice@example.net"] }'), domains)
    table.finish()
    return SubmissionSettings(**hourly, send_as=send_as)


def _send_as(table: OptionReader, domains: list[str]) -> dict[str, tuple[str, ...]]:
    """[submission.send_as]: "user@one.of.the.domains" = ["address", ...], addresses compared without case or +tag."""
    send_as: dict[str, tuple[str, ...]] = {}
    for user in list(table.options):
        targets = table.take(user, (str, list), example='["alice@example.net"]')
        targets = [targets] if isinstance(targets, str) else targets
        try:
            account = canonical(validate_address(user.strip().lower()))
        except AddressError as e:
            raise table.error(_quote(user), str(e), 'name a user, e.g. "alice@example.org" = ["alice@example.net"]')
        if account.rpartition("@")[2] not in domains:
            raise table.error(_quote(user), f"{account} is not in one of the domains, so no user logs in as it", "name one of your users")
        if account in send_as:
            raise table.error(_quote(user), "is listed twice (addresses are case-insensitive, +tags ignored)", "keep one entry")
        if not targets:
            raise table.error(_quote(user), "has no addresses", 'give one address or a list, e.g. ["alice@example.net"]')
        addresses = []
        for target in targets:
            try:
                addresses.append(canonical(validate_address(str(target).strip().lower())))
            except AddressError as e:
                raise table.error(_quote(user), f"{target!r}: {e}", 'e.g. ["alice@example.net"]')
        send_as[account] = tuple(dict.fromkeys(addresses))
    return send_as


# These were [pop3] keys while only POP3 had a login guard.  For one release
# [pop3] still sets them (where [login] does not); the next reads them only in [login].
_MOVED_TO_LOGIN = ("auth_failure_delay", "max_login_failures", "login_block_time")


def _login_settings(table: OptionReader, pop3: OptionReader) -> LoginSettings:
    moved = [key for key in _MOVED_TO_LOGIN if key in pop3.options]
    both = [key for key in moved if key in table.options]
    # A [pop3] value is checked where it was written, then stands in for the default.
    fallback = _login_values(pop3, LoginSettings()) if moved else LoginSettings()
    settings = _login_values(table, fallback)
    table.finish()
    if moved:
        log.warn(
            "{path}: [pop3] {keys}: deprecated there, move them to [login], which every listener shares; "
            "the next release reads them only in [login]{conflict}",
            path=table.file, keys=", ".join(moved),
            conflict=f"; [login] also sets {', '.join(both)} and wins, so the [pop3] value is not used" if both else "",
        )
    return settings


def _login_values(table: OptionReader, defaults: LoginSettings) -> LoginSettings:
    """The three login keys read from ``table``, ``defaults`` where it leaves them out."""
    d = LoginSettings()
    return LoginSettings(
        auth_failure_delay=table.number(
            "auth_failure_delay", defaults.auth_failure_delay, at_least=0, unit="of seconds", example=f"{d.auth_failure_delay}",
        ),
        max_login_failures=table.integer("max_login_failures", defaults.max_login_failures, example=f"{d.max_login_failures}"),
        login_block_time=table.number("login_block_time", defaults.login_block_time, unit="of seconds", example=f"{d.login_block_time}"),
    )


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and is_digits(port) and 0 < int(port) < 65536)
