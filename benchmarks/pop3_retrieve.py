#!/usr/bin/env python3
"""POP3 retrieval benchmark (standard library only): retrieve every message, then delete all.

Fills a maildir with N messages of S bytes (files written directly, CRLF),
logs in, RETRs each message (checking its size against LIST), DELEs them all
and QUITs; prints messages/s, MB/s, the server's CPU seconds and its memory.

    python3 benchmarks/pop3_retrieve.py --server mailplat -n 2000 -s 10240
    python3 benchmarks/pop3_retrieve.py --server dovecot  -n 10 -s 10485760

--server mailplat starts `twistd -n mailplat` from the repo's .venv (POP3S);
--server dovecot starts a throwaway Dovecot (Debian's dovecot-pop3d) with
its own config in a temporary folder.  Both are measured over POP3S (TLS).
--target HOST:PORT measures any POP3S server already running.
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench@bench.test", "bench-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")

MAILPLAT_CONFIG = """\
hostname = "bench.test"
data_dir = "var"
domains = ["bench.test"]
[listen]
pop3s = "tcp:0:interface=127.0.0.1"
[tls]
certificate = "cert.pem"
key = "key.pem"
[auth]
backend = "passwd-file"
path = "users.passwd"
[mailbox]
backend = "maildir"
path = "mail"
[pop3]
auth_failure_delay = 0
"""

DOVECOT_CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = required
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
disable_plaintext_auth = yes
auth_mechanisms = plain
mail_location = maildir:{root}/mail/%d/%n
mail_uid = nobody
mail_gid = nogroup
default_internal_user = dovecot
default_login_user = dovenull
pop3_uidl_format = %g
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = {port}
    ssl = yes
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={root}/home/%d/%n
}}
"""


def populate(maildir: Path, count: int, size: int) -> int:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    line = b"x" * 76 + b"\r\n"
    total = 0
    for i in range(count):
        head = f"Subject: bench {i}\r\nFrom: a@b.test\r\n\r\n".encode()
        body = line * max(1, (size - len(head)) // len(line))
        data = head + body
        name = f"{1700000000 + i}.M{i:06d}P1Q{i}.bench,S={len(data)}"
        (maildir / "new" / name).write_bytes(data)
        total += len(data)
    return total


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_certificate(root: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench.test",
                    "-keyout", str(root / "key.pem"), "-out", str(root / "cert.pem")], check=True, capture_output=True)


def start_mailplat(root: Path) -> tuple[subprocess.Popen, int, Path]:
    bin_dir = REPO / ".venv" / "bin"
    (root / "mailplat.toml").write_text(MAILPLAT_CONFIG)
    make_certificate(root)
    subprocess.run([str(bin_dir / "mailplat"), "--config", str(root / "mailplat.toml"), "user", "add", USER, "--password-stdin"],
                   input=(PASSWORD + "\n").encode(), check=True, capture_output=True)
    log = open(root / "twistd.log", "wb")
    process = subprocess.Popen([str(bin_dir / "twistd"), "-n", "--pidfile=", "mailplat", "--config", str(root / "mailplat.toml")],
                               cwd=root, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"pop3s listening on [^\s:]+:(\d+)", (root / "twistd.log").read_text(errors="replace"))
        if found:
            return process, int(found.group(1)), root / "mail" / "bench.test" / "bench"
        time.sleep(0.05)
    raise SystemExit("mailplat did not start:\n" + (root / "twistd.log").read_text(errors="replace")[-2000:])


