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
from twisted.internet.defer import Deferred
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


# --- the IMAP store's files (the contract itself is tests/test_mailstore.py) -------------

from mailplat import fsutil  # noqa: E402
from mailplat.backends import maildirplus  # noqa: E402
from mailplat.backends.maildirplus import MaildirPlus  # noqa: E402
from mailplat.interfaces import (  # noqa: E402
    FLAG_DELETED,
    FLAG_FLAGGED,
    FLAG_SEEN,
    INBOX,
    FolderExists,
    NoSuchFolder,
)

DATE = 1_700_000_000


@pytest.fixture
def store(maildir: Maildir) -> MaildirPlus:
    """The blocking half of the IMAP store (what the backend runs in its threads)."""
    return maildir.store


@pytest.fixture
def alice(maildir: Maildir) -> str:
    return maildir.folder(ALICE)


def append(store: MaildirPlus, alice: str, folder: str = INBOX, flags: frozenset[str] = frozenset(), text: bytes = b"x") -> int:
    content = b"Subject: t\r\n\r\n" + text + b"\r\n"
    return store.append(alice, folder, SpooledMessage("", len(content), "", content), flags, DATE)[1]


def cur_names(folder: str) -> list[str]:
    return sorted(os.listdir(os.path.join(folder, "cur")))


def test_folders_are_maildirplus_directories_in_modified_utf7(store, alice):
    """"A/B" is the directory .A.B and "Entwürfe" is .Entw&APw-rfe, each a maildir marked with Dovecot's maildirfolder file."""
    store.create_folder(alice, "A/B")
    store.create_folder(alice, "Entwürfe")
    store.create_folder(alice, "R&D")
    for disk in (".A", ".A.B", ".Entw&APw-rfe", ".R&-D"):
        assert sorted(os.listdir(os.path.join(alice, disk))) == ["cur", "maildirfolder", "new", "tmp"]
    assert {"A", "A/B", "Entwürfe", "R&D"} <= {f.name for f in store.folders(alice)}
    assert not [n for n in os.listdir(alice) if n.startswith("mailplat-new.")], "no scratch directory is left"


@pytest.mark.parametrize("name", ["dot.ted", "a/.hidden", "Archive/v1.2"])
def test_a_dot_in_a_folder_name_is_refused_with_the_reason(store, alice, name):
    """A '.' cannot be kept in a Maildir++ folder name (it separates levels on disk): refused, saying so."""
    with pytest.raises(PermanentFailure, match="'.'"):
        store.create_folder(alice, name)


def test_flags_and_keywords_are_letters_in_the_file_name(store, alice):
    """System flags are the letters D F P R S T and keywords a-z through dovecot-keywords ("0 $Junk"), sorted after ":2,"."""
    uid = append(store, alice, flags=frozenset({"\\Draft", FLAG_FLAGGED, "$Forwarded", "\\Answered", FLAG_SEEN, FLAG_DELETED, "$Junk"}))
    [name] = cur_names(alice)
    assert name.endswith(":2,DFPRSTa")
    assert Path(alice, "dovecot-keywords").read_text() == "0 $Junk\n"
    store.store_flags(alice, INBOX, [uid], frozenset({"NonJunk", FLAG_SEEN}), "set")
    [name] = cur_names(alice)
    assert name.endswith(":2,Sb")
    assert Path(alice, "dovecot-keywords").read_text() == "0 $Junk\n1 NonJunk\n"
    assert store.view(alice, INBOX).messages[0].flags == frozenset({"NonJunk", FLAG_SEEN})


def test_a_27th_keyword_is_refused_with_the_reason(store, alice):
    """A folder holds at most 26 keywords (a-z): the next new one is refused saying why, and the message is unchanged."""
    uid = append(store, alice)
    store.store_flags(alice, INBOX, [uid], frozenset(f"kw{i}" for i in range(26)), "add")
    before = store.view(alice, INBOX)
    with pytest.raises(PermanentFailure, match="26 keywords"):
        store.store_flags(alice, INBOX, [uid], frozenset({"one-too-many"}), "add")
    assert store.view(alice, INBOX).messages == before.messages
    # A known keyword still works.
    store.store_flags(alice, INBOX, [uid], frozenset({"kw3"}), "remove")
    assert "kw3" not in store.view(alice, INBOX).messages[0].flags


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_copy_the_target_cannot_hold_changes_nothing(store, alice, how):
    """Copying or moving a keyword into a folder that already has 26 others is refused before any file is made or moved."""
    store.create_folder(alice, "Full")
    append(store, alice, "Full", flags=frozenset(f"full{i}" for i in range(26)))
    plain = append(store, alice)
    tagged = append(store, alice, flags=frozenset({"$Unheard"}))
    before = (cur_names(alice), cur_names(os.path.join(alice, ".Full")), store.view(alice, "Full"))
    with pytest.raises(PermanentFailure, match="26 keywords"):
        getattr(store, how)(alice, INBOX, [plain, tagged], "Full")
    assert (cur_names(alice), cur_names(os.path.join(alice, ".Full")), store.view(alice, "Full")) == before
    assert os.listdir(os.path.join(alice, ".Full", "tmp")) == []


