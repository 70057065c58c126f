"""The contracts between mailplat's protocols and its backends.

Everything a plugin author needs is importable from here (and
``ConfigError`` from :mod:`mailplat.config`).  Any method below may return a
plain value, a Deferred, or be ``async def``: mailplat calls backends only
through :func:`mailplat.plugins.call`, which adapts all three.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar, Union

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "Account",
    "BackendContext",
    "Client",
    "DeliveryFailure",
    "Envelope",
    "FLAG_ANSWERED",
    "FLAG_DELETED",
    "FLAG_DRAFT",
    "FLAG_FLAGGED",
    "FLAG_SEEN",
    "Folder",
    "FolderExists",
    "FolderView",
    "INBOX",
    "IMessageStore",
    "MessageInfo",
    "NoSuchFolder",
    "OverQuota",
    "SPECIAL_USE",
    "StoreResult",
    "IAccount",
    "IAuthBackend",
    "IBackendFactory",
    "IDeliveryBackend",
    "IMailboxBackend",
    "IMaildrop",
    "IMessageFilter",
    "IUserManager",
    "MaildropEntry",
    "MaildropInUse",
    "MaybeAsync",
    "MessageFilter",
    "PartialFailure",
    "PermanentFailure",
    "SpooledMessage",
    "TemporaryFailure",
    "Verdict",
]


T = TypeVar("T")

# What a backend method may return: the value, a Deferred firing with it,
# or an awaitable (an ``async def`` method).  mailplat.plugins.call adapts all three.
MaybeAsync = Union[T, Deferred[T], Awaitable[T]]


# --- value types ----------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """A mailbox owner: a canonical, lower-case address without a +tag."""

    address: str

    @property
    def local_part(self) -> str:
        return self.address.rsplit("@", 1)[0]

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[1]


@dataclass(frozen=True)
class SpooledMessage:
    """A received message, as the client sent it after un-dot-stuffing.

    Lines end in CRLF; our ``Received:`` header is already at the top.
    ``sender`` is the envelope sender ("" for the null sender ``<>``), which a
    mailbox writes into ``Return-Path:`` at final delivery.  A small message
    is kept in memory (``content``, and ``path`` is ""); a large one is a file
    at ``path``, read after ``prefix`` (header lines added after spooling).
    Read it through :meth:`open`, which works for both.
    """

    path: str
    size: int
    sender: str
    content: bytes | None = None
    prefix: bytes = b""

    def open(self) -> IO[bytes]:
        """Open the message for reading; the caller closes it."""
        if self.content is not None:
            return io.BytesIO(self.content)
        if self.prefix:
            return io.BufferedReader(_Concatenation(self.prefix, open(self.path, "rb")))
        return open(self.path, "rb")

    def with_headers(self, block: bytes) -> SpooledMessage:
        """The same message with header lines (CRLF-terminated) put on top."""
        if not block:
            return self
        if self.content is not None:
            return dataclasses.replace(self, content=block + self.content, size=self.size + len(block))
        return dataclasses.replace(self, prefix=block + self.prefix, size=self.size + len(block))


class _Concatenation(io.RawIOBase):
    """Some bytes, then a file: a message whose added headers are not in its file."""

    def __init__(self, head: bytes, tail: IO[bytes]) -> None:
        self._head = memoryview(head)
        self._tail = tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._tail.readinto(buffer)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._tail.close()
        super().close()


@dataclass(frozen=True)
class Envelope:
    """Who a message is from and for, and how it reached us."""

    queue_id: str
    sender: str
    recipients: tuple[Account, ...]
    client_address: str = ""
    helo: str = ""
    authenticated_as: Account | None = None
    # The mailbox folder for local delivery: "" is the inbox; a filter's
    # quarantine verdict makes it "Quarantine".
    folder: str = ""


@dataclass(frozen=True)
class Client:
    """The SMTP client a filter is asked about."""

    address: str
    # "smtp", "submission" or "submissions": the listener it connected to.
    listener: str
    # The HELO/EHLO name; "" until the client sent one.
    helo: str = ""
    authenticated_as: Account | None = None


@dataclass(frozen=True)
class Verdict:
    """A filter's answer.  Build one with the class methods below.

    ``headers`` are ``(name, value)`` pairs added on top of the message;
    they may come with any verdict that lets the message through.
    """

    action: str = "accept"  # "accept" | "reject" | "tempfail" | "quarantine" | "discard"
    text: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    ACTIONS = ("accept", "reject", "tempfail", "quarantine", "discard")

    def __post_init__(self) -> None:
        if self.action not in self.ACTIONS:
            raise ValueError(f"unknown verdict {self.action!r}; use one of {', '.join(self.ACTIONS)}")

    @classmethod
    def accept(cls, headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
        """Let it through (adding ``headers``); the next filter still runs."""
        return cls("accept", "", tuple(headers))

    @classmethod
    def reject(cls, text: str) -> Verdict:
        """Refuse for good: SMTP 550 5.7.1 with ``text``."""
        return cls("reject", text)

    @classmethod
    def tempfail(cls, text: str) -> Verdict:
        """Ask the client to come back later: SMTP 451 4.7.1 with ``text``."""
        return cls("tempfail", text)

    @classmethod
    def quarantine(cls, text: str = "", headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
        """Accept, but deliver into each recipient's Quarantine folder."""
        return cls("quarantine", text, tuple(headers))

    @classmethod
    def discard(cls, text: str = "") -> Verdict:
        """Accept and throw away (the client is told 250; we log it)."""
        return cls("discard", text)


