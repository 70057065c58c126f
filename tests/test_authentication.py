"""The authentication filter: SPF, DKIM and DMARC against a real DNS server, then in a real
mailplat on the MX port (the Authentication-Results header, refusals at MAIL and at the end of
DATA, quarantine)."""

from __future__ import annotations

import os
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BASE_CONFIG, MailplatServer, merge_toml, wait_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsserver import DNSServer
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailplat.config import ConfigError, DKIMSettings
from mailplat.filters.authentication import build, check_message, disposition, factory
from mailplat.interfaces import (
    Account,
    BackendContext,
    Client,
    IBackendFactory,
    IMessageFilter,
    SpooledMessage,
    Verdict,
)
from mailplat.mailauth.dkim import DKIMResult, Signer, dns_record, generate_key
from mailplat.mailauth.dmarc import (
    DMARCResult,
    check_dmarc,
    from_domains,
    parse_dmarc_record,
)
from mailplat.mailauth.names import organizational_domain
from mailplat.mailauth.results import MessageReport, authentication_results
from mailplat.mailauth.spf import SPFResult, check_spf
from mailplat.wire.dns import Resolver

AUTHSERV = "mail.example.org"


# --- the DNS every test asks -------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Signing keys: RSA for signed.test (1024 bits: its record fits the one TXT string the
    test DNS server publishes), Ed25519 for ed.test, and one for shaky.test, whose key
    lookups answer SERVFAIL."""
    folder = tmp_path_factory.mktemp("keys")
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (folder / "signed.test.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(folder / "signed.test.key", 0o600)
    generate_key(str(folder / "ed.test.key"), "ed25519")
    generate_key(str(folder / "shaky.test.key"), "ed25519")
    return {name: folder / f"{name}.key" for name in ("signed.test", "ed.test", "shaky.test")}


@pytest.fixture(scope="module")
def signer(keys: dict[str, Path]) -> Signer:
    return Signer({
        "signed.test": DKIMSettings("signed.test", "sel", str(keys["signed.test"])),
        "ed.test": DKIMSettings("ed.test", "ed", str(keys["ed.test"])),
        "shaky.test": DKIMSettings("shaky.test", "sel", str(keys["shaky.test"])),
    })


@pytest.fixture(scope="module")
def dns_server(keys: dict[str, Path]) -> Iterator[DNSServer]:
    spf_pass = "v=spf1 ip4:127.0.0.1 -all"
    server = DNSServer().start({
        "zones": {
            # SPF, one domain per result.
            "pass.test": {"TXT": [spf_pass, "some-verification=abc"]},
            "_dmarc.pass.test": {"TXT": ["v=DMARC1; p=reject"]},
            "mail.pass.test": {"TXT": [spf_pass]},
            "fail.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
            "softfail.test": {"TXT": ["v=spf1 ip4:192.0.2.1 ~all"]},
            "neutral.test": {"TXT": ["v=spf1 ?all"]},
            "none.test": {"A": ["192.0.2.1"]},
            "include.test": {"TXT": ["v=spf1 include:pass.test -all"]},
            "mx.test": {"TXT": ["v=spf1 mx -all"], "MX": [[10, "mx1.mx.test"]]},
            "mx1.mx.test": {"A": ["127.0.0.1"]},
            "permerror.test": {"TXT": ["v=spf1 ip4:127.0.0.1 frobnicate -all"]},
            "helo.test": {"TXT": [spf_pass]},
            # DMARC.
            "bank.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
            "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@bank.test"]},
            "_dmarc.lax.test": {"TXT": ["v=DMARC1; p=quarantine; pct=10"]},
            "_dmarc.watch.test": {"TXT": ["v=DMARC1; p=none"]},
            "_dmarc.twice.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
            "signed.test": {"TXT": ["v=spf1 -all"]},
            "_dmarc.signed.test": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
            "mail.signed.test": {"TXT": [spf_pass]},
            "sel._domainkey.signed.test": {"TXT": [dns_record(str(keys["signed.test"]))]},
            "ed._domainkey.ed.test": {"TXT": [dns_record(str(keys["ed.test"]))]},
            "_dmarc.ed.test": {"TXT": ["v=DMARC1; p=reject"]},
            "_dmarc.shaky.test": {"TXT": ["v=DMARC1; p=reject"]},
        },
        "servfail": ["broken.test", "sel._domainkey.shaky.test", "_dmarc.flaky.test"],
    })
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resolver(dns_server: DNSServer) -> Resolver:
    return Resolver([("127.0.0.1", dns_server.port)])


def mail(sender: str, subject: str, to: str = "alice@example.org", body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: Someone <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}.{time.time_ns()}@test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}"
    ).encode()


def spooled(data: bytes) -> SpooledMessage:
    return SpooledMessage("", len(data), "", content=data)


def signed(signer: Signer, data: bytes, *domains: str) -> bytes:
    """The message with a signature by each domain's key, the first one on top."""
    headers = b"".join(signer.sign(domain, data) for domain in domains)
    return headers + data


