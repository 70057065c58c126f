"""Wiring: settings -> backends -> listeners, as one twistd MultiService.

Also the twistd plugin's ``Options`` and ``makeService`` (see
``twisted/plugins/mailplat_twistd.py``).
"""

from __future__ import annotations

import collections
import os
import resource
import sys
from typing import Any

from twisted.application import service
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from mailplat.addresses import AliasResolver
from mailplat.config import ConfigError, Settings, load
from mailplat.cred import AuthBackendChecker, LoginGuard, MailRealm
from mailplat.forwarding import Forwarder, load_secrets
from mailplat.fsutil import makedirs_durable
from mailplat.interfaces import BackendContext, IMessageStore, TemporaryFailure
from mailplat.plugins import build_backend, call
from mailplat.imap.server import IMAPFactory
from mailplat.pop3.server import POP3Factory
from mailplat.ratelimit import TokenBuckets
from mailplat.smtp.filtering import ConfiguredFilter, FilterChain
from mailplat.queue.runner import QueueRunner
from mailplat.queue.store import Queue
from mailplat.smtp.quota import SendingQuota
from mailplat.smtp.receiving import Spool
from mailplat.smtp.server import SMTPFactory
from mailplat.routing import Router
from mailplat.threads import Threads
from mailplat.tls import load_server_context
from mailplat.wire.dns import reactor_resolver
from mailplat.workers import WorkerPool, adopt_port

__all__ = [
    "Listener", "Options", "backend_context", "build_providers", "check_alias_targets", "forwarder", "makeService", "make_service",
]

log = Logger()


def backend_context(settings: Settings, reactor: Any, admin: bool = False) -> BackendContext:
    return BackendContext(
        hostname=settings.hostname,
        domains=settings.domains,
        config_dir=settings.config_dir,
        data_dir=settings.data_dir,
        reactor=reactor,
        admin=admin,
        dns=None if admin else reactor_resolver(settings.dns_servers),
        dns_servers=settings.dns_servers,
        threads=None if admin else Threads(reactor),
        mailbox_quota=settings.mailbox_quota,
    )


def build_providers(settings: Settings, reactor: Any) -> tuple[BackendContext, list[ConfiguredFilter]]:
    """Build and verify every configured backend: auth, mailbox, delivery, filters."""
    context = backend_context(settings, reactor)
    for section in (settings.auth, settings.mailbox, settings.delivery):
        context.providers[section.section] = build_backend(section, context, settings.path)
    if "imap" in settings.listen or "imaps" in settings.listen:
        imap_store(settings, context.providers["mailbox"])
    filters = [ConfiguredFilter(f, build_backend(f.backend, context, settings.path)) for f in settings.filters]
    return context, filters


def check_alias_targets(settings: Settings, resolver: AliasResolver) -> bool:
    """Refuse (ConfigError) an alias whose target in our domains is neither a user nor an alias.

    False when it cannot be told yet: the auth backend answers only once the
    reactor runs (a database, a thread pool).
    """
    results: list[Any] = []
    defer.Deferred.fromCoroutine(resolver.unknown_targets()).addBoth(results.append)
    if not results:
        return False
    result = results[0]
    if isinstance(result, Failure):
        if result.check(TemporaryFailure):
            return False
        result.raiseException()
    for source, target in result:
        raise ConfigError(
            f'[aliases] "{source}"', f"target {target} is not a user or an alias",
            f"add the user (mailplat --config {settings.path} user add {target}) or point the alias at an existing one",
            settings.path,
        )
    return True


def forwarder(settings: Settings) -> Forwarder:
    """SRS for what aliases forward; the default secret file is made at the first start."""
    forwarding = settings.forwarding
    try:
        secrets = load_secrets(forwarding.srs_secret_file, create=not forwarding.secret_given)
    except OSError as e:
        raise ConfigError(
            "[forwarding] srs_secret_file", f"cannot use {forwarding.srs_secret_file}: {e.strerror}",
            "let mailplat read it (and write data_dir), or name another file", settings.path,
        )
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(
            "[forwarding] srs_secret_file", f"{forwarding.srs_secret_file} holds no secret",
            "write a long random line into it, e.g. `openssl rand -base64 32`", settings.path,
        )
    return Forwarder(forwarding.srs_domain, secrets, settings.domains)


