"""SEARCH (RFC 3501 6.4.4, RFC 7162 MODSEQ, RFC 4731 ESEARCH): parse the criteria, find the messages.

A query is compiled once into small predicate functions.  Each answers
True, False, or None when it needs the message's contents; :func:`run`
first evaluates every message from its MessageInfo alone (a flag search
over 10,000 messages is one loop, no Deferred per message), and opens,
parses (in a thread) and evaluates again only the messages whose answer
is still open: ``UNSEEN FROM x`` reads only the unseen ones.

The server calls :func:`parse_search_args` on the command's tokens
(ValueError -> BAD, :class:`BadCharset` -> ``NO [BADCHARSET ...]``), then
:func:`run`, then answers ``* SEARCH`` with the numbers, or
:func:`format_esearch` when RETURN was given.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred

from mailplat.interfaces import FLAG_ANSWERED, FLAG_DELETED, FLAG_DRAFT, FLAG_FLAGGED, FLAG_SEEN, MessageInfo
from mailplat.imap.message import MessageParts
from mailplat.imap.parser import quoted
from mailplat.imap.sequences import SequenceSet
from mailplat.numerals import is_digits

__all__ = ["BadCharset", "CHARSETS", "SearchQuery", "format_esearch", "parse_search_args", "run"]

T = TypeVar("T")

# What SEARCH CHARSET accepts; anything else is NO [BADCHARSET (UTF-8 US-ASCII)].
CHARSETS = ("UTF-8", "US-ASCII")
RETURN_OPTIONS = ("MIN", "MAX", "COUNT", "ALL")
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
# Messages a search reads at once (see _run).
OPEN_AT_ONCE = 4
# RFC 3501 has no limit; a client nesting NOT or parentheses this deep means harm.
MAX_NESTING = 100


class BadCharset(LookupError):
    """SEARCH CHARSET names a charset we do not search in: NO [BADCHARSET (UTF-8 US-ASCII)]."""

    def __init__(self, charset: str) -> None:
        super().__init__(f"unsupported charset {charset[:40]}")
        self.charset = charset

    @property
    def code(self) -> str:
        """The response code to send with the NO."""
        return "BADCHARSET (" + " ".join(CHARSETS) + ")"


class _Context:
    """One message as a predicate sees it."""

    __slots__ = ("msn", "info", "recent", "parts", "source")

    def __init__(self, msn: int, info: MessageInfo, recent: bool) -> None:
        self.msn = msn
        self.info = info
        self.recent = recent
        self.parts: MessageParts | None = None
        self.source: IO[bytes] | None = None


# A predicate: True or False, or None when it needs the message and ctx.parts is None.
_Predicate = Callable[[_Context], bool | None]


@dataclass
class _Limits:
    largest_msn: int = 0
    largest_uid: int = 0


def _flag(name: str, present: bool) -> _Predicate:
    lowered = name.lower()

    def match(ctx: _Context) -> bool:
        flags = ctx.info.flags
        has = name in flags or any(f.lower() == lowered for f in flags)
        return has is present

    return match


def _not(inner: _Predicate) -> _Predicate:
    def match(ctx: _Context) -> bool | None:
        value = inner(ctx)
        return None if value is None else not value

    return match


def _and(inners: list[_Predicate]) -> _Predicate:
    if len(inners) == 1:
        return inners[0]

    def match(ctx: _Context) -> bool | None:
        unknown = False
        for inner in inners:
            value = inner(ctx)
            if value is False:
                return False
            if value is None:
                unknown = True
        return None if unknown else True

    return match


def _or(a: _Predicate, b: _Predicate) -> _Predicate:
    def match(ctx: _Context) -> bool | None:
        first = a(ctx)
        if first is True:
            return True
        second = b(ctx)
        if second is True:
            return True
        if first is None or second is None:
            return None
        return False

    return match


def _with_message(check: Callable[[_Context, MessageParts], bool | None]) -> _Predicate:
    def match(ctx: _Context) -> bool | None:
        if ctx.parts is None:
            return None
        return check(ctx, ctx.parts)

    return match


def _header(name: str, needle: str) -> _Predicate:
    wanted = needle.casefold()

    def check(ctx: _Context, parts: MessageParts) -> bool:
        values = parts.header_values(name)
        if not wanted:
            # RFC 3501 6.4.4 HEADER: an empty string matches every message that has the field.
            return bool(values)
        return any(wanted in value.casefold() for value in values)

    return _with_message(check)


def _date_of(info: MessageInfo) -> datetime.date:
    # INTERNALDATE is sent in UTC, so its date is the UTC one.
    return datetime.datetime.fromtimestamp(info.internal_date, datetime.timezone.utc).date()


def _compare(day: datetime.date, relation: str, wanted: datetime.date) -> bool:
    if relation == "BEFORE":
        return day < wanted
    if relation == "ON":
        return day == wanted
    return day >= wanted


def _parse_date(text: str) -> datetime.date:
    """RFC 3501 date: ``1-Feb-1994`` (day of one or two digits)."""
    day, _, rest = text.partition("-")
    month, _, year = rest.partition("-")
    if not (is_digits(day) and len(day) <= 2 and is_digits(year) and len(year) == 4 and month.lower() in _MONTHS):
        raise ValueError(f"invalid date {text[:30]!r}, expected e.g. 1-Feb-1994")
    try:
        return datetime.date(int(year), _MONTHS[month.lower()], int(day))
    except ValueError:
        raise ValueError(f"invalid date {text[:30]!r}") from None


class _Parser:
    """Recursive descent over the server parser's tokens."""

    def __init__(self, charset: str) -> None:
        self.charset = charset
        self.needs_message = False
        self.uses_modseq = False
        self.uses_recent = False
        self.needs_body = False
        self.depth = 0
        # The largest MSN and UID, for "*": set before each match.
        self.limits = _Limits()

    def string(self, tokens: list[Any], i: int, key: str) -> str:
        if i >= len(tokens):
            raise ValueError(f"{key} needs a string")
        token = tokens[i]
        if isinstance(token, str):
            return token
        if isinstance(token, (bytes, bytearray)):
            try:
                return bytes(token).decode("ascii" if self.charset == "US-ASCII" else "utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"the {key} string is not {self.charset}") from None
        raise ValueError(f"{key} needs a string")

    def atom(self, tokens: list[Any], i: int, key: str) -> str:
        if i >= len(tokens) or not isinstance(tokens[i], str):
            raise ValueError(f"{key} needs an argument")
        return str(tokens[i])

    def number(self, tokens: list[Any], i: int, key: str, limit: int = 2**63) -> int:
        text = self.atom(tokens, i, key)
        if not is_digits(text) or int(text) >= limit:
            raise ValueError(f"{key} needs a number")
        return int(text)

    def keys(self, tokens: list[Any]) -> _Predicate:
        """All of ``tokens`` as one AND."""
        if not tokens:
            raise ValueError("missing search criteria")
        predicates = []
        i = 0
        while i < len(tokens):
            predicate, i = self.key(tokens, i)
            predicates.append(predicate)
        return _and(predicates)

    def key(self, tokens: list[Any], i: int) -> tuple[_Predicate, int]:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ValueError("search criteria nested too deep")
        try:
            return self._key(tokens, i)
        finally:
            self.depth -= 1

    def _key(self, tokens: list[Any], i: int) -> tuple[_Predicate, int]:
        token = tokens[i]
        if isinstance(token, list):
            return self.keys(token), i + 1
        if not isinstance(token, str):
            raise ValueError("a search key must be an atom")
        word = token.upper()
        flags = {
            "ANSWERED": (FLAG_ANSWERED, True), "UNANSWERED": (FLAG_ANSWERED, False),
            "DELETED": (FLAG_DELETED, True), "UNDELETED": (FLAG_DELETED, False),
            "DRAFT": (FLAG_DRAFT, True), "UNDRAFT": (FLAG_DRAFT, False),
            "FLAGGED": (FLAG_FLAGGED, True), "UNFLAGGED": (FLAG_FLAGGED, False),
            "SEEN": (FLAG_SEEN, True), "UNSEEN": (FLAG_SEEN, False),
        }  # fmt: skip
        if word in flags:
            name, present = flags[word]
            return _flag(name, present), i + 1
        if word == "ALL":
            return (lambda ctx: True), i + 1
        if word in ("RECENT", "NEW", "OLD"):
            self.uses_recent = True
            recent: _Predicate = lambda ctx: ctx.recent  # noqa: E731
            if word == "RECENT":
                return recent, i + 1
            if word == "OLD":
                return _not(recent), i + 1
            return _and([recent, _flag(FLAG_SEEN, False)]), i + 1
        if word in ("KEYWORD", "UNKEYWORD"):
            keyword = self.atom(tokens, i + 1, word)
            return _flag(keyword, word == "KEYWORD"), i + 2
        if word in ("BCC", "CC", "FROM", "SUBJECT", "TO"):
            self.needs_message = True
            return _header(word.lower(), self.string(tokens, i + 1, word)), i + 2
        if word == "HEADER":
            name = self.string(tokens, i + 1, word)
            if not name or not name.isascii() or ":" in name or not name.isprintable() or " " in name:
                raise ValueError("HEADER needs a field name")
            self.needs_message = True
            return _header(name, self.string(tokens, i + 2, word)), i + 3
        if word in ("BODY", "TEXT"):
            self.needs_message = True
            self.needs_body = True
            needle = self.string(tokens, i + 1, word)
            if word == "BODY":
                return _with_message(lambda ctx, parts: _source_check(ctx, parts, needle, body_only=True)), i + 2
            return _with_message(lambda ctx, parts: _source_check(ctx, parts, needle, body_only=False)), i + 2
        if word in ("BEFORE", "ON", "SINCE"):
            wanted = _parse_date(self.string(tokens, i + 1, word))
            return (lambda ctx: _compare(_date_of(ctx.info), word, wanted)), i + 2
        if word in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            wanted = _parse_date(self.string(tokens, i + 1, word))
            self.needs_message = True
            relation = word[4:]

            def sent(ctx: _Context, parts: MessageParts) -> bool:
                # Without a readable Date: the internal date, as RFC 5256 3 has SORT do
                # (Dovecot takes 1970 instead, so that SENTBEFORE finds every such message).
                day = parts.sent_date() or _date_of(ctx.info)
                return _compare(day, relation, wanted)

            return _with_message(sent), i + 2
        if word == "LARGER":
            size = self.number(tokens, i + 1, word)
            return (lambda ctx: ctx.info.size > size), i + 2
        if word == "SMALLER":
            size = self.number(tokens, i + 1, word)
            return (lambda ctx: ctx.info.size < size), i + 2
        if word == "NOT":
            if i + 1 >= len(tokens):
                raise ValueError("NOT needs a search key")
            inner, j = self.key(tokens, i + 1)
            return _not(inner), j
        if word == "OR":
            if i + 2 >= len(tokens):
                raise ValueError("OR needs two search keys")
            a, j = self.key(tokens, i + 1)
            if j >= len(tokens):
                raise ValueError("OR needs two search keys")
            b, k = self.key(tokens, j)
            return _or(a, b), k
        if word == "UID":
            uids = SequenceSet.parse(self.atom(tokens, i + 1, word))
            return (lambda ctx: uids.contains(ctx.info.uid, self.limits.largest_uid)), i + 2
        if word == "MODSEQ":
            # RFC 7162 3.1.5: MODSEQ [entry-name entry-type] mod-sequence-valzer
            j = i + 1
            if j < len(tokens) and isinstance(tokens[j], (bytes, bytearray)):
                j += 2  # the entry name (a quoted string) and its type (priv, shared, all)
            modseq = self.number(tokens, j, word)
            self.uses_modseq = True
            return (lambda ctx: ctx.info.modseq >= modseq), j + 1
        if token and all(c in "0123456789:,*" for c in token):
            numbers = SequenceSet.parse(token)
            return (lambda ctx: numbers.contains(ctx.msn, self.limits.largest_msn)), i + 1
        raise ValueError(f"unknown search key {token[:40]}")


def _source_check(ctx: _Context, parts: MessageParts, needle: str, body_only: bool) -> bool | None:
    if ctx.source is None:
        # Known only once the file is read again (in a thread).
        return None
    if body_only:
        return parts.body_contains(ctx.source, needle)
    return parts.text_contains(ctx.source, needle)


class SearchQuery:
    """Parsed SEARCH criteria, ready to be :func:`run`."""

    def __init__(self, predicate: _Predicate, parser: _Parser) -> None:
        self._predicate = predicate
        self._parser = parser

    @classmethod
    def parse(cls, tokens: list[Any], charset: str | None) -> SearchQuery:
        """The search keys (after CHARSET); ValueError with a text for BAD, :class:`BadCharset` for NO [BADCHARSET]."""
        name = (charset or "US-ASCII").upper()
        if name in ("UTF8", "ASCII"):
            name = {"UTF8": "UTF-8", "ASCII": "US-ASCII"}[name]
        if name not in CHARSETS:
            raise BadCharset(charset or "")
        # A client that says US-ASCII may still send UTF-8 (RFC 9051 drops CHARSET): read strings as UTF-8.
        parser = _Parser("UTF-8")
        return cls(parser.keys(list(tokens)), parser)

    @property
    def needs_message(self) -> bool:
        """Whether some key reads the message (header, body, text, sent date)."""
        return self._parser.needs_message

    @property
    def needs_body(self) -> bool:
        """Whether BODY or TEXT appear; without them ``parse_in_thread`` may read the header only
        (``MessageParts.read(source, header_only=True)``), whatever the size of the messages."""
        return self._parser.needs_body

    @property
    def uses_modseq(self) -> bool:
        """Whether MODSEQ appears: RFC 7162 3.1.5 then adds ``(MODSEQ n)`` to the answer and enables CONDSTORE."""
        return self._parser.uses_modseq

    @property
    def uses_recent(self) -> bool:
        """Whether RECENT, NEW or OLD appear (the server must then pass ``recent``)."""
        return self._parser.uses_recent

    def match(self, msn: int, info: MessageInfo, *, largest_msn: int, largest_uid: int, recent: bool = False,
              parts: MessageParts | None = None, source: IO[bytes] | None = None) -> bool | None:
        """One message: True or False, or None when the answer needs ``parts`` (and ``source`` for BODY/TEXT). Blocking
        when ``source`` is given and BODY or TEXT is asked."""
        self._parser.limits.largest_msn = largest_msn
        self._parser.limits.largest_uid = largest_uid
        ctx = _Context(msn, info, recent)
        ctx.parts = parts
        ctx.source = source
        return self._predicate(ctx)


def parse_search_args(tokens: list[Any]) -> tuple[tuple[str, ...] | None, str | None, SearchQuery]:
    """The whole SEARCH argument: ``[RETURN (opts)] [CHARSET name] keys``.

    Returns the RFC 4731 return options (None without RETURN: answer
    ``* SEARCH``; ``RETURN ()`` is ``("ALL",)``), the charset, and the query.
    ValueError for BAD, :class:`BadCharset` for NO [BADCHARSET].
    """
    i = 0
    returns: tuple[str, ...] | None = None
    if len(tokens) > i and isinstance(tokens[i], str) and tokens[i].upper() == "RETURN":
        if len(tokens) <= i + 1 or not isinstance(tokens[i + 1], list):
            raise ValueError("RETURN needs a list of options")
        options: list[str] = []
        for option in tokens[i + 1]:
            if not isinstance(option, str) or option.upper() not in RETURN_OPTIONS:
                raise ValueError("RETURN options are " + ", ".join(RETURN_OPTIONS))
            if option.upper() not in options:
                options.append(option.upper())
        returns = tuple(options) or ("ALL",)
        i += 2
    charset: str | None = None
    if len(tokens) > i and isinstance(tokens[i], str) and tokens[i].upper() == "CHARSET":
        if len(tokens) <= i + 1 or not isinstance(tokens[i + 1], (str, bytes)):
            raise ValueError("CHARSET needs a charset name")
        value = tokens[i + 1]
        charset = value if isinstance(value, str) else value.decode("ascii", "replace")
        i += 2
    return returns, charset, SearchQuery.parse(tokens[i:], charset)


def _default_in_thread(f: Callable[[], T]) -> Deferred[T]:
    return threads.deferToThread(f)


def run(
    query: SearchQuery,
    messages: list[tuple[int, MessageInfo]],
    open_message: Callable[[int], Deferred[IO[bytes]]],
    largest_msn: int,
    largest_uid: int,
    parse_in_thread: Callable[[IO[bytes]], Deferred[MessageParts]],
    *,
    recent: Collection[int] = frozenset(),
    in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
) -> Deferred[list[int]]:
    """The MSNs, ascending, of ``messages`` ((msn, info) pairs) that match ``query``.

    ``open_message(uid)`` opens a message (the caller's store read);
    ``parse_in_thread(source)`` runs :meth:`MessageParts.read` in a thread.
    ``recent`` holds the UIDs that are \\Recent in this session.  BODY and
    TEXT read the file once more to search it: ``in_thread(f)`` must run
    ``f()`` in the service's thread pool (``threads.run(threads.cpu, f)``);
    without it, Twisted's default reactor pool is used.  Only the messages
    that flags and sizes alone cannot decide are opened, OPEN_AT_ONCE at a
    time.  A failure to read one fails the search.
    """
    return defer.Deferred.fromCoroutine(
        _run(query, messages, open_message, largest_msn, largest_uid, parse_in_thread, recent, in_thread or _default_in_thread)
    )


async def _run(
    query: SearchQuery,
    messages: list[tuple[int, MessageInfo]],
    open_message: Callable[[int], Deferred[IO[bytes]]],
    largest_msn: int,
    largest_uid: int,
    parse_in_thread: Callable[[IO[bytes]], Deferred[MessageParts]],
    recent: Collection[int],
    in_thread: Callable[[Callable[[], Any]], Deferred[Any]],
) -> list[int]:
    found: list[int] = []
    undecided: list[tuple[int, MessageInfo]] = []
    recent_set = recent if isinstance(recent, (set, frozenset)) else frozenset(recent)
    for msn, info in messages:
        value = query.match(msn, info, largest_msn=largest_msn, largest_uid=largest_uid, recent=info.uid in recent_set)
        if value is True:
            found.append(msn)
        elif value is None:
            undecided.append((msn, info))
    async def decide(msn: int, info: MessageInfo) -> bool:
        try:
            source = await open_message(info.uid)
        except Exception:
            # Expunged by another session meanwhile: it matches nothing (RFC 3501 7.4.1).
            return False
        try:
            parts = await parse_in_thread(source)
            recent_one = info.uid in recent_set
            value = query.match(msn, info, largest_msn=largest_msn, largest_uid=largest_uid, recent=recent_one, parts=parts)
            if value is None:
                # BODY or TEXT decides: the file is searched, in a thread.
                value = await in_thread(
                    lambda: query.match(msn, info, largest_msn=largest_msn, largest_uid=largest_uid, recent=recent_one,
                                        parts=parts, source=source)
                )
            return bool(value)
        finally:
            source.close()

    # A few messages at a time: a thread can read one while another is
    # parsed, and at most OPEN_AT_ONCE files are open for one search.
    queue = iter(undecided)

    async def worker() -> None:
        for msn, info in queue:
            if await decide(msn, info):
                found.append(msn)

    workers = [defer.Deferred.fromCoroutine(worker()) for _ in range(min(OPEN_AT_ONCE, len(undecided)))]
    try:
        await defer.gatherResults(workers, consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
    found.sort()
    return found


def format_esearch(
    tag: str, numbers: Iterable[int], returns: tuple[str, ...], *, uid: bool, modseq: int | None = None
) -> str:
    """RFC 4731's ``* ESEARCH (TAG "x") UID MIN 1 MAX 9 COUNT 3 ALL 1:3,9`` (no CRLF), for numbers found
    (MSNs, or UIDs when ``uid``); with none, only COUNT is there.  ``modseq``: RFC 7162 3.1.5's highest
    MODSEQ of the messages found, when the query used MODSEQ."""
    found = sorted(set(numbers))
    words = [f"* ESEARCH (TAG {quoted(tag)})"]
    if uid:
        words.append("UID")
    if found:
        if "MIN" in returns:
            words.append(f"MIN {found[0]}")
        if "MAX" in returns:
            words.append(f"MAX {found[-1]}")
    if "COUNT" in returns:
        words.append(f"COUNT {len(found)}")
    if found and "ALL" in returns:
        words.append("ALL " + SequenceSet.format(found))
    if found and modseq is not None:
        words.append(f"MODSEQ {modseq}")
    return " ".join(words)
