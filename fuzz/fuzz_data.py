"""The DATA decoder (mailplat.smtp.receiving.DataDecoder) and dot-stuffing
(mailplat.wire.dotstuff.DotStuffedSender).

- The decoder makes the same of a DATA stream however it is chunked: where
  the message ends and what follows it, whether it refuses the message
  (size, line length, bare LF or CR, Received: count, header count), and
  for a message it accepts, the content it passes on, the header names it
  saw (as the add_headers hook got them) and the forged
  Authentication-Results fields it removed.
- A message sent by DotStuffedSender, read in pieces of any size, and
  decoded again is the message: stuffing never ends a message early, and
  un-stuffing gives back every byte.

Input: a control line (split offsets, and "limits" for small size and line
limits; see harness.control), then the stream after DATA's 354.
"""

from __future__ import annotations

import io
from typing import Any

import harness
from twisted.internet import task
from twisted.internet.testing import StringTransport

with harness.instrumented():
    from mailplat.smtp.receiving import DataDecoder
    from mailplat.wire.dotstuff import DotStuffedSender


def decode(pieces: list[bytes], small: bool) -> tuple[Any, ...]:
    sink = io.BytesIO()
    decoder = DataDecoder(
        sink, max_size=1500 if small else 1 << 30, max_line=78 if small else 1000, max_received=3,
        max_header_fields=6 if small else 1000,
    )
    decoder.authserv_id = b"mail.example.org"
    decoder.owned_fields = frozenset({b"x-spam-status:"})
    seen: list[bytes] = []

    def add_headers(names: set[bytes]) -> bytes:
        seen.append(b",".join(sorted(names)))
        return b"X-Added: yes\r\n"

    decoder.add_headers = add_headers
    after = None
    for i, piece in enumerate(pieces):
        rest = decoder.feed(piece)
        if rest is not None:
            after = rest + b"".join(pieces[i + 1 :])
            break
    if after is None:
        # The message has not ended: nothing is answered yet (an over-long
        # last line is still being dropped as it comes, so its size so far
        # depends on the reads).
        return (None,)
    if decoder.problem is None:
        decoder.finish()
    if decoder.problem is not None:
        # A refused message is thrown away: only the reply is seen, and it
        # must not depend on the chunks either.
        return (after, decoder.problem)
    return (after, None, sink.getvalue(), seen, decoder.removed_results)


class ShortReads:
    """A message source whose reads return the pieces given, one per read."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def read(self, size: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > size:
            self.pieces.insert(0, piece[size:])
            piece = piece[:size]
        return piece

    def close(self) -> None:
        pass


def round_trip(message: bytes, pieces: list[bytes]) -> None:
    clock = task.Clock()
    transport = StringTransport()
    done = DotStuffedSender(ShortReads(pieces), transport, clock).start()
    harness.drain(clock)
    if not done.called:
        raise harness.Crash("the sender never finished")
    sent = transport.value()
    sink = io.BytesIO()
    decoder = DataDecoder(sink, max_size=1 << 30, max_line=1 << 30, max_received=1 << 30)
    rest = decoder.feed(sent)
    expected = message if message.endswith(b"\r\n") or not message else message + b"\r\n"
    if rest != b"" or decoder.problem is not None or sink.getvalue() != expected:
        raise harness.Crash(
            f"dot-stuffing does not round-trip:\nmessage {message!r}\nsent    {sent!r}\n"
            f"decoded {sink.getvalue()!r}, rest {rest!r}, problem {decoder.problem}"
        )


def test_one(data: bytes) -> None:
    options, cuts, stream = harness.control(data)
    small = b"limits" in options
    results = [(pieces, decode(pieces, small)) for pieces in harness.chunkings(stream, cuts)]
    harness.same_for_every_chunking(results)
    # A message as a mailbox holds it: CRLF line ends only.
    message = stream.replace(b"\r", b"").replace(b"\n", b"\r\n")
    for pieces in harness.chunkings(message, cuts):
        round_trip(message, pieces)


if __name__ == "__main__":
    harness.main(test_one)