def imap_store(settings: Settings, mailbox: Any) -> Any:
    """The mailbox backend as an IMAP store; a ConfigError when it cannot be one."""
    if not IMessageStore.providedBy(mailbox):
        raise ConfigError(
            "[listen] imap" if "imap" in settings.listen else "[listen] imaps",
            f"the {settings.mailbox.name!r} mailbox backend does not serve IMAP (it does not provide IMessageStore)",
            'use backend = "maildir" or "postgres" in [mailbox], or remove the imap listeners', settings.path,
        )
    return mailbox


class Listener(service.Service):
    """One listening endpoint, bound before the reactor runs (so that a port
    in use stops the start instead of leaving a half-working server)."""

    def __init__(
        self, name: str, description: str, endpoint: Any, factory: Any, config_path: str = "", inherited_fd: int | None = None
    ) -> None:
        self.setName(name)
        self.config_path = config_path
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.inherited_fd = inherited_fd
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.inherited_fd is not None:
            from twisted.internet import reactor

            self.port = adopt_port(reactor, self.inherited_fd, self.factory)
            return
        failures: list[Any] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise ConfigError(f"[listen] {self.name}", f"cannot listen on {self.description}: {failures[0].getErrorMessage()}",
                              "choose a free port, or stop the program using it", self.config_path)

    def _listening(self, port: Any) -> None:
        self.port = port
        address = port.getHost()
        log.info("{name} listening on {host}:{port}", name=self.name, host=address.host, port=address.port)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def make_service(
    settings: Settings, reactor: Any, worker: int = 0, inherited: dict[str, int] | None = None
) -> service.MultiService:
    """The whole platform for ``settings``; raises ConfigError before anything listens.

    Worker 0 is the main process: it binds the listeners and starts the other
    workers, which get the listening sockets as ``inherited`` descriptors.
    """
    try:
        makedirs_durable(settings.data_dir)
        spool = Spool(os.path.join(settings.data_dir, "spool", str(worker)))
        spool.start()
    except OSError as e:
        raise ConfigError("data_dir", f"cannot use {settings.data_dir}: {e.strerror}", "choose a folder mailplat may write to", settings.path)
    _raise_file_limit()
    context, filters = build_providers(settings, reactor)
    providers = context.providers
    auth = providers["auth"]
    forwarding = forwarder(settings)
    resolver = AliasResolver(settings.domains, settings.aliases, lambda address: call(auth.lookup, address), forwarding)
    if not check_alias_targets(settings, resolver):
        log.warn(
            "[aliases] targets not checked at start: the {backend} auth backend answers only once running; "
            "`mailplat check-config` checks them", backend=settings.auth.name,
        )
    tls = load_server_context(settings.tls.certificate, settings.tls.key) if settings.tls else None

    signer = None
    if settings.dkim:
        from mailplat.mailauth.dkim import Signer

        signer = Signer(settings.dkim)
    portal = Portal(MailRealm(providers["mailbox"]), [AuthBackendChecker(auth)])
    # One guard for every listener: a guesser may switch ports.
    login_guard = LoginGuard(
        portal, reactor, settings.login.auth_failure_delay, settings.login.max_login_failures, settings.login.login_block_time,
    )
    # One count of what each user sends for both submission listeners, as the guard.
    submission = settings.submission
    quota = SendingQuota(reactor, submission.max_messages_per_hour, submission.max_recipients_per_hour)
    # IMAP sessions per (user, client address), counted over imap and imaps together.
    imap_sessions: collections.Counter[tuple[str, str]] = collections.Counter()
    imap_commands = TokenBuckets(settings.imap.max_commands_per_minute, 60.0, reactor)

    top = _StopInReverse()
    # The thread pools start first and stop last: every backend may use them.
    threads = context.threads
    threads.setServiceParent(top)
    # A backend that holds resources (a pool, a socket) says so by providing
    # IService: it starts before the listeners serve anyone and stops after
    # they have closed.
    for provider in [*providers.values(), *(f.provider for f in filters)]:
        if service.IService.providedBy(provider) and provider.parent is None:
            provider.setServiceParent(top)
    # The outbound queue: every process may add to it; the main one runs it.
    router = Router(providers["delivery"], forwarding=forwarding)
    outbound = QueueRunner(
        Queue(os.path.join(settings.data_dir, "queue")), settings.relay, settings.smarthost, settings.hostname,
        context.dns if worker == 0 else None, resolver, router, reactor, threads,
    )
    router.queue = outbound
    if worker == 0:
        outbound.setServiceParent(top)
    listeners = []
    for name, description in settings.listen.items():
        factory: Any
        if name in ("smtp", "submission", "submissions"):
            factory = SMTPFactory(
                settings.hostname, settings.smtp, resolver, router, spool, reactor, tls,
                submission=name != "smtp", implicit_tls=name == "submissions", login_guard=login_guard, listener=name,
                filters=FilterChain([f for f in filters if name in f.settings.listeners], reactor),
                signer=signer if name != "smtp" else None, signing_threads=threads.cpu,
                quota=quota if name != "smtp" else None, send_as=submission.send_as,
            )
        elif name in ("imap", "imaps"):
            factory = IMAPFactory(
                settings.imap, login_guard, tls, name == "imaps", imap_store(settings, providers["mailbox"]), settings.mailbox_quota, reactor,
                spool_dir=spool.directory, threads=threads, user_connections=imap_sessions, command_rate=imap_commands,
            )
        else:
            factory = POP3Factory(settings.pop3, login_guard, tls, name == "pop3s", reactor)
        if name in ("submissions", "pop3s", "imaps"):
            # RFC 8314: implicit TLS, the whole connection inside TLS.
            assert tls is not None, "config.load requires [tls] for this listener"
            factory = TLSMemoryBIOFactory(tls, False, factory)
        endpoint = endpoints.serverFromString(reactor, _with_backlog(description))
        fd = inherited.get(name) if inherited is not None else None
        listener = Listener(name, description, endpoint, factory, settings.path, fd)
        listener.setServiceParent(top)
        listeners.append(listener)
    if worker == 0 and settings.workers > 1:
        WorkerPool(settings.path, listeners, settings.workers, reactor).setServiceParent(top)
    return top


