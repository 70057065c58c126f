"""The lmtp delivery backend against a real Dovecot LMTP server, and a scripted stand-in.

Dovecot is started once for the module from a config of our own (its own
base_dir, state, log, users file and maildirs in a temp folder; /etc/dovecot
is never read), listening on a free 127.0.0.1 port and on a unix socket.
Its users are alice, bob and dave (whose quota is full, and who gets 452 as
Dovecot is told to answer a full mailbox with a temporary failure); mailplat
also knows carol, whom Dovecot does not.  Dovecot stores CRLF as received
(mail_save_crlf), so what it stores is compared byte for byte with what was
sent.  The stand-in (FakeLMTP) does what Dovecot does not do on request:
stay silent, or close a kept connection.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import BASE_CONFIG, USERS, MailplatServer, merge_toml, message, stop_process, wait_for
from mailplat.config import ConfigError
from mailplat.interfaces import BackendContext

HERE = Path(__file__).parent
DOVECOT = shutil.which("dovecot") or next((p for p in ("/usr/sbin/dovecot",) if os.access(p, os.X_OK)), None)
LMTP_PROGRAM = "/usr/lib/dovecot/lmtp"
SENDER = "someone@remote.test"
# mailplat's users: Dovecot knows all but carol.
MAILPLAT_USERS = {**USERS, "carol@example.org": "carol-password", "dave@example.org": "dave-password"}
DOVECOT_USERS = ("alice@example.org", "bob@example.org", "dave@example.org")
QUARANTINE_FILTER = '[[filter]]\nbackend = "quarantine_filter:factory"\n'


# --- Dovecot ------------------------------------------------------------------------


@dataclass
class Dovecot:
    root: Path
    port: int
    socket_path: str
    log_path: Path

    def maildir(self, address: str, folder: str = "") -> Path:
        local, domain = address.split("@")
        path = self.root / "mail" / domain / local
        return path / f".{folder}" if folder else path

    def messages(self, address: str, marker: str, folder: str = "") -> list[bytes]:
        """The stored messages of ``address`` (in ``folder``) that contain ``marker``."""
        found = []
        for sub in ("new", "cur"):
            path = self.maildir(address, folder) / sub
            if path.is_dir():
                found += [f.read_bytes() for f in sorted(path.iterdir())]
        return [m for m in found if marker.encode() in m]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connections(self) -> int:
        """How many LMTP connections Dovecot has accepted so far."""
        return len(re.findall(r"lmtp\(\d+\): Info: Connect from", self.log()))


def require_dovecot() -> None:
    if DOVECOT is None or not os.path.exists(LMTP_PROGRAM):
        why = "Dovecot's LMTP server is not installed: apt-get install -y dovecot-lmtpd"
        if os.environ.get("MAILPLAT_REQUIRE_DAEMONS") == "1":
            pytest.fail(why)
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmtp_greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(100).startswith(b"220 ")
    except OSError:
        return False


def dovecot_config(root: Path, port: int, uid: int, gid: int, internal_user: str, login_user: str) -> str:
    """A complete dovecot.conf: LMTP only, everything in ``root``."""
    unprivileged = "" if os.geteuid() == 0 else (
        # Without root, nothing can chroot or change owner.
        f"default_internal_group = {grp.getgrgid(gid).gr_name}\n"
        "service anvil {\n  chroot =\n}\nservice lmtp {\n  user =\n}\n"
    )
    return f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = mailplat-test-lmtp-{port}
protocols = lmtp
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain
default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = {min(uid, 500)}
first_valid_gid = {min(gid, 1)}
mail_location = maildir:{root}/mail/%d/%n
# Store the message as it came (CRLF), so that a test can compare bytes.
mail_save_crlf = yes
# +Quarantine in RCPT TO saves into that folder (folders = "detail").
lmtp_save_to_detail_mailbox = yes
lda_mailbox_autocreate = yes
recipient_delimiter = +
mail_plugins = quota
quota_full_tempfail = yes
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
{unprivileged}passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
"""


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    require_dovecot()
    # Outside pytest's 0700 folders: Dovecot's processes run as other users.
    root = Path(tempfile.mkdtemp(prefix="mailplat-lmtp-"))
    process = None
    try:
        root.chmod(0o755)
        if os.geteuid() == 0:
            # Dovecot delivers as the userdb's uid, and never as root; its
            # own processes run as the users the Debian package creates.
            nobody = pwd.getpwnam("nobody")
            uid, gid = nobody.pw_uid, nobody.pw_gid
            internal_user, login_user = "dovecot", "dovenull"
        else:
            uid, gid = os.getuid(), os.getgid()
            internal_user = login_user = pwd.getpwuid(uid).pw_name
        for sub in ("run", "state", "mail"):
            (root / sub).mkdir()
        if os.geteuid() == 0:
            os.chown(root / "mail", uid, gid)
        lines = []
        for address in DOVECOT_USERS:
            local, domain = address.split("@")
            # dave's mailbox is full (a quota of one byte).
            extra = "userdb_quota_rule=*:storage=1B" if local == "dave" else ""
            lines.append(f"{address}:{{PLAIN}}{local}-password:{uid}:{gid}::{root}/mail/{domain}/{local}::{extra}\n")
        (root / "users").write_text("".join(lines))
        (root / "users").chmod(0o644)
        port = free_port()
        (root / "dovecot.conf").write_text(dovecot_config(root, port, uid, gid, internal_user, login_user))
        output = root / "dovecot.out"
        with open(output, "wb") as out:
            process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(root / "dovecot.conf")], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        socket_path = str(root / "run" / "lmtp")

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"dovecot exited with {process.returncode}:\n{output.read_text(errors='replace')}\n"
                    f"{(root / 'dovecot.log').read_text(errors='replace') if (root / 'dovecot.log').exists() else ''}"
                )
            return os.path.exists(socket_path) and lmtp_greets(port)

        wait_for(ready, 20, "Dovecot's LMTP server to greet")
        yield Dovecot(root, port, socket_path, root / "dovecot.log")
    finally:
        if process is not None:
            stop_process(process)
        shutil.rmtree(root, ignore_errors=True)


