"""The one SMTP-family client: relay to an MX or a smarthost (SMTP, RFC 5321)
and the last hop to a mailbox server (LMTP, RFC 2033).

Twisted's ESMTPClient reports one result for the whole transaction; we need
each recipient's reply, STARTTLS on our own terms, a streamed body and
limits on what a peer can make us hold.  So this is a plain Protocol that:

- reads replies within bounds: a line of at most ``MAX_REPLY_LINE``
  octets, a reply of at most ``MAX_REPLY_LINES`` lines, and at most
  ``MAX_UNASKED`` octets held while no command waits for a reply.  A line
  that is not a reply, or too much of one, is a ProtocolError: the
  connection is aborted and the command waiting (or the next one) fails
  with it.  Nothing a peer sends is buffered without limit;
- opens a session in steps that each user orders by its own policy:
  greeting, EHLO or LHLO (its extensions parsed from the reply's lines),
  STARTTLS with the TLS options given, AUTH PLAIN, which is never sent
  outside TLS;
- carries MAIL, RCPT..., DATA, pipelined in one write when the server
  offers PIPELINING (RFC 2920), the body streamed by DotStuffedSender,
  then one reply for the message (SMTP) or one per accepted recipient
  (LMTP, RFC 2033 4.2).

Time comes from the clock given (the reactor; ``task.Clock`` in tests).
Failures are ClientError subclasses whose text is for the log: each user
decides what its own peer is shown.

Connection reuse.  The client says whether a connection can carry another
transaction (``reusable()``: the last one ended in order, nothing arrived
unasked); keeping connections is left to its two users, because they keep
them differently.  The relay's SessionCache is keyed by destination host,
unbounded in number and bounded in uses per session; the LMTP backend's
pool has one destination, a hard limit on open connections and deliveries
waiting their turn.  One pool class for both would carry a limit and a
waiter queue the relay does not need, and per-host maps the LMTP backend
does not need; what they share (the connection and its state) is here.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from mailplat.wire.connections import set_no_delay
from mailplat.wire.dotstuff import DotStuffedSender
from mailplat.wire.sasl import plain_response

__all__ = [
    "printable_line",
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "MAX_UNASKED",
    "ClientError",
    "ConnectFailed",
    "ConnectionClosed",
    "IncompleteReplies",
    "InsecureLogin",
    "NoReply",
    "ProtocolError",
    "Reply",
    "SMTPClient",
    "StaleSession",
    "Stalled",
    "Timeouts",
    "connect",
]

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; be lenient, but bounded.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
# Replies held while no command waits for one (an idle session, the
# greeting before it is asked for): room for one reply of the largest
# size allowed, not for a peer that talks without end.
MAX_UNASKED = 512 * 1024

_REPLY_LINE = re.compile(r"[2-5][0-9][0-9](?:[ -]|\Z)")
_STATUS = re.compile(r"^([245]\.[0-9]{1,3}\.[0-9]{1,3})\b")
_UNSAFE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Reply:
    """One reply: its code and the text of each of its lines."""

    code: int
    lines: tuple[str, ...]

    @property
    def kind(self) -> int:
        """2, 3, 4 or 5: done, go on, try again later, never."""
        return self.code // 100

    @property
    def text(self) -> str:
        return " ".join(line for line in self.lines if line)

    @property
    def status(self) -> str:
        """The enhanced status code (RFC 3463) the reply starts with, else the one its class implies."""
        found = _STATUS.match(self.text)
        if found:
            return found.group(1)
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.kind, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ClientError(Exception):
    """The session cannot go on; the text says why, for the log."""


class ConnectFailed(ClientError):
    """No connection could be made."""


class ConnectionClosed(ClientError):
    """The connection closed while a reply was awaited or the message sent."""


class NoReply(ClientError):
    """No reply within the time allowed; the connection has been aborted."""


class ProtocolError(ClientError):
    """The peer sent what is not a reply, or too much of one; the connection has been aborted."""


class Stalled(ClientError):
    """The peer stopped reading the message; the connection has been aborted."""


class InsecureLogin(ClientError):
    """A login was asked for outside TLS: credentials are never sent in clear."""


class StaleSession(ClientError):
    """A kept connection turned out to be gone before the transaction's first
    reply: nothing was delivered, a new connection may start over."""


class IncompleteReplies(ClientError):
    """The message was sent, but not every reply to it came.

    ``replies`` has one entry per recipient: its reply when known, None for
    an accepted recipient whose fate after the message is unknown (with
    LMTP, those before it may have got the message: do not send it twice).
    """

    def __init__(self, replies: list[Reply | None], cause: ClientError) -> None:
        super().__init__(f"after the message was sent: {cause}")
        self.replies = replies
        self.cause = cause


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait (RFC 5321 4.5.3.2; the defaults are [relay]'s, in RelaySettings)."""

    command: float
    # The reply to DATA.
    data: float
    # The peer reading nothing of the message.
    data_block: float
    # The reply (with LMTP each reply) after the final dot.
    data_done: float

    @classmethod
    def every(cls, seconds: float) -> Timeouts:
        return cls(seconds, seconds, seconds, seconds)


