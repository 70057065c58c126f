"""The thread pools, owned by the service: created at start, stopped at shutdown.

Blocking work never runs on the reactor thread, and never in a pool nobody
stops.  Three pools, each for one kind of work, so that one kind cannot
queue the others behind it:

- ``passwords``: slow password hashes (argon2id), one thread per core;
  in a shared pool a burst of logins would hold up every mailbox write;
- ``blocking``: file and database calls of backends and the queue;
- ``cpu``: work on whole messages (DKIM signing and verification).

A backend finds them in ``BackendContext.threads`` and may ask for a pool
of its own (say, one thread per database connection) with :meth:`Threads.pool`;
every pool is stopped after the listeners and backends have stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["Threads"]

T = TypeVar("T")

_CORES = max(1, os.cpu_count() or 1)


class Threads(service.Service):
    """Named thread pools that start with the service and stop with it."""

    def __init__(self, reactor: Any, blocking: int = 10) -> None:
        self.reactor = reactor
        self._pools: dict[str, ThreadPool] = {}
        self.passwords = self.pool("passwords", _CORES)
        self.blocking = self.pool("blocking", blocking)
        self.cpu = self.pool("cpu", _CORES)

    def pool(self, name: str, size: int) -> ThreadPool:
        """The pool called ``name`` (made with ``size`` threads at most the first time)."""
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPool(0, max(1, size), name=f"mailplat-{name}")
            if self.running:
                pool.start()
        return pool

    def run(self, pool: ThreadPool, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """``f(*args)`` in ``pool``; a Deferred with its result on the reactor thread."""
        return deferToThreadPool(self.reactor, pool, f, *args, **kwargs)

    def startService(self) -> None:
        super().startService()
        for pool in self._pools.values():
            if not pool.started:
                pool.start()

    def stopService(self) -> defer.Deferred[None]:
        """Stop every pool, in a thread: a pool's stop waits for its running jobs."""
        super().stopService()
        pools = [pool for pool in self._pools.values() if pool.started]

        def stop_all() -> None:
            for pool in pools:
                pool.stop()

        # Not in one of our own pools: they are what is being stopped.
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), stop_all)
