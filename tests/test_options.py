"""OptionReader, the one reader of option tables: config.py's sections and every backend's options."""

from __future__ import annotations

import os

import pytest

from mailplat.config import ConfigError
from mailplat.interfaces import BackendContext
from mailplat.options import OptionReader


def error(call) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        call()
    return raised.value


@pytest.mark.parametrize("value", [True, False])
def test_a_toml_bool_is_never_a_number(value):
    """true and false are refused wherever a number is wanted, though Python counts them as ints."""
    for read in ("integer", "number"):
        e = error(lambda read=read: getattr(OptionReader({"n": value}), read)("n", 5))
        assert e.key == "n" and f"not {str(value).lower()}" in e.problem and e.fix == "e.g. n = 5"
    assert error(lambda: OptionReader({"n": value}).take("n", int)).key == "n"


def test_numbers_in_range_and_their_texts():
    """integer and number say the whole range wanted and what was found; number takes an int and never inf."""
    reader = OptionReader({"a": 0, "b": 1001, "c": 3, "d": float("inf"), "e": 0, "f": -1})
    assert error(lambda: reader.integer("a", 10)).problem == "must be a positive whole number, not 0"
    assert error(lambda: reader.integer("b", 10, at_most=1000)).problem == "must be a whole number from 1 to 1000, not 1001"
    assert reader.number("c", 1.0) == 3.0 and isinstance(reader.number("absent", 2.5), float)
    assert error(lambda: reader.number("d", 1.0, unit="of seconds")).problem == "must be a number of seconds greater than 0, not inf"
    assert reader.number("e", 2.0, at_least=0) == 0.0
    assert error(lambda: reader.number("f", 2.0, at_least=0, unit="of seconds")).problem == "must be a number of seconds, 0 or more, not -1"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10**400, -(10**400)], ids=["nan", "inf", "-inf", "huge", "-huge"])
def test_number_is_always_finite(value):
    """number refuses nan, inf, -inf and an integer too large for a float, whatever its bounds, with a ConfigError."""
    for bounds in ({}, {"above": None}, {"at_least": 0}, {"above": None, "at_most": 100}):
        e = error(lambda bounds=bounds: OptionReader({"n": value}).number("n", 1.0, **bounds))
        assert e.key == "n" and e.problem.startswith("must be a number")


def test_integers_are_64_bit_and_long_values_are_cut():
    """integer takes TOML's 64-bit range at most, and an error quotes a huge or long value by its size or its start."""
    assert OptionReader({"n": 2**63 - 1}).integer("n", 1) == 2**63 - 1
    e = error(lambda: OptionReader({"n": 2**63}).integer("n", 1))
    assert e.problem == "must be a positive whole number, not a 19-digit number"
    e = error(lambda: OptionReader({"s": "x" * 500}).integer("s", 1))
    assert len(e.problem) < 120 and e.problem.endswith("...")


def test_path_with_a_nul_is_refused():
    """A path holding a NUL character is a ConfigError, not the ValueError every later open() would raise."""
    e = error(lambda: OptionReader({"p": "dir/a\0b"}, folder="/srv").path("p", what="a file"))
    assert e.key == "p" and e.problem == '"dir/a\\u0000b" holds a NUL character (\\u0000), which no path can'


def test_required_choice_and_strings():
    """A required key names what it is for; choice lists the choices; strings refuses a non-string item."""
    reader = OptionReader({"action": "drop", "zones": ["a.test", 3]})
    e = error(lambda: reader.take("dsn", str, example='"host=db"', what="a libpq connection string"))
    assert (e.key, e.problem, e.fix) == ("dsn", "is required: a libpq connection string", 'e.g. dsn = "host=db"')
    assert error(lambda: reader.choice("action", ("reject", "quarantine", "tag"), "reject")).problem == (
        'must be "reject", "quarantine" or "tag", not "drop"'
    )
    assert error(lambda: reader.strings("zones")).problem == "must be a list of strings; 3 is not one"


def test_finish_hints_among_the_keys_asked_for():
    """finish() refuses a left-over key with the closest key read, else the list of them, naming the backend."""
    reader = OptionReader({"tiemout": 5, "colour": "red"}, "lmtp")
    reader.number("timeout", 300.0)
    reader.integer("max_connections", 10)
    e = error(reader.finish)
    assert (e.key, e.problem, e.fix) == ("tiemout", "unknown key", "did you mean 'timeout'?")
    del reader.options["tiemout"]
    assert error(reader.finish).fix == "lmtp knows: timeout, max_connections"
    assert error(lambda: OptionReader({"x": 1}, "local").finish()).fix == "local takes no options"


def test_errors_are_placed_in_the_file_and_section():
    """A reader for a config section puts the file and [section] in its errors; a backend's leaves that to mailplat."""
    e = error(lambda: OptionReader({"max_errors": "x"}, file="/etc/m.toml", section="smtp").integer("max_errors", 20))
    assert str(e) == '/etc/m.toml: [smtp] max_errors: must be a positive whole number, not "x"; fix: e.g. max_errors = 20'
    assert error(lambda: OptionReader({"max_errors": "x"}).integer("max_errors", 20)).key == "max_errors"


def test_path_and_endpoint_use_the_backend_context(tmp_path):
    """path() is relative to the config file's folder; endpoint() parses a client endpoint with the context's reactor."""
    context = BackendContext("mail.example.org", ("example.org",), str(tmp_path), str(tmp_path / "var"), reactor=None)
    reader = OptionReader({"path": "mail", "ca_file": "", "address": "tcp:host=127.0.0.1:port=24", "bad": "carrier-pigeon:x"}, context=context)
    assert reader.path("path", what="the maildirs") == os.path.join(str(tmp_path), "mail")
    assert reader.path("ca_file", "") == "", "an optional path written as an empty string is left out"
    address, endpoint = reader.endpoint("address")
    assert address == "tcp:host=127.0.0.1:port=24" and endpoint._port == 24
    assert "is not a client endpoint" in error(lambda: reader.endpoint("bad", example='"tcp:host=h:port=24"')).problem


def test_config_error_is_one_line_whatever_it_quotes():
    """A control character in a value or a library's message is escaped: the error stays one line."""
    from mailplat.config import ConfigError

    error = ConfigError("[listen] smtp", "'tcp:2525:int\rface=x' is not a Twisted endpoint: bad\nthing", "e.g. \"tcp:25\"", "/etc/m.toml")
    text = str(error)
    assert "\r" not in text and "\n" not in text
    assert "int\\x0dface" in text and "bad\\x0athing" in text
