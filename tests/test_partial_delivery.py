"""A message whose delivery fails for some local recipients: the others get
it once, and the queue retries the rest (the client hears 250)."""

from __future__ import annotations

import smtplib

import commands
from conftest import MAILPLAT, message, wait_for


def copies(server, address: str, subject: str) -> int:
    return sum(f"Subject: {subject}\r\n".encode() in m for m in server.messages(address))


def test_one_mailbox_failing_does_not_hold_the_others(make_server):
    server = make_server()
    # bob's maildir cannot be created: a file stands where it goes.
    blocker = server.maildir("bob@example.org")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        refused = client.sendmail("someone@remote.test", ["alice@example.org", "bob@example.org"], message("partial"))
    assert refused == {}
    assert copies(server, "alice@example.org", "partial") == 1
    wait_for(lambda: "<bob@example.org> pending" in server.log(), what="bob's retry to be scheduled")

    blocker.unlink()
    flushed = commands.run([MAILPLAT, "--config", str(server.config_path), "queue", "flush"], capture_output=True, text=True, timeout=60)
    assert flushed.returncode == 0, flushed.stderr
    wait_for(lambda: copies(server, "bob@example.org", "partial") == 1, what="bob's copy after the flush")
    wait_for(lambda: "removed from the queue" in server.log(), what="the queue to empty")
    assert copies(server, "alice@example.org", "partial") == 1


def test_a_queued_recipient_keeps_the_quarantine_folder(make_server, tmp_path, monkeypatch):
    """A message a filter quarantined still goes to the Quarantine folder when its delivery is retried from the queue."""
    from test_filters import SCRIPTED_FILTER

    (tmp_path / "scriptedfilter.py").write_text(SCRIPTED_FILTER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    server = make_server('[[filter]]\nbackend = "scriptedfilter:factory"\nsteps = { data = "quarantine" }\n')
    blocker = server.maildir("bob@example.org")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("someone@remote.test", ["alice@example.org", "bob@example.org"], message("held"))
    wait_for(lambda: "<bob@example.org> pending" in server.log(), what="bob's retry to be scheduled")
    blocker.unlink()
    commands.run([MAILPLAT, "--config", str(server.config_path), "queue", "flush"], capture_output=True, timeout=60, check=True)
    held = server.maildir("bob@example.org") / ".Quarantine" / "new"
    wait_for(lambda: held.is_dir() and len(list(held.iterdir())) == 1, what="bob's copy in his Quarantine folder")
    assert server.messages("bob@example.org") == []
    assert len(list((server.maildir("alice@example.org") / ".Quarantine" / "new").iterdir())) == 1
