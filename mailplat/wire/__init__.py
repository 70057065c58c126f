"""Bytes on the wire: command lines, dot-stuffing, SASL, the SMTP-family client, DNS, connection counts."""
