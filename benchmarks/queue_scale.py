#!/usr/bin/env python3
"""A large outbound queue: `mailplat queue list` time, restart to first retry, memory.

Fills a throwaway data_dir with N queued messages (written directly in the
queue's format for small messages, without fsync: setting up is not what is
measured), all due now, then measures:

  * `mailplat queue list` wall time (output to a pipe, read whole),
  * starting `twistd -n mailplat` until the first message reaches a sink
    SMTP server (the far end of the relay, run by this script),
  * the server's resident memory (VmRSS) and its peak (VmHWM) at that moment.

    python3 benchmarks/queue_scale.py -n 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import REPO, Sink, start_mailplat  # noqa: E402


def fill_queue(data_dir: Path, count: int, size: int) -> None:
    messages, envelopes = data_dir / "queue" / "msg", data_dir / "queue" / "env"
    messages.mkdir(parents=True)
    envelopes.mkdir(parents=True)
    body = b"Subject: queued\r\n\r\n" + b"x" * max(0, size - 21) + b"\r\n"
    now = time.time()
    for n in range(count):
        queue_id = f"Q{n:08d}"
        recipient = {"address": f"user{n}@sink{n % 100}.test", "state": "pending", "attempts": 1, "next_try": now,
                     "last_error": "451 4.3.0 try again later", "status": "4.3.0", "remote_mta": ""}
        envelope = {"id": queue_id, "sender": "bench@bench.test", "created": now - 600, "recipients": [recipient], "inline": True}
        # As mailplat queues a small message: the envelope line, then the message, in one file.
        (envelopes / f"{queue_id}.json").write_bytes(json.dumps(envelope).encode() + b"\n" + body)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


async def first_retry(folder: Path) -> dict[str, float]:
    sink = Sink(expected=1)
    server = await asyncio.start_server(sink.session, "127.0.0.1", 0)
    sink_port = server.sockets[0].getsockname()[1]
    started = time.perf_counter()
    process, _ = await asyncio.to_thread(start_mailplat, folder, sink_port)
    listening = time.perf_counter() - started
    try:
        await asyncio.wait_for(sink.done.wait(), 120)
        elapsed = time.perf_counter() - started
        mem = memory(process.pid)
    finally:
        process.terminate()
        process.wait(30)
        server.close()
    return {"listening_s": round(listening, 2), "first_retry_s": round(elapsed, 2),
            "rss_mib": mem["VmRSS"], "peak_rss_mib": mem["VmHWM"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=100_000)
    parser.add_argument("-s", "--size", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailplat-queue-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        fill_queue(folder / "var", args.messages, args.size)
        print(f"filled {args.messages} queued messages in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        retry = asyncio.run(first_retry(folder))
        started = time.perf_counter()
        listing = subprocess.run([str(REPO / ".venv" / "bin" / "mailplat"), "--config", str(folder / "mailplat.toml"), "queue", "list"],
                                 capture_output=True, check=True)
        list_s = time.perf_counter() - started
        last_line = listing.stdout.decode().strip().rsplit("\n", 1)[-1]
        result = {"messages": args.messages, "queue_list_s": round(list_s, 2), "queue_list_says": last_line, **retry}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
