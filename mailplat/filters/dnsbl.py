"""The ``dnsbl`` filter: refuse (or tag) clients whose address a DNS blocklist lists.

A DNS blocklist (RFC 5782) publishes a client address as a name made of its
octets reversed (IPv6: its 32 nibbles reversed) under the list's zone: the
client 192.0.2.1 is listed in ``zen.example`` when ``1.2.0.192.zen.example``
has an A record.  An answer in 127.0.0.0/8 means "listed" (127.0.0.2 and up;
some lists say why with the exact address); NXDOMAIN means "not listed".  A
TXT record at the same name may hold the reason, often a URL to look it up.

Every zone is asked at once, through mailplat's resolver (``[dns] servers``).

When the check runs, by ``action``:

- ``"reject"``: at RCPT, as Postfix's ``reject_rbl_client`` does by default
  (``smtpd_delay_reject``).  A refusal at connect would be a 554 greeting,
  which many clients do not report to the sender, and some retry at once; a
  550 at RCPT reaches the sender with our reason in their bounce.  By RCPT
  the client may also have logged in, and clients that did are not checked.
  Each RCPT asks again, which costs little: a client's answers are kept for
  a minute, so a message to many recipients asks each zone once.
- ``"tag"``: at the end of DATA, so that each message gets the header once,
  however many recipients it has.

Options (every other key is refused):

- ``zones``: the blocklists' zones, e.g. ``["zen.spamhaus.org"]``; required.
- ``action``: ``"reject"`` (the default; 550 5.7.1 "Client host [IP] blocked
  using ZONE; REASON", naming the first listing zone in the order given) or
  ``"tag"`` (accept, adding ``X-DNSBL: ZONE listed IP`` for each listing zone).
- ``skip``: networks that are never looked up, as CIDR strings; default
  ``["127.0.0.0/8", "::1/128"]``.  Clients that logged in (AUTH) are never
  looked up either: a user sending from a dynamic address must not be
  refused because of a list of dynamic addresses.

A DNS failure (SERVFAIL, REFUSED, no answer in time) raises: the filter chain
then answers 451 (fail closed) and logs it, or lets the client through with
``on_error = "accept"``.  The filter's ``timeout`` bounds the whole check,
which is how a DNS server that never answers ends.  When one zone lists the
client, another zone's failure does not matter: the listing decides.  The
reason text is optional: a TXT lookup that fails is logged and left out.

Answers outside 127.0.0.0/8, and 127.255.255.252 to 127.255.255.255 (the
error codes of Spamhaus: a typo in the zone name, queries through a public
resolver, too many queries), are not listings: they are logged as warnings,
since they mean the list does not answer us properly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from mailplat.interfaces import BackendContext, Client, MessageFilter, SpooledMessage, Verdict
from mailplat.options import OptionReader

__all__ = ["DNSBLError", "DNSBLFilter", "Listing", "build", "listing_codes", "reversed_name"]

log = Logger()

ACTIONS = ("reject", "tag")
DEFAULT_SKIP = ("127.0.0.0/8", "::1/128")

LISTED = ipaddress.ip_network("127.0.0.0/8")
# Spamhaus's "your query was not answered" codes: not listings.
ERROR_CODES = {
    ipaddress.ip_address("127.255.255.252"): "typing error in the zone name",
    ipaddress.ip_address("127.255.255.253"): "a reserved error code",
    ipaddress.ip_address("127.255.255.254"): "query through a public or open resolver",
    ipaddress.ip_address("127.255.255.255"): "too many queries",
}

# How long a client's answers are reused (another RCPT, the next message).
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 4096
# The reason is optional: do not let a slow TXT answer turn a refusal into a 451.
TXT_TIMEOUT = (1, 3)
# An IPv6 address takes 64 characters of the 253 a name may have.
MAX_ZONE_LENGTH = 253 - 64
MAX_REASON = 200

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


class DNSBLError(Exception):
    """A blocklist could not be asked: the check has no answer."""


def reversed_name(address: str) -> str:
    """The labels a blocklist files ``address`` under, without the zone.

    ``192.0.2.1`` gives ``1.2.0.192``; an IPv6 address gives its 32 nibbles,
    last first.  An IPv4 address written as IPv6 (``::ffff:192.0.2.1``, as a
    dual-stack listener reports it) is looked up as the IPv4 address.
    Raises ValueError for anything that is not an IP address.
    """
    ip = _ip(address)
    # "4.3.2.1.in-addr.arpa", "...ip6.arpa": drop the two arpa labels.
    return ip.reverse_pointer.rsplit(".", 2)[0]


def listing_codes(zone: str, client: str, answers: Sequence[str]) -> tuple[str, ...]:
    """The A answers that mean "listed": those in 127.0.0.0/8 but the error codes.

    The others are logged: a list answering outside 127/8 is broken (some
    dead lists answer every query), and an error code means it refuses us.
    """
    codes = []
    for answer in answers:
        ip = ipaddress.ip_address(answer)
        if ip in ERROR_CODES:
            log.warn(
                "dnsbl: {zone} answered {answer} for {client} ({meaning}): not a listing",
                zone=zone, answer=answer, client=client, meaning=ERROR_CODES[ip],
            )
        elif ip not in LISTED:
            log.warn(
                "dnsbl: {zone} answered {answer} for {client}, outside 127.0.0.0/8: not a listing",
                zone=zone, answer=answer, client=client,
            )
        else:
            codes.append(answer)
    return tuple(codes)


@dataclass(frozen=True)
class Listing:
    """One zone that lists the client: its answers, and the reason when asked for."""

    zone: str
    codes: tuple[str, ...]
    reason: str = ""


class DNSBLFilter(MessageFilter):
    """Looks the client up in every zone at once; refuses at RCPT or tags at DATA."""

    owned_headers = ("X-DNSBL",)

    def __init__(
        self, zones: Sequence[str], action: str, skip: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], resolver: Any, clock: Any
    ) -> None:
        self.zones = tuple(zones)
        self.action = action
        self.skip = tuple(skip)
        self.resolver = resolver
        self.clock = clock
        # client address -> (when it expires, its listings)
        self._recent: dict[str, tuple[float, tuple[Listing, ...]]] = {}

    async def check_rcpt(self, client: Client, sender: str, recipient: str) -> Verdict | None:
        if self.action != "reject":
            return None
        listings = await self.listings(client)
        if not listings:
            return None
        first = listings[0]
        text = f"Client host [{_ip(client.address)}] blocked using {first.zone}"
        return Verdict.reject(f"{text}; {first.reason}" if first.reason else text)

    async def check_data(self, client: Client, sender: str, recipients: tuple[str, ...], message: SpooledMessage) -> Verdict | None:
        if self.action != "tag":
            return None
        listings = await self.listings(client)
        if not listings:
            return None
        return Verdict.accept(tuple(("X-DNSBL", f"{listing.zone} listed {_ip(client.address)}") for listing in listings))

    async def listings(self, client: Client) -> tuple[Listing, ...]:
        """The zones listing the client, in the configured order; () when it is not checked."""
        if client.authenticated_as is not None:
            return ()
        try:
            ip = _ip(client.address)
        except ValueError:
            # Not an IP client (a UNIX socket listener, say): nothing to look up.
            log.info("dnsbl: {client!r} is not an IP address: not checked", client=client.address)
            return ()
        if any(ip in network for network in self.skip):
            return ()
        key = str(ip)
        now = self.clock.seconds()
        cached = self._recent.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        listings = await self._look_up(key)
        self._remember(key, now + CACHE_SECONDS, listings)
        return listings

    async def _look_up(self, address: str) -> tuple[Listing, ...]:
        if self.resolver is None:
            raise DNSBLError("no DNS resolver: dnsbl runs only inside the server")
        prefix = reversed_name(address)
        asked = [defer.Deferred.fromCoroutine(self._ask(zone, f"{prefix}.{zone}", address)) for zone in self.zones]
        # Every zone is asked at once; cancelling this cancels them all.
        results = await defer.DeferredList(asked, consumeErrors=True)
        listings: list[Listing] = []
        failures: list[tuple[str, Failure]] = []
        for zone, (ok, result) in zip(self.zones, results):
            if isinstance(result, Failure):
                failures.append((zone, result))
            elif ok and result:
                listings.append(Listing(zone, result))
        if listings:
            for zone, failure in failures:
                log.warn(
                    "dnsbl: {zone} could not be asked about {client} ({why}); listed elsewhere, so it does not matter",
                    zone=zone, client=address, why=_describe(failure.value),
                )
            first = listings[0]
            if self.action == "reject":
                listings[0] = Listing(first.zone, first.codes, await self._reason(f"{prefix}.{first.zone}", first.zone))
            log.info(
                "dnsbl: {client} is listed in {zones}",
                client=address, zones=", ".join(f"{l.zone} ({'/'.join(l.codes)})" for l in listings),
            )
            return tuple(listings)
        if failures:
            zone, failure = failures[0]
            if isinstance(failure.value, defer.CancelledError):
                failure.raiseException()
            raise DNSBLError(f"{zone}: looking up {address} failed: {_describe(failure.value)}")
        return ()

    async def _ask(self, zone: str, name: str, address: str) -> tuple[str, ...]:
        """The listing codes one zone gives: () for NXDOMAIN or no A record."""
        try:
            answers, _, _ = await self.resolver.lookupAddress(name)
        except DNSNameError:
            return ()
        # Only A records count (a recursive resolver answers a CNAME with its target's A records too).
        addresses = [rr.payload.dottedQuad() for rr in answers if rr.type == dns.A]
        return listing_codes(zone, address, addresses)

    async def _reason(self, name: str, zone: str) -> str:
        """The first TXT record at ``name`` as one printable line, or "" when there is none."""
        try:
            answers, _, _ = await self.resolver.lookupText(name, timeout=TXT_TIMEOUT)
        except defer.CancelledError:
            raise
        except DNSNameError:
            return ""
        except Exception as e:
            log.warn("dnsbl: no reason from {zone}: TXT {name}: {why}", zone=zone, name=name, why=_describe(e))
            return ""
        for rr in answers:
            if rr.type == dns.TXT:
                text = b"".join(rr.payload.data).decode("utf-8", "replace")
                # It goes into a reply line: printable ASCII, one space between words.
                words = "".join(c if 0x20 <= ord(c) < 0x7F else " " for c in text).split()
                return " ".join(words)[:MAX_REASON]
        return ""

    def _remember(self, key: str, expires: float, listings: tuple[Listing, ...]) -> None:
        if len(self._recent) >= CACHE_ENTRIES:
            now = self.clock.seconds()
            for stale in [k for k, (until, _) in self._recent.items() if until <= now]:
                del self._recent[stale]
            while len(self._recent) >= CACHE_ENTRIES:
                # The oldest entry: dicts keep insertion order.
                del self._recent[next(iter(self._recent))]
        self._recent.pop(key, None)
        self._recent[key] = (expires, listings)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to look up: IPv4 when mapped into IPv6, without a zone (``%eth0``)."""
    # Python 3.11's reverse_pointer fails on a scoped address: drop the scope.
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _describe(error: BaseException | None) -> str:
    """A DNS error in a few words: twisted.names' own texts are whole messages."""
    names = {
        "DNSServerError": "SERVFAIL",
        "DNSQueryRefusedError": "REFUSED",
        "DNSFormatError": "FORMERR",
        "DNSNotImplementedError": "NOTIMP",
        "DNSQueryTimeoutError": "no answer in time",
    }
    return names.get(type(error).__name__) or f"{type(error).__name__}: {error}"


