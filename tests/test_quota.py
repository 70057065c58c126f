"""[mailbox] quota: read from the config, compared in mailplat.mailquota, and
enforced by local delivery (552 5.2.2 at the end of DATA, a bounce for one
of several recipients, 452 4.2.2 at RCPT for a mailbox already full)."""

from __future__ import annotations

import email
import re
import email.message
import email.policy
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from conftest import BASE_CONFIG, USERS, MailplatServer, merge_toml, message, wait_for

from mailplat.backends.local import LocalDelivery
from mailplat.config import ConfigError, load
from mailplat.interfaces import (
    Account,
    Envelope,
    IMailboxBackend,
    IMessageStore,
    OverQuota,
    PartialFailure,
    PermanentFailure,
    SpooledMessage,
    TemporaryFailure,
)
from mailplat.mailquota import MailboxQuota, format_size
from mailplat.routing import Router, smtp_status

ALICE, BOB = Account("alice@example.org"), Account("bob@example.org")

CONFIG = """\
hostname = "mail.example.org"
domains = ["example.org"]

[auth]
backend = "passwd-file"
path = "users.passwd"

[mailbox]
backend = "maildir"
path = "mail"
"""


def settle(d: Any) -> Any:
    """The result of a Deferred or coroutine that has already fired (in-memory backends answer at once)."""
    if not isinstance(d, defer.Deferred):
        d = defer.Deferred.fromCoroutine(d)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "did not fire"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@implementer(IMailboxBackend, IMessageStore)
class Store:
    """Messages in memory, counted as IMessageStore.usage counts them (only
    ``deliver`` and ``usage`` are used here)."""

    def __init__(self) -> None:
        self.stored: dict[str, list[bytes]] = {}
        self.broken = False

    def deliver(self, account: Account, message: SpooledMessage, folder: str = "") -> None:
        with message.open() as f:
            self.stored.setdefault(account.address, []).append(f.read())

    def usage(self, account: Account) -> tuple[int, int]:
        if self.broken:
            raise TemporaryFailure("the store is down")
        messages = self.stored.get(account.address, [])
        return sum(map(len, messages)), len(messages)


@implementer(IMailboxBackend)
class Uncounted:
    """A mailbox backend without IMessageStore: it cannot say what an account uses."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []

    def deliver(self, account: Account, message: SpooledMessage, folder: str = "") -> None:
        with message.open() as f:
            self.stored.append(f.read())

    def open(self, account: Account) -> Any:
        raise NotImplementedError


def spooled(size: int) -> SpooledMessage:
    content = b"Subject: x\r\n\r\n" + b"y" * (size - 14)
    assert len(content) == size
    return SpooledMessage("", size, "someone@remote.test", content)


def fill(store: Store, account: Account, octets: int) -> None:
    store.stored.setdefault(account.address, []).append(b"z" * octets)


# --- the config --------------------------------------------------------------


def load_with(tmp_path: Path, quota: str) -> Any:
    path = tmp_path / "mailplat.toml"
    path.write_text(CONFIG + f"quota = {quota}\n")
    return load(str(path))


@pytest.mark.parametrize(("written", "octets"), [
    ('"2G"', 2 << 30), ("1048576", 1048576), ('"500M"', 500 << 20), ('"20K"', 20480), ('"1 G"', 1 << 30), ("0", 0),
])
def test_quota_values_are_read_in_octets(tmp_path, written, octets):
    """[mailbox] quota takes octets or a size with K/M/G/T (powers of 1024), and 0 turns it off."""
    assert load_with(tmp_path, written).mailbox_quota == octets


@pytest.mark.parametrize(("written", "problem"), [
    ('"-1"', "is not a size"), ("-1", "is negative"), ('"lots"', "is not a size"), ("true", "not true"), ("1.5", ""),
])
def test_bad_quota_values_are_one_line_errors(tmp_path, written, problem):
    """A negative, wordy, boolean or fractional quota is a ConfigError naming [mailbox] quota and a fix."""
    with pytest.raises(ConfigError) as raised:
        load_with(tmp_path, written)
    text = str(raised.value)
    assert "quota" in text and "fix:" in text and problem in text and "\n" not in text


def test_no_quota_is_no_limit(tmp_path):
    """Without a quota key there is no limit."""
    path = tmp_path / "mailplat.toml"
    path.write_text(CONFIG)
    assert load(str(path)).mailbox_quota == 0


@pytest.mark.parametrize(("written", "shown"), [('"2G"', 'quota = "2G"'), ("1000", "quota = 1000"), ("0", "quota = 0"), ("3145728", 'quota = "3M"')])
def test_effective_config_shows_the_quota_and_reads_back(tmp_path, written, shown):
    """check-config's effective config has the quota in [mailbox], as a value that loads back to the same octets."""
    settings = load_with(tmp_path, written)
    text = settings.describe()
    section = text.split("[mailbox]\n", 1)[1].split("\n\n", 1)[0]
    assert shown in section.splitlines()
    (tmp_path / "again.toml").write_text(CONFIG + shown + "\n")
    assert load(str(tmp_path / "again.toml")).mailbox_quota == settings.mailbox_quota


