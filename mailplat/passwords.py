"""Password hashes in Dovecot's ``{SCHEME}hash`` notation.

New hashes are argon2id; ``{BLF-CRYPT}`` (bcrypt) verifies so that users can
be migrated from Dovecot; ``{PLAIN}`` verifies only where an admin opted in.
"""

from __future__ import annotations

import functools
import hmac
from typing import Any

import argon2
import bcrypt

__all__ = ["UnsupportedScheme", "hash_password", "scheme_of", "verify_password", "verify_in_thread", "SCHEMES"]

SCHEMES = ("ARGON2ID", "BLF-CRYPT", "PLAIN")

_hasher = argon2.PasswordHasher()


@functools.cache
def _dummy() -> str:
    """Verified against when a user does not exist, so that the answer takes
    as long as for a real user and timing does not reveal who has an account."""
    return _hasher.hash("mailplat timing equaliser")


class UnsupportedScheme(ValueError):
    """A stored hash whose scheme we do not know or may not use."""


def hash_password(password: str) -> str:
    """A new argon2id hash, with its scheme prefix."""
    return "{ARGON2ID}" + _hasher.hash(password)


def scheme_of(stored: str) -> str:
    """The scheme name of a stored hash, or UnsupportedScheme."""
    if stored.startswith("{"):
        scheme, _, _ = stored[1:].partition("}")
        if scheme.upper() in SCHEMES:
            return scheme.upper()
        raise UnsupportedScheme(f"unknown password scheme {{{scheme}}}; known: {', '.join(SCHEMES)}")
    if stored.startswith("$argon2id$"):
        return "ARGON2ID"
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        return "BLF-CRYPT"
    raise UnsupportedScheme("the hash has no {SCHEME} prefix and is not argon2id or bcrypt")


def verify_password(stored: str | None, password: str, allow_plain: bool = False) -> bool:
    """Whether ``password`` matches ``stored``; slow on purpose: call it off the reactor.

    ``stored`` None means "no such user": a dummy hash is checked anyway.
    """
    if stored is None:
        _verify_argon2(_dummy(), password)
        return False
    scheme = scheme_of(stored)
    digest = stored.split("}", 1)[1] if stored.startswith("{") else stored
    if scheme == "ARGON2ID":
        return _verify_argon2(digest, password)
    if scheme == "BLF-CRYPT":
        try:
            # bcrypt uses only the first 72 bytes; Dovecot's crypt() drops the
            # rest, while bcrypt>=5 raises for longer passwords: truncate.
            return bcrypt.checkpw(password.encode("utf-8")[:72], digest.replace("$2y$", "$2b$", 1).encode("ascii"))
        except ValueError:
            return False
    if scheme == "PLAIN" and allow_plain:
        return hmac.compare_digest(digest.encode("utf-8"), password.encode("utf-8"))
    _verify_argon2(_dummy(), password)
    return False


def _verify_argon2(digest: str, password: str) -> bool:
    try:
        return _hasher.verify(digest, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def verify_in_thread(reactor: Any, pool: Any, stored: str | None, password: str, allow_plain: bool = False) -> Any:
    """``verify_password`` in ``pool`` (the service's ``passwords`` pool), as a Deferred.

    argon2id takes tens of milliseconds of CPU by design: in the reactor's
    shared pool a burst of logins would queue every mailbox write and queue
    fsync behind it.
    """
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, pool, verify_password, stored, password, allow_plain)
