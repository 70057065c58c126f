"""The ``authentication`` filter: SPF, DKIM and DMARC for mail from other servers.

Meant for the MX listener.  Each message gets one header that says what
was checked, in RFC 8601 syntax, with our hostname as the authserv-id::

    Authentication-Results: mail.example.org; spf=pass smtp.mailfrom=a@example.net;
     dkim=pass header.d=example.net header.s=mail; dmarc=pass header.from=example.net

(folded here; mailplat writes filter headers on one line).  mailplat's SMTP
server removes Authentication-Results fields that claim our authserv-id
before the filters see the message, so a forged one never reaches a
mailbox.  Clients that logged in are not checked: their mail is ours, and
is signed rather than verified.

The checks:

- SPF (RFC 7208), at MAIL FROM: is the client's address allowed to send for
  the MAIL FROM domain, or for the HELO name when the sender is null (<>)?
  By the ``pyspf`` library.  A ``fail`` (the domain's ``-all``) is refused
  there with ``spf_fail = "reject"``; every other result only goes into the
  header.  A DNS failure gives ``spf=temperror`` and the message is
  accepted: trouble with a DNS server must not stop mail.
- DKIM (RFC 6376, RFC 8463, RFC 8301), at the end of DATA: every signature
  (up to ``MAX_SIGNATURES``), by the ``dkimpy`` library; ``dkim=none`` when
  there is none.  rsa-sha1 signatures do not count (``dkim=policy``), nor
  do RSA keys under 1024 bits (``dkim=permerror``).
- DMARC (RFC 7489), at the end of DATA, for the domain of each From
  address: the policy at ``_dmarc.<domain>``, else at ``_dmarc.<organizational
  domain>`` (whose ``sp=`` then applies, or ``p=`` without one).  The
  organizational domain comes from the Public Suffix List that the
  ``publicsuffixlist`` package ships (no download at run time; upgrading
  the package updates it).  DMARC passes when SPF passed for a domain
  aligned with the From domain, or a DKIM signature passed with an aligned
  ``d=``; aligned means equal with ``aspf=s``/``adkim=s`` and the same
  organizational domain otherwise (``r``, the default).  ``pct=`` is
  ignored: a failing message is always treated by the policy (``pct`` is
  meant for rolling a policy out, and was dropped by DMARCbis).  Reports
  (``rua``/``ruf``) are not sent.  A header with several From addresses, or
  several From fields, has each domain checked, and the strictest outcome
  applies; without a From address that can be read there is no policy to
  apply (``dmarc=permerror``).

What a DMARC failure does, by policy and the ``dmarc_reject`` option:

====================  ==================  ========================  ==================
policy of the domain  ``"reject"``         ``"quarantine"``          ``"tag"``
====================  ==================  ========================  ==================
``p=reject``          550 5.7.1            Quarantine folder         header only
``p=quarantine``      Quarantine folder    Quarantine folder         header only
``p=none``            header only          header only               header only
====================  ==================  ========================  ==================

A DNS failure while looking up a key or a policy gives ``temperror``, and
temperror never rejects or quarantines.

Options (every other key is refused):

- ``dmarc_reject``: ``"reject"`` (the default), ``"quarantine"`` or ``"tag"``,
  as in the table above.
- ``spf_fail``: ``"tag"`` (the default: SPF ``fail`` only goes into the
  header, and DMARC decides) or ``"reject"`` (550 5.7.1 at MAIL FROM,
  naming the result, as RFC 7208 8.4 allows).

How DNS is asked, and why it never blocks the reactor: ``pyspf`` and
``dkimpy`` are synchronous libraries that look names up from inside their
evaluation (an SPF record's ``include:`` is only known once the record is
read).  They run in worker threads, and their lookups go through
``dnspython`` to exactly the servers of ``[dns] servers`` (the system's
resolvers, from /etc/resolv.conf, when that list is empty), the servers
mailplat's own twisted.names resolver uses.  The twisted.names resolver
cannot serve those threads: a thread waiting on the reactor
(``blockingCallFromThread``) deadlocks when the reactor stops its thread
pool at shutdown.  The threads are the filter's own, in two pools so that
slow DNS for SPF never holds up DKIM verification: up to ``SPF_THREADS``
SPF checks at once, and up to ``MESSAGE_THREADS`` message checks.  Every
lookup has a time limit (``DNS_TIMEOUT``), and each check a total one
(``SPF_TIME``, ``MESSAGE_DNS_TIME``), both under the filter's default
``timeout`` of 30 s: keep that timeout at 30 s or more, or the chain gives
up first and answers 451.

Memory: a message with a DKIM-Signature is read whole into memory for
``dkimpy``, which then holds about 3.5 times its size more while it
canonicalizes the body (see :mod:`mailplat.mailauth.dkim`); at most
``MESSAGE_THREADS`` messages are verified at once.  A message without a
signature has only its header section read.
"""

