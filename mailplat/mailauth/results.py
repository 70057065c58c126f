"""The Authentication-Results header field (RFC 8601): what SPF, DKIM and DMARC found, in one line.

With our hostname as the authserv-id::

    Authentication-Results: mail.example.org; spf=pass smtp.mailfrom=a@example.net;
     dkim=pass header.d=example.net header.s=mail; dmarc=pass header.from=example.net

(folded here; mailplat writes filter headers on one line).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailplat.mailauth.dkim import DKIMResult
from mailplat.mailauth.dmarc import DMARCResult
from mailplat.mailauth.spf import SPFResult

__all__ = ["HEADER", "MessageReport", "authentication_results"]

HEADER = "Authentication-Results"
# The longest value we write: with the field name and CRLF, well within
# the 998 octets RFC 5322 allows on a line.
MAX_RESULTS_LENGTH = 900

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


@dataclass(frozen=True)
class MessageReport:
    """What the checks of one message found."""

    spf: SPFResult
    dkim: tuple[DKIMResult, ...]
    dmarc: tuple[DMARCResult, ...]


def _comment(text: str) -> str:
    """An RFC 8601 comment from our own words (no parentheses or backslashes in it)."""
    words = "".join(c if 0x20 < ord(c) < 0x7F and c not in "()\\" else " " for c in text).split()
    return f" ({' '.join(words)})" if words else ""


def authentication_results(authserv_id: str, report: MessageReport, dispositions: Sequence[str] = ()) -> str:
    """The Authentication-Results value (RFC 8601) for a report.

    ``dispositions`` gives, for each DMARC result, what was done ("none",
    "quarantine"), written into its comment as ``dis=``.  The header is
    written on one line, which RFC 5322 caps at 998 octets: when signatures
    or From domains with long names would exceed MAX_RESULTS_LENGTH, the
    results that decided least are left out (those that failed DMARC and
    the DKIM passes are kept first).
    """
    spf_result = report.spf
    text = f"spf={spf_result.result}{_comment(spf_result.reason)}"
    if spf_result.identity == "mailfrom" and spf_result.domain:
        local = spf_result.sender.rpartition("@")[0]
        text += f" smtp.mailfrom={local}@{spf_result.domain}" if _DOT_ATOM.fullmatch(local) else f" smtp.mailfrom={spf_result.domain}"
    elif spf_result.identity == "helo" and spf_result.domain:
        text += f" smtp.helo={spf_result.domain}"
    spf_part = text
    # (rank, text): when the line would be too long, lower ranks are kept first.
    pieces: list[tuple[int, str]] = []
    for dkim in report.dkim:
        text = f"dkim={dkim.result}{_comment(dkim.reason)}"
        if dkim.domain:
            text += f" header.d={dkim.domain}"
        if dkim.selector:
            text += f" header.s={dkim.selector}"
        pieces.append((0 if dkim.result == "pass" else 2, text))
    if not report.dkim:
        pieces.append((0, "dkim=none"))
    for index, dmarc in enumerate(report.dmarc):
        comment = dmarc.reason
        if dmarc.policy:
            done = dispositions[index] if index < len(dispositions) else "none"
            comment = f"p={dmarc.policy} dis={done}" + (f" {comment}" if comment else "")
        text = f"dmarc={dmarc.result}{_comment(comment)}"
        if dmarc.domain:
            text += f" header.from={dmarc.domain}"
        pieces.append((0 if dmarc.result == "fail" else 1, text))
    budget = MAX_RESULTS_LENGTH - len(authserv_id) - 2 - len(spf_part)
    kept = set()
    for position in sorted(range(len(pieces)), key=lambda p: (pieces[p][0], p)):
        cost = 2 + len(pieces[position][1])
        if cost <= budget:
            kept.add(position)
            budget -= cost
    return "; ".join([authserv_id, spf_part, *(text for p, (_, text) in enumerate(pieces) if p in kept)])
