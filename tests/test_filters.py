"""The [[filter]] chain over the wire: each step's verdicts, order, headers,
quarantine, discard, and a filter that fails, hangs or is misconfigured."""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest

import commands
from conftest import MAILPLAT, Dialog, message, wait_for

# A filter whose verdict at each step comes from its options, written next
# to the server's config and named by dotted path as a third party would.
SCRIPTED_FILTER = '''
from twisted.internet import defer
from zope.interface import implementer
from twisted.plugin import IPlugin
from mailplat.config import ConfigError
from mailplat.interfaces import IBackendFactory, MessageFilter, Verdict

class Scripted(MessageFilter):
    def __init__(self, steps, header, seen_file):
        self.steps, self.header, self.seen_file = steps, header, seen_file
        self.owned_headers = (header,) if header else ()

    def _verdict(self, step, detail):
        if self.seen_file:
            with open(self.seen_file, "a") as f:
                f.write(f"{step} {detail}\\n")
        action = self.steps.get(step, "accept")
        if action == "raise":
            raise RuntimeError("scripted failure")
        if action == "hang":
            return defer.Deferred()
        headers = ((self.header, f"{step} ok"),) if self.header else ()
        if action == "accept":
            return Verdict.accept(headers)
        if action == "quarantine":
            return Verdict.quarantine("held", headers)
        return getattr(Verdict, action)(f"scripted {action} at {step}")

    def check_connect(self, client):
        return self._verdict("connect", client.address)

    def check_helo(self, client):
        return self._verdict("helo", client.helo)

    def check_mail(self, client, sender):
        return self._verdict("mail", sender)

    def check_rcpt(self, client, sender, recipient):
        return self._verdict("rcpt", recipient)

    async def check_data(self, client, sender, recipients, message):
        with message.open() as f:
            body = f.read()
        return self._verdict("data", f"{len(body)}={message.size}")

@implementer(IPlugin, IBackendFactory)
class Factory:
    kind = "filter"
    name = "scripted"

    def build(self, options, context):
        steps = options.pop("steps", {})
        header = options.pop("header", "")
        seen_file = options.pop("seen_file", "")
        if options:
            raise ConfigError(next(iter(options)), "unknown key", "scripted takes steps, header and seen_file")
        for step, action in steps.items():
            if action not in ("accept", "reject", "tempfail", "quarantine", "discard", "raise", "hang"):
                raise ConfigError(f"steps.{step}", f"unknown action {action!r}", "use accept, reject, ...")
        return Scripted(steps, header, seen_file)

factory = Factory()


from twisted.application.service import Service
from twisted.logger import Logger

class WithLifecycle(Scripted, Service):
    """A filter holding a resource: started before clients are served, stopped after listeners close."""
    log = Logger()

    def startService(self):
        super().startService()
        self.log.info("scripted filter started")

    def stopService(self):
        super().stopService()
        self.log.info("scripted filter stopped")

class LifecycleFactory(Factory):
    name = "scripted-service"

    def build(self, options, context):
        built = super().build(options, context)
        return WithLifecycle(built.steps, built.header, built.seen_file)

service_factory = LifecycleFactory()
'''


@pytest.fixture
def filtered_server(make_server, tmp_path, monkeypatch, filter_modules):
    """Start a server whose [[filter]] tables are ``filters`` (TOML text)."""
    monkeypatch.setenv("PYTHONPATH", str(filter_modules))

    def start(filters: str, name: str = "server"):
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        return make_server(filters.replace("SEEN", str(root / "seen.log")), name=name)

    return start


def scripted(steps: str = "", header: str = "", extra: str = "") -> str:
    return f'[[filter]]\nbackend = "scriptedfilter:factory"\nsteps = {{ {steps} }}\nheader = "{header}"\nseen_file = "SEEN"\n{extra}\n'


def send(port: int, to: str = "alice@example.org", sender: str = "someone@remote.test") -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(sender, [to], message(to=to, sender=sender))


