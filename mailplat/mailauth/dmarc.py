"""DMARC (RFC 7489): does a message's From domain stand behind it, and what does the domain ask for when not?

The policy is the record at ``_dmarc.<domain>``, else at
``_dmarc.<organizational domain>`` (whose ``sp=`` then applies, or ``p=``
without one).  DMARC passes when SPF passed for a domain aligned with the
From domain, or a DKIM signature passed with an aligned ``d=``; aligned
means equal with ``aspf=s``/``adkim=s`` and the same organizational domain
otherwise (``r``, the default).  ``pct=`` is read but not applied (it is
meant for rolling a policy out, and was dropped by DMARCbis).

Lookups block: run :func:`check_dmarc` in a thread.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mailplat.mailauth.dkim import DKIMResult, parse_tags
from mailplat.mailauth.names import domain_name, organizational_domain
from mailplat.mailauth.spf import SPFResult
from mailplat.numerals import is_digits
from mailplat.wire.dns import DNSTemporaryError, Resolver

__all__ = ["DMARCRecord", "DMARCResult", "aligned", "check_dmarc", "from_domains", "is_dmarc_record", "parse_dmarc_record"]

POLICIES = ("none", "quarantine", "reject")
_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(?:;|\Z)")


@dataclass(frozen=True)
class DMARCRecord:
    """The parts of a ``v=DMARC1`` record a receiver applies."""

    p: str  # none quarantine reject
    sp: str  # the policy for subdomains (p when not given)
    adkim: str = "r"  # r (relaxed) or s (strict)
    aspf: str = "r"
    pct: int = 100  # read, not applied


@dataclass(frozen=True)
class DMARCResult:
    """DMARC for one From domain."""

    result: str  # pass fail none temperror permerror
    domain: str  # the From domain ("" when none could be read)
    policy: str = ""  # the policy that applies to this domain's failing mail
    reason: str = ""


def is_dmarc_record(text: str) -> bool:
    """Whether a TXT record is a DMARC record (``v=DMARC1`` first, RFC 7489 6.4)."""
    return bool(_VERSION.match(text.strip()))


def parse_dmarc_record(text: str) -> DMARCRecord | None:
    """A record's policy, or None when it has none to apply (RFC 7489 6.3, 6.6.3).

    Unknown tags are ignored.  A missing or unknown ``p=`` (or unknown
    ``sp=``) makes the record ``p=none`` when it asks for reports (``rua=``),
    else no record at all.
    """
    if not is_dmarc_record(text):
        return None
    tags = parse_tags(text.strip())
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in POLICIES or sp not in POLICIES:
        if "mailto:" not in tags.get("rua", "").lower():
            return None
        p = sp = "none"
    # RFC 7489 6.3: pct is 1*3DIGIT; anything else is ignored.
    pct_text = tags.get("pct", "100")
    pct = min(100, int(pct_text)) if is_digits(pct_text) else 100
    return DMARCRecord(
        p, sp,
        "s" if tags.get("adkim", "r").lower() == "s" else "r",
        "s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct,
    )


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 3.1: strict is the same name, relaxed the same organizational domain."""
    if not domain or not from_domain:
        return False
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def from_domains(fields: Sequence[tuple[str, str]]) -> tuple[str, ...] | None:
    """The domain of every From address in (name, value) header fields, each once;
    None when a From is missing or unreadable."""
    values = [value for name, value in fields if name.lower() == "from"]
    if not values:
        return None
    domains: list[str] = []
    for value in values:
        addresses = [address for _, address in email.utils.getaddresses([value]) if address]
        if not addresses:
            return None
        for address in addresses:
            domain = domain_name(address.rpartition("@")[2]) if "@" in address else ""
            if not domain:
                return None
            if domain not in domains:
                domains.append(domain)
    return tuple(domains)


def _dmarc_txt(resolver: Resolver, domain: str, deadline: float | None) -> str | None:
    """The one DMARC record at ``_dmarc.<domain>``: None when there are none, or several."""
    timeout = None if deadline is None else deadline - time.monotonic()
    records = [r.decode("utf-8", "replace").strip() for r in resolver.txt(f"_dmarc.{domain}", timeout)]
    found = [r for r in records if is_dmarc_record(r)]
    return found[0] if len(found) == 1 else None


def check_dmarc(
    resolver: Resolver, from_domain: str, spf_result: SPFResult, dkim_results: Sequence[DKIMResult], deadline: float | None = None
) -> DMARCResult:
    """RFC 7489 for one From domain, given what SPF and DKIM found.

    Blocking.  ``deadline`` (of ``time.monotonic()``) bounds the lookups;
    without one, each has the resolver's own time limit.  A DNS failure is
    ``temperror``.
    """
    organizational = organizational_domain(from_domain)
    try:
        text = _dmarc_txt(resolver, from_domain, deadline)
        subdomain = False
        if text is None and organizational != from_domain:
            text = _dmarc_txt(resolver, organizational, deadline)
            subdomain = True
    except DNSTemporaryError:
        return DMARCResult("temperror", from_domain, reason="DNS error")
    record = parse_dmarc_record(text) if text is not None else None
    if record is None:
        return DMARCResult("none", from_domain)
    policy = record.sp if subdomain else record.p
    spf_aligned = spf_result.result == "pass" and aligned(spf_result.domain, from_domain, record.aspf)
    dkim_aligned = any(r.result == "pass" and aligned(r.domain, from_domain, record.adkim) for r in dkim_results)
    if spf_aligned or dkim_aligned:
        return DMARCResult("pass", from_domain, policy)
    return DMARCResult("fail", from_domain, policy)
