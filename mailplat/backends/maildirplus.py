"""Maildir++ as an IMAP store: folders, UIDs, flags, keywords and modseqs
over the very files that delivery writes and POP3 reads.

The layout is Dovecot's, so that an admin can move either way (README,
"Moving between Dovecot and mailplat"):

- the account's maildir is INBOX; folder "A/B" is the directory ``.A.B``,
  each level in IMAP modified UTF-7 (RFC 3501 5.1.3) as Dovecot writes it;
- flags are letters after ``:2,`` in the file name (D F P R S T, and a-z
  for keywords through the folder's ``dovecot-keywords`` file);
- UIDs live in each folder's ``mailplat-uidlist``, Dovecot's
  ``dovecot-uidlist`` version 3 format with two fields of ours: ``M`` (the
  modseq: per message, and the highest in the header) and ``T`` (the
  INTERNALDATE, kept here because POP3 sets a message's mtime when it is
  retrieved).  When only ``dovecot-uidlist`` exists, its UIDVALIDITY and
  UIDs are taken over;
- a flag change does not rewrite the uidlist: its line (``<uid> M<modseq>
  :<file name>``) is appended to ``mailplat-uidlist.log``, which is folded
  into the uidlist when it grows past the uidlist's size and at the next
  whole rewrite (an append, an expunge); see :meth:`MaildirPlus._log`;
- subscriptions are Dovecot's ``subscriptions`` file.

Every function of :class:`MaildirPlus` blocks: the backend calls them in
its thread pool.  Changes to a folder are made under a short lock (flock on
``mailplat-uidlist.lock``): many sessions, several worker processes, and
POP3 (which takes no such lock: its changes are found by the next scan) use
one maildir at once.  A folder's state is cached per process and re-read
only when the mtimes of ``new/``, ``cur/``, the uidlist or the keywords
file change, or when one of them is too recent to be trusted (a directory's
mtime has the granularity of the kernel's clock tick, so two changes within
one tick look like one: a folder changed in the last 0.1 s is scanned again,
in the last second on a file system with whole-second times, as Dovecot does).
:class:`Watcher` tells the IMAP server about changes, with inotify or by
polling.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)
from twisted.internet import task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailplat.fsutil import fsync_directory, makedirs_durable, replace_durably
from mailplat.interfaces import (
    FLAG_ANSWERED,
    FLAG_DELETED,
    FLAG_DRAFT,
    FLAG_FLAGGED,
    FLAG_SEEN,
    INBOX,
    SPECIAL_USE,
    Folder,
    FolderExists,
    FolderView,
    MessageInfo,
    NoSuchFolder,
    PermanentFailure,
    SpooledMessage,
    StoreResult,
    TemporaryFailure,
)
from mailplat.folders import canonical_flags, folder_levels, shown
from mailplat.numerals import is_digits
from mailplat.wire.lines import printable

__all__ = [
    "FORWARDED",
    "KEYWORDS_FILE",
    "MaildirPlus",
    "UIDLIST",
    "UIDLIST_LOG",
    "Watcher",
    "disk_name",
    "folder_path",
]

log = Logger()

FORWARDED = "$Forwarded"
UIDLIST = "mailplat-uidlist"
# Flag changes since the uidlist was last written, one line each (see MaildirPlus._log).
UIDLIST_LOG = "mailplat-uidlist.log"
DOVECOT_UIDLIST = "dovecot-uidlist"
KEYWORDS_FILE = "dovecot-keywords"
SUBSCRIPTIONS = "subscriptions"
_FOLDER_LOCK = "mailplat-uidlist.lock"
_ACCOUNT_LOCK = "mailplat-folders.lock"
_UIDVALIDITY = "mailplat-uidvalidity"
_SPECIAL_DONE = "mailplat-special-use"
# Dovecot's marker in each Maildir++ folder (its LDA and doveadm look for it).
_MAILDIRFOLDER = "maildirfolder"

# The maildir letters (cr.yp.to/proto/maildir.html) and the flags they are.
_LETTERS = {"D": FLAG_DRAFT, "F": FLAG_FLAGGED, "P": FORWARDED, "R": FLAG_ANSWERED, "S": FLAG_SEEN, "T": FLAG_DELETED}
_SYSTEM = {flag.lower(): letter for letter, flag in _LETTERS.items()}
_MAX_KEYWORDS = 26
# A folder's directory name is one path component.
_NAME_MAX = 255
# A directory changed this recently may change again within the same
# mtime: its cached scan is not trusted (see _settled).
_SLACK_NS = 1_000_000_000


def _settled(checked_ns: int, mtime_ns: int) -> bool:
    """Whether a change after ``checked_ns`` must give a newer mtime than ``mtime_ns``.

    True once a clock tick has passed since the mtime: Linux stamps files
    with its coarse clock (a tick is 1 to 10 ms; 0.1 s is ample), and a file
    system whose times are whole seconds (NFS, ext3) gets Dovecot's second.
    """
    slack = _SLACK_NS if mtime_ns % 1_000_000_000 == 0 else _SLACK_NS // 10
    return checked_ns - mtime_ns > slack
_LOCK_TIMEOUT = 30.0
# The change log is folded into the uidlist once it is larger than the
# uidlist itself (and this): reading it back then costs at most a second
# reading of the uidlist, and a fold is one rewrite per that many changes.
_LOG_FOLD_MIN = 64 * 1024
# After changes of our own, a folder is trusted without listing cur/ again
# (see _State.trusted) for at most this long after the first of them.
_RELIST_NS = 500_000_000
# The Watcher's second call after a change, in seconds: past _RELIST_NS.
_AGAIN = 0.6
# Messages whose state a process keeps in memory, over all folders (about
# a kilobyte each, measured): the least recently used folders are dropped beyond.
_CACHED_MESSAGES = 100_000
_COPY_BUFFER = 1 << 20


_shown = shown


# --- folder names -------------------------------------------------------------


def _levels(name: str) -> list[str] | None:
    """The levels of a folder name, None for INBOX; PermanentFailure for a name the maildir cannot hold."""
    parts = folder_levels(name)
    if parts is not None:
        for part in parts:
            if "." in part:
                raise PermanentFailure(f"folder name {shown(name)} may not contain '.' (the maildir separates levels with it)")
    return parts


def disk_name(name: str) -> str:
    """The directory of folder ``name`` in its maildir: "" for INBOX, ".A.B" for "A/B"."""
    parts = _levels(name)
    if parts is None:
        return ""
    encoded = "." + ".".join(part.encode("imap4-utf-7").decode("ascii") for part in parts)
    if len(encoded) > _NAME_MAX:
        raise PermanentFailure(f"folder name {_shown(name)} is too long ({len(encoded)} octets on disk, at most {_NAME_MAX})")
    return encoded


def folder_path(maildir: str, name: str) -> str:
    """The directory of folder ``name`` (the maildir itself for INBOX or "")."""
    if not name:
        return maildir
    disk = disk_name(name)
    return os.path.join(maildir, disk) if disk else maildir


def _folder_name(disk: str) -> str | None:
    """The folder a ``.A.B`` directory holds, or None when it is not one we would have made."""
    if not disk.startswith(".") or disk in (".", ".."):
        return None
    levels = []
    for part in disk[1:].split("."):
        try:
            decoded = part.encode("ascii").decode("imap4-utf-7")
        except (UnicodeError, ValueError):
            return None
        if decoded.encode("imap4-utf-7").decode("ascii") != part:
            return None
        levels.append(decoded)
    name = "/".join(levels)
    try:
        if disk_name(name) != disk:
            return None
    except PermanentFailure:
        return None
    return name


def _is_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "cur"))


def _make_maildir(path: str, subfolder: bool) -> None:
    for sub in ("tmp", "new", "cur"):
        makedirs_durable(os.path.join(path, sub))
    if subfolder and not os.path.exists(os.path.join(path, _MAILDIRFOLDER)):
        with open(os.path.join(path, _MAILDIRFOLDER), "ab"):
            pass


# --- small durable files ------------------------------------------------------


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None


@contextmanager
def _flock(path: str) -> Iterator[None]:
    """An exclusive flock on ``path`` (created when missing), held briefly.

    flock belongs to the open file, so it keeps out other processes and the
    other threads of this one alike.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TemporaryFailure("the folder is locked by another process; try again")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --- file names -----------------------------------------------------------------


