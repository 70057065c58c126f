"""The one SMTP/LMTP client (mailplat.wire.smtpclient): over loopback TCP
against small hostile servers and a well-behaved one, and in memory
(StringTransport + task.Clock) for timers and exact bytes.

The loopback tests pump the global reactor (never run) until the client's
Deferred fires; each server a test starts is stopped by the fixture.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import defer, endpoints, interfaces, reactor, ssl, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.config import RelaySettings
from mailplat.interfaces import TemporaryFailure
from mailplat.queue.relay import SessionCache
from mailplat.tls import make_self_signed
from mailplat.wire.smtpclient import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    MAX_UNASKED,
    ConnectionClosed,
    IncompleteReplies,
    InsecureLogin,
    NoReply,
    ProtocolError,
    Reply,
    SMTPClient,
    StaleSession,
    Timeouts,
    connect,
)

QUICK = Timeouts.every(10)


# --- the reactor, pumped ----------------------------------------------------------------


def run(work: Coroutine[Any, Any, Any] | defer.Deferred[Any], limit: float = 20.0) -> Any:
    """Pump the reactor until ``work`` is done; its result, or its exception raised."""
    d = defer.ensureDeferred(work)
    deadline = time.monotonic() + limit
    while not d.called:
        if time.monotonic() > deadline:
            d.cancel()
            raise AssertionError(f"not done within {limit:g} seconds")
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def pump_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        reactor.iterate(0.01)  # type: ignore[attr-defined]


class Server:
    """A listening port on 127.0.0.1 serving ``protocol``; remembers its connections."""

    def __init__(self, protocol: Callable[[], Protocol]) -> None:
        self.connections: list[Protocol] = []
        self.closed: list[Protocol] = []
        server = self

        class Tracking(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Protocol:
                p = protocol()
                p.factory = self
                server.connections.append(p)
                lost = p.connectionLost

                def connection_lost(reason: Any = None) -> None:
                    server.closed.append(p)
                    lost(reason)

                p.connectionLost = connection_lost  # type: ignore[method-assign]
                return p

        self.port = run(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Tracking()))
        self.address = ("127.0.0.1", self.port.getHost().port)

    def stop(self) -> None:
        for p in self.connections:
            if p not in self.closed:
                p.transport.abortConnection()
        run(defer.maybeDeferred(self.port.stopListening))
        pump_until(lambda: len(self.closed) == len(self.connections))


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], Protocol]], Server]]:
    servers: list[Server] = []
    clients: list[SMTPClient] = []

    def start(protocol: Callable[[], Protocol]) -> Server:
        servers.append(Server(protocol))
        return servers[-1]

    start.clients = clients  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.stop()
    for client in clients:
        client.abort()
    pump_until(lambda: all(c.closed for c in clients))


def dial(serve: Any, server: Server, lmtp: bool = False) -> SMTPClient:
    endpoint = endpoints.TCP4ClientEndpoint(reactor, *server.address)
    client = run(connect(endpoint, lambda: SMTPClient(reactor, lmtp=lmtp), reactor, 10))
    serve.clients.append(client)
    return client


# --- hostile servers ---------------------------------------------------------------------


class Says(Protocol):
    """Writes ``text`` on connecting, then ``close`` or stays silent; keeps what it is sent."""

    text = b""
    close = False

    def connectionMade(self) -> None:
        self.received = b""
        self.transport.write(self.text)
        if self.close:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def says(text: bytes, close: bool = False) -> Callable[[], Protocol]:
    return type("Scripted", (Says,), {"text": text, "close": close})


def test_a_reply_line_of_megabytes_is_refused_not_buffered(serve: Any) -> None:
    """A greeting line of 6 MB without end is a ProtocolError at once, and the client aborts the connection."""
    server = serve(says(b"220 " + b"x" * (6 << 20)))
    client = dial(serve, server)
    with pytest.raises(ProtocolError, match=f"longer than {MAX_REPLY_LINE} octets"):
        run(client.greeting(15))
    assert len(client._buffer) <= MAX_REPLY_LINE + 1
    pump_until(lambda: server.closed == server.connections)


def test_ten_thousand_continuation_lines_are_refused(serve: Any) -> None:
    """A reply of 10,000 continuation lines is a ProtocolError, not a reply."""
    server = serve(says(b"220-hello\r\n" * 10_000 + b"220 done\r\n"))
    client = dial(serve, server)
    with pytest.raises(ProtocolError, match=f"more than {MAX_REPLY_LINES} lines"):
        run(client.greeting(15))
    pump_until(lambda: server.closed == server.connections)


def test_a_greeting_that_is_not_a_reply(serve: Any) -> None:
    """A peer that is not an SMTP server (an HTTP answer) is a ProtocolError naming what it said."""
    server = serve(says(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    client = dial(serve, server)
    with pytest.raises(ProtocolError, match="not a reply: 'HTTP/1.1 400 Bad Request'"):
        run(client.greeting(15))
    assert client.closed or client.transport.disconnecting or not client.usable()


def test_a_server_that_closes_mid_reply(serve: Any) -> None:
    """A connection closed in the middle of a multi-line reply fails the command waiting; no half reply is handed out."""
    server = serve(says(b"220-first line\r\n220-second li", close=True))
    client = dial(serve, server)
    with pytest.raises(ConnectionClosed, match="the connection was closed"):
        run(client.greeting(15))
    # And every later command fails the same way instead of waiting.
    with pytest.raises(ConnectionClosed):
        run(client.command("NOOP", 15))


# --- a well-behaved server -----------------------------------------------------------------


class FakeServer(Protocol):
    """SMTP or LMTP as the factory's ``lmtp`` says.  MAIL and RCPT replies are
    held until DATA (or another command) ends the group, so a client that
    waits for each reply before the next command never gets one: only a
    pipelining client gets through.  ``gone@`` is refused at RCPT, ``full@``
    (LMTP) after the message."""

    lmtp = False
    starttls: Any = None  # server TLS options: offer STARTTLS, and AUTH only inside TLS

    def connectionMade(self) -> None:
        self.buffer = b""
        self.lines: list[bytes] = []
        self.held: list[bytes] = []
        self.recipients: list[bytes] = []
        self.body: bytes | None = None
        self.bodies: list[bytes] = []
        self.in_data = False
        self.auth: tuple[bytes, bool] | None = None
        self.transport.write(b"220 fake.test ready\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.in_data:
                self._data_line(line)
            else:
                self._command(line)

    def _data_line(self, line: bytes) -> None:
        if line != b".":
            self.body += (line[1:] if line.startswith(b".") else line) + b"\r\n"
            return
        self.in_data = False
        self.bodies.append(self.body)
        if not self.lmtp:
            self.transport.write(b"250 2.0.0 queued as 1\r\n")
            return
        for r in self.recipients:
            if r.startswith(b"full@"):
                self.transport.write(b"452 4.2.2 " + r + b" mailbox full\r\n")
            else:
                self.transport.write(b"250 2.0.0 " + r + b" saved\r\n")

    def _command(self, line: bytes) -> None:
        self.lines.append(line)
        verb = line[:4].upper()
        if verb in (b"MAIL", b"RCPT"):
            if verb == b"MAIL":
                self.recipients = []
                self.held.append(b"250 2.1.0 ok\r\n")
            elif line[9:].startswith(b"gone@"):
                self.held.append(b"550 5.1.1 no such user\r\n")
            else:
                self.recipients.append(line[9:-1])
                self.held.append(b"250 2.1.5 ok\r\n")
            return
        reply = self._answer(verb, line)
        self.transport.write(b"".join(self.held) + reply)
        self.held = []
        if verb == b"QUIT":
            self.transport.loseConnection()
        if line.upper() == b"STARTTLS" and self.starttls is not None:
            self.transport.startTLS(self.starttls)

    def _answer(self, verb: bytes, line: bytes) -> bytes:
        if verb in (b"EHLO", b"LHLO"):
            if verb != (b"LHLO" if self.lmtp else b"EHLO"):
                return b"500 5.5.1 wrong greeting verb\r\n"
            tls = interfaces.ISSLTransport.providedBy(self.transport)
            offers = [b"PIPELINING", b"SIZE 10000000", b"ENHANCEDSTATUSCODES"]
            if self.starttls is not None:
                offers.append(b"AUTH PLAIN" if tls else b"STARTTLS")
            return b"250-fake.test\r\n" + b"".join(b"250-" + o + b"\r\n" for o in offers[:-1]) + b"250 " + offers[-1] + b"\r\n"
        if verb == b"DATA":
            if not self.recipients:
                return b"503 5.5.1 no valid recipients\r\n"
            self.in_data, self.body = True, b""
            return b"354 go ahead\r\n"
        if verb == b"STAR":
            return b"220 2.0.0 go ahead\r\n"
        if verb == b"AUTH":
            self.auth = (base64.b64decode(line.split()[2]), interfaces.ISSLTransport.providedBy(self.transport))
            return b"235 2.7.0 welcome\r\n"
        if verb == b"QUIT":
            return b"221 2.0.0 bye\r\n"
        return b"250 2.0.0 ok\r\n"


def fake(lmtp: bool = False, starttls: Any = None) -> Callable[[], Protocol]:
    return type("Fake", (FakeServer,), {"lmtp": lmtp, "starttls": starttls})


# Dot lines at the start, inside and at the end, and a line that is a lone dot.
BODY = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast line\r\n"


def test_a_pipelined_smtp_transaction_and_reuse(serve: Any) -> None:
    """MAIL, RCPTs and DATA go out in one group (RFC 2920); each recipient gets its reply; the body arrives as sent; the session carries a second message."""
    server = serve(fake())
    client = dial(serve, server)
    assert run(client.greeting(10)).code == 220
    assert run(client.hello("client.test", 10)).code == 250
    assert client.offers("PIPELINING") and client.extensions["SIZE"] == "10000000"
    replies = run(client.transaction("s@client.test", ["a@x.test", "gone@x.test", "b@x.test"], lambda: io.BytesIO(BODY), QUICK, size=len(BODY)))
    assert [str(r) for r in replies] == ["250 2.0.0 queued as 1", "550 5.1.1 no such user", "250 2.0.0 queued as 1"]
    [p] = server.connections
    assert p.lines[1:5] == [f"MAIL FROM:<s@client.test> SIZE={len(BODY)}".encode(), b"RCPT TO:<a@x.test>", b"RCPT TO:<gone@x.test>", b"RCPT TO:<b@x.test>"]
    assert p.bodies == [BODY]
    assert client.reusable()
    replies = run(client.transaction("s@client.test", ["c@x.test"], lambda: io.BytesIO(b"second\r\n"), QUICK))
    assert [r.code for r in replies] == [250] and p.bodies[1] == b"second\r\n"
    assert len(server.connections) == 1 and client.transactions == 2
    client.quit()
    pump_until(lambda: server.closed == server.connections)
    assert p.lines[-1] == b"QUIT"


def test_lmtp_one_reply_per_accepted_recipient(serve: Any) -> None:
    """With LMTP each accepted recipient gets its own reply after the message (RFC 2033 4.2), in RCPT order."""
    server = serve(fake(lmtp=True))
    client = dial(serve, server, lmtp=True)
    run(client.greeting(10))
    assert run(client.hello("client.test", 10)).code == 250
    [p] = server.connections
    assert p.lines[0] == b"LHLO client.test"
    replies = run(client.transaction("s@x.test", ["alice@x.test", "gone@x.test", "full@x.test", "bob@x.test"], lambda: io.BytesIO(BODY), QUICK))
    assert [str(r) for r in replies] == [
        "250 2.0.0 alice@x.test saved", "550 5.1.1 no such user", "452 4.2.2 full@x.test mailbox full", "250 2.0.0 bob@x.test saved",
    ]
    assert [r.status for r in replies] == ["2.0.0", "5.1.1", "4.2.2", "2.0.0"]
    assert p.bodies == [BODY] and client.reusable()


def test_no_recipient_accepted_sends_no_message(serve: Any) -> None:
    """When every RCPT is refused the pipelined DATA is refused too, no body is sent, and the session is not reused."""
    server = serve(fake(lmtp=True))
    client = dial(serve, server, lmtp=True)
    run(client.greeting(10))
    run(client.hello("client.test", 10))
    replies = run(client.transaction("s@x.test", ["gone@x.test"], lambda: pytest.fail("the message was opened"), QUICK))
    assert [r.code for r in replies] == [550]
    assert server.connections[0].bodies == [] and not client.reusable()


# --- TLS and the login -------------------------------------------------------------------------


@implementer(interfaces.IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A bare context from the files: CertificateOptions hands pyOpenSSL an
    X509 object, which it deprecates, and warnings are errors here."""

    def __init__(self, tmp_path: Path) -> None:
        make_self_signed("fake.test", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.use_certificate_chain_file(str(tmp_path / "cert.pem"))
        self.context.use_privatekey_file(str(tmp_path / "key.pem"))

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def test_login_goes_only_inside_tls(serve: Any, tmp_path: Path) -> None:
    """After STARTTLS and a new EHLO, AUTH PLAIN reaches the server inside TLS with the right credentials."""
    server = serve(fake(starttls=ServerTLS(tmp_path)))
    client = dial(serve, server)
    run(client.greeting(10))
    run(client.hello("client.test", 10))
    assert client.offers("STARTTLS") and not client.offers("AUTH")
    with pytest.raises(InsecureLogin, match="credentials are never sent without TLS"):
        run(client.login("carol", "secret", 10))
    assert run(client.starttls(ssl.CertificateOptions(verify=False), 10)).code == 220
    assert client.tls and client.extensions == {}
    run(client.hello("client.test", 10))
    assert client.offers("AUTH")
    assert run(client.login("carol", "secret", 10)).code == 235
    assert server.connections[0].auth == (b"\0carol\0secret", True)


def test_the_relay_never_logs_in_without_tls(serve: Any) -> None:
    """[relay] username with a host that offers no STARTTLS: the host fails with a TemporaryFailure (the mail stays queued) and neither AUTH nor MAIL is sent."""
    server = serve(fake())
    cache = SessionCache(reactor)
    settings = RelaySettings(port=server.address[1], username="carol", password="secret", command_timeout=10, greeting_timeout=10)
    with pytest.raises(TemporaryFailure, match="credentials are never sent without TLS") as raised:
        run(cache.send(("plain.test", *server.address), "client.test", "s@x.test", ["a@x.test"], lambda: io.BytesIO(BODY), settings))
    assert raised.value.text.startswith("plain.test: ")
    [p] = server.connections
    assert p.lines[0] == b"EHLO client.test"
    assert not any(line.upper().startswith((b"AUTH", b"MAIL")) for line in p.lines), p.lines
    assert b"secret" not in b"".join(p.lines) and base64.b64encode(b"\0carol\0secret") not in b"".join(p.lines)
    cache.close()
    pump_until(lambda: server.closed == server.connections)


# --- in memory: exact bytes and the clock ----------------------------------------------------------


class TLSStringTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls_started: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_started = options


def in_memory(lmtp: bool = False, extensions: tuple[str, ...] = ("PIPELINING",)) -> tuple[SMTPClient, TLSStringTransport, task.Clock]:
    clock = task.Clock()
    client = SMTPClient(clock, lmtp=lmtp)
    transport = TLSStringTransport()
    client.makeConnection(transport)
    client.extensions = dict.fromkeys(extensions, "")
    return client, transport, clock


def outcome(d: defer.Deferred[Any]) -> Any:
    """What a fired Deferred gave: its result, or its exception (not raised).  It consumes the result: call it once."""
    assert d.called, "still waiting"
    found: list[Any] = []
    d.addBoth(found.append)
    return found[0].value if isinstance(found[0], Failure) else found[0]


def test_no_reply_within_the_timeout_aborts() -> None:
    """A silent server: the reply fails with NoReply after exactly the timeout, and the connection is aborted."""
    client, transport, clock = in_memory()
    d = defer.ensureDeferred(client.greeting(30))
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.1)
    failure = outcome(d)
    assert isinstance(failure, NoReply) and str(failure) == "no reply within 30 seconds"
    assert transport.disconnected and not client.usable()


