"""The command line reader (mailplat.wire.lines.CommandReader) in a small
protocol over a StringTransport: what it hands the protocol is what a plain
reading of the whole stream says (a simple model below), in order, however
the stream is chunked.

The protocol's commands: ``WAIT`` and ``CHAIN`` reply a second later (the
second through a Deferred that has fired but waits on another, as an
inlineCallbacks or a chained callback does), ``FAIL`` raises, ``LATE`` fails
a second later, ``RAW`` reads a raw stream up to CRLF.CRLF (through the DATA
decoder, as SMTP's DATA does); an HTTP request line ends the session;
anything else is just a command.  Every
command must have finished before the next one starts, and what comes after
a raw stream is read as commands again.

Input: a control line (split offsets; see harness.control), then the stream.
"""

from __future__ import annotations

import io
from typing import Any

import harness
from twisted.internet import defer, protocol, task
from twisted.internet.testing import StringTransport

with harness.instrumented():
    from mailplat.smtp.receiving import DataDecoder
    from mailplat.wire import lines

# An HTTP request line ends the session (ALPACA): the reader's own test of
# what one is, so that the model and the reader agree on it.
cross_protocol_verb = getattr(lines, "cross_protocol_verb", lambda line: "")
MAX_LINE = 64
# While a command waits, the reader stops reading above this much input; low,
# so that short inputs pause and resume it too.
lines._PAUSE_ABOVE = 200


class Recorder(lines.CommandReader, protocol.Protocol):
    max_command_line = MAX_LINE

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.events: list[tuple[Any, ...]] = []
        self.busy = False
        self.decoder: DataDecoder | None = None
        self.sink = io.BytesIO()

    def resetTimeout(self) -> None:
        pass

    def _start(self, line: bytes) -> None:
        if self.busy:
            self.events.append(("OVERLAP", line))
        self.events.append(("command", line))

    def _later(self, line: bytes, fail: bool = False) -> defer.Deferred[None]:
        self.busy = True

        def done() -> None:
            self.busy = False
            self.events.append(("done", line))
            if fail:
                raise ValueError("failed later")

        return task.deferLater(self.clock, 1.0, done)

    def command_received(self, line: bytes) -> Any:
        self._start(line)
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"WAIT":
            return self._later(line)
        if verb == b"CHAIN":
            outer: defer.Deferred[None] = defer.succeed(None)
            outer.addCallback(lambda _: self._later(line))
            return outer
        if verb == b"LATE":
            return self._later(line, fail=True)
        if verb == b"FAIL":
            raise ValueError("failed at once")
        if verb == b"RAW":
            self.sink = io.BytesIO()
            self.decoder = DataDecoder(self.sink, max_size=1 << 30, max_line=1 << 30, max_received=1 << 30)
        return None

    def cross_protocol_request(self, verb: str) -> None:
        self.events.append(("cross-protocol", verb))

    def line_too_long(self) -> None:
        self.events.append(("too long",))

    def bare_newline(self) -> None:
        self.events.append(("bare LF",))

    def reading_raw(self) -> bool:
        return self.decoder is not None

    def raw_received(self, data: bytes) -> bytes | None:
        assert self.decoder is not None
        return self.decoder.feed(data)

    def raw_ended(self) -> Any:
        decoder, self.decoder = self.decoder, None
        assert decoder is not None
        bare = decoder.bare_newline
        self.events.append(("raw", bare, None if bare else self.sink.getvalue()))
        return self._later(b"(raw)")

    def command_failed(self, failure: Any) -> None:
        self.busy = False
        self.events.append(("failed", failure.getErrorMessage()))


def model(stream: bytes) -> list[tuple[Any, ...]]:
    """What the reader must make of ``stream``: read at once, line by line."""
    events: list[tuple[Any, ...]] = []
    pos = 0
    while pos < len(stream):
        end = stream.find(b"\n", pos)
        if end < 0:
            if len(stream) - pos > MAX_LINE:
                events.append(("too long",))
            break
        line, pos = stream[pos:end], end + 1
        if len(line) + 1 > MAX_LINE:
            events.append(("too long",))
            continue
        verb = cross_protocol_verb(line.rstrip(b"\r"))
        if verb:
            events.append(("cross-protocol", verb))
            break
        if not line.endswith(b"\r"):
            events.append(("bare LF",))
            continue
        line = line[:-1]
        events.append(("command", line))
        verb = line.split(b" ", 1)[0].upper()
        if verb in (b"WAIT", b"CHAIN"):
            events.append(("done", line))
        elif verb == b"LATE":
            events += [("done", line), ("failed", "failed later")]
        elif verb == b"FAIL":
            events.append(("failed", "failed at once"))
        elif verb == b"RAW":
            # The raw stream ends at the first CRLF.CRLF, counting the CRLF
            # that ended the RAW line.
            rest = b"\r\n" + stream[pos:]
            stop = rest.find(b"\r\n.\r\n")
            if stop < 0:
                break
            raw = rest[2 : stop + 2]
            pos += stop + 3
            crlf = raw.count(b"\r\n")
            bare = raw.count(b"\n") != crlf or raw.count(b"\r") != crlf
            content = raw.replace(b"\n.", b"\n")
            if content.startswith(b"."):
                content = content[1:]
            events += [("raw", bare, None if bare else content), ("done", b"(raw)")]
    return events


def read(pieces: list[bytes]) -> list[tuple[Any, ...]]:
    clock = task.Clock()
    recorder = Recorder(clock)
    transport = StringTransport()
    recorder.makeConnection(transport)

    class Wire:
        pass

    wire = Wire()
    wire.transport, wire.protocol = transport, recorder  # type: ignore[attr-defined]
    harness.converse(wire, clock, pieces)
    if transport.producerState != "producing":
        recorder.events.append(("left paused",))
    return recorder.events


def test_one(data: bytes) -> None:
    _, cuts, stream = harness.control(data)
    expected = model(stream)
    results: list[tuple[Any, Any]] = [("the model (the stream read at once, line by line)", expected)]
    for pieces in harness.chunkings(stream, cuts):
        results.append((pieces, read(pieces)))
    harness.same_for_every_chunking(results)


if __name__ == "__main__":
    harness.main(test_one)
