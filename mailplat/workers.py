"""Several processes serving the same listening sockets (``workers = N``).

One Python process uses one core.  The twistd process binds every listener,
then starts ``workers - 1`` copies of itself that adopt the same sockets, so
the kernel spreads connections over all of them.  A worker's log events come
back to the main process as JSON and are logged there, so there is one log.
A worker that dies is restarted; a worker whose main process dies exits.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import (
    Logger,
    eventFromJSON,
    globalLogPublisher,
)

__all__ = ["WorkerPool", "adopt_port"]

log = Logger()

# Restart delays for a worker that keeps dying: 1 s doubling to a minute.
_FIRST_DELAY, _MAX_DELAY = 1.0, 60.0


class _WorkerProcess(protocol.ProcessProtocol):
    """Relays one worker's JSON log lines and notices when it ends."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\x1e")
        self._partial = lines.pop()
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                event = eventFromJSON(line.decode("utf-8"))
            except ValueError:
                log.warn("worker {worker}: {line}", worker=self.number, line=line.decode("utf-8", "replace"))
                continue
            event["worker"] = self.number
            globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.error("worker {worker}: {line}", worker=self.number, line=line)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool.ended(self, reason)


class WorkerPool(service.Service):
    """Starts, watches and stops the extra worker processes."""

    def __init__(self, config_path: str, listeners: list[Any], count: int, reactor: Any) -> None:
        self.config_path = config_path
        self.listeners = listeners
        self.count = count
        self.reactor = reactor
        self.processes: dict[int, _WorkerProcess] = {}
        self.delays: dict[int, float] = {}

    def startService(self) -> None:
        super().startService()
        for number in range(1, self.count):
            self.spawn(number)

    def spawn(self, number: int) -> None:
        if not self.running:
            return
        args = [sys.executable, "-m", "mailplat.worker", "--config", self.config_path, "--worker", str(number)]
        # The child's stdin is a pipe from us: when we die, it reads EOF and exits.
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for child_fd, listener in enumerate(self.listeners, start=3):
            child_fds[child_fd] = listener.port.fileno()
            args += ["--listen", f"{listener.name}={child_fd}"]
        process = _WorkerProcess(self, number)
        self.processes[number] = process
        transport = self.reactor.spawnProcess(process, sys.executable, args, env=dict(os.environ), childFDs=child_fds)
        log.info("worker {worker} started, pid {pid}", worker=number, pid=transport.pid)

    def ended(self, process: _WorkerProcess, reason: Any) -> None:
        if self.processes.get(process.number) is not process:
            return
        del self.processes[process.number]
        if not self.running:
            return
        delay = self.delays.get(process.number, _FIRST_DELAY)
        self.delays[process.number] = min(delay * 2, _MAX_DELAY)
        log.error("worker {worker} ended ({why}); restarting in {delay}s", worker=process.number, why=reason.getErrorMessage(), delay=delay)
        self.reactor.callLater(delay, self.spawn, process.number)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        ended = []
        for process in list(self.processes.values()):
            ended.append(process.ended)
            try:
                if process.transport is not None:
                    process.transport.signalProcess("TERM")
            except Exception:  # already gone
                pass
        return defer.DeferredList(ended)


def adopt_port(reactor: Any, fd: int, factory: Any) -> Any:
    """Listen on an inherited listening socket."""
    family = socket.socket(fileno=os.dup(fd))
    try:
        kind = family.family
    finally:
        family.close()
    port = reactor.adoptStreamPort(fd, kind, factory)
    os.close(fd)  # adoptStreamPort duplicated it
    return port
