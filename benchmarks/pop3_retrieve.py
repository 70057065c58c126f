#!/usr/bin/env python3
"""POP3 retrieval benchmark (Python 3.11+, standard library only).

Logs in to a POP3 server and, for one maildrop, retrieves every message
(RETR each, reading to the terminating ".") and then deletes them all (DELE
each, then QUIT so that the server commits). Each message is checked: its
size after un-dot-stuffing must equal the size LIST announced and, when this
tool wrote the maildir (--populate), its bytes must equal the file written.

Reports messages/s and MB/s (10^6 bytes of message content per second) of
the retrieval, wall seconds of each phase, the client's own CPU time and,
with --server-pid, the server's CPU time and memory (process tree read from
/proc).

    # fill a maildir, then measure a server that serves it (here: Dovecot)
    benchmarks/dovecot_pop3.sh start
    D=$(benchmarks/dovecot_pop3.sh dir)
    python3 benchmarks/pop3_retrieve.py --target 127.0.0.1:1110 --tls stls \\
        --user bench@bench.test --password bench-password \\
        --populate "$D/mail/bench.test/bench" --count 2000 --size 10240 \\
        --server-pid "$(benchmarks/dovecot_pop3.sh pids)"

    # start mailplat (twistd from the repository's .venv) and measure it
    python3 benchmarks/pop3_retrieve.py --start-mailplat --count 10 --size 10485760

    # the same with the mailbox in PostgreSQL: the rows are written into a
    # fresh schema (dropped after) as the postgres backend stores them
    python3 benchmarks/pop3_retrieve.py --start-mailplat --backend postgres \\
        --dsn "host=127.0.0.1 dbname=test user=postgres" --count 10 --size 10485760

Output is a small table, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    CLK_TCK, WORDS, process_tree, cpu_ticks, status_kb, PG_DEFAULT_DSN, MAILDIR_STORE, POSTGRES_STORE, python_of, PgHelper, postmaster_pid, find_command, pg_helper_main,
)


MAX_ERRORS_SHOWN = 5
RECV_SIZE = 256 * 1024
BENCH_USER = "bench@bench.test"
BENCH_PASSWORD = "bench-password"


class BenchError(Exception):
    """A protocol or verification failure: reported, exit status 1."""


# --------------------------------------------------------------------------
# The messages


SEQ_HEADER = b"X-Bench-Seq: "


def message_header(seq: int) -> bytes:
    """The header block of message `seq`: fixed width, so every message of a
    run has the same length. X-Bench-Seq lets the reader find which file a
    RETR returned, whatever order the server lists the messages in."""
    return (
        "Return-Path: <loadgen@example.net>\r\n"
        "From: Load Generator <loadgen@example.net>\r\n"
        f"To: <{BENCH_USER}>\r\n"
        f"Subject: pop3 benchmark message {seq:08d}\r\n"
        "Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{seq:08d}.pop3bench@loadgen.invalid>\r\n"
        f"X-Bench-Seq: {seq:08d}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()


def build_body(length: int, seed: int = 1) -> bytes:
    """`length` bytes of text lines of 60-76 characters, each ending in CRLF.
    Some lines start with '.', one is a lone '.' and one is '..', so the
    server's dot-stuffing and the end-of-message marker are exercised."""
    rng = random.Random(seed)
    pool: list[str] = []
    for _ in range(997):
        target = rng.randint(60, 76)
        words: list[str] = []
        cur = 0
        while cur <= target:
            w = rng.choice(WORDS)
            words.append(w)
            cur += len(w) + 1
        line = " ".join(words)[:target]
        pool.append(line[:-1] + "x" if line.endswith(" ") else line)
    lines: list[str] = []
    remaining = length
    n = 0
    while remaining > 0:
        if remaining <= 80:
            line = ("z" * (remaining - 2)) if remaining > 2 else ""
        elif n == 4:
            line = "."
        elif n == 9:
            line = ".."
        else:
            line = pool[n % len(pool)]
            if n % 37 == 3:
                line = "." + line[1:]
        lines.append(line)
        remaining -= len(line) + 2
        n += 1
    body = "".join(x + "\r\n" for x in lines).encode()
    assert len(body) == length, (len(body), length)
    return body


