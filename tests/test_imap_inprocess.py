"""IMAP sessions in-process (StringTransport + Clock, tests/inprocess.py): timers,
error counts, the login guard, literals refused before they are read, and
what two sessions on one folder tell each other."""

from __future__ import annotations

import base64
import os

from twisted.logger import globalLogPublisher

from inprocess import Platform, Wire
from mailplat.config import IMAPSettings
from mailplat.interfaces import Account

MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nbody line\r\n"


def login(wire: Wire, user: str = "alice@example.org", password: str = "alice-password") -> Wire:
    assert wire.output().startswith("* OK [CAPABILITY IMAP4rev1")
    wire.send(f"L LOGIN {user} {password}")
    assert wire.lines()[-1].startswith("L OK")
    return wire


def append(wire: Wire, message: bytes = MESSAGE, folder: str = "INBOX") -> str:
    wire.send(f"A APPEND {folder} {{{len(message)}+}}")
    wire.send(message)
    return wire.lines()[-1]


def selected(platform: Platform, messages: int = 0, **kwargs: object) -> Wire:
    wire = login(platform.imap(**kwargs))  # type: ignore[arg-type]
    for _ in range(messages):
        assert append(wire).startswith("A OK [APPENDUID")
    wire.send("S SELECT INBOX")
    assert wire.lines()[-1] == "S OK [READ-WRITE] SELECT completed"
    return wire


def test_plain_listener_refuses_logins_before_tls():
    """Without TLS: LOGINDISABLED and no AUTH= in CAPABILITY, and LOGIN and AUTHENTICATE get NO [PRIVACYREQUIRED]."""
    wire = Platform().imap(implicit_tls=False)
    greeting = wire.output()
    assert "LOGINDISABLED" in greeting and "AUTH=" not in greeting
    wire.send("a LOGIN alice@example.org alice-password")
    assert wire.lines() == ["a NO [PRIVACYREQUIRED] Logins are disabled without TLS; use STARTTLS first"]
    wire.send("b AUTHENTICATE PLAIN")
    assert wire.lines()[0].startswith("b NO [PRIVACYREQUIRED]")
    wire.send("c STARTTLS")
    assert wire.lines() == ["c NO STARTTLS is not available"]
    assert not wire.closed


def test_wrong_password_waits_then_the_address_is_blocked():
    """A failed LOGIN is answered NO [AUTHENTICATIONFAILED] after the delay; at the limit, NO [UNAVAILABLE] at once, for a right password too."""
    platform = Platform(failure_delay=2.0, max_failures=2)
    wire = platform.imap()
    wire.output()
    for tag in ("a", "b"):
        wire.send(f"{tag} LOGIN alice@example.org wrong")
        assert wire.output() == ""
        platform.clock.advance(2.1)
        assert wire.lines() == [f"{tag} NO [AUTHENTICATIONFAILED] Authentication failed"]
    wire.send("c LOGIN alice@example.org alice-password")
    assert wire.lines()[0].startswith("c NO [UNAVAILABLE] Too many failed logins")
    platform.clock.advance(301)
    wire.send("d LOGIN alice@example.org alice-password")
    assert wire.lines()[0].startswith("d OK [CAPABILITY")


def test_authenticate_plain_with_and_without_initial_response():
    """AUTHENTICATE PLAIN works with SASL-IR and with a "+" continuation; "*" cancels with BAD and the session goes on."""
    platform = Platform()
    credentials = base64.b64encode(b"\0alice@example.org\0alice-password").decode()
    wire = platform.imap()
    wire.output()
    wire.send("a AUTHENTICATE PLAIN")
    assert wire.lines() == ["+ "]
    wire.send("*")
    assert wire.lines() == ["a BAD AUTHENTICATE cancelled"]
    wire.send("b AUTHENTICATE PLAIN")
    wire.output()
    wire.send(credentials)
    assert wire.lines()[0].startswith("b OK [CAPABILITY")
    other = platform.imap()
    other.output()
    other.send(f"c AUTHENTICATE PLAIN {credentials}")
    assert other.lines()[0].startswith("c OK [CAPABILITY")
    other.send("d AUTHENTICATE LOGIN")
    assert other.lines() == ["d BAD AUTHENTICATE is not valid once logged in"]


