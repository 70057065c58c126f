"""Relaying to other domains: find the hosts (MX, RFC 5321 5.1; null MX, RFC
7505) and hand them the message over the one SMTP client
(mailplat.wire.smtpclient), sessions kept open between messages.

The policy is ours: TLS as ``[relay] tls`` says, a login only inside TLS,
and every failure of a host a TemporaryFailure whose text the queue keeps.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import IO, Any

from twisted.internet import endpoints, ssl
from twisted.names import dns
from twisted.names import error as dns_error

from mailplat.config import RelaySettings
from mailplat.interfaces import PermanentFailure, TemporaryFailure
from mailplat.wire.smtpclient import (
    ClientError,
    ConnectFailed,
    Reply,
    SMTPClient,
    StaleSession,
    Timeouts,
    connect,
)

__all__ = ["Reply", "SessionCache", "addresses_of", "find_hosts"]


async def find_hosts(domain: str, resolver: Any, port: int) -> list[tuple[str, str, int]]:
    """(name, address, port) to try in order; PermanentFailure or TemporaryFailure when there are none."""
    try:
        answers, _, _ = await resolver.lookupMailExchange(domain)
    except dns_error.DomainError:
        raise PermanentFailure(f"domain {domain} does not exist")
    except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
        raise PermanentFailure(f"domain {domain} does not exist")
    except Exception as e:  # noqa: BLE001 - timeouts, SERVFAIL, refused: all temporary
        raise TemporaryFailure(f"DNS lookup of {domain} failed: {type(e).__name__}")
    mx = sorted(
        (record.payload.preference, str(record.payload.name)) for record in answers if record.type == dns.MX
    )
    if len(mx) == 1 and mx[0][1] in ("", "."):
        raise PermanentFailure(f"domain {domain} accepts no mail (null MX, RFC 7505)")
    names = [name for _, name in mx if name not in ("", ".")] or [domain]
    hosts = []
    for name in names:
        hosts += [(name, address, port) for address in await addresses_of(name, resolver)]
    if not hosts:
        raise TemporaryFailure(f"no address found for the mail hosts of {domain}")
    return hosts


async def addresses_of(name: str, resolver: Any) -> list[str]:
    """A host's IPv4, then IPv6 addresses (A and AAAA queries: ANY is refused by many servers, RFC 8482)."""
    found: list[str] = []
    for lookup, kind in ((resolver.lookupAddress, dns.A), (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _, _ = await lookup(name)
        except Exception:  # noqa: BLE001, S112 - one of A and AAAA may fail where the other works
            continue
        for record in answers:
            if record.type == kind:
                found.append(record.payload.dottedQuad() if kind == dns.A else socket.inet_ntop(socket.AF_INET6, record.payload.address))
    return found


def _verifying_options(name: str, ca_file: str) -> Any:
    """TLS that checks the peer's certificate chain and that it names ``name``."""
    if not ca_file:
        return ssl.optionsForClientTLS(name)
    with open(ca_file, "rb") as f:
        authorities = [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(f.read())]
    return ssl.optionsForClientTLS(name, trustRoot=ssl.trustRootFromCertificates(authorities))


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]


class SessionCache:
    """Sessions to remote hosts kept open between messages, as Postfix's
    connection cache does: a message to a host we just talked to skips the
    connect, greeting, EHLO, STARTTLS and AUTH round trips.

    A session is reused only after a completed DATA (RFC 5321 4.1.1.4: the
    transaction state is then clear), for at most ``max_uses`` messages, and
    is closed after ``idle_time`` seconds unused.
    """

    def __init__(self, reactor: Any, idle_time: float = 5.0, max_uses: int = 100) -> None:
        self.reactor = reactor
        self.idle_time = idle_time
        self.max_uses = max_uses
        self._idle: dict[tuple[str, str, int], list[tuple[SMTPClient, Any]]] = {}

    def _take(self, key: tuple[str, str, int]) -> SMTPClient | None:
        sessions = self._idle.get(key, [])
        while sessions:
            client, timer = sessions.pop()
            timer.cancel()
            # Closed by the remote while idle, or it said something unasked (a 421).
            if client.usable():
                return client
            client.quit()
        return None

    def _keep(self, key: tuple[str, str, int], client: SMTPClient) -> None:
        if client.transactions >= self.max_uses or not client.reusable():
            client.quit()
            return
        sessions = self._idle.setdefault(key, [])

        def expire() -> None:
            sessions.remove((client, timer))
            client.quit()

        timer = self.reactor.callLater(self.idle_time, expire)
        sessions.append((client, timer))

    def close(self) -> None:
        """Close every idle session (at shutdown)."""
        for sessions in self._idle.values():
            for client, timer in sessions:
                timer.cancel()
                client.quit()
        self._idle.clear()

    async def send(
        self, host: tuple[str, str, int], helo: str, sender: str, recipients: list[str], open_message: Callable[[], IO[bytes]],
        settings: RelaySettings,
    ) -> dict[str, Reply]:
        """Send one message to one host; each recipient's reply.  TemporaryFailure if the host cannot be used."""
        try:
            client = self._take(host)
            if client is not None:
                try:
                    return await self._transaction(client, host, sender, recipients, open_message, settings)
                except StaleSession:
                    pass  # it went away between two messages: open a new one
            client, refusal = await _open_session(self.reactor, host, helo, settings)
            if refusal is not None:
                return dict.fromkeys(recipients, refusal)
            return await self._transaction(client, host, sender, recipients, open_message, settings)
        except ClientError as e:
            raise TemporaryFailure(f"{host[0]}: {e}") from None

    async def _transaction(
        self, client: SMTPClient, host: tuple[str, str, int], sender: str, recipients: list[str],
        open_message: Callable[[], IO[bytes]], settings: RelaySettings,
    ) -> dict[str, Reply]:
        try:
            replies = await client.transaction(sender, recipients, open_message, _timeouts(settings))
        finally:
            # Kept only when the transaction ended in order; else closed.
            self._keep(host, client)
        return dict(zip(recipients, replies))


def _timeouts(settings: RelaySettings) -> Timeouts:
    return Timeouts(settings.command_timeout, settings.data_timeout, settings.data_block_timeout, settings.data_done_timeout)


async def _open_session(
    reactor: Any, host: tuple[str, str, int], helo: str, settings: RelaySettings
) -> tuple[SMTPClient, Reply | None]:
    """Connect, read the greeting, EHLO, STARTTLS, AUTH: a session ready for MAIL, or the remote's refusal."""
    name, address, port = host
    endpoint_type = endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint
    endpoint = endpoint_type(reactor, address, port, timeout=settings.connect_timeout)
    try:
        client = await connect(endpoint, lambda: SMTPClient(reactor), reactor, settings.connect_timeout)
    except ConnectFailed as e:
        raise TemporaryFailure(f"cannot connect to {name} [{address}]:{port}: {e}")
    try:
        refusal = await _start_session(client, name, helo, settings)
    except BaseException:
        client.quit()
        raise
    if refusal is not None:
        client.quit()
    return client, refusal


async def _start_session(client: SMTPClient, name: str, helo: str, settings: RelaySettings) -> Reply | None:
    tls, timeout = settings.tls, settings.command_timeout
    greeting = await client.greeting(settings.greeting_timeout)
    if greeting.code != 220:
        return greeting
    if greeting.text.split(" ", 1)[0].lower() == helo.lower():
        # We are talking to ourselves (an MX or A record that names another
        # host but reaches us): sending would loop, so it bounces, as in Postfix.
        raise PermanentFailure(f"mail for {name} loops back to myself (it greets with our own name, {helo})")
    hello = await client.hello(helo, timeout)
    if client.offers("STARTTLS"):
        options = _verifying_options(name, settings.ca_file) if tls == "verify" else ssl.CertificateOptions(verify=False)
        started = await client.starttls(options, timeout)
        if started.code == 220:
            hello = await client.hello(helo, timeout)
        elif tls != "opportunistic":
            raise TemporaryFailure(f"{name} refused STARTTLS: {started}")
    elif tls != "opportunistic":
        raise TemporaryFailure(f"{name} does not offer STARTTLS and [relay] tls = {tls!r}")
    if hello.code != 250:
        return hello
    if settings.username:
        # Outside TLS the client refuses (InsecureLogin): the host fails, the message stays queued.
        auth = await client.login(settings.username, settings.password, timeout)
        if auth.code != 235:
            raise TemporaryFailure(f"{name} refused our login: {auth}")
    return None