def test_a_delivered_message_moves_to_cur_and_gets_a_uid_at_the_next_view(maildir, reactor, store, alice):
    """deliver writes into new/; the next view moves it to cur/ with ":2,", gives it the next UID, and its mtime is its INTERNALDATE."""
    first = append(store, alice)
    reactor.wait(maildir.deliver(ALICE, in_memory()))
    [name] = os.listdir(os.path.join(alice, "new"))
    os.utime(os.path.join(alice, "new", name), (DATE + 5, DATE + 5))
    view = store.view(alice, INBOX)
    assert os.listdir(os.path.join(alice, "new")) == []
    assert name + ":2," in cur_names(alice)
    assert view.messages[-1].uid == first + 1 and view.messages[-1].internal_date == DATE + 5
    # Other programs' files, with no ,S= in their names, are measured.
    Path(alice, "cur", "foreign-file:2,S").write_bytes(b"Subject: other\r\n\r\n")
    view = store.view(alice, INBOX)
    assert view.messages[-1].size == len(b"Subject: other\r\n\r\n") and view.messages[-1].flags == frozenset({FLAG_SEEN})


def test_a_flag_changed_behind_our_back_gets_a_new_modseq(store, alice, maildir):
    """A file renamed with other flags (POP3, another program) is a flag change at the next view, with a higher modseq, in every process."""
    uid = append(store, alice)
    other = MaildirPlus(maildir.unique_name)
    before = other.view(alice, INBOX)
    [name] = cur_names(alice)
    os.rename(os.path.join(alice, "cur", name), os.path.join(alice, "cur", name.split(":")[0] + ":2,FS"))
    for instance in (store, other):
        view = instance.view(alice, INBOX)
        assert view.messages[0].flags == frozenset({FLAG_SEEN, FLAG_FLAGGED})
        assert view.messages[0].modseq > before.highest_modseq and view.highest_modseq == view.messages[0].modseq
    assert store.view(alice, INBOX).messages[0].uid == uid


def test_the_uidlist_is_dovecots_format_with_modseqs(store, alice):
    """mailplat-uidlist is "3 V<uidvalidity> N<uidnext> M<highestmodseq>", then "<uid> M<modseq> S<size> T<date> :<file name>" per message."""
    a = append(store, alice)
    b = append(store, alice, flags=frozenset({FLAG_SEEN}))
    view = store.view(alice, INBOX)
    lines = Path(alice, "mailplat-uidlist").read_text().splitlines()
    assert lines[0] == f"3 V{view.uidvalidity} N{view.uidnext} M{view.highest_modseq}"
    names = {n.split(":")[0]: n for n in cur_names(alice)}
    for line, info in zip(lines[1:], view.messages):
        fields, _, name = line.partition(" :")
        assert fields == f"{info.uid} M{info.modseq} S{info.size} T{DATE}"
        assert names[name.split(":")[0]] == name
    assert [m.uid for m in view.messages] == [a, b]


DOVECOT_UIDLIST = """3 V1234567 N43 G3085f01b7f11094c501100008c4a11c1
7 :1600000000.M1P1.old,S=20:2,S
12 W30 :1600000001.M2P1.old,S=21:2,Fa
40 :gone-file:2,
"""


def test_dovecots_uidlist_is_taken_over(store, alice):
    """On first use a folder with only dovecot-uidlist keeps its UIDVALIDITY, UIDs and keywords; new mail gets N; Dovecot's file is set aside."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(alice, sub))
    Path(alice, "cur", "1600000000.M1P1.old,S=20:2,S").write_bytes(b"a" * 20)
    Path(alice, "cur", "1600000001.M2P1.old,S=21:2,FRa").write_bytes(b"b" * 21)  # Replied since
    Path(alice, "new", "1700000000.M3P1.new,S=22").write_bytes(b"c" * 22)
    Path(alice, "dovecot-uidlist").write_text(DOVECOT_UIDLIST)
    Path(alice, "dovecot-keywords").write_text("0 $Label1\n")
    view = store.view(alice, INBOX)
    assert view.uidvalidity == 1234567
    assert [(m.uid, m.size, m.flags) for m in view.messages] == [
        (7, 20, frozenset({FLAG_SEEN})),
        (12, 21, frozenset({FLAG_FLAGGED, "\\Answered", "$Label1"})),
        (43, 22, frozenset()),
    ]
    assert view.uidnext == 44
    # Above any modseq Dovecot had, so CONDSTORE clients resync once.
    assert min(m.modseq for m in view.messages) > 1_000_000_000
    assert not Path(alice, "dovecot-uidlist").exists() and Path(alice, "dovecot-uidlist.imported").exists()
    assert Path(alice, "mailplat-uidlist").read_text().startswith("3 V1234567 N44 ")
    assert append(store, alice) == 44


def test_dovecots_version_1_uidlist_is_read(store, alice):
    """The old "1 <uidvalidity> <nextuid>" format is taken over too."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(alice, sub))
    Path(alice, "cur", "a1:2,S").write_bytes(b"a")
    Path(alice, "dovecot-uidlist").write_text("1 99 5\n3 a1:2,\n")
    view = store.view(alice, INBOX)
    assert (view.uidvalidity, [m.uid for m in view.messages], view.uidnext) == (99, [3], 5)


def test_subscriptions_are_dovecots_file(store, alice):
    """subscribe writes Dovecot's version 2 subscriptions file (levels separated by a tab); a version 1 file is read."""
    store.folders(alice)
    store.subscribe(alice, "Work/Clients", True)
    text = Path(alice, "subscriptions").read_text()
    assert text.startswith("V\t2\n\n") and "Work\tClients\n" in text and "INBOX\n" in text
    Path(alice, "subscriptions").write_text("INBOX\nLists.Python\n")
    store.create_folder(alice, "Lists/Python")
    assert {f.name for f in store.folders(alice) if f.subscribed} == {INBOX, "Lists/Python"}


