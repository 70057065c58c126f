"""The ``passwd-file`` auth backend: users in a text file, Dovecot-style.

Each line is ``address:{SCHEME}hash`` (further ``:`` fields are ignored, as
Dovecot's extra fields would be).  The file is re-read whenever it changes,
and `mailplat user` rewrites it atomically, so a running server never sees
half a file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailplat.addresses import AddressError, validate_address
from mailplat.config import ConfigError
from mailplat.fsutil import fsync_directory
from mailplat.interfaces import Account, BackendContext, IAuthBackend, IUserManager
from mailplat.options import OptionReader
from mailplat.passwords import MalformedHash, UnsupportedScheme, hash_password, scheme_of, verify_in_thread

__all__ = ["PasswdFile", "build"]

log = Logger()


class PasswdFileError(ValueError):
    """A line of the users file that cannot be used; ``fix`` says how to mend it."""

    def __init__(self, problem: str, fix: str = "correct or delete that line") -> None:
        super().__init__(problem)
        self.fix = fix


def parse(text: str, path: str, allow_plain: bool) -> dict[str, str]:
    """address -> stored hash; PasswdFileError names the line of any mistake."""
    users: dict[str, str] = {}
    # Lines end at "\n" only: splitlines() would also cut at U+2028 and
    # friends inside a damaged hash, and miscount the lines after it.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        address, sep, rest = line.partition(":")
        stored = rest.split(":", 1)[0]
        where = f"{path}:{number}"
        if not sep or not stored:
            raise PasswdFileError(f"{where}: expected address:{{SCHEME}}hash")
        address = address.strip().lower()
        try:
            validate_address(address)
        except AddressError as e:
            raise PasswdFileError(f"{where}: {e}")
        try:
            scheme = scheme_of(stored)
        except MalformedHash as e:
            # Refused here, not at every login of the user as a traceback.
            raise PasswdFileError(
                f"{where}: the password hash of {address} is damaged: {e}",
                f"restore line {number} from a backup, or delete it and set a new password with `mailplat user add {address}`",
            )
        except UnsupportedScheme as e:
            raise PasswdFileError(f"{where}: {e}", f"delete line {number} and set a new password with `mailplat user add {address}`")
        if scheme == "PLAIN" and not allow_plain:
            raise PasswdFileError(f"{where}: {{PLAIN}} passwords are refused; hash it with `mailplat user passwd {address}`, or set allow_plain = true")
        if address in users:
            raise PasswdFileError(f"{where}: {address} is listed twice")
        users[address] = stored
    return users


def _text(data: bytes, path: str) -> str:
    """The file's bytes as UTF-8 text; PasswdFileError names the line of a byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        number = data.count(b"\n", 0, e.start) + 1
        raise PasswdFileError(
            f"{path}:{number}: not UTF-8 text (byte {data[e.start:e.start + 1]!r})",
            f"correct line {number}, or delete it and set a new password with `mailplat user add`",
        ) from None


@implementer(IAuthBackend, IUserManager)
class PasswdFile:
    """Users from one file, re-read when its inode, size or mtime changes."""

    def __init__(self, path: str, reactor: Any, threads: Any, allow_plain: bool = False) -> None:
        self.path = path
        self.reactor = reactor
        self.threads = threads
        self.allow_plain = allow_plain
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    # -- reading ------------------------------------------------------------

    def users(self) -> dict[str, str]:
        """The current users; a stat per call is the price of never restarting."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._users = None, {}
            return self._users
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            try:
                with open(self.path, "rb") as f:
                    self._users = parse(_text(f.read(), self.path), self.path, self.allow_plain)
            except (PasswdFileError, OSError) as e:
                if self._stamp is None:
                    raise
                log.error("users file not reloaded, keeping the previous one: {error}", error=str(e))
            self._stamp = stamp
        return self._users

    def lookup(self, address: str) -> Account | None:
        address = address.lower()
        return Account(address) if address in self.users() else None

    def authenticate(self, address: str, password: str) -> Any:
        address = address.lower()
        stored = self.users().get(address)

        def checked(ok: bool) -> Account | None:
            return Account(address) if ok and stored is not None else None

        # argon2 is slow on purpose: never on the reactor thread.
        return verify_in_thread(self.reactor, self.threads.passwords, stored, password, self.allow_plain, account=address).addCallback(checked)

    # -- editing (IUserManager) ---------------------------------------------

    def add_user(self, address: str, password: str) -> None:
        address = validate_address(address.strip().lower())
        users = dict(self.users())
        if address in users:
            raise ValueError(f"{address} already exists; use `user passwd` to change its password")
        users[address] = hash_password(password)
        self._write(users)

    def set_password(self, address: str, password: str) -> None:
        address = address.strip().lower()
        users = dict(self.users())
        if address not in users:
            raise KeyError(address)
        users[address] = hash_password(password)
        self._write(users)

    def delete_user(self, address: str) -> None:
        address = address.strip().lower()
        users = dict(self.users())
        if address not in users:
            raise KeyError(address)
        del users[address]
        self._write(users)

    def list_users(self) -> list[str]:
        return sorted(self.users())

    def _write(self, users: dict[str, str]) -> None:
        """Write a temporary file, fsync it, rename it over the old one, fsync the folder."""
        folder = os.path.dirname(self.path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".users-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("# mailplat users: address:{SCHEME}hash; edit with `mailplat user`\n")
                for address in sorted(users):
                    f.write(f"{address}:{users[address]}\n")
                f.flush()
                os.fsync(f.fileno())
            _keep_ownership(self.path, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        fsync_directory(folder)


def _keep_ownership(old: str, new: str) -> None:
    """Give the new users file the old one's owner, group and mode.

    Otherwise `sudo mailplat user add` would leave a root-owned 0600 file
    that a server running as its own user can no longer read.
    """
    try:
        st = os.stat(old)
    except FileNotFoundError:
        os.chmod(new, 0o600)
        return
    os.chmod(new, st.st_mode & 0o7777)
    if os.geteuid() == 0:
        os.chown(new, st.st_uid, st.st_gid)


def build(options: dict[str, Any], context: BackendContext) -> PasswdFile:
    reader = OptionReader(options, "passwd-file", context=context)
    path = reader.path("path", what="the users file", example='"users.passwd"')
    allow_plain = reader.take("allow_plain", bool, False, example="false")
    reader.finish()
    backend = PasswdFile(path, context.reactor, context.threads, allow_plain)
    if not context.admin and not os.path.isfile(backend.path):
        raise ConfigError("path", f"no such file: {backend.path}", "create it by adding a user: mailplat --config FILE user add ADDRESS")
    try:
        backend.users()
    except PasswdFileError as e:
        raise ConfigError("path", str(e), e.fix)
    except OSError as e:
        raise ConfigError("path", f"cannot read {backend.path}: {e.strerror}", "let the user mailplat runs as read it")
    return backend