def _base(name: str) -> str:
    return name.split(":", 1)[0]


def _info_letters(name: str) -> str:
    _, sep, letters = name.partition(":2,")
    return letters if sep else ""


def _size_in_name(base: str) -> int | None:
    """The ``,S=<size>`` of a name (ours and Dovecot's), or None."""
    for part in base.split(",")[1:]:
        if part.startswith("S=") and is_digits(part[2:]):
            return int(part[2:])
    return None


def _check_flags(flags: frozenset[str]) -> None:
    """PermanentFailure for a flag no message can have (before anything is changed)."""
    canonical_flags(flags)


# --- a folder's state -------------------------------------------------------------


@dataclass(slots=True)
class _Record:
    uid: int
    base: str
    name: str  # the file's whole name, flags and all
    sub: str  # "cur" or "new"
    size: int
    date: int
    modseq: int
    info: MessageInfo | None = None
    # Its line in the uidlist, made again only when it changes.
    line: str | None = None

    def uidlist_line(self) -> str:
        if self.line is None:
            self.line = f"{self.uid} M{self.modseq} S{self.size} T{self.date} :{self.name}\n"
        return self.line


@dataclass
class _State:
    path: str
    uidvalidity: int
    uidnext: int
    highest: int
    records: dict[int, _Record] = field(default_factory=dict)
    bases: dict[str, int] = field(default_factory=dict)
    # What the last scan found: base -> (sub, name), and the names in new/ and cur/.
    names: dict[str, tuple[str, str]] | None = None
    listing: tuple[set[str], set[str]] | None = None
    keywords: dict[int, str] = field(default_factory=dict)
    keywords_key: Any = None
    uidlist_key: Any = None
    # (new/, cur/, uidlist, keywords, log) as stat keys, taken before the scan
    # (or, with ``ours``, after a change of our own since it).
    stamp: Any = None
    checked_ns: int = 0
    # Since when (time.time_ns) the stamp has been taken after our own changes, not by a listing.
    ours: bool = False
    ours_since: int = 0
    # How much of the change log has been read (and the log's inode).
    log_offset: int = 0
    log_ino: int | None = None
    view: FolderView | None = None
    # The view's messages as a list kept in UID order, and each UID's place
    # in it: a flag change replaces one entry instead of building the whole
    # view again (None: built again at the next view).
    infos: list[MessageInfo] | None = None
    places: dict[int, int] | None = None
    # info letters -> flags, for the current keyword table.
    flag_cache: dict[str, frozenset[str]] = field(default_factory=dict)
    # Read from Dovecot's uidlist: set aside once ours is written.
    imported: bool = False

    def trusted(self, stamp: Any) -> bool:
        if stamp != self.stamp:
            return False
        newest = max((key[1] for key in stamp if key is not None), default=0)
        if not self.ours:
            return _settled(self.checked_ns, newest)
        # The stamp was taken after a change of our own, under the lock:
        # every locked writer's change is in it, but one by a program that
        # takes no lock (POP3) within the same clock tick would not show in
        # the mtimes.  Trusted meanwhile for a short while, so that a storm
        # of flag changes does not list cur/ after each one; listed again
        # once the mtimes have settled, or _RELIST_NS after the first such
        # change at the latest (and the Watcher has it listed after the
        # last change of a storm: MaildirPlus.refresh).
        now = time.time_ns()
        return not _settled(now, newest) and now - self.ours_since < _RELIST_NS

    def flags_of(self, name: str) -> frozenset[str]:
        letters = _info_letters(name)
        flags = self.flag_cache.get(letters)
        if flags is None:
            found = set()
            for letter in letters:
                if letter in _LETTERS:
                    found.add(_LETTERS[letter])
                elif "a" <= letter <= "z" and ord(letter) - 97 in self.keywords:
                    found.add(self.keywords[ord(letter) - 97])
            flags = self.flag_cache[letters] = frozenset(found)
        return flags

    def info(self, record: _Record) -> MessageInfo:
        if record.info is None:
            record.info = MessageInfo(record.uid, record.size, self.flags_of(record.name), float(record.date), record.modseq)
        return record.info

    def listed(self, sub: str, name: str, present: bool) -> None:
        """Keep the last scan's listing true to our own changes, so that they need no rescan."""
        if self.listing is not None:
            names = self.listing[0 if sub == "new" else 1]
            if present:
                names.add(name)
            else:
                names.discard(name)
        if self.names is not None:
            if present:
                self.names[_base(name)] = (sub, name)
            elif self.names.get(_base(name)) == (sub, name):
                del self.names[_base(name)]

    def add(self, record: _Record) -> None:
        last = next(reversed(self.records), 0) if self.records else 0
        self.records[record.uid] = record
        self.bases[record.base] = record.uid
        self.listed(record.sub, record.name, True)
        if self.infos is not None and self.places is not None and record.uid > last:
            self.places[record.uid] = len(self.infos)
            self.infos.append(self.info(record))
        else:
            self.infos = None

    def remove(self, uid: int) -> _Record | None:
        record = self.records.pop(uid, None)
        if record is not None:
            self.bases.pop(record.base, None)
            self.listed(record.sub, record.name, False)
            self.infos = None
        return record

    def rename(self, record: _Record, sub: str, name: str, modseq: int) -> None:
        self.listed(record.sub, record.name, False)
        record.sub, record.name, record.modseq, record.info, record.line = sub, name, modseq, None, None
        self.listed(sub, name, True)
        if self.infos is not None and self.places is not None:
            self.infos[self.places[record.uid]] = self.info(record)

    def file(self, record: _Record) -> str:
        return os.path.join(self.path, record.sub, record.name)

    def build_view(self) -> FolderView:
        if self.infos is None:
            self.infos = [self.info(r) for r in self.records.values()]
            self.places = {uid: place for place, uid in enumerate(self.records)}
        self.view = FolderView(self.uidvalidity, self.uidnext, self.highest, tuple(self.infos))
        return self.view

    def apply_log(self, text: str) -> None:
        """Another process's flag changes (or ours, read back at a load): each line newer than its record wins."""
        for uid_text, modseq_text, name in _LOG_RECORDS.findall(text):
            modseq = int(modseq_text)
            if modseq > self.highest:
                self.highest = modseq
            record = self.records.get(int(uid_text))
            if record is None or modseq <= record.modseq or _base(name) != record.base:
                continue
            # Taken as listed: the other process renamed the file before it
            # wrote the line, so a listing that finds just that needs no
            # reconciling (and one that does not, does).
            self.rename(record, "cur", name, modseq)
            self.view = None


# The change log's lines: "<uid> M<modseq> :<file name>".
_LOG_RECORDS = re.compile(r"^([0-9]+) M([0-9]+) :([^\n]+)$", re.MULTILINE)
_OUR_RECORD = re.compile(r"([0-9]+) M([0-9]+) S([0-9]+) T([0-9]+) :(.+)")
_OUR_RECORDS = re.compile(r"^([0-9]+) M([0-9]+) S([0-9]+) T([0-9]+) :([^\n]+)$", re.MULTILINE)

# (uid, modseq, size, date, file name); -1 where the line does not say.
_Line = tuple[int, int, int, int, str]


