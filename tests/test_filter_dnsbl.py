"""The dnsbl filter: reversed names, listings refused at RCPT or tagged, DNS failures fail closed,
bad options refused; against a real DNS server and a real mailplat."""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

import commands
from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, merge_toml, message
from dnsserver import DNSServer

from mailplat.config import BackendSettings, ConfigError
from mailplat.filters.dnsbl import build, listing_codes, reversed_name
from mailplat.interfaces import Account, BackendContext, Client, IMessageFilter
from mailplat.plugins import build_backend, find_factory

LISTED_NAME = "1.0.0.127.bl.test"
REASON = "listed for testing"


@pytest.fixture(scope="module")
def blocklists() -> Iterator[DNSServer]:
    """bl.test lists 127.0.0.1 (with a reason); clean.test lists nothing; err.test answers a
    Spamhaus error code; wild.test answers outside 127/8."""
    server = DNSServer().start({
        "zones": {
            LISTED_NAME: {"A": ["127.0.0.2"], "TXT": [REASON]},
            "1.0.0.127.err.test": {"A": ["127.255.255.254"]},
            "1.0.0.127.wild.test": {"A": ["192.0.2.1"]},
        },
    })
    yield server
    server.stop()


@pytest.fixture
def servfail_dns() -> Iterator[int]:
    """A DNS server answering SERVFAIL for the zone broken.test; its port."""
    server = DNSServer().start({"servfail": ["1.0.0.127.broken.test"]})
    yield server.port
    server.stop()


def with_dnsbl(make_server, dns_port: int, options: str, name: str = "server", filter_extra: str = "") -> MailplatServer:
    """A server whose resolver is the test DNS server, with one dnsbl filter."""
    return make_server(
        f'[dns]\nservers = ["127.0.0.1:{dns_port}"]\n[[filter]]\nbackend = "dnsbl"\n{filter_extra}{options}\n', name=name
    )


def rcpt(port: int, to: str = "alice@example.org") -> tuple[int, bytes]:
    """MAIL then one RCPT; the RCPT reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        code, _ = client.mail("someone@remote.test")
        assert code == 250
        return client.rcpt(to)


# --- the names looked up ------------------------------------------------------


def test_reversed_name_ipv4():
    """An IPv4 address is looked up with its four octets in reverse order (RFC 5782 2.1)."""
    assert reversed_name("192.0.2.99") == "99.2.0.192"
    assert reversed_name("127.0.0.1") == "1.0.0.127"


def test_reversed_name_ipv6():
    """An IPv6 address is looked up as its 32 nibbles in reverse order (RFC 5782 2.4)."""
    assert reversed_name("2001:db8:1:2:3:4:567:89ab") == "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
    assert reversed_name("2001:db8::1") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2"
    assert len(reversed_name("::1").split(".")) == 32


def test_reversed_name_ipv4_mapped_and_scoped():
    """An IPv4 client seen through a dual-stack socket is looked up as IPv4; an IPv6 zone (%eth0) is left out."""
    assert reversed_name("::ffff:192.0.2.99") == "99.2.0.192"
    assert reversed_name("fe80::1%eth0") == reversed_name("fe80::1")
    with pytest.raises(ValueError):
        reversed_name("unknown")


def test_only_127_answers_are_listings():
    """127.0.0.2 and the like are listings; Spamhaus's 127.255.255.252-255 error codes and answers outside 127/8 are not."""
    answers = ["127.0.0.2", "127.0.0.11", "127.255.255.252", "127.255.255.254", "127.255.255.255", "192.0.2.1"]
    assert listing_codes("bl.test", "192.0.2.99", answers) == ("127.0.0.2", "127.0.0.11")


# --- the filter object, with a resolver that answers from a table ----------------


class TableResolver:
    """lookupAddress/lookupText from a dict; each name may give records, an error, or never answer."""

    def __init__(self, table: dict[str, object]) -> None:
        self.table = table
        self.asked: list[str] = []
        self.pending: list[defer.Deferred[object]] = []

    def _answer(self, name: str, kind: int) -> defer.Deferred[object]:
        self.asked.append(name)
        entry = self.table.get(f"{kind}:{name}", DNSNameError(name))
        if entry == "hang":
            d: defer.Deferred[object] = defer.Deferred()
            self.pending.append(d)
            return d
        if isinstance(entry, Exception):
            return defer.fail(entry)
        payload = dns.Record_A(entry) if kind == dns.A else dns.Record_TXT(*entry)  # type: ignore[arg-type]
        return defer.succeed(([dns.RRHeader(name.encode(), kind, dns.IN, 60, payload)], [], []))

    def lookupAddress(self, name: str, timeout: object = None) -> defer.Deferred[object]:
        return self._answer(name, dns.A)

    def lookupText(self, name: str, timeout: object = None) -> defer.Deferred[object]:
        return self._answer(name, dns.TXT)


