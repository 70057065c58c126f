"""Sending a message as POP3 RETR and SMTP DATA want it: dot-stuffed, then ".".

Both protocols end a message with a line holding one dot, so a line that
starts with a dot gets another one.  Twisted's helpers stuff within a chunk
only: a dot line at a chunk boundary would end the message early.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, interfaces
from zope.interface import implementer

__all__ = ["DotStuffedSender"]

_CHUNK = 64 * 1024


@implementer(interfaces.IPushProducer)
class DotStuffedSender:
    """Streams one message: dot-stuffed (RFC 1939 3, RFC 5321 4.5.2) across chunk boundaries,
    ending with the terminating line, and only as fast as the client reads.

    A push producer: the transport pauses it when its buffer is full.  (As a
    pull producer behind TLS, Twisted would pull the whole message into
    memory at once.)
    """

    def __init__(self, source: Any, transport: Any, clock: Any, stall_timeout: float | None = None) -> None:
        self.source = source
        self.transport = transport
        self.clock = clock
        # A peer that stops reading holds us paused forever: after this many
        # seconds without progress, the connection is aborted (RFC 5321
        # 4.5.3.2.5: a data block must be sent within 3 minutes).
        self.stall_timeout = stall_timeout
        self.done: defer.Deferred[None] = defer.Deferred()
        self._at_line_start = True
        self._paused = False
        self._call: Any = None
        self._stall: Any = None
        self._stalled = False

    def start(self) -> defer.Deferred[None]:
        self.transport.registerProducer(self, True)
        self._schedule()
        return self.done

    def _schedule(self) -> None:
        if self._call is None and not self.done.called:
            self._call = self.clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._call = None
        # A few chunks per turn, so that other sessions get their share.
        for _ in range(4):
            if self._paused or self.done.called:
                return
            self._send_chunk()
        self._schedule()

    def _send_chunk(self) -> None:
        chunk = self.source.read(_CHUNK)
        if not chunk:
            self.source.close()
            self.transport.unregisterProducer()
            self.transport.write(b".\r\n" if self._at_line_start else b"\r\n.\r\n")
            self.done.callback(None)
            return
        stuffed = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._at_line_start = chunk.endswith(b"\n")
        self.transport.write(stuffed)

    def pauseProducing(self) -> None:
        self._paused = True
        if self.stall_timeout is not None and self._stall is None:
            self._stall = self.clock.callLater(self.stall_timeout, self._give_up)

    def resumeProducing(self) -> None:
        self._paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._schedule()

    def _give_up(self) -> None:
        self._stall = None
        self._stalled = True
        self.transport.abortConnection()

    def stopProducing(self) -> None:
        """The connection is gone: ``done`` fails, so that no one waits forever."""
        self.source.close()
        for call in (self._call, self._stall):
            if call is not None and call.active():
                call.cancel()
        self._call = self._stall = None
        if not self.done.called:
            if self._stalled:
                self.done.errback(defer.TimeoutError(f"the peer read nothing for {self.stall_timeout:g} seconds"))
            else:
                self.done.errback(error.ConnectionLost("the connection was lost while sending"))
