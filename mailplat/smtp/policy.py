"""Who may send what where: the relay-trick check and the submission sender check.

The one place the SMTP server asks "is this recipient ours, someone else's,
or a trick?" and "may this user send as this address?", for every listener.
"""

from __future__ import annotations

import enum
import re

from mailplat.addresses import AddressError, AliasResolver, MailPath, validate_address, validate_domain
from mailplat.interfaces import Account

__all__ = ["Destination", "RecipientRefused", "RecipientSyntax", "classify_recipient", "may_send_as"]

# RFC 5321 4.1.2 Dot-string: atoms of atext joined by single dots.
_DOT_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


class Destination(enum.Enum):
    LOCAL = "local"    # one of our domains: resolved to accounts, never relayed
    REMOTE = "remote"  # another domain: relayed, for an authenticated user only


class RecipientRefused(Exception):
    """The recipient is refused whoever asks: ``reason`` is shown to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecipientSyntax(RecipientRefused):
    """The address is not RFC 5321 syntax: a syntax error in RCPT's argument, not a relay attempt."""


def _trick(path: MailPath) -> str:
    """The routing trick an address uses to make an MTA forward it, or "".

    Source routes, ``%`` and ``!`` in the local part, quoted local parts and
    address literals all once made MTAs relay; none is accepted, on any port.
    """
    if path.routed:
        return "source routes are not accepted"
    local, _, domain = path.address.rpartition("@")
    if local.startswith('"'):
        return "quoted local parts are not accepted"
    for char in "%!@":
        if char in local:
            return f"{char!r} in the local part"
    if domain.startswith("["):
        return "address literals are not accepted"
    return ""


def classify_recipient(path: MailPath, resolver: AliasResolver) -> Destination:
    """LOCAL for our domains, REMOTE for a plain address elsewhere; RecipientRefused for the rest.

    Whether a REMOTE recipient may be relayed is the caller's decision
    (authenticated submission only); a domain we do not host with a
    trailing dot or an invalid name is never relayable.
    """
    trick = _trick(path)
    if trick:
        raise RecipientRefused(trick)
    local, _, domain = path.address.rpartition("@")
    if resolver.is_hosted(domain) or resolver.is_srs(path.address):
        # An SRS address of ours is a bounce to mail we forwarded: its hash,
        # checked when it is resolved, decides whether it goes back out.
        return Destination.LOCAL
    try:
        validate_domain(domain.lower())
    except AddressError:
        raise RecipientRefused("we do not serve this domain")
    if not all(0x21 <= ord(c) < 0x7F for c in local):
        raise RecipientRefused("we do not serve this domain")
    # RFC 5321 4.1.2: a local part is a Dot-string or a Quoted-string, and
    # quoted ones are refused above as a trick.  Anything else (a""b, a\b,
    # .a..b.) would leave our queue as written, for the next hop to read
    # its own way.
    if not _DOT_STRING.fullmatch(local):
        raise RecipientSyntax("the local part is not an RFC 5321 dot-string")
    return Destination.REMOTE


async def may_send_as(account: Account, sender: str, resolver: AliasResolver) -> bool:
    """RFC 6409 6.1: an authenticated user sends as themselves or an alias of theirs."""
    if not sender or "@" not in sender or not resolver.is_hosted(sender.rpartition("@")[2]):
        return False
    try:
        validate_address(sender.lower())
        return account in await resolver.resolve(sender)
    except AddressError:
        return False
