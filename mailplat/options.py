"""Reading option tables: the one reader for the config file and every backend.

:class:`OptionReader` pops keys off one table and checks each as it goes,
so whatever is left at the end is an unknown key, refused with a "did you
mean".  ``config.py`` reads every section with it, every built-in backend's
``build`` reads its options with it, and a plugin may too.  Each mistake is
a :class:`ConfigError` naming the key and the fix; mailplat places a
backend's error in the file and the section.

TOML booleans are ints to Python: the reader never lets ``true`` pass as a
number, which is the check every hand-written ``build`` used to forget or
repeat.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["REQUIRED", "ConfigError", "OptionReader", "toml_value"]


class ConfigError(Exception):
    """A mistake in the configuration: which file, which key, what, and the fix.

    A backend's ``build`` raises it with only ``key`` (its option name); the
    loader adds the file and the section.  Importable as
    ``mailplat.config.ConfigError``, where plugin authors find it.
    """

    def __init__(self, key: str, problem: str, fix: str = "", file: str = "") -> None:
        super().__init__(key, problem, fix, file)
        self.key = key
        self.problem = problem
        self.fix = fix
        self.file = file

    def within(self, file: str, section: str) -> ConfigError:
        """This error, placed in ``file`` under ``[section]``."""
        key = self.key
        if section and not key.startswith("["):
            # A section may come already written out: "[filter] #2 (spamd)".
            where = section if section.startswith("[") else f"[{section}]"
            key = f"{where} {key}" if key else where
        return ConfigError(key, self.problem, self.fix, self.file or file)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        text = f"{where}: {self.problem}" if where else self.problem
        if self.fix:
            text += f"; fix: {self.fix}"
        # One line, whatever a value or a library's message held (a CR in
        # an endpoint string came back in Twisted's error text).
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


# The default of an option that must be given.
REQUIRED: Any = _Required()


def toml_value(value: Any) -> str:
    """``value`` written as TOML, as an operator would type it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    # TOML basic strings may not hold control characters (a tab excepted) raw.
    text = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", text)
    return f'"{text}"'


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a table"}


def _given(value: Any) -> str:
    """What an error says was found: the value as it was written (its start, when long), or its kind."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
        return f"a {len(str(abs(value)))}-digit number"
    text = toml_value(value)
    return text if len(text) <= 80 else text[:77] + "..."


# TOML integers are 64-bit (toml.io "Integer"); tomllib reads any length.
_INT_MAX = 2**63 - 1
_INT_MIN = -(2**63)


def _finite(value: Any) -> bool:
    """Whether ``value`` is an int or float (never a bool) that is a finite float: not nan, inf or an int too large for one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the largest float
        return False


