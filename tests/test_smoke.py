"""The shortest path through the platform: one message over the wire into a maildir."""

import smtplib
import subprocess

from conftest import message


def test_message_lands_in_maildir(server):
    """A message for a hosted user sent with smtplib is in that user's maildir after the 250."""
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("someone@remote.test", ["alice@example.org"], message("smoke"))
    assert any(b"Subject: smoke" in m for m in server.messages("alice@example.org"))


def test_message_lands_in_maildir_of_a_fresh_twistd(make_server, monkeypatch):
    """The same through the `twistd` script started from scratch, as an admin starts it
    (the other tests' servers are forked from a warm interpreter, tests/commands.py)."""
    monkeypatch.setenv("MAILPLAT_TEST_FRESH_TWISTD", "1")
    fresh = make_server()
    assert isinstance(fresh.process, subprocess.Popen), "the script itself, not a fork"
    with smtplib.SMTP("127.0.0.1", fresh.port) as client:
        client.sendmail("someone@remote.test", ["alice@example.org"], message("fresh"))
    assert any(b"Subject: fresh" in m for m in fresh.messages("alice@example.org"))
