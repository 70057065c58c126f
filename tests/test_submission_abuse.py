"""What a logged-in user could abuse: the From: header, the hourly limits, addresses of others.

A stolen password must not turn the domain into a spam source that signs as
anyone: mail is from the user (envelope and header), and only so much of it.
"""

from __future__ import annotations

import smtplib

import pytest

from conftest import BASE_CONFIG, MailplatServer, merge_toml
from test_submission import ALICE, submit

SEND_AS = """
[submission.send_as]
"alice@example.org" = ["Alice@Elsewhere.test", "news@example.org"]
"""


@pytest.fixture(scope="module")
def abuse_server(tmp_path_factory):
    """A server where alice may also send as two listed addresses."""
    server = MailplatServer(tmp_path_factory.mktemp("abuse"), merge_toml(BASE_CONFIG, SEND_AS))
    server.start()
    yield server
    server.stop()


def send(server, header_from: bytes | None, envelope: str = "alice@example.org", implicit: bool = False, extra: bytes = b"") -> tuple[int, bytes]:
    """Alice submits a message to bob with this From: field (None: without one); the reply to its end of DATA."""
    head = (b"From: " + header_from + b"\r\n" if header_from is not None else b"") + extra
    body = head + b"To: bob@example.org\r\nSubject: from-check\r\n\r\nhello\r\n"
    with submit(server, implicit) as client:
        client.login(*ALICE)
        assert client.mail(envelope)[0] == 250
        assert client.rcpt("bob@example.org")[0] == 250
        try:
            return client.data(body)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error


@pytest.mark.parametrize(
    "header_from",
    [
        b"alice@example.org",
        b"Alice <alice@example.org>",
        b"Alice+lists@EXAMPLE.org",
        b'"Smith, Alice" <alice@example.org>, postmaster@example.org',  # postmaster is an alias of alice
        b"anything@example.net",  # the catch-all of example.net is alice
        b"alice@example.org (Alice at work)",
        b"=?utf-8?q?Al=C3=AFce?= <alice@example.org>",
        b"Alice\r\n <alice@example.org>,\r\n\tteam@example.org",  # folded; team@ resolves to alice (and bob)
        b"News <news+weekly@example.org>",  # listed in send_as
        b"alice@elsewhere.TEST",  # listed in send_as, another domain
    ],
)
def test_from_header_of_the_user_is_accepted(abuse_server, header_from):
    """Own addresses (any +tag, any case), aliases that reach the user and send_as addresses pass, with display names, comments and folding."""
    code, text = send(abuse_server, header_from)
    assert code == 250, (code, text)


@pytest.mark.parametrize(
    "header_from, why",
    [
        (b"Bob <bob@example.org>", b"From: header address <bob@example.org> rejected: not owned by alice@example.org"),
        (b"alice@example.org, Bob <bob@example.org>", b"<bob@example.org> rejected"),
        (b"Alice <alice@elsewhere.test>, x@elsewhere.test", b"<x@elsewhere.test> rejected"),
        (b"alice@example.org\r\n , bob@example.org", b"<bob@example.org> rejected"),
        # What a reader may show differs from what a lenient parser takes: refused.
        (b"alice@example.org <bob@example.org>", b"not a valid address list"),
        (b"<alice@example.org>@evil.test", b"not a valid address list"),
        (b"alice@example.org bob@example.org", b"not a valid address list"),
        (b"Alice <alice@example.org", b"not a valid address list"),
        (b"alice", b"not a valid address list"),
        (b"undisclosed-senders:;", b"holds no address"),
        (b"", b"not a valid address list"),
        (b"alice@example.org" + (b"\r\n (" + b"x" * 900 + b")") * 3, b"too long to check"),
        (b"Alice " + b"(" * 300 + b" <alice@example.org>", b"cannot be parsed"),  # the parser's RecursionError
        (None, b"it has no From: header field"),
    ],
)
def test_from_header_not_the_users_is_refused(abuse_server, header_from, why):
    """Another user's address, a list with one, an ambiguous or unreadable field, or none at all: 553 5.7.1 at the end of DATA."""
    before = len(abuse_server.messages("bob@example.org"))
    code, text = send(abuse_server, header_from)
    assert code == 553 and text.startswith(b"5.7.1") and why in text, (code, text)
    assert len(abuse_server.messages("bob@example.org")) == before


def test_two_from_fields_are_refused(abuse_server):
    """A second From: field (RFC 5322 3.6 allows one) is refused even when both are the user's."""
    code, text = send(abuse_server, b"alice@example.org", implicit=True, extra=b"from: alice@example.org\r\n")
    assert code == 553 and b"more than one From: header field" in text, (code, text)


def test_envelope_may_use_send_as_addresses(abuse_server):
    """send_as addresses are the user's in MAIL FROM too; bob, who has none listed, may not use them."""
    code, text = send(abuse_server, b"alice@elsewhere.test", envelope="Alice+x@elsewhere.test")
    assert code == 250, (code, text)
    with submit(abuse_server) as client:
        client.login("bob@example.org", "bob-password")
        code, text = client.docmd("MAIL", "FROM:<alice@elsewhere.test>")
        assert code == 553 and text.startswith(b"5.7.1")


def test_refusal_is_logged_with_the_queue_id(abuse_server):
    """A From: refusal is one log line naming the session, the queue id and the reason."""
    send(abuse_server, b"Carol <carol@example.org>")
    lines = [line for line in abuse_server.log().splitlines() if "<carol@example.org> rejected" in line]
    assert len(lines) == 1 and " refused: From: header address" in lines[0]


LIMITS = """
[submission]
max_messages_per_hour = 2
max_recipients_per_hour = 3
"""


def test_hourly_limits_over_the_wire_on_both_listeners(make_server):
    """Past max_messages_per_hour MAIL gets 451 4.7.1, on 465 as on 587; past max_recipients_per_hour RCPT does; each with a log line."""
    server = make_server(LIMITS)
    with submit(server) as client:
        client.login(*ALICE)
        assert client.mail("alice@example.org")[0] == 250
        for _ in range(3):
            assert client.rcpt("bob@example.org")[0] == 250
        code, text = client.rcpt("bob@example.org")
        assert code == 451 and text.startswith(b"4.7.1 Too many recipients from alice@example.org (limit 3 an hour)"), (code, text)
        client.rset()
        assert client.mail("alice@example.org")[0] == 250
        client.rset()
    with submit(server, implicit=True) as client:
        client.login(*ALICE)
        code, text = client.mail("alice@example.org")
        assert code == 451 and text.startswith(b"4.7.1 Too many messages from alice@example.org (limit 2 an hour)"), (code, text)
        assert client.noop()[0] == 250
    log = server.log()
    assert log.count("rate limit: alice@example.org over max_recipients_per_hour = 3") == 1
    assert log.count("rate limit: alice@example.org over max_messages_per_hour = 2") == 1
