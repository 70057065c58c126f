"""IMAP sequence sets and SEARCH: every RFC 3501 key, MODSEQ and ESEARCH, each matching and not, in-process.

The messages are real ones built with the email package (the builders of
test_imap_message); the store is stood in for by the three callables
``run`` takes, each counting what it is asked to open.  Dovecot 2.3 gave the
same answers to every key below but KEYWORD, RECENT, NEW, OLD, UID and
MODSEQ (which depend on its own state), and SENT* for messages without a
Date: field (see KEYS).
"""

from __future__ import annotations

import calendar
import email.policy
import functools
import io
import time
from email.message import EmailMessage

import pytest
from twisted.internet import defer

from mailplat.imap.message import MessageParts
from mailplat.imap.search import BadCharset, SearchQuery, format_esearch, parse_search_args, run
from mailplat.imap.sequences import SequenceSet
from mailplat.interfaces import MessageInfo
from test_imap_message import alternative, base64_text, nested, simple

# --- sequence sets -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "largest", "numbers"),
    [
        ("1:3,7", 10, [1, 2, 3, 7]),
        ("3:1", 10, [1, 2, 3]),
        ("2,2,1:2", 10, [1, 2]),
        ("8:12", 10, [8, 9, 10]),
        ("11", 10, []),
        ("*", 10, [10]),
        ("5:*", 3, [3]),
        ("*:5", 3, [3]),
        ("1:*", 0, []),
        ("*", 0, []),
        ("4294967295", 10, []),
    ],
)
def test_sequence_sets_resolve(text, largest, numbers):
    """A set resolves to sorted unique numbers up to the largest; `*` is the largest, so n:* always holds it."""
    assert SequenceSet.parse(text).resolve(largest) == numbers


@pytest.mark.parametrize("text", ["", "0", "1:0", "a", "1,", ",1", "1:2:3", "01", "4294967296", "1::2", "-1", "１"])
def test_bad_sequence_sets_are_value_errors(text):
    """Empty sets, 0, junk, leading zeros and numbers over 2^32-1 are refused."""
    with pytest.raises(ValueError):
        SequenceSet.parse(text)


def test_sequence_set_contains_select_and_format():
    """contains and select agree with resolve; format writes the shortest ranges."""
    uids = SequenceSet.parse("15:*")
    assert uids.contains(50, 50) and uids.contains(20, 50) and not uids.contains(10, 50)
    assert SequenceSet.parse("5:*").contains(3, 3) and not SequenceSet.parse("5:*").contains(4, 3)
    assert uids.select([10, 20, 30, 50], 50) == [20, 30, 50]
    assert SequenceSet.parse("1,30").select([10, 20, 30, 50], 50) == [30]
    assert SequenceSet.parse("70:*").select([10, 20, 30, 50], 50) == [50]
    assert SequenceSet.format([]) == ""
    assert SequenceSet.format([7, 1, 2, 3, 3]) == "1:3,7"
    assert SequenceSet.format([4]) == "4"
    assert str(SequenceSet.parse("1:3,*,5:*")) == "1:3,*,5:*"
    assert SequenceSet.parse("1:*").has_star() and not SequenceSet.parse("1:2").has_star()
    # 4 billion UIDs are never listed one by one by contains or select.
    started = time.monotonic()
    assert SequenceSet.parse("1:*").select([1, 4_000_000_000], 4_000_000_000) == [1, 4_000_000_000]
    assert time.monotonic() - started < 0.1


# --- the mailbox searched -------------------------------------------------


def day(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


def report() -> bytes:
    m = EmailMessage(policy=email.policy.SMTP)
    m["From"] = "Reports <reports@example.org>"
    m["To"] = "alice@example.org"
    m["Bcc"] = "secret@example.org"
    m["Subject"] = "Quarterly report"
    m["X-Priority"] = "1"
    m.set_content("Numbers are up.\n")
    return m.as_bytes()


@functools.cache
def mailbox() -> tuple[tuple[int, MessageInfo, bytes], ...]:
    """(msn, info, file) of five messages with distinct flags, dates, sizes, headers and bodies."""
    rows = [
        (10, simple(), {"\\Seen", "\\Answered"}, day("2026-11-30 12:00")),
        (20, alternative(), {"\\Flagged", "$Work"}, day("2026-12-01 23:59")),
        (30, base64_text(), {"\\Deleted", "\\Draft"}, day("2026-12-02 00:00")),
        (40, report(), set(), day("2026-12-03 08:00")),
        (50, nested(), {"\\Seen"}, day("2026-12-03 09:00")),
    ]
    return tuple(
        (msn, MessageInfo(uid, len(data), frozenset(flags), when, 2 * msn), data)
        for msn, (uid, data, flags, when) in enumerate(rows, 1)
    )


class Store:
    """The three callables run() takes, over mailbox(), remembering what was opened."""

    def __init__(self, rows=None) -> None:
        self.rows = rows or mailbox()
        self.files = {info.uid: data for _, info, data in self.rows}
        self.opened: list[int] = []
        self.gone: set[int] = set()

    def open_message(self, uid: int) -> defer.Deferred:
        self.opened.append(uid)
        if uid in self.gone:
            return defer.fail(OSError("expunged"))
        return defer.succeed(io.BytesIO(self.files[uid]))

    def search(self, tokens, charset=None, recent=frozenset({40, 50})) -> list[int]:
        query = SearchQuery.parse(tokens, charset)
        messages = [(msn, info) for msn, info, _ in self.rows]

        def parse_in_thread(source):
            # As the server may: the header alone when no key reads the body.
            return defer.succeed(MessageParts.read(source, header_only=not query.needs_body))

        d = run(
            query, messages, self.open_message, len(messages), max(self.files), parse_in_thread,
            recent=recent, in_thread=lambda f: defer.succeed(f()),
        )
        results: list = []
        d.addBoth(results.append)
        assert len(results) == 1, "the search did not finish"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]


