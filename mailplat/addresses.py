"""Mail addresses: parsing SMTP paths, validation, and resolution to accounts.

Everything that turns client-supplied text into a mailbox goes through here,
so nothing else has to worry about source routes, ``%`` hacks or ``../``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from mailplat.interfaces import Account

__all__ = [
    "AddressError",
    "AliasResolver",
    "BadSRSAddress",
    "Expansion",
    "MailPath",
    "parse_path",
    "validate_address",
    "validate_domain",
]

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# RFC 5321 4.1.2 atext, the characters of a Dot-string atom.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_PARAM = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?")


class AddressError(ValueError):
    """Text that is not an address we accept; the message says why, for humans."""


class BadSRSAddress(AddressError):
    """An address in SRS form at our SRS domain that we did not make, or that expired."""


def validate_domain(domain: str) -> str:
    """A lower-case hostname of dot-separated LDH labels, or AddressError."""
    if not domain:
        raise AddressError("the domain is empty")
    if domain.endswith("."):
        raise AddressError(f"{domain!r}: a trailing dot is not allowed")
    if len(domain) > 253:
        raise AddressError("the domain is longer than 253 characters")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"{domain!r} is not a valid domain name (letters, digits, '-' and dots)")
    if labels[-1].isdigit():
        # RFC 3696 2: a top-level domain is never all digits, so this is an
        # IP address, which mail names as an address literal: [192.0.2.1].
        raise AddressError(f"{domain!r} is an IP address, not a domain name")
    return domain


def validate_address(address: str) -> str:
    """Check an address for use as a mailbox name; return it unchanged.

    Refuses anything that could escape a mail folder or mean routing: ``/``,
    ``\\``, NUL and control characters, a leading, trailing or doubled dot,
    quoting, ``%`` and ``!``.
    """
    local, sep, domain = address.rpartition("@")
    if not sep or not local:
        raise AddressError(f"{address!r} is not of the form local-part@domain")
    validate_domain(domain)
    if len(local) > 64:
        raise AddressError("the local part is longer than 64 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in local):
        raise AddressError("the local part contains a space or a control character")
    for bad in ("/", "\\", "@", '"', "%", "!"):
        if bad in local:
            raise AddressError(f"the local part may not contain {bad!r}")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError("the local part may not start or end with a dot or contain '..'")
    if not all(_ATEXT.fullmatch(atom) for atom in local.split(".")):
        raise AddressError("the local part contains a character that is not allowed")
    return address


@dataclass(frozen=True)
class MailPath:
    """A parsed MAIL FROM / RCPT TO argument.

    ``address`` is as the client wrote it ("" for ``<>``); ``routed`` is true
    when the client tried source routing, which we never honour.
    """

    address: str
    params: dict[str, str]
    routed: bool = False


def parse_path(argument: bytes, postmaster_domain: str = "") -> MailPath:
    """Parse ``<path> [params]`` of MAIL FROM / RCPT TO (RFC 5321 4.1.2).

    Raises AddressError for syntax errors.  The address keeps its quoting so
    that policy sees exactly what was asked for.  With ``postmaster_domain``
    (RCPT only), ``<Postmaster>`` without a domain is the postmaster of that
    domain, which RFC 5321 4.5.1 says a server MUST accept.
    """
    argument = argument.strip()
    if not argument.startswith(b"<"):
        raise AddressError("the address must be enclosed in <>")
    end = _closing_bracket(argument)
    inner, rest = argument[1:end], argument[end + 1 :]
    if rest and not rest.startswith(b" "):
        raise AddressError("expected a space between the address and its parameters")
    params: dict[str, str] = {}
    for word in rest.split():
        if not _PARAM.fullmatch(word):
            raise AddressError(f"malformed parameter {word.decode('ascii', 'replace')!r}")
        key, _, value = word.decode("ascii").partition("=")
        params[key.upper()] = value
    try:
        text = inner.decode("ascii")
    except UnicodeDecodeError:
        # RFC 6531: non-ASCII addresses need SMTPUTF8, which we do not offer.
        raise AddressError("non-ASCII addresses need SMTPUTF8, which this server does not offer")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise AddressError("the address contains a control character")
    routed = False
    if text.startswith("@"):
        # A source route "@a,@b:user@c" (RFC 5321 Appendix C): never relayed.
        route, colon, text = text.partition(":")
        if not colon:
            raise AddressError("malformed source route")
        routed = True
    if postmaster_domain and not routed and text.lower() == "postmaster":
        text = f"{text}@{postmaster_domain}"
    if text and "@" not in text:
        raise AddressError("the address needs a domain (local-part@domain)")
    return MailPath(text, params, routed)


def _closing_bracket(argument: bytes) -> int:
    """Index of the '>' ending the path, skipping quoted strings."""
    quoted = escaped = False
    for i in range(1, len(argument)):
        c = argument[i : i + 1]
        if escaped:
            escaped = False
        elif c == b"\\":
            escaped = True
        elif c == b'"':
            quoted = not quoted
        elif c == b">" and not quoted:
            return i
    raise AddressError("unbalanced <>")


def canonical(address: str, separator: str = "+") -> str:
    """Lower-case, with any +tag removed from the local part."""
    local, _, domain = address.lower().rpartition("@")
    if separator and separator in local:
        local = local.split(separator, 1)[0] or local
    return f"{local}@{domain}"


class Reverser(Protocol):
    """What the resolver needs of SRS (mailplat.forwarding.Forwarder)."""

    domain: str

    def is_srs(self, address: str) -> bool: ...

    def reverse(self, address: str) -> str: ...


@dataclass
class Expansion:
    """Who gets a recipient's mail: our accounts, and addresses elsewhere it is forwarded to."""

    accounts: list[Account] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.accounts or self.remote)