@dataclass(frozen=True)
class MaildropEntry:
    """One message of a maildrop: a stable unique id and its size in octets."""

    uid: str
    size: int


# --- folders and messages, as an IMAP store keeps them --------------------

# The inbox's name; every other folder is named by the user, with "/"
# between levels ("Archive/2024").  "INBOX" is matched without case.
INBOX = "INBOX"

# RFC 3501 2.3.2 system flags; any other flag is a keyword ("$Junk", "NonJunk").
FLAG_SEEN = "\\Seen"
FLAG_ANSWERED = "\\Answered"
FLAG_FLAGGED = "\\Flagged"
FLAG_DELETED = "\\Deleted"
FLAG_DRAFT = "\\Draft"

# RFC 6154: the folders made at an account's first IMAP login, and their attribute.
SPECIAL_USE: dict[str, str] = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}


@dataclass(frozen=True)
class Folder:
    """One folder of an account."""

    name: str
    # An RFC 6154 attribute ("\\Sent"), or "".
    special_use: str = ""
    subscribed: bool = True


@dataclass(frozen=True)
class MessageInfo:
    """What IMAP knows of a message without reading it."""

    uid: int
    size: int
    # System flags (FLAG_*) and keywords, as the client wrote them.
    flags: frozenset[str]
    # When it arrived (or the APPEND's date), seconds since the epoch.
    internal_date: float
    # RFC 7162: raised each time its flags change; never 0.
    modseq: int


@dataclass(frozen=True)
class FolderView:
    """A folder as it is now.

    ``uidvalidity`` and ``uidnext`` are the same after a restart and on
    every node; a UID is never reused within one ``uidvalidity``.
    ``highest_modseq`` grows with every change to the folder (a message
    added, removed, or its flags changed), so an unchanged value means an
    unchanged folder.
    """

    uidvalidity: int
    uidnext: int
    highest_modseq: int
    # Every message, in UID order.
    messages: tuple[MessageInfo, ...]


@dataclass(frozen=True)
class StoreResult:
    """What a flag change did."""

    # The messages whose flags changed, as they are now.
    changed: tuple[MessageInfo, ...]
    # RFC 7162 UNCHANGEDSINCE: UIDs left alone because their modseq was higher.
    modified: tuple[int, ...] = ()


