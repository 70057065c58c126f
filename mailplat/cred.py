"""twisted.cred glue: the configured auth backend as a checker, the mailbox as a realm."""

from __future__ import annotations

from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import implementer

from mailplat.interfaces import Account, IMaildrop
from mailplat.plugins import call

__all__ = ["AuthBackendChecker", "MaildropRealm"]


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

    def requestAvatarId(self, creds: Any) -> Any:
        return defer.Deferred.fromCoroutine(self._check(creds))


@implementer(IRealm)
class MaildropRealm:
    """Opens the account's maildrop (locked) from the mailbox backend."""

    def __init__(self, mailbox: Any) -> None:
        self.mailbox = mailbox

    async def _open(self, avatar_id: bytes) -> tuple[Any, Any, Any]:
        maildrop = await call(self.mailbox.open, Account(avatar_id.decode("utf-8")))
        return IMaildrop, maildrop, maildrop.close

    def requestAvatar(self, avatarId: bytes, mind: Any, *interfaces: Any) -> Any:
        if IMaildrop not in interfaces:
            raise NotImplementedError("only maildrops are served here")
        return defer.Deferred.fromCoroutine(self._open(avatarId))
