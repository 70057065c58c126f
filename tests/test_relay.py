"""The outbound queue over the wire: one mailplat submits, relays to another mailplat acting as a remote MX."""

from __future__ import annotations

import email
import email.policy
import re
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import time

import pytest
import srslib

import commands
from conftest import BASE_CONFIG, MAILPLAT, merge_toml, message, wait_for
from dnsserver import DNSServer

ALICE = ("alice@example.org", "alice-password")

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


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def remote(make_server):
    """A second mailplat hosting elsewhere.test with the user carol, on a fixed port so that it can restart on it."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return make_server(config=REMOTE_CONFIG.format(port=port), users={"carol@elsewhere.test": "carol-password"}, name="remote")


@pytest.fixture
def dns(remote):
    """A DNS server whose MX for elsewhere.test points at 127.0.0.1."""
    server = DNSServer().start({
        "zones": {
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
    })
    yield server
    server.stop()


def sender_server(make_server, dns, remote, retry: float = 1, relay: str = "", extra: str = ""):
    """Our server: MX lookups through the test DNS server, remote port = the other mailplat's; ``extra`` TOML merged in."""
    return make_server(
        f"[dns]\nservers = [\"127.0.0.1:{dns.port}\"]\n[relay]\nport = {remote.port}\nretry_initial = {retry}\n{relay}\n{extra}", name="local"
    )


def submit(server, to: list[str], subject: str) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_context(), timeout=20) as client:
        client.login(*ALICE)
        client.sendmail("alice@example.org", to, message(subject, sender="alice@example.org", to=to[0]))


def queue_cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    return commands.run([MAILPLAT, "--config", str(server.config_path), "queue", *args], capture_output=True, text=True, timeout=60)


def bounces(server) -> list[email.message.EmailMessage]:
    found = []
    for raw in server.messages("alice@example.org"):
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        if parsed.get_content_type() == "multipart/report":
            found.append(parsed)
    return found


def test_relay_through_mx(make_server, dns, remote):
    """Mail submitted for another domain is relayed to that domain's MX, found through DNS, and leaves the queue."""
    local = sender_server(make_server, dns, remote)
    submit(local, ["carol@elsewhere.test", "bob@example.org"], "to-the-world")
    wait_for(lambda: any(b"Subject: to-the-world" in m for m in remote.messages("carol@elsewhere.test")), what="the relayed message")
    assert any(b"Subject: to-the-world" in m for m in local.messages("bob@example.org"))
    wait_for(lambda: "removed from the queue" in local.log(), what="the queue to empty")
    assert queue_cli(local, "list").stdout.strip().endswith("0 queued message(s)")


def test_relay_through_smarthost(make_server, remote):
    """With [relay] smarthost every message goes to that host, no DNS needed."""
    local = make_server(f'[relay]\nsmarthost = "127.0.0.1:{remote.port}"\n', name="local")
    submit(local, ["carol@elsewhere.test"], "via-smarthost")
    wait_for(lambda: any(b"Subject: via-smarthost" in m for m in remote.messages("carol@elsewhere.test")), what="the relayed message")


def test_remote_5xx_bounces_to_sender(make_server, dns, remote):
    """A 5xx from the remote bounces: the sender gets a DSN naming the recipient and the remote's reply, and it is never bounced again."""
    local = sender_server(make_server, dns, remote)
    submit(local, ["nobody@elsewhere.test"], "will-bounce")
    wait_for(lambda: bounces(local), what="the bounce")
    [dsn] = bounces(local)
    status = next(p for p in dsn.iter_parts() if p.get_content_type() == "message/delivery-status").as_string()
    assert "Final-Recipient: rfc822; nobody@elsewhere.test" in status
    assert "Status: 5.1.1" in status and "550 5.1.1" in status
    assert b"Subject: will-bounce" in dsn.as_bytes()
    assert local.messages("alice@example.org")[-1].startswith(b"Return-Path: <>")


def test_null_mx_bounces_at_once(make_server, dns, remote):
    """A domain with a null MX (RFC 7505) bounces at once with 5.1.10."""
    local = sender_server(make_server, dns, remote)
    submit(local, ["someone@nomail.test"], "null-mx")
    wait_for(lambda: bounces(local), what="the bounce")
    assert "Status: 5.1.10" in bounces(local)[0].as_string()


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


def test_mx_port_never_relays(make_server, dns, remote):
    """Even with a working outbound queue, the MX port refuses other domains for unauthenticated clients."""
    local = sender_server(make_server, dns, remote)
    with smtplib.SMTP("127.0.0.1", local.port, timeout=20) as client:
        client.ehlo()
        client.mail("x@remote.test")
        code, text = client.rcpt("carol@elsewhere.test")
    assert code == 550 and text.startswith(b"5.7.1")


