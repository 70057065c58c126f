"""Reading command lines from a client, for the SMTP, POP3 and IMAP servers.

Twisted's LineOnlyReceiver splits lines only on CRLF, runs every pipelined
command at once even when an earlier one is still waiting on a Deferred (so
replies come out of order), and drops the connection or misreads the rest
after an over-long line.  This mixin reads one command at a time, holds the
next until the current one has replied (RFC 2920 3.1, RFC 2449 6.6), answers
over-long lines and bare LF and goes on, and can hand a raw byte stream
(SMTP's DATA) to the protocol in chunks.

It also bounds what a client can make us hold: while more than 64 KiB of
input waits (the current command has not replied yet) it stops reading, and
while our replies are not being read (the transport's output buffer is full,
above its 64 KiB) it stops taking commands, so a client that pipelines
without reading makes us buffer a bounded amount, not one reply per command.

It is also the one place where a command's failure is caught: whatever a
hook raises, or a Deferred it returns fails with, goes to
:meth:`CommandReader.command_failed`, which answers with the protocol's
error reply; nothing escapes ``dataReceived`` to tear the connection down.

And the one place that recognises an HTTP request sent to a mail port (see
:func:`cross_protocol_verb`): every protocol ends the session there.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["FORBIDDEN_VERBS", "CommandReader", "cross_protocol_verb", "describe_failure", "printable"]

# While commands wait (for a reply, or for the client to read ours), stop
# reading from a client that keeps sending.
_PAUSE_ABOVE = 64 * 1024

# Cross-protocol requests (ALPACA and older): a browser or proxy made to talk
# HTTP to a mail port, whose request body then runs as mail commands.  No mail
# protocol has these verbs, so a session that sends one as a command is not a
# mail client: it ends there, as with Postfix's smtpd_forbidden_commands.
FORBIDDEN_VERBS = frozenset({b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT"})
# Any other HTTP request line ("OPTIONS / HTTP/1.1", "DELETE * HTTP/1.0").
_HTTP_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/\d\.\d")


def cross_protocol_verb(line: bytes) -> str:
    """The HTTP verb that ``line`` (a command line without its line end) opens with, or ""."""
    verb = line.split(b" ", 1)[0].upper()
    if verb in FORBIDDEN_VERBS or _HTTP_REQUEST_LINE.fullmatch(line):
        return verb.decode("ascii", "replace")[:20]
    return ""


class CommandReader:
    """Mixin for a Protocol; the protocol provides the hooks below."""

    transport: Any
    max_command_line = 512

    _input = b""
    _waiting = False
    _paused = False
    _discard_input = False
    _skipping_long_line = False
    _processing = False
    # Output flow control (see _OutputValve): registered while commands run
    # or a message streams, and the transport's word that its buffer is full.
    _valve: _OutputValve | None = None
    _output_full = False
    _stream: Any = None

    # -- hooks ----------------------------------------------------------------

    def command_received(self, line: bytes) -> Any:
        """One command line without its CRLF; may return a Deferred to hold the next."""
        raise NotImplementedError

    def line_too_long(self) -> None:
        raise NotImplementedError

    def bare_newline(self) -> None:
        raise NotImplementedError

    def reading_raw(self) -> bool:
        """True while input is a raw stream rather than commands."""
        return False

    def raw_received(self, data: bytes) -> bytes | None:
        """Consume raw input; None while the stream goes on, else the bytes after its end."""
        raise NotImplementedError

    def raw_ended(self) -> Any:
        """The raw stream has ended; may return a Deferred to hold further commands."""
        raise NotImplementedError

    def command_failed(self, failure: Failure) -> None:
        """A hook raised, or its Deferred failed: answer with the protocol's error."""
        raise NotImplementedError

    def cross_protocol_request(self, verb: str) -> None:
        """An HTTP request line came as a command: reply once, log one line, close."""
        raise NotImplementedError

    # -- machinery --------------------------------------------------------------

    def discard_pending_input(self) -> None:
        """Throw away what the client sent after the current command (e.g. after STARTTLS)."""
        self._discard_input = True

    @property
    def output_blocked(self) -> bool:
        """The client is not reading our replies: closing cleanly would wait for it forever."""
        return self._output_full

    def output_consumer(self) -> _StreamConsumer:
        """Where a push producer that streams a reply (a message) registers, instead of on the transport."""
        return _StreamConsumer(self)

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting:
            # Closing (after QUIT, a cross-protocol request, too many errors):
            # what the client still sends is never read.
            return
        self.resetTimeout()  # type: ignore[attr-defined]
        self._input += data
        if not (self._waiting or self._output_full):
            self._process()
        self._pace_reading()

    def _pace_reading(self) -> None:
        """Read from the client only while what it sent has somewhere to go."""
        if self.transport.disconnecting:
            return
        hold = (self._waiting or self._output_full) and len(self._input) > _PAUSE_ABOVE
        if hold and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not hold:
            self._paused = False
            self.transport.resumeProducing()

    def _process(self) -> None:
        if self._processing:
            # Called back from inside a command (a Deferred, the transport):
            # the loop below goes on by itself.
            return
        self._processing = True
        try:
            self._watch_output()
            self._process_commands()
        finally:
            self._processing = False
        self._unwatch_output()
        self._pace_reading()

    def _process_commands(self) -> None:
        # An index into the buffer rather than slicing it per command: a
        # packet full of tiny pipelined commands must not cost quadratic time.
        buffer, pos = self._input, 0
        while pos < len(buffer) and not self._waiting and not self._output_full and not self.transport.disconnecting:
            if self.reading_raw():
                try:
                    rest = self.raw_received(buffer[pos:] if pos else buffer)
                except Exception:
                    self.command_failed(Failure())
                    buffer, pos = b"", 0
                    break
                buffer, pos = rest or b"", 0
                if rest is None:
                    break
                self._wait(self._guarded(self.raw_ended))
                continue
            end = buffer.find(b"\n", pos)
            if end < 0:
                if len(buffer) - pos > self.max_command_line:
                    buffer, pos = b"", 0
                    if not self._skipping_long_line:
                        self._skipping_long_line = True
                        self.line_too_long()
                break
            line, pos = buffer[pos:end], end + 1
            if self._skipping_long_line:
                self._skipping_long_line = False
            elif len(line) + 1 > self.max_command_line:
                self.line_too_long()
            elif verb := cross_protocol_verb(line.rstrip(b"\r")):
                # What follows is the request's headers and body: none of it is read.
                buffer, pos = b"", 0
                self.cross_protocol_request(verb)
                if not self.transport.disconnecting:
                    self.transport.loseConnection()
            elif not line.endswith(b"\r"):
                self.bare_newline()
            else:
                self._wait(self._guarded(self.command_received, line[:-1]))
                if self._discard_input:
                    self._discard_input = False
                    buffer, pos = b"", 0
        self._input = buffer[pos:] if pos else buffer

    def _guarded(self, hook: Any, *args: Any) -> Any:
        """Run a hook; its exception, or its Deferred's failure, goes to command_failed."""
        try:
            result = hook(*args)
        except Exception:
            self.command_failed(Failure())
            return None
        if isinstance(result, defer.Deferred):
            result.addErrback(self._failed_later)
        return result

    def _failed_later(self, failure: Failure) -> None:
        try:
            self.command_failed(failure)
        except Exception:
            # The error reply itself failed (the transport is gone): nothing
            # more can be said to this client.
            self.transport.loseConnection()

    def _wait(self, result: Any) -> None:
        """Hold further input until an asynchronous command has replied.

        ``result.called`` does not say that: it is already true while the
        Deferred waits on one its callback returned (RETR: the message is
        open, and now it is being sent).  Only a callback of our own, run at
        once or later, says the command is over.
        """
        if not isinstance(result, defer.Deferred):
            return
        self._waiting = True
        later = False

        def done(_: Any) -> None:
            self._waiting = False
            if later and not self.transport.disconnecting:
                self._process()

        result.addBoth(done)
        later = True

    # -- output flow control ------------------------------------------------------

    def _watch_output(self) -> None:
        if self._valve is None:
            self._valve = _OutputValve(self)
            self.transport.registerProducer(self._valve, True)

    def _unwatch_output(self) -> None:
        # Only while nothing runs: a transport with a producer registered
        # never closes (ITransport.loseConnection), so QUIT would hang.
        if self._valve is not None and not (self._output_full or self._stream is not None or self._processing):
            self._valve = None
            self.transport.unregisterProducer()

    def _output_paused(self) -> None:
        self._output_full = True
        if self._stream is not None:
            self._stream.pauseProducing()

    def _output_resumed(self) -> None:
        self._output_full = False
        # A client reading our replies (or a long message) is not idle, even
        # if it sends nothing.
        self.resetTimeout()  # type: ignore[attr-defined]
        if self._stream is not None:
            self._stream.resumeProducing()
            return
        if not self._waiting and not self.transport.disconnecting:
            self._process()
        else:
            self._unwatch_output()
            self._pace_reading()

    def _output_stopped(self) -> None:
        # The connection is gone, and the registration with it.
        self._valve = None
        if self._stream is not None:
            self._stream.stopProducing()

    def _stream_begins(self, producer: Any) -> None:
        if self._stream is not None:
            raise RuntimeError("a reply is already being streamed")
        self._stream = producer
        self._watch_output()
        if self._output_full:
            producer.pauseProducing()

    def _stream_ends(self) -> None:
        self._stream = None
        self._unwatch_output()


