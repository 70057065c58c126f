"""The queue's retry schedule, with time from a task.Clock: backoff doubling
from retry_initial up to retry_max, giving up after max_age, and the bounce.

Real files (the queue folder, the group commit's fsyncs); the clock is the
only thing that is not real, so no test waits for a retry to come due.
"""

from __future__ import annotations

import queue
import threading
import time
import types

from twisted.internet import task
from zope.interface import implementer

from inprocess import SyncThreadPool
from mailplat.addresses import AliasResolver
from mailplat.config import RelaySettings
from mailplat.interfaces import Account, IDeliveryBackend, PartialFailure, PermanentFailure, SpooledMessage, TemporaryFailure
from mailplat.plugins import call
from mailplat.queue.runner import QueueRunner
from mailplat.queue.store import Queue
from mailplat.routing import Router


class ClockReactor(task.Clock):
    """A Clock that also takes calls from other threads (the group commit's),
    run when the test pumps."""

    def __init__(self) -> None:
        super().__init__()
        self.main = threading.get_ident()
        self.from_threads: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        if threading.get_ident() == self.main:
            f(*args, **kwargs)
        else:
            self.from_threads.put((f, args, kwargs))

    def pump(self, until, timeout: float = 10.0) -> None:
        """Run the other threads' calls until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            try:
                f, args, kwargs = self.from_threads.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("timed out waiting for the queue")
            f(*args, **kwargs)


@implementer(IDeliveryBackend)
class Flaky:
    """Local delivery that fails ``failures`` times, noting when each attempt came."""

    def __init__(self, clock: task.Clock, failures: int) -> None:
        self.clock = clock
        self.failures = failures
        self.attempts: list[float] = []
        self.delivered: list[tuple[str, ...]] = []

    def deliver(self, envelope, message) -> None:
        self.attempts.append(self.clock.seconds())
        if len(self.attempts) <= self.failures:
            raise TemporaryFailure("mailbox server busy")
        self.delivered.append(tuple(a.address for a in envelope.recipients))


def runner_for(tmp_path, delivery, reactor, **relay) -> QueueRunner:
    resolver = AliasResolver(("example.org",), {}, lambda address: call(lambda: Account(address)))
    router = Router(delivery)
    runner = QueueRunner(
        Queue(str(tmp_path / "queue")), RelaySettings(**relay), "", "mail.example.org", None, resolver, router, reactor,
        types.SimpleNamespace(blocking=SyncThreadPool()),
    )
    router.queue = runner
    runner.startService()
    return runner


def stop(runner, reactor) -> None:
    """Stop the runner and wait for its group commit's thread to end."""
    stopped: list = []
    runner.stopService().addBoth(stopped.append)
    reactor.pump(lambda: stopped)
    assert stopped == [None]


def enqueue(runner, reactor, queue_id="Q1", sender="bob@example.org") -> None:
    content = b"Subject: hi\r\n\r\nHello.\r\n"
    done = []
    runner.enqueue(queue_id, sender, ["alice@example.org"], SpooledMessage("", len(content), sender, content)).addBoth(done.append)
    reactor.pump(lambda: done)
    assert done == [None]


def test_retries_back_off_from_retry_initial_to_retry_max(tmp_path):
    reactor = ClockReactor()
    delivery = Flaky(reactor, failures=5)
    runner = runner_for(tmp_path, delivery, reactor, retry_initial=60.0, retry_max=200.0)
    try:
        enqueue(runner, reactor)
        reactor.pump(lambda: len(delivery.attempts) == 1)
        # Due after 60 s, then 120, then 200 (capped), 200...
        for expected in (60.0, 180.0, 380.0, 580.0, 780.0):
            seen = len(delivery.attempts)
            reactor.advance(expected - reactor.seconds() - 1.0)
            assert len(delivery.attempts) == seen, f"attempt before {expected}"
            reactor.advance(1.0)
            reactor.pump(lambda: len(delivery.attempts) == seen + 1)
        assert delivery.attempts == [0.0, 60.0, 180.0, 380.0, 580.0, 780.0]
        assert delivery.delivered == [("alice@example.org",)]
        reactor.pump(lambda: runner.queue.ids() == [])
    finally:
        stop(runner, reactor)


