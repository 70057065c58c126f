"""Clients that are not mail clients, or hold a slot without using it: cross-protocol
requests, TLS handshakes that never finish, and POP3 sessions that only send garbage.

In-process (StringTransport + Clock) for the state machines, over the wire
for what crosses a socket.
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl

import pytest
from twisted.logger import globalLogPublisher

from conftest import message, wait_for
from inprocess import Platform
from mailplat.config import POP3Settings
from mailplat.wire.lines import FORBIDDEN_VERBS, cross_protocol_verb


def capture_log():
    events = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: globalLogPublisher.removeObserver(events.append)


def logged(events, text: str) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if text in formatEvent(e)]


# --- cross-protocol requests (ALPACA) -------------------------------------------------

HTTP_POST = (
    b"POST / HTTP/1.1\r\nHost: mail.example.org\r\nContent-Type: text/plain\r\nContent-Length: 140\r\n\r\n"
    b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nSubject: alpaca\r\n\r\nbody\r\n.\r\nQUIT\r\n"
)


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"CONNECT mail.example.org:25 HTTP/1.1", b"HEAD / HTTP/1.1",
    b"PUT /a HTTP/1.1", b"get /", b"Post", b"CONNECT", b"OPTIONS * HTTP/1.1", b"DELETE /a HTTP/1.1",
])
def test_http_request_lines_are_recognised(line):
    """Each HTTP verb, in any case and with or without the rest of a request line, and any other HTTP request line, is a cross-protocol request."""
    assert cross_protocol_verb(line)


@pytest.mark.parametrize("line", [
    b"HELO get.example.org", b"MAIL FROM:<get@example.org>", b"GETX", b"HEADER", b"POSTMASTER", b"NOOP",
    b"PASS GET / HTTP/1.1x", b"USER post@example.org", b"EHLO HTTP/1.1",
])
def test_mail_commands_are_not_http(line):
    """Mail commands, even those holding an HTTP verb or version as an argument, are not taken for HTTP."""
    assert cross_protocol_verb(line) == ""


def test_forbidden_verbs_are_postfix_and_more():
    """The one list holds the verbs Postfix forbids and the other HTTP methods a browser sends with a body."""
    assert FORBIDDEN_VERBS >= {b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT"}


@pytest.mark.parametrize("listener", ["smtp", "submission", "submissions"])
def test_smtp_http_post_ends_the_session(listener):
    """An HTTP POST on an SMTP listener gets one 421 4.7.0 and the connection is closed: its body never runs, and one line is logged."""
    platform = Platform()
    wire = platform.smtp(listener=listener)
    assert wire.output().startswith("220")
    events, stop = capture_log()
    try:
        wire.protocol.dataReceived(HTTP_POST)
    finally:
        stop()
    out = wire.transport.value().decode()
    assert out.startswith("421 4.7.0 ") and out.count("\r\n") == 1, out
    assert wire.closed
    assert len(logged(events, "cross-protocol request")) == 1
    assert platform.mailboxes.stored == {}


def test_pop3_http_get_ends_the_session():
    """An HTTP GET on POP3 gets one -ERR and the connection is closed; the commands after it never run."""
    platform = Platform()
    platform.mailboxes.stored["alice@example.org"] = [b"Subject: x\r\n\r\nbody\r\n"]
    wire = platform.pop3()
    assert wire.output().startswith("+OK")
    events, stop = capture_log()
    try:
        wire.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nUSER alice@example.org\r\nPASS alice-password\r\nDELE 1\r\nQUIT\r\n")
    finally:
        stop()
    assert wire.lines() == ["-ERR This is a POP3 server, not an HTTP one; closing the connection"]
    assert wire.closed
    assert len(logged(events, "cross-protocol request")) == 1


def test_http_verb_after_a_good_start_still_ends_the_session():
    """A forbidden verb ends the session at any point, not only as the first command."""
    platform = Platform()
    wire = platform.smtp(listener="smtp")
    wire.output()
    wire.send("EHLO client.example.org")
    assert wire.output().startswith("250")
    wire.send("CONNECT example.net:443 HTTP/1.1")
    assert wire.output().startswith("421 4.7.0")
    assert wire.closed


# --- POP3 sessions that only send garbage ----------------------------------------------


def test_pop3_ten_invalid_commands_before_login_end_the_session():
    """Nine invalid commands before login get -ERR each and the session goes on; the tenth gets -ERR and the connection is closed, with a log line."""
    platform = Platform()
    wire = platform.pop3()
    wire.output()
    for bad in ["FROB", "STAT", "RETR 1", b"X" * 2000, b"NOOP\x00", "USER", "", "AUTH FOO", "PASS x"]:
        wire.send(bad)
        assert wire.output().startswith("-ERR"), bad
        assert not wire.closed, bad
    wire.send("CAPA")
    assert wire.output().startswith("+OK")
    events, stop = capture_log()
    try:
        wire.send("LIST")
    finally:
        stop()
    assert wire.lines() == ["-ERR Too many invalid commands, closing the connection"]
    assert wire.closed
    assert len(logged(events, "too many invalid commands")) == 1


def test_pop3_twenty_invalid_commands_after_login_end_the_session():
    """After login the count starts again and the limit is 20: the 20th invalid command ends the session."""
    platform = Platform()
    platform.mailboxes.stored["alice@example.org"] = [b"Subject: x\r\n\r\nbody\r\n"]
    wire = platform.pop3()
    wire.output()
    for _ in range(9):
        wire.send("FROB")
    wire.send("USER alice@example.org")
    wire.send("PASS alice-password")
    assert wire.lines()[-1].startswith("+OK Logged in")
    for number in range(19):
        wire.send(f"RETR {number + 2}")
        assert wire.output().startswith("-ERR No such message"), number
    assert not wire.closed
    wire.send("DELE 9")
    assert wire.lines() == ["-ERR Too many invalid commands, closing the connection"]
    assert wire.closed


def test_pop3_refusals_with_a_response_code_are_not_counted():
    """Refusals about the login or the server ([AUTH], [IN-USE], [SYS/TEMP]) are not invalid commands: twelve failed logins do not end the session."""
    platform = Platform(failure_delay=0.0, max_failures=100)
    wire = platform.pop3()
    wire.output()
    for _ in range(12):
        wire.send("USER alice@example.org")
        wire.send("PASS wrong")
        platform.clock.advance(0)
        assert wire.lines() == ["+OK Send PASS", "-ERR [AUTH] Authentication failed"]
        wire.send("APOP alice@example.org 0123456789abcdef")
        assert wire.output().startswith("-ERR [AUTH]")
    assert not wire.closed


def test_pop3_error_limits_are_settings():
    """max_errors_before_login and max_errors come from [pop3]."""
    platform = Platform(pop3=POP3Settings(max_errors_before_login=2))
    wire = platform.pop3()
    wire.output()
    wire.send("FROB")
    assert not wire.closed
    wire.send("FROB")
    assert wire.closed


@pytest.mark.parametrize("password", ["two  spaces", " leading", "trailing ", "tab\tinside", "a b  c   d"])
def test_pop3_password_is_the_rest_of_the_line(monkeypatch, password):
    """USER/PASS: the password is everything after "PASS ", spaces (two in a row, leading, trailing) included (RFC 1939 7)."""
    import inprocess

    monkeypatch.setitem(inprocess.USERS, "carol@example.org", password)
    platform = Platform()
    wire = platform.pop3()
    wire.output()
    wire.send("USER carol@example.org")
    wire.send(f"PASS {password}")
    platform.clock.advance(2.0)
    assert wire.lines() == ["+OK Send PASS", "+OK Logged in, 0 messages"]
    # The same words with single spaces are another password.
    other = platform.pop3(peer="192.0.2.2")
    other.output()
    other.send("USER carol@example.org")
    other.send("PASS " + " ".join(password.split()))
    platform.clock.advance(2.0)
    assert other.lines() == ["+OK Send PASS", "-ERR [AUTH] Authentication failed"]


# --- TLS handshakes that never finish ---------------------------------------------------


# Twisted's CertificateOptions still hands pyOpenSSL its own X509 objects.
twisted_tls_warning = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def tls_options(tmp_path_factory):
    from mailplat.tls import load_server_context, make_self_signed

    folder = tmp_path_factory.mktemp("tls")
    make_self_signed("mail.example.org", str(folder / "cert.pem"), str(folder / "key.pem"))
    return load_server_context(str(folder / "cert.pem"), str(folder / "key.pem"))


def implicit_tls_session(platform: Platform, listener: str, tls_options):
    """A connection to an implicit-TLS listener, through Twisted's TLS layer, from a client that sends nothing."""
    from twisted.internet import address
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailplat.pop3.server import POP3Factory
    from mailplat.smtp.server import SMTPFactory

    if listener == "pop3s":
        factory = POP3Factory(platform.pop3_settings, platform.guard, tls_options, True, platform.clock)
    else:
        factory = SMTPFactory(
            "mail.example.org", platform.smtp_limits, platform._smtp_args[0], platform.router, None, platform.clock,
            tls=tls_options, submission=True, implicit_tls=True, login_guard=platform.guard, listener=listener,
        )
    peer = address.IPv4Address("TCP", "192.0.2.7", 40000)
    protocol = TLSMemoryBIOFactory(tls_options, False, factory).buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return factory, protocol, transport


