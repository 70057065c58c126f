"""twistd finds the mailplat plugin after a real install, in a throwaway venv."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fresh_venv(path: Path) -> Path:
    # No pip inside: the running pip installs into it (--python), which saves
    # seeding one (as test_example_plugins.py does).
    venv.EnvBuilder(with_pip=False).create(path)
    return path / "bin"


def pip_install(bin: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(bin / "python"), "install", "--quiet", "--disable-pip-version-check", "--no-compile", *args],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def twistd_lists_mailplat(bin: Path, cwd: Path) -> bool:
    result = subprocess.run([str(bin / "twistd"), "--help"], capture_output=True, text=True, timeout=120, cwd=cwd)
    return any(line.split()[:1] == ["mailplat"] for line in result.stdout.splitlines())


# The wheel install (`pip install .`) is checked in test_example_plugins.py,
# whose venv holds one: test_twistd_lists_mailplat_after_wheel_install.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["editable-compat"])
def test_twistd_lists_mailplat_after_install(tmp_path, mode):
    """`twistd --help` lists mailplat after the editable install `make` uses."""
    source = tmp_path / "src"
    # A copy, so that the build never litters the work tree.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "dev", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    bin = fresh_venv(tmp_path / "venv")
    pip_install(bin, "--editable", str(source), "--config-settings", "editable_mode=compat")
    # Run from an unrelated folder so that the source tree is not on the path by accident.
    assert twistd_lists_mailplat(bin, tmp_path), f"twistd --help does not list mailplat ({mode})"
    assert subprocess.run([str(bin / "mailplat"), "--help"], capture_output=True, timeout=60).returncode == 0
