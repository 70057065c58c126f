"""Sending a message as POP3 RETR and SMTP DATA want it: dot-stuffed, then ".".

Both protocols end a message with a line holding one dot, so a line that
starts with a dot gets another one.  Twisted's helpers stuff within a chunk
only: a dot line at a chunk boundary would end the message early.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

from twisted.internet import defer, error, task
from twisted.python.failure import Failure

from mailplat.wire.pump import OutputPump

__all__ = ["DotStuffedSender", "dot_stuffed"]

_CHUNK = 64 * 1024


def dot_stuffed(source: IO[bytes]) -> Iterator[bytes]:
    """The message read from ``source`` in chunks, dot-stuffed (RFC 1939 3,
    RFC 5321 4.5.2) across chunk boundaries, then the terminating line."""
    at_line_start = True
    while chunk := source.read(_CHUNK):
        stuffed = chunk.replace(b"\n.", b"\n..")
        if at_line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        at_line_start = chunk.endswith(b"\n")
        yield stuffed
    yield b".\r\n" if at_line_start else b"\r\n.\r\n"


class DotStuffedSender:
    """Streams one message, dot-stuffed, only as fast as the peer reads it
    (through :class:`~mailplat.wire.pump.OutputPump`); the source is closed
    at the end, whatever the end."""

    def __init__(self, source: Any, transport: Any, clock: Any, stall_timeout: float | None = None) -> None:
        self.source = source
        self.transport = transport
        self.clock = clock
        # A peer that stops reading holds us paused forever: after this many
        # seconds without progress, the connection is aborted (RFC 5321
        # 4.5.3.2.5: a data block must be sent within 3 minutes).
        self.stall_timeout = stall_timeout

    def start(self) -> defer.Deferred[None]:
        """Fires once the terminating line is written; fails with TimeoutError
        after a stall, ConnectionLost when the connection goes."""
        pump = OutputPump(self.transport, self.clock, self.stall_timeout)

        def ended(result: None | Failure) -> None | Failure:
            self.source.close()
            pump.close()
            if pump.stalled and isinstance(result, Failure) and result.check(error.ConnectionLost):
                return Failure(defer.TimeoutError(f"the peer read nothing for {self.stall_timeout:g} seconds"))
            return result

        # From the next turn of the clock, as the writes after it: the caller
        # has the Deferred before the first chunk goes out.
        def send(_: None) -> defer.Deferred[None]:
            return pump.send(dot_stuffed(self.source))

        return task.deferLater(self.clock, 0, lambda: None).addCallback(send).addBoth(ended)