def test_a_uidvalidity_is_never_given_twice_in_an_account(store, alice):
    """Deleting and re-creating a folder at once (same second) still gives a new UIDVALIDITY."""
    seen = set()
    for _ in range(5):
        store.create_folder(alice, "Again")
        seen.add(store.view(alice, "Again").uidvalidity)
        store.delete_folder(alice, "Again")
    assert len(seen) == 5


def test_rename_and_delete_leave_no_trace(store, alice):
    """Rename moves the directories (children too) and delete removes them whole; nothing is left under other names."""
    store.create_folder(alice, "P/Q")
    append(store, alice, "P/Q")
    store.rename_folder(alice, "P", "R")
    assert {".R", ".R.Q"} <= set(os.listdir(alice)) and not {".P", ".P.Q"} & set(os.listdir(alice))
    store.delete_folder(alice, "R/Q")
    store.delete_folder(alice, "R")
    assert not [n for n in os.listdir(alice) if n.startswith((".R", "mailplat-deleted"))]
    with pytest.raises(FolderExists):
        store.rename_folder(alice, "INBOX", "INBOX")
    with pytest.raises(NoSuchFolder):
        store.rename_folder(alice, "R", "S")


def test_a_pop3_session_finds_messages_imap_moved(maildir, reactor, store, alice):
    """A POP3 maildrop opened before an IMAP session moved its files to cur/ and renamed them still reads and deletes them."""
    for i in range(2):
        reactor.wait(maildir.deliver(ALICE, in_memory(b"Subject: %d\r\n\r\nbody\r\n" % i)))
    drop = reactor.wait(maildir.open(ALICE))
    entries = drop.entries()
    view = store.view(alice, INBOX)  # new/ -> cur/
    store.store_flags(alice, INBOX, [view.messages[0].uid], frozenset({FLAG_FLAGGED}), "add")
    with drop.read(entries[0].uid) as f:
        assert f.read().endswith(b"Subject: 0\r\n\r\nbody\r\n")
    settle(drop.commit([entries[0].uid], [entries[1].uid], False))
    after = store.view(alice, INBOX)
    assert [m.uid for m in after.messages] == [view.messages[1].uid]
    assert after.messages[0].flags == frozenset({FLAG_SEEN})


def test_view_does_not_scan_when_nothing_changed(store, alice, monkeypatch):
    """A view of an unchanged folder is a few stats from the cache; a change (even by another process) makes it scan again."""
    monkeypatch.setattr(maildirplus, "_SLACK_NS", -10**12)
    for _ in range(3):
        append(store, alice)
    store.view(alice, INBOX)
    scans = []
    real = os.listdir

    def counting(path):
        scans.append(path)
        return real(path)

    monkeypatch.setattr(maildirplus.os, "listdir", counting)
    first = store.view(alice, INBOX)
    for _ in range(10):
        assert store.view(alice, INBOX) is first
    assert scans == [], "an unchanged folder was scanned"
    Path(alice, "new", "from-elsewhere").write_bytes(b"Subject: x\r\n\r\n")
    assert len(store.view(alice, INBOX).messages) == 4
    assert scans


def test_a_recent_change_is_not_trusted_to_the_cache(store, alice, monkeypatch):
    """Two changes within one mtime tick: a folder changed too recently to trust its mtime is rescanned, so the second change is seen."""
    monkeypatch.setattr(maildirplus, "_SLACK_NS", 10**12)  # "too recent" whatever the machine's load
    append(store, alice)
    store.view(alice, INBOX)
    cur = os.path.join(alice, "cur")
    before = os.stat(cur).st_mtime_ns
    Path(cur, "sneaky:2,S").write_bytes(b"Subject: s\r\n\r\n")
    os.utime(cur, ns=(before, before))  # as if within the same tick
    assert len(store.view(alice, INBOX).messages) == 2


def test_a_store_racing_another_rename_keeps_both_changes(store, alice, monkeypatch):
    """A file renamed by another program after our last look (POP3 marking it seen) still gets our flag, and keeps theirs."""
    monkeypatch.setattr(maildirplus, "_SLACK_NS", -10**12)  # trust the cache, as within one mtime tick
    uid = append(store, alice)
    store.view(alice, INBOX)
    cur = os.path.join(alice, "cur")
    [name] = cur_names(alice)
    before = os.stat(cur).st_mtime_ns
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":")[0] + ":2,S"))
    os.utime(cur, ns=(before, before))
    result = store.store_flags(alice, INBOX, [uid], frozenset({FLAG_FLAGGED}), "add")
    assert [m.flags for m in result.changed] == [frozenset({FLAG_SEEN, FLAG_FLAGGED})]
    assert cur_names(alice) == [name.split(":")[0] + ":2,FS"]