def min_size() -> int:
    return len(message_header(0)) + 3


# --------------------------------------------------------------------------
# --populate: write the maildir directly (fast, server-independent)

def maildir_host() -> str:
    # The maildir spec: '/' and ':' in the host name are encoded.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


def count_messages(maildir: Path) -> int:
    n = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as it:
                n += sum(1 for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            pass
    return n


def populate(maildir: Path, count: int, size: int, body: bytes) -> tuple[float, int]:
    """Write `count` messages of `size` bytes (CRLF line ends) as files
    tmp/NAME -> new/NAME, NAME = time.MusecPpidQn.host,S=size. Files and
    folders created here get the owner of the maildir folder (so a server
    whose mail processes run as `nobody` can read and delete them).
    Returns (seconds, bytes written)."""
    t0 = time.perf_counter()
    maildir.mkdir(parents=True, exist_ok=True)
    st = maildir.stat()
    chown = os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0)
    for sub in ("tmp", "new", "cur"):
        d = maildir / sub
        if not d.is_dir():
            d.mkdir()
            if chown:
                os.chown(d, st.st_uid, st.st_gid)
    existing = count_messages(maildir)
    if existing:
        raise SystemExit(f"{maildir} already holds {existing} messages in new/ or cur/; "
                         "--populate wants an empty maildir (the run deletes every message "
                         "in the maildrop)")
    now = time.time()
    stem = f"{int(now)}.M{int(now % 1 * 1e6):06d}P{os.getpid()}Q"
    host = maildir_host()
    tmp, new = maildir / "tmp", maildir / "new"
    written = 0
    for seq in range(count):
        data_head = message_header(seq)
        name = f"{stem}{seq}.{host},S={size}"
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data_head)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            if chown:
                os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)
        os.rename(tmp / name, new / name)
        written += len(data_head) + len(body)
    return time.perf_counter() - t0, written


# --------------------------------------------------------------------------
# The client

