"""Reading command lines from a client, for the SMTP and POP3 servers.

Twisted's LineOnlyReceiver splits lines only on CRLF, runs every pipelined
command at once even when an earlier one is still waiting on a Deferred (so
replies come out of order), and drops the connection or misreads the rest
after an over-long line.  This mixin reads one command at a time, holds the
next until the current one has replied (RFC 2920 3.1, RFC 2449 6.6), answers
over-long lines and bare LF and goes on, and can hand a raw byte stream
(SMTP's DATA) to the protocol in chunks.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

__all__ = ["CommandReader"]

# While a command waits, stop reading from a client that keeps sending.
_PAUSE_ABOVE = 64 * 1024


class CommandReader:
    """Mixin for a Protocol; the protocol provides the hooks below."""

    transport: Any
    max_command_line = 512

    _input = b""
    _waiting = False
    _paused = False
    _discard_input = False
    _skipping_long_line = False

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

    # -- machinery --------------------------------------------------------------

    def discard_pending_input(self) -> None:
        """Throw away what the client sent after the current command (e.g. after STARTTLS)."""
        self._discard_input = True

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()  # type: ignore[attr-defined]
        self._input += data
        if not self._waiting:
            self._process()
        elif len(self._input) > _PAUSE_ABOVE and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _process(self) -> None:
        # An index into the buffer rather than slicing it per command: a
        # packet full of tiny pipelined commands must not cost quadratic time.
        buffer, pos = self._input, 0
        while pos < len(buffer) and not self._waiting and not self.transport.disconnecting:
            if self.reading_raw():
                rest = self.raw_received(buffer[pos:] if pos else buffer)
                buffer, pos = rest or b"", 0
                if rest is None:
                    break
                self._wait(self.raw_ended())
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
            elif not line.endswith(b"\r"):
                self.bare_newline()
            else:
                self._wait(self.command_received(line[:-1]))
                if self._discard_input:
                    self._discard_input = False
                    buffer, pos = b"", 0
        self._input = buffer[pos:] if pos else buffer
        if self._paused and not self._waiting:
            self._paused = False
            self.transport.resumeProducing()

    def _wait(self, result: Any) -> None:
        """Hold further input until an asynchronous command has replied."""
        if not isinstance(result, defer.Deferred) or result.called:
            return
        self._waiting = True

        def done(_: Any) -> None:
            self._waiting = False
            if not self.transport.disconnecting:
                self._process()

        result.addBoth(done)
