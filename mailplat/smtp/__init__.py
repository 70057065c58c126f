"""SMTP: the server protocol, receiving onto disk, and (later) queue and relay."""
