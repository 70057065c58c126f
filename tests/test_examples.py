"""The shipped examples cannot rot: etc/mailplat.toml, the systemd unit and README's config are checked."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

import commands
from conftest import MAILPLAT, write_users

from mailplat.config import LoginSettings, POP3Settings, SMTPLimits
from mailplat.tls import make_self_signed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "mailplat.toml"
UNIT = ROOT / "etc" / "mailplat.service"
README = ROOT / "README.md"


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return commands.run([MAILPLAT, "--config", str(path), "check-config"], capture_output=True, text=True, timeout=60)


def provide_files(config: Path) -> None:
    """Create the certificate, key and users file that ``config`` names."""
    settings = tomllib.loads(config.read_text())

    def resolve(p: str) -> Path:
        return config.parent / p

    tls = settings["tls"]
    make_self_signed("mail.example.org", str(resolve(tls["certificate"])), str(resolve(tls["key"])))
    users = resolve(settings["auth"]["path"])
    users.parent.mkdir(parents=True, exist_ok=True)
    write_users(users, {"alice@example.org": "alice-password", "bob@example.org": "bob-password"})


def test_example_config_passes_check_config(tmp_path):
    """etc/mailplat.toml, with its absolute paths moved under a temporary folder, passes `mailplat check-config`."""
    text = EXAMPLE.read_text()
    moved = re.sub(r'"(/[^"]*)"', lambda m: '"' + str(tmp_path / "root" / m.group(1).lstrip("/")) + '"', text)
    assert moved != text
    config = tmp_path / "mailplat.toml"
    config.write_text(moved)
    provide_files(config)
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith(": OK")
    assert 'smtp = "tcp:25"' in result.stdout
    assert '"@example.net" = ["alice@example.org"]' in result.stdout
    # Everything it writes stays under the moved paths.
    assert (tmp_path / "root" / "var" / "mail" / "mailplat").is_dir()


def test_example_smtp_limits_are_the_defaults():
    """The [smtp] table of etc/mailplat.toml lists every limit, each at its real default."""
    limits = tomllib.loads(EXAMPLE.read_text())["smtp"]
    assert limits == dataclasses.asdict(SMTPLimits())


def test_example_login_settings_are_the_defaults():
    """The [login] table of etc/mailplat.toml lists every key, each at its real default."""
    assert tomllib.loads(EXAMPLE.read_text())["login"] == dataclasses.asdict(LoginSettings())


def readme_table(section: str) -> dict[str, str]:
    """key -> default from the README table that follows "`[section]` holds"."""
    text = README.read_text().split(f"`[{section}]` holds", 1)[1]
    table = text.split("\n\n", 2)[1]
    return dict(re.findall(r"^\| `(\w+)` \| `?([^|`]+?)`? \|", table, re.M))


@pytest.mark.parametrize("section, defaults", [("smtp", SMTPLimits()), ("login", LoginSettings()), ("pop3", POP3Settings())])
def test_readme_tables_match_the_defaults(section, defaults):
    """README's [smtp], [login] and [pop3] tables have one row per key, with its real default."""
    expected = {
        name: "never" if value is None else (f'"{value}"' if isinstance(value, str) else str(value))
        for name, value in dataclasses.asdict(defaults).items()
    }
    assert readme_table(section) == expected


def test_readme_relay_table_lists_every_key():
    """README's [relay] table has a row per key of [relay], with its real default."""
    from mailplat.config import RelaySettings

    table = README.read_text().split("| `[relay]` key |", 1)[1].split("\n\n", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)`(?:, `\w+`)? \| `?([^|`]+?)`? \|", table, re.M))
    expected = {name: f'"{value}"' if isinstance(value, str) else str(value) for name, value in dataclasses.asdict(RelaySettings()).items()}
    expected["smarthost"] = '""'
    del expected["password"]  # shares the username row
    assert rows == expected


def test_readme_config_example_passes_check_config(tmp_path):
    """The configuration shown in README.md is valid: every key in it exists."""
    block = re.search(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    config = tmp_path / "mailplat.toml"
    config.write_text(block.group(1))
    provide_files(config)
    result = check_config(config)
    assert result.returncode == 0, result.stderr


def test_unit_runs_the_example_with_write_access_to_its_folders():
    """etc/mailplat.service runs twistd on /etc/mailplat/mailplat.toml and may write exactly where the example config writes."""
    unit = UNIT.read_text()

    def values(key: str) -> list[str]:
        return [v for line in re.findall(rf"^{key}=(.*)$", unit, re.M) for v in line.split()]

    [exec_start] = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start.endswith("/twistd -n --pidfile= mailplat --config /etc/mailplat/mailplat.toml")
    assert values("User") == ["mailplat"]
    assert "CAP_NET_BIND_SERVICE" in values("AmbientCapabilities")
    assert values("ProtectSystem") == ["strict"] and values("NoNewPrivileges") == ["yes"] and values("PrivateTmp") == ["yes"]
    settings = tomllib.loads(EXAMPLE.read_text())
    writable = values("ReadWritePaths")
    for path in (settings["data_dir"], settings["mailbox"]["path"]):
        assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), path
    assert settings["listen"]["smtp"] == "tcp:25"


def test_example_and_readme_submission_settings_are_the_defaults():
    """etc/mailplat.toml's [submission] table and README's list every key, each at its real default."""
    from mailplat.config import SubmissionSettings

    assert tomllib.loads(EXAMPLE.read_text())["submission"] == dataclasses.asdict(SubmissionSettings())
    expected = {name: "none" if value == {} else str(value) for name, value in dataclasses.asdict(SubmissionSettings()).items()}
    assert readme_table("submission") == expected
