"""Running the configured ``[[filter]]`` chain at each step of an SMTP session.

Filters run in the configured order; at each step the first verdict that is
not "accept" ends that step.  Headers from accepting verdicts accumulate.  A
filter that raises or outlives its ``timeout`` fails closed (tempfail) unless
its table says ``on_error = "accept"``: one broken plugin never takes the
server down, and never lets mail through unchecked by accident.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from mailplat.config import FilterSettings
from mailplat.interfaces import Verdict
from mailplat.plugins import call

__all__ = ["ConfiguredFilter", "FilterChain", "Outcome", "header_block"]

log = Logger()

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")  # RFC 5322 2.2 ftext


@dataclass(frozen=True)
class ConfiguredFilter:
    """A built filter provider with the settings mailplat applies around it."""

    settings: FilterSettings
    provider: Any

    @property
    def name(self) -> str:
        return self.settings.backend.name


@dataclass
class Outcome:
    """What the filters decided so far for a session or a transaction."""

    verdict: Verdict | None = None  # the first verdict that was not accept
    headers: tuple[tuple[str, str], ...] = ()
    quarantine: bool = False
    discard: bool = False
    # The refusal is a filter's failure (451 4.3.0), not its verdict (4.7.1).
    failed: bool = False

    def merge(self, other: Outcome) -> Outcome:
        """This outcome followed by a later step's."""
        return Outcome(
            other.verdict or self.verdict,
            self.headers + other.headers,
            self.quarantine or other.quarantine,
            self.discard or other.discard,
            self.failed or other.failed,
        )


_FAILED = Verdict.tempfail("Message filter unavailable; try again later")


class FilterChain:
    """The filters of one listener, in order."""

    def __init__(self, filters: Sequence[ConfiguredFilter], clock: Any) -> None:
        self.filters = tuple(filters)
        self.clock = clock
        # Header fields the filters write ("x-spam-status:"), removed from incoming mail.
        self.owned_fields = frozenset(
            f"{name.lower()}:".encode("ascii") for f in self.filters for name in getattr(f.provider, "owned_headers", ())
        )

    def __bool__(self) -> bool:
        return bool(self.filters)

    async def run(self, step: str, session: str, *args: Any) -> Outcome:
        """Ask every filter about ``step`` ("connect", "helo", "mail", "rcpt", "data")."""
        outcome = Outcome()
        for configured in self.filters:
            verdict = await self._ask(configured, step, session, args)
            if verdict is None:
                continue
            outcome.failed = verdict is _FAILED
            outcome.headers += verdict.headers
            if verdict.action == "quarantine":
                outcome.quarantine = True
            elif verdict.action == "discard":
                outcome.discard = True
            if verdict.action != "accept":
                log.info(
                    "{session} filter {name} at {step}: {action} {text}",
                    session=session, name=configured.name, step=step, action=verdict.action, text=verdict.text,
                )
            if verdict.action in ("reject", "tempfail", "discard"):
                outcome.verdict = verdict
                break
        return outcome

    async def _ask(self, configured: ConfiguredFilter, step: str, session: str, args: tuple[Any, ...]) -> Verdict | None:
        d = call(getattr(configured.provider, f"check_{step}"), *args)
        d.addTimeout(configured.settings.timeout, self.clock)
        try:
            verdict = await d
            if verdict is not None and not isinstance(verdict, Verdict):
                raise TypeError(f"check_{step} returned {type(verdict).__name__}, not a Verdict or None")
            return verdict
        except Exception:
            # A timeout arrives here too, as defer.TimeoutError.
            log.failure("{session} filter {name} failed at {step}", session=session, name=configured.name, step=step)
        if configured.settings.on_error == "accept":
            return None
        return _FAILED


def header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """Header lines to put on top of a message, made safe.

    A filter's header value could carry CR/LF and inject headers of its own;
    every run of whitespace becomes one space, and a bad field name drops
    the header (logged), never the message.
    """
    lines = []
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name):
            log.warn("filter header with a bad field name dropped: {name!r}", name=name)
            continue
        clean = " ".join(str(value).split())
        lines.append(f"{name}: {clean}\r\n".encode("utf-8"))
    return b"".join(lines)
