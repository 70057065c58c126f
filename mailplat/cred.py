"""twisted.cred glue, and the one login guard every listener logs in through.

The configured auth backend is the checker; the realm hands out either the
account (SMTP submission) or its maildrop (POP3).  :class:`LoginGuard` is
the only way a protocol checks a password: it slows down a failed login
(as Dovecot's ``auth_failure_delay``) and refuses, for a while, an address
that keeps failing, whichever port it tries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from mailplat.interfaces import Account, IAccount, IMaildrop
from mailplat.plugins import call

__all__ = ["AuthBackendChecker", "LoginBlocked", "LoginGuard", "MailRealm"]

# Addresses whose failures have all expired, forgotten at each new failure:
# more than the one a failure adds, so the table shrinks to the addresses
# that failed within block_time, and each failure costs the same.
_FORGET_PER_FAILURE = 2


@implementer(ICredentialsChecker)
class AuthBackendChecker:
    """Username and password, checked by the auth backend; the avatar id is the account address."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, auth: Any) -> None:
        self.auth = auth

    async def _check(self, creds: Any) -> bytes:
        username = creds.username.decode("utf-8") if isinstance(creds.username, bytes) else creds.username
        password = creds.password.decode("utf-8") if isinstance(creds.password, bytes) else creds.password
        account = await call(self.auth.authenticate, username.strip().lower(), password)
        if account is None:
            raise error.UnauthorizedLogin("wrong address or password")
        return account.address.encode("utf-8")

    def requestAvatarId(self, creds: Any) -> defer.Deferred[bytes | tuple[()]]:
        d: defer.Deferred[bytes | tuple[()]] = defer.Deferred.fromCoroutine(self._check(creds))
        return d


@implementer(IRealm)
class MailRealm:
    """An account (IAccount) or its maildrop, locked, from the mailbox backend (IMaildrop)."""

    def __init__(self, mailbox: Any) -> None:
        self.mailbox = mailbox

    async def _open(self, account: Account) -> tuple[Any, Any, Callable[[], Any]]:
        maildrop = await call(self.mailbox.open, account)
        return IMaildrop, maildrop, lambda: call(maildrop.close)

    def requestAvatar(self, avatarId: bytes | tuple[()], mind: Any, *interfaces: Any) -> Any:
        if not isinstance(avatarId, bytes):
            raise NotImplementedError("anonymous logins are not served")
        account = Account(avatarId.decode("utf-8"))
        if IAccount in interfaces:
            return IAccount, account, lambda: None
        if IMaildrop in interfaces:
            return defer.Deferred.fromCoroutine(self._open(account))
        raise NotImplementedError("only accounts and maildrops are served here")


class LoginBlocked(Exception):
    """Too many failed logins from this address: no password is checked for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"blocked for {seconds:.0f} more seconds")
        self.seconds = seconds


class LoginGuard:
    """Every password check of every listener: delay on failure, block after many.

    Failures are counted per client address over ``block_time`` seconds;
    at ``max_failures`` the address is refused until the oldest counted
    failure is ``block_time`` old.  Time comes from ``clock``.  An address
    whose failures have all expired is forgotten, so what the guard holds
    is bounded by the addresses that failed within ``block_time``, not by
    every address that ever failed.
    """

    def __init__(self, portal: Portal, clock: IReactorTime, failure_delay: float, max_failures: int, block_time: float) -> None:
        self.portal = portal
        self.clock = clock
        self.failure_delay = failure_delay
        self.max_failures = max_failures
        self.block_time = block_time
        # Ordered by each address's last failure, the stalest first; at most
        # max_failures times each (blocked_for reads no more).
        self._failures: dict[str, list[float]] = {}

    def _recent(self, peer: str) -> list[float]:
        now = self.clock.seconds()
        recent = [t for t in self._failures.get(peer, []) if t > now - self.block_time]
        if recent:
            self._failures[peer] = recent
        else:
            self._failures.pop(peer, None)
        return recent

    def blocked_for(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: it may now)."""
        recent = self._recent(peer)
        if len(recent) < self.max_failures:
            return 0.0
        return max(0.0, recent[-self.max_failures] + self.block_time - self.clock.seconds())

    async def login(self, peer: str, username: str, password: str, interface: type[Interface]) -> tuple[Any, Callable[[], Any]]:
        """The avatar for ``interface`` and its logout; LoginBlocked, or
        UnauthorizedLogin after the failure delay; a backend's
        TemporaryFailure (or MaildropInUse) passes through."""
        wait = self.blocked_for(peer)
        if wait:
            raise LoginBlocked(wait)
        creds = credentials.UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        try:
            _, avatar, logout = await self.portal.login(creds, None, interface)
        except error.UnauthorizedLogin:
            self._failed(peer)
            await task.deferLater(self.clock, self.failure_delay, lambda: None)
            raise
        return avatar, logout

    def _failed(self, peer: str) -> None:
        """Count a failure of ``peer``; forget a few addresses whose failures have all expired."""
        now = self.clock.seconds()
        times = self._failures.pop(peer, [])
        times.append(now)
        # Inserted again: the dict's order stays that of the last failures.
        self._failures[peer] = times[-self.max_failures :]
        for _ in range(_FORGET_PER_FAILURE):
            stalest = next(iter(self._failures))
            if self._failures[stalest][-1] > now - self.block_time:
                break
            del self._failures[stalest]
