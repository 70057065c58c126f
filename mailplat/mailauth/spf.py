"""SPF (RFC 7208): may this address send mail for that domain?  By the ``pyspf`` library.

pyspf's own lookups go through a module-level function that asks
dnspython's default resolver (the system's).  :class:`Query` is pyspf's
query with its ``dns()`` method, the one every lookup of an evaluation goes
through, answered by a :class:`mailplat.wire.dns.Resolver` instead: the
servers of ``[dns] servers``, within our time limits.  Nothing in pyspf is
patched, so any other user of pyspf in the process keeps its lookups.

Everything here blocks on DNS: run it in a thread.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

import spf

from mailplat.mailauth.names import domain_name
from mailplat.wire.dns import DNSTemporaryError, Resolver

__all__ = ["Evaluation", "Query", "SPFResult", "check_spf", "client_ip", "evaluate"]

# Seconds for one whole check: RFC 7208 4.6.4 suggests at least 20 s; ours
# is shorter so that the check ends before a filter's default 30 s timeout.
SPF_TIME = 15.0
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


class Query(spf.query):
    """pyspf's query, asking ``resolver``; it notes each record it evaluates.

    ``evaluated`` lists (domain, depth) in the order the records were
    evaluated: depth 0 is the checked domain's record and those it
    redirects to, each ``include:`` one deeper.
    """

    def __init__(self, resolver: Resolver, i: str, s: str, h: str, querytime: float = SPF_TIME) -> None:
        super().__init__(i=i, s=s, h=h, querytime=querytime)
        self.resolver = resolver
        self.evaluated: list[tuple[str, int]] = []

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        """pyspf's lookup (values as its own returns them), by our resolver.

        The resolver follows CNAMEs and keeps answers for their TTL, so this
        keeps only what pyspf counts: its time budget and void lookups.
        """
        if not name:
            raise spf.PermError("empty domain name")
        name = str(name).rstrip(".").lower()
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # not a name DNS can hold
        key = (name, qtype)
        result = self.cache.get(key)
        if result is None:
            if self.querytime < 0:
                raise spf.TempError("DNS Error: exceeded max query lookup time")
            timeout = self.querytime if 0 < self.querytime < self.timeout else self.timeout
            started = time.monotonic()
            try:
                records = self.resolver.lookup(name, qtype, timeout)
            except DNSTemporaryError as e:
                raise spf.TempError(f"DNS {e}")
            result = [value for value in (_value(qtype, record) for record in records) if value is not None]
            self.cache[key] = result
            if self.querytime > 0:
                self.querytime -= time.monotonic() - started
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result

    def check1(self, record: Any, domain: str, recursion: int) -> Any:
        self.evaluated.append((domain, recursion))
        return super().check1(record, domain, recursion)


def _value(qtype: str, record: Any) -> Any:
    """A dnspython record in the form pyspf's lookups give it."""
    if qtype in ("A", "AAAA"):
        return record.address
    if qtype == "MX":
        return (record.preference, record.exchange.to_text(omit_final_dot=True))
    if qtype == "PTR":
        return record.target.to_text(omit_final_dot=True)
    if qtype in ("TXT", "SPF"):
        return list(record.strings)
    return None


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The client's address as SPF knows it: IPv4 when mapped into IPv6, no %zone."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class SPFResult:
    """One SPF check: RFC 7208's result for the MAIL FROM domain, or the HELO name."""

    result: str  # pass fail softfail neutral none temperror permerror
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked, "" when there was none to check
    sender: str = ""  # the MAIL FROM address
    reason: str = ""  # our own words, for the header's comment and the log


def check_spf(resolver: Resolver, address: str, sender: str, helo: str) -> SPFResult:
    """RFC 7208 ``check_host()`` for the MAIL FROM domain (the HELO name for ``<>``).

    Blocking: run it in a thread.  DNS failures are ``temperror``, never
    exceptions; a record pyspf cannot cope with is ``permerror``.
    """
    identity = "mailfrom" if sender else "helo"
    if sender:
        local, at, raw_domain = sender.rpartition("@")
        domain = domain_name(raw_domain) if at else ""
    else:
        local, domain = "postmaster", domain_name(helo)
    if not domain:
        return SPFResult("none", identity, "", sender, "no domain to check")
    try:
        ip = client_ip(address)
    except ValueError:
        return SPFResult("none", identity, domain, sender, "client has no IP address")
    try:
        # pyspf checks h (the HELO name) when s is empty, and expands %{h} with it.
        if sender:
            query = Query(resolver, i=str(ip), s=f"{local}@{domain}", h=helo or domain)
        else:
            query = Query(resolver, i=str(ip), s="", h=domain)
        result, _, _ = query.check()
    except Exception as e:  # noqa: BLE001 - pyspf raises more than its own errors
        # A record that trips the library over (it asserts in places) is the
        # domain's error, not a reason to refuse everyone's mail.
        return SPFResult("permerror", identity, domain, sender, f"record not usable ({type(e).__name__})")
    result = str(result).lower()
    reasons = {
        "fail": f"{ip} is not allowed to send for {domain}",
        "softfail": f"{ip} is probably not allowed to send for {domain}",
        "temperror": "DNS error",
        "permerror": "bad SPF record",
    }
    if result not in RESULTS:
        return SPFResult("permerror", identity, domain, sender, f"unexpected result {result[:20]}")
    return SPFResult(result, identity, domain, sender, reasons.get(result, ""))


@dataclass(frozen=True)
class Evaluation:
    """How a domain's record judged one address, in pyspf's words (for ``mailplat doctor``)."""

    result: str  # pass fail softfail neutral none temperror permerror
    term: str  # the term that decided, as its record writes it (redirect='s target's, when followed); "" for none
    redirect: str = ""  # the domain the record's redirect= named, when it was followed; else ""
    problem: str = ""  # pyspf's explanation of a temperror or permerror


def evaluate(resolver: Resolver, record: str, sender: str, helo: str, address: str) -> Evaluation:
    """pyspf's verdict on mail from ``sender`` (whose domain publishes ``record``) sent by ``address``.

    Blocking: run it in a thread.
    """
    query = Query(resolver, i=address, s=sender, h=helo)
    try:
        result, _, explanation = query.check(spf=record)
    except Exception as e:  # noqa: BLE001 - as in check_spf
        return Evaluation("permerror", "", problem=f"{type(e).__name__}: {e}")
    # The first record at depth 0 is the domain's own; any other was reached by redirect=.
    redirects = [name for name, depth in query.evaluated[1:] if depth == 0]
    if result in ("temperror", "permerror"):
        return Evaluation(result, "", problem=str(explanation).removeprefix("SPF Temporary Error: ").removeprefix("SPF Permanent Error: "))
    # pyspf notes the deciding term of the last record at depth 0, redirects followed.
    return Evaluation(result, query.mechanism or "", redirects[0] if redirects else "")
