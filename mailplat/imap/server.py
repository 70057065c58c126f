"""The IMAP server (RFC 3501, with RFC 9051's essentials) over IMessageStore.

Written on our CommandReader rather than as a subclass of Twisted's
``twisted.mail.imap4.IMAP4Server``, after reading the latter:

- it holds every literal it reads (a ``LiteralString`` up to 4 KiB, else a
  ``LiteralFile`` spooled to a temporary file only for APPEND) and announces
  no limit, so a client cannot learn the largest APPEND (RFC 7889), and it
  has no LITERAL+ (RFC 7888);
- it runs pipelined commands as they arrive (only FETCH holds the next
  one), each replying when its Deferred fires, so a slow command's untagged
  responses can land inside a later one's; its line reader is
  LineReceiver's, which drops the connection after a 16 KiB line instead of
  answering BAD (RFC 7162 4 asks servers to take 8 KiB and more);
- it has none of CONDSTORE/QRESYNC, MOVE, UIDPLUS, ENABLE, ESEARCH,
  LIST-EXTENDED or SPECIAL-USE, and keeps the MSN<->UID bookkeeping in the
  mailbox object (``IMailbox``), where it cannot be per session: two sessions
  on one folder need two numberings, and expunges must reach each only when
  RFC 3501 7.4.1 allows;
- it answers errors with ``str(failure.value)`` (``BAD Server error: ...``),
  which puts Python text on the wire.

Fixing those would have replaced most of it.  What we take from Twisted is
what is sound: its modified UTF-7 codec (``imap4-utf-7``, registered by
importing ``twisted.mail.imap4``) for folder names, ``startTLS``,
TimeoutMixin, and our TLSHandshakeDeadline.  CommandReader gives one command
at a time (the next waits for the tagged reply), raw mode for literals, the
output valve that stops reading from a client that does not read, and the
one place failures are caught.

Extensions: LITERAL+ (a non-synchronizing literal over the limit ends the
session, RFC 7888 4), APPENDLIMIT, SASL-IR, ID, ENABLE, IDLE (with a
keepalive line every two minutes), NAMESPACE, UIDPLUS, MOVE, UNSELECT,
CHILDREN, SPECIAL-USE, LIST-EXTENDED, LIST-STATUS, STATUS=SIZE, CONDSTORE,
QRESYNC, ESEARCH, QUOTA and UTF8=ACCEPT.

Each session keeps its own message numbering (the UIDs of the selected
folder, four octets a message) and learns what others changed by asking
the store's ``view`` before its replies and when ``watch`` calls during
IDLE: new UIDs are EXISTS, missing ones EXPUNGE (or VANISHED under QRESYNC)
when RFC 3501 7.4.1 allows, and a message whose modseq passed the last one
compared is an unsolicited FETCH of its flags.
"""

from __future__ import annotations

import array
import base64
import bisect
import calendar
import collections
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

import twisted.mail.imap4  # noqa: F401  # registers the "imap4-utf-7" codec (RFC 3501 5.1.3)
from twisted.cred import error
from twisted.internet import defer, protocol, task
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mailplat.config import IMAPSettings
from mailplat.cred import LoginBlocked, LoginGuard
from mailplat.ids import new_id
from mailplat.imap import fetch, search
from mailplat.imap.message import MessageParts
from mailplat.imap.parser import Announcement, FileLiteral, ParseError, Token, literal_announced, parse_command, quoted, tag_and_name
from mailplat.imap.sequences import SequenceSet
from mailplat.interfaces import (
    INBOX,
    Account,
    FolderExists,
    FolderView,
    IAccount,
    MessageInfo,
    NoSuchFolder,
    OverQuota,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)
from mailplat.mailquota import MailboxQuota
from mailplat.numerals import is_digits
from mailplat.ratelimit import TokenBuckets
from mailplat.plugins import call
from mailplat.wire import sasl
from mailplat.wire.connections import ConnectionCounter, TLSHandshakeDeadline, set_no_delay
from mailplat.wire.lines import CommandReader, describe_failure, printable
from mailplat.wire.pump import OutputPump

__all__ = ["IMAPFactory", "IMAPServer"]

log = Logger()

# Literals other than APPEND's message (a LOGIN password, a SEARCH string, a
# folder name) are held in memory: each at most this, and this many per command.
SMALL_LITERAL = 64 * 1024
MAX_LITERALS = 32
# An APPEND literal above this goes to a file as it arrives.
_SPOOL_ABOVE = 64 * 1024
_WRITE_BUFFER = 256 * 1024
# Seconds between "* OK Still here" lines during IDLE.
IDLE_KEEPALIVE = 120.0
# Messages a FETCH opens ahead of the one it is sending.
_OPEN_AHEAD = 8
# Messages whose MIME structure a session keeps (a client asks BODYSTRUCTURE, then a part).
_PARTS_CACHED = 8

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_UPPER = {f.upper(): f for f in SYSTEM_FLAGS}
# RFC 3501 9: a keyword is an atom without "\" or resp-specials.
_KEYWORD = re.compile(r"[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|}~]+")
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_DATE_TIME = re.compile(r"([ 0-9]?[0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})")
_STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "RECENT", "SIZE", "HIGHESTMODSEQ", "DELETED")


class BAD(Exception):
    """A command the server cannot parse or run in this state: tagged BAD, counted as an error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class NO(Exception):
    """A command that failed: tagged NO with an RFC 5530 response code when there is one."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.line = f"[{code}] {text}" if code else text


# --- small parsers of arguments ------------------------------------------------


def _text(token: Token, what: str = "argument") -> bytes:
    """An astring's octets (atom, quoted string or literal)."""
    if isinstance(token, str):
        return token.encode("utf-8")
    if isinstance(token, bytes):
        return token
    raise BAD(f"Expected a string as the {what}")


def _atom(token: Token, what: str) -> str:
    if not isinstance(token, str):
        raise BAD(f"Expected an atom as the {what}")
    return token


def _number(token: Token, what: str) -> int:
    if not isinstance(token, str) or not is_digits(token):
        raise BAD(f"Expected a number as the {what}")
    return int(token)


def _list(token: Token, what: str) -> list[Token]:
    if not isinstance(token, list):
        raise BAD(f"Expected a parenthesized list as the {what}")
    return token


def decode_name(raw: bytes, utf8: bool = False) -> str:
    """A folder name or pattern as the client wrote it: modified UTF-7 (RFC 3501 5.1.3),
    or UTF-8 once it enabled UTF8=ACCEPT (RFC 6855 3); raw UTF-8 is taken either way."""
    try:
        return raw.decode("utf-8") if utf8 or not raw.isascii() else raw.decode("imap4-utf-7")
    except UnicodeDecodeError:
        raise BAD("Invalid modified UTF-7 in the mailbox name" if raw.isascii() else "Invalid UTF-8 in the mailbox name")


def mailbox_name(token: Token, utf8: bool = False) -> str:
    """A folder name from the client, in Unicode, "INBOX" in any case."""
    raw = _text(token, "mailbox name")
    if not raw:
        raise BAD("Empty mailbox name")
    if b"\0" in raw or b"\r" in raw or b"\n" in raw:
        raise BAD("Invalid character in the mailbox name")
    name = decode_name(raw, utf8)
    if name.upper() == INBOX:
        return INBOX
    if name.upper().startswith(INBOX + "/"):
        return INBOX + name[len(INBOX):]
    return name


def wire_name(name: str, utf8: bool = False) -> str:
    """A folder name as a quoted string on the wire: modified UTF-7, or UTF-8 under UTF8=ACCEPT."""
    return quoted(name if utf8 else name.encode("imap4-utf-7").decode("ascii"))


def format_flags(flags: Iterable[str]) -> str:
    """A flag list; a keyword a store holds that is no IMAP atom (another tool's) is left out, as it could not be parsed."""
    flags = set(flags)
    system = [f for f in SYSTEM_FLAGS if f in flags]
    return "(" + " ".join(system + sorted(f for f in flags if f not in SYSTEM_FLAGS and _KEYWORD.fullmatch(f))) + ")"


def parse_flags(tokens: list[Token]) -> frozenset[str]:
    flags = set()
    for token in tokens:
        if not isinstance(token, str):
            raise BAD("A flag is an atom")
        if token.startswith("\\"):
            flag = _SYSTEM_UPPER.get(token.upper())
            if flag is None:
                if token.upper() == "\\RECENT":
                    continue  # RFC 3501 2.3.2: only the server sets \Recent
                raise BAD(f"Unknown system flag {printable(token, 30)}")
            flags.add(flag)
        elif _KEYWORD.fullmatch(token) and len(token) <= 100:
            flags.add(token)
        else:
            raise BAD(f"Invalid keyword {printable(token, 30)}")
    return frozenset(flags)


