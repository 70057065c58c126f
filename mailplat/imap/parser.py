"""IMAP command syntax (RFC 3501 9, RFC 9051 9): from a command's lines and literals to tokens.

The server reads a command as lines (CommandReader) and literals (raw
mode); each line that ends with a literal announcement ``{n}``, ``{n+}``
(RFC 7888) or ``~{n}`` (RFC 3516) is followed by exactly n octets, then the
command goes on on the next line.  :func:`literal_announced` says what a
line announces, before a single octet of the literal is read, so that an
oversized one is refused without reading or allocating it; once the
command is complete, :func:`parse_command` turns its pieces into tokens.

Tokens (the command modules code against exactly this):

- an atom (``*``, ``\\Seen``, ``1:3,7``, ``NIL``, a number) is a ``str``;
- a quoted string or a literal is ``bytes`` (a literal spooled to a file,
  APPEND's message, is a :class:`FileLiteral`);
- a parenthesized list is a ``list`` of tokens;
- a fetch attribute with brackets is one ``str`` atom exactly as written,
  spaces and parentheses inside the brackets included, with its partial
  suffix: ``BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]<0.100>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

__all__ = ["Announcement", "Command", "FileLiteral", "ParseError", "Token", "literal_announced", "parse_command", "quoted", "tag_and_name"]


@dataclass(frozen=True)
class FileLiteral:
    """A literal that was written to a file as it arrived (an APPEND's message)."""

    path: str
    size: int


Token = Union[str, bytes, FileLiteral, list]  # a list holds tokens


@dataclass(frozen=True)
class Announcement:
    """The literal a command line ends with: its size, and whether the client waits for ``+``."""

    size: int
    synchronizing: bool
    binary: bool


@dataclass(frozen=True)
class Command:
    tag: str
    name: str
    arguments: list[Token]


class ParseError(ValueError):
    """The command is malformed: the server answers BAD with this text (``tag`` is "" when none was readable)."""

    def __init__(self, text: str, tag: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.tag = tag


# A literal announcement at the very end of a line.  More than 20 digits is
# no size anyone sends: refused as malformed rather than turned into an int.
_ANNOUNCEMENT = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")
# RFC 3501 9: tag = 1*<any ASTRING-CHAR except "+">.
_TAG = re.compile(rb"[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+")
# What ends an atom: space, controls, list and quoting characters.  "[" is
# taken up to its "]" with whatever is inside (fetch attributes).
_ATOM_END = frozenset(b' (){"\x7f') | frozenset(range(0x20))


def literal_announced(line: bytes) -> Announcement | None:
    """The literal ``line`` announces at its end, or None."""
    m = _ANNOUNCEMENT.search(line)
    if m is None:
        return None
    return Announcement(int(m.group(2)), synchronizing=not m.group(3), binary=bool(m.group(1)))


def tag_and_name(line: bytes) -> tuple[str, str]:
    """The tag and upper-cased command name of a command's first line ("" when not readable)."""
    parts = line.split(b" ", 2)
    tag = parts[0].decode("ascii") if _TAG.fullmatch(parts[0]) and parts[0] != b"*" else ""
    name = parts[1].upper().decode("ascii", "replace") if len(parts) > 1 and parts[1].isalpha() else ""
    return tag, name


def parse_command(pieces: list[bytes | FileLiteral]) -> Command:
    """A whole command: its lines (without CRLF), each but the last followed by its literal.

    ``pieces`` alternates line, literal, line, ...: a line announcing a
    literal is followed by the literal's content (bytes or a FileLiteral).
    """
    first = pieces[0]
    assert isinstance(first, bytes)
    tag, name = tag_and_name(first)
    if not tag:
        raise ParseError("Missing or invalid tag")
    if not name:
        raise ParseError("Missing or invalid command name", tag)
    start = len(first.split(b" ", 2)[0]) + 1 + len(name)
    scanner = _Scanner(pieces, start)
    try:
        arguments = scanner.arguments()
    except ParseError as e:
        raise ParseError(e.text, tag)
    return Command(tag, name, arguments)


class _Scanner:
    """Walks the lines of a command, stepping into each literal where a line announces it."""

    def __init__(self, pieces: list[bytes | FileLiteral], start: int) -> None:
        self.pieces = pieces
        self.index = 0
        line = pieces[0]
        assert isinstance(line, bytes)
        self.line = line
        self.pos = start

    def arguments(self) -> list[Token]:
        tokens: list[Token] = []
        while True:
            if self._at_end():
                return tokens
            self._space()
            if self._at_end():
                raise ParseError("Extra space at the end of the command")
            tokens.append(self._token(depth=0))

    def _at_end(self) -> bool:
        return self.pos >= len(self.line) and self.index == len(self.pieces) - 1

    def _space(self) -> None:
        if self.pos >= len(self.line) or self.line[self.pos] != 0x20:
            raise ParseError("Expected a space between arguments")
        self.pos += 1

    def _token(self, depth: int) -> Token:
        if self.pos >= len(self.line):
            raise ParseError("Missing argument")
        c = self.line[self.pos]
        if c == 0x28:  # (
            if depth > 8:
                raise ParseError("Lists nested too deep")
            self.pos += 1
            items: list[Token] = []
            while True:
                if self.pos >= len(self.line):
                    raise ParseError("Missing ')'")
                if self.line[self.pos] == 0x29:  # )
                    self.pos += 1
                    return items
                if items:
                    self._space()
                items.append(self._token(depth + 1))
        if c == 0x22:  # "
            return self._quoted()
        if c == 0x7B or (c == 0x7E and self.line[self.pos + 1 : self.pos + 2] == b"{"):  # { or ~{
            return self._literal()
        return self._atom()

    def _quoted(self) -> bytes:
        out = bytearray()
        i = self.pos + 1
        line = self.line
        while i < len(line):
            c = line[i]
            if c == 0x22:
                self.pos = i + 1
                return bytes(out)
            if c == 0x5C:  # backslash: only \" and \\ are escapes
                i += 1
                if i >= len(line) or line[i] not in (0x22, 0x5C):
                    raise ParseError("Invalid escape in a quoted string")
                c = line[i]
            elif c == 0:
                raise ParseError("NUL in a quoted string")
            out.append(c)
            i += 1
        raise ParseError("Missing closing quote")

    def _literal(self) -> bytes | FileLiteral:
        m = _ANNOUNCEMENT.match(self.line, self.pos)
        if m is None or m.end() != len(self.line) or self.index + 2 >= len(self.pieces):
            raise ParseError("A literal must end its line: {size}")
        content: bytes | FileLiteral = self.pieces[self.index + 1]
        following = self.pieces[self.index + 2]
        assert isinstance(following, bytes)
        self.index += 2
        self.line = following
        self.pos = 0
        return content

    def _atom(self) -> str:
        line = self.line
        start = i = self.pos
        while i < len(line):
            c = line[i]
            if c == 0x5B:  # [ ... ] is part of the atom, whatever is inside
                end = line.find(b"]", i)
                if end < 0:
                    raise ParseError("Missing ']'")
                i = end + 1
                continue
            if c in _ATOM_END:
                break
            i += 1
        if i == start:
            raise ParseError(f"Unexpected character {chr(line[i])!r}" if 0x20 < line[i] < 0x7F else "Unexpected character")
        self.pos = i
        try:
            return line[start:i].decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError("An atom must be UTF-8")


def quoted(value: str | bytes) -> str:
    """``value`` as an IMAP string: quoted, or a literal when it holds CR, LF or NUL
    (which a quoted string cannot), so that no value can break a response line."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if any(c in text for c in "\r\n\0"):
        return f"{{{len(text.encode('utf-8'))}}}\r\n{text}"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