class Clock:
    """reactor.seconds(), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now


def make_filter(table: dict[str, object], **options: object):
    resolver, clock = TableResolver(table), Clock()
    context = BackendContext("mail.example.org", ("example.org",), "/", "/", clock, dns=resolver)
    return build({"skip": [], **options}, context), resolver, clock


def verdict_of(coroutine: object) -> object:
    """The result of a check whose lookups have all answered already."""
    d = defer.Deferred.fromCoroutine(coroutine)  # type: ignore[arg-type]
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the check is still waiting"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


CLIENT = Client("192.0.2.99", "smtp")


def test_a_listing_wins_over_another_zones_failure():
    """When one zone lists the client, another zone's SERVFAIL does not turn the refusal into a 451."""
    f, resolver, _ = make_filter(
        {"1:99.2.0.192.broken.test": DNSServerError("x"), "1:99.2.0.192.bl.test": "127.0.0.2", "16:99.2.0.192.bl.test": [b"go ", b"away"]},
        zones=["broken.test", "clean.test", "bl.test"],
    )
    verdict = verdict_of(f.check_rcpt(CLIENT, "a@remote.test", "alice@example.org"))
    assert verdict.action == "reject"
    assert verdict.text == "Client host [192.0.2.99] blocked using bl.test; go away"
    assert set(resolver.asked[:3]) == {"99.2.0.192.broken.test", "99.2.0.192.clean.test", "99.2.0.192.bl.test"}


def test_answers_are_reused_for_a_minute():
    """Each RCPT asks again, but the answers of the last minute are reused rather than asked for again."""
    f, resolver, clock = make_filter({}, zones=["clean.test", "other.test"])
    for _ in range(3):
        assert verdict_of(f.check_rcpt(CLIENT, "a@remote.test", "alice@example.org")) is None
    assert len(resolver.asked) == 2
    clock.now += 61
    verdict_of(f.check_rcpt(CLIENT, "a@remote.test", "alice@example.org"))
    assert len(resolver.asked) == 4


def test_failures_are_not_remembered():
    """A SERVFAIL raises, and the next RCPT asks again instead of reusing the failure."""
    f, resolver, _ = make_filter({"1:99.2.0.192.broken.test": DNSServerError("x")}, zones=["broken.test"])
    for _ in range(2):
        with pytest.raises(Exception, match="broken.test: looking up 192.0.2.99 failed: SERVFAIL"):
            verdict_of(f.check_rcpt(CLIENT, "a@remote.test", "alice@example.org"))
    assert len(resolver.asked) == 2


def test_cancelling_cancels_every_lookup():
    """The chain's timeout cancels the check: every outstanding lookup is cancelled and the check fails."""
    f, resolver, _ = make_filter({"1:99.2.0.192.slow.test": "hang", "1:99.2.0.192.slower.test": "hang"}, zones=["slow.test", "slower.test"])
    d = defer.Deferred.fromCoroutine(f.check_rcpt(CLIENT, "a@remote.test", "alice@example.org"))
    failures: list[object] = []
    d.addErrback(failures.append)
    d.cancel()
    assert failures and failures[0].check(defer.CancelledError)  # type: ignore[attr-defined]
    assert len(resolver.pending) == 2 and all(p.called for p in resolver.pending)


def test_missing_reason_and_failed_reason_are_left_out():
    """Without a TXT record, or when its lookup fails, the refusal has no reason rather than failing."""
    f, _, _ = make_filter({"1:99.2.0.192.bl.test": "127.0.0.4"}, zones=["bl.test"])
    assert verdict_of(f.check_rcpt(CLIENT, "", "alice@example.org")).text == "Client host [192.0.2.99] blocked using bl.test"
    f, _, _ = make_filter(
        {"1:99.2.0.192.bl2.test": "127.0.0.2", "16:99.2.0.192.bl2.test": DNSServerError("x")}, zones=["bl2.test"]
    )
    assert verdict_of(f.check_rcpt(CLIENT, "", "alice@example.org")).text == "Client host [192.0.2.99] blocked using bl2.test"


def test_reason_is_one_printable_line():
    """A TXT reason with line breaks or control characters cannot inject anything into the reply."""
    f, _, _ = make_filter({"1:99.2.0.192.bl.test": "127.0.0.2", "16:99.2.0.192.bl.test": [b"see\r\n250 ok\x00 now"]}, zones=["bl.test"])
    text = verdict_of(f.check_rcpt(CLIENT, "", "alice@example.org")).text
    assert text == "Client host [192.0.2.99] blocked using bl.test; see 250 ok now"