from __future__ import annotations

import binascii
import email.utils
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import dkim as dkimpy
import spf
from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailplat.interfaces import BackendContext, Client, MessageFilter, SpooledMessage, Verdict
from mailplat.plugins import BackendFactory
from mailplat.options import OptionReader
from mailplat.wire.dns import DNS_TIMEOUT, DNSTemporaryError, Resolver

__all__ = [
    "AuthenticationFilter",
    "DKIMResult",
    "DMARCRecord",
    "DMARCResult",
    "MessageReport",
    "SPFResult",
    "authentication_results",
    "build",
    "check_dmarc",
    "check_message",
    "check_spf",
    "disposition",
    "factory",
    "from_domains",
    "organizational_domain",
    "parse_dmarc_record",
    "verify_dkim",
]

log = Logger()

HEADER = "Authentication-Results"
DMARC_REJECT = ("reject", "quarantine", "tag")
SPF_FAIL = ("reject", "tag")

# Seconds for an SPF check (RFC 7208 4.6.4 suggests at least 20 s; ours is
# shorter so that the check ends before the filter's default 30 s timeout)
# and for the keys and policies of one message; one DNS question may take
# mailplat.wire.dns.DNS_TIMEOUT.
SPF_TIME = 15.0
MESSAGE_DNS_TIME = 15.0
SPF_THREADS = 16
MESSAGE_THREADS = 4
# Signatures verified per message (RFC 6376 6.1 lets verifiers limit it):
# each costs a DNS lookup and a pass over the body.
MAX_SIGNATURES = 8
# A client's SPF result is reused at the end of DATA for this long.
SPF_MEMORY_SECONDS = 600.0
SPF_MEMORY_ENTRIES = 4096
CHUNK = 64 * 1024
# The longest Authentication-Results value we write: with the field name
# and CRLF, well within the 998 octets RFC 5322 allows on a line.
MAX_RESULTS_LENGTH = 900

# A domain name we are willing to look up and to write into a header.
_DOMAIN = re.compile(r"(?=.{1,253}$)(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)+(?!-)[a-z0-9-]{1,63}(?<!-)")
_SELECTOR = re.compile(r"(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)*(?!-)[a-z0-9_-]{1,63}(?<!-)", re.I)
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_DMARC_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(?:;|$)")


# --- DNS from worker threads ----------------------------------------------------


def _spf_lookup(resolver: Resolver, name: str, qtype: str, timeout: float) -> list[tuple[tuple[str, str], Any]]:
    """A lookup in the form pyspf's ``DNSLookup`` returns, DNS failures as its TempError."""
    try:
        records = resolver.lookup(name, qtype, timeout)
    except DNSTemporaryError as e:
        raise spf.TempError(f"DNS {e}")
    answers: list[tuple[tuple[str, str], Any]] = []
    for record in records:
        if qtype in ("A", "AAAA"):
            answers.append(((name, qtype), record.address))
        elif qtype == "MX":
            answers.append(((name, qtype), (record.preference, record.exchange.to_text(omit_final_dot=True))))
        elif qtype == "PTR":
            answers.append(((name, qtype), record.target.to_text(omit_final_dot=True)))
        elif qtype in ("TXT", "SPF"):
            answers.append(((name, qtype), list(record.strings)))
    return answers