def test_an_expunge_racing_another_rename_removes_the_file(store, alice, monkeypatch):
    """A \\Deleted file renamed by another program after our last look is still expunged, not found again as a new message."""
    monkeypatch.setattr(maildirplus, "_SLACK_NS", -10**12)
    uid = append(store, alice, flags=frozenset({FLAG_DELETED}))
    store.view(alice, INBOX)
    cur = os.path.join(alice, "cur")
    [name] = cur_names(alice)
    before = os.stat(cur).st_mtime_ns
    os.rename(os.path.join(cur, name), os.path.join(cur, name.split(":")[0] + ":2,ST"))
    os.utime(cur, ns=(before, before))
    assert store.expunge(alice, INBOX, [uid]) == [uid]
    assert cur_names(alice) == []
    monkeypatch.undo()
    assert store.view(alice, INBOX).messages == ()


def test_the_cache_is_bounded(store, alice, monkeypatch):
    """Beyond the cached-message bound the least recently used folders are dropped, and read from disk again when used."""
    monkeypatch.setattr(maildirplus, "_CACHED_MESSAGES", 3)
    for name in ("One", "Two", "Three"):
        store.create_folder(alice, name)
        append(store, alice, name)
        append(store, alice, name)
    cached = [os.path.basename(p) for p in store._states]
    assert ".One" not in cached and cached[-1] == ".Three", cached
    assert len(store.view(alice, "One").messages) == 2
    assert os.path.basename(list(store._states)[-1]) == ".One"


FLAGGER = r"""
import sys, time
from mailplat.backends.maildirplus import MaildirPlus
from mailplat.interfaces import SpooledMessage
maildir, flag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = MaildirPlus(lambda size: f"{time.time_ns()}.P{flag}.host,S={size}")
body = b"Subject: from " + flag.encode() + b"\r\n\r\n"
uids = [store.append(maildir, "INBOX", SpooledMessage("", len(body), "", body), frozenset(), 1.7e9)[1] for _ in range(count)]
view = store.view(maildir, "INBOX")
for m in view.messages:
    store.store_flags(maildir, "INBOX", [m.uid], frozenset({flag}), "add")
print(" ".join(map(str, uids)))
"""