def test_clients_not_checked():
    """Skipped networks, clients that logged in and non-IP clients are never looked up."""
    f, resolver, _ = make_filter({}, zones=["bl.test"], skip=["192.0.2.0/24", "2001:db8::/32"])
    for client in (
        CLIENT,
        Client("::ffff:192.0.2.1", "smtp"),
        Client("2001:db8::5", "smtp"),
        Client("198.51.100.1", "submission", authenticated_as=Account("alice@example.org")),
        Client("/run/mailplat.sock", "smtp"),
    ):
        assert verdict_of(f.check_rcpt(client, "", "alice@example.org")) is None
    assert resolver.asked == []
    verdict_of(f.check_rcpt(Client("198.51.100.1", "smtp"), "", "alice@example.org"))
    assert resolver.asked == ["1.100.51.198.bl.test"]


def test_ipv6_client_is_looked_up_by_nibbles():
    """An IPv6 client's listing is found under its nibble name and named in compressed form."""
    name = reversed_name("2001:db8::7") + ".bl.test"
    f, resolver, _ = make_filter({f"1:{name}": "127.0.0.2"}, zones=["bl.test"], action="tag")
    verdict = verdict_of(f.check_data(Client("2001:0db8::0007", "smtp"), "", ("alice@example.org",), None))
    assert verdict.headers == (("X-DNSBL", "bl.test listed 2001:db8::7"),)
    assert resolver.asked == [name]  # no TXT lookup when tagging


def test_good_options_are_normalised():
    """Zones are compared and asked in lower case without a trailing dot; skip takes IPv4 and IPv6 networks."""
    f, _, _ = make_filter({}, zones=["Zen.Example.", "b_l.example"], skip=["10.0.0.0/8", "fd00::/8"], action="tag")
    assert f.zones == ("zen.example", "b_l.example") and f.action == "tag" and len(f.skip) == 2
    default = build({"zones": ["bl.test"]}, BackendContext("h", (), "/", "/", None))
    assert [str(n) for n in default.skip] == ["127.0.0.0/8", "::1/128"] and default.action == "reject"


def test_registered_by_name_and_verified():
    """`backend = "dnsbl"` is found by twisted.plugin discovery and builds a provider of IMessageFilter."""
    context = BackendContext("mail.example.org", ("example.org",), "/", "/", Clock(), dns=TableResolver({}))
    factory = find_factory("filter", "dnsbl")
    assert (factory.kind, factory.name) == ("filter", "dnsbl")
    provider = build_backend(BackendSettings("filter", "dnsbl", {"zones": ["bl.test"]}), context, "f.toml")
    assert verifyObject(IMessageFilter, provider)


@pytest.mark.parametrize(
    "options, key",
    [
        ({}, "zones"),
        ({"zones": "bl.test"}, "zones"),
        ({"zones": []}, "zones"),
        ({"zones": ["bl..test"]}, "zones"),
        ({"zones": ["-bl.test"]}, "zones"),
        ({"zones": ["a" * 64 + ".test"]}, "zones"),
        ({"zones": ["bl.test", "BL.test."]}, "zones"),
        ({"zones": [3]}, "zones"),
        ({"zones": ["bl.test"], "action": "quarantine"}, "action"),
        ({"zones": ["bl.test"], "skip": "127.0.0.0/8"}, "skip"),
        ({"zones": ["bl.test"], "skip": ["10.0.0.1/8"]}, "skip"),
        ({"zones": ["bl.test"], "skip": [10]}, "skip"),
        ({"zones": ["bl.test"], "zone": ["x.test"]}, "zone"),
    ],
)
def test_bad_options_raise_config_error(options, key):
    """Each bad or unknown option raises ConfigError naming that key, with a fix."""
    with pytest.raises(ConfigError) as error:
        build(dict(options), BackendContext("h", (), "/", "/", None))
    assert error.value.key == key and error.value.fix


# --- over the wire ----------------------------------------------------------------


def test_listed_client_is_refused_at_rcpt_with_the_reason(make_server, blocklists):
    """A client listed in one of the zones gets 550 5.7.1 at RCPT naming the zone and the TXT reason; nothing is delivered."""
    server = with_dnsbl(make_server, blocklists.port, 'zones = ["clean.test", "bl.test"]\nskip = []')
    code, text = rcpt(server.port)
    assert code == 550
    assert text == f"5.7.1 Client host [127.0.0.1] blocked using bl.test; {REASON}".encode()
    assert server.messages("alice@example.org") == []
    assert "127.0.0.1 is listed in bl.test (127.0.0.2)" in server.log()


