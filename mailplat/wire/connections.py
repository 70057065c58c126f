"""Counting connections per listener and per client address, and the TLS
handshake deadline that keeps a silent client from holding its slot."""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

__all__ = ["ConnectionCounter", "TLSHandshakeDeadline", "set_no_delay"]


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


@implementer(IHandshakeListener)
class TLSHandshakeDeadline:
    """Mixin for a server protocol: a TLS handshake that has not finished in
    time ends the connection.

    Without it, a client that connects to an implicit-TLS port (or sends
    STARTTLS) and then says nothing, or stops inside its ClientHello, holds
    its connection, and its share of the per-address limit, forever: the idle
    timeout fires, but Twisted's TLS layer keeps the connection open until
    the handshake lets it send what was written (the greeting, the timeout
    reply), which never happens.  The connection counts against the limits
    from the moment it is accepted, as every other one does.
    """

    transport: Any
    _tls_deadline: Any = None

    def expect_tls_handshake(self, clock: Any, timeout: float) -> None:
        """The handshake starts now; abort the connection unless it is over within ``timeout`` seconds."""
        if self._tls_deadline is None:
            self._tls_deadline = clock.callLater(timeout, self._tls_handshake_too_slow)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: Twisted's TLS layer says the handshake is over."""
        self.forget_tls_handshake()

    def forget_tls_handshake(self) -> None:
        """No deadline any more (the handshake is over, or the connection is gone)."""
        deadline, self._tls_deadline = self._tls_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def tls_handshake_timed_out(self) -> None:
        """Hook: log the closing (the connection is aborted after it)."""

    def _tls_handshake_too_slow(self) -> None:
        self._tls_deadline = None
        self.tls_handshake_timed_out()
        # Not loseConnection: it would wait for the handshake to flush.
        self.transport.abortConnection()


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
