"""SMTP and POP3 sessions in-process (StringTransport + Clock): what needs time
to pass, and what must never escape a protocol's dataReceived."""

from __future__ import annotations

import base64

from twisted.logger import globalLogPublisher

from inprocess import Platform
from mailplat.config import POP3Settings, SMTPLimits

PLAIN_ALICE = base64.b64encode(b"\0alice@example.org\0alice-password").decode()
PLAIN_WRONG = base64.b64encode(b"\0alice@example.org\0wrong").decode()


def greeted(wire, ehlo: bool = True):
    assert wire.output().startswith(("220", "+OK"))
    if ehlo:
        wire.send("EHLO client.example.org")
        assert wire.output().startswith("250")
    return wire


def test_wrong_password_answered_after_the_delay():
    """A failed SMTP login is answered only after auth_failure_delay; a right one at once."""
    platform = Platform(failure_delay=2.0)
    wire = greeted(platform.smtp())
    wire.send(f"AUTH PLAIN {PLAIN_WRONG}")
    assert wire.output() == ""
    platform.clock.advance(1.9)
    assert wire.output() == ""
    platform.clock.advance(0.2)
    assert wire.output().startswith("535 5.7.8")
    wire.send(f"AUTH PLAIN {PLAIN_ALICE}")
    assert wire.output().startswith("235 2.7.0")


def test_block_is_shared_by_smtp_and_pop3_and_ends():
    """max_login_failures on SMTP blocks the address on POP3 too, until login_block_time has passed."""
    platform = Platform(failure_delay=1.0, max_failures=3, block_time=300.0)
    for _ in range(3):
        wire = greeted(platform.smtp())
        wire.send(f"AUTH PLAIN {PLAIN_WRONG}")
        platform.clock.advance(1.0)
        assert wire.output().startswith("535")
    pop = greeted(platform.pop3(), ehlo=False)
    pop.send("USER alice@example.org")
    pop.send("PASS alice-password")
    assert "-ERR [SYS/TEMP] Too many failed logins" in pop.output()
    other = greeted(platform.pop3(peer="192.0.2.2"), ehlo=False)
    other.send(f"AUTH PLAIN {PLAIN_ALICE}")
    assert "+OK Logged in" in other.output()
    smtp = greeted(platform.smtp())
    smtp.send(f"AUTH PLAIN {PLAIN_ALICE}")
    assert smtp.output().startswith("454 4.7.0")
    platform.clock.advance(300.0)
    smtp = greeted(platform.smtp())
    smtp.send(f"AUTH PLAIN {PLAIN_ALICE}")
    assert smtp.output().startswith("235")


def test_failure_records_of_many_addresses_are_forgotten():
    """The guard forgets an address once its failures are login_block_time old, so one failure a second from ever new
    addresses keeps about block_time of them, not all; an address blocked meanwhile stays blocked until its time is up."""
    platform = Platform(failure_delay=1.0, max_failures=3, block_time=300.0)

    def fail(peer: str) -> str:
        wire = greeted(platform.pop3(peer=peer), ehlo=False)
        wire.send(f"AUTH PLAIN {PLAIN_WRONG}")
        platform.clock.advance(1.0)
        return wire.output()

    for _ in range(3):
        assert fail("192.0.2.9").startswith("-ERR")
    sizes = []
    for i in range(2000):
        assert fail(f"10.0.{i // 250}.{i % 250}").startswith("-ERR")
        sizes.append(len(platform.guard._failures))
        if i == 200:
            assert "Too many failed logins" in fail("192.0.2.9"), "pruning others keeps a blocked address"
    # 300 s of failures, one a second, and the one that just came.
    assert max(sizes) <= 302 and sizes[-1] >= 290, (max(sizes), sizes[-1])
    assert "192.0.2.9" not in platform.guard._failures
    wire = greeted(platform.pop3(peer="192.0.2.9"), ehlo=False)
    wire.send(f"AUTH PLAIN {PLAIN_ALICE}")
    assert "+OK Logged in" in wire.output()


def test_smtp_idle_timeout():
    """A silent SMTP client hears 421 4.4.2 after idle_timeout and is disconnected; input resets the timer."""
    platform = Platform(smtp=SMTPLimits(idle_timeout=10.0))
    wire = greeted(platform.smtp(listener="smtp"))
    platform.clock.advance(9.0)
    wire.send("NOOP")
    assert wire.output().startswith("250")
    platform.clock.advance(9.0)
    assert not wire.closed
    platform.clock.advance(1.5)
    assert wire.output().startswith("421 4.4.2")
    assert wire.closed


def test_pop3_idle_timeout():
    platform = Platform(pop3=POP3Settings(idle_timeout=600.0))
    wire = greeted(platform.pop3(), ehlo=False)
    platform.clock.advance(599.0)
    assert not wire.closed
    platform.clock.advance(2.0)
    assert "-ERR [SYS/TEMP] idle" in wire.output()
    assert wire.closed


def capture_log():
    events = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: globalLogPublisher.removeObserver(events.append)


