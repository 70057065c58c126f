"""The queue runner: retries queued mail with backoff, relays it, bounces what fails.

It runs in the main process only; workers just add files to the queue, and
the runner notices them on its next tick (once a second).
"""

from __future__ import annotations

import datetime
import heapq
import os
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplat.addresses import BadSRSAddress
from mailplat.config import RelaySettings
from mailplat.fsutil import GroupCommit
from mailplat.interfaces import (
    Account,
    DeliveryFailure,
    Envelope,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)
from mailplat.queue.bounce import FailedRecipient, build_bounce, is_bounce
from mailplat.queue.store import DONE, FAILED, Queue, QueuedMessage, QueuedRecipient
from mailplat.ids import new_id
from mailplat.numerals import is_digits
from mailplat.queue.relay import Reply, SessionCache, addresses_of, find_hosts
from mailplat.routing import smtp_status

__all__ = ["QueueRunner"]

log = Logger()

# Messages relayed at once.
_CONCURRENCY = 50
# What a failure says when the next hop is ourselves (Postfix's words; status 5.4.6).
_LOOP = "loops back to myself"


class QueueRunner(service.Service):
    """Delivers what is due, one connection per destination domain."""

    def __init__(
        self, queue: Queue, relay: RelaySettings, smarthost: str, hostname: str, dns: Any, resolver: Any, router: Any,
        reactor: Any, threads: Any,
    ) -> None:
        self.queue = queue
        self.relay = relay
        self.smarthost = smarthost
        self.hostname = hostname
        self.dns = dns
        # Our own domains' recipients (and bounces to our own users) go
        # through the router's local delivery.
        self.resolver = resolver
        self.router = router
        # Time comes from the reactor (a task.Clock in tests), files are
        # touched in the service's blocking pool.
        self.reactor = reactor
        self.threads = threads
        self.in_flight: set[str] = set()
        # id -> when it is due; the heap holds (time, id) pairs, some stale,
        # so that finding what is due does not scan a queue of 100,000.
        self.schedule: dict[str, float] = {}
        self._due: list[tuple[float, str]] = []
        self.flushed: set[str] = set()
        self._ticking = False
        self._loop: Any = None
        self.sessions = SessionCache(reactor)
        # Small messages and every envelope update share fsyncs with others.
        self.committer = GroupCommit(reactor)

    def _thread(self, f: Any, *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.threads.blocking, f, *args)

    def startService(self) -> None:
        super().startService()
        self.queue.start()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(1.0, now=True).addErrback(lambda f: log.failure("queue runner stopped", f))

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.sessions.close()
        return self.committer.stop()

    def enqueue(
        self, queue_id: str, sender: str, recipients: list[str], message: SpooledMessage, folder: str = "",
    ) -> defer.Deferred[None]:
        """Store a message durably for relaying (the caller answers 250 after this).

        ``folder`` is where our own recipients' copies go (a filter's quarantine).
        """
        now = self.reactor.seconds()

        def store() -> None:
            with message.open() as source:
                self.queue.enqueue(queue_id, sender, recipients, source, now, folder)

        def stored(result: None) -> None:
            # Queued by this process: due now, and no need to wait for the next tick.
            if self.running and queue_id not in self.schedule:
                self._set_due(queue_id, 0.0)
                self._start_due()

        def failed(failure: Any) -> None:
            error = failure.value
            log.error("{queue_id}: cannot write to the queue: {error}", queue_id=queue_id, error=error)
            raise TemporaryFailure("cannot write to the outbound queue; try again later")

        if message.content is not None:
            # One file, envelope and message, in a group commit.
            envelope = self.queue.new_envelope(queue_id, sender, recipients, now, folder)
            envelope.inline = True
            path = self.queue.envelope_path(queue_id)
            written = self.committer.write(path + ".tmp", path, self.queue.envelope_data(envelope, message.content))
            return written.addCallbacks(stored, failed)
        return self._thread(store).addCallbacks(stored, failed)

    async def _save(self, message: QueuedMessage) -> None:
        """Replace the envelope durably (temporary file, fsync, rename, folder fsync)."""
        content = await self._thread(self.queue.inline_content, message) if message.inline else b""
        path = self.queue.envelope_path(message.id)
        await self.committer.write(path + ".tmp", path, self.queue.envelope_data(message, content))

    def tick(self) -> defer.Deferred[None] | None:
        if self._ticking:
            return None
        self._ticking = True
        d = defer.Deferred.fromCoroutine(self._tick())
        d.addBoth(self._ticked)
        return d

    def _ticked(self, result: Any) -> Any:
        self._ticking = False
        return result

    async def _tick(self) -> None:
        """Learn about new queue files, forget removed ones, and start what is due.

        The schedule (id -> next try) lives in memory; the folder is only
        listed, and an envelope read when it is new or due.
        """
        flush = await self._thread(self.queue.take_flush_request)
        ids = set(await self._thread(self.queue.ids))
        for gone in set(self.schedule) - ids - self.in_flight:
            del self.schedule[gone]
            log.info("{queue_id}: removed from the queue by the admin", queue_id=gone)
        new = [i for i in ids if i not in self.schedule]
        for message in await self._thread(self._load_all, new):
            if message.id not in self.schedule:
                self._set_due(message.id, 0.0 if message.finished else message.next_try)
        if flush:
            self.flushed.update(self.schedule)
            for queue_id in list(self.schedule):
                self._set_due(queue_id, 0.0)
        self._start_due()

    def _set_due(self, queue_id: str, when: float) -> None:
        self.schedule[queue_id] = when
        heapq.heappush(self._due, (when, queue_id))
        if len(self._due) > 2 * len(self.schedule) + 1000:
            # Mostly stale entries: rebuild from the schedule.
            self._due = [(t, i) for i, t in self.schedule.items()]
            heapq.heapify(self._due)

    def _start_due(self) -> None:
        """Start what is due, up to the concurrency limit (cheap: called after every run)."""
        now = self.reactor.seconds()
        while self._due and len(self.in_flight) < _CONCURRENCY and self.running:
            when, queue_id = self._due[0]
            if when > now:
                break
            heapq.heappop(self._due)
            if self.schedule.get(queue_id) != when or queue_id in self.in_flight:
                continue  # stale: rescheduled, removed, or running
            self.in_flight.add(queue_id)
            d = defer.Deferred.fromCoroutine(self._run(queue_id))
            d.addErrback(self._run_failed, queue_id)
            d.addBoth(self._ran_after, queue_id)

    def _run_failed(self, failure: Failure, queue_id: str) -> None:
        log.failure("{queue_id}: queue run failed", failure, queue_id=queue_id)

    def _ran_after(self, result: None, queue_id: str) -> None:
        self._ran(queue_id)

    def _ran(self, queue_id: str) -> None:
        self.in_flight.discard(queue_id)
        self._start_due()

    def _load_all(self, ids: list[str]) -> list[QueuedMessage]:
        loaded = []
        for queue_id in ids:
            try:
                loaded.append(self.queue.load(queue_id))
            except (FileNotFoundError, ValueError, TypeError) as e:
                log.error("{queue_id}: unreadable envelope: {error}", queue_id=queue_id, error=str(e))
        return loaded

    async def _run(self, queue_id: str) -> None:
        try:
            message = await self._thread(self.queue.load, queue_id)
        except FileNotFoundError:
            self.schedule.pop(queue_id, None)
            return
        if queue_id in self.flushed:
            self.flushed.discard(queue_id)
            for r in message.recipients:
                r.next_try = 0.0
        try:
            await self._process(message)
        finally:
            if message.finished:
                self.schedule.pop(queue_id, None)
            else:
                self._set_due(queue_id, message.next_try)

    async def _process(self, message: QueuedMessage) -> None:
        if not message.inline and not await self._thread(os.path.exists, self.queue.message_path(message.id)):
            # Only a hand-made change to the queue folder does this.
            log.error("{queue_id}: the message file is missing; dropping its envelope", queue_id=message.id)
            await self._thread(self.queue.remove, message.id)
            return
        now = self.reactor.seconds()
        by_domain: dict[str, list[QueuedRecipient]] = {}
        for recipient in message.pending(now):
            by_domain.setdefault(recipient.domain, []).append(recipient)
        for domain, recipients in by_domain.items():
            if self.resolver.is_hosted(domain):
                # Our own users whose delivery failed when the message came in.
                await self._deliver_locally(message, recipients)
            else:
                await self._relay_domain(message, domain, recipients)
            # The "done" mark right after each domain: the duplicate window is one transaction.
            # When every recipient is done, removing the message is that mark.
            if not all(r.state == DONE for r in message.recipients):
                await self._save(message)
        if message.finished:
            await self._finish(message)
        elif any(r.state == FAILED and not r.bounced for r in message.recipients):
            # A permanent failure is told at once, not when the last of the
            # other recipients is done (up to max_age later).
            await self._bounce_failed(message)
            await self._save(message)

    async def _relay_domain(self, message: QueuedMessage, domain: str, recipients: list[QueuedRecipient]) -> None:
        addresses = [r.address for r in recipients]
        replies: dict[str, Reply] = {}
        error: DeliveryFailure | None = None
        try:
            hosts = await self._hosts(domain)
            for host in hosts:
                try:
                    replies = await self.sessions.send(
                        host, self.hostname, message.sender, addresses, lambda: self.queue.open_message(message), self.relay,
                    )
                    for r in recipients:
                        r.remote_mta = host[0]
                    break
                except DeliveryFailure as e:
                    error = e
                    log.info("{queue_id}: {host}: {error}", queue_id=message.id, host=host[0], error=e.text)
        except DeliveryFailure as e:
            error = e
        now = self.reactor.seconds()
        for r in recipients:
            r.attempts += 1
            reply = replies.get(r.address)
            if reply is not None and reply.code // 100 == 2:
                r.state, r.last_error, r.status = DONE, str(reply), reply.status
                log.info("{queue_id}: relayed to <{rcpt}> via {host}: {reply}", queue_id=message.id, rcpt=r.address, host=r.remote_mta, reply=str(reply))
                continue
            if reply is not None:
                r.last_error, r.status = str(reply), reply.status
                permanent = reply.code // 100 == 5
            else:
                assert error is not None
                r.last_error = error.text
                permanent = isinstance(error, PermanentFailure)
                r.status = "4.4.1" if not permanent else "5.1.10" if "null MX" in error.text else "5.4.6" if _LOOP in error.text else "5.4.4"
            self._failed(message, r, permanent, now)

    def _failed(self, message: QueuedMessage, r: QueuedRecipient, permanent: bool, now: float) -> None:
        """A recipient's attempt failed: bounce it, give up on it, or schedule the next try."""
        if permanent:
            r.state = FAILED
        elif now - message.created > self.relay.max_age:
            r.state, r.status = FAILED, "4.4.7"
            r.last_error = f"gave up after {int((now - message.created) / 3600)} hours; last error: {r.last_error}"
        else:
            delay = min(self.relay.retry_initial * 2 ** (r.attempts - 1), self.relay.retry_max)
            r.next_try = now + delay
        log.info("{queue_id}: <{rcpt}> {state}: {error}", queue_id=message.id, rcpt=r.address, state=r.state, error=r.last_error)

    async def _deliver_locally(self, message: QueuedMessage, recipients: list[QueuedRecipient]) -> None:
        """Hand the message to the delivery backend for these accounts of ours."""

        def spooled() -> SpooledMessage:
            if message.inline:
                content = self.queue.inline_content(message)
                return SpooledMessage("", len(content), message.sender, content)
            path = self.queue.message_path(message.id)
            return SpooledMessage(path, os.path.getsize(path), message.sender)

        envelope = Envelope(message.id, message.sender, tuple(Account(r.address) for r in recipients), folder=message.folder)
        failed: dict[str, DeliveryFailure] = {}
        try:
            failed = await self.router.deliver_local(envelope, await self._thread(spooled))
        except DeliveryFailure as e:
            failed = dict.fromkeys((r.address for r in recipients), e)
        now = self.reactor.seconds()
        for r in recipients:
            r.attempts += 1
            failure = failed.get(r.address)
            if failure is None:
                r.state, r.last_error, r.status = DONE, "delivered", "2.0.0"
                log.info("{queue_id}: delivered to <{rcpt}>", queue_id=message.id, rcpt=r.address)
                continue
            permanent = isinstance(failure, PermanentFailure)
            # The bounce and `queue list` say what the SMTP client would have been told.
            # `queue list`, the log and the bounce keep the whole text.
            r.last_error, r.status = failure.text, smtp_status(failure)[1]
            self._failed(message, r, permanent, now)

    async def _hosts(self, domain: str) -> list[tuple[str, str, int]]:
        if self.smarthost:
            host, _, port = self.smarthost.rpartition(":")
            addresses = [host] if is_digits(host.replace(".", "")) else await addresses_of(host, self.dns)
            if not addresses:
                raise TemporaryFailure(f"no address found for the smarthost {host}")
            return [(host, address, int(port)) for address in addresses]
        hosts = await find_hosts(domain, self.dns, self.relay.port)
        # As Postfix: only the MX hosts preferred to ourselves; when we are the best, the mail would come back.
        own = self.hostname.lower().rstrip(".")
        better = next((i for i, host in enumerate(hosts) if host[0].lower().rstrip(".") == own), len(hosts))
        if not better:
            raise PermanentFailure(f"mail for {domain} {_LOOP} (its best MX host is {self.hostname})")
        return hosts[:better]

    async def _bounce_failed(self, message: QueuedMessage) -> None:
        """One bounce for the recipients that failed since the last one (never two for a recipient)."""
        failed = [r for r in message.recipients if r.state == FAILED and not r.bounced]
        if failed and not is_bounce(message.sender):
            await self._bounce(message, failed)
        # Marked once the bounce is stored: a crash in between sends it twice, never not at all.
        for r in failed:
            r.bounced = True

    async def _finish(self, message: QueuedMessage) -> None:
        await self._bounce_failed(message)
        # The envelope first: a crash then leaves an orphan message file, cleaned at start.
        then = "" if message.inline else self.queue.message_path(message.id)
        await self.committer.remove(self.queue.envelope_path(message.id), then=then)
        log.info("{queue_id}: removed from the queue", queue_id=message.id)

    async def _bounce(self, message: QueuedMessage, failed: list[QueuedRecipient]) -> None:
        sender = message.sender
        if self.resolver.is_srs(sender):
            # Mail an alias forwarded: the bounce goes to whom SRS says sent it, not back to us.
            try:
                sender = self.resolver.forwarding.reverse(sender)
            except BadSRSAddress as e:
                log.info("{queue_id}: bounce dropped: <{sender}>: {why}", queue_id=message.id, sender=sender, why=str(e))
                return

        def build() -> bytes:
            with self.queue.open_message(message) as original:
                return build_bounce(
                    reporting_mta=self.hostname,
                    original=original,
                    envelope_sender=sender,
                    recipients=[FailedRecipient(r.address, r.status or "5.0.0", r.last_error, r.remote_mta) for r in failed],
                    queue_id=message.id,
                    arrival=datetime.datetime.fromtimestamp(message.created, datetime.timezone.utc),
                )

        dsn = await self._thread(build)
        bounce_id = new_id()
        spooled = SpooledMessage("", len(dsn), "", dsn)
        domain = sender.rpartition("@")[2].lower()
        if self.resolver.is_hosted(domain):
            accounts = await self.resolver.resolve(sender)
            if not accounts:
                log.info("{queue_id}: bounce {bounce_id} dropped: <{sender}> is no longer ours", queue_id=message.id,
                         bounce_id=bounce_id, sender=sender)
                return
            try:
                undelivered = await self.router.deliver_local(Envelope(bounce_id, "", tuple(accounts)), spooled)
            except DeliveryFailure as e:
                # Nobody got it: the bounce waits in the queue and is retried like any mail.
                log.info("{queue_id}: bounce {bounce_id} not delivered at once: {text}", queue_id=message.id,
                         bounce_id=bounce_id, text=e.text)
            else:
                for address, failure in undelivered.items():
                    log.info("{queue_id}: bounce {bounce_id} not delivered to <{rcpt}>: {text}", queue_id=message.id,
                             bounce_id=bounce_id, rcpt=address, text=failure.text)
                log.info("{queue_id}: bounce {bounce_id} delivered to <{sender}>", queue_id=message.id, bounce_id=bounce_id, sender=sender)
                return
        await self.enqueue(bounce_id, "", [sender], spooled)
        log.info("{queue_id}: bounce {bounce_id} queued for <{sender}>", queue_id=message.id, bounce_id=bounce_id, sender=sender)