def test_idle_timeout_says_bye_autologout():
    """A silent session is logged out with BYE after [imap] idle_timeout, not before."""
    platform = Platform()
    wire = login(platform.imap())
    platform.clock.advance(1799)
    assert not wire.closed
    platform.clock.advance(2)
    assert wire.lines() == ["* BYE Autologout; idle for too long"]
    assert wire.closed


def test_garbage_is_bad_and_the_session_goes_on_until_the_error_limit():
    """Malformed commands get BAD with a reason; the max_errors_before_login-th ends the session with BYE."""
    platform = Platform(imap=IMAPSettings(max_errors_before_login=5))
    wire = platform.imap()
    wire.output()
    wire.send("a1 FETCH (1")
    assert wire.lines() == ["a1 BAD Missing ')'"]
    wire.send('a2 LOGIN "unterminated')
    assert wire.lines() == ["a2 BAD Missing closing quote"]
    wire.send("\x01\x02")
    assert wire.lines() == ["* BAD Missing or invalid tag"]
    wire.send("a4 FROB")
    assert wire.lines() == ["a4 BAD Unknown command FROB"]
    wire.send("a5 NOOP")
    assert wire.lines() == ["a5 OK NOOP completed"]
    wire.send("a6 LOGIN")
    assert wire.lines() == ["a6 BAD Syntax: LOGIN user password", "* BYE Too many invalid commands"]
    assert wire.closed


def test_oversized_literals_are_refused_before_a_byte_is_read(tmp_path):
    """{999999999999} for APPEND is NO [TOOBIG] and for LOGIN BAD, without a "+" or a file; a non-synchronizing one ends the session."""
    platform = Platform()
    wire = login(platform.imap(spool_dir=str(tmp_path)))
    wire.send("a APPEND INBOX {999999999999}")
    assert wire.lines() == ["a NO [TOOBIG] Literal too big (limit 67108864 octets for a message)"]
    wire.send("b LOGIN {70000}")
    assert wire.lines() == ["b BAD Literal too big (limit 65536 octets)"]
    wire.send("c NOOP")
    assert wire.lines() == ["c OK NOOP completed"]
    assert os.listdir(tmp_path) == []
    wire.send("d APPEND INBOX {999999999999+}")
    assert wire.lines() == ["d NO [TOOBIG] Literal too big (limit 67108864 octets for a message)", "* BYE Literal refused; closing the connection"]
    assert wire.closed


def test_large_append_goes_to_a_file_that_is_removed_after(tmp_path):
    """An APPEND literal over 64 KiB is written to the spool as it arrives and removed once stored."""
    platform = Platform()
    wire = login(platform.imap(spool_dir=str(tmp_path)))
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    message = body * 200
    wire.send(f"a APPEND INBOX (\\Seen) \"01-Jan-2024 10:00:00 +0100\" {{{len(message)}}}")
    assert wire.lines() == ["+ Ready for literal data"]
    wire.protocol.dataReceived(message[:100_000])
    assert len(os.listdir(tmp_path)) == 1
    wire.protocol.dataReceived(message[100_000:] + b"\r\n")
    assert wire.lines() == ["a OK [APPENDUID 1001 1] APPEND completed"]
    assert os.listdir(tmp_path) == []
    stored = platform.store.accounts["alice@example.org"]["INBOX"].messages[1]
    assert stored[1] == message and stored[0].flags == {"\\Seen"} and stored[0].internal_date == 1704099600.0


def test_literal_plus_and_literals_inside_a_command():
    """Literals ({n} and {n+}) may stand for any string of a command, and the command goes on after each."""
    wire = Platform().imap()
    wire.output()
    wire.send("a LOGIN {17}")
    assert wire.lines() == ["+ Ready for literal data"]
    wire.protocol.dataReceived(b"alice@example.org {14+}\r\nalice-password\r\n")
    assert wire.lines()[0].startswith("a OK [CAPABILITY")
    wire.send('b CREATE {19+}\r\nArchive/&AOk-t&AOk-')
    assert wire.lines() == ["b OK CREATE completed"]
    wire.send('c LIST "" "Archive/%"')
    assert wire.lines() == ['* LIST (\\HasNoChildren) "/" "Archive/&AOk-t&AOk-"', "c OK LIST completed"]