def sizes() -> list[int]:
    return [info.size for _, info, _ in mailbox()]


# Each key, matching some messages and (in the next row) none or others.
KEYS = [
    (["ALL"], [1, 2, 3, 4, 5]),
    (["NOT", "ALL"], []),
    (["ANSWERED"], [1]),
    (["UNANSWERED"], [2, 3, 4, 5]),
    (["DELETED"], [3]),
    (["UNDELETED"], [1, 2, 4, 5]),
    (["DRAFT"], [3]),
    (["UNDRAFT"], [1, 2, 4, 5]),
    (["FLAGGED"], [2]),
    (["UNFLAGGED"], [1, 3, 4, 5]),
    (["SEEN"], [1, 5]),
    (["UNSEEN"], [2, 3, 4]),
    (["KEYWORD", "$Work"], [2]),
    (["KEYWORD", "$work"], [2]),
    (["KEYWORD", "$Home"], []),
    (["UNKEYWORD", "$Work"], [1, 3, 4, 5]),
    (["RECENT"], [4, 5]),
    (["NEW"], [4]),
    (["OLD"], [1, 2, 3]),
    (["BCC", "secret"], [4]),
    (["BCC", "alice"], []),
    (["CC", "dave@"], [1]),
    (["CC", "secret"], []),
    (["FROM", "J\u00f6rg".encode()], [2]),
    (["FROM", b"francois"], [3]),
    (["FROM", "ALICE"], [1]),
    (["FROM", "zoe"], []),
    (["TO", "Zo\u00eb".encode()], [2]),
    (["TO", "alice"], [3, 4]),
    (["TO", "nobody"], []),
    (["SUBJECT", "gr\u00fc\u00dfe".encode()], [2]),
    (["SUBJECT", "\u00c9T\u00c9".encode()], [3]),
    (["SUBJECT", "hello"], [1]),
    (["SUBJECT", "nothing like it"], []),
    (["HEADER", "X-Priority", "1"], [4]),
    (["HEADER", "x-priority", b""], [4]),
    (["HEADER", "In-Reply-To", "<one@"], [2]),
    (["HEADER", "X-Missing", b""], []),
    (["HEADER", "X-Priority", "2"], []),
    (["BODY", b"how are you"], [1]),
    (["BODY", "tr\u00e8s chaud".encode()], [3]),
    (["BODY", b"inner body"], [5]),
    (["BODY", b"numbers ARE up"], [4]),
    (["BODY", b"Hello there"], []),
    (["TEXT", b"Hello there"], [1]),
    (["TEXT", b"Quarterly"], [4]),
    (["TEXT", b"no such text"], []),
    (["BEFORE", "1-Dec-2026"], [1]),
    (["BEFORE", "1-Jan-2000"], []),
    (["ON", "1-Dec-2026"], [2]),
    (["ON", "4-Dec-2026"], []),
    (["SINCE", "2-Dec-2026"], [3, 4, 5]),
    (["SINCE", "4-Dec-2026"], []),
    (["SENTBEFORE", "30-Nov-2026"], [3]),
    (["SENTBEFORE", "29-Nov-2026"], []),
    (["SENTON", "1-Dec-2026"], [2]),
    (["SENTON", b"2-Dec-2026"], [1]),
    (["SENTON", "5-May-2020"], []),
    # 4 and 5 have no Date: field: their internal date stands in (RFC 5256 3).
    (["SENTSINCE", "2-Dec-2026"], [1, 4, 5]),
    (["SENTSINCE", "4-Dec-2026"], []),
    (["SENTON", "3-Dec-2026"], [4, 5]),
    (["UID", "20:30"], [2, 3]),
    (["UID", "45:*"], [5]),
    (["UID", "60:*"], [5]),
    (["UID", "11"], []),
    (["2,4:*"], [2, 4, 5]),
    (["*"], [5]),
    (["9"], []),
    (["NOT", "SEEN"], [2, 3, 4]),
    (["OR", "SEEN", "FLAGGED"], [1, 2, 5]),
    (["OR", "KEYWORD", "x", "KEYWORD", "y"], []),
    (["OR", "FROM", "alice", "BODY", b"inner body"], [1, 5]),
    ([["SEEN", "ANSWERED"]], [1]),
    ([["SEEN"], "NOT", "ANSWERED"], [5]),
    (["NOT", ["OR", "SEEN", "DELETED"]], [2, 4]),
    (["SEEN", "UNSEEN"], []),
    (["MODSEQ", "7"], [4, 5]),
    (["MODSEQ", b"/flags/\\draft", "all", "9"], [5]),
    (["MODSEQ", "100"], []),
]