class _StopInReverse(service.MultiService):
    """Stops its children one by one, last first, each after the previous one
    finished: a MultiService stops them all at once, so a backend could go
    away while a listener still serves a client."""

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service}", service=child)


def _with_backlog(description: str) -> str:
    """Twisted's listen backlog defaults to 50: a burst of clients beyond that
    waits a second for a SYN retry.  Use 1024 unless the config names one."""
    if description.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in description:
        return description + ":backlog=1024"
    return description


def _raise_file_limit() -> None:
    """Every connection is a file descriptor: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Options(usage.Options):
    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", os.environ.get("MAILPLAT_CONFIG"), "The mailplat.toml file (or MAILPLAT_CONFIG)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("give --config FILE or set MAILPLAT_CONFIG")


def makeService(options: Options) -> service.IService:
    """twistd's entry point: a config error is one line on stderr and exit 1."""
    from twisted.internet import reactor

    try:
        settings = load(options["config"])
        top = make_service(settings, reactor)
    except ConfigError as e:
        fail(e)
    return _ExitOnListenError(top)


class _ExitOnListenError(service.MultiService):
    """Turns a listener's ConfigError at bind time into one line and exit 1."""

    def __init__(self, child: service.MultiService) -> None:
        super().__init__()
        child.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ConfigError as e:
            fail(e)


def fail(error: ConfigError) -> None:
    print(f"mailplat: {error}", file=sys.stderr)
    raise SystemExit(1)