def _number(fields: dict[str, str], key: str) -> int:
    value = fields.get(key, "")
    return int(value) if is_digits(value) else -1


def _parse_uidlist(text: str) -> tuple[dict[str, int], list[_Line]] | None:
    """A ``dovecot-uidlist`` (version 1 or 3, ours or Dovecot's): the header's fields and the records."""
    first, _, body = text.partition("\n")
    head = first.split()
    if not head:
        return None
    header: dict[str, int] = {}
    records: list[_Line] = []
    if head[0] == "1" and len(head) >= 3 and is_digits(head[1]) and is_digits(head[2]):
        header = {"V": int(head[1]), "N": int(head[2])}
        for line in body.split("\n"):
            uid, _, name = line.partition(" ")
            if is_digits(uid) and name:
                records.append((int(uid), -1, -1, -1, name))
        return header, records
    if head[0] != "3":
        return None
    for word in head[1:]:
        if word[:1] in ("V", "N", "M") and is_digits(word[1:]):
            header[word[0]] = int(word[1:])
    ours = _OUR_RECORDS.findall(body)
    if len(ours) == body.count("\n"):
        # Every line is one of ours (the common case): read in one pass.
        return header, [(int(uid), int(modseq), int(size), int(date), name) for uid, modseq, size, date, name in ours]
    for line in body.split("\n"):
        match = _OUR_RECORD.fullmatch(line)
        if match is not None:
            # Our own lines, the common case, in one step.
            uid, modseq, size, date, name = match.groups()
            records.append((int(uid), int(modseq), int(size), int(date), name))
            continue
        # Dovecot's: "<uid> [<key><value> ...] :<file name>".
        front, sep, name = line.partition(" :")
        if not sep:
            continue
        words = front.split()
        if not words or not is_digits(words[0]) or not name:
            continue
        fields = {w[0]: w[1:] for w in words[1:] if w}
        records.append((int(words[0]), _number(fields, "M"), _number(fields, "S"), _number(fields, "T"), name))
    return header, records


def _parse_keywords(text: str | None) -> dict[int, str]:
    found: dict[int, str] = {}
    for line in (text or "").split("\n"):
        index, _, name = line.partition(" ")
        if is_digits(index) and int(index) < _MAX_KEYWORDS and name:
            found[int(index)] = name
    return found


# --- the store ----------------------------------------------------------------------


