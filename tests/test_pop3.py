"""POP3 and POP3S over the wire with poplib, raw sockets and curl."""

from __future__ import annotations

import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from conftest import Dialog, message, wait_for

ALICE = ("alice@example.org", "alice-password")


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def deliver(server, *messages: bytes, to: str = "bob@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        for raw in messages:
            client.sendmail("someone@remote.test", [to], raw)


def login(server, user: str = "bob@example.org", password: str = "bob-password", implicit: bool = False) -> poplib.POP3:
    if implicit:
        client: poplib.POP3 = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
    else:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=20)
    try:
        if not implicit:
            client.stls(tls_context())
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


def plain(server) -> Dialog:
    d = Dialog(server.ports["pop3"])
    assert d.file.readline().startswith(b"+OK")
    return d


def line(d: Dialog, command: bytes | str) -> bytes:
    d.send((command.encode() if isinstance(command, str) else command) + b"\r\n")
    return d.file.readline().rstrip(b"\r\n")


def empty_maildir(server, address: str = "bob@example.org") -> None:
    """The account's maildir moved out of the mail root: its next delivery starts a new one.
    (A session of an earlier test that still holds the old one's lock holds it there.)"""
    folder = server.maildir(address)
    if folder.exists():
        aside = server.root / "replaced-maildirs"
        aside.mkdir(exist_ok=True)
        folder.rename(aside / f"{address}.{time.time_ns()}")


@pytest.fixture
def mailbox(server):
    """The module's server with just three messages for bob, one with dot-lines."""
    empty_maildir(server)
    deliver(
        server,
        message("first", body="one\r\n"),
        message("second", body=".starts with a dot\r\n..two dots\r\n.\r\nend\r\n"),
        message("third", body="three\r\n" * 100),
    )
    return server


# --- TLS first ------------------------------------------------------------------


def test_capa_before_and_after_tls(server):
    """Before STLS CAPA offers STLS and no login; after it, USER, SASL PLAIN LOGIN and the RFC 2449 list."""
    client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=20)
    before = client.capa()
    assert "STLS" in before and "USER" not in before and "SASL" not in before
    client.stls(tls_context())
    after = client.capa()
    for capability in ("TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE", "IMPLEMENTATION"):
        assert capability in after
    assert after["SASL"] == ["PLAIN", "LOGIN"] and "STLS" not in after
    client.quit()


@pytest.mark.parametrize("command", ["USER alice@example.org", "PASS alice-password", "AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAGFsaWNlLXBhc3N3b3Jk", "APOP alice 0123456789abcdef"])
def test_no_password_before_tls(server, command):
    """USER, PASS, AUTH and APOP before TLS get -ERR [AUTH] and never log in."""
    with plain(server) as d:
        reply = line(d, command)
        assert reply.startswith(b"-ERR [AUTH]"), reply
        assert line(d, "STAT").startswith(b"-ERR")


def test_stls_refused_inside_tls(server):
    """STLS inside TLS (after STLS, or on POP3S) is refused."""
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
    with pytest.raises(poplib.error_proto, match="already active"):
        client._shortcmd("STLS")
    client.quit()


def test_stls_discards_pipelined_plaintext(server):
    """A USER pipelined after STLS in clear text is forgotten once TLS is up (RFC 2595 4)."""
    raw = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=20)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"STLS\r\nUSER alice@example.org\r\n")
    assert f.readline().startswith(b"+OK")
    tls = tls_context().wrap_socket(raw, server_hostname="mail.example.org")
    t = tls.makefile("rb")
    tls.sendall(b"PASS alice-password\r\n")
    assert t.readline().startswith(b"-ERR Send USER first")
    f.close()
    t.close()
    tls.close()


# --- logging in -----------------------------------------------------------------


def test_login_stls_and_pop3s(server):
    """The address and password from `mailplat user add` log in over STLS and over POP3S."""
    for implicit in (False, True):
        client = login(server, *ALICE, implicit=implicit)
        assert client.stat()[0] >= 0
        client.quit()


def test_sasl_plain(server):
    """AUTH PLAIN works with an initial response and with a continuation; '*' cancels."""
    import base64

    token = base64.b64encode(b"\0alice@example.org\0alice-password").decode()
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
    assert client._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
    client.quit()
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
    client._putcmd("AUTH PLAIN")
    assert client._getline()[0].startswith(b"+")
    with pytest.raises(poplib.error_proto, match="cancelled"):
        client._shortcmd("*")
    client._putcmd("AUTH PLAIN")
    client._getline()
    assert client._shortcmd(token).startswith(b"+OK")
    client.quit()


