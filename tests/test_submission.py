"""Submission (587 with STARTTLS, 465 with implicit TLS): AUTH after TLS, then the user's own mail."""

from __future__ import annotations

import base64
import smtplib
import ssl
import time

import pytest

from conftest import message

ALICE = ("alice@example.org", "alice-password")


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def submit(server, implicit: bool = False) -> smtplib.SMTP:
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_context(), timeout=20)
    else:
        client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20)
        client.starttls(context=tls_context())
    client.ehlo()
    return client


def test_no_auth_before_tls(server):
    """Before STARTTLS, EHLO offers STARTTLS and no AUTH; AUTH gets 538 and MAIL gets 530."""
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=20) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.org\0alice-password").decode())
        assert code == 538 and text.startswith(b"5.7.11")
        code, text = client.docmd("MAIL", "FROM:<alice@example.org>")
        assert code == 530 and text.startswith(b"5.7.0")


def test_mail_needs_auth_after_tls(server):
    """Inside TLS, EHLO offers AUTH PLAIN LOGIN and MAIL without AUTH still gets 530 5.7.0."""
    with submit(server) as client:
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert client.docmd("MAIL", "FROM:<alice@example.org>")[0] == 530


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("implicit", [False, True])
def test_auth_and_send(server, mechanism, implicit):
    """AUTH PLAIN and LOGIN work on 587 and 465, and the message is delivered locally with ESMTPSA in Received."""
    subject = f"submitted-{mechanism}-{implicit}"
    with submit(server, implicit) as client:
        client.user, client.password = ALICE
        code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"), initial_response_ok=mechanism == "PLAIN")
        assert code == 235
        client.sendmail("alice@example.org", ["bob@example.org"], message(subject, sender="alice@example.org", to="bob@example.org"))
    stored = next(m for m in server.messages("bob@example.org") if subject.encode() in m)
    assert b"with ESMTPSA id" in stored
    assert b"alice-password" not in stored


def test_wrong_password_delayed_then_blocked(make_server):
    """A wrong password gets 535 5.7.8 after the delay; past the limit the address gets 454 4.7.0."""
    server = make_server("[login]\nmax_login_failures = 2\n")
    for _ in range(2):
        with submit(server, implicit=True) as client:
            started = time.monotonic()
            client.user, client.password = "alice@example.org", "wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                client.auth("PLAIN", client.auth_plain)
            assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
            assert time.monotonic() - started >= 0.3
    with submit(server, implicit=True) as client:
        code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.org\0alice-password").decode())
        assert code == 454 and text.startswith(b"4.7.0")


@pytest.mark.parametrize(
    "sender, accepted",
    [
        ("alice@example.org", True),
        ("Alice+lists@Example.org", True),
        ("postmaster@example.org", True),  # an alias of alice
        ("bob@example.org", False),
        ("alice@elsewhere.test", False),
        ("", False),
    ],
)
def test_sender_must_belong_to_the_user(server, sender, accepted):
    """An authenticated user may send only as their own address or an alias of theirs (else 553 5.7.1)."""
    with submit(server) as client:
        client.login(*ALICE)
        code, text = client.docmd("MAIL", f"FROM:<{sender}>")
        if accepted:
            assert code == 250
        else:
            assert code == 553 and text.startswith(b"5.7.1")


def test_date_and_message_id_added_when_missing(server):
    """Date: and Message-ID: are added when the client left them out, and kept when it did not (RFC 6409 8)."""
    bare = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: no-date\r\n\r\nbody\r\n"
    full = message("with-date", sender="alice@example.org", to="bob@example.org")
    with submit(server) as client:
        client.login(*ALICE)
        client.sendmail("alice@example.org", ["bob@example.org"], bare)
        client.sendmail("alice@example.org", ["bob@example.org"], b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n" + full)
    stored = server.messages("bob@example.org")
    no_date = next(m for m in stored if b"Subject: no-date" in m)
    headers = no_date.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nDate: " in headers and b"\r\nMessage-ID: <" in headers
    assert no_date.endswith(b"\r\n\r\nbody\r\n")
    kept = next(m for m in stored if b"Subject: with-date" in m)
    assert kept.count(b"Date: ") == 1 and b"Date: Mon, 1 Jan 2024" in kept
    assert kept.lower().count(b"message-id:") == 1


@pytest.mark.parametrize("recipient", ["<@example.org:x@elsewhere.test>", "<x%elsewhere.test@example.org>", '<"x@y"@elsewhere.test>', "<x@[127.0.0.1]>"])
def test_routing_tricks_refused_even_when_authenticated(server, recipient):
    """Source routes, %-hacks, quoted local parts and address literals get 550 5.7.1 even from an authenticated user."""
    with submit(server) as client:
        client.login(*ALICE)
        client.mail("alice@example.org")
        code, text = client.docmd("RCPT", f"TO:{recipient}")
        assert code == 550 and text.startswith(b"5.7.1")


@pytest.mark.parametrize("local", ['a""b', "a\\b", ".a..b.", "a..b", ".a", "a.", "a(b)", "a[b]"])
def test_remote_local_part_must_be_a_dot_string(server, local):
    """A remote recipient whose local part is no RFC 5321 Dot-string is never queued: 501 5.1.3 at RCPT."""
    with submit(server) as client:
        client.login(*ALICE)
        client.mail("alice@example.org")
        code, text = client.docmd("RCPT", f"TO:<{local}@elsewhere.test>")
        assert code == 501 and text.startswith(b"5.1.3") and b"dot-string" in text, (code, text)
        code, text = client.docmd("RCPT", "TO:<a.b+c@elsewhere.test>")
        assert code == 250, (code, text)


FLAKY_AUTH = '''
from zope.interface import implementer
from twisted.plugin import IPlugin
from mailplat.interfaces import Account, IAuthBackend, IBackendFactory, TemporaryFailure

@implementer(IAuthBackend)
class Flaky:
    def authenticate(self, address, password):
        raise TemporaryFailure("the user database is down")

    def lookup(self, address):
        return Account(address)

@implementer(IPlugin, IBackendFactory)
class Factory:
    kind = "auth"
    name = "flaky"

    def build(self, options, context):
        return Flaky()

factory = Factory()
'''


def test_auth_backend_down_is_454(make_server, tmp_path, monkeypatch):
    """RFC 4954 6: when the auth backend cannot answer, the client hears 454 4.7.0 (retry later), not 535."""
    from conftest import BASE_CONFIG

    (tmp_path / "flakyauth.py").write_text(FLAKY_AUTH)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    server = make_server(config=BASE_CONFIG.replace('backend = "passwd-file"\npath = "users.passwd"', 'backend = "flakyauth:factory"'))
    with submit(server) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(*ALICE)
    assert refused.value.smtp_code == 454 and refused.value.smtp_error.startswith(b"4.7.0")
    assert "the user database is down" in server.log() and "Traceback" not in server.log()
