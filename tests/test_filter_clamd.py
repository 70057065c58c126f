"""The clamd filter against a real clamd: the INSTREAM protocol, verdicts, sizes,
failures and options, first called directly and then through mailplat over SMTP.

clamd runs with a database of one signature made here (no downloads): the
MD5 of the EICAR test file, which clamd matches in a decoded MIME attachment.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactor
from zope.interface.verify import verifyObject

import commands
from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, merge_toml, stop_process, wait_for
from mailplat.config import ConfigError
from mailplat.filters.clamd import DEFAULT_MAX_SIZE, ClamdError, build, parse_reply
from mailplat.interfaces import BackendContext, IMessageFilter

SCAN = [str(Path(__file__).parent / "check_filter.py"), "mailplat.filters.clamd:build"]
PACKAGE = "clamav-daemon"

# The EICAR test file, put together at run time so that this file itself is
# not reported by virus scanners.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Eicar-Test-Signature"
# clamd's StreamMaxLength in these tests: small, so refusing a stream is cheap to provoke.
STREAM_MAX = 4 * 1024 * 1024


def find_clamd() -> str:
    """clamd's path; a skip naming the package, or a failure when CI requires the daemons."""
    path = shutil.which("clamd") or ("/usr/sbin/clamd" if os.access("/usr/sbin/clamd", os.X_OK) else None)
    if path is None:
        problem = f"clamd is not installed (apt-get install -y {PACKAGE})"
        if os.environ.get("MAILPLAT_REQUIRE_DAEMONS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return path


class Clamd:
    """A clamd of our own: a config, a one-signature database and both sockets in one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "clamd.sock"
        self.log = root / "clamd.log"
        database = root / "db"
        database.mkdir()
        (database / "eicar.hdb").write_text(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{SIGNATURE}\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (root / "clamd.conf").write_text(
            f"Foreground yes\n"
            f"LocalSocket {self.socket}\n"
            f"TCPSocket {self.port}\n"
            f"TCPAddr 127.0.0.1\n"
            f"DatabaseDirectory {database}\n"
            f"TemporaryDirectory {root}\n"
            f"LogFile {self.log}\n"
            f"StreamMaxLength {STREAM_MAX // (1024 * 1024)}M\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, binary: str) -> None:
        output = open(self.root / "clamd.out", "wb")
        self.process = subprocess.Popen([binary, "-c", str(self.root / "clamd.conf")], stdout=output, stderr=subprocess.STDOUT)
        output.close()

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"clamd exited with {self.process.returncode}:\n{(self.root / 'clamd.out').read_text()}")
            return self.ping()

        wait_for(answers, 30, "clamd to answer PING")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(self.socket))
                s.sendall(b"zPING\0")
                return s.recv(16) == b"PONG\0"
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    @property
    def unix(self) -> str:
        return f"unix:path={self.socket}"

    @property
    def tcp(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """One clamd for the module, answering PING before the first test."""
    binary = find_clamd()
    daemon = Clamd(tmp_path_factory.mktemp("clamd"))
    try:
        daemon.start(binary)
        yield daemon
    finally:
        daemon.stop()


def mail(subject: str, attachment: bytes | None = None, padding: int = 0) -> bytes:
    """A MIME message: ``padding`` bytes of text, then ``attachment`` base64-encoded."""
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    text = line * (padding // len(line) + 1) if padding else b"Hello there.\r\n"
    parts = [b"--BOUNDARY\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + text]
    if attachment is not None:
        encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
        parts.append(
            b"--BOUNDARY\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Disposition: attachment; filename=\"eicar.com\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded
        )
    head = (
        f"From: <someone@remote.test>\r\nTo: <alice@example.org>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@remote.test>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: multipart/mixed; boundary=\"BOUNDARY\"\r\n\r\n"
    ).encode()
    return head + b"".join(parts) + b"--BOUNDARY--\r\n"


# --- the reply parser and the options, without a daemon ----------------------------------


def test_replies_are_parsed_and_errors_never_pass_as_clean() -> None:
    """OK is clean, FOUND names the virus, and every ERROR or unknown reply raises."""
    assert parse_reply(b"stream: OK") is None
    assert parse_reply(b"stream: Eicar-Signature FOUND") == "Eicar-Signature"
    # A name goes into a reply line and a header: nothing but printable ASCII.
    assert parse_reply(b"stream: Bad\r\nName FOUND") == "Bad??Name"
    with pytest.raises(ClamdError, match="StreamMaxLength"):
        parse_reply(b"INSTREAM size limit exceeded. ERROR")
    with pytest.raises(ClamdError, match="Can't allocate memory"):
        parse_reply(b"stream: Can't allocate memory ERROR")
    for garbage in (b"", b"UNKNOWN COMMAND", b"PONG", b"stream: FOUND it"):
        with pytest.raises(ClamdError, match="unexpected reply"):
            parse_reply(garbage)


def context() -> BackendContext:
    return BackendContext("mail.example.org", ("example.org",), "/etc/mailplat", "/var/lib/mailplat", MemoryReactor())


def test_defaults() -> None:
    """Without options the filter rejects viruses, scans up to 25 MiB and talks to Debian's clamd socket."""
    scanner = build({}, context())
    verifyObject(IMessageFilter, scanner)
    assert scanner.action == "reject"
    assert scanner.max_size == DEFAULT_MAX_SIZE == 25 * 1024 * 1024
    assert scanner.address == "unix:path=/var/run/clamav/clamd.ctl"
    assert build({"address": "tcp:127.0.0.1:3310", "action": "quarantine", "max_size": 1000}, context()).max_size == 1000


@pytest.mark.parametrize(
    "options, key, problem",
    [
        ({"address": "nonsense:foo"}, "address", "is not a client endpoint"),
        ({"address": "tcp:127.0.0.1"}, "address", "is not a client endpoint"),
        ({"address": ""}, "address", "must be a Twisted client endpoint string"),
        ({"address": 3310}, "address", "must be a Twisted client endpoint string"),
        ({"action": "drop"}, "action", 'must be "reject" or "quarantine"'),
        ({"action": "tempfail"}, "action", 'must be "reject" or "quarantine"'),
        ({"max_size": "25M"}, "max_size", "must be a positive whole number"),
        ({"max_size": 0}, "max_size", "must be a positive whole number"),
        ({"max_size": -1}, "max_size", "must be a positive whole number"),
        ({"max_size": True}, "max_size", "must be a positive whole number"),
        ({"max_size": 1.5}, "max_size", "must be a positive whole number"),
        ({"adress": "unix:path=/tmp/x"}, "adress", "unknown key"),
    ],
)
def test_bad_options(options: dict[str, Any], key: str, problem: str) -> None:
    """Each bad value and each unknown key is a ConfigError naming the key, with a fix."""
    with pytest.raises(ConfigError) as error:
        build(dict(options), context())
    assert error.value.key == key
    assert problem in error.value.problem
    assert error.value.fix


def check_config(tmp_path: Path, table: str) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "site"
    MailplatServer(root, merge_toml(BASE_CONFIG, table))
    return commands.run([MAILPLAT, "--config", str(root / "mailplat.toml"), "check-config"], capture_output=True, text=True)


@pytest.mark.parametrize(
    "table, error",
    [
        ('[[filter]]\nbackend = "clamd"\nadress = "unix:path=/run/clamd.ctl"\n', r"\[filter\] #1 \(clamd\) adress: unknown key; fix: did you mean 'address'\?"),
        ('[[filter]]\nbackend = "clamd"\naction = "bounce"\n', r"\[filter\] #1 \(clamd\) action: must be \"reject\" or \"quarantine\""),
        ('[[filter]]\nbackend = "clamd"\naddress = "tcp:localhost:http:x"\n', r"\[filter\] #1 \(clamd\) address: .* is not a client endpoint"),
    ],
)
def test_check_config_refuses_bad_options(tmp_path: Path, table: str, error: str) -> None:
    """`mailplat check-config` exits 1 with one line naming the file, the filter and the key."""
    result = check_config(tmp_path, table)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mailplat.toml" in lines[0], result.stderr
    assert re.search(error, lines[0]), lines[0]


def test_check_config_takes_good_options(tmp_path: Path) -> None:
    """A clamd table with every option, and one with none, passes check-config."""
    table = '[[filter]]\nbackend = "clamd"\naddress = "tcp:127.0.0.1:3310"\naction = "quarantine"\nmax_size = 10485760\n'
    result = check_config(tmp_path, table + '\n[[filter]]\nbackend = "clamd"\n')
    assert result.returncode == 0, result.stderr


# --- the filter called directly, against the daemon ------------------------------------


def scan(tmp_path: Path, options: dict[str, Any], message: bytes, *extra: str) -> dict[str, Any]:
    """check_data once in a reactor of its own (tests/check_filter.py); its outcome."""
    path = tmp_path / f"message-{time.time_ns()}"
    path.write_bytes(message)
    result = commands.run(
        [sys.executable, *SCAN, json.dumps(options), str(path), *extra], text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_clean_message_gets_the_scanned_header(clamd: Clamd, tmp_path: Path) -> None:
    """A clean message is accepted with X-Virus-Scanned naming clamd and our hostname."""
    outcome = scan(tmp_path, {"address": clamd.unix}, mail("clean"))
    assert outcome == {"action": "accept", "text": "", "headers": [["X-Virus-Scanned", "clamd (mail.example.org)"]]}


def test_virus_in_a_spooled_message_is_rejected(clamd: Clamd, tmp_path: Path) -> None:
    """EICAR after a megabyte of text, read from a spool file behind a kept-apart header, is found."""
    outcome = scan(tmp_path, {"address": clamd.unix}, mail("virus", EICAR, padding=1024 * 1024), "--spooled")
    assert outcome["action"] == "reject"
    assert outcome["text"].startswith(f"Message rejected: virus found ({SIGNATURE}")


def test_virus_quarantined_over_tcp(clamd: Clamd, tmp_path: Path) -> None:
    """With action = "quarantine" (and clamd over TCP) a virus is quarantined with its name in X-Virus."""
    outcome = scan(tmp_path, {"address": clamd.tcp, "action": "quarantine"}, mail("virus", EICAR))
    assert outcome["action"] == "quarantine"
    headers = dict(outcome["headers"])
    assert headers["X-Virus"].startswith(SIGNATURE)
    assert headers["X-Virus-Scanned"] == "clamd (mail.example.org)"


def test_larger_than_max_size_is_not_scanned(tmp_path: Path) -> None:
    """A message over max_size is let through without a header, and clamd is not even contacted."""
    outcome = scan(tmp_path, {"address": f"unix:path={tmp_path}/nothing.sock", "max_size": 1000}, mail("big", EICAR, padding=2000))
    assert outcome == {"verdict": None}


def test_clamd_stream_limit_is_an_error(clamd: Clamd, tmp_path: Path) -> None:
    """Past clamd's StreamMaxLength (but within max_size) the check fails: never a clean verdict."""
    outcome = scan(tmp_path, {"address": clamd.unix}, mail("too big for clamd", padding=STREAM_MAX + 100_000), "--spooled")
    assert outcome["error"].startswith("ClamdError: clamd refused the message as too large"), outcome


def test_unreachable_clamd_is_an_error(tmp_path: Path) -> None:
    """No daemon at the address: the check raises (mailplat turns that into a 451)."""
    outcome = scan(tmp_path, {"address": f"unix:path={tmp_path}/nothing.sock"}, mail("nobody home"))
    assert outcome["error"].startswith(f"ClamdError: cannot reach clamd at unix:path={tmp_path}/nothing.sock"), outcome


@contextlib.contextmanager
def scanning_into_silence(tmp_path: Path, message: Path, cancel_after: float, *extra: str) -> Iterator[tuple[subprocess.Popen[str], socket.socket]]:
    """check_filter.py against a "daemon" that accepts and never reads; the scanner holds on after its outcome."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(10)
        options = json.dumps({"address": f"tcp:127.0.0.1:{listener.getsockname()[1]}", "max_size": 10**9})
        with subprocess.Popen(
            [sys.executable, *SCAN, options, str(message), "--cancel-after", str(cancel_after), "--hold", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ) as process:
            assert process.stdin is not None and process.stdout is not None
            try:
                connection, _ = listener.accept()
                with connection:
                    # The chain's timeout cancels the check.
                    assert "TimeoutError" in json.loads(process.stdout.readline())["error"]
                    yield process, connection
            finally:
                process.stdin.close()
                process.wait(10)


def test_cancelled_check_closes_its_connection(tmp_path: Path) -> None:
    """When the filter chain's timeout cancels a check, the connection to a silent daemon is closed."""
    path = tmp_path / "message"
    path.write_bytes(mail("cancelled"))
    with scanning_into_silence(tmp_path, path, 0.3) as (process, connection):
        # The scanner is still running, yet its side of the connection is closed.
        connection.settimeout(10)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        assert received.startswith(b"zINSTREAM\0")
        assert process.poll() is None


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/PID/io")
def test_message_is_read_only_as_fast_as_the_daemon_takes_it(tmp_path: Path) -> None:
    """Against a daemon that reads nothing, a 200 MB spooled message is not read past what the sockets hold."""
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: costs no disk
    with scanning_into_silence(tmp_path, path, 1.0, "--spooled") as (process, connection):
        # Every byte the scanner process read, Python's own imports included.
        read = int(dict(line.split(": ") for line in Path(f"/proc/{process.pid}/io").read_text().splitlines())["rchar"])
        assert read < 50 * 1024 * 1024, f"{read} bytes read"


# --- through mailplat, over SMTP -------------------------------------------------------


def start_server(root: Path, table: str, started: list[MailplatServer]) -> MailplatServer:
    server = MailplatServer(root, merge_toml(BASE_CONFIG, table))
    started.append(server)
    return server.start()


@pytest.fixture(scope="module")
def servers(clamd: Clamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MailplatServer]]:
    """mailplat with a clamd filter that rejects (unix socket) and one that quarantines (TCP)."""
    started: list[MailplatServer] = []
    try:
        yield {
            "reject": start_server(tmp_path_factory.mktemp("reject"), f'[[filter]]\nbackend = "clamd"\naddress = "{clamd.unix}"\n', started),
            "quarantine": start_server(
                tmp_path_factory.mktemp("quarantine"),
                f'[[filter]]\nbackend = "clamd"\naddress = "{clamd.tcp}"\naction = "quarantine"\nmax_size = 1000000\n',
                started,
            ),
        }
    finally:
        for server in started:
            server.stop()


def send(server: MailplatServer, message: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        return client.sendmail("someone@remote.test", ["alice@example.org"], message)


def delivered(server: MailplatServer, subject: str, folder: str = "") -> list[bytes]:
    """alice's messages with this subject, in her inbox or in ``folder``."""
    box = server.maildir("alice@example.org") / folder / "new" if folder else None
    messages = [p.read_bytes() for p in box.iterdir()] if box is not None and box.is_dir() else server.messages("alice@example.org")
    return [m for m in messages if f"\r\nSubject: {subject}\r\n".encode() in m]


def head_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


def test_smtp_virus_is_rejected_with_550(servers: dict[str, MailplatServer]) -> None:
    """An EICAR attachment sent to the MX gets 550 5.7.1 naming the virus, and nothing is delivered."""
    server = servers["reject"]
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, mail("smtp virus", EICAR))
    assert refused.value.smtp_code == 550
    assert f"5.7.1 Message rejected: virus found ({SIGNATURE}".encode() in refused.value.smtp_error
    assert delivered(server, "smtp virus") == []


def test_smtp_clean_message_is_delivered_with_the_header(servers: dict[str, MailplatServer]) -> None:
    """A clean message is delivered with X-Virus-Scanned: clamd (hostname) among its headers."""
    server = servers["reject"]
    send(server, mail("smtp clean"))
    [message] = delivered(server, "smtp clean")
    assert b"\r\nX-Virus-Scanned: clamd (mail.example.org)\r\n" in head_of(message)


def test_smtp_large_messages_stream_through(servers: dict[str, MailplatServer]) -> None:
    """Three-megabyte messages (spooled to disk) are scanned whole: clean ones pass, a virus at the end is found."""
    server = servers["reject"]
    send(server, mail("smtp large clean", padding=3 * 1024 * 1024))
    [message] = delivered(server, "smtp large clean")
    assert len(message) > 3 * 1024 * 1024
    assert b"X-Virus-Scanned: clamd (mail.example.org)" in head_of(message)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, mail("smtp large virus", EICAR, padding=3 * 1024 * 1024))
    assert refused.value.smtp_code == 550
    assert delivered(server, "smtp large virus") == []


