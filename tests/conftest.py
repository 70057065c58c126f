"""Fixtures that start the real thing: `twistd -n mailplat` on ports chosen by the OS."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import argon2
import pytest

from mailplat.tls import make_self_signed

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
MAILPLAT = str(BIN / "mailplat")
START_TIMEOUT = 30.0

BASE_CONFIG = """\
hostname = "mail.example.org"
data_dir = "var"
domains = ["example.org", "example.net"]

[listen]
smtp = "tcp:0:interface=127.0.0.1"
submission = "tcp:0:interface=127.0.0.1"
submissions = "tcp:0:interface=127.0.0.1"
pop3 = "tcp:0:interface=127.0.0.1"
pop3s = "tcp:0:interface=127.0.0.1"
imap = "tcp:0:interface=127.0.0.1"
imaps = "tcp:0:interface=127.0.0.1"

[tls]
certificate = "tls/cert.pem"
key = "tls/key.pem"

[auth]
backend = "passwd-file"
path = "users.passwd"

[mailbox]
backend = "maildir"
path = "mail"

[login]
auth_failure_delay = 0.3

[aliases]
"postmaster@example.org" = "alice@example.org"
"team@example.org" = ["alice@example.org", "bob@example.org"]
"@example.net" = "alice@example.org"
"""

USERS = {"alice@example.org": "alice-password", "bob@example.org": "bob-password"}

# Hashing is slow on purpose; hash the test users once per run.
_HASHES: dict[str, str] = {}
# The test servers' users are argon2id hashes as `mailplat user add` writes
# them, but at a small cost (8 MiB, one pass, one lane): each login
# verifies one, and the suite logs in hundreds of times.  The server checks
# them with the same code; test_users.py checks what `user add` stores.
_TEST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def stop_process(process: Any) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ten seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def write_users(path: Path, users: dict[str, str]) -> None:
    lines = []
    for address, password in users.items():
        key = f"{address}:{password}"
        if key not in _HASHES:
            _HASHES[key] = "{ARGON2ID}" + _TEST_HASHER.hash(password)
        lines.append(f"{address}:{_HASHES[key]}\n")
    path.write_text("".join(lines))


class MailplatServer:
    """A `twistd -n mailplat` subprocess with its own folder, config and ports."""

    def __init__(self, root: Path, config: str, users: dict[str, str] | None = None, twistd: str = TWISTD) -> None:
        self.root = root
        self.twistd = twistd
        self.config_path = root / "mailplat.toml"
        self.log_path = root / "twistd.log"
        self.ports: dict[str, int] = {}
        self.process: Any = None  # a subprocess.Popen, or a commands.ForkedProcess
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "tls" / "cert.pem").exists():
            make_self_signed("mail.example.org", str(root / "tls" / "cert.pem"), str(root / "tls" / "key.pem"))
        self.config_path.write_text(config)
        write_users(root / "users.passwd", USERS if users is None else users)

    @property
    def port(self) -> int:
        return self.ports["smtp"]

    def maildir(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.root / "mail" / domain / local

    def messages(self, address: str) -> list[bytes]:
        """The messages in an account's maildir (new/ and cur/), in delivery order."""
        files = [p for sub in ("new", "cur") if (self.maildir(address) / sub).is_dir() for p in (self.maildir(address) / sub).iterdir()]
        # Our maildir names begin with the delivery time (seconds, zero-padded microseconds).
        return [p.read_bytes() for p in sorted(files, key=lambda p: p.name)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> MailplatServer:
        self.log_path.write_text("")
        args = [self.twistd, "-n", "--pidfile=", "--logfile", str(self.log_path), "mailplat", "--config", str(self.config_path)]
        if self.twistd == TWISTD and not os.environ.get("MAILPLAT_TEST_FRESH_TWISTD"):
            # A process of its own, forked from a warm interpreter (tests/commands.py):
            # a fresh one's imports are most of a start's CPU, and the suite starts hundreds.
            import commands

            self.process = commands.spawn(args, cwd=self.root, output=self.log_path)
        else:
            log = open(self.log_path, "ab")
            self.process = subprocess.Popen(args, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
            log.close()
        wanted = set(re.findall(r'^(\w+)\s*=\s*"tcp6?:', self.config_path.read_text().split("[listen]")[1].split("\n[")[0], re.M))

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"mailplat exited with {self.process.returncode}:\n{self.log()}")
            found = dict(re.findall(r"(\w+) listening on \S+:(\d+)", self.log()))
            self.ports = {name: int(port) for name, port in found.items()}
            return wanted <= set(self.ports)

        wait_for(ready, START_TIMEOUT, "mailplat to listen")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., MailplatServer]]:
    """Start servers with the base config plus extra TOML; all are stopped at the end."""
    servers: list[MailplatServer] = []

    def make(extra: str = "", users: dict[str, str] | None = None, config: str | None = None, name: str = "server") -> MailplatServer:
        text = config if config is not None else merge_toml(BASE_CONFIG, extra)
        server = MailplatServer(tmp_path / name, text, users)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """One server with the base config, shared by a test module."""
    s = MailplatServer(tmp_path_factory.mktemp("mailplat"), BASE_CONFIG)
    s.start()
    yield s
    s.stop()


def merge_toml(base: str, extra: str) -> str:
    """Base config with ``extra`` tables added; a table in both gets extra's keys appended."""
    extra = textwrap.dedent(extra)
    text = base
    for block in re.split(r"(?m)^(?=\[)", extra):
        if not block.strip():
            continue
        header = block.splitlines()[0].strip()
        # An array of tables ([[filter]]) gets a new entry each time.
        if header.startswith("[") and not header.startswith("[[") and header in text:
            body = block.split("\n", 1)[1] if "\n" in block else ""
            text = text.replace(header + "\n", header + "\n" + body, 1)
        elif header.startswith("["):
            text += "\n" + block
        else:
            text = block + text
    return text


class Dialog:
    """A raw client socket: send exact bytes, read whole SMTP replies or single lines."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.tls = False

    def start_tls(self) -> None:
        """TLS from here on (after STARTTLS or STLS, or at once for implicit TLS); the test's certificate is not checked."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname="mail.example.org")
        self.file = self.sock.makefile("rb")
        self.tls = True

    def line(self) -> str:
        """One line without its CRLF (a POP3 reply)."""
        line = self.file.readline()
        if not line:
            raise ConnectionError("connection closed")
        return line.decode("utf-8", "replace").rstrip("\r\n")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its text lines joined by newlines."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed; got so far: " + repr(lines))
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(lines[-1][:3]), "\n".join(l[4:] for l in lines)

    def command(self, line: bytes | str) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed the connection (reads until EOF)."""
        try:
            return self.file.read() is not None
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Dialog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def dialog(server: MailplatServer) -> Iterator[Callable[..., Dialog]]:
    """Open raw SMTP dialogs to the shared server; the greeting is already read."""
    opened: list[Dialog] = []

    def connect(port: int | None = None, greet: bool = True) -> Dialog:
        d = Dialog(port or server.port)
        opened.append(d)
        if greet:
            code, _ = d.reply()
            assert code == 220
        return d

    yield connect
    for d in opened:
        d.close()


def message(subject: str = "hello", body: str = "Hello there.\r\n", sender: str = "someone@remote.test", to: str = "alice@example.org") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}.{time.time_ns()}@remote.test>\r\n\r\n{body}"
    ).encode()