class AliasResolver:
    """Resolves a recipient to the accounts that get its mail, and the
    addresses in other domains an alias forwards it to.

    Order, as in Postfix's virtual(5): the exact address, then without its
    +tag, then a mailbox that exists, then the domain's catch-all.  An
    address SRS made (a bounce to a forwarded copy's sender) resolves to
    the original sender, when its hash says we made it.
    """

    MAX_DEPTH = 10

    def __init__(
        self,
        domains: tuple[str, ...],
        aliases: dict[str, tuple[str, ...]],
        lookup: Callable[[str], Awaitable[Account | None]],
        forwarding: Reverser | None = None,
    ) -> None:
        self.domains = frozenset(domains)
        # The first of ``domains``: whose postmaster a bare <Postmaster> is.
        self.primary_domain = domains[0] if domains else ""
        self.aliases = aliases
        self.lookup = lookup
        self.forwarding = forwarding

    def is_hosted(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def is_srs(self, address: str) -> bool:
        """An address SRS made at our SRS domain (which need not be one of the domains)."""
        return self.forwarding is not None and self.forwarding.is_srs(address)

    async def resolve(self, address: str) -> list[Account]:
        """The accounts for ``address`` (validated, hosted); empty when none."""
        return (await self.expand(address)).accounts

    async def expand(self, address: str) -> Expansion:
        """Our accounts for ``address`` and the addresses elsewhere it goes to.

        AddressError for an alias loop, BadSRSAddress for an SRS address we
        did not make or that expired.
        """
        accounts: dict[str, Account] = {}
        remote: dict[str, None] = {}
        await self._resolve(address, accounts, remote, ())
        return Expansion(list(accounts.values()), list(remote))

    async def _resolve(self, address: str, found: dict[str, Account], remote: dict[str, None], chain: tuple[str, ...]) -> None:
        if self.forwarding is not None and self.forwarding.is_srs(address):
            # Before any lower-casing: the original sender keeps its spelling.
            original = self.forwarding.reverse(address)
            if not self.is_hosted(original.rpartition("@")[2]):
                remote[original] = None
                return
            address = original
        address = address.lower()
        if address in chain:
            raise AddressError(f"alias loop: {' -> '.join((*chain, address))}")
        if len(chain) > self.MAX_DEPTH:
            raise AddressError(f"alias chain longer than {self.MAX_DEPTH} at {address}")
        if not self.is_hosted(address.rpartition("@")[2]):
            # An alias's target in another domain: the queue forwards it.
            remote[address] = None
            return
        chain = (*chain, address)
        base = canonical(address)
        for key in dict.fromkeys((address, base)):
            if key in self.aliases:
                for target in self.aliases[key]:
                    await self._resolve(target, found, remote, chain)
                return
        account = await self.lookup(base)
        if account is not None:
            found[account.address] = account
            return
        catch_all = "@" + base.rpartition("@")[2]
        if catch_all in self.aliases:
            for target in self.aliases[catch_all]:
                await self._resolve(target, found, remote, chain)

    async def unknown_targets(self) -> list[tuple[str, str]]:
        """(alias, target) for each target in our domains that is neither an alias nor a mailbox.

        A catch-all does not count: a target only it would take is a typo.
        """
        unknown = []
        for source, targets in self.aliases.items():
            for target in targets:
                if not self.is_hosted(target.rpartition("@")[2]):
                    continue
                base = canonical(target)
                if target in self.aliases or base in self.aliases:
                    continue
                if await self.lookup(base) is None:
                    unknown.append((source, target))
        return unknown