def test_two_processes_at_once_lose_nothing(store, alice, tmp_path):
    """Two processes appending and flagging every message of one folder at once: every UID distinct, every flag kept."""
    for _ in range(8):
        append(store, alice)
    procs = [
        subprocess.Popen([sys.executable, "-c", FLAGGER, alice, flag, "8"], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        for flag in ("Alpha", "Beta")
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    given = [int(u) for out in outputs for u in out.split()]
    assert len(given) == len(set(given)) == 16
    view = store.view(alice, INBOX)
    assert len(view.messages) == 24
    early = [m for m in view.messages if m.uid <= 8]
    assert all({"Alpha", "Beta"} <= m.flags for m in early), [m.flags for m in early]
    modseqs = [m.modseq for m in view.messages]
    assert len(set(modseqs)) == len(modseqs), "each change has its own modseq"


def test_two_threads_storing_flags_at_once_lose_nothing(store, alice):
    """Sessions in two threads storing different flags on the same messages at once: both flags end up on every message."""
    uids = [append(store, alice) for _ in range(12)]
    errors: list[BaseException] = []

    def flagger(flag: str) -> None:
        try:
            for uid in uids:
                store.store_flags(alice, INBOX, [uid], frozenset({flag}), "add")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=flagger, args=(f,)) for f in (FLAG_SEEN, FLAG_FLAGGED, "Work")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    other = MaildirPlus(lambda size: "unused")
    for instance in (store, other):
        assert all(m.flags == frozenset({FLAG_SEEN, FLAG_FLAGGED, "Work"}) for m in instance.view(alice, INBOX).messages)


# --- the change log: a flag change appends a line instead of rewriting the uidlist ------


def log_lines(folder: str) -> list[str]:
    path = Path(folder, maildirplus.UIDLIST_LOG)
    return path.read_text().splitlines() if path.exists() else []


def test_a_flag_change_appends_to_the_log_and_leaves_the_uidlist(store, alice):
    """A STORE writes "<uid> M<modseq> :<file name>" to mailplat-uidlist.log and leaves the uidlist as it was; a fresh process reads both."""
    uids = [append(store, alice) for _ in range(3)]
    uidlist = Path(alice, maildirplus.UIDLIST)
    before = (uidlist.read_bytes(), uidlist.stat().st_ino)
    result = store.store_flags(alice, INBOX, [uids[1]], frozenset({FLAG_FLAGGED}), "add")
    [info] = result.changed
    assert (uidlist.read_bytes(), uidlist.stat().st_ino) == before
    [name] = [n for n in cur_names(alice) if n.endswith(":2,F")]
    assert log_lines(alice) == [f"{uids[1]} M{info.modseq} :{name}"]
    again = MaildirPlus(lambda size: "unused").view(alice, INBOX)
    assert again == store.view(alice, INBOX)
    assert again.highest_modseq == info.modseq and again.messages[1] == info


def test_the_log_is_folded_into_the_uidlist(store, alice, monkeypatch):
    """Once the log would outgrow the uidlist it is folded in (and removed), as at any whole rewrite; nothing changes for a reader."""
    monkeypatch.setattr(maildirplus, "_LOG_FOLD_MIN", 0)
    uids = [append(store, alice) for _ in range(3)]
    size = Path(alice, maildirplus.UIDLIST).stat().st_size
    folded = False
    for n in range(20):
        store.store_flags(alice, INBOX, [uids[n % 3]], frozenset({FLAG_SEEN}), "remove" if n % 6 >= 3 else "add")
        logged = sum(len(line) + 1 for line in log_lines(alice))
        assert logged <= max(size, Path(alice, maildirplus.UIDLIST).stat().st_size)
        folded = folded or not log_lines(alice)
    assert folded, "the log was never folded"
    view = store.view(alice, INBOX)
    assert MaildirPlus(lambda size: "unused").view(alice, INBOX) == view
    append(store, alice)
    assert log_lines(alice) == [], "a whole rewrite folds the log"
    lines = Path(alice, maildirplus.UIDLIST).read_text().splitlines()
    assert [line.split()[1] for line in lines[1:4]] == [f"M{m.modseq}" for m in view.messages]


def test_a_torn_last_line_of_the_log_is_ignored(store, alice):
    """A line cut short by a crash is ignored and cut off, so that the next line appended is read whole."""
    uids = [append(store, alice) for _ in range(2)]
    store.store_flags(alice, INBOX, [uids[0]], frozenset({FLAG_SEEN}), "add")
    good = Path(alice, maildirplus.UIDLIST_LOG).read_bytes()
    [seen] = [n for n in cur_names(alice) if n.endswith(":2,S")]
    # A torn line that, run into the next one, would read as a change of another message.
    with open(Path(alice, maildirplus.UIDLIST_LOG), "ab") as f:
        f.write(f"{uids[1]} M999999 :{seen}".encode()[:-3])
    other = MaildirPlus(lambda size: "unused")
    view = other.view(alice, INBOX)
    assert [m.flags for m in view.messages] == [frozenset({FLAG_SEEN}), frozenset()]
    assert view.highest_modseq < 999999
    assert Path(alice, maildirplus.UIDLIST_LOG).read_bytes() == good
    result = other.store_flags(alice, INBOX, [uids[1]], frozenset({FLAG_FLAGGED}), "add")
    fresh = MaildirPlus(lambda size: "unused").view(alice, INBOX)
    assert [m.flags for m in fresh.messages] == [frozenset({FLAG_SEEN}), frozenset({FLAG_FLAGGED})]
    assert fresh.messages[1].modseq == result.changed[0].modseq


def test_a_log_already_folded_changes_nothing_when_read_again(store, alice):
    """A crash between writing the folded uidlist and removing the log: its lines are older than the uidlist's and change nothing."""
    [uid] = [append(store, alice)]
    store.store_flags(alice, INBOX, [uid], frozenset({FLAG_SEEN}), "add")
    stale = Path(alice, maildirplus.UIDLIST_LOG).read_bytes()
    store.store_flags(alice, INBOX, [uid], frozenset({FLAG_SEEN}), "remove")
    append(store, alice)  # a whole rewrite: the log is folded and removed
    view = store.view(alice, INBOX)
    Path(alice, maildirplus.UIDLIST_LOG).write_bytes(stale)
    assert MaildirPlus(lambda size: "unused").view(alice, INBOX) == view
    assert view.messages[0].flags == frozenset()


def test_a_flag_change_is_not_fsynced_but_an_added_or_removed_message_is(store, alice, monkeypatch):
    """As Dovecot's mail_fsync = optimized: a STORE syncs nothing; an append and an expunge still sync the message, cur/ and the uidlist before they return."""
    synced: list[str] = []
    real_fsync, real_directory = os.fsync, maildirplus.fsync_directory
    monkeypatch.setattr(maildirplus.os, "fsync", lambda fd: synced.append("file") or real_fsync(fd))

    def record(path: str) -> None:
        synced.append(os.path.basename(path))
        real_directory(path)

    monkeypatch.setattr(maildirplus, "fsync_directory", record)
    monkeypatch.setattr(fsutil, "fsync_directory", record)  # replace_durably's
    uid = append(store, alice)
    assert "cur" in synced and synced.count("file") >= 2 and "alice" in synced, synced
    synced.clear()
    store.store_flags(alice, INBOX, [uid], frozenset({FLAG_DELETED}), "add")
    assert synced == []
    assert store.expunge(alice, INBOX, [uid]) == [uid]
    assert "cur" in synced and "file" in synced and "alice" in synced, synced


LOG_WRITER = r"""
import sys
from mailplat.backends.maildirplus import MaildirPlus
maildir, uid = sys.argv[1], int(sys.argv[2])
store = MaildirPlus(lambda size: "unused")
result = store.store_flags(maildir, "INBOX", [uid], frozenset({"\\Flagged", "Work"}), "add")
print(result.changed[0].modseq)
"""


def test_another_processs_log_lines_are_read_by_view(store, alice, monkeypatch):
    """A flag change by another process reaches our cached view from its log lines, with its modseq: the uidlist is not read again, nor each message compared with the listing."""
    uids = [append(store, alice) for _ in range(3)]
    store.view(alice, INBOX)
    loads = []
    real_load = store._load
    monkeypatch.setattr(store, "_load", lambda path: loads.append(path) or real_load(path))
    real_reconcile = store._reconcile
    monkeypatch.setattr(store, "_reconcile", lambda *args: loads.append("reconciled") or real_reconcile(*args))
    done = subprocess.run([sys.executable, "-c", LOG_WRITER, alice, str(uids[2])], capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    modseq = int(done.stdout)
    view = store.view(alice, INBOX)
    assert view.messages[2].flags == frozenset({FLAG_FLAGGED, "Work"})
    assert view.messages[2].modseq == modseq == view.highest_modseq, "the other process's modseq, not one of ours"
    assert loads == [], "the uidlist was read again, or the listing taken for a change behind our back"
    assert log_lines(alice)[-1].startswith(f"{uids[2]} M{modseq} :")


def test_a_storm_of_flag_changes_does_not_list_cur_again(store, alice, monkeypatch):
    """Our own flag changes keep the cached listing true without listing cur/ after each; another program's change in the same clock tick is seen once the short trust has run out."""
    monkeypatch.setattr(maildirplus, "_SLACK_NS", 10**12)  # every mtime "too recent"
    uids = [append(store, alice) for _ in range(5)]
    store.view(alice, INBOX)
    store.store_flags(alice, INBOX, [uids[0]], frozenset({FLAG_SEEN}), "add")
    store.view(alice, INBOX)
    listed = []
    real = os.listdir
    monkeypatch.setattr(maildirplus.os, "listdir", lambda path: listed.append(path) or real(path))
    for uid in uids:
        store.store_flags(alice, INBOX, [uid], frozenset({FLAG_FLAGGED}), "add")
        assert store.view(alice, INBOX).messages[uid - 1].flags >= {FLAG_FLAGGED}
    assert listed == [], "cur/ was listed again after our own change"
    cur = os.path.join(alice, "cur")
    before = os.stat(cur).st_mtime_ns
    Path(cur, "sneaky:2,S").write_bytes(b"Subject: s\r\n\r\n")
    os.utime(cur, ns=(before, before))  # within the tick of our last change
    monkeypatch.setattr(maildirplus, "_RELIST_NS", 0)  # the trust has run out
    assert len(store.view(alice, INBOX).messages) == 6
    assert listed


def test_usage_counts_names_and_is_cached(store, alice, maildir, reactor, monkeypatch):
    """usage sums the ,S= sizes of every folder's new/ and cur/, and does not list an unchanged directory again."""
    store.folders(alice)
    append(store, alice, text=b"a" * 100)
    append(store, alice, "Archive", text=b"b" * 200)
    reactor.wait(maildir.deliver(ALICE, in_memory()))
    expected = sum(os.path.getsize(os.path.join(d, s, n)) for d in (alice, os.path.join(alice, ".Archive")) for s in ("new", "cur") for n in os.listdir(os.path.join(d, s)))
    assert store.usage(alice) == (expected, 3)
    monkeypatch.setattr(maildirplus, "_SLACK_NS", -10**12)
    store.usage(alice)
    monkeypatch.setattr(maildirplus.os, "scandir", lambda path: pytest.fail(f"scanned {path}"))
    monkeypatch.setattr(maildirplus.os, "listdir", lambda path: pytest.fail(f"listed {path}"))
    assert store.usage(alice) == (expected, 3)


# --- change notifications, under the real reactor ---------------------------------------


@pytest.fixture(scope="module")
def running():
    from test_mailstore import ReactorThread

    reactor = ReactorThread.get()
    threads = reactor.threads()
    yield types.SimpleNamespace(reactor=reactor, threads=threads)
    reactor.call(threads.stopService)


def watched_maildir(running, root: Path, use_inotify: bool) -> Maildir:
    backend = Maildir(str(root), running.reactor.reactor, running.threads, use_inotify=use_inotify)
    running.reactor.call(backend.startService)
    return backend


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "polling"])
def test_watch_notices_another_process_within_a_second(running, tmp_path, use_inotify):
    """With inotify and by polling (where there is none), a change by another process reaches the callback within 1 s."""
    backend = watched_maildir(running, tmp_path / "mail", use_inotify)
    other = MaildirPlus(backend.unique_name)
    alice = backend.folder(ALICE)
    fired = threading.Event()
    try:
        running.reactor.call(backend.view, ALICE, INBOX)
        stop = running.reactor.call(backend.watch, ALICE, INBOX, fired.set)
        assert (backend.watcher._notifier is not None) == use_inotify
        for change in (
            lambda: append(other, alice),
            lambda: other.store_flags(alice, INBOX, [1], frozenset({FLAG_SEEN}), "add"),
            lambda: Path(alice, "new", "delivered-elsewhere").write_bytes(b"Subject: x\r\n\r\n"),
        ):
            fired.clear()
            change()
            assert fired.wait(1.0), "not notified within 1 s"
        running.reactor.call(stop)
    finally:
        running.reactor.call(backend.stopService)


