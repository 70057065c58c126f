"""What IMAP knows of a stored message's contents: its MIME structure, read once as a stream.

:meth:`MessageParts.read` walks a stored message (CRLF lines) once and
keeps, per MIME part, its header block (at most ``MAX_HEADER`` octets) and
the offsets and line counts of its body, never the body itself: a 100 MB
attachment costs a few hundred bytes.  From that come ENVELOPE and
BODYSTRUCTURE (RFC 3501 7.4.2), the byte ranges of FETCH sections (RFC 3501
6.4.5) read back from the file in bounded chunks, the decoded header values
SEARCH compares, and a streaming substring search of the text for SEARCH
BODY/TEXT.  Everything that reads the file blocks: the server runs it in a
thread.

The answers are shaped after Dovecot's for the same message (the tests pin
them): types, parameters and encodings as the header writes them, a
missing Content-Type is ``text/plain; charset=us-ascii`` and a text part
without charset gets ``us-ascii``, a missing Content-Transfer-Encoding is
``7bit``, and encoded-words stay encoded in ENVELOPE as RFC 3501 says.
"""

from __future__ import annotations

import binascii
import codecs
import datetime
import email.errors
import email.header
import email.message
import email.utils
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import headerregistry
from email.policy import default as _default_policy
from typing import IO

__all__ = [
    "CHUNK",
    "MAX_DEPTH",
    "MAX_HEADER",
    "MAX_PARTS",
    "MessageParts",
    "MimePart",
    "Section",
    "SectionSpec",
    "imap_string",
    "nstring",
    "param",
]

# A part's header block kept for parsing; the rest of a longer one is skipped.
MAX_HEADER = 256 * 1024
# Parts beyond these are not split out: their boundaries are read as text,
# and a part nested deeper than MAX_DEPTH (multipart or message/rfc822) is
# not read into (every walk over the tree recurses once per level).
MAX_PARTS = 1000
MAX_DEPTH = 64
# The largest read from the file, and so the largest chunk of a FETCH literal.
CHUNK = 64 * 1024
# Header values are decoded for SEARCH in pieces of at most this (see _decode_words).
MAX_DECODED = 1024
_BLANKS = re.compile(r"(\s+)")
# The longest address field with a group that ENVELOPE reads as groups (see _address_list).
MAX_GROUP_LIST = 4 * 1024
# A quoted string longer than this is sent as a literal.
MAX_QUOTED = 1024


# --- IMAP strings ---------------------------------------------------------


def imap_string(value: bytes | str) -> bytes:
    """``value`` as an IMAP string: quoted when it can be, else a literal (CR, LF, NUL, quotes, 8-bit, or long).

    A quote or backslash could be escaped in a quoted string, but some
    clients mishandle it; Dovecot sends those as literals too.
    """
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) <= MAX_QUOTED and data.isascii() and not any(c in data for c in b'\r\n\0"\\'):
        return b'"' + data + b'"'
    return b"{%d}\r\n" % len(data) + data


def nstring(value: bytes | str | None) -> bytes:
    """``value`` as an IMAP nstring: NIL for None or empty, else :func:`imap_string`."""
    if not value:
        return b"NIL"
    return imap_string(value)


# --- sections -------------------------------------------------------------

_KINDS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")
_FIELD_NAME = re.compile(r'"([^"\\]+)"|([^\s"]+)')


