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
import functools
import inspect
from typing import Any

from twisted.cred import error
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.python.failure import Failure

from mailplat.config import POP3Settings
from mailplat.cred import LoginBlocked, LoginGuard
from mailplat.ids import new_id
from mailplat.interfaces import IMaildrop, MaildropInUse, TemporaryFailure
from mailplat.numerals import is_digits
from mailplat.plugins import call
from mailplat.wire import sasl
from mailplat.wire.connections import ConnectionCounter, TLSHandshakeDeadline, set_no_delay
from mailplat.wire.dotstuff import DotStuffedSender
from mailplat.wire.lines import CommandReader, describe_failure, printable

__all__ = ["POP3Factory", "POP3Server"]

log = Logger()

class ERR(Exception):
    """A -ERR reply that ends a command; ``code`` is an RFC 2449 response code."""

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.line = f"[{code}] {text}" if code else text
        # With a response code the refusal is about the login or the server
        # (AUTH, SYS/TEMP, IN-USE), not a malformed command: it is not counted
        # against max_errors.
        self.invalid = not code


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


class POP3Server(CommandReader, TLSHandshakeDeadline, pop3.POP3):
    """One POP3 session (RFC 1939) with STLS, CAPA and SASL PLAIN and LOGIN (RFC 2595, 2449, 5034)."""

    factory: POP3Factory  # type: ignore[assignment]  # Twisted's POP3 declares it None

    def __init__(self, factory: POP3Factory) -> None:
        self.factory = factory
        self.settings: POP3Settings = factory.settings
        self.timeOut = self.settings.idle_timeout  # type: ignore[assignment]  # Twisted says int; any number of seconds works
        # TimeoutMixin schedules on the global reactor unless told otherwise.
        self.callLater = factory.clock.callLater  # type: ignore[method-assign]
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
        self._sasl: sasl.SASLExchange | None = None  # the AUTH exchange, while one is open
        self._counted = False
        self._errors = 0  # invalid commands, before login and then again after it

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = getattr(self.transport.getPeer(), "host", "unknown")
        if self.factory.implicit_tls:
            # Before the limits: even the refusal goes out only after the handshake.
            self.expect_tls_handshake(self.factory.clock, self.settings.tls_handshake_timeout)
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
        self.forget_tls_handshake()
        if self.maildrop is not None:
            # RFC 1939 6: without QUIT nothing is deleted.
            maildrop, self.maildrop = self.maildrop, None
            self._release(maildrop)
        if self._counted:
            self._counted = False
            self.factory.connections.release(self.peer)
            log.info("{session} pop3 disconnect from {peer}", session=self.session, peer=self.peer)

    def _release(self, maildrop: Any) -> None:
        """Unlock a maildrop without changes (close may be async, and may fail: logged)."""
        call(maildrop.close).addErrback(
            lambda f: log.error("{session} pop3 maildrop close failed: {error}", session=self.session, error=describe_failure(f))
        )

    def tls_handshake_timed_out(self) -> None:
        log.info("{session} pop3 TLS handshake from {peer} not finished within {seconds:g} s, closing",
                 session=self.session, peer=self.peer, seconds=self.settings.tls_handshake_timeout)

    def timeoutConnection(self) -> None:
        self.failResponse("[SYS/TEMP] idle for too long, closing the connection")
        if self.output_blocked:
            # The client does not read our replies: a clean close would wait for it forever.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- input (CommandReader hooks) ------------------------------------------

    def line_too_long(self) -> None:
        self._invalid(f"Line too long (limit {self.max_command_line} octets)")

    def bare_newline(self) -> None:
        self._invalid("Command lines must end with CRLF, not a bare LF")

    def _invalid(self, text: str) -> None:
        """-ERR for an invalid command; the one that reaches the limit ends the session instead (as Dovecot does)."""
        self._errors += 1
        limit = self.settings.max_errors if self.maildrop is not None else self.settings.max_errors_before_login
        if self._errors < limit:
            self.failResponse(text)
            return
        log.info("{session} pop3 too many invalid commands from {peer}, closing", session=self.session, peer=self.peer)
        self.failResponse("Too many invalid commands, closing the connection")
        self.transport.loseConnection()

    def cross_protocol_request(self, verb: str) -> None:
        log.info("{session} pop3 cross-protocol request from {peer}: {verb} as a command, closing", session=self.session, peer=self.peer, verb=verb)
        self.failResponse("This is a POP3 server, not an HTTP one; closing the connection")
        self.transport.loseConnection()

    def command_received(self, line: bytes) -> Any:
        if self._sasl is not None:
            return self._sasl_step(line)
        if b"\0" in line:
            raise ERR("NUL character in command")
        words = line.split()
        if not words:
            raise ERR("Empty command")
        verb = words[0].upper()
        handler = self.COMMANDS_AUTH.get(verb) if self.maildrop is None else self.COMMANDS_TRANSACTION.get(verb)
        if handler is None:
            known = verb in self.COMMANDS_AUTH or verb in self.COMMANDS_TRANSACTION
            shown = verb.decode("ascii", "replace")[:20] if verb.isascii() and verb.isalpha() else "?"
            raise ERR(f"{shown} is not valid in this state" if known else f"Unknown command: {shown}")
        method = getattr(self, handler)
        arguments = [w.decode("utf-8", "replace") for w in words[1:]]
        if verb == b"PASS":
            # RFC 1939 7: the password is the rest of the line, spaces
            # included (two in a row, or at its ends).
            password = line.lstrip().partition(b" ")[2]
            arguments = [password.decode("utf-8", "replace")] if password else []
        if not _takes(method, len(arguments)):
            raise ERR(f"Wrong number of arguments for {verb.decode()}")
        return method(*arguments)

    def command_failed(self, failure: Failure) -> None:
        """Every command's refusal (an ERR) and every bug end here, as one -ERR."""
        if isinstance(failure.value, ERR):
            if failure.value.invalid:
                self._invalid(failure.value.line)
            else:
                self.failResponse(failure.value.line)
            return
        log.error("{session} internal error: {error}", session=self.session, error=describe_failure(failure))
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
            caps += ["USER", "SASL " + " ".join(sasl.MECHANISMS), "AUTH-RESP-CODE"]
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
        self.expect_tls_handshake(self.factory.clock, self.settings.tls_handshake_timeout)
        self.tls = True
        self.user = None

    def _require_tls(self) -> None:
        if not self.tls:
            raise ERR("Plaintext authentication is disallowed on non-secure connections; use STLS first", "AUTH")

    def do_USER(self, name: str) -> None:
        self._require_tls()
        self.user = name
        self.successResponse("Send PASS")

    def do_PASS(self, password: str = "") -> Any:
        self._require_tls()
        if self.user is None:
            raise ERR("Send USER first")
        if not password:
            raise ERR("Syntax: PASS password")
        user, self.user = self.user, None
        return self._login(user, password)

    def do_APOP(self, *args: str) -> None:
        raise ERR("APOP is not supported: it needs passwords stored in clear", "AUTH")

    def do_AUTH(self, mechanism: str = "", initial: str = "") -> Any:
        if not mechanism:
            # RFC 5034 (and Outlook): AUTH alone lists the mechanisms.
            self.successResponse("")
            mechanisms = "".join(f"{m}\r\n" for m in sasl.MECHANISMS) if self.tls else ""
            self.transport.write(f"{mechanisms}.\r\n".encode())
            return None
        self._require_tls()
        try:
            exchange = sasl.start(mechanism)
        except sasl.SASLError:
            raise ERR(f"Unsupported mechanism {printable(mechanism, 20)}; use {' or '.join(sasl.MECHANISMS)}")
        self._sasl = exchange
        if initial:
            return self._sasl_step(initial.encode())
        self._challenge(exchange)
        return None

    def _challenge(self, exchange: sasl.SASLExchange) -> None:
        # RFC 5034 4: "+ " and the base64 challenge (empty for PLAIN).
        self.transport.write(b"+ " + base64.b64encode(exchange.challenge) + b"\r\n")

    def _sasl_step(self, line: bytes) -> Any:
        """One client line of an AUTH exchange: a refusal leaves the session open."""
        exchange, self._sasl = self._sasl, None
        assert exchange is not None
        try:
            credentials = exchange.respond(line)
        except sasl.SASLError as e:
            log.info("{session} pop3 auth ended: {why}", session=self.session, why=e.text)
            raise ERR(e.text, "AUTH" if e.why is sasl.Why.AUTHZID else "")
        if credentials is None:
            self._sasl = exchange
            self._challenge(exchange)
            return None
        return self._login(credentials.username, credentials.password)

    def _login(self, user: str, password: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._login_async(user, password))

    async def _login_async(self, user: str, password: str) -> None:
        try:
            maildrop, _ = await self.factory.login_guard.login(self.peer, user, password, IMaildrop)
        except LoginBlocked as blocked:
            log.info("{session} pop3 login refused: {peer} is blocked", session=self.session, peer=self.peer)
            raise ERR(f"Too many failed logins from your address; try again in {int(blocked.seconds) + 1} seconds", "SYS/TEMP")
        except error.UnauthorizedLogin:
            log.info("{session} pop3 login failed for {user!r} from {peer}", session=self.session, user=user[:100], peer=self.peer)
            raise ERR("Authentication failed", "AUTH")
        except MaildropInUse:
            raise ERR("The maildrop is in use by another session", "IN-USE")
        except TemporaryFailure as e:
            raise ERR(e.text, "SYS/TEMP")
        if self.transport.disconnecting:
            self._release(maildrop)
            return
        try:
            await call(maildrop.expire, self.settings.expire_days, self.settings.trash_days)
            self.messages = list(await call(maildrop.entries))
        except BaseException:
            self._release(maildrop)
            raise
        self.maildrop = maildrop
        self.account = user.lower()
        self._errors = 0
        log.info("{session} pop3 login {user} ({count} messages)", session=self.session, user=self.account, count=len(self.messages))
        self.successResponse(f"Logged in, {len(self.messages)} messages")

    # -- transaction state --------------------------------------------------

    def _message(self, number: str) -> int:
        """The index for a message number the client gave, or ERR."""
        if not is_digits(number) or not 1 <= int(number) <= len(self.messages):
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
        if not is_digits(lines):
            raise ERR("Syntax: TOP message lines")
        self.successResponse("Top of message follows")
        return self._send(i, int(lines))

    def _send(self, i: int, body_lines: int | None) -> defer.Deferred[None]:
        uid = self.messages[i].uid

        def opened(source: Any) -> defer.Deferred[None]:
            if body_lines is not None:
                source = TopReader(source, body_lines)
            sending = DotStuffedSender(source, self.output_consumer(), self.factory.clock, self.settings.idle_timeout).start()
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


@functools.cache
def _signature(function: Any) -> inspect.Signature:
    return inspect.signature(function)


def _takes(method: Any, count: int) -> bool:
    """Whether a command method accepts ``count`` arguments (the client's words);
    each method's signature is read once, not at every command."""
    try:
        _signature(method.__func__).bind(None, *[""] * count)
    except TypeError:
        return False
    return True


def _client_gone(failure: Any) -> None:
    """A client gone (or not reading for idle_timeout) mid-message: nothing more to say to it."""
    failure.trap(ConnectionLost, defer.TimeoutError)


class POP3Factory(protocol.ServerFactory):
    """Shared state of one POP3 listener."""

    noisy = False  # our own connect/disconnect lines say it better

    def __init__(
        self, settings: POP3Settings, login_guard: LoginGuard, tls: Any, implicit_tls: bool, clock: Any,
    ) -> None:
        self.settings = settings
        # Shared by every listener: a guesser may switch ports.
        self.login_guard = login_guard
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.clock = clock
        self.connections = ConnectionCounter(settings.max_connections, settings.max_connections_per_ip)

    def buildProtocol(self, addr: Any) -> POP3Server:  # type: ignore[override]
        return POP3Server(self)
