"""The ``spamd`` filter: every message is scored by SpamAssassin's daemon at the end of DATA.

It speaks spamc's protocol, ``SPAMC/1.5``: a ``SYMBOLS`` request with a
``Content-length`` header (and a ``User`` header when configured), a blank
line, then the message.  spamd answers ``SPAMD/1.1 0 EX_OK``, a header
``Spam: True ; 15.0 / 5.0`` (the verdict, the score and the required
score), a blank line, and the names of the rules that hit.  The message is
read from the spool in 64 KiB chunks only as fast as the connection takes
them, so a large message never sits in memory.

Options (every other key is refused):

- ``address``: where spamd listens, as a Twisted client endpoint string;
  default ``"tcp:host=127.0.0.1:port=783"``, or e.g.
  ``"unix:path=/run/spamd.sock"``.
- ``max_size``: messages larger than this many bytes are not scanned;
  default 512000, spamc's own default (SpamAssassin is slow on big
  messages, and spam is small).
- ``user``: the ``User`` spamd is told, whose preferences it applies
  (when it keeps per-user ones); by default none is sent.
- ``action``: what spamd's "this is spam" gets: ``"quarantine"`` (the
  default: delivered into the recipients' Quarantine folder),
  ``"tag"`` (delivered as usual, with the headers below) or ``"reject"``
  (550 5.7.1 "Message rejected as spam (score S)").
- ``reject_score``: at or above this score the message is rejected,
  whatever ``action`` says (spam so obvious that nobody wants to see it
  even in quarantine); by default only ``action`` decides.

Every scanned message that is let through gets, on top:

- ``X-Spam-Status: Yes, score=S required=R tests=RULE,RULE`` (``No, ...``
  for a clean one), as SpamAssassin writes it;
- ``X-Spam-Score: S``;
- ``X-Spam-Flag: YES`` too when it is spam, for mail clients' sorting rules.

A message larger than ``max_size`` is not sent to spamd and is let through
with no ``X-Spam-*`` header at all (like spamc, which passes such a message
on untouched): a ``No`` there could be read downstream as "scanned and
clean".  A line is logged instead.  A sender may write ``X-Spam-*`` headers
of its own: ours are on top, where mail clients look first.

A spamd that cannot be reached, answers with an error (anything but
``EX_OK``) or with something that is not spamd's protocol raises
:class:`SpamdError`: mailplat answers 451, or lets the message through
unscanned with ``on_error = "accept"``.  Start spamd with ``-L`` (local
tests only) when mail must not wait on DNS blocklists, and keep the
filter's ``timeout`` above spamd's worst scan time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.filters.daemon import connect, too_big
from mailplat.interfaces import BackendContext, Client, MessageFilter, SpooledMessage, Verdict
from mailplat.numerals import is_digits
from mailplat.options import OptionReader, toml_value

__all__ = ["SpamdError", "SpamdFilter", "SpamdResult", "build", "parse_response", "request_head"]

log = Logger()

DEFAULT_ADDRESS = "tcp:host=127.0.0.1:port=783"
DEFAULT_MAX_SIZE = 512000
ACTIONS = ("tag", "quarantine", "reject")

CHUNK_SIZE = 64 * 1024
# A SYMBOLS reply is a status line, two headers and one line of rule names.
MAX_REPLY = 64 * 1024
# X-Spam-Status stays one line well under RFC 5322's 998 characters.
MAX_TESTS_LENGTH = 600

_STATUS = re.compile(r"SPAMD/([0-9]+\.[0-9]+) +([0-9]+) *(.*)")
_SPAM = re.compile(r"(True|False|Yes|No) *; *(-?[0-9]+(?:\.[0-9]+)?) */ *(-?[0-9]+(?:\.[0-9]+)?)", re.I)
_RULE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# spamd refuses control characters in User; a space would be odd in a user name.
_USER = re.compile(r"[\x21-\x7e]{1,255}")


class SpamdError(Exception):
    """spamd gave no verdict: unreachable, an error reply, or something that is not spamd."""


@dataclass(frozen=True)
class SpamdResult:
    """spamd's answer about one message."""

    spam: bool
    score: float
    required: float
    tests: tuple[str, ...] = ()

    def status_header(self) -> str:
        """The ``X-Spam-Status`` value, in SpamAssassin's own words."""
        tests = ""
        for name in self.tests:
            if len(tests) + len(name) + 1 > MAX_TESTS_LENGTH:
                tests += ",..."
                break
            tests += ("," if tests else "") + name
        return f"{'Yes' if self.spam else 'No'}, score={score_text(self.score)} required={score_text(self.required)} tests={tests or 'none'}"