def test_a_folder_deleted_under_a_session_is_no_such_folder(running, tmp_path):
    """A folder removed by another process between two calls gives NoSuchFolder, and a disk error a TemporaryFailure, never a raw OSError."""
    backend = watched_maildir(running, tmp_path / "mail", True)
    try:
        running.reactor.call(backend.create_folder, ALICE, "Brief")
        running.reactor.call(backend.view, ALICE, "Brief")
        shutil.rmtree(os.path.join(backend.folder(ALICE), ".Brief"))
        for call in (
            lambda: backend.view(ALICE, "Brief"),
            lambda: backend.store_flags(ALICE, "Brief", [1], frozenset({FLAG_SEEN}), "add"),
        ):
            with pytest.raises(NoSuchFolder):
                running.reactor.call(call)
        # Deleted between the check and the lock (a race a test cannot time): the
        # error on the way out is what the IMAP server sees.
        def vanished() -> None:
            raise FileNotFoundError(2, "No such file or directory")

        def broken() -> None:
            raise OSError(5, "Input/output error")

        with pytest.raises(NoSuchFolder):
            running.reactor.call(backend._store, vanished)
        with pytest.raises(TemporaryFailure, match="Input/output error"):
            running.reactor.call(backend._store, broken)
    finally:
        running.reactor.call(backend.stopService)


