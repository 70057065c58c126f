"""Receiving a message body: the DATA stream, decoded in chunks, onto disk.

Twisted's SMTP server calls back once per line and, after an over-long line,
falls back to reading the rest of the body as commands.  Here the stream is
scanned in chunks with bytes methods, only CRLF.CRLF ends it (RFC 5321
4.1.1.4; bare LF and bare CR are flagged, never taken as line ends, which
closes the SMTP smuggling hole), and memory stays bounded by one line plus
one chunk whatever the message size.  Of the header only counts and a few
watched fields are kept, each bounded, whatever the header's size.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from mailplat.fsutil import makedirs_durable
from mailplat.interfaces import SpooledMessage

__all__ = ["DataDecoder", "HeaderField", "Spool", "SpoolFile"]

_TERMINATOR = b"\r\n.\r\n"
_AUTHENTICATION_RESULTS = b"authentication-results:"
_COMMENT = re.compile(rb"\([^()]*\)")
# An Authentication-Results field longer than this is junk: dropped whatever it says.
_MAX_RESULTS_FIELD = 8192
# Octets of a watched field's value that are kept; a longer one is marked too long.
_MAX_WATCHED_FIELD = 2048
_WRITE_BUFFER = 256 * 1024
# Messages up to this size are received in memory, larger ones in a file.
_MEMORY_LIMIT = 128 * 1024


@dataclass
class HeaderField:
    """What the header scan keeps of one watched field: how often it appeared,
    and the first one's value, unfolded (RFC 5322 2.2.3), up to _MAX_WATCHED_FIELD octets."""

    count: int = 0
    value: bytes = b""
    too_long: bool = False

    def add(self, text: bytes) -> None:
        if self.too_long or len(self.value) + len(text) > _MAX_WATCHED_FIELD:
            self.too_long = True
            self.value = b""
            return
        self.value += text


