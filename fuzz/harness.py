"""What the fuzz targets share: running under atheris, crash detection through
the log, the control line that says how to split the input, and driving a
protocol over a StringTransport with a task.Clock.

A target module imports this first, then imports the mailplat code it fuzzes
inside ``instrumented()`` (so that atheris sees its branches), and ends with
``harness.main(test_one)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import atheris
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, formatEvent, globalLogBeginner
from twisted.python.failure import Failure

ROOT = Path(__file__).resolve().parent.parent
# tests/inprocess.py (the Platform: the protocols wired to in-memory
# backends and a Clock) is shared with the in-process tests.
sys.path.insert(0, str(ROOT / "tests"))


class Crash(Exception):
    """An invariant does not hold for this input."""


class LogWatch:
    """A twisted.logger observer: the server logs a failed command as an
    "internal error" (error level) and an unexpected Failure with
    log.failure; to a fuzz target, either is a crash."""

    def __init__(self) -> None:
        self.bad: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.bad.append(event)

    def check(self, errors: bool = True) -> None:
        """Raise Crash for what was logged since the last check; with
        ``errors`` False, only for a logged Failure (for code whose error
        lines are its answer, such as a hash it cannot use)."""
        bad, self.bad = self.bad, []
        if not errors:
            bad = [event for event in bad if event.get("log_failure") is not None]
        if not bad:
            return
        texts = []
        for event in bad:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if isinstance(failure, Failure):
                text += "\n" + failure.getTraceback()
            texts.append(text)
        raise Crash("logged as an error:\n" + "\n".join(texts))


watch = LogWatch()
globalLogBeginner.beginLoggingTo([watch], discardBuffer=True, redirectStandardIO=False)


@contextmanager
def instrumented() -> Iterator[None]:
    """Imports inside are instrumented for coverage: our code only, not Twisted."""
    with atheris.instrument_imports(include=["mailplat", "inprocess"]):
        yield


def main(test_one: Callable[[bytes], None], errors: bool = True) -> None:
    """Fuzz ``test_one``; what is logged while it runs is checked after each
    input (see LogWatch.check for ``errors``)."""

    def run(data: bytes) -> None:
        test_one(data)
        watch.check(errors)

    atheris.Setup(sys.argv, run)
    atheris.Fuzz()


# --- splitting the input ------------------------------------------------------


def control(data: bytes) -> tuple[list[bytes], list[int], bytes]:
    """Split ``data`` into its control line and the stream a client sends.

    The first line (up to LF) is the control line: words, where those made
    of ASCII digits are offsets in the stream at which it is split, and the
    others are options for the target (such as the listener).  A corpus file
    thus reads as "smtp 5 17" and then the client's side of a transcript.
    """
    head, newline, stream = data.partition(b"\n")
    if not newline:
        return [], [], data
    options, cuts = [], []
    for word in head.split():
        if word.isdigit() and word.isascii():
            cuts.append(int(word[:9]))
        else:
            options.append(word)
    return options, cuts, stream


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` in pieces, cut at the given offsets (out of range ones ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    pieces, start = [], 0
    for p in points:
        pieces.append(stream[start:p])
        start = p
    pieces.append(stream[start:])
    return [p for p in pieces if p]


def chunkings(stream: bytes, cuts: list[int], bytewise_limit: int = 4096) -> list[list[bytes]]:
    """The ways a target feeds the same stream: whole, at the control line's
    offsets, and (when short enough to be cheap) one byte at a time."""
    ways = [[stream]]
    if cuts:
        ways.append(split_at(stream, cuts))
    if 1 < len(stream) <= bytewise_limit:
        ways.append([stream[i : i + 1] for i in range(len(stream))])
    return ways


# --- driving a protocol -----------------------------------------------------


def drain(clock: Any, transport: Any = None, limit: int = 100_000) -> None:
    """Let time pass, one scheduled call after the other, until nothing is
    left (timeouts included) or ``transport`` is closed: what a session does
    while the client waits."""
    for _ in range(limit):
        calls = clock.getDelayedCalls()
        if not calls or (transport is not None and transport.disconnecting):
            return
        clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
    raise Crash(f"the clock still has calls after {limit} steps")


def converse(wire: Any, clock: Any, pieces: list[bytes]) -> bytes:
    """Feed ``pieces`` to the protocol of ``wire`` (a tests.inprocess.Wire)
    as a client would: what is due now runs between pieces, nothing more is
    fed once the server has closed, a paused reader is given time; then time
    passes until the session ends or nothing is left to happen, and the
    connection is lost (as a reactor does right after a close).  Returns all
    that the server wrote."""
    transport, protocol = wire.transport, wire.protocol
    for piece in pieces:
        if transport.disconnecting:
            break
        if transport.producerState == "paused":
            drain(clock, transport)
            if transport.producerState == "paused" and not transport.disconnecting:
                raise Crash("the server stopped reading, and nothing will make it read again")
            if transport.disconnecting:
                break
        protocol.dataReceived(piece)
        clock.advance(0)
    drain(clock, transport)
    protocol.connectionLost(Failure(ConnectionDone()))
    drain(clock)
    return transport.value()


def same_for_every_chunking(results: list[tuple[Any, Any]]) -> None:
    """Crash unless every way of feeding the input gave the same result.

    ``results`` holds (pieces, result) pairs, the pieces being what was fed
    (or a text naming where the result comes from, such as a model)."""
    (first_way, first), *others = results
    for way, result in others:
        if result != first:
            raise Crash(
                "the outcome depends on how the input is fed (chunking, or the model)\n"
                f"--- {_way(first_way)}:\n{_show(first)}\n"
                f"--- {_way(way)}:\n{_show(result)}"
            )


def _way(way: Any) -> str:
    if isinstance(way, str):
        return way
    if len(way) == 1:
        return "fed whole"
    return f"fed in {len(way)} pieces, cut at {_offsets(way)[:12]}"


def _offsets(pieces: list[bytes]) -> list[int]:
    offsets, at = [], 0
    for p in pieces[:-1]:
        at += len(p)
        offsets.append(at)
    return offsets


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, tuple) and all(isinstance(v, bytes) for v in value):
        return "\n".join(_show(v) for v in value)
    if isinstance(value, list):
        return "\n".join(repr(v) for v in value)
    return repr(value)
