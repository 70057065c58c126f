"""Password hashes in Dovecot's ``{SCHEME}hash`` notation.

New hashes are argon2id; ``{BLF-CRYPT}`` (bcrypt) verifies so that users can
be migrated from Dovecot; ``{PLAIN}`` verifies only where an admin opted in.
"""

from __future__ import annotations

import functools
import hmac
import re
from typing import Any

import argon2
import bcrypt
from twisted.logger import Logger

__all__ = ["MalformedHash", "UnsupportedScheme", "hash_password", "scheme_of", "verify_password", "verify_in_thread", "SCHEMES"]

log = Logger()

SCHEMES = ("ARGON2ID", "BLF-CRYPT", "PLAIN")

_hasher = argon2.PasswordHasher()


@functools.cache
def _dummy() -> str:
    """Verified against when a user does not exist, so that the answer takes
    as long as for a real user and timing does not reveal who has an account."""
    return _hasher.hash("mailplat timing equaliser")


class UnsupportedScheme(ValueError):
    """A stored hash whose scheme we do not know or may not use."""


class MalformedHash(UnsupportedScheme):
    """A stored hash its scheme could not have made: cut short, or holding a character no hash holds."""


# bcrypt's modular crypt form: $2b$, two digits of cost, 22 characters of salt and 31 of hash.
_BCRYPT = re.compile(r"\$2[aby]\$([0-9]{2})\$[./A-Za-z0-9]{53}")
# The most work a stored hash may ask for.  A login runs in the passwords
# pool (one thread per core): a planted hash of bcrypt cost 24, or of an
# argon2 cost of gigabytes or many passes, would hold a thread for minutes
# at every try.  Dovecot's default bcrypt cost is 5 (older) to 12; argon2's
# recommended settings are a few passes over 64 MiB.
MAX_BCRYPT_COST = 16
MAX_ARGON2_MEMORY_KIB = 1024 * 1024
MAX_ARGON2_TIME = 16
MAX_ARGON2_PARALLELISM = 16


def hash_password(password: str) -> str:
    """A new argon2id hash, with its scheme prefix."""
    return "{ARGON2ID}" + _hasher.hash(password)


def scheme_of(stored: str) -> str:
    """The scheme name of a well-formed stored hash; UnsupportedScheme (MalformedHash for a damaged one) says what is wrong."""
    return _split(stored)[0]


def _split(stored: str) -> tuple[str, str]:
    """(scheme, digest) of a stored hash, checked as scheme_of says."""
    if stored.startswith("{"):
        scheme, brace, digest = stored[1:].partition("}")
        if not brace:
            raise MalformedHash("the {SCHEME} prefix has no closing '}'")
        if scheme.upper() not in SCHEMES:
            raise UnsupportedScheme(f"unknown password scheme {{{_printable(scheme)}}}; known: {', '.join(SCHEMES)}")
        scheme = scheme.upper()
    elif stored.startswith("$argon2id$"):
        scheme, digest = "ARGON2ID", stored
    elif stored.startswith(("$2a$", "$2b$", "$2y$")):
        scheme, digest = "BLF-CRYPT", stored
    else:
        raise UnsupportedScheme("the hash has no {SCHEME} prefix and is not argon2id or bcrypt")
    if scheme == "PLAIN":
        return scheme, digest
    if not (digest.isascii() and digest.isprintable()):
        raise MalformedHash(f"the {scheme} hash holds a non-ASCII or control character, which no {scheme} hash has")
    if scheme == "ARGON2ID":
        try:
            parameters = argon2.extract_parameters(digest)
        except argon2.exceptions.InvalidHashError:
            raise MalformedHash("the ARGON2ID hash is not of the form $argon2id$v=19$m=...,t=...,p=...$salt$hash") from None
        if (parameters.memory_cost > MAX_ARGON2_MEMORY_KIB or parameters.time_cost > MAX_ARGON2_TIME
                or parameters.parallelism > MAX_ARGON2_PARALLELISM):
            raise MalformedHash(
                f"the ARGON2ID hash asks for m={parameters.memory_cost},t={parameters.time_cost},p={parameters.parallelism}; "
                f"at most m={MAX_ARGON2_MEMORY_KIB},t={MAX_ARGON2_TIME},p={MAX_ARGON2_PARALLELISM} are accepted "
                "(each login would hold a thread for that long)"
            )
    else:
        found = _BCRYPT.fullmatch(digest)
        if not found:
            raise MalformedHash("the BLF-CRYPT hash is not of the form $2y$NN$ followed by 53 characters")
        if int(found.group(1)) > MAX_BCRYPT_COST:
            raise MalformedHash(
                f"the BLF-CRYPT hash has cost {found.group(1)}; at most {MAX_BCRYPT_COST} is accepted "
                "(each login would hold a thread for that long)"
            )
    return scheme, digest


def _printable(text: str) -> str:
    """``text`` for a log line or an error: control and non-ASCII characters escaped, at most 40 of them."""
    return ascii(text[:40])[1:-1]


def verify_password(stored: str | None, password: str, allow_plain: bool = False, *, account: str = "") -> bool:
    """Whether ``password`` matches ``stored``; slow on purpose: call it off the reactor.

    ``stored`` None means "no such user": a dummy hash is checked anyway.
    Never raises, whatever ``stored`` holds: a hash that cannot be used (an
    unknown scheme, a damaged hash) is logged, naming ``account`` when
    given, and matches no password.
    """
    if stored is None:
        _verify_argon2(_dummy(), password)
        return False
    of = f" of {account}" if account else ""
    try:
        scheme, digest = _split(stored)
        return _verify(scheme, digest, password, allow_plain)
    except UnsupportedScheme as e:
        log.error("the stored password hash{of} is unusable, so the login fails: {problem}", of=of, problem=str(e))
    except Exception:  # argon2 or bcrypt refusing what _split let through: a failed login, never an error on the wire
        log.failure("verifying the stored password hash{of} failed, so the login fails", of=of)
    # As long as a real check, so that timing does not tell a broken hash from a wrong password.
    _verify_argon2(_dummy(), password)
    return False


def _verify(scheme: str, digest: str, password: str, allow_plain: bool) -> bool:
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


def verify_in_thread(reactor: Any, pool: Any, stored: str | None, password: str, allow_plain: bool = False, *, account: str = "") -> Any:
    """``verify_password`` in ``pool`` (the service's ``passwords`` pool), as a Deferred.

    argon2id takes tens of milliseconds of CPU by design: in the reactor's
    shared pool a burst of logins would queue every mailbox write and queue
    fsync behind it.
    """
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, pool, verify_password, stored, password, allow_plain, account=account)
