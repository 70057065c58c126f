"""The outbound queue over the wire: one mailplat submits, relays to another mailplat acting as a remote MX.

The tests here leave the remote running as it is, so they share one remote,
one DNS server and one sending server (with forwarding aliases), and each
reads only its own messages and the log lines since it began.  The tests
that stop or reconfigure the remote are in test_relay_queue.py and
test_relay_remote.py.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest
import srslib

from conftest import BASE_CONFIG, MailplatServer, merge_toml, message, wait_for
from relaying import (
    ALICE, FORWARDING, LogMark, bounces, dns, free_port, mx_send, queue_cli, relayed, sender_config,
    shared_remote, srs_secret, submit, tls_context,
)

__all__ = ["dns", "shared_remote"]  # fixtures

# For the loop test: an alias whose target's best MX is ourselves.
LOOP_ALIAS = '"loop@example.org" = "someone@loop.test"\n'


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, dns, shared_remote) -> Iterator[MailplatServer]:
    """Our server, relaying through the test DNS to the shared remote, with the forwarding aliases."""
    server = MailplatServer(tmp_path_factory.mktemp("local"), sender_config(dns, shared_remote, extra=FORWARDING + LOOP_ALIAS))
    server.start()
    yield server
    server.stop()


def queue_is_empty(server: MailplatServer) -> bool:
    return queue_cli(server, "list").stdout.strip().endswith("0 queued message(s)")


def test_relay_through_mx(local, shared_remote):
    """Mail submitted for another domain is relayed to that domain's MX, found through DNS, and leaves the queue."""
    mark = LogMark(local)
    submit(local, ["carol@elsewhere.test", "bob@example.org"], "to-the-world")
    wait_for(lambda: relayed(shared_remote, "to-the-world"), what="the relayed message")
    assert any(b"Subject: to-the-world" in m for m in local.messages("bob@example.org"))
    wait_for(lambda: "removed from the queue" in mark.log(), what="the queue to empty")
    wait_for(lambda: queue_is_empty(local), what="0 queued message(s)")


def test_relay_through_smarthost(make_server, shared_remote):
    """With [relay] smarthost every message goes to that host, no DNS needed."""
    smarthosted = make_server(f'[relay]\nsmarthost = "127.0.0.1:{shared_remote.port}"\n', name="local")
    submit(smarthosted, ["carol@elsewhere.test"], "via-smarthost")
    wait_for(lambda: relayed(shared_remote, "via-smarthost"), what="the relayed message")


def test_remote_5xx_bounces_to_sender(local):
    """A 5xx from the remote bounces: the sender gets a DSN naming the recipient and the remote's reply, and it is never bounced again."""
    mark = LogMark(local)
    submit(local, ["nobody@elsewhere.test"], "will-bounce")
    wait_for(lambda: bounces(local, "will-bounce"), what="the bounce")
    wait_for(lambda: "removed from the queue" in mark.log(), what="the message to leave the queue")
    [dsn] = bounces(local, "will-bounce")
    status = next(p for p in dsn.iter_parts() if p.get_content_type() == "message/delivery-status").as_string()
    assert "Final-Recipient: rfc822; nobody@elsewhere.test" in status
    assert "Status: 5.1.1" in status and "550 5.1.1" in status
    assert b"Subject: will-bounce" in dsn.as_bytes()
    bounce = next(m for m in local.messages("alice@example.org") if b"Subject: will-bounce\r\n" in m and b"multipart/report" in m)
    assert bounce.startswith(b"Return-Path: <>")


def test_null_mx_bounces_at_once(local):
    """A domain with a null MX (RFC 7505) bounces at once with 5.1.10."""
    submit(local, ["someone@nomail.test"], "null-mx")
    wait_for(lambda: bounces(local, "null-mx"), what="the bounce")
    assert "Status: 5.1.10" in bounces(local, "null-mx")[0].as_string()


def test_mx_port_never_relays(local):
    """Even with a working outbound queue, the MX port refuses other domains for unauthenticated clients."""
    with smtplib.SMTP("127.0.0.1", local.port, timeout=20) as client:
        client.ehlo()
        client.mail("x@remote.test")
        code, text = client.rcpt("carol@elsewhere.test")
    assert code == 550 and text.startswith(b"5.7.1")


def test_one_session_carries_several_messages(local, shared_remote):
    """A second message to a host we just talked to reuses the open session (no new connect, EHLO or STARTTLS)."""
    for n in range(3):
        if n == 1:
            # The first may have opened the session (or found an earlier test's open): the others open none.
            mark = LogMark(shared_remote)
        submit(local, ["carol@elsewhere.test"], f"reuse-{n}")
        wait_for(lambda: relayed(shared_remote, f"reuse-{n}"), what=f"message {n}")
    assert mark.log().count(" connect from 127.0.0.1") == 0


