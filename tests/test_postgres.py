"""The postgres auth and mailbox backends against a real PostgreSQL.

Options and schema migration (two processes at once), `mailplat user`
through the admin command, the backends' own behaviour in a reactor, and
real `twistd` nodes: SMTP in, POP3 out, two nodes sharing one database, and
the database going away and coming back.

Each test gets a schema of its own in the database named by
MAILPLAT_TEST_POSTGRES (a libpq DSN), by default ``test`` on 127.0.0.1:5432
as user postgres; the schema is dropped at the end.
"""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import commands
from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, merge_toml, message, wait_for

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
PASSWORDS = {"alice@example.org": "alice-password", "bob@example.org": "bob-password"}

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
except ImportError:  # reported by the pg fixture
    psycopg = None  # type: ignore[assignment]


def _unavailable(reason: str, required: bool) -> None:
    if required:
        pytest.fail(reason + " (MAILPLAT_REQUIRE_DAEMONS=1 or MAILPLAT_TEST_POSTGRES is set: not skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def pg() -> str:
    """The DSN of a reachable PostgreSQL, or skip (fail when it is required)."""
    given = os.environ.get("MAILPLAT_TEST_POSTGRES")
    required = os.environ.get("MAILPLAT_REQUIRE_DAEMONS") == "1" or bool(given)
    dsn = given or DEFAULT_DSN
    if psycopg is None:
        _unavailable("psycopg is not installed: pip install 'psycopg[binary]' psycopg-pool", required)
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        _unavailable(
            f"PostgreSQL is not reachable at {dsn!r} ({' '.join(str(e).split())}): install and start it "
            "(apt-get install postgresql) or set MAILPLAT_TEST_POSTGRES to a libpq DSN",
            required,
        )
    return dsn


def sql(dsn: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def terminate(admin_dsn: str, application_name: str) -> int:
    """Kill every server connection of the nodes (they name themselves after the schema)."""
    rows = sql(
        admin_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
        (application_name,),
    )
    return len(rows)


class Schema:
    """A fresh schema; nodes connect with application_name = its name."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.name = "mpt_" + uuid.uuid4().hex[:12]
        self.dsn = make_conninfo(admin_dsn, application_name=self.name)

    def query(self, query: str, params: tuple = ()) -> list[tuple]:
        return sql(self.admin_dsn, query.replace("{s}", self.name), params)

    def drop(self) -> None:
        terminate(self.admin_dsn, self.name)
        sql(self.admin_dsn, f"DROP SCHEMA IF EXISTS {self.name} CASCADE")


@pytest.fixture
def schema(pg: str) -> Iterator[Schema]:
    s = Schema(pg)
    try:
        yield s
    finally:
        s.drop()


_HASHES: dict[str, str] = {}


def add_users(schema: Schema, users: dict[str, str] = PASSWORDS) -> None:
    """Users straight into the table (the schema made first, as a node would)."""
    from mailplat.backends.postgres import Database, migrate
    from mailplat.passwords import hash_password

    migrate(Database(schema.dsn, schema.name))
    for address, password in users.items():
        if password not in _HASHES:
            _HASHES[password] = hash_password(password)
        schema.query("INSERT INTO {s}.users (address, password_hash) VALUES (%s, %s)", (address, _HASHES[password]))


def node_config(dsn: str, schema: str, timeout: float = 5, pool_size: int = 4) -> str:
    """The test config with both backends in PostgreSQL."""
    options = f"dsn = {json.dumps(dsn)}\nschema = \"{schema}\"\npool_size = {pool_size}\ntimeout = {timeout}\n"
    text = BASE_CONFIG
    for old in ('[auth]\nbackend = "passwd-file"\npath = "users.passwd"\n', '[mailbox]\nbackend = "maildir"\npath = "mail"\n'):
        assert old in text
        text = text.replace(old, old.split("\n")[0] + '\nbackend = "postgres"\n' + options)
    return text


# --- clients --------------------------------------------------------------------


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def send(port: int, raw: bytes, to: str = "alice@example.org") -> int:
    """Deliver one message; the first reply code that is not a success (250 when all went well)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        code, _ = client.mail("someone@remote.test")
        assert code == 250
        code, _ = client.rcpt(to)
        if code != 250:
            return code
        code, _ = client.data(raw)
        return code


def pop3(node: MailplatServer, user: str = "alice@example.org", password: str | None = None) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    try:
        client.stls(tls_context())
        client.user(user)
        client.pass_(password or PASSWORDS.get(user, ""))
    except BaseException:
        client.close()
        raise
    return client


def uidl(client: poplib.POP3) -> list[str]:
    return [line.decode().split()[1] for line in client.uidl()[1]]


def retrieve(client: poplib.POP3, number: int) -> bytes:
    return b"\r\n".join(client.retr(number)[1]) + b"\r\n"


# --- options, schema, the admin command -----------------------------------------------


def context(tmp_path: Path, reactor: object = None, admin: bool = True):
    from mailplat.interfaces import BackendContext

    return BackendContext("mail.example.org", ("example.org",), str(tmp_path), str(tmp_path / "var"), reactor=reactor, admin=admin)


def test_options_are_checked(schema: Schema, tmp_path: Path) -> None:
    """Every bad option is a ConfigError naming its key; so is a database that cannot be reached."""
    from mailplat.backends.postgres import build_auth, build_mailbox
    from mailplat.config import ConfigError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    good = {"dsn": schema.dsn, "schema": schema.name}
    cases = [
        ({}, "dsn"),
        ({"dsn": ""}, "dsn"),
        ({"dsn": "host=127.0.0.1 dbname"}, "dsn"),
        ({**good, "pool_size": 0}, "pool_size"),
        ({**good, "pool_size": True}, "pool_size"),
        ({**good, "pool_size": "10"}, "pool_size"),
        ({**good, "timeout": 0}, "timeout"),
        ({**good, "timeout": "10"}, "timeout"),
        ({**good, "schema": "Mail-Plat"}, "schema"),
        ({**good, "schema": "pg_mail"}, "schema"),
        ({**good, "path": "x"}, "path"),
        ({"dsn": f"host=127.0.0.1 port={closed_port} dbname=test user=postgres", "timeout": 2}, "dsn"),
    ]
    for build in (build_auth, build_mailbox):
        for options, key in cases:
            with pytest.raises(ConfigError) as caught:
                build(dict(options), context(tmp_path))
            assert caught.value.key == key, (options, caught.value)
    assert "connection refused" in str(caught.value.problem).lower()
    build_auth({**good, "pool_size": 2, "timeout": 1.5}, context(tmp_path))


def test_schema_is_created_once(schema: Schema, tmp_path: Path) -> None:
    """Building again changes nothing; a schema newer than the code stops the start."""
    from mailplat.backends import postgres

    for _ in range(2):
        postgres._migrated.clear()
        postgres.build_auth({"dsn": schema.dsn, "schema": schema.name}, context(tmp_path))
        postgres.build_mailbox({"dsn": schema.dsn, "schema": schema.name}, context(tmp_path))
    # One row per version, each applied once.
    versions = list(range(1, len(postgres.MIGRATIONS) + 1))
    assert schema.query("SELECT version FROM {s}.schema_version ORDER BY version") == [(v,) for v in versions]
    tables = {row[0] for row in schema.query("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema.name,))}
    assert tables == {"schema_version", "users", "aliases", "messages", "message_chunks", "mail_accounts", "folders"}

    schema.query("INSERT INTO {s}.schema_version (version) VALUES (99)")
    postgres._migrated.clear()
    with pytest.raises(postgres.ConfigError) as caught:
        postgres.build_auth({"dsn": schema.dsn, "schema": schema.name}, context(tmp_path))
    assert caught.value.key == "schema" and "99" in caught.value.problem


MIGRATE = """
import sys
from mailplat.backends.postgres import Database, migrate
db = Database(sys.argv[1], sys.argv[2])
sys.stdin.readline()  # both processes start migrating at once
print(migrate(db))
"""


def test_two_processes_migrate_at_once(schema: Schema, tmp_path: Path) -> None:
    """Nodes starting together: one creates the schema, the other waits for it and finds it done."""
    from mailplat.backends import postgres

    script = tmp_path / "migrate.py"
    script.write_text(MIGRATE)
    processes = [
        subprocess.Popen([sys.executable, str(script), schema.dsn, schema.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    try:
        for p in processes:
            p.stdin.write(b"go\n")
        for p in processes:
            p.stdin.flush()
        results = [p.communicate(timeout=30) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(processes, results):
        assert p.returncode == 0, err.decode()
        assert out.strip() == str(len(postgres.MIGRATIONS)).encode()
    assert schema.query("SELECT version FROM {s}.schema_version ORDER BY version") == [(v,) for v in range(1, len(postgres.MIGRATIONS) + 1)]


def admin(config: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """The admin command, forked from the warm process of tests/commands.py (a fresh interpreter each time cost seconds)."""
    return commands.run(
        [MAILPLAT, "--config", str(config), "user", *args] + (["--password-stdin"] if password is not None else []),
        input=(password + "\n") if password is not None else None, capture_output=True, text=True, timeout=60,
    )


def test_mailplat_user_edits_the_table(schema: Schema, tmp_path: Path) -> None:
    """`mailplat user add|passwd|del|list` work on the database, with argon2id hashes."""
    from mailplat.passwords import verify_password

    config = MailplatServer(tmp_path / "admin", node_config(schema.dsn, schema.name), users={}).config_path
    added = admin(config, "add", "Carol@Example.org", password="first")
    assert added.returncode == 0 and "added carol@example.org" in added.stdout, added.stderr
    again = admin(config, "add", "carol@example.org", password="other")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert admin(config, "add", "dave@example.org", password="dave").returncode == 0
    assert admin(config, "list").stdout.split() == ["carol@example.org", "dave@example.org"]

    changed = admin(config, "passwd", "carol@example.org", password="second")
    assert changed.returncode == 0, changed.stderr
    [(stored, enabled)] = schema.query("SELECT password_hash, enabled FROM {s}.users WHERE address = 'carol@example.org'")
    assert stored.startswith("{ARGON2ID}$argon2id$") and enabled
    assert verify_password(stored, "second") and not verify_password(stored, "first")

    assert admin(config, "del", "dave@example.org").returncode == 0
    missing = admin(config, "del", "dave@example.org")
    assert missing.returncode == 1 and "no such user" in missing.stderr
    assert admin(config, "passwd", "dave@example.org", password="x").returncode == 1
    listed = admin(config, "list")
    assert listed.stdout.split() == ["carol@example.org"], listed.stderr


# --- the backends in a reactor ---------------------------------------------------------

IN_REACTOR = r'''
import os, sys, time, tempfile, tracemalloc
from twisted.internet import defer, task
from mailplat.backends import postgres
from mailplat.interfaces import Account, BackendContext, MaildropInUse, PermanentFailure, SpooledMessage, TemporaryFailure
from mailplat.threads import Threads
import psycopg

DSN, SCHEMA, WORK, ADMIN = sys.argv[1:5]
ALICE = Account("alice@example.org")

def q(query, params=()):
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        cursor = conn.execute(query.replace("{s}", SCHEMA), params)
        return cursor.fetchall() if cursor.description else cursor.rowcount

async def raises(d, kind):
    try:
        await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}")

async def main(reactor):
    threads = Threads(reactor)
    ctx = BackendContext("mail.example.org", ("example.org",), WORK, WORK, reactor, threads=threads)
    options = {"dsn": DSN, "schema": SCHEMA, "pool_size": 3, "timeout": 5}
    auth = postgres.build_auth(dict(options), ctx)
    mailbox = postgres.build_mailbox(dict(options), ctx)
    threads.startService(); auth.startService(); mailbox.startService()
    try:
        # -- auth: enabled users, single-target aliases, passwords --
        auth.add_user("alice@example.org", "alice-pw")
        auth.add_user("bob@example.org", "bob-pw")
        q("UPDATE {s}.users SET enabled = false WHERE address = 'bob@example.org'")
        q("INSERT INTO {s}.aliases VALUES ('info@example.org', 'alice@example.org'), ('old@example.org', 'bob@example.org')")
        assert await auth.lookup("Alice@example.org") == ALICE
        assert await auth.lookup("bob@example.org") is None, "a disabled user has no mailbox"
        assert await auth.lookup("info@example.org") == ALICE
        assert await auth.lookup("old@example.org") is None, "an alias of a disabled user"
        assert await auth.lookup("nobody@example.org") is None
        assert await auth.authenticate("alice@example.org", "alice-pw") == ALICE
        assert await auth.authenticate("alice@example.org", "wrong") is None
        assert await auth.authenticate("bob@example.org", "bob-pw") is None, "a disabled user cannot log in"
        started = time.monotonic()
        assert await auth.authenticate("nobody@example.org", "x") is None
        unknown = time.monotonic() - started
        started = time.monotonic()
        await auth.authenticate("alice@example.org", "x")
        wrong = time.monotonic() - started
        assert unknown > wrong / 4, (unknown, wrong)  # the dummy hash was checked

        # -- delivery: small in memory, large from a file with headers added, a folder --
        content = b"Subject: one\r\n\r\nhi\r\n\r\n"
        small = SpooledMessage("", len(content), "someone@remote.test", content=content)
        path = os.path.join(WORK, "big.eml")
        with open(path, "wb") as f:
            f.write(b"Subject: big\r\n\r\n")
            for i in range(40000):
                f.write(b".dot line %05d of a long message, long enough to span chunks\r\n" % i)
        big = SpooledMessage(path, os.path.getsize(path), "").with_headers(b"X-Added: yes\r\n")
        small_uid = await mailbox.deliver(ALICE, small)
        big_uid = await mailbox.deliver(ALICE, big)
        await mailbox.deliver(ALICE, small, folder="Quarantine")
        await raises(defer.maybeDeferred(mailbox.deliver, ALICE, small, folder="../x"), PermanentFailure)
        chunks = q("SELECT count(*) FROM {s}.message_chunks c JOIN {s}.messages m ON m.id = c.message_id WHERE m.uid = %s", (big_uid,))
        assert chunks == [(3,)], chunks

        huge_path = os.path.join(WORK, "huge.eml")
        with open(huge_path, "wb") as f:
            f.write(b"Subject: huge\r\n\r\n" + (b"x" * 998 + b"\r\n") * (12 << 10))
        huge = SpooledMessage(huge_path, os.path.getsize(huge_path), "")
        tracemalloc.start()
        await mailbox.deliver(Account("carol@example.org"), huge)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < huge.size / 2, f"delivery held {peak} bytes of a {huge.size}-byte message"
        huge_chunks = -(-(huge.size + len(b"Return-Path: <>\r\n")) // postgres.CHUNK_SIZE)

        # -- a maildrop: snapshot, lazy reads, the lock, commit --
        drop = await mailbox.open(ALICE)
        head = b"Return-Path: <someone@remote.test>\r\n"
        assert [(e.uid, e.size) for e in drop.entries()] == [(small_uid, len(head) + len(content)), (big_uid, big.size + len(b"Return-Path: <>\r\n"))]
        source = await drop.read(big_uid)
        with open(path, "rb") as f:
            assert source.read() == b"Return-Path: <>\r\nX-Added: yes\r\n" + f.read()
        assert source._rolled, "a large message is read into a file, not memory"
        source.close()
        await raises(mailbox.open(ALICE), MaildropInUse)
        await drop.commit([small_uid], [small_uid, big_uid], True)
        assert q("SELECT uid, folder, seen, trashed_at IS NOT NULL FROM {s}.messages WHERE address = 'alice@example.org' ORDER BY id") == [
            (small_uid, "Trash", False, True), (big_uid, "", True, False),
            (q("SELECT uid FROM {s}.messages WHERE folder = 'Quarantine'")[0][0], "Quarantine", False, False),
        ]

        # -- expire: seen mail after retrieved_days, trash after trash_days --
        drop = await mailbox.open(ALICE)
        assert [e.uid for e in drop.entries()] == [big_uid]
        await drop.expire(None, 30)
        assert [e.uid for e in drop.entries()] == [big_uid]
        q("UPDATE {s}.messages SET seen_at = now() - interval '2 days', trashed_at = trashed_at - interval '40 days'")
        await drop.expire(1, 30)
        assert drop.entries() == []
        assert q("SELECT folder FROM {s}.messages WHERE address = 'alice@example.org'") == [("Quarantine",)]
        assert q("SELECT count(*) FROM {s}.message_chunks") == [(1 + huge_chunks,)], "chunks go with their message"
        drop.close()
        deadline = time.monotonic() + 10
        while True:  # close releases the lock in a thread
            try:
                drop = await mailbox.open(ALICE)
                break
            except MaildropInUse:
                assert time.monotonic() < deadline, "close did not release the lock"
                await task.deferLater(reactor, 0.05, lambda: None)

        # -- the database kills every connection, the session's too --
        killed = q("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()", (SCHEMA,))
        assert len(killed) >= 2, killed
        await raises(drop.commit([], [], False), TemporaryFailure)
        answers = []
        for _ in range(5):
            try:
                answers.append(await auth.lookup("alice@example.org"))
            except TemporaryFailure:
                answers.append("451")
        assert answers[-1] == ALICE, answers
        await mailbox.deliver(ALICE, small)
        drop = await mailbox.open(ALICE)
        assert len(drop.entries()) == 1
        drop.close()
    finally:
        await auth.stopService()
        await mailbox.stopService()
        await threads.stopService()
    print("OK")

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
'''


def test_backends_in_a_reactor(schema: Schema, tmp_path: Path) -> None:
    """Lookups, passwords, chunked delivery, maildrop lock, commit, expire, a killed connection."""
    script = tmp_path / "in_reactor.py"
    script.write_text(IN_REACTOR)
    done = subprocess.run(
        [sys.executable, str(script), schema.dsn, schema.name, str(tmp_path), schema.admin_dsn], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


# --- IMAP's store on the database --------------------------------------------------------


def test_migration_numbers_mail_delivered_before(schema: Schema) -> None:
    """Rows delivered before the IMAP migration get folders (Trash with its attribute), UIDs in delivery order and \\Seen from seen."""
    from psycopg import sql as psql

    from mailplat.backends import postgres

    with psycopg.connect(schema.admin_dsn, autocommit=True) as conn:
        conn.execute(psql.SQL("CREATE SCHEMA {}").format(psql.Identifier(schema.name)))
        conn.execute(psql.SQL("CREATE TABLE {}.schema_version (version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())").format(
            psql.Identifier(schema.name)))
        for version in (1, 2):
            for statement in postgres.MIGRATIONS[version - 1]:
                conn.execute(psql.SQL(statement).format(schema=psql.Identifier(schema.name)))
            conn.execute(psql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(psql.Identifier(schema.name)), (version,))
    rows = [  # (address, folder, uid, seen), in delivery order
        ("alice@example.org", "", "a1", True), ("alice@example.org", "Trash", "a2", False), ("alice@example.org", "", "a3", False),
        ("alice@example.org", "Quarantine", "a4", False), ("alice@example.org", "", "a5", True), ("bob@example.org", "", "b1", False),
    ]
    for address, folder, uid, seen in rows:
        schema.query("INSERT INTO {s}.messages (address, folder, uid, size, seen, seen_at) VALUES (%s, %s, %s, 10, %s, CASE WHEN %s THEN now() END)",
                     (address, folder, uid, seen, seen))
    assert postgres.migrate(postgres.Database(schema.dsn, schema.name)) == len(postgres.MIGRATIONS)

    folders = schema.query(
        "SELECT address, name, uidnext, highest_modseq, special_use, messages, octets, uidvalidity FROM {s}.folders ORDER BY address, name")
    assert [f[:7] for f in folders] == [
        ("alice@example.org", "", 4, 1, "", 3, 30), ("alice@example.org", "Quarantine", 2, 1, "", 1, 10),
        ("alice@example.org", "Trash", 2, 1, "\\Trash", 1, 10), ("bob@example.org", "", 2, 1, "", 1, 10),
    ]
    alice = [f[7] for f in folders if f[0] == "alice@example.org"]
    assert len(set(alice)) == 3 and all(0 < v < 2**32 for v in alice), alice
    assert schema.query("SELECT address, last_uidvalidity FROM {s}.mail_accounts ORDER BY address") == [
        ("alice@example.org", max(alice)), ("bob@example.org", folders[3][7])]
    messages = schema.query("SELECT uid, imap_uid, flags, modseq FROM {s}.messages ORDER BY id")
    assert messages == [
        ("a1", 1, ["\\Seen"], 1), ("a2", 1, [], 1), ("a3", 2, [], 1), ("a4", 1, [], 1), ("a5", 3, ["\\Seen"], 1), ("b1", 1, [], 1)]


IMAP_STORE = r'''
import os, sys, time
from twisted.internet import defer, task
from mailplat.backends import postgres
from mailplat.interfaces import (Account, BackendContext, FolderExists, NoSuchFolder, PermanentFailure, SpooledMessage,
    FLAG_DELETED, FLAG_FLAGGED, FLAG_SEEN)
from mailplat.threads import Threads
import psycopg

DSN, SCHEMA, WORK, ADMIN = sys.argv[1:5]
ALICE = Account("alice@example.org")

def q(query, params=()):
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        cursor = conn.execute(query.replace("{s}", SCHEMA), params)
        return cursor.fetchall() if cursor.description else cursor.rowcount

async def raises(d, kind):
    try:
        await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}")

def message(subject, body=b"hi\r\n"):
    content = b"Subject: " + subject.encode() + b"\r\n\r\n" + body
    return SpooledMessage("", len(content), "someone@remote.test", content=content)

class Node:
    """A mailbox with pools of its own: another node, as far as the database can tell."""
    def __init__(self, reactor):
        self.threads = Threads(reactor)
        ctx = BackendContext("mail.example.org", ("example.org",), WORK, WORK, reactor, threads=self.threads)
        self.mailbox = postgres.build_mailbox({"dsn": DSN, "schema": SCHEMA, "pool_size": 4, "timeout": 5}, ctx)
        self.threads.startService()
        self.mailbox.startService()
    async def stop(self):
        await self.mailbox.stopService()
        await self.threads.stopService()

async def until(reactor, condition, what, timeout=1.0):
    """Wait for condition() on the reactor; the time it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        await task.deferLater(reactor, 0.005, lambda: None)
    return time.monotonic() - started

async def main(reactor):
    one, two = Node(reactor), Node(reactor)
    a, b = one.mailbox, two.mailbox
    try:
        # -- deliveries at once through both nodes never share a UID --
        await a.deliver(ALICE, message("first"))
        await defer.gatherResults([(a, b)[i % 2].deliver(ALICE, message(f"burst {i}")) for i in range(40)])
        view = await b.view(ALICE, "INBOX")
        assert [m.uid for m in view.messages] == list(range(1, 42)) and view.uidnext == 42, [m.uid for m in view.messages]
        assert len({m.modseq for m in view.messages}) == 41, "each delivery is a change of its own"
        assert view.highest_modseq == max(m.modseq for m in view.messages)
        assert await b.view(ALICE, "INBOX") is view, "unchanged: the cached view, one query"

        # -- a change through one node reaches the other's watcher within 1 s --
        seen_by_two = []
        stop = b.watch(ALICE, "INBOX", lambda: seen_by_two.append(time.monotonic()))
        await until(reactor, lambda: seen_by_two, "the first call once listening")
        seen_by_two.clear()
        stored = await a.store_flags(ALICE, "INBOX", [3], frozenset({FLAG_FLAGGED}), "add")
        latency = await until(reactor, lambda: seen_by_two, "a STORE on node one seen by node two")
        after = await b.view(ALICE, "INBOX")
        assert after.messages[2].flags == frozenset({FLAG_FLAGGED}) and after.messages[2].modseq == stored.changed[0].modseq
        assert after.highest_modseq == stored.changed[0].modseq and after.messages[3] is view.messages[3], "only the change was read"

        # -- the listening connection killed: made again, and watchers called --
        killed = q("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'LISTEN%%'", (SCHEMA,))
        assert len(killed) == 1, killed
        seen_by_two.clear()
        await until(reactor, lambda: seen_by_two, "the call after listening again", timeout=5)
        seen_by_two.clear()
        await a.deliver(ALICE, message("after the reconnection"))
        await until(reactor, lambda: seen_by_two, "a delivery after the reconnection")

        # -- a delivery writing its chunks holds up no STORE (nor the other way round) --
        with psycopg.connect(ADMIN) as delivering:
            delivering.execute(f"INSERT INTO {SCHEMA}.messages (address, folder, uid, size) VALUES ('alice@example.org', '', 'pending', 1)")
            started = time.monotonic()
            await a.store_flags(ALICE, "INBOX", [4], frozenset({"$During"}), "add")
            await b.deliver(ALICE, message("while another is written"))
            assert time.monotonic() - started < 1, "a STORE or delivery waited for another delivery"
            delivering.rollback()
        await a.store_flags(ALICE, "INBOX", [4], frozenset({"$During"}), "remove")

        # -- POP3 and IMAP on one inbox --
        drop = await a.open(ALICE)
        entries = drop.entries()
        assert len(entries) == 43
        (await drop.read(entries[0].uid)).close()
        before = await b.view(ALICE, "INBOX")
        seen_by_two.clear()
        await drop.commit([entries[1].uid, entries[2].uid], [entries[0].uid], False)  # DELE 2, DELE 3, RETR 1, QUIT
        await until(reactor, lambda: seen_by_two, "POP3's QUIT seen by an IMAP watcher")
        now = await b.view(ALICE, "INBOX")
        assert [m.uid for m in now.messages][:3] == [1, 4, 5], "DELE+QUIT is an expunge"
        assert now.messages[0].flags == frozenset({FLAG_SEEN}) and now.messages[0].modseq > before.highest_modseq, "RETR is \\Seen, a new modseq"
        assert q("SELECT seen, seen_at IS NOT NULL FROM {s}.messages WHERE imap_uid = 1 AND folder = ''") == [(True, True)]
        assert now.highest_modseq > before.highest_modseq
        await a.store_flags(ALICE, "INBOX", [4, 5], frozenset({FLAG_DELETED}), "add")
        assert await a.expunge(ALICE, "INBOX", [4, 5, 6]) == [4, 5]
        drop = await a.open(ALICE)
        assert len(drop.entries()) == 39 and entries[3].uid not in [e.uid for e in drop.entries()], "IMAP's expunge is gone for POP3"
        await drop.commit([drop.entries()[0].uid], [], True)  # POP3 DELE to Trash: a move IMAP sees
        await b.folders(ALICE)
        trash = await b.view(ALICE, "Trash")
        assert [m.uid for m in trash.messages] == [1] and trash.messages[0].flags == frozenset({FLAG_SEEN}), trash

        # -- copy: the chunks copied by the database; move: new UIDs, the same rows --
        big = os.path.join(WORK, "big.eml")
        with open(big, "wb") as f:
            f.write(b"Subject: big\r\n\r\n" + b"".join(b"line %07d of a message of several chunks\r\n" % i for i in range(60000)))
        uidvalidity, uid = await a.append(ALICE, "Archive", SpooledMessage(big, os.path.getsize(big), ""), frozenset({"$Big"}), 1.5e9)
        target, pairs = await a.copy(ALICE, "Archive", [uid], "Trash")
        assert target == trash.uidvalidity and pairs == [(uid, 2)], pairs
        assert q("SELECT count(*) FROM {s}.message_chunks c JOIN {s}.messages m ON m.id = c.message_id WHERE m.folder = 'Trash' AND m.imap_uid = 2") == [(3,)]
        copied = await b.read(ALICE, "Trash", 2)
        with open(big, "rb") as f:
            assert copied.read() == f.read()
        copied.close()
        trash = await b.view(ALICE, "Trash")
        assert (trash.messages[1].flags, trash.messages[1].internal_date) == (frozenset({"$Big"}), 1.5e9)
        ids = q("SELECT id FROM {s}.messages WHERE folder = 'Archive'")
        target, pairs = await b.move(ALICE, "Archive", [uid], "INBOX")
        assert pairs == [(uid, 44)] and q("SELECT id, imap_uid FROM {s}.messages WHERE folder = '' AND imap_uid = 44") == [(ids[0][0], 44)]
        await raises(b.read(ALICE, "Archive", uid), PermanentFailure)
        assert (await b.usage(ALICE))[1] == 41

        # -- UIDVALIDITY: the same on every node and after a restart; new for a folder made again --
        await a.create_folder(ALICE, "Projects/2026")
        first = await a.view(ALICE, "Projects/2026")
        assert (await b.view(ALICE, "Projects/2026")).uidvalidity == first.uidvalidity
        await b.delete_folder(ALICE, "Projects/2026")
        await b.create_folder(ALICE, "Projects/2026")
        again = await a.view(ALICE, "Projects/2026")
        assert again.uidvalidity > first.uidvalidity, "made again within the second: a new UIDVALIDITY"
        await a.rename_folder(ALICE, "Projects", "Work")
        await raises(a.view(ALICE, "Projects/2026"), NoSuchFolder)
        assert (await b.view(ALICE, "Work/2026")).uidvalidity == again.uidvalidity, "a rename keeps UIDVALIDITY"
        inbox = await a.view(ALICE, "INBOX")
        await one.stop()
        one = Node(reactor)
        a = one.mailbox
        restarted = await a.view(ALICE, "INBOX")
        assert (restarted.uidvalidity, restarted.uidnext, restarted.messages) == (inbox.uidvalidity, inbox.uidnext, inbox.messages)

        # -- renaming INBOX: its messages move, it stays with its UIDVALIDITY --
        await a.rename_folder(ALICE, "INBOX", "Old")
        empty, old = await a.view(ALICE, "INBOX"), await a.view(ALICE, "Old")
        assert empty.messages == () and empty.uidvalidity == inbox.uidvalidity and empty.uidnext == inbox.uidnext
        assert [m.uid for m in old.messages] == list(range(1, len(inbox.messages) + 1))
        await a.deliver(ALICE, message("next"))
        assert [m.uid for m in (await b.view(ALICE, "INBOX")).messages] == [inbox.uidnext]
        stop()
        counted = "SELECT f.address, f.name, f.messages, f.octets FROM {s}.folders f ORDER BY 1, 2"
        summed = ("SELECT f.address, f.name, count(m.id), coalesce(sum(m.size), 0)::bigint FROM {s}.folders f"
                  " LEFT JOIN {s}.messages m ON m.address = f.address AND m.folder = f.name GROUP BY 1, 2 ORDER BY 1, 2")
        assert q(counted) == q(summed), "each folder's counts follow its messages"
        assert await b.usage(ALICE) == tuple(int(x) for x in q("SELECT sum(size), count(*) FROM {s}.messages WHERE address = 'alice@example.org'")[0])
    finally:
        await one.stop()
        await two.stop()
    print(f"OK notify latency {latency * 1000:.0f} ms")

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
'''


def test_imap_store_across_nodes(schema: Schema, tmp_path: Path) -> None:
    """Two nodes on one database: UIDs never shared, a change pushed within 1 s (after a reconnection too), POP3 and IMAP agree."""
    script = tmp_path / "imap_store.py"
    script.write_text(IMAP_STORE)
    done = subprocess.run(
        [sys.executable, str(script), schema.dsn, schema.name, str(tmp_path), schema.admin_dsn], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def imaps(node: MailplatServer, user: str = "alice@example.org") -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", node.ports["imaps"], ssl_context=tls_context(), timeout=20)
    client.login(user, PASSWORDS[user])
    return client


def test_imap_across_two_nodes_with_pop3(schema: Schema, make_server) -> None:
    """An IMAP session in IDLE on one node hears a delivery and a flag made through the other within a second, and POP3's DELE+QUIT there as an EXPUNGE."""
    add_users(schema)
    config = node_config(schema.dsn, schema.name)
    if "imaps =" not in config:
        config = merge_toml(config, '[listen]\nimaps = "tcp:0:interface=127.0.0.1"\n')
    one = make_server(config=config, name="one")
    two = make_server(config=config, name="two")
    assert send(one.port, message("before")) == 250
    laptop = imaps(two)
    try:
        assert laptop.select("INBOX")[1] == [b"1"]
        tag = laptop._new_tag().decode()
        laptop.send(f"{tag} IDLE\r\n".encode())
        assert laptop.readline().startswith(b"+ ")
        assert send(one.port, message("across")) == 250
        delivered = time.monotonic()
        laptop.sock.settimeout(5)
        assert laptop.readline() == b"* 2 EXISTS\r\n"
        assert time.monotonic() - delivered < 1.0, "EXISTS from the other node took more than a second"

        phone = imaps(one)
        phone.select("INBOX")
        phone.store("2", "+FLAGS", "(\\Flagged)")
        stored = time.monotonic()
        phone.logout()
        pushed = laptop.readline()
        assert pushed.startswith(b"* 2 FETCH (") and b"\\Flagged" in pushed, pushed
        assert time.monotonic() - stored < 1.0
        laptop.send(b"DONE\r\n")
        assert laptop.readline().startswith(f"{tag} OK".encode())

        client = pop3(one)
        try:
            assert client.stat()[0] == 2
            assert b"Subject: before" in retrieve(client, 1)
            client.dele(1)
            client.quit()
        finally:
            client.close()
        laptop.noop()
        assert laptop.untagged_responses.pop("EXPUNGE", []) == [b"1"], "POP3's DELE+QUIT is an expunge"
        typ, data = laptop.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"\\Flagged" in data[0][0] and b"Subject: across" in data[0][1], data

        # IMAP's \Deleted and EXPUNGE on one node: gone for POP3 on the other.
        laptop.store("1", "+FLAGS", "(\\Deleted)")
        laptop.expunge()
        client = pop3(one)
        try:
            assert client.stat()[0] == 0
            client.quit()
        finally:
            client.close()
    finally:
        laptop.logout()


CHANGES_AT_ONCE = r'''
import os, sys, time, random
from twisted.internet import defer, task
from mailplat.backends import postgres
from mailplat.interfaces import Account, BackendContext, SpooledMessage, FLAG_DELETED, FLAG_SEEN, TemporaryFailure, MaildropInUse, PermanentFailure
from mailplat.threads import Threads
import psycopg

DSN, SCHEMA, WORK, ADMIN = sys.argv[1:5]
ALICE = Account("alice@example.org")
def q(query, params=()):
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        cursor = conn.execute(query.replace("{s}", SCHEMA), params)
        return cursor.fetchall() if cursor.description else cursor.rowcount
def message(subject):
    content = b"Subject: " + subject.encode() + b"\r\n\r\n" + b"x" * random.randint(10, 3000) + b"\r\n"
    return SpooledMessage("", len(content), "", content=content)
class Node:
    """A mailbox with pools of its own: another node, as far as the database can tell."""
    def __init__(self, reactor):
        self.threads = Threads(reactor)
        ctx = BackendContext("mail.example.org", ("example.org",), WORK, WORK, reactor, threads=self.threads)
        self.mailbox = postgres.build_mailbox({"dsn": DSN, "schema": SCHEMA, "pool_size": 4, "timeout": 10}, ctx)
        self.threads.startService(); self.mailbox.startService()
    async def stop(self):
        await self.mailbox.stopService(); await self.threads.stopService()

async def worker(reactor, m, n, until, errors, counts):
    """One session making changes at random until ``until`` (seeded: a failure replays)."""
    rnd = random.Random(n)
    while time.monotonic() < until:
        op = rnd.choice(["deliver", "deliver", "store", "move", "copy", "expunge", "pop3", "view", "rename"])
        try:
            if op == "rename":
                try:
                    await m.rename_folder(ALICE, "Quarantine", "Q2")
                    await m.rename_folder(ALICE, "Q2", "Quarantine")
                except PermanentFailure:
                    pass
            elif op == "deliver":
                await m.deliver(ALICE, message(f"w{n}"), folder=rnd.choice(["", "Quarantine"]))
            else:
                folder = rnd.choice(["INBOX", "Archive", "Trash"])
                v = await m.view(ALICE, folder)
                uids = [x.uid for x in v.messages]
                pick = rnd.sample(uids, min(len(uids), rnd.randint(1, 5))) if uids else [1]
                if op == "store":
                    await m.store_flags(ALICE, folder, pick, frozenset({rnd.choice([FLAG_SEEN, FLAG_DELETED, "$A"])}), rnd.choice(["add", "remove"]),
                                        v.highest_modseq if rnd.random() < 0.3 else None)
                elif op == "move":
                    await m.move(ALICE, folder, pick, rnd.choice(["INBOX", "Archive", "Trash"]))
                elif op == "copy":
                    await m.copy(ALICE, folder, pick, rnd.choice(["INBOX", "Archive"]))
                elif op == "expunge":
                    await m.expunge(ALICE, folder, pick)
                elif op == "pop3":
                    try:
                        drop = await m.open(ALICE)
                    except MaildropInUse:
                        continue
                    await drop.expire(None, 30)
                    e = drop.entries()
                    dele = [x.uid for x in rnd.sample(e, min(len(e), 2))]
                    await drop.commit(dele, [x.uid for x in e[:3]], rnd.random() < 0.5)
            counts[op] = counts.get(op, 0) + 1
        except TemporaryFailure as e:
            errors.append((op, e.text))

async def main(reactor):
    a, b = Node(reactor), Node(reactor)
    try:
        await a.mailbox.folders(ALICE)
        for i in range(20):
            await a.mailbox.deliver(ALICE, message("seed"))
        errors, counts = [], {}
        until = time.monotonic() + 2.0
        await defer.gatherResults([defer.Deferred.fromCoroutine(worker(reactor, (a, b)[n % 2].mailbox, n, until, errors, counts)) for n in range(8)])
        # A delivery into the folder being renamed away each time it made it
        # again is told to come back (451), never refused; nothing else fails.
        assert [e for e in errors if not (e[0] == "deliver" and "being changed" in e[1])] == [], errors
        assert all(counts.get(op) for op in ("deliver", "store", "move", "copy", "expunge", "rename", "pop3")), counts
        counted = "SELECT f.address, f.name, f.messages, f.octets FROM {s}.folders f ORDER BY 1, 2"
        summed = ("SELECT f.address, f.name, count(m.id), coalesce(sum(m.size), 0)::bigint FROM {s}.folders f"
                  " LEFT JOIN {s}.messages m ON m.address = f.address AND m.folder = f.name GROUP BY 1, 2 ORDER BY 1, 2")
        assert q(counted) == q(summed), (q(counted), q(summed))
        assert q("SELECT count(*) FROM {s}.messages m JOIN {s}.folders f ON f.address = m.address AND f.name = m.folder WHERE m.imap_uid >= f.uidnext OR m.imap_uid IS NULL OR m.modseq > f.highest_modseq") == [(0,)]
        for folder in ("INBOX", "Archive", "Trash"):
            v1 = await a.mailbox.view(ALICE, folder)
            b.mailbox._views.clear()
            v2 = await b.mailbox.view(ALICE, folder)
            assert v1 == v2, folder
        print("OK")
    finally:
        await a.stop(); await b.stop()

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
'''


def test_every_change_at_once_from_two_nodes(schema: Schema, tmp_path: Path) -> None:
    """Eight sessions on two nodes deliver, STORE, move, copy, expunge, rename and POP3 at once for two seconds: no deadlock or error, every UID and modseq within its folder's, the counts agree with the rows, and a cached view equals a fresh one."""
    script = tmp_path / "changes_at_once.py"
    script.write_text(CHANGES_AT_ONCE)
    done = subprocess.run(
        [sys.executable, str(script), schema.dsn, schema.name, str(tmp_path), schema.admin_dsn], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


# --- over the wire: real nodes ---------------------------------------------------------


def test_smtp_in_pop3_out_uidl_survives_restart(schema: Schema, make_server) -> None:
    add_users(schema)
    schema.query("UPDATE {s}.users SET enabled = false WHERE address = 'bob@example.org'")
    node = make_server(config=node_config(schema.dsn, schema.name))
    body = "".join(f".line {i:05d} starting with a dot\r\n" for i in range(40000))  # 1.4 MB
    sent = [message("first"), message("second", body=body), message("third", body="..\r\n.\r\nend\r\n")]
    for raw in sent:
        assert send(node.port, raw) == 250
    assert send(node.port, message("nobody"), to="nobody@example.org") == 550
    assert send(node.port, message("disabled"), to="bob@example.org") == 550
    assert send(node.port, message("alias"), to="postmaster@example.org") == 250  # mailplat's own [aliases]

    client = pop3(node)
    try:
        assert client.stat()[0] == 4
        sizes = dict(schema.query("SELECT uid, size FROM {s}.messages"))
        uids = uidl(client)
        assert [int(line.split()[1]) for line in client.list()[1]] == [sizes[u] for u in uids]
        for number, raw in enumerate(sent, 1):
            got = retrieve(client, number)
            assert got.startswith(b"Return-Path: <someone@remote.test>\r\n") and got.endswith(raw)
            assert len(got) == sizes[uids[number - 1]]
        client.dele(4)
        client.quit()
    finally:
        client.close()

    node.stop()
    node.start()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop3(node, password="wrong")
    client = pop3(node)
    try:
        assert uidl(client) == uids[:3], "the same UIDs after a restart, the deleted one gone"
        client.quit()
    finally:
        client.close()


def test_two_nodes_share_users_and_mail(schema: Schema, make_server) -> None:
    add_users(schema)
    config = node_config(schema.dsn, schema.name)
    one = make_server(config=config, name="one")
    two = make_server(config=config, name="two")

    # Mail taken in by one node is read from the other.
    assert send(one.port, message("across")) == 250
    client = pop3(two)
    assert b"Subject: across" in retrieve(client, 1)

    # While that session lasts, the maildrop is locked on every node.
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3(one)
    client.dele(1)
    client.quit()
    client.close()

    # A user added with the admin command works on both nodes at once.
    assert admin(one.config_path, "add", "carol@example.org", password="carol-pw").returncode == 0
    assert send(two.port, message("hi carol"), to="carol@example.org") == 250
    client = pop3(one, "carol@example.org", "carol-pw")
    assert b"Subject: hi carol" in retrieve(client, 1)
    client.quit()
    client.close()

    # Deliveries at once through both nodes lose nothing.
    subjects = [f"burst-{i}" for i in range(50)]
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda i: send((one, two)[i % 2].port, message(subjects[i])), range(50)))
    assert codes == [250] * 50
    client = pop3(one)
    try:
        assert client.stat()[0] == 50
        got = set()
        for number in range(1, 51):
            header = b"\n".join(client.top(number, 0)[1])
            got.add(header.split(b"Subject: ")[1].split(b"\n")[0].decode())
        assert got == set(subjects)
        assert len(set(uidl(client))) == 50

        # A node that dies holding the lock frees it: the lock is its connection's.
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            pop3(two)
        one.process.send_signal(signal.SIGKILL)
        one.process.wait(10)
    finally:
        client.sock.close()

    def logs_in() -> bool:
        try:
            pop3(two).quit()
            return True
        except poplib.error_proto as e:
            assert b"[IN-USE]" in e.args[0]
            return False

    wait_for(logs_in, 15, "the dead node's lock to go")


class Proxy:
    """A TCP relay to PostgreSQL that the test can cut: a database that goes away and comes back."""

    def __init__(self, admin_dsn: str) -> None:
        params = conninfo_to_dict(admin_dsn)
        host, port = params.get("host") or "127.0.0.1", int(params.get("port") or 5432)
        self.upstream = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else (socket.AF_INET, (host, port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def dsn(self, base: str) -> str:
        return make_conninfo(base, host="127.0.0.1", port=str(self.port))

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(self.upstream[0])
            try:
                server.connect(self.upstream[1])
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [])
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        """The database is gone: open connections reset, new ones refused."""
        self.running = False
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()


@pytest.fixture
def proxy(pg: str) -> Iterator[Proxy]:
    p = Proxy(pg)
    yield p
    p.cut()


def test_outage_gives_451_and_service_resumes(schema: Schema, proxy: Proxy, make_server) -> None:
    """Killed connections and a database that is away: 451 or -ERR [SYS/TEMP], never a crash; no restart needed."""
    add_users(schema)
    node = make_server(config=node_config(proxy.dsn(schema.dsn), schema.name, timeout=2))
    assert send(node.port, message("before")) == 250
    session = pop3(node)

    # Every connection killed by the server: the next operations work again,
    # or answer 451 while the pool replaces its connections.
    assert terminate(schema.admin_dsn, schema.name) >= 2
    codes = [send(node.port, message(f"after-kill-{i}")) for i in range(4)]
    assert set(codes) <= {250, 451} and codes[-1] == 250, codes
    # The session's lock went with its connection: its QUIT cannot commit.
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        session.quit()
    session.close()

    # The database away altogether.
    proxy.cut()
    assert send(node.port, message("during")) == 451
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        pop3(node)
    assert node.process.poll() is None

    proxy.restore()
    wait_for(lambda: send(node.port, message("after")) == 250, 30, "delivery to work again")
    client = pop3(node)
    try:
        subjects = [b"\n".join(client.top(n, 0)[1]).split(b"Subject: ")[1].split(b"\n")[0] for n in range(1, client.stat()[0] + 1)]
        assert subjects[0] == b"before" and subjects[-1] == b"after"
        assert b"during" not in subjects
        client.quit()
    finally:
        client.close()
    assert node.process.poll() is None
