"""The configuration file: every mistake is one line naming file, key and fix; a good file reads back.

Each file in ``bad_configs/`` holds one mistake; its first line is
``# error: <regex>``, which the one-line error must match.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

import commands
from conftest import BASE_CONFIG, MAILPLAT, TWISTD, MailplatServer, stop_process, wait_for, write_users

from mailplat.config import ConfigError, LoginSettings, Settings, load

BAD_CONFIGS = Path(__file__).parent / "bad_configs"
BAD = sorted(BAD_CONFIGS.glob("*.toml"))

# The mistakes twistd must refuse as check-config does: one of each family
# (syntax, unknown key, types, listeners, TLS, domains, aliases, backends).
# Each runs twistd's entry point in a process of its own (tests/commands.py);
# PROCESS_CASES, one refused by load() and one by the backends, also start
# the real twistd script.
TWISTD_CASES = [
    "bad_toml",
    "unknown_top_key",
    "limit_bool",
    "bad_endpoint_type",
    "submission_without_tls",
    "missing_certificate",
    "domain_twice",
    "alias_target_unknown",
    "alias_loop",
    "unknown_backend",
    "missing_users_file",
    "plain_password",
    "float_nan_idle_timeout",
    "nested_too_deep",
]
PROCESS_CASES = ["bad_toml", "alias_target_unknown"]

# A config without listeners or TLS: enough for check-config and `user`.
SMALL_CONFIG = """\
hostname = "mail.example.org"
domains = ["example.org"]

[auth]
backend = "passwd-file"
path = "users.passwd"

[mailbox]
backend = "maildir"
path = "mail"
"""


def expected_error(config: Path) -> str:
    """The regex on the first line of a bad config."""
    first = config.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{config.name}: the first line must be '# error: <regex>'"
    return first.removeprefix("# error: ")


def prepare(tmp_path: Path, config: Path) -> Path:
    """The bad config in its own folder, beside the files its good parts need."""
    target = tmp_path / "mailplat.toml"
    shutil.copy(config, target)
    write_users(tmp_path / "users.passwd", {"alice@example.org": "alice-password"})
    (tmp_path / "users-plain.passwd").write_text("alice@example.org:{PLAIN}secret\n")
    return target


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own, forked from a warm one (tests/commands.py)."""
    return commands.run(args, text=True, timeout=60, cwd=cwd, env=env)


def run_script(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script itself, started from scratch: for what is about the process."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def env_without_config(**extra: str) -> dict[str, str]:
    """This process's environment without MAILPLAT_CONFIG, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "MAILPLAT_CONFIG"}
    env.update(extra)
    return env


def one_error_line(result: subprocess.CompletedProcess[str], path: Path) -> str:
    """Assert the command failed with exactly one `mailplat: PATH...` line on stderr, and return it."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mailplat: {path}"), lines[0]
    return lines[0]


# --- check-config on each mistake ------------------------------------------------


def test_every_bad_config_names_its_error():
    """Every file in bad_configs/ starts with an `# error: <regex>` line that compiles."""
    assert len(BAD) >= 20
    for config in BAD:
        re.compile(expected_error(config))


@pytest.mark.parametrize("config", BAD, ids=[p.stem for p in BAD])
def test_check_config_one_line_error(tmp_path, config):
    """check-config on a file with one mistake exits 1 with one line: the file, the key, the problem and `fix:`."""
    path = prepare(tmp_path, config)
    result = run(MAILPLAT, "--config", str(path), "check-config", env=env_without_config())
    line = one_error_line(result, path)
    pattern = expected_error(config)
    assert re.search(pattern, line), f"{line!r} does not match /{pattern}/"
    assert "fix: " in line, line
    assert result.stdout == "", "nothing may be printed as the effective config"


def test_nonexistent_config_file(tmp_path):
    """A config path that does not exist is one line naming it and how to give one."""
    path = tmp_path / "nowhere" / "mailplat.toml"
    line = one_error_line(run_script(MAILPLAT, "--config", str(path), "check-config"), path)
    assert f"mailplat: {path}: no such file; fix: " in line


def test_config_is_a_folder(tmp_path):
    """A config path that is a folder is one line saying it cannot be read."""
    line = one_error_line(run(MAILPLAT, "--config", str(tmp_path), "check-config"), tmp_path)
    assert "cannot read" in line and "fix: " in line


def test_config_not_utf8(tmp_path):
    """A config file that is not UTF-8 is one line saying so, not a traceback."""
    path = tmp_path / "mailplat.toml"
    path.write_bytes(SMALL_CONFIG.replace("mail.example.org", "mail.ex\xe4mple.org").encode("latin-1"))
    line = one_error_line(run(MAILPLAT, "--config", str(path), "check-config"), path)
    assert "not UTF-8" in line and "fix: save the file as UTF-8" in line


