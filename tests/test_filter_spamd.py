"""The spamd filter against a real SpamAssassin spamd, alone and inside mailplat.

spamd is started once for the module on 127.0.0.1 (a free port) and on a
unix socket, with local tests only (-L) and a site config of our own, so the
scores depend on nothing outside this machine.  The filter alone runs in a
subprocess (tests/check_filter.py); a few tests put a scripted stand-in in
spamd's place to see exactly what goes over the wire and what a broken or
silent daemon does to the filter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import commands
from conftest import BASE_CONFIG, MAILPLAT, MailplatServer, merge_toml, stop_process, wait_for

HERE = Path(__file__).parent
CHECK = [str(HERE / "check_filter.py"), "mailplat.filters.spamd:build"]
SPAMD = shutil.which("spamd") or next((p for p in ("/usr/sbin/spamd", "/usr/bin/spamd") if os.access(p, os.X_OK)), None)
START_TIMEOUT = 120.0

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# What spamd sees of a message from outside: our own site config, no network tests.
LOCAL_CF = """\
use_bayes 0
bayes_auto_learn 0
required_score 5.0
"""


def mail(subject: str = "Lunch on Friday", body: str = "Shall we meet at noon at the usual place?\r\n", to: str = "alice@example.org") -> bytes:
    """An ordinary, well-formed message (Date and Message-ID included, so it scores low)."""
    return (
        "From: Someone <someone@remote.test>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <{time.time_ns()}@remote.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n{body}"
    ).encode()


def score_in(text: str) -> float:
    """The score in a header value or reply text of ours."""
    return float(re.search(r"score[= ](-?[0-9.]+)", text).group(1))  # type: ignore[union-attr]


def spam(to: str = "alice@example.org") -> bytes:
    return mail("Test", f"This is the GTUBE, the\r\n\r\n{GTUBE}\r\n\r\nGeneric Test for Unsolicited Bulk Email\r\n", to)


# --- spamd ------------------------------------------------------------------------


@dataclass
class Spamd:
    port: int
    socket_path: str
    log_path: Path
    startup_seconds: float

    @property
    def address(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int) -> bool:
    """True once spamd answers PING: it has loaded its rules and serves."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return s.recv(100).startswith(b"SPAMD/1.5 0 PONG")
    except OSError:
        return False


def site_config(folder: Path) -> Path:
    """The installed .pre files (they load the plugins) with a local.cf of ours."""
    folder.mkdir()
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, folder / pre.name)
    (folder / "local.cf").write_text(LOCAL_CF)
    return folder


