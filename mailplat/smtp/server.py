"""The SMTP server: Twisted's ESMTP with our policy, limits and streaming DATA.

We keep Twisted's reply formatting, timeout handling and STARTTLS plumbing,
and fix its gaps for a server facing the Internet, each marked below:
EHLO keywords it never advertises, AUTH offered without TLS, a line-based
DATA path that falls back to command mode after an over-long line, replies
that come out of order when a check is asynchronous and clients pipeline,
and commands pipelined after STARTTLS that would be executed inside TLS.
"""

from __future__ import annotations

import base64
import email.utils
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailplat.addresses import AddressError, AliasResolver, BadSRSAddress, MailPath, parse_path, validate_address
from mailplat.config import SMTPLimits
from mailplat.cred import LoginBlocked, LoginGuard
from mailplat.ids import new_id
from mailplat.interfaces import Account, Client, DeliveryFailure, Envelope, IAccount, TemporaryFailure
from mailplat.numerals import is_digits
from mailplat.routing import Router, smtp_status
from mailplat.smtp.filtering import FilterChain, Outcome, header_block
from mailplat.smtp.policy import (
    Destination,
    HeaderFromRefused,
    RecipientRefused,
    RecipientSyntax,
    check_header_from,
    classify_recipient,
    may_send_as,
)
from mailplat.smtp.quota import SendingQuota
from mailplat.smtp.receiving import DataDecoder, Spool, SpoolFile
from mailplat.wire import sasl
from mailplat.wire.connections import ConnectionCounter, TLSHandshakeDeadline, set_no_delay
from mailplat.wire.lines import CommandReader, describe_failure, printable

__all__ = ["SMTPFactory", "SMTPServer"]

log = Logger()

COMMAND, DATA = "COMMAND", "DATA"


class Reply(Exception):
    """An SMTP reply that ends a command's processing."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(code, status, text)
        self.code, self.status, self.text = code, status, text


@dataclass
class Transaction:
    """The state between MAIL and the end of DATA (RFC 5321 3.3)."""

    sender: str
    recipients: list[str] = field(default_factory=list)
    accounts: dict[str, Account] = field(default_factory=dict)
    # Recipients in other domains (submission only), for the outbound queue.
    remote: list[str] = field(default_factory=list)
    # Addresses in other domains that our recipients' aliases forward to (queued with an SRS sender).
    forwarded: list[str] = field(default_factory=list)
    # What the filters said at MAIL and RCPT.
    filtered: Outcome = field(default_factory=Outcome)


def _reply_text(text: str, default: str) -> str:
    """A plugin's text made safe for one reply line: printable ASCII, spaces kept."""
    words = "".join(c if 0x20 <= ord(c) < 0x7F else " " for c in text[:300]).split()
    return " ".join(words) or default


# How each way an AUTH exchange can end without credentials is answered (RFC 4954 4, 6).
_SASL_REPLIES = {
    sasl.Why.CANCELLED: (501, "5.7.0"),
    sasl.Why.NOT_BASE64: (501, "5.5.2"),
    sasl.Why.MALFORMED: (501, "5.5.2"),
    sasl.Why.NOT_UTF8: (501, "5.5.2"),
    sasl.Why.AUTHZID: (535, "5.7.8"),
    sasl.Why.UNSUPPORTED: (504, "5.5.4"),
}


