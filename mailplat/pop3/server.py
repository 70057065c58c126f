"""The POP3 server: Twisted's POP3 with TLS first, SASL, login safety and streaming.

We keep Twisted's response helpers and timeout handling and replace what a
server facing the Internet cannot use as it is: it has no STLS (RFC 2595),
its CAPA offers USER before TLS, it answers errors with Python exception
text, it mangles CRLF messages (``transformChunk`` turns every LF into CRLF)
and stuffs dots only within a chunk, so a line starting with "." at a chunk
boundary goes out unstuffed and ends the message early.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from twisted.cred import credentials, error
from twisted.internet import defer, protocol, task
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.mail import pop3

from mailplat.config import POP3Settings
from mailplat.wire.connections import ConnectionCounter, set_no_delay
from mailplat.wire.dotstuff import DotStuffedSender
from mailplat.interfaces import IMaildrop, MaildropInUse, TemporaryFailure
from mailplat.wire.lines import CommandReader
from mailplat.plugins import call
from mailplat.ids import new_id

__all__ = ["POP3Factory", "POP3Server"]

log = Logger()

class ERR(Exception):
    """A -ERR reply that ends a command; ``code`` is an RFC 2449 response code."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.line = f"[{code}] {text}" if code else text


class LoginFailures:
    """Failed logins per client address, and who is blocked for a while."""

    def __init__(self, limit: int, window: float, clock: Any) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, list[float]] = {}

    def _recent(self, peer: str) -> list[float]:
        now = self.clock.seconds()
        recent = [t for t in self._failures.get(peer, []) if t > now - self.window]
        if recent:
            self._failures[peer] = recent
        else:
            self._failures.pop(peer, None)
        return recent

    def blocked_for(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: it may now)."""
        recent = self._recent(peer)
        if len(recent) < self.limit:
            return 0.0
        return max(0.0, recent[-self.limit] + self.window - self.clock.seconds())

    def failed(self, peer: str) -> None:
        self._failures.setdefault(peer, []).append(self.clock.seconds())


class TopReader:
    """A message's header, blank line and first N body lines, read like a file (for TOP)."""

    def __init__(self, source: Any, body_lines: int) -> None:
        self.source = source
        self.body_lines = body_lines
        self.in_body = False

    def read(self, size: int) -> bytes:
        out: list[bytes] = []
        total = 0
        while total < size:
            if self.in_body:
                if self.body_lines <= 0:
                    break
                self.body_lines -= 1
            line = self.source.readline(size)
            if not line:
                break
            if line in (b"\r\n", b"\n"):
                self.in_body = True
            out.append(line)
            total += len(line)
        return b"".join(out)

    def close(self) -> None:
        self.source.close()


