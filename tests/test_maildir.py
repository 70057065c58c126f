"""The maildir backend in-process: delivery on disk, safe folder names, the locked maildrop."""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from inprocess import SyncThreadPool
from mailplat.backends.maildir import Maildir, MaildirDrop
from mailplat.interfaces import (
    Account,
    IMailboxBackend,
    IMaildrop,
    MaildropInUse,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)

ALICE = Account("alice@example.org")
BODY = b"Received: from client\r\n\tby mail.example.org\r\nSubject: hi\r\n\r\nHello.\r\n.dot kept\r\n"


def settle(d):
    """The result of an already fired Deferred; its Failure is raised."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Reactor:
    """Just enough reactor for the maildir: the thread pool above, and
    callFromThread from other threads (the group commit's) queued until the
    test waits for a result."""

    def __init__(self) -> None:
        self.pool = SyncThreadPool()
        self.main = threading.get_ident()
        self.calls: queue.Queue = queue.Queue()

    def getThreadPool(self) -> SyncThreadPool:
        return self.pool

    @property
    def threads(self):
        """The service's pools, as a backend sees them: all of them this one."""
        return types.SimpleNamespace(blocking=self.pool, passwords=self.pool, cpu=self.pool)

    def callFromThread(self, f, *args, **kwargs) -> None:
        if threading.get_ident() == self.main:
            f(*args, **kwargs)
        else:
            self.calls.put((f, args, kwargs))

    def wait(self, d, timeout: float = 10.0):
        """The result of Deferred ``d`` (a Failure is raised), running queued calls meanwhile."""
        results: list = []
        d.addBoth(results.append)
        deadline = time.monotonic() + timeout
        while not results:
            f, args, kwargs = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args, **kwargs)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


def reactor_and_threads() -> tuple[Reactor, types.SimpleNamespace]:
    reactor = Reactor()
    return reactor, reactor.threads


@pytest.fixture
def reactor() -> Reactor:
    return Reactor()


@pytest.fixture
def maildir(tmp_path: Path, reactor: Reactor) -> Maildir:
    return Maildir(str(tmp_path / "mail"), reactor, reactor.threads)


def in_memory(content: bytes = BODY, sender: str = "bob@remote.test") -> SpooledMessage:
    return SpooledMessage("", len(content), sender, content)


def on_disk(tmp_path: Path, content: bytes = BODY, sender: str = "bob@remote.test") -> SpooledMessage:
    path = tmp_path / "spooled"
    path.write_bytes(content)
    return SpooledMessage(str(path), len(content), sender)


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# --- delivery ----------------------------------------------------------------


def new_files(folder: Path) -> list[Path]:
    return sorted((folder / "new").iterdir())


@pytest.mark.parametrize("where", ["memory", "file"])
def test_delivery_writes_return_path_then_the_exact_bytes(maildir, reactor, tmp_path, where):
    """Delivery creates {tmp,new,cur}; each file in new/ is Return-Path: <sender> then the spooled bytes, named with its size.

    The first delivery creates the folders; the second finds them (a small
    message then goes through the group commit thread, a large one through
    the thread pool).
    """
    folder = tmp_path / "mail" / "example.org" / "alice"
    for n in range(2):
        content = BODY + b"message %d\r\n" % n
        message = in_memory(content) if where == "memory" else on_disk(tmp_path, content)
        reactor.wait(maildir.deliver(ALICE, message))
        assert sorted(p.name for p in folder.iterdir()) == ["cur", "new", "tmp"]
        files = new_files(folder)
        assert len(files) == n + 1
        assert b"Return-Path: <bob@remote.test>\r\n" + content in [f.read_bytes() for f in files]
        for f in files:
            assert f.name.endswith(f",S={f.stat().st_size}")
        assert list((folder / "tmp").iterdir()) == [] and list((folder / "cur").iterdir()) == []


def test_null_sender_gives_empty_return_path(maildir, reactor, tmp_path):
    """A bounce (null sender <>) is stored with "Return-Path: <>"."""
    reactor.wait(maildir.deliver(ALICE, in_memory(sender="")))
    [f] = new_files(tmp_path / "mail" / "example.org" / "alice")
    assert f.read_bytes() == b"Return-Path: <>\r\n" + BODY


def test_folder_is_lower_case(maildir, tmp_path):
    """Addresses are case-insensitive: Alice@Example.ORG is stored in example.org/alice."""
    assert maildir.folder(Account("Alice@Example.ORG")) == str(tmp_path / "mail" / "example.org" / "alice")


def test_names_are_unique_across_many_deliveries(maildir, reactor, tmp_path):
    """Hundreds of deliveries at once into one maildir give as many distinct files, each with its own ,S= size."""
    folder = tmp_path / "mail" / "example.org" / "alice"
    reactor.wait(maildir.deliver(ALICE, in_memory(b"first\r\n")))
    pending = [maildir.deliver(ALICE, in_memory(b"n %d\r\n" % i)) for i in range(500)]
    for d in pending:
        reactor.wait(d)
    files = new_files(folder)
    assert len({f.name for f in files}) == 501
    assert sorted(f.read_bytes() for f in files) == sorted(
        [b"Return-Path: <bob@remote.test>\r\nfirst\r\n"] + [b"Return-Path: <bob@remote.test>\r\nn %d\r\n" % i for i in range(500)]
    )
    for f in files:
        assert f.name.endswith(f",S={f.stat().st_size}")
    assert list((folder / "tmp").iterdir()) == []


