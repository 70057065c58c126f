"""The example plugin package (examples/) installed the way a stranger would:
from a copy outside this repository, into a throwaway venv next to mailplat,
found by that venv's twistd through its drop-in file.  Also checks that the
code in docs/plugins.md is the code of examples/, so the guide cannot rot."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import smtplib
import ssl
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import BASE_CONFIG, Dialog, MailplatServer, message, wait_for

from mailplat.config import ConfigError
from mailplat.interfaces import BackendContext, Client, Verdict

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GUIDE = ROOT / "docs" / "plugins.md"

# The delivery command of the end-to-end tests: stores what it was given,
# then exits with the status written in the file "exit-status", if any.
ARCHIVE_MAIL = """\
import json, os, sys
folder, recipients = sys.argv[2], sys.argv[3:]
name = os.path.join(folder, os.environ["QUEUE_ID"])
with open(name + ".eml", "wb") as f:
    while chunk := sys.stdin.buffer.read(65536):
        f.write(chunk)
with open(name + ".json", "w") as f:
    json.dump({"argv": sys.argv[1:], "recipients": recipients, "env": dict(os.environ)}, f)
try:
    with open(os.path.join(folder, "exit-status")) as f:
        sys.exit(int(f.read()))
except FileNotFoundError:
    sys.exit(0)
"""

ALICE = ("alice@example.org", "alice sqlite password")


def example_config(argv: list[str]) -> str:
    """The test server's config with examples/mailplat.toml's backend tables
    (the ones docs/plugins.md shows) in place of the base config's."""
    fragment = (EXAMPLES / "mailplat.toml").read_text()
    fragment, count = re.subn(r"(?m)^argv = .*$", "argv = " + json.dumps(argv), fragment)
    assert count == 1

    def table(block: str) -> str:
        found = re.match(r"\[(\w+)\]", block)
        return found[1] if found else ""

    replaced = {table(block) for block in re.split(r"(?m)^(?=\[)", fragment)} - {""}
    kept = [block for block in re.split(r"(?m)^(?=\[)", BASE_CONFIG) if table(block) not in replaced]
    return "".join(kept) + "\n" + fragment


# --- the installed package ---------------------------------------------------


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding mailplat (from a copy of this repository, not editable)
    and the examples (from a copy elsewhere), with their dependencies from pip."""
    base = tmp_path_factory.mktemp("example-plugins")
    # Copies, so that builds never litter the work tree, and so that the
    # examples are installed from a folder that has nothing to do with mailplat's.
    source = base / "mailplat-src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "dev", "build", "*.egg-info", "__pycache__", ".pytest_cache", "examples",
    ))
    outside = base / "elsewhere" / "mailplat-example-plugins"
    shutil.copytree(EXAMPLES, outside, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    # No pip inside the venv: the running pip installs into it (--python),
    # which saves seeding one; pip's cache keeps the dependencies quick.
    venv.EnvBuilder(with_pip=False).create(base / "venv")
    bin = base / "venv" / "bin"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(bin / "python"), "install", "--quiet", "--disable-pip-version-check", "--no-compile",
         str(source), str(outside)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return bin


def mailplat(bin: Path, config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin / "mailplat"), "--config", str(config), *args], input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def plugin_server(venv_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailplatServer]:
    """The venv's `twistd -n mailplat` with the sqlite, command and sender-blocklist plugins."""
    root = tmp_path_factory.mktemp("plugin-server")
    delivered = root / "delivered"
    delivered.mkdir()
    script = root / "archive_mail.py"
    script.write_text(ARCHIVE_MAIL)
    (root / "blocked-senders.txt").write_text("# senders refused at MAIL FROM\nspammer@bad.test\n@Blocked.test\n")
    server = MailplatServer(
        root, example_config([sys.executable, str(script), "--folder", str(delivered)]), users={}, twistd=str(venv_bin / "twistd")
    )
    added = mailplat(venv_bin, server.config_path, "user", "add", ALICE[0], "--password-stdin", stdin=ALICE[1] + "\n")
    assert added.returncode == 0, added.stderr
    server.start()
    try:
        yield server
    finally:
        server.stop()