@twisted_tls_warning
@pytest.mark.parametrize("listener", ["submissions", "pop3s"])
def test_silent_tls_client_is_aborted_at_the_handshake_timeout(listener, tls_options):
    """A client that never finishes its TLS handshake counts against the limits from the start and is aborted at tls_handshake_timeout (not before), with a log line."""
    from mailplat.config import SMTPLimits

    platform = Platform(smtp=SMTPLimits(tls_handshake_timeout=30.0, idle_timeout=10.0), pop3=POP3Settings(tls_handshake_timeout=30.0, idle_timeout=10.0))
    factory, _, transport = implicit_tls_session(platform, listener, tls_options)
    assert factory.connections.per_ip["192.0.2.7"] == 1
    platform.clock.advance(29.0)  # the idle timeout has fired: its close waits for the handshake
    assert not transport.disconnected
    events, stop = capture_log()
    try:
        platform.clock.advance(1.5)
    finally:
        stop()
    assert transport.disconnected
    assert len(logged(events, "TLS handshake from 192.0.2.7 not finished within 30 s")) == 1


@twisted_tls_warning
@pytest.mark.parametrize("listener", ["submissions", "pop3s"])
def test_finished_handshake_cancels_the_deadline(listener, tls_options):
    """Once Twisted's TLS layer reports the handshake done, the deadline is gone: only the idle timeout applies."""
    from mailplat.config import SMTPLimits

    platform = Platform(smtp=SMTPLimits(tls_handshake_timeout=5.0), pop3=POP3Settings(tls_handshake_timeout=5.0))
    _, protocol, transport = implicit_tls_session(platform, listener, tls_options)
    protocol.wrappedProtocol.handshakeCompleted()
    platform.clock.advance(60.0)
    assert not transport.disconnected