def parse_date_time(value: bytes) -> float:
    """RFC 3501 date-time ("17-Jul-1996 02:44:25 -0700") as seconds since the epoch."""
    m = _DATE_TIME.fullmatch(value.decode("ascii", "replace"))
    if m is None or m.group(2).capitalize() not in _MONTHS:
        raise BAD("Invalid date-time; e.g. \"17-Jul-1996 02:44:25 -0700\"")
    day, month, year, hh, mm, ss, sign, zh, zm = m.groups()
    try:
        stamp = calendar.timegm((int(year), _MONTHS[month.capitalize()], int(day), int(hh), int(mm), int(ss), 0, 0, 0))
        time.gmtime(stamp)
    except (ValueError, OverflowError):
        raise BAD("Invalid date-time")
    offset = (int(zh) * 3600 + int(zm) * 60) * (1 if sign == "+" else -1)
    return float(stamp - offset)


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """UID ranges ("1:3,7") without listing each number (a gap may hold millions)."""
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges)


def gaps(present: Sequence[int], last: int) -> list[tuple[int, int]]:
    """The UID ranges in 1..last that hold no message of ``present`` (sorted)."""
    found, expected = [], 1
    for uid in present:
        if uid > last:
            break
        if uid > expected:
            found.append((expected, uid - 1))
        expected = uid + 1
    if expected <= last:
        found.append((expected, last))
    return found


def one_line(text: str, default: str) -> str:
    """A backend's text as the rest of a response line: no line ends or other controls, 200 characters at most."""
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in text[:200]).split())
    return cleaned or default


def _upper_atoms(tokens: list[Token], what: str) -> list[str]:
    return [_atom(t, what).upper() for t in tokens]


# --- output -----------------------------------------------------------------


