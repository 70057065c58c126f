"""mailplat's built-in backends, registered exactly as a third-party plugin would be.

Kept import-light: every discovery imports this file, so the backends' own
modules are imported only when one is built.
"""

from mailplat.plugins import BackendFactory

passwdFile = BackendFactory("auth", "passwd-file", "mailplat.backends.passwdfile:build")
maildir = BackendFactory("mailbox", "maildir", "mailplat.backends.maildir:build")
local = BackendFactory("delivery", "local", "mailplat.backends.local:build")
lmtp = BackendFactory("delivery", "lmtp", "mailplat.backends.lmtp:build")
spamd = BackendFactory("filter", "spamd", "mailplat.filters.spamd:build")
clamd = BackendFactory("filter", "clamd", "mailplat.filters.clamd:build")
dnsbl = BackendFactory("filter", "dnsbl", "mailplat.filters.dnsbl:build")
postgresAuth = BackendFactory("auth", "postgres", "mailplat.backends.postgres:build_auth")
postgresMailbox = BackendFactory("mailbox", "postgres", "mailplat.backends.postgres:build_mailbox")
authentication = BackendFactory("filter", "authentication", "mailplat.filters.authentication:build")
