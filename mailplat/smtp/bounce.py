"""Delivery status notifications (RFC 3464) for mail the queue gives up on."""

from __future__ import annotations

import datetime
import email.utils
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.policy import SMTP
from typing import IO

__all__ = ["FailedRecipient", "build_bounce", "is_bounce"]


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str
    diagnostic: str
    remote_mta: str = ""


def _clean(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def is_bounce(envelope_sender: str) -> bool:
    return not envelope_sender or envelope_sender.lower().startswith("mailer-daemon@")


def build_bounce(*, reporting_mta: str, original: IO[bytes], envelope_sender: str, recipients: list[FailedRecipient],
                 queue_id: str, arrival: datetime.datetime, now: datetime.datetime | None = None,
                 max_original_headers: int = 64 * 1024) -> bytes:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    headers = b""
    while len(headers) < max_original_headers:
        line = original.readline(max_original_headers)
        if not line or line in (b"\r\n", b"\n"):
            break
        headers += line
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    msg["To"] = f"<{_clean(envelope_sender)}>"
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Auto-Submitted"] = "auto-replied"
    msg["Date"] = email.utils.format_datetime(now)
    msg["Message-ID"] = f"<{queue_id}.bounce@{reporting_mta}>"
    lines = [f"This is the mail system at {reporting_mta}.", "", "Your message could not be delivered to:", ""]
    lines += [f"<{_clean(r.address)}>: {_clean(r.diagnostic)}" for r in recipients]
    msg.set_content("\n".join(lines) + "\n")
    blocks = []
    per_message = Message(policy=SMTP)
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Mailplat-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.format_datetime(arrival)
    blocks.append(per_message)
    for r in recipients:
        block = Message(policy=SMTP)
        block["Final-Recipient"] = f"rfc822; {_clean(r.address)}"
        block["Action"] = "failed"
        block["Status"] = _clean(r.status)
        if r.remote_mta:
            block["Remote-MTA"] = f"dns; {_clean(r.remote_mta)}"
        block["Diagnostic-Code"] = f"smtp; {_clean(r.diagnostic)}"
        block["Last-Attempt-Date"] = email.utils.format_datetime(now)
        blocks.append(block)
    msg.make_mixed()
    msg.set_type("multipart/report")
    msg.set_param("report-type", "delivery-status")
    part = EmailMessage(policy=SMTP)
    part.set_type("message/delivery-status")
    part.set_payload(blocks)
    msg.attach(part)
    rfc822 = EmailMessage(policy=SMTP)
    rfc822.set_payload(headers.decode("utf-8", "replace"))
    rfc822.set_type("text/rfc822-headers")
    msg.attach(rfc822)
    return msg.as_bytes()
