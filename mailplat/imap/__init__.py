"""IMAP (RFC 3501, with the RFC 9051 essentials and the extensions in server.py) over IMessageStore."""