BAD_ADDRESSES = [
    "../x@example.org",
    "a/b@example.org",
    "x@../../etc",
    "a\\b@example.org",
    ".x@example.org",
    "x@example.org/..",
    "..@example.org",
    "x@.",
    "x@",
    "@example.org",
    "x\x00@example.org",
    "x@example.org\x00",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_path_tricks_are_refused(maildir, reactor, tmp_path, address):
    """An address that could name a path outside its maildir is a PermanentFailure and creates nothing anywhere."""
    before = tree(tmp_path)
    with pytest.raises(PermanentFailure):
        maildir.folder(Account(address))
    with pytest.raises(PermanentFailure):
        reactor.wait(maildir.deliver(Account(address), in_memory()))
    with pytest.raises(PermanentFailure):
        reactor.wait(maildir.open(Account(address)))
    assert tree(tmp_path) == before


def _deliver_outcome(root: str, address: str, spooled: str) -> str:
    """Deliver one message through deliver(); "ok" or the name of the exception raised.

    ``spooled`` is "" for a small in-memory message (the group commit path
    once the folders exist), or the path of a spooled file (the thread path).
    """
    reactor = Reactor()
    message = on_disk_at(spooled) if spooled else in_memory()
    try:
        reactor.wait(Maildir(root, reactor, reactor.threads).deliver(Account(address), message))
    except Exception as e:
        return type(e).__name__
    return "ok"


def on_disk_at(path: str) -> SpooledMessage:
    return SpooledMessage(path, os.path.getsize(path), "bob@remote.test")


def unprivileged(f, *args) -> str:
    """Run ``f`` as an unprivileged user: root ignores file modes, so when root, in a child as nobody."""
    if os.geteuid() != 0:
        return f(*args)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, f(*args).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return outcome


def test_read_only_maildir_is_a_temporary_failure():
    """Delivery into a maildir that may not be written raises TemporaryFailure (a 4xx: try again later)."""
    # A folder of our own in /tmp, so that the user nobody may traverse it when we are root.
    base = Path(tempfile.mkdtemp(prefix="mailplat-ro-"))
    try:
        base.chmod(0o755)
        spooled = base / "spooled"
        spooled.write_bytes(BODY)
        spooled.chmod(0o644)
        for local in ("ro", "rw"):
            for sub in ("tmp", "new", "cur"):
                (base / "example.org" / local / sub).mkdir(parents=True)
        for p in [base / "example.org", *(base / "example.org").rglob("*")]:
            p.chmod(0o555)
        for sub in ("tmp", "new"):
            (base / "example.org" / "rw" / sub).chmod(0o777)
        for message in ("", str(spooled)):
            # The same user can deliver where it may write, so the failure is the read-only folder's.
            assert unprivileged(_deliver_outcome, str(base), "rw@example.org", message) == "ok"
            assert unprivileged(_deliver_outcome, str(base), "ro@example.org", message) == "TemporaryFailure"
            assert unprivileged(_deliver_outcome, str(base), "new@example.org", message) == "TemporaryFailure"
        assert len(os.listdir(base / "example.org" / "rw" / "new")) == 2
        assert os.listdir(base / "example.org" / "ro" / "new") == []
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base)


def test_deliver_failure_arrives_as_failed_deferred(maildir, reactor, tmp_path):
    """deliver() reports a disk error through its Deferred as TemporaryFailure, never as a raw OSError."""
    root = tmp_path / "mail"
    root.mkdir()
    (root / "example.org").write_text("a file where a folder should be")
    with pytest.raises(TemporaryFailure):
        reactor.wait(maildir.deliver(ALICE, in_memory()))


def test_providers_verify(maildir, reactor):
    """Maildir provides IMailboxBackend and its maildrop provides IMaildrop, as discovery will check."""
    assert verifyObject(IMailboxBackend, maildir)
    drop = reactor.wait(maildir.open(ALICE))
    try:
        assert verifyObject(IMaildrop, drop)
    finally:
        drop.close()


# --- the maildrop ------------------------------------------------------------


@pytest.fixture
def filled(maildir, tmp_path) -> tuple[str, dict[str, bytes]]:
    """Alice's maildir with two messages in new/ and one read one in cur/ (with flags); uid -> bytes."""
    folder = maildir.folder(ALICE)
    names = [maildir._deliver(folder, in_memory(b"Subject: %d\r\n\r\n" % i + b"x" * i * 10 + b"\r\n")) for i in range(3)]
    os.rename(os.path.join(folder, "new", names[2]), os.path.join(folder, "cur", names[2] + ":2,S"))
    contents = {}
    for name in names:
        for path in (os.path.join(folder, "new", name), os.path.join(folder, "cur", name + ":2,S")):
            if os.path.exists(path):
                contents[name] = Path(path).read_bytes()
    # Not messages: a dot file and leftovers in tmp/.
    Path(folder, "new", ".hidden").write_bytes(b"not mail")
    Path(folder, "tmp", "partial").write_bytes(b"half a message")
    return folder, contents


