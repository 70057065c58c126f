"""The MX listener over the wire: policy, addressing, limits and bad input."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading

import pytest

from conftest import Dialog, message, wait_for


def ehlo(d: Dialog) -> list[str]:
    code, text = d.command("EHLO client.remote.test")
    assert code == 250
    return text.splitlines()[1:]


def open_transaction(d: Dialog, sender: str = "someone@remote.test") -> None:
    ehlo(d)
    assert d.command(f"MAIL FROM:<{sender}>")[0] == 250


# --- EHLO and session ------------------------------------------------------


def test_ehlo_advertises_extensions_without_auth(dialog):
    """EHLO on the MX port lists PIPELINING, 8BITMIME, SIZE, ENHANCEDSTATUSCODES and STARTTLS, never AUTH."""
    d = dialog()
    keywords = ehlo(d)
    assert "PIPELINING" in keywords
    assert "8BITMIME" in keywords
    assert "SIZE 52428800" in keywords
    assert "ENHANCEDSTATUSCODES" in keywords
    assert "STARTTLS" in keywords
    assert not any(k.startswith("AUTH") for k in keywords)


def test_auth_is_refused_on_mx(dialog):
    """AUTH on the MX port is refused with 503 and the session goes on."""
    d = dialog()
    ehlo(d)
    code, text = d.command("AUTH PLAIN AGFsaWNlAHNlY3JldA==")
    assert code == 503 and text.startswith("5.5.1")
    assert d.command("NOOP")[0] == 250


def test_mail_before_helo_is_refused(dialog):
    """MAIL before EHLO/HELO gets 503 5.5.1."""
    d = dialog()
    code, text = d.command("MAIL FROM:<a@remote.test>")
    assert code == 503 and text.startswith("5.5.1")


def test_ehlo_without_argument(dialog):
    """EHLO without a host name gets 501 5.5.4."""
    d = dialog()
    assert d.command("EHLO")[0] == 501


def test_greeting_names_host(dialog):
    """The 220 greeting names the configured hostname."""
    d = dialog(greet=False)
    code, text = d.reply()
    assert code == 220 and text.startswith("mail.example.org ESMTP")


def test_vrfy_expn_help_rset_noop(dialog):
    """VRFY never confirms a user, EXPN is refused, HELP, RSET and NOOP work."""
    d = dialog()
    ehlo(d)
    assert d.command("VRFY alice")[0] == 252
    assert d.command("EXPN team")[0] == 502
    assert d.command("HELP")[0] == 214
    assert d.command("RSET")[0] == 250
    assert d.command("NOOP")[0] == 250
    assert d.command("QUIT")[0] == 221


# --- recipients: what is ours, and every relay trick -------------------------


@pytest.mark.parametrize(
    "recipient",
    [
        "alice@example.org",
        "ALICE@EXAMPLE.ORG",
        "Alice+news@Example.Org",
        "postmaster@example.org",
        "PostMaster@example.org",
        "anything@example.net",
        "team@example.org",
    ],
)
def test_hosted_recipients_accepted(dialog, recipient):
    """Hosted addresses are accepted case-insensitively, with +tags, aliases and catch-alls."""
    d = dialog()
    open_transaction(d)
    code, text = d.command(f"RCPT TO:<{recipient}>")
    assert (code, text[:5]) == (250, "2.1.5")


def test_bare_postmaster_is_the_primary_domains(server):
    """RCPT TO:<Postmaster> without a domain (RFC 5321 4.5.1 MUST) is postmaster@ the first of domains, in any case."""
    before = len(server.messages("alice@example.org"))
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo()
        client.mail("someone@remote.test")
        code, text = client.docmd("RCPT", "TO:<POSTmaster>")
        assert (code, text[:5]) == (250, b"2.1.5"), (code, text)
        assert client.data(message("to-the-postmaster"))[0] == 250
    messages = server.messages("alice@example.org")
    assert len(messages) == before + 1
    assert b"for <POSTmaster@example.org>" in messages[-1]


def test_unknown_user_is_550_511(dialog):
    """An address in a hosted domain that resolves to nobody gets 550 5.1.1."""
    d = dialog()
    open_transaction(d)
    code, text = d.command("RCPT TO:<nobody@example.org>")
    assert code == 550 and text.startswith("5.1.1")


@pytest.mark.parametrize(
    "recipient",
    [
        "<someone@elsewhere.test>",
        "<alice%elsewhere.test@example.org>",
        "<elsewhere.test!alice@example.org>",
        "<@example.org:alice@elsewhere.test>",
        "<@example.org,@example.net:alice@example.org>",
        '<"alice@elsewhere.test"@example.org>',
        "<alice@example.org.>",
        "<alice@[127.0.0.1]>",
        "<alice@example.org.elsewhere.test>",
    ],
)
def test_relay_tricks_denied(dialog, recipient):
    """Every routing trick and every non-hosted domain gets 550 5.7.1, and nothing is delivered."""
    d = dialog()
    open_transaction(d)
    code, text = d.command(f"RCPT TO:{recipient}")
    assert code == 550 and text.startswith("5.7.1"), (code, text)


@pytest.mark.parametrize(
    "recipient",
    ["<../alice@example.org>", "<a/b@example.org>", "<.alice@example.org>", "<al..ice@example.org>", "<a\\\\b@example.org>"],
)
def test_path_tricks_refused(dialog, recipient):
    """Local parts that could escape the mail folder are refused with a 5xx and a clear text."""
    d = dialog()
    open_transaction(d)
    code, text = d.command(f"RCPT TO:{recipient}")
    assert code in (501, 550) and ("rejected" in text or "syntax" in text), (code, text)


def test_non_ascii_address_refused(dialog):
    """A non-ASCII address without SMTPUTF8 gets 501 with a clear reason."""
    d = dialog()
    ehlo(d)
    code, text = d.command("MAIL FROM:<jos\u00e9@remote.test>".encode("utf-8"))
    assert code == 501 and "SMTPUTF8" in text


@pytest.mark.parametrize("argument", ["TO:alice@example.org", "TO:<alice@example.org", "TO<alice@example.org>", "TO:<>", "TO:<alice>"])
def test_rcpt_syntax_errors(dialog, argument):
    """Malformed RCPT arguments get a 501 reply."""
    d = dialog()
    open_transaction(d)
    assert d.command(f"RCPT {argument}")[0] == 501


def test_null_sender_accepted(server):
    """MAIL FROM:<> (a bounce) is accepted and delivered with Return-Path: <>."""
    before = len(server.messages("alice@example.org"))
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("<>", ["alice@example.org"], message("bounce"))
    messages = server.messages("alice@example.org")
    assert len(messages) == before + 1
    assert messages[-1].startswith(b"Return-Path: <>\r\n")


def test_rcpt_before_mail_and_nested_mail(dialog):
    """RCPT without MAIL, a second MAIL, and DATA without recipients get 503/554."""
    d = dialog()
    ehlo(d)
    assert d.command("RCPT TO:<alice@example.org>")[0] == 503
    assert d.command("MAIL FROM:<a@remote.test>")[0] == 250
    assert d.command("MAIL FROM:<a@remote.test>")[0] == 503
    assert d.command("DATA")[0] == 554


def test_unknown_mail_parameter(dialog):
    """An unsupported MAIL parameter gets 555 5.5.4."""
    d = dialog()
    ehlo(d)
    code, text = d.command("MAIL FROM:<a@remote.test> FROB=1")
    assert code == 555 and text.startswith("5.5.4")


# --- delivery ----------------------------------------------------------------


def test_alias_delivers_to_every_target(server):
    """A message to a list alias is delivered once into each target's maildir."""
    a_before = len(server.messages("alice@example.org"))
    b_before = len(server.messages("bob@example.org"))
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("someone@remote.test", ["team@example.org", "alice@example.org"], message("team-mail"))
    assert len(server.messages("alice@example.org")) == a_before + 1
    assert len(server.messages("bob@example.org")) == b_before + 1