# --- SPF ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sender, expected", [
    ("a@pass.test", "pass"),
    ("a@fail.test", "fail"),
    ("a@softfail.test", "softfail"),
    ("a@neutral.test", "neutral"),
    ("a@none.test", "none"),
    ("a@nowhere.test", "none"),
    ("a@include.test", "pass"),
    ("a@mx.test", "pass"),
    ("a@broken.test", "temperror"),
    ("a@permerror.test", "permerror"),
    ("a@PASS.Test.", "pass"),
])
def test_spf_results(resolver, sender, expected):
    """Each RFC 7208 result, with every lookup (include:, mx) going to our DNS server."""
    result = check_spf(resolver, "127.0.0.1", sender, "client.test")
    assert (result.result, result.identity, result.domain) == (expected, "mailfrom", sender.split("@")[1].lower().rstrip("."))


def test_spf_other_addresses(resolver):
    """Another address fails; an IPv4 client seen through a dual-stack socket is checked as IPv4."""
    assert check_spf(resolver, "192.0.2.77", "a@pass.test", "client.test").result == "fail"
    assert check_spf(resolver, "::ffff:127.0.0.1", "a@pass.test", "client.test").result == "pass"
    assert check_spf(resolver, "2001:db8::1", "a@pass.test", "client.test").result == "fail"


def test_spf_null_sender_checks_helo(resolver):
    """<> has the HELO name checked (RFC 7208 2.4); an address literal or no HELO has nothing to check."""
    result = check_spf(resolver, "127.0.0.1", "", "helo.test")
    assert (result.result, result.identity, result.domain) == ("pass", "helo", "helo.test")
    assert check_spf(resolver, "127.0.0.1", "", "fail.test").result == "fail"
    assert check_spf(resolver, "127.0.0.1", "", "[127.0.0.1]").result == "none"
    assert check_spf(resolver, "127.0.0.1", "", "").result == "none"
    assert check_spf(resolver, "127.0.0.1", "postmaster", "helo.test").result == "none"


def test_spf_dns_timeout_is_temperror():
    """A DNS server that never answers gives temperror within the time limits, not an exception."""
    import socket

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        started = time.monotonic()
        result = check_spf(Resolver([silent.getsockname()], timeout=0.5, try_timeout=0.25), "127.0.0.1", "a@pass.test", "client.test")
        assert result.result == "temperror"
        assert time.monotonic() - started < 5
    finally:
        silent.close()


# --- DKIM ---------------------------------------------------------------------------------


def test_dkim_pass_rsa_and_ed25519(resolver, signer):
    """Two signatures, RSA and Ed25519, both verified with the keys published in DNS."""
    data = signed(signer, mail("x@signed.test", "two signatures"), "signed.test", "ed.test")
    report = check_message(resolver, spooled(data), SPFResult("none", "mailfrom", "none.test", "a@none.test"))
    assert report.dkim == (DKIMResult("pass", "signed.test", "sel"), DKIMResult("pass", "ed.test", "ed"))
    assert report.dmarc == (DMARCResult("pass", "signed.test", "reject"),)