@dataclass(frozen=True)
class SectionSpec:
    """A FETCH section (RFC 3501 6.4.5): part numbers, then "", HEADER, HEADER.FIELDS[.NOT], TEXT or MIME."""

    part: tuple[int, ...] = ()
    kind: str = ""
    # Field names of HEADER.FIELDS / HEADER.FIELDS.NOT, upper case, as asked.
    fields: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SectionSpec:
        """The text between the brackets (``"1.2.HEADER.FIELDS (From To)"``); ValueError if it is no section."""
        spec, space, rest = text.partition(" ")
        fields: tuple[str, ...] = ()
        numbers: list[int] = []
        words = spec.split(".") if spec else []
        i = 0
        while i < len(words) and words[i].isascii() and words[i].isdigit():
            if words[i][0] == "0" or len(words[i]) > 9:
                raise ValueError(f"invalid part number in section: {spec[:60]}")
            numbers.append(int(words[i]))
            i += 1
        kind = ".".join(words[i:]).upper()
        if kind and kind not in _KINDS:
            raise ValueError(f"unknown section: {spec[:60]}")
        if kind == "MIME" and not numbers:
            raise ValueError("MIME needs a part number")
        if kind.startswith("HEADER.FIELDS"):
            rest = rest.strip()
            if not (space and rest.startswith("(") and rest.endswith(")")):
                raise ValueError(f"{kind} needs a parenthesized list of field names")
            # header-fld-name is an astring: an atom or a quoted string.
            names = [quoted or atom for quoted, atom in _FIELD_NAME.findall(rest[1:-1])]
            if not names:
                raise ValueError(f"{kind} needs at least one field name")
            for name in names:
                # RFC 5322 ftext, less what would confuse the response's own syntax.
                if not all("!" <= c <= "~" and c not in ':()"\\{}[]' for c in name):
                    raise ValueError(f"invalid field name in {kind}: {name[:40]}")
            fields = tuple(name.upper() for name in names)
        elif space:
            raise ValueError(f"unexpected text after section {spec[:40]}")
        return cls(tuple(numbers), kind, fields)

    def __str__(self) -> str:
        words = [str(n) for n in self.part]
        if self.kind:
            words.append(self.kind)
        text = ".".join(words)
        if self.fields:
            text += " (" + " ".join(self.fields) + ")"
        return text


@dataclass(frozen=True)
class Section:
    """The octets a section names: a range of the stored file, or octets built from its header."""

    start: int = 0
    end: int = 0
    # Set when the octets are not a range of the file (HEADER.FIELDS).
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.end - self.start

    def window(self, origin: int = 0, length: int | None = None) -> Section:
        """The partial ``<origin.length>`` of this section (empty past its end)."""
        size = self.size
        low = min(origin, size)
        high = size if length is None else min(size, low + length)
        if self.data is not None:
            return Section(data=self.data[low:high])
        return Section(self.start + low, self.start + high)

    def chunks(self, source: IO[bytes]) -> Iterator[bytes]:
        """The octets, read from ``source`` at most :data:`CHUNK` at a time."""
        if self.data is not None:
            if self.data:
                yield self.data
            return
        position = self.start
        while position < self.end:
            source.seek(position)
            data = source.read(min(CHUNK, self.end - position))
            if not data:
                raise OSError(f"message file ended at {position}, expected {self.end} octets")
            position += len(data)
            yield data

    def read(self, source: IO[bytes]) -> bytes:
        """All the octets at once: only for what is known to be small (headers)."""
        return b"".join(self.chunks(source))


# --- header fields --------------------------------------------------------


def _unfold(raw: bytes) -> bytes:
    """A field's value without its line breaks (RFC 5322 2.2.3 unfolding)."""
    return raw.replace(b"\r\n", b"").replace(b"\n", b"")


def _text(raw: bytes) -> str:
    """Header octets as text: UTF-8 (RFC 6532), any other 8-bit octet replaced."""
    return raw.decode("utf-8", "replace")


def _decode_words(value: str) -> str:
    """RFC 2047 encoded-words decoded, for comparisons; the text as it is when they are broken.

    email.header's pattern takes time quadratic in a run of text that opens
    encoded-words and never closes them (110 kB: 30 s), so a long value is
    decoded in pieces of at most MAX_DECODED split at blanks (a word holds
    none), and a longer run without a blank is left as it is.
    """
    if "=?" not in value:
        return value
    if len(value) <= MAX_DECODED:
        return _decode_piece(value)
    out: list[str] = []
    piece = ""
    for token in _BLANKS.split(value):
        if len(piece) + len(token) > MAX_DECODED:
            out.append(_decode_piece(piece) if len(piece) <= MAX_DECODED else piece)
            piece = ""
        piece += token
    out.append(_decode_piece(piece) if len(piece) <= MAX_DECODED else piece)
    return "".join(out)


