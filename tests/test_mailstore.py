"""The IMessageStore contract, one suite for every store that serves IMAP.

The ``store`` fixture is parametrized ("maildir", "postgres"): each test
runs against each store, through the real reactor (run in a thread of the
test process, see :class:`ReactorThread`) and the service's real thread
pools.  A second instance on the same data stands for a restart, another
worker process or another node.
"""

from __future__ import annotations

import os
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailplat.interfaces import (
    FLAG_ANSWERED,
    FLAG_DELETED,
    FLAG_DRAFT,
    FLAG_FLAGGED,
    FLAG_SEEN,
    INBOX,
    SPECIAL_USE,
    Account,
    BackendContext,
    FolderExists,
    IMessageStore,
    NoSuchFolder,
    PermanentFailure,
    SpooledMessage,
)
from mailplat.plugins import call as adapt

ALICE = Account("alice@example.org")
BOB = Account("bob@example.org")
DATE = 1_700_000_000.0


class ReactorThread:
    """A real reactor of our own, running in a thread of the test process.

    Stores are driven as the server drives them: their methods are called on
    the reactor thread, their disk and database work runs in the service's
    pools, and their Deferreds fire on the reactor thread.  A test thread
    waits for each result with :meth:`call`.  It is not the global reactor
    (other test files pump that one from the main thread), which also proves
    that the stores use only the reactor they are given; it runs until the
    process ends.
    """

    _instance: ReactorThread | None = None

    def __init__(self) -> None:
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        self.reactor: Any = reactor
        started = threading.Event()
        reactor.callWhenRunning(started.set)
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, name="reactor", daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the reactor did not start")

    @classmethod
    def get(cls) -> ReactorThread:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def call(self, f: Callable[..., Any], *args: Any, timeout: float = 20.0, **kwargs: Any) -> Any:
        """``f(*args)`` on the reactor thread; its result (a Deferred's or a coroutine's) here, a Failure raised."""
        done = threading.Event()
        box: list[Any] = []

        def start() -> None:
            d = adapt(f, *args, **kwargs)
            d.addBoth(lambda result: (box.append(result), done.set()))

        self.reactor.callFromThread(start)
        if not done.wait(timeout):
            raise AssertionError(f"{getattr(f, '__name__', f)} did not finish within {timeout}s")
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def threads(self) -> Any:
        """The service's thread pools (mailplat.threads.Threads), started."""
        from mailplat.threads import Threads

        threads = Threads(self.reactor)
        self.call(threads.startService)
        return threads


@pytest.fixture(scope="module")
def running() -> Iterator[types.SimpleNamespace]:
    """The reactor thread and one set of started pools for the module."""
    reactor = ReactorThread.get()
    threads = reactor.threads()
    yield types.SimpleNamespace(reactor=reactor, threads=threads)
    reactor.call(threads.stopService)


# --- the stores ---------------------------------------------------------------------

PG_DSN = os.environ.get("MAILPLAT_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test user=postgres")


class Subject:
    """One store under test, and how to make another instance on its data."""

    def __init__(self, name: str, make: Callable[[], Any], running: types.SimpleNamespace, root: Path | None = None) -> None:
        self.name = name
        self._make = make
        self.running = running
        self.root = root
        self.instances: list[Any] = []
        self.store = self.another()

    def another(self) -> Any:
        """A new instance on the same data: another process (or a restart) of this store."""
        store = self._make()
        self.running.reactor.call(store.startService)
        self.instances.append(store)
        return store

    def __call__(self, method: str, *args: Any, store: Any = None, **kwargs: Any) -> Any:
        """``store.method(*args)`` on the reactor thread, waited for."""
        return self.running.reactor.call(getattr(store or self.store, method), *args, **kwargs)

    def close(self) -> None:
        for store in self.instances:
            self.running.reactor.call(store.stopService)


def _maildir(tmp_path: Path, running: types.SimpleNamespace) -> Subject:
    from mailplat.backends.maildir import Maildir

    root = tmp_path / "mail"
    return Subject("maildir", lambda: Maildir(str(root), running.reactor.reactor, running.threads), running, root)


