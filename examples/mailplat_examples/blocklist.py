"""The ``sender-blocklist`` filter: refuse mail from listed senders at MAIL FROM.

The list is a text file, one entry a line: an address (``spam@example.com``)
or a whole domain (``@example.com``); blank lines and ``#`` comments are
ignored, case does not matter.  Edit it while the server runs: it is re-read
whenever its inode, size or modification time changes (one stat per MAIL
FROM, which costs microseconds).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger

from mailplat.config import ConfigError
from mailplat.interfaces import BackendContext, Client, MessageFilter, Verdict
from mailplat.options import OptionReader

__all__ = ["SenderBlocklist", "build", "parse"]

log = Logger()


def parse(text: str, path: str) -> frozenset[str]:
    """The entries of a blocklist; ValueError names the line of a mistake."""
    entries = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        local, at, domain = entry.rpartition("@")
        if not at or not domain or " " in entry:
            raise ValueError(f"{path}:{number}: {line.strip()!r} is neither an address nor @domain")
        entries.add(entry)
    return frozenset(entries)


class SenderBlocklist(MessageFilter):
    """Rejects listed senders; every other step is left to the base class (no opinion)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: frozenset[str] = frozenset()
        self._loaded = False

    def entries(self) -> frozenset[str]:
        """The current list, re-read when the file changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None:
                log.warn("{path} is gone: no sender is blocked", path=self.path)
            self._stamp, self._entries = None, frozenset()
            return self._entries
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            try:
                with open(self.path, encoding="utf-8") as f:
                    self._entries = parse(f.read(), self.path)
                self._loaded = True
            except (ValueError, OSError) as e:
                if not self._loaded:
                    raise
                # A typo made while editing must not stop all mail.
                log.error("blocklist not reloaded, keeping the previous one: {error}", error=str(e))
            self._stamp = stamp
        return self._entries

    def check_mail(self, client: Client, sender: str) -> Verdict | None:
        if not sender:
            return None  # the null sender (bounces) is never blocked
        sender = sender.lower()
        entries = self.entries()
        if sender in entries or "@" + sender.rpartition("@")[2] in entries:
            return Verdict.reject("Sender address blocked by local policy")
        return None


def build(options: dict[str, Any], context: BackendContext) -> SenderBlocklist:
    """Check the options of ``[[filter]] backend = "sender-blocklist"``."""
    reader = OptionReader(options, "sender-blocklist", context=context)
    blocklist = SenderBlocklist(reader.path("path", what="the blocklist file", example='"blocked-senders.txt"'))
    reader.finish()
    if not os.path.isfile(blocklist.path):
        raise ConfigError("path", f"no such file: {blocklist.path}", "create it, even empty")
    try:
        blocklist.entries()
    except (ValueError, OSError) as e:
        raise ConfigError("path", str(e), "one address or @domain per line")
    return blocklist
