"""How much an authenticated user may send: messages and recipients per hour.

One :class:`SendingQuota` serves every submission listener of a process, so
a user gains nothing by switching ports.  Each limit is a token bucket per
account (as GCRA rate limiters count): a burst of up to the hourly number,
refilled evenly over the hour.  Memory is two numbers per account that sent
recently, whatever the limits, and an account whose bucket is full again is
forgotten.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SendingQuota"]

_HOUR = 3600.0


class _Buckets:
    """Token buckets of ``size`` tokens, refilled at ``size`` an hour; size 0: no limit."""

    def __init__(self, size: int, clock: Any) -> None:
        self.size = size
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # account -> (tokens, when)
        self._sweep_above = 1024

    def take(self, account: str) -> bool:
        """Spend one token of ``account``'s bucket; False when it is empty."""
        if not self.size:
            return True
        now = self.clock.seconds()
        tokens = self._tokens(account, now)
        if tokens < 1:
            return False
        self._buckets[account] = (tokens - 1, now)
        if len(self._buckets) > self._sweep_above:
            self._sweep(now)
        return True

    def _tokens(self, account: str, now: float) -> float:
        tokens, when = self._buckets.get(account, (self.size, now))
        # max(): a clock that goes back refills nothing, and takes nothing back.
        return min(self.size, tokens + max(0.0, now - when) * self.size / _HOUR)

    def _sweep(self, now: float) -> None:
        """Forget accounts whose bucket is full again: they are as if never seen."""
        self._buckets = {a: b for a, b in self._buckets.items() if self._tokens(a, now) < self.size}
        self._sweep_above = max(1024, 2 * len(self._buckets))


class SendingQuota:
    """[submission] max_messages_per_hour and max_recipients_per_hour, per account."""

    def __init__(self, clock: Any, max_messages_per_hour: int, max_recipients_per_hour: int) -> None:
        self.max_messages_per_hour = max_messages_per_hour
        self.max_recipients_per_hour = max_recipients_per_hour
        self._messages = _Buckets(max_messages_per_hour, clock)
        self._recipients = _Buckets(max_recipients_per_hour, clock)

    def message(self, account: str) -> bool:
        """Count one message (a MAIL command) of ``account``; False when over its limit."""
        return self._messages.take(account)

    def recipient(self, account: str) -> bool:
        """Count one recipient (an RCPT command) of ``account``; False when over its limit."""
        return self._recipients.take(account)