def test_an_inotify_queue_overflow_calls_every_watcher(running, tmp_path):
    """When the kernel's event queue overflows (one event with no watch), every watched folder is told it may have changed."""
    import struct

    from twisted.internet import inotify

    backend = watched_maildir(running, tmp_path / "mail", True)
    fired = [threading.Event(), threading.Event()]
    try:
        running.reactor.call(backend.create_folder, ALICE, "Other")
        stops = [running.reactor.call(backend.watch, ALICE, name, e.set) for name, e in zip((INBOX, "Other"), fired)]
        overflow = struct.pack("=LLLL", 0xFFFFFFFF, inotify.IN_Q_OVERFLOW, 0, 0)
        running.reactor.call(backend.watcher._notifier._doRead, overflow)
        assert all(e.wait(1.0) for e in fired)
        for stop in stops:
            running.reactor.call(stop)
    finally:
        running.reactor.call(backend.stopService)


def test_deleting_one_watched_folder_leaves_the_others_watched(running, tmp_path):
    """Twisted's INotify closes every watch when one watched folder is deleted; ours keeps watching the rest."""
    backend = watched_maildir(running, tmp_path / "mail", True)
    other = MaildirPlus(backend.unique_name)
    alice = backend.folder(ALICE)
    fired = threading.Event()
    try:
        running.reactor.call(backend.create_folder, ALICE, "Doomed")
        running.reactor.call(backend.view, ALICE, INBOX)
        stops = [running.reactor.call(backend.watch, ALICE, name, fired.set) for name in ("Doomed", INBOX)]
        other.delete_folder(alice, "Doomed")
        assert fired.wait(1.0)
        fired.clear()
        append(other, alice)
        assert fired.wait(1.0), "INBOX's watch ended with the deleted folder's"
        for stop in stops:
            running.reactor.call(stop)
    finally:
        running.reactor.call(backend.stopService)


def test_the_watcher_calls_once_more_after_the_last_change(running, tmp_path):
    """With inotify the callback comes at once, and again a little later once the folder our own change left unlisted has been listed."""
    backend = watched_maildir(running, tmp_path / "mail", True)
    other = MaildirPlus(backend.unique_name)
    alice = backend.folder(ALICE)
    calls: queue.Queue = queue.Queue()
    try:
        append(other, alice)
        running.reactor.call(backend.view, ALICE, INBOX)
        stop = running.reactor.call(backend.watch, ALICE, INBOX, lambda: calls.put(time.monotonic()))
        start = time.monotonic()
        backend.store.store_flags(alice, INBOX, [1], frozenset({FLAG_SEEN}), "add")
        assert backend.store._cached(alice).ours, "trusted without a listing after our own change"
        first = calls.get(timeout=1.0)
        while True:
            later = calls.get(timeout=2.0)
            if later - first >= maildirplus._AGAIN * 0.9:
                break
        assert later - start < maildirplus._AGAIN + 1.0
        assert not backend.store._cached(alice).ours, "not listed again before the second call"
        running.reactor.call(stop)
    finally:
        running.reactor.call(backend.stopService)

# --- moving between Dovecot and mailplat, with Dovecot's own doveadm ---------------------

DOVEADM = shutil.which("doveadm")
DOVECOT_CONF = """\
base_dir = {base}/run
state_dir = {base}/state
log_path = /dev/stderr
mail_location = maildir:{maildir}
mail_uid = {uid}
mail_gid = {uid}
first_valid_uid = 0
first_valid_gid = 0
namespace inbox {{
  inbox = yes
  separator = /
}}
"""