# --- over the wire --------------------------------------------------------------------


HANDSHAKE_TIMEOUT = 0.5
WIRE_CONFIG = f"""
[smtp]
tls_handshake_timeout = {HANDSHAKE_TIMEOUT}
[pop3]
tls_handshake_timeout = {HANDSHAKE_TIMEOUT}
"""
CAROL = ("carol@example.org", "two  spaces, and one at the end ")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for this module's wire tests: a short TLS handshake timeout, and a user whose password has two spaces in a row."""
    from conftest import BASE_CONFIG, USERS, MailplatServer, merge_toml

    s = MailplatServer(tmp_path_factory.mktemp("hostile"), merge_toml(BASE_CONFIG, WIRE_CONFIG), {**USERS, CAROL[0]: CAROL[1]}).start()
    yield s
    s.stop()


def tls_client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def half_a_client_hello() -> bytes:
    """The first half of a real TLS ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_client_context().wrap_bio(incoming, outgoing, server_hostname="mail.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    return hello[: len(hello) // 2]


def closed_by_server(sock: socket.socket) -> bool:
    """Reads until the server closes (EOF or reset); a socket timeout (10 s) means it never did."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def read_until_closed(sock: socket.socket) -> bytes:
    data = []
    while chunk := sock.recv(65536):
        data.append(chunk)
    return b"".join(data)


