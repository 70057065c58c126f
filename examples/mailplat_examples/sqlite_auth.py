"""The ``sqlite`` auth backend: users in an SQLite table.

The table is ``users(address, password_hash)``, one row per mailbox, with
argon2id hashes from :func:`mailplat.passwords.hash_password`.  Another
program may fill it as long as it stores hashes `verify_password` knows
(``{ARGON2ID}...`` or ``{BLF-CRYPT}...``).

The server's calls run in a thread, so a slow disk or a locked database
never stalls other sessions.  `mailplat user ...` calls the IUserManager
methods directly, outside the reactor: those are plain blocking functions.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat.addresses import AddressError, validate_address
from mailplat.config import ConfigError
from mailplat.interfaces import Account, BackendContext, IAuthBackend, IUserManager, TemporaryFailure
from mailplat.options import OptionReader
from mailplat.passwords import hash_password, verify_password

__all__ = ["SQLiteUsers", "build"]

T = TypeVar("T")

log = Logger()

SCHEMA = "CREATE TABLE IF NOT EXISTS users (address TEXT PRIMARY KEY NOT NULL, password_hash TEXT NOT NULL)"


@implementer(IAuthBackend, IUserManager)
class SQLiteUsers:
    """Users in one SQLite file; a connection per call, so any thread may use it."""

    def __init__(self, path: str, reactor: Any, threads: Any) -> None:
        self.path = path
        self.reactor = reactor
        # The service's thread pools (None in the `mailplat user` command).
        self.threads = threads

    def _connect(self) -> sqlite3.Connection:
        # Wait for a writer (say `mailplat user add`) instead of failing at once.
        return sqlite3.connect(self.path, timeout=10)

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        connection = self._connect()
        try:
            with connection:  # commits, or rolls back on an exception
                return connection.execute(sql, args).fetchall()
        finally:
            connection.close()

    def create_schema(self) -> None:
        """Create the users table when the database does not have it yet."""
        self._query(SCHEMA)

    def _in_thread(self, function: Callable[[], T]) -> Deferred[T]:
        """Run ``function`` in the service's password pool: argon2 is slow on
        purpose, and SQLite may wait for a lock."""
        d = deferToThreadPool(self.reactor, self.threads.passwords, function)
        d.addErrback(self._database_error)
        return d

    def _database_error(self, failure: Failure) -> None:
        """A broken database is "try again later" for the client (451, or
        POP3 [SYS/TEMP]); the details go to the log, not to the client."""
        failure.trap(sqlite3.Error)
        log.error("{path}: {error}", path=self.path, error=failure.getErrorMessage())
        raise TemporaryFailure("user database unavailable; try again later")

    # -- IAuthBackend: called by the server ------------------------------------

    def authenticate(self, address: str, password: str) -> Deferred[Account | None]:
        """The account when the password is right; None (after as long) when not."""
        address = address.lower()

        def check() -> Account | None:
            rows = self._query("SELECT password_hash FROM users WHERE address = ?", address)
            stored = rows[0][0] if rows else None
            # With stored None, verify_password checks a dummy hash, so an
            # unknown user takes as long to refuse as a wrong password.
            return Account(address) if verify_password(stored, password) else None

        return self._in_thread(check)

    def lookup(self, address: str) -> Deferred[Account | None]:
        """The account whose mailbox is ``address``, or None."""
        address = address.lower()

        def find() -> Account | None:
            rows = self._query("SELECT 1 FROM users WHERE address = ?", address)
            return Account(address) if rows else None

        return self._in_thread(find)

    # -- IUserManager: called by `mailplat user`, without a reactor ------------

    def add_user(self, address: str, password: str) -> None:
        address = address.strip().lower()
        try:
            validate_address(address)
        except AddressError as e:
            raise ValueError(str(e))
        try:
            self._query("INSERT INTO users (address, password_hash) VALUES (?, ?)", address, hash_password(password))
        except sqlite3.IntegrityError:
            raise ValueError(f"{address} already exists; use `user passwd` to change its password")

    def set_password(self, address: str, password: str) -> None:
        address = address.strip().lower()
        connection = self._connect()
        try:
            with connection:
                changed = connection.execute(
                    "UPDATE users SET password_hash = ? WHERE address = ?", (hash_password(password), address)
                ).rowcount
        finally:
            connection.close()
        if not changed:
            raise KeyError(address)

    def delete_user(self, address: str) -> None:
        address = address.strip().lower()
        connection = self._connect()
        try:
            with connection:
                changed = connection.execute("DELETE FROM users WHERE address = ?", (address,)).rowcount
        finally:
            connection.close()
        if not changed:
            raise KeyError(address)

    def list_users(self) -> list[str]:
        return [row[0] for row in self._query("SELECT address FROM users ORDER BY address")]


def build(options: dict[str, Any], context: BackendContext) -> SQLiteUsers:
    """Check the options of ``[auth] backend = "sqlite"`` and open the database."""
    reader = OptionReader(options, "sqlite", context=context)
    backend = SQLiteUsers(reader.path("path", what="the SQLite database file", example='"users.sqlite"'), context.reactor, context.threads)
    reader.finish()
    if context.admin:
        # `mailplat user add` may start from nothing.
        os.makedirs(os.path.dirname(backend.path), exist_ok=True)
    elif not os.path.isfile(backend.path):
        # SQLite would create an empty database: a typo in path would
        # silently leave everyone unable to log in.
        raise ConfigError("path", f"no such file: {backend.path}", "create it by adding a user: mailplat --config FILE user add ADDRESS")
    try:
        backend.create_schema()
    except sqlite3.Error as e:
        raise ConfigError("path", f"cannot use {backend.path}: {e}", "point path at an SQLite database mailplat may write to")
    return backend
