"""The one hand-off of an accepted message: our recipients to the delivery
backend, everyone else (and what local delivery could not take) to the queue.
What an alias forwards to another domain is queued on its own, with the
sender SRS gives it (mailplat.forwarding).

The SMTP server and the queue runner both deliver through here, so a
delivery backend's answer (done, PartialFailure, Temporary/PermanentFailure,
or a bug) is read the same way wherever a message comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.logger import Logger

from mailplat.ids import new_id
from mailplat.interfaces import (
    Account, DeliveryFailure, Envelope, OverQuota, PartialFailure, PermanentFailure, SpooledMessage, TemporaryFailure,
)
from mailplat.mailquota import MailboxQuota
from mailplat.plugins import call

__all__ = ["Outbound", "Router", "smtp_status"]

log = Logger()


def smtp_status(failure: DeliveryFailure) -> tuple[int, str, str]:
    """The one mapping of a delivery failure to an SMTP reply: code, RFC 3463
    status and the text a sender (and a bounce) may read."""
    if isinstance(failure, OverQuota):
        # X.2.2 mailbox full, as Postfix and Dovecot's LMTP answer it; how big
        # the mailbox is stays in our log, not with whoever sent the mail.
        return 552, "5.2.2", "Mailbox is full"
    if isinstance(failure, PermanentFailure):
        return 554, "5.0.0", failure.text
    return 451, "4.3.0", failure.text


class SenderRewriter(Protocol):
    """The envelope sender of forwarded copies (mailplat.forwarding.Forwarder)."""

    def sender_for(self, sender: str) -> str: ...


class Outbound(Protocol):
    """Where mail for other domains waits (the queue runner)."""

    def enqueue(self, queue_id: str, sender: str, recipients: list[str], message: SpooledMessage, folder: str = "") -> Any:
        """Store durably; the 250 is sent after this completes."""


class Router:
    """Local delivery through the delivery backend, the rest into ``queue``.

    ``queue`` is None for a process that only delivers locally (the admin
    command, tests); the service sets it once the queue runner exists.
    """

    def __init__(self, delivery: Any, queue: Outbound | None = None, forwarding: SenderRewriter | None = None) -> None:
        self.delivery = delivery
        self.queue = queue
        self.forwarding = forwarding

    @property
    def can_relay(self) -> bool:
        return self.queue is not None

    async def is_full(self, account: Account) -> bool:
        """True when the delivery backend keeps a [mailbox] quota (``local``
        does) and ``account`` is at or over it: no message would fit."""
        quota = getattr(self.delivery, "quota", None)
        if not isinstance(quota, MailboxQuota):
            return False
        try:
            return await quota.full(account)
        except Exception as e:
            # Delivery counts again and answers for itself: a store that cannot count now refuses nobody here.
            log.warn("quota of {account} not checked: {error}", account=account.address, error=getattr(e, "text", repr(e)))
            return False

    async def deliver_local(self, envelope: Envelope, message: SpooledMessage) -> dict[str, DeliveryFailure]:
        """Deliver to every account of ``envelope``; the failure of each one
        that did not get it.  Raises DeliveryFailure when nobody got it."""
        try:
            await call(self.delivery.deliver, envelope, message)
        except PartialFailure as partial:
            return {account.address: failure for account, failure in partial.failed.items()}
        except DeliveryFailure:
            raise
        except Exception as e:
            log.error("{queue_id} delivery backend failed: {error!r}", queue_id=envelope.queue_id, error=e)
            raise TemporaryFailure("Local error in processing; try again later")
        return {}

    async def hand_off(
        self, envelope: Envelope, message: SpooledMessage, remote: Sequence[str] = (), forwarded: Sequence[str] = (),
    ) -> list[str]:
        """Deliver to our accounts, queue ``remote`` and whatever local delivery
        left over, and queue ``forwarded`` (addresses elsewhere that aliases
        send the message on to); the queued addresses.  Raises DeliveryFailure
        when the message was taken for nobody (the client then hears 4xx or 5xx)."""
        queued = list(remote)
        if envelope.recipients:
            failed = await self.deliver_local(envelope, message)
            for address, failure in failed.items():
                log.info("{queue_id} <{rcpt}> queued after: {text}", queue_id=envelope.queue_id, rcpt=address, text=failure.text)
            queued += failed
        forward_sender = self.forwarding.sender_for(envelope.sender) if self.forwarding is not None else envelope.sender
        forwards = [address for address in forwarded if address not in queued]
        if forward_sender == envelope.sender:
            queued, forwards = queued + forwards, []
        if not (queued or forwards):
            return []
        queue = self.queue
        if queue is None:
            raise TemporaryFailure("cannot queue mail in this process; try again later")
        if queued:
            await queue.enqueue(envelope.queue_id, envelope.sender, queued, message, envelope.folder)
        if forwards:
            # Another sender, so another queue entry (one sender per entry); it bounces to that sender, which SRS reverses.
            forward_id = new_id() if queued else envelope.queue_id
            log.info(
                "{queue_id} forwarded as {forward_id} from=<{sender}> to={rcpts}",
                queue_id=envelope.queue_id, forward_id=forward_id, sender=forward_sender, rcpts=",".join(forwards),
            )
            await queue.enqueue(forward_id, forward_sender, forwards, message)
        return queued + forwards
