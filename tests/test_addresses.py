"""Address and domain validation: what addresses.py accepts as a mailbox name."""

from __future__ import annotations

import pytest

from mailplat.addresses import AddressError, validate_address, validate_domain
from mailplat.numerals import is_digits


@pytest.mark.parametrize("domain", ["example.org\n", "example.org\r\n", "exam\nple.org", "example.\norg"])
def test_domain_with_a_newline_is_refused(domain):
    """A domain with a newline anywhere, a trailing one included, is refused (a regex's $ matches before a final newline)."""
    with pytest.raises(AddressError):
        validate_domain(domain)


@pytest.mark.parametrize("address", ["alice@example.org\n", "alice\n@example.org", "al.ice\n@example.org"])
def test_address_with_a_newline_is_refused(address):
    """An address with a newline in its local part or after its domain is refused."""
    with pytest.raises(AddressError):
        validate_address(address)


def test_good_addresses_still_pass():
    """Ordinary addresses and domains pass unchanged."""
    assert validate_domain("mail.example.org") == "mail.example.org"
    assert validate_address("a.b+tag@example.org") == "a.b+tag@example.org"


@pytest.mark.parametrize("text", ["²", "¹", "٣", "1²", "+1", "-1", " 1", "1 ", "1_0", "", "1" * 31])
def test_only_ascii_digits_are_digits(text):
    """is_digits refuses what str.isdigit or int() would take but a number on the wire is not, and overlong numbers."""
    assert not is_digits(text)


def test_ascii_digits_are_digits():
    """Plain ASCII numbers up to the length bound are digits."""
    assert is_digits("0") and is_digits("0042") and is_digits("1" * 30)
