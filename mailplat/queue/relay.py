"""Relaying to other domains: find the hosts (MX, RFC 5321 5.1; null MX, RFC
7505) and hand them the message with a small SMTP client.

Twisted's ESMTPClient reports one result for the whole transaction; the
queue needs each recipient's reply, opportunistic STARTTLS and a streamed
body, so this client is written on a plain Protocol.
"""

from __future__ import annotations

import base64
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer, endpoints, error, protocol, ssl
from twisted.names import dns, error as dns_error

from mailplat.config import RelaySettings
from mailplat.wire.connections import set_no_delay
from mailplat.wire.dotstuff import DotStuffedSender
from mailplat.interfaces import PermanentFailure, TemporaryFailure

__all__ = ["Reply", "SessionCache", "addresses_of", "find_hosts"]

_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")
# RFC 5321 4.5.3.2: how long to wait for each reply.


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def status(self) -> str:
        found = _STATUS.match(self.text)
        if found:
            return found.group(1)
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


async def find_hosts(domain: str, resolver: Any, port: int) -> list[tuple[str, str, int]]:
    """(name, address, port) to try in order; PermanentFailure or TemporaryFailure when there are none."""
    try:
        answers, _, _ = await resolver.lookupMailExchange(domain)
    except dns_error.DomainError:
        raise PermanentFailure(f"domain {domain} does not exist")
    except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
        raise PermanentFailure(f"domain {domain} does not exist")
    except Exception as e:  # timeouts, SERVFAIL, refused
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
        except Exception:
            continue
        for record in answers:
            if record.type == kind:
                found.append(record.payload.dottedQuad() if kind == dns.A else socket.inet_ntop(socket.AF_INET6, record.payload.address))
    return found


class _ClientProtocol(protocol.Protocol):
    """Reads multi-line SMTP replies and hands them out one by one."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._buffer = b""
        self._lines: list[str] = []
        self._replies: list[Reply] = []
        self._waiting: defer.Deferred[Reply] | None = None
        self._closed: Any = None
        self.pipelining = False
        # True when the last transaction ended after DATA: the session may be reused.
        self.after_data = False
        self.uses = 0

    def usable(self) -> bool:
        return self._closed is None and not self.transport.disconnecting and not self._replies and not self._buffer

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            self._lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                code = int(line[:3]) if line[:3].isdigit() else 421
                reply = Reply(code, " ".join(self._lines))
                self._lines = []
                self._deliver(reply)

    def _deliver(self, reply: Reply) -> None:
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(reply)
        else:
            self._replies.append(reply)

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = reason
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(TemporaryFailure("the connection was closed"))

    async def reply(self, timeout: float) -> Reply:
        if self._replies:
            return self._replies.pop(0)
        if self._closed is not None:
            raise TemporaryFailure("the connection was closed")
        self._waiting = defer.Deferred()
        self._waiting.addTimeout(timeout, self.clock)
        try:
            return await self._waiting
        except defer.TimeoutError:
            self.transport.abortConnection()
            raise TemporaryFailure(f"no reply within {timeout:g} seconds")

    async def command(self, line: str, timeout: float) -> Reply:
        self.transport.write(line.encode("utf-8") + b"\r\n")
        return await self.reply(timeout)


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
        self._idle: dict[tuple[str, str, int], list[tuple[_ClientProtocol, Any]]] = {}

    def _take(self, key: tuple[str, str, int]) -> _ClientProtocol | None:
        sessions = self._idle.get(key, [])
        while sessions:
            client, timer = sessions.pop()
            timer.cancel()
            # Closed by the remote while idle, or it said something unasked (a 421).
            if client.usable():
                return client
            client.transport.loseConnection()
        return None

    def _keep(self, key: tuple[str, str, int], client: _ClientProtocol) -> None:
        client.uses += 1
        if client.uses >= self.max_uses or not client.usable():
            self._quit(client)
            return
        sessions = self._idle.setdefault(key, [])

        def expire() -> None:
            sessions.remove((client, timer))
            self._quit(client)

        timer = self.reactor.callLater(self.idle_time, expire)
        sessions.append((client, timer))

    def _quit(self, client: _ClientProtocol) -> None:
        if client.usable():
            client.transport.write(b"QUIT\r\n")
        client.transport.loseConnection()

    def close(self) -> None:
        """Close every idle session (at shutdown)."""
        for sessions in self._idle.values():
            for client, timer in sessions:
                timer.cancel()
                self._quit(client)
        self._idle.clear()

    async def send(
        self, host: tuple[str, str, int], helo: str, sender: str, recipients: list[str], open_message: Callable[[], IO[bytes]],
        settings: RelaySettings,
    ) -> dict[str, Reply]:
        """Send one message to one host; each recipient's reply.  TemporaryFailure if the host cannot be used."""
        client = self._take(host)
        if client is not None:
            try:
                return await self._transaction(client, host, sender, recipients, open_message, settings)
            except _StaleSession:
                pass  # it went away between two messages: open a new one
        client, refusal = await _open_session(self.reactor, host, helo, settings)
        if refusal is not None:
            return dict.fromkeys(recipients, refusal)
        try:
            return await self._transaction(client, host, sender, recipients, open_message, settings)
        except _StaleSession as e:
            raise TemporaryFailure(f"{host[0]} closed the connection: {e}")

    async def _transaction(
        self, client: _ClientProtocol, host: tuple[str, str, int], sender: str, recipients: list[str],
        open_message: Callable[[], IO[bytes]], settings: RelaySettings,
    ) -> dict[str, Reply]:
        completed = False
        try:
            replies = await _mail_transaction(client, self.reactor, host[0], sender, recipients, open_message, settings)
            completed = True
            return replies
        finally:
            if completed and client.after_data:
                self._keep(host, client)
            else:
                self._quit(client)


