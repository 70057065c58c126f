"""The ``postgres`` auth and mailbox backends: users and mail in PostgreSQL,
so that several mailplat nodes serve the same accounts.

Configuration (the same keys in ``[auth]`` and ``[mailbox]``)::

    [auth]
    backend = "postgres"
    dsn = "host=db.example.org dbname=mail user=mailplat"
    pool_size = 10        # connections (and threads) per process
    timeout = 10          # seconds for one query, a connection, a wait for the pool
    schema = "mailplat"   # the tables live in this schema, created when missing

How the database is reached.  psycopg 3's blocking API runs in a Twisted
thread pool of ``pool_size`` threads, each taking a connection from a
``psycopg_pool.ConnectionPool`` of the same size.  mailplat runs Twisted's
default reactor, so psycopg's asyncio API would force the asyncio reactor on
the whole server; ``twisted.enterprise.adbapi`` finds a dead connection only
by failing a query on it and has no reconnection with back-off.
psycopg_pool checks each connection as it is handed out and replaces dead
ones in the background, so after a database restart the next operations
succeed (or answer 451 while it is still down) and no one restarts mailplat.
Every database failure becomes a :class:`TemporaryFailure`: SMTP answers
``451 4.3.0``, POP3 ``-ERR [SYS/TEMP]``.  ``timeout`` bounds each statement
(``statement_timeout``), each connection attempt and the wait for a pooled
connection, counted from when the operation was asked for.

The schema is created and migrated when a backend is built (by twistd
before it listens, and by `mailplat user` / `check-config`), in one
transaction holding ``pg_advisory_xact_lock``, so nodes starting at once
take turns; ``schema_version`` records what was applied.  A database that
cannot be reached then stops the start with an error naming ``dsn``: a
wrong DSN is found at once, not by the first message.

Mail: a ``messages`` row (address, folder, uid, size, received, seen) and
its content in ``message_chunks`` rows of 1 MiB, written one by one while
the spooled message is read, so that neither delivering nor reading holds a
whole message in memory.  A delivery is committed before ``deliver``
returns, i.e. before the client is told 250.

POP3 sessions: ``open`` takes a session-level
``pg_try_advisory_lock(hashtext(schema), hashtext(address))`` on a
connection of its own, kept for the session and used for its queries; it is
released when that connection closes (at commit or close), and by the
server itself if the node dies.  The schema in the key keeps two
installations sharing a database apart; two addresses whose hashes collide
would only wait for each other.  Each open POP3 session holds one database
connection: size PostgreSQL's ``max_connections`` accordingly.
``read`` returns a Deferred firing with the message copied into a
``SpooledTemporaryFile`` (memory up to 1 MiB, disk beyond) by a thread, as
the POP3 server then reads it on the reactor thread.
"""

from __future__ import annotations

import itertools
import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailplat.addresses import AddressError, validate_address
from mailplat.config import ConfigError
from mailplat.interfaces import (
    Account,
    BackendContext,
    IAuthBackend,
    IMailboxBackend,
    IMaildrop,
    IUserManager,
    MaildropEntry,
    MaildropInUse,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)
from mailplat.options import OptionReader, toml_value
from mailplat.passwords import hash_password, verify_password

try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool
except ImportError:  # reported by build(), not at plugin discovery
    psycopg = None  # type: ignore[assignment]

__all__ = ["Database", "PostgresAuth", "PostgresMailbox", "PostgresMaildrop", "build_auth", "build_mailbox", "migrate"]

log = Logger()
T = TypeVar("T")

CHUNK_SIZE = 1 << 20
# What a POP3 read keeps in memory before the copy spills to a disk file.
READ_MEMORY = 1 << 20
TRASH = "Trash"
UNAVAILABLE = "the mail database is unavailable; try again later"