class MaildirPlus:
    """IMessageStore's disk work on Maildir++ folders; every method blocks.

    One instance per process: its cache of folder states is what makes
    ``view`` cheap, shared by every session.  ``unique_name(size)`` makes
    the file names of new messages (the backend's, so that appended and
    delivered names look alike).
    """

    def __init__(self, unique_name: Callable[[int], str]) -> None:
        self.unique_name = unique_name
        # Most recently used last; bounded by _CACHED_MESSAGES (a folder
        # evicted is read from disk again when next used).
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._usage: dict[str, tuple[Any, int, int, int]] = {}
        self._usage_folders: dict[str, tuple[Any, int, list[str]]] = {}

    # -- locks and states --

    def _thread_lock(self, path: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(path)
            if lock is None:
                lock = self._locks[path] = threading.Lock()
            return lock

    @contextmanager
    def _locked(self, path: str) -> Iterator[_State]:
        """The folder's state, synced, with the folder locked for a change."""
        if not _is_folder(path):
            raise NoSuchFolder("no such folder")
        with self._thread_lock(path), _flock(os.path.join(path, _FOLDER_LOCK)):
            yield self._sync(path)

    @contextmanager
    def _quiet(self, path: str) -> Iterator[None]:
        """A folder's lock without a scan: no change of it is under way (before it is renamed or deleted).

        Always taken after the account's lock, never the other way round.
        """
        with self._thread_lock(path), _flock(os.path.join(path, _FOLDER_LOCK)):
            yield

    @contextmanager
    def _account(self, maildir: str) -> Iterator[None]:
        """The account's folder list locked (create, delete, rename, subscriptions)."""
        self._ensure_inbox(maildir)
        with self._thread_lock(maildir + "/"), _flock(os.path.join(maildir, _ACCOUNT_LOCK)):
            yield

    def _ensure_inbox(self, maildir: str) -> None:
        if not _is_folder(maildir):
            try:
                _make_maildir(maildir, subfolder=False)
            except OSError as e:
                raise TemporaryFailure(f"cannot create the mailbox: {e.strerror}")

    def _forget(self, path: str) -> None:
        """Drop the cached states of a folder and its children (deleted or renamed)."""
        with self._guard:
            for key in [k for k in self._states if k == path or k.startswith(path + ".")]:
                del self._states[key]

    @staticmethod
    def _stamp(path: str) -> tuple[Any, ...]:
        return (
            _stat_key(os.path.join(path, "new")),
            _stat_key(os.path.join(path, "cur")),
            _stat_key(os.path.join(path, UIDLIST)),
            _stat_key(os.path.join(path, KEYWORDS_FILE)),
            _stat_key(os.path.join(path, UIDLIST_LOG)),
        )

    def _next_uidvalidity(self, path: str) -> int:
        """A UIDVALIDITY never given before in this account: the time, or one more than the last."""
        maildir = path if not os.path.basename(path).startswith(".") else os.path.dirname(path)
        counter = os.path.join(maildir, _UIDVALIDITY)
        with _flock(counter + ".lock"):
            last = (_read(counter) or "").strip()
            value = max(int(time.time()), int(last) + 1 if is_digits(last) else 1) & 0xFFFFFFFF or 1
            replace_durably(counter, b"%d\n" % value)
        return value

    def _load(self, path: str) -> _State:
        """A folder's state from its uidlist (ours, else Dovecot's, else new)."""
        key = _stat_key(os.path.join(path, UIDLIST))
        parsed = None
        text = _read(os.path.join(path, UIDLIST))
        ours = text is not None
        if text is None:
            text = _read(os.path.join(path, DOVECOT_UIDLIST))
        if text is not None:
            parsed = _parse_uidlist(text)
            if parsed is None:
                log.warn("maildir: {path} has a uidlist in a format we do not know; its UIDs start again", path=path)
        if parsed is None or not parsed[0].get("V"):
            state = _State(path, self._next_uidvalidity(path), 1, 1)
            state.uidlist_key = key
            return state
        header, entries = parsed
        state = _State(path, header["V"], max(1, header.get("N", 1)), max(1, header.get("M", 1)))
        state.uidlist_key = key
        records, bases = state.records, state.bases
        for uid, modseq, size, date, name in sorted(entries):
            base = name.split(":", 1)[0]
            if uid <= 0 or uid in records or base in bases:
                continue
            if size < 0:
                size = _size_in_name(base) or -1
            record = _Record(uid, base, name, "cur", size, date, max(1, modseq))
            records[uid] = record
            bases[base] = uid
        if records:
            state.uidnext = max(state.uidnext, max(records) + 1)
        if ours:
            self._read_log(state)
        else:
            # Dovecot's modseqs are in its index, which we do not read: start
            # above any it can have reached (a count of changes), so that a
            # CONDSTORE client's cached HIGHESTMODSEQ is lower and it resyncs
            # every message's flags once rather than missing changes.
            start = time.time_ns() // 1000
            for record in records.values():
                record.modseq = start
            state.highest = start
            state.imported = True
            log.info("maildir: {path}: took UIDVALIDITY {v} and {n} UIDs over from dovecot-uidlist", path=path, v=state.uidvalidity, n=len(state.records))
        return state

    def _load_keywords(self, state: _State, key: Any) -> None:
        if key != state.keywords_key:
            state.keywords = _parse_keywords(_read(os.path.join(state.path, KEYWORDS_FILE)))
            state.keywords_key = key
            state.flag_cache = {}
            for record in state.records.values():
                record.info = None
            state.view = state.infos = None

    def _cached(self, path: str) -> _State | None:
        with self._guard:
            state = self._states.get(path)
            if state is not None:
                self._states.move_to_end(path)
            return state

    def _keep(self, path: str, state: _State) -> None:
        with self._guard:
            self._states[path] = state
            self._states.move_to_end(path)
            total = sum(len(s.records) for s in self._states.values())
            while total > _CACHED_MESSAGES and len(self._states) > 1:
                _, evicted = self._states.popitem(last=False)
                total -= len(evicted.records)

    def _quick(self, path: str) -> FolderView | None:
        state = self._cached(path)
        if state is not None and state.trusted(self._stamp(path)):
            return state.view
        return None

    def _sync(self, path: str) -> _State:
        """Bring the cached state up to date with the disk; with the folder's lock held."""
        stamp = self._stamp(path)
        checked = time.time_ns()
        state = self._cached(path)
        if state is not None and state.trusted(stamp):
            return state
        if state is None or stamp[2] != state.uidlist_key:
            # The uidlist was replaced by another process (or never read).
            state = self._load(path)
            state.keywords_key = object()
        elif (None if stamp[4] is None else (stamp[4][0], stamp[4][2])) != (None if state.log_ino is None else (state.log_ino, state.log_offset)):
            # Another process changed flags (or folded the log).
            self._read_log(state)
        self._load_keywords(state, stamp[3])
        try:
            listing = (set(os.listdir(os.path.join(path, "new"))), set(os.listdir(os.path.join(path, "cur"))))
        except FileNotFoundError:
            raise NoSuchFolder("no such folder")
        changed = structural = False
        renamed: list[_Record] = []
        if listing != state.listing:
            found: dict[str, tuple[str, str]] = {}
            for sub, names in (("new", listing[0]), ("cur", listing[1])):
                for name in names:
                    # Dot files are not messages; a line end would break the uidlist.
                    if name.startswith(".") or "\n" in name or "\r" in name:
                        continue
                    # The same message in new/ and cur/ (a crash mid-rename): cur/ wins.
                    found[name.split(":", 1)[0]] = (sub, name)
            previous = state.names
            state.names, state.listing = dict(found), listing
            if found != previous:
                structural = self._reconcile(state, found, renamed)
            changed = structural or bool(renamed)
        if structural or not os.path.exists(os.path.join(path, UIDLIST)):
            self._save(state)
        elif renamed:
            # Renamed by a program that logs nothing (POP3 marking a message seen).
            self._log(state, renamed)
        if state.imported:
            # Set aside, so that neither we (were our uidlist lost) nor Dovecot
            # (started again on this maildir without the README's steps) go on
            # from UIDs that no longer tell the whole story.
            try:
                os.rename(os.path.join(path, DOVECOT_UIDLIST), os.path.join(path, DOVECOT_UIDLIST + ".imported"))
                fsync_directory(path)
            except FileNotFoundError:
                pass
            state.imported = False
        if changed:
            state.view = None
        state.stamp, state.checked_ns, state.ours = stamp, checked, False
        self._keep(path, state)
        return state

    def _restamp(self, state: _State, uidlist: bool = False) -> None:
        """Take our own change (to cur/, the log, or the uidlist) into the stamp, so that it needs no listing.

        Only the parts we changed are stat'ed again: a change by another
        process to the rest still shows as a difference.  See _State.trusted.
        """
        if state.stamp is None:
            return
        path = state.path
        old = state.stamp
        state.stamp = (
            old[0],
            _stat_key(os.path.join(path, "cur")),
            _stat_key(os.path.join(path, UIDLIST)) if uidlist else old[2],
            old[3],
            _stat_key(os.path.join(path, UIDLIST_LOG)),
        )
        if not state.ours:
            # Listed (or trusted) at the sync before this change: nothing hidden before now.
            state.ours_since = time.time_ns()
        state.ours = True

    def refresh(self, path: str) -> None:
        """List a folder again if our own changes were trusted without a listing (the Watcher, a while after a storm).

        So that the next command does not pay for that listing, and a change
        another program made in the clock tick of one of ours is found.
        """
        state = self._cached(path)
        if state is None or not state.ours or not _is_folder(path):
            return
        try:
            with self._locked(path):
                pass
        except (NoSuchFolder, FileNotFoundError):
            pass

    def _reconcile(self, state: _State, found: dict[str, tuple[str, str]], renamed: list[_Record]) -> bool:
        """Apply what the scan found: messages gone, renamed (flags changed), new (given UIDs).

        True when messages came, went or moved (the uidlist is written
        again); those whose flags alone changed are added to ``renamed``
        (their lines go to the log).
        """
        changed = False
        found = dict(found)
        expunged = False
        for uid, record in list(state.records.items()):
            where = found.pop(record.base, None)
            if where is None:
                state.remove(uid)
                expunged = True
                continue
            if where != (record.sub, record.name):
                flags_changed = _info_letters(where[1]) != _info_letters(record.name)
                if flags_changed:
                    state.highest += 1
                state.rename(record, where[0], where[1], state.highest if flags_changed else record.modseq)
                if flags_changed and where[0] == "cur" == record.sub:
                    renamed.append(record)
                else:
                    changed = True
            if record.size < 0 or record.date < 0:
                try:
                    self._fill(state, record)
                except FileNotFoundError:
                    state.remove(uid)
                    expunged = True
                record.info = state.infos = None
                changed = True
        if expunged:
            state.highest += 1
            changed = True
        for base in sorted(found):
            sub, name = found[base]
            state.listed(sub, name, False)
            if not os.path.isfile(os.path.join(state.path, sub, name)):
                continue
            if sub == "new":
                # As Dovecot: a message seen by IMAP moves to cur/ (it is no longer \Recent).
                moved = name if ":" in name else name + ":2,"
                try:
                    os.rename(os.path.join(state.path, "new", name), os.path.join(state.path, "cur", moved))
                    sub, name = "cur", moved
                except FileNotFoundError:
                    continue
                except OSError:
                    pass
            state.highest += 1
            record = _Record(state.uidnext, base, name, sub, -1, -1, state.highest)
            try:
                self._fill(state, record)
            except FileNotFoundError:
                continue
            state.uidnext += 1
            state.add(record)
            changed = True
        if changed:
            fsync_directory(os.path.join(state.path, "cur"))
        return changed

    @staticmethod
    def _fill(state: _State, record: _Record) -> None:
        """Size and INTERNALDATE (the mtime) of a message first seen."""
        if record.size >= 0 and record.date >= 0:
            return
        try:
            st = os.stat(state.file(record))
        except FileNotFoundError:
            if record.size < 0:
                raise
            record.date = max(record.date, 0)
            return
        if record.size < 0:
            record.size = _size_in_name(record.base) or st.st_size
        if record.date < 0:
            record.date = int(st.st_mtime)
        record.line = None

    def _save(self, state: _State) -> None:
        """Write the whole uidlist (durably), with the log folded in."""
        lines = [f"3 V{state.uidvalidity} N{state.uidnext} M{state.highest}\n"]
        lines.extend(r.uidlist_line() for r in state.records.values())
        replace_durably(os.path.join(state.path, UIDLIST), "".join(lines).encode("utf-8", "surrogateescape"))
        state.uidlist_key = _stat_key(os.path.join(state.path, UIDLIST))
        # Only once the uidlist holds every line of the log: should this be
        # lost in a crash, reading the log again changes nothing (a line
        # applies only when its modseq is above its message's).
        _unlink(os.path.join(state.path, UIDLIST_LOG))
        state.log_offset, state.log_ino = 0, None

    def _log(self, state: _State, records: list[_Record]) -> bool:
        """Flag changes, appended to the change log: a few bytes per change instead of the whole uidlist.

        Under the folder's lock, after a sync that read the log to its end.
        Not fsynced (as Dovecot's ``mail_fsync = optimized`` does not sync a
        flag change): a crash may lose the latest flag changes (the file
        names, renamed without a sync of cur/, go back with them), never a
        message or a UID.  Folded into the uidlist once the log outgrows it
        (then True: the uidlist was written).
        """
        path = os.path.join(state.path, UIDLIST_LOG)
        data = "".join(f"{r.uid} M{r.modseq} :{r.name}\n" for r in records).encode("utf-8", "surrogateescape")
        size = state.uidlist_key[2] if state.uidlist_key is not None else 0
        if state.log_offset + len(data) > max(_LOG_FOLD_MIN, size):
            self._save(state)
            return True
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                ino = os.fstat(fd).st_ino
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError:
            # A disk error half-way leaves a torn line, cut off by the next
            # reader; the whole uidlist then (or the error).
            self._save(state)
            return True
        state.log_ino = ino
        state.log_offset += len(data)
        return False

    def _read_log(self, state: _State) -> None:
        """The change log's lines since we last read it (all of it, when it is not the one we read)."""
        path = os.path.join(state.path, UIDLIST_LOG)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            state.log_offset, state.log_ino = 0, None
            return
        try:
            st = os.fstat(fd)
            if st.st_ino != state.log_ino or st.st_size < state.log_offset:
                state.log_offset, state.log_ino = 0, st.st_ino
            offset = state.log_offset
            data = b""
            while offset + len(data) < st.st_size:
                chunk = os.pread(fd, st.st_size - offset - len(data), offset + len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        whole = data.rfind(b"\n") + 1
        if whole:
            state.apply_log(data[:whole].decode("utf-8", "surrogateescape"))
        state.log_offset = offset + whole
        if whole < len(data):
            # A torn last line: a process died writing it (writers hold the
            # lock we hold).  Ignored, and cut off so that the next line
            # appended starts a line of its own.
            log.warn("maildir: {path}: ignoring a torn last line of the change log", path=path)
            try:
                os.truncate(path, state.log_offset)
            except OSError:
                pass

    # -- flags --

    def _letters(self, state: _State, flags: frozenset[str]) -> str:
        """The info letters for ``flags`` in this folder, adding keywords to its file as needed."""
        _check_flags(flags)
        letters = []
        wanted = []
        for flag in flags:
            letter = _SYSTEM.get(flag.lower())
            if letter is not None:
                letters.append(letter)
            elif not flag.startswith("\\"):
                wanted.append(flag)
        if wanted:
            by_name = {name.lower(): index for index, name in state.keywords.items()}
            added = False
            for flag in sorted(wanted):
                index = by_name.get(flag.lower())
                if index is None:
                    free = [i for i in range(_MAX_KEYWORDS) if i not in state.keywords]
                    if not free:
                        raise PermanentFailure(
                            f"cannot add the keyword {printable(flag, 40)}: this folder already has {_MAX_KEYWORDS} keywords, the most a maildir can hold"
                        )
                    index = free[0]
                    state.keywords[index] = flag
                    by_name[flag.lower()] = index
                    added = True
                letters.append(chr(97 + index))
            if added:
                text = "".join(f"{i} {name}\n" for i, name in sorted(state.keywords.items()))
                replace_durably(os.path.join(state.path, KEYWORDS_FILE), text.encode("utf-8"))
                state.keywords_key = _stat_key(os.path.join(state.path, KEYWORDS_FILE))
                state.flag_cache = {}
        return "".join(sorted(set(letters)))

    @staticmethod
    def _foreign_letters(state: _State, name: str) -> str:
        """Letters of a name that are no flag we know (another program's): kept as they are."""
        return "".join(
            c for c in _info_letters(name)
            if c not in _LETTERS and not ("a" <= c <= "z" and ord(c) - 97 in state.keywords)
        )

    def _canonical(self, state: _State, flags: frozenset[str]) -> frozenset[str]:
        """System flags in their usual case, keywords as the folder already spells them."""
        spelled = {name.lower(): name for name in state.keywords.values()}
        out = set()
        for flag in flags:
            letter = _SYSTEM.get(flag.lower())
            if letter is not None:
                out.add(_LETTERS[letter])
            elif flag.lower() != "\\recent":
                out.add(spelled.get(flag.lower(), flag))
        return frozenset(out)

    def _name_with(self, state: _State, base: str, flags: frozenset[str], keep: str = "") -> str:
        return f"{base}:2,{''.join(sorted(set(self._letters(state, flags) + keep)))}"

    # -- IMessageStore, blocking --

    def folders(self, maildir: str) -> list[Folder]:
        self._ensure_inbox(maildir)
        if not os.path.exists(os.path.join(maildir, _SPECIAL_DONE)):
            with self._account(maildir):
                if not os.path.exists(os.path.join(maildir, _SPECIAL_DONE)):
                    subscribed = self._subscriptions(maildir)
                    for name in SPECIAL_USE:
                        path = folder_path(maildir, name)
                        if not _is_folder(path):
                            self._create(maildir, path)
                    self._write_subscriptions(maildir, subscribed | {INBOX, *SPECIAL_USE})
                    replace_durably(os.path.join(maildir, _SPECIAL_DONE), b"")
        subscribed = self._subscriptions(maildir)
        found = [Folder(INBOX, "", INBOX in subscribed)]
        names = []
        for entry in os.listdir(maildir):
            decoded = _folder_name(entry)
            if decoded is not None and _is_folder(os.path.join(maildir, entry)):
                names.append(decoded)
        for name in sorted(names):
            found.append(Folder(name, SPECIAL_USE.get(name, ""), name in subscribed))
        return found

    def _create(self, maildir: str, path: str) -> None:
        """Make a folder whole in a scratch directory, then rename it in: never seen half made."""
        scratch = os.path.join(maildir, f"mailplat-new.{uuid.uuid4().hex}")
        try:
            _make_maildir(scratch, subfolder=True)
            try:
                os.rename(scratch, path)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FolderExists("the folder exists")
                raise
            fsync_directory(maildir)
        finally:
            if os.path.exists(scratch):
                shutil.rmtree(scratch, ignore_errors=True)

    def create_folder(self, maildir: str, name: str) -> None:
        path = folder_path(maildir, name)
        if path == maildir:
            raise FolderExists("INBOX always exists")
        with self._account(maildir):
            if _is_folder(path):
                raise FolderExists(f"folder {_shown(name)} exists")
            self._forget(path)
            levels = name.split("/")
            for depth in range(1, len(levels)):
                parent = folder_path(maildir, "/".join(levels[:depth]))
                if parent != maildir and not _is_folder(parent):
                    self._create(maildir, parent)
            self._create(maildir, path)

    def delete_folder(self, maildir: str, name: str) -> None:
        path = folder_path(maildir, name)
        if path == maildir:
            raise PermanentFailure("INBOX cannot be deleted")
        with self._account(maildir):
            if not _is_folder(path):
                raise NoSuchFolder(f"no folder {_shown(name)}")
            # Out of the folder list in one step, then removed at leisure.
            doomed = os.path.join(maildir, f"mailplat-deleted.{uuid.uuid4().hex}")
            with self._quiet(path):
                os.rename(path, doomed)
                fsync_directory(maildir)
                self._forget(path)
        shutil.rmtree(doomed, ignore_errors=True)

    def rename_folder(self, maildir: str, old: str, new: str) -> None:
        source = folder_path(maildir, old)
        target = folder_path(maildir, new)
        if target == maildir:
            raise FolderExists("INBOX always exists")
        if source == maildir:
            # RFC 3501 6.3.5: INBOX's messages move to the new folder; INBOX stays, empty.
            self.create_folder(maildir, new)
            view = self.view(maildir, INBOX)
            self.move(maildir, INBOX, [m.uid for m in view.messages], new)
            return
        if target == source or target.startswith(source + "."):
            raise PermanentFailure(f"cannot rename {_shown(old)} into itself")
        with self._account(maildir):
            if not _is_folder(source):
                raise NoSuchFolder(f"no folder {_shown(old)}")
            old_disk, new_disk = os.path.basename(source), os.path.basename(target)
            moves = [
                (entry, new_disk + entry[len(old_disk):])
                for entry in sorted(os.listdir(maildir))
                if entry == old_disk or entry.startswith(old_disk + ".")
            ]
            for _, to in moves:
                if len(to) > _NAME_MAX:
                    raise PermanentFailure(f"folder name {_shown(new)} is too long for its children")
                if os.path.exists(os.path.join(maildir, to)):
                    raise FolderExists(f"folder {_shown(_folder_name(to) or new)} exists")
            levels = new.split("/")
            for depth in range(1, len(levels)):
                parent = folder_path(maildir, "/".join(levels[:depth]))
                if parent != maildir and not _is_folder(parent):
                    self._create(maildir, parent)
            for entry, to in moves:
                with self._quiet(os.path.join(maildir, entry)):
                    os.rename(os.path.join(maildir, entry), os.path.join(maildir, to))
                    self._forget(os.path.join(maildir, entry))
            fsync_directory(maildir)
            subscribed = self._subscriptions(maildir)
            old_name, new_name = _folder_name(old_disk), _folder_name(new_disk)
            if old_name and new_name:
                renamed = {
                    new_name + s[len(old_name):] if s == old_name or s.startswith(old_name + "/") else s
                    for s in subscribed
                }
                if renamed != subscribed:
                    self._write_subscriptions(maildir, renamed)

    # -- subscriptions: Dovecot's file ("V\t2\n\n", then a name a line, levels in modified UTF-7 separated by a tab) --

    @staticmethod
    def _subscriptions(maildir: str) -> set[str]:
        text = _read(os.path.join(maildir, SUBSCRIPTIONS))
        if not text:
            return set()
        if text.startswith("V\t2\n\n"):
            # Version 2: levels separated by a tab.
            lines = [line.split("\t") for line in text[5:].split("\n") if line]
        else:
            # Version 1: the namespace's separator between levels.
            lines = [line.replace("/", ".").split(".") for line in text.split("\n") if line]
        names = set()
        for levels in lines:
            decoded = []
            for level in levels:
                # Each level in modified UTF-7, as Dovecot writes it.
                try:
                    decoded.append(level.encode("ascii").decode("imap4-utf-7"))
                except (UnicodeError, ValueError):
                    decoded.append(level)
            name = "/".join(decoded)
            names.add(INBOX if name.upper() == INBOX else name)
        return names

    @staticmethod
    def _write_subscriptions(maildir: str, names: set[str]) -> None:
        lines = ("\t".join(level.encode("imap4-utf-7").decode("ascii") for level in n.split("/")) + "\n" for n in sorted(names))
        replace_durably(os.path.join(maildir, SUBSCRIPTIONS), ("V\t2\n\n" + "".join(lines)).encode("ascii"))

    def subscribe(self, maildir: str, name: str, subscribed: bool) -> None:
        levels = _levels(name)
        canonical = INBOX if levels is None else "/".join(levels)
        disk_name(name)
        with self._account(maildir):
            names = self._subscriptions(maildir)
            wanted = names | {canonical} if subscribed else names - {canonical}
            if wanted != names:
                self._write_subscriptions(maildir, wanted)

    # -- one folder --

    def _path(self, maildir: str, folder: str) -> str:
        path = folder_path(maildir, folder)
        if path == maildir:
            self._ensure_inbox(maildir)
        elif not _is_folder(path):
            raise NoSuchFolder(f"no folder {_shown(folder)}")
        return path

    def view(self, maildir: str, folder: str) -> FolderView:
        path = self._path(maildir, folder)
        quick = self._quick(path)
        if quick is not None:
            return quick
        with self._locked(path) as state:
            # Made here, not at each change: a run of appends or stores builds it once.
            return state.view or state.build_view()

    def open_cached(self, maildir: str, folder: str, uid: int) -> IO[bytes] | None:
        """The message opened from the folder's cached listing, with one open(2)
        and no other disk work, on the calling thread (the reactor's: FETCH of
        many small messages waited on a pool thread for each).  A message's
        content never changes, only its name: a name that no longer opens, or
        a folder not cached, is None, and the caller asks :meth:`open_message`."""
        try:
            path = folder_path(maildir, folder)
        except PermanentFailure:
            return None
        state = self._cached(path)
        record = state.records.get(uid) if state is not None else None
        if state is None or record is None:
            return None
        try:
            return open(state.file(record), "rb")
        except OSError:
            return None

    def open_message(self, maildir: str, folder: str, uid: int) -> IO[bytes]:
        path = self._path(maildir, folder)
        for attempt in range(2):
            cached = self._cached(path) if attempt == 0 else None
            if cached is not None and cached.trusted(self._stamp(path)):
                state = cached
            else:
                with self._locked(path) as state:
                    pass
            record = state.records.get(uid)
            if record is None:
                break
            try:
                return open(state.file(record), "rb")
            except FileNotFoundError:
                # Renamed or removed by another process since the last scan: look again.
                state.stamp = None
        raise PermanentFailure(f"message UID {uid} is gone")

    def append(self, maildir: str, folder: str, message: SpooledMessage, flags: frozenset[str], internal_date: float) -> tuple[int, int]:
        _check_flags(flags)
        path = self._path(maildir, folder)
        name = self.unique_name(message.size)
        tmp = os.path.join(path, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            written = 0
            with open(fd, "wb") as out, message.open() as source:
                while True:
                    chunk = source.read(_COPY_BUFFER)
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if written != message.size:
                fixed = self.unique_name(written)
                os.rename(tmp, os.path.join(path, "tmp", fixed))
                name, tmp = fixed, os.path.join(path, "tmp", fixed)
            os.utime(tmp, (internal_date, internal_date))
            with self._locked(path) as state:
                final = self._name_with(state, name, flags)
                os.rename(tmp, os.path.join(path, "cur", final))
                fsync_directory(os.path.join(path, "cur"))
                state.highest += 1
                record = _Record(state.uidnext, name, final, "cur", written, int(internal_date), state.highest)
                state.uidnext += 1
                state.add(record)
                self._save(state)
                state.view = None
                return state.uidvalidity, record.uid
        except BaseException:
            _unlink(tmp)
            raise

    def store_flags(
        self, maildir: str, folder: str, uids: list[int], flags: frozenset[str], how: str, unchanged_since: int | None = None,
    ) -> StoreResult:
        if how not in ("set", "add", "remove"):
            raise ValueError(f"how must be set, add or remove, not {how!r}")
        _check_flags(flags)
        path = self._path(maildir, folder)
        with self._locked(path) as state:
            given = self._canonical(state, flags)
            changed: list[MessageInfo] = []
            modified: list[int] = []
            renamed: dict[int, _Record] = {}
            lowered = {f.lower() for f in given}
            for uid in sorted(set(uids)):
                record = state.records.get(uid)
                # Twice at most: once more when the file was renamed (POP3, another program) since the scan.
                for _ in range(2):
                    if record is None:
                        break
                    if unchanged_since is not None and record.modseq > unchanged_since:
                        modified.append(uid)
                        break
                    current = state.flags_of(record.name)
                    if how == "set":
                        wanted = given
                    elif how == "add":
                        wanted = current | given
                    else:
                        wanted = frozenset(f for f in current if f.lower() not in lowered)
                    if wanted == current:
                        break
                    name = self._name_with(state, record.base, wanted, self._foreign_letters(state, record.name))
                    try:
                        os.rename(state.file(record), os.path.join(path, "cur", name))
                    except FileNotFoundError:
                        where = self._relocate(path, record)
                        if where is None:
                            break  # gone: the next scan expunges it
                        renamed[uid] = record
                        state.highest += 1
                        state.rename(record, os.path.basename(os.path.dirname(where)), os.path.basename(where), state.highest)
                        continue
                    renamed[uid] = record
                    state.highest += 1
                    state.rename(record, "cur", name, state.highest)
                    changed.append(state.info(record))
                    break
            if renamed:
                records = list(renamed.values())
                if all(r.sub == "cur" for r in records):
                    # A flag change: renames within cur/ and a line each in
                    # the log, neither fsynced (see _log; the README says so).
                    saved = self._log(state, records)
                else:
                    # A file found in new/ moved to cur/: durably, with the whole uidlist.
                    for sub in ("new", "cur"):
                        fsync_directory(os.path.join(path, sub))
                    self._save(state)
                    saved = True
                state.view = None
                self._restamp(state, uidlist=saved)
            return StoreResult(tuple(changed), tuple(modified))

    def _take(self, path: str, uids: list[int]) -> list[_Record]:
        with self._locked(path) as state:
            return [
                _Record(r.uid, r.base, r.name, r.sub, r.size, r.date, r.modseq, state.info(r))
                for r in (state.records.get(uid) for uid in sorted(set(uids)))
                if r is not None
            ]

    @staticmethod
    def _relocate(path: str, record: _Record) -> str | None:
        """Where a message is now, when its file was renamed since we looked (None: gone).

        Without the folder's lock: a copy or move holds its target's, and
        two of them in opposite directions must not wait for each other.
        """
        for sub in ("cur", "new"):
            try:
                for name in os.listdir(os.path.join(path, sub)):
                    if _base(name) == record.base:
                        return os.path.join(path, sub, name)
            except FileNotFoundError:
                pass
        return None

    def copy(self, maildir: str, folder: str, uids: list[int], target: str) -> tuple[int, list[tuple[int, int]]]:
        return self._transfer(maildir, folder, uids, target, move=False)

    def move(self, maildir: str, folder: str, uids: list[int], target: str) -> tuple[int, list[tuple[int, int]]]:
        source = self._path(maildir, folder)
        if source == self._path(maildir, target):
            uidvalidity, copied = self._transfer(maildir, folder, uids, target, move=False)
            self._remove(source, [old for old, _ in copied])
            return uidvalidity, copied
        return self._transfer(maildir, folder, uids, target, move=True)

    def _transfer(self, maildir: str, folder: str, uids: list[int], target: str, move: bool) -> tuple[int, list[tuple[int, int]]]:
        """Copy (a hard link, else a durable copy) or move (a rename) messages into
        ``target`` with their flags, giving them the target's next UIDs.

        The names are all worked out first, so that a refusal (a 27th keyword
        in the target) changes nothing; a disk error half-way keeps what was
        done, with its UIDs, before it is raised.
        """
        source = self._path(maildir, folder)
        destination = self._path(maildir, target)
        taken = self._take(source, uids)
        pairs: list[tuple[int, int]] = []
        with self._locked(destination) as state:
            plans = []
            for record in taken:
                assert record.info is not None
                keep = move and record.base not in state.bases
                base = record.base if keep else self.unique_name(record.size)
                plans.append((record, base, self._name_with(state, base, record.info.flags)))
            try:
                for record, base, name in plans:
                    if not self._place(source, destination, record, base, name, move):
                        continue
                    state.highest += 1
                    state.add(_Record(state.uidnext, base, name, "cur", record.size, record.date, state.highest))
                    pairs.append((record.uid, state.uidnext))
                    state.uidnext += 1
            finally:
                if pairs:
                    fsync_directory(os.path.join(destination, "cur"))
                    self._save(state)
                    state.view = None
        if move and pairs:
            for sub in ("cur", "new"):
                fsync_directory(os.path.join(source, sub))
            # The source's next scan sees the files gone: an expunge there.
            with self._locked(source):
                pass
        return state.uidvalidity, pairs

    def _place(self, source: str, destination: str, record: _Record, base: str, name: str, move: bool) -> bool:
        """One message into ``destination``'s cur/ as ``name``; False when it is gone from the source."""
        final = os.path.join(destination, "cur", name)
        origin: str | None = os.path.join(source, record.sub, record.name)
        for _ in range(2):
            assert origin is not None
            try:
                if not move:
                    _link_or_copy(origin, final, os.path.join(destination, "tmp", base))
                    return True
                try:
                    os.rename(origin, final)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    _link_or_copy(origin, final, os.path.join(destination, "tmp", base))
                    os.unlink(origin)
                return True
            except FileNotFoundError:
                # Renamed since we looked (a flag change, POP3): the file as it is now.
                origin = self._relocate(source, record)
                if origin is None:
                    return False
        # The source file is there, twice over: it is the target that went away.
        raise NoSuchFolder("the target folder is gone")

    def _remove(self, path: str, uids: list[int], only_deleted: bool = False) -> list[int]:
        removed: list[int] = []
        with self._locked(path) as state:
            for uid in sorted(set(uids)):
                record = state.records.get(uid)
                if record is None:
                    continue
                where: str | None = state.file(record)
                for _ in range(3):
                    if where is None:
                        break
                    if only_deleted and "T" not in _info_letters(os.path.basename(where)):
                        break
                    try:
                        os.unlink(where)
                        where = None
                    except FileNotFoundError:
                        # Renamed since the scan (POP3, another program): that file, if still \Deleted.
                        again = self._relocate(path, record)
                        where = again if again != where else None
                if where is None:
                    state.remove(uid)
                    removed.append(uid)
            if removed:
                for sub in ("cur", "new"):
                    fsync_directory(os.path.join(path, sub))
                state.highest += 1
                self._save(state)
                state.view = None
        return removed

    def expunge(self, maildir: str, folder: str, uids: list[int]) -> list[int]:
        return self._remove(self._path(maildir, folder), uids, only_deleted=True)

    # -- usage --

    def usage(self, maildir: str) -> tuple[int, int]:
        """Octets and messages in every folder, from file names (``,S=``) and cached per directory."""
        if not os.path.isdir(maildir):
            return 0, 0
        octets = messages = 0
        for path in self._all_folders(maildir):
            for sub in ("new", "cur"):
                size, count = self._directory_usage(os.path.join(path, sub))
                octets += size
                messages += count
        return octets, messages

    def _all_folders(self, maildir: str) -> list[str]:
        key = _stat_key(maildir)
        checked = time.time_ns()
        cached = self._usage_folders.get(maildir)
        if cached is not None and cached[0] == key and key is not None and _settled(cached[1], key[1]):
            return cached[2]
        paths = [maildir] + [
            os.path.join(maildir, entry) for entry in os.listdir(maildir) if _folder_name(entry) is not None
        ]
        self._usage_folders[maildir] = (key, checked, paths)
        return paths

    def _directory_usage(self, directory: str) -> tuple[int, int]:
        key = _stat_key(directory)
        if key is None:
            return 0, 0
        checked = time.time_ns()
        cached = self._usage.get(directory)
        if cached is not None and cached[0] == key and _settled(cached[1], key[1]):
            return cached[2], cached[3]
        octets = count = 0
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    size = _size_in_name(_base(entry.name))
                    if size is None:
                        try:
                            size = entry.stat().st_size
                        except FileNotFoundError:
                            continue
                    octets += size
                    count += 1
        except FileNotFoundError:
            return 0, 0
        self._usage[directory] = (key, checked, octets, count)
        return octets, count


def _link_or_copy(origin: str, final: str, scratch: str) -> None:
    """A second name for a message: a hard link, or (another file system, no links) a durable copy."""
    try:
        os.link(origin, final)
        return
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    with open(origin, "rb") as source:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "wb") as out:
                shutil.copyfileobj(source, out, _COPY_BUFFER)
                out.flush()
                os.fsync(out.fileno())
            st = os.stat(origin)
            os.utime(scratch, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.rename(scratch, final)
        except BaseException:
            _unlink(scratch)
            raise


# --- change notifications ---------------------------------------------------------------

try:
    from twisted.internet import inotify as _inotify

    class _INotify(_inotify.INotify):
        """Twisted's INotify closes itself, ending every watch, when one watched
        folder is deleted (its IN_DELETE_SELF handling): ours stays open until stopped."""

        stopping = False

        def loseConnection(self, *args: Any, **kwargs: Any) -> None:
            if self.stopping:
                super().loseConnection(*args, **kwargs)

    _WATCH_MASK = (
        _inotify.IN_CREATE | _inotify.IN_DELETE | _inotify.IN_MOVED_FROM | _inotify.IN_MOVED_TO | _inotify.IN_CLOSE_WRITE
    )
except ImportError:  # not Linux
    _inotify = None  # type: ignore[assignment]
    _WATCH_MASK = 0


class _Watched:
    def __init__(self, path: str) -> None:
        self.path = path
        self.callbacks: dict[object, Callable[[], None]] = {}
        self.dirs: list[str] = []
        self.polled = False
        self.stamp: Any = None
        self.recent = False
        self.pending = False
        # The call once more after the last event (see Watcher._changed).
        self.again: Any = None


class Watcher:
    """Change notifications for folders, shared by every session of the process.

    One inotify watch per directory (``new/``, ``cur/`` and the folder
    itself, where the uidlist is replaced) whoever many sessions watch it;
    where inotify is not available, the same three are polled every
    ``interval`` seconds in the thread pool.  Callbacks run on the reactor
    thread, at most once per reactor turn per folder.
    """

    def __init__(
        self, reactor: Any, pool: Any, use_inotify: bool = True, interval: float = 0.5, refresh: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        # Called in the pool (MaildirPlus.refresh) before the second call after a change.
        self.refresh = refresh
        self.interval = interval
        self._folders: dict[str, _Watched] = {}
        self._notifier: Any = None
        self._use_inotify = use_inotify and _inotify is not None
        self._poller: task.LoopingCall | None = None
        self._polling = False

    def watch(self, path: str, changed: Callable[[], None]) -> Callable[[], None]:
        """Call ``changed`` when folder ``path`` may have changed; returns the function that stops it."""
        watched = self._folders.get(path)
        if watched is None:
            watched = self._folders[path] = _Watched(path)
            self._start(watched)
        token = object()
        watched.callbacks[token] = changed

        def stop() -> None:
            if watched.callbacks.pop(token, None) is not None and not watched.callbacks:
                self._end(watched)

        return stop

    def _start(self, watched: _Watched) -> None:
        if self._use_inotify:
            try:
                from twisted.python.filepath import FilePath

                if self._notifier is None:
                    try:
                        self._notifier = _INotify(self.reactor)
                    except Exception:
                        # No inotify here (or no instance left): poll from now on.
                        self._use_inotify = False
                        raise
                    # When the kernel's queue overflows it sends one event with
                    # no watch (wd -1, read unsigned), which Twisted drops: we
                    # take it as "anything may have changed".
                    self._notifier._watchpoints[0xFFFFFFFF] = _inotify._Watch(FilePath(b"/"), callbacks=[self._overflow])
                    self._notifier.startReading()

                for directory, mask in (
                    (os.path.join(watched.path, "new"), _WATCH_MASK),
                    (os.path.join(watched.path, "cur"), _WATCH_MASK),
                    (watched.path, _inotify.IN_MOVED_TO | _inotify.IN_CREATE | _inotify.IN_DELETE),
                ):
                    self._notifier.watch(FilePath(directory), mask, callbacks=[self._event(watched, directory == watched.path)])
                    watched.dirs.append(directory)
                return
            except Exception as e:
                log.info("maildir: watching {path} by polling ({error})", path=watched.path, error=e)
                self._unwatch(watched)
        watched.polled = True
        # Unknown until the first poll, which then calls back once: a
        # spurious call is harmless, a change missed in between is not.
        watched.stamp = None
        if self._poller is None:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(self.interval, now=False).addErrback(lambda f: log.failure("maildir: polling", f))

    def _overflow(self, *_ignored: Any) -> None:
        for watched in list(self._folders.values()):
            self._changed(watched)

    def _event(self, watched: _Watched, top: bool) -> Callable[..., None]:
        def event(_ignored: Any, path: Any, mask: int) -> None:
            if top and path.basename() not in (UIDLIST.encode(), DOVECOT_UIDLIST.encode()):
                return
            self._changed(watched)

        return event

    def _changed(self, watched: _Watched) -> None:
        if not watched.polled:
            # Once more a while after the last event: a change by another
            # program in the clock tick of one of ours is in no mtime, and
            # the store lists the folder again only after a while (see
            # _State.trusted); polling calls back after that anyway.
            if watched.again is not None and watched.again.active():
                watched.again.reset(_AGAIN)
            else:
                watched.again = self.reactor.callLater(_AGAIN, self._again, watched)
        if watched.pending:
            return
        watched.pending = True
        self.reactor.callLater(0, self._fire, watched)

    def _again(self, watched: _Watched) -> None:
        watched.again = None
        if self.refresh is None or self.pool is None:
            self._fire(watched)
            return
        d = deferToThreadPool(self.reactor, self.pool, self.refresh, watched.path)
        d.addErrback(lambda f: log.failure("maildir: listing {path} again", f, path=watched.path))
        d.addBoth(lambda _: self._fire(watched) if self._folders.get(watched.path) is watched else None)

    def _fire(self, watched: _Watched) -> None:
        watched.pending = False
        for callback in list(watched.callbacks.values()):
            try:
                callback()
            except Exception:
                log.failure("maildir: a change callback failed")

    def _unwatch(self, watched: _Watched) -> None:
        from twisted.python.filepath import FilePath

        for directory in watched.dirs:
            try:
                self._notifier.ignore(FilePath(directory))
            except (KeyError, OSError, Exception):
                pass
        watched.dirs = []

    def _end(self, watched: _Watched) -> None:
        self._folders.pop(watched.path, None)
        if watched.again is not None and watched.again.active():
            watched.again.cancel()
        watched.again = None
        self._unwatch(watched)
        watched.polled = False

    def _poll(self) -> None:
        if self._polling:
            return
        polled = [w for w in self._folders.values() if w.polled]
        if not polled:
            return
        self._polling = True

        def stat_all() -> tuple[int, list[Any]]:
            return time.time_ns(), [MaildirPlus._stamp(w.path)[:3] for w in polled]

        def compare(result: tuple[int, list[Any]]) -> None:
            now, stamps = result
            for watched, stamp in zip(polled, stamps):
                # A second change within the mtime tick of the first looks
                # like none: while the newest mtime is that recent, call back
                # at every poll.
                if (stamp != watched.stamp or watched.recent) and watched.polled:
                    self._changed(watched)
                watched.stamp = stamp
                newest = max((key[1] for key in stamp if key is not None), default=0)
                watched.recent = not _settled(now, newest)

        def done(result: Any) -> Any:
            self._polling = False
            return result

        d = deferToThreadPool(self.reactor, self.pool, stat_all)
        d.addCallback(compare)
        d.addBoth(done)
        d.addErrback(lambda f: log.failure("maildir: polling folders", f))

    def stop(self) -> None:
        """End every watch (the service is stopping)."""
        for watched in list(self._folders.values()):
            self._end(watched)
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None
        if self._notifier is not None:
            self._notifier.stopping = True
            self._notifier.loseConnection()
            self._notifier = None