class _StaleSession(TemporaryFailure):
    """The session closed before its first reply of this transaction."""


async def _open_session(
    reactor: Any, host: tuple[str, str, int], helo: str, settings: RelaySettings
) -> tuple[_ClientProtocol, Reply | None]:
    """Connect, read the greeting, EHLO, STARTTLS, AUTH: a session ready for MAIL, or the remote's refusal."""
    name, address, port = host
    factory = protocol.Factory.forProtocol(lambda: _ClientProtocol(reactor))
    factory.noisy = False
    try:
        endpoint_type = endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint
        client: _ClientProtocol = await endpoint_type(reactor, address, port, timeout=settings.connect_timeout).connect(factory)
    except Exception as e:
        raise TemporaryFailure(f"cannot connect to {name} [{address}]:{port}: {e}")
    set_no_delay(client.transport)
    try:
        refusal = await _start_session(client, name, helo, settings)
    except BaseException:
        client.transport.loseConnection()
        raise
    if refusal is not None:
        client.transport.loseConnection()
    return client, refusal


async def _start_session(client: _ClientProtocol, name: str, helo: str, settings: RelaySettings) -> Reply | None:
    tls, timeout = settings.tls, settings.command_timeout
    greeting = await client.reply(settings.greeting_timeout)
    if greeting.code != 220:
        return greeting
    ehlo = await client.command(f"EHLO {helo}", timeout)
    extensions = set(ehlo.text.upper().split()) if ehlo.code == 250 else set()
    if "STARTTLS" in extensions:
        started = await client.command("STARTTLS", timeout)
        if started.code == 220:
            options = _verifying_options(name, settings.ca_file) if tls == "verify" else ssl.CertificateOptions(verify=False)
            client.transport.startTLS(options)
            ehlo = await client.command(f"EHLO {helo}", timeout)
            extensions = set(ehlo.text.upper().split()) if ehlo.code == 250 else set()
        elif tls != "opportunistic":
            raise TemporaryFailure(f"{name} refused STARTTLS: {started}")
    elif tls != "opportunistic":
        raise TemporaryFailure(f"{name} does not offer STARTTLS and [relay] tls = {tls!r}")
    if ehlo.code != 250:
        ehlo = await client.command(f"HELO {helo}", timeout)
        if ehlo.code != 250:
            return ehlo
    client.pipelining = "PIPELINING" in extensions
    if settings.username:
        token = base64.b64encode(b"\0" + settings.username.encode() + b"\0" + settings.password.encode()).decode()
        auth = await client.command(f"AUTH PLAIN {token}", timeout)
        if auth.code != 235:
            raise TemporaryFailure(f"{name} refused our login: {auth}")
    return None


async def _mail_transaction(
    client: _ClientProtocol, reactor: Any, name: str, sender: str, recipients: list[str],
    open_message: Callable[[], IO[bytes]], settings: RelaySettings,
) -> dict[str, Reply]:
    """MAIL, RCPT..., DATA on a ready session; with PIPELINING (RFC 2920) in one write."""
    timeout = settings.command_timeout
    client.after_data = False
    commands = [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in recipients]
    if client.pipelining:
        client.transport.write("".join(f"{c}\r\n" for c in commands + ["DATA"]).encode("utf-8"))
    replies_in_order = []
    for i, line in enumerate(commands + ["DATA"]):
        wait = settings.data_timeout if line == "DATA" else timeout
        if not client.pipelining:
            if line == "DATA" and not any(r.code // 100 == 2 for r in replies_in_order[1:]):
                break
            if i and replies_in_order[0].code != 250:
                break
            client.transport.write(line.encode("utf-8") + b"\r\n")
        try:
            replies_in_order.append(await client.reply(wait))
        except TemporaryFailure as e:
            if i == 0:
                raise _StaleSession(e.text)
            raise
    mail, rcpts = replies_in_order[0], replies_in_order[1 : len(commands)]
    if mail.code != 250:
        return dict.fromkeys(recipients, mail)
    replies = dict(zip(recipients, rcpts))
    accepted = [r for r in recipients if replies[r].code // 100 == 2]
    data = replies_in_order[len(commands)] if len(replies_in_order) > len(commands) else None
    if not accepted:
        if data is not None and data.code == 354:
            # RFC 2920 3.1: DATA was accepted though no recipient was; end an empty message.
            await client.command(".", settings.data_done_timeout)
        return replies
    assert data is not None
    if data.code != 354:
        return {**replies, **dict.fromkeys(accepted, data)}
    try:
        await DotStuffedSender(open_message(), client.transport, reactor, settings.data_block_timeout).start()
    except defer.TimeoutError as e:
        raise TemporaryFailure(f"{name} stopped reading the message: {e}")
    except error.ConnectionLost:
        raise TemporaryFailure(f"{name} closed the connection while we sent the message")
    final = await client.reply(settings.data_done_timeout)
    client.after_data = True
    replies.update(dict.fromkeys(accepted, final))
    return replies