# pyspf asks DNS through its module-level DNSLookup, which uses dnspython's
# default resolver (the system's).  The SPF check below runs in a worker
# thread that names its resolver here; other users of pyspf in the process
# (none in mailplat) keep the original.
_spf_resolver = threading.local()
_spf_default_lookup = spf.DNSLookup


def _spf_dns_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> Any:
    resolver = getattr(_spf_resolver, "current", None)
    if resolver is None:
        return _spf_default_lookup(name, qtype, strict, timeout)
    return _spf_lookup(resolver, name, qtype, timeout)


if getattr(spf.DNSLookup, "__name__", "") != "_spf_dns_lookup":
    spf.DNSLookup = _spf_dns_lookup


# --- names ----------------------------------------------------------------------------


_psl: Any = None
_psl_lock = threading.Lock()


def organizational_domain(domain: str) -> str:
    """The registered domain (RFC 7489 3.2): ``mail.example.co.uk`` gives ``example.co.uk``.

    A top-level domain the list does not know counts as listed
    (``a.b.example.test`` gives ``example.test``); a public suffix is its
    own organizational domain.
    """
    global _psl
    with _psl_lock:
        if _psl is None:
            from publicsuffixlist import PublicSuffixList

            _psl = PublicSuffixList()
    return _psl.privatesuffix(domain) or domain


def _domain(name: str) -> str:
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


