"""The shortest path through the platform: one message over the wire into a maildir."""

import smtplib

from conftest import message


def test_message_lands_in_maildir(server):
    """A message for a hosted user sent with smtplib is in that user's maildir after the 250."""
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("someone@remote.test", ["alice@example.org"], message("smoke"))
    assert any(b"Subject: smoke" in m for m in server.messages("alice@example.org"))
