"""Pipelined commands: replies complete and in order however the input is chunked.

In-process (StringTransport + Clock) for the chunkings a socket cannot be
made to produce on demand (one byte per read), and over the wire with a real
maildrop.
"""

from __future__ import annotations

import random
import socket
import ssl
from typing import Any

import pytest
from twisted.internet import address
from twisted.internet.testing import StringTransport

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


class SlowReaderTransport(StringTransport):
    """A client that reads only when told to: like Twisted's TCP transport, this pauses
    its streaming producer on a write that leaves more than ``limit`` octets unsent,
    and resumes it once the client has read them all."""

    limit = 64 * 1024

    def __init__(self) -> None:
        super().__init__(peerAddress=address.IPv4Address("TCP", "192.0.2.1", 40000))
        self.producer_paused = False
        self.most_unsent = 0

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def write(self, data: bytes) -> None:
        super().write(data)
        self.most_unsent = max(self.most_unsent, len(self.value()))
        if self.producer is not None and self.streaming and len(self.value()) > self.limit:
            self.producer_paused = True
            self.producer.pauseProducing()

    def read_all(self) -> bytes:
        """The client reads everything unsent; the producer, if paused, resumes."""
        data = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


def slow_session(platform: Platform, protocol: str):
    """A session on pop3s or smtp whose client reads slowly."""
    factory: Any
    if protocol == "pop3":
        from mailplat.pop3.server import POP3Factory

        factory = POP3Factory(platform.pop3_settings, platform.guard, None, True, platform.clock)
    else:
        from mailplat.smtp.server import SMTPFactory

        factory = SMTPFactory(
            "mail.example.org", platform.smtp_limits, platform._smtp_args[0], platform.router, None, platform.clock, listener="smtp",
        )
    server = factory.buildProtocol(None)
    transport = SlowReaderTransport()
    server.makeConnection(transport)
    server.handshakeCompleted()
    transport.read_all()  # the greeting
    return server, transport


def read_everything(platform: Platform, transport: SlowReaderTransport) -> bytes:
    """Read as a slow client does, letting the server's turns run between reads, until nothing more comes."""
    out = bytearray()
    while True:
        run_due(platform)
        data = transport.read_all()
        run_due(platform)
        if not data and not transport.value():
            return bytes(out)
        out += data


def test_unread_replies_stop_the_commands_until_read():
    """20,000 pipelined SMTP commands whose replies are not read: the server stops taking
    commands (and reading) once 64 KiB of replies wait, and goes on as the client reads; all
    replies come, in order."""
    platform = Platform()
    server, transport = slow_session(platform, "smtp")
    commands = b"".join(b"NOOP\r\n" if i % 2 else b"HELP\r\n" for i in range(20_000))
    server.dataReceived(commands + b"QUIT\r\n")
    assert len(transport.value()) < SlowReaderTransport.limit + 1024
    assert transport.producerState == "paused", "the server still reads from a client that does not read"
    assert server.output_blocked
    got = read_everything(platform, transport)
    help_reply = got.split(b"\r\n", 1)[0] + b"\r\n"
    assert help_reply.startswith(b"214 ")
    assert got == (help_reply + b"250 2.0.0 OK\r\n") * 10_000 + b"221 2.0.0 mail.example.org closing connection\r\n"
    assert transport.most_unsent < SlowReaderTransport.limit + 1024
    assert transport.disconnecting and transport.producer is None, "the close waits on a producer that is never unregistered"


def test_message_streams_at_the_pace_of_a_slow_reader():
    """Two RETRs and the rest of POP3_SESSION with a client that reads slowly: each message
    streams only as it is read, and the replies are complete and in order."""
    platform = Platform()
    platform.mailboxes.stored["alice@example.org"] = [FIRST, SECOND * 3]
    server, transport = slow_session(platform, "pop3")
    server.dataReceived(POP3_SESSION)
    run_due(platform)
    assert len(transport.value()) < SlowReaderTransport.limit + 70 * 1024
    got = read_everything(platform, transport)
    assert got == expected_pop3(FIRST, SECOND * 3)
    assert transport.most_unsent < SlowReaderTransport.limit + 70 * 1024
    assert transport.disconnecting and transport.producer is None