class OptionReader:
    """Pops options off one table, checking each, so whatever is left over is an unknown key.

    ``name`` is what reads the table ("lmtp"), for the hint that lists the
    known keys.  ``file`` and ``section`` place errors (config.py sets them;
    for a backend mailplat does).  ``folder`` is where relative paths start;
    ``context`` (a backend's ``BackendContext``) gives the folder and the
    reactor for endpoints.

    Every reading method takes the key, then its default (:data:`REQUIRED`
    when the key must be given; None reads an optional key as None), then
    ``example`` (a TOML value for the fix "e.g. key = example") or ``fix``
    (the whole fix text).
    """

    def __init__(
        self, options: Mapping[str, Any], name: str = "", *, file: str = "", section: str = "", folder: str = "", context: Any = None,
    ) -> None:
        self.options = dict(options)
        self.name = name
        self.file = file
        self.section = section
        self.folder = folder or (context.config_dir if context is not None else "")
        self.context = context
        # Every key asked for, in order: the known keys of finish().
        self.asked: list[str] = []

    def error(self, key: str, problem: str, fix: str = "") -> ConfigError:
        """A ConfigError about ``key``, placed in this reader's file and section."""
        return ConfigError(key, problem, fix).within(self.file, self.section)

    def _fix(self, key: str, default: Any, example: str, fix: str) -> str:
        if fix:
            return fix
        if example:
            return f"e.g. {key} = {example}"
        if default is not REQUIRED and default is not None and default != "":
            return f"e.g. {key} = {toml_value(default)}"
        return ""

    def _absent(self, key: str, default: Any, fix: str, what: str = "") -> bool:
        """Whether ``key`` was left out (it may be); refuse it left out when it is required."""
        if key not in self.asked:
            self.asked.append(key)
        if key in self.options:
            return False
        if default is REQUIRED:
            raise self.error(key, f"is required: {what}" if what else "is required", fix)
        return True

    def take(
        self, key: str, kind: type | tuple[type, ...], default: Any = REQUIRED, example: str = "", *, fix: str = "", what: str = "",
    ) -> Any:
        """The value of ``key``, which must be of ``kind`` (str, int, bool, list, dict...).

        ``what`` says, when a required key is missing, what it is for.
        """
        fix = self._fix(key, REQUIRED, example, fix)
        if self._absent(key, default, fix, what):
            return default
        value = self.options.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(key, f"must be {wanted}, not {_given(value)}", fix)
        return value

    def integer(
        self, key: str, default: Any = REQUIRED, *, at_least: int = 1, at_most: int | None = None, unit: str = "",
        example: str = "", fix: str = "",
    ) -> Any:
        """A whole number from ``at_least`` (1: a positive number) to ``at_most``; ``unit`` says of what ("of bytes")."""
        fix = self._fix(key, default, example, fix)
        if self._absent(key, default, fix):
            return default
        value = self.options.pop(key)
        highest = _INT_MAX if at_most is None else at_most
        if isinstance(value, bool) or not isinstance(value, int) or value < at_least or value > highest:
            noun = " ".join(part for part in ("whole number", unit) if part)
            if at_most is not None:
                wanted = f"a {noun} from {at_least} to {at_most}"
            elif at_least == 1:
                wanted = f"a positive {noun}"
            else:
                wanted = f"a {noun}, at least {at_least}"
            raise self.error(key, f"must be {wanted}, not {_given(value)}", fix)
        return value

    def number(
        self, key: str, default: Any = REQUIRED, *, above: float | None = 0, at_least: float | None = None,
        at_most: float | None = None, unit: str = "", example: str = "", fix: str = "",
    ) -> Any:
        """A finite number, an integer or not, as a float: greater than ``above``, or at least ``at_least``, and at most ``at_most``."""
        fix = self._fix(key, default, example, fix)
        if self._absent(key, default, fix):
            return default
        value = self.options.pop(key)
        ok = _finite(value)
        if ok:
            low_ok = value >= at_least if at_least is not None else above is None or value > above
            ok = low_ok and (at_most is None or value <= at_most)
        if not ok:
            if at_least is not None:
                bounds = f"from {at_least:g} to {at_most:g}" if at_most is not None else f", {at_least:g} or more"
            elif above is not None:
                bounds = f"greater than {above:g}" + (f" and at most {at_most:g}" if at_most is not None else "")
            else:
                bounds = f"of at most {at_most:g}" if at_most is not None else ""
            wanted = " ".join(part for part in ("a number", unit, bounds) if part).replace(" ,", ",")
            raise self.error(key, f"must be {wanted}, not {_given(value)}", fix)
        return float(value)

    def choice(self, key: str, choices: Sequence[str], default: Any = REQUIRED, *, example: str = "", fix: str = "") -> Any:
        """One of the strings ``choices``."""
        fix = self._fix(key, default, example, fix)
        if self._absent(key, default, fix):
            return default
        value = self.options.pop(key)
        if not isinstance(value, str) or value not in choices:
            quoted = [toml_value(c) for c in choices]
            wanted = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
            raise self.error(key, f"must be {wanted}, not {_given(value)}", fix)
        return value

    def strings(self, key: str, default: Any = REQUIRED, *, example: str = "", fix: str = "", what: str = "") -> Any:
        """A list of strings (each may still need checking by the caller)."""
        if self._absent(key, default, self._fix(key, REQUIRED, example, fix), what):
            return default
        value = self.take(key, list, example=example, fix=fix)
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"must be a list of strings; {_given(item)} is not one", self._fix(key, REQUIRED, example, fix))
        return value

    def path(self, key: str, default: Any = REQUIRED, *, what: str = "", example: str = "", fix: str = "") -> Any:
        """A non-empty path, made absolute from the reader's folder; ``what`` says what it names.

        A default of "" or None is returned as it is: the path is optional.
        """
        fix = fix or (f"e.g. {key} = {example} (relative to this file)" if example else "")
        if self._absent(key, default, fix, what):
            value = default
        else:
            value = self.options.pop(key)
        if value == "" and default is not REQUIRED and not default:
            # An optional path written as "" is left out (check-config prints it so).
            return default
        if value is None and default is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be the path of {what}, not {_given(value)}" if what else f"must be a path, not {_given(value)}", fix)
        if "\0" in value:
            # Every system call refuses it (Python raises ValueError), so no file could be opened.
            raise self.error(key, f"{_given(value)} holds a NUL character (\\u0000), which no path can", fix or "remove it")
        if not self.folder:
            return value
        return os.path.normpath(os.path.join(self.folder, os.path.expanduser(value)))

    def endpoint(self, key: str, default: Any = REQUIRED, *, example: str = "", fix: str = "") -> Any:
        """A Twisted client endpoint string: (the string, the endpoint), or None for an absent optional key."""
        from twisted.internet.endpoints import clientFromString

        fix = self._fix(key, REQUIRED, example, fix)
        address = default if self._absent(key, default, fix) else self.options.pop(key)
        if address is None:
            return None
        if not isinstance(address, str) or not address:
            raise self.error(key, f"must be a Twisted client endpoint string, not {_given(address)}", fix)
        if self.context is not None:
            reactor = self.context.reactor
        else:
            from twisted.internet import reactor
        try:
            return address, clientFromString(reactor, address)
        except Exception as e:  # Twisted raises ValueError, TypeError, KeyError...
            raise self.error(key, f"{toml_value(address)} is not a client endpoint: {type(e).__name__}: {e}", fix)

    def table(self, key: str, *, example: str = "") -> OptionReader:
        """The sub-table ``key`` (empty when left out) as a reader of its own, named for its section."""
        value = self.take(key, dict, {}, example)
        section = f"{self.section}.{key}" if self.section else key
        return OptionReader(value, file=self.file, section=section, folder=self.folder)

    def reject_unknown(self, known: Sequence[str]) -> None:
        """Refuse keys not in ``known`` before reading any value (a typo is the likeliest mistake)."""
        for key in self.options:
            if key not in known:
                raise self.unknown(key, known)

    def finish(self, known: Sequence[str] | None = None) -> None:
        """Refuse whatever was not read: an unknown key, with a hint among ``known`` (default: every key asked for)."""
        for key in self.options:
            raise self.unknown(key, self.asked if known is None else known)

    def unknown(self, key: str, known: Sequence[str]) -> ConfigError:
        """The error for an unknown ``key``: the close match among ``known``, or all of them."""
        hint = difflib.get_close_matches(key, known, n=1)
        if hint:
            fix = f"did you mean {hint[0]!r}?"
        elif self.name:
            fix = f"{self.name} knows: {', '.join(known)}" if known else f"{self.name} takes no options"
        else:
            fix = f"known keys here: {', '.join(known)}" if known else "this table takes no keys"
        return self.error(key, "unknown key", fix)
