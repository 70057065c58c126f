"""What the relay tests share: a second mailplat as the remote MX, a DNS server
pointing at it, our sending server, and ways to submit mail and read the outcome.

The relay tests are in several files (test_relay*.py) so that they run side
by side; a test that only needs a working remote uses the module's shared
one (``shared_remote``, ``shared_dns``), a test that stops or reconfigures
the remote gets its own (``remote``).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import smtplib
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

import commands
from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, merge_toml, message
from dnsserver import DNSServer

ALICE = ("alice@example.org", "alice-password")
CAROL = {"carol@elsewhere.test": "carol-password"}

REMOTE_CONFIG = """\
hostname = "mx.elsewhere.test"
data_dir = "var"
domains = ["elsewhere.test"]

[listen]
smtp = "tcp:{port}:interface=127.0.0.1"

[auth]
backend = "passwd-file"
path = "users.passwd"

[mailbox]
backend = "maildir"
path = "mail"
"""

ZONES = {
    "elsewhere.test": {"MX": [[10, "mx.elsewhere.test"]]},
    "mx.elsewhere.test": {"A": ["127.0.0.1"]},
    "nomail.test": {"MX": [[0, "."]]},
    "down.test": {"MX": [[10, "mx.down.test"]]},
    "mx.down.test": {"A": ["127.0.0.1"]},
    "a-only.test": {"A": ["127.0.0.1"]},
    "six.test": {"MX": [[10, "mx.six.test"]]},
    "mx.six.test": {"AAAA": ["::1"]},
    # Nothing listens on 127.0.0.2: every attempt fails at connect.
    "offline.test": {"MX": [[10, "mx.offline.test"]]},
    "mx.offline.test": {"A": ["127.0.0.2"]},
    # Its best MX is our own hostname.
    "loop.test": {"MX": [[10, "mail.example.org"]]},
    "mail.example.org": {"A": ["127.0.0.1"]},
    # Another name for us (a test's relay port is then its own SMTP port).
    "mirror.test": {"MX": [[10, "mx.mirror.test"]]},
    "mx.mirror.test": {"A": ["127.0.0.1"]},
}

FORWARDING = """\
[aliases]
"list@example.org" = ["alice@example.org", "carol@elsewhere.test"]
"fwd@example.org" = "nobody@elsewhere.test"
"""


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def free_port() -> int:
    """A port nothing listens on now, so that a server can restart on it."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return int(port)


def remote_config() -> str:
    return REMOTE_CONFIG.format(port=free_port())


@pytest.fixture
def remote(make_server: Any) -> MailplatServer:
    """A second mailplat hosting elsewhere.test with the user carol, on a fixed port so that it can restart on it."""
    return make_server(config=remote_config(), users=CAROL, name="remote")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def shared_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """The same, shared by a module's tests that leave it running as it is."""
    server = MailplatServer(tmp_path_factory.mktemp("remote"), remote_config(), CAROL)
    server.start()
    yield server
    server.stop()


def dns_server() -> DNSServer:
    """A DNS server whose MX for elsewhere.test (and the others in ZONES) points at 127.0.0.1."""
    return DNSServer().start({"zones": ZONES})


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    """One DNS server per module: its answers never change, the remote's port is in our [relay] port."""
    server = dns_server()
    yield server
    server.stop()


def sender_config(dns: DNSServer, remote: MailplatServer, retry: float = 1, relay: str = "", extra: str = "") -> str:
    """Our server: MX lookups through the test DNS server, remote port = the other mailplat's; ``extra`` TOML merged in."""
    return merge_toml(
        BASE_CONFIG, f"[dns]\nservers = [\"127.0.0.1:{dns.port}\"]\n[relay]\nport = {remote.port}\nretry_initial = {retry}\n{relay}\n{extra}",
    )


def sender_server(make_server: Any, dns: DNSServer, remote: MailplatServer, retry: float = 1, relay: str = "", extra: str = "") -> MailplatServer:
    return make_server(config=sender_config(dns, remote, retry, relay, extra), name="local")  # type: ignore[no-any-return]


def submit(server: MailplatServer, to: list[str], subject: str) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_context(), timeout=20) as client:
        client.login(*ALICE)
        client.sendmail("alice@example.org", to, message(subject, sender="alice@example.org", to=to[0]))


def queue_cli(server: MailplatServer, *args: str) -> subprocess.CompletedProcess[str]:
    return commands.run([MAILPLAT, "--config", str(server.config_path), "queue", *args], text=True, timeout=60)


def bounces(server: MailplatServer, subject: str | None = None) -> list[email.message.EmailMessage]:
    """The DSNs in alice's mailbox, in order; with ``subject``, those about the message with that subject."""
    found = []
    for raw in server.messages("alice@example.org"):
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        if parsed.get_content_type() == "multipart/report" and (subject is None or f"Subject: {subject}\r\n".encode() in raw):
            found.append(parsed)  # type: ignore[arg-type]
    return found


def relayed(remote: MailplatServer, subject: str) -> bool:
    return any(f"Subject: {subject}".encode() in m for m in remote.messages("carol@elsewhere.test"))


def dsn_recipients(dsn: email.message.EmailMessage) -> list[str]:
    status = next(p for p in dsn.iter_parts() if p.get_content_type() == "message/delivery-status").as_string()
    return [line.split(";", 1)[1].strip() for line in status.splitlines() if line.startswith("Final-Recipient:")]


def srs_secret(server: MailplatServer) -> str:
    path = server.root / "var" / "srs.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return next(line for line in path.read_text().splitlines() if line and not line.startswith("#"))


def mx_send(port: int, sender: str, rcpt: str, subject: str) -> tuple[int, bytes]:
    """Mail from an unauthenticated client on the MX port: the RCPT's reply, or DATA's once RCPT is accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("mx.sender.test")
        client.mail(sender)
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text
        return client.data(message(subject, sender=sender or "mailer-daemon@elsewhere.test", to=rcpt))


class LogMark:
    """Where a shared server's log stood when a test began: the test reads only what came after."""

    def __init__(self, server: MailplatServer) -> None:
        self.server = server
        self.offset = len(server.log())

    def log(self) -> str:
        return self.server.log()[self.offset:]
