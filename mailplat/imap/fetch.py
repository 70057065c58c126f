"""FETCH (RFC 3501 6.4.5, RFC 9051 6.4.5, RFC 7162 MODSEQ): what was asked, and the answer for one message.

:meth:`FetchRequest.parse` reads the command's argument as the server's
parser gives it (an atom is a ``str``, brackets and all; a parenthesized
list is a ``list``) and says what the server must get first: the message
file (:attr:`~FetchRequest.needs_message`), its structure
(:attr:`~FetchRequest.needs_structure`, a :meth:`MessageParts.read` in a
thread), whether it must set ``\\Seen`` first (:attr:`~FetchRequest.sets_seen`).
:func:`render` then builds the ``* n FETCH (...)`` response, whose
:meth:`FetchResponse.chunks` stream the literals from the file in reads of
at most 64 KiB: a 100 MB BODY[] never sits in memory.  A whole message of
at most :data:`WHOLE_READ` is read in one go and its response is one piece.

For each FETCH the server does, in order::

    request = FetchRequest.parse(tokens)                  # ValueError -> BAD
    if request.sets_seen: store \\Seen on the unseen ones   # then flags_changed=True
    for each message:
        source = await store.read(...)   if request.needs_message
        parts = await in_thread(MessageParts.read, source)   if request.needs_structure
            (with header_only=True when request.header_only: only the header is read)
        response = render(request, msn, info, source, parts, add_uid=..., add_modseq=...)
        send response.chunks(), then close source
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from mailplat.interfaces import MessageInfo
from mailplat.imap.message import MessageParts, Section, SectionSpec
from mailplat.numerals import is_digits

__all__ = ["FetchItem", "FetchRequest", "FetchResponse", "format_flags", "format_internal_date", "render"]

_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SIMPLE = {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE", "MODSEQ"}
# The RFC822 forms are BODY sections under their own names (RFC 3501 6.4.5).
_RFC822 = {
    "RFC822": (SectionSpec(), True),
    "RFC822.HEADER": (SectionSpec(kind="HEADER"), False),
    "RFC822.TEXT": (SectionSpec(kind="TEXT"), True),
}
# A whole message (BODY[], RFC822) of at most this is read at once and sent in one piece.
WHOLE_READ = 64 * 1024
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class FetchItem:
    """One data item: ``name`` (FLAGS, BODY[], ...) and, for a section, what it names and how to label it."""

    name: str
    section: SectionSpec | None = None
    # <origin.length>
    partial: tuple[int, int] | None = None
    # What the response calls it: "BODY[HEADER.FIELDS (From)]<0>", "RFC822.HEADER".
    label: str = ""
    sets_seen: bool = False


def _partial(text: str) -> tuple[int, int]:
    if not (text.startswith("<") and text.endswith(">")):
        raise ValueError(f"invalid partial: {text[:40]}")
    origin, dot, length = text[1:-1].partition(".")
    if not (dot and is_digits(origin) and is_digits(length)):
        raise ValueError(f"invalid partial, expected <origin.length>: {text[:40]}")
    if int(length) == 0:
        raise ValueError("the length of a partial must not be 0")
    return int(origin), int(length)


def _parse_item(text: str) -> FetchItem:
    upper = text.upper()
    if upper in _SIMPLE:
        return FetchItem(upper, label=upper)
    if upper in _RFC822:
        spec, seen = _RFC822[upper]
        return FetchItem(upper, spec, label=upper, sets_seen=seen)
    name, bracket, rest = text.partition("[")
    name = name.upper()
    if not bracket or name not in ("BODY", "BODY.PEEK"):
        if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
            raise ValueError(f"{name} is not supported")
        raise ValueError(f"unknown FETCH item: {text[:60]}")
    inside, close, after = rest.rpartition("]")
    if not close:
        raise ValueError(f"missing ] in {text[:60]}")
    spec = SectionSpec.parse(inside)
    partial = _partial(after) if after else None
    # Labelled as Dovecot does, in upper case ("HEADER.FIELDS (FROM)"), whatever the case asked.
    label = f"BODY[{spec}]" + (f"<{partial[0]}>" if partial else "")
    return FetchItem("BODY", spec, partial, label, sets_seen=name == "BODY")


@dataclass(frozen=True)
class FetchRequest:
    """The items of one FETCH, and what the server must do before it can answer."""

    items: tuple[FetchItem, ...]
    # RFC 7162 FETCH modifiers: (CHANGEDSINCE n) and, with QRESYNC, VANISHED.
    changed_since: int | None = None
    vanished: bool = False

    @classmethod
    def parse(cls, tokens: list[Any]) -> FetchRequest:
        """The FETCH argument after the sequence set; ValueError with a text for BAD.

        Either the atoms themselves (``["ALL"]``, ``["FLAGS", "UID"]``), or the
        argument as tokens: ``["FLAGS"]`` or ``[["UID", "BODY.PEEK[]"]]``,
        optionally followed by the RFC 7162 modifier list
        (``[["FLAGS"], ["CHANGEDSINCE", "12"]]``).  A macro (ALL, FAST, FULL)
        in a list is expanded too, though RFC 3501 lets it stand only alone.
        """
        if not tokens:
            raise ValueError("FETCH needs data items")
        names: list[str] = []
        if all(isinstance(t, str) for t in tokens):
            atoms, rest = list(tokens), []
        elif isinstance(tokens[0], (str, list)) and len(tokens) <= 2:
            atoms = [tokens[0]] if isinstance(tokens[0], str) else list(tokens[0])
            rest = tokens[1:]
        else:
            raise ValueError("FETCH items are atoms, alone or in a parenthesized list")
        if not atoms:
            raise ValueError("empty FETCH item list")
        for atom in atoms:
            if not isinstance(atom, str):
                raise ValueError("FETCH items are atoms")
            names.extend(_MACROS.get(atom.upper(), (atom,)))
        changed_since: int | None = None
        vanished = False
        if rest:
            modifiers = rest[0]
            if not isinstance(modifiers, list) or not modifiers:
                raise ValueError("FETCH modifiers are a parenthesized list")
            i = 0
            while i < len(modifiers):
                word = modifiers[i]
                if not isinstance(word, str):
                    raise ValueError("invalid FETCH modifier")
                if word.upper() == "CHANGEDSINCE" and i + 1 < len(modifiers):
                    value = modifiers[i + 1]
                    if not (isinstance(value, str) and is_digits(value) and int(value) < 2**63):
                        raise ValueError("CHANGEDSINCE needs a mod-sequence value")
                    changed_since = int(value)
                    i += 2
                elif word.upper() == "VANISHED":
                    vanished = True
                    i += 1
                else:
                    raise ValueError(f"unknown FETCH modifier: {word[:40]}")
            if vanished and changed_since is None:
                raise ValueError("VANISHED needs CHANGEDSINCE")
        items: dict[str, FetchItem] = {}
        for name in names:
            item = _parse_item(name)
            # The same item twice is answered once.
            items.setdefault(item.label.upper(), item)
        return cls(tuple(items.values()), changed_since, vanished)

    @property
    def needs_message(self) -> bool:
        """Whether the answer reads the message file (else MessageInfo suffices)."""
        return any(item.name not in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "MODSEQ") for item in self.items)

    @property
    def needs_structure(self) -> bool:
        """Whether the answer needs :meth:`MessageParts.read` (all but FLAGS-like items and whole-message sections)."""
        for item in self.items:
            if item.name in ("ENVELOPE", "BODY", "BODYSTRUCTURE") and item.section is None:
                return True
            if item.section is not None and (item.section.part or item.section.kind):
                return True
        return False

    @property
    def header_only(self) -> bool:
        """Whether ``MessageParts.read(source, header_only=True)`` suffices: ENVELOPE and sections of the
        message header or text only (what a client's first sync asks of every message), so that the body
        of a large message is not read at all."""
        if not self.needs_structure:
            return False
        for item in self.items:
            if item.name in ("BODY", "BODYSTRUCTURE") and item.section is None:
                return False
            if item.section is not None and item.section.part:
                return False
        return True

    @property
    def sets_seen(self) -> bool:
        """Whether the server must set \\Seen before answering (BODY[...], RFC822, RFC822.TEXT; not PEEK)."""
        return any(item.sets_seen for item in self.items)

    @property
    def wants_modseq(self) -> bool:
        """Whether MODSEQ was asked, or CHANGEDSINCE given (RFC 7162 3.1.4.1: both imply CONDSTORE)."""
        return self.changed_since is not None or any(item.name == "MODSEQ" for item in self.items)

    @property
    def wants_uid(self) -> bool:
        return any(item.name == "UID" for item in self.items)


def format_internal_date(when: float) -> str:
    """RFC 3501 date-time, in UTC: ``"17-Jul-1996 09:44:25 +0000"``."""
    t = time.gmtime(when)
    return f"{t.tm_mday:2d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


def format_flags(flags: frozenset[str] | set[str], recent: bool = False) -> str:
    """``(\\Seen $Junk)``: system flags first, then keywords, each in a stable order."""
    ordered = sorted(flags, key=lambda f: (not f.startswith("\\"), f.lower()))
    if recent and "\\Recent" not in flags:
        ordered.insert(0, "\\Recent")
    return "(" + " ".join(ordered) + ")"


# One attribute of a response: its text, or a label whose value is a literal read from the file.
_Attribute = bytes | tuple[bytes, Section, IO[bytes]]


@dataclass
class FetchResponse:
    """One ``* n FETCH (...)`` response, produced lazily: literals are read from the message file as they go out."""

    msn: int
    attributes: list[_Attribute] = field(default_factory=list)

    def chunks(self) -> Iterator[bytes]:
        """The response, from ``* n FETCH`` to its final CRLF, in pieces of at most 64 KiB of message data.

        A response whose literals are small or already in memory (a whole
        message of at most :data:`WHOLE_READ`) is one piece: one write, where
        a literal read from the file would be three."""
        pieces = [b"* %d FETCH (" % self.msn]
        for i, attribute in enumerate(self.attributes):
            if i:
                pieces.append(b" ")
            if isinstance(attribute, bytes):
                pieces.append(attribute)
                continue
            label, section, source = attribute
            pieces.append(label + b" {%d}\r\n" % section.size)
            if section.data is not None:
                pieces.append(section.data)
                continue
            if section.size <= 4096:
                pieces.append(section.read(source))
                continue
            yield b"".join(pieces)
            pieces = []
            yield from section.chunks(source)
        pieces.append(b")\r\n")
        yield b"".join(pieces)

    def value(self) -> bytes:
        """All of it at once: for tests and small answers."""
        return b"".join(self.chunks())


def _whole(source: IO[bytes], size: int) -> Section:
    """The whole message: its octets when it is small (one read, no seeks: a
    FETCH of many small messages is mostly this), else its range of the file.
    ``size`` is what the store says (RFC822.SIZE): only a hint of which it is."""
    if size <= WHOLE_READ:
        data = _read_small(source)
        if data is not None:
            return Section(data=data)
    source.seek(0, 2)
    return Section(0, source.tell())


def _read_small(source: IO[bytes]) -> bytes | None:
    """The file from its start, when it holds at most :data:`WHOLE_READ` octets."""
    if source.tell() != 0:
        source.seek(0)
    data = source.read(WHOLE_READ + 1)
    if not isinstance(source, io.BufferedIOBase):
        # A raw file may return less than asked before its end.
        while 0 < len(data) <= WHOLE_READ:
            more = source.read(WHOLE_READ + 1 - len(data))
            if not more:
                break
            data += more
    return data if len(data) <= WHOLE_READ else None


def render(
    request: FetchRequest,
    msn: int,
    info: MessageInfo,
    source: IO[bytes] | None,
    parts: MessageParts | None,
    *,
    add_uid: bool,
    add_modseq: bool,
    flags_changed: bool = False,
    recent: bool = False,
) -> FetchResponse:
    """The FETCH response for message ``msn``.

    ``source`` must be given (open, seekable) when ``request.needs_message``,
    and ``parts`` when ``request.needs_structure``; the response reads from
    ``source`` while its chunks are consumed, so close it after.
    ``add_uid`` adds UID (UID FETCH), ``add_modseq`` MODSEQ (CONDSTORE on and
    CHANGEDSINCE given); ``flags_changed`` adds FLAGS when this fetch set
    \\Seen (RFC 3501 6.4.5); ``recent`` adds \\Recent to the flags.
    """
    names = [item.name for item in request.items]
    attributes: list[_Attribute] = []

    def text(label: str, value: bytes) -> None:
        attributes.append(label.encode("ascii") + b" " + value)

    if add_uid and "UID" not in names:
        text("UID", b"%d" % info.uid)
    for item in request.items:
        name = item.name
        if name == "UID":
            text("UID", b"%d" % info.uid)
        elif name == "FLAGS":
            text("FLAGS", format_flags(info.flags, recent).encode("utf-8"))
        elif name == "INTERNALDATE":
            text("INTERNALDATE", b'"' + format_internal_date(info.internal_date).encode("ascii") + b'"')
        elif name == "RFC822.SIZE":
            text("RFC822.SIZE", b"%d" % info.size)
        elif name == "MODSEQ":
            text("MODSEQ", b"(%d)" % info.modseq)
        elif item.section is None:
            # ENVELOPE, BODY, BODYSTRUCTURE
            if parts is None:
                raise ValueError(f"{name} needs the message's structure")
            text(name, parts.envelope() if name == "ENVELOPE" else parts.bodystructure(name == "BODYSTRUCTURE"))
        else:
            if source is None:
                raise ValueError(f"{item.label} needs the message")
            if not item.section.part and not item.section.kind:
                section = _whole(source, info.size)
            elif parts is None:
                raise ValueError(f"{item.label} needs the message's structure")
            else:
                section = parts.section(item.section)
            if item.partial is not None:
                section = section.window(*item.partial)
            attributes.append((item.label.encode("ascii"), section, source))
    if flags_changed and "FLAGS" not in names:
        text("FLAGS", format_flags(info.flags, recent).encode("utf-8"))
    if add_modseq and "MODSEQ" not in names:
        text("MODSEQ", b"(%d)" % info.modseq)
    return FetchResponse(msn, attributes)
