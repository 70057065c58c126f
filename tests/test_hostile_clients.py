"""Clients that are not mail clients, or hold a slot without using it: cross-protocol
requests, TLS handshakes that never finish, and POP3 sessions that only send garbage.

In-process (StringTransport + Clock) for the state machines, over the wire
for what crosses a socket.
"""

from __future__ import annotations

import smtplib
import socket

import pytest
from twisted.logger import globalLogPublisher

from conftest import message
from inprocess import Platform
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


# --- over the wire --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for this module's wire tests."""
    from conftest import BASE_CONFIG, MailplatServer

    s = MailplatServer(tmp_path_factory.mktemp("hostile"), BASE_CONFIG).start()
    yield s
    s.stop()


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