def printable_line(text: str) -> str:
    """One line of printable ASCII: a peer's text goes into our logs."""
    return _UNSAFE.sub("?", text)


class SMTPClient(Protocol):
    """One connection to an SMTP (or, with ``lmtp``, LMTP) server: commands out, replies back in order."""

    # TCP or UNIX, maybe TLS: more than ITransport says (abortConnection, startTLS).
    transport: Any

    def __init__(self, clock: Any, lmtp: bool = False) -> None:
        self.clock = clock
        self.lmtp = lmtp
        # EHLO/LHLO keyword -> its parameters, from the last hello.
        self.extensions: dict[str, str] = {}
        self.tls = False
        # How many transactions it has begun; more than one means reused.
        self.transactions = 0
        self.closed = False
        # Fires once the connection is gone, whatever closed it.
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._buffer = b""
        self._lines: list[str] = []
        self._partial_size = 0
        # Complete replies nobody has asked for yet, with their size in octets.
        self._replies: collections.deque[tuple[Reply, int]] = collections.deque()
        self._held = 0
        self._waiting: defer.Deferred[Reply | ClientError] | None = None
        # Once set, every reply after those already read fails with it.
        self._end: ClientError | None = None
        self._clean = False

    # -- reading replies -----------------------------------------------------------

    def connectionMade(self) -> None:
        set_no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._end is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except ProtocolError as e:
            self._break(e)
        self._dispatch()
        if self._end is None and self._waiting is None and self._held + self._partial_size + len(self._buffer) > MAX_UNASKED:
            self._break(ProtocolError(f"more than {MAX_UNASKED} octets of replies no command asked for"), drop=True)

    def _parse(self) -> None:
        # An index into the buffer, not a slice per line: a chunk of many
        # short lines must not cost quadratic time.
        buffer, pos = self._buffer, 0
        try:
            while (end := buffer.find(b"\n", pos)) >= 0:
                raw, pos = buffer[pos:end], end + 1
                self._line(raw[:-1] if raw.endswith(b"\r") else raw)
        finally:
            self._buffer = buffer[pos:] if pos else buffer
        if len(self._buffer) > MAX_REPLY_LINE + 1:
            raise ProtocolError(f"a reply line longer than {MAX_REPLY_LINE} octets")

    def _line(self, raw: bytes) -> None:
        if len(raw) > MAX_REPLY_LINE:
            raise ProtocolError(f"a reply line longer than {MAX_REPLY_LINE} octets")
        line = raw.decode("utf-8", "replace")
        if not _REPLY_LINE.match(line):
            raise ProtocolError(f"not a reply: {printable_line(line)[:100]!r}")
        self._lines.append(line[4:].strip())
        self._partial_size += len(raw) + 2
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError(f"a reply of more than {MAX_REPLY_LINES} lines")
        if line[3:4] != "-":
            # RFC 5321 4.2.1 wants one code on every line; the last one counts.
            self._replies.append((Reply(int(line[:3]), tuple(self._lines)), self._partial_size))
            self._held += self._partial_size
            self._lines, self._partial_size = [], 0

    def _dispatch(self) -> None:
        while self._waiting is not None and (self._replies or self._end is not None):
            d, self._waiting = self._waiting, None
            d.callback(self._next())

    def _next(self) -> Reply | ClientError:
        if self._replies:
            reply, size = self._replies.popleft()
            self._held -= size
            return reply
        assert self._end is not None
        return self._end

    def _break(self, e: ClientError, drop: bool = False) -> None:
        """Read no more: replies already read are still handed out (unless ``drop``), then ``e``."""
        self._end = e
        self._buffer, self._lines, self._partial_size = b"", [], 0
        if drop:
            self._replies.clear()
            self._held = 0
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self._end is None:
            self._end = ConnectionClosed(f"the connection was closed: {reason.getErrorMessage()}")
        self._dispatch()
        self.lost.callback(None)

    async def reply(self, timeout: float) -> Reply:
        """The next reply; NoReply, ConnectionClosed or ProtocolError when none will come."""
        if self._replies or self._end is not None:
            item = self._next()
        else:
            assert self._waiting is None, "one reply awaited at a time"
            d: defer.Deferred[Reply | ClientError] = defer.Deferred()
            self._waiting = d
            d.addTimeout(timeout, self.clock)
            try:
                item = await d
            except defer.TimeoutError:
                self._break(NoReply(f"no reply within {timeout:g} seconds"), drop=True)
                item = self._next()
            finally:
                if self._waiting is d:
                    self._waiting = None
        if isinstance(item, ClientError):
            raise item
        return item

    def send(self, *lines: str) -> None:
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError(f"a command line holds a line break: {line!r}")
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    async def command(self, line: str, timeout: float) -> Reply:
        self.send(line)
        return await self.reply(timeout)

    # -- the session -------------------------------------------------------------------

    async def greeting(self, timeout: float) -> Reply:
        """The server's greeting (220 when it will talk to us)."""
        return await self.reply(timeout)

    async def hello(self, name: str, timeout: float) -> Reply:
        """EHLO (LMTP: LHLO) and the extensions it lists; a 5xx to EHLO is followed by HELO (RFC 5321 3.2)."""
        reply = await self.command(f"{'LHLO' if self.lmtp else 'EHLO'} {name}", timeout)
        self.extensions = {}
        if reply.code == 250:
            # The server's name, then one extension per line (RFC 5321 4.1.1.1).
            for line in reply.lines[1:]:
                keyword, _, parameters = line.partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = parameters
        elif reply.kind == 5 and not self.lmtp:
            reply = await self.command(f"HELO {name}", timeout)
        return reply

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    async def starttls(self, options: Any, timeout: float) -> Reply:
        """STARTTLS (RFC 3207); on 220 TLS starts with ``options``.  Say hello again afterwards."""
        reply = await self.command("STARTTLS", timeout)
        if reply.code != 220:
            return reply
        if self._replies or self._lines or self._buffer:
            # Read in clear, it would pass for an answer given inside TLS.
            e = ProtocolError("more text after the reply to STARTTLS, before TLS began")
            self._break(e, drop=True)
            raise e
        self.transport.startTLS(options)
        self.tls = True
        # RFC 3207 4.2: what the server said in clear no longer holds.
        self.extensions = {}
        return reply

    async def login(self, username: str, password: str, timeout: float) -> Reply:
        """AUTH PLAIN (RFC 4954) with the initial response; 235 when it worked.  InsecureLogin outside TLS."""
        if not self.tls:
            raise InsecureLogin("credentials are never sent without TLS, and TLS did not start")
        return await self.command("AUTH PLAIN " + plain_response(username, password).decode("ascii"), timeout)

    # -- the transaction -----------------------------------------------------------------

    async def transaction(
        self, sender: str, recipients: Sequence[str], open_message: Callable[[], IO[bytes]], timeouts: Timeouts,
        size: int | None = None,
    ) -> list[Reply]:
        """MAIL, RCPT..., DATA, the message and what was said of it: each recipient's reply, in order.

        A recipient refused at MAIL or RCPT keeps that refusal; an accepted
        one gets the refusal of DATA, else the reply to the message (with
        LMTP its own).  With PIPELINING the commands and DATA go out in one
        write; without it one by one, stopping at a refused MAIL and
        skipping DATA when no recipient was accepted.

        StaleSession when a reused connection is found gone (closed, silent
        or 421) at the first reply; IncompleteReplies when the message was
        sent and a reply to it did not come; else a ClientError.
        """
        reused = self.transactions > 0
        self.transactions += 1
        self._clean = False
        parameters = f" SIZE={size}" if size is not None and self.offers("SIZE") else ""
        commands = [f"MAIL FROM:<{sender}>{parameters}", *(f"RCPT TO:<{r}>" for r in recipients)]
        pipelining = self.offers("PIPELINING")
        if pipelining:
            self.send(*commands, "DATA")
        else:
            self.send(commands[0])
        try:
            mail = await self.reply(timeouts.command)
        except (ConnectionClosed, NoReply) as e:
            if reused:
                raise StaleSession(str(e)) from e
            raise
        if mail.code == 421 and reused:
            self.abort()
            raise StaleSession(str(mail))
        rcpts: list[Reply] = []
        for command in commands[1:]:
            if not pipelining:
                if mail.kind != 2:
                    break
                self.send(command)
            rcpts.append(await self.reply(timeouts.command))
        accepted = [i for i, r in enumerate(rcpts) if r.kind == 2] if mail.kind == 2 else []
        data: Reply | None = None
        if pipelining or accepted:
            if not pipelining:
                self.send("DATA")
            data = await self.reply(timeouts.data)
        replies = rcpts if mail.kind == 2 else [mail] * len(recipients)
        if not accepted:
            if data is not None and data.code == 354:
                await self._end_empty_message(timeouts)
            return replies
        assert data is not None
        if data.code != 354:
            return [data if i in accepted else r for i, r in enumerate(replies)]
        await self._send_message(open_message, timeouts)
        outcome: list[Reply | None] = [None if i in accepted else r for i, r in enumerate(replies)]
        try:
            if self.lmtp:
                # RFC 2033 4.2: one reply per accepted recipient, in RCPT order.
                for i in accepted:
                    outcome[i] = await self.reply(timeouts.data_done)
            else:
                final = await self.reply(timeouts.data_done)
                for i in accepted:
                    outcome[i] = final
        except ClientError as e:
            raise IncompleteReplies(outcome, e) from e
        done = [r for r in outcome if r is not None]
        # A 421 says the server is closing: nothing more goes on it.
        self._clean = not any(r.code == 421 for r in done)
        return done

    async def _end_empty_message(self, timeouts: Timeouts) -> None:
        """RFC 2920 3.1: DATA was accepted though no recipient was; end an empty message."""
        self.send(".")
        if self.lmtp:
            return  # no reply is due: no recipient was accepted
        try:
            await self.reply(timeouts.data_done)
        except ClientError:
            pass  # every recipient's fate is known already

    async def _send_message(self, open_message: Callable[[], IO[bytes]], timeouts: Timeouts) -> None:
        try:
            source = open_message()
        except BaseException:
            self.abort()
            raise
        try:
            await DotStuffedSender(source, self.transport, self.clock, timeouts.data_block).start()
        except defer.TimeoutError as e:
            raise Stalled(f"stopped reading the message: {e}") from None
        except error.ConnectionLost:
            raise ConnectionClosed("the connection was closed while the message was sent") from None

    # -- the end --------------------------------------------------------------------------

    def usable(self) -> bool:
        """Open, and nothing arrived that no command asked for (a 421 while idle, say)."""
        return (
            not self.closed and self._end is None and not self.transport.disconnecting
            and not self._replies and not self._lines and not self._buffer
        )

    def reusable(self) -> bool:
        """Ready for another transaction: the last one ended in order and the connection is usable."""
        return self._clean and self.usable()

    def quit(self) -> None:
        """Say goodbye (when the dialogue is in order) without waiting for the answer."""
        if self.closed:
            return
        if self.usable():
            self.send("QUIT")
        self.transport.loseConnection()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()


async def connect(endpoint: Any, make: Callable[[], SMTPClient], clock: Any, timeout: float) -> SMTPClient:
    """A client from ``make`` connected through ``endpoint``; ConnectFailed when that fails or takes over ``timeout`` seconds."""
    factory = Factory.forProtocol(make)
    factory.noisy = False
    connecting = endpoint.connect(factory)
    connecting.addTimeout(timeout, clock)
    try:
        client: SMTPClient = await connecting
    except defer.TimeoutError:
        raise ConnectFailed(f"no connection within {timeout:g} seconds") from None
    except Exception as e:
        raise ConnectFailed(str(e)) from e
    return client