def test_headers_and_exact_body(server):
    """The delivered file is Return-Path, our Received header, then the message exactly as sent."""
    body = "line one\r\n.leading dot\r\n..two dots\r\n\r\nlast line\r\n"
    raw = message("exact", body=body)
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo("sender.remote.test")
        client.sendmail("someone@remote.test", ["bob@example.org"], raw)
    stored = server.messages("bob@example.org")[-1]
    assert stored.startswith(b"Return-Path: <someone@remote.test>\r\nReceived: from sender.remote.test ([127.0.0.1])\r\n")
    assert b"by mail.example.org (mailplat) with ESMTP id " in stored
    assert stored.endswith(raw)


def test_eight_bit_body_is_kept(server):
    """BODY=8BITMIME content arrives byte for byte."""
    raw = b"Subject: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe \xff\xfe\r\n"
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("someone@remote.test", ["bob@example.org"], raw, mail_options=["BODY=8BITMIME"])
    assert server.messages("bob@example.org")[-1].endswith(raw)


def test_pipelined_transaction_replies_in_order(server):
    """A whole pipelined transaction sent in one write gets its replies in order, and the mail lands."""
    with Dialog(server.port) as d:
        d.reply()
        ehlo(d)
        d.send(
            b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<nobody@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\nDATA\r\n"
        )
        assert [d.reply()[0] for _ in range(5)] == [250, 550, 250, 250, 354]
        d.send(message("pipelined") + b".\r\nNOOP\r\nQUIT\r\n")
        assert [d.reply()[0] for _ in range(3)] == [250, 250, 221]
    assert b"Subject: pipelined" in server.messages("alice@example.org")[-1]


