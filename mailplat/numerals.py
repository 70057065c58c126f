"""Numbers written as text by clients, peers and operators: ASCII digits only.

``str.isdigit()`` is true of "²" and "¹", which ``int()`` refuses, and
``int()`` takes "٣", " 3", "+3" and "1_000"; a number on the wire or in the
config is none of these.  Every check that text is a number before
``int()`` reads it goes through :func:`is_digits`.
"""

from __future__ import annotations

__all__ = ["MAX_DIGITS", "is_digits"]

# More digits than any count, size or port needs, and far below the 4300
# that int() refuses to convert.
MAX_DIGITS = 30


def is_digits(text: str) -> bool:
    """Whether ``text`` is 1 to MAX_DIGITS ASCII digits and nothing else, so ``int(text)`` cannot fail."""
    return 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()