def test_a_record_fallback(make_server, dns, remote):
    """A domain without MX records is reached at its own address (RFC 5321 5.1)."""
    remote.stop()
    remote.config_path.write_text(remote.config_path.read_text().replace('domains = ["elsewhere.test"]', 'domains = ["elsewhere.test", "a-only.test"]'))
    remote.start()
    local = sender_server(make_server, dns, remote)
    submit(local, ["carol@a-only.test"], "a-fallback")
    # The remote answered (it has no such user): the A record led to it.
    wait_for(lambda: "<carol@a-only.test> failed: 550 5.1.1" in local.log(), what="the remote's answer")


def test_tls_required_and_opportunistic(make_server, dns):
    """With tls = "required" a remote without STARTTLS keeps the mail queued; a remote with it gets the mail over TLS."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    plain_remote = make_server(config=REMOTE_CONFIG.format(port=port), users={"carol@elsewhere.test": "carol-password"}, name="plain")
    local = sender_server(make_server, dns, plain_remote, retry=3600, relay='tls = "required"\n')
    submit(local, ["carol@elsewhere.test"], "needs-tls")
    wait_for(lambda: "does not offer STARTTLS" in queue_cli(local, "list").stdout, what="the refusal to send in clear")
    plain_remote.stop()
    tls_config = REMOTE_CONFIG.format(port=port) + '\n[tls]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n'
    plain_remote.config_path.write_text(tls_config)
    plain_remote.start()
    queue_cli(local, "flush")
    wait_for(lambda: any(b"Subject: needs-tls" in m for m in plain_remote.messages("carol@elsewhere.test")), what="the message over TLS")
    stored = next(m for m in plain_remote.messages("carol@elsewhere.test") if b"Subject: needs-tls" in m)
    assert b"with ESMTPS id" in stored


def test_expiry_bounces_with_4_4_7(make_server, dns, remote):
    """A message that cannot be delivered within max_age bounces with status 4.4.7 and the last error."""
    local = sender_server(make_server, dns, remote, relay="max_age = 1\n")
    remote.stop()
    submit(local, ["carol@elsewhere.test"], "expires")
    wait_for(lambda: bounces(local), timeout=20, what="the expiry bounce")
    text = bounces(local)[0].as_string()
    assert "Status: 4.4.7" in text and "cannot connect" in text


def test_remote_4xx_keeps_the_recipient_queued(make_server, dns, remote):
    """A 4xx for one recipient keeps just that one queued; it is delivered on the retry, and the other is not sent twice."""
    remote.stop()
    remote.config_path.write_text(remote.config_path.read_text() + "\n[smtp]\nmax_recipients = 1\n")
    remote.start()
    local = sender_server(make_server, dns, remote)
    submit(local, ["carol+first@elsewhere.test", "carol+second@elsewhere.test"], "four-xx")
    wait_for(lambda: "<carol+second@elsewhere.test> pending: 452 4.5.3" in local.log(), what="the 452")
    wait_for(lambda: "relayed to <carol+second@elsewhere.test>" in local.log(), timeout=20, what="the retry")
    copies = [m for m in remote.messages("carol@elsewhere.test") if b"Subject: four-xx" in m]
    assert len(copies) == 2
    assert b"for <carol+first@elsewhere.test>" in b"".join(copies) and b"for <carol+second@elsewhere.test>" in b"".join(copies)


def test_smarthost_login(make_server):
    """With username and password the relay logs in to the smarthost after STARTTLS (its submission port): the smarthost then judges the sender, not the login."""
    smarthost = make_server(
        config=REMOTE_CONFIG.format(port=0).replace(
            "[listen]\n", '[listen]\nsubmission = "tcp:0:interface=127.0.0.1"\n'
        ) + '\n[tls]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n',
        users={"carol@elsewhere.test": "carol-password"}, name="smarthost",
    )
    relay = f'[relay]\nsmarthost = "127.0.0.1:{smarthost.ports["submission"]}"\nusername = "carol@elsewhere.test"\n'
    good = make_server(relay + 'password = "carol-password"\n', name="good")
    submit(good, ["carol@elsewhere.test"], "smarthost-login")
    # Logged in: the smarthost's answer is about the sender (553), not "Authentication required" (530).
    wait_for(lambda: "553 5.7.1 <alice@example.org>: Sender address rejected" in good.log(), what="the smarthost's verdict")
    assert "auth carol@elsewhere.test" in smarthost.log()
    bad = make_server(relay + 'password = "wrong"\n', name="bad")
    submit(bad, ["carol@elsewhere.test"], "smarthost-bad-login")
    wait_for(lambda: "refused our login: 535 5.7.8" in bad.log(), what="the refused login")
    assert "<carol@elsewhere.test> pending" in bad.log()


def test_ipv6_mx(make_server, dns):
    """An MX host that has only an AAAA record is reached over IPv6."""
    v6 = make_server(
        config=REMOTE_CONFIG.format(port=0).replace('smtp = "tcp:0:interface=127.0.0.1"', 'smtp = "tcp6:0:interface=\\\\:\\\\:1"')
        .replace('domains = ["elsewhere.test"]', 'domains = ["six.test"]'),
        users={"carol@six.test": "carol-password"}, name="v6",
    )
    local = sender_server(make_server, dns, v6)
    submit(local, ["carol@six.test"], "over-ipv6")
    wait_for(lambda: any(b"Subject: over-ipv6" in m for m in v6.messages("carol@six.test")), what="the message over IPv6")


def relayed(remote, subject: str) -> bool:
    return any(f"Subject: {subject}".encode() in m for m in remote.messages("carol@elsewhere.test"))


def test_one_session_carries_several_messages(make_server, dns, remote):
    """A second message to a host we just talked to reuses the open session (no new connect, EHLO or STARTTLS)."""
    local = sender_server(make_server, dns, remote)
    for n in range(3):
        submit(local, ["carol@elsewhere.test"], f"reuse-{n}")
        wait_for(lambda: relayed(remote, f"reuse-{n}"), what=f"message {n}")
    assert remote.log().count(" connect from 127.0.0.1") == 1


def test_session_closed_by_the_remote_while_idle_is_not_reused(make_server, dns, remote):
    """The remote's idle timeout ends our cached session: the next message opens a new one and is not delayed."""
    remote.stop()
    remote.config_path.write_text(remote.config_path.read_text() + "\n[smtp]\nidle_timeout = 0.5\n")
    remote.start()
    local = sender_server(make_server, dns, remote, retry=3600)
    submit(local, ["carol@elsewhere.test"], "before-idle")
    wait_for(lambda: relayed(remote, "before-idle"), what="the first message")
    wait_for(lambda: "idle timeout" in remote.log(), what="the remote to close the idle session")
    submit(local, ["carol@elsewhere.test"], "after-idle")
    wait_for(lambda: relayed(remote, "after-idle"), what="the second message, on a new session")
    assert remote.log().count(" connect from 127.0.0.1") == 2
    assert "pending" not in local.log()


