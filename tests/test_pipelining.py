"""Pipelined commands: replies complete and in order however the input is chunked.

In-process (StringTransport + Clock) for the chunkings a socket cannot be
made to produce on demand (one byte per read), and over the wire with a real
maildrop.
"""

from __future__ import annotations

import random
import socket
import ssl

import pytest

from conftest import message
from inprocess import Platform
from mailplat.smtp.receiving import Spool

# The second message is larger than one chunk of the sender (64 KiB), and
# both hold lines that must be dot-stuffed.
FIRST = b"Subject: one\r\n\r\n.dot line\r\nend\r\n"
SECOND = b"Subject: two\r\n\r\n" + b"line of the second message\r\n" * 4000 + b"..two dots\r\n"

POP3_SESSION = (
    b"USER alice@example.org\r\nPASS alice-password\r\n"
    b"RETR 1\r\nRETR 2\r\nNOOP\r\nTOP 2 1\r\nLIST\r\nQUIT\r\n"
)


def stuffed(body: bytes) -> bytes:
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n")) + b".\r\n"


def expected_pop3(first: bytes, second: bytes) -> bytes:
    """The exact replies to POP3_SESSION, in order."""
    top = second.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + second.split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0] + b"\r\n"
    return b"".join([
        b"+OK Send PASS\r\n",
        b"+OK Logged in, 2 messages\r\n",
        b"+OK %d octets\r\n" % len(first), stuffed(first),
        b"+OK %d octets\r\n" % len(second), stuffed(second),
        b"+OK \r\n",
        b"+OK Top of message follows\r\n", stuffed(top),
        b"+OK 2 messages\r\n1 %d\r\n2 %d\r\n.\r\n" % (len(first), len(second)),
        b"+OK Logging out, 0 messages deleted\r\n",
    ])


def chunkings(data: bytes) -> dict[str, list[bytes]]:
    """The same bytes cut in several ways: at once, byte by byte, per line, and at random."""
    cuts: dict[str, list[bytes]] = {"at once": [data], "byte by byte": [data[i : i + 1] for i in range(len(data))]}
    cuts["per line"] = data.splitlines(keepends=True)
    for seed in range(5):
        rng = random.Random(seed)
        pieces, pos = [], 0
        while pos < len(data):
            size = rng.randint(1, 40)
            pieces.append(data[pos : pos + size])
            pos += size
        cuts[f"random {seed}"] = pieces
    return cuts


def run_due(platform: Platform) -> None:
    """Let everything that is due now run (the sender's turns), without moving time."""
    while any(call.getTime() <= platform.clock.seconds() for call in platform.clock.getDelayedCalls()):
        platform.clock.advance(0)


def feed(platform: Platform, wire, pieces: list[bytes]) -> bytes:
    for piece in pieces:
        wire.protocol.dataReceived(piece)
        run_due(platform)
    run_due(platform)
    return wire.transport.value()


@pytest.mark.parametrize("how", list(chunkings(POP3_SESSION)))
def test_pop3_replies_do_not_depend_on_chunking(how):
    """Two RETRs, a TOP and short commands pipelined get every reply complete and in order, however the input is cut."""
    platform = Platform()
    platform.mailboxes.stored["alice@example.org"] = [FIRST, SECOND]
    wire = platform.pop3()
    assert wire.output().startswith("+OK")
    got = feed(platform, wire, chunkings(POP3_SESSION)[how])
    assert got == expected_pop3(FIRST, SECOND)
    assert wire.closed


SMTP_SESSION = (
    b"EHLO client.example.org\r\nMAIL FROM:<someone@remote.test>\r\nRCPT TO:<alice@example.org>\r\n"
    b"RCPT TO:<nobody@example.org>\r\nDATA\r\nSubject: pipelined\r\n\r\n..dot line\r\nbody\r\n.\r\n"
    b"MAIL FROM:<other@remote.test>\r\nRSET\r\nNOOP\r\nQUIT\r\n"
)


@pytest.mark.parametrize("how", list(chunkings(SMTP_SESSION)))
def test_smtp_replies_do_not_depend_on_chunking(how, tmp_path):
    """A whole pipelined SMTP transaction and what follows it get the same replies, in order, however the input is cut."""
    platform = Platform()
    spool = Spool(str(tmp_path / "spool"))
    spool.start()
    wire = platform.smtp(listener="smtp", spool=spool)
    assert wire.output().startswith("220")
    got = feed(platform, wire, chunkings(SMTP_SESSION)[how]).decode()
    codes = [line[:4] for line in got.splitlines() if line[3:4] == " "]
    assert codes == ["250 ", "250 ", "250 ", "550 ", "354 ", "250 ", "250 ", "250 ", "250 ", "221 "], got
    assert [m.count(b".dot line") for m in platform.mailboxes.stored["alice@example.org"]] == [1]
    assert wire.closed


def tls_socket(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw, server_hostname="mail.example.org")


def read_until_closed(sock: socket.socket) -> bytes:
    data = []
    while chunk := sock.recv(65536):
        data.append(chunk)
    return b"".join(data)


@pytest.fixture(scope="module")
def maildrop(tmp_path_factory):
    """A server whose alice has two real messages, the second one larger than a send chunk."""
    import smtplib

    from conftest import BASE_CONFIG, MailplatServer

    server = MailplatServer(tmp_path_factory.mktemp("pipelining"), BASE_CONFIG).start()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("someone@remote.test", ["alice@example.org"], message("one", body=".dot line\r\nend\r\n"))
        client.sendmail("someone@remote.test", ["alice@example.org"], message("two", body="line of the second message\r\n" * 4000 + "..two dots\r\n"))
    yield server
    server.stop()


@pytest.mark.parametrize("how", ["at once", "byte by byte", "per line", "random 0", "random 1"])
def test_pop3_pipelining_over_the_wire(maildrop, how):
    """RETR 1, RETR 2, NOOP, TOP and LIST in one write (or cut up) on pop3s: every reply complete and in order, both messages byte-exact."""
    stored = maildrop.messages("alice@example.org")
    assert len(stored) == 2
    sock = tls_socket(maildrop.ports["pop3s"])
    greeting = sock.recv(1024)
    assert greeting.startswith(b"+OK")
    for piece in chunkings(POP3_SESSION)[how]:
        sock.sendall(piece)
    got = read_until_closed(sock)
    sock.close()
    assert got == expected_pop3(*stored)
