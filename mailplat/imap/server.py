"""The IMAP server.  (Being written: see the package's modules.)"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol

from mailplat.config import IMAPSettings
from mailplat.cred import LoginGuard

__all__ = ["IMAPFactory"]


class IMAPFactory(protocol.ServerFactory):
    """Shared state of one IMAP listener."""

    noisy = False

    def __init__(
        self, settings: IMAPSettings, login_guard: LoginGuard, tls: Any, implicit_tls: bool, store: Any, quota: int, clock: Any,
    ) -> None:
        self.settings = settings
        self.login_guard = login_guard
        self.tls = tls
        self.implicit_tls = implicit_tls
        # The mailbox backend, providing IMessageStore.
        self.store = store
        # [mailbox] quota in octets, 0 for none.
        self.quota = quota
        self.clock = clock