def test_backend_bug_is_a_reply_not_a_dropped_connection():
    """An auth backend that raises gets 451 4.3.0 (SMTP) and -ERR [SYS/TEMP] (POP3), one log line with
    the session id, and the session goes on."""
    platform = Platform()
    platform.users.broken = KeyError("boom")
    events, stop = capture_log()
    try:
        smtp = greeted(platform.smtp())
        smtp.send(f"AUTH PLAIN {PLAIN_ALICE}")
        assert smtp.output().startswith("451 4.3.0")
        assert not smtp.closed
        smtp.send("NOOP")
        assert smtp.output().startswith("250")
        pop = greeted(platform.pop3(), ehlo=False)
        pop.send(f"AUTH PLAIN {PLAIN_ALICE}")
        assert pop.output().startswith("-ERR [SYS/TEMP]")
        pop.send("USER alice@example.org")
        assert pop.output().startswith("+OK")
    finally:
        stop()
    errors = [e for e in events if "internal error" in e.get("log_format", "")]
    assert len(errors) == 2
    assert {e["session"] for e in errors} == {smtp.protocol.session, pop.protocol.session}
    assert all("KeyError" in e["error"] and "\n" not in e["error"] for e in errors)


def test_sasl_refusals_leave_the_session_open():
    """Cancel, bad base64, malformed PLAIN, foreign authzid, non-UTF-8: each a reply, then a login works."""
    platform = Platform()
    wire = greeted(platform.smtp())
    for response, expected in [
        ("*", "501 5.7.0"),
        ("###", "501 5.5.2"),
        (base64.b64encode(b"no nuls").decode(), "501 5.5.2"),
        (base64.b64encode(b"bob@example.org\0alice@example.org\0alice-password").decode(), "535 5.7.8"),
        (base64.b64encode(b"\0\xff@example.org\0x").decode(), "501 5.5.2"),
    ]:
        wire.send("AUTH PLAIN")
        assert wire.output().startswith("334")
        wire.send(response)
        assert wire.output().startswith(expected), response
    wire.send(f"AUTH PLAIN {PLAIN_ALICE}")
    assert wire.output().startswith("235")
    # None of these counted as a failed login.
    assert platform.guard.blocked_for("192.0.2.1") == 0


def test_garbage_is_answered_and_the_session_goes_on():
    """Bare LF, a NUL, an over-long line and an unknown verb: each gets its error, then NOOP works."""
    platform = Platform()
    wire = greeted(platform.smtp(listener="smtp"))
    wire.protocol.dataReceived(b"NOOP\n")
    assert wire.output().startswith("500 5.5.2")
    wire.send(b"NO\0OP")
    assert wire.output().startswith("500 5.5.2")
    wire.send(b"X" * 5000)
    assert wire.output().startswith("500 5.5.2")
    wire.send(b"\xff\xfe")
    assert wire.output().startswith("500 5.5.1")
    wire.send("NOOP")
    assert wire.output().startswith("250")
    pop = greeted(platform.pop3(), ehlo=False)
    pop.send(b"\xff")
    pop.send(b"LIST")
    pop.send(b"USER")
    assert pop.output().count("-ERR") == 3
    pop.send("QUIT")
    assert pop.output().startswith("+OK")


def transaction(wire, sender: str = "someone@remote.test", rcpt: str = "alice@example.org") -> None:
    """MAIL and RCPT, both accepted, then DATA up to its 354."""
    wire.send(f"MAIL FROM:<{sender}>")
    wire.send(f"RCPT TO:<{rcpt}>")
    wire.send("DATA")
    replies = wire.lines()
    assert [r[:3] for r in replies] == ["250", "250", "354"], replies


def test_header_field_limit_exactly_and_one_more(tmp_path):
    """max_header_fields header fields are accepted at end of DATA; one more is 552 5.3.4 and nothing is delivered."""
    from mailplat.smtp.receiving import Spool

    platform = Platform(smtp=SMTPLimits(max_header_fields=50))
    wire = greeted(platform.smtp(listener="smtp", spool=Spool(str(tmp_path))))
    for count, expected in ((50, "250 2.0.0"), (51, "552 5.3.4 Message refused: more than 50 header fields")):
        transaction(wire)
        fields = b"".join(b"X-Field-%d: v\r\n" % i for i in range(count))
        wire.protocol.dataReceived(fields + b"\r\nbody\r\n.\r\n")
        assert wire.output().startswith(expected)
    assert len(platform.mailboxes.stored["alice@example.org"]) == 1


