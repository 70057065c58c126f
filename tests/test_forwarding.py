"""Aliases that forward to other domains, and SRS: the rewriting, its reversal,
and the MX session that takes mail for a forwarding alias (or a bounce to an
SRS address) from anyone without relaying anything else.

In-process: the SMTP session on a StringTransport, the queue a recorder; the
wire and the real queue are in test_relay.py.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
import srslib
from twisted.internet import defer, task

from inprocess import USERS, Mailboxes, Wire
from mailplat.addresses import AddressError, AliasResolver, BadSRSAddress
from mailplat.config import SMTPLimits
from mailplat.forwarding import Forwarder, load_secrets
from mailplat.interfaces import Account
from mailplat.routing import Router
from mailplat.smtp.receiving import Spool
from mailplat.smtp.server import SMTPFactory

SECRET = "test-secret-for-srs"
ALIASES = {
    "list@example.org": ("alice@example.org", "friend@elsewhere.test"),
    "away@example.org": ("friend@elsewhere.test",),
    "team@example.org": ("list@example.org", "bob@example.org"),
    "ping@example.org": ("pong@example.org",),
    "pong@example.org": ("ping@example.org",),
}


def forwarder(*secrets: str) -> Forwarder:
    return Forwarder("mail.example.org", list(secrets or (SECRET,)), ("example.org",))


def resolver(aliases=None, forwarding=None) -> AliasResolver:
    return AliasResolver(
        ("example.org",), ALIASES if aliases is None else aliases,
        lambda address: defer.succeed(Account(address) if address in USERS else None), forwarding,
    )


def expand(r: AliasResolver, address: str):
    results: list = []
    defer.Deferred.fromCoroutine(r.expand(address)).addBoth(results.append)
    [result] = results
    if isinstance(result, Exception) or hasattr(result, "raiseException"):
        result.raiseException()
    return result


def srs0_at(when: float, sender: str = "dave@sender.test", secret: str = SECRET) -> str:
    """An SRS0 address signed with ``secret`` as if made at ``when``."""
    srs = srslib.SRS(secret)
    local, _, host = sender.rpartition("@")
    timestamp = srs.generate_ts(when)
    signature = srs.generate_hash(timestamp + host + local, secret.encode(), 4)
    return f"SRS0={signature}={timestamp}={host}={local}@mail.example.org"


# --- the rewriting ------------------------------------------------------------------


def test_sender_of_another_domain_is_rewritten_and_reversed():
    """A forwarded copy's sender from another domain becomes an SRS0 address at the SRS domain that reverses to it."""
    srs = forwarder()
    rewritten = srs.sender_for("Dave@sender.test")
    assert rewritten.startswith("SRS0=") and rewritten.endswith("=sender.test=Dave@mail.example.org"), rewritten
    assert srs.is_srs(rewritten)
    assert srs.reverse(rewritten) == "Dave@sender.test"


@pytest.mark.parametrize("sender", ["", "alice@example.org", "root@MAIL.example.org", '"odd one"@sender.test'])
def test_sender_left_as_it_is(sender):
    """The null sender stays null; our own domains' and the SRS domain's senders pass SPF as they are; a quoted local part is not rewritten."""
    assert forwarder().sender_for(sender) == sender


def test_srs_address_of_another_forwarder_becomes_srs1():
    """A sender that another forwarder rewrote (SRS0 at its domain) becomes SRS1, which reverses to that forwarder's address."""
    theirs = srslib.SRS("their-secret").forward("dave@sender.test", "hop1.test")
    ours = forwarder().sender_for(theirs)
    assert ours.startswith("SRS1=") and ours.endswith("@mail.example.org")
    assert forwarder().reverse(ours) == theirs


def test_tampered_or_foreign_hash_is_refused():
    """An SRS address whose hash we did not make (edited, or signed with another secret) is not reversed."""
    good = forwarder().sender_for("dave@sender.test")
    tampered = good.replace("=sender.test=dave@", "=victim.test=dave@")
    with pytest.raises(BadSRSAddress, match="hash"):
        forwarder().reverse(tampered)
    with pytest.raises(BadSRSAddress, match="hash"):
        forwarder("another-secret").reverse(good)