def test_dkim_failures(resolver, signer):
    """A changed body, a changed signed header, no key in DNS, SERVFAIL for the key, a broken signature."""
    spf_none = SPFResult("none", "mailfrom", "none.test", "a@none.test")
    original = mail("x@signed.test", "to be changed")
    data = signed(signer, original, "signed.test")

    body = check_message(resolver, spooled(data.replace(b"Hello.", b"Hullo.")), spf_none)
    assert body.dkim == (DKIMResult("fail", "signed.test", "sel", "body hash mismatch"),)
    assert body.dmarc[0].result == "fail"

    subject = check_message(resolver, spooled(data.replace(b"to be changed", b"changed")), spf_none)
    assert subject.dkim == (DKIMResult("fail", "signed.test", "sel", "signature mismatch"),)

    no_key = check_message(resolver, spooled(data.replace(b"s=sel;", b"s=gone;")), spf_none)
    assert no_key.dkim == (DKIMResult("permerror", "signed.test", "gone", "no key"),)

    shaky = check_message(resolver, spooled(signed(signer, mail("x@shaky.test", "shaky"), "shaky.test")), spf_none)
    assert shaky.dkim == (DKIMResult("temperror", "shaky.test", "sel", "DNS error"),)

    broken = check_message(resolver, spooled(b"DKIM-Signature: v=1; a=rsa-sha256; d=signed.test\r\n" + original), spf_none)
    assert broken.dkim == (DKIMResult("neutral", "signed.test", "", "signature not valid"),)

    sha1 = check_message(resolver, spooled(data.replace(b"a=rsa-sha256", b"a=rsa-sha1")), spf_none)
    assert sha1.dkim == (DKIMResult("policy", "signed.test", "sel", "rsa-sha1"),)


def test_unsigned_message_reads_only_its_header(resolver, tmp_path):
    """Without a DKIM-Signature the body is never read: only the header section is."""
    path = tmp_path / "big.eml"
    header = mail("x@pass.test", "unsigned").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    with open(path, "wb") as f:
        f.write(header)
        f.write((b"x" * 76 + b"\r\n") * 4000)  # 312 KB: five more 64 KiB reads to read it all
    reads: list[int] = []

    class Counting(SpooledMessage):
        def open(self):  # type: ignore[override]
            stream = super().open()
            original = stream.read

            def read(size: int = -1) -> bytes:
                data = original(size)
                reads.append(len(data))
                return data

            stream.read = read  # type: ignore[method-assign]
            return stream

    message = Counting(str(path), path.stat().st_size, "a@pass.test")
    report = check_message(resolver, message, SPFResult("pass", "mailfrom", "pass.test", "a@pass.test"))
    assert report.dkim == ()
    assert report.dmarc == (DMARCResult("pass", "pass.test", "reject"),)
    # The header section ends in the first 64 KiB read: nothing more was read.
    assert reads == [64 * 1024]


# --- DMARC --------------------------------------------------------------------------------


def spf_pass(domain: str) -> SPFResult:
    return SPFResult("pass", "mailfrom", domain, f"bounce@{domain}")


@pytest.mark.parametrize("from_domain, spf_result, dkim_results, expected", [
    # SPF passes for the From domain itself: aligned.
    ("pass.test", spf_pass("pass.test"), (), DMARCResult("pass", "pass.test", "reject")),
    # Relaxed alignment (the default): a subdomain of the same organizational domain.
    ("pass.test", spf_pass("mail.pass.test"), (), DMARCResult("pass", "pass.test", "reject")),
    # aspf=s: the subdomain is not aligned.
    ("signed.test", spf_pass("mail.signed.test"), (), DMARCResult("fail", "signed.test", "reject")),
    # adkim=s: a passing signature by the From domain is aligned, by another domain it is not.
    ("signed.test", spf_pass("pass.test"), (DKIMResult("pass", "signed.test", "sel"),), DMARCResult("pass", "signed.test", "reject")),
    ("signed.test", spf_pass("pass.test"), (DKIMResult("pass", "ed.test", "ed"),), DMARCResult("fail", "signed.test", "reject")),
    # A failing signature by the right domain does not count, nor does SPF softfail.
    ("bank.test", SPFResult("softfail", "mailfrom", "bank.test"), (DKIMResult("fail", "bank.test", "s"),), DMARCResult("fail", "bank.test", "reject")),
    # No record at news.bank.test: the organizational domain's, with its sp=.
    ("news.bank.test", spf_pass("pass.test"), (), DMARCResult("fail", "news.bank.test", "quarantine")),
    # Relaxed alignment of a subdomain From with the organizational domain's SPF.
    ("news.bank.test", spf_pass("bank.test"), (), DMARCResult("pass", "news.bank.test", "quarantine")),
    ("lax.test", spf_pass("pass.test"), (), DMARCResult("fail", "lax.test", "quarantine")),
    ("watch.test", spf_pass("pass.test"), (), DMARCResult("fail", "watch.test", "none")),
    # No record, two records, SERVFAIL.
    ("pass-less.test", spf_pass("pass.test"), (), DMARCResult("none", "pass-less.test")),
    ("twice.test", spf_pass("pass.test"), (), DMARCResult("none", "twice.test")),
    ("flaky.test", spf_pass("pass.test"), (), DMARCResult("temperror", "flaky.test", reason="DNS error")),
])
def test_dmarc(resolver, from_domain, spf_result, dkim_results, expected):
    assert check_dmarc(resolver, from_domain, spf_result, dkim_results) == expected


