"""IMAP sequence sets (RFC 3501 9 ``sequence-set``, RFC 9051 6.4.8): parse, resolve, format.

One set names message sequence numbers or UIDs, as the command says; it
knows nothing of which.  ``*`` is the largest number in use, so ``5:*``
with 3 the largest is ``3:5`` and holds 3 (RFC 9051 6.4.8: "UID 5:*" must
return the last message even when its UID is below 5).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from mailplat.numerals import is_digits

__all__ = ["MAX_NUMBER", "SequenceSet"]

# RFC 3501 9: nz-number is a 32-bit unsigned integer, never 0.
MAX_NUMBER = 2**32 - 1

# A number, or None for "*".
_Bound = int | None


def _number(text: str) -> _Bound:
    if text == "*":
        return None
    if not is_digits(text) or text[0] == "0":
        raise ValueError(f"invalid number in sequence set: {text[:40]!r}")
    number = int(text)
    if number > MAX_NUMBER:
        raise ValueError(f"number out of range in sequence set: {text[:40]}")
    return number


class SequenceSet:
    """A parsed sequence set: ranges whose ends are numbers or ``*``, resolved only against a largest number."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: Iterable[tuple[_Bound, _Bound]]) -> None:
        self.ranges: tuple[tuple[_Bound, _Bound], ...] = tuple(ranges)

    @classmethod
    def parse(cls, text: str) -> SequenceSet:
        """``"1:3,7,9:*"`` (either order within a range); ValueError, with a text fit for BAD, if it is not a sequence set."""
        if not text:
            raise ValueError("empty sequence set")
        ranges: list[tuple[_Bound, _Bound]] = []
        for item in text.split(","):
            low, colon, high = item.partition(":")
            first = _number(low)
            ranges.append((first, _number(high) if colon else first))
        return cls(ranges)

    def _spans(self, largest: int) -> list[tuple[int, int]]:
        """The ranges as sorted, merged (low, high) within 1..largest."""
        spans: list[tuple[int, int]] = []
        if largest <= 0:
            return spans
        for a, b in self.ranges:
            x = largest if a is None else a
            y = largest if b is None else b
            low, high = min(x, y), min(max(x, y), largest)
            if low <= high:
                spans.append((low, high))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            if merged and low <= merged[-1][1] + 1:
                if high > merged[-1][1]:
                    merged[-1] = (merged[-1][0], high)
            else:
                merged.append((low, high))
        return merged

    def resolve(self, largest: int) -> list[int]:
        """The numbers named, sorted and unique, with ``*`` = ``largest``; numbers above ``largest`` are dropped.

        The list holds every number of each range up to ``largest``: for UIDs,
        where ``largest`` may be far above the message count, prefer
        :meth:`select` or :meth:`contains`.
        """
        numbers: list[int] = []
        for low, high in self._spans(largest):
            numbers.extend(range(low, high + 1))
        return numbers

    def select(self, numbers: Iterable[int], largest: int) -> list[int]:
        """Those of ``numbers`` (sorted, unique: UIDs of a folder) that the set names, in their order."""
        spans = self._spans(largest)
        if not spans:
            return []
        lows = [low for low, _ in spans]
        chosen = []
        for n in numbers:
            i = bisect.bisect_right(lows, n) - 1
            if i >= 0 and n <= spans[i][1]:
                chosen.append(n)
        return chosen

    def contains(self, n: int, largest: int) -> bool:
        """Whether the set names ``n``, with ``*`` = ``largest``."""
        if not 1 <= n <= largest:
            return False
        for a, b in self.ranges:
            x = largest if a is None else a
            y = largest if b is None else b
            if min(x, y) <= n <= max(x, y):
                return True
        return False

    def has_star(self) -> bool:
        """Whether ``*`` appears (the server may then need the largest number before answering)."""
        return any(a is None or b is None for a, b in self.ranges)

    @staticmethod
    def format(numbers: Iterable[int]) -> str:
        """``[1, 2, 3, 7]`` as ``"1:3,7"`` (input in any order; duplicates dropped): for COPYUID, APPENDUID, VANISHED, ESEARCH ALL."""
        items: list[str] = []
        ordered = sorted(set(numbers))
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
                j += 1
            items.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
            i = j + 1
        return ",".join(items)

    def __str__(self) -> str:
        def bound(b: _Bound) -> str:
            return "*" if b is None else str(b)

        return ",".join(bound(a) if a == b else f"{bound(a)}:{bound(b)}" for a, b in self.ranges)

    def __repr__(self) -> str:
        return f"SequenceSet({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceSet) and self.ranges == other.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)
