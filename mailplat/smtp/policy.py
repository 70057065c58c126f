"""Who may send what where: the relay-trick check and the submission sender checks.

The one place the SMTP server asks "is this recipient ours, someone else's,
or a trick?" and "may this user send as this address?" (in MAIL FROM and
in the From: header), for every listener.
"""

from __future__ import annotations

import email.policy
import enum
import re
from collections.abc import Collection

from mailplat.addresses import AddressError, AliasResolver, MailPath, canonical, validate_address, validate_domain
from mailplat.interfaces import Account
from mailplat.smtp.receiving import HeaderField

__all__ = [
    "Destination", "HeaderFromRefused", "RecipientRefused", "RecipientSyntax", "check_header_from", "classify_recipient",
    "header_from_addresses", "may_send_as",
]

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


async def may_send_as(account: Account, sender: str, resolver: AliasResolver, also: Collection[str] = ()) -> bool:
    """RFC 6409 6.1: an authenticated user sends as themselves, an alias of theirs,
    or an address in ``also`` (canonical: lower case, no +tag; [submission.send_as])."""
    if also and _listed(sender, also):
        return True
    if not sender or "@" not in sender or not resolver.is_hosted(sender.rpartition("@")[2]):
        return False
    try:
        validate_address(sender.lower())
        return account in await resolver.resolve(sender)
    except AddressError:
        return False


def _listed(sender: str, also: Collection[str]) -> bool:
    try:
        validate_address(sender.lower())
    except AddressError:
        return False
    return canonical(sender) in also


class HeaderFromRefused(Exception):
    """The message's From: header is not the user's to write: ``text`` is the reply's (553 5.7.1)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def header_from_addresses(value: bytes) -> list[str]:
    """The addresses of a From: field's value (RFC 5322 3.6.2); ValueError saying why when it is no clean mailbox list.

    Any defect the parser notes refuses the field: where it would guess (a
    second address after the first, text after the ">"), a mail reader may
    guess otherwise and show an address we never checked.
    """
    try:
        # The parser raises more than HeaderParseError on crafted input
        # (IndexError, RecursionError on nested comments): any failure is a
        # field we cannot read.
        header = email.policy.default.header_factory("from", value.decode("utf-8", "replace"))
        defects, addresses = list(header.defects), list(header.addresses)
    except Exception:
        raise ValueError("cannot be parsed")
    if defects:
        raise ValueError("is not a valid address list (RFC 5322 3.4)")
    if not addresses:
        raise ValueError("holds no address")
    return [address.addr_spec for address in addresses]


async def check_header_from(
    account: Account, field: HeaderField | None, resolver: AliasResolver, also: Collection[str] = (),
) -> None:
    """An authenticated user's message must be from them: every address of its
    one From: field is one they may send as (may_send_as), else HeaderFromRefused.

    RFC 6409 8.1 lets a submission server refuse such a message.  What we
    accept may be DKIM-signed for our domain: a From: that is not the
    user's must never get that signature.
    """
    if field is None:
        raise HeaderFromRefused("Message refused: it has no From: header field; add one with your address")
    if field.count > 1:
        raise HeaderFromRefused("Message refused: it has more than one From: header field (RFC 5322 3.6)")
    if field.too_long:
        raise HeaderFromRefused("Message refused: the From: header field is too long to check")
    try:
        addresses = header_from_addresses(field.value)
    except ValueError as e:
        raise HeaderFromRefused(f"Message refused: the From: header field {e}")
    for address in dict.fromkeys(a.lower() for a in addresses):
        if not await may_send_as(account, address, resolver, also):
            raise HeaderFromRefused(f"From: header address <{address[:100]}> rejected: not owned by {account.address}")
