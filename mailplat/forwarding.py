"""Forwarding to other domains: the Sender Rewriting Scheme (SRS).

An alias may send mail on to an address elsewhere.  The next hop checks SPF
for the envelope sender's domain, which never authorized us to send its
mail, so a forwarded copy leaves with a sender of ours that carries the
original inside it, signed: ``SRS0=HHHH=TT=sender.test=bob@srs_domain``
(the guarded scheme of libsrs2, through srslib).  A bounce to that address
comes back to our MX; the hash proves we made it (so it is not a way to
relay through us) and the timestamp that it is recent, and it is sent on to
``bob@sender.test``.

The null sender stays null, and a sender in one of our own domains is left
as it is: our SPF record already covers it.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable

import srslib

from mailplat.addresses import AddressError, BadSRSAddress, validate_domain
from mailplat.fsutil import fsync_directory

__all__ = ["Forwarder", "load_secrets"]

# The local part of an address made by SRS (SRS0 by the first forwarder, SRS1 by a later one).
_SRS_LOCAL = re.compile(r"srs[01][-+=]", re.IGNORECASE)
# RFC 5321 4.1.2 Dot-string: what a sender's local part must be to travel inside an SRS address.
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


class Forwarder:
    """Rewrites the envelope sender of forwarded copies, and reverses the rewriting."""

    def __init__(self, domain: str, secrets: list[str], hosted: Iterable[str], validity_days: int = 21) -> None:
        if not secrets:
            raise ValueError("SRS needs a secret")
        self.domain = domain.lower()
        self.hosted = frozenset(d.lower() for d in hosted) | {self.domain}
        self._srs = srslib.SRS(secrets[0], prev_secrets=secrets[1:], validity_days=validity_days)

    def sender_for(self, sender: str) -> str:
        """The envelope sender of a copy we forward to another domain."""
        local, at, domain = sender.rpartition("@")
        if not sender or not at or domain.lower() in self.hosted:
            # <> never changes (RFC 5321 4.5.5); our own senders pass SPF as they are.
            return sender
        if not _DOT_STRING.fullmatch(local) or not _is_domain(domain):
            # A quoted or odd local part cannot be carried inside another local part.
            return sender
        rewritten: str = self._srs.forward(sender, self.domain)
        return rewritten

    def is_srs(self, address: str) -> bool:
        """True for an address at our SRS domain that SRS made (valid or not)."""
        local, _, domain = address.rpartition("@")
        return domain.lower() == self.domain and _SRS_LOCAL.match(local) is not None

    def reverse(self, address: str) -> str:
        """Where a message to an SRS address of ours goes; BadSRSAddress when we did not make it or it expired."""
        try:
            original: str = self._srs.reverse(address)
        except srslib.InvalidHashError:
            raise BadSRSAddress("invalid SRS address (the hash does not match)")
        except srslib.InvalidTimestampError:
            raise BadSRSAddress("expired SRS address")
        except (srslib.Error, ValueError):
            raise BadSRSAddress("malformed SRS address")
        local, at, domain = original.rpartition("@")
        # We made it from a sender of this form (sender_for); anything else was not ours.
        if not at or not _DOT_STRING.fullmatch(local) or not _is_domain(domain):
            raise BadSRSAddress("malformed SRS address")
        return original


def _is_domain(domain: str) -> bool:
    try:
        validate_domain(domain.lower())
    except AddressError:
        return False
    return True


def load_secrets(path: str, create: bool) -> list[str]:
    """The SRS secrets in ``path``: the first signs, all of them verify (one a line, so a
    new one can be put first while the old still reverses what it signed).

    With ``create``, a missing file is made with a new random secret, mode 0600.
    OSError when it cannot be read or made; ValueError when it holds no secret.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if not create:
            raise
        text = _create(path)
    found = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise ValueError("holds no secret")
    return found


def _create(path: str) -> str:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    text = "# mailplat's SRS secret: forwarded mail's senders are signed with the first line; keep it private\n"
    text += secrets.token_urlsafe(32) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        # Another process of ours made it first.
        with open(path, encoding="utf-8") as f:
            return f.read()
    with open(fd, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    fsync_directory(folder)
    return text