def test_each_phase_waits_its_own_timeout() -> None:
    """The DATA reply waits ``data`` seconds, the replies after the message ``data_done``: an LMTP server silent after one of two replies leaves the other recipient unknown."""
    client, transport, clock = in_memory(lmtp=True)
    timeouts = Timeouts(command=10, data=20, data_block=30, data_done=40)
    d = defer.ensureDeferred(client.transaction("s@x.test", ["a@x.test", "b@x.test"], lambda: io.BytesIO(b"hi\r\n"), timeouts))
    assert transport.value() == b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
    client.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n")
    clock.advance(19.9)
    assert not d.called
    client.dataReceived(b"354 go\r\n")
    transport.clear()
    clock.advance(0)  # the body is pumped from the clock
    assert transport.value() == b"hi\r\n.\r\n"
    client.dataReceived(b"250 2.0.0 a saved\r\n")
    clock.advance(39.9)
    assert not d.called
    clock.advance(0.1)
    failure = outcome(d)
    assert isinstance(failure, IncompleteReplies) and isinstance(failure.cause, NoReply)
    assert [str(r) if r else None for r in failure.replies] == ["250 2.0.0 a saved", None]


def test_without_pipelining_one_command_at_a_time() -> None:
    """Without PIPELINING each command waits for the reply before it, and DATA is not sent when no recipient was accepted."""
    client, transport, _ = in_memory(extensions=())
    d = defer.ensureDeferred(client.transaction("s@x.test", ["a@x.test", "b@x.test"], lambda: io.BytesIO(b""), QUICK))
    assert transport.value() == b"MAIL FROM:<s@x.test>\r\n"
    client.dataReceived(b"250 ok\r\n")
    assert transport.value().endswith(b"RCPT TO:<a@x.test>\r\n")
    client.dataReceived(b"550 5.1.1 no\r\n")
    assert transport.value().endswith(b"RCPT TO:<b@x.test>\r\n")
    client.dataReceived(b"551 5.1.1 no either\r\n")
    assert [r.code for r in outcome(d)] == [550, 551]
    assert b"DATA" not in transport.value() and not client.reusable()


