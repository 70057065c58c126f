"""IMAP and IMAPS over the wire: Python's imaplib and raw sockets against `twistd -n mailplat`.

What depends on the store (a whole imaplib session, IDLE, two sessions,
POP3 and IMAP on one inbox) runs over the maildir and the postgres store
(``store_server``); the rest over maildir only.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl
import time
from collections.abc import Iterator

import pytest

from conftest import BASE_CONFIG, USERS, Dialog, MailplatServer, merge_toml
from test_postgres import Schema, add_users, node_config, pg  # noqa: F401  # pg is a fixture

ALICE = ("alice@example.org", "alice-password")
BOB = ("bob@example.org", "bob-password")
# Whose inbox only the POP3 test touches.
CAROL = ("carol@example.org", "carol-password")
MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: over the wire\r\n\r\nHello, Bob.\r\n"

IMAP_LISTENERS = """
[listen]
imap = "tcp:0:interface=127.0.0.1"
imaps = "tcp:0:interface=127.0.0.1"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """One server with IMAP listeners for the module (the base config may already have them)."""
    config = BASE_CONFIG if "imap =" in BASE_CONFIG else merge_toml(BASE_CONFIG, IMAP_LISTENERS)
    s = MailplatServer(tmp_path_factory.mktemp("imap"), config, {**USERS, CAROL[0]: CAROL[1]})
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module", params=["maildir", "postgres"])
def store_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """The maildir server above, then one whose users and mail are in PostgreSQL (skipped when it is not reachable)."""
    if request.param == "maildir":
        yield request.getfixturevalue("server")
        return
    schema = Schema(request.getfixturevalue("pg"))
    try:
        add_users(schema, {**USERS, CAROL[0]: CAROL[1]})
        s = MailplatServer(tmp_path_factory.mktemp("imap-postgres"), node_config(schema.dsn, schema.name), {})
        s.start()
        try:
            yield s
        finally:
            s.stop()
    finally:
        schema.drop()


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(server: MailplatServer, user: tuple[str, str] = BOB) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=tls_context(), timeout=20)
    client.login(*user)
    return client


def deliver(server: MailplatServer, raw: bytes, to: str = "bob@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("someone@remote.test", [to], raw)


class IMAPDialog(Dialog):
    """A raw IMAP client: exact bytes out, lines back up to the tagged reply."""

    def until(self, tag: str) -> list[str]:
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(tag + " "):
                return lines


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def test_starttls_port_refuses_logins_in_clear_then_works_with_imaplib(store_server):
    server = store_server
    """On 143: LOGINDISABLED and STARTTLS, LOGIN refused in clear; after STARTTLS imaplib logs in, appends, selects, fetches, stores, searches, expunges."""
    client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=20)
    try:
        assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
        assert not any(c.startswith("AUTH=") for c in client.capabilities)
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            client.login(*BOB)
        client.starttls(ssl_context=tls_context())
        assert "AUTH=PLAIN" in client.capabilities and "LOGINDISABLED" not in client.capabilities
        assert client.login(*BOB)[0] == "OK"
        typ, folders = client.list()
        names = [f.decode() for f in folders]
        assert any(n.endswith('"INBOX"') for n in names) and any("\\Sent" in n and '"Sent"' in n for n in names)
        typ, data = client.append("INBOX", "(\\Flagged)", imaplib.Time2Internaldate(1700000000), MESSAGE)
        assert typ == "OK" and b"APPENDUID" in data[0]
        typ, data = client.select("INBOX")
        assert typ == "OK" and int(data[0]) == 1
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
        assert data[0][1] == MESSAGE and b"\\Flagged" in data[0][0] and f"RFC822.SIZE {len(MESSAGE)}".encode() in data[0][0]
        typ, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] ENVELOPE)")
        assert data[0][1] == b"Subject: over the wire\r\n\r\n"
        assert client.search(None, "UNSEEN")[1] == [b"1"]
        client.store("1", "+FLAGS", "(\\Seen \\Deleted)")
        assert client.search(None, "SEEN", "SUBJECT", '"over the wire"')[1] == [b"1"]
        typ, data = client.expunge()
        assert data == [b"1"]
        assert client.select("INBOX")[1] == [b"0"]
        assert client.logout()[0] == "BYE"
    finally:
        try:
            client.shutdown()
        except OSError:
            pass