def score_text(score: float) -> str:
    """A score as SpamAssassin shows it, one decimal, and never "-0.0"."""
    return f"{round(score, 1) + 0.0:.1f}"


def request_head(size: int, user: str | None) -> bytes:
    """What goes before the message: the request line and headers of a SYMBOLS check."""
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {size}\r\n"
    if user:
        head += f"User: {user}\r\n"
    return (head + "\r\n").encode("ascii")


def parse_response(data: bytes, complete: bool = True) -> SpamdResult | None:
    """spamd's answer from the bytes received so far.

    None while more is needed (``complete`` false); once the connection has
    closed (``complete`` true) a partial answer is an error.  An error
    reply raises SpamdError as soon as its status line is in: it must never
    pass for a clean message.
    """
    line, newline, rest = data.partition(b"\n")
    if not newline:
        if complete:
            raise SpamdError(_unexpected("spamd closed the connection without a reply", data))
        if len(data) > 200:
            raise SpamdError(_unexpected("unexpected reply from spamd", data))
        return None
    status = _STATUS.fullmatch(line.rstrip(b"\r").decode("latin-1"))
    if status is None:
        raise SpamdError(_unexpected("unexpected reply from spamd", data))
    code, message = int(status.group(2)), status.group(3).strip()
    if code != 0:
        raise SpamdError(f"spamd could not check the message: {code} {_printable(message)}")

    if rest.startswith(b"\r\n") or rest.startswith(b"\n"):
        head, body = b"", rest.partition(b"\n")[2]
    else:
        head, blank, body = rest.partition(b"\r\n\r\n")
        if not blank:
            head, blank, body = rest.partition(b"\n\n")
        if not blank:
            if complete:
                raise SpamdError(_unexpected("spamd's reply ended in its headers", data))
            return None
    headers: dict[str, str] = {}
    for header in head.decode("latin-1").splitlines():
        name, colon, value = header.partition(":")
        if not colon:
            raise SpamdError(_unexpected("unexpected header in spamd's reply", header.encode("latin-1")))
        headers[name.strip().lower()] = value.strip()

    length_text = headers.get("content-length")
    if length_text is not None:
        if not is_digits(length_text):
            raise SpamdError(f"bad Content-length in spamd's reply: {_printable(length_text)!r}")
        length = int(length_text)
        if len(body) < length:
            if complete:
                raise SpamdError(f"spamd's reply ended after {len(body)} of {length} bytes")
            return None
        body = body[:length]
    elif not complete:
        # Without a length only the end of the connection ends the body.
        return None

    spam = _SPAM.fullmatch(headers.get("spam", ""))
    if spam is None:
        raise SpamdError(_unexpected("spamd's reply has no verdict", data))
    flag, score, required = spam.groups()
    tests = tuple(name for name in re.split(r"[\s,]+", body.decode("latin-1")) if _RULE.fullmatch(name))
    return SpamdResult(flag.lower() in ("true", "yes"), float(score), float(required), tests)


def _printable(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:200]


def _unexpected(what: str, data: bytes) -> str:
    return f"{what}: {data[:200]!r}" if data else what