@pytest.mark.parametrize("size", [1000, 300_000])
def test_small_and_large_messages_relay_whole(make_server, dns, remote, size):
    """A small message is queued inside its envelope file, a large one (spooled to disk) beside it: both arrive whole."""
    local = sender_server(make_server, dns, remote)
    body = "".join(f"line {n} " + "x" * 70 + "\r\n" for n in range(size // 80))
    with smtplib.SMTP_SSL("127.0.0.1", local.ports["submissions"], context=tls_context(), timeout=20) as client:
        client.login(*ALICE)
        client.sendmail("alice@example.org", ["carol@elsewhere.test"], message(f"whole-{size}", body, "alice@example.org", "carol@elsewhere.test"))
    wait_for(lambda: relayed(remote, f"whole-{size}"), what="the relayed message")
    arrived = next(m for m in remote.messages("carol@elsewhere.test") if f"Subject: whole-{size}".encode() in m)
    assert arrived.endswith(body.encode())
    wait_for(lambda: "removed from the queue" in local.log(), what="the queue to empty")
    assert not list((local.root / "var" / "queue" / "msg").iterdir())
    assert not list((local.root / "var" / "queue" / "env").iterdir())


# --- bounces at once, forwarding, SRS, loops ---------------------------------------------


def dsn_recipients(dsn: email.message.EmailMessage) -> list[str]:
    status = next(p for p in dsn.iter_parts() if p.get_content_type() == "message/delivery-status").as_string()
    return [line.split(";", 1)[1].strip() for line in status.splitlines() if line.startswith("Final-Recipient:")]


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


FORWARDING = """\
[aliases]
"list@example.org" = ["alice@example.org", "carol@elsewhere.test"]
"fwd@example.org" = "nobody@elsewhere.test"
"""


def srs_secret(server) -> str:
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


def test_forwarding_alias_on_the_mx_relays_with_srs_and_bounces_come_back(make_server, dns, remote):
    """Mail from anyone to an alias with a target elsewhere reaches it with an SRS sender that SRS with our secret
    reverses to the original; a bounce to that address on our MX goes back to the original sender, from <>."""
    local = sender_server(make_server, dns, remote, extra=FORWARDING)
    assert mx_send(local.port, "carol@elsewhere.test", "list@example.org", "to-the-list")[0] == 250
    wait_for(lambda: relayed(remote, "to-the-list"), what="the forwarded copy")
    assert any(b"Subject: to-the-list" in m for m in local.messages("alice@example.org"))
    forwarded = next(m for m in remote.messages("carol@elsewhere.test") if b"Subject: to-the-list" in m)
    return_path = forwarded.split(b"\r\n", 1)[0].decode()
    assert return_path.startswith("Return-Path: <SRS0=") and return_path.endswith("=elsewhere.test=carol@mail.example.org>"), return_path
    srs_address = return_path.removeprefix("Return-Path: <").removesuffix(">")
    assert srslib.SRS(srs_secret(local)).reverse(srs_address) == "carol@elsewhere.test"
    # The remote bounces later, to the SRS address: our MX takes it and sends it on to carol, from <>.
    assert mx_send(local.port, "", srs_address, "late-bounce")[0] == 250
    wait_for(lambda: relayed(remote, "late-bounce"), what="the bounce sent back")
    late = next(m for m in remote.messages("carol@elsewhere.test") if b"Subject: late-bounce" in m)
    assert late.startswith(b"Return-Path: <>")


def test_bounce_of_a_forwarded_copy_reaches_the_original_sender(make_server, dns, remote):
    """When the next hop refuses a forwarded copy, our bounce goes to the original sender, not to the SRS address."""
    local = sender_server(make_server, dns, remote, extra=FORWARDING)
    assert mx_send(local.port, "carol@elsewhere.test", "fwd@example.org", "forward-refused")[0] == 250

    def reports() -> list[bytes]:
        return [m for m in remote.messages("carol@elsewhere.test") if b"multipart/report" in m]

    wait_for(reports, timeout=20, what="the bounce at the original sender")
    [dsn] = reports()
    assert dsn.startswith(b"Return-Path: <>") and b"Final-Recipient: rfc822; nobody@elsewhere.test" in dsn
    assert b"Subject: forward-refused" in dsn


def test_invalid_srs_addresses_are_refused_and_nothing_else_relays(make_server, dns, remote):
    """On the MX, an SRS address with a hash we did not make, or an expired one, is 550 5.1.1; an outside address is still 550 5.7.1."""
    local = sender_server(make_server, dns, remote, extra=FORWARDING)
    secret = srs_secret(local)
    srs = srslib.SRS(secret)
    good = srs.forward("carol@elsewhere.test", "mail.example.org")
    old = srs.generate_ts(time.time() - 30 * 86400)
    expired = f"SRS0={srs.generate_hash(old + 'elsewhere.test' + 'carol', secret.encode(), 4)}={old}=elsewhere.test=carol@mail.example.org"
    for address in (good.replace("=elsewhere.test=carol@", "=victim.test=carol@"), expired, srslib.SRS("guess").forward("a@victim.test", "mail.example.org")):
        code, text = mx_send(local.port, "", address, "refused")
        assert (code, text[:5]) == (550, b"5.1.1"), (address, code, text)
    code, text = mx_send(local.port, "x@sender.test", "carol@elsewhere.test", "open-relay")
    assert (code, text[:5]) == (550, b"5.7.1")
    assert not relayed(remote, "refused") and not relayed(remote, "open-relay")


def test_forward_whose_best_mx_is_ourselves_bounces_as_a_loop(make_server, dns, remote):
    """An alias whose target's domain has us as its best MX bounces at once with 5.4.6, instead of mailing itself."""
    local = sender_server(make_server, dns, remote, extra='[aliases]\n"loop@example.org" = "someone@loop.test"\n')
    submit(local, ["loop@example.org"], "loops")
    wait_for(lambda: bounces(local), what="the bounce")
    text = bounces(local)[0].as_string()
    assert "Status: 5.4.6" in text and "loops back to myself" in text


def test_next_hop_that_greets_with_our_name_bounces_as_a_loop(make_server, dns):
    """A next hop that turns out to be ourselves (it greets with our hostname) is a loop: 5.4.6, at once."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = merge_toml(BASE_CONFIG.replace('smtp = "tcp:0:', f'smtp = "tcp:{port}:', 1), f'[dns]\nservers = ["127.0.0.1:{dns.port}"]\n[relay]\nport = {port}\n')
    local = make_server(config=config, name="mirror")
    submit(local, ["someone@mirror.test"], "mirrored")
    wait_for(lambda: bounces(local), what="the bounce")
    text = bounces(local)[0].as_string()
    assert "Status: 5.4.6" in text and "greets with our own name" in text