def test_maildrop_entries_and_read(filled):
    """The maildrop lists every message in new/ and cur/ with its uid and exact size, and read returns its bytes."""
    folder, contents = filled
    drop = MaildirDrop.open(folder, *reactor_and_threads())
    try:
        entries = drop.entries()
        assert {(e.uid, e.size) for e in entries} == {(uid, len(data)) for uid, data in contents.items()}
        for e in entries:
            assert e.uid.endswith(f",S={e.size}")
            with drop.read(e.uid) as f:
                assert f.read() == contents[e.uid]
        mtimes = [os.stat(drop._files[e.uid]).st_mtime for e in entries]
        assert mtimes == sorted(mtimes)
    finally:
        drop.close()


def test_commit_deletes_only_the_given_uids(filled):
    """commit removes exactly the messages named, in new/ or cur/, keeps the rest, and releases the lock."""
    folder, contents = filled
    uids = sorted(contents)
    drop = MaildirDrop.open(folder, *reactor_and_threads())
    in_cur = next(uid for uid in uids if os.path.exists(os.path.join(folder, "cur", uid + ":2,S")))
    deleted = [in_cur, next(uid for uid in uids if uid != in_cur)]
    settle(drop.commit(deleted, [], False))
    again = MaildirDrop.open(folder, *reactor_and_threads())
    try:
        assert {e.uid for e in again.entries()} == set(uids) - set(deleted)
    finally:
        again.close()
    assert os.listdir(os.path.join(folder, "tmp")) == ["partial"]


def test_close_changes_nothing(filled):
    """close releases the lock without deleting anything."""
    folder, contents = filled
    MaildirDrop.open(folder, *reactor_and_threads()).close()
    drop = MaildirDrop.open(folder, *reactor_and_threads())
    try:
        assert {e.uid for e in drop.entries()} == set(contents)
    finally:
        drop.close()


def test_empty_account_opens_empty(maildir, reactor, tmp_path):
    """Opening the maildrop of an account that never got mail creates its maildir and lists nothing."""
    drop = reactor.wait(maildir.open(Account("new@example.org")))
    try:
        assert drop.entries() == []
    finally:
        drop.close()
    assert sorted(os.listdir(tmp_path / "mail" / "example.org" / "new")) == ["cur", "mailplat.lock", "new", "tmp"]


def test_second_open_in_same_process_is_refused(filled):
    """While a maildrop is open, a second open (another session) raises MaildropInUse; after close it works."""
    folder, _ = filled
    first = MaildirDrop.open(folder, *reactor_and_threads())
    with pytest.raises(MaildropInUse):
        MaildirDrop.open(folder, *reactor_and_threads())
    first.close()
    MaildirDrop.open(folder, *reactor_and_threads()).close()


HOLD_LOCK = """
import fcntl, sys
f = open(sys.argv[1], "ab")
try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy", flush=True)
    sys.exit(0)
print("locked", flush=True)
sys.stdin.read()
"""


def lock_holder(folder: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, os.path.join(folder, "mailplat.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert p.stdout is not None
    return p, p.stdout.readline().strip()


def release(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    p.wait(10)
    if p.stdout:
        p.stdout.close()


def test_lock_held_by_another_process_is_refused(filled):
    """A maildrop locked by another process (flock on its lock file) cannot be opened until that process lets go."""
    folder, _ = filled
    holder, state = lock_holder(folder)
    try:
        assert state == "locked"
        with pytest.raises(MaildropInUse):
            MaildirDrop.open(folder, *reactor_and_threads())
    finally:
        release(holder)
    MaildirDrop.open(folder, *reactor_and_threads()).close()


def test_open_maildrop_excludes_other_processes(filled):
    """While this process holds a maildrop, another process cannot take its lock; after close it can."""
    folder, _ = filled
    drop = MaildirDrop.open(folder, *reactor_and_threads())
    try:
        holder, state = lock_holder(folder)
        release(holder)
        assert state == "busy"
    finally:
        drop.close()
    holder, state = lock_holder(folder)
    release(holder)
    assert state == "locked"


def test_lock_is_released_when_commit_fails(filled, monkeypatch):
    """Even when commit fails half-way, the lock is released for the next session."""
    folder, contents = filled
    drop = MaildirDrop.open(folder, *reactor_and_threads())

    def broken(path):
        raise OSError(5, "I/O error")

    monkeypatch.setattr("mailplat.backends.maildir.fsync_directory", broken)
    with pytest.raises(OSError):
        settle(drop.commit([sorted(contents)[0]], [], False))
    monkeypatch.undo()
    with open(os.path.join(folder, "mailplat.lock"), "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
