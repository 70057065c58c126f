#!/usr/bin/env python3
"""SMTP inbound load generator (Python 3.11+, standard library only).

N concurrent clients each open one SMTP session (EHLO once) and send M
messages of S bytes to one recipient. When the server advertises PIPELINING,
MAIL FROM + RCPT TO + DATA go out in one write and the three replies are
awaited together (as Postfix's smtp-source does); then the pre-built,
dot-stuffed body and the final CRLF.CRLF are written and the 250 awaited.

Latency of one message = from writing MAIL FROM to reading the final reply
after the body. Reports messages, errors, wall time, messages/s, MB/s
(10^6 bytes of message content per second), latency percentiles, the
generator's own CPU time and, with --server-pid, the server's CPU time and
memory (process tree read from /proc).

    python3 benchmarks/smtp_inbound.py --target 127.0.0.1:2525 \\
        --clients 50 --messages 20 --size 1024 --rcpt u@bench.test \\
        --server-pid "$(benchmarks/postfix_maildir.sh pids)"

    python3 benchmarks/smtp_inbound.py --start-mailplat --clients 50 --messages 20

    # the same with users and mail in PostgreSQL (a fresh schema, dropped after)
    python3 benchmarks/smtp_inbound.py --start-mailplat --backend postgres \\
        --dsn "host=127.0.0.1 dbname=test user=postgres" --clients 50 --messages 20

Output is a small table, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    CLK_TCK, WORDS, _read, process_tree, cpu_ticks, status_kb, PG_DEFAULT_DSN, MAILDIR_STORE, POSTGRES_STORE, python_of, PgHelper, postmaster_pid, find_command, pg_helper_main,
)


MAX_ERRORS_SHOWN = 5


# --------------------------------------------------------------------------
# The message


def build_message(size: int, sender: str, rcpt: str, seed: int = 1) -> tuple[bytes, bytes, int]:
    """Return (header block before Message-ID, dot-stuffed body ending in
    CRLF.CRLF, content size). Content (before stuffing) is `size` bytes when
    size leaves room for the headers; every line ends in CRLF and no line is
    longer than 78 characters. A few body lines start with '.', so the
    server's un-stuffing is exercised."""
    rng = random.Random(seed)
    head = (
        f"From: Load Generator <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: benchmark message of {size} bytes\r\n"
        "Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
    ).encode()
    # Per-message header, fixed width: "Message-ID: <%08d.%06d@loadgen.invalid>\r\n"
    msgid_len = len(message_id_header(0, 0))
    remaining = size - len(head) - msgid_len - 2  # 2: blank line after headers
    lines: list[str] = []
    n = 0
    while remaining > 0:
        n += 1
        if remaining <= 80:
            length = max(remaining - 2, 1)
        else:
            length = rng.randint(60, 76)
        words: list[str] = []
        cur = 0
        while cur <= length:  # join is cur - 1 characters long
            w = rng.choice(WORDS)
            words.append(w)
            cur += len(w) + 1
        line = " ".join(words)[:length]
        if line.endswith(" "):
            line = line[:-1] + "x"
        if n % 37 == 3:  # dot at line start: must be stuffed on the wire
            line = "." + line[1:]
        lines.append(line)
        remaining -= len(line) + 2
    if not lines:
        lines.append("x")
    content_size = len(head) + msgid_len + 2 + sum(len(x) + 2 for x in lines)
    stuffed = "".join(("." + x if x.startswith(".") else x) + "\r\n" for x in lines)
    body = b"\r\n" + stuffed.encode() + b".\r\n"
    return head, body, content_size


def message_id_header(client: int, seq: int) -> bytes:
    return b"Message-ID: <%08d.%06d@loadgen.invalid>\r\n" % (seq, client)


# --------------------------------------------------------------------------
# The client

