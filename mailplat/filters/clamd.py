"""The ``clamd`` filter: every message is scanned by ClamAV's daemon at the end of DATA.

The message goes to clamd with its ``INSTREAM`` command: ``zINSTREAM\\0``,
then chunks of at most 64 KiB, each preceded by its length (4 bytes, big
endian), then a zero length.  clamd answers ``stream: OK``, ``stream: NAME
FOUND``, or a text ending in ``ERROR``.  Chunks are read from the spooled
message only as fast as the connection takes them, so a large message never
sits in memory.

Options (every other key is refused):

- ``address``: where clamd listens, as a Twisted client endpoint string;
  default ``"unix:path=/var/run/clamav/clamd.ctl"`` (Debian's socket), or
  e.g. ``"tcp:127.0.0.1:3310"``.
- ``action``: what a virus gets: ``"reject"`` (the default; 550 5.7.1
  "Message rejected: virus found (NAME)") or ``"quarantine"`` (delivered
  into the recipients' Quarantine folder).
- ``max_size``: messages larger than this many bytes are not scanned;
  default 26214400 (25 MiB).

A clean message gets ``X-Virus-Scanned: clamd (HOSTNAME)``; a quarantined
one gets that and ``X-Virus: NAME``.  A message larger than ``max_size`` is
let through unscanned with no header at all (a header naming clamd could be
read downstream as "scanned"), and a line is logged.  Keep ``max_size`` at
or below clamd's own ``StreamMaxLength`` (25M by default as well): clamd
refusing a message as too large is a failure, never a clean result, so
mailplat answers 451 (or accepts unscanned with ``on_error = "accept"``).
A clamd that cannot be reached, or any other ERROR reply, fails the same way.
"""

from __future__ import annotations

import re
import struct
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.filters.daemon import connect, too_big
from mailplat.interfaces import BackendContext, Client, MessageFilter, SpooledMessage, Verdict
from mailplat.options import OptionReader

__all__ = ["ClamdError", "ClamdFilter", "build", "parse_reply"]

log = Logger()

DEFAULT_ADDRESS = "unix:path=/var/run/clamav/clamd.ctl"
DEFAULT_MAX_SIZE = 25 * 1024 * 1024
ACTIONS = ("reject", "quarantine")

CHUNK_SIZE = 64 * 1024
# clamd's replies are one short line; anything longer is not clamd.
MAX_REPLY = 4096

_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


class ClamdError(Exception):
    """clamd could not give a verdict: unreachable, an ERROR reply, or a garbled one."""


def parse_reply(reply: bytes) -> str | None:
    """The virus name from an INSTREAM reply, or None when the message is clean.

    Anything but ``OK`` or ``FOUND`` raises ClamdError: an error must never
    pass for a clean message.
    """
    text = reply.decode("utf-8", "replace").strip()
    if text.endswith("ERROR"):
        if "size limit" in text:
            raise ClamdError(
                f"clamd refused the message as too large ({text}); raise StreamMaxLength in clamd.conf "
                "to at least this filter's max_size, or lower max_size"
            )
        raise ClamdError(f"clamd could not scan the message: {text}")
    if text == "stream: OK":
        return None
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        name = text[len("stream: "):-len(" FOUND")].strip()
        # The name goes into a reply line and a header: printable ASCII only.
        return _UNPRINTABLE.sub("?", name)[:200] or "unknown"
    raise ClamdError(f"unexpected reply from clamd: {text[:200]!r}")


@implementer(IPullProducer)
class _Instream(Protocol):
    """One INSTREAM scan: the message out in length-prefixed chunks, one reply back.

    The protocol is the transport's pull producer, so the next chunk is read
    only once the previous one has left the send buffer.
    """

    # A TCP or UNIX transport (Twisted's stubs say ITransport | None).
    transport: Any

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream: IO[bytes] | None = stream
        self._received = b""
        self.reply: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.transport.write(b"zINSTREAM\0")
        # A pull producer: the transport asks for the first chunk at once.
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._stream is None:
            return
        chunk = self._stream.read(CHUNK_SIZE)
        if chunk:
            self.transport.writeSequence([struct.pack(">I", len(chunk)), chunk])
        else:
            self._stop_sending()
            self.transport.write(b"\0\0\0\0")

    def stopProducing(self) -> None:
        self._stream = None

    def _stop_sending(self) -> None:
        if self._stream is not None:
            self._stream = None
            self.transport.unregisterProducer()

    def dataReceived(self, data: bytes) -> None:
        if self.reply.called:
            return
        self._received += data
        reply, end, _ = self._received.partition(b"\0")
        if end:
            if self._stream is None:
                self.transport.loseConnection()
            else:
                # An answer before the end of the message (the size limit,
                # say): what is still to be sent is of no use to anyone.
                self._stop_sending()
                self.transport.abortConnection()
            self.reply.callback(reply)
        elif len(self._received) > MAX_REPLY:
            self._stop_sending()
            self.transport.abortConnection()
            self.reply.errback(ClamdError(f"unexpected reply from clamd: {self._received[:200]!r}..."))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stream = None
        if not self.reply.called:
            self.reply.errback(ClamdError(f"clamd closed the connection without a reply: {reason.getErrorMessage()}"))

    def _cancel(self, reply: defer.Deferred[bytes]) -> None:
        # The filter's timeout: drop the connection; the reply fails with CancelledError.
        self._stream = None
        if self.transport is not None:
            self.transport.abortConnection()


class ClamdFilter(MessageFilter):
    """Scans each message with clamd at the end of DATA."""

    owned_headers = ("X-Virus-Scanned", "X-Virus")

    def __init__(self, address: str, endpoint: Any, action: str, max_size: int, hostname: str) -> None:
        self.address = address
        self.endpoint = endpoint
        self.action = action
        self.max_size = max_size
        self.hostname = hostname

    async def check_data(self, client: Client, sender: str, recipients: tuple[str, ...], message: SpooledMessage) -> Verdict | None:
        if too_big("clamd", client, message, self.max_size):
            return None
        with message.open() as stream:
            protocol = _Instream(stream)
            await connect(self.endpoint, protocol, "clamd", self.address, ClamdError)
            reply = await protocol.reply
        virus = parse_reply(reply)
        scanned = ("X-Virus-Scanned", f"clamd ({self.hostname})")
        if virus is None:
            return Verdict.accept((scanned,))
        if self.action == "quarantine":
            return Verdict.quarantine(f"virus found ({virus})", (scanned, ("X-Virus", virus)))
        return Verdict.reject(f"Message rejected: virus found ({virus})")


def build(options: dict[str, Any], context: BackendContext) -> ClamdFilter:
    """Check the ``[[filter]]`` options and make the filter."""
    reader = OptionReader(options, "clamd", context=context)
    address, endpoint = reader.endpoint("address", DEFAULT_ADDRESS, example=f'"{DEFAULT_ADDRESS}" or "tcp:127.0.0.1:3310"')
    action = reader.choice("action", ACTIONS, "reject")
    max_size = reader.integer(
        "max_size", DEFAULT_MAX_SIZE, unit="of bytes", fix=f"e.g. max_size = {DEFAULT_MAX_SIZE} (no more than clamd's StreamMaxLength)",
    )
    reader.finish()
    return ClamdFilter(address, endpoint, action, max_size, context.hostname)