# One entry per schema version, each a list of statements; {schema} is the
# quoted schema name.  Append new versions; never edit an applied one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE {schema}.users (
            address text PRIMARY KEY,
            password_hash text NOT NULL,
            enabled boolean NOT NULL DEFAULT true,
            created timestamptz NOT NULL DEFAULT now()
        )""",
        # One target per alias: a lookup answers with one account.  Lists
        # that fan out to several mailboxes belong in mailplat's [aliases].
        """CREATE TABLE {schema}.aliases (
            source text PRIMARY KEY,
            target text NOT NULL
        )""",
        """CREATE TABLE {schema}.messages (
            id bigserial PRIMARY KEY,
            address text NOT NULL,
            folder text NOT NULL DEFAULT '',
            uid text NOT NULL,
            size bigint NOT NULL,
            received timestamptz NOT NULL DEFAULT now(),
            seen boolean NOT NULL DEFAULT false,
            seen_at timestamptz,
            trashed_at timestamptz,
            UNIQUE (address, uid)
        )""",
        "CREATE INDEX messages_by_folder ON {schema}.messages (address, folder, id)",
        """CREATE TABLE {schema}.message_chunks (
            message_id bigint NOT NULL REFERENCES {schema}.messages (id) ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (message_id, seq)
        )""",
    ),
    (
        # Out of line and not compressed: pglz cost 25 ms of database CPU
        # per MiB stored (0.3 ms per 100 KB chunk uncompressed), and mail is
        # mostly base64 of already compressed attachments.
        "ALTER TABLE {schema}.message_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
    ),
)

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Database:
    """Where and how to connect: the admin's DSN plus our per-connection settings."""

    def __init__(self, dsn: str, schema: str = "mailplat", pool_size: int = 10, timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.timeout = timeout
        self.conninfo = self._conninfo()

    def _conninfo(self) -> str:
        """The DSN with our defaults underneath: the admin's own values win."""
        given = conninfo_to_dict(self.dsn)
        ours = f"-c search_path={self.schema} -c statement_timeout={int(self.timeout * 1000)}"
        params: dict[str, Any] = {
            "application_name": "mailplat",
            "connect_timeout": max(2, int(self.timeout + 0.999)),
            # A node cut off from the database notices within ``timeout``
            # instead of waiting on TCP for many minutes.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self.timeout * 1000),
        }
        params.update({k: v for k, v in given.items() if k != "options"})
        # -c settings: later ones win, so the admin's options come last.
        params["options"] = f"{ours} {given['options']}" if given.get("options") else ours
        return make_conninfo("", **params)

    def connect(self, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A connection of its own (not pooled), for the admin command and POP3 locks."""
        return psycopg.connect(self.conninfo, autocommit=autocommit)

    def describe(self) -> str:
        """The DSN without its password, for messages."""
        shown = {k: v for k, v in conninfo_to_dict(self.dsn).items() if k != "password"}
        return make_conninfo("", **shown)


# --- schema -----------------------------------------------------------------

# (conninfo, schema) already migrated by this process: auth and mailbox
# usually share one database.
_migrated: set[tuple[str, str]] = set()


class SchemaTooNew(Exception):
    """The database was migrated by a newer mailplat than this one."""


def migrate(db: Database) -> int:
    """Create or upgrade the schema; return its version.  Idempotent.

    One transaction under an advisory lock: two nodes starting at once take
    turns, and the second finds the work done.
    """
    schema = sql.Identifier(db.schema)
    with db.connect() as conn:  # commits when the block ends without error
        # A later migration may rewrite a big table: no statement timeout
        # here, but a bound on waiting for another node's migration.
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{max(60, int(db.timeout))}s")))
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s)::bigint)", (f"mailplat schema {db.schema}",))
        # Checked before creating: CREATE SCHEMA IF NOT EXISTS needs the
        # CREATE privilege even when the schema is there.
        if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (db.schema,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version (version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())"
            ).format(schema)
        )
        row = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(schema)).fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise SchemaTooNew(f"schema {db.schema} is at version {current}; this mailplat knows up to {len(MIGRATIONS)}")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(sql.SQL(statement).format(schema=schema))
            conn.execute(sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(schema), (version,))
            log.info("postgres schema {schema} migrated to version {version}", schema=db.schema, version=version)
    return len(MIGRATIONS)


# --- the shared machinery: a pool of connections worked by a pool of threads --


def _unavailable(error: BaseException, reactor: Any) -> TemporaryFailure:
    """What a client is told of a database error (the log, written from the
    reactor thread, gets the details)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    reactor.callFromThread(log.warn, "postgres: {error}", error=text)
    return TemporaryFailure(UNAVAILABLE)


class _PoolLog(logging.Handler):
    """psycopg_pool's warnings (a failed reconnection, say) in mailplat's log,
    one line each, rather than raw on stderr.  The pool logs from its own
    threads: the line is handed to the reactor thread."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(logging.WARNING)
        self.reactor = reactor

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(self.format(record).split())
        self.reactor.callFromThread(log.error if record.levelno >= logging.ERROR else log.warn, "postgres pool: {text}", text=text)


def _route_pool_log(reactor: Any) -> None:
    pool_log = logging.getLogger("psycopg.pool")
    if not any(isinstance(h, _PoolLog) for h in pool_log.handlers):
        pool_log.addHandler(_PoolLog(reactor))
        pool_log.propagate = False


class _Pooled(service.Service):
    """A connection pool that exists while the server runs (IService: mailplat
    starts it before the listeners and stops it after them)."""

    def __init__(self, db: Database, reactor: Any, threads: Any, kind: str) -> None:
        self.db = db
        self.reactor = reactor
        # The service's pools: one of our own, a thread per database
        # connection, and the shared blocking one for POP3 sessions.
        self.threads = threads
        self.kind = kind
        self._pool: Any = None
        self._threads: ThreadPool | None = None

    def startService(self) -> None:
        super().startService()
        _route_pool_log(self.reactor)
        self._threads = self.threads.pool(f"postgres-{self.kind}", self.db.pool_size)
        self._pool = ConnectionPool(
            self.db.conninfo,
            min_size=1,
            max_size=self.db.pool_size,
            timeout=self.db.timeout,
            # A connection the server closed while it sat in the pool (a
            # restart, pg_terminate_backend) is found and replaced here,
            # before anyone's query fails on it.
            check=ConnectionPool.check_connection,
            name=f"mailplat-{self.kind}",
            open=False,
        )
        # Connecting happens in the pool's own threads: the start does not
        # wait for the database, and fails nothing if it is down.
        self._pool.open(wait=False)

    def stopService(self) -> Any:
        super().stopService()
        pool, threads = self._pool, self._threads
        self._pool = self._threads = None
        if threads is None:
            return None
        # The threads themselves are stopped by the service, after us.
        return deferToThreadPool(self.reactor, threads, pool.close, self.db.timeout)

    def _in_thread(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``function(*args)`` in our threads; a database error becomes a TemporaryFailure."""
        if self._threads is None:
            raise TemporaryFailure("the mail database is not open; try again later")
        asked = time.monotonic()

        def guarded() -> T:
            # Waiting in the thread queue counts against the timeout: during
            # an outage, clients get 451 after ``timeout``, not after a queue.
            self._deadline.value = asked + self.db.timeout
            try:
                return function(*args)
            except psycopg.Error as e:
                raise _unavailable(e, self.reactor)

        return deferToThreadPool(self.reactor, self._threads, guarded)

    _deadline = threading.local()

    def _connection(self) -> Any:
        """A pooled connection (a context manager: commits at its end, or rolls back)."""
        left = self._deadline.value - time.monotonic()
        pool = self._pool
        if left <= 0 or pool is None:  # out of time, or the server is stopping
            raise TemporaryFailure(UNAVAILABLE)
        return pool.connection(timeout=left)


# --- auth ---------------------------------------------------------------------


@implementer(IAuthBackend, IUserManager)
class PostgresAuth(_Pooled):
    """Users in the ``users`` table; single-target aliases in ``aliases``."""

    def __init__(self, db: Database, reactor: Any, threads: Any) -> None:
        super().__init__(db, reactor, threads, "auth")

    def lookup(self, address: str) -> Deferred[Account | None]:
        """The enabled user ``address``, or the enabled user an alias row names."""
        address = address.lower()

        def find() -> Account | None:
            with self._connection() as conn:
                row = conn.execute(
                    "SELECT address, 0 AS how FROM users WHERE address = %(a)s AND enabled"
                    " UNION ALL"
                    " SELECT u.address, 1 FROM aliases a JOIN users u ON u.address = a.target"
                    " WHERE a.source = %(a)s AND u.enabled"
                    " ORDER BY how LIMIT 1",
                    {"a": address},
                ).fetchone()
            return Account(row[0]) if row else None

        return self._in_thread(find)

    def authenticate(self, address: str, password: str) -> Deferred[Account | None]:
        """The account when the password is right; None, after as long, when not."""
        address = address.lower()

        def check() -> Account | None:
            with self._connection() as conn:
                row = conn.execute("SELECT password_hash FROM users WHERE address = %s AND enabled", (address,)).fetchone()
            # The connection is back in the pool before the slow part.
            stored = row[0] if row else None
            # stored None (unknown or disabled): a dummy hash is checked, so
            # that the answer takes as long as for a wrong password.  An
            # unusable hash is logged there and matches nothing.
            ok = verify_password(stored, password, account=address)
            return Account(address) if ok and stored is not None else None

        return self._in_thread(check)

    # -- IUserManager: called by `mailplat user`, with no reactor: blocking --

    def _admin(self, work: Callable[[Any], T]) -> T:
        try:
            with self.db.connect() as conn:
                return work(conn)
        except psycopg.Error as e:
            raise ConfigError("dsn", f"the database failed: {e}".strip(), "check that PostgreSQL is running and that dsn is right")

    def add_user(self, address: str, password: str) -> None:
        address = validate_address(address.strip().lower())
        stored = hash_password(password)
        added = self._admin(
            lambda conn: conn.execute(
                "INSERT INTO users (address, password_hash) VALUES (%s, %s) ON CONFLICT (address) DO NOTHING", (address, stored)
            ).rowcount
        )
        if not added:
            raise ValueError(f"{address} already exists; use `user passwd` to change its password")

    def set_password(self, address: str, password: str) -> None:
        address = address.strip().lower()
        stored = hash_password(password)
        if not self._admin(lambda conn: conn.execute("UPDATE users SET password_hash = %s WHERE address = %s", (stored, address)).rowcount):
            raise KeyError(address)

    def delete_user(self, address: str) -> None:
        """Remove the user; its mail stays in the database, as maildir's stays on disk."""
        address = address.strip().lower()
        if not self._admin(lambda conn: conn.execute("DELETE FROM users WHERE address = %s", (address,)).rowcount):
            raise KeyError(address)

    def list_users(self) -> list[str]:
        return sorted(row[0] for row in self._admin(lambda conn: conn.execute("SELECT address FROM users").fetchall()))


# --- mailbox ------------------------------------------------------------------


def _mailbox_address(account: Account) -> str:
    try:
        return validate_address(account.address.lower())
    except AddressError as e:
        raise PermanentFailure(f"invalid mailbox name: {e}")


def _chunks(head: bytes, source: IO[bytes]) -> Iterator[bytes]:
    """``head`` then ``source``, in pieces of CHUNK_SIZE (the last shorter)."""
    buffer = bytearray(head)
    while True:
        data = source.read(CHUNK_SIZE)
        if not data:
            break
        buffer += data
        while len(buffer) >= CHUNK_SIZE:
            yield bytes(buffer[:CHUNK_SIZE])
            del buffer[:CHUNK_SIZE]
    if buffer:
        yield bytes(buffer)


@implementer(IMailboxBackend)
class PostgresMailbox(_Pooled):
    """Messages in ``messages`` and ``message_chunks``, one folder column."""

    def __init__(self, db: Database, reactor: Any, threads: Any) -> None:
        super().__init__(db, reactor, threads, "mailbox")

    def deliver(self, account: Account, message: SpooledMessage, folder: str = "") -> Deferred[str]:  # type: ignore[override]
        """Store the message; committed when the Deferred fires.  Returns its uid
        (more than IMailboxBackend asks: the tests read it)."""
        address = _mailbox_address(account)
        if folder and not _FOLDER_NAME.fullmatch(folder):
            raise PermanentFailure(f"invalid folder name {folder!r}")
        return self._in_thread(self._deliver, address, message, folder)

    def _deliver(self, address: str, message: SpooledMessage, folder: str) -> str:
        # RFC 5321 4.4: the final delivery records the envelope sender.
        head = f"Return-Path: <{message.sender}>\r\n".encode("utf-8")
        expected = len(head) + message.size
        uid = uuid.uuid4().hex
        with self._connection() as conn:
            row = conn.execute(
                "INSERT INTO messages (address, folder, uid, size) VALUES (%s, %s, %s, %s) RETURNING id",
                (address, folder, uid, expected),
            ).fetchone()
            message_id = row[0]
            total = 0
            with message.open() as source:
                for seq, chunk in enumerate(_chunks(head, source)):
                    conn.execute(
                        "INSERT INTO message_chunks (message_id, seq, data) VALUES (%s, %s, %b)", (message_id, seq, chunk)
                    )
                    total += len(chunk)
            if total != expected:
                conn.execute("UPDATE messages SET size = %s WHERE id = %s", (total, message_id))
        return uid

    def open(self, account: Account) -> Deferred[PostgresMaildrop]:
        address = _mailbox_address(account)
        pool = self.threads.blocking

        def opening() -> PostgresMaildrop:
            try:
                return PostgresMaildrop.open(self.db, address, self.reactor, pool)
            except psycopg.Error as e:
                raise _unavailable(e, self.reactor)

        return deferToThreadPool(self.reactor, pool, opening)


@implementer(IMaildrop)
class PostgresMaildrop:
    """One POP3 session's locked snapshot of the inbox, on a connection of its own.

    The connection holds the advisory lock; every query of the session runs
    on it, in the service's blocking pool, one at a time.  If the connection
    dies, the lock is gone with it and so is the session: commit fails
    rather than apply deletions unlocked.
    """

    def __init__(self, conn: Any, db: Database, address: str, reactor: Any, pool: ThreadPool) -> None:
        self.address = address
        self.db = db
        self.reactor = reactor
        self.pool = pool
        self._conn = conn
        self._using = threading.Lock()
        self._ids: dict[str, int] = {}
        self._entries: list[MaildropEntry] = []
        self._closed = False

    @classmethod
    def open(cls, db: Database, address: str, reactor: Any, pool: ThreadPool) -> PostgresMaildrop:
        """Connect and lock (blocking: call it in a thread)."""
        conn = db.connect(autocommit=True)
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s), hashtext(%s))", (db.schema, address)).fetchone()
            if not row or not row[0]:
                raise MaildropInUse("the maildrop is in use by another session")
            drop = cls(conn, db, address, reactor, pool)
            drop._scan()
            return drop
        except BaseException:
            conn.close()
            raise

    def _scan(self) -> None:
        rows = self._conn.execute(
            "SELECT id, uid, size FROM messages WHERE address = %s AND folder = '' ORDER BY id", (self.address,)
        ).fetchall()
        self._ids = {uid: message_id for message_id, uid, _ in rows}
        self._entries = [MaildropEntry(uid, size) for _, uid, size in rows]

    def _thread(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        def guarded() -> T:
            try:
                with self._using:
                    return function(*args)
            except psycopg.Error as e:
                raise _unavailable(e, self.reactor)

        return deferToThreadPool(self.reactor, self.pool, guarded)

    def entries(self) -> list[MaildropEntry]:
        return list(self._entries)

    def read(self, uid: str) -> Deferred[IO[bytes]]:
        """The message copied into a spooled file by a thread: the caller
        reads it on the reactor thread, where no query may block."""
        return self._thread(self._fetch, self._ids[uid])

    def _fetch(self, message_id: int) -> IO[bytes]:
        out = tempfile.SpooledTemporaryFile(max_size=READ_MEMORY)
        try:
            # One query per chunk: one chunk in memory at a time, and
            # statement_timeout bounds each MiB rather than a whole message.
            with self._conn.cursor(binary=True) as cursor:
                for seq in itertools.count():
                    row = cursor.execute(
                        "SELECT data FROM message_chunks WHERE message_id = %s AND seq = %s", (message_id, seq)
                    ).fetchone()
                    if row is None:
                        break
                    out.write(row[0])
            if seq == 0:
                raise TemporaryFailure("the message is no longer in the mailbox")
            out.seek(0)
            return out
        except BaseException:
            out.close()
            raise

    def commit(self, deleted: list[str], retrieved: list[str], trash: bool) -> Deferred[None]:
        self._closed = True
        return self._thread(self._commit, deleted, retrieved, trash)

    def _commit(self, deleted: list[str], retrieved: list[str], trash: bool) -> None:
        try:
            gone = [self._ids[uid] for uid in deleted if uid in self._ids]
            seen = [self._ids[uid] for uid in set(retrieved) - set(deleted) if uid in self._ids]
            with self._conn.transaction():
                if gone and trash:
                    self._conn.execute(
                        "UPDATE messages SET folder = %s, trashed_at = now() WHERE address = %s AND id = ANY(%s)",
                        (TRASH, self.address, gone),
                    )
                elif gone:
                    self._conn.execute("DELETE FROM messages WHERE address = %s AND id = ANY(%s)", (self.address, gone))
                if seen:
                    self._conn.execute(
                        "UPDATE messages SET seen = true, seen_at = now() WHERE address = %s AND id = ANY(%s) AND NOT seen",
                        (self.address, seen),
                    )
        finally:
            self._conn.close()

    def expire(self, retrieved_days: float | None, trash_days: float) -> Deferred[None]:
        return self._thread(self._expire, retrieved_days, trash_days)

    def _expire(self, retrieved_days: float | None, trash_days: float) -> None:
        removed = 0
        with self._conn.transaction():
            if retrieved_days is not None:
                removed = self._conn.execute(
                    "DELETE FROM messages WHERE address = %s AND folder = '' AND seen AND seen_at < now() - %s * interval '1 day'",
                    (self.address, float(retrieved_days)),
                ).rowcount
            self._conn.execute(
                "DELETE FROM messages WHERE address = %s AND folder = %s AND trashed_at < now() - %s * interval '1 day'",
                (self.address, TRASH, float(trash_days)),
            )
        if removed:
            self._scan()

    def close(self) -> None:
        """Release the lock (by closing the connection), changing nothing."""
        if self._closed:
            return
        self._closed = True
        d = self._thread(self._conn.close)
        d.addErrback(lambda failure: log.failure("postgres: closing a maildrop", failure))


# --- build ----------------------------------------------------------------------


def _database(options: dict[str, Any], kind: str) -> Database:
    """Check the options shared by both backends."""
    if psycopg is None:
        raise ConfigError("backend", "the postgres backend needs psycopg 3 and psycopg-pool", "pip install 'psycopg[binary]' psycopg-pool")
    reader = OptionReader(options, "postgres")
    example = '"host=127.0.0.1 dbname=mail user=mailplat"'
    dsn = reader.take("dsn", str, example=example, what="a libpq connection string")
    if not dsn.strip():
        raise reader.error("dsn", "is empty: it must be a libpq connection string", f"e.g. dsn = {example}")
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as e:
        raise reader.error("dsn", f"is not a valid connection string: {e}", f"e.g. dsn = {example}")
    pool_size = reader.integer("pool_size", 10, at_most=1000)
    timeout = reader.number("timeout", 10.0, at_most=3600, unit="of seconds")
    schema = reader.take("schema", str, "mailplat", example='"mailplat"')
    if not _SCHEMA_NAME.fullmatch(schema) or schema.startswith("pg_"):
        raise reader.error("schema", f"{toml_value(schema)} is not a lower-case SQL name (letters, digits, _; not starting with pg_)", 'schema = "mailplat"')
    reader.finish()
    db = Database(dsn, schema, pool_size, timeout)
    if (db.conninfo, db.schema) not in _migrated:
        try:
            migrate(db)
        except SchemaTooNew as e:
            raise ConfigError("schema", str(e), "upgrade mailplat on this node")
        except psycopg.Error as e:
            raise ConfigError(
                "dsn", f"cannot use the database at {db.describe()}: {e}".strip(),
                "check that PostgreSQL is running and that this user may create tables in that database",
            )
        _migrated.add((db.conninfo, db.schema))
    return db


def build_auth(options: dict[str, Any], context: BackendContext) -> PostgresAuth:
    """``[auth] backend = "postgres"``."""
    return PostgresAuth(_database(options, "auth"), context.reactor, context.threads)


def build_mailbox(options: dict[str, Any], context: BackendContext) -> PostgresMailbox:
    """``[mailbox] backend = "postgres"``."""
    return PostgresMailbox(_database(options, "mailbox"), context.reactor, context.threads)