@pytest.mark.parametrize("size", [1000, 300_000])
def test_small_and_large_messages_relay_whole(local, shared_remote, size):
    """A small message is queued inside its envelope file, a large one (spooled to disk) beside it: both arrive whole."""
    mark = LogMark(local)
    body = "".join(f"line {n} " + "x" * 70 + "\r\n" for n in range(size // 80))
    with smtplib.SMTP_SSL("127.0.0.1", local.ports["submissions"], context=tls_context(), timeout=20) as client:
        client.login(*ALICE)
        client.sendmail("alice@example.org", ["carol@elsewhere.test"], message(f"whole-{size}", body, "alice@example.org", "carol@elsewhere.test"))
    wait_for(lambda: relayed(shared_remote, f"whole-{size}"), what="the relayed message")
    arrived = next(m for m in shared_remote.messages("carol@elsewhere.test") if f"Subject: whole-{size}".encode() in m)
    assert arrived.endswith(body.encode())
    wait_for(lambda: "removed from the queue" in mark.log(), what="the queue to empty")
    queue = local.root / "var" / "queue"
    wait_for(lambda: not list((queue / "msg").iterdir()) and not list((queue / "env").iterdir()), what="no file left in the queue")


# --- bounces at once, forwarding, SRS, loops ---------------------------------------------


def test_forwarding_alias_on_the_mx_relays_with_srs_and_bounces_come_back(local, shared_remote):
    """Mail from anyone to an alias with a target elsewhere reaches it with an SRS sender that SRS with our secret
    reverses to the original; a bounce to that address on our MX goes back to the original sender, from <>."""
    assert mx_send(local.port, "carol@elsewhere.test", "list@example.org", "to-the-list")[0] == 250
    wait_for(lambda: relayed(shared_remote, "to-the-list"), what="the forwarded copy")
    assert any(b"Subject: to-the-list" in m for m in local.messages("alice@example.org"))
    forwarded = next(m for m in shared_remote.messages("carol@elsewhere.test") if b"Subject: to-the-list" in m)
    return_path = forwarded.split(b"\r\n", 1)[0].decode()
    assert return_path.startswith("Return-Path: <SRS0=") and return_path.endswith("=elsewhere.test=carol@mail.example.org>"), return_path
    srs_address = return_path.removeprefix("Return-Path: <").removesuffix(">")
    assert srslib.SRS(srs_secret(local)).reverse(srs_address) == "carol@elsewhere.test"
    # The remote bounces later, to the SRS address: our MX takes it and sends it on to carol, from <>.
    assert mx_send(local.port, "", srs_address, "late-bounce")[0] == 250
    wait_for(lambda: relayed(shared_remote, "late-bounce"), what="the bounce sent back")
    late = next(m for m in shared_remote.messages("carol@elsewhere.test") if b"Subject: late-bounce" in m)
    assert late.startswith(b"Return-Path: <>")


def test_bounce_of_a_forwarded_copy_reaches_the_original_sender(local, shared_remote):
    """When the next hop refuses a forwarded copy, our bounce goes to the original sender, not to the SRS address."""
    assert mx_send(local.port, "carol@elsewhere.test", "fwd@example.org", "forward-refused")[0] == 250

    def reports() -> list[bytes]:
        return [m for m in shared_remote.messages("carol@elsewhere.test") if b"multipart/report" in m and b"Subject: forward-refused" in m]

    wait_for(reports, timeout=20, what="the bounce at the original sender")
    [dsn] = reports()
    assert dsn.startswith(b"Return-Path: <>") and b"Final-Recipient: rfc822; nobody@elsewhere.test" in dsn
    assert b"Subject: forward-refused" in dsn


def test_invalid_srs_addresses_are_refused_and_nothing_else_relays(local, shared_remote):
    """On the MX, an SRS address with a hash we did not make, or an expired one, is 550 5.1.1; an outside address is still 550 5.7.1."""
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
    assert not relayed(shared_remote, "refused") and not relayed(shared_remote, "open-relay")


def test_forward_whose_best_mx_is_ourselves_bounces_as_a_loop(local):
    """An alias whose target's domain has us as its best MX bounces at once with 5.4.6, instead of mailing itself."""
    submit(local, ["loop@example.org"], "loops")
    wait_for(lambda: bounces(local, "loops"), what="the bounce")
    text = bounces(local, "loops")[0].as_string()
    assert "Status: 5.4.6" in text and "loops back to myself" in text


def test_next_hop_that_greets_with_our_name_bounces_as_a_loop(make_server, dns):
    """A next hop that turns out to be ourselves (it greets with our hostname) is a loop: 5.4.6, at once."""
    port = free_port()
    config = merge_toml(BASE_CONFIG.replace('smtp = "tcp:0:', f'smtp = "tcp:{port}:', 1), f'[dns]\nservers = ["127.0.0.1:{dns.port}"]\n[relay]\nport = {port}\n')
    mirror = make_server(config=config, name="mirror")
    submit(mirror, ["someone@mirror.test"], "mirrored")
    wait_for(lambda: bounces(mirror), what="the bounce")
    text = bounces(mirror)[0].as_string()
    assert "Status: 5.4.6" in text and "greets with our own name" in text