def test_backend_bug_is_a_one_line_log_and_no_traceback_on_the_wire():
    """A store that raises gets NO [SERVERBUG]; the log has one line with the session id; the session goes on."""
    platform = Platform()
    wire = login(platform.imap())
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        platform.store.broken = ZeroDivisionError("oops")
        wire.send("a SELECT INBOX")
        assert wire.lines() == ["a NO [SERVERBUG] Internal error, try again later"]
        platform.store.broken = None
        wire.send("b SELECT INBOX")
        assert wire.lines()[-1] == "b OK [READ-WRITE] SELECT completed"
    finally:
        globalLogPublisher.removeObserver(events.append)
    errors = [e for e in events if e.get("log_level").name == "error"]
    assert len(errors) == 1
    text = errors[0]["log_format"].format(**errors[0])
    assert wire.protocol.session in text and "ZeroDivisionError: oops" in text and "\n" not in text


def test_store_errors_map_to_response_codes():
    """A missing folder is NO [NONEXISTENT], [TRYCREATE] as a COPY or APPEND target; an existing one NO [ALREADYEXISTS]."""
    wire = selected(Platform(), messages=1)
    wire.send("a SELECT Nowhere")
    assert wire.lines()[-1].startswith("a NO [NONEXISTENT]")
    wire.send("b SELECT INBOX")
    wire.output()
    wire.send("c COPY 1 Nowhere")
    assert wire.lines() == ["c NO [TRYCREATE] No such mailbox; create it first"]
    assert append(wire, folder="Nowhere") == "A NO [TRYCREATE] No such mailbox; create it first"
    wire.send("d CREATE Sent")
    assert wire.lines()[-1].startswith("d NO [ALREADYEXISTS]")


def test_sequence_sets_on_an_empty_folder_and_bad_ones():
    """In an empty folder FETCH 1:* is BAD (as Dovecot) and UID FETCH 1:* OK with nothing; a malformed set is BAD."""
    wire = selected(Platform())
    wire.send("a FETCH 1:* FLAGS")
    assert wire.lines() == ["a BAD Invalid message set: the mailbox is empty"]
    wire.send("b UID FETCH 1:* FLAGS")
    assert wire.lines() == ["b OK FETCH completed"]
    wire.send("c UID FETCH 0:x FLAGS")
    assert wire.lines() == ["c BAD Invalid sequence set 0:x"]


def test_per_user_and_address_session_limit():
    """The max_connections_per_user_ip-th + 1 login of one user from one address gets NO [LIMIT]; another address may."""
    platform = Platform(imap=IMAPSettings(max_connections_per_user_ip=2))
    first = platform.imap()
    factory = first.protocol.factory
    login(first)
    login(platform.imap(factory=factory))
    third = platform.imap(factory=factory)
    third.output()
    third.send("L LOGIN alice@example.org alice-password")
    assert third.lines() == ["L NO [LIMIT] Too many sessions for this user from your address (limit 2)"]
    login(platform.imap(factory=factory, peer="192.0.2.9"))
    first.transport.loseConnection()
    first.protocol.connectionLost(None)
    third.send("M LOGIN alice@example.org alice-password")
    assert third.lines()[0].startswith("M OK")


def test_session_limit_counts_both_listeners_together():
    """Sessions on imap (after STARTTLS) and imaps of one user and address share one max_connections_per_user_ip."""
    from collections import Counter

    from mailplat.imap.server import IMAPFactory

    platform = Platform(imap=IMAPSettings(max_connections_per_user_ip=1))
    shared: Counter[tuple[str, str]] = Counter()
    listeners = [
        IMAPFactory(platform.imap_settings, platform.guard, None, True, platform.store, 0, platform.clock, user_connections=shared)
        for _ in range(2)
    ]
    login(platform.imap(factory=listeners[0]))
    other = platform.imap(factory=listeners[1])
    other.output()
    other.send("L LOGIN alice@example.org alice-password")
    assert other.lines()[0].startswith("L NO [LIMIT]")