@pytest.mark.parametrize("protocol", ["smtp", "pop3"])
def test_idle_client_that_reads_nothing_is_aborted(protocol):
    """A client whose unread replies block the output and that then sends nothing is aborted at
    idle_timeout: a clean close would wait for it to read, forever."""
    from mailplat.config import POP3Settings, SMTPLimits

    platform = Platform(smtp=SMTPLimits(idle_timeout=10.0), pop3=POP3Settings(idle_timeout=10.0))
    server, transport = slow_session(platform, protocol)
    server.dataReceived((b"NOOP\r\n" if protocol == "smtp" else b"CAPA\r\n") * 5000)
    assert server.output_blocked
    platform.clock.advance(9.0)
    assert not transport.disconnecting
    platform.clock.advance(2.0)
    assert transport.disconnected, "not aborted"


def test_reading_replies_counts_as_activity():
    """A client that reads its replies, slowly, while sending nothing new is not idle: each
    drained output restarts the idle timer."""
    from mailplat.config import SMTPLimits

    platform = Platform(smtp=SMTPLimits(idle_timeout=10.0))
    server, transport = slow_session(platform, "smtp")
    server.dataReceived(b"NOOP\r\n" * 30_000)
    for _ in range(4):
        platform.clock.advance(8.0)
        assert not transport.disconnecting
        transport.read_all()
    platform.clock.advance(11.0)
    assert transport.disconnecting


def test_message_longer_than_idle_timeout_to_a_slow_reader():
    """A RETR that takes the client longer than idle_timeout to read, as long as it keeps reading, is sent whole, with no idle reply inside it."""
    from mailplat.config import POP3Settings

    platform = Platform(pop3=POP3Settings(idle_timeout=10.0))
    big = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 6000
    platform.mailboxes.stored["alice@example.org"] = [big]
    server, transport = slow_session(platform, "pop3")
    server.dataReceived(b"USER alice@example.org\r\nPASS alice-password\r\nRETR 1\r\nQUIT\r\n")
    got = bytearray()
    for _ in range(20):
        run_due(platform)
        platform.clock.advance(6.0)
        got += transport.read_all()
        if transport.disconnecting:
            break
    assert bytes(got) == b"+OK Send PASS\r\n+OK Logged in, 1 messages\r\n+OK %d octets\r\n" % len(big) + big + b".\r\n+OK Logging out, 0 messages deleted\r\n"


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


# --- commands whose replies are never read -------------------------------------------------


def vm_rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used (user and system)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_queue(server_port: int, client_port: int) -> int:
    """What the server's kernel holds from this connection that the server has not read yet (/proc/net/tcp rx_queue)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
            if int(local, 16) == server_port and int(remote, 16) == client_port:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError("connection not found in /proc/net/tcp")


def unsent(sock: socket.socket) -> int:
    """What our kernel has not yet handed to the server's (TIOCOUTQ)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0)))[0]


