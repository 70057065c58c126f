"""Driving SMTPServer and POP3Server in-process: a StringTransport for the wire,
a task.Clock for time (as Twisted's own test_smtp.py does).

For what only needs time to pass (timeouts, login delays and blocks), so
that no test waits on the wall clock.  The backends here are small real
providers of our interfaces (an in-memory user table and mailbox); the
protocol code is ours, unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import address, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.addresses import AliasResolver
from mailplat.config import POP3Settings, SMTPLimits, SubmissionSettings
from mailplat.cred import AuthBackendChecker, LoginGuard, MailRealm
from mailplat.interfaces import (
    Account,
    IAuthBackend,
    IDeliveryBackend,
    IMailboxBackend,
    IMaildrop,
    MaildropEntry,
)
from mailplat.plugins import call
from mailplat.pop3.server import POP3Factory
from mailplat.routing import Router
from mailplat.smtp.quota import SendingQuota
from mailplat.smtp.server import SMTPFactory

class SyncThreadPool:
    """A backend's or the queue's "thread" work, done at once on the calling
    thread, so a test needs no thread of its own for it."""

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        try:
            result, ok = f(*args, **kwargs), True
        except BaseException:
            result, ok = Failure(), False
        on_result(ok, result)


USERS = {"alice@example.org": "alice-password", "bob@example.org": "bob-password"}


@implementer(IAuthBackend)
class Users:
    """Users in a dict; ``broken`` makes every call raise (a backend's bug)."""

    def __init__(self) -> None:
        self.broken: Exception | None = None

    def authenticate(self, address: str, password: str) -> Account | None:
        if self.broken is not None:
            raise self.broken
        return Account(address) if USERS.get(address) == password else None

    def lookup(self, address: str) -> Account | None:
        return Account(address) if address in USERS else None


@implementer(IMaildrop)
class Maildrop:
    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages

    def entries(self) -> list[MaildropEntry]:
        return [MaildropEntry(str(i), len(m)) for i, m in enumerate(self.messages)]

    def read(self, uid: str) -> Any:
        import io

        return io.BytesIO(self.messages[int(uid)])

    def commit(self, deleted: list[str], retrieved: list[str], trash: bool) -> None:
        pass

    def expire(self, retrieved_days: float | None, trash_days: float) -> None:
        pass

    def close(self) -> None:
        pass


@implementer(IMailboxBackend, IDeliveryBackend)
class Mailboxes:
    """Delivered messages kept in memory, by account address."""

    def __init__(self) -> None:
        self.stored: dict[str, list[bytes]] = {}

    def deliver(self, *args: Any) -> None:
        if isinstance(args[0], Account):  # IMailboxBackend.deliver(account, message, folder)
            accounts, message = [args[0]], args[1]
        else:  # IDeliveryBackend.deliver(envelope, message)
            accounts, message = list(args[0].recipients), args[1]
        with message.open() as f:
            content = f.read()
        for account in accounts:
            self.stored.setdefault(account.address, []).append(content)

    def open(self, account: Account) -> Maildrop:
        return Maildrop(self.stored.get(account.address, []))


class Wire:
    """One client connection: what the server wrote, and lines to send it."""

    def __init__(self, protocol: Any, peer: str) -> None:
        self.protocol = protocol
        self.transport = StringTransport(peerAddress=address.IPv4Address("TCP", peer, 40000))
        protocol.makeConnection(self.transport)
        if protocol.factory.implicit_tls:
            # TLS from the start: the handshake a StringTransport cannot do is
            # taken as done, as Twisted's TLS layer would report it.
            protocol.handshakeCompleted()

    def send(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        self.protocol.dataReceived(data + b"\r\n")

    def output(self) -> str:
        """What the server wrote since the last call."""
        text = self.transport.value().decode("utf-8", "replace")
        self.transport.clear()
        return text

    def lines(self) -> list[str]:
        return self.output().splitlines()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


class Platform:
    """The protocols of one mailplat, wired to in-memory backends and a Clock."""

    def __init__(self, failure_delay: float = 2.0, max_failures: int = 3, block_time: float = 300.0,
                 smtp: SMTPLimits | None = None, pop3: POP3Settings | None = None,
                 submission: SubmissionSettings | None = None) -> None:
        self.clock = task.Clock()
        self.users = Users()
        self.mailboxes = Mailboxes()
        portal = Portal(MailRealm(self.mailboxes), [AuthBackendChecker(self.users)])
        self.guard = LoginGuard(portal, self.clock, failure_delay, max_failures, block_time)
        resolver = AliasResolver(("example.org",), {}, lambda a: call(self.users.lookup, a))
        self.smtp_limits = smtp or SMTPLimits()
        self.router = Router(self.mailboxes)
        self._smtp_args = (resolver,)
        self.pop3_settings = pop3 or POP3Settings()
        self.submission = submission or SubmissionSettings()
        # Shared by every submission session, as the service shares one.
        self.quota = SendingQuota(self.clock, self.submission.max_messages_per_hour, self.submission.max_recipients_per_hour)

    def smtp(self, listener: str = "submissions", peer: str = "192.0.2.1", spool: Any = None) -> Wire:
        """A session on an SMTP listener; "submissions" is TLS from the start, as a
        StringTransport cannot do a handshake (TLS itself is tested over sockets)."""
        factory = SMTPFactory(
            "mail.example.org", self.smtp_limits, self._smtp_args[0], self.router, spool, self.clock,
            submission=listener != "smtp", implicit_tls=listener == "submissions", login_guard=self.guard, listener=listener,
            quota=self.quota if listener != "smtp" else None, send_as=self.submission.send_as,
        )
        return Wire(factory.buildProtocol(None), peer)

    def pop3(self, peer: str = "192.0.2.1") -> Wire:
        """A session on the pop3s listener (TLS from the start)."""
        factory = POP3Factory(self.pop3_settings, self.guard, None, True, self.clock)
        return Wire(factory.buildProtocol(None), peer)
