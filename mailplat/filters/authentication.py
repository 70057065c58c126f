"""The ``authentication`` filter: SPF, DKIM and DMARC for mail from other servers.

Meant for the MX listener.  Each message gets one Authentication-Results
header that says what was checked (:mod:`mailplat.mailauth.results`), with
our hostname as the authserv-id.  mailplat's SMTP server removes
Authentication-Results fields that claim our authserv-id before the filters
see the message, so a forged one never reaches a mailbox.  Clients that
logged in are not checked: their mail is ours, and is signed rather than
verified.

The checks, each in :mod:`mailplat.mailauth`:

- SPF (RFC 7208, :mod:`~mailplat.mailauth.spf`), at MAIL FROM: is the
  client's address allowed to send for the MAIL FROM domain, or for the
  HELO name when the sender is null (<>)?  A ``fail`` (the domain's
  ``-all``) is refused there with ``spf_fail = "reject"``; every other
  result only goes into the header.  A DNS failure gives ``spf=temperror``
  and the message is accepted: trouble with a DNS server must not stop mail.
- DKIM (RFC 6376, RFC 8463, RFC 8301, :mod:`~mailplat.mailauth.dkim`), at
  the end of DATA: every signature (up to ``MAX_SIGNATURES`` of that module); ``dkim=none``
  when there is none.  rsa-sha1 signatures do not count (``dkim=policy``),
  nor do RSA keys under 1024 bits (``dkim=permerror``).
- DMARC (RFC 7489, :mod:`~mailplat.mailauth.dmarc`), at the end of DATA,
  for the domain of each From address.  ``pct=`` is ignored: a failing
  message is always treated by the policy.  Reports (``rua``/``ruf``) are
  not sent.  A header with several From addresses, or several From fields,
  has each domain checked, and the strictest outcome applies; without a
  From address that can be read there is no policy to apply
  (``dmarc=permerror``).

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
evaluation.  They run in worker threads, and their lookups go through the
thread-side resolver of :mod:`mailplat.wire.dns` to exactly the servers of
``[dns] servers`` (the system's resolvers, from /etc/resolv.conf, when that
list is empty), the servers mailplat's own twisted.names resolver uses.
The threads are two pools of the service's (``context.threads``, started
and stopped by mailplat), so that slow DNS for SPF never holds up DKIM
verification: up to ``SPF_THREADS`` SPF checks at once, and up to
``MESSAGE_THREADS`` message checks.  Every lookup has a
time limit (``mailplat.wire.dns.DNS_TIMEOUT``), and each check a total one
(``mailplat.mailauth.spf.SPF_TIME``, ``MESSAGE_DNS_TIME``), both under the
filter's default ``timeout`` of 30 s: keep that timeout at 30 s or more, or
the chain gives up first and answers 451.

Memory: a message with a DKIM-Signature is read whole into memory for
``dkimpy``, which then holds about 3.5 times its size more while it
canonicalizes the body (see :mod:`mailplat.mailauth.dkim`); at most
``MESSAGE_THREADS`` messages are verified at once.  A message without a
signature has only its header section read.
"""

from __future__ import annotations

import re
import time
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailplat.interfaces import (
    BackendContext,
    Client,
    MessageFilter,
    SpooledMessage,
    Verdict,
)
from mailplat.mailauth.dkim import verify_dkim
from mailplat.mailauth.dmarc import DMARCResult, check_dmarc, from_domains
from mailplat.mailauth.results import HEADER, MessageReport, authentication_results
from mailplat.mailauth.spf import SPFResult, check_spf, client_ip
from mailplat.options import OptionReader
from mailplat.plugins import BackendFactory
from mailplat.wire.dns import Resolver

__all__ = ["AuthenticationFilter", "build", "check_message", "disposition", "factory"]

log = Logger()

DMARC_REJECT = ("reject", "quarantine", "tag")
SPF_FAIL = ("reject", "tag")

# Seconds for the DNS lookups of one message (its keys and policies).
MESSAGE_DNS_TIME = 15.0
SPF_THREADS = 16
MESSAGE_THREADS = 4
# A client's SPF result is reused at the end of DATA for this long.
SPF_MEMORY_SECONDS = 600.0
SPF_MEMORY_ENTRIES = 4096
CHUNK = 64 * 1024

_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


# --- the message ---------------------------------------------------------------------


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
    dmarc: tuple[DMARCResult, ...]
    if domains is None:
        dmarc = (DMARCResult("permerror", "", reason="no readable From address"),)
    else:
        dmarc = tuple(check_dmarc(resolver, domain, spf_result, dkim_results, deadline) for domain in domains)
    return MessageReport(spf_result, dkim_results, dmarc)


# --- verdict ---------------------------------------------------------------------------


def disposition(result: DMARCResult, dmarc_reject: str) -> str:
    """What to do with a message, for one DMARC result: "reject", "quarantine" or "none"."""
    if result.result != "fail":
        return "none"
    if result.policy == "reject":
        return {"reject": "reject", "quarantine": "quarantine"}.get(dmarc_reject, "none")
    if result.policy == "quarantine":
        return "none" if dmarc_reject == "tag" else "quarantine"
    return "none"


# --- the filter -------------------------------------------------------------------------


class AuthenticationFilter(MessageFilter):
    """SPF at MAIL FROM, DKIM and DMARC at the end of DATA, one header with all three."""

    def __init__(
        self, authserv_id: str, dmarc_reject: str, spf_fail: str, resolver: Resolver, reactor: Any, threads: Any = None,
    ) -> None:
        self.authserv_id = authserv_id
        self.dmarc_reject = dmarc_reject
        self.spf_fail = spf_fail
        self.resolver = resolver
        self.reactor = reactor
        # The service's pools; None for a filter built outside the server
        # (tests, tests/check_filter.py), which then uses the reactor's.
        self._spf_pool: ThreadPool | None = threads.pool("authentication-spf", SPF_THREADS) if threads else None
        self._message_pool: ThreadPool | None = threads.pool("authentication-message", MESSAGE_THREADS) if threads else None
        # (client address, HELO, sender) -> (until, result): from MAIL to DATA.
        self._spf_results: dict[tuple[str, str, str], tuple[float, SPFResult]] = {}

    def _in_thread(self, pool: ThreadPool | None, f: Any, *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, pool or self.reactor.getThreadPool(), f, *args)

    async def check_mail(self, client: Client, sender: str) -> Verdict | None:
        if client.authenticated_as is not None:
            return None
        result = await self._spf(client, sender)
        if result.result == "fail" and self.spf_fail == "reject":
            return Verdict.reject(
                f"SPF check failed (spf=fail): {client_ip(client.address)} is not allowed to send mail from {result.domain}"
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
    return AuthenticationFilter(context.hostname, dmarc_reject, spf_fail, Resolver(context.dns_servers), context.reactor, context.threads)


# Until the name "authentication" is registered: backend = "mailplat.filters.authentication:factory".
factory = BackendFactory("filter", "authentication", "mailplat.filters.authentication:build")
