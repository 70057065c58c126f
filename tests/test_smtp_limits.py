"""Every limit of the MX listener, configured small and hit over the wire."""

from __future__ import annotations

import smtplib
import socket

import pytest

from conftest import Dialog, message, wait_for

SMALL_LIMITS = """
[smtp]
max_message_size = 10000
max_recipients = 3
idle_timeout = 1.0
max_connections = 6
max_connections_per_ip = 4
max_errors = 5
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    from conftest import BASE_CONFIG, MailplatServer, merge_toml

    server = MailplatServer(tmp_path_factory.mktemp("limited"), merge_toml(BASE_CONFIG, SMALL_LIMITS))
    server.start()
    yield server
    server.stop()


def connect(server) -> Dialog:
    d = Dialog(server.port)
    assert d.reply()[0] == 220
    return d


def test_size_declared_too_big(limited):
    """MAIL with SIZE= over the limit gets 552 5.3.4, and EHLO advertises the limit."""
    with connect(limited) as d:
        code, text = d.command("EHLO client.remote.test")
        assert "SIZE 10000" in text
        code, text = d.command("MAIL FROM:<a@remote.test> SIZE=10001")
        assert code == 552 and text.startswith("5.3.4")
        assert d.command("MAIL FROM:<a@remote.test> SIZE=9000")[0] == 250


def test_size_exceeded_during_data(limited):
    """A message over the size limit (no SIZE= given) gets 552 5.3.4 after DATA and is not delivered; the session goes on."""
    before = len(limited.messages("alice@example.org"))
    with connect(limited) as d:
        d.command("EHLO client.remote.test")
        d.command("MAIL FROM:<a@remote.test>")
        d.command("RCPT TO:<alice@example.org>")
        assert d.command("DATA")[0] == 354
        d.send(message("big", body="x" * 70 + "\r\n" * 1) * 200 + b".\r\n")
        code, text = d.reply()
        assert code == 552 and text.startswith("5.3.4")
        assert d.command("NOOP")[0] == 250
    assert len(limited.messages("alice@example.org")) == before


def test_too_many_recipients(limited):
    """The recipient after the limit gets 452 4.5.3; the message goes to the accepted ones."""
    with connect(limited) as d:
        d.command("EHLO client.remote.test")
        d.command("MAIL FROM:<a@remote.test>")
        for _ in range(3):
            assert d.command("RCPT TO:<alice@example.org>")[0] == 250
        code, text = d.command("RCPT TO:<bob@example.org>")
        assert code == 452 and text.startswith("4.5.3")


def test_idle_timeout(limited):
    """A silent client is told 421 4.4.2 and disconnected after the idle timeout."""
    with connect(limited) as d:
        d.sock.settimeout(10)
        code, text = d.reply()
        assert code == 421 and text.startswith("4.4.2")
        assert d.closed()


def test_too_many_errors(limited):
    """After max_errors bad commands the server says 421 and closes the connection."""
    with connect(limited) as d:
        for _ in range(4):
            assert d.command("BOGUS")[0] == 500
        d.send(b"BOGUS\r\n")
        assert d.reply()[0] == 500
        code, text = d.reply()
        assert code == 421 and text.startswith("4.7.0")
        assert d.closed()


def test_connections_per_ip_and_total(limited):
    """Connections beyond the per-IP limit get 421 4.7.0, other addresses still get in up to the total, and a freed slot is reusable."""
    held = [connect(limited) for _ in range(4)]
    try:
        extra = Dialog(limited.port)
        code, text = extra.reply()
        assert code == 421 and text.startswith("4.7.0")
        extra.close()
        # 127.0.0.2 is another client address on the loopback network.
        others = []
        for _ in range(2):
            s = socket.create_connection((("127.0.0.1", limited.port)), timeout=10, source_address=("127.0.0.2", 0))
            others.append(s)
            assert s.recv(100).startswith(b"220")
        over = socket.create_connection(("127.0.0.1", limited.port), timeout=10, source_address=("127.0.0.3", 0))
        assert over.recv(100).startswith(b"421 4.7.0")
        for s in others + [over]:
            s.close()
    finally:
        for d in held:
            d.close()

    def admitted() -> bool:
        with Dialog(limited.port) as d:
            return d.reply()[0] == 220

    wait_for(admitted, what="a freed connection slot")


def test_restart_with_same_data_folder(make_server):
    """After a restart on the same folders, earlier mail is still there and new mail is added."""
    server = make_server()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("a@remote.test", ["alice@example.org"], message("before-restart"))
    server.stop()
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("a@remote.test", ["alice@example.org"], message("after-restart"))
    subjects = [m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in server.messages("alice@example.org")]
    assert subjects == [b"before-restart", b"after-restart"]
    assert not [p for p in (server.root / "var" / "spool").rglob("*") if p.is_file()]


def test_dropped_connection_mid_data_delivers_nothing(make_server):
    """A client that disconnects in the middle of DATA leaves no message and no spool file behind."""
    server = make_server()
    with Dialog(server.port) as d:
        d.reply()
        d.command("EHLO client.remote.test")
        d.command("MAIL FROM:<a@remote.test>")
        d.command("RCPT TO:<alice@example.org>")
        assert d.command("DATA")[0] == 354
        # Large enough to be spooled to a file rather than kept in memory.
        d.send(b"Subject: cut\r\n\r\n" + b"partial body line\r\n" * 20000)
        spool = server.root / "var" / "spool"
        wait_for(lambda: [p for p in spool.rglob("*") if p.is_file()], what="a spool file")
    wait_for(lambda: "disconnect from" in server.log(), what="the disconnect")
    assert server.messages("alice@example.org") == []
    wait_for(lambda: not [p for p in spool.rglob("*") if p.is_file()], what="spool cleanup")
    # And the server still serves.
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        assert client.noop()[0] == 250


def test_kill_9_loses_no_acknowledged_message(make_server):
    """Every message answered 250 before a kill -9 of the server is in the maildir after a restart."""
    import signal
    import threading

    server = make_server()
    acknowledged: list[str] = []
    stop = threading.Event()

    def send(n: int) -> None:
        for i in range(1000):
            if stop.is_set():
                return
            subject = f"crash-{n}-{i}"
            try:
                with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                    client.sendmail("a@remote.test", ["alice@example.org"], message(subject))
            except (OSError, smtplib.SMTPException):
                return
            acknowledged.append(subject)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acknowledged) >= 40, what="some acknowledged messages")
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    stop.set()
    for t in threads:
        t.join()
    server.process = None
    server.start()
    stored = {m.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in server.messages("alice@example.org")}
    assert set(acknowledged) <= stored
    assert not [p for p in (server.maildir("alice@example.org") / "new").iterdir() if p.stat().st_size == 0]


def resident(pid: int) -> int:
    """The process's resident memory in octets (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
    return int(kb) * 1024


def test_a_million_header_fields_are_refused_in_small_memory(make_server):
    """A message of 1,000,000 distinct header fields (20 MB, under the size limit) gets 552 5.3.4, and the server grows by under 30 MB."""
    server = make_server()
    assert server.process is not None
    pid = server.process.pid
    with connect(server) as d:
        d.command("EHLO client.remote.test")
        assert d.command("MAIL FROM:<a@remote.test>")[0] == 250
        assert d.command("RCPT TO:<alice@example.org>")[0] == 250
        assert d.command("DATA")[0] == 354
        before = peak = resident(pid)
        for start in range(0, 1_000_000, 10_000):
            d.send(b"".join(b"X-Field-%07d: v\r\n" % i for i in range(start, start + 10_000)))
            peak = max(peak, resident(pid))
        d.send(b"\r\nbody\r\n.\r\n")
        code, text = d.reply()
        peak = max(peak, resident(pid))
        assert code == 552 and text.startswith("5.3.4 Message refused: more than 1000 header fields"), (code, text)
        assert d.command("NOOP")[0] == 250
    assert peak - before < 30 * 1024 * 1024, f"grew by {(peak - before) >> 20} MB"
    assert server.messages("alice@example.org") == []
