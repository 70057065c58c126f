"""Checking a backend's options: the steps every backend's ``build`` repeats.

Built-in backends use these, and a plugin may too.  Each raises
:class:`~mailplat.config.ConfigError` naming the key, which mailplat places
in the file and section.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from twisted.internet.endpoints import clientFromString

from mailplat.config import ConfigError

__all__ = ["client_endpoint", "refuse_unknown"]


def refuse_unknown(options: dict[str, Any], known: Sequence[str], backend: str) -> None:
    """Refuse whatever ``build`` left in ``options``: a typo gets a "did you mean"."""
    for key in options:
        hint = difflib.get_close_matches(key, known, n=1)
        known_keys = f"{backend} knows: {', '.join(known)}" if known else f"{backend} takes no options"
        raise ConfigError(key, "unknown key", f"did you mean {hint[0]!r}?" if hint else known_keys)


def client_endpoint(options: dict[str, Any], reactor: Any, default: str | None, examples: str) -> tuple[str, Any]:
    """Pop ``address``, a Twisted client endpoint string; (the string, the endpoint).

    ``default`` None makes it required; ``examples`` is the fix shown.
    """
    address = options.pop("address", default)
    if address is None:
        raise ConfigError("address", "is required", examples)
    if not isinstance(address, str) or not address:
        raise ConfigError("address", f"must be a Twisted client endpoint string, not {address!r}", examples)
    try:
        return address, clientFromString(reactor, address)
    except Exception as e:
        raise ConfigError("address", f"{address!r} is not a client endpoint: {type(e).__name__}: {e}", examples)