class _LiteralSink:
    """Where one literal's octets go as they arrive: memory, or a file for a large APPEND.

    A file that cannot be written (a full disk) is given up, and the rest of
    the literal read and dropped, so that it is not taken for commands;
    ``error`` then says why.
    """

    def __init__(self, size: int, path: str) -> None:
        self.remaining = size
        self.size = size
        self.path = path
        self.error = ""
        self._memory = bytearray() if not path else None
        self._file: IO[bytes] | None = open(path, "xb", buffering=_WRITE_BUFFER) if path else None

    def write(self, data: bytes) -> None:
        self.remaining -= len(data)
        if self._memory is not None:
            self._memory += data
        elif self._file is not None:
            try:
                self._file.write(data)
            except OSError as e:
                self.error = e.strerror or str(e)
                self.discard()

    def finish(self) -> bytes | FileLiteral:
        if self._memory is not None:
            return bytes(self._memory)
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                self.error = e.strerror or str(e)
            self._file = None
        if self.error:
            self.discard()
            return b""
        return FileLiteral(self.path, self.size)

    def discard(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # what it still held is thrown away with it
        if self.path:
            _unlink(self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- the session ----------------------------------------------------------------

# Commands, by the state they are valid in.
_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_NOT_AUTHENTICATED = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
_AUTHENTICATED = {
    "ENABLE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
    "STATUS", "APPEND", "NAMESPACE", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA", "IDLE",
}
_SELECTED = {"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID"}
_UID_COMMANDS = {"FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE"}
# RFC 3501 7.4.1: no EXPUNGE while a command that uses message numbers runs.
_NO_EXPUNGE_DURING = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE"}


class IMAPServer(CommandReader, TLSHandshakeDeadline, TimeoutMixin, protocol.Protocol):
    """One IMAP session: the command loop, the login, and the selected folder's numbering."""

    def __init__(self, factory: IMAPFactory) -> None:
        self.factory = factory
        self.settings: IMAPSettings = factory.settings
        self.store = factory.store
        self.clock = factory.clock
        self.timeOut = self.settings.idle_timeout  # type: ignore[assignment]  # any number of seconds works
        self.callLater = factory.clock.callLater  # type: ignore[method-assign]
        self.max_command_line = self.settings.max_line_length
        self.session = new_id()
        self.peer = ""
        self.tls = factory.implicit_tls
        self.account: Account | None = None
        self._logout: Callable[[], Any] | None = None
        self._counted = False
        self._user_counted: tuple[str, str] | None = None
        self._errors = 0
        self.condstore = False
        self.qresync = False
        self.utf8 = False  # RFC 6855 UTF8=ACCEPT
        # The command being read: its lines and literals, and the literal being read.
        self._pieces: list[bytes | FileLiteral] = []
        self._line_octets = 0
        self._literal: _LiteralSink | None = None
        self._spool_failed = False
        self._tag = ""
        # AUTHENTICATE in progress: (tag, exchange).
        self._sasl: tuple[str, sasl.SASLExchange] | None = None
        # IDLE in progress: its tag; and a change to report while it runs.
        self._idle_tag: str | None = None
        self._keepalive: Any = None
        self._syncing: defer.Deferred[None] | None = None
        self._sync_again = False
        # The selected folder.
        self.folder: str | None = None
        self.readonly = False
        # MSN - 1 -> UID: all a session keeps per message (4 octets), so that
        # a thousand sessions idling on big folders stay small.  What the
        # client knows of flags is what changed since _modseq, the folder's
        # highest_modseq when last compared.
        self.uids = array.array("I")
        self._modseq = 0
        # Messages this session reported itself since (STORE, FETCH setting
        # \Seen): uid -> modseq, not to be reported again.
        self._reported: dict[int, int] = {}
        self._uidnext = 0
        self._uidvalidity = 0
        self._stale = False  # messages gone from the store, not yet announced (RFC 3501 7.4.1)
        self._unwatch: Callable[[], None] | None = None
        self._parts_cache: dict[tuple[str, int], MessageParts] = {}
        # The folder's view a command read, for the updates after it (see _present).
        self._fresh_view: FolderView | None = None

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = getattr(self.transport.getPeer(), "host", "unknown")
        if self.factory.implicit_tls:
            self.expect_tls_handshake(self.clock, self.settings.tls_handshake_timeout)
        refusal = self.factory.connections.admit(self.peer)
        if refusal:
            self._send(f"* BYE [UNAVAILABLE] {refusal}, try again later")
            self.transport.loseConnection()
            return
        self._counted = True
        set_no_delay(self.transport)
        log.info("{session} imap connect from {peer}", session=self.session, peer=self.peer)
        self._send(f"* OK [CAPABILITY {' '.join(self.capabilities())}] mailplat IMAP ready")
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        self._stop_keepalive()
        self.forget_tls_handshake()
        self._drop_literal()
        self._deselect()
        if self._user_counted is not None:
            key, self._user_counted = self._user_counted, None
            self.factory.user_connections[key] -= 1
            if self.factory.user_connections[key] <= 0:
                del self.factory.user_connections[key]
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        if self._counted:
            self._counted = False
            self.factory.connections.release(self.peer)
            log.info("{session} imap disconnect from {peer}", session=self.session, peer=self.peer)

    def tls_handshake_timed_out(self) -> None:
        log.info("{session} imap TLS handshake from {peer} not finished within {seconds:g} s, closing",
                 session=self.session, peer=self.peer, seconds=self.settings.tls_handshake_timeout)

    def timeoutConnection(self) -> None:
        log.info("{session} imap idle for too long, closing ({peer})", session=self.session, peer=self.peer)
        self._send("* BYE Autologout; idle for too long")
        self._close()

    def _close(self) -> None:
        if self.output_blocked:
            # The client does not read: a clean close would wait for it forever.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _send(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\r\n")

    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1"]
        if not self.tls and self.factory.tls is not None:
            caps.append("STARTTLS")
        if not self.tls:
            caps.append("LOGINDISABLED")
        elif self.account is None:
            caps += [f"AUTH={m}" for m in sasl.MECHANISMS] + ["SASL-IR"]
        caps += [
            "LITERAL+", f"APPENDLIMIT={self.settings.max_message_size}", "ID", "ENABLE", "IDLE", "NAMESPACE",
            "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS", "STATUS=SIZE",
            "CONDSTORE", "QRESYNC", "ESEARCH", "QUOTA", "QUOTA=RES-STORAGE", "UTF8=ACCEPT",
        ]
        return caps

    # -- input (CommandReader hooks) ------------------------------------------

    def line_too_long(self) -> None:
        self._drop_literal()
        self._invalid("*", f"Command line too long (limit {self.max_command_line} octets)")

    def bare_newline(self) -> None:
        self._drop_literal()
        self._invalid("*", "Command lines must end with CRLF, not a bare LF")

    def cross_protocol_request(self, verb: str) -> None:
        log.info("{session} imap cross-protocol request from {peer}: {verb} as a command, closing",
                 session=self.session, peer=self.peer, verb=verb)
        self._send("* BYE This is an IMAP server, not an HTTP one")
        self.transport.loseConnection()

    def reading_raw(self) -> bool:
        return self._literal is not None

    def raw_received(self, data: bytes) -> bytes | None:
        sink = self._literal
        assert sink is not None
        if len(data) < sink.remaining:
            sink.write(data)
            return None
        n = sink.remaining
        sink.write(data[:n])
        return data[n:]

    def raw_ended(self) -> None:
        sink, self._literal = self._literal, None
        assert sink is not None
        self._pieces.append(sink.finish())
        if sink.error:
            log.error("{session} imap cannot spool a message to {path}: {error}", session=self.session, path=sink.path, error=sink.error)
            self._spool_failed = True

    def _drop_literal(self) -> None:
        self._spool_failed = False
        sink, self._literal = self._literal, None
        if sink is not None:
            sink.discard()
        for piece in self._pieces:
            if isinstance(piece, FileLiteral):
                _unlink(piece.path)
        self._pieces, self._line_octets = [], 0

    def command_received(self, line: bytes) -> Any:
        if self._sasl is not None:
            return self._sasl_step(line)
        if self._idle_tag is not None:
            return self._idle_line(line)
        if not self._pieces and not line.strip():
            return self._invalid("*", "Empty command line")
        if b"\0" in line:
            first_line = self._pieces[0] if self._pieces else line
            assert isinstance(first_line, bytes)
            tag = tag_and_name(first_line)[0] or "*"
            self._drop_literal()
            return self._invalid(tag, "NUL character in the command")
        self._line_octets += len(line) + 2
        self._pieces.append(line)
        first = self._pieces[0]
        assert isinstance(first, bytes)
        tag, name = tag_and_name(first)
        if self._line_octets > self.max_command_line:
            self._drop_literal()
            return self._invalid(tag or "*", f"Command too long (limit {self.max_command_line} octets outside literals)")
        announced = literal_announced(line)
        if announced is not None:
            return self._literal_announced(tag or "*", name, announced)
        pieces, self._pieces, self._line_octets = self._pieces, [], 0
        if self._spool_failed:
            self._spool_failed = False
            self._remove_files(pieces)
            self._send(f"{tag or '*'} NO [UNAVAILABLE] The message could not be received; try again later")
            return None
        try:
            command = parse_command(pieces)
        except ParseError as e:
            self._remove_files(pieces)
            return self._invalid(e.tag or "*", e.text)
        def run(_: object) -> defer.Deferred[None]:
            return defer.Deferred.fromCoroutine(self._run(command.tag, command.name, command.arguments, pieces))

        # [imap] max_commands_per_minute: a user (an address before login) over
        # its rate waits for its turn; CommandReader holds what follows meanwhile.
        wait = self.factory.command_rate.delay(self.account.address if self.account is not None else self.peer)
        if wait:
            return task.deferLater(self.factory.clock, wait, lambda: None).addCallback(run)
        return run(None)

    def _literal_announced(self, tag: str, name: str, announced: Announcement) -> None:
        """A line ends with {n}: refuse it now, unread, or start reading its octets."""
        literals = sum(1 for p in self._pieces if not isinstance(p, bytes)) + 1
        limit = self.settings.max_message_size if name == "APPEND" else SMALL_LITERAL
        refusal = ""
        if literals > MAX_LITERALS:
            refusal = f"Too many literals in one command (limit {MAX_LITERALS})"
        elif announced.size > limit:
            refusal = f"Literal too big (limit {limit} octets{' for a message' if name == 'APPEND' else ''})"
        if refusal:
            self._drop_literal()
            if not announced.synchronizing:
                # RFC 7888 4: its octets are on their way and would be read
                # as commands: the session cannot go on.
                log.info("{session} imap non-synchronizing literal of {size} octets from {peer} refused, closing",
                         session=self.session, size=announced.size, peer=self.peer)
                self._send(f"{tag} {'NO [TOOBIG]' if name == 'APPEND' else 'BAD'} {refusal}")
                self._send("* BYE Literal refused; closing the connection")
                self._close()
                return
            if name == "APPEND" and literals <= MAX_LITERALS:
                self._send(f"{tag} NO [TOOBIG] {refusal}")
                return
            self._invalid(tag, refusal)
            return
        path = ""
        if name == "APPEND" and announced.size > _SPOOL_ABOVE:
            path = os.path.join(self.factory.spool_dir, f"imap-{self.session}-{new_id()}")
        try:
            self._literal = _LiteralSink(announced.size, path)
        except OSError as e:
            log.error("{session} imap cannot spool a message to {path}: {error}", session=self.session, path=path, error=e.strerror)
            self._drop_literal()
            self._send(f"{tag} NO [UNAVAILABLE] The message cannot be received now; try again later")
            if not announced.synchronizing:
                self._send("* BYE The message cannot be received now; closing the connection")
                self._close()
            return
        if announced.synchronizing:
            self._send("+ Ready for literal data")
        if announced.size == 0:
            # Nothing to read: the command goes on with its next line.
            self.raw_ended()

    def _remove_files(self, pieces: list[bytes | FileLiteral]) -> None:
        for piece in pieces:
            if isinstance(piece, FileLiteral):
                _unlink(piece.path)

    def _invalid(self, tag: str, text: str) -> None:
        """BAD for an invalid command; the one that reaches the limit ends the session (as Dovecot does)."""
        self._errors += 1
        limit = self.settings.max_errors if self.account is not None else self.settings.max_errors_before_login
        self._send(f"{tag} BAD {text}")
        if self._errors >= limit:
            log.info("{session} imap too many invalid commands from {peer}, closing", session=self.session, peer=self.peer)
            self._send("* BYE Too many invalid commands")
            self._close()

    def command_failed(self, failure: Failure) -> None:
        """A bug outside a command's own handling: logged in one line, never shown."""
        log.error("{session} imap internal error: {error}", session=self.session, error=describe_failure(failure))
        self._drop_literal()
        self._send(f"{self._tag or '*'} NO [SERVERBUG] Internal error, try again later")

    # -- running a command -----------------------------------------------------

    async def _run(
        self, tag: str, name: str, args: list[Token], pieces: list[bytes | FileLiteral], handler: Callable[..., Any] | None = None,
    ) -> None:
        """One command, start to tagged reply: every refusal and store failure is mapped here."""
        self._tag = tag
        self._fresh_view = None
        uid = False
        if name == "UID" and self.folder is not None and self.account is not None:
            if not args or not isinstance(args[0], str) or args[0].upper() not in _UID_COMMANDS:
                self._remove_files(pieces)
                return self._invalid(tag, "UID must be followed by FETCH, SEARCH, STORE, COPY, MOVE or EXPUNGE")
            name, args, uid = args[0].upper(), args[1:], True
        try:
            if handler is None:
                handler = self._handler(name)
            text = await handler(tag, args, uid)
            if self.folder is not None and self._idle_tag is None and not self.transport.disconnecting:
                try:
                    await self._sync(expunges=uid or name not in _NO_EXPUNGE_DURING)
                except Exception:
                    # The command itself is done (an APPEND stored): its OK
                    # must not turn into a NO the client would retry; the
                    # updates come with the next command.
                    log.error("{session} imap update after {command} failed: {error}",
                              session=self.session, command=name, error=describe_failure(Failure()))
        except BAD as e:
            return self._invalid(tag, e.text)
        except NO as e:
            self._send(f"{tag} NO {e.line}")
        except NoSuchFolder as e:
            self._send(f"{tag} NO [NONEXISTENT] {one_line(e.text, 'No such mailbox')}")
        except FolderExists as e:
            self._send(f"{tag} NO [ALREADYEXISTS] {one_line(e.text, 'Mailbox exists')}")
        except OverQuota as e:
            self._send(f"{tag} NO [OVERQUOTA] {one_line(e.text, 'Over quota')}")
        except PermanentFailure as e:
            self._send(f"{tag} NO {one_line(e.text, 'Refused')}")
        except TemporaryFailure as e:
            self._send(f"{tag} NO [UNAVAILABLE] {one_line(e.text, 'Try again later')}")
        except (ConnectionLost, defer.CancelledError):
            pass
        except Exception:
            log.error("{session} imap {command} failed: {error}", session=self.session, command=name, error=describe_failure(Failure()))
            self._send(f"{tag} NO [SERVERBUG] Internal error, try again later")
        else:
            if text is not None and not self.transport.disconnecting:
                self._send(f"{tag} OK {text}")
        finally:
            self._remove_files(pieces)

    def _handler(self, name: str) -> Callable[[str, list[Token], bool], Any]:
        if name in _ANY:
            pass
        elif name in _NOT_AUTHENTICATED:
            if self.account is not None:
                raise BAD(f"{name} is not valid once logged in")
        elif name in _AUTHENTICATED or name in _SELECTED:
            if self.account is None:
                raise BAD(f"{name} is valid only after LOGIN or AUTHENTICATE")
            if name in _SELECTED and self.folder is None:
                raise BAD(f"{name} is valid only with a mailbox selected")
        else:
            raise BAD(f"Unknown command {printable(name, 20)}")
        method: Callable[[str, list[Token], bool], Any] = getattr(self, "do_" + name)
        return method

    # -- any state -------------------------------------------------------------

    async def do_CAPABILITY(self, tag: str, args: list[Token], uid: bool) -> str:
        self._send("* CAPABILITY " + " ".join(self.capabilities()))
        return "CAPABILITY completed"

    async def do_NOOP(self, tag: str, args: list[Token], uid: bool) -> str:
        return "NOOP completed"

    async def do_LOGOUT(self, tag: str, args: list[Token], uid: bool) -> None:
        self._send("* BYE Logging out")
        self._send(f"{tag} OK LOGOUT completed")
        if self.account is not None:
            log.info("{session} imap logout {user}", session=self.session, user=self.account.address)
        self._deselect()
        self.transport.loseConnection()

    async def do_ID(self, tag: str, args: list[Token], uid: bool) -> str:
        # RFC 2971: the client's own ID is not needed; ours names no version.
        if len(args) != 1 or not (isinstance(args[0], list) or args[0] == "NIL"):
            raise BAD("Syntax: ID (field value ...) or ID NIL")
        if isinstance(args[0], list):
            fields = args[0]
            named = {_text(fields[i]).decode("utf-8", "replace").lower(): fields[i + 1] for i in range(0, len(fields) - 1, 2)}
            said = " ".join(f"{key}={printable(_text(value), 40)}" for key, value in named.items()
                            if key in ("name", "version", "os") and isinstance(value, (str, bytes)) and value != "NIL")
            if said:
                log.info("{session} imap client {said}", session=self.session, said=said)
        self._send('* ID ("name" "mailplat")')
        return "ID completed"

    # -- not authenticated -------------------------------------------------------

    async def do_STARTTLS(self, tag: str, args: list[Token], uid: bool) -> None:
        if self.tls:
            raise BAD("TLS is already active")
        if self.factory.tls is None:
            raise NO("STARTTLS is not available")
        self._send(f"{tag} OK Begin TLS negotiation now")
        # RFC 3501 6.2.1: nothing the client sent in clear after STARTTLS is
        # read as a command inside TLS (CVE-2011-0411's IMAP twin).
        self.discard_pending_input()
        self.transport.startTLS(self.factory.tls)
        self.expect_tls_handshake(self.clock, self.settings.tls_handshake_timeout)
        self.tls = True

    def _require_tls(self) -> None:
        if not self.tls:
            raise NO("Logins are disabled without TLS; use STARTTLS first", "PRIVACYREQUIRED")

    async def do_LOGIN(self, tag: str, args: list[Token], uid: bool) -> str:
        self._require_tls()
        if len(args) != 2:
            raise BAD("Syntax: LOGIN user password")
        user, password = (_text(a).decode("utf-8", "replace") for a in args)
        return await self._login(user, password)

    async def do_AUTHENTICATE(self, tag: str, args: list[Token], uid: bool) -> str | None:
        if not 1 <= len(args) <= 2:
            raise BAD("Syntax: AUTHENTICATE mechanism [initial-response]")
        self._require_tls()
        try:
            exchange = sasl.start(_atom(args[0], "mechanism"))
        except sasl.SASLError:
            raise NO(f"Unsupported mechanism {printable(_atom(args[0], 'mechanism'), 20)}; use {' or '.join(sasl.MECHANISMS)}")
        if len(args) == 2:
            # RFC 4959 SASL-IR.
            return await self._sasl_respond(exchange, _text(args[1]))
        self._sasl = (tag, exchange)
        self._challenge(exchange)
        return None

    def _challenge(self, exchange: sasl.SASLExchange) -> None:
        self.transport.write(b"+ " + base64.b64encode(exchange.challenge) + b"\r\n")

    def _sasl_step(self, line: bytes) -> defer.Deferred[None]:
        assert self._sasl is not None
        tag, exchange = self._sasl
        self._sasl = None

        async def step() -> str | None:
            return await self._sasl_respond(exchange, line, tag)

        return defer.Deferred.fromCoroutine(self._run_step(tag, step))

    async def _run_step(self, tag: str, step: Callable[[], Any]) -> None:
        """A continuation line of AUTHENTICATE: its outcome is the command's reply."""

        async def handler(_tag: str, _args: list[Token], _uid: bool) -> Any:
            return await step()

        await self._run(tag, "AUTHENTICATE", [], [], handler)

    async def _sasl_respond(self, exchange: sasl.SASLExchange, line: bytes, tag: str = "") -> str | None:
        try:
            credentials = exchange.respond(line)
        except sasl.SASLError as e:
            if e.why is sasl.Why.CANCELLED:
                raise BAD("AUTHENTICATE cancelled")
            raise NO(e.text, "AUTHENTICATIONFAILED" if e.why is sasl.Why.AUTHZID else "")
        if credentials is None:
            self._sasl = (tag or self._tag, exchange)
            self._challenge(exchange)
            return None
        return await self._login(credentials.username, credentials.password)

    async def _login(self, user: str, password: str) -> str:
        try:
            account, logout = await self.factory.login_guard.login(self.peer, user, password, IAccount)
        except LoginBlocked as blocked:
            log.info("{session} imap login refused: {peer} is blocked", session=self.session, peer=self.peer)
            raise NO(f"Too many failed logins from your address; try again in {int(blocked.seconds) + 1} seconds", "UNAVAILABLE")
        except error.UnauthorizedLogin:
            log.info("{session} imap login failed for {user!r} from {peer}", session=self.session, user=user[:100], peer=self.peer)
            raise NO("Authentication failed", "AUTHENTICATIONFAILED")
        if self.transport.disconnecting:
            logout()
            return "Logged in"
        key = (account.address, self.peer)
        if self.factory.user_connections[key] >= self.settings.max_connections_per_user_ip:
            logout()
            log.info("{session} imap login refused for {user}: too many sessions from {peer}",
                     session=self.session, user=account.address, peer=self.peer)
            raise NO(f"Too many sessions for this user from your address (limit {self.settings.max_connections_per_user_ip})", "LIMIT")
        self.factory.user_connections[key] += 1
        self._user_counted = key
        self._logout = logout
        self.account = account
        self._errors = 0
        try:
            # The special-use folders are made at the first call (RFC 6154).
            await call(self.store.folders, account)
        except Exception:
            log.error("{session} imap folders of {user} failed: {error}", session=self.session, user=account.address, error=describe_failure(Failure()))
        log.info("{session} imap login {user} from {peer}", session=self.session, user=account.address, peer=self.peer)
        return f"[CAPABILITY {' '.join(self.capabilities())}] Logged in"

    # -- authenticated -----------------------------------------------------------

    @property
    def _account(self) -> Account:
        assert self.account is not None
        return self.account

    async def do_ENABLE(self, tag: str, args: list[Token], uid: bool) -> str:
        if not args:
            raise BAD("Syntax: ENABLE capability ...")
        enabled = []
        for name in _upper_atoms(args, "capability"):
            if name == "CONDSTORE" and not self.condstore:
                self.condstore = True
                enabled.append(name)
            elif name == "QRESYNC" and not self.qresync:
                # RFC 7162 3.2.3: QRESYNC implies CONDSTORE.
                self.qresync = self.condstore = True
                enabled.append(name)
            elif name == "UTF8=ACCEPT" and not self.utf8:
                # RFC 6855: folder names in UTF-8 from now on, and UTF-8 in headers.
                self.utf8 = True
                enabled.append(name)
        self._send("* ENABLED" + "".join(" " + e for e in enabled))
        return "ENABLE completed"

    async def do_NAMESPACE(self, tag: str, args: list[Token], uid: bool) -> str:
        self._send('* NAMESPACE (("" "/")) NIL NIL')
        return "NAMESPACE completed"

    async def do_SELECT(self, tag: str, args: list[Token], uid: bool) -> str:
        return await self._select(args, readonly=False)

    async def do_EXAMINE(self, tag: str, args: list[Token], uid: bool) -> str:
        return await self._select(args, readonly=True)

    async def _select(self, args: list[Token], readonly: bool) -> str:
        if not 1 <= len(args) <= 2:
            raise BAD("Syntax: SELECT mailbox [(CONDSTORE | QRESYNC (...))]")
        name = mailbox_name(args[0], self.utf8)
        qresync: tuple[int, int, SequenceSet | None] | None = None
        if len(args) == 2:
            params = _list(args[1], "SELECT parameters")
            i = 0
            while i < len(params):
                param = _atom(params[i], "SELECT parameter").upper()
                if param == "CONDSTORE":
                    self.condstore = True
                elif param == "QRESYNC" and i + 1 < len(params):
                    if not self.qresync:
                        raise BAD("QRESYNC must be enabled first (ENABLE QRESYNC)")
                    qresync = self._qresync_parameters(_list(params[i + 1], "QRESYNC parameters"))
                    i += 1
                else:
                    raise BAD(f"Unknown SELECT parameter {printable(param, 20)}")
                i += 1
        if self.folder is not None:
            self._deselect()
            # RFC 7162 3.2.11: the previous mailbox is closed.
            self._send("* OK [CLOSED] Previous mailbox closed")
        view: FolderView = await call(self.store.view, self._account, name)
        self.folder, self.readonly = name, readonly
        self._take(view)
        flags = set(SYSTEM_FLAGS)
        for m in view.messages:
            flags.update(m.flags)
        self._send(f"* FLAGS {format_flags(flags)}")
        self._send("* OK [PERMANENTFLAGS ()] Read-only mailbox" if readonly else
                   f"* OK [PERMANENTFLAGS {format_flags(flags)[:-1]} \\*)] Flags permitted")
        self._send(f"* {len(self.uids)} EXISTS")
        self._send("* 0 RECENT")
        unseen = next((i for i, m in enumerate(view.messages, 1) if "\\Seen" not in m.flags), 0)
        if unseen:
            self._send(f"* OK [UNSEEN {unseen}] First unseen")
        self._send(f"* OK [UIDVALIDITY {view.uidvalidity}] UIDs valid")
        self._send(f"* OK [UIDNEXT {view.uidnext}] Predicted next UID")
        self._send(f"* OK [HIGHESTMODSEQ {view.highest_modseq}] Highest")
        if qresync is not None:
            self._qresync(view, qresync)
        try:
            self._unwatch = self.store.watch(self._account, name, self._changed)
        except Exception:
            # The folder is selected all the same: changes then reach the
            # client at its next command instead of during IDLE.
            log.error("{session} imap watch of {folder} failed: {error}", session=self.session, folder=name, error=describe_failure(Failure()))
        return f"[{'READ-ONLY' if readonly else 'READ-WRITE'}] {'EXAMINE' if readonly else 'SELECT'} completed"

    @staticmethod
    def _qresync_parameters(params: list[Token]) -> tuple[int, int, SequenceSet | None]:
        """(uidvalidity, modseq, known UIDs) of SELECT's QRESYNC parameter, read before anything is selected."""
        if len(params) < 2:
            raise BAD("Syntax: QRESYNC (uidvalidity modseq [known-uids])")
        uidvalidity, modseq = _number(params[0], "UIDVALIDITY"), _number(params[1], "mod-sequence")
        known = None
        if len(params) > 2 and isinstance(params[2], str):
            try:
                known = SequenceSet.parse(params[2])
            except ValueError:
                raise BAD("Invalid known-uids set")
        return uidvalidity, modseq, known

    def _qresync(self, view: FolderView, parameters: tuple[int, int, SequenceSet | None]) -> None:
        """RFC 7162 3.2.5: what changed since the client's last session, as VANISHED (EARLIER) and FETCH."""
        uidvalidity, modseq, known = parameters
        if uidvalidity != view.uidvalidity:
            return
        last = view.uidnext - 1
        if known is not None:
            # Nothing above the highest UID the client knows vanished for it.
            last = min(last, max(last if x is None else x for pair in known.ranges for x in pair))
        vanished = gaps([m.uid for m in view.messages], last)
        if vanished:
            self._send(f"* VANISHED (EARLIER) {format_ranges(vanished)}")
        for msn, m in enumerate(view.messages, 1):
            if m.modseq > modseq:
                self._send(self._flags_line(msn, m))

    def _take(self, view: FolderView) -> None:
        self.uids = array.array("I", (m.uid for m in view.messages))
        self._reported = {}
        self._modseq, self._uidnext, self._uidvalidity = view.highest_modseq, view.uidnext, view.uidvalidity
        self._stale = False

    def _deselect(self) -> None:
        if self._unwatch is not None:
            unwatch, self._unwatch = self._unwatch, None
            try:
                unwatch()
            except Exception:
                log.error("{session} imap unwatch failed: {error}", session=self.session, error=describe_failure(Failure()))
        self.folder = None
        self.uids, self._reported = array.array("I"), {}
        self._parts_cache.clear()

    async def do_CREATE(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) != 1:
            raise BAD("Syntax: CREATE mailbox")
        name = mailbox_name(args[0], self.utf8).rstrip("/")
        if name == INBOX:
            raise NO("INBOX always exists", "ALREADYEXISTS")
        self._check_name(name)
        await call(self.store.create_folder, self._account, name)
        return "CREATE completed"

    def _check_name(self, name: str) -> None:
        if not name or "//" in name or name.startswith("/") or any(c in name for c in "*%") or len(name) > 255:
            raise NO(f"Invalid mailbox name {printable(name, 60)}", "CANNOT")

    async def do_DELETE(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) != 1:
            raise BAD("Syntax: DELETE mailbox")
        name = mailbox_name(args[0], self.utf8)
        if name == INBOX:
            raise NO("INBOX cannot be deleted", "CANNOT")
        if name == self.folder:
            self._deselect()
        await call(self.store.delete_folder, self._account, name)
        return "DELETE completed"

    async def do_RENAME(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) != 2:
            raise BAD("Syntax: RENAME old new")
        old, new = mailbox_name(args[0], self.utf8), mailbox_name(args[1], self.utf8).rstrip("/")
        if new == INBOX:
            raise NO("INBOX exists", "ALREADYEXISTS")
        self._check_name(new)
        await call(self.store.rename_folder, self._account, old, new)
        if self.folder is not None and old != INBOX and (self.folder == old or self.folder.startswith(old + "/")):
            # The session's own folder (or one inside it) goes on under its
            # new name, with its messages and UIDs, as Dovecot does.
            renamed = new + self.folder[len(old):]
            self._rewatch(renamed)
        return "RENAME completed"

    def _rewatch(self, name: str) -> None:
        if self._unwatch is not None:
            unwatch, self._unwatch = self._unwatch, None
            unwatch()
        self.folder = name
        try:
            self._unwatch = self.store.watch(self._account, name, self._changed)
        except Exception:
            log.error("{session} imap watch of {folder} failed: {error}", session=self.session, folder=name, error=describe_failure(Failure()))

    async def do_SUBSCRIBE(self, tag: str, args: list[Token], uid: bool) -> str:
        return await self._subscribe(args, True)

    async def do_UNSUBSCRIBE(self, tag: str, args: list[Token], uid: bool) -> str:
        return await self._subscribe(args, False)

    async def _subscribe(self, args: list[Token], subscribed: bool) -> str:
        if len(args) != 1:
            raise BAD("Syntax: SUBSCRIBE mailbox")
        await call(self.store.subscribe, self._account, mailbox_name(args[0], self.utf8), subscribed)
        return f"{'SUBSCRIBE' if subscribed else 'UNSUBSCRIBE'} completed"

    async def do_LIST(self, tag: str, args: list[Token], uid: bool) -> str:
        # RFC 5258: LIST [(selection)] reference patterns [RETURN (options)].
        selection: set[str] = set()
        if args and isinstance(args[0], list):
            selection = set(_upper_atoms(args[0], "selection option"))
            args = args[1:]
        returns: set[str] = set()
        status: list[str] | None = None
        if len(args) == 4 and isinstance(args[2], str) and args[2].upper() == "RETURN":
            options = _list(args[3], "RETURN options")
            i = 0
            while i < len(options):
                option = _atom(options[i], "RETURN option").upper()
                if option == "STATUS" and i + 1 < len(options):
                    status = self._status_items(_list(options[i + 1], "STATUS items"))
                    i += 1
                elif option in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    returns.add(option)
                else:
                    raise BAD(f"Unknown RETURN option {printable(option, 20)}")
                i += 1
            args = args[:2]
        if len(args) != 2:
            raise BAD("Syntax: LIST reference mailbox")
        unknown = selection - {"SUBSCRIBED", "RECURSIVEMATCH", "REMOTE", "SPECIAL-USE"}
        if unknown:
            raise BAD(f"Unknown selection option {printable(sorted(unknown)[0], 20)}")
        reference = decode_name(_text(args[0], "reference"), self.utf8)
        patterns = args[1] if isinstance(args[1], list) else [args[1]]
        texts = [decode_name(_text(p, "pattern"), self.utf8) for p in patterns]
        if len(texts) == 1 and not texts[0] and not selection:
            # RFC 3501 6.3.8: the hierarchy delimiter.
            self._send('* LIST (\\Noselect) "/" ""')
            return "LIST completed"
        await self._list("LIST", reference, texts, selection, returns, status)
        return "LIST completed"

    async def do_LSUB(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) != 2:
            raise BAD("Syntax: LSUB reference mailbox")
        reference, pattern = (decode_name(_text(a), self.utf8) for a in args)
        await self._list("LSUB", reference, [pattern], {"SUBSCRIBED"}, set(), None)
        return "LSUB completed"

    async def _list(self, verb: str, reference: str, patterns: list[str], selection: set[str], returns: set[str], status: list[str] | None) -> None:
        matchers = [_pattern(reference + p) for p in patterns]
        folders = {f.name: f for f in await call(self.store.folders, self._account)}
        # Every level above a folder has children; a level that is no folder
        # itself (".a.b" made by another tool without ".a") is listed as
        # \Noselect, so that a client can walk down to its children (RFC 3501 6.3.8).
        parents = {n[:i] for n in folders for i in range(len(n)) if n[i] == "/"}
        names = sorted(folders.keys() | (parents if not selection else set()), key=lambda n: (n != INBOX, n))
        for name in names:
            if not any(m(name) for m in matchers):
                continue
            folder = folders.get(name)
            if folder is not None and "SUBSCRIBED" in selection and not folder.subscribed:
                continue
            if folder is not None and "SPECIAL-USE" in selection and not folder.special_use:
                continue
            attributes = []
            if verb == "LIST":
                if folder is None:
                    attributes.append("\\Noselect")
                attributes.append("\\HasChildren" if name in parents else "\\HasNoChildren")
                if folder is not None and folder.special_use:
                    attributes.append(folder.special_use)
                if folder is not None and folder.subscribed and ("SUBSCRIBED" in selection or "SUBSCRIBED" in returns):
                    attributes.append("\\Subscribed")
            elif folder is None:
                continue
            self._send(f"* {verb} ({' '.join(attributes)}) \"/\" {wire_name(name, self.utf8)}")
            if status is not None and folder is not None:
                try:
                    view = await call(self.store.view, self._account, name)
                except NoSuchFolder:
                    continue
                self._send(f"* STATUS {wire_name(name, self.utf8)} ({self._status_values(view, status)})")

    def _status_items(self, tokens: list[Token]) -> list[str]:
        items = _upper_atoms(tokens, "status item")
        if not items:
            raise BAD("No status items")
        for item in items:
            if item not in _STATUS_ITEMS:
                raise BAD(f"Unknown status item {printable(item, 20)}")
            if item == "HIGHESTMODSEQ":
                self.condstore = True
        return items

    def _status_values(self, view: FolderView, items: list[str]) -> str:
        values = {
            "MESSAGES": lambda: len(view.messages),
            "UIDNEXT": lambda: view.uidnext,
            "UIDVALIDITY": lambda: view.uidvalidity,
            "UNSEEN": lambda: sum(1 for m in view.messages if "\\Seen" not in m.flags),
            "RECENT": lambda: 0,
            "SIZE": lambda: sum(m.size for m in view.messages),
            "HIGHESTMODSEQ": lambda: view.highest_modseq,
            "DELETED": lambda: sum(1 for m in view.messages if "\\Deleted" in m.flags),
        }
        return " ".join(f"{item} {values[item]()}" for item in items)

    async def do_STATUS(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) != 2:
            raise BAD("Syntax: STATUS mailbox (items)")
        name = mailbox_name(args[0], self.utf8)
        items = self._status_items(_list(args[1], "status items"))
        view = await call(self.store.view, self._account, name)
        self._send(f"* STATUS {wire_name(name, self.utf8)} ({self._status_values(view, items)})")
        return "STATUS completed"

    async def do_APPEND(self, tag: str, args: list[Token], uid: bool) -> str:
        options = args[1:-1]
        if len(args) >= 3 and isinstance(args[-2], str) and args[-2].upper() == "UTF8":
            # RFC 6855 4: APPEND ... UTF8 (~{n} message with UTF-8 headers).
            options = args[1:-2]
            if not (isinstance(args[-1], list) and len(args[-1]) == 1):
                raise BAD("Syntax: APPEND mailbox [(flags)] [date-time] UTF8 (~{size})")
            args = [*args[:-2], args[-1][0]]
        if not 2 <= len(args) <= 4:
            raise BAD("Syntax: APPEND mailbox [(flags)] [date-time] {size}")
        name = mailbox_name(args[0], self.utf8)
        content = args[-1]
        flags: frozenset[str] = frozenset()
        date = self.clock.seconds()
        for option in options:
            if isinstance(option, list):
                flags = parse_flags(option)
            elif isinstance(option, bytes):
                date = parse_date_time(option)
            else:
                raise BAD("Syntax: APPEND mailbox [(flags)] [date-time] {size}")
        if isinstance(content, FileLiteral):
            message = SpooledMessage(content.path, content.size, "")
        elif isinstance(content, bytes):
            message = SpooledMessage("", len(content), "", content)
        else:
            raise BAD("The message must be a literal")
        if message.size == 0:
            raise NO("An empty message cannot be appended")
        try:
            await self.factory.quota.check(self._account, message.size)
            uidvalidity, new_uid = await call(self.store.append, self._account, name, message, flags, date)
        except NoSuchFolder:
            raise NO("No such mailbox; create it first", "TRYCREATE")
        log.info("{session} imap append {user} {folder} uid={uid} size={size}",
                 session=self.session, user=self._account.address, folder=name, uid=new_uid, size=message.size)
        return f"[APPENDUID {uidvalidity} {new_uid}] APPEND completed"

    async def do_GETQUOTAROOT(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) != 1:
            raise BAD("Syntax: GETQUOTAROOT mailbox")
        name = mailbox_name(args[0], self.utf8)
        await call(self.store.view, self._account, name)
        used, limit = await self.factory.quota.state(self._account)
        if limit:
            self._send(f'* QUOTAROOT {wire_name(name, self.utf8)} ""')
            self._send(f'* QUOTA "" (STORAGE {(used + 1023) // 1024} {limit // 1024})')
        else:
            self._send(f"* QUOTAROOT {wire_name(name, self.utf8)}")
        return "GETQUOTAROOT completed"

    async def do_GETQUOTA(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) != 1:
            raise BAD("Syntax: GETQUOTA root")
        used, limit = await self.factory.quota.state(self._account)
        if _text(args[0]) != b"" or not limit:
            raise NO("No such quota root", "NONEXISTENT")
        self._send(f'* QUOTA "" (STORAGE {(used + 1023) // 1024} {limit // 1024})')
        return "GETQUOTA completed"

    async def do_SETQUOTA(self, tag: str, args: list[Token], uid: bool) -> str:
        raise NO("Quotas are set in the server's configuration", "NOPERM")

    async def do_IDLE(self, tag: str, args: list[Token], uid: bool) -> None:
        if args:
            raise BAD("IDLE takes no arguments")
        if self.folder is not None:
            await self._sync(expunges=True)
        self._idle_tag = tag
        self._send("+ idling")
        self._keepalive = self.clock.callLater(IDLE_KEEPALIVE, self._still_here)
        return None

    def _still_here(self) -> None:
        """A line now and then during IDLE, so that a NAT or firewall on the way
        keeps the connection of a phone that only listens (as Dovecot's
        imap_idle_notify_interval, 2 minutes)."""
        self._keepalive = None
        if self._idle_tag is not None and not self.transport.disconnecting:
            self._send("* OK Still here")
            self._keepalive = self.clock.callLater(IDLE_KEEPALIVE, self._still_here)

    def _stop_keepalive(self) -> None:
        keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None and keepalive.active():
            keepalive.cancel()

    def _idle_line(self, line: bytes) -> Any:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        self._stop_keepalive()

        async def done(_tag: str, _args: list[Token], _uid: bool) -> str:
            if line.strip().upper() != b"DONE":
                raise BAD("Expected DONE to end IDLE")
            while self._syncing is not None:
                await self._syncing
            return "IDLE terminated"

        return defer.Deferred.fromCoroutine(self._run(tag, "IDLE", [], [], done))

    def _changed(self) -> None:
        """The store says the selected folder may have changed: pushed at once during IDLE."""
        if self._idle_tag is None or self.folder is None or self.transport.disconnecting:
            return
        if self._syncing is not None:
            self._sync_again = True
            return
        syncing = defer.Deferred.fromCoroutine(self._idle_sync())
        if not syncing.called:
            self._syncing = syncing

    async def _idle_sync(self) -> None:
        try:
            while True:
                self._sync_again = False
                try:
                    await self._sync(expunges=True)
                except Exception:
                    log.error("{session} imap update during IDLE failed: {error}", session=self.session, error=describe_failure(Failure()))
                if not self._sync_again or self._idle_tag is None:
                    break
        finally:
            self._syncing = None

    # -- the selected folder's numbering -------------------------------------------

    async def _sync(self, expunges: bool) -> None:
        """Tell the client what others changed (RFC 3501 7): EXISTS, EXPUNGE or VANISHED, FETCH FLAGS.

        Run before most tagged replies, so it costs little when nothing
        changed: UIDs only grow, so the messages the client knows are
        all there when the view holds as many UIDs up to the last known one
        as the session numbers; and a message whose flags changed has a
        modseq above the folder's highest when last compared.
        """
        if self.folder is None:
            return
        folder = self.folder
        fresh, self._fresh_view = self._fresh_view, None
        try:
            view: FolderView = fresh if fresh is not None else await call(self.store.view, self._account, folder)
        except NoSuchFolder:
            if self.folder == folder:
                # Deleted or renamed by another session: nothing this one
                # numbers exists any more.
                log.info("{session} imap selected folder {folder} is gone, closing", session=self.session, folder=folder)
                self._send("* BYE [NONEXISTENT] The selected mailbox was deleted or renamed elsewhere")
                self._deselect()
                self._close()
            return
        if self.folder != folder:
            return
        if view.highest_modseq == self._modseq and view.uidnext == self._uidnext and not self._stale:
            return
        messages = view.messages
        last_known = self.uids[-1] if self.uids else 0
        old = bisect.bisect_right(messages, last_known, key=lambda m: m.uid)
        if old != len(self.uids):
            present = {m.uid for m in messages[:old]}
            gone = [u for u in self.uids if u not in present]
            if expunges:
                self._announce_expunged(gone)
            self._stale = not expunges
        else:
            self._stale = False
        if view.highest_modseq != self._modseq:
            since, reported = self._modseq, self._reported
            for m in messages[:old]:
                if m.modseq > since and reported.get(m.uid) != m.modseq:
                    self._send(self._flags_line(bisect.bisect_left(self.uids, m.uid) + 1, m))
        self._reported = {}
        new = messages[old:]
        if new:
            self.uids.extend(m.uid for m in new)
            self._send(f"* {len(self.uids)} EXISTS")
        self._modseq, self._uidnext = view.highest_modseq, view.uidnext

    def _announce_expunged(self, uids: Iterable[int]) -> None:
        gone = set(uids)
        if not gone:
            return
        if self.qresync:
            self._send(f"* VANISHED {SequenceSet.format(sorted(gone))}")
        else:
            # Highest first: each number is still right when the client reads it.
            for index in range(len(self.uids) - 1, -1, -1):
                if self.uids[index] in gone:
                    self._send(f"* {index + 1} EXPUNGE")
        self.uids = array.array("I", (u for u in self.uids if u not in gone))

    def _flags_line(self, msn: int, m: MessageInfo) -> str:
        modseq = f" MODSEQ ({m.modseq})" if self.condstore else ""
        return f"* {msn} FETCH (UID {m.uid} FLAGS {format_flags(m.flags)}{modseq})"

    def _targets(self, token: Token, uid: bool) -> list[tuple[int, int]]:
        """The (msn, uid) pairs a sequence set names: MSNs, or UIDs with ``uid``."""
        text = _atom(token, "sequence set")
        try:
            numbers = SequenceSet.parse(text)
        except ValueError:
            raise BAD(f"Invalid sequence set {printable(text, 40)}")
        if uid:
            # Each range cut out of the sorted UIDs by bisection: "UID STORE 7"
            # costs the same in a folder of ten or of ten thousand.
            largest = self.uids[-1] if self.uids else 0
            chosen: set[int] = set()
            for a, b in numbers.ranges:
                x, y = largest if a is None else a, largest if b is None else b
                low, high = bisect.bisect_left(self.uids, min(x, y)), bisect.bisect_right(self.uids, max(x, y))
                chosen.update(range(low, high))
            return [(i + 1, self.uids[i]) for i in sorted(chosen)]
        if not self.uids:
            # As Dovecot: message numbers in an empty mailbox name nothing that can exist.
            raise BAD("Invalid message set: the mailbox is empty")
        # At most as many numbers as messages: resolve drops those above.
        return [(msn, self.uids[msn - 1]) for msn in numbers.resolve(len(self.uids))]

    def _require_writable(self) -> None:
        if self.readonly:
            raise NO("The mailbox is read-only (EXAMINE)", "READ-ONLY")

    @property
    def _folder(self) -> str:
        assert self.folder is not None
        return self.folder

    async def do_CHECK(self, tag: str, args: list[Token], uid: bool) -> str:
        return "CHECK completed"

    async def do_CLOSE(self, tag: str, args: list[Token], uid: bool) -> str:
        if not self.readonly:
            # RFC 3501 6.4.2: the \Deleted messages go, without EXPUNGE responses.
            await call(self.store.expunge, self._account, self._folder, list(self.uids))
        self._deselect()
        return "CLOSE completed"

    async def do_UNSELECT(self, tag: str, args: list[Token], uid: bool) -> str:
        self._deselect()
        return "UNSELECT completed"

    async def do_EXPUNGE(self, tag: str, args: list[Token], uid: bool) -> str:
        self._require_writable()
        if uid:
            if len(args) != 1:
                raise BAD("Syntax: UID EXPUNGE uid-set")
            uids = [u for _, u in self._targets(args[0], True)]
        elif args:
            raise BAD("EXPUNGE takes no arguments")
        else:
            uids = list(self.uids)
        removed = await call(self.store.expunge, self._account, self._folder, uids)
        self._announce_expunged(removed)
        return "EXPUNGE completed"

    async def do_SEARCH(self, tag: str, args: list[Token], uid: bool) -> str:
        try:
            returns, _, query = search.parse_search_args(args)
        except search.BadCharset as e:
            raise NO("Unknown charset", e.code)
        except ValueError as e:
            raise BAD(f"Invalid SEARCH: {printable(str(e), 100)}")
        if query.uses_modseq:
            self.condstore = True
        present = await self._present()
        messages = [(msn, present[u]) for msn, u in enumerate(self.uids, 1) if u in present]
        uid_of = dict(enumerate(self.uids, 1))
        folder, account, threads = self._folder, self._account, self.factory.threads

        def open_message(message_uid: int) -> defer.Deferred[IO[bytes]]:
            return call(self.store.read, account, folder, message_uid)

        def parse_in_thread(source: IO[bytes]) -> defer.Deferred[MessageParts]:
            if threads is None:
                return defer.maybeDeferred(MessageParts.read, source)
            parts: defer.Deferred[MessageParts] = threads.run(threads.cpu, MessageParts.read, source)
            return parts

        def in_thread(f: Callable[[], Any]) -> defer.Deferred[Any]:
            return defer.maybeDeferred(f) if threads is None else threads.run(threads.cpu, f)

        found: list[int] = await search.run(
            query, messages, open_message, len(self.uids), self.uids[-1] if self.uids else 0, parse_in_thread, in_thread=in_thread,
        )
        numbers = [uid_of[n] for n in found] if uid else list(found)
        modseq = max((present[uid_of[n]].modseq for n in found), default=0) if query.uses_modseq else 0
        if returns is None:
            self._send("* SEARCH" + "".join(f" {n}" for n in numbers) + (f" (MODSEQ {modseq})" if modseq else ""))
            return "SEARCH completed"
        self._send(search.format_esearch(tag, numbers, returns, uid=uid, modseq=modseq or None))
        return "SEARCH completed"

    async def do_FETCH(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) not in (2, 3):
            raise BAD("Syntax: FETCH sequence-set items [(CHANGEDSINCE modseq [VANISHED])]")
        targets = self._targets(args[0], uid)
        try:
            request = fetch.FetchRequest.parse(args[1:])
        except ValueError as e:
            raise BAD(f"Invalid FETCH: {printable(str(e), 100)}")
        if request.vanished and not (uid and self.qresync):
            raise BAD("VANISHED is for UID FETCH once QRESYNC is enabled")
        if request.wants_modseq:
            # RFC 7162 3.1: MODSEQ and CHANGEDSINCE turn CONDSTORE on.
            self.condstore = True
        if request.vanished:
            self._fetch_vanished(args[0])
        present = await self._present()
        if request.changed_since is not None:
            since = request.changed_since
            targets = [(msn, u) for msn, u in targets if u in present and present[u].modseq > since]
        seen: set[int] = set()
        if request.sets_seen and not self.readonly:
            unseen = [u for _, u in targets if u in present and "\\Seen" not in present[u].flags]
            if unseen:
                # Stored before the data goes out (RFC 3501 6.4.5), and the
                # new flags are part of each response.
                self._fresh_view = None
                result = await call(self.store.store_flags, self._account, self._folder, unseen, frozenset({"\\Seen"}), "add")
                for m in result.changed:
                    present[m.uid] = m
                    self._reported[m.uid] = m.modseq
                    seen.add(m.uid)
        return await self._fetch(request, targets, present, uid, seen)

    async def _present(self) -> dict[int, MessageInfo]:
        """The selected folder's messages as they are now, by UID (for the command that asks).

        The view is kept for the updates after the command (one trip to the
        store's thread instead of two), unless the command changes the folder.
        """
        view: FolderView = await call(self.store.view, self._account, self._folder)
        self._fresh_view = view
        return {m.uid: m for m in view.messages}

    def _fetch_vanished(self, token: Token) -> None:
        """RFC 7162 3.2.6: UID FETCH ... (CHANGEDSINCE n VANISHED): the UIDs of the set that are gone."""
        numbers = SequenceSet.parse(_atom(token, "sequence set"))
        last = self._uidnext - 1
        found = []
        budget = 100_000
        for low, high in gaps(self.uids, last):
            if high - low > budget:
                # Too many to check one by one: reporting UIDs that never
                # existed is allowed (the client ignores those it does not know).
                found.append((low, high))
                continue
            budget -= high - low
            found += [(n, n) for n in numbers.select(range(low, high + 1), last)]
        if found:
            self._send(f"* VANISHED (EARLIER) {format_ranges(_merge(found))}")

    async def _parts(self, uid: int, source: IO[bytes]) -> MessageParts:
        """A message's MIME structure, read once in a thread and kept for the next few FETCHes."""
        key = (self._folder, uid)
        parts = self._parts_cache.get(key)
        if parts is None:
            threads = self.factory.threads
            parts = MessageParts.read(source) if threads is None else await threads.run(threads.cpu, MessageParts.read, source)
            if len(self._parts_cache) >= _PARTS_CACHED:
                self._parts_cache.pop(next(iter(self._parts_cache)))
            self._parts_cache[key] = parts
        return parts

    async def _fetch(
        self, request: fetch.FetchRequest, targets: list[tuple[int, int]], present: dict[int, MessageInfo], uid: bool, seen: set[int],
    ) -> str:
        pump = OutputPump(self.output_consumer(), self.clock, self.settings.idle_timeout)
        missing = 0
        add_modseq = self.condstore and request.changed_since is not None
        # Flags a response carries are not reported again after the command.
        tells_flags = any(item.name == "FLAGS" for item in request.items)
        account, folder = self._account, self._folder
        needs_message = request.needs_message
        # The next few messages are opened while one is sent: a store opens a
        # message in a thread, and waiting for each in turn would leave the
        # connection idle between messages.
        ahead: collections.deque[tuple[int, int, MessageInfo | None, defer.Deferred[IO[bytes] | None] | None]] = collections.deque()
        queue = iter(targets)

        def fill() -> None:
            while len(ahead) < _OPEN_AHEAD:
                try:
                    msn, u = next(queue)
                except StopIteration:
                    return
                info = present.get(u)
                opening = call(self.store.read, account, folder, u).addErrback(_gone) if info is not None and needs_message else None
                ahead.append((msn, u, info, opening))

        try:
            fill()
            while ahead:
                msn, u, info, opening = ahead.popleft()
                fill()
                source = await opening if opening is not None else None
                if info is None or (needs_message and source is None):
                    # Gone since (another session expunged it): RFC 3501 7.4.1.
                    missing += 1
                    continue
                try:
                    parts = None
                    if request.needs_structure:
                        assert source is not None
                        parts = await self._parts(u, source)
                    response = fetch.render(request, msn, info, source, parts, add_uid=uid, add_modseq=add_modseq, flags_changed=u in seen)
                    await pump.send(response.chunks())
                    if tells_flags or u in seen:
                        self._reported[u] = info.modseq
                except (ConnectionLost, defer.CancelledError):
                    raise
                except Exception:
                    # Part of the response may be out: the client cannot read
                    # on from the middle of a literal.
                    log.error("{session} imap FETCH of uid {uid} failed: {error}", session=self.session, uid=u, error=describe_failure(Failure()))
                    self.transport.abortConnection()
                    raise ConnectionLost("fetch failed")
                finally:
                    if source is not None:
                        source.close()
        finally:
            pump.close()
            for _, _, _, opening in ahead:
                if opening is not None:
                    opening.addCallback(_close).addErrback(lambda _: None)
        if missing:
            raise NO("Some of the requested messages no longer exist", "EXPUNGEISSUED")
        return "FETCH completed"

    async def do_STORE(self, tag: str, args: list[Token], uid: bool) -> str:
        if len(args) < 3:
            raise BAD("Syntax: STORE sequence-set [(UNCHANGEDSINCE n)] [+-]FLAGS[.SILENT] (flags)")
        self._require_writable()
        targets = self._targets(args[0], uid)
        rest = args[1:]
        unchanged_since: int | None = None
        if isinstance(rest[0], list):
            modifier = rest[0]
            if len(modifier) != 2 or _atom(modifier[0], "STORE modifier").upper() != "UNCHANGEDSINCE":
                raise BAD("The STORE modifier is (UNCHANGEDSINCE mod-sequence)")
            unchanged_since = _number(modifier[1], "mod-sequence")
            self.condstore = True
            rest = rest[1:]
        if len(rest) < 2:
            raise BAD("Missing flags")
        item = _atom(rest[0], "STORE item").upper()
        how = {"FLAGS": "set", "+FLAGS": "add", "-FLAGS": "remove"}.get(item.removesuffix(".SILENT"))
        if how is None:
            raise BAD("The STORE item is FLAGS, +FLAGS or -FLAGS, with .SILENT or not")
        silent = item.endswith(".SILENT")
        flags = parse_flags(rest[1] if len(rest) == 2 and isinstance(rest[1], list) else rest[1:])
        uids = [u for _, u in targets]
        result = await call(self.store.store_flags, self._account, self._folder, uids, flags, how, unchanged_since) if uids else None
        changed = {m.uid: m for m in result.changed} if result is not None else {}
        # Without .SILENT the flags of each message are reported, changed or not.
        present = await self._present() if not silent and unchanged_since is None and any(u not in changed for u in uids) else {}
        msn_of = {u: msn for msn, u in targets}
        for u, m in changed.items():
            self._reported[u] = m.modseq
        for msn, u in targets:
            info = changed.get(u) or present.get(u)
            if info is None:
                continue
            if u in changed or not silent and unchanged_since is None:
                if silent:
                    # RFC 7162 3.1.3: the new modseq of each changed message.
                    if self.condstore:
                        self._send(f"* {msn} FETCH (UID {u} MODSEQ ({info.modseq}))")
                else:
                    self._send(self._flags_line(msn, info))
        if result is not None and result.modified:
            numbers = sorted(result.modified) if uid else sorted(msn_of[u] for u in result.modified if u in msn_of)
            return f"[MODIFIED {SequenceSet.format(numbers)}] Conditional STORE failed for some messages"
        return "STORE completed"

    async def do_COPY(self, tag: str, args: list[Token], uid: bool) -> str:
        return await self._copy(args, uid, move=False)

    async def do_MOVE(self, tag: str, args: list[Token], uid: bool) -> str:
        return await self._copy(args, uid, move=True)

    async def _copy(self, args: list[Token], uid: bool, move: bool) -> str:
        verb = "MOVE" if move else "COPY"
        if len(args) != 2:
            raise BAD(f"Syntax: {verb} sequence-set mailbox")
        if move:
            self._require_writable()
        targets = self._targets(args[0], uid)
        target = mailbox_name(args[1], self.utf8)
        uids = [u for _, u in targets]
        if not uids:
            if not uid:
                raise NO("No messages to copy")
            return f"{verb} completed"
        if not move:
            # RFC 9208 4.2: a COPY that would take the account over its quota is
            # refused whole (a MOVE within the account adds nothing).
            present = await self._present()
            await self.factory.quota.check(self._account, sum(present[u].size for u in uids if u in present))
        try:
            uidvalidity, pairs = await call(self.store.move if move else self.store.copy, self._account, self._folder, uids, target)
        except NoSuchFolder:
            raise NO("No such mailbox; create it first", "TRYCREATE")
        code = ""
        if pairs:
            code = f"[COPYUID {uidvalidity} {SequenceSet.format(p[0] for p in pairs)} {SequenceSet.format(p[1] for p in pairs)}] "
        if move:
            # RFC 6851 4.3: the COPYUID comes untagged, before the expunges.
            if code:
                self._send(f"* OK {code}Moved")
            self._announce_expunged([p[0] for p in pairs])
            return f"{verb} completed"
        return f"{code}{verb} completed"


def _gone(failure: Failure) -> None:
    """A message that could not be opened because it is gone (expunged since): None, not a failure."""
    failure.trap(NoSuchFolder, PermanentFailure)
    return None


def _close(source: IO[bytes] | None) -> None:
    if source is not None:
        source.close()


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return merged


def _pattern(pattern: str) -> Callable[[str], bool]:
    """An RFC 3501 6.3.8 LIST pattern: "*" matches anything, "%" anything but "/"; INBOX in any case."""
    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    exact = re.compile(regex + r"\Z", re.S)
    folded = re.compile(regex + r"\Z", re.S | re.I)

    def matches(name: str) -> bool:
        if name == INBOX or name.startswith(INBOX + "/"):
            return bool(folded.match(name))
        return bool(exact.match(name))

    return matches


class IMAPFactory(protocol.ServerFactory):
    """Shared state of one IMAP listener."""

    noisy = False  # our own connect/disconnect lines say it better

    def __init__(
        self, settings: IMAPSettings, login_guard: LoginGuard, tls: Any, implicit_tls: bool, store: Any, quota: int, clock: Any,
        spool_dir: str = "", threads: Any = None, user_connections: collections.Counter[tuple[str, str]] | None = None,
        command_rate: TokenBuckets | None = None,
    ) -> None:
        self.settings = settings
        # Shared by every listener: a guesser may switch ports.
        self.login_guard = login_guard
        self.tls = tls
        self.implicit_tls = implicit_tls
        # The mailbox backend, providing IMessageStore.
        self.store = store
        # [mailbox] quota in octets, 0 for none.
        self.quota = MailboxQuota(store, quota)
        self.clock = clock
        # Where large APPEND literals are written as they arrive.
        self.spool_dir = spool_dir or os.environ.get("TMPDIR", "/tmp")
        # mailplat.threads.Threads: a message's MIME structure is read on its cpu pool
        # (None: on the calling thread, for tests in memory).
        self.threads = threads
        self.connections = ConnectionCounter(settings.max_connections, settings.max_connections_per_ip)
        # Logged-in sessions per (user, client address): one count for the
        # imap and imaps listeners, as Dovecot's mail_max_userip_connections.
        self.user_connections: collections.Counter[tuple[str, str]] = collections.Counter() if user_connections is None else user_connections
        # [imap] max_commands_per_minute, shared by the imap and imaps listeners as the count above.
        self.command_rate = command_rate or TokenBuckets(settings.max_commands_per_minute, 60.0, clock)

    def buildProtocol(self, addr: Any) -> IMAPServer:
        return IMAPServer(self)
