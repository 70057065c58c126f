"""Counting connections per listener and per client address."""

from __future__ import annotations

import collections

__all__ = ["ConnectionCounter", "set_no_delay"]


class ConnectionCounter:
    """Admits a connection while the total and the client's share are under their limits."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: collections.Counter[str] = collections.Counter()

    def admit(self, peer: str) -> str:
        """Count a new connection, or say why it is refused."""
        if self.total >= self.max_total:
            return "too many connections"
        if self.per_ip[peer] >= self.max_per_ip:
            return f"too many connections from {peer}"
        self.total += 1
        self.per_ip[peer] += 1
        return ""

    def release(self, peer: str) -> None:
        self.total -= 1
        self.per_ip[peer] -= 1
        if self.per_ip[peer] <= 0:
            del self.per_ip[peer]


def set_no_delay(transport: object) -> None:
    """Turn off Nagle's algorithm (TCP_NODELAY), through any TLS wrapper.

    A reply followed by a short last piece (POP3's "." line, an SMTP reply
    after a pipelined batch) otherwise waits for the peer's delayed ACK:
    40 ms per message on Linux.
    """
    while transport is not None:
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(True)
            return
        transport = getattr(transport, "transport", None)