def test_flags_set_by_one_session_reach_the_other_at_its_next_command():
    """Session B sees A's STORE as an untagged FETCH FLAGS on its next command (with MODSEQ once CONDSTORE is on)."""
    platform = Platform()
    a = selected(platform, messages=2)
    b = selected(platform)
    a.send("s STORE 2 +FLAGS (\\Flagged)")
    assert a.lines() == ["* 2 FETCH (UID 2 FLAGS (\\Flagged))", "s OK STORE completed"]
    b.send("n NOOP")
    assert b.lines() == ["* 2 FETCH (UID 2 FLAGS (\\Flagged))", "n OK NOOP completed"]
    b.send("e ENABLE CONDSTORE")
    b.output()
    a.send("s STORE 1 +FLAGS.SILENT (\\Seen)")
    assert a.lines() == ["s OK STORE completed"]
    b.send("n NOOP")
    modseq = platform.store.accounts["alice@example.org"]["INBOX"].messages[1][0].modseq
    assert b.lines() == [f"* 1 FETCH (UID 1 FLAGS (\\Seen) MODSEQ ({modseq}))", "n OK NOOP completed"]


def test_expunge_by_another_session_waits_for_a_command_that_allows_it():
    """Another session's EXPUNGE is not announced during FETCH (RFC 3501 7.4.1: NO [EXPUNGEISSUED] for the gone message) but at the next NOOP."""
    platform = Platform()
    a = selected(platform, messages=2)
    b = selected(platform)
    a.send("s STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.send("x EXPUNGE")
    assert a.lines()[-2:] == ["* 1 EXPUNGE", "x OK EXPUNGE completed"]
    b.send("f FETCH 1:* (UID)")
    assert b.lines() == ["* 2 FETCH (UID 2)", "f NO [EXPUNGEISSUED] Some of the requested messages no longer exist"]
    b.send("n NOOP")
    assert b.lines() == ["* 1 EXPUNGE", "n OK NOOP completed"]
    b.send("f FETCH 1:* (UID)")
    assert b.lines() == ["* 1 FETCH (UID 2)", "f OK FETCH completed"]


def test_idle_pushes_new_mail_and_flag_changes_then_done():
    """During IDLE a message appended elsewhere arrives as EXISTS, a flag change as FETCH, and every 2 minutes an OK; DONE ends it."""
    platform = Platform()
    idle = selected(platform)
    other = login(platform.imap())
    idle.send("i IDLE")
    assert idle.lines() == ["+ idling"]
    assert append(other).startswith("A OK [APPENDUID")
    assert idle.lines() == ["* 1 EXISTS"]
    other.send("s SELECT INBOX")
    other.send("t STORE 1 +FLAGS (\\Answered)")
    other.output()
    assert idle.lines() == ["* 1 FETCH (UID 1 FLAGS (\\Answered))"]
    platform.clock.advance(120)
    assert idle.lines() == ["* OK Still here"]
    idle.send("DONE")
    assert idle.lines() == ["i OK IDLE terminated"]
    platform.clock.advance(240)
    assert idle.lines() == []
    idle.send("u UNSELECT")
    assert idle.lines() == ["u OK UNSELECT completed"]
    assert not any(w[0] == "alice@example.org" and w[2].__self__ is idle.protocol for w in platform.store.watchers)


def test_qresync_select_reports_vanished_and_changed():
    """SELECT (QRESYNC (uidvalidity modseq)) sends VANISHED (EARLIER) for the gone UIDs and FETCH for the messages changed since."""
    platform = Platform()
    wire = selected(platform, messages=3)
    wire.send("s STORE 1 +FLAGS.SILENT (\\Deleted)")
    wire.send("x EXPUNGE")
    wire.send("f STORE 2 +FLAGS (\\Flagged)")
    wire.send("u UNSELECT")
    wire.send("e ENABLE QRESYNC")
    assert wire.lines()[-2:] == ["* ENABLED QRESYNC", "e OK ENABLE completed"]
    box = platform.store.accounts["alice@example.org"]["INBOX"]
    modseq3 = box.messages[3][0].modseq
    wire.send(f"q SELECT INBOX (QRESYNC ({box.uidvalidity} {modseq3 - 1}))")
    lines = wire.lines()
    assert "* VANISHED (EARLIER) 1" in lines
    assert f"* 2 FETCH (UID 3 FLAGS (\\Flagged) MODSEQ ({modseq3}))" in lines
    assert not any("UID 2 " in line for line in lines)


def test_search_and_esearch():
    """SEARCH answers MSNs, UID SEARCH UIDs, and RETURN (MIN MAX COUNT ALL) an ESEARCH with the command's tag."""
    platform = Platform()
    wire = selected(platform, messages=4)
    wire.send("s STORE 2,4 +FLAGS.SILENT (\\Seen)")
    wire.send("s STORE 1 +FLAGS.SILENT (\\Deleted)")
    wire.send("x EXPUNGE")
    wire.output()
    wire.send("a SEARCH UNSEEN")
    assert wire.lines() == ["* SEARCH 2", "a OK SEARCH completed"]
    wire.send("b UID SEARCH SEEN")
    assert wire.lines() == ["* SEARCH 2 4", "b OK SEARCH completed"]
    wire.send("c UID SEARCH RETURN (MIN MAX COUNT ALL) ALL")
    assert wire.lines() == ['* ESEARCH (TAG "c") UID MIN 2 MAX 4 COUNT 3 ALL 2:4', "c OK SEARCH completed"]
    wire.send('d SEARCH SUBJECT "hello" NOT SEEN')
    assert wire.lines() == ["* SEARCH 2", "d OK SEARCH completed"]
    wire.send("e SEARCH CHARSET KOI8-R ALL")
    assert wire.lines()[0].startswith("e NO [BADCHARSET")
    wire.send("f SEARCH FROBNICATE")
    assert wire.lines()[0].startswith("f BAD Invalid SEARCH")


def test_fetch_body_sets_seen_and_peek_does_not():
    """FETCH BODY[] sets \\Seen and says so in the response; BODY.PEEK[] and EXAMINE leave the flags alone."""
    platform = Platform()
    wire = selected(platform, messages=2)
    wire.send("a FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    assert wire.output() == "* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: hello\r\n\r\n)\r\na OK FETCH completed\r\n"
    wire.send("b UID FETCH 2 (BODY[])")
    assert wire.output() == f"* 2 FETCH (UID 2 BODY[] {{{len(MESSAGE)}}}\r\n".encode().decode() + MESSAGE.decode() + " FLAGS (\\Seen))\r\nb OK FETCH completed\r\n"
    box = platform.store.accounts["alice@example.org"]["INBOX"]
    assert box.messages[2][0].flags == {"\\Seen"} and box.messages[1][0].flags == frozenset()
    wire.send("c EXAMINE INBOX")
    wire.output()
    wire.send("d FETCH 1 BODY[TEXT]<0.4>")
    assert wire.output() == "* 1 FETCH (BODY[TEXT]<0> {4}\r\nbody)\r\nd OK FETCH completed\r\n"
    assert box.messages[1][0].flags == frozenset()
    wire.send("e STORE 1 +FLAGS (\\Seen)")
    assert wire.lines() == ["e NO [READ-ONLY] The mailbox is read-only (EXAMINE)"]


def test_conditional_store_reports_modified():
    """STORE (UNCHANGEDSINCE n) leaves a message changed since alone and names it in [MODIFIED]."""
    platform = Platform()
    wire = selected(platform, messages=2)
    box = platform.store.accounts["alice@example.org"]["INBOX"]
    old = box.modseq
    wire.send("a STORE 1 +FLAGS.SILENT (\\Flagged)")
    wire.output()
    wire.send(f"b STORE 1:2 (UNCHANGEDSINCE {old}) +FLAGS.SILENT (\\Answered)")
    lines = wire.lines()
    assert lines[-1] == "b OK [MODIFIED 1] Conditional STORE failed for some messages"
    assert box.messages[1][0].flags == {"\\Flagged"} and box.messages[2][0].flags == {"\\Answered"}
    assert lines[:-1] == [f"* 2 FETCH (UID 2 MODSEQ ({box.messages[2][0].modseq}))"]


def test_move_sends_copyuid_then_expunge():
    """MOVE (RFC 6851): an untagged OK [COPYUID], the EXPUNGE of the source message, then the tagged OK."""
    platform = Platform()
    wire = selected(platform, messages=2)
    wire.send("m MOVE 1 Archive")
    archive = platform.store.accounts["alice@example.org"]["Archive"]
    assert wire.lines() == [f"* OK [COPYUID {archive.uidvalidity} 1 1] Moved", "* 1 EXPUNGE", "m OK MOVE completed"]
    wire.send("c UID COPY 2 Trash")
    trash = platform.store.accounts["alice@example.org"]["Trash"]
    assert wire.lines() == [f"c OK [COPYUID {trash.uidvalidity} 2 1] COPY completed"]


def test_connection_limits_and_cross_protocol_requests():
    """Past max_connections_per_ip a client gets BYE [UNAVAILABLE]; an HTTP request line ends the session with BYE."""
    platform = Platform(imap=IMAPSettings(max_connections_per_ip=1))
    first = platform.imap()
    factory = first.protocol.factory
    second = platform.imap(factory=factory)
    assert second.lines() == ["* BYE [UNAVAILABLE] too many connections from 192.0.2.1, try again later"]
    assert second.closed
    first.output()
    first.send("GET / HTTP/1.1")
    assert first.lines() == ["* BYE This is an IMAP server, not an HTTP one"]
    assert first.closed
    first.protocol.connectionLost(None)
    assert not platform.imap(factory=factory).closed


def test_quota_refuses_an_append_over_it_and_getquotaroot_reports_it():
    """With [mailbox] quota, GETQUOTAROOT reports STORAGE in KiB and an APPEND that would go over gets NO [OVERQUOTA]."""
    platform = Platform(quota=10 * 1024)
    wire = login(platform.imap())
    assert append(wire, b"Subject: a\r\n\r\n" + b"x" * 5000 + b"\r\n").startswith("A OK [APPENDUID")
    wire.send("q GETQUOTAROOT INBOX")
    assert wire.lines() == ['* QUOTAROOT "INBOX" ""', '* QUOTA "" (STORAGE 5 10)', "q OK GETQUOTAROOT completed"]
    assert append(wire, b"Subject: b\r\n\r\n" + b"x" * 6000 + b"\r\n").startswith("A NO [OVERQUOTA]")
    wire.send("s SETQUOTA \"\" (STORAGE 100)")
    assert wire.lines()[0].startswith("s NO [NOPERM]")


def test_quota_refuses_a_copy_over_it_and_not_a_move():
    """RFC 9208 4.2: a COPY that would go over the quota is refused whole; a MOVE within the account adds nothing."""
    platform = Platform(quota=8 * 1024)
    wire = login(platform.imap())
    assert append(wire, b"Subject: a\r\n\r\n" + b"x" * 5000 + b"\r\n").startswith("A OK [APPENDUID")
    wire.send("c SELECT INBOX")
    wire.output()
    wire.send("c COPY 1 Archive")
    assert wire.lines()[-1].startswith("c NO [OVERQUOTA]")
    wire.send("m MOVE 1 Archive")
    assert wire.lines()[-1].startswith("m OK")


def test_tags_and_names_that_are_not_imap():
    """A tag with "+" or a command name with digits is BAD; an unknown command in the right shape is BAD and names it."""
    wire = Platform().imap()
    wire.output()
    wire.send("a+b NOOP")
    assert wire.lines() == ["* BAD Missing or invalid tag"]
    wire.send("a NO0P")
    assert wire.lines() == ["a BAD Missing or invalid command name"]
    wire.send("a XYZZY")
    assert wire.lines() == ["a BAD Unknown command XYZZY"]


def test_a_spooled_literal_is_removed_when_its_command_goes_wrong(tmp_path):
    """An APPEND whose message literal is spooled and whose line then ends in a bare LF leaves no file behind."""
    wire = login(Platform().imap(spool_dir=str(tmp_path)))
    message = b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    wire.send(f"a APPEND INBOX {{{len(message)}+}}")
    wire.protocol.dataReceived(message + b" junk\n")
    assert wire.lines() == ["* BAD Command lines must end with CRLF, not a bare LF"]
    assert os.listdir(tmp_path) == []
    wire.send("b NOOP")
    assert wire.lines() == ["b OK NOOP completed"]


def test_list_shows_levels_that_are_not_folders_as_noselect():
    """A folder whose parent is no folder (made by another tool) is reachable: % lists the parent with \\Noselect \\HasChildren."""
    platform = Platform()
    wire = login(platform.imap())
    platform.store.create_folder(Account("alice@example.org"), "Lists/dev")
    del platform.store.accounts["alice@example.org"]["Lists"]
    wire.send('a LIST "" %')
    assert '* LIST (\\Noselect \\HasChildren) "/" "Lists"' in wire.lines()
    wire.send('b LIST "" Lists/%')
    assert wire.lines() == ['* LIST (\\HasNoChildren) "/" "Lists/dev"', "b OK LIST completed"]
    wire.send("c SELECT Lists")
    assert wire.lines()[0].startswith("c NO [NONEXISTENT]")


def test_a_spool_that_cannot_be_written_is_a_temporary_no(tmp_path):
    """When a large APPEND cannot be spooled (the folder is gone), the client gets NO [UNAVAILABLE] before sending it, and the session goes on."""
    wire = login(Platform().imap(spool_dir=str(tmp_path / "missing")))
    wire.send("a APPEND INBOX {100000}")
    assert wire.lines() == ["a NO [UNAVAILABLE] The message cannot be received now; try again later"]
    wire.send("b NOOP")
    assert wire.lines() == ["b OK NOOP completed"]


def test_a_message_the_disk_refuses_midway_is_read_to_its_end_and_refused(tmp_path):
    """When writing a spooled APPEND fails halfway (here: past RLIMIT_FSIZE), the rest of the literal is not read as commands: NO [UNAVAILABLE], no file left."""
    import resource
    import signal

    wire = login(Platform().imap(spool_dir=str(tmp_path)))
    message = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))
    try:
        wire.send(f"a APPEND INBOX {{{len(message)}+}}")
        for i in range(0, len(message), 65536):
            wire.protocol.dataReceived(message[i:i + 65536])
        wire.protocol.dataReceived(b"\r\n")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert wire.lines() == ["a NO [UNAVAILABLE] The message could not be received; try again later"]
    assert os.listdir(tmp_path) == []
    wire.send("b NOOP")
    assert wire.lines() == ["b OK NOOP completed"]