@pytest.mark.parametrize(("tokens", "expected"), KEYS, ids=[" ".join(map(str, t)) for t, _ in KEYS])
def test_each_search_key(tokens, expected):
    """Each RFC 3501 and RFC 7162 search key finds exactly the messages it names."""
    assert Store().search(tokens) == expected


@pytest.mark.parametrize("which", [1, 2, 3, 4, 5])
def test_larger_and_smaller(which):
    """LARGER and SMALLER compare with RFC822.SIZE, strictly."""
    size = sizes()[which - 1]
    store = Store()
    assert store.search(["LARGER", str(size - 1), "SMALLER", str(size + 1)]) == [which]
    assert store.search(["LARGER", str(size), "SMALLER", str(size)]) == []
    assert store.opened == []


def test_only_undecided_messages_are_opened():
    """Flags decide first: SEEN FROM x opens only the seen messages; a flag-only search opens none."""
    store = Store()
    assert store.search(["SEEN", "FROM", "alice"]) == [1]
    assert store.opened == [10, 50]
    store.opened.clear()
    assert store.search(["OR", "ANSWERED", "FROM", "alice"]) == [1]
    assert store.opened == [20, 30, 40, 50]
    store.opened.clear()
    assert store.search(["UNSEEN", "OR", "DRAFT", "FLAGGED"]) == [2, 3]
    assert store.opened == []


def test_a_message_expunged_meanwhile_matches_nothing():
    """A message that cannot be opened any more is left out; the others are still searched."""
    store = Store()
    store.gone.add(10)
    assert store.search(["TEXT", b"example.org"]) == [2, 3, 4, 5]
    assert store.opened == [10, 20, 30, 40, 50]


def test_ten_thousand_messages_flag_search_is_one_loop():
    """A flag search over 10,000 messages takes well under a second and opens nothing."""
    rows = [
        (msn, MessageInfo(msn, 1000 + msn, frozenset({"\\Seen"} if msn % 3 else {"$Junk"}), 0.0, msn), b"")
        for msn in range(1, 10_001)
    ]
    store = Store(rows)
    started = time.monotonic()
    found = store.search(["OR", "UNSEEN", "KEYWORD", "$junk", "NOT", "DELETED", "UID", "1:*"])
    assert time.monotonic() - started < 0.5
    assert found == [msn for msn in range(1, 10_001) if msn % 3 == 0]
    assert store.opened == []


def test_query_attributes():
    """needs_message, uses_modseq and uses_recent say what the server must provide."""
    assert not SearchQuery.parse(["SEEN", "LARGER", "5", "UID", "1:*"], None).needs_message
    for key in (["FROM", "x"], ["BODY", "x"], ["TEXT", "x"], ["SENTON", "1-Jan-2020"], ["HEADER", "X", ""]):
        assert SearchQuery.parse(["NOT", key], None).needs_message
    assert SearchQuery.parse(["MODSEQ", "3"], None).uses_modseq
    assert not SearchQuery.parse(["ALL"], None).uses_modseq
    assert SearchQuery.parse(["NEW"], None).uses_recent
    assert SearchQuery.parse(["OR", "SEEN", "BODY", "x"], None).needs_body
    assert SearchQuery.parse(["TEXT", "x"], None).needs_body
    assert not SearchQuery.parse(["FROM", "x", "SENTON", "1-Jan-2020"], None).needs_body


