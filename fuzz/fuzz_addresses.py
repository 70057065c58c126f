"""Address parsing (mailplat.addresses): parse_path, validate_address and
validate_domain raise nothing but AddressError, and what they accept is
what they promise, checked against strict patterns written here:

- validate_domain: dot-separated LDH labels of 1-63 characters, lower case,
  at least two, at most 253 characters, a top-level label not all digits,
  nothing after the last label (not even a newline);
- validate_address: a Dot-string local part of at most 64 atext characters
  (RFC 5321 4.1.2) at such a domain, returned unchanged;
- parse_path: an address without control characters or non-ASCII, with a
  domain unless empty, parameters as keyword[=value]; an address that
  validate_address accepts comes back unchanged from ``<address>``.

Input: any bytes (the argument of MAIL FROM / RCPT TO; as text, for the
validators).
"""

from __future__ import annotations

import re

import harness

with harness.instrumented():
    from mailplat.addresses import (
        AddressError,
        parse_path,
        validate_address,
        validate_domain,
    )

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+"
LOCAL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
KEYWORD = re.compile(r"[A-Z0-9][A-Z0-9-]*")
VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]*")


def good_domain(domain: str) -> bool:
    return bool(DOMAIN.fullmatch(domain)) and len(domain) <= 253 and not domain.rpartition(".")[2].isdigit()


def check_domain(text: str) -> None:
    try:
        result = validate_domain(text)
    except AddressError:
        return
    if result != text or not good_domain(text):
        raise harness.Crash(f"validate_domain accepted {text!r} (returned {result!r})")


def check_address(text: str) -> None:
    try:
        result = validate_address(text)
    except AddressError:
        return
    local, _, domain = text.rpartition("@")
    if result != text or not LOCAL.fullmatch(local) or len(local) > 64 or not good_domain(domain):
        raise harness.Crash(f"validate_address accepted {text!r} (returned {result!r})")
    if text.isascii():
        path = parse_path(b"<" + text.encode() + b">")
        if (path.address, path.params, path.routed) != (text, {}, False):
            raise harness.Crash(f"parse_path of <{text}> gave {path}")


def check_path(argument: bytes) -> None:
    try:
        path = parse_path(argument)
    except AddressError:
        return
    address = path.address
    if not address.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        raise harness.Crash(f"parse_path({argument!r}) accepted the address {address!r}")
    if address and "@" not in address:
        raise harness.Crash(f"parse_path({argument!r}) accepted {address!r}, which has no domain")
    for key, value in path.params.items():
        if not KEYWORD.fullmatch(key) or not VALUE.fullmatch(value):
            raise harness.Crash(f"parse_path({argument!r}) accepted the parameter {key!r}={value!r}")


def test_one(data: bytes) -> None:
    check_path(data)
    for text in {data.decode("utf-8", "replace"), data.decode("latin-1")}:
        check_domain(text)
        check_address(text)
        _, at, domain = text.rpartition("@")
        if at:
            check_domain(domain)


if __name__ == "__main__":
    harness.main(test_one)