def _aligned(domain: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 3.1: strict is the same name, relaxed the same organizational domain."""
    if not domain or not from_domain:
        return False
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def _client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The client's address as SPF knows it: IPv4 when mapped into IPv6, no %zone."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# --- SPF ------------------------------------------------------------------------------


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
        domain = _domain(raw_domain) if at else ""
    else:
        local, domain = "postmaster", _domain(helo)
    if not domain:
        return SPFResult("none", identity, "", sender, "no domain to check")
    try:
        ip = _client_ip(address)
    except ValueError:
        return SPFResult("none", identity, domain, sender, "client has no IP address")
    _spf_resolver.current = resolver
    try:
        # pyspf checks h (the HELO name) when s is empty, and expands %{h} with it.
        if sender:
            query = spf.query(i=str(ip), s=f"{local}@{domain}", h=helo or domain, querytime=SPF_TIME)
        else:
            query = spf.query(i=str(ip), s="", h=domain, querytime=SPF_TIME)
        result, _, _ = query.check()
    except Exception as e:
        # A record that trips the library over (it asserts in places) is the
        # domain's error, not a reason to refuse everyone's mail.
        return SPFResult("permerror", identity, domain, sender, f"record not usable ({type(e).__name__})")
    finally:
        _spf_resolver.current = None
    result = str(result).lower()
    reasons = {
        "fail": f"{ip} is not allowed to send for {domain}",
        "softfail": f"{ip} is probably not allowed to send for {domain}",
        "temperror": "DNS error",
        "permerror": "bad SPF record",
    }
    if result not in ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"):
        return SPFResult("permerror", identity, domain, sender, f"unexpected result {result[:20]}")
    return SPFResult(result, identity, domain, sender, reasons.get(result, ""))


# --- DKIM -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DKIMResult:
    """One DKIM-Signature's verification."""

    result: str  # pass fail neutral policy temperror permerror
    domain: str = ""  # d=, when it is a domain name
    selector: str = ""  # s=, when it is a selector
    reason: str = ""


class _Quiet(logging.Logger):
    """dkimpy logs every failure at error level: we report them ourselves."""

    def __init__(self) -> None:
        super().__init__("mailplat.dkimpy", logging.CRITICAL + 1)
        self.addHandler(logging.NullHandler())
        self.propagate = False


_QUIET = _Quiet()


class _KeyLookup:
    """dkimpy's ``dnsfunc``: the TXT record at the selector, by our resolver."""

    def __init__(self, resolver: Resolver, deadline: float) -> None:
        self.resolver = resolver
        self.deadline = deadline
        self.missing = False

    def __call__(self, name: bytes | str, timeout: float = DNS_TIMEOUT) -> bytes | None:
        try:
            text = name.decode("ascii") if isinstance(name, bytes) else name
        except UnicodeDecodeError:
            self.missing = True
            return None
        try:
            records = self.resolver.txt(text.rstrip("."), min(timeout, self.deadline - time.monotonic()))
        except DNSTemporaryError as e:
            raise dkimpy.DnsTimeoutError(str(e))
        if not records:
            self.missing = True
            return None
        return records[0]


def _tag(signature: bytes, tag: bytes) -> bytes:
    match = re.search(rb"(?:^|;)\s*" + tag + rb"\s*=\s*([^;]*)", signature)
    return re.sub(rb"\s+", b"", match.group(1)) if match else b""


def _names(signature: bytes) -> tuple[str, str]:
    """d= and s= of a signature, each "" unless it is a clean name we may print."""
    domain = _domain(_tag(signature, b"d").decode("ascii", "replace"))
    selector = _tag(signature, b"s").decode("ascii", "replace")
    return domain, selector if _SELECTOR.fullmatch(selector) else ""


def verify_dkim(resolver: Resolver, message: bytes, deadline: float | None = None) -> tuple[DKIMResult, ...]:
    """Every DKIM signature of ``message`` (up to MAX_SIGNATURES), verified.

    Blocking and CPU-bound: run it in a thread.  ``deadline`` (of
    ``time.monotonic()``) bounds the DNS lookups of all the signatures.
    """
    if deadline is None:
        deadline = time.monotonic() + MESSAGE_DNS_TIME
    try:
        verifier = dkimpy.DKIM(message, logger=_QUIET, minkey=1024)
    except dkimpy.DKIMException:
        return (DKIMResult("neutral", reason="header section not parseable"),)
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    results = []
    for index, raw in enumerate(signatures[:MAX_SIGNATURES]):
        domain, selector = _names(raw)
        try:
            prepared = verifier.verify_headerprep(index)
        except dkimpy.DKIMException:
            results.append(DKIMResult("neutral", domain, selector, "signature not valid"))
            continue
        if not prepared:
            break
        sig, include_headers, headers = prepared
        if sig.get(b"a", b"").lower() == b"rsa-sha1":
            # RFC 8301 3.1: verifiers must not consider rsa-sha1 valid.
            results.append(DKIMResult("policy", domain, selector, "rsa-sha1"))
            continue
        lookup = _KeyLookup(resolver, deadline)
        try:
            verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = dkimpy.load_pk_from_dns(
                sig[b"s"] + b"._domainkey." + sig[b"d"] + b".", lookup, timeout=DNS_TIMEOUT
            )
        except dkimpy.DnsTimeoutError:
            results.append(DKIMResult("temperror", domain, selector, "DNS error"))
            continue
        except (dkimpy.DKIMException, binascii.Error, ValueError):
            results.append(DKIMResult("permerror", domain, selector, "no key" if lookup.missing else "bad key"))
            continue
        try:
            good = verifier.verify_sig_process(sig, include_headers, headers[index], lookup)
        except dkimpy.KeyFormatError:
            results.append(DKIMResult("permerror", domain, selector, "key too small"))
            continue
        except dkimpy.ValidationError as e:
            if "body hash" in str(e):
                results.append(DKIMResult("fail", domain, selector, "body hash mismatch"))
            else:
                # A key published for TLS reports only (s=tlsrpt), not for mail.
                results.append(DKIMResult("permerror", domain, selector, "key not for mail"))
            continue
        except (dkimpy.DKIMException, ValueError, TypeError):
            results.append(DKIMResult("neutral", domain, selector, "signature not valid"))
            continue
        results.append(DKIMResult("pass", domain, selector) if good else DKIMResult("fail", domain, selector, "signature mismatch"))
    return tuple(results)


# --- DMARC ----------------------------------------------------------------------------


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


_POLICIES = ("none", "quarantine", "reject")


def parse_dmarc_record(text: str) -> DMARCRecord | None:
    """A record's policy, or None when it has none to apply (RFC 7489 6.3, 6.6.3).

    Unknown tags are ignored.  A missing or unknown ``p=`` (or unknown
    ``sp=``) makes the record ``p=none`` when it asks for reports (``rua=``),
    else no record at all.
    """
    text = text.strip()
    if not _DMARC_VERSION.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in _POLICIES or sp not in _POLICIES:
        if "mailto:" not in tags.get("rua", "").lower():
            return None
        p = sp = "none"
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DMARCRecord(
        p, sp,
        "s" if tags.get("adkim", "r").lower() == "s" else "r",
        "s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct,
    )


def _dmarc_txt(resolver: Resolver, domain: str, deadline: float) -> str | None:
    """The one DMARC record at ``_dmarc.<domain>``: None when there are none, or several."""
    records = [r.decode("utf-8", "replace").strip() for r in resolver.txt(f"_dmarc.{domain}", deadline - time.monotonic())]
    found = [r for r in records if _DMARC_VERSION.match(r)]
    return found[0] if len(found) == 1 else None


def check_dmarc(
    resolver: Resolver, from_domain: str, spf_result: SPFResult, dkim_results: Sequence[DKIMResult], deadline: float | None = None
) -> DMARCResult:
    """RFC 7489 for one From domain, given what SPF and DKIM found.  Blocking."""
    if deadline is None:
        deadline = time.monotonic() + MESSAGE_DNS_TIME
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
    spf_aligned = spf_result.result == "pass" and _aligned(spf_result.domain, from_domain, record.aspf)
    dkim_aligned = any(r.result == "pass" and _aligned(r.domain, from_domain, record.adkim) for r in dkim_results)
    if spf_aligned or dkim_aligned:
        return DMARCResult("pass", from_domain, policy)
    return DMARCResult("fail", from_domain, policy)


# --- the message ---------------------------------------------------------------------


@dataclass(frozen=True)
class MessageReport:
    """What the end-of-DATA checks found."""

    spf: SPFResult
    dkim: tuple[DKIMResult, ...]
    dmarc: tuple[DMARCResult, ...]


def _read_header_section(stream: IO[bytes]) -> tuple[bytes, bytes]:
    """The header section (through its empty line) and what was read past it."""
    buffer = bytearray()
    searched = 0
    while True:
        if buffer.startswith(b"\r\n"):
            return bytes(buffer[:2]), bytes(buffer[2:])
        end = buffer.find(b"\r\n\r\n", max(0, searched - 3))
        if end >= 0:
            return bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
        searched = len(buffer)
        chunk = stream.read(CHUNK)
        if not chunk:
            return bytes(buffer), b""
        buffer += chunk


def _header_fields(section: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) of each field; lines that are no field are skipped."""
    fields: list[list[Any]] = []
    for line in section.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += line
            continue
        match = _FIELD.match(line)
        if match:
            fields.append([match.group(1), line[match.end() :]])
        else:
            # A continuation may only follow a field.
            fields.append([b"", b""])
    return [(n.decode("ascii"), v.decode("utf-8", "replace").strip()) for n, v in fields if n]


def from_domains(fields: Sequence[tuple[str, str]]) -> tuple[str, ...] | None:
    """The domain of every From address, each once; None when a From is missing or unreadable."""
    values = [value for name, value in fields if name.lower() == "from"]
    if not values:
        return None
    domains: list[str] = []
    for value in values:
        addresses = [address for _, address in email.utils.getaddresses([value]) if address]
        if not addresses:
            return None
        for address in addresses:
            domain = _domain(address.rpartition("@")[2]) if "@" in address else ""
            if not domain:
                return None
            if domain not in domains:
                domains.append(domain)
    return tuple(domains)


def check_message(resolver: Resolver, message: SpooledMessage, spf_result: SPFResult) -> MessageReport:
    """DKIM and DMARC for a spooled message.  Blocking: run it in a thread.

    Only the header section is read, unless a DKIM-Signature asks for the
    whole message.
    """
    deadline = time.monotonic() + MESSAGE_DNS_TIME
    with message.open() as stream:
        section, rest = _read_header_section(stream)
        fields = _header_fields(section)
        signed = any(name.lower() == "dkim-signature" for name, _ in fields)
        whole = section + rest + stream.read() if signed else b""
    dkim_results = verify_dkim(resolver, whole, deadline) if signed else ()
    del whole
    domains = from_domains(fields)
    if domains is None:
        dmarc = (DMARCResult("permerror", "", reason="no readable From address"),)
    else:
        dmarc = tuple(check_dmarc(resolver, domain, spf_result, dkim_results, deadline) for domain in domains)
    return MessageReport(spf_result, dkim_results, dmarc)


# --- verdict and header ----------------------------------------------------------------


def disposition(result: DMARCResult, dmarc_reject: str) -> str:
    """What to do with a message, for one DMARC result: "reject", "quarantine" or "none"."""
    if result.result != "fail":
        return "none"
    if result.policy == "reject":
        return {"reject": "reject", "quarantine": "quarantine"}.get(dmarc_reject, "none")
    if result.policy == "quarantine":
        return "none" if dmarc_reject == "tag" else "quarantine"
    return "none"


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
    for result in report.dkim:
        text = f"dkim={result.result}{_comment(result.reason)}"
        if result.domain:
            text += f" header.d={result.domain}"
        if result.selector:
            text += f" header.s={result.selector}"
        pieces.append((0 if result.result == "pass" else 2, text))
    if not report.dkim:
        pieces.append((0, "dkim=none"))
    for index, result in enumerate(report.dmarc):
        comment = result.reason
        if result.policy:
            done = dispositions[index] if index < len(dispositions) else "none"
            comment = f"p={result.policy} dis={done}" + (f" {comment}" if comment else "")
        text = f"dmarc={result.result}{_comment(comment)}"
        if result.domain:
            text += f" header.from={result.domain}"
        pieces.append((0 if result.result == "fail" else 1, text))
    budget = MAX_RESULTS_LENGTH - len(authserv_id) - 2 - len(spf_part)
    kept = set()
    for position in sorted(range(len(pieces)), key=lambda p: (pieces[p][0], p)):
        cost = 2 + len(pieces[position][1])
        if cost <= budget:
            kept.add(position)
            budget -= cost
    return "; ".join([authserv_id, spf_part, *(text for p, (_, text) in enumerate(pieces) if p in kept)])


# --- the filter -------------------------------------------------------------------------


class AuthenticationFilter(MessageFilter, service.Service):
    """SPF at MAIL FROM, DKIM and DMARC at the end of DATA, one header with all three.

    A service so that its thread pools start with mailplat and stop with it.
    """

    def __init__(self, authserv_id: str, dmarc_reject: str, spf_fail: str, resolver: Resolver, reactor: Any) -> None:
        self.authserv_id = authserv_id
        self.dmarc_reject = dmarc_reject
        self.spf_fail = spf_fail
        self.resolver = resolver
        self.reactor = reactor
        self._spf_pool: ThreadPool | None = None
        self._message_pool: ThreadPool | None = None
        # (client address, HELO, sender) -> (until, result): from MAIL to DATA.
        self._spf_results: dict[tuple[str, str, str], tuple[float, SPFResult]] = {}

    def startService(self) -> None:
        super().startService()
        self._spf_pool = ThreadPool(0, SPF_THREADS, "mailplat-authentication-spf")
        self._message_pool = ThreadPool(0, MESSAGE_THREADS, "mailplat-authentication-message")
        self._spf_pool.start()
        self._message_pool.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        pools = [pool for pool in (self._spf_pool, self._message_pool) if pool is not None]
        self._spf_pool = self._message_pool = None

        def stop() -> None:
            # Waits for running checks, each bounded by its DNS time limit.
            for pool in pools:
                pool.stop()

        return deferToThread(stop)

    def _in_thread(self, pool: ThreadPool | None, f: Any, *args: Any) -> defer.Deferred[Any]:
        # Before startService (a filter built outside the server): the reactor's pool.
        return deferToThreadPool(self.reactor, pool or self.reactor.getThreadPool(), f, *args)

    async def check_mail(self, client: Client, sender: str) -> Verdict | None:
        if client.authenticated_as is not None:
            return None
        result = await self._spf(client, sender)
        if result.result == "fail" and self.spf_fail == "reject":
            return Verdict.reject(
                f"SPF check failed (spf=fail): {_client_ip(client.address)} is not allowed to send mail from {result.domain}"
            )
        return None

    async def check_data(self, client: Client, sender: str, recipients: tuple[str, ...], message: SpooledMessage) -> Verdict | None:
        if client.authenticated_as is not None:
            return None
        spf_result = self._recall(client, sender) or await self._spf(client, sender)
        report: MessageReport = await self._in_thread(self._message_pool, check_message, self.resolver, message, spf_result)
        dispositions = [disposition(result, self.dmarc_reject) for result in report.dmarc]
        header = ((HEADER, authentication_results(self.authserv_id, report, dispositions)),)
        for result in report.dkim:
            if result.result in ("temperror", "permerror", "neutral"):
                log.info(
                    "authentication: DKIM {result} for d={domain} s={selector}: {reason}",
                    result=result.result, domain=result.domain, selector=result.selector, reason=result.reason,
                )
        rejected = [r for r, done in zip(report.dmarc, dispositions) if done == "reject"]
        if rejected:
            return Verdict.reject(
                f"Unauthenticated mail from {rejected[0].domain} is refused by its DMARC policy"
                " (the From domain is not aligned with a passing SPF or DKIM domain)"
            )
        if "quarantine" in dispositions:
            failed = report.dmarc[dispositions.index("quarantine")]
            return Verdict.quarantine(f"DMARC policy of {failed.domain}: quarantine", header)
        return Verdict.accept(header)

    async def _spf(self, client: Client, sender: str) -> SPFResult:
        result: SPFResult = await self._in_thread(self._spf_pool, check_spf, self.resolver, client.address, sender, client.helo)
        if result.result in ("temperror", "permerror"):
            log.info(
                "authentication: SPF {result} for {domain} from {client}: {reason}",
                result=result.result, domain=result.domain, client=client.address, reason=result.reason,
            )
        self._remember((client.address, client.helo, sender), result)
        return result

    def _recall(self, client: Client, sender: str) -> SPFResult | None:
        entry = self._spf_results.get((client.address, client.helo, sender))
        if entry is None or entry[0] <= self.reactor.seconds():
            return None
        return entry[1]

    def _remember(self, key: tuple[str, str, str], result: SPFResult) -> None:
        now = self.reactor.seconds()
        if len(self._spf_results) >= SPF_MEMORY_ENTRIES:
            for stale in [k for k, (until, _) in self._spf_results.items() if until <= now]:
                del self._spf_results[stale]
            while len(self._spf_results) >= SPF_MEMORY_ENTRIES:
                del self._spf_results[next(iter(self._spf_results))]
        self._spf_results.pop(key, None)
        self._spf_results[key] = (now + SPF_MEMORY_SECONDS, result)


def build(options: dict[str, Any], context: BackendContext) -> AuthenticationFilter:
    """Check the ``[[filter]]`` options and make the filter."""
    reader = OptionReader(options, "authentication")
    dmarc_reject = reader.choice(
        "dmarc_reject", DMARC_REJECT, "reject", fix='e.g. dmarc_reject = "reject" (what to do with mail failing a p=reject DMARC policy)',
    )
    spf_fail = reader.choice(
        "spf_fail", SPF_FAIL, "tag", fix='e.g. spf_fail = "tag" (refuse SPF -all failures at MAIL FROM with "reject")',
    )
    reader.finish()
    return AuthenticationFilter(context.hostname, dmarc_reject, spf_fail, Resolver(context.dns_servers), context.reactor)


# Until the name "authentication" is registered: backend = "mailplat.filters.authentication:factory".
factory = BackendFactory("filter", "authentication", "mailplat.filters.authentication:build")