def probe(server) -> None:
    """The health probe: a whole SMTP transaction on the MX port."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
        client.sendmail("someone@remote.test", ["bob@example.org"], message("probe"))


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_http_post_over_the_wire_delivers_nothing(server, listener):
    """An HTTP POST whose body is an SMTP transaction gets one 421 and a closed connection, and no message is delivered."""
    sock = socket.create_connection(("127.0.0.1", server.ports[listener]), timeout=20)
    assert sock.recv(1024).startswith(b"220")
    sock.sendall(HTTP_POST)
    got = read_until_closed(sock)
    sock.close()
    assert got.startswith(b"421 4.7.0 ") and got.count(b"\r\n") == 1, got
    probe(server)
    assert not [m for m in server.messages("alice@example.org") if b"alpaca" in m]
    assert "cross-protocol request" in server.log()


@pytest.mark.parametrize("listener", ["submissions", "pop3s"])
@pytest.mark.parametrize("sends", ["nothing", "half a ClientHello"])
def test_unfinished_implicit_tls_handshake_is_closed(server, listener, sends):
    """On 465 and 995 a client that sends nothing, or stops inside its ClientHello, is disconnected at tls_handshake_timeout; the server goes on serving."""
    sock = socket.create_connection(("127.0.0.1", server.ports[listener]), timeout=10)
    if sends != "nothing":
        sock.sendall(half_a_client_hello())
    assert closed_by_server(sock)
    sock.close()
    probe(server)
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_client_context(), timeout=20)
    client.user("alice@example.org")
    client.pass_("alice-password")
    client.quit()


@pytest.mark.parametrize("listener, command", [("submission", b"EHLO x\r\nSTARTTLS\r\n"), ("smtp", b"EHLO x\r\nSTARTTLS\r\n"), ("pop3", b"STLS\r\n")])
def test_unfinished_handshake_after_starttls_is_closed(server, listener, command):
    """After STARTTLS or STLS, a client that never starts its handshake is disconnected at tls_handshake_timeout."""
    sock = socket.create_connection(("127.0.0.1", server.ports[listener]), timeout=10)
    read_line(sock)
    sock.sendall(command)
    replies = []
    while not replies or not replies[-1].startswith((b"220 ", b"+OK")):
        replies.append(read_line(sock))
    assert closed_by_server(sock)
    sock.close()
    assert f"not finished within {HANDSHAKE_TIMEOUT:g} s" in server.log()
    probe(server)


def test_unfinished_handshakes_count_against_the_per_address_limit(make_server):
    """Connections still in their TLS handshake hold a slot of max_connections_per_ip until the handshake timeout frees it."""
    server = make_server("[pop3]\nmax_connections_per_ip = 2\ntls_handshake_timeout = 3.0\n")
    silent = [socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=10) for _ in range(2)]
    context = tls_client_context()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=10), server_hostname="mail.example.org") as third:
        assert read_line(third).startswith(b"-ERR [SYS/TEMP] too many connections")
    for sock in silent:
        assert closed_by_server(sock)
        sock.close()

    def greeted() -> bool:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=10), server_hostname="mail.example.org") as again:
            return read_line(again).startswith(b"+OK")

    wait_for(greeted, what="a free slot after the handshake timeout")


def test_pop3_password_with_two_spaces_over_the_wire(server):
    """USER/PASS with a password holding two spaces in a row and a trailing one logs in with poplib on pop3s."""
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_client_context(), timeout=20)
    client.user(CAROL[0])
    assert client.pass_(CAROL[1]).startswith(b"+OK")
    client.quit()


def test_pop3_invalid_commands_end_the_session_over_the_wire(server):
    """Ten invalid commands pipelined before login: nine -ERR, then the closing -ERR, and the server closes the connection."""
    sock = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10)
    read_line(sock)
    sock.sendall(b"FROB\r\n" * 10)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    sock.close()
    assert got.splitlines() == [b"-ERR Unknown command: FROB"] * 9 + [b"-ERR Too many invalid commands, closing the connection"]