# --- mailplat -------------------------------------------------------------------------


def lmtp_config(address: str, extra: str = "") -> str:
    return merge_toml(BASE_CONFIG, f'[delivery]\nbackend = "lmtp"\naddress = "{address}"\n{extra}\n')


def start_mailplat(root: Path, config: str) -> MailplatServer:
    """mailplat with tests/lmtp on its path (for the quarantine filter)."""
    server = MailplatServer(root, config, MAILPLAT_USERS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(HERE / "lmtp"))
        server.start()
    return server


@pytest.fixture(scope="module")
def mailplat(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """mailplat delivering to Dovecot over TCP, folders left to their default."""
    server = start_mailplat(tmp_path_factory.mktemp("mailplat"), lmtp_config(f"tcp:host=127.0.0.1:port={dovecot.port}", QUARANTINE_FILTER))
    yield server
    server.stop()


def send(port: int, recipients: list[str], content: bytes, sender: str = SENDER) -> tuple[int, str]:
    """The reply to the end of DATA: (250, "") or the refusal."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        try:
            client.sendmail(sender, recipients, content)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


_FIELD = re.compile(rb"([A-Za-z-]+):[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
_OUR_RECEIVED = re.compile(
    rb"Received: from [^\r\n]*\r\n\tby mail\.example\.org \(mailplat\) with \w+ id \w+(\r\n\tfor <[^>\r\n]*>)?; [^\r\n]+\r\n"
)


def assert_stored_as_sent(stored: bytes, sent: bytes, sender: str = SENDER) -> None:
    """Dovecot's Return-Path, Delivered-To and Received on top, then mailplat's
    Received, then exactly the bytes the client sent."""
    rest = stored
    added = []
    while (field := _FIELD.match(rest)) is not None:
        name = field.group(1).lower()
        if name not in (b"return-path", b"delivered-to") and not (name == b"received" and b" with LMTP" in field.group(0)):
            break
        added.append(field.group(0))
        rest = rest[field.end():]
    assert added and added[0] == f"Return-Path: <{sender}>\r\n".encode(), stored[:500]
    assert rest.endswith(sent), (len(rest), len(sent), rest[:300])
    assert _OUR_RECEIVED.fullmatch(rest[: len(rest) - len(sent)]), rest[:300]


# --- options ---------------------------------------------------------------------------


def build(options: dict[str, Any]) -> Any:
    from mailplat.backends.lmtp import build as build_lmtp

    return build_lmtp(dict(options), BackendContext("mail.example.org", ("example.org",), "/tmp", "/tmp/var", reactor=None))


@pytest.mark.parametrize(
    "options, key",
    [
        ({}, "address"),
        ({"address": ""}, "address"),
        ({"address": 24}, "address"),
        ({"address": "carrier-pigeon:loft=3"}, "address"),
        ({"address": "tcp:host=127.0.0.1:port=24", "timeout": 0}, "timeout"),
        ({"address": "tcp:host=127.0.0.1:port=24", "timeout": "300"}, "timeout"),
        ({"address": "tcp:host=127.0.0.1:port=24", "timeout": float("inf")}, "timeout"),
        ({"address": "tcp:host=127.0.0.1:port=24", "max_connections": 0}, "max_connections"),
        ({"address": "tcp:host=127.0.0.1:port=24", "max_connections": 2.5}, "max_connections"),
        ({"address": "tcp:host=127.0.0.1:port=24", "max_connections": True}, "max_connections"),
        ({"address": "tcp:host=127.0.0.1:port=24", "folders": "Quarantine"}, "folders"),
        ({"address": "tcp:host=127.0.0.1:port=24", "adress": "x"}, "adress"),
    ],
)
def test_bad_options_name_their_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build(options)
    assert raised.value.key == key


def test_options_and_defaults() -> None:
    backend = build({"address": "unix:path=/run/dovecot/lmtp"})
    assert (backend.timeout, backend.max_connections, backend.folders) == (300.0, 10, "inbox")
    backend = build({"address": "tcp:host=127.0.0.1:port=24", "timeout": 5, "max_connections": 2, "folders": "detail"})
    assert (backend.timeout, backend.max_connections, backend.folders) == (5.0, 2, "detail")
    with pytest.raises(ConfigError) as raised:
        build({"address": "tcp:host=127.0.0.1:port=24", "max_conections": 2})
    assert "max_connections" in str(raised.value)


def test_found_by_name_and_started_as_a_service(tmp_path: Path) -> None:
    """`backend = "lmtp"` is registered, and its provider is an IService (its connections are closed at stop)."""
    from twisted.application.service import IService
    from zope.interface.verify import verifyObject

    from mailplat.config import BackendSettings
    from mailplat.interfaces import IDeliveryBackend
    from mailplat.plugins import build_backend, find_factory

    assert find_factory("delivery", "lmtp").name == "lmtp"
    context = BackendContext("mail.example.org", ("example.org",), str(tmp_path), str(tmp_path / "var"), reactor=None)
    provider = build_backend(BackendSettings("delivery", "lmtp", {"address": "tcp:host=127.0.0.1:port=24"}), context, "f.toml")
    assert verifyObject(IDeliveryBackend, provider) and IService.providedBy(provider)


# --- against Dovecot -----------------------------------------------------------------------


def test_every_recipient_gets_the_message_as_sent(dovecot: Dovecot, mailplat: MailplatServer) -> None:
    sent = message("to-alice-and-bob", "Two recipients,\r\n.one dot-led line\r\n..and another\r\n")
    assert send(mailplat.port, ["alice@example.org", "bob@example.org"], sent) == (250, "")
    for address in ("alice@example.org", "bob@example.org"):
        [stored] = dovecot.messages(address, "to-alice-and-bob")
        assert_stored_as_sent(stored, sent)
    sent = message("to-bob-alone", sender="other@remote.test")
    assert send(mailplat.port, ["bob@example.org"], sent, sender="other@remote.test") == (250, "")
    [stored] = dovecot.messages("bob@example.org", "to-bob-alone")
    assert_stored_as_sent(stored, sent, sender="other@remote.test")
    assert b"\r\nDelivered-To: bob@example.org\r\n" in stored.split(b"\r\n\r\n")[0]
    # Nothing went to mailplat's own mailboxes.
    assert mailplat.messages("alice@example.org") == [] and mailplat.messages("bob@example.org") == []


def test_null_sender_and_alias(dovecot: Dovecot, mailplat: MailplatServer) -> None:
    """A bounce (MAIL FROM:<>) to an alias: Dovecot is given the account's address."""
    sent = message("bounce-to-team", sender="mailer-daemon@remote.test")
    assert send(mailplat.port, ["team@example.org"], sent, sender="") == (250, "")
    for address in ("alice@example.org", "bob@example.org"):
        [stored] = dovecot.messages(address, "bounce-to-team")
        assert_stored_as_sent(stored, sent, sender="")


def test_a_kept_connection_carries_later_messages(dovecot: Dovecot, mailplat: MailplatServer) -> None:
    before = dovecot.connections()
    for n in range(3):
        assert send(mailplat.port, ["alice@example.org"], message(f"kept-connection-{n}")) == (250, "")
    for n in range(3):
        assert len(dovecot.messages("alice@example.org", f"kept-connection-{n}")) == 1
    # At most one new connection (none when an earlier test left one open).
    assert dovecot.connections() - before <= 1, dovecot.log()


def test_a_recipient_dovecot_does_not_know_is_refused_or_bounced(dovecot: Dovecot, mailplat: MailplatServer) -> None:
    code, text = send(mailplat.port, ["carol@example.org"], message("to-carol"))
    assert code == 554, text
    assert "<carol@example.org>" in text and "550 5.1.1" in text, text

    # With another recipient who gets it: accepted (alice has it, once), and
    # carol's refusal goes to the queue, which bounces it to the sender.
    code, text = send(mailplat.port, ["carol@example.org", "alice@example.org"], message("to-carol-and-alice"))
    assert code == 250, text
    assert len(dovecot.messages("alice@example.org", "to-carol-and-alice")) == 1
    assert re.search(r"<carol@example\.org> queued after: mailbox server refused <carol@example\.org>: 550 5\.1\.1", mailplat.log())
    wait_for(lambda: "<carol@example.org> failed" in mailplat.log() and "bounce" in mailplat.log(), what="carol's bounce")
    assert len(dovecot.messages("alice@example.org", "to-carol-and-alice")) == 1


def test_a_full_mailbox_is_a_temporary_failure_then_queued(dovecot: Dovecot, mailplat: MailplatServer) -> None:
    code, text = send(mailplat.port, ["dave@example.org"], message("to-dave"))
    assert code == 451, text
    assert "<dave@example.org>" in text and "452 4.2.2" in text, text

    # With alice too: accepted, alice has it once, and dave waits in the queue.
    code, text = send(mailplat.port, ["alice@example.org", "dave@example.org"], message("to-alice-and-dave"))
    assert code == 250, text
    assert len(dovecot.messages("alice@example.org", "to-alice-and-dave")) == 1
    wait_for(lambda: re.search(r"<dave@example\.org> pending: .*452 4\.2\.2", mailplat.log()), what="dave's retry to be scheduled")
    assert len(dovecot.messages("alice@example.org", "to-alice-and-dave")) == 1


def dotted_message(subject: str, size: int = 2 * 1024 * 1024) -> bytes:
    """About ``size`` bytes whose lines around every 64 KiB boundary begin with dots.

    Where the boundaries fall in the stream depends on the length of
    mailplat's Received header, so each boundary has 3000 bytes of ".\\r\\n"
    lines before it, shifted by one byte more at each boundary: whatever the
    header's length, many chunks begin exactly with a dot line.
    """
    out = bytearray(message(subject, body=""))
    chunk = 64 * 1024
    k = 1
    while len(out) < size:
        start = k * chunk - 3000 + k % 3
        while (need := start - len(out)) > 0:
            out += b"x" * max(0, min(need, 80) - 2) + b"\r\n"
        while len(out) < k * chunk + 100:
            out += b".\r\n"
        out += b"..two dots\r\n.x\r\n"
        k += 1
    out += b".\r\n"  # the last line is a lone dot too
    return bytes(out)


def test_a_large_message_with_dot_lines_at_chunk_boundaries(dovecot: Dovecot, mailplat: MailplatServer) -> None:
    sent = dotted_message("large-dotted")
    assert len(sent) > 2 * 1024 * 1024
    assert send(mailplat.port, ["bob@example.org"], sent) == (250, "")
    [stored] = dovecot.messages("bob@example.org", "large-dotted")
    assert_stored_as_sent(stored, sent)


def test_without_detail_a_quarantined_message_goes_to_the_inbox(dovecot: Dovecot, mailplat: MailplatServer) -> None:
    sent = message("quarantine me, inbox")
    for _ in range(2):
        assert send(mailplat.port, ["alice@example.org"], sent) == (250, "")
    stored = dovecot.messages("alice@example.org", "quarantine me, inbox")
    assert len(stored) == 2 and all(b"\r\nX-Quarantined: yes\r\n" in m for m in stored)
    assert dovecot.messages("alice@example.org", "quarantine me, inbox", "Quarantine") == []
    # Said once, not for every message.
    assert mailplat.log().count("folder is not passed over LMTP") == 1, mailplat.log()


def test_unix_socket_and_quarantine_as_detail(dovecot: Dovecot, tmp_path: Path) -> None:
    server = start_mailplat(tmp_path / "unix", lmtp_config(f"unix:path={dovecot.socket_path}", 'folders = "detail"\n' + QUARANTINE_FILTER))
    try:
        sent = message("over-the-unix-socket")
        assert send(server.port, ["alice@example.org"], sent) == (250, "")
        [stored] = dovecot.messages("alice@example.org", "over-the-unix-socket")
        assert_stored_as_sent(stored, sent)

        sent = message("quarantine me, detail")
        assert send(server.port, ["alice@example.org", "bob@example.org"], sent) == (250, "")
        for address in ("alice@example.org", "bob@example.org"):
            assert dovecot.messages(address, "quarantine me, detail") == []
            [stored] = dovecot.messages(address, "quarantine me, detail", "Quarantine")
            assert b"\r\nX-Quarantined: yes\r\n" in stored
        assert "folder is not passed" not in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_no_lmtp_server_is_a_temporary_failure(where: str, tmp_path: Path) -> None:
    address = f"tcp:host=127.0.0.1:port={free_port()}" if where == "tcp" else f"unix:path={tmp_path}/no-such.sock"
    server = start_mailplat(tmp_path / "down", lmtp_config(address))
    try:
        code, text = send(server.port, ["alice@example.org"], message("nobody-home"))
        assert (code, text) == (451, "4.3.0 mailbox server unavailable; try again later")
        assert "cannot connect to the LMTP server" in server.log()
    finally:
        server.stop()


# --- against a scripted stand-in -----------------------------------------------------------


class FakeLMTP:
    """An LMTP server in threads that answers as ``mode`` says.

    normal: like Dovecot, a little slowly at the end of DATA; silent: never
    greets; mute: no reply after the message; close-kept: answers 421 and
    closes when a second transaction begins on a connection.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "normal"
        self.lock = threading.Lock()
        self.clients: list[socket.socket] = []
        self.messages: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, mode: str) -> None:
        """Close every connection (mailplat's kept one too) and count afresh."""
        with self.lock:
            self.mode = mode
            for client in self.clients:
                try:
                    client.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        wait_for(lambda: self.open == 0, 5, "the stand-in's connections to close")
        with self.lock:
            self.messages, self.connections, self.most_open = [], 0, 0

    def close(self) -> None:
        self.reset("normal")
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.clients.append(client)
                self.connections += 1
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with client, client.makefile("rb") as reader:
                self._dialogue(client, reader)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
                if client in self.clients:
                    self.clients.remove(client)

    def _dialogue(self, client: socket.socket, reader: Any) -> None:
        mode = self.mode
        if mode == "silent":
            reader.read()
            return
        client.sendall(b"220 fake LMTP ready\r\n")
        transactions = 0
        recipients = 0
        while line := reader.readline():
            verb = line[:4].upper()
            if verb == b"LHLO":
                client.sendall(b"250-fake\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"MAIL":
                transactions += 1
                if mode == "close-kept" and transactions > 1:
                    client.sendall(b"421 4.4.2 fake closing an idle connection\r\n")
                    return
                recipients = 0
                client.sendall(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                recipients += 1
                client.sendall(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                client.sendall(b"354 OK\r\n")
                body = bytearray()
                while (data := reader.readline()) != b".\r\n":
                    if not data:
                        return
                    body += data[1:] if data.startswith(b".") else data
                with self.lock:
                    self.messages.append(bytes(body))
                if mode == "mute":
                    reader.read()
                    return
                # A little slow, so that concurrent deliveries overlap.
                time.sleep(0.2)
                client.sendall(b"250 2.0.0 OK saved\r\n" * recipients)
            elif verb == b"QUIT":
                client.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                client.sendall(b"250 2.0.0 OK\r\n")


@pytest.fixture(scope="module")
def fake_lmtp() -> Iterator[FakeLMTP]:
    fake = FakeLMTP()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def fake_mailplat(fake_lmtp: FakeLMTP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """mailplat with a one-second timeout and a single connection to the stand-in."""
    server = start_mailplat(
        tmp_path_factory.mktemp("fake"), lmtp_config(f"tcp:host=127.0.0.1:port={fake_lmtp.port}", "timeout = 1\nmax_connections = 1\n"),
    )
    yield server
    server.stop()


def test_a_silent_server_is_a_temporary_failure(fake_lmtp: FakeLMTP, fake_mailplat: MailplatServer) -> None:
    fake_lmtp.reset("silent")
    started = time.monotonic()
    code, text = send(fake_mailplat.port, ["alice@example.org"], message("to-a-silent-server"))
    assert (code, text) == (451, "4.3.0 mailbox server unavailable; try again later")
    assert time.monotonic() - started < 5
    assert "no reply within 1 seconds" in fake_mailplat.log()


def test_no_reply_after_the_message_is_a_temporary_failure(fake_lmtp: FakeLMTP, fake_mailplat: MailplatServer) -> None:
    fake_lmtp.reset("mute")
    code, text = send(fake_mailplat.port, ["alice@example.org"], message("to-a-mute-server"))
    assert code == 451, text
    assert "<alice@example.org>" in text and "no reply after the message" in text, text
    assert len(fake_lmtp.messages) == 1


def test_a_kept_connection_closed_by_the_server_is_replaced(fake_lmtp: FakeLMTP, fake_mailplat: MailplatServer) -> None:
    fake_lmtp.reset("close-kept")
    for n in range(2):
        assert send(fake_mailplat.port, ["alice@example.org"], message(f"kept-then-closed-{n}")) == (250, "")
    assert fake_lmtp.connections == 2
    assert [b"kept-then-closed-0" in m for m in fake_lmtp.messages] == [True, False]
    assert b"kept-then-closed-1" in fake_lmtp.messages[1]
    assert "kept LMTP connection was closed" in fake_mailplat.log()


def test_concurrent_deliveries_share_max_connections(fake_lmtp: FakeLMTP, fake_mailplat: MailplatServer) -> None:
    fake_lmtp.reset("normal")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda n: send(fake_mailplat.port, ["alice@example.org", "bob@example.org"], message(f"concurrent-{n}")), range(4),
        ))
    assert results == [(250, "")] * 4
    assert len(fake_lmtp.messages) == 4
    # max_connections = 1: the deliveries took turns on one connection.
    assert (fake_lmtp.connections, fake_lmtp.most_open) == (1, 1)
