"""What an IMAP store accepts as a folder name and as a flag, in one place.

Every store (the maildir, postgres, a third party's) refuses the same names
and flags the same way, so that a client meets one behaviour whichever
store an admin chose; a store may refuse more (the maildir refuses "." in a
level, its separator on disk).
"""

from __future__ import annotations

from collections.abc import Iterable

from mailplat.interfaces import FLAG_ANSWERED, FLAG_DELETED, FLAG_DRAFT, FLAG_FLAGGED, FLAG_SEEN, INBOX, PermanentFailure
from mailplat.wire.lines import printable

__all__ = ["MAX_LEVEL", "SYSTEM_FLAGS", "canonical_flags", "folder_levels", "shown"]

# Characters of one level: a filesystem's NAME_MAX.
MAX_LEVEL = 255
# RFC 3501 9: flag names match without case; stored as RFC 3501 spells them.
SYSTEM_FLAGS = {flag.lower(): flag for flag in (FLAG_SEEN, FLAG_ANSWERED, FLAG_FLAGGED, FLAG_DELETED, FLAG_DRAFT)}
_ATOM_SPECIALS = frozenset('(){%*"\\]')


def shown(name: str) -> str:
    """A name from a client, safe to put in a reply or a log line."""
    return repr(printable(name, 60))


def folder_levels(name: str) -> list[str] | None:
    """The levels of a folder name ("INBOX" spelled so when it is the first),
    None for INBOX itself; PermanentFailure for a name no store holds."""
    if not isinstance(name, str) or not name:
        raise PermanentFailure("a folder needs a name")
    parts = name.split("/")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
        if len(parts) == 1:
            return None
    for part in parts:
        if not part:
            raise PermanentFailure(f"folder name {shown(name)} has an empty level (a / at an end or two in a row)")
        if part in (".", ".."):
            raise PermanentFailure(f'folder name {shown(name)} has a level "." or ".."')
        if len(part) > MAX_LEVEL:
            raise PermanentFailure(f"folder name {shown(name)} has a level of more than {MAX_LEVEL} characters")
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) <= 0xDFFF for c in part):
            raise PermanentFailure(f"folder name {shown(name)} contains a control character")
        if "%" in part or "*" in part:
            raise PermanentFailure(f"folder name {shown(name)} contains a LIST wildcard (% or *)")
    return parts


def canonical_flags(flags: Iterable[str]) -> list[str]:
    """Flags as a store keeps them, sorted: system flags spelled as RFC 3501
    does, each flag once whatever its case, and \\Recent (which no one sets)
    left out.  PermanentFailure for a flag no message can have: another
    backslash flag, or a keyword that is not an atom."""
    found: dict[str, str] = {}
    for flag in sorted(flags):
        lower = flag.lower()
        if lower in SYSTEM_FLAGS:
            flag = SYSTEM_FLAGS[lower]
        elif lower == "\\recent":
            continue
        elif flag.startswith("\\"):
            raise PermanentFailure(f"{printable(flag, 40)} is not a flag a message can have")
        elif not flag or len(flag) > 200 or any(ord(c) <= 0x20 or ord(c) >= 0x7F or c in _ATOM_SPECIALS for c in flag):
            raise PermanentFailure(f"{printable(flag, 40)!r} is not a valid keyword")
        found.setdefault(lower, flag)
    return sorted(found.values())
