"""Domain names as SPF, DKIM and DMARC compare them, and the organizational domain of RFC 7489."""

from __future__ import annotations

import re
import threading
from typing import Any

__all__ = ["domain_name", "organizational_domain"]

# A domain name we are willing to look up and to write into a header.
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)+(?!-)[a-z0-9-]{1,63}(?<!-)")

_psl: Any = None
_psl_lock = threading.Lock()


def domain_name(name: str) -> str:
    """A domain name in the form we look up and compare: lower-case A-labels,
    no final dot; "" when it is not a domain name (an address literal, say)."""
    name = name.strip().rstrip(".").lower()
    if not name:
        return ""
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return ""
    return name if _DOMAIN.fullmatch(name) else ""


def organizational_domain(domain: str) -> str:
    """The registered domain (RFC 7489 3.2): ``mail.example.co.uk`` gives ``example.co.uk``.

    A top-level domain the list does not know counts as listed
    (``a.b.example.test`` gives ``example.test``); a public suffix is its
    own organizational domain.  The list is the one the ``publicsuffixlist``
    package ships (no download at run time; upgrading the package updates it).
    """
    global _psl
    with _psl_lock:
        if _psl is None:
            from publicsuffixlist import PublicSuffixList

            _psl = PublicSuffixList()
    return _psl.privatesuffix(domain) or domain
