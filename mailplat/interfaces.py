"""The contracts between mailplat's protocols and its backends.

Everything a plugin author needs is importable from here (and
``ConfigError`` from :mod:`mailplat.config`).  Any method below may return a
plain value, a Deferred, or be ``async def``: mailplat calls backends only
through :func:`mailplat.plugins.call`, which adapts all three.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import IO, Any

from zope.interface import Attribute, Interface

__all__ = [
    "Account",
    "BackendContext",
    "DeliveryFailure",
    "Envelope",
    "IAuthBackend",
    "IBackendFactory",
    "IDeliveryBackend",
    "IMailboxBackend",
    "IMaildrop",
    "IMessageFilter",
    "IUserManager",
    "MaildropEntry",
    "MaildropInUse",
    "PermanentFailure",
    "SpooledMessage",
    "TemporaryFailure",
]


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
    at ``path``.  Read it through :meth:`open`, which works for both.
    """

    path: str
    size: int
    sender: str
    content: bytes | None = None

    def open(self) -> IO[bytes]:
        """Open the message for reading; the caller closes it."""
        if self.content is not None:
            return io.BytesIO(self.content)
        return open(self.path, "rb")


@dataclass(frozen=True)
class Envelope:
    """Who a message is from and for, and how it reached us."""

    queue_id: str
    sender: str
    recipients: tuple[Account, ...]
    client_address: str = ""
    helo: str = ""
    authenticated_as: Account | None = None


@dataclass(frozen=True)
class MaildropEntry:
    """One message of a maildrop: a stable unique id and its size in octets."""

    uid: str
    size: int


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


class MaildropInUse(TemporaryFailure):
    """Another session holds the maildrop's lock: POP3 answers ``-ERR [IN-USE]``."""


# --- interfaces ------------------------------------------------------------


class IBackendFactory(Interface):
    """What a plugin module exposes (together with ``twisted.plugin.IPlugin``)."""

    kind = Attribute('"auth", "mailbox", "delivery" or "filter"')
    name = Attribute("the word used for this backend in the config file")

    def build(options: dict[str, Any], context: BackendContext) -> object:
        """Validate ``options`` (raise ConfigError naming the key) and return a provider."""


class IAuthBackend(Interface):
    """Who may log in, and which mailboxes exist."""

    def authenticate(address: str, password: str) -> Account | None:
        """The account when the password is right, else None."""

    def lookup(address: str) -> Account | None:
        """The account whose mailbox is ``address`` (canonical form), or None."""


class IUserManager(Interface):
    """Optional: an auth backend whose users `mailplat user` can edit."""

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

    def deliver(account: Account, message: SpooledMessage) -> None:
        """Store the message; durable (fsynced) once this completes."""

    def open(account: Account) -> IMaildrop:
        """One retrieval session's view of the account's mail."""


class IMaildrop(Interface):
    """A locked snapshot of one mailbox, with RFC 1939 delete-at-commit."""

    def entries() -> list[MaildropEntry]:
        """The messages present when the maildrop was opened, oldest first."""

    def read(uid: str) -> IO[bytes]:
        """Open one message (CRLF lines) for reading; the caller closes it."""

    def commit(deleted: list[str], retrieved: list[str], trash: bool) -> None:
        """Remove (or, with ``trash``, move to a trash folder) the deleted
        messages and mark the retrieved ones as seen, durably; then release."""

    def expire(retrieved_days: float | None, trash_days: float) -> None:
        """Remove messages seen more than ``retrieved_days`` ago (None: never)
        and trashed ones older than ``trash_days``; before entries are read."""

    def close() -> None:
        """Release the lock without changing anything."""


class IDeliveryBackend(Interface):
    """Where accepted mail goes: local mailboxes, a queue, LMTP..."""

    def deliver(envelope: Envelope, message: SpooledMessage) -> None:
        """Deliver to every recipient; durable once this completes.

        Raise TemporaryFailure or PermanentFailure when it cannot be done.
        """


class IMessageFilter(Interface):
    """A verdict on a message: spam, viruses, local policy."""

    def check(envelope: Envelope, message: SpooledMessage) -> None:
        """Return normally to accept; raise PermanentFailure or TemporaryFailure to refuse."""