def test_utf8_accept_names_folders_in_utf8():
    """Before ENABLE UTF8=ACCEPT folder names are modified UTF-7 both ways; after it, UTF-8, and APPEND takes UTF8 (~{n})."""
    wire = login(Platform().imap())
    wire.send("a CREATE &AMk-t&AOk-")
    wire.send('b LIST "" "&AMk-*"')
    assert wire.lines()[-2:] == ['* LIST (\\HasNoChildren) "/" "&AMk-t&AOk-"', "b OK LIST completed"]
    wire.send("c ENABLE UTF8=ACCEPT")
    assert wire.lines() == ["* ENABLED UTF8=ACCEPT", "c OK ENABLE completed"]
    wire.send('d LIST "" "É*"')
    assert wire.lines() == ['* LIST (\\HasNoChildren) "/" "Été"', "d OK LIST completed"]
    message = "Subject: Été\r\n\r\nbonjour\r\n".encode()
    wire.send(f'e APPEND "Été" UTF8 (~{{{len(message)}+}}')
    wire.protocol.dataReceived(message + b")\r\n")
    assert wire.lines()[-1].startswith("e OK [APPENDUID")
    wire.send('f STATUS "Été" (MESSAGES)')
    assert wire.lines() == ['* STATUS "Été" (MESSAGES 1)', "f OK STATUS completed"]


