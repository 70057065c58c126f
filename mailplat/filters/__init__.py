"""Built-in message filters (see ``IMessageFilter``): spamd, clamd, dnsbl, authentication."""