def build(options: dict[str, Any], context: BackendContext) -> DNSBLFilter:
    """Check the ``[[filter]]`` options and make the filter."""
    reader = OptionReader(options, "dnsbl", context=context)
    example = 'e.g. zones = ["zen.spamhaus.org"]'
    zones = reader.strings("zones", fix=example, what="the blocklists to ask")
    if not zones:
        raise reader.error("zones", "is empty: it must list the blocklists to ask", example)
    normalised: list[str] = []
    for zone in zones:
        name = zone.strip().rstrip(".").lower()
        labels = name.split(".")
        if not name or len(name) > MAX_ZONE_LENGTH or not all(_LABEL.fullmatch(label) for label in labels):
            raise reader.error("zones", f"{zone!r} is not a domain name", example)
        if name in normalised:
            raise reader.error("zones", f"{zone!r} is listed twice", "give each zone once")
        normalised.append(name)

    action = reader.choice("action", ACTIONS, "reject")

    skip_example = f'e.g. skip = {list(DEFAULT_SKIP)!r} (CIDR networks, or [] to check every client)'.replace("'", '"')
    networks = []
    for network in reader.strings("skip", list(DEFAULT_SKIP), fix=skip_example):
        try:
            networks.append(ipaddress.ip_network(network.strip()))
        except ValueError as e:
            raise reader.error("skip", f"{network!r} is not a network ({e})", skip_example)

    reader.finish()
    return DNSBLFilter(normalised, action, networks, context.dns, context.reactor)