# --- the arithmetic ------------------------------------------------------------


def test_a_message_that_fits_exactly_is_taken_one_octet_more_is_not():
    """usage + size may equal the limit; one octet over is OverQuota, with who and how full in its text."""
    store = Store()
    fill(store, ALICE, 1000)
    quota = MailboxQuota(store, 2048)
    settle(quota.check(ALICE, 1048))
    with pytest.raises(OverQuota) as raised:
        settle(quota.check(ALICE, 1049))
    assert raised.value.text == "alice@example.org's mailbox is full (1000 B of 2.0 KiB used, the message is 1.0 KiB)"
    assert isinstance(raised.value, PermanentFailure)
    assert settle(quota.state(ALICE)) == (1000, 2048)
    settle(quota.check(BOB, 2048))
    fill(store, BOB, 2048)
    with pytest.raises(OverQuota, match=r"^bob@example.org's mailbox is full \(2.0 KiB of 2.0 KiB\)$"):
        settle(quota.check(BOB, 1))


def test_full_means_at_or_over_the_limit():
    """An account is full when it uses the whole limit (no message of one octet fits) or more."""
    store = Store()
    quota = MailboxQuota(store, 100)
    fill(store, ALICE, 99)
    assert not settle(quota.full(ALICE))
    fill(store, ALICE, 1)
    assert settle(quota.full(ALICE))
    fill(store, ALICE, 50)
    assert settle(quota.full(ALICE))


def test_a_limit_of_zero_never_refuses():
    """quota = 0 takes any message whatever the usage, and reports no limit."""
    store = Store()
    fill(store, ALICE, 10 << 20)
    quota = MailboxQuota(store, 0)
    settle(quota.check(ALICE, 1 << 30))
    assert not settle(quota.full(ALICE))
    assert settle(quota.state(ALICE)) == (0, 0)