def _decode_piece(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (email.errors.MessageError, LookupError, UnicodeError, ValueError):
        return value


def _parse_header(block: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw field with its line breaks) for each field of a header block."""
    fields: list[tuple[str, bytes]] = []
    # Lines end at LF only: a bare CR is part of its line (bytes.splitlines would split there).
    lines = [line + b"\n" for line in block.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    for line in lines:
        if line in (b"\r\n", b"\n", b""):
            break
        if line[:1] in (b" ", b"\t") and fields:
            key, raw = fields[-1]
            fields[-1] = (key, raw + line)
            continue
        name, colon, _ = line.partition(b":")
        key = name.strip().decode("ascii", "replace").lower() if colon else ""
        fields.append((key, line))
    return fields


def _field_value(raw: bytes) -> bytes:
    """The unfolded value of a raw field, without the name and surrounding blanks."""
    return _unfold(raw.partition(b":")[2]).strip(b" \t\r\n")


# --- the MIME tree --------------------------------------------------------


@dataclass(eq=False)
class MimePart:
    """One MIME part: where its header and body are in the file, and its parts.

    The body of a message/rfc822 part is the encapsulated message, whose
    own header and body are ``message``; a multipart's parts are
    ``children``.  Offsets are of the whole file; ``body_end`` excludes the
    line break before the next boundary, which belongs to it (RFC 2046 5.1.1).
    """

    start: int
    parent: MimePart | None = None
    # Parts above this one (multiparts and encapsulated messages alike).
    depth: int = 0
    # The header block, with the blank line that ends it, up to MAX_HEADER.
    header: bytes = b""
    header_end: int = -1
    body_end: int = -1
    body_lines: int = 0
    children: list[MimePart] = field(default_factory=list)
    message: MimePart | None = None
    # Content-Type when the header names none: message/rfc822 in multipart/digest.
    default_type: tuple[str, str] = ("text", "plain")
    # Set while reading.
    _body_first_line: int = 0
    _header_parts: list[bytes] = field(default_factory=list)
    _header_size: int = 0
    _fields: list[tuple[str, bytes]] | None = None
    _ctype: tuple[str, str, list[tuple[str, str]]] | None = None
    _written: tuple[str, str] = ("text", "plain")

    # -- header lookups

    @property
    def fields(self) -> list[tuple[str, bytes]]:
        """(lower-case name, raw field) for each header field, in order."""
        if self._fields is None:
            self._fields = _parse_header(self.header)
        return self._fields

    def raw_value(self, name: str) -> bytes | None:
        """The first ``name`` field's unfolded value, as octets; None if there is none."""
        key = name.lower()
        for fname, raw in self.fields:
            if fname == key:
                return _field_value(raw)
        return None

    @property
    def content_type(self) -> tuple[str, str, list[tuple[str, str]]]:
        """(type, subtype) in lower case, and the parameters as written (see :func:`param`)."""
        if self._ctype is None:
            self._ctype = self._parse_content_type()
        return self._ctype

    @property
    def written_type(self) -> tuple[str, str]:
        """(type, subtype) as the header writes them: BODYSTRUCTURE sends them so, as Dovecot does."""
        self.content_type
        return self._written

    def _parse_content_type(self) -> tuple[str, str, list[tuple[str, str]]]:
        raw = self.raw_value("content-type")
        self._written = default = self.default_type
        default_params = [("charset", "us-ascii")] if default == ("text", "plain") else []
        if raw is None:
            return default[0], default[1], default_params
        kind, params = _params("content-type", raw)
        maintype, slash, subtype = kind.partition("/")
        if not (slash and maintype and subtype):
            # RFC 2045 5.2: a Content-Type that cannot be read is text/plain; charset=us-ascii.
            self._written = ("text", "plain")
            return "text", "plain", [("charset", "us-ascii")]
        self._written = (maintype, subtype)
        return maintype.lower(), subtype.lower(), params

    @property
    def is_multipart(self) -> bool:
        return self.content_type[0] == "multipart"

    @property
    def is_message(self) -> bool:
        """Whether this part encapsulates a message (message/rfc822), read as one."""
        return self.message is not None

    @property
    def size(self) -> int:
        """Octets of the body."""
        return self.body_end - self.header_end

    @property
    def encoding(self) -> str:
        """Content-Transfer-Encoding in lower case, ``7bit`` when there is none."""
        return self.written_encoding.lower()

    @property
    def written_encoding(self) -> str:
        raw = self.raw_value("content-transfer-encoding")
        return _text(raw).strip() or "7bit" if raw else "7bit"

    def header_section(self) -> Section:
        return Section(self.start, self.header_end)

    def body_section(self) -> Section:
        return Section(self.header_end, self.body_end)

    def walk(self) -> Iterator[MimePart]:
        """This part and every part below it, depth first, with the encapsulated messages."""
        yield self
        if self.message is not None:
            yield from self.message.walk()
        for child in self.children:
            yield from child.walk()


def _structured(name: str, raw: bytes) -> headerregistry.BaseHeader | None:
    """headerregistry's parse of one field (None when it raises: it is not meant to, but input is hostile)."""
    try:
        return _default_policy.header_factory(name, _text(raw))
    except Exception:
        return None


def param(params: list[tuple[str, str]], name: str) -> str | None:
    """The value of parameter ``name`` (any case), None if there is none."""
    key = name.lower()
    for pname, value in params:
        if pname.lower() == key:
            return value
    return None


def _params(name: str, raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    """A Content-Type's or Content-Disposition's value and parameters, as BODYSTRUCTURE shows them.

    Names and values are as written, as Dovecot sends them; an RFC 2231
    value (``name*``) stays encoded, its continuations joined: a client
    decodes it, and 8-bit text in BODYSTRUCTURE would be read in whatever
    charset the client guesses.
    """
    holder = email.message.Message()
    holder[name] = _text(raw)
    try:
        found = holder.get_params(header=name) or []
    except Exception:
        return "", []
    if not found:
        return "", []
    params: list[tuple[str, str]] = []
    for key, value in found[1:]:
        key = key.strip()
        if not key:
            continue
        if isinstance(value, tuple):
            charset, language, text = value
            encoded = urllib.parse.quote(text.encode("latin-1", "replace"), safe="")
            params.append((key + "*", f"{charset or ''}'{language or ''}'{encoded}"))
        else:
            params.append((key, value))
    return found[0][0].strip(), params


class _Reader:
    """The one pass over the file that builds the tree of MimeParts."""

    def __init__(self) -> None:
        self.offset = 0
        self.lines = 0
        self.at_line_start = True
        self.previous_break = 0
        self.count = 1
        # (b"--" + boundary, multipart part), innermost last.
        self.boundaries: list[tuple[bytes, MimePart]] = []
        self.root = MimePart(0)
        self.current = self.root
        self.in_header = True

    def run(self, source: IO[bytes], header_only: bool = False) -> MimePart:
        source.seek(0)
        while True:
            if header_only and not self.in_header:
                # The message header is all that is wanted: the body is its size only.
                root = self.root
                root.children, root.message, self.boundaries, self.current = [], None, [], root
                source.seek(0, 2)
                self.offset = source.tell()
                break
            if not self.in_header:
                if not self.boundaries:
                    self._rest_in_chunks(source)
                    break
                if not self._skim(source):
                    break
            line = source.readline(CHUNK)
            if not line:
                break
            self._line(line)
        self._close_to(None, self.offset)
        return self.root

    def _rest_in_chunks(self, source: IO[bytes]) -> None:
        """No boundary can end what is left: count its lines only."""
        while True:
            data = source.read(CHUNK)
            if not data:
                return
            self.lines += data.count(b"\n")
            self.at_line_start = data.endswith(b"\n")
            self.offset += len(data)

    def _skim(self, source: IO[bytes]) -> bool:
        """Pass over body lines in whole reads up to the next that starts with "--" (a boundary, perhaps).

        Leaves ``source`` at that line's start and returns True, or False at
        the end of the file: a body is not split into lines in Python unless
        it holds candidates.
        """
        while True:
            source.seek(self.offset)
            data = source.read(CHUNK)
            if not data:
                return False
            if self.at_line_start and data.startswith(b"--"):
                source.seek(self.offset)
                return True
            found = data.find(b"\n--")
            if found >= 0:
                self._consume(data[: found + 1])
                source.seek(self.offset)
                return True
            last = data.rfind(b"\n")
            # Up to the last line break only: the next read starts a line, so
            # a "--" split across two reads is still seen.
            self._consume(data if last < 0 else data[: last + 1])

    def _consume(self, data: bytes) -> None:
        if not data:
            return
        self.offset += len(data)
        self.lines += data.count(b"\n")
        self.at_line_start = data.endswith(b"\n")
        self.previous_break = 2 if data.endswith(b"\r\n") else 1 if self.at_line_start else 0

    def _line(self, line: bytes) -> None:
        start = self.at_line_start
        if start and self.boundaries and line.startswith(b"--") and self._boundary(line):
            return
        if self.in_header:
            self._keep_header(self.current, line)
            self._advance(line)
            if start and line in (b"\r\n", b"\n"):
                self._end_header(self.current, self.offset)
        else:
            self._advance(line)

    def _advance(self, line: bytes) -> None:
        self.offset += len(line)
        if line.endswith(b"\n"):
            self.lines += 1
        self.at_line_start = line.endswith(b"\n")
        self.previous_break = 2 if line.endswith(b"\r\n") else 1 if self.at_line_start else 0

    @staticmethod
    def _keep_header(part: MimePart, line: bytes) -> None:
        room = MAX_HEADER - part._header_size
        if room > 0:
            part._header_parts.append(line[:room])
            part._header_size += min(room, len(line))

    def _end_header(self, part: MimePart, end: int) -> None:
        part.header = b"".join(part._header_parts)
        part._header_parts = []
        part.header_end = end
        part._body_first_line = self.lines
        self.in_header = False
        maintype, subtype, params = part.content_type
        # Deeper parts stay text: every walk over the tree recurses once per level.
        depth = part.depth
        if maintype == "multipart" and depth < MAX_DEPTH:
            boundary = param(params, "boundary")
            if boundary:
                self.boundaries.append((b"--" + boundary.encode("utf-8", "replace"), part))
        elif (
            maintype == "message"
            # message/global stays a basic part, as Dovecot has it: an IMAP4rev1
            # client expects an envelope only after MESSAGE RFC822.
            and subtype == "rfc822"
            and part.encoding in ("7bit", "8bit", "binary")
            and self.count < MAX_PARTS
            and depth < MAX_DEPTH
        ):
            child = MimePart(end, parent=part, depth=depth + 1)
            self.count += 1
            part.message = child
            self.current = child
            self.in_header = True

    def _boundary(self, line: bytes) -> bool:
        """Whether ``line`` is a boundary of an open multipart; if so, ends the parts it ends."""
        for index in range(len(self.boundaries) - 1, -1, -1):
            delimiter, multipart = self.boundaries[index]
            if not line.startswith(delimiter):
                continue
            rest = line[len(delimiter):]
            closing = rest.startswith(b"--")
            if closing:
                rest = rest[2:]
            if rest.strip(b" \t\r\n"):
                continue
            if not closing and self.count >= MAX_PARTS:
                return False
            end = self.offset - self.previous_break
            self._close_to(multipart, end, 1 if self.previous_break else 0)
            del self.boundaries[index + (0 if closing else 1):]
            self.current = multipart
            self.in_header = False
            if not closing:
                child = MimePart(self.offset + len(line), parent=multipart, depth=multipart.depth + 1)
                if multipart.content_type[1] == "digest":
                    child.default_type = ("message", "rfc822")
                multipart.children.append(child)
                self.count += 1
                self.current = child
                self.in_header = True
            # The boundary line is not a line of any part's body.
            self._advance(line)
            return True
        return False

    def _close_to(self, ancestor: MimePart | None, end: int, lost_lines: int = 0) -> None:
        """End the current part and its parents up to (not including) ``ancestor`` at offset ``end``.

        A body's line count is that of its line breaks, as Dovecot counts,
        less the one before the boundary (``lost_lines``), which is the boundary's.
        """
        part: MimePart | None = self.current
        while part is not None and part is not ancestor:
            if part.header_end < 0:
                part.header = b"".join(part._header_parts)
                part._header_parts = []
                part.header_end = self.offset if ancestor is not None else end
                part._body_first_line = self.lines
            part.body_end = max(end, part.header_end)
            part.body_lines = max(0, self.lines - lost_lines - part._body_first_line)
            part = part.parent


# --- the message ----------------------------------------------------------


def _address(name: str | None, mailbox: str, host: str) -> bytes:
    # A mailbox without a domain would read as a group's start (RFC 3501
    # 7.4.2: host NIL); Dovecot's placeholders say what is missing.
    return b"(%s NIL %s %s)" % (nstring(name), nstring(mailbox or "MISSING_MAILBOX"), nstring(host or "MISSING_DOMAIN"))


def _address_list(value: bytes | None) -> bytes:
    """An ENVELOPE address list (RFC 3501 7.4.2), NIL when there are none; groups as RFC 3501 writes them.

    Two of the stdlib's parsers, each where it is at its best: email.utils'
    (linear, ~20 us an address, display names as written, a comment as the
    name like Dovecot) for lists that hold no group, headerregistry's for
    groups (``Team: a@b, c@d;``), which costs ~0.3 ms an address and grows
    faster than linearly on hostile quoting, so a group list over
    MAX_GROUP_LIST octets is read flat by the first instead.
    """
    if not value:
        return b"NIL"
    text = _text(value)
    out: list[bytes] = []
    if ":" in text and len(text) <= MAX_GROUP_LIST:
        hidden, text = _hide_encoded_words(text)
        header = _structured("to", text.encode("utf-8"))
        if isinstance(header, headerregistry.AddressHeader):
            for group in header.groups:
                if group.display_name is not None:
                    out.append(b"(NIL NIL " + nstring(_show_encoded_words(group.display_name, hidden)) + b" NIL)")
                for address in group.addresses:
                    name = _show_encoded_words(address.display_name, hidden) if address.display_name else None
                    out.append(_address(name, address.username, address.domain))
                if group.display_name is not None:
                    out.append(b"(NIL NIL NIL NIL)")
            return b"(" + b"".join(out) + b")" if out else b"NIL"
    try:
        pairs = email.utils.getaddresses([text])
    except (RecursionError, ValueError, IndexError):
        # Comments nested thousands deep, and the like.
        return b"NIL"
    for name, addr in pairs:
        if not addr:
            continue
        mailbox, at, host = addr.rpartition("@")
        if not at:
            mailbox, host = addr, ""
        out.append(_address(name or None, mailbox, host))
    return b"(" + b"".join(out) + b")" if out else b"NIL"


# headerregistry decodes RFC 2047 encoded-words in display names, but
# ENVELOPE sends them as written (RFC 3501 7.4.2): "=?" is replaced, before
# parsing, by a marker the parser reads as plain atext and is put back after.
_MARKERS = ("=`", "=~", "=^", "=|")


def _hide_encoded_words(text: str) -> tuple[str, str]:
    if "=?" not in text:
        return "", text
    for marker in _MARKERS:
        if marker not in text:
            return marker, text.replace("=?", marker)
    return "", text


def _show_encoded_words(text: str, marker: str) -> str:
    return text.replace(marker, "=?") if marker else text


@dataclass(eq=False)
class MessageParts:
    """A stored message's MIME structure: what ENVELOPE, BODYSTRUCTURE, sections and SEARCH need."""

    root: MimePart
    # Octets of the whole file.
    size: int
    # False when only the message header was read (see read's header_only).
    complete: bool = True

    @classmethod
    def read(cls, source: IO[bytes], *, header_only: bool = False) -> MessageParts:
        """Read ``source`` (from its start) once, keeping per part only its header and offsets. Blocking.

        With ``header_only`` it stops at the end of the message header (a
        few reads for any size of message): enough for ENVELOPE, HEADER,
        HEADER.FIELDS[.NOT], TEXT and header SEARCH keys, as
        ``FetchRequest.header_only`` says; the result is not ``complete``,
        and BODYSTRUCTURE, part numbers and body searches raise ValueError.
        """
        reader = _Reader()
        root = reader.run(source, header_only)
        return cls(root, reader.offset, not header_only)

    def _require_complete(self, what: str) -> None:
        if not self.complete:
            raise ValueError(f"{what} needs the whole structure, read without header_only")

    # -- ENVELOPE / BODYSTRUCTURE

    def envelope(self) -> bytes:
        """The message's ENVELOPE (RFC 3501 7.4.2), serialized."""
        return _envelope(self.root)

    def bodystructure(self, extended: bool) -> bytes:
        """BODYSTRUCTURE (``extended``, with extension data) or BODY, serialized."""
        self._require_complete("BODYSTRUCTURE")
        return _structure(self.root, extended)

    # -- SEARCH

    def header_values(self, name: str) -> list[str]:
        """Each ``name`` field's value of the message header, unfolded and RFC 2047 decoded, for SEARCH."""
        key = name.lower()
        return [_decode_words(_text(_field_value(raw))) for fname, raw in self.root.fields if fname == key]

    def sent_date(self) -> datetime.date | None:
        """The Date: field's day, in its own time zone (RFC 3501 SENTBEFORE/SENTON/SENTSINCE); None if unreadable."""
        value = self.root.raw_value("date")
        if value is None:
            return None
        try:
            return email.utils.parsedate_to_datetime(_text(value)).date()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None

    def body_contains(self, source: IO[bytes], needle: str) -> bool:
        """SEARCH BODY: whether the text of the body holds ``needle`` (case-insensitive). Blocking.

        As Dovecot searches: text parts decoded (base64, quoted-printable,
        their charset); no header, not even an encapsulated message's; no
        other part (images, archives).
        """
        self._require_complete("SEARCH BODY")
        wanted = needle.casefold()
        if not wanted:
            return True
        for part in self.root.walk():
            if part.children or part.message is not None or part.header_end < 0:
                continue
            # (A multipart whose boundary never came is text, as BODYSTRUCTURE shows it.)
            if part.content_type[0] not in ("text", "message", "multipart"):
                continue
            if _stream_contains(source, part, wanted):
                return True
        return False

    def text_contains(self, source: IO[bytes], needle: str) -> bool:
        """SEARCH TEXT: ``needle`` in any header (the message's, each part's, each encapsulated message's) or the body. Blocking."""
        self._require_complete("SEARCH TEXT")
        wanted = needle.casefold()
        for part in self.root.walk():
            text = "\n".join(f"{_text(raw.partition(b':')[0])}: {_decode_words(_text(_field_value(raw)))}" for _, raw in part.fields)
            if wanted in text.casefold():
                return True
        return self.body_contains(source, needle)

    # -- FETCH sections

    def part(self, numbers: tuple[int, ...]) -> MimePart | None:
        """The part ``1.2.3`` names (RFC 3501 6.4.5), None if the message has none such.

        Part 1 of what is not a multipart is that part itself (its body), as
        RFC 3501 says of a non-multipart message and Dovecot does of every part.
        """
        self._require_complete("a part number")
        current = self.root
        # Whether ``current`` is the whole message or one encapsulated message.
        message = True
        for number in numbers:
            if current.message is not None and not message:
                current = current.message
                message = True
            if current.children:
                if number > len(current.children):
                    return None
                current = current.children[number - 1]
                message = False
            elif number == 1 and not current.is_multipart:
                message = False
            else:
                return None
        return current

    def section(self, spec: SectionSpec) -> Section:
        """The octets ``spec`` names: empty for a part the message does not have, as Dovecot answers."""
        if not spec.part:
            target = self.root
            if spec.kind == "":
                return Section(0, self.size)
        else:
            found = self.part(spec.part)
            if found is None:
                return Section(data=b"")
            if spec.kind == "":
                return found.body_section()
            if spec.kind == "MIME":
                return found.header_section()
            if found.message is None:
                # HEADER and TEXT of a part that is no message/rfc822: none.
                return Section(data=b"")
            target = found.message
        if spec.kind == "TEXT":
            return target.body_section()
        if spec.kind == "HEADER":
            return target.header_section()
        if spec.kind == "MIME":
            return target.header_section()
        return Section(data=self._fields_of(target, spec))

    @staticmethod
    def _fields_of(part: MimePart, spec: SectionSpec) -> bytes:
        wanted = {name.lower() for name in spec.fields}
        keep = spec.kind == "HEADER.FIELDS"
        chosen = [raw for name, raw in part.fields if (name in wanted) == keep and name]
        out = b"".join(raw if raw.endswith(b"\n") else raw + b"\r\n" for raw in chosen)
        return out + b"\r\n"


def _envelope(part: MimePart) -> bytes:
    value = part.raw_value
    # headerregistry takes ~0.3 ms an address field: From is parsed once for Sender and Reply-To too.
    parsed: dict[bytes | None, bytes] = {}

    def addresses(raw: bytes | None) -> bytes:
        if raw not in parsed:
            parsed[raw] = _address_list(raw)
        return parsed[raw]

    sender_from = value("from")
    items = [
        nstring(value("date")),
        nstring(value("subject")),
        addresses(sender_from),
        addresses(value("sender") or sender_from),
        addresses(value("reply-to") or sender_from),
        addresses(value("to")),
        addresses(value("cc")),
        addresses(value("bcc")),
        nstring(value("in-reply-to")),
        nstring(value("message-id")),
    ]
    return b"(" + b" ".join(items) + b")"


def _param_list(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(imap_string(name) + b" " + imap_string(value) for name, value in params) + b")"


def _extension(part: MimePart) -> list[bytes]:
    """Content-Disposition, Content-Language and Content-Location (RFC 3501 7.4.2 body-ext)."""
    disposition = b"NIL"
    raw = part.raw_value("content-disposition")
    if raw:
        kind, params = _params("content-disposition", raw)
        if kind:
            disposition = b"(" + imap_string(kind) + b" " + _param_list(params) + b")"
    language = b"NIL"
    raw = part.raw_value("content-language")
    if raw:
        tags = [tag.strip() for tag in _text(raw).split(",") if tag.strip()]
        if tags:
            # A list even of one, as Dovecot sends it.
            language = b"(" + b" ".join(imap_string(tag) for tag in tags) + b")"
    return [disposition, language, nstring(part.raw_value("content-location"))]


def _empty_text(extended: bool) -> bytes:
    return b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0' + (b" NIL NIL NIL NIL)" if extended else b")")


def _structure(part: MimePart, extended: bool) -> bytes:
    maintype, subtype, params = part.content_type
    written_type, written_subtype = part.written_type
    if part.children:
        items = [b"".join(_structure(child, extended) for child in part.children), imap_string(written_subtype)]
        if extended:
            items.append(_param_list(params))
            items.extend(_extension(part))
        return b"(" + b" ".join(items) + b")"
    if maintype == "multipart":
        # A multipart whose boundary never came: one empty text part, as
        # Dovecot shows it (RFC 3501's body-type-mpart needs one at least).
        items = [_empty_text(extended), imap_string(written_subtype)]
        if extended:
            items.append(_param_list(params))
            items.extend(_extension(part))
        return b"(" + b" ".join(items) + b")"
    if maintype == "text" and param(params, "charset") is None:
        # RFC 2045 5.2's default, said as Dovecot says it.
        params = [*params, ("charset", "us-ascii")]
    items = [
        imap_string(written_type),
        imap_string(written_subtype),
        _param_list(params),
        nstring(part.raw_value("content-id")),
        nstring(part.raw_value("content-description")),
        imap_string(part.written_encoding),
        b"%d" % part.size,
    ]
    if part.message is not None:
        items += [_envelope(part.message), _structure(part.message, extended), b"%d" % part.body_lines]
    elif (maintype, subtype) == ("message", "rfc822"):
        # Not read (encoded, or nested too deep): RFC 3501's grammar still
        # wants an envelope and a body; Dovecot's are empty too.
        items += [b"(" + b" ".join([b"NIL"] * 10) + b")", _empty_text(extended), b"%d" % part.body_lines]
    elif maintype == "text":
        items.append(b"%d" % part.body_lines)
    if extended:
        items.append(nstring(part.raw_value("content-md5")))
        items.extend(_extension(part))
    return b"(" + b" ".join(items) + b")"


# --- streaming search -----------------------------------------------------


def _stream_contains(source: IO[bytes], part: MimePart, wanted: str) -> bool:
    """Whether ``part``'s body, decoded, holds ``wanted`` (already casefolded)."""
    charset = param(part.content_type[2], "charset") or "us-ascii"
    try:
        # bytes.decode refuses what is no text encoding ("zlib_codec", "base64"):
        # a charset parameter must not pick a decompressor.
        b"a".decode(charset, "replace")
        decoder = codecs.getincrementaldecoder(charset)(errors="replace")
    except (LookupError, ValueError, TypeError):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if isinstance(decoder, codecs.IncrementalDecoder) and charset.lower().replace("_", "-") in ("us-ascii", "ascii"):
        # Mislabelled 8-bit text is common: read it as UTF-8 rather than as "?"s.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    transfer = part.encoding
    keep = max(0, len(wanted) - 1)
    tail = ""
    pending = b""
    for chunk in part.body_section().chunks(source):
        data = pending + chunk
        pending = b""
        if transfer == "base64":
            data = data.translate(None, b" \t\r\n")
            cut = len(data) - len(data) % 4
            data, pending = data[:cut], data[cut:]
            try:
                data = binascii.a2b_base64(data)
            except (binascii.Error, ValueError):
                data = b""
        elif transfer == "quoted-printable":
            cut = data.rfind(b"\n") + 1
            data, pending = data[:cut], data[cut:]
            data = binascii.a2b_qp(data)
        try:
            text = tail + decoder.decode(data).casefold()
        except UnicodeError:
            # UTF-16 without a byte order mark raises whatever the error handler.
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text = tail + decoder.decode(data).casefold()
        if wanted in text:
            return True
        tail = text[-keep:] if keep else ""
    if pending:
        if transfer == "quoted-printable":
            pending = binascii.a2b_qp(pending)
        elif transfer == "base64":
            try:
                pending = binascii.a2b_base64(pending + b"==")
            except (binascii.Error, ValueError):
                pending = b""
    try:
        text = tail + decoder.decode(pending, final=True).casefold()
    except UnicodeError:
        text = tail + pending.decode("utf-8", "replace").casefold()
    return wanted in text
