#!/usr/bin/env python3
r"""IMAP benchmark: mailplat against Debian's dovecot-imapd, same machine, same run.

(Python 3.11+, standard library only; mbsync for load c.)

Both servers get the same maildir contents (written once, copied to each),
listen on 127.0.0.1 and are reached over TLS (implicit, port "imaps"); the
clock starts after login unless the load says otherwise.  Each load runs
against one server, then the other, ``--rounds`` times (3), and the table
shows the median with the range over the rounds and the ratio
mailplat/Dovecot (for a rate, above 1 means mailplat is faster; for memory,
below 1 means mailplat uses less):

  a. fetch   login + SELECT + FETCH 1:* BODY[] of 2,000 messages of 10 KB
             (the clock includes the login), each byte checked
  b. flags   over a 10,000-message folder: FETCH 1:* FLAGS, 1,000 UID STORE
             +FLAGS (\Flagged) of single messages spread over it, pipelined
             50 deep, FETCH 1:* FLAGS to check, then the same with -FLAGS
             (--stores: each STORE of mailplat's maildir rewrites the
             folder's state, so 10,000 of them took half an hour)
  c. mbsync  mbsync's initial sync of the 10,000-message folder into an
             empty local maildir (the clock includes mbsync's own logins)
  d. idle    1,000 sessions logged in, SELECTed and in IDLE at once: the
             RSS (and PSS) summed over the server's processes, before and
             with them
  e. big     the RSS of the server, sampled every 50 ms, while one client
             fetches a 100 MB message (BODY[]): its peak above the RSS
             before the FETCH

mailplat is ``twistd -n mailplat`` with the default settings of its
listeners and the maildir store (the defaults of [imap], but
max_connections_per_user / per_ip raised for load d, as Dovecot's
mail_max_userip_connections is); Dovecot has its own base_dir, state and
log in the temp folder (``dovecot -F -c DIR/dovecot.conf``; /etc/dovecot is
never read), Debian's defaults but for the limits load d needs and
"high-performance" login processes (one imap-login process serves many
TLS connections instead of one process per connection, as Dovecot's docs
advise beyond a few hundred users).  As root, Dovecot's mail processes run
as nobody; otherwise as the caller.

    python3 benchmarks/imap_dovecot.py                    # every load, both servers
    python3 benchmarks/imap_dovecot.py --loads fetch,idle --rounds 1
    python3 benchmarks/imap_dovecot.py --only dovecot     # Dovecot alone (checks the script)

Options: --loads (fetch,flags,mbsync,idle,big), --rounds, --only
mailplat|dovecot, --twistd PATH, --dovecot PATH, --keep (keep the temp
folder), --json; the sizes: --fetch-count, --fetch-size, --flags-count,
--flags-size (2 KB), --stores, --pipeline, --idle-count, --big-size.
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import WORDS, find_command, process_tree, python_of, status_kb  # noqa: E402

USER = "bench@bench.test"
PASSWORD = "bench-password"
START_TIMEOUT = 30.0


# --- Dovecot ---------------------------------------------------------------------


def dovecot_config(root: Path, ports: dict[str, int], cert: Path, key: Path) -> str:
    """A complete dovecot.conf for an IMAP server living in ``root``."""
    if os.geteuid() == 0:
        users = "default_internal_user = dovecot\ndefault_login_user = dovenull\n"
    else:
        # Without root nothing can chroot or change owner: everything runs as us.
        me = pwd.getpwuid(os.getuid()).pw_name
        users = (
            f"default_internal_user = {me}\ndefault_login_user = {me}\n"
            f"default_internal_group = {grp.getgrgid(os.getgid()).gr_name}\n"
            "service anvil {\n  chroot =\n}\nservice imap-login {\n  chroot =\n}\n"
        )
    return f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = mailplat-imap-{ports["imaps"]}
protocols = imap
listen = 127.0.0.1
{users}first_valid_uid = 1
first_valid_gid = 0
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain login
mail_location = maildir:~
# Store messages as they came (CRLF), as mailplat does.
mail_save_crlf = yes
mail_max_userip_connections = 2000
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Archive {{
    special_use = \\Archive
    auto = subscribe
  }}
}}
default_client_limit = 4000
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {ports["imap"]}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ports["imaps"]}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = 2000
}}
service imap {{
  process_limit = 2000
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mail_owner() -> tuple[int, int]:
    """Who owns the maildirs: nobody under root (Dovecot never delivers as root), else us."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    return os.getuid(), os.getgid()


