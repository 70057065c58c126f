"""Scripted dialogs: protocol edge cases as small readable files, on every listener.

Each ``dialogs/*.dialog`` file starts with a ``#`` line saying what it
proves; a ``# listeners: NAME ...`` line names the listeners it runs on
(default: smtp), each as its own test.  Then lines of:

``C: text``   send text and CRLF; ``{b64:...}`` in it is replaced by the
              base64 of what is inside (Python escapes such as \\x00 allowed)
``R: text``   send raw bytes (Python escapes such as \\r \\n \\x00), nothing added
``S: regex``  read one reply and match it: SMTP "CODE TEXT" (its last line),
              POP3 the whole line
``TLS``       start TLS here (STARTTLS or STLS, then the handshake); nothing
              on a listener that is TLS from the start (submissions, pop3s)
``CLOSED``    the server has closed the connection

On submissions and pop3s the whole dialog runs inside TLS (RFC 8314).
"""

from __future__ import annotations

import base64
import codecs
import re
from pathlib import Path

import pytest

from conftest import Dialog

DIALOGS = sorted((Path(__file__).parent / "dialogs").glob("*.dialog"))
IMPLICIT_TLS = {"submissions", "pop3s"}
POP3 = {"pop3", "pop3s"}


def listeners_of(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        found = re.match(r"#\s*listeners:\s*(.+)", line)
        if found:
            return found.group(1).split()
    return ["smtp"]


CASES = [(path, listener) for path in DIALOGS for listener in listeners_of(path)]


def _unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode())[0]


def _expand(text: str) -> bytes:
    """A C: line's bytes: ``{b64:...}`` becomes the base64 of its (unescaped) content."""
    parts = re.split(r"\{b64:(.*?)\}", text)
    out = b""
    for i, part in enumerate(parts):
        out += base64.b64encode(_unescape(part)) if i % 2 else part.encode()
    return out


class Session(Dialog):
    """A dialog on one listener: SMTP replies as "CODE TEXT" (the last line), POP3 replies as lines."""

    def __init__(self, port: int, pop3: bool, tls: bool) -> None:
        super().__init__(port)
        self.pop3 = pop3
        if tls:
            self.start_tls()

    def answer(self) -> str:
        if self.pop3:
            return self.line()
        code, text = self.reply()
        return f"{code} {text.splitlines()[-1] if text else ''}"


@pytest.mark.parametrize("path, listener", CASES, ids=[f"{p.stem}@{listener}" for p, listener in CASES])
def test_dialog(server, path, listener):
    """The listener answers the scripted dialog exactly as the file expects."""
    session = Session(server.ports[listener], pop3=listener in POP3, tls=listener in IMPLICIT_TLS)
    try:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{path.name}:{number} on {listener}"
            kind, _, arg = line.partition(":")
            arg = arg[1:] if arg.startswith(" ") else arg
            if kind == "C":
                session.send(_expand(arg) + b"\r\n")
            elif kind == "R":
                session.send(_unescape(arg))
            elif kind == "S":
                got = session.answer()
                assert re.match(arg, got), f"{where}: expected /{arg}/, got {got!r}"
            elif line.strip() == "TLS":
                if session.tls:
                    continue
                session.send(b"STLS\r\n" if session.pop3 else b"STARTTLS\r\n")
                got = session.answer()
                assert got.startswith("+OK" if session.pop3 else "220"), f"{where}: TLS refused: {got!r}"
                session.start_tls()
            elif line.strip() == "CLOSED":
                assert session.closed(), f"{where}: connection still open"
            else:
                raise AssertionError(f"{where}: unknown line {line!r}")
    finally:
        session.close()


def test_there_are_dialogs():
    """The dialog folder is not empty (a glob typo would silently skip every case)."""
    assert len(DIALOGS) >= 5
    assert {listener for _, listener in CASES} >= {"smtp", "submission", "submissions", "pop3", "pop3s"}
