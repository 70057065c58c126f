"""An SMTP session in memory: whatever a client sends, nothing escapes
dataReceived, no command ends as an "internal error", every line written
is a reply in US-ASCII, and the replies and what is delivered are the same
however the client's bytes are chunked.

Input: a control line ("smtp", "submission" or "submissions", default
submissions, plus split offsets; see harness.control), then what the client
sends.  The users are tests/inprocess.py's (alice@example.org with
alice-password, bob@example.org), the domain example.org.
"""

from __future__ import annotations

import re
import tempfile

import harness

with harness.instrumented():
    from inprocess import Platform

    from mailplat.config import SMTPLimits
    from mailplat.smtp.receiving import Spool

LISTENERS = {b"smtp": "smtp", b"submission": "submission", b"submissions": "submissions"}
# Small limits, so that short inputs reach them too.
LIMITS = SMTPLimits(max_message_size=16 * 1024, max_recipients=4, max_errors=20)
SPOOL = Spool(tempfile.mkdtemp(prefix="mailplat-fuzz-spool-"))
SPOOL.start()

_REPLY = re.compile(rb"[2-5][0-9][0-9]([ -][ -~]*)?\Z")
_QUEUED = re.compile(rb"queued as ([0-9A-F]+)")
_DATE = re.compile(rb"[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}")
_MESSAGE_ID = re.compile(rb"<[0-9A-F]+\.[0-9A-F]+@")


def session(listener: str, pieces: list[bytes]) -> tuple[bytes, bytes]:
    """The replies, and what was delivered, with ids and dates made constant."""
    platform = Platform(failure_delay=2.0, max_failures=3, smtp=LIMITS)
    wire = platform.smtp(listener=listener, spool=SPOOL)
    replies = harness.converse(wire, platform.clock, pieces)
    delivered = b"".join(
        b"== " + address.encode() + b"\n" + message
        for address, messages in sorted(platform.mailboxes.stored.items())
        for message in messages
    )
    delivered = _MESSAGE_ID.sub(b"<MESSAGE-ID@", _DATE.sub(b"DATE", delivered))
    for queue_id in set(_QUEUED.findall(replies)):
        replies = replies.replace(queue_id, b"QUEUE-ID")
        delivered = delivered.replace(queue_id, b"QUEUE-ID")
    return replies, delivered


def well_formed(replies: bytes) -> None:
    """Every line the server writes is a reply (RFC 5321 4.2), in US-ASCII."""
    if not replies.isascii():
        raise harness.Crash(f"a reply is not US-ASCII:\n{replies.decode('utf-8', 'backslashreplace')}")
    for line in replies.split(b"\r\n")[:-1]:
        if not _REPLY.match(line):
            raise harness.Crash(f"not a reply line: {line!r}")


def test_one(data: bytes) -> None:
    options, cuts, stream = harness.control(data)
    listener = next((LISTENERS[o] for o in options if o in LISTENERS), "submissions")
    results = []
    for pieces in harness.chunkings(stream, cuts):
        result = session(listener, pieces)
        well_formed(result[0])
        results.append((pieces, result))
        harness.watch.check()
    harness.same_for_every_chunking(results)


if __name__ == "__main__":
    harness.main(test_one)