def test_parse_dmarc_record():
    """RFC 7489 6.3: v=DMARC1 first; p= required (or p=none when reports are asked for); defaults r/r/100."""
    assert parse_dmarc_record("v=DMARC1; p=reject") == parse_dmarc_record("v=DMARC1;p=REJECT;")
    record = parse_dmarc_record("v=DMARC1; p=quarantine; sp=none; adkim=s; aspf=r; pct=50; fo=1; x-new=1")
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct) == ("quarantine", "none", "s", "r", 50)
    record = parse_dmarc_record("v=DMARC1; p=reject")
    assert (record.sp, record.adkim, record.aspf, record.pct) == ("reject", "r", "r", 100)
    assert parse_dmarc_record("v=DMARC1; p=maybe; rua=mailto:r@x.test").p == "none"
    assert parse_dmarc_record("v=DMARC1; p=maybe") is None
    assert parse_dmarc_record("v=DMARC1; rua=mailto:r@x.test").sp == "none"
    assert parse_dmarc_record("p=reject; v=DMARC1") is None
    assert parse_dmarc_record("v=spf1 -all") is None
    assert parse_dmarc_record("v=DMARC1; p=reject; pct=lots").pct == 100


def test_organizational_domain():
    """From the Public Suffix List, private suffixes included; unknown TLDs count as suffixes."""
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.bank.test") == "bank.test"
    assert organizational_domain("bank.test") == "bank.test"
    assert organizational_domain("user.github.io") == "user.github.io"
    assert organizational_domain("co.uk") == "co.uk"


def test_from_domains():
    """Every From address counts; a missing or unreadable From gives None (no policy to apply)."""
    assert from_domains([("From", "A <a@Bank.Test>")]) == ("bank.test",)
    assert from_domains([("From", "a@x.test, b@y.test, c@x.test")]) == ("x.test", "y.test")
    assert from_domains([("From", "a@x.test"), ("from", "b@bank.test")]) == ("x.test", "bank.test")
    assert from_domains([("To", "a@x.test")]) is None
    assert from_domains([("From", "undisclosed-recipients:;")]) is None
    assert from_domains([("From", "nobody")]) is None
    assert from_domains([("From", "a@[127.0.0.1]")]) is None


def test_two_from_fields_apply_the_strictest(resolver):
    """A second From field cannot hide a failing domain behind a passing one."""
    data = mail("a@pass.test", "two froms").replace(b"To:", b"From: <ceo@bank.test>\r\nTo:", 1)
    report = check_message(resolver, spooled(data), spf_pass("pass.test"))
    assert [(r.result, r.domain) for r in report.dmarc] == [("pass", "pass.test"), ("fail", "bank.test")]
    assert [disposition(r, "reject") for r in report.dmarc] == ["none", "reject"]