@pytest.fixture(scope="module")
def spamd() -> Iterator[Spamd]:
    """One spamd for the module: rule loading takes a few seconds, so it starts once."""
    if SPAMD is None:
        # Debian 12 ships spamd in a package of its own (it brings spamassassin along).
        why = "spamd is not installed: apt-get install -y spamd"
        if os.environ.get("MAILPLAT_REQUIRE_DAEMONS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    # Outside pytest's 0700 folders: spamd drops to nobody and needs a home it may use.
    root = Path(tempfile.mkdtemp(prefix="mailplat-spamd-"))
    root.chmod(0o755)
    home = root / "home"
    home.mkdir()
    home.chmod(0o777)
    log_path = root / "spamd.log"
    port = free_port()
    socket_path = str(root / "spamd.sock")
    command = [
        SPAMD, "--nouser-config", "--local", "--max-children", "1", "--min-children", "1",
        "--listen", f"127.0.0.1:{port}", "--listen", socket_path,
        "--siteconfigpath", str(site_config(root / "site")), "--helper-home-dir", str(home),
        "--syslog", "stderr", "--timeout-child", "60",
    ]
    if os.geteuid() == 0:
        # spamd refuses to run its children as root.
        command += ["--username", "nobody"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"spamd exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
            return ping(port)

        wait_for(ready, START_TIMEOUT, "spamd to answer PING")
        yield Spamd(port, socket_path, log_path, time.monotonic() - started)
    finally:
        stop_process(process)
        shutil.rmtree(root, ignore_errors=True)


# --- the filter alone -------------------------------------------------------------


def check(tmp_path: Path, options: dict, content: bytes, *flags: str) -> dict:
    """The filter's verdict on ``content``, run once in its own reactor."""
    path = tmp_path / f"message-{time.time_ns()}.eml"
    path.write_bytes(content)
    result = commands.run(
        [sys.executable, *CHECK, json.dumps(options), str(path), *flags], text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Nothing went wrong behind the verdict's back (an unhandled error, a failed callback).
    assert "Traceback" not in result.stderr and "Unhandled" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def headers(outcome: dict) -> dict[str, str]:
    return dict(outcome["headers"])


def test_spamd_starts(spamd: Spamd) -> None:
    """spamd's start-up (rule loading) is paid once per module; keep an eye on it."""
    print(f"spamd answered PING {spamd.startup_seconds:.1f}s after start")
    assert spamd.startup_seconds < START_TIMEOUT


def test_gtube_under_each_action(spamd: Spamd, tmp_path: Path) -> None:
    quarantined = check(tmp_path, {"address": spamd.address}, spam())
    assert quarantined["action"] == "quarantine", quarantined
    found = headers(quarantined)
    assert found["X-Spam-Status"].startswith("Yes, score="), found
    assert score_in(found["X-Spam-Status"]) >= 900
    assert "required=5.0" in found["X-Spam-Status"] and "GTUBE" in found["X-Spam-Status"].split("tests=")[1]
    assert float(found["X-Spam-Score"]) >= 1000
    assert found["X-Spam-Flag"] == "YES"

    rejected = check(tmp_path, {"address": spamd.address, "action": "reject"}, spam())
    assert rejected["action"] == "reject"
    assert rejected["text"].startswith("Message rejected as spam (score "), rejected
    assert score_in(rejected["text"]) >= 900

    tagged = check(tmp_path, {"address": spamd.address, "action": "tag"}, spam())
    assert tagged["action"] == "accept"
    assert headers(tagged)["X-Spam-Status"].startswith("Yes, score=")


def test_clean_message_is_accepted_with_no(spamd: Spamd, tmp_path: Path) -> None:
    outcome = check(tmp_path, {"address": spamd.address, "action": "reject"}, mail())
    assert outcome["action"] == "accept", outcome
    found = headers(outcome)
    assert found["X-Spam-Status"].startswith("No, score="), found
    assert " required=5.0 tests=" in found["X-Spam-Status"]
    assert float(found["X-Spam-Score"]) < 5.0
    assert "X-Spam-Flag" not in found


def test_reject_score_overrides_action(spamd: Spamd, tmp_path: Path) -> None:
    over = check(tmp_path, {"address": spamd.address, "action": "tag", "reject_score": 500}, spam())
    assert over["action"] == "reject" and over["text"].startswith("Message rejected as spam (score "), over
    assert score_in(over["text"]) >= 900
    under = check(tmp_path, {"address": spamd.address, "action": "tag", "reject_score": 5000.5}, spam())
    assert under["action"] == "accept", under


def test_unix_socket_and_user(spamd: Spamd, tmp_path: Path) -> None:
    options = {"address": f"unix:path={spamd.socket_path}", "user": "alice@example.org", "action": "tag"}
    outcome = check(tmp_path, options, spam())
    assert headers(outcome)["X-Spam-Flag"] == "YES", outcome
    wait_for(lambda: "for alice@example.org:" in spamd.log(), what="spamd to log the User it was told")


def long_message(lines: int, first: str = "") -> bytes:
    filler = "".join(f"Line {n} of a long and dull report about the quarterly figures.\r\n" for n in range(lines))
    return mail("Report", first + filler)


@pytest.mark.parametrize("spooled", [False, True], ids=["in-memory", "spooled"])
def test_large_message(spamd: Spamd, tmp_path: Path, spooled: bool) -> None:
    """200 KB goes out in chunks; spamd answers only once it has every byte Content-length promised."""
    content = long_message(3000, first=GTUBE + "\r\n")
    assert 4 * 65536 > len(content) > 2 * 65536
    outcome = check(tmp_path, {"address": spamd.address, "action": "reject"}, content, *(["--spooled"] if spooled else []))
    assert outcome["action"] == "reject", outcome
    assert "Content-Length mismatch" not in spamd.log()


def test_over_max_size_is_not_sent(tmp_path: Path) -> None:
    """Nothing listens at the address: a message over max_size never tries it; one under does."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        address = f"tcp:host=127.0.0.1:port={taken.getsockname()[1]}"
        content = spam()
        skipped = check(tmp_path, {"address": address, "max_size": len(content) - 1, "action": "reject"}, content)
        assert skipped == {"verdict": None}
        tried = check(tmp_path, {"address": address, "max_size": len(content), "action": "reject"}, content)
        assert "cannot reach spamd at tcp:host=127.0.0.1" in tried["error"], tried


# --- a scripted stand-in for spamd ------------------------------------------------------


class FakeSpamd:
    """Accepts one connection on 127.0.0.1, reads a request, and answers ``reply``.

    ``reply`` None keeps the connection open without a word, to see the
    filter give up and close it.  The request is kept in ``request``.
    """

    def __init__(self, reply: bytes | None, read_body: bool = True) -> None:
        self.reply = reply
        self.read_body = read_body
        self.request = b""
        self.closed_by_client = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.address = f"tcp:host=127.0.0.1:port={self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(30)
            try:
                self._converse(connection)
            except OSError:
                pass

    def _converse(self, connection: socket.socket) -> None:
        while b"\r\n\r\n" not in self.request:
            data = connection.recv(65536)
            if not data:
                self.closed_by_client.set()
                return
            self.request += data
        head, _, body = self.request.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-length: ")[1].split(b"\r\n")[0])
        while self.read_body and len(body) < length:
            data = connection.recv(65536)
            if not data:
                self.closed_by_client.set()
                return
            body += data
            self.request += data
        if self.reply is not None:
            connection.sendall(self.reply)
            return
        try:
            while connection.recv(65536):
                pass
        except ConnectionResetError:
            pass  # an abort (RST) closes it too
        self.closed_by_client.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(35)


@pytest.fixture
def fake_spamd() -> Iterator:
    fakes: list[FakeSpamd] = []

    def make(reply: bytes | None, read_body: bool = True) -> FakeSpamd:
        fake = FakeSpamd(reply, read_body)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.close()


def test_request_on_the_wire(fake_spamd, tmp_path: Path) -> None:
    """SYMBOLS SPAMC/1.5, the exact Content-length, User, a blank line, then the message byte for byte."""
    fake = fake_spamd(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; -1.5 / 5.0\r\n\r\n")
    content = long_message(5000)
    assert len(content) > 5 * 65536
    outcome = check(tmp_path, {"address": fake.address, "user": "filter"}, content, "--spooled")
    assert outcome == {
        "action": "accept",
        "text": "",
        "headers": [["X-Spam-Status", "No, score=-1.5 required=5.0 tests=none"], ["X-Spam-Score", "-1.5"]],
    }
    body = b"X-Spooled-Apart: yes\r\n" + content
    assert fake.request == f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(body)}\r\nUser: filter\r\n\r\n".encode() + body


@pytest.mark.parametrize(
    "reply, error",
    [
        (b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch: Expected 9 bytes, got 8 bytes)\r\n", "spamd could not check the message: 76 Bad header line"),
        (b"SPAMD/1.0 69 Service Unavailable: oops\r\n", "69 Service Unavailable"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "unexpected reply from spamd"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\nSpam: True ; 9.0 / 5.0\r\n\r\nGT", "ended after 2 of 5 bytes"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n", "no verdict"),
        (b"", "closed the connection without a reply"),
    ],
    ids=["protocol-error", "unavailable", "not-spamd", "truncated", "no-verdict", "silent-close"],
)
def test_anything_but_a_verdict_is_an_error(fake_spamd, tmp_path: Path, reply: bytes, error: str) -> None:
    fake = fake_spamd(reply)
    outcome = check(tmp_path, {"address": fake.address}, spam())
    assert "error" in outcome and error in outcome["error"], outcome


def test_spamd_not_listening_is_an_error(tmp_path: Path) -> None:
    outcome = check(tmp_path, {"address": f"tcp:host=127.0.0.1:port={free_port()}"}, mail())
    assert "cannot reach spamd" in outcome["error"] and "refused" in outcome["error"].lower(), outcome


def test_message_shorter_than_its_size_fails_at_once(fake_spamd, tmp_path: Path) -> None:
    """spamd would wait for the promised bytes; the filter says what is wrong instead."""
    fake = fake_spamd(None, read_body=False)
    content = mail()
    started = time.monotonic()
    outcome = check(tmp_path, {"address": fake.address}, content, "--claim-size", str(len(content) + 10))
    assert f"ended after {len(content)} of its {len(content) + 10} bytes" in outcome["error"], outcome
    assert time.monotonic() - started < 10


def test_cancel_closes_the_connection(fake_spamd, tmp_path: Path) -> None:
    """The filter chain's timeout cancels the check: the connection to a silent spamd is dropped."""
    fake = fake_spamd(None)
    path = tmp_path / "message.eml"
    path.write_bytes(mail())
    process = subprocess.Popen(
        [sys.executable, *CHECK, json.dumps({"address": fake.address}), str(path), "--cancel-after", "0.5", "--hold"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        outcome = json.loads(process.stdout.readline())
        assert "TimeoutError" in outcome["error"] or "Cancelled" in outcome["error"], outcome
        # Still running (--hold), yet the connection is gone.
        assert fake.closed_by_client.wait(10), "the filter kept the connection open"
        assert process.poll() is None
    finally:
        _, errors = process.communicate(b"", timeout=30)
    assert process.returncode == 0
    assert b"Traceback" not in errors and b"Unhandled" not in errors, errors


# --- reading spamd's answer ---------------------------------------------------------------


SYMBOLS_REPLY = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 24\r\nSpam: True ; 1003.3 / 5.0\r\n\r\nGTUBE,MISSING_DATE,NO_RE"


def test_parse_response_waits_for_the_whole_answer() -> None:
    from mailplat.filters.spamd import SpamdResult, parse_response

    expected = SpamdResult(True, 1003.3, 5.0, ("GTUBE", "MISSING_DATE", "NO_RE"))
    assert parse_response(SYMBOLS_REPLY, complete=False) == expected
    assert parse_response(SYMBOLS_REPLY + b"ignored", complete=True) == expected
    for cut in range(len(SYMBOLS_REPLY)):
        assert parse_response(SYMBOLS_REPLY[:cut], complete=False) is None, cut
    # CHECK's answer (no body, no length) is whole once spamd closes.
    check_reply = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.04 / 5.0\r\n\r\n"
    assert parse_response(check_reply, complete=False) is None
    assert parse_response(check_reply, complete=True) == SpamdResult(False, -0.04, 5.0)


def test_status_header() -> None:
    from mailplat.filters.spamd import SpamdResult, score_text

    assert SpamdResult(False, -0.04, 5.0).status_header() == "No, score=0.0 required=5.0 tests=none"
    assert score_text(-0.04) == "0.0" and score_text(-1.25) == "-1.2" and score_text(1003.25) == "1003.2"
    many = SpamdResult(True, 50.0, 5.0, tuple(f"A_VERY_LONG_RULE_NAME_{n}" for n in range(100))).status_header()
    assert many.startswith("Yes, score=50.0 required=5.0 tests=A_VERY_LONG_RULE_NAME_0,") and many.endswith(",...")
    assert len(many) < 700


def test_an_error_status_fails_before_the_rest_arrives() -> None:
    from mailplat.filters.spamd import SpamdError, parse_response

    with pytest.raises(SpamdError, match="64 Bad header line"):
        parse_response(b"SPAMD/1.0 64 Bad header line: x\r\n", complete=False)


# --- options ------------------------------------------------------------------------------


def build(options: dict):
    from twisted.internet import reactor

    from mailplat.filters.spamd import build as build_filter
    from mailplat.interfaces import BackendContext

    return build_filter(dict(options), BackendContext("mail.example.org", ("example.org",), "/", "/", reactor))


def test_defaults() -> None:
    built = build({})
    assert (built.address, built.max_size, built.user, built.action, built.reject_score) == (
        "tcp:host=127.0.0.1:port=783", 512000, None, "quarantine", None,
    )
    built = build({"address": "unix:path=/run/spamd.sock", "max_size": 1000, "user": "mail", "action": "tag", "reject_score": 12})
    assert (built.max_size, built.user, built.action, built.reject_score) == (1000, "mail", "tag", 12.0)


@pytest.mark.parametrize(
    "options, key, problem",
    [
        ({"address": "carrier-pigeon:coop=1"}, "address", "is not a client endpoint"),
        ({"address": "tcp:host=127.0.0.1"}, "address", "is not a client endpoint"),
        ({"address": 783}, "address", "must be a Twisted client endpoint string"),
        ({"address": ""}, "address", "must be a Twisted client endpoint string"),
        ({"max_size": 0}, "max_size", "must be a positive whole number"),
        ({"max_size": "500k"}, "max_size", "must be a positive whole number"),
        ({"max_size": True}, "max_size", "must be a positive whole number"),
        ({"max_size": 1.5}, "max_size", "must be a positive whole number"),
        ({"user": ""}, "user", "must be a user name"),
        ({"user": "two words"}, "user", "must be a user name"),
        ({"user": "a\r\nContent-length: 0"}, "user", "must be a user name"),
        ({"user": 42}, "user", "must be a string, not 42"),
        ({"action": "delete"}, "action", 'must be "tag", "quarantine" or "reject"'),
        ({"action": "Reject"}, "action", 'must be "tag", "quarantine" or "reject"'),
        ({"reject_score": "15"}, "reject_score", 'must be a number greater than 0, not "15"'),
        ({"reject_score": 0}, "reject_score", "must be a number greater than 0, not 0"),
        ({"reject_score": -3.0}, "reject_score", "must be a number greater than 0, not -3.0"),
        ({"reject_score": float("inf")}, "reject_score", "must be a number greater than 0, not inf"),
        ({"reject_score": True}, "reject_score", "must be a number greater than 0, not true"),
        ({"treshold": 5}, "treshold", "unknown key"),
    ],
)
def test_bad_option(options: dict, key: str, problem: str) -> None:
    from mailplat.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        build(options)
    assert raised.value.key == key
    assert problem in raised.value.problem, raised.value.problem
    assert raised.value.fix


def check_config(tmp_path: Path, table: str) -> subprocess.CompletedProcess[str]:
    server = MailplatServer(tmp_path / "site", merge_toml(BASE_CONFIG, table))
    env = {k: v for k, v in os.environ.items() if k != "MAILPLAT_CONFIG"}
    return commands.run(
        [MAILPLAT, "--config", str(server.config_path), "check-config"], capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.mark.parametrize(
    "table, error",
    [
        ('[[filter]]\nbackend = "spamd"\nreject_scor = 20\n', r"\[filter\] #1 \(spamd\) reject_scor: unknown key; fix: did you mean 'reject_score'\?"),
        ('[[filter]]\nbackend = "spamd"\naction = "bounce"\n', r'\[filter\] #1 \(spamd\) action: must be "tag", "quarantine" or "reject"'),
        ('[[filter]]\nbackend = "spamd"\naddress = "tcp:783"\n', r"\[filter\] #1 \(spamd\) address: \"tcp:783\" is not a client endpoint.*; fix: e\.g\. address = "),
    ],
    ids=["unknown-key", "action", "address"],
)
def test_check_config_names_the_key(tmp_path: Path, table: str, error: str) -> None:
    result = check_config(tmp_path, table)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "mailplat.toml" in lines[0] and re.search(error, lines[0]), lines[0]


def test_check_config_accepts_a_good_table(tmp_path: Path) -> None:
    table = '[[filter]]\nbackend = "spamd"\naddress = "unix:path=/run/spamd.sock"\nmax_size = 1000000\nuser = "mail"\naction = "tag"\nreject_score = 15\n'
    result = check_config(tmp_path, table)
    assert result.returncode == 0, result.stderr
    assert 'backend = "spamd"' in result.stdout


# --- inside mailplat -------------------------------------------------------------------------


def send(port: int, content: bytes, to: str = "alice@example.org") -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail("someone@remote.test", [to], content)


def head(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n")[0]


def test_smtp_reject(spamd: Spamd, make_server) -> None:
    server = make_server(f'[[filter]]\nbackend = "spamd"\naddress = "{spamd.address}"\naction = "reject"\n')
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server.port, spam())
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1 Message rejected as spam (score "), refused.value.smtp_error
    assert score_in(refused.value.smtp_error.decode()) >= 900
    assert server.messages("alice@example.org") == []
    # A clean message after it goes through, tagged.
    send(server.port, mail())
    [delivered] = server.messages("alice@example.org")
    assert b"\r\nX-Spam-Status: No, score=" in head(delivered)


def test_smtp_quarantine_and_clean(spamd: Spamd, make_server) -> None:
    server = make_server(f'[[filter]]\nbackend = "spamd"\naddress = "unix:path={spamd.socket_path}"\n')
    send(server.port, spam())
    assert server.messages("alice@example.org") == []
    [held] = [p.read_bytes() for p in (server.maildir("alice@example.org") / ".Quarantine" / "new").iterdir()]
    top = head(held)
    assert b"\r\nX-Spam-Status: Yes, score=" in top and b"\r\nX-Spam-Flag: YES\r\n" in top, top
    # mailplat puts the filter's headers on top, above its own Received:.
    assert top.index(b"X-Spam-Status:") < top.index(b"Received:")

    send(server.port, mail())
    [delivered] = server.messages("alice@example.org")
    top = head(delivered)
    assert b"\r\nX-Spam-Status: No, score=" in top and b"\r\nX-Spam-Score: " in top, top
    assert b"X-Spam-Flag" not in top


def test_smtp_spamd_down_fails_closed(make_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        address = f"tcp:host=127.0.0.1:port={taken.getsockname()[1]}"
        closed = make_server(f'[[filter]]\nbackend = "spamd"\naddress = "{address}"\n', name="closed")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(closed.port, mail())
        assert refused.value.smtp_code == 451
        assert closed.messages("alice@example.org") == []
        assert "cannot reach spamd" in closed.log()

        open_ = make_server(f'[[filter]]\nbackend = "spamd"\naddress = "{address}"\non_error = "accept"\n', name="open")
        send(open_.port, mail())
        [delivered] = open_.messages("alice@example.org")
        assert b"X-Spam-" not in head(delivered)


def test_smtp_over_max_size_is_delivered_unchecked(spamd: Spamd, make_server) -> None:
    content = spam()
    server = make_server(
        f'[[filter]]\nbackend = "spamd"\naddress = "{spamd.address}"\naction = "reject"\nmax_size = {len(content) // 2}\n'
    )
    send(server.port, content)
    [delivered] = server.messages("alice@example.org")
    assert GTUBE.encode() in delivered and b"X-Spam-" not in head(delivered)
    wait_for(lambda: "spamd: message from 127.0.0.1 not checked" in server.log(), what="the skip to be logged")