def test_every_step_is_asked_in_order_and_headers_are_added(filtered_server):
    server = filtered_server(scripted(header="X-Scripted") + scripted(header="X-Second"))
    send(server.port)
    delivered = server.messages("alice@example.org")[0]
    head = delivered.split(b"\r\n\r\n")[0]
    for step in ("connect", "helo", "mail", "rcpt", "data"):
        assert f"X-Scripted: {step} ok".encode() in head
        assert f"X-Second: {step} ok".encode() in head
    # Filters' headers go on top of the message, below Return-Path.
    assert head.index(b"X-Scripted: connect ok") < head.index(b"Received:")
    seen = (server.root / "seen.log").read_text().splitlines()
    # Both filters write to one log: each step is asked of both, in order.
    assert [line.split()[0] for line in seen] == [s for s in ("connect", "helo", "mail", "rcpt", "data") for _ in "12"]
    size_line = [line for line in seen if line.startswith("data")][0]
    read, size = size_line.split()[1].split("=")
    assert read == size  # the filter read the whole spooled message, as big as it says


def test_headers_a_filter_owns_are_removed_from_incoming_mail(filtered_server):
    """A sender cannot write the filter's verdict: its X-Scripted fields, folded or not, are gone; ours are there."""
    server = filtered_server(scripted(header="X-Scripted"))
    forged = b"X-Scripted: data ok (forged)\r\nx-scripted:\r\n  folded forgery\r\nX-Scripted-Other: kept\r\n" + message("owned")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("someone@remote.test", ["alice@example.org"], forged)
    delivered = server.messages("alice@example.org")[0]
    assert b"forged" not in delivered and b"forgery" not in delivered
    assert b"X-Scripted-Other: kept\r\n" in delivered
    assert delivered.count(b"X-Scripted: ") == 5  # ours: one per step


def test_reject_at_each_step(filtered_server):
    server = filtered_server(scripted('rcpt = "reject"'))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(server.port)
    code, text = refused.value.recipients["alice@example.org"]
    assert code == 550 and b"5.7.1 scripted reject at rcpt" in text
    assert server.messages("alice@example.org") == []


def test_reject_and_tempfail_at_mail_and_data(filtered_server):
    server = filtered_server(scripted('mail = "tempfail"'), name="mail")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(server.port)
    assert refused.value.smtp_code == 451 and refused.value.smtp_error.startswith(b"4.7.1")
    server = filtered_server(scripted('data = "reject"'), name="data")
    with pytest.raises(smtplib.SMTPDataError) as refused_data:
        send(server.port)
    assert refused_data.value.smtp_code == 550
    assert b"scripted reject at data" in refused_data.value.smtp_error
    assert server.messages("alice@example.org") == []
    assert "refused by a filter" in server.log()


def test_reject_at_connect_is_a_554_greeting_and_only_quit_works(filtered_server):
    server = filtered_server(scripted('connect = "reject"'))
    with Dialog(server.port) as d:
        code, text = d.reply()
        assert code == 554 and "scripted reject at connect" in text
        code, text = d.command("EHLO client.test")
        assert code == 503
        code, _ = d.command("QUIT")
        assert code == 221


def test_tempfail_at_connect_is_421_and_close(filtered_server):
    server = filtered_server(scripted('connect = "tempfail"'))
    with Dialog(server.port) as d:
        code, text = d.reply()
        assert code == 421 and "scripted tempfail at connect" in text
        assert d.closed()


def test_reject_at_helo_needs_a_new_helo(filtered_server):
    server = filtered_server(scripted('helo = "reject"'))
    with Dialog(server.port) as d:
        d.reply()
        assert d.command("EHLO client.test")[0] == 550
        assert d.command("MAIL FROM:<a@remote.test>")[0] == 503


def test_quarantine_delivers_into_the_quarantine_folder(filtered_server):
    server = filtered_server(scripted('data = "quarantine"'))
    send(server.port)
    assert server.messages("alice@example.org") == []
    held = list((server.maildir("alice@example.org") / ".Quarantine" / "new").iterdir())
    assert len(held) == 1


def test_discard_answers_250_and_delivers_nothing(filtered_server):
    server = filtered_server(scripted('rcpt = "discard"'))
    assert send(server.port) == {}
    assert server.messages("alice@example.org") == []
    wait_for(lambda: "discarded by a filter" in server.log(), what="the discard to be logged")


def test_first_refusal_ends_the_step(filtered_server):
    """The second filter is not asked once the first one rejected."""
    server = filtered_server(scripted('mail = "reject"') + scripted())
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(server.port)
    steps = [line.split()[0] for line in (server.root / "seen.log").read_text().splitlines()]
    assert steps.count("mail") == 1