def test_no_config_given(tmp_path):
    """Without --config or MAILPLAT_CONFIG the command says how to give one, in one line."""
    result = run_script(MAILPLAT, "check-config", cwd=tmp_path, env=env_without_config())
    assert result.returncode == 1
    assert result.stderr.strip() == "mailplat: give --config FILE or set MAILPLAT_CONFIG"


# --- twistd refuses to start ------------------------------------------------------


def refuses_bad_config(tmp_path: Path, name: str, run_twistd: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    config = BAD_CONFIGS / f"{name}.toml"
    assert config.exists(), config
    path = prepare(tmp_path, config)
    checked = one_error_line(run(MAILPLAT, "--config", str(path), "check-config", env=env_without_config()), path)
    result = run_twistd(TWISTD, "-n", "--pidfile=", "mailplat", "--config", str(path), cwd=tmp_path, env=env_without_config())
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert output.count(checked) == 1, f"expected {checked!r} once in:\n{output}"
    assert "listening on" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("name", TWISTD_CASES)
def test_twistd_refuses_bad_config(tmp_path, name):
    """`twistd -n mailplat` with a bad config exits non-zero with check-config's one-line error and never listens."""
    refuses_bad_config(tmp_path, name, run)


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_twistd_process_refuses_bad_config(tmp_path, name):
    """The same, starting the twistd script itself: the process exits before it listens."""
    assert name in TWISTD_CASES
    refuses_bad_config(tmp_path, name, run_script)


def test_port_in_use(tmp_path):
    """A listener port already taken makes twistd exit 1 with an error naming [listen] smtp, without a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        site = MailplatServer(tmp_path / "site", BASE_CONFIG.replace('smtp = "tcp:0:', f'smtp = "tcp:{port}:', 1))
        assert f'smtp = "tcp:{port}:interface=127.0.0.1"' in site.config_path.read_text()
        result = run_script(TWISTD, "-n", "--pidfile=", "mailplat", "--config", str(site.config_path), cwd=site.root)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    errors = [line for line in output.splitlines() if "mailplat: " in line]
    assert len(errors) == 1, output
    assert f"mailplat: {site.config_path}: [listen] smtp: cannot listen on tcp:{port}:interface=127.0.0.1: " in errors[0]
    assert "fix: " in errors[0]
    assert "smtp listening on" not in output
    assert "Traceback" not in output


# --- a good config ------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> MailplatServer:
    """A folder with the base config, a certificate and a users file (not started)."""
    return MailplatServer(tmp_path / "site", BASE_CONFIG)


def test_check_config_prints_effective_settings(site):
    """check-config on a good file exits 0 and prints TOML that tomllib reads back, defaults filled in and paths made absolute."""
    result = run(MAILPLAT, "--config", str(site.config_path), "check-config", env=env_without_config())
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"# {site.config_path}: OK"
    effective = tomllib.loads(result.stdout)
    assert effective["hostname"] == "mail.example.org"
    assert effective["data_dir"] == str(site.root / "var")
    assert effective["domains"] == ["example.org", "example.net"]
    assert effective["listen"] == tomllib.loads(BASE_CONFIG)["listen"]
    assert effective["tls"] == {"certificate": str(site.root / "tls" / "cert.pem"), "key": str(site.root / "tls" / "key.pem")}
    assert effective["auth"] == {"backend": "passwd-file", "path": "users.passwd"}
    assert effective["delivery"] == {"backend": "local"}
    assert effective["aliases"]["team@example.org"] == ["alice@example.org", "bob@example.org"]
    assert effective["aliases"]["@example.net"] == ["alice@example.org"]
    assert effective["smtp"]["max_recipients"] == 100, "defaults are filled in"
    assert not (site.root / "var").exists(), "check-config changes nothing on disk"


def test_effective_settings_are_a_config_that_means_the_same(site):
    """The printed effective settings, saved beside the original, are a valid config that prints the same settings."""
    first = run(MAILPLAT, "--config", str(site.config_path), "check-config")
    assert first.returncode == 0, first.stderr
    copy = site.root / "effective.toml"
    copy.write_text(first.stdout)
    second = run(MAILPLAT, "--config", str(copy), "check-config")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[1:] == first.stdout.splitlines()[1:]


def test_effective_settings_quote_awkward_strings(tmp_path):
    """Quotes, backslashes, tabs, newlines and non-ASCII in values still print as TOML that reads back to the same value."""
    awkward = 'v"a\\r\tx\u00e9\n'
    config = 'data_dir = "v\\"a\\\\r\\tx\\u00e9\\n"\n' + SMALL_CONFIG
    (tmp_path / "mailplat.toml").write_text(config)
    write_users(tmp_path / "users.passwd", {})
    assert tomllib.loads(config)["data_dir"] == awkward
    result = run(MAILPLAT, "--config", str(tmp_path / "mailplat.toml"), "check-config")
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["data_dir"] == str(tmp_path / awkward)


def test_config_from_environment(site, tmp_path):
    """MAILPLAT_CONFIG names the config when --config is not given, and --config wins over it."""
    env = env_without_config(MAILPLAT_CONFIG=str(site.config_path))
    result = run(MAILPLAT, "check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["data_dir"] == str(site.root / "var")

    (tmp_path / "bad").mkdir()
    bad = prepare(tmp_path / "bad", BAD_CONFIGS / "unknown_top_key.toml")
    wins = run(MAILPLAT, "--config", str(site.config_path), "check-config", env=env_without_config(MAILPLAT_CONFIG=str(bad)))
    assert wins.returncode == 0, wins.stderr
    loses = run(MAILPLAT, "--config", str(bad), "check-config", env=env)
    assert loses.returncode == 1 and "hostnme" in loses.stderr


def test_twistd_config_from_environment(site, tmp_path):
    """`twistd -n mailplat` without --config reads MAILPLAT_CONFIG and starts listening."""
    log_path = tmp_path / "twistd.log"
    log_path.write_text("")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "mailplat"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env=env_without_config(MAILPLAT_CONFIG=str(site.config_path)),
        )
    try:

        def listening() -> bool:
            assert process.poll() is None, log_path.read_text()
            found = set(re.findall(r"(\w+) listening on 127\.0\.0\.1:\d+", log_path.read_text()))
            return found == set(tomllib.loads(BASE_CONFIG)["listen"])

        wait_for(listening, 30, "twistd to listen on every [listen] endpoint")
    finally:
        stop_process(process)
    assert (site.root / "var").is_dir(), "data_dir is relative to the config file, not the cwd"
    assert not (tmp_path / "var").exists()


def test_relative_paths_from_another_cwd(tmp_path):
    """Relative paths in the file are relative to the folder holding it, whatever the cwd and however --config is spelled."""
    site = tmp_path / "site"
    (site / "conf").mkdir(parents=True)
    (site / "conf" / "mailplat.toml").write_text(SMALL_CONFIG.replace('path = "users.passwd"', 'path = "../users.passwd"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative_config = os.path.join("..", "site", "conf", "mailplat.toml")

    added = commands.run(
        [MAILPLAT, "--config", relative_config, "user", "add", "alice@example.org", "--password-stdin"],
        input="pw\n", text=True, timeout=60, cwd=elsewhere,
    )
    assert added.returncode == 0, added.stderr
    assert (site / "users.passwd").is_file(), "the users file is beside the config folder, as ../users.passwd says"
    assert list(elsewhere.iterdir()) == [], "nothing is written relative to the cwd"

    result = run(MAILPLAT, "--config", relative_config, "check-config", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["data_dir"] == str(site / "conf" / "var")
    assert result.stderr.strip() == f"# {site / 'conf' / 'mailplat.toml'}: OK", "the config path is shown absolute"


# --- [login], and its keys' old place in [pop3] -------------------------------------


def load_with(tmp_path: Path, tables: str) -> tuple[Settings | ConfigError, list[str]]:
    """SMALL_CONFIG plus ``tables``, loaded in this process: the settings (or the error) and the warnings logged."""
    path = tmp_path / "mailplat.toml"
    path.write_text(SMALL_CONFIG + tables)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        result: Settings | ConfigError = load(str(path))
    except ConfigError as e:
        result = e
    finally:
        globalLogPublisher.removeObserver(events.append)
    return result, [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


def test_login_table_is_read_and_printed(tmp_path):
    """[login] sets the guard shared by every listener; left out, the defaults apply; check-config prints it."""
    settings, warnings = load_with(tmp_path, "[login]\nauth_failure_delay = 0\nmax_login_failures = 3\nlogin_block_time = 60\n")
    assert settings.login == LoginSettings(auth_failure_delay=0.0, max_login_failures=3, login_block_time=60.0)
    assert warnings == []
    assert tomllib.loads(settings.describe())["login"] == {"auth_failure_delay": 0.0, "max_login_failures": 3, "login_block_time": 60.0}
    defaults, _ = load_with(tmp_path, "")
    assert defaults.login == LoginSettings() == LoginSettings(2.0, 10, 300.0)


@pytest.mark.parametrize("table, error", [
    ("auth_failure_delay = -1", r"\[login\] auth_failure_delay: must be a number of seconds, 0 or more, not -1; fix: e\.g\. auth_failure_delay = 2\.0"),
    ('auth_failure_delay = "2s"', r'\[login\] auth_failure_delay: must be a number of seconds, 0 or more, not "2s"; fix: e\.g\.'),
    ("max_login_failures = true", r"\[login\] max_login_failures: must be a positive whole number, not true; fix: e\.g\. max_login_failures = 10"),
    ("max_login_failures = 2.5", r"\[login\] max_login_failures: must be a positive whole number, not 2\.5; fix: "),
    ("login_block_time = 0", r"\[login\] login_block_time: must be a number of seconds greater than 0, not 0; fix: e\.g\. login_block_time = 300\.0"),
    ("max_login_failure = 3", r"\[login\] max_login_failure: unknown key; fix: did you mean 'max_login_failures'\?"),
])
def test_bad_login_values_name_the_key_and_a_fix(tmp_path, table, error):
    """Each bad [login] value is one error naming the file, [login], the key and a fix."""
    result, _ = load_with(tmp_path, f"[login]\n{table}\n")
    assert isinstance(result, ConfigError)
    assert str(result).startswith(f"{tmp_path / 'mailplat.toml'}: [login] ")
    assert re.search(error, str(result)), str(result)


def test_login_keys_in_pop3_still_apply_with_a_warning(tmp_path):
    """The login keys' old place, [pop3], still sets them (for one release) and logs one line naming the file and [login]."""
    settings, warnings = load_with(tmp_path, "[pop3]\nauth_failure_delay = 0.5\nmax_login_failures = 4\nidle_timeout = 60\n")
    assert settings.login == LoginSettings(auth_failure_delay=0.5, max_login_failures=4, login_block_time=300.0)
    assert settings.pop3.idle_timeout == 60.0
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{tmp_path / 'mailplat.toml'}: [pop3] auth_failure_delay, max_login_failures: deprecated")
    assert "move them to [login]" in warnings[0]
    assert "wins" not in warnings[0]


def test_login_table_wins_over_pop3_and_the_warning_says_so(tmp_path):
    """A key set in both [login] and [pop3] takes [login]'s value; [pop3]'s other keys still apply; the warning names the conflict."""
    settings, warnings = load_with(
        tmp_path, "[pop3]\nmax_login_failures = 4\nlogin_block_time = 30\n\n[login]\nmax_login_failures = 7\n",
    )
    assert settings.login == LoginSettings(auth_failure_delay=2.0, max_login_failures=7, login_block_time=30.0)
    assert len(warnings) == 1, warnings
    assert "[pop3] max_login_failures, login_block_time: deprecated" in warnings[0]
    assert "move them to [login]" in warnings[0]
    assert "[login] also sets max_login_failures and wins" in warnings[0]


def test_bad_login_value_in_pop3_names_pop3(tmp_path):
    """A bad value at the old place is reported where it was written, [pop3]."""
    result, _ = load_with(tmp_path, "[pop3]\nlogin_block_time = -5\n")
    assert isinstance(result, ConfigError)
    assert "[pop3] login_block_time: must be a number of seconds greater than 0, not -5; fix: " in str(result)


def test_submission_table_is_read_and_printed(tmp_path):
    """[submission] sets the hourly limits (0 turns one off) and send_as, case and +tags folded; check-config prints it back."""
    from mailplat.config import SubmissionSettings

    settings, _ = load_with(
        tmp_path, '[submission]\nmax_messages_per_hour = 0\n[submission.send_as]\n"Alice+x@Example.org" = "Alice@Elsewhere.test"\n',
    )
    assert settings.submission == SubmissionSettings(0, 2000, {"alice@example.org": ("alice@elsewhere.test",)})
    assert tomllib.loads(settings.describe())["submission"] == {
        "max_messages_per_hour": 0, "max_recipients_per_hour": 2000, "send_as": {"alice@example.org": ["alice@elsewhere.test"]},
    }
    defaults, _ = load_with(tmp_path, "")
    assert defaults.submission == SubmissionSettings() == SubmissionSettings(500, 2000, {})
    twice, _ = load_with(tmp_path, '[submission.send_as]\n"alice@example.org" = "a@b.test"\n"ALICE@example.org" = "c@d.test"\n')
    assert isinstance(twice, ConfigError) and "is listed twice" in str(twice)