def test_data_accepted_without_recipients_ends_an_empty_message() -> None:
    """RFC 2920 3.1: when the pipelined DATA is accepted though no RCPT was, the client sends a lone dot, not the message."""
    client, transport, _ = in_memory()
    d = defer.ensureDeferred(client.transaction("s@x.test", ["a@x.test"], lambda: pytest.fail("the message was opened"), QUICK))
    transport.clear()
    client.dataReceived(b"250 ok\r\n550 no\r\n354 go\r\n")
    assert transport.value() == b".\r\n"
    client.dataReceived(b"554 no valid recipients\r\n")
    assert [r.code for r in outcome(d)] == [550] and not client.reusable()


def completed_once() -> tuple[SMTPClient, TLSStringTransport, task.Clock]:
    client, transport, clock = in_memory()
    d = defer.ensureDeferred(client.transaction("s@x.test", ["a@x.test"], lambda: io.BytesIO(b"x\r\n"), QUICK))
    client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    clock.advance(0)
    client.dataReceived(b"250 queued\r\n")
    assert [r.code for r in outcome(d)] == [250] and client.reusable()
    transport.clear()
    return client, transport, clock


@pytest.mark.parametrize("ending", ["closed", "421"])
def test_a_kept_session_found_gone_is_stale(ending: str) -> None:
    """A reused session closed (or answering 421) at its first reply is StaleSession: nothing was delivered, start over."""
    client, _, _ = completed_once()
    d = defer.ensureDeferred(client.transaction("s@x.test", ["a@x.test"], lambda: io.BytesIO(b"x\r\n"), QUICK))
    if ending == "closed":
        client.connectionLost(Failure(ConnectionDone()))
    else:
        client.dataReceived(b"421 4.4.2 closing idle connection\r\n")
    assert isinstance(outcome(d), StaleSession)


