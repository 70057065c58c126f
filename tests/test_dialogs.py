"""Scripted SMTP dialogs: protocol edge cases as small readable files.

Each ``dialogs/*.dialog`` file starts with a ``#`` line saying what it
proves, then lines of:

``C: text``   send text and CRLF
``R: text``   send raw bytes (Python escapes such as \\r \\n \\x00), nothing added
``S: regex``  read one reply; "CODE TEXT" (last line) must match the regex
``CLOSED``    the server has closed the connection
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

import pytest

from conftest import Dialog

DIALOGS = sorted((Path(__file__).parent / "dialogs").glob("*.dialog"))


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
def test_dialog(server, path):
    """The server answers the scripted dialog exactly as the file expects."""
    with Dialog(server.port) as d:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{path.name}:{number}"
            kind, _, arg = line.partition(":")
            arg = arg[1:] if arg.startswith(" ") else arg
            if kind == "C":
                d.send(arg.encode() + b"\r\n")
            elif kind == "R":
                d.send(codecs.escape_decode(arg.encode())[0])
            elif kind == "S":
                code, text = d.reply()
                got = f"{code} {text.splitlines()[-1] if text else ''}"
                assert re.match(arg, got), f"{where}: expected /{arg}/, got {got!r}"
            elif line.strip() == "CLOSED":
                assert d.closed(), f"{where}: connection still open"
            else:
                raise AssertionError(f"{where}: unknown line {line!r}")


def test_there_are_dialogs():
    """The dialog folder is not empty (a glob typo would silently skip every case)."""
    assert len(DIALOGS) >= 5