def test_gives_up_after_max_age_and_bounces(tmp_path):
    """A recipient still failing after max_age is given up; the bounce to the sender, one of ours, is
    queued when it cannot be delivered at once, and retried on the same schedule as any mail."""
    reactor = ClockReactor()
    delivery = Flaky(reactor, failures=6)
    runner = runner_for(tmp_path, delivery, reactor, retry_initial=600.0, retry_max=3600.0, max_age=3000.0)
    try:
        enqueue(runner, reactor)
        reactor.pump(lambda: len(delivery.attempts) == 1)
        # Tries at 0, 600 and 1800 (600 + 1200); at 4200 (1800 + 2400) it is past max_age: given up.
        for expected in (600.0, 1800.0, 4200.0):
            seen = len(delivery.attempts)
            reactor.advance(expected - reactor.seconds())
            reactor.pump(lambda: len(delivery.attempts) > seen)
        # At 4200 the bounce to bob is tried at once (fails), queued, run at once (fails), then due 600 s later.
        reactor.pump(lambda: len(delivery.attempts) == 6 and not runner.in_flight)
        assert runner.queue.ids() != ["Q1"] and len(runner.queue.ids()) == 1
        reactor.advance(599.0)
        assert len(delivery.attempts) == 6
        reactor.advance(1.0)
        reactor.pump(lambda: delivery.delivered)
        assert delivery.delivered == [("bob@example.org",)]
        assert delivery.attempts == [0.0, 600.0, 1800.0, 4200.0, 4200.0, 4200.0, 4800.0]
        reactor.pump(lambda: runner.queue.ids() == [] and not runner.in_flight)
    finally:
        stop(runner, reactor)


@implementer(IDeliveryBackend)
class PerRecipient:
    """Local delivery whose answer depends on the recipient: ``permanent`` ones never take mail,
    ``temporary`` ones not yet; the others (the sender's bounces among them) get it, noted with the time."""

    def __init__(self, clock: task.Clock, permanent: set[str], temporary: set[str]) -> None:
        self.clock = clock
        self.permanent = permanent
        self.temporary = temporary
        self.delivered: list[tuple[float, str, str, bytes]] = []

    def deliver(self, envelope, message) -> None:
        failed = {}
        for account in envelope.recipients:
            if account.address in self.permanent:
                failed[account] = PermanentFailure("no such mailbox")
            elif account.address in self.temporary:
                failed[account] = TemporaryFailure("mailbox server busy")
            else:
                with message.open() as f:
                    self.delivered.append((self.clock.seconds(), envelope.sender, account.address, f.read()))
        if failed:
            raise PartialFailure(failed)

    def bounces(self) -> list[tuple[float, bytes]]:
        return [(when, content) for when, sender, _, content in self.delivered if sender == ""]


def test_permanent_failure_bounces_at_once_and_the_final_bounce_only_the_rest(tmp_path):
    """A recipient that fails permanently is bounced on that attempt, while another still retries; when that one
    is given up, the second bounce names only it: one DSN per batch, never two for a recipient."""
    reactor = ClockReactor()
    delivery = PerRecipient(reactor, permanent={"gone@example.org"}, temporary={"slow@example.org"})
    runner = runner_for(tmp_path, delivery, reactor, retry_initial=600.0, retry_max=3600.0, max_age=3000.0)
    try:
        content = b"Subject: to three\r\n\r\nHello.\r\n"
        done: list = []
        runner.enqueue(
            "Q1", "bob@example.org", ["gone@example.org", "slow@example.org", "alice@example.org"],
            SpooledMessage("", len(content), "bob@example.org", content),
        ).addBoth(done.append)
        reactor.pump(lambda: done and not runner.in_flight)
        [(when, first)] = delivery.bounces()
        assert when == 0.0
        assert b"Final-Recipient: rfc822; gone@example.org" in first and b"slow@example.org" not in first
        assert [r.state for r in runner.queue.load("Q1").recipients] == ["failed", "pending", "done"]
        # slow@ is tried at 600 and 1800; at 4200 it is past max_age and given up.
        for expected in (600.0, 1800.0, 4200.0):
            reactor.advance(expected - reactor.seconds())
            reactor.pump(lambda: not runner.in_flight)
        reactor.pump(lambda: runner.queue.ids() == [] and not runner.in_flight)
        assert [when for when, _ in delivery.bounces()] == [0.0, 4200.0]
        last = delivery.bounces()[1][1]
        assert b"Final-Recipient: rfc822; slow@example.org" in last and b"gone@example.org" not in last
        assert b"Status: 4.4.7" in last
    finally:
        stop(runner, reactor)


def test_every_recipient_failing_at_once_is_one_bounce(tmp_path):
    """Two recipients that fail permanently in the same attempt are told in one DSN, and the message leaves the queue."""
    reactor = ClockReactor()
    delivery = PerRecipient(reactor, permanent={"gone@example.org", "left@example.org"}, temporary=set())
    runner = runner_for(tmp_path, delivery, reactor)
    try:
        content = b"Subject: to two\r\n\r\nHello.\r\n"
        done: list = []
        runner.enqueue(
            "Q1", "bob@example.org", ["gone@example.org", "left@example.org"], SpooledMessage("", len(content), "bob@example.org", content),
        ).addBoth(done.append)
        reactor.pump(lambda: done and runner.queue.ids() == [] and not runner.in_flight)
        [(_, dsn)] = delivery.bounces()
        assert b"Final-Recipient: rfc822; gone@example.org" in dsn and b"Final-Recipient: rfc822; left@example.org" in dsn
    finally:
        stop(runner, reactor)
