"""A filter for the LMTP tests: quarantines a message whose Subject says "quarantine me".

Named by dotted path (``backend = "quarantine_filter:factory"``), with this
folder on PYTHONPATH, as a third-party filter would be.
"""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.config import ConfigError
from mailplat.interfaces import BackendContext, Client, IBackendFactory, MessageFilter, SpooledMessage, Verdict

MARKER = b"quarantine me"


class QuarantineMarked(MessageFilter):
    def check_data(self, client: Client, sender: str, recipients: tuple[str, ...], message: SpooledMessage) -> Verdict | None:
        with message.open() as f:
            head = f.read(16 * 1024).split(b"\r\n\r\n", 1)[0]
        if MARKER in head.lower():
            return Verdict.quarantine("marked for quarantine", (("X-Quarantined", "yes"),))
        return None


@implementer(IPlugin, IBackendFactory)
class Factory:
    kind = "filter"
    name = "quarantine-marked"

    def build(self, options: dict[str, Any], context: BackendContext) -> QuarantineMarked:
        if options:
            raise ConfigError(next(iter(options)), "unknown key", "quarantine_filter takes no options")
        return QuarantineMarked()


factory = Factory()