def start_dovecot(root: Path) -> tuple[subprocess.Popen, int, Path]:
    if shutil.which("dovecot") is None:
        raise SystemExit("dovecot is not installed: apt-get install dovecot-pop3d")
    port = free_port()
    for sub in ("run", "state", "mail", "home"):
        (root / sub).mkdir()
    root.chmod(0o755)
    (root / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    make_certificate(root)
    (root / "dovecot.conf").write_text(DOVECOT_CONFIG.format(root=root, port=port))
    process = subprocess.Popen(["dovecot", "-F", "-c", str(root / "dovecot.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            poplib.POP3_SSL("127.0.0.1", port, timeout=2, context=_insecure()).quit()
            return process, port, root / "mail" / "bench.test" / "bench"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("dovecot did not start:\n" + (root / "dovecot.log").read_text(errors="replace")[-2000:])


def _insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK_TCK


def rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1))
        except (OSError, AttributeError):
            pass
    return total / 1024


class Running:
    """A server started elsewhere: --target, with its maildir and its PID for CPU and memory."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def send_signal(self, sig: int) -> None:
        pass

    def wait(self, timeout: float) -> None:
        pass


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"pop3-bench-{args.server}-"))
    host, user, password = "127.0.0.1", USER, PASSWORD
    if args.target:
        host, _, port_text = args.target.rpartition(":")
        process, port, maildir = Running(args.server_pid), int(port_text), Path(args.maildir)
        user, password = args.user, args.password
    else:
        process, port, maildir = (start_mailplat if args.server == "mailplat" else start_dovecot)(root)
    try:
        expected = populate(maildir, args.count, args.size)
        if args.server == "dovecot" and not args.target:
            # Dovecot's mail processes run as nobody (they refuse root).
            subprocess.run(["chown", "-R", "nobody:nogroup", str(root / "mail"), str(root / "home")], check=True)
        client = poplib.POP3_SSL(host, port, context=_insecure(), timeout=120)
        client.user(user)
        client.pass_(password)
        # Memory is sampled after login: argon2 verification itself takes 64 MiB for a moment.
        peak = [rss_mb(process.pid)]
        before_rss = peak[0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(process.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        cpu0, t0 = cpu_seconds(process.pid), time.perf_counter()
        sizes = [int(line.split()[1]) for line in client.list()[1]]
        received = 0
        for number, size in enumerate(sizes, 1):
            client._putcmd(f"RETR {number}")
            client._getresp()
            got = 0
            while True:
                line = client.file.readline()
                if line == b".\r\n":
                    break
                got += len(line) - (1 if line.startswith(b"..") else 0)
            if got != size:
                raise SystemExit(f"message {number}: LIST said {size} octets, RETR sent {got}")
            received += got
        retrieved = time.perf_counter() - t0
        for number in range(1, len(sizes) + 1):
            client.dele(number)
        client.quit()
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(process.pid) - cpu0
        stop.set()
        sampler.join()
        if received != expected:
            raise SystemExit(f"received {received} octets, wrote {expected}")
        left = len(list((maildir / "new").iterdir())) + len(list((maildir / "cur").iterdir()))
        return {
            "server": args.server, "messages": len(sizes), "size": args.size,
            "retrieve_msgs_per_s": round(len(sizes) / retrieved, 1), "retrieve_MB_per_s": round(received / retrieved / 1e6, 1),
            "total_s_with_delete": round(wall, 2), "server_cpu_s": round(cpu, 2),
            "rss_mb_after_login": round(before_rss, 1), "rss_mb_peak_during": round(peak[0], 1), "left_in_maildir": left,
        }
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["mailplat", "dovecot"], default="mailplat")
    parser.add_argument("-n", "--count", type=int, default=2000)
    parser.add_argument("-s", "--size", type=int, default=10240)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--target", help="HOST:PORT of any POP3S server already running (with --maildir, --user, --password, --server-pid)")
    parser.add_argument("--maildir", help="with --target: the user's maildir folder, filled before the run")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--server-pid", type=int, default=0, help="with --target: the server's main PID, for CPU and memory")
    args = parser.parse_args()
    if args.target and not (args.maildir and args.user and args.password and args.server_pid):
        parser.error("--target needs --maildir, --user, --password and --server-pid")
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:22} {value}")


if __name__ == "__main__":
    main()
