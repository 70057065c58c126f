"""``mailplat doctor``: check a deployment's DNS and TLS, and say exactly what to fix.

Other mail servers judge us by what DNS says about our domains (MX, SPF,
DKIM, DMARC) and by our certificate; a mistake there shows up only as mail
that bounces or lands in spam, days later.  Each check is one row of a table:
``ok``, ``warn`` (works, but look at it) or ``FAIL``, and a FAIL comes with the
record to publish or the command to run.  The exit status is 1 when any row
failed, so the command can run from a monitoring job.

Per hosted domain: MX, SPF, DKIM and DMARC.  Once: the hostname's A/AAAA
records, the ``[tls]`` certificate (dates, name) and whether each ``[listen]``
endpoint accepts a connection on this machine; a retrieval listener (pop3,
pop3s, imap, imaps) must also speak its protocol as a mail client expects:
the greeting, TLS at once on pop3s and imaps, and on pop3 and imap STLS or
STARTTLS offered with no login before it and login after it, and the
certificate served the one in [tls] (a renewed file is served only after a
restart).  SPF is judged as receivers
judge it, by the evaluator the authentication filter uses
(:mod:`mailplat.mailauth.spf`), for mail from the domain's postmaster sent
from each of the hostname's addresses; the row names the term that decided.

DNS is asked through ``--dns-server`` when given, else ``[dns] servers``, else
the name servers of /etc/resolv.conf (never /etc/hosts, which the rest of the
world does not see).  A name that does not exist, or has no record of the
kind, is a FAIL with the fix; SERVFAIL or no answer in time is a FAIL that
says the check could not be made.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import os
import re
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from twisted.internet import protocol

from mailplat.config import Settings
from mailplat.wire.lines import printable

if TYPE_CHECKING:
    from twisted.python.failure import Failure

__all__ = ["Row", "add_arguments", "connect_target", "dns_server_argument", "run"]

OK, WARN, FAIL = "ok", "warn", "FAIL"

# Seconds to wait for a DNS answer, each a retry: a few seconds in all.
DNS_TIMEOUT = (1, 2)
CONNECT_TIMEOUT = 3.0
# Certificates expiring sooner fail (renewal is overdue), or warn.
EXPIRY_FAIL_DAYS = 14
EXPIRY_WARN_DAYS = 30
# A TXT string holds at most 255 bytes (RFC 1035 3.3.14); longer values are split.
TXT_STRING_MAX = 255


@dataclass(frozen=True)
class Row:
    """One check's outcome: what was checked, on what, the result, and the fix."""

    check: str
    subject: str
    result: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""


class DNSProblem(Exception):
    """A lookup that tells nothing about the records (SERVFAIL, timeout...)."""


# --- the command ---------------------------------------------------------------