class DataDecoder:
    """Un-dot-stuffs the DATA stream and checks it, passing content to ``sink``.

    After the end of the message, ``problem`` is None or the reply that
    refuses it: (code, enhanced status, text).
    """

    def __init__(self, sink: Any, max_size: int, max_line: int, max_received: int, max_header_fields: int = 1000) -> None:
        self.sink = sink
        self.max_size = max_size
        # Longest line allowed, without its LF (the CR counts, as in RFC 5321).
        self.max_line = max_line - 1
        self.max_received = max_received
        self.max_header_fields = max_header_fields
        self.size = 0
        self.received_headers = 0
        self.header_fields = 0
        self.too_big = self.line_too_long = self.bare_newline = False
        self._carry = b""
        self._at_line_start = True  # does _carry begin a line?
        self._after_crlf = True  # ... and was the previous line ended by CRLF?
        self._in_headers = True
        # The header fields to watch (lower-case names, no colon), and what
        # was seen of them: only these are kept, never every name, so a
        # header of a million fields costs no more than one of ten.  The
        # hook returns header lines to add at the end of the header, given
        # the watched names present (submission adds Date: and Message-ID:
        # when missing, RFC 6409 8, so it watches them).
        self.watch: frozenset[bytes] = frozenset()
        self.watched: dict[bytes, HeaderField] = {}
        self._watching: HeaderField | None = None  # the field whose folded lines may follow
        self.add_headers: Callable[[set[bytes]], bytes] | None = None
        # Our authserv-id (lower case): Authentication-Results fields claiming
        # to come from us are forgeries and are removed (RFC 8601 5).  So are
        # fields named in ``owned_fields`` (lower case, with the colon): the
        # ones our filters write, which only they may (X-Spam-Status...).
        self.authserv_id: bytes | None = None
        self.owned_fields: frozenset[bytes] = frozenset()
        self.removed_results = 0
        self._results_field: bytes | None = None  # one being read, with its folded lines
        self._results_too_long = False

    def feed(self, data: bytes) -> bytes | None:
        """Take more of the stream; None while the message goes on, else the bytes after its end."""
        chunk = self._carry + data if self._carry else data
        if self._at_line_start and self._after_crlf and chunk.startswith(b".\r\n"):
            self._content(b"")
            return chunk[3:]
        end = chunk.find(_TERMINATOR)
        if end >= 0:
            self._content(chunk[: end + 2])
            self._carry = b""
            return chunk[end + 5 :]
        cut = chunk.rfind(b"\n") + 1
        if cut:
            self._content(chunk[:cut])
        self._carry = chunk[cut:]
        if len(self._carry) > self.max_line:
            # Keep the last byte: it may be the CR of the CRLF ending this line.
            # What is dropped still counts toward the size, so the reply does
            # not depend on how the line was split across reads.
            self.line_too_long = True
            self.size += len(self._carry) - 1 - (1 if self._at_line_start and self._carry.startswith(b".") else 0)
            if self.size > self.max_size:
                self.too_big = True
            self._carry = self._carry[-1:]
            self._at_line_start = False
        return None

    @property
    def problem(self) -> tuple[int, str, str] | None:
        if self.too_big:
            return 552, "5.3.4", f"Message size exceeds the limit of {self.max_size} octets"
        if self.header_fields > self.max_header_fields:
            return 552, "5.3.4", f"Message refused: more than {self.max_header_fields} header fields"
        if self.line_too_long:
            return 500, "5.5.2", f"Message refused: a line is longer than {self.max_line + 1} octets (RFC 5321 4.5.3.1.6)"
        if self.bare_newline:
            return 550, "5.5.2", "Message refused: bare LF or CR received; lines must end with CRLF"
        if self.received_headers > self.max_received:
            return 554, "5.4.6", f"Too many Received: headers ({self.received_headers}): mail loop"
        return None

    def _content(self, raw: bytes) -> None:
        """Handle complete lines (``raw`` ends with LF, or is empty)."""
        if not raw:
            return
        at_line_start = self._at_line_start
        # The size is that of the message as the client sent it, un-stuffed
        # (RFC 1870), before the header scan removes or adds fields: so it
        # never depends on how the reads were split.
        self.size += len(raw) - raw.count(b"\n.") - (1 if at_line_start and raw.startswith(b".") else 0)
        if self.size > self.max_size:
            self.too_big = True
        self._at_line_start = True
        self._after_crlf = raw.endswith(b"\r\n")
        # Over-long lines, by index: the header scan skips them, as it never
        # sees one that arrives over several reads (feed drops it unread).
        long_lines: frozenset[int] = frozenset()
        if len(raw) > self.max_line:
            long_lines = frozenset(i for i, line in enumerate(raw.split(b"\n")) if len(line) > self.max_line)
            if long_lines:
                self.line_too_long = True
        if not self.bare_newline:
            crlf = raw.count(b"\r\n")
            if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
                self.bare_newline = True
        # RFC 5321 4.5.2: a line's leading dot is removed by the receiver.
        content = raw.replace(b"\n.", b"\n")
        if at_line_start and content.startswith(b"."):
            content = content[1:]
        if self._in_headers:
            end = self._scan_headers(content, at_line_start, long_lines)
            if self.authserv_id is not None or self.owned_fields:
                head = content if end < 0 else content[:end]
                kept = self._without_forged_results(head, ended=end >= 0)
                content = kept + content[len(head):]
                end = end if end < 0 else len(kept)
            if end >= 0 and self.add_headers is not None:
                content = content[:end] + self.add_headers(set(self.watched)) + content[end:]
        if self.problem is None:
            self.sink.write(content)

    def _scan_headers(self, content: bytes, at_line_start: bool, skip: frozenset[int] = frozenset()) -> int:
        """Count header fields and Received: fields, note watched ones; where the header ends in ``content``, or -1."""
        if at_line_start and content.startswith(b"\r\n"):
            self._in_headers = False
            return 0
        # The blank line may follow a bare-LF line too (refused later as bare
        # LF): the header ends there wherever the reads were split.
        end = content.find(b"\n\r\n")
        if end >= 0:
            end += 1
            self._in_headers = False
            content = content[:end]
        # ``content`` ends with LF, so the last piece is empty; without a
        # line start, the first piece ends a line begun in an earlier chunk.
        lines = content.split(b"\n")
        for index in range(0 if at_line_start else 1, len(lines) - 1):
            if index in skip:
                continue
            line = lines[index]
            line = line[:-1] if line.endswith(b"\r") else line
            if line[:1] in (b" ", b"\t"):
                if self._watching is not None:
                    self._watching.add(line)
                continue
            self._watching = None
            self.header_fields += 1
            if self.header_fields > self.max_header_fields:
                # Refused (see problem): the rest of the header is not worth reading.
                self._in_headers = False
                return -1
            colon = line.find(b":")
            name = line[:colon].lower() if colon > 0 else b""
            if name == b"received":
                self.received_headers += 1
            elif name in self.watch:
                field = self.watched.setdefault(name, HeaderField())
                field.count += 1
                if field.count == 1:
                    field.add(line[colon + 1 :])
                    self._watching = field
        return end

    def _without_forged_results(self, head: bytes, ended: bool) -> bytes:
        """Header lines (whole CRLF lines) minus Authentication-Results fields
        carrying our authserv-id and fields our filters own; a field may be
        folded across chunks."""
        kept = []
        for line in head.split(b"\r\n")[:-1]:
            line += b"\r\n"
            if line[:1] in (b" ", b"\t") and self._results_field is not None:
                self._results_field += line
                if len(self._results_field) > _MAX_RESULTS_FIELD:
                    self._results_too_long = True
                    self._results_field = b"(dropped)"
                continue
            kept.append(self._finish_results_field())
            name = line[: line.find(b":") + 1].lower()
            if name == _AUTHENTICATION_RESULTS or name in self.owned_fields:
                self._results_field = line
            else:
                kept.append(line)
        if ended:
            kept.append(self._finish_results_field())
        return b"".join(kept)

    def _finish_results_field(self) -> bytes:
        field, self._results_field = self._results_field, None
        too_long, self._results_too_long = self._results_too_long, False
        if field is None:
            return b""
        if field[: field.find(b":") + 1].lower() in self.owned_fields:
            self.removed_results += 1
            return b""
        value = _COMMENT.sub(b" ", field[len(_AUTHENTICATION_RESULTS) :].replace(b"\r\n", b""))
        # authserv-id [version] ";" ... (RFC 8601 2.2)
        words = value.split(b";", 1)[0].split()
        if too_long or (words and words[0].lower() == self.authserv_id):
            self.removed_results += 1
            return b""
        return field

    def finish(self) -> None:
        """The message has ended: a message that is all header still gets its added headers."""
        if self._results_field is not None and self.problem is None:
            last = self._finish_results_field()
            self.size += len(last)
            self.sink.write(last)
        if self._in_headers and self.add_headers is not None and self.problem is None:
            self._in_headers = False
            extra = self.add_headers(set(self.watched))
            self.size += len(extra)
            self.sink.write(extra)