class SMTPServer(CommandReader, TLSHandshakeDeadline, smtp.ESMTP):
    """One SMTP session on the MX port: mail for our domains only."""

    def __init__(self, factory: SMTPFactory) -> None:
        # No challengers: the MX port never offers AUTH.
        super().__init__(chal={}, contextFactory=factory.tls)
        self.factory = factory
        self.limits: SMTPLimits = factory.limits
        self.host = factory.hostname.encode("ascii")
        self.timeout = self.limits.idle_timeout  # type: ignore[assignment]  # Twisted says int; any number of seconds works
        # TimeoutMixin schedules on the global reactor unless told otherwise.
        self.callLater = factory.clock.callLater  # type: ignore[method-assign]
        self.session = new_id()
        self.peer = ""
        self.max_command_line = self.limits.max_command_line
        self.mode = COMMAND
        self._errors = 0
        self._counted = False
        self._helo: Any = None
        self._esmtp = False
        self._transaction: Transaction | None = None
        self.authenticated_as: Account | None = None
        self._sasl: sasl.SASLExchange | None = None  # the AUTH exchange, while one is open
        self._decoder: DataDecoder | None = None
        self._spool_file: SpoolFile | None = None
        # What the filters said at connect and at HELO: applies to every message.
        self._connect_filtered = Outcome()
        self._helo_filtered = Outcome()
        self._refused_at_connect = ""

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = getattr(self.transport.getPeer(), "host", "unknown")
        if self.factory.implicit_tls:
            # Before the limits: even the refusal goes out only after the handshake.
            self.expect_tls_handshake(self.factory.clock, self.limits.tls_handshake_timeout)
        refusal = self.factory.connections.admit(self.peer)
        if refusal:
            log.info("{session} refused {peer}: {why}", session=self.session, peer=self.peer, why=refusal)
            self.transport.write(f"421 4.7.0 {self.factory.hostname} {refusal}, try again later\r\n".encode())
            self.transport.loseConnection()
            return
        self._counted = True
        set_no_delay(self.transport)
        log.info("{session} connect from {peer}", session=self.session, peer=self.peer)
        # What ESMTP.connectionMade does, without its greeting: the filters
        # may want to change it.
        self.canStartTLS = ITLSTransport.providedBy(self.transport) and self.ctx is not None
        self.startedTLS = self.factory.implicit_tls
        self._helo = None
        self.setTimeout(self.timeout)
        if self.factory.filters:
            # Guarded as a command is: a filter's bug is a reply, not a silent hang.
            self._wait(self._guarded(lambda: defer.Deferred.fromCoroutine(self._greet_after_filters())))
        else:
            self.sendCode(220, self.greeting())

    async def _greet_after_filters(self) -> None:
        outcome = await self.factory.filters.run("connect", self.session, self._client())
        if self.transport.disconnecting:
            return
        verdict = outcome.verdict
        if verdict is not None and verdict.action == "tempfail":
            self.reply(421, "4.7.1", _reply_text(verdict.text, "Service not available; try again later"))
            self.transport.loseConnection()
            return
        if verdict is not None and verdict.action == "reject":
            # RFC 5321 3.1: a 554 greeting; then only QUIT is useful.
            self._refused_at_connect = _reply_text(verdict.text, "Access denied")
            self.sendCode(554, f"5.7.1 {self._refused_at_connect}".encode())
            return
        self._connect_filtered = outcome
        self.sendCode(220, self.greeting())

    def _client(self) -> Client:
        return Client(self.peer, self.factory.listener, self._helo or "", self.authenticated_as)

    async def _filter(self, step: str, *args: Any) -> Outcome:
        """Run the filters for one step; a refusal becomes the command's reply."""
        outcome = await self.factory.filters.run(step, self.session, self._client(), *args)
        verdict = outcome.verdict
        if verdict is not None and verdict.action == "reject":
            raise Reply(550, "5.7.1", _reply_text(verdict.text, "Rejected by local policy"))
        if verdict is not None and verdict.action == "tempfail":
            status = "4.3.0" if outcome.failed else "4.7.1"
            raise Reply(451, status, _reply_text(verdict.text, "Try again later"))
        return outcome

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        self.forget_tls_handshake()
        self._abort_data()
        if self._counted:
            self._counted = False
            self.factory.connections.release(self.peer)
            log.info("{session} disconnect from {peer}", session=self.session, peer=self.peer)

    def greeting(self) -> bytes:
        return self.host + b" ESMTP mailplat"

    def tls_handshake_timed_out(self) -> None:
        log.info("{session} TLS handshake from {peer} not finished within {seconds:g} s, closing",
                 session=self.session, peer=self.peer, seconds=self.limits.tls_handshake_timeout)

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.factory.hostname} idle for too long, closing the connection")
        log.info("{session} idle timeout", session=self.session)
        if self.output_blocked:
            # The client does not read our replies: a clean close would wait for it forever.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def reply(self, code: int, status: str, text: str) -> None:
        """Send one reply with its enhanced status code (RFC 3463, 2034).

        Replies are US-ASCII (RFC 5321 2.4): whatever of the client's text a
        reply quotes, non-ASCII shows as "?".
        """
        self.sendCode(code, (f"{status} {text}" if status else text).encode("ascii", "replace"))
        if code >= 500:
            self._errors += 1
            if self._errors >= self.limits.max_errors:
                log.info("{session} too many errors, closing", session=self.session)
                self.sendCode(421, f"4.7.0 {self.factory.hostname} too many errors, closing the connection".encode())
                self.transport.loseConnection()

    # -- input (CommandReader hooks) ------------------------------------------

    def line_too_long(self) -> None:
        self.reply(500, "5.5.2", f"Line too long (limit {self.max_command_line} octets)")

    def bare_newline(self) -> None:
        self.reply(500, "5.5.2", "Syntax error: command lines must end with CRLF, not a bare LF")

    def cross_protocol_request(self, verb: str) -> None:
        log.info("{session} cross-protocol request from {peer}: {verb} as a command, closing", session=self.session, peer=self.peer, verb=verb)
        self.reply(421, "4.7.0", f"{self.factory.hostname} this is an SMTP server, not an HTTP one; closing the connection")
        self.transport.loseConnection()

    def reading_raw(self) -> bool:
        return self.mode == DATA

    def raw_received(self, data: bytes) -> bytes | None:
        assert self._decoder is not None
        return self._decoder.feed(data)

    def raw_ended(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._deliver())

    def command_received(self, line: bytes) -> Any:
        if self._sasl is not None:
            return self._sasl_step(line)
        if b"\0" in line:
            raise Reply(500, "5.5.2", "Syntax error: NUL character in command")
        verb, _, argument = line.strip().partition(b" ")
        if self._refused_at_connect and verb.upper() != b"QUIT":
            raise Reply(503, "5.7.1", f"{self._refused_at_connect}; only QUIT is accepted")
        handler = self.COMMANDS.get(verb.upper())
        if handler is None:
            shown = printable(verb, 20) or "(empty line)"
            raise Reply(500, "5.5.1", f"Command unrecognized: {shown}")
        return getattr(self, handler)(argument.strip())

    def command_failed(self, failure: Failure) -> None:
        """Every command's refusal (a Reply) and every bug end here, as one reply."""
        if isinstance(failure.value, Reply):
            r = failure.value
            self.reply(r.code, r.status, r.text)
            return
        log.error("{session} internal error: {error}", session=self.session, error=describe_failure(failure))
        if self.mode == DATA:
            # The rest of the message must not be read as commands.
            self._abort_data()
            self.mode = COMMAND
            self.reply(421, "4.3.0", f"{self.factory.hostname} local error in processing; closing the connection")
            self.transport.loseConnection()
            return
        self.reply(451, "4.3.0", "Local error in processing; try again later")

    COMMANDS: dict[bytes, str] = {
        b"HELO": "do_HELO",
        b"EHLO": "do_EHLO",
        b"MAIL": "do_MAIL",
        b"RCPT": "do_RCPT",
        b"DATA": "do_DATA",
        b"RSET": "do_RSET",
        b"NOOP": "do_NOOP",
        b"QUIT": "do_QUIT",
        b"VRFY": "do_VRFY",
        b"EXPN": "do_EXPN",
        b"HELP": "do_HELP",
        b"STARTTLS": "do_STARTTLS",
        b"AUTH": "do_AUTH",
    }

    # -- session commands ---------------------------------------------------

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        # Twisted advertises AUTH even before TLS and none of the keywords
        # below; a client needs them to pipeline, send 8-bit mail and learn
        # our size limit before sending (RFC 2920, 6152, 1870, 2034, 3207).
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.limits.max_message_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        # RFC 4954 4 / RFC 8314: no password before TLS, so AUTH appears only
        # inside TLS, and never on the MX port.
        if self.factory.submission and self.startedTLS and self.authenticated_as is None:
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    def do_HELO(self, argument: bytes) -> Any:
        return self._greet(argument, esmtp=False)

    def do_EHLO(self, argument: bytes) -> Any:
        return self._greet(argument, esmtp=True)

    def _greet(self, argument: bytes, esmtp: bool) -> Any:
        if not argument:
            raise Reply(501, "5.5.4", "Syntax: EHLO/HELO followed by your host name")
        self._helo = printable(argument.split()[0], 255)
        self._esmtp = esmtp
        self._transaction = None
        if self.factory.filters:
            return defer.Deferred.fromCoroutine(self._greet_after_helo_filters(argument))
        self._hello(argument)
        return None

    async def _greet_after_helo_filters(self, argument: bytes) -> None:
        self._helo_filtered = Outcome()
        try:
            self._helo_filtered = await self._filter("helo")
        except Reply:
            self._helo = None
            raise
        self._hello(argument)

    def _hello(self, argument: bytes) -> None:
        greeting = f"{self.factory.hostname} Hello {printable(argument)}"
        if not self._esmtp:
            return self.reply(250, "2.0.0", greeting)
        lines = [greeting.encode()] + self.listExtensions().splitlines()
        self.sendCode(250, b"\n".join(lines))

    def do_RSET(self, argument: bytes) -> None:
        self._transaction = None
        self.reply(250, "2.0.0", "OK")

    def do_NOOP(self, argument: bytes) -> None:
        self.reply(250, "2.0.0", "OK")

    def do_QUIT(self, argument: bytes) -> None:
        self.reply(221, "2.0.0", f"{self.factory.hostname} closing connection")
        self.transport.loseConnection()

    def do_VRFY(self, argument: bytes) -> None:
        # RFC 5321 3.5.3: do not confirm addresses to strangers.
        self.reply(252, "2.5.2", "Cannot VRFY user, but will accept the message and attempt delivery")

    def do_EXPN(self, argument: bytes) -> None:
        self.reply(502, "5.5.1", "EXPN is not available")

    def do_HELP(self, argument: bytes) -> None:
        self.reply(214, "2.0.0", "See RFC 5321; commands: " + " ".join(c.decode() for c in self.COMMANDS))

    def do_AUTH(self, argument: bytes) -> Any:
        if not self.factory.submission:
            raise Reply(503, "5.5.1", "Authentication is not available on this port; use the submission port")
        if not self.startedTLS:
            raise Reply(538, "5.7.11", "Encryption required: use STARTTLS first")
        if self.authenticated_as is not None:
            raise Reply(503, "5.5.1", "Already authenticated")
        if self._transaction is not None:
            raise Reply(503, "5.5.1", "AUTH is not allowed during a mail transaction")
        mechanism, _, initial = argument.partition(b" ")
        try:
            exchange = sasl.start(mechanism)
        except sasl.SASLError:
            raise Reply(504, "5.5.4", "Unsupported mechanism; use PLAIN or LOGIN")
        self._sasl = exchange
        if initial:
            return self._sasl_step(initial)
        self.sendCode(334, base64.b64encode(exchange.challenge))
        return None

    def _sasl_step(self, line: bytes) -> Any:
        """One client line of an AUTH exchange (RFC 4954 4): a refusal leaves the session open."""
        exchange, self._sasl = self._sasl, None
        assert exchange is not None
        try:
            credentials = exchange.respond(line)
        except sasl.SASLError as e:
            log.info("{session} auth ended: {why}", session=self.session, why=e.text)
            raise Reply(*_SASL_REPLIES[e.why], e.text)
        if credentials is None:
            self._sasl = exchange
            self.sendCode(334, base64.b64encode(exchange.challenge))
            return None
        return defer.Deferred.fromCoroutine(self._login(credentials.username, credentials.password))

    async def _login(self, user: str, password: str) -> None:
        try:
            account, _ = await self.factory.login_guard.login(self.peer, user, password, IAccount)
        except LoginBlocked:
            log.info("{session} auth refused: {peer} is blocked", session=self.session, peer=self.peer)
            raise Reply(454, "4.7.0", "Too many failed logins from your address; try again later")
        except TemporaryFailure as e:
            # RFC 4954 6: the auth backend is down, the credentials may be fine.
            log.warn("{session} auth for {user!r} not checked: {text}", session=self.session, user=user[:100], text=e.text)
            raise Reply(454, "4.7.0", "Temporary authentication failure; try again later")
        except UnauthorizedLogin:
            log.info("{session} auth failed for {user!r} from {peer}", session=self.session, user=user[:100], peer=self.peer)
            raise Reply(535, "5.7.8", "Authentication credentials invalid")
        self.authenticated_as = account
        log.info("{session} auth {user}", session=self.session, user=self.authenticated_as.address)
        self.reply(235, "2.7.0", "Authentication successful")

    def do_STARTTLS(self, argument: bytes) -> None:
        if self.startedTLS:
            raise Reply(503, "5.5.1", "TLS is already active")
        if not self.canStartTLS:
            raise Reply(502, "5.5.1", "STARTTLS is not available")
        if argument:
            raise Reply(501, "5.5.4", "Syntax: STARTTLS takes no argument")
        self.reply(220, "2.0.0", "Ready to start TLS")
        # CVE-2011-0411: anything pipelined after STARTTLS arrived in clear
        # text and must not be executed inside the TLS session.
        self.discard_pending_input()
        self.transport.startTLS(self.ctx)
        self.expect_tls_handshake(self.factory.clock, self.limits.tls_handshake_timeout)
        self.startedTLS = True
        # RFC 3207 4.2: forget everything learnt before TLS.
        self._helo = None
        self._transaction = None

    # -- the mail transaction -----------------------------------------------

    def _path(self, argument: bytes, prefix: bytes) -> MailPath:
        if argument[: len(prefix)].upper() != prefix:
            raise Reply(501, "5.5.4", f"Syntax: {prefix.decode()}<address>")
        try:
            # RFC 5321 4.5.1: RCPT TO:<Postmaster> is our primary domain's postmaster.
            postmaster = self.factory.resolver.primary_domain if prefix == b"TO:" else ""
            return parse_path(argument[len(prefix) :], postmaster_domain=postmaster)
        except AddressError as e:
            status = "5.1.7" if prefix == b"FROM:" else "5.1.3"
            raise Reply(501, status, f"Bad address syntax: {e}")

    def do_MAIL(self, argument: bytes) -> Any:
        if self._helo is None:
            raise Reply(503, "5.5.1", "Send EHLO or HELO first")
        if self.factory.submission and self.authenticated_as is None:
            raise Reply(530, "5.7.0", "Authentication required")
        if self._transaction is not None:
            raise Reply(503, "5.5.1", "Nested MAIL command: one sender per transaction, or RSET first")
        path = self._path(argument, b"FROM:")
        for key, value in path.params.items():
            if key == "SIZE" and self._esmtp:
                if not is_digits(value):
                    raise Reply(501, "5.5.4", "Syntax: SIZE=<number of octets>")
                if int(value) > self.limits.max_message_size:
                    raise Reply(552, "5.3.4", f"Message size exceeds the limit of {self.limits.max_message_size} octets")
            elif key == "BODY" and self._esmtp:
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise Reply(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
            else:
                raise Reply(555, "5.5.4", f"Unsupported MAIL parameter {printable(key, 30)}")
        if self.factory.submission:
            return defer.Deferred.fromCoroutine(self._check_sender(path.address))
        if self.factory.filters:
            return defer.Deferred.fromCoroutine(self._start_transaction(path.address))
        self._transaction = Transaction(sender=path.address)
        self.reply(250, "2.1.0", "Sender OK")
        return None

    async def _start_transaction(self, sender: str) -> None:
        filtered = await self._filter("mail", sender) if self.factory.filters else Outcome()
        self._transaction = Transaction(sender=sender, filtered=filtered)
        self.reply(250, "2.1.0", "Sender OK")

    async def _check_sender(self, sender: str) -> None:
        """RFC 6409 6.1: an authenticated user sends as themselves or an alias of theirs."""
        account = self.authenticated_as
        assert account is not None
        if not await may_send_as(account, sender, self.factory.resolver, self.factory.send_as.get(account.address, ())):
            log.info("{session} sender <{sender}> refused for {user}", session=self.session, sender=printable(sender, 300), user=account.address)
            raise Reply(553, "5.7.1", f"<{printable(sender)}>: Sender address rejected: not owned by {account.address}")
        quota = self.factory.quota
        if quota is not None and not quota.message(account.address):
            log.info(
                "{session} rate limit: {user} over max_messages_per_hour = {limit}",
                session=self.session, user=account.address, limit=quota.max_messages_per_hour,
            )
            raise Reply(451, "4.7.1", f"Too many messages from {account.address} (limit {quota.max_messages_per_hour} an hour); try again later")
        await self._start_transaction(sender)

    def do_RCPT(self, argument: bytes) -> Any:
        transaction = self._transaction
        if transaction is None:
            raise Reply(503, "5.5.1", "Need MAIL before RCPT")
        if len(transaction.recipients) >= self.limits.max_recipients:
            raise Reply(452, "4.5.3", f"Too many recipients (limit {self.limits.max_recipients} per message)")
        path = self._path(argument, b"TO:")
        if path.params:
            raise Reply(555, "5.5.4", f"Unsupported RCPT parameter {printable(next(iter(path.params)), 30)}")
        address = path.address
        if not address:
            raise Reply(501, "5.1.3", "Bad recipient address syntax: <> is not a recipient")
        quota, account = self.factory.quota, self.authenticated_as
        if quota is not None and account is not None and not quota.recipient(account.address):
            log.info(
                "{session} rate limit: {user} over max_recipients_per_hour = {limit}",
                session=self.session, user=account.address, limit=quota.max_recipients_per_hour,
            )
            raise Reply(451, "4.7.1", f"Too many recipients from {account.address} (limit {quota.max_recipients_per_hour} an hour); try again later")

        def reject(code: int, status: str, why: str) -> Reply:
            log.info("{session} reject rcpt <{rcpt}>: {why}", session=self.session, rcpt=printable(address, 300), why=why)
            return Reply(code, status, f"<{printable(address)}>: Recipient address rejected: {why}")

        try:
            destination = classify_recipient(path, self.factory.resolver)
        except RecipientSyntax as refused:
            # 501, not 553: the argument fails RFC 5321's Mailbox syntax
            # (4.1.2), a syntax error (4.2.2); 553 is a well-formed name refused.
            raise reject(501, "5.1.3", f"Bad recipient address syntax: {refused.reason}")
        except RecipientRefused as refused:
            raise reject(550, "5.7.1", f"Relay access denied ({refused.reason})")
        if destination is Destination.REMOTE:
            # Never relay for an unauthenticated client: only submission has one.
            if not (self.factory.submission and self.authenticated_as is not None and self.factory.router.can_relay):
                raise reject(550, "5.7.1", "Relay access denied (we do not serve this domain)")
            if self.factory.filters:
                return defer.Deferred.fromCoroutine(self._accept_remote_after_filters(transaction, address))
            return self._accept_remote(transaction, address)
        try:
            if not self.factory.resolver.is_srs(address):  # never a mailbox name: resolved by its hash
                validate_address(address.lower())
        except AddressError as e:
            raise reject(550, "5.1.1", f"invalid mailbox name: {e}")

        async def resolve() -> None:
            try:
                expansion = await self.factory.resolver.expand(address)
            except BadSRSAddress as e:
                raise reject(550, "5.1.1", f"User unknown ({e})")
            except AddressError as e:
                raise reject(550, "5.4.6", str(e))
            except TemporaryFailure as e:
                raise reject(451, "4.3.0", e.text)
            if not expansion:
                raise reject(550, "5.1.1", "User unknown")
            # Forwarded to other domains: the recipient is ours, so this is
            # no relaying for the client, but it needs the queue.
            if expansion.remote and not self.factory.router.can_relay:
                raise reject(451, "4.3.0", "cannot forward mail now; try again later")
            # A mailbox already full takes no message: refused for now, as the
            # user may make room (Dovecot's lmtp_rcpt_check_quota).  One that
            # a message would take over is refused at the end of DATA.
            if expansion.accounts and not expansion.remote and all([await self.factory.router.is_full(a) for a in expansion.accounts]):
                raise reject(452, "4.2.2", "Mailbox is full; try again later")
            if self.factory.filters:
                await self._filter_recipient(transaction, address)
            if self._transaction is not transaction:
                return
            transaction.recipients.append(address)
            for account in expansion.accounts:
                transaction.accounts[account.address] = account
            for target in expansion.remote:
                if target not in transaction.forwarded:
                    transaction.forwarded.append(target)
            forwards = f" (forwarded to {','.join(expansion.remote)})" if expansion.remote else ""
            log.info(
                "{session} accept from=<{sender}> rcpt=<{rcpt}>{forwards}",
                session=self.session, sender=transaction.sender, rcpt=address, forwards=forwards,
            )
            self.reply(250, "2.1.5", "Recipient OK")

        return defer.Deferred.fromCoroutine(resolve())

    async def _filter_recipient(self, transaction: Transaction, address: str) -> None:
        filtered = await self._filter("rcpt", transaction.sender, address)
        transaction.filtered = transaction.filtered.merge(filtered)

    async def _accept_remote_after_filters(self, transaction: Transaction, address: str) -> None:
        await self._filter_recipient(transaction, address)
        if self._transaction is transaction:
            self._accept_remote(transaction, address)

    def _accept_remote(self, transaction: Transaction, address: str) -> None:
        transaction.recipients.append(address)
        transaction.remote.append(address)
        log.info("{session} accept from=<{sender}> rcpt=<{rcpt}> (relay)", session=self.session, sender=transaction.sender, rcpt=address)
        self.reply(250, "2.1.5", "Recipient OK")

    def do_DATA(self, argument: bytes) -> None:
        transaction = self._transaction
        if transaction is None:
            raise Reply(503, "5.5.1", "Need MAIL before DATA")
        if not transaction.recipients:
            raise Reply(554, "5.5.1", "No valid recipients")
        if argument:
            raise Reply(501, "5.5.4", "Syntax: DATA takes no argument")
        self.queue_id = new_id()
        self._spool_file = self.factory.spool.create(self.queue_id)
        self._spool_file.write(self._received_header(transaction))
        self._decoder = DataDecoder(
            self._spool_file,
            max_size=self.limits.max_message_size,
            max_line=self.limits.max_text_line,
            max_received=self.limits.max_received_headers,
            max_header_fields=self.limits.max_header_fields,
        )
        if self.factory.submission:
            # The fields _missing_headers asks about, and the one _deliver checks.
            self._decoder.watch = frozenset({b"date", b"message-id", b"from"})
            self._decoder.add_headers = self._missing_headers
        self._decoder.authserv_id = self.factory.hostname.lower().encode()
        self._decoder.owned_fields = self.factory.filters.owned_fields
        self.mode = DATA
        self.reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def _missing_headers(self, present: set[bytes]) -> bytes:
        """RFC 6409 8.2, 8.3: a submission server adds Date: and Message-ID: when missing."""
        added = b""
        if b"date" not in present:
            added += b"Date: " + email.utils.formatdate(localtime=True).encode() + b"\r\n"
        if b"message-id" not in present:
            added += f"Message-ID: <{self.queue_id}.{new_id()}@{self.factory.hostname}>\r\n".encode()
        return added

    def _received_header(self, transaction: Transaction) -> bytes:
        """RFC 5321 4.4: who handed us the message, when, and how."""
        # RFC 3848: ESMTPS with TLS, ESMTPSA when also authenticated.
        protocol_name = "ESMTPS" if self.startedTLS else ("ESMTP" if self._esmtp else "SMTP")
        if self.authenticated_as is not None:
            protocol_name += "A"
        recipient = f"\r\n\tfor <{transaction.recipients[0]}>" if len(transaction.recipients) == 1 else ""
        date = email.utils.format_datetime(email.utils.localtime())
        return (
            f"Received: from {self._helo} ([{self.peer}])\r\n"
            f"\tby {self.factory.hostname} (mailplat) with {protocol_name} id {self.queue_id}"
            f"{recipient}; {date}\r\n"
        ).encode("utf-8")

    async def _deliver(self) -> None:
        transaction, decoder, spool_file = self._transaction, self._decoder, self._spool_file
        assert transaction is not None and decoder is not None and spool_file is not None
        self.mode = COMMAND
        self._transaction = self._decoder = self._spool_file = None
        queue_id = self.queue_id
        try:
            if decoder.problem:
                code, status, text = decoder.problem
                log.info("{session} {queue_id} refused: {text}", session=self.session, queue_id=queue_id, text=text)
                self.reply(code, status, text)
                return
            if self.authenticated_as is not None:
                try:
                    await check_header_from(
                        self.authenticated_as, decoder.watched.get(b"from"), self.factory.resolver,
                        self.factory.send_as.get(self.authenticated_as.address, ()),
                    )
                except HeaderFromRefused as refused:
                    log.info("{session} {queue_id} refused: {text}", session=self.session, queue_id=queue_id, text=refused.text)
                    self.reply(553, "5.7.1", refused.text)
                    return
            decoder.finish()
            message = spool_file.finish(transaction.sender)
            folder = ""
            if self.factory.filters:
                try:
                    filtered = await self._filter_message(transaction, message)
                except Reply as refusal:
                    log.info("{session} {queue_id} refused by a filter: {text}", session=self.session, queue_id=queue_id, text=refusal.text)
                    self.reply(refusal.code, refusal.status, refusal.text)
                    return
                if filtered.discard:
                    log.info("{session} {queue_id} discarded by a filter", session=self.session, queue_id=queue_id)
                    self.reply(250, "2.0.0", f"OK: queued as {queue_id}")
                    return
                message = message.with_headers(header_block(filtered.headers))
                folder = "Quarantine" if filtered.quarantine else ""
            if self.factory.signer is not None and self.authenticated_as is not None:
                message = await self._sign(message)
            envelope = Envelope(
                queue_id=queue_id,
                sender=transaction.sender,
                recipients=tuple(transaction.accounts.values()),
                client_address=self.peer,
                helo=self._helo or "",
                authenticated_as=self.authenticated_as,
                folder=folder,
            )
            try:
                queued = await self.factory.router.hand_off(envelope, message, transaction.remote, transaction.forwarded)
            except DeliveryFailure as e:
                # The one mapping of a delivery failure to a reply (RFC 5321 4.2.5).
                code, status, text = smtp_status(e)
                log.info("{session} {queue_id} not delivered: {text}", session=self.session, queue_id=queue_id, text=e.text)
                self.reply(code, status, text)
                return
            log.info(
                "{session} {queue_id} delivered from=<{sender}> size={size} to={rcpts}",
                session=self.session, queue_id=queue_id, sender=transaction.sender,
                size=message.size, rcpts=",".join([a.address for a in envelope.recipients if a.address not in queued] + [f"{r} (queued)" for r in queued]),
            )
            self.reply(250, "2.0.0", f"OK: queued as {queue_id}")
        finally:
            spool_file.discard()

    async def _sign(self, message: Any) -> Any:
        """DKIM-sign an authenticated user's message (in a thread: it is CPU
        work on the whole message); unsigned, and logged, if it cannot be."""

        def sign() -> bytes:
            with message.open() as source:
                return self.factory.signer.sign_message(source)

        try:
            signature = await deferToThreadPool(self.factory.clock, self.factory.signing_threads, sign)
        except Exception as e:
            log.warn("{session} {queue_id} sent unsigned: {error}", session=self.session, queue_id=self.queue_id, error=e)
            return message
        return message.with_headers(signature)

    async def _filter_message(self, transaction: Transaction, message: Any) -> Outcome:
        """The end-of-DATA filters, with what earlier steps decided."""
        filtered = await self._filter("data", transaction.sender, tuple(transaction.recipients), message)
        filtered = self._connect_filtered.merge(self._helo_filtered).merge(transaction.filtered).merge(filtered)
        if filtered.quarantine and (transaction.remote or transaction.forwarded) and not filtered.discard:
            # A quarantine lives in a local mailbox: mail for other domains
            # (forwarded ones too) cannot be held there, so it is refused rather than relayed.
            raise Reply(550, "5.7.1", "Message held by a content filter; it cannot be relayed")
        return filtered

    def _abort_data(self) -> None:
        if self._spool_file is not None:
            self._spool_file.discard()
            self._spool_file = None
        self._decoder = None


class SMTPFactory(protocol.ServerFactory):
    """Shared state of one SMTP listener: policy, limits and connection counts."""

    noisy = False  # our own connect/disconnect lines say it better

    protocol = SMTPServer

    def __init__(
        self,
        hostname: str,
        limits: SMTPLimits,
        resolver: AliasResolver,
        router: Router,
        spool: Spool,
        clock: Any,
        tls: Any = None,
        submission: bool = False,
        implicit_tls: bool = False,
        login_guard: LoginGuard | None = None,
        listener: str = "smtp",
        filters: FilterChain | None = None,
        signer: Any = None,
        signing_threads: Any = None,
        quota: SendingQuota | None = None,
        send_as: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self.hostname = hostname
        self.limits = limits
        self.resolver = resolver
        # Where accepted mail goes: our recipients' delivery, the queue for the rest.
        self.router = router
        self.spool = spool
        self.clock = clock
        self.tls = tls
        # Submission (RFC 6409): AUTH after TLS, then mail from the user's own addresses.
        self.submission = submission
        self.implicit_tls = implicit_tls
        self.login_guard = login_guard
        self.listener = listener
        # DKIM signing of what authenticated users send ([dkim] tables), in
        # the service's thread pool for CPU work on whole messages.
        self.signer = signer
        self.signing_threads = signing_threads
        # What authenticated users may send: the hourly limits, shared by
        # every submission listener, and the addresses each may also send
        # as ([submission] send_as, canonical).
        self.quota = quota
        self.send_as: Mapping[str, Collection[str]] = send_as or {}
        self.filters = filters if filters is not None else FilterChain((), clock)
        self.connections = ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)

    def buildProtocol(self, addr: Any) -> SMTPServer:
        p = SMTPServer(self)
        p.factory = self
        return p