class Doveadm:
    """Debian's doveadm on one maildir, without a running Dovecot (as the user
    nobody when we are root: Dovecot refuses mail access as root)."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mailplat-dovecot-"))
        self.base.chmod(0o755)
        self.maildir = self.base / "mail" / "example.org" / "alice"
        self.uid = 65534 if os.geteuid() == 0 else os.geteuid()
        for sub in ("mail", "home", "run", "state"):
            (self.base / sub).mkdir()
        (self.base / "dovecot.conf").write_text(DOVECOT_CONF.format(base=self.base, maildir=self.maildir, uid=self.uid))

    def __call__(self, *args: str, stdin: bytes | None = None) -> list[list[str]]:
        """Run doveadm (tab-separated output); the rows after the header."""
        if os.geteuid() == 0:
            for path in [self.base / "mail", self.base / "home", *(self.base / "mail").rglob("*")]:
                os.lchown(path, self.uid, self.uid)
        done = subprocess.run(
            [DOVEADM, "-c", str(self.base / "dovecot.conf"), "-f", "tab", *args],
            input=stdin, capture_output=True, timeout=30,
            env={**os.environ, "USER": "alice", "HOME": str(self.base / "home")},
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        rows = [line.split("\t") for line in done.stdout.decode().splitlines() if line]
        return rows[1:]

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def doveadm():
    if DOVEADM is None:
        pytest.skip("doveadm is not installed (apt-get install dovecot-core)")
    d = Doveadm()
    yield d
    d.cleanup()


def dovecot_flags(row: str) -> frozenset[str]:
    return frozenset(row.split()) - {"\\Recent"}


def test_from_dovecot_uids_flags_keywords_and_subscriptions_carry_over(doveadm):
    """A maildir Dovecot made (its UIDs, UIDVALIDITY, flags, keywords, Unicode folders, subscriptions) is the same folder to mailplat."""
    for i in range(3):
        doveadm("save", stdin=b"Subject: %d\r\n\r\nbody\r\n" % i)
    doveadm("flags", "add", "\\Seen $Junk", "mailbox", "INBOX", "uid", "2")
    doveadm("expunge", "mailbox", "INBOX", "uid", "1")
    doveadm("mailbox", "create", "Entwürfe/Alt")
    doveadm("mailbox", "subscribe", "Entwürfe/Alt")
    doveadm("save", "-m", "Entwürfe/Alt", stdin=b"Subject: draft\r\n\r\nbody\r\n")
    [[_, uidnext, uidvalidity]] = doveadm("mailbox", "status", "uidnext uidvalidity", "INBOX")
    [[_, _, sub_uidvalidity]] = doveadm("mailbox", "status", "uidnext uidvalidity", "Entwürfe/Alt")
    expected = {int(uid): dovecot_flags(flags) for uid, flags in doveadm("fetch", "uid flags", "mailbox", "INBOX", "all")}

    store = MaildirPlus(lambda size: f"{time.time_ns()}.mailplat,S={size}")
    view = store.view(str(doveadm.maildir), INBOX)
    assert (view.uidvalidity, view.uidnext) == (int(uidvalidity), int(uidnext))
    assert {m.uid: m.flags for m in view.messages} == expected == {2: frozenset({FLAG_SEEN, "$Junk"}), 3: frozenset()}
    folders = {f.name: f for f in store.folders(str(doveadm.maildir))}
    assert folders["Entwürfe/Alt"].subscribed
    alt = store.view(str(doveadm.maildir), "Entwürfe/Alt")
    assert alt.uidvalidity == int(sub_uidvalidity) and [m.uid for m in alt.messages] == [1]
    content = b"Subject: after\r\n\r\nbody\r\n"
    assert store.append(str(doveadm.maildir), INBOX, SpooledMessage("", len(content), "", content), frozenset(), DATE)[1] == int(uidnext)


def test_to_dovecot_with_the_readmes_steps(doveadm):
    """After the README's steps (mailplat-uidlist copied to dovecot-uidlist, the change log left), Dovecot reports mailplat's UIDs, UIDVALIDITY, flags, keywords and subscriptions."""
    store = MaildirPlus(lambda size: f"{time.time_ns()}.mailplat,S={size}")
    maildir = str(doveadm.maildir)
    store.folders(maildir)
    uids = [append(store, maildir, flags=frozenset({FLAG_SEEN}) if i else frozenset()) for i in range(3)]
    store.store_flags(maildir, INBOX, [uids[1]], frozenset({FLAG_DELETED}), "add")
    store.expunge(maildir, INBOX, [uids[1]])
    store.store_flags(maildir, INBOX, [uids[2]], frozenset({"$Junk", FLAG_FLAGGED}), "add")
    store.create_folder(maildir, "Straße/2024")
    store.subscribe(maildir, "Straße/2024", True)
    append(store, maildir, "Straße/2024")
    views = {name: store.view(maildir, name) for name in (INBOX, "Straße/2024")}
    # The last flag change is only in the log, not folded: the README's steps do not need it.
    assert log_lines(maildir) and log_lines(maildir)[-1].split()[0] == str(uids[2])
    for uidlist in doveadm.maildir.rglob("mailplat-uidlist"):
        shutil.copy(uidlist, uidlist.with_name("dovecot-uidlist"))
    for name, view in views.items():
        [[_, uidnext, uidvalidity]] = doveadm("mailbox", "status", "uidnext uidvalidity", name)
        assert (int(uidvalidity), int(uidnext)) == (view.uidvalidity, view.uidnext)
        fetched = {int(uid): dovecot_flags(flags) for uid, flags in doveadm("fetch", "uid flags", "mailbox", name, "all")}
        assert fetched == {m.uid: m.flags for m in view.messages}
    assert ["Straße/2024"] in doveadm("mailbox", "list", "-s")


def test_a_cached_message_is_opened_on_the_calling_thread(maildir, store, alice, reactor):
    """read() opens a message of a folder whose listing is cached with one open(2) on the
    reactor thread (no pool trip); a message renamed since, or a folder not yet read, goes
    through the pool, and both give the same bytes."""
    uid = append(store, alice, text=b"hello")
    store._states.clear()  # as in a new process: nothing cached
    assert store.open_cached(alice, INBOX, uid) is None
    through_pool = maildir.read(ALICE, INBOX, uid)
    assert isinstance(through_pool, Deferred)
    reactor.wait(through_pool).close()
    store.view(alice, INBOX)
    opened = maildir.read(ALICE, INBOX, uid)
    assert not isinstance(opened, Deferred)
    with opened:
        assert opened.read().endswith(b"hello\r\n")
    [name] = cur_names(alice)
    os.rename(os.path.join(alice, "cur", name), os.path.join(alice, "cur", name.split(":")[0] + ":2,S"))
    assert store.open_cached(alice, INBOX, uid) is None
    with store.open_message(alice, INBOX, uid) as found:
        assert found.read().endswith(b"hello\r\n")
    assert store.open_cached(alice, INBOX, 999) is None
