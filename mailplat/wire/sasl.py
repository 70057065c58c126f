"""SASL PLAIN and LOGIN: the one decoder SMTP, POP3 and IMAP share.

Each protocol frames the exchange its own way (SMTP ``334``, POP3 and IMAP
``+``) and maps :class:`SASLError` to its own reply; what a client may send
is decided here once, with one strictness for every listener:

- base64 must be canonical (RFC 4648 4, padding included); ``=`` alone is
  an empty initial response (RFC 4954 4, RFC 5034 4);
- ``*`` cancels the exchange (RFC 4954 4, RFC 5034 4, RFC 3501 6.2.2);
- PLAIN is ``[authzid] NUL authcid NUL passwd`` (RFC 4616 2), with a
  non-empty authcid and password, and an authzid, if any, equal to the
  authcid: logging in as someone else is not offered;
- names and passwords are UTF-8 (RFC 4616 2, RFC 4954 4).
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass

__all__ = ["MECHANISMS", "Credentials", "SASLError", "SASLExchange", "Why", "plain_response", "start"]

# The mechanisms offered, in the order they are advertised.
MECHANISMS = ("PLAIN", "LOGIN")


class Why(enum.Enum):
    """Why an exchange ended without credentials: each protocol has a reply for each."""

    CANCELLED = "Authentication cancelled"
    NOT_BASE64 = "Cannot decode the response (base64)"
    MALFORMED = "Malformed SASL response"
    AUTHZID = "Logging in as another user is not allowed"
    NOT_UTF8 = "User names and passwords must be UTF-8"
    UNSUPPORTED = "Unsupported mechanism; use PLAIN or LOGIN"


class SASLError(Exception):
    """The exchange is over without credentials; ``why`` says which way."""

    def __init__(self, why: Why) -> None:
        super().__init__(why.value)
        self.why = why
        self.text = why.value


@dataclass(frozen=True)
class Credentials:
    """What a finished exchange yields: the login name and the password."""

    username: str
    password: str


def _decode(line: bytes) -> bytes:
    line = line.strip()
    if line == b"*":
        raise SASLError(Why.CANCELLED)
    if line == b"=":
        return b""
    try:
        decoded = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(Why.NOT_BASE64)
    # b64decode ignores the unused bits before "=" padding, so several
    # spellings give the same bytes; only the canonical one is base64 here
    # (RFC 4648 3.5), for every listener alike.
    if base64.b64encode(decoded) != line:
        raise SASLError(Why.NOT_BASE64)
    return decoded


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(Why.NOT_UTF8)


class SASLExchange:
    """One AUTH exchange: the challenges to send, and the client's responses.

    ``challenge`` is the next challenge (raw bytes, the protocol encodes it)
    while the exchange goes on; :meth:`respond` takes one client line and
    returns the credentials once it is complete, else None.
    """

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._username: str | None = None
        self.challenge = b"Username:" if mechanism == "LOGIN" else b""

    def respond(self, line: bytes) -> Credentials | None:
        decoded = _decode(line)
        if self.mechanism == "PLAIN":
            return _plain(decoded)
        if self._username is None:
            self._username = _text(decoded)
            self.challenge = b"Password:"
            return None
        if not self._username or not decoded:
            raise SASLError(Why.MALFORMED)
        return Credentials(self._username, _text(decoded))


def _plain(message: bytes) -> Credentials:
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SASLError(Why.MALFORMED)
    authzid, authcid, password = (_text(p) for p in parts)
    if authzid and authzid != authcid:
        raise SASLError(Why.AUTHZID)
    return Credentials(authcid, password)


def start(mechanism: str | bytes) -> SASLExchange:
    """An exchange for ``mechanism`` (any case); SASLError(UNSUPPORTED) for others."""
    name = mechanism.decode("ascii", "replace") if isinstance(mechanism, bytes) else mechanism
    name = name.upper()
    if name not in MECHANISMS:
        raise SASLError(Why.UNSUPPORTED)
    return SASLExchange(name)


def plain_response(username: str, password: str) -> bytes:
    """The base64 PLAIN response a client sends (for our own logins at a relay host)."""
    return base64.b64encode(b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8"))
