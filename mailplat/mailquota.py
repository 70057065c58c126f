"""[mailbox] quota: how much mail each account may store, checked in one place.

Local delivery (SMTP and the queue alike) and IMAP APPEND ask
:class:`MailboxQuota` before they store a message, and IMAP GETQUOTA asks it
what is used (RFC 9208).  The store counts (``IMessageStore.usage``); this
only compares.  As Dovecot's quota plugin, the check is made before the
write and not held across it: two messages arriving at once may both fit,
and the account may then be a message over, never more.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from mailplat.interfaces import Account, IMessageStore, OverQuota
from mailplat.plugins import call

__all__ = ["MailboxQuota", "format_size"]

log = Logger()

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def format_size(octets: int) -> str:
    """A size as people read it: "512 B", "20.0 KiB", "2.0 GiB" (powers of 1024, as the config's "2G")."""
    if octets < 1024:
        return f"{octets} B"
    size = float(octets)
    for unit in _UNITS:
        size /= 1024
        if size < 1024 or unit == _UNITS[-1]:
            break
    return f"{size:.1f} {unit}"


class MailboxQuota:
    """The octets each account of ``store`` may hold: ``limit``, 0 for no limit.

    A store that cannot count (it does not provide IMessageStore, so has no
    ``usage``) is not limited: that is said once in the log rather than
    refusing all mail.
    """

    def __init__(self, store: Any, limit: int) -> None:
        self.store = store
        self.limit = limit
        self.enforced = limit > 0 and IMessageStore.providedBy(store)
        self._warned = False

    async def state(self, account: Account) -> tuple[int, int]:
        """(octets used, limit) for GETQUOTA; the limit is 0 when there is none."""
        if not self._counts():
            return 0, self.limit
        octets, _ = await call(self.store.usage, account)
        return int(octets), self.limit

    async def check(self, account: Account, size: int) -> None:
        """Raise OverQuota when a message of ``size`` octets would take ``account`` over its limit."""
        if not self._counts():
            return
        used, limit = await self.state(account)
        if used + size > limit:
            room = f"{format_size(used)} of {format_size(limit)}"
            if used < limit:
                room += f" used, the message is {format_size(size)}"
            raise OverQuota(f"{account.address}'s mailbox is full ({room})")

    async def full(self, account: Account) -> bool:
        """True when ``account`` is already at or over its limit: no message fits
        (SMTP then refuses it at RCPT for now, as Dovecot's lmtp_rcpt_check_quota)."""
        if not self._counts():
            return False
        used, limit = await self.state(account)
        return used >= limit

    def _counts(self) -> bool:
        """Whether a limit applies and the store can count; logs once when it cannot."""
        if self.limit <= 0:
            return False
        if self.enforced:
            return True
        if not self._warned:
            self._warned = True
            log.warn(
                "[mailbox] quota = {limit} cannot be enforced: the mailbox backend {store} does not count usage "
                "(it does not provide IMessageStore)", limit=self.limit, store=type(self.store).__name__,
            )
        return False