def test_disposition():
    """The table of the module's docstring; only fail results ever act."""
    table = {
        "reject": {"reject": "reject", "quarantine": "quarantine", "tag": "none"},
        "quarantine": {"reject": "quarantine", "quarantine": "quarantine", "tag": "none"},
        "none": {"reject": "none", "quarantine": "none", "tag": "none"},
    }
    for policy, row in table.items():
        for option, expected in row.items():
            assert disposition(DMARCResult("fail", "x.test", policy), option) == expected
            assert disposition(DMARCResult("pass", "x.test", policy), option) == "none"
            assert disposition(DMARCResult("temperror", "x.test", ""), option) == "none"


# --- the header ----------------------------------------------------------------------------

# RFC 8601 2.2, simplified: authserv-id, then "; method=result (comment) ptype.property=value ...".
_RESINFO = r"[a-z]+=[a-z]+(?: \([^()\\]*\))?(?: (?:smtp|header)\.[a-z]+=[^\s;()]+)*"
_AR = re.compile(rf"[a-z0-9.-]+(?:; {_RESINFO})+")


def test_authentication_results_syntax():
    report = MessageReport(
        SPFResult("fail", "mailfrom", "fail.test", "a.b@fail.test", "127.0.0.1 is not allowed to send for fail.test"),
        (DKIMResult("pass", "signed.test", "sel"), DKIMResult("fail", "ed.test", "ed", "body hash mismatch")),
        (DMARCResult("fail", "signed.test", "reject"), DMARCResult("temperror", "flaky.test", reason="DNS error")),
    )
    value = authentication_results(AUTHSERV, report, ["quarantine", "none"])
    assert value == (
        "mail.example.org; spf=fail (127.0.0.1 is not allowed to send for fail.test) smtp.mailfrom=a.b@fail.test; "
        "dkim=pass header.d=signed.test header.s=sel; dkim=fail (body hash mismatch) header.d=ed.test header.s=ed; "
        "dmarc=fail (p=reject dis=quarantine) header.from=signed.test; dmarc=temperror (DNS error) header.from=flaky.test"
    )
    assert _AR.fullmatch(value)


def test_authentication_results_odd_identities():
    """A quoted local part is left out (the domain stays); the null sender shows smtp.helo; no signature is dkim=none."""
    report = MessageReport(
        SPFResult("pass", "mailfrom", "pass.test", '"odd; (name)"@pass.test'), (), (DMARCResult("permerror", "", reason="no readable From address"),)
    )
    value = authentication_results(AUTHSERV, report)
    assert value == "mail.example.org; spf=pass smtp.mailfrom=pass.test; dkim=none; dmarc=permerror (no readable From address)"
    assert _AR.fullmatch(value)
    helo = MessageReport(SPFResult("pass", "helo", "helo.test"), (), (DMARCResult("none", "x.test"),))
    assert authentication_results(AUTHSERV, helo) == "mail.example.org; spf=pass smtp.helo=helo.test; dkim=none; dmarc=none header.from=x.test"


def test_authentication_results_stays_one_short_line():
    """Signatures with long names cannot push the header past RFC 5322's line limit; the
    passing signature and the failing DMARC result are the ones kept."""
    long_name = ".".join(["a" * 60] * 4) + ".test"
    junk = tuple(DKIMResult("fail", long_name, "s" * 60, "signature mismatch") for _ in range(7))
    report = MessageReport(
        SPFResult("pass", "mailfrom", "pass.test", "a@pass.test"),
        (*junk, DKIMResult("pass", "ed.test", "ed")),
        (DMARCResult("none", long_name), DMARCResult("fail", "bank.test", "reject")),
    )
    value = authentication_results(AUTHSERV, report, ["none", "reject"])
    assert len(value) <= 900
    assert _AR.fullmatch(value)
    assert "dkim=pass header.d=ed.test header.s=ed" in value
    assert "dmarc=fail (p=reject dis=reject) header.from=bank.test" in value
    assert value.index("dkim=pass") < value.index("dmarc=fail")


# --- options -------------------------------------------------------------------------------


def context(servers: tuple[tuple[str, int], ...] = ()) -> BackendContext:
    return BackendContext(AUTHSERV, ("example.org",), "/", "/", None, dns_servers=servers)