def _postgres(tmp_path: Path, running: types.SimpleNamespace) -> tuple[Subject, Callable[[], None]]:
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed")
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        pytest.skip(f"PostgreSQL is not reachable at {PG_DSN!r}: {' '.join(str(e).split())}")
    from mailplat.backends import postgres

    schema = "mps_" + uuid.uuid4().hex[:12]

    def drop() -> None:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
                (schema,),
            )
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    from psycopg.conninfo import make_conninfo

    options = {"dsn": make_conninfo(PG_DSN, application_name=schema), "schema": schema, "pool_size": 4, "timeout": 5}
    context = BackendContext(
        "mail.example.org", ("example.org",), str(tmp_path), str(tmp_path / "var"), running.reactor.reactor, threads=running.threads,
    )
    try:
        first = postgres.build_mailbox(dict(options), context)
    except BaseException:
        drop()
        raise
    made = [first]

    def make() -> Any:
        return made.pop() if made else postgres.build_mailbox(dict(options), context)

    return Subject("postgres", make, running), drop


@pytest.fixture(params=["maildir", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path, running: types.SimpleNamespace) -> Iterator[Subject]:
    """Each store in turn, fresh, started; stopped at the end."""
    drop: Callable[[], None] | None = None
    if request.param == "maildir":
        subject = _maildir(tmp_path, running)
    else:
        subject, drop = _postgres(tmp_path, running)
    try:
        yield subject
    finally:
        subject.close()
        if drop is not None:
            drop()


def message(text: str = "hello", extra: bytes = b"") -> SpooledMessage:
    content = b"From: bob@example.org\r\nSubject: " + text.encode() + b"\r\n\r\n" + text.encode() + b"\r\n" + extra
    return SpooledMessage("", len(content), "bob@example.org", content)


def fill(store: Subject, folder: str = INBOX, count: int = 3, flags: frozenset[str] = frozenset()) -> list[int]:
    """``count`` messages appended to ``folder``; their UIDs."""
    return [store("append", ALICE, folder, message(f"m{i}"), flags, DATE + i)[1] for i in range(count)]


def read_all(store: Subject, folder: str, uid: int, instance: Any = None) -> bytes:
    f = store("read", ALICE, folder, uid, store=instance)
    try:
        return f.read()
    finally:
        f.close()


def uids(view: Any) -> list[int]:
    return [m.uid for m in view.messages]


def flags_of(view: Any, uid: int) -> frozenset[str]:
    return next(m.flags for m in view.messages if m.uid == uid)


# --- the contract ---------------------------------------------------------------------


def test_provides_the_contract(store):
    """The store provides every IMessageStore method with its signature (as discovery checks)."""
    assert verifyObject(IMessageStore, store.store)


def test_inbox_and_special_use_folders_exist_from_the_first_call(store):
    """folders() lists INBOX and makes Sent, Drafts, Trash, Junk and Archive, each with its RFC 6154 attribute; INBOX starts empty."""
    folders = {f.name: f for f in store("folders", ALICE)}
    assert INBOX in folders
    for name, attribute in SPECIAL_USE.items():
        assert folders[name].special_use == attribute
    assert folders[INBOX].special_use == ""
    view = store("view", ALICE, INBOX)
    assert view.messages == () and view.uidnext >= 1 and view.uidvalidity > 0 and view.highest_modseq > 0
    assert {f.name for f in store("folders", ALICE)} == set(folders), "a second call makes nothing more"
    assert store("view", ALICE, "inbox").uidvalidity == view.uidvalidity, "INBOX is matched without case"


def test_append_then_view_and_read(store):
    """append returns (uidvalidity, uid) with strictly increasing UIDs; view lists each with its size, flags, date and a modseq; read gives the bytes back."""
    sent = [message(f"number {i}", b"x" * (i * 100)) for i in range(3)]
    results = [
        store("append", ALICE, INBOX, m, frozenset({FLAG_SEEN}) if i == 1 else frozenset(), DATE + i * 60)
        for i, m in enumerate(sent)
    ]
    view = store("view", ALICE, INBOX)
    assert {v for v, _ in results} == {view.uidvalidity}
    got = [uid for _, uid in results]
    assert got == sorted(got) and len(set(got)) == 3
    assert uids(view) == got and view.uidnext > got[-1]
    for (_, uid), m, info, i in zip(results, sent, view.messages, range(3)):
        assert info.size == m.size
        assert info.internal_date == DATE + i * 60
        assert info.modseq > 0
        assert read_all(store, INBOX, uid) == m.content
    assert [m.flags for m in view.messages] == [frozenset(), frozenset({FLAG_SEEN}), frozenset()]
    assert view.highest_modseq >= max(m.modseq for m in view.messages)


def test_large_append_streams_from_a_file(store, tmp_path):
    """A message spooled to a file (1.5 MiB, larger than any copy buffer) is stored and read back byte for byte."""
    path = tmp_path / "big.eml"
    with open(path, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        for i in range(30000):
            f.write(b"line %05d of a large message, long enough to matter\r\n" % i)
    spooled = SpooledMessage(str(path), path.stat().st_size, "")
    _, uid = store("append", ALICE, INBOX, spooled, frozenset(), DATE)
    assert store("view", ALICE, INBOX).messages[0].size == spooled.size
    assert read_all(store, INBOX, uid) == path.read_bytes()


def test_uids_are_never_reused_after_expunge(store):
    """Expunged UIDs stay used: the next append gets a higher UID, and UIDNEXT never goes down."""
    first = fill(store, count=3)
    store("store_flags", ALICE, INBOX, [first[2]], frozenset({FLAG_DELETED}), "add")
    assert store("expunge", ALICE, INBOX, first) == [first[2]], "only the \\Deleted one is expunged"
    view = store("view", ALICE, INBOX)
    assert uids(view) == first[:2]
    assert view.uidnext > first[2]
    _, again = store("append", ALICE, INBOX, message("again"), frozenset(), DATE)
    assert again > first[2]
    assert uids(store("view", ALICE, INBOX)) == first[:2] + [again]


def test_expunge_ignores_messages_not_deleted_and_uids_not_given(store):
    """expunge removes only the given UIDs that are \\Deleted; a \\Deleted message not named stays."""
    a, b, c = fill(store, count=3, flags=frozenset({FLAG_DELETED}))
    assert store("expunge", ALICE, INBOX, [a, 999]) == [a]
    assert uids(store("view", ALICE, INBOX)) == [b, c]
    assert store("expunge", ALICE, INBOX, []) == []


def test_a_restart_sees_the_same_folder(store):
    """A new store instance on the same data reports the same UIDVALIDITY, UIDNEXT, UIDs, flags and modseqs."""
    fill(store, count=4, flags=frozenset({FLAG_FLAGGED, "$Junk"}))
    store("store_flags", ALICE, INBOX, [2], frozenset({FLAG_SEEN}), "add")
    before = store("view", ALICE, INBOX)
    again = store.another()
    after = store("view", ALICE, INBOX, store=again)
    assert (after.uidvalidity, after.uidnext, after.highest_modseq) == (before.uidvalidity, before.uidnext, before.highest_modseq)
    assert after.messages == before.messages
    _, uid = store("append", ALICE, INBOX, message("after restart"), frozenset(), DATE, store=again)
    assert uid == before.uidnext


def test_highest_modseq_grows_with_every_change(store):
    """Each append, flag change and expunge raises HIGHESTMODSEQ; a changed message gets a modseq above every earlier one."""
    seen = [store("view", ALICE, INBOX).highest_modseq]

    def step() -> Any:
        view = store("view", ALICE, INBOX)
        assert view.highest_modseq > seen[-1]
        seen.append(view.highest_modseq)
        return view

    a, b = fill(store, count=1)[0], fill(store, count=1)[0]
    step()
    result = store("store_flags", ALICE, INBOX, [a], frozenset({FLAG_SEEN}), "add")
    view = step()
    [changed] = result.changed
    assert changed.uid == a and changed.flags == frozenset({FLAG_SEEN})
    assert changed.modseq == view.highest_modseq
    assert next(m for m in view.messages if m.uid == a).modseq > next(m for m in view.messages if m.uid == b).modseq
    store("store_flags", ALICE, INBOX, [b], frozenset({FLAG_DELETED}), "add")
    step()
    store("expunge", ALICE, INBOX, [b])
    step()
    unchanged = store("store_flags", ALICE, INBOX, [a], frozenset({FLAG_SEEN}), "add")
    assert unchanged.changed == ()
    assert store("view", ALICE, INBOX).highest_modseq == seen[-1], "no change, no new modseq"


def test_store_set_add_remove(store):
    """store_flags replaces, adds or removes flags, system flags and keywords alike; gone UIDs are ignored."""
    [uid] = fill(store, count=1)
    all_flags = frozenset({FLAG_SEEN, FLAG_ANSWERED, FLAG_FLAGGED, FLAG_DELETED, FLAG_DRAFT, "$Forwarded", "$Junk", "Work"})
    result = store("store_flags", ALICE, INBOX, [uid, 12345], all_flags, "set")
    assert [m.uid for m in result.changed] == [uid]
    assert flags_of(store("view", ALICE, INBOX), uid) == all_flags
    store("store_flags", ALICE, INBOX, [uid], frozenset({FLAG_SEEN, "Work"}), "remove")
    assert flags_of(store("view", ALICE, INBOX), uid) == all_flags - {FLAG_SEEN, "Work"}
    store("store_flags", ALICE, INBOX, [uid], frozenset({"$Junk", FLAG_SEEN}), "add")
    assert flags_of(store("view", ALICE, INBOX), uid) == all_flags - {"Work"}
    store("store_flags", ALICE, INBOX, [uid], frozenset(), "set")
    assert flags_of(store("view", ALICE, INBOX), uid) == frozenset()


def test_flags_match_without_case(store):
    """Flag names are case-insensitive (RFC 3501 9): "\\seen" is \\Seen, and "work" removes the keyword "Work"."""
    [uid] = fill(store, count=1, flags=frozenset({FLAG_SEEN, "Work", "$Junk"}))
    store("store_flags", ALICE, INBOX, [uid], frozenset({"\\SEEN", "work"}), "remove")
    assert flags_of(store("view", ALICE, INBOX), uid) == frozenset({"$Junk"})
    result = store("store_flags", ALICE, INBOX, [uid], frozenset({"$JUNK", "\\flagged"}), "add")
    assert flags_of(store("view", ALICE, INBOX), uid) == frozenset({"$Junk", FLAG_FLAGGED})
    assert result.changed[0].flags == frozenset({"$Junk", FLAG_FLAGGED})


def test_a_bad_flag_is_refused_and_changes_nothing(store):
    """A flag that is neither a system flag nor a keyword atom is a PermanentFailure, and no message changes."""
    a, b = fill(store, count=2)
    before = store("view", ALICE, INBOX)
    for bad in ("\\Bogus", "two words", "par(en", ""):
        with pytest.raises(PermanentFailure):
            store("store_flags", ALICE, INBOX, [a, b], frozenset({FLAG_SEEN, bad}), "add")
    assert store("view", ALICE, INBOX) == before


def test_unchanged_since(store):
    """With unchanged_since, a message changed after that modseq is left alone and listed in modified (RFC 7162)."""
    a, b = fill(store, count=2)
    base = store("view", ALICE, INBOX).highest_modseq
    store("store_flags", ALICE, INBOX, [a], frozenset({FLAG_FLAGGED}), "add")
    result = store("store_flags", ALICE, INBOX, [a, b], frozenset({FLAG_SEEN}), "add", base)
    assert result.modified == (a,)
    assert [m.uid for m in result.changed] == [b]
    view = store("view", ALICE, INBOX)
    assert flags_of(view, a) == frozenset({FLAG_FLAGGED}) and flags_of(view, b) == frozenset({FLAG_SEEN})
    now = view.highest_modseq
    result = store("store_flags", ALICE, INBOX, [a], frozenset({FLAG_SEEN}), "add", now)
    assert result.modified == () and [m.uid for m in result.changed] == [a]


def test_copy_keeps_flags_and_dates_and_returns_pairs(store):
    """copy gives new UIDs in the target with the same flags, date and bytes; the source keeps its messages."""
    store("folders", ALICE)  # makes the special-use folders
    a, b, c = fill(store, count=3)
    store("store_flags", ALICE, INBOX, [a], frozenset({FLAG_SEEN, "$Label1"}), "add")
    store("store_flags", ALICE, INBOX, [c], frozenset({FLAG_FLAGGED}), "add")
    source = store("view", ALICE, INBOX)
    uidvalidity, pairs = store("copy", ALICE, INBOX, [c, a, 777], "Archive")
    target = store("view", ALICE, "Archive")
    assert uidvalidity == target.uidvalidity
    assert [old for old, _ in pairs] == [a, c]
    assert [new for _, new in pairs] == uids(target)
    for old, new in pairs:
        before = next(m for m in source.messages if m.uid == old)
        after = next(m for m in target.messages if m.uid == new)
        assert (after.flags, after.size, after.internal_date) == (before.flags, before.size, before.internal_date)
        assert read_all(store, "Archive", new) == read_all(store, INBOX, old)
    assert uids(store("view", ALICE, INBOX)) == [a, b, c]
    # A flag change on the copy leaves the original alone.
    store("store_flags", ALICE, "Archive", [pairs[0][1]], frozenset({FLAG_DELETED}), "add")
    assert flags_of(store("view", ALICE, INBOX), a) == frozenset({FLAG_SEEN, "$Label1"})
    with pytest.raises(NoSuchFolder):
        store("copy", ALICE, INBOX, [a], "Nowhere")


def test_move_removes_from_the_source(store):
    """move returns the (old, new) pairs, the messages are in the target with their flags and gone from the source."""
    store("folders", ALICE)  # makes the special-use folders
    a, b, c = fill(store, count=3)
    store("store_flags", ALICE, INBOX, [b], frozenset({FLAG_ANSWERED, "Work"}), "add")
    before = store("view", ALICE, INBOX)
    content = read_all(store, INBOX, b)
    uidvalidity, pairs = store("move", ALICE, INBOX, [b, c], "Trash")
    target = store("view", ALICE, "Trash")
    assert uidvalidity == target.uidvalidity and [old for old, _ in pairs] == [b, c]
    assert uids(target) == [new for _, new in pairs]
    assert flags_of(target, pairs[0][1]) == frozenset({FLAG_ANSWERED, "Work"})
    assert read_all(store, "Trash", pairs[0][1]) == content
    after = store("view", ALICE, INBOX)
    assert uids(after) == [a] and after.highest_modseq > before.highest_modseq
    with pytest.raises((NoSuchFolder, PermanentFailure)):
        read_all(store, INBOX, b)
    with pytest.raises(NoSuchFolder):
        store("move", ALICE, INBOX, [a], "Nowhere")
    assert uids(store("view", ALICE, INBOX)) == [a]


def test_copy_and_move_within_one_folder(store):
    """COPY and MOVE to the folder itself are allowed: new UIDs for the copies, and MOVE leaves only those."""
    a, b = fill(store, count=2)
    store("store_flags", ALICE, INBOX, [a], frozenset({FLAG_SEEN}), "add")
    _, copied = store("copy", ALICE, INBOX, [a], INBOX)
    [(old, new)] = copied
    assert old == a and new > b
    assert flags_of(store("view", ALICE, INBOX), new) == frozenset({FLAG_SEEN})
    _, moved = store("move", ALICE, INBOX, [b], INBOX)
    [(old, newer)] = moved
    assert old == b and newer > new
    assert uids(store("view", ALICE, INBOX)) == [a, new, newer]


def test_create_and_delete_folders(store):
    """create makes a folder and its missing parents (FolderExists when it exists); delete removes it and its messages, never INBOX."""
    store("create_folder", ALICE, "Work/Clients/2024")
    names = {f.name for f in store("folders", ALICE)}
    assert {"Work", "Work/Clients", "Work/Clients/2024"} <= names
    for taken in ("Work", "Work/Clients/2024", "INBOX", "inbox"):
        with pytest.raises(FolderExists):
            store("create_folder", ALICE, taken)
    fill(store, "Work/Clients/2024", count=2)
    first = store("view", ALICE, "Work/Clients/2024")
    store("delete_folder", ALICE, "Work/Clients/2024")
    assert "Work/Clients/2024" not in {f.name for f in store("folders", ALICE)}
    with pytest.raises(NoSuchFolder):
        store("view", ALICE, "Work/Clients/2024")
    with pytest.raises(NoSuchFolder):
        store("delete_folder", ALICE, "Work/Clients/2024")
    with pytest.raises(PermanentFailure):
        store("delete_folder", ALICE, "INBOX")
    store("create_folder", ALICE, "Work/Clients/2024")
    again = store("view", ALICE, "Work/Clients/2024")
    assert again.messages == ()
    assert again.uidvalidity != first.uidvalidity, "a new folder of the same name is a new UIDVALIDITY"


def test_rename_moves_children(store):
    """rename takes the folder's children along, keeps messages, UIDs and UIDVALIDITY, and refuses a name taken."""
    store("folders", ALICE)  # makes the special-use folders
    store("create_folder", ALICE, "Projects/Old")
    store("create_folder", ALICE, "Projects/Old/Notes")
    [uid] = fill(store, "Projects/Old/Notes", count=1)
    before = store("view", ALICE, "Projects/Old/Notes")
    with pytest.raises(FolderExists):
        store("rename_folder", ALICE, "Projects/Old", "Sent")
    with pytest.raises(NoSuchFolder):
        store("rename_folder", ALICE, "Nothing", "Something")
    store("rename_folder", ALICE, "Projects", "Done")
    names = {f.name for f in store("folders", ALICE)}
    assert {"Done", "Done/Old", "Done/Old/Notes"} <= names
    assert not {n for n in names if n.startswith("Projects")}
    after = store("view", ALICE, "Done/Old/Notes")
    assert (after.uidvalidity, uids(after)) == (before.uidvalidity, [uid])
    with pytest.raises(NoSuchFolder):
        store("view", ALICE, "Projects/Old/Notes")
    store("rename_folder", ALICE, "Done/Old/Notes", "Top")
    assert uids(store("view", ALICE, "Top")) == [uid]


def test_rename_inbox_moves_its_messages(store):
    """Renaming INBOX moves its messages into the new folder and leaves INBOX empty, its UIDs still used (RFC 3501 6.3.5)."""
    first = fill(store, count=2)
    store("store_flags", ALICE, INBOX, [first[0]], frozenset({FLAG_SEEN}), "add")
    store("rename_folder", ALICE, INBOX, "Old mail")
    moved = store("view", ALICE, "Old mail")
    assert len(moved.messages) == 2 and moved.messages[0].flags == frozenset({FLAG_SEEN})
    inbox = store("view", ALICE, INBOX)
    assert inbox.messages == () and inbox.uidnext > first[-1]
    _, uid = store("append", ALICE, INBOX, message(), frozenset(), DATE)
    assert uid > first[-1]


def test_subscriptions(store):
    """subscribe sets a folder's subscribed attribute, a missing folder may be subscribed, and it survives a restart."""
    store("folders", ALICE)  # makes the special-use folders
    store("create_folder", ALICE, "Lists")
    store("subscribe", ALICE, "Lists", False)
    assert not next(f for f in store("folders", ALICE) if f.name == "Lists").subscribed
    store("subscribe", ALICE, "Lists", True)
    store("subscribe", ALICE, "Not/Yet", True)
    store("subscribe", ALICE, "Trash", False)
    folders = {f.name: f for f in store("folders", ALICE, store=store.another())}
    assert folders["Lists"].subscribed and not folders["Trash"].subscribed
    store("create_folder", ALICE, "Not/Yet")
    assert next(f for f in store("folders", ALICE) if f.name == "Not/Yet").subscribed


BAD_NAMES = [
    "../x", "a/../../b", "..", ".", "a/./b", "x\x00y", "\x00", "a\nb", "tab\there", "a//b", "/lead", "trail/",
    "star*", "per%cent", "x" * 300, "/".join(["level"] * 100), "\udc80",
]


def test_folder_name_attacks_are_refused(store):
    """A folder name that could escape the account or that the store cannot hold is a PermanentFailure everywhere, and nothing is made."""
    before = {f.name for f in store("folders", ALICE)}  # and Archive
    tree = sorted(p for p in store.root.parent.rglob("*")) if store.root else None
    for name in BAD_NAMES:
        for method, args in [
            ("create_folder", (name,)),
            ("view", (name,)),
            ("append", (name, message(), frozenset(), DATE)),
            ("rename_folder", ("Archive", name)),
            ("subscribe", (name, True)),
        ]:
            with pytest.raises(PermanentFailure):
                store(method, ALICE, *args)
                pytest.fail(f"{method} accepted the folder name {name!r}")
    assert {f.name for f in store("folders", ALICE)} == before
    if tree is not None:
        assert sorted(p for p in store.root.parent.rglob("*")) == tree


def test_unicode_and_odd_folder_names_round_trip(store):
    """Names with non-ASCII letters, &, spaces and emoji are kept exactly as the client wrote them."""
    names = ["Entwürfe", "日本語/メール", "R&D", "with space", "emoji 😀", "~tilde"]
    for name in names:
        store("create_folder", ALICE, name)
        fill(store, name, count=1)
    listed = {f.name for f in store("folders", ALICE, store=store.another())}
    assert set(names) <= listed
    for name in names:
        assert len(store("view", ALICE, name).messages) == 1


def test_missing_folders(store):
    """view, append, read and store on a folder that does not exist raise NoSuchFolder."""
    with pytest.raises(NoSuchFolder):
        store("view", ALICE, "Missing")
    with pytest.raises(NoSuchFolder):
        store("append", ALICE, "Missing", message(), frozenset(), DATE)
    with pytest.raises(NoSuchFolder):
        store("read", ALICE, "Missing", 1)
    with pytest.raises(NoSuchFolder):
        store("store_flags", ALICE, "Missing", [1], frozenset({FLAG_SEEN}), "add")
    with pytest.raises(NoSuchFolder):
        store("expunge", ALICE, "Missing", [1])


def test_reading_an_expunged_message_fails_cleanly(store):
    """read of a UID that was expunged (or never existed) is a PermanentFailure, not a crash."""
    [uid] = fill(store, count=1, flags=frozenset({FLAG_DELETED}))
    store("expunge", ALICE, INBOX, [uid])
    for gone in (uid, 4242):
        with pytest.raises(PermanentFailure):
            store("read", ALICE, INBOX, gone)


def test_keywords_are_kept_as_written(store):
    """Keywords come back as written, after a restart too."""
    [uid] = fill(store, count=1, flags=frozenset({"$Junk", "NonJunk", "$MDNSent"}))
    store("store_flags", ALICE, INBOX, [uid], frozenset({"Todo"}), "add")
    assert flags_of(store("view", ALICE, INBOX, store=store.another()), uid) == frozenset({"$Junk", "NonJunk", "$MDNSent", "Todo"})


def test_delivery_is_seen_with_the_next_uid(store):
    """A message delivered (SMTP's path) appears at the next view with the next UID, in INBOX or a named folder."""
    [first] = fill(store, count=1)
    content = b"Subject: delivered\r\n\r\nhi\r\n"
    store("deliver", ALICE, SpooledMessage("", len(content), "carol@remote.test", content))
    view = store("view", ALICE, INBOX)
    assert len(view.messages) == 2 and view.messages[1].uid > first
    assert read_all(store, INBOX, view.messages[1].uid).endswith(content)
    store("deliver", ALICE, SpooledMessage("", len(content), "", content), "Quarantine")
    assert len(store("view", ALICE, "Quarantine").messages) == 1


def test_usage_counts_every_folder(store):
    """usage is (octets, messages) over all folders, and follows appends and expunges."""
    store("folders", ALICE)
    assert store("usage", ALICE) == (0, 0)
    a = message("one", b"a" * 1000)
    b = message("two", b"b" * 3000)
    store("append", ALICE, INBOX, a, frozenset(), DATE)
    _, uid = store("append", ALICE, "Archive", b, frozenset({FLAG_DELETED}), DATE)
    assert store("usage", ALICE) == (a.size + b.size, 2)
    store("expunge", ALICE, "Archive", [uid])
    assert store("usage", ALICE) == (a.size, 1)
    store("create_folder", ALICE, "Doomed")
    store("append", ALICE, "Doomed", b, frozenset(), DATE)
    assert store("usage", ALICE) == (a.size + b.size, 2)
    store("delete_folder", ALICE, "Doomed")
    assert store("usage", ALICE) == (a.size, 1)
    assert store("usage", BOB) == (0, 0)


def test_pop3_and_imap_agree_on_inbox(store):
    """POP3 DELE+QUIT is an expunge for IMAP, an IMAP expunge is gone for POP3, and POP3's retrieval is a flag change with a new modseq."""
    a, b, c = fill(store, count=3)
    before = store("view", ALICE, INBOX)
    drop = store("open", ALICE)
    entries = store.running.reactor.call(drop.entries)
    assert len(entries) == 3
    # POP3 session: delete the first, retrieve the second.
    store.running.reactor.call(drop.commit, [entries[0].uid], [entries[1].uid], False)
    after = store("view", ALICE, INBOX)
    assert uids(after) == [b, c]
    assert flags_of(after, b) == frozenset({FLAG_SEEN})
    modseq = next(m.modseq for m in after.messages if m.uid == b)
    assert modseq > max(m.modseq for m in before.messages)
    # IMAP expunge: POP3 no longer lists it.
    store("store_flags", ALICE, INBOX, [c], frozenset({FLAG_DELETED}), "add")
    store("expunge", ALICE, INBOX, [c])
    drop = store("open", ALICE)
    entries = store.running.reactor.call(drop.entries)
    assert len(entries) == 1
    store.running.reactor.call(drop.close)


def test_watch_sees_another_instance_change_within_a_second(store):
    """watch calls back on the reactor thread within 1 s of a change made through another instance (another process); after stop, never."""
    store("view", ALICE, INBOX)
    other = store.another()
    calls: list[bool] = []
    fired = threading.Event()
    reactor_thread = store.running.reactor.thread

    def changed() -> None:
        calls.append(threading.current_thread() is reactor_thread)
        fired.set()

    stop = store("watch", ALICE, INBOX, changed)
    try:
        store("append", ALICE, INBOX, message(), frozenset(), DATE, store=other)
        assert fired.wait(1.0), "no change notification within 1 s"
        assert all(calls)
        fired.clear()
        uid = store("view", ALICE, INBOX, store=other).messages[0].uid
        store("store_flags", ALICE, INBOX, [uid], frozenset({FLAG_SEEN}), "add", store=other)
        assert fired.wait(1.0), "a flag change was not notified within 1 s"
    finally:
        store.running.reactor.call(stop)
    fired.clear()
    store("append", ALICE, INBOX, message(), frozenset(), DATE, store=other)
    assert not fired.wait(0.3), "called after stop"


def test_two_watchers_of_one_folder(store):
    """Two sessions watching one folder are both called, and stopping one leaves the other watching."""
    store("view", ALICE, INBOX)
    other = store.another()
    events = [threading.Event(), threading.Event()]
    stops = [store("watch", ALICE, INBOX, e.set) for e in events]
    try:
        store("append", ALICE, INBOX, message(), frozenset(), DATE, store=other)
        assert all(e.wait(1.0) for e in events)
        store.running.reactor.call(stops[0])
        for e in events:
            e.clear()
        store("append", ALICE, INBOX, message(), frozenset(), DATE, store=other)
        assert events[1].wait(1.0)
        assert not events[0].is_set()
    finally:
        store.running.reactor.call(stops[1])
