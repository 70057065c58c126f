"""A POP3 session in memory: whatever a client sends, nothing escapes
dataReceived, no command ends as an "internal error", and the replies are
the same however the client's bytes are chunked (RFC 2449 6.6: a client may
pipeline any commands).

Input: a control line (split offsets; see harness.control), then what the
client sends.  alice@example.org (alice-password) has the messages below;
the session is on pop3s (TLS from the start).
"""

from __future__ import annotations

import harness

with harness.instrumented():
    from inprocess import Platform

# What alice's maildrop holds: lines that need dot-stuffing, one at the very
# start, a message without a final CRLF, an empty one, and one longer than
# the sender's 64 KiB chunk so that stuffing crosses a chunk boundary.
MESSAGES = [
    b"Subject: one\r\n\r\nfirst\r\n.\r\n..two dots\r\n",
    b".starts with a dot\r\n\r\nno final line end",
    b"",
    b"Subject: big\r\n\r\n" + b"".join(b".%05d\r\n" % i for i in range(9400)),
]


def session(pieces: list[bytes]) -> bytes:
    platform = Platform(failure_delay=2.0, max_failures=3)
    platform.mailboxes.stored["alice@example.org"] = list(MESSAGES)
    return harness.converse(platform.pop3(), platform.clock, pieces)


def test_one(data: bytes) -> None:
    _, cuts, stream = harness.control(data)
    results = []
    for pieces in harness.chunkings(stream, cuts):
        results.append((pieces, session(pieces)))
        harness.watch.check()
    harness.same_for_every_chunking(results)


if __name__ == "__main__":
    harness.main(test_one)
