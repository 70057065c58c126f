"""One extra worker process (``workers = N``): the same service on the
listening sockets the main process passes down (see :mod:`mailplat.workers`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import protocol
from twisted.logger import globalLogBeginner, jsonFileLogObserver

from mailplat.config import ConfigError, load
from mailplat.service import make_service

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """A worker process: the same service, on inherited sockets."""
    parser = argparse.ArgumentParser(prog="mailplat-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], help="NAME=FD")
    args = parser.parse_args(argv)

    from twisted.internet import reactor, stdio

    # Record separators frame each event; the main process re-logs them.
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)
    inherited = {name: int(fd) for name, _, fd in (item.partition("=") for item in args.listen)}
    try:
        top = make_service(load(args.config), reactor, worker=args.worker, inherited=inherited)
    except ConfigError as e:
        print(f"mailplat: {e}", file=sys.stderr)
        raise SystemExit(1)

    class _Parent(protocol.Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(_Parent(), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))  # type: ignore[call-arg]  # mypy picks the Windows signature
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
