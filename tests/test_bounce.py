"""Delivery status notifications: the multipart/report built by mailplat.queue.bounce."""

from __future__ import annotations

import datetime
import email
import email.policy
import email.utils
import io
from email.message import EmailMessage

import pytest

from mailplat.queue.bounce import FailedRecipient, build_bounce, is_bounce

MARKER = "BODY-MARKER-7f3a"
ORIGINAL = (
    b"Return-Path: <alice@example.org>\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@elsewhere.test, carol@faraway.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"\tfolded onto a second line\r\n"
    b"Message-ID: <original-1@example.org>\r\n"
    b"\r\n" + MARKER.encode() + b"\r\nSubject: not a header, just body text\r\n"
)
ARRIVAL = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
NOW = datetime.datetime(2026, 3, 6, 12, 30, 0, tzinfo=datetime.timezone.utc)
BOB = FailedRecipient("bob@elsewhere.test", "5.1.1", "550 5.1.1 <bob@elsewhere.test>: User unknown", "mx1.elsewhere.test")
CAROL = FailedRecipient("carol@faraway.test", "4.4.7", "gave up after 120 hours; last error: cannot connect to faraway.test")


class CountingRaw(io.RawIOBase):
    """A file of ``head`` followed by ``body_size`` bytes of body, made up as read; counts the bytes read from it."""

    def __init__(self, head: bytes, body_size: int) -> None:
        self.head = head
        self.size = len(head) + body_size
        self.position = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.position)
        for i in range(n):
            at = self.position + i
            buffer[i] = self.head[at] if at < len(self.head) else (0x0A if at % 64 == 63 else 0x78)
        self.position += n
        self.bytes_read += n
        return n


def build(original: bytes | io.BufferedIOBase = ORIGINAL, recipients=(BOB, CAROL), **overrides) -> bytes:
    arguments = dict(
        reporting_mta="mail.example.org",
        original=io.BytesIO(original) if isinstance(original, bytes) else original,
        envelope_sender="alice@example.org",
        recipients=list(recipients),
        queue_id="4F2A9C01BE",
        arrival=ARRIVAL,
        now=NOW,
    )
    arguments.update(overrides)
    return build_bounce(**arguments)


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def status_blocks(report: EmailMessage) -> list:
    [part] = [p for p in report.iter_parts() if p.get_content_type() == "message/delivery-status"]
    return part.get_payload()


def test_content_type_is_delivery_status_report():
    """The bounce is a multipart/report with report-type=delivery-status (RFC 6522)."""
    report = parse(build())
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert not report.defects


def test_envelope_headers():
    """The bounce comes from MAILER-DAEMON at the reporting MTA, goes to the sender and says it is automatic."""
    report = parse(build())
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert report["To"] == "alice@example.org"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Date"].datetime == NOW
    assert report["Message-ID"].endswith("@mail.example.org>")
    assert report["MIME-Version"] == "1.0"


def test_three_parts_in_order():
    """The report has the human text, the delivery-status fields and the original's headers, in that order."""
    report = parse(build())
    assert [p.get_content_type() for p in report.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_human_text_names_each_recipient_and_reply():
    """The explanation lists each failed recipient with the remote host and its reply, or our own reason."""
    text = next(parse(build()).iter_parts()).get_content()
    assert "mail.example.org" in text
    assert "<bob@elsewhere.test>: host mx1.elsewhere.test said: 550 5.1.1" in text
    assert "User unknown" in text
    assert "<carol@faraway.test>: gave up after 120 hours" in text


def test_delivery_status_fields_per_recipient():
    """The per-message block and one block per recipient carry the RFC 3464 fields with each recipient's own status."""
    message_fields, bob, carol = status_blocks(parse(build()))
    assert message_fields["Reporting-MTA"] == "dns; mail.example.org"
    assert message_fields["X-Mailplat-Queue-ID"] == "4F2A9C01BE"
    assert email.utils.parsedate_to_datetime(message_fields["Arrival-Date"]) == ARRIVAL

    assert bob["Final-Recipient"] == "rfc822; bob@elsewhere.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.elsewhere.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@elsewhere.test>: User unknown"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]) == NOW

    assert carol["Final-Recipient"] == "rfc822; carol@faraway.test"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.7"
    assert "Remote-MTA" not in carol
    # Our own text is not an SMTP reply, so it does not claim the "smtp" type (RFC 3464 2.3.6).
    assert carol["Diagnostic-Code"] == "X-Mailplat; gave up after 120 hours; last error: cannot connect to faraway.test"


def test_long_remote_reply_stays_plain_text():
    """A long remote reply is kept as text in Diagnostic-Code, not turned into RFC 2047 encoded words."""
    reply = "550 5.7.1 " + "rejected-by-a-very-long-policy-name-" * 6 + " see https://example.test/" + "x" * 120
    [_, block] = status_blocks(parse(build(recipients=[FailedRecipient("bob@elsewhere.test", "5.7.1", reply)])))
    assert block["Diagnostic-Code"] == f"smtp; {reply}"