class POP3Client:
    """A minimal blocking POP3 client with a large receive buffer: reads a
    multi-line response in one pass, searching only the newly received bytes
    for CRLF.CRLF."""

    def __init__(self, host: str, port: int, tls: str, timeout: float):
        self.buf = bytearray()
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.context = ssl.create_default_context()
        self.context.check_hostname = False          # self-signed certificates
        self.context.verify_mode = ssl.CERT_NONE
        self.host = host
        if tls == "implicit":
            sock = self.context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.greeting = self.status()
        if tls == "stls":
            self.command(b"STLS")
            if self.buf:
                raise BenchError("server sent data after +OK to STLS")
            self.sock = self.context.wrap_socket(self.sock, server_hostname=host)

    def tls_info(self) -> str | None:
        if not isinstance(self.sock, ssl.SSLSocket):
            return None
        return f"{self.sock.version()} {self.sock.cipher()[0]}"

    def _fill(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise BenchError("connection closed by the server")
        self.buf += data

    def readline(self) -> bytes:
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            start = max(0, len(self.buf) - 1)
            self._fill()

    def status(self) -> bytes:
        line = self.readline()
        if not line.startswith(b"+OK"):
            raise BenchError(line.decode("ascii", "replace") or "empty reply")
        return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        try:
            return self.status()
        except BenchError as e:
            shown = line.split()[0] + (b" ..." if line.upper().startswith(b"PASS") else
                                       line[len(line.split()[0]):])
            raise BenchError(f"{shown.decode(errors='replace')}: {e}") from None

    def multiline(self) -> bytes:
        """The data of a multi-line response, still dot-stuffed, every line
        ending in CRLF, without the final '.' line."""
        while len(self.buf) < 3:
            self._fill()
        if self.buf[:3] == b".\r\n":
            del self.buf[:3]
            return b""
        start = 0
        while True:
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                with memoryview(self.buf) as view:
                    data = bytes(view[:i + 2])
                del self.buf[:i + 5]
                return data
            start = max(0, len(self.buf) - 4)
            self._fill()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def wait_closed(self, timeout: float) -> None:
        """After QUIT: read until the server closes the connection."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(RECV_SIZE):
                pass
        except (OSError, ssl.SSLError):
            pass


def unstuff(data: bytes) -> bytes:
    if b"\r\n.." in data:
        data = data.replace(b"\r\n..", b"\r\n.")
    if data.startswith(b".."):
        data = data[1:]
    return data


# --------------------------------------------------------------------------
# Server measurement from /proc (as in smtp_inbound.py)


def reset_hwm(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+, needs ptrace rights)."""
    ok = bool(pids)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


class ServerSnapshot:
    """CPU and memory of the process trees under the given PIDs.

    CPU = sum over live processes of utime+stime+cutime+cstime: a child that
    exits and is reaped moves its time into its parent's cutime/cstime, so the
    total survives process turnover (Dovecot's per-session pop3-login and pop3
    processes)."""

    def __init__(self, roots: list[int]):
        self.roots = roots
        self.pids = process_tree(roots)
        self.ticks = sum(cpu_ticks(p) for p in self.pids)
        self.rss_kb = sum(status_kb(p, "VmRSS") for p in self.pids)
        self.hwm_kb = sum(status_kb(p, "VmHWM") for p in self.pids)


class RSSSampler(threading.Thread):
    """Peak of the summed VmRSS and of the summed VmHWM of the tree."""

    def __init__(self, roots: list[int], interval: float):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.peak_rss_kb = 0
        self.peak_hwm_kb = 0
        self.stopping = threading.Event()

    def sample(self) -> None:
        pids = process_tree(self.roots)
        self.peak_rss_kb = max(self.peak_rss_kb, sum(status_kb(p, "VmRSS") for p in pids))
        self.peak_hwm_kb = max(self.peak_hwm_kb, sum(status_kb(p, "VmHWM") for p in pids))

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.sample()


def wait_session_processes_gone(roots: list[int], before: set[int], timeout: float) -> None:
    """After QUIT, wait until processes the server started for this session
    (Dovecot: pop3-login, pop3) have exited and been reaped, so that their CPU
    time shows up in their parent's cutime/cstime: until no process is new
    since before the login, or the new ones (Dovecot's auth process stays)
    have not changed for 0.2 s."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        new = set(process_tree(roots)) - before
        if not new:
            return
        if new != last:
            last, since = new, time.monotonic()
        elif time.monotonic() - since >= 0.2:
            return
        time.sleep(0.01)


# --------------------------------------------------------------------------
# --backend postgres: the database side runs in a helper process
#
# This script stays standard-library only: everything that needs psycopg
# runs in `PYTHON THIS_SCRIPT --pg-helper DSN SCHEMA`, where PYTHON is the
# interpreter of the twistd being measured (it has mailplat, hence psycopg).
# The helper reads one JSON request per line and answers one JSON line.

PG_CHUNK_SIZE = 1 << 20  # mailplat.backends.postgres.CHUNK_SIZE




def pg_populate(conn, schema: str, address: str, count: int, size: int) -> int:
    """Write `count` messages of `size` bytes for `address` as the postgres
    mailbox backend stores them (a messages row, its content in
    message_chunks rows of 1 MiB) in one transaction, by binary COPY.
    Returns the bytes written."""
    import uuid
    from psycopg import sql

    name = sql.Identifier(schema)
    body = build_body(size - len(message_header(0)))
    written = 0
    with conn.transaction(), conn.cursor() as cur:
        ids = [row[0] for row in cur.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
            (f"{schema}.messages", count))]
        with cur.copy(sql.SQL("COPY {}.messages (id, address, uid, size) FROM STDIN "
                              "(FORMAT BINARY)").format(name)) as copy:
            copy.set_types(["int8", "text", "text", "int8"])
            for message_id in ids:
                copy.write_row((message_id, address, uuid.uuid4().hex, size))
        with cur.copy(sql.SQL("COPY {}.message_chunks (message_id, seq, data) FROM STDIN "
                              "(FORMAT BINARY)").format(name)) as copy:
            copy.set_types(["int8", "int4", "bytea"])
            for seq, message_id in enumerate(ids):
                data = memoryview(message_header(seq) + body)
                for part, start in enumerate(range(0, len(data), PG_CHUNK_SIZE)):
                    copy.write_row((message_id, part, data[start:start + PG_CHUNK_SIZE]))
                written += len(data)
    return written


# --------------------------------------------------------------------------
# --start-mailplat

MAILPLAT_CONFIG = """\
hostname = "bench.test"
data_dir = "var"
domains = ["bench.test"]
[listen]
pop3 = "tcp:0:interface=127.0.0.1"
pop3s = "tcp:0:interface=127.0.0.1"
[tls]
certificate = "tls/cert.pem"
key = "tls/key.pem"
[login]
auth_failure_delay = 0
"""
LISTEN_RE = re.compile(r"(\w+) listening on [^\s:]+:(\d+)")


class MailplatServer:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="mailplat-bench-pop3-"))
        self.config = self.dir / "mailplat.toml"
        self.log = self.dir / "twistd.log"
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.pg: PgHelper | None = None

    def start(self):
        twistd = find_command("twistd", self.args.twistd)
        mailplat = self.args.mailplat
        if not mailplat:
            sibling = Path(twistd).parent / "mailplat"
            mailplat = str(sibling) if sibling.exists() else find_command("mailplat", None)
        store = MAILDIR_STORE
        if self.args.backend == "postgres":
            # A schema of our own, made by `mailplat user add` (the backend
            # migrates it) and dropped by stop().
            self.pg = PgHelper(python_of(twistd), self.args.dsn, "bench_" + secrets.token_hex(6), __file__)
            options = (f"dsn = {json.dumps(self.pg.call('conninfo'))}\n"
                       f'schema = "{self.pg.schema}"\npool_size = {self.args.pool_size}')
            store = POSTGRES_STORE.format(options=options)
        self.config.write_text(MAILPLAT_CONFIG + store)
        (self.dir / "tls").mkdir()
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-days", "2", "-subj", "/CN=bench.test",
                            "-keyout", str(self.dir / "tls/key.pem"),
                            "-out", str(self.dir / "tls/cert.pem")],
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise SystemExit("openssl could not make a certificate:\n"
                             + r.stderr.decode(errors="replace"))
        r = subprocess.run([mailplat, "--config", str(self.config), "user", "add",
                            self.args.user, "--password-stdin"],
                           input=(self.args.password + "\n").encode(),
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise SystemExit(f"`mailplat user add {self.args.user}` failed ({r.returncode}):\n"
                             + (r.stdout + r.stderr).decode(errors="replace"))
        logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "mailplat", "--config", str(self.config)],
            cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + self.args.start_timeout
        while True:
            self.ports = {name: int(port) for name, port in
                          LISTEN_RE.findall(self.log.read_text(errors="replace"))}
            if "pop3" in self.ports and "pop3s" in self.ports:
                return
            if self.proc.poll() is not None:
                self.fail(f"twistd exited with status {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                self.fail(f"no 'pop3 listening on' and 'pop3s listening on' lines within "
                          f"{self.args.start_timeout:g} s")
            time.sleep(0.05)

    def maildir(self, user: str) -> Path:
        local, _, domain = user.rpartition("@")
        return self.dir / "mail" / domain.lower() / local.lower()

    def fail(self, why: str):
        tail = self.log.read_text(errors="replace").splitlines()[-30:]
        self.stop()
        raise SystemExit(f"mailplat: {why}; last log lines:\n" + "\n".join(tail))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pg is not None:
            pg, self.pg = self.pg, None
            try:
                if self.args.keep:
                    print(f"kept the schema {pg.schema}", file=sys.stderr)
                else:
                    pg.call("drop")
            finally:
                pg.close()
        if self.args.keep:
            print(f"kept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class DovecotScript:
    """--server dovecot: benchmarks/dovecot_pop3.sh on a free port."""

    def __init__(self, args):
        self.args = args
        self.script = Path(__file__).resolve().parent / "dovecot_pop3.sh"
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.started = False

    def _run(self, cmd: str) -> str:
        r = subprocess.run(["sh", str(self.script), cmd, str(self.port)],
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"{self.script.name} {cmd} {self.port} failed:\n"
                             + (r.stdout + r.stderr).decode(errors="replace"))
        return r.stdout.decode().strip()

    def start(self) -> None:
        self.pid = int(self._run("start"))
        self.started = True
        self.dir = Path(self._run("dir"))

    def stop(self) -> None:
        if self.started:
            self.started = False
            self._run("stop")


# --------------------------------------------------------------------------
# The run

def retrieve_all(args, expected: dict | None, roots: list[int]) -> dict:
    """Log in, RETR every message, DELE every message, QUIT. `expected`:
    (header_len, body, count) when this tool wrote the maildir."""
    res: dict = {"errors": [], "error_count": 0}

    def error(what: str) -> None:
        res["error_count"] += 1
        if len(res["errors"]) < MAX_ERRORS_SHOWN:
            res["errors"].append(what)

    pids_idle = set(process_tree(roots)) if roots else set()
    db_roots = args.db_pid
    db_pids_idle = set(process_tree(db_roots)) if db_roots else set()
    idle = ServerSnapshot(roots) if roots else None
    if roots and not idle.pids:
        raise SystemExit(f"no such process: {roots}")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t_connect = time.perf_counter()
    client = POP3Client(args.host, args.port, args.tls, args.timeout)
    try:
        client.command(b"USER " + args.user.encode())
        client.command(b"PASS " + args.password.encode())
        t_login = time.perf_counter()
        res["tls_session"] = client.tls_info()
        # The server side of this session is measured from here on: login
        # (argon2id for mailplat, 64 MiB for a moment) is not part of it.
        hwm_reset = reset_hwm(process_tree(roots)) if roots else False
        before = ServerSnapshot(roots) if roots else None
        db_before = ServerSnapshot(db_roots) if db_roots else None
        sampler = RSSSampler(roots, args.sample_interval) if roots else None
        if sampler:
            sampler.sample()
            sampler.start()

        t0 = time.perf_counter()
        stat = client.command(b"STAT").split()
        client.command(b"LIST")
        sizes: list[int] = []
        for line in client.multiline().split(b"\r\n")[:-1]:
            number, size = line.split()[:2]
            if int(number) != len(sizes) + 1:
                raise BenchError(f"LIST: message numbers not 1..n: {line!r}")
            sizes.append(int(size))
        if int(stat[1]) != len(sizes) or int(stat[2]) != sum(sizes):
            error(f"STAT says {stat[1].decode()} messages, {stat[2].decode()} octets; "
                  f"LIST lists {len(sizes)}, {sum(sizes)} octets")
        if expected and len(sizes) != expected["count"]:
            error(f"the maildrop lists {len(sizes)} messages; {expected['count']} were written")
        received = 0
        seen: set[int] = set()
        for number, size in enumerate(sizes, 1):
            client.command(b"RETR %d" % number)
            data = unstuff(client.multiline())
            received += len(data)
            if len(data) != size:
                error(f"message {number}: LIST said {size} octets, RETR gave {len(data)}")
            if expected:
                i = data.find(SEQ_HEADER, 0, 1000)
                seq = int(data[i + len(SEQ_HEADER):i + len(SEQ_HEADER) + 8]) if i >= 0 else -1
                hlen, body = expected["header_len"], expected["body"]
                if seq < 0 or seq in seen:
                    error(f"message {number}: {'no' if seq < 0 else 'repeated'} X-Bench-Seq header")
                elif (len(data) != hlen + len(body) or not data.startswith(message_header(seq))
                      or not data.endswith(body)):
                    error(f"message {number} (file {seq}): {len(data)} octets differ from "
                          f"the {hlen + len(body)} octets written")
                if seq >= 0:
                    seen.add(seq)
        t1 = time.perf_counter()
        if expected and len(seen) != expected["count"]:
            error(f"retrieved {len(seen)} of the {expected['count']} messages written")

        if res["error_count"]:
            # Keep the maildrop as it is for a look: no DELE.
            client.command(b"QUIT")
            t2 = t3 = time.perf_counter()
            deleted = 0
        else:
            for number in range(1, len(sizes) + 1):
                client.command(b"DELE %d" % number)
            deleted = len(sizes)
            t2 = time.perf_counter()
            if sampler:
                sampler.sample()   # Dovecot's pop3 process exits at QUIT: read its VmHWM now
            client.command(b"QUIT")
            t3 = time.perf_counter()
        client.wait_closed(min(5.0, args.timeout))
    finally:
        client.close()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if roots:
        sampler.stop()
        wait_session_processes_gone(roots, pids_idle, 5.0)
        after = ServerSnapshot(roots)
    if db_roots:
        # The session's database connection (the maildrop lock) ends at
        # QUIT: once its backend is reaped, its time is in the postmaster's.
        wait_session_processes_gone(db_roots, db_pids_idle, 5.0)
        db_after = ServerSnapshot(db_roots)

    n = len(sizes)
    retrieve_s = t1 - t0
    res.update({
        "messages": n,
        "bytes": received,
        "deleted": deleted,
        "login_s": round(t_login - t_connect, 3),
        "retrieve_s": round(retrieve_s, 3),
        "delete_s": round(t2 - t1, 3),
        "quit_s": round(t3 - t2, 3),
        "wall_s": round(t3 - t0, 3),
        "msgs_per_s": round(n / retrieve_s, 1) if retrieve_s else None,
        "mb_per_s": round(received / retrieve_s / 1e6, 2) if retrieve_s else None,
        "msgs_per_s_with_delete": round(n / (t3 - t0), 1) if t3 > t0 else None,
        "client_user_s": round(cpu1.ru_utime - cpu0.ru_utime, 2),
        "client_sys_s": round(cpu1.ru_stime - cpu0.ru_stime, 2),
    })
    if roots:
        cpu = (after.ticks - before.ticks) / CLK_TCK
        res["server"] = {
            "pids": roots,
            "processes_during": len(before.pids),
            "cpu_s": round(cpu, 2),
            "cpu_percent": round(100 * cpu / (t3 - t0), 1) if t3 > t0 else None,
            "cpu_ms_per_msg": round(1000 * cpu / n, 3) if n else None,
            "rss_before_login_mb": round(idle.rss_kb / 1024, 1),
            "rss_after_login_mb": round(before.rss_kb / 1024, 1),
            "rss_after_quit_mb": round(after.rss_kb / 1024, 1),
            "rss_peak_sampled_mb": round(sampler.peak_rss_kb / 1024, 1),
            "hwm_mb": round(sampler.peak_hwm_kb / 1024, 1),
            "hwm_reset_after_login": hwm_reset,
        }
    if db_roots:
        db_cpu = (db_after.ticks - db_before.ticks) / CLK_TCK
        res["database"] = {
            "pids": db_roots,
            "processes_during": len(db_before.pids),
            "cpu_s": round(db_cpu, 2),
            "cpu_ms_per_msg": round(1000 * db_cpu / n, 3) if n else None,
        }
    return res


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="HOST:PORT", help="a POP3 server already running")
    where.add_argument("--start-mailplat", action="store_true",
                       help="start `twistd -n mailplat` with a temporary config and measure it")
    where.add_argument("--server", choices=["mailplat", "dovecot"],
                       help="mailplat = --start-mailplat; dovecot = start "
                            "benchmarks/dovecot_pop3.sh on a free port, measure it (STLS), "
                            "stop it")
    ap.add_argument("--user", help=f"login name (default {BENCH_USER} when this tool "
                                   "starts the server)")
    pw = ap.add_mutually_exclusive_group()
    pw.add_argument("--password", help="password (visible in ps; prefer --password-file)")
    pw.add_argument("--password-file", type=Path, help="file whose first line is the password")
    ap.add_argument("--tls", choices=["implicit", "stls", "none"],
                    help="implicit = POP3S, stls = STLS first, none = plain text; "
                         "certificates are not verified (default: implicit; stls with "
                         "--server dovecot)")
    ap.add_argument("--populate", "--maildir", dest="populate", type=Path, metavar="DIR",
                    help="before the run, write --count messages of --size bytes into the "
                         "maildir DIR (DIR/new); it must hold no messages yet. Default with "
                         "--start-mailplat / --server: the bench user's maildir")
    ap.add_argument("--count", "-n", type=int, default=2000, help="messages to write (2000)")
    ap.add_argument("--size", "-s", type=int, default=10240,
                    help="bytes per message, CRLF line ends (10240)")
    ap.add_argument("--server-pid", type=int, action="append", default=[],
                    help="server process to measure with its children; repeatable")
    ap.add_argument("--sample-interval", type=float, default=0.05,
                    help="seconds between RSS samples (0.05)")
    ap.add_argument("--timeout", type=float, default=120.0, help="socket timeout in seconds")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--label", default="", help="free text copied into the output")
    ap.add_argument("--twistd", help="twistd to run with --start-mailplat")
    ap.add_argument("--mailplat", help="mailplat admin command for --start-mailplat")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--keep", action="store_true", help="keep the --start-mailplat folder")
    ap.add_argument("--backend", choices=["maildir", "postgres"], default="maildir",
                    help="--start-mailplat: the [auth] and [mailbox] backends: passwd-file + "
                         "maildir, or postgres in a fresh schema dropped at the end (maildir)")
    ap.add_argument("--dsn", default=os.environ.get("MAILPLAT_BENCH_POSTGRES", PG_DEFAULT_DSN),
                    help="--backend postgres: libpq connection string "
                         f"($MAILPLAT_BENCH_POSTGRES, else {PG_DEFAULT_DSN!r})")
    ap.add_argument("--pool-size", type=int, default=10,
                    help="--backend postgres: pool_size = N (10)")
    ap.add_argument("--db-pid", type=int, action="append", default=[],
                    help="database process to measure with its children (CPU only); "
                         "repeatable; --backend postgres finds the local postmaster itself")
    args = ap.parse_args(argv)
    if args.server == "mailplat":
        args.start_mailplat, args.server = True, None
    starts = args.start_mailplat or args.server == "dovecot"
    if args.backend != "maildir":
        if not args.start_mailplat:
            ap.error("--backend is for --start-mailplat (or --server mailplat)")
        if args.populate:
            ap.error("--populate is a maildir; --backend postgres fills the database")
    if starts:
        args.user = args.user or BENCH_USER
        if args.password_file:
            args.password = read_password(ap, args.password_file)
        args.password = args.password or BENCH_PASSWORD
        if args.server == "dovecot" and (args.user, args.password) != (BENCH_USER, BENCH_PASSWORD):
            ap.error("--server dovecot has the user bench@bench.test, password bench-password")
        if args.server_pid:
            ap.error("--server-pid is for --target; a started server is measured anyway")
    else:
        host, sep, port = args.target.rpartition(":")
        if not sep or not port.isdigit():
            ap.error("--target must be HOST:PORT")
        args.host, args.port = host.strip("[]") or "127.0.0.1", int(port)
        if not args.user:
            ap.error("--target needs --user")
        if args.password_file:
            args.password = read_password(ap, args.password_file)
        if args.password is None:
            ap.error("--target needs --password or --password-file")
    if args.tls is None:
        args.tls = "stls" if args.server == "dovecot" else "implicit"
    if args.count < 0:
        ap.error("--count >= 0")
    if args.size < min_size():
        ap.error(f"--size must be at least {min_size()} (the headers)")
    return args


def read_password(ap, path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as e:
        ap.error(f"--password-file: {e}")
    return text.splitlines()[0] if text else ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pg-helper"]:
        return pg_helper_main(*argv[1:3], extra={"populate": pg_populate})
    args = parse_args(argv)
    server = None
    target_name = args.target
    pg = None
    try:
        if args.start_mailplat:
            server = MailplatServer(args)
            server.start()
            args.host = "127.0.0.1"
            args.port = server.ports["pop3s" if args.tls == "implicit" else "pop3"]
            args.server_pid = [server.proc.pid]
            pg = server.pg
            if pg is None:
                args.populate = args.populate or server.maildir(args.user)
            elif not args.db_pid:
                pid = postmaster_pid(pg)
                args.db_pid = [pid] if pid else []
            target_name = f"mailplat (--start-mailplat, {args.backend}, {args.tls})"
        elif args.server == "dovecot":
            server = DovecotScript(args)
            server.start()
            args.host, args.port = "127.0.0.1", server.port
            args.server_pid = [server.pid]
            args.populate = args.populate or server.dir / "mail/bench.test/bench"
            target_name = f"dovecot (dovecot_pop3.sh, {args.tls})"
        expected = None
        populate_s = None
        if args.populate or pg is not None:
            body = build_body(args.size - len(message_header(0)))
            if pg is None:
                populate_s, _ = populate(args.populate, args.count, args.size, body)
            else:
                # The same messages, as rows in the schema the server made.
                t0 = time.perf_counter()
                pg.call("populate", address=args.user.lower(), count=args.count, size=args.size)
                populate_s = time.perf_counter() - t0
            expected = {"header_len": args.size - len(body), "body": body, "count": args.count}
        try:
            res = retrieve_all(args, expected, args.server_pid)
        except (BenchError, OSError, ssl.SSLError) as e:
            res = {"error_count": 1, "errors": [f"{type(e).__name__}: {e}"]
                   if not isinstance(e, BenchError) else [str(e)], "fatal": True}
        left = None
        if not res.get("fatal"):
            if pg is not None:
                left = pg.call("count", address=args.user.lower())
            elif args.populate:
                left = count_messages(args.populate)
        if left and res.get("deleted"):
            res["error_count"] += 1
            res["errors"].append(f"{left} messages still in the "
                                 f"{'database' if pg else 'maildir'} after QUIT")
    finally:
        if server is not None:
            server.stop()

    result = {
        "label": args.label,
        "target": target_name,
        "tls": args.tls,
        "backend": args.backend if args.start_mailplat else None,
        "populated": args.count if expected else None,
        "size": args.size if expected else None,
        "populate_s": round(populate_s, 3) if populate_s is not None else None,
        **res,
        "left_in_maildir": left,   # in the database with --backend postgres
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if result["error_count"] == 0 else 1


def print_table(r: dict):
    rows = [("target", r["target"] + (f"  [{r['label']}]" if r["label"] else "")
             + (f", {r['tls_session']}" if r.get("tls_session") else ""))]
    if r["populated"] is not None:
        rows.append(("populated", f"{r['populated']} messages x {r['size']} bytes "
                                  f"in {r['populate_s']} s"))
    if "messages" in r:
        rows += [
            ("retrieved", f"{r['messages']} messages, {r['bytes']} bytes "
                          f"(login took {r['login_s']} s)"),
            ("throughput", f"{r['msgs_per_s']} msg/s, {r['mb_per_s']} MB/s "
                           f"(RETR phase: {r['retrieve_s']} s)"),
            ("wall", f"{r['wall_s']} s = STAT+LIST+RETR {r['retrieve_s']} s + "
                     f"DELE {r['delete_s']} s + QUIT {r['quit_s']} s "
                     f"({r['msgs_per_s_with_delete']} msg/s overall)"),
            ("client cpu", f"user {r['client_user_s']} s, sys {r['client_sys_s']} s"),
        ]
    if r["left_in_maildir"] is not None:
        where = "database" if r.get("backend") == "postgres" else "maildir"
        rows.append(("left", f"{r['left_in_maildir']} messages in the {where} after QUIT"))
    s = r.get("server")
    if s:
        rows += [
            ("server cpu", f"{s['cpu_s']} s ({s['cpu_percent']}% of one core, "
                           f"{s['cpu_ms_per_msg']} ms/msg), {s['processes_during']} processes"),
            ("server rss", f"{s['rss_before_login_mb']} MB before login, "
                           f"{s['rss_after_login_mb']} after, sampled peak "
                           f"{s['rss_peak_sampled_mb']}, {s['rss_after_quit_mb']} after QUIT; "
                           f"VmHWM sum {s['hwm_mb']} MB"
                           + (" (reset after login)" if s["hwm_reset_after_login"] else "")),
        ]
    d = r.get("database")
    if d:
        rows.append(("database cpu", f"{d['cpu_s']} s ({d['cpu_ms_per_msg']} ms/msg; the whole "
                                     f"server, {d['processes_during']} processes)"))
    rows.append(("errors", str(r["error_count"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for e in r["errors"]:
        print(f"  error: {e}")


if __name__ == "__main__":
    sys.exit(main())