def dns_server_argument(text: str) -> str:
    """argparse type for ``--dns-server``: ``IP:PORT``, ``[IPv6]:PORT`` or ``IP`` (port 53)."""
    from mailplat.wire.dns import format_server, parse_server

    try:
        return format_server(parse_server(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor subcommand's options."""
    parser.add_argument(
        "--dns-server", metavar="IP:PORT", type=dns_server_argument, default=None,
        help="ask only this DNS server (default: [dns] servers, else those of /etc/resolv.conf)",
    )


def run(settings: Settings, dns_server: str | None, out: TextIO) -> int:
    """Run every check, print the table to ``out``; 0 when nothing failed, else 1.

    Drives the reactor itself, so it can run only once per process.
    """
    from twisted.internet import defer, task

    from mailplat.wire.dns import format_server, parse_server

    if dns_server:
        servers = [parse_server(dns_server)]
        source = f"{dns_server} (--dns-server)"
    elif settings.dns_servers:
        servers = list(settings.dns_servers)
        source = f"{', '.join(map(format_server, servers))} ([dns] servers)"
    else:
        servers = []
        source = "the name servers of /etc/resolv.conf"
    rows: list[Row] = []
    broken: list[str] = []

    async def checks(reactor: Any) -> None:
        try:
            rows.extend(await _Doctor(settings, servers, reactor).rows())
        except Exception:  # noqa: BLE001 - a bug: printed with its traceback
            # Each check reports its own errors; this is a bug, worth its traceback.
            broken.append(traceback.format_exc())

    try:
        task.react(lambda reactor: defer.ensureDeferred(checks(reactor)))
    except SystemExit:
        pass  # react always exits; the rows say how it went
    for text in broken:
        sys.stderr.write(text)
    out.write(render(rows, source))
    out.flush()
    return 1 if not rows or any(r.result == FAIL for r in rows) else 0


def render(rows: list[Row], source: str) -> str:
    """The rows as an aligned table; each fix on its own line under the detail."""
    header = Row("CHECK", "SUBJECT", "RESULT", "DETAIL / FIX")
    widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in ("check", "subject", "result")]
    indent = " " * (sum(widths) + 2 * len(widths))
    lines = [f"DNS answers from {source}", ""]
    for row in [header, *rows]:
        cells = [row.check.ljust(widths[0]), row.subject.ljust(widths[1]), row.result.ljust(widths[2]), row.detail]
        lines.append("  ".join(cells).rstrip())
        if row.fix:
            lines.append(f"{indent}fix: {row.fix}")
    failed = sum(r.result == FAIL for r in rows)
    warned = sum(r.result == WARN for r in rows)
    lines.append("")
    if not rows:
        lines.append("no checks ran")
    elif failed:
        lines.append(f"{failed} of {len(rows)} checks failed, {warned} warning(s): apply each fix above, then run mailplat doctor again")
    elif warned:
        lines.append(f"all {len(rows)} checks passed, {warned} with a warning")
    else:
        lines.append(f"all {len(rows)} checks passed")
    return "\n".join(lines) + "\n"


# --- DNS -------------------------------------------------------------------------


class _DNS:
    """Lookups through one resolver; each (name, type) is asked once however many checks need it."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.asked: dict[tuple[str, str], Any] = {}

    async def records(self, name: str, kind: str) -> list[Any]:
        """The record payloads of ``kind``; [] for NXDOMAIN or no such record; DNSProblem otherwise."""
        from twisted.internet import defer

        key = (name.lower().rstrip("."), kind)
        if key not in self.asked:
            # Never fails: the outcome (records or a DNSProblem) is shared by every asker.
            self.asked[key] = defer.ensureDeferred(self._ask(*key))
        waiting: defer.Deferred[Any] = defer.Deferred()

        def share(outcome: Any) -> Any:
            waiting.callback(outcome)
            return outcome

        self.asked[key].addCallback(share)
        outcome = await waiting
        if isinstance(outcome, DNSProblem):
            raise DNSProblem(str(outcome))
        return outcome

    async def _ask(self, name: str, kind: str) -> list[Any] | DNSProblem:
        from twisted.internet import defer
        from twisted.names import dns, error

        lookup, rtype = {
            "A": (self.resolver.lookupAddress, dns.A),
            "AAAA": (self.resolver.lookupIPV6Address, dns.AAAA),
            "MX": (self.resolver.lookupMailExchange, dns.MX),
            "TXT": (self.resolver.lookupText, dns.TXT),
        }[kind]
        try:
            answers, _, _ = await lookup(name, timeout=DNS_TIMEOUT)
        except error.DNSNameError:
            return []  # NXDOMAIN
        except error.DNSServerError:
            return DNSProblem(f"SERVFAIL for {name} {kind}")
        except error.DNSQueryRefusedError:
            return DNSProblem(f"REFUSED for {name} {kind}")
        except (error.DNSQueryTimeoutError, defer.TimeoutError):
            return DNSProblem(f"no answer for {name} {kind} within {sum(DNS_TIMEOUT)} s")
        except Exception as e:  # noqa: BLE001 - any other failure is a DNS problem to report
            return DNSProblem(f"{name} {kind}: {e.__class__.__name__}: {e}")
        return [a.payload for a in answers if a.type == rtype]

    async def addresses(self, name: str, kind: str) -> list[str]:
        """The A or AAAA addresses of ``name`` as text."""
        records = await self.records(name, kind)
        if kind == "A":
            return [r.dottedQuad() for r in records]
        return [socket.inet_ntop(socket.AF_INET6, r.address) for r in records]

    async def both(self, name: str) -> tuple[list[str], list[str]]:
        """The A and the AAAA addresses, asked at once (a timeout costs its time once)."""
        from twisted.internet import defer

        def first_error(failure: Failure) -> Failure:
            # The lookup's own DNSProblem, not gatherResults' FirstError around it.
            error = failure.value
            assert isinstance(error, defer.FirstError)
            return error.subFailure

        a, aaaa = await defer.gatherResults(
            [defer.ensureDeferred(self.addresses(name, kind)) for kind in ("A", "AAAA")], consumeErrors=True
        ).addErrback(first_error)
        return a, aaaa

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, host) pairs; the host "" is a null MX (RFC 7505)."""
        return sorted((r.preference, r.name.name.decode("ascii", "replace").rstrip(".").lower()) for r in await self.records(name, "MX"))

    async def texts(self, name: str) -> list[str]:
        """Each TXT record's strings joined into one value (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r.data).decode("utf-8", "replace") for r in await self.records(name, "TXT")]


# --- the checks --------------------------------------------------------------------


class _Doctor:
    def __init__(self, settings: Settings, servers: list[tuple[str, int]], reactor: Any) -> None:
        from mailplat.wire.dns import Resolver, reactor_resolver

        self.settings = settings
        self.host = settings.hostname
        # Never /etc/hosts, which the rest of the world does not see.
        self.dns = _DNS(reactor_resolver(servers, hosts_file=False, timeout=DNS_TIMEOUT))
        # The same servers for pyspf, which asks from a thread.
        self.thread_dns = Resolver(servers, timeout=sum(DNS_TIMEOUT), try_timeout=DNS_TIMEOUT[0])
        self.reactor = reactor

    async def rows(self) -> list[Row]:
        """Every row, in a fixed order; the lookups and connections all run at once."""
        from twisted.internet import defer

        checks: list[tuple[str, str, Callable[[], Awaitable[Row]]]] = [("A/AAAA", self.host, self.host_addresses)]
        for domain in self.settings.domains:
            dkim = self.settings.dkim.get(domain)
            checks += [
                ("MX", domain, functools.partial(self.mx, domain)),
                ("SPF", domain, functools.partial(self.spf, domain)),
                ("DKIM", f"{dkim.selector}._domainkey.{domain}" if dkim else domain, functools.partial(self.dkim, domain)),
                ("DMARC", f"_dmarc.{domain}", functools.partial(self.dmarc, domain)),
            ]
        tls = self.settings.tls
        if tls is None:
            checks.append(("TLS", "[tls]", self.no_tls))
        else:
            checks += [
                ("TLS dates", _short_path(tls.certificate, self.settings), self.tls_dates),
                ("TLS name", self.host, self.tls_name),
            ]
        for name, description in self.settings.listen.items():
            checks.append(("listener", f"{name} {description}", functools.partial(self.listener, name, description)))

        async def guarded(check: str, subject: str, step: Callable[[], Awaitable[Row]]) -> Row:
            try:
                return await step()
            except DNSProblem as e:
                return Row(check, subject, FAIL, f"cannot check: DNS error: {e}", "make sure the DNS server answers, then run mailplat doctor again")
            except Exception as e:  # noqa: BLE001 - each check's failure is its row
                return Row(check, subject, FAIL, f"cannot check: {e.__class__.__name__}: {e}")

        return list(await defer.gatherResults([defer.ensureDeferred(guarded(*c)) for c in checks]))

    # -- DNS, once --

    async def host_addresses(self) -> Row:
        check, subject = "A/AAAA", self.host
        a, aaaa = await self.dns.both(self.host)
        found = "; ".join(part for part in (a and f"A {', '.join(a)}", aaaa and f"AAAA {', '.join(aaaa)}") if part)
        unreachable = [x for x in a + aaaa if _unroutable(x)]
        if unreachable:
            return Row(
                check, subject, FAIL, f"{found}: other servers cannot reach {', '.join(unreachable)}",
                f"point {self.host}. IN A (and AAAA) at this server's public addresses",
            )
        if not a and not aaaa:
            return Row(
                check, subject, FAIL, f"{self.host} has no A or AAAA record: no one can connect to it",
                f"{self.host}. IN A <this server's public IPv4 address>, and {self.host}. IN AAAA <its IPv6 address> if it has one",
            )
        if not a:
            return Row(check, subject, WARN, f"{found}; no A record: IPv4-only servers cannot deliver here", f"{self.host}. IN A <this server's public IPv4 address>")
        return Row(check, subject, OK, found if aaaa else f"{found} (no AAAA: publish one if the server has IPv6)")

    async def _our_addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        try:
            a, aaaa = await self.dns.both(self.host)
        except DNSProblem:
            return []
        return [ipaddress.ip_address(x) for x in a + aaaa]

    # -- DNS, per domain --

    async def mx(self, domain: str) -> Row:
        record = f"{domain}. IN MX 10 {self.host}."
        exchanges = await self.dns.mx(domain)
        if not exchanges:
            return Row("MX", domain, FAIL, f"{domain} has no MX record: mail for it goes nowhere (or to its A record)", record)
        if [host for _, host in exchanges] == [""]:
            return Row("MX", domain, FAIL, f"{domain} publishes a null MX (\"0 .\"): it says it accepts no mail", f"replace it with {record}")
        ours = [pref for pref, host in exchanges if host == self.host]
        others = [f"{host or '.'} ({pref})" for pref, host in exchanges if host != self.host]
        if not ours:
            return Row("MX", domain, FAIL, f"MX points at {', '.join(others)}, not {self.host}", record)
        detail = f"{self.host} (preference {ours[0]})"
        return Row("MX", domain, OK, detail + (f"; also {', '.join(others)}" if others else ""))

    async def spf(self, domain: str) -> Row:
        records = [t for t in await self.dns.texts(domain) if _is_spf(t)]
        suggestion = f'{domain}. IN TXT "v=spf1 mx -all"'
        if not records:
            return Row("SPF", domain, FAIL, f"{domain} has no SPF record (TXT v=spf1): receivers cannot tell our mail from forgeries", suggestion)
        if len(records) > 1:
            return Row("SPF", domain, FAIL, f"{len(records)} SPF records: receivers treat that as an error (RFC 7208 4.5)", f"keep one: {suggestion}")
        record = records[0]
        terms = record.split()[1:]
        if any(t.lower() in ("all", "+all") for t in terms):
            return Row("SPF", domain, FAIL, f'"{record}": +all lets every host on the internet send as {domain}', suggestion)
        # Keep what the domain already allows, and allow us first: by "mx", or
        # by name when "mx" is there already (the MX row then says what is wrong).
        if terms:
            first = f"a:{self.host}" if any(t.lower() == "mx" for t in terms) else "mx"
            suggestion = f'{domain}. IN TXT "{" ".join(["v=spf1", first, *terms])}"'
        addresses = await self._our_addresses()
        if not addresses:
            return Row("SPF", domain, WARN, f'"{record}": cannot tell whether it allows {self.host}, which has no address (see A/AAAA)')
        outcomes = {str(a): await self._spf_result(record, domain, a) for a in addresses}
        broken = sorted({why for result, why in outcomes.values() if result == "permerror"})
        if broken:
            return Row(
                "SPF", domain, FAIL, f'"{record}" is an error for receivers (permerror: {"; ".join(broken)}): no mail passes SPF',
                f"correct the record, e.g. {domain}. IN TXT \"v=spf1 mx -all\"",
            )
        refused = [f"{a} ({why})" for a, (result, why) in outcomes.items() if result not in ("pass", "pass-include")]
        if refused:
            return Row("SPF", domain, FAIL, f'"{record}" does not allow {", ".join(refused)}', suggestion)
        through = sorted({why for result, why in outcomes.values() if result == "pass-include"})
        if through:
            return Row(
                "SPF", domain, WARN, f"allows {', '.join(outcomes)} only through {', '.join(through)}",
                f"if that record changes, mail from {self.host} fails SPF; to allow it directly: {suggestion}",
            )
        reasons = sorted({why for _, why in outcomes.values()})
        return Row("SPF", domain, OK, f"allows {', '.join(outcomes)} ({', '.join(reasons)})")

    async def _spf_result(self, record: str, domain: str, address: Any) -> tuple[str, str]:
        """How ``record`` judges mail from ``address``, as pyspf evaluates it, with the term that decided.

        The result is pyspf's (pass, fail, softfail, neutral, permerror), or
        "pass-include" for a pass through include: or redirect=, which rests
        on another domain's record; a DNS failure raises DNSProblem.  The
        sender is the domain's postmaster, our hostname the HELO name.
        """
        from twisted.internet.threads import deferToThreadPool

        from mailplat.mailauth.spf import evaluate

        found = await deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), evaluate, self.thread_dns, record, f"postmaster@{domain}", self.host, str(address)
        )
        if found.result == "temperror":
            raise DNSProblem(found.problem)
        if found.result == "permerror":
            return "permerror", found.problem
        term = found.term or "no term matches"
        if found.redirect:
            if found.result == "pass":
                return "pass-include", f"redirect={found.redirect}"
            return found.result, f"redirect={found.redirect}: {term}"
        if found.result == "pass" and term.lower().lstrip("+").startswith("include:"):
            return "pass-include", term
        return found.result, term

    async def dkim(self, domain: str) -> Row:
        settings = self.settings.dkim.get(domain)
        if settings is None:
            return Row(
                "DKIM", domain, WARN, f"no [dkim.\"{domain}\"] table: mail from {domain} is not signed (DMARC then rests on SPF alone)",
                f"mailplat --config {self.settings.path} dkim keygen {domain}",
            )
        from mailplat.mailauth.dkim import dns_record, parse_tags

        name = f"{settings.selector}._domainkey.{domain}"
        expected = dns_record(settings.key)
        fix = _txt_record(name, expected)
        want = _public_key(parse_tags(expected))
        published = [parse_tags(t) for t in await self.dns.texts(name)]
        published = [tags for tags in published if "p" in tags]
        if not published:
            return Row("DKIM", name, FAIL, f"no DKIM record at {name}: receivers cannot verify our signatures", fix)
        if any(_public_key(tags) == want for tags in published):
            return Row("DKIM", name, OK, f"matches the {parse_tags(expected)['k']} key {_short_path(settings.key, self.settings)}")
        if all(_public_key(tags) == "" for tags in published):
            return Row("DKIM", name, FAIL, f"{name} has an empty p=: the key is revoked", fix)
        return Row("DKIM", name, FAIL, f"{name} publishes another key than {_short_path(settings.key, self.settings)}", fix)

    async def dmarc(self, domain: str) -> Row:
        name = f"_dmarc.{domain}"
        from mailplat.mailauth.dkim import parse_tags
        from mailplat.mailauth.dmarc import POLICIES, is_dmarc_record

        fix = _txt_record(name, f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}")
        # The records our own receiver reads, in its syntax (the policy is judged here, to name what is wrong).
        records = [parse_tags(t) for t in await self.dns.texts(name) if is_dmarc_record(t)]
        if not records:
            return Row("DMARC", name, FAIL, f"no DMARC record at {name}: receivers apply no policy to forgeries of {domain}", fix)
        if len(records) > 1:
            return Row("DMARC", name, FAIL, f"{len(records)} DMARC records: receivers ignore them all (RFC 7489 6.6.3)", f"keep one: {fix}")
        policy = records[0].get("p", "")
        if policy.lower() not in POLICIES:
            return Row("DMARC", name, FAIL, f"the record has no valid p= policy (p={policy!r})", fix)
        return Row("DMARC", name, OK, f"p={policy}" + (" (reports only; forgeries are still delivered)" if policy.lower() == "none" else ""))

    # -- TLS --

    async def no_tls(self) -> Row:
        return Row(
            "TLS", "[tls]", WARN, "no certificate: STARTTLS is not offered, so other servers send our mail in clear",
            f'add [tls] with certificate = "..." and key = "..." for {self.host} (e.g. certbot certonly --standalone -d {self.host})',
        )

    def _leaf(self) -> Any:
        from cryptography import x509

        assert self.settings.tls is not None
        with open(self.settings.tls.certificate, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())[0]

    async def tls_dates(self) -> Row:
        assert self.settings.tls is not None
        subject = _short_path(self.settings.tls.certificate, self.settings)
        try:
            leaf = self._leaf()
        except Exception as e:  # noqa: BLE001 - whatever stops the file loading is the row's detail
            return Row("TLS dates", subject, FAIL, f"the certificate does not load: {e}", "point [tls] certificate at a PEM certificate chain, leaf first")
        renew = f"renew the certificate for {self.host} (e.g. certbot renew) and restart mailplat"
        now = datetime.datetime.now(datetime.UTC)
        start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        issuer = "self-signed" if leaf.issuer == leaf.subject else f"issued by {leaf.issuer.rfc4514_string()}"
        if now < start:
            return Row("TLS dates", subject, FAIL, f"not valid before {start:%Y-%m-%d %H:%M} UTC (check this machine's clock)", "use a certificate valid now")
        left = end - now
        if left.total_seconds() <= 0:
            return Row("TLS dates", subject, FAIL, f"expired on {end:%Y-%m-%d %H:%M} UTC", renew)
        day = datetime.timedelta(days=1)
        days = round(left / day)
        until = f"expires {end:%Y-%m-%d %H:%M} UTC, " + (f"in {days} day{'s' if days != 1 else ''}" if left >= day else "within a day")
        if left < EXPIRY_FAIL_DAYS * day:
            return Row("TLS dates", subject, FAIL, until, renew)
        if left < EXPIRY_WARN_DAYS * day:
            return Row("TLS dates", subject, WARN, f"{until}: renewal is due", renew)
        return Row("TLS dates", subject, OK, f"{until}, {issuer}")

    async def tls_name(self) -> Row:
        from cryptography import x509

        try:
            leaf = self._leaf()
        except Exception as e:  # noqa: BLE001 - as in tls_dates
            return Row("TLS name", self.host, FAIL, f"the certificate does not load: {e}")
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        fix = f"get a certificate whose subjectAltName includes {self.host} (e.g. certbot certonly -d {self.host}) and point [tls] certificate at it"
        if not names:
            return Row("TLS name", self.host, FAIL, "the certificate has no subjectAltName DNS names (clients ignore the CN)", fix)
        matching = [n for n in names if _name_matches(n, self.host)]
        if not matching:
            return Row("TLS name", self.host, FAIL, f"the certificate is for {', '.join(names)}, not {self.host}", fix)
        return Row("TLS name", self.host, OK, f"covered by {matching[0]}")

    # -- listeners --

    async def listener(self, name: str, description: str) -> Row:
        from twisted.internet import endpoints

        subject = f"{name} {description}"
        kind, target, port = connect_target(description)
        if kind == "":
            return Row("listener", subject, WARN, f"cannot check a {target!r} endpoint from here")
        if kind != "unix" and port == 0:
            return Row("listener", subject, WARN, "port 0: the system picks a new port at each start, so other servers cannot find it", f'{name} = "tcp:PORT"')
        if kind == "unix":
            endpoint: Any = endpoints.UNIXClientEndpoint(self.reactor, target, timeout=CONNECT_TIMEOUT)
            where = target
        elif kind == "tcp6":
            endpoint = endpoints.TCP6ClientEndpoint(self.reactor, target, port, timeout=CONNECT_TIMEOUT)
            where = f"[{target}]:{port}"
        else:
            endpoint = endpoints.TCP4ClientEndpoint(self.reactor, target, port, timeout=CONNECT_TIMEOUT)
            where = f"{target}:{port}"
        try:
            connected = await endpoint.connect(protocol.Factory.forProtocol(_Conversation))
        except Exception as e:  # noqa: BLE001 - any failure to connect is the row's detail
            reason = getattr(e, "osError", None) or e.__class__.__name__
            text = os.strerror(reason) if isinstance(reason, int) else str(e) or str(reason)
            return Row(
                "listener", subject, FAIL, f"cannot connect to {where}: {text.strip().rstrip('.')}: is mailplat running?",
                f"start it (systemctl start mailplat, or twistd -n mailplat --config {self.settings.path}) and read its log",
            )
        probe = _PROBES.get(name)
        if probe is None:
            connected.transport.loseConnection()
            return Row("listener", subject, OK, f"{where} accepts connections")
        speaks, implicit_tls = probe
        fix = f"see which program listens there (ss -ltnp 'sport = :{port}'): [listen] {name} must be mailplat's own {name} listener"
        try:
            result, detail = await speaks(connected, implicit_tls, self.reactor)
            if result == OK:
                result, detail, fix = self._served_certificate(connected, detail)
        except _Silent as e:
            result, detail = FAIL, str(e)
        finally:
            connected.transport.abortConnection()
        return Row("listener", subject, result, f"{where}: {detail}", fix)

    def _served_certificate(self, connected: _Conversation, detail: str) -> tuple[str, str, str]:
        """Whether a listener serves the [tls] certificate (after a renewal, until a restart, it serves the old one)."""
        from cryptography.hazmat.primitives.serialization import Encoding

        if self.settings.tls is None:
            return OK, detail, ""
        try:
            expected = self._leaf().public_bytes(Encoding.DER)
        except Exception:  # noqa: BLE001 - the TLS dates row says why the file does not load
            return OK, detail, ""
        served = connected.tls().getPeerCertificate()
        if served is None or served.to_cryptography().public_bytes(Encoding.DER) != expected:
            return (
                WARN, f"{detail}, but it serves another certificate than {_short_path(self.settings.tls.certificate, self.settings)}",
                "restart mailplat so that it loads the certificate file (a renewed certificate is read at start)",
            )
        return OK, detail, ""


# --- what a retrieval listener says ------------------------------------------------------

# Bytes kept of one line from a listener, and how many lines of one reply.
PROBE_LINE_MAX = 4096
PROBE_LINES_MAX = 100


class _Silent(Exception):
    """The listener sent nothing (more) in time, or closed the connection: the row's detail."""


class _Conversation(protocol.Protocol):
    """A client's side of a line protocol: send lines, read lines, turn on TLS."""

    def __init__(self) -> None:
        from twisted.internet import defer

        self.buffer = b""
        self.lines: defer.DeferredQueue[bytes] = defer.DeferredQueue()
        self.closed = ""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.lines.put(line.rstrip(b"\r")[:PROBE_LINE_MAX])
        if len(self.buffer) > PROBE_LINE_MAX:
            self.lines.put(self.buffer[:PROBE_LINE_MAX])
            self.buffer = b""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        from twisted.internet import error

        from OpenSSL import SSL

        if reason.check(error.ConnectionDone):
            self.closed = "the listener closed the connection"
        elif reason.check(SSL.Error):
            # pyOpenSSL's error is a list of (library, function, reason).
            args = getattr(reason.value, "args", ())
            found = args[0] if args and isinstance(args[0], list) else []
            why = ", ".join(str(item[-1]) for item in found if isinstance(item, tuple) and item and item[-1])
            self.closed = f"the TLS handshake failed ({why or reason.getErrorMessage()})"
        else:
            self.closed = f"the connection broke: {reason.getErrorMessage()}"
        # Wake a waiting reader with an empty line; it then reads self.closed.
        self.lines.put(b"")

    def tls(self) -> Any:
        """The transport, as the ITLSTransport a TCP connection is."""
        return self.transport

    def send(self, line: bytes) -> None:
        self.tls().write(line + b"\r\n")

    def start_tls(self) -> None:
        """TLS from here on.  The certificate is not judged here: the TLS rows and _served_certificate do that."""
        from twisted.internet import ssl

        self.tls().startTLS(ssl.CertificateOptions())

    async def line(self, reactor: Any, waiting_for: str) -> bytes:
        from twisted.internet import defer

        if self.closed and not self.lines.pending:
            raise _Silent(f"{self.closed}, waiting for the {waiting_for}")
        try:
            line = await self.lines.get().addTimeout(CONNECT_TIMEOUT, reactor)
        except defer.TimeoutError:
            raise _Silent(f"no {waiting_for} within {CONNECT_TIMEOUT:g} s") from None
        if not line and self.closed:
            raise _Silent(f"{self.closed}, waiting for the {waiting_for}")
        return line


def _quoted(line: bytes) -> str:
    """A listener's line, made printable and short, for a detail."""
    return '"' + " ".join(printable(word, 40) for word in line.split()[:12]) + '"'


async def _imap(talk: _Conversation, implicit_tls: bool, reactor: Any) -> tuple[str, str]:
    """RFC 3501 6.2.1/6.2.3 and RFC 8314: the greeting, then what CAPABILITY offers before and after TLS."""
    if implicit_tls:
        talk.start_tls()
    greeting = await talk.line(reactor, "TLS handshake and greeting" if implicit_tls else "greeting")
    if not greeting.startswith(b"* OK"):
        what = "a TLS server" if implicit_tls else "an IMAP server"
        return FAIL, f"greets with {_quoted(greeting)}, not as {what} (* OK ...)"

    async def capabilities(tag: bytes) -> set[str]:
        talk.send(tag + b" CAPABILITY")
        found: set[str] = set()
        for _ in range(PROBE_LINES_MAX):
            line = await talk.line(reactor, "the CAPABILITY reply")
            if line.upper().startswith(b"* CAPABILITY "):
                found |= {word.decode("ascii", "replace").upper() for word in line.split()[2:]}
            elif line.startswith(tag + b" "):
                return found if line[len(tag) + 1:].upper().startswith(b"OK") else set()
        return set()

    caps = await capabilities(b"a")
    if "IMAP4REV1" not in caps and "IMAP4REV2" not in caps:
        return FAIL, "CAPABILITY does not answer IMAP4rev1"
    logins = sorted(c for c in caps if c.startswith("AUTH=")) + (["LOGIN"] if "LOGINDISABLED" not in caps else [])
    if implicit_tls:
        if not logins:
            return FAIL, "TLS, but CAPABILITY offers no login (LOGINDISABLED and no AUTH=)"
        talk.send(b"z LOGOUT")
        return OK, "TLS at once (RFC 8314), IMAP greeting, login offered"
    if "STARTTLS" not in caps:
        return FAIL, "CAPABILITY has no STARTTLS: clients cannot protect their password here"
    if logins:
        return FAIL, f"CAPABILITY offers {', '.join(logins)} before TLS: a client may send its password in clear (RFC 3501 6.2.3)"
    talk.send(b"b STARTTLS")
    answer = await talk.line(reactor, "the STARTTLS reply")
    if not answer.upper().startswith(b"B OK"):
        return FAIL, f"STARTTLS is refused: {_quoted(answer)}"
    talk.start_tls()
    after = await capabilities(b"c")
    if "LOGINDISABLED" in after or not any(c.startswith("AUTH=") for c in after):
        return FAIL, "after STARTTLS, CAPABILITY still offers no login"
    talk.send(b"z LOGOUT")
    return OK, "STARTTLS, LOGINDISABLED before it, login after it"


async def _pop3(talk: _Conversation, implicit_tls: bool, reactor: Any) -> tuple[str, str]:
    """RFC 1939 and RFC 2595: the greeting, then what CAPA offers before and after STLS."""
    if implicit_tls:
        talk.start_tls()
    greeting = await talk.line(reactor, "TLS handshake and greeting" if implicit_tls else "greeting")
    if not greeting.startswith(b"+OK"):
        what = "a TLS server" if implicit_tls else "a POP3 server"
        return FAIL, f"greets with {_quoted(greeting)}, not as {what} (+OK ...)"

    async def capabilities() -> set[str]:
        talk.send(b"CAPA")
        if not (await talk.line(reactor, "the CAPA reply")).startswith(b"+OK"):
            return set()
        found: set[str] = set()
        for _ in range(PROBE_LINES_MAX):
            line = await talk.line(reactor, "the end of the CAPA reply")
            if line == b".":
                return found
            found.add(line.split(b" ", 1)[0].decode("ascii", "replace").upper())
        return found

    caps = await capabilities()
    logins = sorted(caps & {"USER", "SASL"})
    if implicit_tls:
        if not logins:
            return FAIL, "TLS, but CAPA offers no login (neither USER nor SASL)"
        talk.send(b"QUIT")
        return OK, "TLS at once (RFC 8314), POP3 greeting, login offered"
    if "STLS" not in caps:
        return FAIL, "CAPA has no STLS: clients cannot protect their password here"
    if logins:
        return FAIL, f"CAPA offers {', '.join(logins)} before TLS: a client may send its password in clear"
    talk.send(b"STLS")
    answer = await talk.line(reactor, "the STLS reply")
    if not answer.startswith(b"+OK"):
        return FAIL, f"STLS is refused: {_quoted(answer)}"
    talk.start_tls()
    if not (await capabilities()) & {"USER", "SASL"}:
        return FAIL, "after STLS, CAPA still offers no login"
    talk.send(b"QUIT")
    return OK, "STLS, no login before it, login after it"


# Each retrieval listener: how to talk to it, and whether TLS comes first.
_PROBES: dict[str, tuple[Callable[[_Conversation, bool, Any], Awaitable[tuple[str, str]]], bool]] = {
    "pop3": (_pop3, False), "pop3s": (_pop3, True), "imap": (_imap, False), "imaps": (_imap, True),
}


# --- helpers -------------------------------------------------------------------------


def _public_key(tags: dict[str, str]) -> str:
    """The p= of a DKIM key record, without the whitespace its base64 may hold (RFC 6376 3.6.1)."""
    return re.sub(r"\s+", "", tags.get("p", ""))


def _is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def _txt_record(owner: str, value: str) -> str:
    """A zone file line publishing ``value``, split into strings of at most 255 bytes."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    chunks = [escaped[i:i + TXT_STRING_MAX] for i in range(0, len(escaped), TXT_STRING_MAX)] or [""]
    return f"{owner}. IN TXT " + " ".join(f'"{c}"' for c in chunks)


def _name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 6.4.3: exact, or a wildcard standing for exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == host


def _unroutable(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified or ip.is_link_local


def _short_path(path: str, settings: Settings) -> str:
    """``path`` relative to the config file's folder when it lies under it."""
    relative = os.path.relpath(path, settings.config_dir)
    return path if relative.startswith("..") else relative


def connect_target(description: str) -> tuple[str, str, int]:
    """Where to connect to reach a server endpoint string: (kind, host or path, port).

    tcp and tcp6 listening on every interface are reached on the loopback
    address; kind "" means an endpoint type this check does not handle.
    """
    parts: list[str] = [""]
    escaped = False
    for ch in description:
        if escaped:
            parts[-1] += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("")
        else:
            parts[-1] += ch
    kind, args = parts[0].lower(), parts[1:]
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    if kind == "unix":
        return "unix", options.get("address", positional[0] if positional else ""), 0
    if kind not in ("tcp", "tcp6"):
        return "", kind, 0
    port = int(options.get("port", positional[0] if positional else "0"))
    # Positional order, as Twisted parses them: tcp:PORT:INTERFACE, tcp6:PORT:BACKLOG:INTERFACE.
    at = 1 if kind == "tcp" else 2
    interface = options.get("interface", positional[at] if len(positional) > at else "")
    if kind == "tcp":
        return "tcp", interface if interface not in ("", "0.0.0.0") else "127.0.0.1", port
    return "tcp6", interface if interface not in ("", "::") else "::1", port
