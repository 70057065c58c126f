"""Registers this package's backends with mailplat.

Twisted imports every file in twisted/plugins/ on each discovery, so this
file stays small: each module is imported only when its backend is used.
"""

from mailplat.plugins import BackendFactory

sqlite = BackendFactory("auth", "sqlite", "mailplat_examples.sqlite_auth:build")
command = BackendFactory("delivery", "command", "mailplat_examples.command_delivery:build")
senderBlocklist = BackendFactory("filter", "sender-blocklist", "mailplat_examples.blocklist:build")