def test_a_store_that_cannot_count_is_not_limited_and_says_so_once():
    """A mailbox backend without IMessageStore is not limited, and the log says once that the quota is not enforced."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        quota = MailboxQuota(Uncounted(), 100)
        for _ in range(3):
            settle(quota.check(ALICE, 1000))
            assert not settle(quota.full(ALICE))
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1 and "cannot be enforced" in warnings[0] and "Uncounted" in warnings[0]


@pytest.mark.parametrize(("octets", "shown"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (20480, "20.0 KiB"), (2 << 30, "2.0 GiB"), (3 << 40, "3.0 TiB"), (5000 << 40, "5000.0 TiB"),
])
def test_sizes_are_shown_in_powers_of_1024(octets, shown):
    """Sizes in the refusal read as the config writes them (K, M, G, T are powers of 1024)."""
    assert format_size(octets) == shown


def test_over_quota_is_552_5_2_2_and_other_failures_keep_their_codes():
    """The one mapping of delivery failures to SMTP: mailbox full is 552 5.2.2 (RFC 3463), other permanent ones 554, temporary 451."""
    assert smtp_status(OverQuota("alice's mailbox is full (20 KiB of 20 KiB)")) == (552, "5.2.2", "Mailbox is full")
    assert smtp_status(PermanentFailure("no")) == (554, "5.0.0", "no")
    assert smtp_status(TemporaryFailure("later")) == (451, "4.3.0", "later")


# --- local delivery -----------------------------------------------------------


def test_local_delivery_refuses_the_one_recipient_it_would_take_over():
    """One recipient over quota: OverQuota itself comes out (so SMTP answers 552 5.2.2) and nothing is stored."""
    store = Store()
    fill(store, ALICE, 900)
    delivery = LocalDelivery(store, MailboxQuota(store, 1000))
    with pytest.raises(OverQuota):
        settle(delivery.deliver(Envelope("Q1", "", (ALICE,)), spooled(200)))
    assert len(store.stored[ALICE.address]) == 1


def test_local_delivery_delivers_to_the_others_when_one_is_over():
    """Two recipients, one over: the other gets the message, the over one is a PartialFailure entry holding OverQuota."""
    store = Store()
    fill(store, BOB, 900)
    delivery = LocalDelivery(store, MailboxQuota(store, 1000))
    with pytest.raises(PartialFailure) as raised:
        settle(delivery.deliver(Envelope("Q2", "", (ALICE, BOB)), spooled(200)))
    assert list(raised.value.failed) == [BOB] and isinstance(raised.value.failed[BOB], OverQuota)
    assert len(store.stored[ALICE.address]) == 1 and len(store.stored[BOB.address]) == 1


def test_a_store_that_cannot_count_now_delays_delivery_and_one_that_never_counts_takes_it():
    """A usage() that fails makes delivery a TemporaryFailure (tried again later, never over the quota); a store without usage() is not limited."""
    store = Store()
    store.broken = True
    with pytest.raises(TemporaryFailure):
        settle(LocalDelivery(store, MailboxQuota(store, 1000)).deliver(Envelope("Q3", "", (ALICE,)), spooled(200)))
    assert ALICE.address not in store.stored
    uncounted = Uncounted()
    settle(LocalDelivery(uncounted, MailboxQuota(uncounted, 100)).deliver(Envelope("Q4", "", (ALICE,)), spooled(200)))
    assert len(uncounted.stored) == 1


def test_router_sees_a_full_mailbox_and_ignores_a_store_that_cannot_count_now():
    """Router.is_full (asked at RCPT) is true only at or over the limit, and false when the store fails: DATA decides then."""
    store = Store()
    router = Router(LocalDelivery(store, MailboxQuota(store, 1000)))
    fill(store, BOB, 1000)
    assert settle(router.is_full(BOB)) and not settle(router.is_full(ALICE))
    store.broken = True
    assert not settle(router.is_full(BOB))
    assert not settle(Router(object()).is_full(BOB))


# --- over the wire ------------------------------------------------------------

ALICE_PASSWORD = USERS["alice@example.org"]
# Users that never log in: they share bob's hash, as hashing is slow on purpose.
MORE_USERS = ("carol@example.org", "dave@example.org", "erin@example.org")


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """One maildir server with a 20 KiB quota for the wire tests; each test uses its own users."""
    server = MailplatServer(tmp_path_factory.mktemp("quota"), merge_toml(BASE_CONFIG, '[mailbox]\nquota = "20K"\n'))
    users = server.root / "users.passwd"
    bob_hash = next(line for line in users.read_text().splitlines() if line.startswith("bob@")).split(":", 1)[1]
    with users.open("a") as f:
        f.writelines(f"{address}:{bob_hash}\n" for address in MORE_USERS)
    server.start()
    yield server
    server.stop()


def sized(subject: str, octets: int, to: str, sender: str = "someone@remote.test") -> bytes:
    """A message of about ``octets`` octets (lines of 76 characters)."""
    head = message(subject, body="", sender=sender, to=to)
    lines = (octets - len(head)) // 78 + 1
    return head + b"".join(b"x" * 76 + b"\r\n" for _ in range(lines))


def test_mail_under_the_quota_is_delivered(quota_server):
    """A message that fits in the recipient's quota gets 250 and is in the maildir."""
    with smtplib.SMTP("127.0.0.1", quota_server.port, timeout=10) as client:
        assert client.sendmail("someone@remote.test", ["carol@example.org"], sized("fits", 8000, "carol@example.org")) == {}
    assert [m for m in quota_server.messages("carol@example.org") if b"Subject: fits\r\n" in m]