def test_concurrent_deliveries_to_one_mailbox(server):
    """Twenty clients sending to one mailbox at once lose nothing."""
    before = len(server.messages("alice@example.org"))
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", server.port) as client:
                for i in range(5):
                    client.sendmail("someone@remote.test", ["alice@example.org"], message(f"concurrent-{n}-{i}"))
        except BaseException as e:  # collected and re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    messages = server.messages("alice@example.org")[before:]
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in messages)
    assert subjects == sorted(f"concurrent-{n}-{i}".encode() for n in range(20) for i in range(5))


def test_logs_name_session_and_queue_id(server):
    """Each accepted message is logged with its session id and queue id."""
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo()
        client.mail("logged@remote.test")
        client.rcpt("alice@example.org")
        code, text = client.data(message("logged"))
    queue_id = text.decode().rsplit(" ", 1)[1]
    line = wait_for(lambda: [l for l in server.log().splitlines() if f"{queue_id} delivered" in l], what="log line")
    assert "from=<logged@remote.test>" in line[0]


# --- bad input -------------------------------------------------------------


def test_garbage_commands_then_service_continues(dialog):
    """Unknown verbs, binary garbage, NUL bytes and bare LF get 500 and the session still works."""
    d = dialog()
    assert d.command("FROB")[0] == 500
    assert d.command(b"\xff\xfe\x00garbage")[0] == 500
    assert d.command(b"NOOP\x00")[0] == 500
    d.send(b"NOOP\n")
    code, text = d.reply()
    assert code == 500 and "CRLF" in text
    assert d.command("")[0] == 500
    assert d.command("NOOP")[0] == 250


def test_long_command_line(dialog):
    """A command line over 512 octets gets 500 5.5.2 and the next command works."""
    d = dialog()
    ehlo(d)
    code, text = d.command("MAIL FROM:<" + "a" * 600 + "@remote.test>")
    assert code == 500 and text.startswith("5.5.2")
    d.send(b"X" * 100_000 + b"\r\n")
    assert d.reply()[0] == 500
    assert d.command("NOOP")[0] == 250


