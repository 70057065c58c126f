"""Delivery status notifications: telling a sender that some recipients failed.

A bounce is a ``multipart/report; report-type=delivery-status`` message
(RFC 6522, formerly RFC 3462) with three parts: a short explanation for
people, a ``message/delivery-status`` part for programs (RFC 3464), and the
original message's header section as ``text/rfc822-headers``.  Only the
headers are returned, never the body: the original may be large, and
quoting it back would turn the bounce into a way to reflect spam.

Everything in a bounce that comes from outside (addresses, remote servers'
replies, host names) passes through ``_clean`` first, so a reply such as
``"550 no\\r\\nBcc: victim@x"`` stays one line of text and adds no header.
"""

from __future__ import annotations

import datetime
import email.policy
import re
import textwrap
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime, make_msgid
from typing import IO

__all__ = ["FailedRecipient", "build_bounce", "is_bounce"]

_POLICY = email.policy.SMTP
# RFC 5322 2.1.1: no line longer than 998 characters.
_MAX_LINE = 998
# Writing the report: a long remote reply stays plain text in Diagnostic-Code
# instead of turning into RFC 2047 encoded words at 78 characters.
_OUTPUT_POLICY = _POLICY.clone(max_line_length=_MAX_LINE)
# Control characters (CR and LF included) and the other line breaks that
# str.splitlines honours: none of them may reach a header.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# A reply from an SMTP server starts with its three-digit code.
_SMTP_REPLY = re.compile(r"[245][0-9][0-9](?:[ -]|\Z)")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the queue gave up on, and why (one per-recipient block of the DSN)."""

    address: str  # the recipient as given in RCPT TO
    status: str  # enhanced status code, e.g. "5.1.1" (or "4.4.7" for expiry)
    diagnostic: str  # the remote server's reply, e.g. "550 5.1.1 <x@y>: User unknown", or our own text
    remote_mta: str = ""  # host name of the MX that answered, if any


def is_bounce(envelope_sender: str) -> bool:
    """Never bounce a bounce: mail from <> (or MAILER-DAEMON) gets no DSN.

    Bouncing a bounce can loop between two servers forever (RFC 5321 6.1).
    """
    sender = envelope_sender.strip().strip("<>").strip()
    local_part = sender.rpartition("@")[0] if "@" in sender else sender
    return sender == "" or local_part.lower() == "mailer-daemon"


def build_bounce(
    *,
    reporting_mta: str,
    original: IO[bytes],
    envelope_sender: str,
    recipients: list[FailedRecipient],
    queue_id: str,
    arrival: datetime.datetime,
    now: datetime.datetime | None = None,
    max_original_headers: int = 64 * 1024,
) -> bytes:
    """The DSN message (CRLF line ends, ready to queue with MAIL FROM:<>) telling envelope_sender that these recipients failed.

    ``original`` is read only up to the end of its header section and never
    past ``max_original_headers`` bytes, so memory stays small whatever the
    message size.  Naive datetimes are taken as local time.
    """
    if is_bounce(envelope_sender):
        raise ValueError("a bounce is never bounced: the envelope sender is <> or MAILER-DAEMON")
    if not recipients:
        raise ValueError("a bounce needs at least one failed recipient")
    mta = _clean(reporting_mta) or "localhost"
    sender = _clean(envelope_sender)
    now = _aware(now or datetime.datetime.now(datetime.timezone.utc))

    report = EmailMessage(policy=_POLICY)
    report["From"] = Address("Mail Delivery System", "MAILER-DAEMON", mta)
    report["To"] = _recipient_header(sender)
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no vacation reply to this
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    parts: list[Message | str] = [
        _notification(mta, recipients),
        _delivery_status(mta, queue_id, _aware(arrival), now, recipients),
        _original_headers(original, max_original_headers),
    ]
    report.set_payload(parts)
    return report.as_bytes(policy=_OUTPUT_POLICY)


def _notification(mta: str, recipients: list[FailedRecipient]) -> MIMEPart:
    """Part 1: what happened, for people, in the words Postfix users know."""
    lines = [
        f"This is the mail system at host {mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The headers of your message are attached below.",
        "",
    ]
    for r in recipients:
        said = f"host {_clean(r.remote_mta)} said: " if r.remote_mta.strip() else ""
        entry = f"<{_clean(r.address)}>: {said}{_clean(r.diagnostic) or 'delivery failed'}"
        lines += textwrap.wrap(entry, width=76, subsequent_indent="    ", break_long_words=False)
        lines.append("")
    return _text_part("\n".join(lines), "plain", "Notification")


def _delivery_status(
    mta: str, queue_id: str, arrival: datetime.datetime, now: datetime.datetime, recipients: list[FailedRecipient]
) -> MIMEPart:
    """Part 2: the RFC 3464 fields, one block for the message and one per recipient."""
    message_fields = Message(policy=_POLICY)
    message_fields["Reporting-MTA"] = f"dns; {_ascii(mta)}"
    message_fields["X-Mailplat-Queue-ID"] = _ascii(_clean(queue_id))
    message_fields["Arrival-Date"] = format_datetime(arrival)
    blocks: list[Message | str] = [message_fields]
    for r in recipients:
        block = Message(policy=_POLICY)
        block["Final-Recipient"] = _address_field(_clean(r.address))
        block["Action"] = "failed"
        block["Status"] = _status(r.status)
        if _clean(r.remote_mta):
            block["Remote-MTA"] = f"dns; {_ascii(_clean(r.remote_mta))}"
        diagnostic = _ascii(_clean(r.diagnostic))
        # "smtp" promises an SMTP reply (RFC 3464 2.3.6); our own text gets our own type, as Postfix's "X-Postfix".
        kind = "smtp" if _SMTP_REPLY.match(diagnostic) else "X-Mailplat"
        block["Diagnostic-Code"] = f"{kind}; {diagnostic or 'delivery failed'}"
        block["Last-Attempt-Date"] = format_datetime(now)
        blocks.append(block)
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload(blocks)
    return part


def _original_headers(original: IO[bytes], limit: int) -> MIMEPart:
    """Part 3: the original header section, read line by line and at most ``limit`` bytes."""
    lines: list[str] = []
    remaining = limit
    while remaining > 0:
        line = original.readline(remaining)
        if not line:
            break
        remaining -= len(line)
        if not line.endswith(b"\n"):
            break  # cut by the limit (or the file ends mid-line): a half header would mislead
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if not text:
            break  # the empty line that ends the header section
        lines.append(_CONTROL_BUT_TAB.sub(" ", text))  # tabs stay: folded headers use them
    return _text_part("".join(f"{line}\n" for line in lines), "rfc822-headers", "Undelivered Message Headers")


def _text_part(text: str, subtype: str, description: str) -> MIMEPart:
    """7bit when the text allows it, quoted-printable otherwise: a bounce must pass servers without 8BITMIME."""
    part = MIMEPart(policy=_POLICY)
    plain = text.isascii() and all(len(line) <= _MAX_LINE for line in text.splitlines())
    part.set_content(text, subtype=subtype, cte="7bit" if plain else "quoted-printable")
    part["Content-Description"] = description
    return part


def _recipient_header(sender: str) -> Address | str:
    """The To: header for the sender; an address the header syntax cannot carry must not turn into several."""
    try:
        return Address(addr_spec=sender)
    except (ValueError, IndexError, TypeError):
        # Non-ASCII or broken: the envelope (RCPT TO) still reaches the sender.
        return "undisclosed-recipients:;"


def _address_field(address: str) -> str:
    """Final-Recipient's value: ``rfc822;`` for ASCII, RFC 6533 ``utf-8;`` with escapes otherwise."""
    if address.isascii():
        return f"rfc822; {address}"
    escaped = "".join(c if c.isascii() and c.isprintable() and c not in " +=\\" else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {escaped}"


def _status(status: str) -> str:
    """The enhanced status code if it is one (RFC 3463), else the generic code of its class."""
    status = _clean(status)
    if _STATUS.fullmatch(status):
        return status
    return "4.0.0" if status.startswith("4") else "5.0.0"


def _clean(value: str) -> str:
    """One line of text: control characters (CR and LF too) become a space, runs of spaces one."""
    return " ".join(_CONTROL.sub(" ", value).split())


def _ascii(value: str) -> str:
    """DSN fields are ASCII (RFC 3464); anything else is spelled as an escape rather than lost."""
    return value.encode("ascii", "backslashreplace").decode("ascii")


def _aware(moment: datetime.datetime) -> datetime.datetime:
    """A timezone-aware datetime: Date fields need the zone offset."""
    return moment if moment.tzinfo is not None else moment.astimezone()