@dataclass(frozen=True)
class BackendContext:
    """What a backend factory may use while building its provider."""

    hostname: str
    domains: tuple[str, ...]
    config_dir: str
    data_dir: str
    reactor: Any
    # True when built for the `mailplat` admin command rather than the
    # server: a backend may then start from nothing (say, no users file yet).
    admin: bool = False
    # Providers of other kinds built before this one, by kind ("auth",
    # "mailbox"), so that e.g. the local delivery backend finds the mailbox.
    providers: dict[str, Any] = field(default_factory=dict)
    # A twisted.names resolver using the [dns] servers (None for the admin
    # command): what a backend that looks things up in DNS should use.
    dns: Any = None
    # The [dns] servers as (IP, port) pairs, empty for the system's
    # (/etc/resolv.conf): for a backend whose library does its own DNS in
    # a thread (mailplat.wire.dns.Resolver asks exactly these).
    dns_servers: tuple[tuple[str, int], ...] = ()
    # The service's thread pools (mailplat.threads.Threads: ``blocking``,
    # ``passwords``, ``cpu``, and ``pool(name, size)`` for one of the
    # backend's own), started and stopped by the service.  Blocking work
    # runs there, never on the reactor thread; None in the admin command.
    threads: Any = None
    # [mailbox] quota: octets each account may store, 0 for no limit (see
    # mailplat.mailquota, which enforces it for delivery and IMAP APPEND).
    mailbox_quota: int = 0

    def resolve_path(self, path: str) -> str:
        """A path from the config file, relative to the folder holding it."""
        return os.path.normpath(os.path.join(self.config_dir, os.path.expanduser(path)))


# --- failures: the one distinction a protocol needs -----------------------


class DeliveryFailure(Exception):
    """Base of the two failures a backend may raise; ``text`` is shown to peers."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class TemporaryFailure(DeliveryFailure):
    """Try again later: SMTP answers 4xx, POP3 ``-ERR [SYS/TEMP]``."""


class PermanentFailure(DeliveryFailure):
    """Will never work: SMTP answers 5xx."""


class PartialFailure(DeliveryFailure):
    """Delivered to some recipients and not to others.

    ``failed`` maps each recipient that did not get the message to its
    TemporaryFailure or PermanentFailure.  The SMTP server then answers 250
    and hands those recipients to the queue, which retries the temporary
    ones and bounces the permanent ones: nobody gets the message twice.
    """

    def __init__(self, failed: dict[Account, DeliveryFailure]) -> None:
        super().__init__(f"not delivered to {len(failed)} recipient(s)")
        self.failed = failed


class MaildropInUse(TemporaryFailure):
    """Another session holds the maildrop's lock: POP3 answers ``-ERR [IN-USE]``."""


class OverQuota(PermanentFailure):
    """The account is over its ``[mailbox] quota``: SMTP 552 5.2.2, IMAP ``NO [OVERQUOTA]``."""


class NoSuchFolder(PermanentFailure):
    """The folder does not exist: IMAP answers ``NO [NONEXISTENT]`` (``NO [TRYCREATE]`` as a target)."""


class FolderExists(PermanentFailure):
    """CREATE or RENAME to a name already taken: IMAP answers ``NO [ALREADYEXISTS]``."""


# --- interfaces ------------------------------------------------------------


class IBackendFactory(Interface):
    """What a plugin module exposes (together with ``twisted.plugin.IPlugin``)."""

    kind = Attribute('"auth", "mailbox", "delivery" or "filter"')
    name = Attribute("the word used for this backend in the config file")

    def build(options: dict[str, Any], context: BackendContext) -> object:
        """Validate ``options`` (raise ConfigError naming the key) and return a provider."""


class IAuthBackend(Interface):
    """Who may log in, and which mailboxes exist."""

    def authenticate(address: str, password: str) -> MaybeAsync[Account | None]:
        """The account when the password is right, else None."""

    def lookup(address: str) -> MaybeAsync[Account | None]:
        """The account whose mailbox is ``address`` (canonical form), or None."""


class IUserManager(Interface):
    """Optional: an auth backend whose users `mailplat user` can edit.

    Unlike every other method here, these are called by the admin command,
    which runs no reactor: they must be plain blocking functions.
    """

    def add_user(address: str, password: str) -> None:
        """Create a user; raise ValueError when it exists or is invalid."""

    def set_password(address: str, password: str) -> None:
        """Replace a user's password; raise KeyError when there is no such user."""

    def delete_user(address: str) -> None:
        """Remove a user; raise KeyError when there is no such user."""

    def list_users() -> list[str]:
        """Every user's address, sorted."""


