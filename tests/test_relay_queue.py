"""The outbound queue over the wire while the remote is down: retries, `mailplat queue`, kill -9, expiry.

Each test stops the remote, so each has its own (``remote``) and its own
sending server; the DNS server is the module's.  Split from test_relay.py.
"""

from __future__ import annotations

import re
import signal

from conftest import wait_for
from relaying import bounces, dns, dsn_recipients, queue_cli, remote, sender_server, submit

__all__ = ["dns", "remote"]  # fixtures


def test_temporary_failure_retries_then_flush(make_server, dns, remote):
    """While the remote is down the message stays queued with its error; after it returns, `queue flush` delivers it."""
    local = sender_server(make_server, dns, remote, retry=3600)
    remote.stop()
    submit(local, ["carol@elsewhere.test"], "retried")
    wait_for(lambda: "attempts=1" in queue_cli(local, "list").stdout, what="a failed attempt")
    listing = queue_cli(local, "list").stdout
    assert "<carol@elsewhere.test>  pending" in listing and "cannot connect" in listing
    remote.start()
    assert queue_cli(local, "flush").returncode == 0
    wait_for(lambda: any(b"Subject: retried" in m for m in remote.messages("carol@elsewhere.test")), what="the retried message")


def test_kill_9_keeps_the_queue(make_server, dns, remote):
    """A queued message survives kill -9 of the server and is delivered exactly once after the restart."""
    local = sender_server(make_server, dns, remote, retry=3600)
    remote.stop()
    submit(local, ["carol@elsewhere.test"], "survivor")
    wait_for(lambda: "attempts=1" in queue_cli(local, "list").stdout, what="a failed attempt")
    assert local.process is not None
    local.process.send_signal(signal.SIGKILL)
    local.process.wait(10)
    local.process = None
    remote.start()
    local.start()
    queue_cli(local, "flush")
    wait_for(lambda: any(b"Subject: survivor" in m for m in remote.messages("carol@elsewhere.test")), what="the message after restart")
    wait_for(lambda: "removed from the queue" in local.log(), what="the queue to empty")
    assert sum(b"Subject: survivor" in m for m in remote.messages("carol@elsewhere.test")) == 1


def test_queue_remove(make_server, dns, remote):
    """`mailplat queue remove ID` drops a queued message; an unknown id is an error."""
    local = sender_server(make_server, dns, remote, retry=3600)
    remote.stop()
    submit(local, ["carol@elsewhere.test"], "to-remove")
    wait_for(lambda: "attempts=1" in queue_cli(local, "list").stdout, what="a failed attempt")
    queue_id = queue_cli(local, "list").stdout.split()[0]
    removed = queue_cli(local, "remove", queue_id)
    assert removed.returncode == 0 and queue_id in removed.stdout
    assert queue_cli(local, "list").stdout.strip().endswith("0 queued message(s)")
    assert queue_cli(local, "remove", queue_id).returncode == 1
    wait_for(lambda: f"{queue_id}: removed from the queue by the admin" in local.log(), what="the removal in the server's log")


def test_expiry_bounces_with_4_4_7(make_server, dns, remote):
    """A message that cannot be delivered within max_age bounces with status 4.4.7 and the last error."""
    local = sender_server(make_server, dns, remote, relay="max_age = 1\n")
    remote.stop()
    submit(local, ["carol@elsewhere.test"], "expires")
    wait_for(lambda: bounces(local), timeout=20, what="the expiry bounce")
    text = bounces(local)[0].as_string()
    assert "Status: 4.4.7" in text and "cannot connect" in text


def test_permanent_failure_bounces_before_the_others_are_done(make_server, dns, remote):
    """A 5xx bounces at once while another recipient still retries; that one's bounce comes later and names only it."""
    local = sender_server(make_server, dns, remote, relay="max_age = 3\n")
    submit(local, ["nobody@elsewhere.test", "carol@offline.test"], "bounce-at-once")
    wait_for(lambda: len(bounces(local)) == 2, timeout=30, what="both bounces")
    first, second = bounces(local)
    assert dsn_recipients(first) == ["nobody@elsewhere.test"]
    assert dsn_recipients(second) == ["carol@offline.test"] and "Status: 4.4.7" in second.as_string()
    log = local.log()
    # The first bounce went out before carol@offline.test was given up (not at the end, with it).
    first_bounce = re.search(r": bounce \w+ delivered to <alice@example.org>", log)
    assert first_bounce is not None and first_bounce.start() < log.index("<carol@offline.test> failed: gave up")
    wait_for(lambda: "removed from the queue" in local.log(), what="the queue to empty")
    assert len(bounces(local)) == 2