@implementer(IPullProducer)
class _SymbolsRequest(Protocol):
    """One SYMBOLS check: the message out, spamd's answer back.

    The protocol is the transport's pull producer, so the next chunk is read
    only once the previous one has left the send buffer.  Exactly ``size``
    bytes are sent, as ``Content-length`` promised: a message that turns out
    shorter or longer fails the check rather than leave spamd waiting.
    """

    # A TCP or UNIX transport (Twisted's stubs say ITransport | None).
    transport: Any

    def __init__(self, head: bytes, stream: IO[bytes], size: int) -> None:
        self._head = head
        self._stream: IO[bytes] | None = stream
        self._size = size
        self._remaining = size
        self._received = b""
        self.result: defer.Deferred[SpamdResult] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.transport.write(self._head)
        # A pull producer: the transport asks for the first chunk at once.
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._stream is None:
            return
        try:
            chunk = self._stream.read(min(CHUNK_SIZE, self._remaining)) if self._remaining else b""
            if self._remaining and not chunk:
                raise SpamdError(f"the message ended after {self._size - self._remaining} of its {self._size} bytes")
            self._remaining -= len(chunk)
            if self._remaining == 0 and self._stream.read(1):
                raise SpamdError(f"the message is longer than its {self._size} bytes")
        except Exception as e:
            self._fail(e if isinstance(e, SpamdError) else SpamdError(f"cannot read the message: {e}"))
            return
        if chunk:
            self.transport.write(chunk)
        if self._remaining == 0:
            self._stop_sending()

    def stopProducing(self) -> None:
        self._stream = None

    def _stop_sending(self) -> None:
        if self._stream is not None:
            self._stream = None
            self.transport.unregisterProducer()

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self._received += data
        try:
            if len(self._received) > MAX_REPLY:
                raise SpamdError(_unexpected("spamd's reply is too long", self._received))
            result = parse_response(self._received, complete=False)
        except SpamdError as e:
            self._fail(e)
            return
        if result is not None:
            # spamd may answer before it has read everything (an error): stop sending then.
            self._stop_sending()
            self.transport.loseConnection()
            self.result.callback(result)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stream = None
        if self.result.called:
            return
        try:
            result = parse_response(self._received, complete=True)
        except SpamdError as e:
            if self._received:
                self.result.errback(e)
            else:
                self.result.errback(SpamdError(f"spamd closed the connection without a reply: {reason.getErrorMessage()}"))
            return
        assert result is not None, "parse_response(complete=True) returns a result or raises"
        self.result.callback(result)

    def _fail(self, error: SpamdError) -> None:
        self._stop_sending()
        self.transport.abortConnection()
        if not self.result.called:
            self.result.errback(error)

    def _cancel(self, result: defer.Deferred[SpamdResult]) -> None:
        # The filter's timeout: drop the connection; the result fails with CancelledError.
        self._stream = None
        if self.transport is not None:
            self.transport.abortConnection()


class SpamdFilter(MessageFilter):
    """Asks spamd about each message at the end of DATA."""

    owned_headers = ("X-Spam-Status", "X-Spam-Score", "X-Spam-Flag")

    def __init__(
        self, endpoint: Any, address: str, max_size: int, user: str | None, action: str, reject_score: float | None,
    ) -> None:
        self.endpoint = endpoint
        self.address = address
        self.max_size = max_size
        self.user = user
        self.action = action
        self.reject_score = reject_score

    async def check_data(self, client: Client, sender: str, recipients: tuple[str, ...], message: SpooledMessage) -> Verdict | None:
        if too_big("spamd", client, message, self.max_size, "not checked"):
            return None
        with message.open() as stream:
            request = _SymbolsRequest(request_head(message.size, self.user), stream, message.size)
            await connect(self.endpoint, request, "spamd", self.address, SpamdError)
            result = await request.result
        return self.verdict(result)

    def verdict(self, result: SpamdResult) -> Verdict:
        """What spamd's answer means under this filter's options."""
        if self.reject_score is not None and result.score >= self.reject_score:
            return Verdict.reject(f"Message rejected as spam (score {score_text(result.score)})")
        headers: tuple[tuple[str, str], ...] = (
            ("X-Spam-Status", result.status_header()),
            ("X-Spam-Score", score_text(result.score)),
        )
        if not result.spam:
            return Verdict.accept(headers)
        headers += (("X-Spam-Flag", "YES"),)
        if self.action == "reject":
            return Verdict.reject(f"Message rejected as spam (score {score_text(result.score)})")
        if self.action == "quarantine":
            return Verdict.quarantine(f"spam (score {score_text(result.score)}, required {score_text(result.required)})", headers)
        return Verdict.accept(headers)


def build(options: dict[str, Any], context: BackendContext) -> SpamdFilter:
    """Check the ``[[filter]]`` options and make the filter."""
    reader = OptionReader(options, "spamd", context=context)
    address, endpoint = reader.endpoint("address", DEFAULT_ADDRESS, example=f'"{DEFAULT_ADDRESS}" or "unix:path=/run/spamd.sock"')
    max_size = reader.integer("max_size", DEFAULT_MAX_SIZE, unit="of bytes")
    user_fix = 'e.g. user = "spamd", or leave it out to send none'
    user = reader.take("user", str, None, fix=user_fix)
    if user is not None and not _USER.fullmatch(user):
        raise reader.error("user", f"must be a user name of printable ASCII without spaces (at most 255), not {toml_value(user)}", user_fix)
    action = reader.choice("action", ACTIONS, "quarantine")
    reject_score = reader.number("reject_score", None, fix="e.g. reject_score = 15.0, or leave it out to let action decide alone")
    reader.finish()
    return SpamdFilter(endpoint, address, max_size, user, action, reject_score)