class IMailboxBackend(Interface):
    """Where a local account's mail is stored."""

    def deliver(account: Account, message: SpooledMessage, folder: str = "") -> MaybeAsync[None]:
        """Store the message; durable (fsynced) once this completes.

        ``folder`` is "" for the inbox, else a folder name such as
        "Quarantine" (created when missing).
        """

    def open(account: Account) -> MaybeAsync[IMaildrop]:
        """One retrieval session's view of the account's mail."""


class IAccount(Interface):
    """The avatar of a login that needs no mailbox (SMTP submission): an :class:`Account`."""


class IMaildrop(Interface):
    """A locked snapshot of one mailbox, with RFC 1939 delete-at-commit."""

    def entries() -> MaybeAsync[list[MaildropEntry]]:
        """The messages present when the maildrop was opened, oldest first."""

    def read(uid: str) -> MaybeAsync[IO[bytes]]:
        """Open one message (CRLF lines) for reading; the caller closes it.

        A binary file object, or a Deferred firing with one (a backend that
        fetches the message over the network does it off the reactor).  The
        file's ``read`` is then called on the reactor thread: it must not block.
        """

    def commit(deleted: list[str], retrieved: list[str], trash: bool) -> MaybeAsync[None]:
        """Remove (or, with ``trash``, move to a trash folder) the deleted
        messages and mark the retrieved ones as seen, durably; then release."""

    def expire(retrieved_days: float | None, trash_days: float) -> MaybeAsync[None]:
        """Remove messages seen more than ``retrieved_days`` ago (None: never)
        and trashed ones older than ``trash_days``; before entries are read."""

    def close() -> MaybeAsync[None]:
        """Release the lock without changing anything."""