def test_long_text_line_refused_without_smuggling(server):
    """A DATA line over 1000 octets refuses the message with 500 5.5.2 and what follows it is never read as commands."""
    before = len(server.messages("alice@example.org"))
    with Dialog(server.port) as d:
        d.reply()
        open_transaction(d)
        assert d.command("RCPT TO:<alice@example.org>")[0] == 250
        assert d.command("DATA")[0] == 354
        smuggled = b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        d.send(b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n" + smuggled + b"evil\r\n.\r\n")
        code, text = d.reply()
        assert code == 500 and text.startswith("5.5.2")
        assert d.command("NOOP")[0] == 250
    assert len(server.messages("alice@example.org")) == before


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_smtp_smuggling_bare_line_ends(server, fake_end):
    """A fake end of data with bare LF or CR never ends the message; the message is refused and no second one appears."""
    a_before = len(server.messages("alice@example.org"))
    b_before = len(server.messages("bob@example.org"))
    with Dialog(server.port) as d:
        d.reply()
        open_transaction(d)
        assert d.command("RCPT TO:<alice@example.org>")[0] == 250
        assert d.command("DATA")[0] == 354
        d.send(
            b"Subject: first\r\n\r\nhello" + fake_end
            + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
        )
        code, text = d.reply()
        assert code == 550 and text.startswith("5.5.2")
        assert d.command("NOOP")[0] == 250
    assert len(server.messages("alice@example.org")) == a_before
    assert len(server.messages("bob@example.org")) == b_before


def test_mail_loop_detected(server):
    """A message with more than 30 Received: headers is refused with 554 5.4.6."""
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Sun, 22 Nov 2026 10:00:00 +0000\r\n" % (i, i + 1) for i in range(31))
    with pytest.raises(smtplib.SMTPDataError) as e:
        with smtplib.SMTP("127.0.0.1", server.port) as client:
            client.sendmail("someone@remote.test", ["alice@example.org"], hops + message("loop"))
    assert e.value.smtp_code == 554 and e.value.smtp_error.startswith(b"5.4.6")


# --- STARTTLS ---------------------------------------------------------------


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_starttls_then_delivery(server):
    """STARTTLS with the configured certificate works and the Received header says ESMTPS."""
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.starttls(context=client_tls())
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("someone@remote.test", ["bob@example.org"], message("over-tls"))
    stored = server.messages("bob@example.org")[-1]
    assert b"with ESMTPS id" in stored and b"Subject: over-tls" in stored


def test_starttls_discards_pipelined_plaintext(server):
    """Commands pipelined after STARTTLS in clear text are never executed inside TLS (CVE-2011-0411)."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    d = Dialog.__new__(Dialog)
    d.sock, d.file = raw, raw.makefile("rb")
    d.reply()
    ehlo(d)
    d.send(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
    assert d.reply()[0] == 220
    d.file.close()
    tls = client_tls().wrap_socket(raw, server_hostname="mail.example.org")
    tls.sendall(b"EHLO client.remote.test\r\n")
    t = Dialog.__new__(Dialog)
    t.sock, t.file = tls, tls.makefile("rb")
    code, _ = t.reply()
    assert code == 250
    # Had the injected MAIL been executed, this MAIL would be "nested".
    assert t.command("MAIL FROM:<real@remote.test>")[0] == 250
    t.close()


def test_starttls_twice_and_with_argument(server):
    """STARTTLS with an argument gets 501, and inside TLS it gets 503."""
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo()
        assert client.docmd("STARTTLS", "now")[0] == 501
        client.starttls(context=client_tls())
        client.ehlo()
        assert client.docmd("STARTTLS")[0] == 503


def test_large_pipelined_burst(dialog):
    """Thousands of commands in one write are all answered, in order, and the session goes on."""
    d = dialog()
    ehlo(d)
    d.send(b"NOOP\r\n" * 5000 + b"RSET\r\n")
    assert all(d.reply()[0] == 250 for _ in range(5000))
    assert d.reply() == (250, "2.0.0 OK")
    assert d.command("QUIT")[0] == 221


def test_forged_authentication_results_are_removed(server):
    """RFC 8601 5: an Authentication-Results field claiming our authserv-id did not come from us."""
    forged = (
        b"Authentication-Results: mail.example.org;\r\n\tdkim=pass header.d=bank.test\r\n"
        b"Authentication-Results: mx.other.test; spf=pass\r\n"
    ) + message("forged-results")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("someone@remote.test", ["bob@example.org"], forged)
    delivered = next(m for m in server.messages("bob@example.org") if b"Subject: forged-results" in m)
    assert b"bank.test" not in delivered
    assert b"Authentication-Results: mx.other.test; spf=pass\r\n" in delivered