@pytest.mark.parametrize(
    "tokens",
    [
        [],
        ["FROM"],
        ["BEFORE", "32-Jan-2020"],
        ["BEFORE", "1-Foo-2020"],
        ["BEFORE", "2020-01-01"],
        ["LARGER", "x"],
        ["LARGER", "-1"],
        ["OR", "SEEN"],
        ["NOT"],
        ["BOGUS"],
        ["UID", "0"],
        ["1:x"],
        [b"SEEN"],
        ["HEADER", "a:b", "x"],
        ["MODSEQ", "x"],
        [[]],
        ["NOT"] * 500 + ["ALL"],
        ["FROM", b"\xff\xfe"],
    ],
)
def test_bad_criteria_are_value_errors(tokens):
    """Unknown keys, missing arguments, bad dates, numbers, sets and runaway nesting raise ValueError (BAD)."""
    with pytest.raises(ValueError):
        SearchQuery.parse(tokens, None)


def test_charsets():
    """UTF-8 and US-ASCII are searched in; any other charset is BadCharset, a LookupError with its response code."""
    assert Store().search(["FROM", "J\u00f6rg".encode()], charset="utf-8") == [2]
    assert Store().search(["FROM", b"alice"], charset="US-ASCII") == [1]
    with pytest.raises(BadCharset) as caught:
        SearchQuery.parse(["ALL"], "KOI8-R")
    assert isinstance(caught.value, LookupError)
    assert caught.value.code == "BADCHARSET (UTF-8 US-ASCII)"


def test_parse_search_args():
    """RETURN (...) and CHARSET come off the front; RETURN () means ALL; unknown options are BAD."""
    returns, charset, query = parse_search_args(["RETURN", ["MIN", "count", "MIN"], "CHARSET", "UTF-8", "FROM", b"x"])
    assert (returns, charset, query.needs_message) == (("MIN", "COUNT"), "UTF-8", True)
    assert parse_search_args(["RETURN", [], "ALL"])[:2] == (("ALL",), None)
    assert parse_search_args(["SEEN"])[:2] == (None, None)
    with pytest.raises(ValueError):
        parse_search_args(["RETURN", ["SAVE"], "ALL"])
    with pytest.raises(ValueError):
        parse_search_args(["RETURN", "MIN", "ALL"])
    with pytest.raises(BadCharset):
        parse_search_args(["CHARSET", b"KOI8-R", "ALL"])


def test_format_esearch():
    """ESEARCH lists what was asked: MIN, MAX, COUNT, ALL as a set, MODSEQ; with nothing found, only COUNT."""
    full = ("MIN", "MAX", "COUNT", "ALL")
    assert format_esearch("A1", [9, 1, 2, 3], full, uid=True) == '* ESEARCH (TAG "A1") UID MIN 1 MAX 9 COUNT 4 ALL 1:3,9'
    assert format_esearch("A2", [], full, uid=False) == '* ESEARCH (TAG "A2") COUNT 0'
    assert format_esearch("A3", [], ("MIN",), uid=False) == '* ESEARCH (TAG "A3")'
    assert format_esearch("A4", [5], ("ALL",), uid=False, modseq=17) == '* ESEARCH (TAG "A4") ALL 5 MODSEQ 17'


def test_messages_are_read_a_few_at_a_time_and_a_failure_fails_the_search():
    """With a slow store, at most OPEN_AT_ONCE files are open at once, every one is closed, and the answer is the same;
    a message whose structure cannot be read fails the whole search."""
    from mailplat.imap.search import OPEN_AT_ONCE

    rows = list(mailbox()) * 3
    rows = [(msn, MessageInfo(msn, info.size, info.flags, info.internal_date, info.modseq), data)
            for msn, (_, info, data) in enumerate(rows, 1)]
    files = {info.uid: data for _, info, data in rows}
    waiting: list[tuple[defer.Deferred, int]] = []
    opened: list[io.BytesIO] = []

    def open_message(uid):
        d = defer.Deferred()
        waiting.append((d, uid))
        return d

    def release():
        while waiting:
            assert len(waiting) <= OPEN_AT_ONCE
            assert sum(not f.closed for f in opened) <= OPEN_AT_ONCE
            d, uid = waiting.pop(0)
            source = io.BytesIO(files[uid])
            opened.append(source)
            d.callback(source)

    query = SearchQuery.parse(["TEXT", b"how are you"], None)
    messages = [(msn, info) for msn, info, _ in rows]
    results: list = []
    run(query, messages, open_message, len(rows), len(rows), lambda s: defer.succeed(MessageParts.read(s)),
        in_thread=lambda f: defer.succeed(f())).addBoth(results.append)
    assert len(waiting) == OPEN_AT_ONCE
    release()
    assert results == [[1, 6, 11]]
    assert len(opened) == 15 and all(f.closed for f in opened)

    def broken(source):
        return defer.fail(OSError("disk error"))

    failures: list = []
    run(query, messages, lambda uid: defer.succeed(io.BytesIO(files[uid])), len(rows), len(rows), broken,
        in_thread=lambda f: defer.succeed(f())).addErrback(failures.append)
    assert failures and failures[0].check(OSError)