def test_a_new_session_that_closes_is_not_stale() -> None:
    """On a connection's first transaction a close is ConnectionClosed: starting over would not help."""
    client, _, _ = in_memory()
    d = defer.ensureDeferred(client.transaction("s@x.test", ["a@x.test"], lambda: io.BytesIO(b"x\r\n"), QUICK))
    client.connectionLost(Failure(ConnectionDone()))
    failure = outcome(d)
    assert isinstance(failure, ConnectionClosed) and not isinstance(failure, StaleSession)


def test_text_after_starttls_is_an_injection() -> None:
    """Replies that arrive in clear right behind STARTTLS's 220 are refused (they would pass for TLS-protected answers); TLS is not started."""
    client, transport, _ = in_memory()
    d = defer.ensureDeferred(client.starttls(object(), 10))
    assert transport.value() == b"STARTTLS\r\n"
    client.dataReceived(b"220 go ahead\r\n250-fake.test\r\n250 AUTH PLAIN\r\n")
    assert isinstance(outcome(d), ProtocolError)
    assert transport.tls_started is None and transport.disconnected and not client.tls


def test_starttls_without_injection_starts_tls() -> None:
    """A clean 220 to STARTTLS starts TLS with the options given and forgets the extensions heard in clear."""
    client, transport, _ = in_memory(extensions=("STARTTLS", "PIPELINING"))
    options = object()
    d = defer.ensureDeferred(client.starttls(options, 10))
    client.dataReceived(b"220 go ahead\r\n")
    assert outcome(d).code == 220
    assert transport.tls_started is options and client.tls and client.extensions == {}


