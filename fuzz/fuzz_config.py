"""Config loading (mailplat.config.load) of a file in a temporary folder:
every mistake is a ConfigError, never another exception (an operator never
reads a traceback); in a file that loads, every number of mailplat's own
settings is finite (nan and inf are refused; a backend's options are the
backend's to check), and the effective settings (Settings.describe, what
check-config prints) are TOML again.

The folder holds what a config may point at, so that loading goes past the
file checks: tls/cert.pem and tls/key.pem (self-signed), dkim/example.org.key,
users.passwd and srs.secret.  The machine's name (the default hostname) is
fixed, so that a run neither depends on nor waits for the resolver.

Input: the file's bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tempfile
import tomllib
from collections.abc import Iterator
from typing import Any

import harness

with harness.instrumented():
    from mailplat.config import BackendSettings, ConfigError, load

socket.getfqdn = lambda name="": "mail.example.org"  # type: ignore[assignment]

FOLDER = tempfile.mkdtemp(prefix="mailplat-fuzz-config-")
PATH = os.path.join(FOLDER, "mailplat.toml")


def _furnish() -> None:
    from mailplat.mailauth.dkim import generate_key
    from mailplat.tls import make_self_signed

    os.makedirs(os.path.join(FOLDER, "tls"))
    make_self_signed("mail.example.org", os.path.join(FOLDER, "tls/cert.pem"), os.path.join(FOLDER, "tls/key.pem"))
    os.makedirs(os.path.join(FOLDER, "dkim"))
    generate_key(os.path.join(FOLDER, "dkim/example.org.key"), "ed25519")
    with open(os.path.join(FOLDER, "users.passwd"), "w") as f:
        f.write("alice@example.org:{PLAIN}alice-password\n")
    with open(os.path.join(FOLDER, "srs.secret"), "w") as f:
        f.write("a long random secret for the fuzz runs\n")


_furnish()


def floats(value: Any, where: str) -> Iterator[tuple[str, float]]:
    """Every float in the settings, with where it is."""
    if isinstance(value, float):
        yield where, value
    elif isinstance(value, BackendSettings):
        # A backend's options are its own to check, when it is built
        # (check-config does that): load passes them on as written.
        return
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from floats(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from floats(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from floats(item, f"{where}[{i}]")


def test_one(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        settings = load(PATH)
    except ConfigError as e:
        # The operator sees one line, whatever the file held.
        if "\n" in str(e) or "\r" in str(e):
            raise harness.Crash(f"a config error of more than one line: {str(e)!r}")
        return
    for where, number in floats(settings, "settings"):
        if not math.isfinite(number):
            raise harness.Crash(f"{where} loaded as {number}")
    described = settings.describe()
    try:
        tomllib.loads(described)
    except tomllib.TOMLDecodeError as e:
        raise harness.Crash(f"the effective settings are not TOML ({e}):\n{described}")


if __name__ == "__main__":
    harness.main(test_one)