def test_wrong_password_is_delayed(server):
    """A wrong password gets -ERR [AUTH] only after the configured delay."""
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
    client.user("alice@example.org")
    started = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
        client.pass_("wrong")
    assert time.monotonic() - started >= 0.3
    client.quit()


def test_failed_logins_block_the_address(make_server):
    """After max_login_failures the client address is refused, even with the right password; others are not."""
    server = make_server("[login]\nmax_login_failures = 3\nlogin_block_time = 60\n")
    for _ in range(3):
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            login(server, "alice@example.org", "wrong", implicit=True)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Too many failed logins"):
        login(server, *ALICE, implicit=True)
    # Another client address (127.0.0.2) is not blocked.
    raw = socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=20, source_address=("127.0.0.2", 0))
    tls = tls_context().wrap_socket(raw, server_hostname="mail.example.org")
    f = tls.makefile("rb")
    f.readline()
    tls.sendall(b"USER alice@example.org\r\nPASS alice-password\r\n")
    assert f.readline().startswith(b"+OK") and f.readline().startswith(b"+OK Logged in")
    f.close()
    tls.close()


@pytest.mark.parametrize("user", ["../../../etc/passwd", "alice@example.org/../../x", "..@example.org", "alice@example.org\x00x", "a" * 300])
def test_path_tricks_fail_like_wrong_logins(server, user):
    """User names with path tricks fail like any wrong login and create nothing outside the mail root."""
    before = set(os.listdir(server.root))
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(), timeout=20)
    try:
        client.user(user.replace("\x00", ""))
        with pytest.raises(poplib.error_proto):
            client.pass_("alice-password")
    finally:
        client.close()
    assert set(os.listdir(server.root)) == before
    assert sorted(os.listdir(server.root / "mail")) in (["example.org"], [])


# --- the maildrop ---------------------------------------------------------------


def test_sizes_uidl_and_exact_bytes(mailbox):
    """STAT and LIST sizes equal the octets RETR sends, UIDLs are unique, and dot-lines come back byte-exact."""
    client = login(mailbox)
    count, total = client.stat()
    assert count == 3
    sizes = [int(entry.split()[1]) for entry in client.list()[1]]
    assert sum(sizes) == total
    uids = [entry.split()[1] for entry in client.uidl()[1]]
    assert len(set(uids)) == 3 and all(len(u) <= 70 for u in uids)
    stored = mailbox.messages("bob@example.org")
    for n in range(1, 4):
        _, lines, octets = client.retr(n)
        body = b"\r\n".join(lines) + b"\r\n"
        assert body == stored[n - 1]
        assert len(body) == sizes[n - 1]
    assert b".starts with a dot\r\n..two dots\r\n.\r\nend\r\n" in stored[1]
    client.quit()


def test_top(mailbox):
    """TOP returns the header, the blank line and the first N body lines."""
    client = login(mailbox)
    _, lines, _ = client.top(3, 2)
    assert b"Subject: third" in lines
    blank = lines.index(b"")
    assert lines[blank + 1 :] == [b"three", b"three"]
    client.quit()


def test_dele_rset_and_quit(mailbox):
    """DELE only marks, RSET unmarks, and QUIT deletes the marked messages."""
    client = login(mailbox)
    client.dele(1)
    assert client.stat()[0] == 2
    with pytest.raises(poplib.error_proto, match="deleted"):
        client.retr(1)
    client.rset()
    assert client.stat()[0] == 3
    client.dele(2)
    client.quit()
    client = login(mailbox)
    assert client.stat()[0] == 2
    assert b"Subject: second" not in b"".join(b"\n".join(client.retr(n)[1]) for n in (1, 2))
    client.quit()


def test_drop_without_quit_deletes_nothing(mailbox):
    """A connection dropped after DELE applies nothing, and the lock is released."""
    client = login(mailbox)
    client.dele(1)
    client.dele(2)
    before = len(mailbox.log())
    client.close()
    wait_for(lambda: "pop3 disconnect" in mailbox.log()[before:], what="the disconnect")

    def relogin():
        try:
            return login(mailbox)
        except poplib.error_proto:
            return None

    client = wait_for(relogin, what="the lock to be released")
    assert client.stat()[0] == 3
    client.quit()


def test_second_login_gets_in_use(mailbox):
    """While one session holds the maildrop, a second login gets -ERR [IN-USE]."""
    first = login(mailbox)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(mailbox, implicit=True)
    first.quit()
    login(mailbox, implicit=True).quit()


def test_uidl_stable_across_sessions_and_restart(mailbox):
    """UIDLs are the same in a new session and after a server restart, and survive retrieval."""
    client = login(mailbox)
    uids = client.uidl()[1]
    client.retr(1)
    client.quit()
    mailbox.stop()
    mailbox.start()
    client = login(mailbox)
    assert client.uidl()[1] == uids
    client.quit()


