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
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, endpoints, error, protocol, ssl
from twisted.names import dns, error as dns_error

from mailplat.config import RelaySettings
from mailplat.connections import set_no_delay
from mailplat.dotstuff import DotStuffedSender
from mailplat.interfaces import PermanentFailure, TemporaryFailure

__all__ = ["Reply", "addresses_of", "find_hosts", "send_message"]

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


async def send_message(
    reactor: Any,
    host: tuple[str, str, int],
    helo: str,
    sender: str,
    recipients: list[str],
    message_path: str,
    settings: RelaySettings,
) -> dict[str, Reply]:
    """Send one message to one host; each recipient's reply.  TemporaryFailure if the host cannot be used."""
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
        return await _transaction(client, reactor, name, helo, sender, recipients, message_path, settings)
    finally:
        client.transport.loseConnection()


async def _transaction(
    client: _ClientProtocol, reactor: Any, name: str, helo: str, sender: str, recipients: list[str],
    message_path: str, settings: RelaySettings,
) -> dict[str, Reply]:
    tls, timeout = settings.tls, settings.command_timeout
    greeting = await client.reply(settings.greeting_timeout)
    if greeting.code != 220:
        return dict.fromkeys(recipients, greeting)
    ehlo = await client.command(f"EHLO {helo}", timeout)
    extensions = set(ehlo.text.upper().split()) if ehlo.code == 250 else set()
    if "STARTTLS" in extensions:
        started = await client.command("STARTTLS", timeout)
        if started.code == 220:
            options = _verifying_options(name, settings.ca_file) if tls == "verify" else ssl.CertificateOptions(verify=False)
            client.transport.startTLS(options)
            ehlo = await client.command(f"EHLO {helo}", timeout)
        elif tls != "opportunistic":
            raise TemporaryFailure(f"{name} refused STARTTLS: {started}")
    elif tls != "opportunistic":
        raise TemporaryFailure(f"{name} does not offer STARTTLS and [relay] tls = {tls!r}")
    if ehlo.code != 250:
        ehlo = await client.command(f"HELO {helo}", timeout)
        if ehlo.code != 250:
            return dict.fromkeys(recipients, ehlo)
    if settings.username:
        token = base64.b64encode(b"\0" + settings.username.encode() + b"\0" + settings.password.encode()).decode()
        auth = await client.command(f"AUTH PLAIN {token}", timeout)
        if auth.code != 235:
            raise TemporaryFailure(f"{name} refused our login: {auth}")
    mail = await client.command(f"MAIL FROM:<{sender}>", timeout)
    if mail.code != 250:
        return dict.fromkeys(recipients, mail)
    replies: dict[str, Reply] = {}
    for recipient in recipients:
        replies[recipient] = await client.command(f"RCPT TO:<{recipient}>", timeout)
    accepted = [r for r in recipients if replies[r].code // 100 == 2]
    if not accepted:
        await client.command("QUIT", timeout)
        return replies
    data = await client.command("DATA", settings.data_timeout)
    if data.code != 354:
        return {**replies, **dict.fromkeys(accepted, data)}
    try:
        await DotStuffedSender(open(message_path, "rb"), client.transport, reactor, settings.data_block_timeout).start()
    except defer.TimeoutError as e:
        raise TemporaryFailure(f"{name} stopped reading the message: {e}")
    except error.ConnectionLost:
        raise TemporaryFailure(f"{name} closed the connection while we sent the message")
    final = await client.reply(settings.data_done_timeout)
    replies.update(dict.fromkeys(accepted, final))
    try:
        await client.command("QUIT", 30)
    except TemporaryFailure:
        pass
    return replies
