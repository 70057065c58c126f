"""The SASL decoder (mailplat.wire.sasl) that SMTP, POP3 and IMAP share.

- start() and respond() raise nothing but SASLError, whatever the client
  sends; an exchange ends with Credentials (a non-empty user name and
  password) or SASLError, and asks for nothing more after.
- A response is accepted only as canonical base64 (RFC 4648 4, as the
  module promises): re-encoding what it decodes to gives the response back.
- What our own client sends (plain_response), and a LOGIN exchange as a
  client makes it, decode to the user name and password they were made of.

Input: the mechanism on the first line, then one client response per line;
the whole input is also read as "user NUL password" for the round trips.
"""

from __future__ import annotations

import base64

import harness

with harness.instrumented():
    from mailplat.wire import sasl


def exchange(data: bytes) -> None:
    mechanism, _, rest = data.partition(b"\n")
    try:
        ex = sasl.start(mechanism.rstrip(b"\r"))
    except sasl.SASLError:
        return
    for line in rest.split(b"\n"):
        line = line.rstrip(b"\r")
        try:
            credentials = ex.respond(line)
        except sasl.SASLError:
            return
        stripped = line.strip()
        if stripped != b"=" and base64.b64encode(base64.b64decode(stripped)) != stripped:
            raise harness.Crash(f"a response that is not canonical base64 was accepted: {line!r}")
        if credentials is not None:
            if not credentials.username or not credentials.password:
                raise harness.Crash(f"{ex.mechanism} gave empty credentials: {credentials}")
            return


def round_trip(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    username, _, password = text.partition("\0")
    if not username or not password or "\0" in password:
        return
    expected = sasl.Credentials(username, password)
    got = sasl.start("PLAIN").respond(sasl.plain_response(username, password))
    if got != expected:
        raise harness.Crash(f"plain_response({username!r}, {password!r}) decodes to {got}")
    login = sasl.start("login")
    if login.respond(base64.b64encode(username.encode())) is not None:
        raise harness.Crash("LOGIN ended after the user name")
    got = login.respond(base64.b64encode(password.encode()))
    if got != expected:
        raise harness.Crash(f"LOGIN of {username!r}, {password!r} decodes to {got}")


def test_one(data: bytes) -> None:
    exchange(data)
    round_trip(data)


if __name__ == "__main__":
    harness.main(test_one)