@implementer(IPushProducer)
class _OutputValve:
    """The one producer a CommandReader registers with its transport.

    Twisted's transports (TCP, and TLS on top of it) pause their producer
    while more than 64 KiB of output waits to be sent and resume it once all
    of it is: that is when the reader stops and restarts taking commands, or
    passes the word on to a message being streamed.  A separate object, so
    that the protocol itself need not be a producer.
    """

    def __init__(self, reader: CommandReader) -> None:
        self._reader = reader

    def pauseProducing(self) -> None:
        self._reader._output_paused()

    def resumeProducing(self) -> None:
        self._reader._output_resumed()

    def stopProducing(self) -> None:
        self._reader._output_stopped()


class _StreamConsumer:
    """The transport as a streamed reply's producer (an OutputPump) sees it: it
    registers with the reader, whose valve stays the transport's one producer."""

    def __init__(self, reader: CommandReader) -> None:
        self._reader = reader

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming, "only push producers stream replies"
        self._reader._stream_begins(producer)

    def unregisterProducer(self) -> None:
        self._reader._stream_ends()

    def write(self, data: bytes) -> None:
        self._reader.transport.write(data)

    def abortConnection(self) -> None:
        self._reader.transport.abortConnection()


def describe_failure(failure: Failure) -> str:
    """A bug in one log line: the exception and where it was raised."""
    where = ""
    if failure.frames:
        _, filename, line = failure.frames[-1][:3]
        where = f" at {'/'.join(filename.split('/')[-2:])}:{line}"
    kind = failure.type.__name__ if failure.type is not None else "Exception"
    return f"{kind}: {failure.getErrorMessage()}{where}"


def printable(text: bytes | str, limit: int = 100) -> str:
    """Client text made safe to echo in a reply, a header or a log: printable
    ASCII, "?" for each other character (each byte, given bytes)."""
    if isinstance(text, bytes):
        # One character per byte, so a non-ASCII byte is one "?" whatever its encoding.
        text = text.decode("latin-1")
    return "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in text[:limit])