def test_expired_address_is_refused():
    """An SRS address older than its 21 days of validity is not reversed; one from yesterday is."""
    assert forwarder().reverse(srs0_at(time.time() - 86400)) == "dave@sender.test"
    with pytest.raises(BadSRSAddress, match="expired"):
        forwarder().reverse(srs0_at(time.time() - 30 * 86400))


def test_old_secret_still_reverses():
    """After a new secret is put first, what the old one signed still reverses; new addresses use the new one."""
    old = forwarder("old-secret").sender_for("dave@sender.test")
    rotated = forwarder("new-secret", "old-secret")
    assert rotated.reverse(old) == "dave@sender.test"
    with pytest.raises(BadSRSAddress):
        forwarder("old-secret").reverse(rotated.sender_for("dave@sender.test"))


def test_secret_file_is_made_once_private(tmp_path):
    """The default secret file is made with mode 0600 at the first start and read as it is afterwards; a given file must exist."""
    path = str(tmp_path / "var" / "srs.secret")
    first = load_secrets(path, create=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) == 1 and len(first[0]) >= 32
    assert load_secrets(path, create=True) == first
    with pytest.raises(FileNotFoundError):
        load_secrets(str(tmp_path / "missing"), create=False)


# --- resolution ---------------------------------------------------------------------


def test_alias_expands_to_accounts_and_addresses_elsewhere():
    """An alias yields its local accounts and its targets in other domains, through nested aliases, each once."""
    found = expand(resolver(), "Team@example.org")
    assert sorted(a.address for a in found.accounts) == ["alice@example.org", "bob@example.org"]
    assert found.remote == ["friend@elsewhere.test"]
    only_remote = expand(resolver(), "away+tag@example.org")
    assert only_remote.accounts == [] and only_remote.remote == ["friend@elsewhere.test"]


def test_alias_loop_is_an_error_naming_the_chain():
    """An alias chain that comes back to an address already on it is refused, the chain named."""
    with pytest.raises(AddressError, match="alias loop: ping@example.org -> pong@example.org -> ping@example.org"):
        expand(resolver(), "ping@example.org")
    # Through a catch-all too: nobody@ is no mailbox, so the catch-all takes it, and sends it back to nobody@.
    with pytest.raises(AddressError, match="alias loop"):
        expand(resolver({"@example.org": ("nobody@example.org",)}), "nobody@example.org")


def test_srs_address_resolves_to_the_original_sender():
    """A valid SRS address of ours resolves to its original sender elsewhere, before any alias or catch-all could take it."""
    srs = forwarder()
    r = resolver({"@mail.example.org": ("alice@example.org",)}, srs)
    assert expand(r, srs.sender_for("dave@sender.test")).remote == ["dave@sender.test"]
    with pytest.raises(BadSRSAddress):
        expand(r, srs0_at(time.time() - 30 * 86400))


def test_unknown_targets_are_listed():
    """An alias target in our domains that is neither a user nor an alias is found; one elsewhere or behind an alias is not."""
    results: list = []
    aliases = {**ALIASES, "help@example.org": ("alice@example.org", "carol@example.org"), "@example.org": ("alice@example.org",)}
    defer.Deferred.fromCoroutine(resolver(aliases).unknown_targets()).addBoth(results.append)
    assert results == [[("help@example.org", "carol@example.org")]]


# --- the MX session ---------------------------------------------------------------------