def test_login_outside_tls_sends_nothing() -> None:
    """login() outside TLS raises InsecureLogin and writes nothing."""
    client, transport, _ = in_memory()
    d = defer.ensureDeferred(client.login("carol", "secret", 10))
    assert isinstance(outcome(d), InsecureLogin)
    assert transport.value() == b""


def test_replies_nobody_asked_for_are_bounded() -> None:
    """An unasked reply makes the session unusable; a flood of them beyond MAX_UNASKED aborts the connection, and the next command fails."""
    client, transport, _ = in_memory()
    client.dataReceived(b"421 4.4.2 going away\r\n")
    assert not client.usable() and not transport.disconnected
    client.dataReceived(b"250 ok\r\n" * (MAX_UNASKED // 8 + 1))
    assert transport.disconnected
    failure = outcome(defer.ensureDeferred(client.reply(10)))
    assert isinstance(failure, ProtocolError) and "no command asked for" in str(failure)


def test_reply_read_before_a_protocol_error_is_still_handed_out() -> None:
    """Replies read before garbage keep their place (with LMTP they say who has the message); the error comes after them."""
    client, _, _ = in_memory()
    client.dataReceived(b"250 2.0.0 a saved\r\nGARBAGE\r\n")
    assert str(outcome(defer.ensureDeferred(client.reply(10)))) == "250 2.0.0 a saved"
    assert isinstance(outcome(defer.ensureDeferred(client.reply(10))), ProtocolError)


def test_command_lines_cannot_carry_line_breaks() -> None:
    """An address with CR or LF cannot smuggle a second command."""
    client, transport, _ = in_memory()
    with pytest.raises(ValueError):
        client.send("RCPT TO:<a@x.test>\r\nRSET")
    assert transport.value() == b""


def test_reply_text_status_and_kind() -> None:
    """A Reply joins its lines, finds its enhanced status code, else takes its class's."""
    reply = Reply(250, ("2.1.5 ok", "", "more"))
    assert (reply.text, reply.status, reply.kind, str(reply)) == ("2.1.5 ok more", "2.1.5", 2, "250 2.1.5 ok more")
    assert Reply(554, ("no service",)).status == "5.0.0"
    assert Reply(421, ()).status == "4.0.0"
