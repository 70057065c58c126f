"""The relay against remotes configured otherwise: an A record only, a 4xx per recipient, an idle timeout,
no STARTTLS, a smarthost that wants a login, an MX over IPv6.

Each test reconfigures its remote, so each has its own; the DNS server is
the module's.  Split from test_relay.py.
"""

from __future__ import annotations

from conftest import wait_for
from relaying import CAROL, REMOTE_CONFIG, dns, free_port, queue_cli, relayed, remote, sender_server, submit

__all__ = ["dns", "remote"]  # fixtures


def test_a_record_fallback(make_server, dns, remote):
    """A domain without MX records is reached at its own address (RFC 5321 5.1)."""
    remote.stop()
    remote.config_path.write_text(remote.config_path.read_text().replace('domains = ["elsewhere.test"]', 'domains = ["elsewhere.test", "a-only.test"]'))
    remote.start()
    local = sender_server(make_server, dns, remote)
    submit(local, ["carol@a-only.test"], "a-fallback")
    # The remote answered (it has no such user): the A record led to it.
    wait_for(lambda: "<carol@a-only.test> failed: 550 5.1.1" in local.log(), what="the remote's answer")


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


def test_tls_required_and_opportunistic(make_server, dns):
    """With tls = "required" a remote without STARTTLS keeps the mail queued; a remote with it gets the mail over TLS."""
    port = free_port()
    plain_remote = make_server(config=REMOTE_CONFIG.format(port=port), users=CAROL, name="plain")
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


def test_smarthost_login(make_server):
    """With username and password the relay logs in to the smarthost after STARTTLS (its submission port): the smarthost then judges the sender, not the login."""
    smarthost = make_server(
        config=REMOTE_CONFIG.format(port=0).replace(
            "[listen]\n", '[listen]\nsubmission = "tcp:0:interface=127.0.0.1"\n'
        ) + '\n[tls]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n',
        users=CAROL, name="smarthost",
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
