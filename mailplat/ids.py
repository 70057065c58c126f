"""Session and message ids: one kind of id in every log line."""

from __future__ import annotations

import secrets

__all__ = ["new_id"]


def new_id() -> str:
    """A short random id for a session or a message, as Postfix's queue ids."""
    return secrets.token_hex(5).upper()
