"""`mailplat dkim keygen` and DKIM signing of what authenticated users send, over the wire."""

from __future__ import annotations

import re
import smtplib
import ssl
import stat
import subprocess

import dkim
import pytest

import commands
from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, message


@pytest.fixture
def site(tmp_path):
    """A server's folder and config, not started: keygen needs only the config, the server starts once the key is in it."""
    server = MailplatServer(tmp_path / "server", BASE_CONFIG)
    yield server
    server.stop()


def keygen(config, *args: str) -> subprocess.CompletedProcess[str]:
    return commands.run([MAILPLAT, "--config", str(config), "dkim", "keygen", *args], capture_output=True, text=True, timeout=60)


def published(output: str) -> tuple[str, bytes]:
    """The record name and its TXT value (strings joined) from keygen's output."""
    name, strings = re.search(r"^\s+(\S+)\. IN TXT (.*)$", output, re.M).groups()
    return name, "".join(re.findall(r'"([^"]*)"', strings)).encode()


def submit(server, raw: bytes, to: str = "bob@example.org") -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=context, timeout=20) as client:
        client.login("alice@example.org", "alice-password")
        client.sendmail("alice@example.org", [to], raw)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_then_signed_submission_verifies(site, algorithm):
    server = site
    result = keygen(server.config_path, "example.org", "--algorithm", algorithm, "--selector", "s1")
    assert result.returncode == 0, result.stderr
    key = server.root / "dkim" / "example.org.s1.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    name, record = published(result.stdout)
    assert name == "s1._domainkey.example.org" and f"k={algorithm}".encode() in record
    # The printed config snippet is what the server then uses.
    snippet = result.stdout.split("restart mailplat:\n", 1)[1].split("\n3.")[0]
    server.config_path.write_text(server.config_path.read_text() + "\n" + "\n".join(line.strip() for line in snippet.splitlines()) + "\n")
    server.start()

    submit(server, message("signed", sender="alice@example.org", to="bob@example.org"))
    delivered = next(m for m in server.messages("bob@example.org") if b"Subject: signed" in m)
    assert delivered.count(b"DKIM-Signature:") == 1
    signed = delivered.split(b"\r\n", 1)[1]  # the mailbox's Return-Path: is added after signing
    assert dkim.verify(signed, dnsfunc=lambda qname, timeout=5: record if qname == (name + ".").encode() else None)
    # A From header added on the way breaks it (From is oversigned).
    assert not dkim.verify(b"From: <boss@example.org>\r\n" + signed, dnsfunc=lambda qname, timeout=5: record)


def test_mail_from_a_domain_without_a_key_is_not_signed(site):
    server = site
    assert keygen(server.config_path, "example.org").returncode == 0
    server.config_path.write_text(server.config_path.read_text() + '\n[dkim."example.org"]\nselector = "mail"\nkey = "dkim/example.org.mail.key"\n')
    server.start()
    submit(server, message("unsigned", sender="alice@example.net", to="bob@example.org"))
    delivered = next(m for m in server.messages("bob@example.org") if b"Subject: unsigned" in m)
    assert b"DKIM-Signature" not in delivered


def test_keygen_refuses_to_overwrite_and_foreign_domains(site):
    server = site
    assert keygen(server.config_path, "example.org").returncode == 0
    again = keygen(server.config_path, "example.org")
    assert again.returncode == 1 and "exists" in again.stderr and "never overwritten" in again.stderr
    foreign = keygen(server.config_path, "elsewhere.test")
    assert foreign.returncode == 1 and "not one of the domains" in foreign.stderr
