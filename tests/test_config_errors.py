"""Configuration mistakes: one line naming the file, the key and the fix, and no listening."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import BASE_CONFIG, MAILPLAT, TWISTD, MailplatServer, write_users

BAD = sorted((Path(__file__).parent / "bad_configs").glob("*.toml"))


def prepare(tmp_path: Path, config: Path) -> Path:
    """The bad config in a folder with the files the good parts of it need."""
    target = tmp_path / "mailplat.toml"
    shutil.copy(config, target)
    write_users(tmp_path / "users.passwd", {"alice@example.org": "alice-password"})
    (tmp_path / "users-plain.passwd").write_text("alice@example.org:{PLAIN}secret\n")
    return target


def expected(config: Path) -> str:
    first = config.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{config.name} must start with '# error: <regex>'"
    return first[len("# error: ") :]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)


@pytest.mark.parametrize("config", BAD, ids=[p.stem for p in BAD])
def test_check_config_reports_one_line(tmp_path, config):
    """check-config on a broken file exits 1 with one line: file, key, problem and fix, no traceback."""
    path = prepare(tmp_path, config)
    result = run(MAILPLAT, "--config", str(path), "check-config")
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"mailplat: {path}"), line
    assert re.search(expected(config), line), f"{line!r} does not match /{expected(config)}/"
    assert "fix:" in line
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("name", ["unknown_top_key", "bad_endpoint_port", "missing_users_file"])
def test_twistd_exits_before_listening(tmp_path, name):
    """twistd with a broken config exits non-zero with the same one-line error and never listens."""
    config = Path(__file__).parent / "bad_configs" / f"{name}.toml"
    path = prepare(tmp_path, config)
    result = run(TWISTD, "-n", "--pidfile=", "mailplat", "--config", str(path), cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert re.search(expected(config), output), output
    assert "listening on" not in output
    assert "Traceback" not in output


def test_port_in_use(tmp_path):
    """A port already in use stops the start with an error naming [listen] smtp."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        server = MailplatServer(tmp_path / "s", BASE_CONFIG.replace("tcp:0:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"))
        result = run(TWISTD, "-n", "--pidfile=", "mailplat", "--config", str(server.config_path), cwd=server.root)
    finally:
        busy.close()
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "[listen] smtp: cannot listen on" in output and "fix:" in output
    assert "Traceback" not in output


def test_nonexistent_config_file(tmp_path):
    """A config path that does not exist is named in the error."""
    result = run(MAILPLAT, "--config", str(tmp_path / "nope.toml"), "check-config")
    assert result.returncode == 1
    assert f"{tmp_path / 'nope.toml'}: no such file" in result.stderr


def test_check_config_prints_effective_settings(tmp_path):
    """check-config on a good file exits 0 and prints TOML that reads back, with paths made absolute."""
    server = MailplatServer(tmp_path / "s", BASE_CONFIG)
    result = run(MAILPLAT, "--config", str(server.config_path), "check-config")
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["data_dir"] == str(server.root / "var")
    assert effective["domains"] == ["example.org", "example.net"]
    assert effective["smtp"]["max_recipients"] == 100
    assert effective["aliases"]["team@example.org"] == ["alice@example.org", "bob@example.org"]


def test_config_from_environment_and_relative_paths(tmp_path):
    """MAILPLAT_CONFIG replaces --config, and relative paths are relative to the file's folder, not the cwd."""
    server = MailplatServer(tmp_path / "s", BASE_CONFIG)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, MAILPLAT_CONFIG=str(server.config_path))
    result = run(MAILPLAT, "user", "list", env=env, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alice@example.org", "bob@example.org"]


def test_no_config_at_all(tmp_path):
    """Without --config or MAILPLAT_CONFIG the command says how to give one."""
    env = {k: v for k, v in os.environ.items() if k != "MAILPLAT_CONFIG"}
    result = run(MAILPLAT, "user", "list", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "MAILPLAT_CONFIG" in result.stderr
