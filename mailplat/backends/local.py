"""The ``local`` delivery backend: every recipient's mail into the mailbox backend,
within [mailbox] quota (a recipient whose mailbox the message would take
over it is refused with OverQuota, the others still get it)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailplat.config import ConfigError
from mailplat.interfaces import (
    BackendContext,
    DeliveryFailure,
    Envelope,
    IDeliveryBackend,
    OverQuota,
    PartialFailure,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)
from mailplat.mailquota import MailboxQuota
from mailplat.options import OptionReader
from mailplat.plugins import call

__all__ = ["LocalDelivery", "build"]

log = Logger()


@implementer(IDeliveryBackend)
class LocalDelivery:
    """Delivers to all recipients at once; succeeds only if every one succeeded."""

    def __init__(self, mailbox: Any, quota: MailboxQuota | None = None) -> None:
        self.mailbox = mailbox
        # The SMTP server asks it at RCPT too (mailplat.routing.Router.is_full).
        self.quota = quota if quota is not None else MailboxQuota(mailbox, 0)

    async def deliver(self, envelope: Envelope, message: SpooledMessage) -> None:
        results = await defer.DeferredList(
            [self._deliver_one(account, envelope, message) for account in envelope.recipients],
            consumeErrors=True,
        )
        failures = [(account, result) for account, (ok, result) in zip(envelope.recipients, results) if not ok]
        for account, failure in failures:
            if failure.check(DeliveryFailure):
                log.warn("{queue_id}: delivery to {rcpt} failed: {text}", queue_id=envelope.queue_id, rcpt=account.address, text=failure.value.text)
            else:
                log.failure("{queue_id}: delivery to {rcpt} failed", failure, queue_id=envelope.queue_id, rcpt=account.address)
        if not failures:
            return
        if len(failures) < len(results):
            raise PartialFailure({account: failure.value if failure.check(DeliveryFailure) else
                                  TemporaryFailure("local delivery failed; try again later") for account, failure in failures})
        if all(f.check(OverQuota) for _, f in failures):
            raise failures[0][1].value
        if all(f.check(PermanentFailure) for _, f in failures):
            raise PermanentFailure(failures[0][1].value.text)
        raise TemporaryFailure("local delivery failed; try again later")

    def _deliver_one(self, account: Any, envelope: Envelope, message: SpooledMessage) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._within_quota(account, envelope, message))

    async def _within_quota(self, account: Any, envelope: Envelope, message: SpooledMessage) -> None:
        await self.quota.check(account, message.size)
        # Only a folder is passed on, so that a mailbox backend written
        # before folders existed still takes mail for the inbox.
        if envelope.folder:
            await call(self.mailbox.deliver, account, message, folder=envelope.folder)
        else:
            await call(self.mailbox.deliver, account, message)


def build(options: dict[str, Any], context: BackendContext) -> LocalDelivery:
    OptionReader(options, "local").finish()
    mailbox = context.providers.get("mailbox")
    if mailbox is None:
        raise ConfigError("backend", "local delivery needs a [mailbox] backend", 'add [mailbox] backend = "maildir"')
    return LocalDelivery(mailbox, MailboxQuota(mailbox, context.mailbox_quota))
