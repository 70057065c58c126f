"""The ``lmtp`` delivery backend: every accepted message goes to an LMTP server (RFC 2033).

LMTP is SMTP for the last hop: the server (Dovecot's ``lmtp``, Cyrus's
``lmtpd``) owns the mailboxes, and answers the end of DATA once per
accepted recipient, so that each recipient's fate is known.  mailplat
still decides at RCPT TO which addresses exist (``[auth]``); the LMTP
server must know the same users.

Options (every other key is refused)::

    [delivery]
    backend = "lmtp"
    address = "unix:path=/run/dovecot/lmtp"   # or "tcp:host=127.0.0.1:port=24"
    timeout = 300           # seconds to wait for each reply (and for the
                            # server to read each part of the message)
    max_connections = 10    # connections open at once, kept and reused
    folders = "inbox"       # or "detail": see below

Each connection says ``LHLO`` (with ``hostname``) once, then carries one
transaction after another: ``MAIL FROM``, one ``RCPT TO`` per recipient
(pipelined when the server offers PIPELINING), ``DATA``, the message
streamed 64 KiB at a time only as fast as the server reads it
(dot-stuffed across chunk boundaries), and one reply per accepted
recipient.  At most ``max_connections`` are open at once (per worker
process); a delivery that finds them all busy waits for one.  A connection
left unused for ``IDLE_TIMEOUT`` seconds is closed.  A kept connection may
have been closed by the server meanwhile: when it fails before its first
reply, the delivery starts over once on a new connection (nothing has
been delivered at that point).

Failures: a server that cannot be reached, does not answer within
``timeout``, or breaks the protocol gives TemporaryFailure (451): the
details go to the log, not to the SMTP client.  A recipient refused with
5xx is a permanent failure, anything else that is not 2xx a temporary one.

Partial success: when the LMTP server took the message for some
recipients and not for others, ``deliver`` raises PartialFailure naming
each refused recipient (5xx: permanent, anything else: temporary); the
SMTP client hears 250 and mailplat's queue retries or bounces those
recipients, so nobody gets the message twice.  When no recipient got it,
the whole message fails: PermanentFailure (554) if every refusal was
permanent, else TemporaryFailure (451).

Folders.  An envelope's ``folder`` (``"Quarantine"`` when a filter
quarantined the message) has no place in LMTP itself.  With
``folders = "inbox"`` (the default) it is ignored: the message goes to the
inbox, with the headers the filters added (``X-Spam-Flag`` ...), which a
Sieve script on the LMTP server can act on; a warning is logged the first
time.  With ``folders = "detail"`` the folder becomes the address detail,
``RCPT TO:<alice+Quarantine@example.org>``, which Dovecot saves into that
folder when configured with ``lmtp_save_to_detail_mailbox = yes`` (and
``lda_mailbox_autocreate = yes`` to create it; ``recipient_delimiter``
must be ``+``, Dovecot's default) and which Cyrus saves into the folder
when it exists.  Use it only with such a server: any other refuses or
misfiles the address.
"""

from __future__ import annotations

import collections
import re
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.interfaces import (
    Account,
    BackendContext,
    Envelope,
    IDeliveryBackend,
    PartialFailure,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)
from mailplat.options import OptionReader
from mailplat.wire.smtpclient import (
    printable_line,
    ClientError,
    ConnectFailed,
    ConnectionClosed,
    IncompleteReplies,
    NoReply,
    ProtocolError,
    Reply,
    SMTPClient,
    StaleSession,
    Stalled,
    Timeouts,
    connect,
)

__all__ = ["LMTPDelivery", "Reply", "build"]

log = Logger()

DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_CONNECTIONS = 10
FOLDERS = ("inbox", "detail")
# A kept connection unused for this long is closed: each one holds a
# process of the LMTP server (Dovecot's lmtp serves one client per process).
IDLE_TIMEOUT = 30.0
# What an SMTP client is shown when the server fails us (the details go to the log).
_SHOWN = {
    ConnectionClosed: "the mailbox server closed the connection; try again later",
    NoReply: "the mailbox server did not answer; try again later",
    ProtocolError: "the mailbox server's reply was not understood; try again later",
    Stalled: "the mailbox server stopped reading the message; try again later",
}
# What of a server's reply text an SMTP client is shown.
MAX_TEXT = 200
_FOLDER = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class _LMTPConnection(SMTPClient):
    """One pooled connection: the client plus what the pool keeps on it."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock, lmtp=True)
        self.on_lost: Any = None  # set by the pool while the connection is idle
        self.idle_call: Any = None
        self.discarded = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.idle_call is not None and self.idle_call.active():
            self.idle_call.cancel()
        self.idle_call = None
        super().connectionLost(reason)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(self)


@implementer(IDeliveryBackend)
class LMTPDelivery(service.Service):
    """Hands messages to an LMTP server over a small pool of kept connections."""

    def __init__(
        self, endpoint: Any, address: str, hostname: str, timeout: float, max_connections: int, folders: str, clock: Any,
    ) -> None:
        self.endpoint = endpoint
        self.address = address
        self.hostname = hostname
        self.timeout = timeout
        self.max_connections = max_connections
        self.folders = folders
        self.clock = clock
        self._idle: list[_LMTPConnection] = []
        # Connections open, being opened, in use or idle: never above max_connections.
        self._open = 0
        self._waiters: collections.deque[defer.Deferred[_LMTPConnection | None]] = collections.deque()
        self._in_progress: set[defer.Deferred[None]] = set()
        self._warned_folder = False
        self._stopping = False
        self._make = lambda: _LMTPConnection(clock)

    # -- IService -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        log.info("lmtp delivery to {address} (at most {n} connections)", address=self.address, n=self.max_connections)

    def stopService(self) -> defer.Deferred[None]:
        """Let deliveries under way finish, then say QUIT on every connection."""
        super().stopService()
        self._stopping = True
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._in_progress:
            log.info("waiting for {n} LMTP deliveries to finish", n=len(self._in_progress))
            await defer.DeferredList(list(self._in_progress), consumeErrors=True)
        closing = []
        while self._idle:
            connection = self._idle.pop()
            self._unidle(connection)
            connection.quit()
            self._free_slot()
            closing.append(connection)
        for connection in closing:
            # The server answers QUIT at once; one that does not is dropped.
            try:
                await connection.lost.addTimeout(5, self.clock)
            except defer.TimeoutError:
                connection.abort()

    # -- delivery -------------------------------------------------------------------

    def deliver(self, envelope: Envelope, message: SpooledMessage) -> defer.Deferred[None]:
        """Deliver to every recipient (see the module's docstring for partial failures)."""
        d = defer.Deferred.fromCoroutine(self._deliver(envelope, message))
        if not d.called:
            # Kept until done, so that stopping the server waits for it.
            self._in_progress.add(d)
            d.addBoth(self._finished, d)
        return d

    def _finished(self, result: Any, d: defer.Deferred[None]) -> Any:
        self._in_progress.discard(d)
        return result

    async def _deliver(self, envelope: Envelope, message: SpooledMessage) -> None:
        recipients = [self._rcpt_address(account, envelope) for account in envelope.recipients]
        for attempt in (1, 2):
            connection = await self._connection()
            try:
                replies = await self._transaction(connection, envelope, recipients, message)
            except StaleSession as e:
                self._discard(connection)
                if attempt == 1:
                    log.info("{queue_id}: kept LMTP connection was closed ({why}); trying a new one", queue_id=envelope.queue_id, why=e)
                    continue
                raise TemporaryFailure("the mailbox server closed the connection; try again later")
            except BaseException:
                self._discard(connection)
                raise
            break
        self._judge(envelope, replies)

    def _rcpt_address(self, account: Account, envelope: Envelope) -> str:
        """The RCPT TO address: the account's, or with folders = "detail" its folder as +detail."""
        if not envelope.folder:
            return account.address
        if self.folders == "detail" and _FOLDER.fullmatch(envelope.folder):
            return f"{account.local_part}+{envelope.folder}@{account.domain}"
        if not self._warned_folder:
            self._warned_folder = True
            log.warn(  # noqa: G010 - twisted.logger's Logger has warn(), no warning()
                "{queue_id}: the {folder} folder is not passed over LMTP (folders = {setting!r}): delivered to the inbox; "
                "set folders = \"detail\" for Dovecot with lmtp_save_to_detail_mailbox = yes, or file it with Sieve "
                "(this is logged once)",
                queue_id=envelope.queue_id, folder=envelope.folder, setting=self.folders,
            )
        return account.address

    async def _transaction(
        self, connection: _LMTPConnection, envelope: Envelope, recipients: list[str], message: SpooledMessage,
    ) -> list[Reply]:
        """One MAIL .. final replies transaction; each recipient's reply.

        The connection goes back to the pool when it can carry another
        transaction, else it is closed.
        """
        try:
            replies = await connection.transaction(
                envelope.sender, recipients, message.open, Timeouts.every(self.timeout), size=message.size,
            )
        except StaleSession:
            raise  # _deliver starts over on a new connection
        except IncompleteReplies as e:
            # RFC 2033 4.2: those answered before have the message; the others are unknown, so retried.
            problem = f"no reply after the message: {e.cause}"
            self._log_problem(envelope, problem)
            self._discard(connection)
            return [reply if reply is not None else Reply(451, (f"4.4.2 {problem}",)) for reply in e.replies]
        except ClientError as e:
            self._log_problem(envelope, str(e))
            raise TemporaryFailure(_SHOWN.get(type(e), "the mailbox server failed; try again later")) from None
        if connection.reusable():
            self._release(connection)
        else:
            self._discard(connection, graceful=True)
        return replies

    def _judge(self, envelope: Envelope, replies: list[Reply]) -> None:
        """Every recipient's reply into delivered, PermanentFailure or TemporaryFailure."""
        failed = [(account, reply) for account, reply in zip(envelope.recipients, replies) if reply.kind != 2]
        if not failed:
            return
        for account, reply in failed:
            log.warn(  # noqa: G010 - twisted.logger's Logger has warn(), no warning()
                "{queue_id}: LMTP server {address} did not take the message for <{rcpt}>: {reply}",
                queue_id=envelope.queue_id, address=self.address, rcpt=account.address, reply=printable_line(str(reply)),
            )
        delivered = len(replies) - len(failed)
        if delivered:
            raise PartialFailure({
                account: (PermanentFailure if reply.kind == 5 else TemporaryFailure)(
                    f"mailbox server {'refused' if reply.kind == 5 else 'deferred'} <{account.address}>: {printable_line(str(reply))[:MAX_TEXT]}"
                )
                for account, reply in failed
            })
        permanent = all(reply.kind == 5 for _, reply in failed)
        account, reply = next(((a, r) for a, r in failed if r.kind != 5), failed[0])
        text = f"mailbox server {'refused' if permanent else 'deferred'} <{account.address}>: {printable_line(str(reply))[:MAX_TEXT]}"
        if len(failed) > 1:
            text += f" (and {len(failed) - 1} more)"
        if permanent:
            raise PermanentFailure(text)
        raise TemporaryFailure(text)

    def _log_problem(self, envelope: Envelope, what: str) -> None:
        log.warn("{queue_id}: LMTP server {address}: {what}", queue_id=envelope.queue_id, address=self.address, what=what)  # noqa: G010 - twisted.logger's Logger has warn(), no warning()

    # -- the pool ---------------------------------------------------------------------

    async def _connection(self) -> _LMTPConnection:
        """A kept connection, or a new one once there is room for it."""
        if self._idle:
            connection = self._idle.pop()
            self._unidle(connection)
            return connection
        if self._open < self.max_connections:
            self._open += 1
        else:
            waiter: defer.Deferred[_LMTPConnection | None] = defer.Deferred(lambda d: self._waiters.remove(d))
            self._waiters.append(waiter)
            handed = await waiter
            if handed is not None:
                return handed
            # None: a connection was closed and its room handed to us.
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    async def _connect(self) -> _LMTPConnection:
        """Connect, read the greeting and say LHLO."""
        try:
            connection = await connect(self.endpoint, self._make, self.clock, self.timeout)
        except ConnectFailed as e:
            log.warn("cannot connect to the LMTP server {address}: {error}", address=self.address, error=e)  # noqa: G010 - twisted.logger's Logger has warn(), no warning()
            raise TemporaryFailure("mailbox server unavailable; try again later")
        assert isinstance(connection, _LMTPConnection)
        try:
            greeting = await connection.greeting(self.timeout)
            if greeting.code != 220:
                raise ProtocolError(f"greeted with {printable_line(str(greeting))}")
            lhlo = await connection.hello(self.hostname, self.timeout)
            if lhlo.code != 250:
                raise ProtocolError(f"LHLO answered with {printable_line(str(lhlo))}")
        except BaseException as e:
            connection.abort()
            if not isinstance(e, ClientError):
                raise
            log.warn("LMTP server {address} cannot be used: {why}", address=self.address, why=str(e))  # noqa: G010 - twisted.logger's Logger has warn(), no warning()
            raise TemporaryFailure("mailbox server unavailable; try again later")
        return connection

    def _release(self, connection: _LMTPConnection) -> None:
        """A connection that is ready for another transaction: to a waiter, or kept."""
        if connection.closed:
            self._free_slot()
            return
        if self._waiters:
            self._waiters.popleft().callback(connection)
            return
        if self._stopping:
            connection.quit()
            self._free_slot()
            return
        connection.on_lost = self._idle_lost
        connection.idle_call = self.clock.callLater(IDLE_TIMEOUT, self._idle_expired, connection)
        self._idle.append(connection)

    def _discard(self, connection: _LMTPConnection, graceful: bool = False) -> None:
        """Close a connection that is not to be used again (once: later calls do nothing).

        ``graceful`` after a transaction that ended in order (say QUIT);
        otherwise the state of the dialogue is unknown: drop it.
        """
        if connection.discarded:
            return
        connection.discarded = True
        if graceful:
            connection.quit()
        else:
            connection.abort()
        self._free_slot()

    def _unidle(self, connection: _LMTPConnection) -> None:
        connection.on_lost = None
        if connection.idle_call is not None and connection.idle_call.active():
            connection.idle_call.cancel()
        connection.idle_call = None

    def _idle_lost(self, connection: _LMTPConnection) -> None:
        """The server closed a kept connection."""
        if connection in self._idle:
            self._idle.remove(connection)
            self._free_slot()

    def _idle_expired(self, connection: _LMTPConnection) -> None:
        connection.idle_call = None
        if connection in self._idle:
            self._idle.remove(connection)
            self._unidle(connection)
            connection.quit()
            self._free_slot()

    def _free_slot(self) -> None:
        """A connection is gone: its room goes to the first delivery waiting, if any."""
        if self._waiters:
            self._waiters.popleft().callback(None)
        else:
            self._open -= 1


def build(options: dict[str, Any], context: BackendContext) -> LMTPDelivery:
    """Check the options of ``[delivery] backend = "lmtp"`` and make the backend."""
    reader = OptionReader(options, "lmtp", context=context)
    address, endpoint = reader.endpoint("address", example='"unix:path=/run/dovecot/lmtp" or "tcp:host=127.0.0.1:port=24"')
    timeout = reader.number("timeout", DEFAULT_TIMEOUT, unit="of seconds")
    max_connections = reader.integer("max_connections", DEFAULT_MAX_CONNECTIONS, at_most=1000)
    folders = reader.choice(
        "folders", FOLDERS, "inbox", fix='folders = "inbox" ignores the Quarantine folder; "detail" sends it as alice+Quarantine@...',
    )
    reader.finish()
    return LMTPDelivery(endpoint, address, context.hostname, timeout, max_connections, folders, context.reactor)