def test_flags_a_fetch_returned_are_not_reported_again():
    """Another session's flag change that a FETCH FLAGS already showed is not sent again as an unsolicited FETCH after it."""
    platform = Platform()
    a = selected(platform, messages=1)
    b = selected(platform)
    a.send("s STORE 1 +FLAGS.SILENT (\\Flagged)")
    a.output()
    b.send("f FETCH 1 (FLAGS)")
    assert b.lines() == ["* 1 FETCH (FLAGS (\\Flagged))", "f OK FETCH completed"]


def test_implicit_tls_handshake_deadline():
    """On imaps a client that never finishes the TLS handshake is cut off after tls_handshake_timeout, freeing its slot."""
    from twisted.internet import address
    from twisted.internet.testing import StringTransport

    platform = Platform(imap=IMAPSettings(max_connections_per_ip=1))
    first = platform.imap()
    factory = first.protocol.factory
    first.protocol.connectionLost(None)
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=address.IPv4Address("TCP", "192.0.2.1", 40000))
    protocol.makeConnection(transport)
    platform.clock.advance(29)
    assert not transport.disconnecting
    platform.clock.advance(2)
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert not platform.imap(factory=factory).closed


def test_selected_folder_renamed_here_or_deleted_elsewhere():
    """RENAME of the selected folder keeps it selected under its new name; its DELETE by another session ends this one with BYE."""
    platform = Platform()
    wire = login(platform.imap())
    wire.send("c CREATE Projects")
    assert append(wire, folder="Projects").startswith("A OK")
    wire.send("s SELECT Projects")
    wire.send("r RENAME Projects Work")
    assert wire.lines()[-1] == "r OK RENAME completed"
    wire.send("f FETCH 1 (UID)")
    assert wire.lines() == ["* 1 FETCH (UID 1)", "f OK FETCH completed"]
    other = login(platform.imap())
    other.send("d DELETE Work")
    assert other.lines() == ["d OK DELETE completed"]
    wire.send("n NOOP")
    assert wire.lines() == ["* BYE [NONEXISTENT] The selected mailbox was deleted or renamed elsewhere"]
    assert wire.closed