def test_large_message_byte_exact(server):
    """A 20 MB message with dot-lines at every chunk boundary comes back byte for byte."""
    empty_maildir(server)
    line_block = b"x" * 62 + b"\r\n"  # 64 octets: lines start at every 64 KB boundary
    body = bytearray()
    while len(body) < 20 * 1024 * 1024:
        body += b"." + line_block[1:] if len(body) % 65536 == 0 else line_block
    raw = b"Subject: big\r\n\r\n" + bytes(body)
    deliver(server, raw)
    client = login(server)
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == server.messages("bob@example.org")[0]
    client.quit()


# --- bad input ----------------------------------------------------------------------


def test_errors_keep_the_session(mailbox):
    """Commands before login, unknown commands, bad numbers, deleted numbers, long lines and NUL bytes get -ERR and the session goes on."""
    with plain(mailbox) as d:
        assert line(d, "STAT").startswith(b"-ERR")
        assert line(d, "FROB").startswith(b"-ERR Unknown command")
        assert line(d, b"\xff\xfe").startswith(b"-ERR")
        assert line(d, b"NOOP\x00").startswith(b"-ERR")
        assert line(d, "X" * 5000).startswith(b"-ERR Line too long")
        assert line(d, "CAPA").startswith(b"+OK")
    client = login(mailbox)
    for bad in ("RETR 0", "RETR 4", "RETR abc", "LIST 99", "DELE -1", "TOP 1", "TOP 1 x"):
        with pytest.raises(poplib.error_proto):
            client._shortcmd(bad)
    client.dele(1)
    with pytest.raises(poplib.error_proto, match="deleted"):
        client._shortcmd("DELE 1")
    assert client.noop().startswith(b"+OK")
    client.quit()


@pytest.mark.parametrize("bad", ["RETR ²", "TOP 1 ¹", "TOP ¹ 1", "LIST ³", "DELE ٣", "UIDL 1_0", "LIST +1"])
def test_non_ascii_digits_are_not_numbers(mailbox, bad):
    """A message number or line count written with digits other than ASCII 0-9 gets -ERR and the session goes on."""
    client = login(mailbox)
    try:
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client._shortcmd(bad)
        assert client.stat()[0] == 3
        assert client.retr(1)[0].startswith(b"+OK")
        client.quit()
    finally:
        client.close()


def test_pipelined_commands_answer_in_order(mailbox):
    """Commands pipelined in one write (RFC 2449 PIPELINING) are answered in order, the login included."""
    raw = socket.create_connection(("127.0.0.1", mailbox.ports["pop3s"]), timeout=20)
    tls = tls_context().wrap_socket(raw, server_hostname="mail.example.org")
    f = tls.makefile("rb")
    f.readline()
    tls.sendall(b"USER bob@example.org\r\nPASS bob-password\r\nSTAT\r\nDELE 1\r\nSTAT\r\nRSET\r\nQUIT\r\n")
    replies = [f.readline() for _ in range(7)]
    f.close()
    tls.close()
    assert replies[2].startswith(b"+OK 3 ") and replies[4].startswith(b"+OK 2 ")
    assert all(r.startswith(b"+OK") for r in replies), replies


# --- retention ----------------------------------------------------------------------


def age_pop3_records(maildir, seconds: float) -> None:
    """Make what POP3 recorded retrieving or trashing ``seconds`` older (the maildir's expiry record)."""
    record = maildir / "mailplat-pop3-expiry"
    lines = [line.split(" ", 1) for line in record.read_text().splitlines()]
    record.write_text("".join(f"{float(when) - seconds:.0f} {rest}\n" for when, rest in lines))


def test_trash_instead_of_remove(make_server):
    """With on_delete = "trash" a deleted message moves to .Trash and is purged trash_days after POP3
    trashed it; an old message put in Trash otherwise (an IMAP MOVE keeps its time) is not purged then."""
    server = make_server('[pop3]\non_delete = "trash"\ntrash_days = 1\n')
    deliver(server, message("keep"), message("bin-me"))
    client = login(server)
    client.dele(2)
    client.quit()
    trash = server.maildir("bob@example.org") / ".Trash" / "cur"
    trashed = list(trash.iterdir())
    assert len(trashed) == 1 and b"Subject: bin-me" in trashed[0].read_bytes()
    old = time.time() - 2 * 86400
    moved = trash / "1000000000.M1P1Q1.elsewhere:2,S"
    moved.write_bytes(b"Subject: moved here over IMAP\r\n\r\nx\r\n")
    os.utime(moved, (old, old))
    os.utime(trashed[0], (old, old))
    login(server).quit()
    assert sorted(trash.iterdir()) == sorted([trashed[0], moved])  # trashed a moment ago
    age_pop3_records(server.maildir("bob@example.org"), 2 * 86400)
    login(server).quit()
    assert list(trash.iterdir()) == [moved]