class POP3Server(CommandReader, pop3.POP3):
    """One POP3 session (RFC 1939) with STLS, CAPA and SASL PLAIN (RFC 2595, 2449, 5034)."""

    def __init__(self, factory: POP3Factory) -> None:
        self.factory = factory
        self.settings: POP3Settings = factory.settings
        self.portal = factory.portal
        self.timeOut = self.settings.idle_timeout
        self.max_command_line = 1024
        self.session = new_id()
        self.peer = ""
        self.tls = factory.implicit_tls
        self.user: str | None = None
        self.account = ""
        self.maildrop: Any = None
        self.messages: list[Any] = []
        self.deleted: set[int] = set()
        self.retrieved: set[int] = set()
        self._sasl = False
        self._counted = False

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = getattr(self.transport.getPeer(), "host", "unknown")
        refusal = self.factory.connections.admit(self.peer)
        if refusal:
            self.transport.write(f"-ERR [SYS/TEMP] {refusal}, try again later\r\n".encode())
            self.transport.loseConnection()
            return
        self._counted = True
        set_no_delay(self.transport)
        log.info("{session} pop3 connect from {peer}", session=self.session, peer=self.peer)
        self.successResponse("mailplat POP3 ready")
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        if self.maildrop is not None:
            # RFC 1939 6: without QUIT nothing is deleted.
            maildrop, self.maildrop = self.maildrop, None
            maildrop.close()
        if self._counted:
            self._counted = False
            self.factory.connections.release(self.peer)
            log.info("{session} pop3 disconnect from {peer}", session=self.session, peer=self.peer)

    def timeoutConnection(self) -> None:
        self.failResponse("[SYS/TEMP] idle for too long, closing the connection")
        self.transport.loseConnection()

    # -- input (CommandReader hooks) ------------------------------------------

    def line_too_long(self) -> None:
        self.failResponse(f"Line too long (limit {self.max_command_line} octets)")

    def bare_newline(self) -> None:
        self.failResponse("Command lines must end with CRLF, not a bare LF")

    def command_received(self, line: bytes) -> Any:
        if self._sasl:
            self._sasl = False
            try:
                return self._finish(self._sasl_response(line))
            except ERR as e:
                return self.failResponse(e.line)
        if b"\0" in line:
            return self.failResponse("NUL character in command")
        words = line.split()
        if not words:
            return self.failResponse("Empty command")
        verb = words[0].upper()
        handler = self.COMMANDS_AUTH.get(verb) if self.maildrop is None else self.COMMANDS_TRANSACTION.get(verb)
        if handler is None:
            known = verb in self.COMMANDS_AUTH or verb in self.COMMANDS_TRANSACTION
            shown = verb.decode("ascii", "replace")[:20] if verb.isascii() and verb.isalpha() else "?"
            return self.failResponse(f"{shown} is not valid in this state" if known else f"Unknown command: {shown}")
        try:
            result = getattr(self, handler)(*[w.decode("utf-8", "replace") for w in words[1:]])
        except ERR as e:
            return self.failResponse(e.line)
        except TypeError:
            return self.failResponse(f"Wrong number of arguments for {verb.decode()}")
        return self._finish(result)

    def _finish(self, result: Any) -> Any:
        if isinstance(result, defer.Deferred):
            result.addErrback(self._command_failed)
        return result

    def _command_failed(self, failure: Any) -> None:
        if failure.check(ERR):
            self.failResponse(failure.value.line)
        else:
            log.failure("{session} internal error", failure, session=self.session)
            self.failResponse("[SYS/TEMP] Internal error, try again later")

    COMMANDS_AUTH = {
        b"CAPA": "do_CAPA", b"STLS": "do_STLS", b"USER": "do_USER", b"PASS": "do_PASS",
        b"AUTH": "do_AUTH", b"APOP": "do_APOP", b"QUIT": "do_QUIT",
    }
    COMMANDS_TRANSACTION = {
        b"CAPA": "do_CAPA", b"STAT": "do_STAT", b"LIST": "do_LIST", b"UIDL": "do_UIDL", b"TOP": "do_TOP",
        b"RETR": "do_RETR", b"DELE": "do_DELE", b"RSET": "do_RSET", b"NOOP": "do_NOOP", b"QUIT": "do_QUIT",
    }

    # -- authorization state ------------------------------------------------

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "PIPELINING"]
        expire = self.settings.expire_days
        caps.append(f"EXPIRE {int(expire) if expire is not None else 'NEVER'}")
        if self.tls:
            caps += ["USER", "SASL PLAIN", "AUTH-RESP-CODE"]
        elif self.factory.tls is not None and self.maildrop is None:
            caps.append("STLS")
        caps.append("IMPLEMENTATION mailplat")
        return caps

    def do_CAPA(self) -> None:
        self.successResponse("Capability list follows")
        self.transport.write("".join(f"{c}\r\n" for c in self.capabilities()).encode() + b".\r\n")

    def do_STLS(self) -> None:
        if self.tls:
            raise ERR("TLS is already active")
        if self.factory.tls is None:
            raise ERR("STLS is not available")
        self.successResponse("Begin TLS negotiation")
        # RFC 2595 4: forget the plain-text state, and never run commands
        # pipelined in clear text inside TLS (CVE-2011-0411's POP3 twin).
        self.discard_pending_input()
        self.transport.startTLS(self.factory.tls)
        self.tls = True
        self.user = None

    def _require_tls(self) -> None:
        if not self.tls:
            raise ERR("Plaintext authentication is disallowed on non-secure connections; use STLS first", "AUTH")

    def do_USER(self, name: str) -> None:
        self._require_tls()
        self.user = name
        self.successResponse("Send PASS")

    def do_PASS(self, *words: str) -> Any:
        self._require_tls()
        if self.user is None:
            raise ERR("Send USER first")
        if not words:
            raise ERR("Syntax: PASS password")
        user, self.user = self.user, None
        # RFC 1939 7: the password is the rest of the line, spaces included.
        return self._login(user, " ".join(words))

    def do_APOP(self, *args: str) -> None:
        raise ERR("APOP is not supported: it needs passwords stored in clear", "AUTH")

    def do_AUTH(self, mechanism: str = "", initial: str = "") -> Any:
        if not mechanism:
            # RFC 5034 (and Outlook): AUTH alone lists the mechanisms.
            self.successResponse("")
            self.transport.write(b"PLAIN\r\n.\r\n" if self.tls else b".\r\n")
            return None
        self._require_tls()
        if mechanism.upper() != "PLAIN":
            raise ERR(f"Unsupported mechanism {mechanism[:20]}; use PLAIN")
        if initial:
            return self._sasl_response(initial.encode())
        self._sasl = True
        self.transport.write(b"+ \r\n")
        return None

    def _sasl_response(self, line: bytes) -> Any:
        if line.strip() == b"*":
            raise ERR("Authentication cancelled")
        try:
            decoded = base64.b64decode(line.strip() + b"==", validate=False)
            authzid, authcid, password = decoded.split(b"\0")
            user, pw = authcid.decode("utf-8"), password.decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise ERR("Malformed SASL PLAIN response")
        if authzid and authzid != authcid:
            raise ERR("Logging in as another user is not allowed", "AUTH")
        return self._login(user, pw)

    def _login(self, user: str, password: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._login_async(user, password))

    async def _login_async(self, user: str, password: str) -> None:
        failures = self.factory.login_failures
        wait = failures.blocked_for(self.peer)
        if wait:
            log.info("{session} pop3 login refused: {peer} is blocked", session=self.session, peer=self.peer)
            raise ERR(f"Too many failed logins from your address; try again in {int(wait) + 1} seconds", "SYS/TEMP")
        try:
            _, maildrop, _ = await self.portal.login(credentials.UsernamePassword(user.encode(), password.encode()), None, IMaildrop)
        except error.UnauthorizedLogin:
            failures.failed(self.peer)
            log.info("{session} pop3 login failed for {user!r} from {peer}", session=self.session, user=user[:100], peer=self.peer)
            # Like Dovecot's auth_failure_delay: slow down password guessing.
            await task.deferLater(self.factory.clock, self.settings.auth_failure_delay, lambda: None)
            raise ERR("Authentication failed", "AUTH")
        except MaildropInUse:
            raise ERR("The maildrop is in use by another session", "IN-USE")
        except TemporaryFailure as e:
            raise ERR(e.text, "SYS/TEMP")
        if self.transport.disconnecting:
            maildrop.close()
            return
        try:
            await call(maildrop.expire, self.settings.expire_days, self.settings.trash_days)
            self.messages = list(maildrop.entries())
        except BaseException:
            maildrop.close()
            raise
        self.maildrop = maildrop
        self.account = user.lower()
        log.info("{session} pop3 login {user} ({count} messages)", session=self.session, user=self.account, count=len(self.messages))
        self.successResponse(f"Logged in, {len(self.messages)} messages")

    # -- transaction state --------------------------------------------------

    def _message(self, number: str) -> int:
        """The index for a message number the client gave, or ERR."""
        if not number.isdigit() or not 1 <= int(number) <= len(self.messages):
            raise ERR(f"No such message: {number[:20]}")
        index = int(number) - 1
        if index in self.deleted:
            raise ERR(f"Message {number} is deleted")
        return index

    def _present(self) -> list[int]:
        return [i for i in range(len(self.messages)) if i not in self.deleted]

    def do_STAT(self) -> None:
        present = self._present()
        self.successResponse(f"{len(present)} {sum(self.messages[i].size for i in present)}")

    def do_LIST(self, number: str | None = None) -> None:
        self._listing(number, lambda i: str(self.messages[i].size))

    def do_UIDL(self, number: str | None = None) -> None:
        self._listing(number, lambda i: self.messages[i].uid)

    def _listing(self, number: str | None, column: Any) -> None:
        if number is not None:
            i = self._message(number)
            self.successResponse(f"{i + 1} {column(i)}")
            return
        self.successResponse(f"{len(self._present())} messages")
        self.transport.write("".join(f"{i + 1} {column(i)}\r\n" for i in self._present()).encode() + b".\r\n")

    def do_RETR(self, number: str) -> defer.Deferred[None]:
        i = self._message(number)
        self.retrieved.add(i)
        self.successResponse(f"{self.messages[i].size} octets")
        return self._send(i, None)

    def do_TOP(self, number: str, lines: str) -> defer.Deferred[None]:
        i = self._message(number)
        if not lines.isdigit():
            raise ERR("Syntax: TOP message lines")
        self.successResponse("Top of message follows")
        return self._send(i, int(lines))

    def _send(self, i: int, body_lines: int | None) -> defer.Deferred[None]:
        uid = self.messages[i].uid

        def opened(source: Any) -> defer.Deferred[None]:
            if body_lines is not None:
                source = TopReader(source, body_lines)
            sending = DotStuffedSender(source, self.transport, self.factory.clock, self.settings.idle_timeout).start()
            return sending.addErrback(_client_gone)

        def unreadable(failure: Any) -> None:
            # The +OK is out: the client expects a message; end it at once.
            log.failure("{session} cannot read message {uid}", failure, session=self.session, uid=uid)
            self.transport.loseConnection()

        # read may return a Deferred: a backend that fetches the message over
        # the network (a database) does it in a thread.
        return call(self.maildrop.read, uid).addCallbacks(opened, unreadable)

    def do_DELE(self, number: str) -> None:
        i = self._message(number)
        self.deleted.add(i)
        self.successResponse(f"Message {number} deleted")

    def do_RSET(self) -> None:
        self.deleted.clear()
        self.successResponse(f"{len(self.messages)} messages")

    def do_NOOP(self) -> None:
        self.successResponse()

    def do_QUIT(self) -> Any:
        if self.maildrop is None:
            self.successResponse("Bye")
            self.transport.loseConnection()
            return None
        return defer.Deferred.fromCoroutine(self._update())

    async def _update(self) -> None:
        """RFC 1939 6, the UPDATE state: apply the deletions, then say goodbye."""
        maildrop, self.maildrop = self.maildrop, None
        deleted = [self.messages[i].uid for i in sorted(self.deleted)]
        retrieved = [self.messages[i].uid for i in sorted(self.retrieved)]
        try:
            await call(maildrop.commit, deleted, retrieved, self.settings.on_delete == "trash")
        except TemporaryFailure as e:
            log.warn("{session} pop3 commit failed for {user}: {text}", session=self.session, user=self.account, text=e.text)
            self.failResponse("[SYS/TEMP] Some deleted messages were not removed")
        except Exception:
            log.failure("{session} pop3 commit failed for {user}", session=self.session, user=self.account)
            self.failResponse("[SYS/TEMP] Some deleted messages were not removed")
        else:
            log.info("{session} pop3 logout {user}: {deleted} deleted", session=self.session, user=self.account, deleted=len(deleted))
            self.successResponse(f"Logging out, {len(deleted)} messages deleted")
        self.transport.loseConnection()


def _client_gone(failure: Any) -> None:
    """A client gone (or not reading for idle_timeout) mid-message: nothing more to say to it."""
    failure.trap(ConnectionLost, defer.TimeoutError)


class POP3Factory(protocol.ServerFactory):
    """Shared state of one POP3 listener."""

    noisy = False  # our own connect/disconnect lines say it better

    def __init__(
        self, settings: POP3Settings, portal: Any, tls: Any, implicit_tls: bool, clock: Any, login_failures: LoginFailures
    ) -> None:
        self.settings = settings
        self.portal = portal
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.clock = clock
        self.connections = ConnectionCounter(settings.max_connections, settings.max_connections_per_ip)
        # Shared by the pop3 and pop3s listeners: a guesser may switch ports.
        self.login_failures = login_failures

    def buildProtocol(self, addr: Any) -> POP3Server:
        return POP3Server(self)
