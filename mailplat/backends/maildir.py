"""The ``maildir`` mailbox backend: ``<path>/<domain>/<local-part>/{tmp,new,cur}``.

Delivery follows the maildir protocol: write into ``tmp/``, fsync the file,
rename into ``new/``, fsync the folder.  Messages are stored with CRLF line
ends exactly as received, so the size in the name (``,S=``) is also the size
a POP3 client is told.  Other folders are Maildir++ (``.Sent``,
``.Archive.2024``), and the same files serve IMAP (IMessageStore, in
:mod:`mailplat.backends.maildirplus`).  All disk work runs in the service's
thread pool.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mailplat.addresses import AddressError, validate_address
from mailplat.backends.maildirplus import MaildirPlus, Watcher, folder_path
from mailplat.config import ConfigError
from mailplat.fsutil import GroupCommit, fsync_directory, makedirs_durable, replace_durably
from mailplat.interfaces import (
    Account,
    BackendContext,
    Folder,
    FolderView,
    IMailboxBackend,
    IMaildrop,
    IMessageStore,
    MaildropEntry,
    MaildropInUse,
    NoSuchFolder,
    PermanentFailure,
    SpooledMessage,
    StoreResult,
    TemporaryFailure,
)
from mailplat.numerals import is_digits
from mailplat.options import OptionReader

__all__ = ["Maildir", "build"]

_COPY_BUFFER = 1 << 20
# Deliveries by this process: shared by every Maildir so that names never repeat.
_deliveries = itertools.count()


def _safe_hostname() -> str:
    # The maildir spec: '/' and ':' in the host part are written as octal.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


def _return_path(message: SpooledMessage) -> bytes:
    """RFC 5321 4.4: the final delivery records the envelope sender."""
    return f"Return-Path: <{message.sender}>\r\n".encode("utf-8")


def _uidl(name: str) -> str:
    """A POP3 unique id from a maildir name: stable, printable, at most 70 characters (RFC 1939 7)."""
    if len(name) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in name):
        return name
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _temporary(error: OSError) -> TemporaryFailure:
    return TemporaryFailure(f"cannot write to the mailbox: {error.strerror}")


@implementer(IMailboxBackend, IMessageStore)
class Maildir(service.Service):
    """One folder per account under ``root``, created on first delivery.

    ``use_inotify=False`` makes ``watch`` poll, as it does where inotify is
    not available.
    """

    def __init__(self, root: str, reactor: Any, threads: Any, use_inotify: bool = True) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.reactor = reactor
        self.threads = threads
        self._host = _safe_hostname()
        self.committer = GroupCommit(reactor)
        self.store = MaildirPlus(self.unique_name)
        self.watcher = Watcher(reactor, threads.blocking if threads is not None else None, use_inotify, refresh=self.store.refresh)

    def folder(self, account: Account) -> str:
        """The account's maildir; only validated addresses ever become paths."""
        try:
            address = validate_address(account.address.lower())
        except AddressError as e:
            raise PermanentFailure(f"invalid mailbox name: {e}")
        local, _, domain = address.lower().rpartition("@")
        path = os.path.join(self.root, domain, local)
        if os.path.dirname(os.path.dirname(path)) != self.root:
            raise PermanentFailure("invalid mailbox name")
        return path

    @staticmethod
    def _subfolder(maildir: str, name: str) -> str:
        """A Maildir++ folder ("Quarantine" is ``.Quarantine``); "" is the inbox."""
        return folder_path(maildir, name)

    def _thread(self, f: Any, *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.threads.blocking, f, *args)

    def stopService(self) -> Any:
        """The group commit's thread ends after the last listener has closed."""
        super().stopService()
        self.watcher.stop()
        return self.committer.stop()

    def unique_name(self, size: int) -> str:
        """time.MusecPpidQn.host (the maildir spec), plus ,S=size as Dovecot does.

        Microseconds are zero-padded so that names sort in delivery order.
        """
        now = time.time()
        return f"{int(now)}.M{int(now % 1 * 1e6):06d}P{os.getpid()}Q{next(_deliveries)}.{self._host},S={size}"

    def deliver(self, account: Account, message: SpooledMessage, folder: str = "") -> Any:
        folder = self._subfolder(self.folder(account), folder)
        if message.content is None or not os.path.isdir(os.path.join(folder, "cur")):
            # A large message to copy, or folders to create: all in a thread.
            return self._thread(self._deliver, folder, message)
        # A small message: handed whole to the group commit thread.
        header = _return_path(message)
        name = self.unique_name(len(header) + message.size)
        d = self.committer.write(
            os.path.join(folder, "tmp", name), os.path.join(folder, "new", name), header + message.content
        )

        def failed(failure: Any) -> None:
            raise _temporary(failure.value)

        return d.addErrback(failed)

    def _deliver(self, folder: str, message: SpooledMessage) -> str:
        try:
            if not os.path.isdir(os.path.join(folder, "cur")):
                for sub in ("tmp", "new", "cur"):
                    makedirs_durable(os.path.join(folder, sub))
                if os.path.basename(folder).startswith("."):
                    # Dovecot's mark of a Maildir++ folder.
                    with open(os.path.join(folder, "maildirfolder"), "ab"):
                        pass
            header = _return_path(message)
            name = self.unique_name(len(header) + message.size)
            tmp = os.path.join(folder, "tmp", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with open(fd, "wb") as out:
                    if message.content is not None:
                        out.write(header + message.content)
                    else:
                        out.write(header)
                        with message.open() as src:
                            shutil.copyfileobj(src, out, _COPY_BUFFER)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(tmp, os.path.join(folder, "new", name))
            except BaseException:
                _remove(tmp)
                raise
            fsync_directory(os.path.join(folder, "new"))
            return name
        except OSError as e:
            raise _temporary(e)

    def open(self, account: Account) -> Any:
        folder = self.folder(account)
        return self._thread(MaildirDrop.open, folder, self.reactor, self.threads)

    # --- IMessageStore: the disk work is MaildirPlus's, in the thread pool ---

    def _store(self, f: Any, *args: Any) -> Any:
        """``f`` in the pool; a disk error becomes the failure a protocol can answer
        (a folder that vanished meanwhile, say deleted by another session, is NoSuchFolder)."""

        def failed(failure: Any) -> Any:
            failure.trap(OSError)
            if isinstance(failure.value, FileNotFoundError):
                raise NoSuchFolder("the folder is gone")
            raise TemporaryFailure(f"cannot use the mailbox: {failure.value.strerror or failure.value}")

        return self._thread(f, *args).addErrback(failed)

    def folders(self, account: Account) -> Deferred[list[Folder]]:
        return self._store(self.store.folders, self.folder(account))

    def create_folder(self, account: Account, name: str) -> Deferred[None]:
        return self._store(self.store.create_folder, self.folder(account), name)

    def delete_folder(self, account: Account, name: str) -> Deferred[None]:
        return self._store(self.store.delete_folder, self.folder(account), name)

    def rename_folder(self, account: Account, old: str, new: str) -> Deferred[None]:
        return self._store(self.store.rename_folder, self.folder(account), old, new)

    def subscribe(self, account: Account, name: str, subscribed: bool) -> Deferred[None]:
        return self._store(self.store.subscribe, self.folder(account), name, subscribed)

    def view(self, account: Account, folder: str) -> Deferred[FolderView]:
        return self._store(self.store.view, self.folder(account), folder)

    def read(self, account: Account, folder: str, uid: int) -> IO[bytes] | Deferred[IO[bytes]]:
        """An open local file: reading it on the reactor thread is the accepted
        cost (as POP3's), and so is opening it when the folder's listing is
        cached (one open(2)); otherwise it is found in the pool."""
        maildir = self.folder(account)
        opened = self.store.open_cached(maildir, folder, uid)
        if opened is not None:
            return opened
        return self._store(self.store.open_message, maildir, folder, uid)

    def append(self, account: Account, folder: str, message: SpooledMessage, flags: frozenset[str], internal_date: float) -> Deferred[tuple[int, int]]:
        return self._store(self.store.append, self.folder(account), folder, message, frozenset(flags), internal_date)

    def store_flags(
        self, account: Account, folder: str, uids: list[int], flags: frozenset[str], how: str, unchanged_since: int | None = None,
    ) -> Deferred[StoreResult]:
        return self._store(self.store.store_flags, self.folder(account), folder, list(uids), frozenset(flags), how, unchanged_since)

    def copy(self, account: Account, folder: str, uids: list[int], target: str) -> Deferred[tuple[int, list[tuple[int, int]]]]:
        return self._store(self.store.copy, self.folder(account), folder, list(uids), target)

    def move(self, account: Account, folder: str, uids: list[int], target: str) -> Deferred[tuple[int, list[tuple[int, int]]]]:
        return self._store(self.store.move, self.folder(account), folder, list(uids), target)

    def expunge(self, account: Account, folder: str, uids: list[int]) -> Deferred[list[int]]:
        return self._store(self.store.expunge, self.folder(account), folder, list(uids))

    def watch(self, account: Account, folder: str, changed: Callable[[], None]) -> Callable[[], None]:
        return self.watcher.watch(folder_path(self.folder(account), folder), changed)

    def usage(self, account: Account) -> Deferred[tuple[int, int]]:
        return self._store(self.store.usage, self.folder(account))


# "<seconds> seen|trash <base name>" a line, appended at each POP3 commit.
EXPIRY_FILE = "mailplat-pop3-expiry"


def _by_base(folder: str) -> dict[str, str]:
    """The files of a cur/ folder by base name (the name without its flags)."""
    if not os.path.isdir(folder):
        return {}
    return {entry.name.split(":", 1)[0]: entry.path for entry in os.scandir(folder) if not entry.name.startswith(".")}


@implementer(IMaildrop)
class MaildirDrop:
    """A locked snapshot of a maildir for one retrieval session.

    Retrieved messages move to ``cur/`` with the maildir "S" (seen) flag;
    when POP3 retrieved or trashed a message is written in POP3's own
    record (:data:`EXPIRY_FILE`), which is what ``expire`` goes by: IMAP sets
    the same flag and moves into the same ``.Trash`` without changing a
    file's time, so flags and mtimes alone would expire at once mail that was
    read or trashed over IMAP.  Work on many files runs in a thread.
    """

    def __init__(self, folder: str, lock: IO[bytes], reactor: Any, threads: Any) -> None:
        self.folder = folder
        self.reactor = reactor
        self.threads = threads
        self._lock = lock
        self._files: dict[str, str] = {}
        self._entries: list[MaildropEntry] = []
        self._scan()

    @classmethod
    def open(cls, folder: str, reactor: Any, threads: Any) -> MaildirDrop:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(folder, sub), mode=0o700, exist_ok=True)
        lock = open(os.path.join(folder, "mailplat.lock"), "ab")
        try:
            # flock is per open file: it excludes other processes and other
            # sessions of this one alike.
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise MaildropInUse("the maildrop is in use by another session")
        try:
            return cls(folder, lock, reactor, threads)
        except BaseException:
            lock.close()
            raise

    def _scan(self) -> None:
        files: dict[str, str] = {}
        found: list[tuple[int, str, int]] = []
        for sub in ("cur", "new"):
            for entry in os.scandir(os.path.join(self.folder, sub)):
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                uid = _uidl(entry.name.split(":", 1)[0])
                files[uid] = entry.path
                st = entry.stat()
                # Our names start with the delivery time: oldest first.
                head = entry.name.split(".", 1)[0]
                found.append((int(head) if is_digits(head) else int(st.st_mtime), uid, st.st_size))
        found.sort()
        self._files = files
        self._entries = [MaildropEntry(uid, size) for _, uid, size in found]

    def entries(self) -> list[MaildropEntry]:
        return list(self._entries)

    def read(self, uid: str) -> IO[bytes]:
        try:
            return open(self._files[uid], "rb")
        except FileNotFoundError:
            return open(self._locate(uid), "rb")

    def _locate(self, uid: str) -> str:
        """Where a message is now: IMAP sessions move files to cur/ and rename
        them when flags change while this maildrop is open (FileNotFoundError: gone)."""
        for sub in ("cur", "new"):
            for name in os.listdir(os.path.join(self.folder, sub)):
                if not name.startswith(".") and _uidl(name.split(":", 1)[0]) == uid:
                    path = self._files[uid] = os.path.join(self.folder, sub, name)
                    return path
        raise FileNotFoundError(f"message {uid} is gone")

    def _apply(self, uid: str, change: Callable[[str], None]) -> None:
        """``change(path)`` on a message, found again if it was renamed meanwhile; nothing if it is gone."""
        try:
            change(self._files[uid])
        except FileNotFoundError:
            try:
                change(self._locate(uid))
            except FileNotFoundError:
                pass

    def _thread(self, f: Any, *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.threads.blocking, f, *args)

    def commit(self, deleted: list[str], retrieved: list[str], trash: bool) -> Any:
        return self._thread(self._commit, deleted, retrieved, trash)

    def _commit(self, deleted: list[str], retrieved: list[str], trash: bool) -> None:
        try:
            now = time.time()
            touched = {os.path.join(self.folder, "cur"), os.path.join(self.folder, "new")}
            if trash and deleted:
                trash_cur = os.path.join(self.folder, ".Trash", "cur")
                if not os.path.isdir(trash_cur):
                    for sub in ("tmp", "new", "cur"):
                        makedirs_durable(os.path.join(self.folder, ".Trash", sub))
                touched.add(trash_cur)
            records: list[str] = []

            def remove(path: str) -> None:
                if trash:
                    records.append(f"{now:.0f} trash {os.path.basename(path).split(':', 1)[0]}")
                    os.utime(path, (now, now))
                    os.rename(path, os.path.join(self.folder, ".Trash", "cur", os.path.basename(path)))
                else:
                    os.unlink(path)

            def mark_seen(path: str) -> None:
                name = os.path.basename(path)
                flags = name.split(":2,", 1)[1] if ":2," in name else ""
                base = name.split(":", 1)[0]
                records.append(f"{now:.0f} seen {base}")
                if "S" in flags:
                    return
                os.utime(path, (now, now))
                os.rename(path, os.path.join(self.folder, "cur", f"{base}:2,{''.join(sorted(flags + 'S'))}"))

            for uid in deleted:
                self._apply(uid, remove)
            for uid in set(retrieved) - set(deleted):
                self._apply(uid, mark_seen)
            if records:
                with open(os.path.join(self.folder, EXPIRY_FILE), "a", encoding="ascii") as out:
                    out.write("".join(line + "\n" for line in records))
                    out.flush()
                    os.fsync(out.fileno())
                touched.add(self.folder)
            for folder in touched:
                fsync_directory(folder)
        finally:
            self.close()

    def expire(self, retrieved_days: float | None, trash_days: float) -> Any:
        return self._thread(self._expire, retrieved_days, trash_days)

    def _expire(self, retrieved_days: float | None, trash_days: float) -> None:
        path = os.path.join(self.folder, EXPIRY_FILE)
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        now = time.time()
        cur, trash = _by_base(os.path.join(self.folder, "cur")), _by_base(os.path.join(self.folder, ".Trash", "cur"))
        keep: list[str] = []
        removed: set[str] = set()
        for line in lines:
            when, kind, base = (line.split(" ", 2) + ["", ""])[:3]
            try:
                age = now - float(when)
            except ValueError:
                continue
            if kind == "seen" and retrieved_days is not None and base in cur:
                found, days = cur[base], retrieved_days
                # Marked unread since (over IMAP): not expired as read.
                if "S" not in (found.split(":2,", 1)[1] if ":2," in found else ""):
                    continue
            elif kind == "trash" and base in trash:
                found, days = trash[base], trash_days
            else:
                continue  # gone, or kept for good: nothing to remember
            if age < days * 86400:
                keep.append(line)
                continue
            try:
                os.unlink(found)
            except FileNotFoundError:
                pass
            removed.add(os.path.dirname(found))
        for folder in removed:
            fsync_directory(folder)
        if keep != lines:
            replace_durably(path, "".join(line + "\n" for line in keep).encode("ascii"))
        if os.path.join(self.folder, "cur") in removed:
            self._scan()

    def close(self) -> None:
        if not self._lock.closed:
            self._lock.close()


def build(options: dict[str, Any], context: BackendContext) -> Maildir:
    reader = OptionReader(options, "maildir", context=context)
    root = reader.path("path", what="the folder holding the maildirs", example='"mail"')
    reader.finish()
    if not context.admin:
        try:
            makedirs_durable(root)
        except OSError as e:
            raise ConfigError("path", f"cannot create {root}: {e.strerror}", "choose a folder mailplat may write to")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError("path", f"{root} is not writable", "let the user mailplat runs as write to it")
    return Maildir(root, context.reactor, context.threads)
