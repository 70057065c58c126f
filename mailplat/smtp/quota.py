"""How much an authenticated user may send: messages and recipients per hour.

One :class:`SendingQuota` serves every submission listener of a process, so
a user gains nothing by switching ports.  Each limit is a token bucket per
account (mailplat.ratelimit): a burst of up to the hourly number, refilled
evenly over the hour.
"""

from __future__ import annotations

from typing import Any

from mailplat.ratelimit import TokenBuckets

__all__ = ["SendingQuota"]

_HOUR = 3600.0


class SendingQuota:
    """[submission] max_messages_per_hour and max_recipients_per_hour, per account."""

    def __init__(self, clock: Any, max_messages_per_hour: int, max_recipients_per_hour: int) -> None:
        self.max_messages_per_hour = max_messages_per_hour
        self.max_recipients_per_hour = max_recipients_per_hour
        self._messages = TokenBuckets(max_messages_per_hour, _HOUR, clock)
        self._recipients = TokenBuckets(max_recipients_per_hour, _HOUR, clock)

    def message(self, account: str) -> bool:
        """Count one message (a MAIL command) of ``account``; False when over its limit."""
        return self._messages.take(account)

    def recipient(self, account: str) -> bool:
        """Count one recipient (an RCPT command) of ``account``; False when over its limit."""
        return self._recipients.take(account)