class IMessageStore(Interface):
    """Optional, provided by a mailbox backend that serves IMAP: folders,
    UIDs, flags and modseqs over the same mail that ``deliver`` and POP3 use.

    Folder names are Unicode with "/" between levels; ``INBOX`` (any case)
    is the inbox, which always exists.  A folder that does not exist raises
    :class:`NoSuchFolder`; a name the store cannot hold raises
    PermanentFailure with a text saying why.  Every change that adds or
    removes a message or assigns a UID is durable once its result is
    returned; a flag change may be left to the system to write (as Dovecot's
    ``mail_fsync = optimized``): a crash may undo the latest flag changes,
    never lose a message or reuse a UID.  Many sessions (of this process and others, of
    this node and others) use one account at once: no method locks it for
    longer than the call.  ``deliver`` into a folder makes the message
    visible here with the next UID.  POP3's ``DELE`` and IMAP's EXPUNGE
    remove the same message.
    """

    def folders(account: Account) -> MaybeAsync[list[Folder]]:
        """Every folder, INBOX included; the special-use ones are made at the first call."""

    def create_folder(account: Account, name: str) -> MaybeAsync[None]:
        """Make a folder (and its missing parents); FolderExists when it exists."""

    def delete_folder(account: Account, name: str) -> MaybeAsync[None]:
        """Remove a folder and its messages (never INBOX: PermanentFailure)."""

    def rename_folder(account: Account, old: str, new: str) -> MaybeAsync[None]:
        """Rename a folder with its children; renaming INBOX moves its messages
        into ``new`` and leaves INBOX empty (RFC 3501 6.3.5)."""

    def subscribe(account: Account, name: str, subscribed: bool) -> MaybeAsync[None]:
        """Set a folder's subscription (a name that does not exist may be subscribed)."""

    def view(account: Account, folder: str) -> MaybeAsync[FolderView]:
        """The folder now.  Called often (before most IMAP replies): cheap when
        nothing changed since the last call."""

    def read(account: Account, folder: str, uid: int) -> MaybeAsync[IO[bytes]]:
        """Open a message (CRLF lines, as stored) for reading; the caller closes it.

        NoSuchFolder or PermanentFailure when it is gone.  As with
        IMaildrop.read, the file's ``read`` is then called on the reactor
        thread: it must not block (copy to a temporary file if it would).
        """

    def append(account: Account, folder: str, message: SpooledMessage, flags: frozenset[str], internal_date: float) -> MaybeAsync[tuple[int, int]]:
        """Add a message; returns (uidvalidity, uid) once it is durable."""

    def store_flags(
        account: Account, folder: str, uids: list[int], flags: frozenset[str], how: str, unchanged_since: int | None = None,
    ) -> MaybeAsync[StoreResult]:
        """``how`` is "set", "add" or "remove".  A message whose flags change gets
        a new modseq; with ``unchanged_since``, one whose modseq is higher is
        left alone and listed in ``modified``.  UIDs that are gone are ignored."""

    def copy(account: Account, folder: str, uids: list[int], target: str) -> MaybeAsync[tuple[int, list[tuple[int, int]]]]:
        """Copy messages with their flags; (target's uidvalidity, [(uid, new uid)])."""

    def move(account: Account, folder: str, uids: list[int], target: str) -> MaybeAsync[tuple[int, list[tuple[int, int]]]]:
        """Like copy, then the originals are gone from ``folder`` (RFC 6851)."""

    def expunge(account: Account, folder: str, uids: list[int]) -> MaybeAsync[list[int]]:
        """Remove those of ``uids`` that are flagged \\Deleted; the UIDs removed."""

    def watch(account: Account, folder: str, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed`` (on the reactor thread, within a second) whenever the
        folder may have changed, by any session, process or node; returns the
        function that stops it.  A spurious call is harmless: IMAP asks ``view``."""

    def usage(account: Account) -> MaybeAsync[tuple[int, int]]:
        """(octets, messages) stored for the account over all its folders (for QUOTA)."""


class IDeliveryBackend(Interface):
    """Where accepted mail goes: local mailboxes, a queue, LMTP..."""

    def deliver(envelope: Envelope, message: SpooledMessage) -> MaybeAsync[None]:
        """Deliver to every recipient; durable once this completes.

        Raise TemporaryFailure or PermanentFailure when it cannot be done
        for anyone, PartialFailure when it was done for some recipients.
        """


class IMessageFilter(Interface):
    """A verdict at each step of an SMTP session: spam, viruses, local policy.

    Each method returns a :class:`Verdict`, or None for "no opinion"
    (accept).  Filters run in the configured order; the first reject,
    tempfail or discard ends the checks of that step (accept and
    quarantine let the next filter run).  Subclass
    :class:`MessageFilter` to write only the steps you need.
    """

    def check_connect(client: Client) -> MaybeAsync[Verdict | None]:
        """A client connected (``client.helo`` is still "")."""

    def check_helo(client: Client) -> MaybeAsync[Verdict | None]:
        """The client sent HELO or EHLO (``client.helo``)."""

    def check_mail(client: Client, sender: str) -> MaybeAsync[Verdict | None]:
        """MAIL FROM; ``sender`` is "" for the null sender."""

    def check_rcpt(client: Client, sender: str, recipient: str) -> MaybeAsync[Verdict | None]:
        """RCPT TO, for one recipient as the client wrote it."""

    def check_data(client: Client, sender: str, recipients: tuple[str, ...], message: SpooledMessage) -> MaybeAsync[Verdict | None]:
        """The whole message, spooled; read it as a stream with ``message.open()``."""


@implementer(IMessageFilter)
class MessageFilter:
    """A filter with no opinion at any step: override the ones you need.

    ``owned_headers`` names the header fields this filter writes: mailplat
    removes them from incoming messages (on the listeners the filter runs
    on), so that a sender cannot write ``X-Spam-Status: No`` for it.
    """

    owned_headers: tuple[str, ...] = ()

    def check_connect(self, client: Client) -> MaybeAsync[Verdict | None]:
        return None

    def check_helo(self, client: Client) -> MaybeAsync[Verdict | None]:
        return None

    def check_mail(self, client: Client, sender: str) -> MaybeAsync[Verdict | None]:
        return None

    def check_rcpt(self, client: Client, sender: str, recipient: str) -> MaybeAsync[Verdict | None]:
        return None

    def check_data(self, client: Client, sender: str, recipients: tuple[str, ...], message: SpooledMessage) -> MaybeAsync[Verdict | None]:
        return None
