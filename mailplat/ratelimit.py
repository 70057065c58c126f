"""Token buckets: how often a key (an account, an address) may do something.

Each key has a bucket of ``size`` tokens refilled evenly at ``size`` per
``period`` seconds (as GCRA rate limiters count): a burst of up to ``size``,
then ``size`` a period.  Memory is two numbers per key that spent recently,
and a key whose bucket is full again is forgotten.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """Buckets of ``size`` tokens per key, refilled at ``size`` a ``period``; size 0: no limit."""

    def __init__(self, size: int, period: float, clock: Any) -> None:
        self.size = size
        self.period = period
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._sweep_above = 1024

    def take(self, key: str) -> bool:
        """Spend one token of ``key``'s bucket; False (spending nothing) when it is empty."""
        if not self.size:
            return True
        now = self.clock.seconds()
        tokens = self._tokens(key, now)
        if tokens < 1:
            return False
        self._spend(key, tokens - 1, now)
        return True

    def delay(self, key: str) -> float:
        """Spend one token of ``key``'s bucket, empty or not: the seconds to wait
        until that token is there (0 when it was).  An empty bucket goes into
        debt, so that callers waiting at once are spaced out, not let go together."""
        if not self.size:
            return 0.0
        now = self.clock.seconds()
        tokens = self._tokens(key, now)
        self._spend(key, tokens - 1, now)
        return 0.0 if tokens >= 1 else (1 - tokens) * self.period / self.size

    def _spend(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._sweep_above:
            self._sweep(now)

    def _tokens(self, key: str, now: float) -> float:
        tokens, when = self._buckets.get(key, (self.size, now))
        # max(): a clock that goes back refills nothing, and takes nothing back.
        return min(self.size, tokens + max(0.0, now - when) * self.size / self.period)

    def _sweep(self, now: float) -> None:
        """Forget keys whose bucket is full again: they are as if never seen."""
        self._buckets = {k: b for k, b in self._buckets.items() if self._tokens(k, now) < self.size}
        self._sweep_above = max(1024, 2 * len(self._buckets))