class SpoolFile:
    """One incoming message being received.

    It stays in memory while small (most mail is), and moves to a file in the
    spool as soon as it grows past ``memory_limit``: memory per session stays
    bounded whatever the message size, and small messages cost no file.
    """

    def __init__(self, path: str, memory_limit: int = _MEMORY_LIMIT) -> None:
        self.path = path
        self.memory_limit = memory_limit
        self._memory: io.BytesIO | None = io.BytesIO()
        self._file: IO[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._memory is not None:
            self._memory.write(data)
            if self._memory.tell() <= self.memory_limit:
                return
            self._file = open(self.path, "xb", buffering=_WRITE_BUFFER)
            self._file.write(self._memory.getbuffer())
            self._memory = None
            return
        assert self._file is not None
        self._file.write(data)

    def finish(self, sender: str) -> SpooledMessage:
        """The complete message (not yet durable: delivery makes it so)."""
        if self._memory is not None:
            content = self._memory.getvalue()
            self._memory = None
            return SpooledMessage("", len(content), sender, content)
        assert self._file is not None
        size = self._file.tell()
        self._file.close()
        return SpooledMessage(self.path, size, sender)

    def discard(self) -> None:
        self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Spool:
    """``data_dir/spool``: messages between the end of DATA and delivery.

    Nothing here has been acknowledged yet (delivery completes before the
    250), so leftovers from a crash are removed at start.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def start(self) -> None:
        makedirs_durable(self.directory)
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))

    def create(self, queue_id: str) -> SpoolFile:
        return SpoolFile(os.path.join(self.directory, queue_id))