def test_failing_filter_fails_closed_and_server_keeps_serving(filtered_server):
    server = filtered_server(scripted('data = "raise"'))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server.port)
    assert refused.value.smtp_code == 451 and refused.value.smtp_error.startswith(b"4.3.0")
    assert "scripted failure" in server.log() and "Traceback" in server.log()
    # The next client is served just the same.
    with pytest.raises(smtplib.SMTPDataError):
        send(server.port)


def test_failing_filter_with_on_error_accept(filtered_server):
    server = filtered_server(scripted('data = "raise"', extra='on_error = "accept"'))
    send(server.port)
    assert len(server.messages("alice@example.org")) == 1


def test_hanging_filter_times_out(filtered_server):
    server = filtered_server(scripted('rcpt = "hang"', extra="timeout = 0.5"))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(server.port)
    assert refused.value.recipients["alice@example.org"][:2] == (451, b"4.3.0 Message filter unavailable; try again later")
    assert "TimeoutError" in server.log()


def test_filter_providing_iservice_is_started_and_stopped(filtered_server):
    server = filtered_server(scripted().replace("scriptedfilter:factory", "scriptedfilter:service_factory"))
    send(server.port)
    server.stop()
    log = server.log()
    assert log.index("scripted filter started") < log.index("connect from")
    assert log.index("scripted filter stopped") > log.rindex("(TCP Port")
    assert log.count("scripted filter started") == 1


def test_filters_apply_to_the_mx_listener_only_by_default(filtered_server):
    server = filtered_server(scripted('mail = "reject"'))
    # Submission (after STARTTLS and AUTH) is not filtered unless listed.
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as client:
        client.starttls(context=context)
        client.login("alice@example.org", "alice-password")
        client.sendmail("alice@example.org", ["bob@example.org"], message(to="bob@example.org", sender="alice@example.org"))
    assert len(server.messages("bob@example.org")) == 1


@pytest.fixture(scope="module")
def filter_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding scriptedfilter.py, for PYTHONPATH: one for the module, so that
    its servers and check-configs are forked from one warm process (tests/commands.py)."""
    modules = tmp_path_factory.mktemp("filter-modules")
    (modules / "scriptedfilter.py").write_text(SCRIPTED_FILTER)
    return modules


@pytest.mark.parametrize(
    "table, error",
    [
        ('[[filter]]\nbackend = "scriptedfilter:factory"\ntimeout = 0\n', r"\[filter\] #1 timeout: must be a number of seconds greater than 0, not 0"),
        ('[[filter]]\nbackend = "scriptedfilter:factory"\non_error = "ignore"\n', r"\[filter\] #1 on_error: must be \"tempfail\" or \"accept\""),
        ('[[filter]]\nbackend = "scriptedfilter:factory"\nlisteners = ["pop3"]\n', r"\[filter\] #1 listeners: 'pop3' is not an SMTP listener"),
        ('[[filter]]\nbackend = "scriptedfilter:factory"\nsteps = { mail = "maybe" }\n', r"\[filter\] #1 \(scriptedfilter:factory\) steps.mail: unknown action"),
        ('[[filter]]\nbackend = "scriptedfilter:factory"\n\n[[filter]]\nbackend = "nosuch"\n', r"\[filter\] #2 \(nosuch\) backend: no filter backend called 'nosuch'; known: .*dnsbl"),
        ('[[filter]]\ntimeout = 3\n', r"\[filter\] #1 backend: is required"),
        ('filter = "spamd"\n', r"filter: must be a list"),
    ],
)
def test_bad_filter_tables(tmp_path: Path, filter_modules: Path, table: str, error: str) -> None:
    import re

    from conftest import BASE_CONFIG, MailplatServer, merge_toml

    root = tmp_path / "bad"
    MailplatServer(root, merge_toml(BASE_CONFIG, table))
    result = commands.run(
        [MAILPLAT, "--config", str(root / "mailplat.toml"), "check-config"],
        text=True, env={**os.environ, "PYTHONPATH": str(filter_modules)},
    )
    assert result.returncode == 1, result.stdout
    assert re.search(error, result.stderr), result.stderr
    assert "mailplat.toml" in result.stderr