def delivered(server: MailplatServer) -> Path:
    return server.root / "delivered"


def test_package_ships_its_drop_in_and_no_init_files(venv_bin: Path, tmp_path: Path) -> None:
    """The wheel puts one file into twisted/plugins/ and no __init__.py that would shadow Twisted's."""
    [record] = (venv_bin.parent / "lib").glob("python3*/site-packages/mailplat_example_plugins-*.dist-info/RECORD")
    files = {line.split(",")[0] for line in record.read_text().splitlines()}
    assert "twisted/plugins/mailplat_examples.py" in files
    assert "twisted/__init__.py" not in files and "twisted/plugins/__init__.py" not in files
    assert {"mailplat_examples/sqlite_auth.py", "mailplat_examples/command_delivery.py", "mailplat_examples/blocklist.py"} <= files
    # Both packages are the installed copies, not this work tree.
    where = subprocess.run(
        [str(venv_bin / "python"), "-c", "import mailplat, mailplat_examples; print(mailplat.__file__); print(mailplat_examples.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert all(str(venv_bin.parent) in line for line in where.stdout.splitlines())


def test_twistd_lists_mailplat_after_wheel_install(venv_bin: Path, tmp_path: Path) -> None:
    """`twistd --help` lists mailplat after `pip install .` (a wheel, not editable), and `mailplat --help` runs.

    This venv's mailplat is such an install, so test_install.py builds only the editable one."""
    from test_install import twistd_lists_mailplat

    # From an unrelated folder, so that the source tree is not on the path by accident.
    assert twistd_lists_mailplat(venv_bin, tmp_path), "twistd --help does not list mailplat (wheel)"
    assert subprocess.run([str(venv_bin / "mailplat"), "--help"], capture_output=True, timeout=60, cwd=tmp_path).returncode == 0


def test_user_add_then_login_over_submission(plugin_server: MailplatServer, venv_bin: Path) -> None:
    """`mailplat user add` wrote to the sqlite table; the server checks logins against it."""
    listed = mailplat(venv_bin, plugin_server.config_path, "user", "list")
    assert listed.stdout.split() == [ALICE[0]]
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", plugin_server.ports["submission"], timeout=10) as client:
        client.starttls(context=context)
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            client.login(ALICE[0], "wrong password")
        assert wrong.value.smtp_code == 535
        code, _ = client.login(*ALICE)
        assert code == 235


def test_mail_is_piped_to_the_command(plugin_server: MailplatServer) -> None:
    """The message reaches the command's stdin whole; recipients are arguments; the environment is minimal."""
    body = "".join(f"line {i:06d} of a message bigger than the in-memory spool\r\n" for i in range(40_000))
    sent = message(subject="piped", body=body, sender="someone@remote.test")
    with smtplib.SMTP("127.0.0.1", plugin_server.port, timeout=10) as client:
        assert client.sendmail("someone@remote.test", ["Alice@example.org"], sent) == {}
    [record] = [p for p in delivered(plugin_server).glob("*.json") if sent in p.with_suffix(".eml").read_bytes()]
    stored = record.with_suffix(".eml").read_bytes()
    assert stored.startswith(b"Received: ") and stored.endswith(sent)
    given = json.loads(record.read_text())
    assert given["recipients"] == ["alice@example.org"]
    assert given["argv"][:2] == ["--folder", str(delivered(plugin_server))]
    env = given["env"]
    assert env["SENDER"] == "someone@remote.test" and env["FOLDER"] == "" and env["CLIENT_ADDRESS"] == "127.0.0.1"
    assert env["QUEUE_ID"] == record.stem
    # Python itself may add LC_CTYPE (PEP 538); nothing of the server's environment leaks.
    assert set(env) - {"LC_CTYPE"} == {"PATH", "SENDER", "QUEUE_ID", "CLIENT_ADDRESS", "FOLDER"}


def test_unknown_recipient_is_refused_by_the_sqlite_lookup(plugin_server: MailplatServer) -> None:
    with Dialog(plugin_server.port) as d:
        d.reply()
        d.command("EHLO client.test")
        assert d.command("MAIL FROM:<someone@remote.test>")[0] == 250
        code, text = d.command("RCPT TO:<nobody@example.org>")
        assert code == 550 and "User unknown" in text
        assert d.command("RCPT TO:<ALICE@example.org>")[0] == 250


def test_blocklisted_senders_get_550_and_the_list_is_reloaded(plugin_server: MailplatServer) -> None:
    blocklist = plugin_server.root / "blocked-senders.txt"
    original = blocklist.read_text()
    try:
        with Dialog(plugin_server.port) as d:
            d.reply()
            d.command("EHLO client.test")
            for sender in ("spammer@bad.test", "SPAMMER@Bad.Test", "anyone@blocked.test"):
                code, text = d.command(f"MAIL FROM:<{sender}>")
                assert (code, text) == (550, "5.7.1 Sender address blocked by local policy"), sender
            assert d.command("MAIL FROM:<>")[0] == 250
            d.command("RSET")
            assert d.command("MAIL FROM:<late@remote.test>")[0] == 250
            d.command("RSET")
            # Edited while the server runs: the next MAIL FROM sees it.
            blocklist.write_text(original + "late@remote.test\n")
            assert d.command("MAIL FROM:<late@remote.test>")[0] == 550
    finally:
        blocklist.write_text(original)


def test_exit_status_75_is_451_and_others_are_554(plugin_server: MailplatServer) -> None:
    """The sysexits convention of sendmail and Postfix's pipe(8)."""
    status = delivered(plugin_server) / "exit-status"
    try:
        for exit_status, code, text in ((75, 451, b"4.3.0 delivery deferred"), (69, 554, b"5.0.0 delivery command failed with exit status 69")):
            status.write_text(str(exit_status))
            with smtplib.SMTP("127.0.0.1", plugin_server.port, timeout=10) as client:
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    client.sendmail("someone@remote.test", [ALICE[0]], message(subject=f"status {exit_status}"))
            assert refused.value.smtp_code == code
            assert refused.value.smtp_error.startswith(text)
            wait_for(lambda: f"exit status {exit_status}" in plugin_server.log(), what="the failure to be logged")
    finally:
        status.unlink()


def test_command_delivery_service_is_started_before_clients_are_served(plugin_server: MailplatServer) -> None:
    """The command backend is also an IService: mailplat starts it with the server."""
    log = plugin_server.log()
    assert log.count("command delivery ready") == 1
    assert "connect from" not in log or log.index("command delivery ready") < log.index("connect from")


def test_config_error_names_file_section_and_key(venv_bin: Path, tmp_path: Path) -> None:
    """A build() ConfigError reaches the admin as the one line the guide shows."""
    config = tmp_path / "mailplat.toml"
    server = MailplatServer(tmp_path, example_config(["/bin/cat"]).replace("timeout = 60", "timeout = 60\nargvs = []"), users={})
    (tmp_path / "blocked-senders.txt").write_text("")
    (tmp_path / "users.sqlite").write_bytes(b"")  # an empty file is an empty SQLite database
    result = mailplat(venv_bin, server.config_path, "check-config")
    assert result.returncode == 1
    [shown] = re.findall(r"(?m)^mailplat: .*\[delivery\] argvs: .*$", guide())
    assert result.stderr.strip() == shown.replace("/etc/mailplat/mailplat.toml", str(config))


# --- build() and the providers, in this process --------------------------------


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make mailplat_examples importable (only for this test, so that no other
    test's plugin discovery sees examples/twisted/plugins)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for name in [m for m in sys.modules if m.startswith("mailplat_examples")]:
        monkeypatch.delitem(sys.modules, name)


def context(folder: Path, admin: bool = False) -> BackendContext:
    return BackendContext("mail.example.org", ("example.org",), str(folder), str(folder / "var"), reactor=None, admin=admin)


@pytest.mark.parametrize(("module", "options", "key"), [
    ("sqlite_auth", {}, "path"),
    ("sqlite_auth", {"path": 3}, "path"),
    ("sqlite_auth", {"path": "missing.sqlite"}, "path"),
    ("sqlite_auth", {"path": "not-a-database.sqlite"}, "path"),
    ("sqlite_auth", {"path": "users.sqlite", "pth": "x"}, "pth"),
    ("command_delivery", {}, "argv"),
    ("command_delivery", {"argv": "cat"}, "argv"),
    ("command_delivery", {"argv": []}, "argv"),
    ("command_delivery", {"argv": ["cat", 3]}, "argv"),
    ("command_delivery", {"argv": ["/no/such/program"]}, "argv"),
    ("command_delivery", {"argv": ["cat"], "timeout": 0}, "timeout"),
    ("command_delivery", {"argv": ["cat"], "timeout": True}, "timeout"),
    ("command_delivery", {"argv": ["cat"], "user": "nobody"}, "user"),
    ("blocklist", {}, "path"),
    ("blocklist", {"path": "missing.txt"}, "path"),
    ("blocklist", {"path": "bad-blocklist.txt"}, "path"),
    ("blocklist", {"path": "blocklist.txt", "text": "go away"}, "text"),
])
def test_build_refuses_bad_options(examples: None, tmp_path: Path, module: str, options: dict, key: str) -> None:
    import importlib

    (tmp_path / "users.sqlite").write_bytes(b"")
    (tmp_path / "not-a-database.sqlite").write_text("this is not SQLite\n" * 100)
    (tmp_path / "blocklist.txt").write_text("")
    (tmp_path / "bad-blocklist.txt").write_text("ok@example.com\nno at sign here\n")
    build = importlib.import_module(f"mailplat_examples.{module}").build
    with pytest.raises(ConfigError) as error:
        build(dict(options), context(tmp_path))
    assert error.value.key == key and error.value.problem and error.value.fix


# Runs the command backend under a real reactor, in its own process.
COMMAND_CASES = """
import json, sys
from twisted.internet import defer, task
from mailplat.interfaces import Account, BackendContext, DeliveryFailure, Envelope, SpooledMessage
from mailplat_examples.command_delivery import build

ENVELOPE = Envelope("Q1", "someone@remote.test", (Account("alice@example.org"),))
BIG = b"x" * 999_998 + b"\\r\\n"

async def main(reactor):
    def backend(argv, timeout=10):
        return build({"argv": argv, "timeout": timeout}, BackendContext("h", ("example.org",), "/", "/", reactor))

    async def outcome(argv, content=BIG, timeout=10):
        try:
            await backend(argv, timeout).deliver(ENVELOPE, SpooledMessage("", len(content), ENVELOPE.sender, content))
            return "delivered"
        except DeliveryFailure as e:
            return f"{type(e).__name__}: {e.text}"

    results = {
        "reads all": await outcome(["sh", "-c", "test $(wc -c) = 1000000"]),
        "reads nothing": await outcome(["true"]),
        "tempfail after reading": await outcome(["sh", "-c", "cat >/dev/null; exit 75"]),
        "too slow": await outcome(["sh", "-c", "exec sleep 30"], timeout=0.3),
    }
    slow = backend(["sh", "-c", "exec sleep 30"])
    d = slow.deliver(ENVELOPE, SpooledMessage("", 4, "", b"hi\\r\\n"))
    reactor.callLater(0.1, d.cancel)
    try:
        await d
    except defer.CancelledError:
        results["cancelled"] = "cancelled"
    waiting = backend(["sh", "-c", "exec sleep 0.3"])
    d = waiting.deliver(ENVELOPE, SpooledMessage("", 4, "", b"hi\\r\\n"))
    stopped = waiting.stopService()
    results["stop waits"] = [stopped.called, d.called]
    await stopped
    results["stopped"] = [stopped.called, d.called, not waiting.in_progress]
    print(json.dumps(results))

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""


def test_command_backend_streams_times_out_and_is_cancelled(tmp_path: Path) -> None:
    """Under a real reactor: the whole message reaches stdin, an early exit is
    judged by its status, a slow command is killed (temporary failure),
    cancelling kills it too, and stopping waits for running commands."""
    result = subprocess.run(
        [sys.executable, "-c", COMMAND_CASES], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXAMPLES)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "reads all": "delivered",
        "reads nothing": "delivered",
        "tempfail after reading": "TemporaryFailure: delivery deferred by the delivery command; try again later",
        "too slow": "TemporaryFailure: delivery command was interrupted; try again later",
        "cancelled": "cancelled",
        "stop waits": [False, False],
        "stopped": [True, True, True],
    }


def test_sqlite_user_manager(examples: None, tmp_path: Path) -> None:
    """The IUserManager methods are plain functions: `mailplat user` runs without a reactor."""
    from mailplat_examples.sqlite_auth import build

    users = build({"path": "db/users.sqlite"}, context(tmp_path, admin=True))
    assert users.path == str(tmp_path / "db" / "users.sqlite")
    users.add_user("Bob@Example.org", "one")
    with pytest.raises(ValueError):
        users.add_user("bob@example.org", "two")
    with pytest.raises(ValueError):
        users.add_user("../etc@example.org", "two")
    users.set_password("bob@example.org", "two")
    with pytest.raises(KeyError):
        users.set_password("carol@example.org", "x")
    assert users.list_users() == ["bob@example.org"]
    users.delete_user("bob@example.org")
    with pytest.raises(KeyError):
        users.delete_user("bob@example.org")
    assert users.list_users() == []


def test_blocklist_filter_reloads_and_keeps_the_old_list_on_a_typo(examples: None, tmp_path: Path) -> None:
    from mailplat_examples.blocklist import build

    path = tmp_path / "blocklist.txt"
    path.write_text("a@example.com  # a comment\n\n@spam.test\n")
    blocklist = build({"path": "blocklist.txt"}, context(tmp_path))
    client = Client("192.0.2.1", "smtp", "client.test")
    assert blocklist.check_mail(client, "A@example.com") == Verdict.reject("Sender address blocked by local policy")
    assert blocklist.check_mail(client, "x@spam.test").action == "reject"
    assert blocklist.check_mail(client, "x@sub.spam.test") is None
    assert blocklist.check_mail(client, "") is None
    assert blocklist.check_rcpt(client, "a@example.com", "alice@example.org") is None
    path.write_text("b@example.com\n")
    assert blocklist.check_mail(client, "a@example.com") is None
    assert blocklist.check_mail(client, "b@example.com").action == "reject"
    path.write_text("b@example.com\nnot an entry at all\n")
    assert blocklist.check_mail(client, "b@example.com").action == "reject"
    path.unlink()
    assert blocklist.check_mail(client, "b@example.com") is None


# --- docs/plugins.md -----------------------------------------------------------


def guide() -> str:
    return GUIDE.read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"(?ms)^```{language}\n(.*?)^```$", guide())


def example_files() -> dict[str, str]:
    return {
        str(p.relative_to(EXAMPLES)): p.read_text()
        for p in EXAMPLES.rglob("*")
        if p.is_file() and p.suffix in (".py", ".toml") and "__pycache__" not in p.parts and ".egg-info" not in str(p)
    }


@pytest.mark.parametrize("language", ["python", "toml"])
def test_every_code_block_of_the_guide_is_in_examples(language: str) -> None:
    """The guide quotes examples/, which the tests above install and run."""
    blocks = code_blocks(language)
    assert blocks
    files = example_files()
    for block in blocks:
        assert any(block in text for text in files.values()), f"not found verbatim in examples/:\n{block}"


def test_the_guides_commands_parse() -> None:
    """Each `mailplat` command line in the guide's shell blocks is one the CLI accepts."""
    from mailplat.cli import _parser

    lines = [line for block in code_blocks("sh") for line in block.splitlines() if line.startswith("mailplat ")]
    assert lines
    for line in lines:
        _parser().parse_args(shlex.split(line.split("#")[0].split("<")[0])[1:])