def test_expire_retrieved_mail(make_server):
    """With expire_days, CAPA says EXPIRE N and mail POP3 retrieved longer ago than that is removed;
    unretrieved mail stays, and so does old mail read only over IMAP (seen, but never retrieved)."""
    server = make_server("[pop3]\nexpire_days = 3\n")
    deliver(server, message("read-me"), message("unread"))
    client = login(server)
    assert client.capa()["EXPIRE"] == ["3"]
    client.retr(1)
    client.quit()
    cur = server.maildir("bob@example.org") / "cur"
    seen = [p for p in cur.iterdir() if p.name.endswith(":2,S")]
    assert len(seen) == 1
    old = time.time() - 4 * 86400
    read_over_imap = cur / "1000000000.M1P1Q1.elsewhere:2,S"
    read_over_imap.write_bytes(b"Subject: read over IMAP\r\n\r\nx\r\n")
    os.utime(read_over_imap, (old, old))
    os.utime(seen[0], (old, old))
    age_pop3_records(server.maildir("bob@example.org"), 4 * 86400)
    client = login(server)
    assert client.stat()[0] == 2
    subjects = [b"\n".join(client.retr(n)[1]) for n in (1, 2)]
    assert b"Subject: read over IMAP" in subjects[0] and b"Subject: unread" in subjects[1]
    client.quit()


# --- a second real client -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (apt-get install curl)")
def test_curl_pop3_stls_and_pop3s(mailbox):
    """curl lists and retrieves over pop3 with --ssl-reqd (STLS) and over pop3s."""
    stored = mailbox.messages("bob@example.org")
    common = ["curl", "--silent", "--show-error", "--insecure", "--max-time", "30", "--user", "bob@example.org:bob-password"]
    listing = subprocess.run(common + ["--ssl-reqd", f"pop3://127.0.0.1:{mailbox.ports['pop3']}/"], capture_output=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert len(listing.stdout.splitlines()) == 3
    retrieved = subprocess.run(common + [f"pop3s://127.0.0.1:{mailbox.ports['pop3s']}/2"], capture_output=True, timeout=60)
    assert retrieved.returncode == 0, retrieved.stderr
    assert retrieved.stdout == stored[1]
    refused = subprocess.run(
        ["curl", "--silent", "--max-time", "30", "--user", "bob@example.org:bob-password", f"pop3://127.0.0.1:{mailbox.ports['pop3']}/"],
        capture_output=True, timeout=60,
    )
    assert refused.returncode != 0  # no TLS, no login


def test_idle_timeout_and_connection_limit(make_server):
    """A silent POP3 client is closed after idle_timeout; connections over the per-address limit get -ERR [SYS/TEMP]."""
    server = make_server("[pop3]\nidle_timeout = 0.5\nmax_connections_per_ip = 2\n")
    first, second = plain(server), plain(server)
    third = Dialog(server.ports["pop3"])
    assert third.file.readline().startswith(b"-ERR [SYS/TEMP] too many connections")
    third.close()
    assert first.file.readline().startswith(b"-ERR [SYS/TEMP] idle")
    assert first.closed()
    first.close()
    second.close()


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="needs fetchmail (apt-get install fetchmail)")
def test_fetchmail_stls_keep_then_delete(mailbox, tmp_path):
    """fetchmail downloads every message over STLS (keeping them, remembered by UIDL), then fetches and deletes them."""
    out = tmp_path / "fetched"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"

    def run(keep: str) -> subprocess.CompletedProcess[str]:
        rc.write_text(
            f'poll 127.0.0.1 service {mailbox.ports["pop3"]} protocol pop3 uidl user "bob@example.org" password "bob-password" '
            f"sslproto 'TLS1.2+' no sslcertck {keep} mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
        )
        rc.chmod(0o600)
        return subprocess.run(
            ["fetchmail", "-f", str(rc), "--idfile", str(tmp_path / "ids"), "--nodetach", "--nosyslog"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
        )

    stored = mailbox.messages("bob@example.org")
    first = run("keep")
    assert first.returncode == 0, first.stdout + first.stderr
    fetched = sorted(p.read_bytes() for p in out.iterdir())
    assert len(fetched) == 3
    assert all(any(f.endswith(m.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")) for f in fetched) for m in stored)
    again = run("keep")
    assert again.returncode == 1  # "no mail": every UIDL was seen before
    final = run("fetchall nokeep")
    assert final.returncode == 0, final.stdout + final.stderr
    client = login(mailbox)
    assert client.stat()[0] == 0
    client.quit()