def test_imaps_idle_gets_an_smtp_delivery_within_a_second(store_server):
    server = store_server
    """A session in IDLE on imaps hears "* n EXISTS" less than a second after SMTP delivers to the inbox, then another session's flag."""
    client = connect(server)
    try:
        client.select("INBOX")
        exists = int(client.select("INBOX")[1][0])
        tag = client._new_tag().decode()
        client.send(f"{tag} IDLE\r\n".encode())
        assert client.readline().startswith(b"+ ")
        started = time.monotonic()
        deliver(server, MESSAGE)
        delivered = time.monotonic()
        client.sock.settimeout(5)
        line = client.readline()
        assert line == f"* {exists + 1} EXISTS\r\n".encode()
        assert time.monotonic() - delivered < 1.0, time.monotonic() - started
        # A flag set by another session is pushed too.
        other = connect(server)
        other.select("INBOX")
        other.store(str(exists + 1), "+FLAGS", "(\\Flagged)")
        other.logout()
        pushed = client.readline()
        assert pushed.startswith(f"* {exists + 1} FETCH (UID ".encode()) and b"\\Flagged" in pushed, pushed
        client.send(b"DONE\r\n")
        assert client.readline().startswith(f"{tag} OK".encode())
    finally:
        client.logout()


def test_two_sessions_see_each_others_flags(store_server):
    server = store_server
    """A flag set by one device is seen by the other's next command, and the other's EXPUNGE at its NOOP."""
    deliver(server, MESSAGE, to="alice@example.org")
    phone, laptop = connect(server, ALICE), connect(server, ALICE)
    try:
        count = int(phone.select("INBOX")[1][0])
        laptop.select("INBOX")
        phone.store(str(count), "+FLAGS", "(\\Answered)")
        laptop.noop()
        flags = laptop.untagged_responses.pop("FETCH", [])
        assert any(b"\\Answered" in f for f in flags), flags
        laptop.store(str(count), "+FLAGS", "(\\Deleted)")
        laptop.expunge()
        phone.noop()
        assert phone.untagged_responses.pop("EXPUNGE", []) == [str(count).encode()]
    finally:
        phone.logout()
        laptop.logout()


def test_bad_input_gets_bad_and_oversized_literals_are_refused_unread(server):
    """Garbage gets BAD and the session goes on; {999999999999} is NO [TOOBIG] for APPEND (no "+"), BAD elsewhere."""
    d = IMAPDialog(server.ports["imaps"])
    d.start_tls()
    try:
        assert d.line().startswith("* OK [CAPABILITY IMAP4rev1")
        d.send(b"a1 LOGIN bob@example.org bob-password\r\n")
        assert d.until("a1")[-1].startswith("a1 OK")
        d.send(b"a2 APPEND INBOX {999999999999}\r\n")
        assert d.until("a2") == ["a2 NO [TOOBIG] Literal too big (limit 67108864 octets for a message)"]
        d.send(b"a3 SEARCH {999999999999}\r\n")
        assert d.until("a3") == ["a3 BAD Literal too big (limit 65536 octets)"]
        d.send(b"a4 FETCH (((\r\n\x00\xff\r\na5 SELECT INBOX\r\na6 FETCH 1:x FLAGS\r\n")
        assert d.until("a4") == ["a4 BAD Missing ')'"]
        assert d.line() == "* BAD NUL character in the command"
        assert d.until("a5")[-1] == "a5 OK [READ-WRITE] SELECT completed"
        assert d.until("a6") == ["a6 BAD Invalid sequence set 1:x"]
        d.send(b"a7 NOOP\r\n")
        assert d.until("a7")[-1] == "a7 OK NOOP completed"
    finally:
        d.close()
    assert "Traceback" not in server.log()