class RecordingQueue:
    """The outbound queue, as the router sees it: what would be relayed, and with which sender."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, list[str], bytes]] = []

    def enqueue(self, queue_id, sender, recipients, message, folder=""):
        with message.open() as f:
            self.entries.append((queue_id, sender, list(recipients), f.read()))
        return defer.succeed(None)


@pytest.fixture
def mx(tmp_path):
    srs = forwarder()
    mailboxes = Mailboxes()
    queue = RecordingQueue()
    router = Router(mailboxes, queue, forwarding=srs)
    factory = SMTPFactory(
        "mail.example.org", SMTPLimits(), resolver(forwarding=srs), router, Spool(str(tmp_path)), task.Clock(), listener="smtp",
    )

    def connect() -> Wire:
        wire = Wire(factory.buildProtocol(None), "198.51.100.7")
        wire.send("EHLO client.test")
        wire.output()
        return wire

    connect.srs, connect.mailboxes, connect.queue = srs, mailboxes, queue  # type: ignore[attr-defined]
    return connect


def send(wire: Wire, sender: str, rcpt: str) -> list[str]:
    wire.send(f"MAIL FROM:<{sender}>")
    wire.send(f"RCPT TO:<{rcpt}>")
    replies = wire.lines()
    if not replies[-1].startswith("250"):
        return replies
    wire.send("DATA")
    wire.protocol.dataReceived(b"Subject: forwarded\r\n\r\nHello.\r\n.\r\n")
    return replies + wire.lines()


def test_mx_takes_mail_for_a_forwarding_alias_from_anyone(mx):
    """An unauthenticated client's mail for an alias is delivered to its local target and queued for the one elsewhere with an SRS sender."""
    replies = send(mx(), "dave@sender.test", "list@example.org")
    assert [r[:3] for r in replies] == ["250", "250", "354", "250"], replies
    assert len(mx.mailboxes.stored["alice@example.org"]) == 1
    [(_, sender, recipients, content)] = mx.queue.entries
    assert recipients == ["friend@elsewhere.test"]
    assert sender.startswith("SRS0=") and mx.srs.reverse(sender) == "dave@sender.test"
    assert b"Subject: forwarded" in content


def test_forward_of_a_bounce_keeps_the_null_sender(mx):
    """Mail from <> to a forwarding alias is forwarded from <>: the null sender stays null."""
    replies = send(mx(), "", "away@example.org")
    assert replies[-1].startswith("250"), replies
    assert [(sender, recipients) for _, sender, recipients, _ in mx.queue.entries] == [("", ["friend@elsewhere.test"])]


def test_bounce_to_an_srs_address_goes_back_to_the_original_sender(mx):
    """A bounce to an SRS address we made is accepted on the MX and queued for the original sender, from <>."""
    address = mx.srs.sender_for("dave@sender.test")
    replies = send(mx(), "", address)
    assert [r[:3] for r in replies] == ["250", "250", "354", "250"], replies
    assert [(sender, recipients) for _, sender, recipients, _ in mx.queue.entries] == [("", ["dave@sender.test"])]


@pytest.mark.parametrize("kind", ["tampered", "expired", "foreign secret"])
def test_invalid_srs_address_is_550_511(mx, kind):
    """An SRS address of ours with a hash we did not make, or past its validity, is 550 5.1.1 and nothing is queued."""
    good = mx.srs.sender_for("dave@sender.test")
    address = {
        "tampered": good.replace("=sender.test=dave@", "=victim.test=dave@"),
        "expired": srs0_at(time.time() - 30 * 86400),
        "foreign secret": forwarder("another-secret").sender_for("dave@victim.test"),
    }[kind]
    replies = send(mx(), "", address)
    assert replies[-1].startswith("550 5.1.1"), replies
    assert mx.queue.entries == []


@pytest.mark.parametrize("rcpt", [
    "friend@elsewhere.test",
    "SRS0=abcd=TT=sender.test=dave@elsewhere.test",  # SRS form, but not at our SRS domain
    "friend%elsewhere.test@example.org",
])
def test_nothing_else_becomes_relayable(mx, rcpt):
    """An unauthenticated client still cannot relay to an outside address, however it is spelled."""
    replies = send(mx(), "dave@sender.test", rcpt)
    assert replies[-1].startswith("550 5.7.1"), replies
    assert mx.queue.entries == []


def test_alias_loop_is_refused_at_rcpt(mx):
    """A recipient whose alias chain loops is refused at RCPT with 550 5.4.6."""
    replies = send(mx(), "dave@sender.test", "ping@example.org")
    assert replies[-1].startswith("550 5.4.6") and "alias loop" in replies[-1], replies