def test_build_defaults_and_servers():
    """The filter asks exactly the context's [dns] servers, IPv6 ones included; none means the system's."""
    verifyObject(IBackendFactory, factory)
    assert (factory.kind, factory.name) == ("filter", "authentication")
    built = build({}, context((("127.0.0.1", 5399), ("::1", 53))))
    verifyObject(IMessageFilter, built)
    assert (built.authserv_id, built.dmarc_reject, built.spf_fail) == (AUTHSERV, "reject", "tag")
    assert built.resolver.servers == (("127.0.0.1", 5399), ("::1", 53))
    assert build({}, context()).resolver.servers == ()
    built = build({"dmarc_reject": "quarantine", "spf_fail": "reject"}, context())
    assert (built.dmarc_reject, built.spf_fail) == ("quarantine", "reject")


@pytest.mark.parametrize("options, key, problem", [
    ({"dmarc_reject": "bounce"}, "dmarc_reject", 'must be "reject", "quarantine" or "tag"'),
    ({"dmarc_reject": True}, "dmarc_reject", 'must be "reject", "quarantine" or "tag"'),
    ({"spf_fail": "quarantine"}, "spf_fail", 'must be "reject" or "tag"'),
    ({"spf_fial": "reject"}, "spf_fial", "unknown key"),
    ({"dkim": True}, "dkim", "unknown key"),
])
def test_bad_options(options, key, problem):
    with pytest.raises(ConfigError) as raised:
        build(options, context())
    assert raised.value.key == key
    assert problem in raised.value.problem
    if key == "spf_fial":
        assert "spf_fail" in raised.value.fix


# --- the filter object, its threads run at once ----------------------------------------------


