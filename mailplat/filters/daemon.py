"""What the filters that hand each message to a scanning daemon (spamd,
clamd) share: skipping messages over their size limit, and connecting."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.logger import Logger

from mailplat.interfaces import Client, SpooledMessage

__all__ = ["connect", "too_big"]

log = Logger()


def too_big(daemon: str, client: Client, message: SpooledMessage, max_size: int, skipped: str = "not scanned") -> bool:
    """True (and logged) when the message is larger than the daemon is given."""
    if message.size <= max_size:
        return False
    log.info(
        "{daemon}: message from {client} {skipped}: {size} bytes is more than max_size {max_size}",
        daemon=daemon, client=client.address, skipped=skipped, size=message.size, max_size=max_size,
    )
    return True


async def connect(endpoint: Any, protocol: Any, daemon: str, address: str, error: type[Exception]) -> None:
    """Connect ``protocol``; a daemon that cannot be reached raises ``error`` saying where."""
    try:
        await connectProtocol(endpoint, protocol)
    except defer.CancelledError:
        raise
    except Exception as e:
        raise error(f"cannot reach {daemon} at {address}: {e}") from e
