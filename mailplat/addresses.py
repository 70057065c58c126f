"""Mail addresses: parsing SMTP paths, validation, and resolution to accounts.

Everything that turns client-supplied text into a mailbox goes through here,
so nothing else has to worry about source routes, ``%`` hacks or ``../``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mailplat.interfaces import Account

__all__ = [
    "AddressError",
    "AliasResolver",
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


class AliasResolver:
    """Resolves a recipient to the accounts that get its mail.

    Order, as in Postfix's virtual(5): the exact address, then without its
    +tag, then a mailbox that exists, then the domain's catch-all.
    """

    MAX_DEPTH = 10

    def __init__(
        self,
        domains: tuple[str, ...],
        aliases: dict[str, tuple[str, ...]],
        lookup: Callable[[str], Awaitable[Account | None]],
    ) -> None:
        self.domains = frozenset(domains)
        # The first of ``domains``: whose postmaster a bare <Postmaster> is.
        self.primary_domain = domains[0] if domains else ""
        self.aliases = aliases
        self.lookup = lookup

    def is_hosted(self, domain: str) -> bool:
        return domain.lower() in self.domains

    async def resolve(self, address: str) -> list[Account]:
        """The accounts for ``address`` (validated, hosted); empty when none."""
        found: dict[str, Account] = {}
        await self._resolve(address.lower(), found, depth=0)
        return list(found.values())

    async def _resolve(self, address: str, found: dict[str, Account], depth: int) -> None:
        if depth > self.MAX_DEPTH:
            raise AddressError(f"alias loop at {address}")
        base = canonical(address)
        for key in dict.fromkeys((address, base)):
            if key in self.aliases:
                for target in self.aliases[key]:
                    await self._resolve(target, found, depth + 1)
                return
        account = await self.lookup(base)
        if account is not None:
            found[account.address] = account
            return
        catch_all = "@" + base.rpartition("@")[2]
        if catch_all in self.aliases:
            for target in self.aliases[catch_all]:
                await self._resolve(target, found, depth + 1)