def test_unlisted_client_is_accepted(make_server, blocklists):
    """A client no zone lists is accepted and its message delivered without a header; error codes and answers
    outside 127/8 are logged, not taken as listings."""
    server = with_dnsbl(make_server, blocklists.port, 'zones = ["clean.test", "err.test", "wild.test"]\nskip = []')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
        assert client.sendmail("someone@remote.test", ["alice@example.org"], message()) == {}
    delivered = server.messages("alice@example.org")
    assert len(delivered) == 1 and b"X-DNSBL" not in delivered[0]
    log = server.log()
    assert "err.test answered 127.255.255.254 for 127.0.0.1 (query through a public or open resolver): not a listing" in log
    assert "wild.test answered 192.0.2.1 for 127.0.0.1, outside 127.0.0.0/8: not a listing" in log


def test_default_skip_leaves_localhost_alone(make_server, blocklists):
    """Without a skip option, 127.0.0.0/8 is not checked, so a listed 127.0.0.1 is accepted."""
    server = with_dnsbl(make_server, blocklists.port, 'zones = ["bl.test"]')
    assert rcpt(server.port)[0] == 250
    assert "is listed" not in server.log()


def test_tag_adds_one_header_per_message(make_server, blocklists):
    """With action = "tag" a listed client's message is delivered with one X-DNSBL header, however many recipients."""
    server = with_dnsbl(make_server, blocklists.port, 'zones = ["bl.test", "clean.test"]\naction = "tag"\nskip = []')
    with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
        assert client.sendmail("someone@remote.test", ["alice@example.org", "bob@example.org"], message()) == {}
    for address in ("alice@example.org", "bob@example.org"):
        (delivered,) = server.messages(address)
        head = delivered.split(b"\r\n\r\n")[0]
        assert re.findall(rb"(?m)^X-DNSBL: .*$", head) == [b"X-DNSBL: bl.test listed 127.0.0.1\r"]


def test_servfail_is_a_451(make_server, servfail_dns):
    """A zone answering SERVFAIL gives 451 at RCPT, and the log says which zone failed."""
    server = with_dnsbl(make_server, servfail_dns, 'zones = ["broken.test"]\nskip = []')
    code, text = rcpt(server.port)
    assert code == 451 and text.startswith(b"4.3.0")
    assert "broken.test: looking up 127.0.0.1 failed: SERVFAIL" in server.log()


def test_silent_dns_server_times_out_to_451_and_the_session_goes_on(make_server):
    """A DNS server that never answers: 451 once the filter's timeout passes, and the next RCPT is answered too."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        silent.bind(("127.0.0.1", 0))
        server = with_dnsbl(make_server, silent.getsockname()[1], 'zones = ["bl.test"]\nskip = []', filter_extra="timeout = 0.5\n")
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.ehlo("client.test")
            assert client.mail("someone@remote.test")[0] == 250
            assert client.rcpt("alice@example.org")[0] == 451
            assert client.rcpt("bob@example.org")[0] == 451
            assert client.noop()[0] == 250
    finally:
        silent.close()


# --- check-config -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error",
    [
        ("", r"\[filter\] #1 \(dnsbl\) zones: is required.*fix: e\.g\. zones = \[\"zen"),
        ('zones = ["bl..test"]', r"zones: 'bl\.\.test' is not a domain name"),
        ('zones = ["bl.test"]\naction = "drop"', r"action: must be \"reject\" or \"tag\", not \"drop\""),
        ('zones = ["bl.test"]\nskip = ["10.0.0.1/8"]', r"skip: '10\.0\.0\.1/8' is not a network .*fix: e\.g\. skip = \[\"127\.0\.0\.0/8\""),
        ('zones = ["bl.test"]\nzone = ["x.test"]', r"zone: unknown key; fix: did you mean 'zones'\?"),
    ],
    ids=["no-zones", "bad-zone", "bad-action", "bad-skip", "unknown-key"],
)
def test_check_config_refuses_bad_options(tmp_path: Path, options: str, error: str):
    """check-config on a dnsbl filter with a bad option exits 1 with one line naming the file, the filter, the key and a fix."""
    site = MailplatServer(tmp_path, merge_toml(BASE_CONFIG, f'[[filter]]\nbackend = "dnsbl"\n{options}\n'))
    result = commands.run([MAILPLAT, "--config", str(site.config_path), "check-config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mailplat: {site.config_path}: "), result.stderr
    assert re.search(error, lines[0]), lines[0]
