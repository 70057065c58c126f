"""Streaming a reply (a FETCH, a RETR, a DATA body) at the pace of the peer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["OutputPump"]

# Per turn of the reactor, a pump writes this much, so that other sessions
# get their share.
_PUMP_PER_TURN = 256 * 1024


@implementer(IPushProducer)
class OutputPump:
    """Writes chunks only as fast as the peer reads them.

    A push producer on a transport (or a CommandReader's output consumer):
    while the peer's buffer is full it is paused, and so is the reading
    behind ``chunks``, which are pulled one at a time (a message file is
    never read ahead of the socket).  A peer that reads nothing for
    ``stall_timeout`` seconds (None: no limit) is disconnected, and
    ``stalled`` says so.  (As a pull producer behind TLS, Twisted would pull
    everything into memory at once.)
    """

    def __init__(self, consumer: Any, clock: Any, stall_timeout: float | None) -> None:
        self.consumer = consumer
        self.clock = clock
        self.stall_timeout = stall_timeout
        self.stalled = False
        self._paused = False
        self._gone = False
        self._chunks: Iterator[bytes] | None = None
        self._done: defer.Deferred[None] | None = None
        self._call: Any = None
        self._stall: Any = None
        consumer.registerProducer(self, True)

    def send(self, chunks: Iterable[bytes]) -> defer.Deferred[None]:
        """Write ``chunks``; fires once the last is written (at once when the client keeps up)."""
        if self._gone:
            return defer.fail(ConnectionLost("the connection was lost while sending"))
        self._chunks = iter(chunks)
        done = self._done = defer.Deferred()
        if not self._paused:
            self._pump()
        return done

    def _pump(self) -> None:
        self._call = None
        written = 0
        while not self._paused and self._chunks is not None:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._finish(None)
                return
            except Exception:
                self._finish(Failure())
                return
            self.consumer.write(chunk)
            written += len(chunk)
            if written >= _PUMP_PER_TURN and not self._paused:
                self._call = self.clock.callLater(0, self._pump)
                return

    def _finish(self, result: Failure | None) -> None:
        done, self._done, self._chunks = self._done, None, None
        if done is not None:
            if result is None:
                done.callback(None)
            else:
                done.errback(result)

    def close(self) -> None:
        """The command is over: the pump leaves the consumer."""
        self._cancel_calls()
        if not self._gone:
            self._gone = True
            self.consumer.unregisterProducer()

    def _cancel_calls(self) -> None:
        for pending in (self._call, self._stall):
            if pending is not None and pending.active():
                pending.cancel()
        self._call = self._stall = None

    def pauseProducing(self) -> None:
        self._paused = True
        if self.stall_timeout is not None and self._stall is None:
            self._stall = self.clock.callLater(self.stall_timeout, self._give_up)

    def resumeProducing(self) -> None:
        self._paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._chunks is not None and self._call is None:
            self._call = self.clock.callLater(0, self._pump)

    def _give_up(self) -> None:
        self._stall = None
        self.stalled = True
        self.consumer.abortConnection()

    def stopProducing(self) -> None:
        """The connection is gone: what is being sent fails, so that no one waits forever."""
        self._cancel_calls()
        self._gone = True
        self._finish(Failure(ConnectionLost("the connection was lost while sending")))