class SMTPClient(asyncio.Protocol):
    """Collects complete replies; minimal parsing (code + last line)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.cont: list[bytes] = []  # continuation lines of the reply being read
        self.replies: list[tuple[int, bytes, list[bytes]]] = []
        self.need = 0
        self.waiter: asyncio.Future | None = None
        self.waiting_since = 0.0  # monotonic time a wait began; 0 = not waiting
        self.lost: BaseException | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\r\n")
        self.buf = lines.pop()
        for line in lines:
            if len(line) > 3 and line[3] == 45:  # b"-": continuation
                self.cont.append(line)
                continue
            try:
                code = int(line[:3])
            except ValueError:
                code = 0
            self.replies.append((code, line, self.cont))
            if self.cont:
                self.cont = []
        if self.waiter is not None and len(self.replies) >= self.need:
            waiter, self.waiter = self.waiter, None
            self.waiting_since = 0.0
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc):
        self.lost = exc or ConnectionError("connection closed by server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)
            self.waiter = None

    def abort(self, exc: BaseException):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
            self.waiter = None
        if self.transport is not None:
            self.transport.abort()

    async def replies_n(self, n: int) -> list[tuple[int, bytes, list[bytes]]]:
        if len(self.replies) < n:
            if self.lost is not None:
                raise self.lost
            self.need = n
            self.waiter = self.loop.create_future()
            self.waiting_since = time.monotonic()
            await self.waiter
        got = self.replies[:n]
        del self.replies[:n]
        return got


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.clients_failed = 0
        self.idle_probe_ms: list[float] = []
        self.db_cpu_s: float | None = None
        self.db_processes = 0

    def error(self, client: int, what: str):
        self.errors += 1
        if len(self.error_samples) < MAX_ERRORS_SHOWN:
            self.error_samples.append(f"client {client}: {what}")


def reply_text(reply) -> str:
    return reply[1].decode("ascii", "replace")


async def run_client(idx: int, args, head: bytes, body: bytes, stats: Stats,
                     clients: list[SMTPClient]):
    loop = asyncio.get_running_loop()
    host, port = args.host, args.port
    try:
        _, proto = await loop.create_connection(lambda: SMTPClient(loop), host, port)
    except OSError as e:
        stats.error(idx, f"connect: {e}")
        stats.clients_failed += 1
        return
    clients.append(proto)
    write = proto.transport.write
    writelines = proto.transport.writelines
    try:
        (banner,) = await proto.replies_n(1)
        if banner[0] != 220:
            stats.error(idx, f"banner: {reply_text(banner)}")
            stats.clients_failed += 1
            return
        write(b"EHLO %s\r\n" % args.helo.encode())
        (ehlo,) = await proto.replies_n(1)
        if ehlo[0] != 250:
            stats.error(idx, f"EHLO: {reply_text(ehlo)}")
            stats.clients_failed += 1
            return
        pipelining = (not args.no_pipelining) and any(
            l[4:].upper().startswith(b"PIPELINING") for l in ehlo[2] + [ehlo[1]])
        mail = b"MAIL FROM:<%s>\r\n" % args.sender.encode()
        rcpt = b"RCPT TO:<%s>\r\n" % args.rcpt.encode()
        envelope = mail + rcpt + b"DATA\r\n"
        lat = stats.latencies
        perf = time.perf_counter
        for seq in range(args.messages):
            t0 = perf()
            if pipelining:
                write(envelope)
                r_mail, r_rcpt, r_data = await proto.replies_n(3)
            else:
                write(mail)
                (r_mail,) = await proto.replies_n(1)
                r_rcpt = r_data = None
                if r_mail[0] // 100 == 2:
                    write(rcpt)
                    (r_rcpt,) = await proto.replies_n(1)
                    if r_rcpt[0] // 100 == 2:
                        write(b"DATA\r\n")
                        (r_data,) = await proto.replies_n(1)
            bad = [r for r in (r_mail, r_rcpt) if r is not None and r[0] // 100 != 2]
            if r_data is None or r_data[0] != 354:
                if r_data is not None and r_data[0] // 100 not in (2, 3):
                    bad.append(r_data)
                for r in bad or [r_data or r_mail]:
                    stats.error(idx, reply_text(r))
                write(b"RSET\r\n")
                await proto.replies_n(1)
                continue
            if bad:
                # DATA was accepted although MAIL or RCPT failed: end it empty.
                for r in bad:
                    stats.error(idx, reply_text(r))
                write(b".\r\n")
                await proto.replies_n(1)
                continue
            writelines((message_id_header(idx, seq), head, body))
            (r_end,) = await proto.replies_n(1)
            if r_end[0] // 100 == 2:
                lat.append(perf() - t0)
            else:
                stats.error(idx, f"end of data: {reply_text(r_end)}")
        write(b"QUIT\r\n")
        await proto.replies_n(1)
    except (OSError, asyncio.TimeoutError) as e:
        stats.error(idx, f"{type(e).__name__}: {e}")
        stats.clients_failed += 1
    finally:
        if proto.transport is not None:
            proto.transport.close()


async def watchdog(clients: list[SMTPClient], timeout: float):
    """One timer for all connections instead of one per reply."""
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for c in clients:
            if c.waiting_since and now - c.waiting_since > timeout:
                c.abort(asyncio.TimeoutError(f"no reply within {timeout:g} s"))


async def run_load(args, head: bytes, body: bytes) -> Stats:
    stats = Stats()
    clients: list[SMTPClient] = []
    dog = asyncio.create_task(watchdog(clients, args.timeout))
    try:
        await asyncio.gather(*(run_client(i, args, head, body, stats, clients)
                               for i in range(args.clients)))
    finally:
        dog.cancel()
    return stats


# --------------------------------------------------------------------------
# Server measurement from /proc


def pss_kb(pid: int) -> int | None:
    text = _read(f"/proc/{pid}/smaps_rollup")
    if text is None:
        return None
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


class ServerSnapshot:
    """CPU and memory of the process trees under the given PIDs.

    CPU = sum over live processes of utime+stime+cutime+cstime: a child that
    exits and is reaped moves its time into its parent's cutime/cstime, so the
    total survives process turnover (Postfix's smtpd, mailplat workers)."""

    def __init__(self, roots: list[int]):
        self.roots = roots
        self.pids = process_tree(roots)
        self.ticks = sum(cpu_ticks(p) for p in self.pids)
        self.rss_kb = sum(status_kb(p, "VmRSS") for p in self.pids)
        self.hwm_kb = sum(status_kb(p, "VmHWM") for p in self.pids)
        pss = [pss_kb(p) for p in self.pids]
        self.pss_kb = None if any(x is None for x in pss) else sum(pss)


async def rss_sampler(roots: list[int], peak: list[int], interval: float = 0.5):
    while True:
        pids = process_tree(roots)
        peak[0] = max(peak[0], sum(status_kb(p, "VmRSS") for p in pids))
        await asyncio.sleep(interval)


def count_files(d: Path) -> int:
    try:
        with os.scandir(d) as it:
            return sum(1 for _ in it)
    except OSError:
        return 0


# --------------------------------------------------------------------------
# --backend postgres: the database side runs in a helper process
#
# This script stays standard-library only: everything that needs psycopg
# runs in `PYTHON THIS_SCRIPT --pg-helper DSN SCHEMA`, where PYTHON is the
# interpreter of the twistd being measured (it has mailplat, hence psycopg).
# The helper reads one JSON request per line and answers one JSON line.


# --------------------------------------------------------------------------
# --start-mailplat

MAILPLAT_CONFIG = """\
hostname = "bench.test"
data_dir = "var"
domains = ["bench.test"]
workers = {workers}
[smtp]
max_message_size = {max_size}
max_connections = {max_connections}
max_connections_per_ip = {max_connections}
[listen]
smtp = "tcp:0:interface=127.0.0.1"
"""
LISTEN_RE = re.compile(r"listening on [^\s:]+:(\d+)")


class MailplatServer:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="mailplat-bench-"))
        self.config = self.dir / "mailplat.toml"
        self.log = self.dir / "twistd.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
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
            self.pg = PgHelper(python_of(twistd), self.args.dsn, "bench_" + secrets.token_hex(6))
            options = (f"dsn = {json.dumps(self.pg.call('conninfo'))}\n"
                       f'schema = "{self.pg.schema}"\npool_size = {self.args.pool_size}')
            store = POSTGRES_STORE.format(options=options)
        self.config.write_text(MAILPLAT_CONFIG.format(
            workers=self.args.workers,
            max_size=max(50 * 1024 * 1024, 2 * self.args.size),
            max_connections=max(1000, 2 * (self.args.clients + self.args.idle)),
        ) + store)
        user = self.args.rcpt
        r = subprocess.run([mailplat, "--config", str(self.config), "user", "add", user,
                            "--password-stdin"], input=b"bench-password-1\n",
                           capture_output=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise SystemExit(f"`mailplat user add {user}` failed ({r.returncode}):\n"
                             + (r.stdout + r.stderr).decode(errors="replace"))
        logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "mailplat", "--config", str(self.config)],
            cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + self.args.start_timeout
        while True:
            m = LISTEN_RE.search(self.log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                self.fail(f"twistd exited with status {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                self.fail(f"no 'listening on' line within {self.args.start_timeout:g} s")
            time.sleep(0.05)

    def maildir(self, rcpt: str) -> Path:
        local, _, domain = rcpt.rpartition("@")
        return self.dir / "mail" / domain.lower() / local.lower()

    def counter(self, rcpt: str):
        """A function returning how many messages the recipient's mailbox
        holds: files in new/, or rows in the schema's messages table."""
        if self.pg is not None:
            pg, address = self.pg, rcpt.lower()
            return lambda: pg.call("count", address=address)
        new = self.maildir(rcpt) / "new"
        return lambda: count_files(new)

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


# --------------------------------------------------------------------------

def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    # nearest-rank
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="HOST:PORT")
    where.add_argument("--start-mailplat", action="store_true",
                       help="start `twistd -n mailplat` with a temporary config and measure it")
    ap.add_argument("--clients", "-c", type=int, default=10, help="concurrent sessions (10)")
    ap.add_argument("--messages", "-m", type=int, default=10, help="messages per session (10)")
    ap.add_argument("--size", "-s", type=int, default=1024, help="message size in bytes (1024)")
    ap.add_argument("--rcpt", help="recipient (default bench@bench.test with --start-mailplat)")
    ap.add_argument("--from", dest="sender", default="loadgen@example.net",
                    help="envelope and header sender (loadgen@example.net)")
    ap.add_argument("--helo", default="loadgen.example.net")
    ap.add_argument("--no-pipelining", action="store_true",
                    help="one command per round trip even if PIPELINING is offered")
    ap.add_argument("--server-pid", type=int, action="append", default=[],
                    help="server process to measure with its children; repeatable")
    ap.add_argument("--maildir", type=Path,
                    help="Maildir the messages land in: wait until new/ holds them all "
                         "before the final CPU reading (for servers that deliver after 250)")
    ap.add_argument("--delivery-timeout", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--label", default="", help="free text copied into the output")
    ap.add_argument("--twistd", help="twistd to run with --start-mailplat")
    ap.add_argument("--mailplat", help="mailplat admin command for --start-mailplat")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--keep", action="store_true", help="keep the --start-mailplat folder")
    ap.add_argument("--workers", type=int, default=1, help="workers = N for --start-mailplat (1)")
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
    ap.add_argument("--idle", type=int, default=0, metavar="N",
                    help="first open N idle sessions and hold them through the run; "
                         "reports how long a new client then waits for greeting+EHLO+QUIT")
    args = ap.parse_args(argv)
    if args.backend != "maildir" and not args.start_mailplat:
        ap.error("--backend is for --start-mailplat")
    if args.start_mailplat:
        args.rcpt = args.rcpt or "bench@bench.test"
    elif not args.rcpt:
        ap.error("--rcpt is required with --target")
    else:
        host, sep, port = args.target.rpartition(":")
        if not sep or not port.isdigit():
            ap.error("--target must be HOST:PORT")
        args.host, args.port = host.strip("[]") or "127.0.0.1", int(port)
    if args.clients < 1 or args.messages < 0 or args.size < 1:
        ap.error("--clients >= 1, --messages >= 0, --size >= 1")
    return args


async def open_idle(args) -> list[asyncio.StreamWriter]:
    """N sessions that only read the greeting and then stay silent."""
    writers = []
    for _ in range(args.idle):
        reader, writer = await asyncio.open_connection(args.host, args.port)
        await reader.readline()
        writers.append(writer)
    return writers


async def new_client_ms(args) -> float:
    """Greeting, EHLO and QUIT for one new client, in milliseconds."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(args.host, args.port)
    await reader.readline()
    writer.write(b"EHLO probe.example.net\r\nQUIT\r\n")
    while not (await reader.readline()).startswith(b"221"):
        pass
    writer.close()
    return (time.perf_counter() - t0) * 1000


async def measured_run(args, head, body, count_delivered):
    """count_delivered: None, or a function returning how many messages the
    mailbox holds (files in new/, rows in the database)."""
    roots = args.server_pid
    idle = await open_idle(args) if args.idle else []
    idle_probe = [await new_client_ms(args) for _ in range(5)] if idle else []
    before = ServerSnapshot(roots) if roots else None
    if roots and not before.pids:
        raise SystemExit(f"no such process: {roots}")
    db_before = ServerSnapshot(args.db_pid) if args.db_pid else None
    peak = [before.rss_kb if before else 0]
    sampler = asyncio.create_task(rss_sampler(roots, peak)) if roots else None
    files_before = count_delivered() if count_delivered else 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    stats = await run_load(args, head, body)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    delivered = lag = None
    if count_delivered:
        want = files_before + len(stats.latencies)
        deadline = time.monotonic() + args.delivery_timeout
        while (delivered := count_delivered()) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        delivered -= files_before
        lag = time.perf_counter() - t0 - wall
    if sampler:
        sampler.cancel()
    after = ServerSnapshot(roots) if roots else None
    if db_before:
        db_after = ServerSnapshot(args.db_pid)
        stats.db_cpu_s = (db_after.ticks - db_before.ticks) / CLK_TCK
        stats.db_processes = len(db_after.pids)
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime)
    for writer in idle:
        writer.close()
    stats.idle_probe_ms = idle_probe
    return stats, wall, client_cpu, before, after, peak[0], delivered, lag


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pg-helper"]:
        return pg_helper_main(*argv[1:3])
    args = parse_args(argv)
    server = None
    count_delivered = None
    delivered_in = "files in new/"
    if args.maildir is not None:
        new_dir = args.maildir / "new"
        count_delivered = lambda: count_files(new_dir)
    try:
        if args.start_mailplat:
            server = MailplatServer(args)
            server.start()
            args.host, args.port = "127.0.0.1", server.port
            if not args.server_pid:
                args.server_pid = [server.proc.pid]
            if count_delivered is None:
                count_delivered = server.counter(args.rcpt)
                if server.pg is not None:
                    delivered_in = f"rows in {server.pg.schema}.messages"
            if server.pg is not None and not args.db_pid:
                pid = postmaster_pid(server.pg)
                args.db_pid = [pid] if pid else []
        head, body, content_size = build_message(args.size, args.sender, args.rcpt)
        stats, wall, client_cpu, before, after, peak_kb, delivered, lag = asyncio.run(
            measured_run(args, head, body, count_delivered))
    finally:
        if server is not None:
            server.stop()

    lat = sorted(stats.latencies)
    ok = len(lat)
    ms = lambda v: round(v * 1000, 2)
    result = {
        "label": args.label,
        "target": (f"mailplat (--start-mailplat, {args.backend})" if server
                   else args.target),
        "backend": args.backend if server else None,
        "clients": args.clients,
        "messages_per_client": args.messages,
        "size": content_size,
        "wire_bytes_per_message": len(message_id_header(0, 0)) + len(head) + len(body),
        "messages": ok,
        "attempted": args.clients * args.messages,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "clients_failed": stats.clients_failed,
        "wall_s": round(wall, 3),
        "msgs_per_s": round(ok / wall, 1) if wall else None,
        "mb_per_s": round(ok * content_size / wall / 1e6, 2) if wall else None,
        "latency_ms": {
            "p50": ms(percentile(lat, 50)) if lat else None,
            "p90": ms(percentile(lat, 90)) if lat else None,
            "p99": ms(percentile(lat, 99)) if lat else None,
            "max": ms(lat[-1]) if lat else None,
            "mean": ms(sum(lat) / ok) if lat else None,
        },
        "client_cpu_s": round(sum(client_cpu), 2),
        "client_user_s": round(client_cpu[0], 2),
        "client_sys_s": round(client_cpu[1], 2),
    }
    if args.idle:
        result["idle_sessions"] = args.idle
        result["new_client_ms_with_idle"] = round(max(stats.idle_probe_ms), 2)
    if delivered is not None:
        result["delivered"] = delivered
        result["delivered_in"] = delivered_in
        result["delivery_wait_s"] = round(lag, 3)
    if stats.db_cpu_s is not None:
        result["database"] = {
            "pids": args.db_pid,
            "processes_after": stats.db_processes,
            "cpu_s": round(stats.db_cpu_s, 2),
            "cpu_ms_per_msg": round(1000 * stats.db_cpu_s / ok, 3) if ok else None,
        }
    if before and after:
        cpu = (after.ticks - before.ticks) / CLK_TCK
        measured_wall = wall + (lag or 0)
        result["server"] = {
            "pids": args.server_pid,
            "processes_after": len(after.pids),
            "cpu_s": round(cpu, 2),
            "cpu_percent": round(100 * cpu / measured_wall, 1) if measured_wall else None,
            "cpu_ms_per_msg": round(1000 * cpu / ok, 3) if ok else None,
            "rss_before_mb": round(before.rss_kb / 1024, 1),
            "rss_after_mb": round(after.rss_kb / 1024, 1),
            "rss_growth_mb": round((after.rss_kb - before.rss_kb) / 1024, 1),
            "rss_peak_sampled_mb": round(peak_kb / 1024, 1),
            "hwm_mb": round(after.hwm_kb / 1024, 1),
            "pss_after_mb": round(after.pss_kb / 1024, 1) if after.pss_kb is not None else None,
        }
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if stats.errors == 0 else 1


def print_table(r: dict):
    rows = [
        ("target", r["target"] + (f"  [{r['label']}]" if r["label"] else "")),
        ("load", f"{r['clients']} clients x {r['messages_per_client']} messages x "
                 f"{r['size']} bytes"),
        ("messages ok", f"{r['messages']} of {r['attempted']}"),
        ("errors", f"{r['errors']}" + (f" ({r['clients_failed']} sessions failed)"
                                      if r["clients_failed"] else "")),
        ("wall", f"{r['wall_s']:.3f} s"),
        ("throughput", f"{r['msgs_per_s']} msg/s, {r['mb_per_s']} MB/s"),
        ("latency", "p50 {p50} ms, p90 {p90} ms, p99 {p99} ms, max {max} ms".format(
            **r["latency_ms"])),
        ("client cpu", f"{r['client_cpu_s']} s (user {r['client_user_s']} s, "
                       f"sys {r['client_sys_s']} s)"),
    ]
    if "idle_sessions" in r:
        rows.append(("idle", f"{r['idle_sessions']} idle sessions held; a new client was served "
                             f"in {r['new_client_ms_with_idle']} ms (worst of 5)"))
    if "delivered" in r:
        rows.append(("delivered", f"{r['delivered']} {r['delivered_in']} "
                                  f"({r['delivery_wait_s']} s after the last reply)"))
    s = r.get("server")
    if s:
        rows += [
            ("server cpu", f"{s['cpu_s']} s ({s['cpu_percent']}% of one core, "
                           f"{s['cpu_ms_per_msg']} ms/msg), {s['processes_after']} processes"),
            ("server rss", f"{s['rss_before_mb']} -> {s['rss_after_mb']} MB "
                           f"(growth {s['rss_growth_mb']} MB, sampled peak "
                           f"{s['rss_peak_sampled_mb']} MB, VmHWM sum {s['hwm_mb']} MB"
                           + (f", PSS {s['pss_after_mb']} MB" if s["pss_after_mb"] is not None
                              else "") + ")"),
        ]
    d = r.get("database")
    if d:
        rows.append(("database cpu", f"{d['cpu_s']} s ({d['cpu_ms_per_msg']} ms/msg; the whole "
                                     f"server, {d['processes_after']} processes)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for e in r["error_samples"]:
        print(f"  error: {e}")


if __name__ == "__main__":
    sys.exit(main())