class InlinePool:
    """A thread pool that runs the work in the caller's thread, for a filter outside a reactor."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - a thread pool reports every failure to its caller
            on_result(False, Failure())
        else:
            on_result(True, result)


class InlineReactor:
    def __init__(self) -> None:
        self.now = 1000.0
        self.pool = InlinePool()

    def seconds(self) -> float:
        return self.now

    def getThreadPool(self) -> InlinePool:
        return self.pool

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


def outcome(coroutine):
    """The result of a check whose threads have all run already."""
    results: list = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


@pytest.fixture
def inline_filter(dns_server, monkeypatch):
    """A filter built as the server builds it, with the SPF checks it runs counted."""
    from mailplat.filters import authentication

    counted: list[str] = []

    def counting(resolver, address, sender, helo):
        counted.append(sender)
        return check_spf(resolver, address, sender, helo)

    monkeypatch.setattr(authentication, "check_spf", counting)

    def make(**options):
        ctx = BackendContext(AUTHSERV, ("example.org",), "/", "/", InlineReactor(), dns_servers=(("127.0.0.1", dns_server.port),))
        return build(dict(options), ctx), counted

    return make


def test_filter_remembers_spf_from_mail_to_data(inline_filter):
    """The SPF result of MAIL FROM is the one reported at the end of DATA, not asked again;
    after SPF_MEMORY_SECONDS it is asked again."""
    from mailplat.filters import authentication

    auth, counted = inline_filter()
    client = Client("127.0.0.1", "smtp", "client.test")
    assert outcome(auth.check_mail(client, "a@pass.test")) is None
    verdict = outcome(auth.check_data(client, "a@pass.test", ("alice@example.org",), spooled(mail("a@pass.test", "kept"))))
    assert verdict == Verdict.accept(((
        "Authentication-Results",
        f"{AUTHSERV}; spf=pass smtp.mailfrom=a@pass.test; dkim=none; dmarc=pass (p=reject dis=none) header.from=pass.test",
    ),))
    assert counted == ["a@pass.test"]
    auth.reactor.now += authentication.SPF_MEMORY_SECONDS + 1
    outcome(auth.check_data(client, "a@pass.test", ("alice@example.org",), spooled(mail("a@pass.test", "kept"))))
    assert counted == ["a@pass.test", "a@pass.test"]


def test_filter_verdicts(inline_filter):
    """spf_fail and dmarc_reject decide the verdicts; a client that logged in is not checked at all."""
    client = Client("127.0.0.1", "smtp", "client.test")
    tagging, counted = inline_filter()
    assert outcome(tagging.check_mail(client, "a@fail.test")) is None
    refused = outcome(tagging.check_data(client, "a@pass.test", ("alice@example.org",), spooled(mail("ceo@bank.test", "forged"))))
    assert refused.action == "reject" and "bank.test" in refused.text

    strict, _ = inline_filter(spf_fail="reject", dmarc_reject="quarantine")
    verdict = outcome(strict.check_mail(client, "a@fail.test"))
    assert verdict == Verdict.reject("SPF check failed (spf=fail): 127.0.0.1 is not allowed to send mail from fail.test")
    held = outcome(strict.check_data(client, "a@pass.test", ("alice@example.org",), spooled(mail("ceo@bank.test", "forged"))))
    assert held.action == "quarantine"
    assert held.headers[0][1].endswith("dmarc=fail (p=reject dis=quarantine) header.from=bank.test")

    tag_only, _ = inline_filter(dmarc_reject="tag")
    tagged = outcome(tag_only.check_data(client, "a@pass.test", ("alice@example.org",), spooled(mail("ceo@bank.test", "forged"))))
    assert tagged.action == "accept"
    assert tagged.headers[0][1].endswith("dmarc=fail (p=reject dis=none) header.from=bank.test")

    counted.clear()
    ours = Client("127.0.0.1", "smtp", "client.test", authenticated_as=Account("alice@example.org"))
    assert outcome(strict.check_mail(ours, "alice@fail.test")) is None
    assert outcome(strict.check_data(ours, "alice@fail.test", ("bob@remote.test",), spooled(mail("ceo@bank.test", "ours")))) is None
    assert counted == []


# --- in a real mailplat, on the MX port ------------------------------------------------------


def start(folder: Path, dns_port: int, options: str = "") -> MailplatServer:
    extra = (
        f'[dns]\nservers = ["127.0.0.1:{dns_port}"]\n'
        f'[[filter]]\nbackend = "mailplat.filters.authentication:factory"\n{options}\n'
    )
    return MailplatServer(folder, merge_toml(BASE_CONFIG, extra)).start()


@pytest.fixture(scope="module")
def tagging(tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer) -> Iterator[MailplatServer]:
    """The defaults: spf_fail = "tag", dmarc_reject = "reject"."""
    server = start(tmp_path_factory.mktemp("tagging"), dns_server.port)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer) -> Iterator[MailplatServer]:
    server = start(tmp_path_factory.mktemp("strict"), dns_server.port, 'spf_fail = "reject"\ndmarc_reject = "quarantine"')
    try:
        yield server
    finally:
        server.stop()


def delivered(server: MailplatServer, subject: str, folder: str = "") -> bytes:
    """The one message with this subject in alice's inbox (or folder), once it is there."""
    base = server.maildir("alice@example.org")
    directory = base / folder / "new" if folder else base / "new"

    def found() -> list[bytes]:
        if not directory.is_dir():
            return []
        return [p.read_bytes() for p in directory.iterdir() if f"Subject: {subject}\r\n".encode() in p.read_bytes()]

    [message] = wait_for(found, 10, f"{subject!r} in {directory}")  # type: ignore[misc]
    return message


def results_of(message: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb"^Authentication-Results: (.*)\r\n", message, re.MULTILINE)]


def test_spf_results_in_the_header(tagging):
    """pass, fail, softfail, none and temperror each reach alice, with the result in the header."""
    expected = {
        "pass.test": "spf=pass smtp.mailfrom=a@pass.test; dkim=none; dmarc=pass (p=reject dis=none) header.from=pass.test",
        "fail.test": "spf=fail (127.0.0.1 is not allowed to send for fail.test) smtp.mailfrom=a@fail.test; dkim=none; dmarc=none header.from=fail.test",
        "softfail.test": "spf=softfail (127.0.0.1 is probably not allowed to send for softfail.test) smtp.mailfrom=a@softfail.test; dkim=none; dmarc=none header.from=softfail.test",
        "none.test": "spf=none smtp.mailfrom=a@none.test; dkim=none; dmarc=none header.from=none.test",
        "broken.test": "spf=temperror (DNS error) smtp.mailfrom=a@broken.test; dkim=none; dmarc=none header.from=broken.test",
    }
    with smtplib.SMTP("127.0.0.1", tagging.port, timeout=30) as client:
        client.ehlo("client.test")
        for domain in expected:
            client.sendmail(f"a@{domain}", ["alice@example.org"], mail(f"a@{domain}", f"spf {domain}"))
    for domain, result in expected.items():
        assert results_of(delivered(tagging, f"spf {domain}")) == [f"{AUTHSERV}; {result}"]