def test_a_store_text_cannot_break_the_response_line():
    """A backend failure whose text holds CRLF becomes one NO line: nothing it says can pass for another response."""
    from mailplat.interfaces import TemporaryFailure

    platform = Platform()
    wire = login(platform.imap())
    platform.store.broken = TemporaryFailure("database busy\r\n* OK [ALERT] injected")
    wire.send("a STATUS INBOX (MESSAGES)")
    assert wire.lines() == ["a NO [UNAVAILABLE] database busy * OK [ALERT] injected"]


def test_commands_over_the_rate_wait_their_turn_shared_by_a_users_sessions():
    """[imap] max_commands_per_minute: past the burst a user's next command is answered
    when its token is there (paced, not refused), whichever of its sessions sends it."""
    platform = Platform(imap=IMAPSettings(max_commands_per_minute=6))
    first = login(platform.imap())  # LOGIN counts for the address, the rest for the user
    second = login(platform.imap(factory=first.protocol.factory, peer="192.0.2.2"))
    for n in range(6):
        first.send(f"n{n} NOOP")
        assert first.lines()[-1] == f"n{n} OK NOOP completed"
    # Six a minute: one every 10 s, and the burst of six is spent.
    second.send("late NOOP")
    first.send("later NOOP")
    assert second.lines() == [] and first.lines() == []
    platform.clock.advance(10)
    assert second.lines() == ["late OK NOOP completed"]
    assert first.lines() == []
    platform.clock.advance(10)
    assert first.lines() == ["later OK NOOP completed"]