def test_mail_over_the_quota_is_552_5_2_2_and_not_stored(quota_server):
    """A message that would take the only recipient over the quota is refused at the end of DATA with 552 5.2.2, nothing is written, and the session goes on."""
    with smtplib.SMTP("127.0.0.1", quota_server.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as raised:
            client.sendmail("someone@remote.test", ["dave@example.org"], sized("too-big", 25000, "dave@example.org"))
        assert raised.value.smtp_code == 552
        assert raised.value.smtp_error == b"5.2.2 Mailbox is full"
        assert client.noop()[0] == 250
        assert client.sendmail("someone@remote.test", ["dave@example.org"], sized("small", 3000, "dave@example.org")) == {}
    assert len(quota_server.messages("dave@example.org")) == 1
    assert not list((quota_server.maildir("dave@example.org") / "tmp").iterdir())


def test_of_two_recipients_the_one_over_is_bounced_and_the_other_gets_it(quota_server):
    """Two recipients, the message takes one over: the client hears 250, the other gets it once, and the sender gets a bounce naming the full mailbox."""
    with smtplib.SMTP("127.0.0.1", quota_server.port, timeout=10) as client:
        assert client.sendmail("someone@remote.test", ["bob@example.org"], sized("first", 15000, "bob@example.org")) == {}
    with smtplib.SMTP_SSL("127.0.0.1", quota_server.ports["submissions"], context=tls_context(), timeout=10) as client:
        client.login("alice@example.org", ALICE_PASSWORD)
        note = sized("to-both", 6000, "bob@example.org", sender="alice@example.org")
        assert client.sendmail("alice@example.org", ["alice@example.org", "bob@example.org"], note) == {}

    def bounce() -> email.message.EmailMessage | None:
        for raw in quota_server.messages("alice@example.org"):
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            if parsed.get_content_type() == "multipart/report":
                return parsed  # type: ignore[return-value]
        return None

    report = wait_for(bounce, what="the bounce to alice")
    text = report.as_string()
    assert re.search(r"Final-Recipient: rfc822; ?bob@example.org", text) and "bob@example.org's mailbox is full" in text
    assert "Subject: to-both" in text
    copies = [m for m in quota_server.messages("alice@example.org") if m.startswith(b"Return-Path: <alice@example.org>")]
    assert [b"Subject: to-both\r\n" in m for m in copies] == [True]
    assert [b"Subject: first\r\n" in m for m in quota_server.messages("bob@example.org")] == [True]


def test_a_mailbox_already_full_is_refused_at_rcpt_for_now(quota_server):
    """A recipient whose mailbox is at its quota is refused at RCPT with 452 4.2.2; the other recipients of the message are not."""
    maildir = quota_server.maildir("erin@example.org")
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    # Mail from before the quota was lowered: exactly the whole 20 KiB.
    (maildir / "cur" / f"{int(time.time())}.M000000P1Q1.old,S=20480:2,S").write_bytes(b"x" * 20480)
    with smtplib.SMTP("127.0.0.1", quota_server.port, timeout=10) as client:
        client.ehlo()
        client.mail("someone@remote.test")
        code, text = client.rcpt("erin@example.org")
        assert (code, text.split(b" ", 1)[0]) == (452, b"4.2.2")
        assert b"Mailbox is full" in text
        assert client.rcpt("carol@example.org")[0] == 250
        assert client.data(sized("erin-full", 500, "carol@example.org"))[0] == 250
    assert len(list((maildir / "cur").iterdir())) == 1 and not list((maildir / "new").iterdir())