def chown_tree(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() != 0:
        return
    for folder, dirs, files in os.walk(path):
        os.chown(folder, uid, gid)
        for name in files:
            os.chown(os.path.join(folder, name), uid, gid)


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(100).startswith(b"* OK")
    except OSError:
        return False


class Dovecot:
    """A throwaway Dovecot IMAP server in ``root``: users (address -> password), maildirs in root/mail/DOMAIN/LOCAL."""

    name = "Dovecot"

    def __init__(self, root: Path, users: dict[str, str], cert: Path, key: Path, program: str | None = None) -> None:
        self.root = root
        self.program = program or shutil.which("dovecot") or "/usr/sbin/dovecot"
        self.ports = {"imap": free_port(), "imaps": free_port()}
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        for sub in ("run", "state", "mail"):
            (root / sub).mkdir(exist_ok=True)
        uid, gid = mail_owner()
        lines = []
        for address, password in users.items():
            local, domain = address.split("@")
            home = root / "mail" / domain / local
            home.mkdir(parents=True, exist_ok=True)
            lines.append(f"{address}:{{PLAIN}}{password}:{uid}:{gid}::{home}::\n")
        chown_tree(root / "mail", uid, gid)
        (root / "users").write_text("".join(lines))
        (root / "users").chmod(0o644)
        (root / "dovecot.conf").write_text(dovecot_config(root, self.ports, cert, key))

    def maildir(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.root / "mail" / domain / local

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Dovecot:
        if not os.access(self.program, os.X_OK) or not os.path.exists("/usr/lib/dovecot/imap"):
            raise SystemExit("Dovecot's IMAP server is not installed: apt-get install -y dovecot-imapd")
        chown_tree(self.root / "mail", *mail_owner())
        out = open(self.root / "dovecot.out", "wb")
        self.process = subprocess.Popen(
            [self.program, "-F", "-c", str(self.root / "dovecot.conf")], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
        out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not greets(self.ports["imap"]):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dovecot did not start:\n{(self.root / 'dovecot.out').read_text(errors='replace')}\n{self.log()}")
            time.sleep(0.05)
        return self

    def pids(self) -> list[int]:
        return process_tree([self.process.pid]) if self.process else []

    def version(self) -> str:
        found = subprocess.run([self.program, "--version"], capture_output=True, text=True, timeout=30)
        return found.stdout.split()[0] if found.stdout else "?"

    def stop(self) -> None:
        stop(self.process)
        self.process = None


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after ten seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def memory_kb(root: int) -> tuple[int, int]:
    """(RSS, PSS) summed over a server's process tree, in KiB (RSS counts shared pages once per process)."""
    pids = process_tree([root])
    return sum(status_kb(p, "VmRSS") for p in pids), sum(pss_kb(p) for p in pids)


# --- mailplat ----------------------------------------------------------------------

MAILPLAT_CONFIG = """\
hostname = "mail.bench.test"
data_dir = "var"
domains = ["bench.test"]

[listen]
imap = "tcp:0:interface=127.0.0.1"
imaps = "tcp:0:interface=127.0.0.1"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
backend = "passwd-file"
path = "users.passwd"
# {{PLAIN}} as for Dovecot: a login costs what the protocol costs, not a password hash.
allow_plain = true

[mailbox]
backend = "maildir"
path = "mail"

[imap]
# Load d holds 1,000 sessions of one user from one address.
max_connections = 2000
max_connections_per_ip = 2000
max_connections_per_user_ip = 2000
"""

LISTEN_RE = re.compile(r"(\w+) listening on [^\s:]+:(\d+)")


class Mailplat:
    """``twistd -n mailplat`` in ``root``, maildirs in root/mail/DOMAIN/LOCAL."""

    name = "mailplat"

    def __init__(self, root: Path, users: dict[str, str], cert: Path, key: Path, twistd: str) -> None:
        self.root = root
        self.twistd = twistd
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)
        (root / "mailplat.toml").write_text(MAILPLAT_CONFIG.format(cert=cert, key=key))
        (root / "users.passwd").write_text("".join(f"{a}:{{PLAIN}}{p}\n" for a, p in users.items()))
        for address in users:
            self.maildir(address).mkdir(parents=True, exist_ok=True)

    def maildir(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.root / "mail" / domain / local

    def log(self) -> str:
        path = self.root / "twistd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Mailplat:
        log = open(self.root / "twistd.log", "wb")
        self.process = subprocess.Popen(
            [self.twistd, "-n", "--pidfile=", "mailplat", "--config", str(self.root / "mailplat.toml")],
            cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not {"imap", "imaps"} <= set(self.ports):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log().splitlines()[-30:])
                self.stop()
                raise SystemExit(f"mailplat did not start (no 'imaps listening on' line):\n{tail}")
            time.sleep(0.05)
            self.ports = {name: int(port) for name, port in LISTEN_RE.findall(self.log())}
        return self

    def pids(self) -> list[int]:
        return process_tree([self.process.pid]) if self.process else []

    def version(self) -> str:
        """The commit of the checkout the benchmark runs from (mailplat's code is the repository's)."""
        found = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=30,
        )
        return found.stdout.strip() or "?"

    def stop(self) -> None:
        stop(self.process)
        self.process = None


# --- the messages ---------------------------------------------------------------------


def make_message(index: int, size: int) -> bytes:
    """A message of exactly ``size`` octets (CRLF lines) that says which it is in X-Bench-Index."""
    header = (
        f"From: <sender@remote.test>\r\nTo: <bench@bench.test>\r\nSubject: benchmark message {index:08d}\r\n"
        f"Message-ID: <{index:08d}.bench@remote.test>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nX-Bench-Index: {index:08d}\r\n\r\n"
    ).encode()
    body = bytearray()
    n = 0
    while len(header) + len(body) < size:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 70:
            words.append(WORDS[(index * 7 + n * 13 + len(words)) % len(WORDS)])
            n += 1
        body += " ".join(words).encode() + b"\r\n"
    raw = header + bytes(body)
    raw = raw[:size - 2] + b"\r\n" if len(raw) > size else raw
    return raw


def write_maildir(folder: Path, count: int, size: int) -> None:
    """``count`` messages in cur/ with no flags (":2,"), as a maildir reader leaves them once seen as present."""
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    stamp = 1796000000
    for i in range(count):
        (folder / "cur" / f"{stamp + i}.M{i}P1.bench:2,").write_bytes(make_message(i, size))


def write_big(folder: Path, size: int) -> str:
    """One message of ``size`` octets, written in pieces; its SHA-256."""
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    head = make_message(0, 4096)
    line = b"x" * 998 + b"\r\n"
    with open(folder / "cur" / "1796000000.M0P1.big:2,", "wb") as f:
        for piece in (head,) + (line,) * ((size - len(head)) // len(line)):
            f.write(piece)
            digest.update(piece)
        rest = b"y" * ((size - len(head)) % len(line))
        if rest:
            rest = rest[:-2] + b"\r\n" if len(rest) >= 2 else b"\r\n"[:len(rest)]
            f.write(rest)
            digest.update(rest)
    return digest.hexdigest()


# --- an IMAP client ---------------------------------------------------------------------------


class IMAPError(Exception):
    pass


class Session:
    """One IMAP session over TLS, blocking, commands pipelined when asked; literals go to ``sink``."""

    def __init__(self, port: int, cafile: Path) -> None:
        context = ssl.create_default_context(cafile=str(cafile))
        context.check_hostname = False  # we connect to 127.0.0.1; the certificate itself is checked
        raw = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock = context.wrap_socket(raw, server_hostname="mail.bench.test")
        self.file = self.sock.makefile("rb", buffering=65536)
        self.tag = 0
        greeting = self.file.readline()
        if not greeting.startswith(b"* OK"):
            raise IMAPError(f"greeting {greeting!r}")

    def send(self, command: str) -> str:
        self.tag += 1
        tag = f"b{self.tag}"
        self.sock.sendall(f"{tag} {command}\r\n".encode())
        return tag

    def response(self, sink: Callable[[bytes], None] | None = None) -> tuple[bytes, list[bytes]]:
        """One response (a line with its literals): the text with each literal as {n}, and the literals (unless sunk)."""
        text = b""
        literals: list[bytes] = []
        while True:
            line = self.file.readline()
            if not line:
                raise IMAPError("connection closed")
            text += line
            m = re.search(rb"\{(\d+)\}\r\n$", line)
            if not m:
                return text, literals
            left = int(m.group(1))
            if sink is None:
                data = self.file.read(left)
                if len(data) != left:
                    raise IMAPError("connection closed in a literal")
                literals.append(data)
            else:
                while left:
                    chunk = self.file.read(min(left, 1 << 20))
                    if not chunk:
                        raise IMAPError("connection closed in a literal")
                    sink(chunk)
                    left -= len(chunk)

    def until(self, tag: str, sink: Callable[[bytes], None] | None = None) -> list[tuple[bytes, list[bytes]]]:
        """The untagged responses up to ``tag``'s completion, which must be OK."""
        found: list[tuple[bytes, list[bytes]]] = []
        while True:
            text, literals = self.response(sink)
            if text.startswith(tag.encode() + b" "):
                if not text[len(tag) + 1:].startswith(b"OK"):
                    raise IMAPError(f"{text!r}")
                return found
            found.append((text, literals))

    def command(self, command: str, sink: Callable[[bytes], None] | None = None) -> list[tuple[bytes, list[bytes]]]:
        return self.until(self.send(command), sink)

    def login(self, user: str, password: str) -> None:
        self.command(f'LOGIN "{user}" "{password}"')

    def close(self) -> None:
        try:
            self.command("LOGOUT")
        except (IMAPError, OSError):
            pass
        self.file.close()
        self.sock.close()


# --- the loads -------------------------------------------------------------------------------


FETCH_USER, FLAGS_USER, IDLE_USER, BIG_USER = "fetch@bench.test", "flags@bench.test", "idle@bench.test", "big@bench.test"
USERS = {u: PASSWORD for u in (FETCH_USER, FLAGS_USER, IDLE_USER, BIG_USER)}


class Bench:
    def __init__(self, args: argparse.Namespace, cert: Path, expected: dict[str, bytes], big_digest: str) -> None:
        self.args = args
        self.cert = cert
        self.expected = expected  # X-Bench-Index -> bytes, of the fetch set
        self.big_digest = big_digest
        self.idle_baseline: dict[str, tuple[int, int]] = {}

    def fetch(self, server: Mailplat | Dovecot) -> dict[str, float]:
        session = Session(server.ports["imaps"], self.cert)
        begin = time.perf_counter()
        session.login(FETCH_USER, PASSWORD)
        session.command("SELECT INBOX")
        responses = session.command("FETCH 1:* (BODY[])")
        elapsed = time.perf_counter() - begin
        session.close()
        got = [literals[0] for _, literals in responses if literals]
        if len(got) != self.args.fetch_count:
            raise SystemExit(f"{server.name}: FETCH returned {len(got)} messages, not {self.args.fetch_count}")
        for body in got:
            m = re.search(rb"\r\nX-Bench-Index: (\d+)\r\n", body)
            if not m or self.expected.get(m.group(1).decode()) != body:
                raise SystemExit(f"{server.name}: a fetched message differs from the one stored")
        octets = sum(map(len, got))
        return {"s": elapsed, "msg/s": len(got) / elapsed, "MB/s": octets / elapsed / 1e6}

    def flags(self, server: Mailplat | Dovecot) -> dict[str, float]:
        session = Session(server.ports["imaps"], self.cert)
        session.login(FLAGS_USER, PASSWORD)
        session.command("SELECT INBOX")
        count = self.args.flags_count
        depth = self.args.pipeline
        begin = time.perf_counter()
        commands = 0
        stored = 0
        for how in ("+", "-"):
            before = session.command("FETCH 1:* (FLAGS)")
            uids = [int(m.group(1)) for text, _ in before for m in [re.search(rb"UID (\d+)", text)] if m]
            if not uids:
                # FETCH FLAGS names no UID: ask for them.
                before = session.command("FETCH 1:* (UID FLAGS)")
                uids = [int(m.group(1)) for text, _ in before for m in [re.search(rb"UID (\d+)", text)] if m]
            if len(uids) != count:
                raise SystemExit(f"{server.name}: FETCH FLAGS saw {len(uids)} messages, not {count}")
            commands += 1
            # --stores messages spread over the folder, one STORE each.
            targets = uids[::max(1, count // self.args.stores)][:self.args.stores]
            for at in range(0, len(targets), depth):
                tags = [session.send(f"UID STORE {uid} {how}FLAGS (\\Flagged)") for uid in targets[at:at + depth]]
                for tag in tags:
                    session.until(tag)
                commands += len(tags)
            stored += len(targets)
            after = session.command("FETCH 1:* (FLAGS)")
            commands += 1
            flagged = sum(b"\\Flagged" in text for text, _ in after)
            if flagged != (len(targets) if how == "+" else 0):
                raise SystemExit(f"{server.name}: {flagged} of {count} messages are \\Flagged after {how}FLAGS of {len(targets)}")
        elapsed = time.perf_counter() - begin
        session.close()
        return {"s": elapsed, "commands/s": commands / elapsed, "ms/STORE": 1000 * elapsed / stored}

    def mbsync(self, server: Mailplat | Dovecot, work: Path) -> dict[str, float]:
        home = work / f"mbsync-{server.name}"
        shutil.rmtree(home, ignore_errors=True)
        (home / "Mail").mkdir(parents=True)
        rc = home / "mbsyncrc"
        rc.write_text(
            f"IMAPAccount bench\nHost 127.0.0.1\nPort {server.ports['imaps']}\nUser {FLAGS_USER}\nPass {PASSWORD}\n"
            f"SSLType IMAPS\nCertificateFile {self.cert}\n\nIMAPStore remote\nAccount bench\n\n"
            f"MaildirStore local\nPath {home}/Mail/\nInbox {home}/Mail/INBOX\n\n"
            "Channel bench\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSync Pull\nSyncState *\n"
        )
        begin = time.perf_counter()
        result = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True, timeout=3600, env={**os.environ, "HOME": str(home)})
        elapsed = time.perf_counter() - begin
        if result.returncode != 0:
            raise SystemExit(f"{server.name}: mbsync exited {result.returncode}:\n{result.stdout}{result.stderr}")
        got = sum(len(os.listdir(home / "Mail" / "INBOX" / sub)) for sub in ("cur", "new"))
        shutil.rmtree(home, ignore_errors=True)
        if got != self.args.flags_count:
            raise SystemExit(f"{server.name}: mbsync fetched {got} messages, not {self.args.flags_count}")
        return {"s": elapsed, "msg/s": got / elapsed}

    def idle(self, server: Mailplat | Dovecot) -> dict[str, float]:
        root = server.process.pid if server.process else 0
        # "Before" is before the first round: a Python process keeps the memory a round
        # took, and Dovecot's processes of the last round may still be exiting.
        if server.name not in self.idle_baseline:
            time.sleep(1)
            self.idle_baseline[server.name] = memory_kb(root)
        rss0, pss0 = self.idle_baseline[server.name]
        sessions: list[Session] = []
        lock = threading.Lock()
        failures: list[str] = []

        def open_some(n: int) -> None:
            for _ in range(n):
                try:
                    s = Session(server.ports["imaps"], self.cert)
                    s.login(IDLE_USER, PASSWORD)
                    s.command("SELECT INBOX")
                    s.send("IDLE")
                    line = s.file.readline()
                    if not line.startswith(b"+"):
                        raise IMAPError(f"IDLE: {line!r}")
                except (IMAPError, OSError) as e:
                    with lock:
                        failures.append(str(e))
                    return
                with lock:
                    sessions.append(s)

        count = self.args.idle_count
        threads = [threading.Thread(target=open_some, args=(count // 20 + (i < count % 20),)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if failures or len(sessions) != count:
                raise SystemExit(f"{server.name}: {len(sessions)} of {count} sessions in IDLE; first failures: {failures[:3]}")
            time.sleep(2)  # let the server settle
            rss, pss = memory_kb(root)
        finally:
            for s in sessions:
                try:
                    s.sock.sendall(b"DONE\r\n")
                except OSError:
                    pass
                s.close()
        return {
            "RSS before MB": rss0 / 1024, "RSS MB": rss / 1024, "PSS before MB": pss0 / 1024, "PSS MB": pss / 1024,
            "PSS KB/session": (pss - pss0) / count,
        }

    def big(self, server: Mailplat | Dovecot) -> dict[str, float]:
        root = server.process.pid if server.process else 0
        session = Session(server.ports["imaps"], self.cert)
        session.login(BIG_USER, PASSWORD)
        session.command("SELECT INBOX")
        time.sleep(0.5)
        rss0, _ = memory_kb(root)
        peak = [rss0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], memory_kb(root)[0])

        sampler = threading.Thread(target=sample)
        sampler.start()
        digest = hashlib.sha256()
        begin = time.perf_counter()
        try:
            session.command("FETCH 1 (BODY[])", sink=digest.update)
        finally:
            done.set()
            sampler.join()
        elapsed = time.perf_counter() - begin
        session.close()
        if digest.hexdigest() != self.big_digest:
            raise SystemExit(f"{server.name}: the 100 MB message came back different")
        return {"RSS before MB": rss0 / 1024, "RSS peak MB": peak[0] / 1024, "growth MB": (peak[0] - rss0) / 1024, "MB/s": self.args.big_size / elapsed / 1e6}


# Which figure of each load the ratio is taken on, and whether more is better.
HEADLINE = {"fetch": ("msg/s", True), "flags": ("commands/s", True), "mbsync": ("msg/s", True), "idle": ("PSS MB", False), "big": ("growth MB", False)}
LOADS = tuple(HEADLINE)


def warm_up(server: Mailplat | Dovecot, cert: Path) -> None:
    """One SELECT of every folder, so that neither server is timed building its index (Dovecot) or UID list (mailplat)."""
    for user in USERS:
        session = Session(server.ports["imaps"], cert)
        session.login(user, PASSWORD)
        session.command("SELECT INBOX")
        session.command("FETCH 1:* (FLAGS)")
        session.close()


def number(x: float) -> str:
    """Three significant digits, thousands separated."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(results: dict[str, dict[str, dict[str, list[float]]]], names: list[str]) -> str:
    lines = []
    header = f"{'load':8} {'figure':14}" + "".join(f" {n + ' (median [range])':>30}" for n in names)
    if len(names) == 2:
        header += f" {'mailplat/Dovecot':>17}"
    lines.append(header)
    for load, per_server in results.items():
        figures = list(next(iter(per_server.values())))
        for figure in figures:
            row = f"{load:8} {figure:14}"
            medians = []
            for name in names:
                values = per_server[name][figure]
                median = statistics.median(values)
                medians.append(median)
                row += f" {f'{number(median)} [{number(min(values))}-{number(max(values))}]':>30}"
            if len(names) == 2 and medians[1]:
                row += f" {medians[0] / medians[1]:>17.2f}"
            if figure == HEADLINE[load][0]:
                row += "  <- " + ("higher is better" if HEADLINE[load][1] else "lower is better")
            lines.append(row)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("mailplat", "dovecot"))
    parser.add_argument("--twistd")
    parser.add_argument("--dovecot")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fetch-count", type=int, default=2000)
    parser.add_argument("--fetch-size", type=int, default=10 * 1024)
    parser.add_argument("--flags-count", type=int, default=10000)
    parser.add_argument("--flags-size", type=int, default=2 * 1024)
    parser.add_argument("--stores", type=int, default=1000)
    parser.add_argument("--pipeline", type=int, default=50)
    parser.add_argument("--idle-count", type=int, default=1000)
    parser.add_argument("--big-size", type=int, default=100 * 1000 * 1000)
    args = parser.parse_args()
    loads = [x for x in args.loads.split(",") if x]
    unknown = set(loads) - set(LOADS)
    if unknown:
        parser.error(f"unknown loads {sorted(unknown)}; choose from {','.join(LOADS)}")
    if "mbsync" in loads and shutil.which("mbsync") is None:
        raise SystemExit("load mbsync needs mbsync: apt-get install -y isync")
    # A SIGTERM (or an interrupt from a job without SIGINT) still stops both servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # 1,000 sessions, each a socket on both sides.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    work = Path(tempfile.mkdtemp(prefix="mailplat-bench-imap-"))
    work.chmod(0o755)
    servers: list[Mailplat | Dovecot] = []
    try:
        cert, key = work / "cert.pem", work / "key.pem"
        # mailplat's own self-signed certificate (as the tests use): with no CA:TRUE, mbsync
        # trusts it as an exact match of its CertificateFile whatever the host name.
        twistd = find_command("twistd", args.twistd)
        made = subprocess.run(
            [python_of(twistd), "-c", "import sys; from mailplat.tls import make_self_signed; make_self_signed(*sys.argv[1:])",
             "mail.bench.test", str(cert), str(key)], capture_output=True, timeout=60,
        )
        if made.returncode != 0:
            raise SystemExit("could not make a certificate:\n" + made.stderr.decode(errors="replace"))
        key.chmod(0o644)  # Dovecot's processes read it as their own users
        print(f"writing the maildirs in {work}/source ...", file=sys.stderr)
        source = work / "source"
        write_maildir(source / FETCH_USER, args.fetch_count, args.fetch_size)
        write_maildir(source / FLAGS_USER, args.flags_count, args.flags_size)
        write_maildir(source / IDLE_USER, 10, 2048)
        big_digest = write_big(source / BIG_USER, args.big_size)
        expected = {f"{i:08d}": make_message(i, args.fetch_size) for i in range(args.fetch_count)}
        if args.only != "dovecot":
            servers.append(Mailplat(work / "mailplat", USERS, cert, key, twistd))
        if args.only != "mailplat":
            servers.append(Dovecot(work / "dovecot", USERS, cert, key, args.dovecot))
        for server in servers:
            for user in USERS:
                shutil.rmtree(server.maildir(user), ignore_errors=True)
                shutil.copytree(source / user, server.maildir(user))
            server.start()
            warm_up(server, cert)
        shutil.rmtree(source, ignore_errors=True)
        bench = Bench(args, cert, expected, big_digest)
        results: dict[str, dict[str, dict[str, list[float]]]] = {}
        for load in loads:
            results[load] = {s.name: {} for s in servers}
            for round_ in range(args.rounds):
                # Alternate who goes first: the second gets warmer caches.
                for server in servers if round_ % 2 == 0 else servers[::-1]:
                    print(f"{load} round {round_ + 1}: {server.name}", file=sys.stderr)
                    figures = bench.mbsync(server, work) if load == "mbsync" else getattr(bench, load)(server)
                    for figure, value in figures.items():
                        results[load][server.name].setdefault(figure, []).append(value)
        names = [s.name for s in servers]
        versions = {s.name: s.version() for s in servers}
        if args.json:
            print(json.dumps({"servers": versions, "rounds": args.rounds, "results": results}))
        else:
            print("; ".join(f"{name} {version}" for name, version in versions.items()) + f"; median of {args.rounds} rounds [range]")
            print(table(results, names))
        return 0
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