class RawClient:
    """One non-blocking connection, plain or TLS (through memory BIOs, so one thread
    can write without reading): plaintext in, plaintext out."""

    def __init__(self, port: int, tls: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        # A small send buffer of our own, so what we send waits in the server, not here.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        self.tls = None
        self.outgoing = b""  # bytes for the socket (encrypted when TLS)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self.incoming_bio, self.outgoing_bio = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.incoming_bio, self.outgoing_bio, server_hostname="mail.example.org")
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.sock.sendall(self.outgoing_bio.read())
                    self.incoming_bio.write(self.sock.recv(65536))
            self.sock.sendall(self.outgoing_bio.read())
        self.sock.setblocking(False)
        self.sent_raw = 0

    def queue(self, data: bytes) -> None:
        if self.tls is None:
            self.outgoing += data
            return
        for i in range(0, len(data), 16384):
            self.tls.write(data[i : i + 16384])
        self.outgoing += self.outgoing_bio.read()

    def flush(self, timeout: float) -> bool:
        """Send what the socket takes within ``timeout``; True if something went."""
        import select

        if not self.outgoing or not select.select([], [self.sock], [], timeout)[1]:
            return False
        try:
            n = self.sock.send(self.outgoing[:262144])
        except BlockingIOError:
            return False
        self.outgoing = self.outgoing[n:]
        self.sent_raw += n
        return n > 0

    def receive(self, timeout: float) -> bytes | None:
        """Plaintext that arrived within ``timeout`` (b"" if none yet), None at EOF."""
        import select

        if not select.select([self.sock], [], [], timeout)[0]:
            return b""
        try:
            raw = self.sock.recv(1 << 20)
        except BlockingIOError:
            return b""
        if self.tls is None:
            return raw if raw else None
        if raw:
            self.incoming_bio.write(raw)
        else:
            self.incoming_bio.write_eof()
        out = bytearray()
        while True:
            try:
                plain = self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                return bytes(out)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                plain = b""
            if not plain:  # the server's close_notify, or the end of the stream
                return bytes(out) or None
            out += plain

    def read_until(self, end: bytes, times: int = 1) -> bytes:
        got = b""
        while got.count(end) < times:
            chunk = self.receive(10)
            assert chunk is not None, f"closed after {got!r}"
            got += chunk
        return got

    def server_has_read(self, server_port: int) -> int:
        """Raw bytes of ours the server process has read: sent, less what waits in either kernel."""
        return self.sent_raw - unsent(self.sock) - server_queue(server_port, self.sock.getsockname()[1])


def flood(port: int, pid: int, tls: bool, unit: bytes, reply_end: tuple[bytes, int], count: int, last: bytes, last_reply: bytes) -> tuple[int, bytes, bytes]:
    """Send ``unit`` once and read its replies (until ``reply_end[0]`` has come
    ``reply_end[1]`` times), then ``count`` more and ``last`` without reading, until
    the server has read it all or has stopped working on it (less than a tenth of a
    second of CPU in the last second: it may still trickle, as the kernel takes a
    little more of its output); then read up to the end of ``last_reply`` (inside TLS
    the server waits for our close_notify to close).
    Returns how much the server's memory grew meanwhile, the one reply, and all the
    replies after it."""
    import collections
    import time

    client = RawClient(port, tls)
    client.read_until(b"\r\n")  # the greeting
    client.queue(unit)
    while client.outgoing:
        client.flush(10)
    reply = client.read_until(*reply_end)
    before = peak = vm_rss(pid)
    client.queue(unit * count + last)
    total = client.sent_raw + len(client.outgoing)
    deadline = time.monotonic() + 120
    history: collections.deque[tuple[float, float]] = collections.deque()
    try:
        while time.monotonic() < deadline:
            client.flush(0.05)
            peak = max(peak, vm_rss(pid))
            now = time.monotonic()
            history.append((now, cpu_seconds(pid)))
            while history[0][0] < now - 1.0:
                history.popleft()
            if client.server_has_read(port) >= total or (now - history[0][0] > 0.9 and history[-1][1] - history[0][1] < 0.1):
                break
        peak = max(peak, vm_rss(pid))
        got = bytearray()
        while time.monotonic() < deadline and len(got) < len(reply) * count + len(last_reply):
            client.flush(0)
            chunk = client.receive(0.05)
            if chunk is None:
                break
            got += chunk
    finally:
        client.sock.close()
    return peak - before, reply, bytes(got)


# With replies unread the server holds at most about 64 KiB of output and as
# much input (under 1 MB measured); without that bound these floods cost it
# 20 to 70 MB.
FLOOD_BOUND = 10 * 1024 * 1024
QUIT_SMTP = b"221 2.0.0 mail.example.org closing connection\r\n"


def test_smtp_pipelined_replies_never_read_use_bounded_memory(maildrop):
    """2 MB of EHLO and NOOP whose replies are not read: the server stops reading while its
    output waits, its memory grows by less than 10 MB, and then every reply comes, in order."""
    growth, reply, got = flood(maildrop.ports["smtp"], maildrop.process.pid, False, b"EHLO x\r\nNOOP\r\n", (b"\r\n250 2.0.0 OK\r\n", 1), 150_000, b"QUIT\r\n", QUIT_SMTP)
    assert reply.startswith(b"250-mail.example.org Hello x\r\n") and reply.endswith(b"250 2.0.0 OK\r\n")
    assert growth < FLOOD_BOUND, f"memory grew by {growth // 1024 // 1024} MB"
    assert len(got) == len(reply) * 150_000 + len(QUIT_SMTP), "replies are missing"
    assert got == reply * 150_000 + QUIT_SMTP, "replies are not in order"


@pytest.mark.parametrize("listener", ["pop3", "pop3s"])
def test_pop3_pipelined_replies_never_read_use_bounded_memory(maildrop, listener):
    """2 MB of CAPA and AUTH whose replies are not read, in clear and inside TLS: memory grows
    by less than 10 MB, and then every reply comes, in order."""
    count = 170_000
    growth, reply, got = flood(maildrop.ports[listener], maildrop.process.pid, listener == "pop3s", b"CAPA\r\nAUTH\r\n", (b"\r\n.\r\n", 2), count, b"QUIT\r\n", b"+OK Bye\r\n")
    assert reply.startswith(b"+OK Capability list follows\r\n") and b"PIPELINING\r\n" in reply
    assert growth < FLOOD_BOUND, f"memory grew by {growth // 1024 // 1024} MB"
    assert len(got) == len(reply) * count + len(b"+OK Bye\r\n"), "replies are missing"
    assert got == reply * count + b"+OK Bye\r\n", "replies are not in order"