def test_smtp_clamd_size_limit_fails_closed(servers: dict[str, MailplatServer]) -> None:
    """A message clamd refuses as too large (its StreamMaxLength is below our max_size) gets 451, not delivery."""
    server = servers["reject"]
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, mail("smtp over clamd limit", padding=STREAM_MAX + 100_000))
    assert refused.value.smtp_code == 451
    assert delivered(server, "smtp over clamd limit") == []
    wait_for(lambda: "clamd refused the message as too large" in server.log(), what="the clamd failure to be logged")


def test_smtp_virus_is_quarantined(servers: dict[str, MailplatServer]) -> None:
    """With action = "quarantine" the message lands in alice's .Quarantine/new with X-Virus, not in her inbox."""
    server = servers["quarantine"]
    assert send(server, mail("smtp quarantined", EICAR)) == {}
    assert delivered(server, "smtp quarantined") == []
    [message] = delivered(server, "smtp quarantined", folder=".Quarantine")
    head = head_of(message)
    assert f"\r\nX-Virus: {SIGNATURE}".encode() in head
    assert b"\r\nX-Virus-Scanned: clamd (mail.example.org)\r\n" in head


def test_smtp_over_max_size_is_delivered_unscanned(servers: dict[str, MailplatServer]) -> None:
    """A message above max_size is delivered to the inbox without being scanned and without a scan header."""
    server = servers["quarantine"]
    send(server, mail("smtp unscanned", EICAR, padding=1_100_000))
    [message] = delivered(server, "smtp unscanned")
    assert b"X-Virus" not in head_of(message)
    assert "not scanned" in server.log()


@pytest.mark.parametrize("on_error", ["tempfail", "accept"])
def test_smtp_clamd_not_running(tmp_path: Path, on_error: str) -> None:
    """Without a clamd the filter fails closed with 451; with on_error = "accept" mail is delivered unscanned."""
    started: list[MailplatServer] = []
    table = f'[[filter]]\nbackend = "clamd"\naddress = "unix:path={tmp_path}/nothing.sock"\non_error = "{on_error}"\n'
    try:
        server = start_server(tmp_path / "server", table, started)
        if on_error == "tempfail":
            with pytest.raises(smtplib.SMTPDataError) as refused:
                send(server, mail("no clamd"))
            assert refused.value.smtp_code == 451
            assert delivered(server, "no clamd") == []
        else:
            send(server, mail("no clamd"))
            [message] = delivered(server, "no clamd")
            assert b"X-Virus-Scanned" not in head_of(message)
        assert "filter clamd failed at data" in server.log()
    finally:
        for s in started:
            s.stop()