def test_signed_message_passes_dkim_and_dmarc(tagging, signer):
    """Signed by mailplat's Signer with the key published in DNS: dkim=pass, and DMARC passes on
    DKIM alone (SPF is none for the MAIL FROM domain).  A forged Authentication-Results naming us
    does not survive; one naming another host does."""
    data = signed(signer, mail("news@signed.test", "signed news"), "signed.test", "ed.test")
    data = f"Authentication-Results: {AUTHSERV}; dmarc=pass header.from=bank.test\r\nAuthentication-Results: elsewhere.test; none\r\n".encode() + data
    with smtplib.SMTP("127.0.0.1", tagging.port, timeout=30) as client:
        client.ehlo("client.test")
        client.sendmail("bounce@none.test", ["alice@example.org"], data)
    message = delivered(tagging, "signed news")
    assert results_of(message) == [
        (
            f"{AUTHSERV}; spf=none smtp.mailfrom=bounce@none.test; dkim=pass header.d=signed.test header.s=sel; "
            "dkim=pass header.d=ed.test header.s=ed; dmarc=pass (p=reject dis=none) header.from=signed.test"
        ),
        "elsewhere.test; none",
    ]


def test_forged_from_is_refused_at_end_of_data(tagging):
    """From: bank.test (p=reject), no signature, SPF passing for another domain: 550 5.7.1 after DATA."""
    with smtplib.SMTP("127.0.0.1", tagging.port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail("a@pass.test")[0] == 250
        assert client.rcpt("alice@example.org")[0] == 250
        code, text = client.data(mail("ceo@bank.test", "forged ceo"))
    assert code == 550
    assert text.startswith(b"5.7.1 ") and b"bank.test" in text and b"DMARC" in text
    # Quarantine (sp=quarantine) for a subdomain of bank.test.
    with smtplib.SMTP("127.0.0.1", tagging.port, timeout=30) as client:
        client.ehlo("client.test")
        client.sendmail("a@pass.test", ["alice@example.org"], mail("ceo@news.bank.test", "forged news"))
    held = delivered(tagging, "forged news", ".Quarantine")
    assert results_of(held) == [
        f"{AUTHSERV}; spf=pass smtp.mailfrom=a@pass.test; dkim=none; dmarc=fail (p=quarantine dis=quarantine) header.from=news.bank.test"
    ]
    assert not any(b"forged ceo" in m for m in tagging.messages("alice@example.org"))


def test_spf_fail_refused_at_mail(strict):
    """spf_fail = "reject": SPF fail is a 550 at MAIL FROM naming the result; softfail still passes."""
    with smtplib.SMTP("127.0.0.1", strict.port, timeout=30) as client:
        client.ehlo("client.test")
        code, text = client.mail("a@fail.test")
        assert code == 550
        assert text.startswith(b"5.7.1 ") and b"spf=fail" in text and b"fail.test" in text
        client.rset()
        client.sendmail("a@softfail.test", ["alice@example.org"], mail("a@softfail.test", "soft"))
    assert "spf=softfail" in results_of(delivered(strict, "soft"))[0]


def test_forged_from_quarantined(strict):
    """dmarc_reject = "quarantine": the p=reject failure lands in .Quarantine/new, not the inbox."""
    with smtplib.SMTP("127.0.0.1", strict.port, timeout=30) as client:
        client.ehlo("client.test")
        client.sendmail("a@pass.test", ["alice@example.org"], mail("ceo@bank.test", "held ceo"))
    held = delivered(strict, "held ceo", ".Quarantine")
    assert results_of(held) == [
        f"{AUTHSERV}; spf=pass smtp.mailfrom=a@pass.test; dkim=none; dmarc=fail (p=reject dis=quarantine) header.from=bank.test"
    ]
    assert not any(b"held ceo" in m for m in strict.messages("alice@example.org"))