def test_original_headers_included_body_not():
    """The third part holds the original's header section (folded lines too) and none of its body."""
    raw = build()
    headers = list(parse(raw).iter_parts())[2].get_content().replace("\r\n", "\n")
    assert "Subject: quarterly numbers\n\tfolded onto a second line\n" in headers
    assert "Message-ID: <original-1@example.org>" in headers
    assert MARKER not in headers
    assert MARKER.encode() not in raw
    assert b"not a header, just body text" not in raw


def test_huge_original_is_not_read_whole():
    """With a 20 MB body, reading stops at the end of the header section, far below 1 MB."""
    source = CountingRaw(ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n", 20 * 1024 * 1024)
    headers = list(parse(build(io.BufferedReader(source))).iter_parts())[2].get_content()
    assert "Subject: quarterly numbers" in headers
    assert source.bytes_read < 1024 * 1024


def test_header_section_is_capped():
    """An original that is all header lines (no empty line) is read only up to max_original_headers bytes."""
    head = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 40) for i in range(400_000))  # about 24 MB
    source = CountingRaw(head, 0)
    headers = list(parse(build(io.BufferedReader(source), max_original_headers=16 * 1024)).iter_parts())[2].get_content()
    assert source.bytes_read < 1024 * 1024
    assert 0 < len(headers.encode()) <= 16 * 1024
    assert headers.startswith("X-Filler-000000: ")
    # Only whole lines are kept: the line cut by the limit is dropped.
    assert all(line.endswith("y" * 40) for line in headers.splitlines())


def test_remote_reply_cannot_inject_headers():
    """CR/LF and control characters in outside values (reply, address, host) never start a new header."""
    evil = FailedRecipient(
        "bob@elsewhere.test\r\nBcc: victim2@x",
        "5.1.1\r\nBcc: victim3@x",
        "550 5.1.1 no such user\r\nBcc: victim@x\x00\x1b",
        "mx1.elsewhere.test\nBcc: victim4@x",
    )
    raw = build(recipients=[evil], envelope_sender="alice@example.org\r\nBcc: victim5@x")
    report = parse(raw)
    assert "Bcc" not in report
    for block in status_blocks(report):
        assert "Bcc" not in block
    for part in report.iter_parts():
        assert "Bcc" not in part
    assert not any(line.startswith(b"Bcc:") for line in raw.split(b"\r\n"))
    assert b"\x00" not in raw and b"\x1b" not in raw
    [_, block] = status_blocks(report)
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user Bcc: victim@x"
    assert block["Status"] == "5.0.0"  # not a valid status code once flattened to one line


def test_crlf_line_ends_only():
    """Every line of the bounce ends in CRLF: no bare LF, no bare CR, even when the original used LF."""
    for original in (ORIGINAL, ORIGINAL.replace(b"\r\n", b"\n"), b"Subject: a\rb\r\n\r\nbody"):
        raw = build(original)
        rest = raw.replace(b"\r\n", b"")
        assert b"\n" not in rest and b"\r" not in rest
        assert raw.endswith(b"\r\n")


def test_non_ascii_addresses():
    """A non-ASCII recipient is reported with the RFC 6533 utf-8 type and the bounce stays 7-bit clean."""
    raw = build(recipients=[FailedRecipient("jörg@bücher.test", "5.1.1", "550 5.1.1 unknown")], envelope_sender="zoë@example.org")
    assert raw.isascii()
    report = parse(raw)
    [_, block] = status_blocks(report)
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.test"
    assert "<jörg@bücher.test>" in next(report.iter_parts()).get_content()


def test_naive_datetimes_are_local_time():
    """Naive arrival and now are taken as local time, so Date fields still carry a zone offset."""
    arrival = datetime.datetime(2026, 3, 1, 12, 0, 0)
    report = parse(build(arrival=arrival, now=None))
    [message_fields, *_] = status_blocks(report)
    assert email.utils.parsedate_to_datetime(message_fields["Arrival-Date"]) == arrival.astimezone()
    assert report["Date"].datetime.tzinfo is not None


@pytest.mark.parametrize("sender", ["", "<>", "MAILER-DAEMON@x", "mailer-daemon@mail.example.org", "MAILER-DAEMON"])
def test_is_bounce_true(sender):
    """Mail from the null sender or MAILER-DAEMON is a bounce and gets no DSN."""
    assert is_bounce(sender)


@pytest.mark.parametrize("sender", ["a@b", "alice@example.org", "mailer-daemon-fan@x", "x@mailer-daemon"])
def test_is_bounce_false(sender):
    """Mail from an ordinary sender is not a bounce."""
    assert not is_bounce(sender)


def test_bounce_of_bounce_refused():
    """build_bounce refuses to address a DSN to <> or MAILER-DAEMON, so bounces cannot loop."""
    with pytest.raises(ValueError):
        build(envelope_sender="")
    with pytest.raises(ValueError):
        build(envelope_sender="MAILER-DAEMON@elsewhere.test")


def test_no_recipients_refused():
    """A bounce with no failed recipient is a caller error, not an empty report."""
    with pytest.raises(ValueError):
        build(recipients=[])
