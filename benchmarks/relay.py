#!/usr/bin/env python3
"""Submission + relay end to end (standard library only).

Starts mailplat (from the repo's .venv) with its submission listener and
`[relay] smarthost` pointing at a sink SMTP server run by this script; C
concurrent clients each submit M messages of S bytes over 587 (STARTTLS +
AUTH PLAIN) to a remote recipient; the clock stops when the sink has them
all.  Prints accepted msg/s (250s on 587) and relayed msg/s (at the sink).

    python3 benchmarks/relay.py -c 50 -m 20 -s 1024
    python3 benchmarks/relay.py --target 127.0.0.1:587 --user U --password P --sink-port 2526 ...
      (any server configured to relay to 127.0.0.1:SINK_PORT, e.g. Postfix with relayhost)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = """\
hostname = "bench.test"
data_dir = "var"
domains = ["bench.test"]
[listen]
submission = "tcp:0:interface=127.0.0.1"
[tls]
certificate = "cert.pem"
key = "key.pem"
[auth]
backend = "passwd-file"
path = "users.passwd"
[mailbox]
backend = "maildir"
path = "mail"
[relay]
smarthost = "127.0.0.1:{sink}"
retry_initial = 1
[smtp]
max_connections_per_ip = 1000
[login]
auth_failure_delay = 0
[submission]
# One user sends the whole load: no hourly limits.
max_messages_per_hour = 0
max_recipients_per_hour = 0
"""


class Sink:
    """Accepts every message, counts its recipients, keeps nothing (the far end of the relay)."""

    def __init__(self, expected: int) -> None:
        self.received = 0
        self.expected = expected
        self.done = asyncio.Event()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        recipients = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-sink\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (await reader.readline()) != b".\r\n":
                    pass
                self.received += recipients
                if self.received >= self.expected:
                    self.done.set()
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                recipients = 0 if verb == b"MAIL" else recipients + (verb == b"RCPT")
                writer.write(b"250 ok\r\n")
            await writer.drain()


async def submit(port: int, user: str, password: str, count: int, body: bytes, latencies: list[float], logins: list[float]) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                if not line[:1] in b"23":
                    raise RuntimeError(line.decode(errors="replace"))
                return line

    await reply()
    writer.write(b"EHLO bench\r\n")
    await reply()
    writer.write(b"STARTTLS\r\n")
    await reply()
    await writer.start_tls(context)
    writer.write(b"EHLO bench\r\nAUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n")
    await reply()
    await reply()
    logins.append(time.perf_counter())
    for _ in range(count):
        started = time.perf_counter()
        writer.write(f"MAIL FROM:<{user}>\r\nRCPT TO:<someone@sink.test>\r\nDATA\r\n".encode())
        for _ in range(3):
            await reply()
        writer.write(body + b".\r\n")
        await reply()
        latencies.append(time.perf_counter() - started)
    writer.write(b"QUIT\r\n")
    writer.close()


def start_mailplat(folder: Path, sink_port: int, scheme: str = "argon2id") -> tuple[subprocess.Popen, int]:
    """Start mailplat with the user bench@bench.test, its password stored as ``scheme``.

    "plain" ({PLAIN}, allow_plain = true) takes the password hash out of the
    measurement, for a like-for-like comparison with a server whose test user
    has a plain password; argon2id costs ~0.1 s of CPU per login by design.
    """
    bin_dir = REPO / ".venv" / "bin"
    config = CONFIG.format(sink=sink_port)
    if scheme == "plain":
        config = config.replace('path = "users.passwd"\n', 'path = "users.passwd"\nallow_plain = true\n', 1)
    (folder / "mailplat.toml").write_text(config)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench.test",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")], check=True, capture_output=True)
    if scheme == "plain":
        (folder / "users.passwd").write_text("bench@bench.test:{PLAIN}bench-password\n")
    else:
        subprocess.run([str(bin_dir / "mailplat"), "--config", str(folder / "mailplat.toml"), "user", "add", "bench@bench.test",
                        "--password-stdin"], input=b"bench-password\n", check=True, capture_output=True)
    log = open(folder / "twistd.log", "wb")
    process = subprocess.Popen([str(bin_dir / "twistd"), "-n", "--pidfile=", "mailplat", "--config", str(folder / "mailplat.toml")],
                               cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"submission listening on [^\s:]+:(\d+)", (folder / "twistd.log").read_text(errors="replace"))
        if found:
            return process, int(found.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit("mailplat did not start:\n" + (folder / "twistd.log").read_text(errors="replace")[-2000:])


async def main_async(args: argparse.Namespace) -> dict:
    sink = Sink(args.clients * args.messages)
    server = await asyncio.start_server(sink.session, "127.0.0.1", args.sink_port)
    sink_port = server.sockets[0].getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="mailplat-relay-bench-"))
    process = None
    try:
        if args.target:
            port = int(args.target.rpartition(":")[2])
            user, password = args.user, args.password
        else:
            process, port = start_mailplat(folder, sink_port, args.password_scheme)
            user, password = "bench@bench.test", "bench-password"
        # Submission takes only a From: header of the user's own.
        body = b"From: <%s>\r\n" % user.encode() + (b"Subject: relay bench\r\n\r\n" + b"x" * 76 + b"\r\n") * max(1, args.size // 102)
        latencies: list[float] = []
        logins: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(*(submit(port, user, password, args.messages, body, latencies, logins) for _ in range(args.clients)))
        accepted = time.perf_counter() - started
        await asyncio.wait_for(sink.done.wait(), timeout=600)
        relayed = time.perf_counter() - started
    finally:
        server.close()
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
        shutil.rmtree(folder, ignore_errors=True)
    latencies.sort()
    n = len(latencies)
    return {
        "messages": n,
        "accepted_msgs_per_s": round(n / accepted, 1),
        "relayed_msgs_per_s": round(sink.received / relayed, 1),
        "submit_p50_ms": round(latencies[n // 2] * 1000, 1),
        "submit_p99_ms": round(latencies[int(n * 0.99) - 1] * 1000, 1),
        "end_to_end_s": round(relayed, 2),
        # TLS and AUTH of every client are inside the figures above; this says how much.
        "all_logged_in_s": round(max(logins) - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--clients", type=int, default=50)
    parser.add_argument("-m", "--messages", type=int, default=20)
    parser.add_argument("-s", "--size", type=int, default=1024)
    parser.add_argument("--target", help="HOST:PORT of a submission server already relaying to --sink-port")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--sink-port", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--password-scheme", choices=["argon2id", "plain"], default="argon2id",
                        help="how mailplat stores the test user's password (plain: logins cost nothing, as for the other server's)")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:22} {value}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