def test_fifty_megabyte_append_and_fetch_keep_the_server_small(server):
    """A 50 MB APPEND streams to disk and its FETCH streams from it, only as fast as the client reads: the server's peak RSS grows by far less than the message."""
    assert server.process is not None
    pid = server.process.pid
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (50 * 1024 * 1024 // len(line))
    client = connect(server)
    try:
        client.select("INBOX")  # warm up what a session costs
        _, peak_before = rss_kib(pid)
        typ, data = client.append("INBOX", None, None, body)
        assert typ == "OK"
        _, peak_after = rss_kib(pid)
        assert peak_after - peak_before < 20 * 1024, (peak_before, peak_after)
        uid = data[0].split()[2].rstrip(b"]").decode()
        typ, data = client.uid("FETCH", uid, "(RFC822.SIZE BODY.PEEK[HEADER])")
        assert f"RFC822.SIZE {len(body)}".encode() in data[0][0] and data[0][1] == b"Subject: big\r\n\r\n"
        # A client that stops reading in the middle stops the server reading the file.
        d = IMAPDialog(server.ports["imaps"])
        d.start_tls()
        d.send(b"a LOGIN bob@example.org bob-password\r\nb SELECT INBOX\r\n")
        d.until("b")
        d.send(f"c UID FETCH {uid} BODY.PEEK[]\r\n".encode())
        assert d.line() == f"* {int(client.select('INBOX')[1][0])} FETCH (UID {uid} BODY[] {{{len(body)}}}"
        time.sleep(0.5)  # the client reads nothing for a while
        _, peak_stalled = rss_kib(pid)
        assert d.file.read(len(body)) == body
        assert d.line() == ")"
        assert d.until("c") == ["c OK FETCH completed"]
        _, peak_read = rss_kib(pid)
        d.close()
        assert peak_read - peak_before < 20 * 1024, (peak_before, peak_stalled, peak_read)
        client.uid("STORE", uid, "+FLAGS", "(\\Deleted)")
        client.expunge()
    finally:
        client.logout()


def test_starttls_discards_pipelined_plaintext(server):
    """A command sent in clear right after STARTTLS is never run inside TLS (RFC 3501 6.2.1)."""
    d = IMAPDialog(server.ports["imap"])
    try:
        d.line()
        d.send(b"a STARTTLS\r\nb LOGIN bob@example.org bob-password\r\n")
        assert d.until("a") == ["a OK Begin TLS negotiation now"]
        d.start_tls()
        d.send(b"c NOOP\r\n")
        assert d.until("c") == ["c OK NOOP completed"]
    finally:
        d.close()


def test_pop3_and_imap_agree_on_the_inbox(store_server):
    server = store_server
    """POP3 DELE + QUIT is an EXPUNGE for an IMAP session, and IMAP \\Deleted + EXPUNGE is gone for the next POP3 session."""
    user = CAROL
    for subject in (b"one", b"two"):
        deliver(server, MESSAGE.replace(b"over the wire", subject), to=user[0])
    client = connect(server, user)
    try:
        assert client.select("INBOX")[1] == [b"2"]
        pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
        pop.user(user[0])
        pop.pass_(user[1])
        pop.dele(1)
        pop.quit()
        client.noop()
        assert client.untagged_responses.pop("EXPUNGE", []) == [b"1"]
        client.store("1", "+FLAGS", "(\\Deleted)")
        client.expunge()
        pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
        pop.user(user[0])
        pop.pass_(user[1])
        assert pop.stat()[0] == 0
        pop.quit()
    finally:
        client.logout()
