"""swaks, the admin's SMTP swiss-army knife, as a second real SMTP client."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None, reason="needs swaks (apt-get install swaks)")


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--timeout", "20", *args], capture_output=True, text=True, timeout=60)


def test_swaks_to_mx_with_starttls(server):
    """swaks delivers to a hosted user over STARTTLS on the MX port, and is refused relaying."""
    ok = swaks("--server", f"127.0.0.1:{server.port}", "--tls", "--from", "x@remote.test", "--to", "bob@example.org",
               "--header", "Subject: via-swaks")
    assert ok.returncode == 0, ok.stdout
    assert any(b"Subject: via-swaks" in m for m in server.messages("bob@example.org"))
    relay = swaks("--server", f"127.0.0.1:{server.port}", "--from", "x@remote.test", "--to", "victim@elsewhere.test")
    assert relay.returncode != 0 and "550 5.7.1" in relay.stdout


def test_swaks_submission_auth(server):
    """swaks submits with AUTH LOGIN over implicit TLS on 465 and with AUTH PLAIN after STARTTLS on 587."""
    common = ["--from", "alice@example.org", "--to", "bob@example.org", "--auth-user", "alice@example.org",
              "--auth-password", "alice-password"]
    implicit = swaks("--server", f"127.0.0.1:{server.ports['submissions']}", "--tlsc", "--auth", "LOGIN", *common,
                     "--header", "Subject: swaks-465")
    assert implicit.returncode == 0, implicit.stdout
    starttls = swaks("--server", f"127.0.0.1:{server.ports['submission']}", "--tls", "--auth", "PLAIN", *common,
                     "--header", "Subject: swaks-587")
    assert starttls.returncode == 0, starttls.stdout
    stored = b"".join(server.messages("bob@example.org"))
    assert b"Subject: swaks-465" in stored and b"Subject: swaks-587" in stored
    wrong = swaks("--server", f"127.0.0.1:{server.ports['submission']}", "--tls", "--auth", "PLAIN",
                  "--from", "alice@example.org", "--to", "bob@example.org", "--auth-user", "alice@example.org", "--auth-password", "nope")
    assert wrong.returncode != 0 and "535 5.7.8" in wrong.stdout
