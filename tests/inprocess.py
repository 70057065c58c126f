"""Driving SMTPServer, POP3Server and IMAPServer in-process: a StringTransport for the wire,
a task.Clock for time (as Twisted's own test_smtp.py does).

For what only needs time to pass (timeouts, login delays and blocks), so
that no test waits on the wall clock.  The backends here are small real
providers of our interfaces (an in-memory user table, mailbox and IMAP store); the
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
from mailplat.config import IMAPSettings, POP3Settings, SMTPLimits, SubmissionSettings
from mailplat.cred import AuthBackendChecker, LoginGuard, MailRealm
from mailplat.imap.server import IMAPFactory
from mailplat.interfaces import (
    INBOX,
    SPECIAL_USE,
    Account,
    Folder,
    FolderExists,
    FolderView,
    IAuthBackend,
    IDeliveryBackend,
    IMailboxBackend,
    IMaildrop,
    IMessageStore,
    MaildropEntry,
    MessageInfo,
    NoSuchFolder,
    PermanentFailure,
    SpooledMessage,
    StoreResult,
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


class _Box:
    def __init__(self, uidvalidity: int) -> None:
        self.uidvalidity = uidvalidity
        self.uidnext = 1
        self.modseq = 1
        self.messages: dict[int, tuple[MessageInfo, bytes]] = {}
        self.subscribed = True


@implementer(IMessageStore)
class MessageStore:
    """An IMAP store in memory: folders of messages with UIDs, flags and modseqs.

    The protocol tests' own provider of the contract (the real stores have
    their own suite); ``watchers`` are called at each change, as a store
    that notices other sessions' changes would.
    """

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, _Box]] = {}
        self.watchers: list[tuple[str, str, Any]] = []
        self._validity = 1000
        self.broken: Exception | None = None

    def _boxes(self, account: Account) -> dict[str, _Box]:
        boxes = self.accounts.get(account.address)
        if boxes is None:
            boxes = self.accounts[account.address] = {}
            for name in (INBOX, *SPECIAL_USE):
                boxes[name] = self._new_box()
        return boxes

    def _new_box(self) -> _Box:
        self._validity += 1
        return _Box(self._validity)

    def _box(self, account: Account, name: str) -> _Box:
        if self.broken is not None:
            raise self.broken
        box = self._boxes(account).get(INBOX if name.upper() == INBOX else name)
        if box is None:
            raise NoSuchFolder(f"no folder {name}")
        return box

    def _changed(self, account: Account, name: str, box: _Box) -> None:
        box.modseq += 1
        for watched, folder, callback in list(self.watchers):
            if watched == account.address and folder == name:
                callback()

    def folders(self, account: Account) -> list[Folder]:
        return [Folder(n, SPECIAL_USE.get(n, ""), b.subscribed) for n, b in self._boxes(account).items()]

    def create_folder(self, account: Account, name: str) -> None:
        boxes = self._boxes(account)
        if name in boxes:
            raise FolderExists(f"{name} exists")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            boxes.setdefault("/".join(parts[:i]), self._new_box())

    def delete_folder(self, account: Account, name: str) -> None:
        if name == INBOX:
            raise PermanentFailure("INBOX cannot be deleted")
        self._box(account, name)
        del self._boxes(account)[name]

    def rename_folder(self, account: Account, old: str, new: str) -> None:
        boxes = self._boxes(account)
        box = self._box(account, old)
        if new in boxes:
            raise FolderExists(f"{new} exists")
        for name in [n for n in boxes if n == old or n.startswith(old + "/")]:
            boxes[new + name[len(old):]] = boxes.pop(name)
        if old == INBOX:
            boxes[INBOX] = self._new_box()
        del box

    def subscribe(self, account: Account, name: str, subscribed: bool) -> None:
        box = self._boxes(account).get(name)
        if box is not None:
            box.subscribed = subscribed

    def view(self, account: Account, folder: str) -> FolderView:
        box = self._box(account, folder)
        return FolderView(box.uidvalidity, box.uidnext, box.modseq, tuple(box.messages[u][0] for u in sorted(box.messages)))

    def read(self, account: Account, folder: str, uid: int) -> Any:
        import io

        box = self._box(account, folder)
        if uid not in box.messages:
            raise PermanentFailure("no such message")
        return io.BytesIO(box.messages[uid][1])

    def _add(self, account: Account, folder: str, box: _Box, content: bytes, flags: frozenset[str], date: float) -> int:
        uid = box.uidnext
        box.uidnext += 1
        box.messages[uid] = (MessageInfo(uid, len(content), frozenset(flags), date, box.modseq + 1), content)
        self._changed(account, folder, box)
        return uid

    def append(self, account: Account, folder: str, message: SpooledMessage, flags: frozenset[str], internal_date: float) -> tuple[int, int]:
        box = self._box(account, folder)
        with message.open() as f:
            content = f.read()
        return box.uidvalidity, self._add(account, folder, box, content, flags, internal_date)

    def store_flags(self, account: Account, folder: str, uids: list[int], flags: frozenset[str], how: str,
                    unchanged_since: int | None = None) -> StoreResult:
        box = self._box(account, folder)
        changed, modified = [], []
        for uid in uids:
            if uid not in box.messages:
                continue
            info, content = box.messages[uid]
            if unchanged_since is not None and info.modseq > unchanged_since:
                modified.append(uid)
                continue
            new = flags if how == "set" else info.flags | flags if how == "add" else info.flags - flags
            if new != info.flags:
                box.modseq += 1
                info = MessageInfo(uid, info.size, frozenset(new), info.internal_date, box.modseq)
                box.messages[uid] = (info, content)
                changed.append(info)
        if changed:
            box.modseq -= 1
            self._changed(account, folder, box)
        return StoreResult(tuple(changed), tuple(modified))

    def copy(self, account: Account, folder: str, uids: list[int], target: str) -> tuple[int, list[tuple[int, int]]]:
        box, into = self._box(account, folder), self._box(account, target)
        pairs = []
        for uid in uids:
            if uid in box.messages:
                info, content = box.messages[uid]
                pairs.append((uid, self._add(account, target, into, content, info.flags, info.internal_date)))
        return into.uidvalidity, pairs

    def move(self, account: Account, folder: str, uids: list[int], target: str) -> tuple[int, list[tuple[int, int]]]:
        validity, pairs = self.copy(account, folder, uids, target)
        box = self._box(account, folder)
        for uid, _ in pairs:
            del box.messages[uid]
        if pairs:
            self._changed(account, folder, box)
        return validity, pairs

    def expunge(self, account: Account, folder: str, uids: list[int]) -> list[int]:
        box = self._box(account, folder)
        removed = [u for u in uids if u in box.messages and "\\Deleted" in box.messages[u][0].flags]
        for uid in removed:
            del box.messages[uid]
        if removed:
            self._changed(account, folder, box)
        return removed

    def watch(self, account: Account, folder: str, changed: Any) -> Any:
        entry = (account.address, folder, changed)
        self.watchers.append(entry)
        return lambda: self.watchers.remove(entry)

    def usage(self, account: Account) -> tuple[int, int]:
        messages = [m for b in self._boxes(account).values() for m, _ in b.messages.values()]
        return sum(m.size for m in messages), len(messages)


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
                 submission: SubmissionSettings | None = None, imap: IMAPSettings | None = None, quota: int = 0) -> None:
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
        self.imap_settings = imap or IMAPSettings()
        self.store = MessageStore()
        self.mailbox_quota = quota
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

    def imap(self, peer: str = "192.0.2.1", factory: IMAPFactory | None = None, spool_dir: str = "", implicit_tls: bool = True) -> Wire:
        """A session on the imaps listener (TLS from the start; else a plain listener
        without STARTTLS), over the in-memory store; pass ``factory`` for another
        session of the same listener (its per-user counts)."""
        if factory is None:
            factory = IMAPFactory(
                self.imap_settings, self.guard, None, implicit_tls, self.store, self.mailbox_quota, self.clock, spool_dir=spool_dir,
            )
        return Wire(factory.buildProtocol(None), peer)