def logged_in(platform, user: str = "alice@example.org", password: str = "alice-password", spool=None):
    wire = greeted(platform.smtp(spool=spool))
    wire.send("AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode())
    assert wire.output().startswith("235")
    return wire


def test_messages_per_hour_across_sessions_then_refilled():
    """max_messages_per_hour MAILs pass, then 451 4.7.1 with one log line, in a second session too, for that user only;
    an hour refills the limit, evenly."""
    from mailplat.config import SubmissionSettings

    platform = Platform(submission=SubmissionSettings(max_messages_per_hour=3))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        first = logged_in(platform)
        for _ in range(3):
            first.send("MAIL FROM:<alice@example.org>")
            first.send("RSET")
        assert [line[:3] for line in first.lines()] == ["250"] * 6
        first.send("MAIL FROM:<alice@example.org>")
        assert first.output() == "451 4.7.1 Too many messages from alice@example.org (limit 3 an hour); try again later\r\n"
        second = logged_in(platform)
        second.send("MAIL FROM:<alice@example.org>")
        assert second.output().startswith("451 4.7.1")
        bob = logged_in(platform, "bob@example.org", "bob-password")
        bob.send("MAIL FROM:<bob@example.org>")
        assert bob.output().startswith("250")
    finally:
        globalLogPublisher.removeObserver(events.append)
    limited = [e for e in events if "max_messages_per_hour" in e.get("log_format", "")]
    assert len(limited) == 2 and all(e["user"] == "alice@example.org" for e in limited)
    # Sessions idle out in 300 s: each wait is followed by a new one.
    platform.clock.advance(1199.0)
    later = logged_in(platform)
    later.send("MAIL FROM:<alice@example.org>")
    assert later.output().startswith("451 4.7.1"), "a third of an hour gives back one message, not before"
    platform.clock.advance(1.0)
    later.send("MAIL FROM:<alice@example.org>")
    assert later.output().startswith("250")
    platform.clock.advance(3600.0)
    later = logged_in(platform)
    for _ in range(3):
        later.send("MAIL FROM:<alice@example.org>")
        later.send("RSET")
    later.send("MAIL FROM:<alice@example.org>")
    assert [line[:3] for line in later.lines()] == ["250"] * 6 + ["451"], "a burst never exceeds the hourly number"


def test_recipients_per_hour_count_every_rcpt():
    """max_recipients_per_hour RCPTs pass over several messages, then 451 4.7.1 at RCPT; an hour later they pass again."""
    from mailplat.config import SubmissionSettings

    platform = Platform(submission=SubmissionSettings(max_recipients_per_hour=4))
    wire = logged_in(platform)
    wire.send("MAIL FROM:<alice@example.org>")
    for rcpt in ("bob@example.org", "alice@example.org", "nobody@example.org"):
        wire.send(f"RCPT TO:<{rcpt}>")
    wire.send("RSET")
    wire.send("MAIL FROM:<alice@example.org>")
    wire.send("RCPT TO:<bob@example.org>")
    wire.send("RCPT TO:<bob@example.org>")
    codes = [line[:9] for line in wire.lines()]
    assert codes == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "550 5.1.1", "250 2.0.0", "250 2.1.0", "250 2.1.5", "451 4.7.1"], codes
    platform.clock.advance(3600.0)
    wire = logged_in(platform)
    wire.send("MAIL FROM:<alice@example.org>")
    wire.send("RCPT TO:<bob@example.org>")
    assert [line[:9] for line in wire.lines()] == ["250 2.1.0", "250 2.1.5"]


def test_zero_turns_the_hourly_limits_off():
    """max_messages_per_hour = 0 and max_recipients_per_hour = 0 never refuse."""
    from mailplat.config import SubmissionSettings

    platform = Platform(submission=SubmissionSettings(max_messages_per_hour=0, max_recipients_per_hour=0))
    wire = logged_in(platform)
    for _ in range(700):
        wire.send("MAIL FROM:<alice@example.org>")
        wire.send("RCPT TO:<bob@example.org>")
        wire.send("RCPT TO:<bob@example.org>")
        wire.send("RCPT TO:<bob@example.org>")
        wire.send("RSET")
    assert {line[:3] for line in wire.lines()} == {"250"}


def test_quota_forgets_accounts_whose_limit_is_whole_again():
    """The quota's memory follows the accounts that sent within the hour, not every account ever seen."""
    from twisted.internet import task

    from mailplat.smtp.quota import SendingQuota

    clock = task.Clock()
    quota = SendingQuota(clock, 10, 10)
    for i in range(5000):
        assert quota.message(f"user{i}@example.org")
    assert len(quota._messages._buckets) == 5000
    clock.advance(3600.0)
    for i in range(4000):
        assert quota.message(f"other{i}@example.org")
    assert 0 < len(quota._messages._buckets) <= 4000, "the first 5000 are forgotten"
    assert quota._recipients._buckets == {}


def test_header_limit_applies_to_submission_too(tmp_path):
    """On submission as on the MX port, one header field over max_header_fields is 552 5.3.4."""
    from mailplat.smtp.receiving import Spool

    platform = Platform(smtp=SMTPLimits(max_header_fields=5))
    wire = logged_in(platform, spool=Spool(str(tmp_path)))
    for extra, expected in ((b"", "250 2.0.0"), (b"X-Sixth: 6\r\n", "552 5.3.4")):
        transaction(wire, sender="alice@example.org", rcpt="bob@example.org")
        header = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: s\r\nDate: x\r\nMessage-ID: <m@x>\r\n" + extra
        wire.protocol.dataReceived(header + b"\r\nbody\r\n.\r\n")
        assert wire.output().startswith(expected)
