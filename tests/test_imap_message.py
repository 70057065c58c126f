"""What IMAP sends about a message: ENVELOPE, BODYSTRUCTURE, sections and partials, FETCH items and responses.

The expected ENVELOPE, BODYSTRUCTURE and section answers are Dovecot's
(dovecot-imapd 2.3.19, run once on the same messages as a reference peer);
where ours differ on purpose, the test says so and why.  All in-process.
"""

from __future__ import annotations

import email.policy
import functools
import io
import time
import tracemalloc
from email.message import EmailMessage

import pytest

from mailplat.imap.fetch import FetchRequest, format_flags, format_internal_date, render
from mailplat.imap.message import MAX_HEADER, MAX_PARTS, MessageParts, SectionSpec, imap_string, nstring
from mailplat.interfaces import MessageInfo


def _policy():
    return email.policy.SMTP  # CRLF line ends, as messages are stored


@functools.cache
def simple() -> bytes:
    m = EmailMessage(policy=_policy())
    m["From"] = "Alice Example <alice@example.org>"
    m["To"] = 'bob@example.net, "Carol, C." <carol@example.com>'
    m["Cc"] = "Team: dave@example.org, erin@example.org;"
    m["Subject"] = "Hello there"
    m["Date"] = "Wed, 02 Dec 2026 00:35:00 +0100"
    m["Message-ID"] = "<one@example.org>"
    m.set_content("Hello Bob,\nhow are you?\n")
    return m.as_bytes()


@functools.cache
def alternative() -> bytes:
    """multipart/mixed of multipart/alternative (plain, html) and two attachments, with non-ASCII headers."""
    m = EmailMessage(policy=_policy())
    m["From"] = "Jörg Müller <joerg@example.de>"
    m["To"] = "Zoë <zoe@example.org>"
    m["Subject"] = "Grüße aus Köln"
    m["Date"] = "Tue, 01 Dec 2026 23:59:59 -0800"
    m["Message-ID"] = "<two@example.de>"
    m["In-Reply-To"] = "<one@example.org>"
    m["Reply-To"] = "list@example.de"
    m.set_content("Hallo Zoë,\nschöne Grüße.\n")
    m.add_alternative("<p>Hallo Zo&euml;, <b>schöne</b> Grüße.</p>\n", subtype="html")
    m.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="octet-stream", filename="data.bin")
    m.add_attachment("col1,col2\r\n1,2\r\n", subtype="csv", filename="täble.csv")
    m.set_boundary("outer-boundary")
    m.get_payload()[0].set_boundary("alt-boundary")
    return m.as_bytes()


@functools.cache
def nested() -> bytes:
    """A message forwarding another as message/rfc822, whose own body is multipart."""
    inner = EmailMessage(policy=_policy())
    inner["From"] = "inner@example.org"
    inner["To"] = "x@example.org"
    inner["Subject"] = "=?utf-8?q?Inner_=C3=BCbject?="
    inner["Date"] = "Mon, 30 Nov 2026 10:00:00 +0000"
    inner.set_content("the inner body\nline two\n")
    inner.add_attachment(b"PNGDATA" * 100, maintype="image", subtype="png", filename="a.png")
    inner.set_boundary("inner-boundary")
    outer = EmailMessage(policy=_policy())
    outer["From"] = "outer@example.org"
    outer["To"] = "y@example.org"
    outer["Subject"] = "Fwd: inner"
    outer.set_content("see attached\n")
    outer.add_attachment(inner)
    outer.set_boundary("outer-boundary")
    return outer.as_bytes()


@functools.cache
def base64_text() -> bytes:
    """A text part in base64 and one in quoted-printable, in iso-8859-1 and utf-8."""
    m = EmailMessage(policy=_policy())
    m["From"] = "=?iso-8859-1?q?Fran=E7ois?= <francois@example.fr>"
    m["To"] = "alice@example.org"
    m["Subject"] = "=?utf-8?b?w6l0w6kgw6AgUGFyaXM=?="
    m["Date"] = "Sun, 29 Nov 2026 08:00:00 +0100"
    m.set_content("Bonjour, un été très chaud à Paris.\n" * 3, charset="iso-8859-1", cte="base64")
    m.add_attachment("Crème brûlée pour le dessert.\n", subtype="plain", charset="utf-8", cte="quoted-printable",
                     disposition="inline")
    m.set_boundary("b64-boundary")
    return m.as_bytes()


@functools.cache
def related() -> bytes:
    """multipart/alternative whose html part is multipart/related with an inline image, and a PDF; names in RFC 2231."""
    m = EmailMessage(policy=_policy())
    m["From"] = '"Müller, Jörg" <j@example.de>'
    m["To"] = "a@b.c"
    m["Subject"] = "Related"
    m["References"] = "<a@b> <c@d>"
    m.set_content("plain text\n", subtype="plain", params={"format": "flowed", "delsp": "yes"})
    m.add_alternative("<html><img src=cid:img1></html>\n", subtype="html")
    m.get_payload()[1].add_related(b"\x89PNG....", maintype="image", subtype="png", cid="<img1@x>", filename="Bild ä.png")
    m.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="Rechnung – März.pdf")
    m.set_boundary("o")
    m.get_payload()[0].set_boundary("a")
    m.get_payload()[0].get_payload()[1].set_boundary("r")
    return m.as_bytes()


BARE = b"X-Nothing: here\r\n\r\nJust a body\r\nwith two lines\r\n"
HEADER_ONLY = b"Subject: only a header\r\nFrom: <a@b.c>\r\n"
# The declared boundary never comes.
BAD_BOUNDARY = (
    b'From: a@b.c\r\nContent-Type: multipart/mixed; boundary="nope"\r\n\r\n'
    b"--other\r\nContent-Type: text/plain\r\n\r\nhi\r\n--other--\r\n"
)
# A preamble, no closing boundary, a part without header.
NO_CLOSE = (
    b"From: a@b.c\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
    b"preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"first=20part caf=C3=A9\r\n--b1\r\n\r\nsecond part, no header\r\n"
)
# multipart/digest (parts default to message/rfc822), every extension field.
DIGEST = (
    b'From: d@e.f\r\nContent-Type: multipart/digest; boundary="dd"\r\n\r\n'
    b"--dd\r\n\r\nFrom: x@y.z\r\nSubject: digest one\r\n\r\nbody one\r\n"
    b"--dd\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: base64\r\n"
    b"Content-Language: de, en\r\nContent-Location: http://x/y\r\nContent-ID: <cid1@x>\r\n"
    b"Content-Description: a description\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n\r\nR3L832UK\r\n"
    b"--dd--\r\nepilogue\r\n"
)
# RFC 2231 parameters, one continued.
RFC2231 = (
    b"From: a@b.c\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n"
    b"Content-Type: application/pdf; name*=utf-8''%C3%A9t%C3%A9.pdf\r\n"
    b"Content-Disposition: attachment; filename*0*=utf-8''%C3%A9t; filename*1=\"e.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--zz--\r\n"
)
# Groups, a mailbox without domain, a quoted name with quotes, 8-bit... the odd cases.
ODD = (
    b"Subject: a folded\r\n\tsubject  line\r\n"
    b'From: "Quote \\"me\\"" <q@x.y>, (comment) plain@x.y (Plain Name)\r\n'
    b"To: undisclosed-recipients:;\r\nBcc: =?iso-8859-1?q?J=F6rg?= <j@x.y>\r\nSender: nobody\r\n"
    b"Message-ID: <a@b>  <c@d>\r\nDate: not a date\r\n\r\nx"
)
# Raw 8-bit (UTF-8) header values, as RFC 6532 allows.
EIGHT_BIT = "From: Zoë <zoe@example.org>\r\nSubject: Grüße\r\nTo: <bob@example.net>\r\n\r\nHallo\r\n".encode()


MESSAGES = {
    "simple": simple,
    "alternative": alternative,
    "nested": nested,
    "base64_text": base64_text,
    "related": related,
    "bare": lambda: BARE,
    "header_only": lambda: HEADER_ONLY,
    "bad_boundary": lambda: BAD_BOUNDARY,
    "no_close": lambda: NO_CLOSE,
    "digest": lambda: DIGEST,
    "rfc2231": lambda: RFC2231,
    "eight_bit": lambda: EIGHT_BIT,
}

# (ENVELOPE, BODYSTRUCTURE, BODY) as Dovecot answers them for each message above.
DOVECOT = {
    'related': (
        b'(NIL "Related" (("=?utf-8?q?M=C3=BCller=2C_J=C3=B6rg?=" NIL "j" "example.de")) (("=?utf-8?q?M=C3=BCller=2C_J=C3=B6rg?=" NIL "j" "example.de")) (("=?utf-8?q?M=C3=BCller=2C_J=C3=B6rg?=" NIL "j" "example.de")) ((NIL NIL "a" "b.c")) NIL NIL NIL NIL)',
        b'((("text" "plain" ("charset" "utf-8" "format" "flowed" "delsp" "yes") NIL NIL "7bit" 12 1 NIL NIL NIL NIL)(("text" "html" ("charset" "utf-8") NIL NIL "7bit" 33 1 NIL NIL NIL NIL)("image" "png" NIL "<img1@x>" NIL "base64" 14 NIL ("attachment" ("filename*" "utf-8\'\'Bild%20%C3%A4.png")) NIL NIL) "related" ("boundary" "r") NIL NIL NIL) "alternative" ("boundary" "a") NIL NIL NIL)("application" "pdf" NIL NIL NIL "base64" 14 NIL ("attachment" ("filename*" "utf-8\'\'Rechnung%20%E2%80%93%20M%C3%A4rz.pdf")) NIL NIL) "mixed" ("boundary" "o") NIL NIL NIL)',
        b'((("text" "plain" ("charset" "utf-8" "format" "flowed" "delsp" "yes") NIL NIL "7bit" 12 1)(("text" "html" ("charset" "utf-8") NIL NIL "7bit" 33 1)("image" "png" NIL "<img1@x>" NIL "base64" 14) "related") "alternative")("application" "pdf" NIL NIL NIL "base64" 14) "mixed")',
    ),
    'simple': (
        b'("Wed, 02 Dec 2026 00:35:00 +0100" "Hello there" (("Alice Example" NIL "alice" "example.org")) (("Alice Example" NIL "alice" "example.org")) (("Alice Example" NIL "alice" "example.org")) ((NIL NIL "bob" "example.net")("Carol, C." NIL "carol" "example.com")) ((NIL NIL "Team" NIL)(NIL NIL "dave" "example.org")(NIL NIL "erin" "example.org")(NIL NIL NIL NIL)) NIL NIL "<one@example.org>")',
        b'("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 26 2 NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 26 2)',
    ),
    'alternative': (
        b'("Tue, 01 Dec 2026 23:59:59 -0800" "=?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=" (("=?utf-8?q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.de")) (("=?utf-8?q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.de")) ((NIL NIL "list" "example.de")) (("=?utf-8?q?Zo=C3=AB?=" NIL "zoe" "example.org")) NIL NIL "<one@example.org>" "<two@example.de>")',
        b'((("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 31 2 NIL NIL NIL NIL)("text" "html" ("charset" "utf-8") NIL NIL "8bit" 48 1 NIL NIL NIL NIL) "alternative" ("boundary" "alt-boundary") NIL NIL NIL)("application" "octet-stream" NIL NIL NIL "base64" 14016 NIL ("attachment" ("filename" "data.bin")) NIL NIL)("text" "csv" ("charset" "utf-8") NIL NIL "7bit" 16 2 NIL ("attachment" ("filename*" "utf-8\'\'t%C3%A4ble.csv")) NIL NIL) "mixed" ("boundary" "outer-boundary") NIL NIL NIL)',
        b'((("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 31 2)("text" "html" ("charset" "utf-8") NIL NIL "8bit" 48 1) "alternative")("application" "octet-stream" NIL NIL NIL "base64" 14016)("text" "csv" ("charset" "utf-8") NIL NIL "7bit" 16 2) "mixed")',
    ),
    'nested': (
        b'(NIL "Fwd: inner" ((NIL NIL "outer" "example.org")) ((NIL NIL "outer" "example.org")) ((NIL NIL "outer" "example.org")) ((NIL NIL "y" "example.org")) NIL NIL NIL NIL)',
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 14 1 NIL NIL NIL NIL)("message" "rfc822" NIL NIL NIL "8bit" 1460 ("Mon, 30 Nov 2026 10:00:00 +0000" "Inner =?utf-8?q?=C3=BCbject?=" ((NIL NIL "inner" "example.org")) ((NIL NIL "inner" "example.org")) ((NIL NIL "inner" "example.org")) ((NIL NIL "x" "example.org")) NIL NIL NIL NIL) (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 26 2 NIL NIL NIL NIL)("image" "png" NIL NIL NIL "base64" 962 NIL ("attachment" ("filename" "a.png")) NIL NIL) "mixed" ("boundary" "inner-boundary") NIL NIL NIL) 35 NIL ("attachment" NIL) NIL NIL) "mixed" ("boundary" "outer-boundary") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 14 1)("message" "rfc822" NIL NIL NIL "8bit" 1460 ("Mon, 30 Nov 2026 10:00:00 +0000" "Inner =?utf-8?q?=C3=BCbject?=" ((NIL NIL "inner" "example.org")) ((NIL NIL "inner" "example.org")) ((NIL NIL "inner" "example.org")) ((NIL NIL "x" "example.org")) NIL NIL NIL NIL) (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 26 2)("image" "png" NIL NIL NIL "base64" 962) "mixed") 35) "mixed")',
    ),
    'base64_text': (
        b'("Sun, 29 Nov 2026 08:00:00 +0100" "=?utf-8?b?w6l0w6kgw6A=?= Paris" (("=?utf-8?q?Fran=C3=A7ois?=" NIL "francois" "example.fr")) (("=?utf-8?q?Fran=C3=A7ois?=" NIL "francois" "example.fr")) (("=?utf-8?q?Fran=C3=A7ois?=" NIL "francois" "example.fr")) ((NIL NIL "alice" "example.org")) NIL NIL NIL NIL)',
        b'(("text" "plain" ("charset" "iso-8859-1") NIL NIL "base64" 152 2 NIL NIL NIL NIL)("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 46 1 NIL ("inline" NIL) NIL NIL) "mixed" ("boundary" "b64-boundary") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "iso-8859-1") NIL NIL "base64" 152 2)("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 46 1) "mixed")',
    ),
    'bare': (
        b'(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 29 2 NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 29 2)',
    ),
    'header_only': (
        b'(NIL "only a header" ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) NIL NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)',
    ),
    'bad_boundary': (
        b'(NIL NIL ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) NIL NIL NIL NIL NIL)',
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" ("boundary" "nope") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "mixed")',
    ),
    'no_close': (
        b'(NIL NIL ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) NIL NIL NIL NIL NIL)',
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 22 0 NIL NIL NIL NIL)("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 24 1 NIL NIL NIL NIL) "mixed" ("boundary" "b1") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 22 0)("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 24 1) "mixed")',
    ),
    'digest': (
        b'(NIL NIL ((NIL NIL "d" "e.f")) ((NIL NIL "d" "e.f")) ((NIL NIL "d" "e.f")) NIL NIL NIL NIL NIL)',
        b'(("message" "rfc822" NIL NIL NIL "7bit" 44 (NIL "digest one" ((NIL NIL "x" "y.z")) ((NIL NIL "x" "y.z")) ((NIL NIL "x" "y.z")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0 NIL NIL NIL NIL) 3 NIL NIL NIL NIL)("text" "plain" ("charset" "iso-8859-1") "<cid1@x>" "a description" "base64" 8 0 "Q2hlY2sgSW50ZWdyaXR5IQ==" NIL ("de" "en") "http://x/y") "digest" ("boundary" "dd") NIL NIL NIL)',
        b'(("message" "rfc822" NIL NIL NIL "7bit" 44 (NIL "digest one" ((NIL NIL "x" "y.z")) ((NIL NIL "x" "y.z")) ((NIL NIL "x" "y.z")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0) 3)("text" "plain" ("charset" "iso-8859-1") "<cid1@x>" "a description" "base64" 8 0) "digest")',
    ),
    'rfc2231': (
        b'(NIL NIL ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) ((NIL NIL "a" "b.c")) NIL NIL NIL NIL NIL)',
        b'(("application" "pdf" ("name*" "utf-8\'\'%C3%A9t%C3%A9.pdf") NIL NIL "base64" 4 NIL ("attachment" ("filename*" "utf-8\'\'%C3%A9te.pdf")) NIL NIL) "mixed" ("boundary" "zz") NIL NIL NIL)',
        b'(("application" "pdf" ("name*" "utf-8\'\'%C3%A9t%C3%A9.pdf") NIL NIL "base64" 4) "mixed")',
    ),
    'eight_bit': (
        b'(NIL {7}\r\nGr\xc3\xbc\xc3\x9fe (({4}\r\nZo\xc3\xab NIL "zoe" "example.org")) (({4}\r\nZo\xc3\xab NIL "zoe" "example.org")) (({4}\r\nZo\xc3\xab NIL "zoe" "example.org")) ((NIL NIL "bob" "example.net")) NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1 NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1)',
    ),
}


def parse(data: bytes) -> MessageParts:
    return MessageParts.read(io.BytesIO(data))


def info(data: bytes, **kw) -> MessageInfo:
    values = dict(uid=7, size=len(data), flags=frozenset(), internal_date=1_796_171_514.0, modseq=42)
    values.update(kw)
    return MessageInfo(**values)


def fetch(data: bytes, items, **kw) -> bytes:
    request = FetchRequest.parse(items if isinstance(items, list) else [items])
    source = io.BytesIO(data)
    parts = MessageParts.read(source) if request.needs_structure else None
    kw.setdefault("add_uid", False)
    kw.setdefault("add_modseq", False)
    return render(request, 3, info(data), source, parts, **kw).value()


@pytest.mark.parametrize("name", sorted(DOVECOT))
def test_envelope_and_bodystructure_are_dovecots(name):
    """ENVELOPE, BODYSTRUCTURE and BODY are byte for byte what Dovecot answers for the same message."""
    parts = parse(MESSAGES[name]())
    envelope, structure, body = DOVECOT[name]
    assert parts.envelope() == envelope
    assert parts.bodystructure(True) == structure
    assert parts.bodystructure(False) == body


def test_odd_addresses_and_where_we_differ_from_dovecot():
    """Groups, a mailbox without domain and quotes in a name come out as Dovecot's; the folded subject keeps its blanks.

    Dovecot answers ``{21} a folded subject line`` (white space squeezed for
    humans), which RFC 3501 does not ask: we send the unfolded value.  Of
    the two comments around ``plain@x.y`` it names the address after the
    last; email.utils joins them.
    """
    assert parse(ODD).envelope() == (
        b'("not a date" "a folded\tsubject  line" (({10}\r\nQuote "me" NIL "q" "x.y")("comment Plain Name" NIL "plain" "x.y")) '
        b'((NIL NIL "nobody" "MISSING_DOMAIN")) (({10}\r\nQuote "me" NIL "q" "x.y")("comment Plain Name" NIL "plain" "x.y")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL (("=?iso-8859-1?q?J=F6rg?=" NIL "j" "x.y")) '
        b'NIL "<a@b>  <c@d>")'
    )


# FETCH item -> Dovecot's answer (without the FLAGS it adds).
NESTED_SECTIONS = [
    ('BODY.PEEK[1]', b'BODY[1] {14}\r\nsee attached\r\n'),
    ('BODY.PEEK[1.MIME]', b'BODY[1.MIME] {78}\r\nContent-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n\r\n'),
    ('BODY.PEEK[2.MIME]', b'BODY[2.MIME] {117}\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\nMIME-Version: 1.0\r\nContent-Disposition: attachment\r\n\r\n'),
    ('BODY.PEEK[2.HEADER]', b'BODY[2.HEADER] {202}\r\nFrom: inner@example.org\r\nTo: x@example.org\r\nSubject: Inner =?utf-8?q?=C3=BCbject?=\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="inner-boundary"\r\n\r\n'),
    ('BODY.PEEK[2.TEXT]<0.40>', b'BODY[2.TEXT]<0> {40}\r\n--inner-boundary\r\nContent-Type: text/pla'),
    ('BODY.PEEK[2.1]', b'BODY[2.1] {26}\r\nthe inner body\r\nline two\r\n'),
    ('BODY.PEEK[2.2.MIME]', b'BODY[2.2.MIME] {132}\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename="a.png"\r\nMIME-Version: 1.0\r\n\r\n'),
    ('BODY.PEEK[2.3]', b'BODY[2.3] {0}\r\n'),
    ('BODY.PEEK[1.1]', b'BODY[1.1] {14}\r\nsee attached\r\n'),
    ('BODY.PEEK[1.HEADER]', b'BODY[1.HEADER] {0}\r\n'),
    ('BODY.PEEK[HEADER.FIELDS (From Subject X-None)]', b'BODY[HEADER.FIELDS (FROM SUBJECT X-NONE)] {48}\r\nFrom: outer@example.org\r\nSubject: Fwd: inner\r\n\r\n'),
    ('BODY.PEEK[HEADER.FIELDS.NOT (From Subject Content-Type)]', b'BODY[HEADER.FIELDS.NOT (FROM SUBJECT CONTENT-TYPE)] {40}\r\nTo: y@example.org\r\nMIME-Version: 1.0\r\n\r\n'),
    ('BODY.PEEK[2.HEADER.FIELDS (subject)]', b'BODY[2.HEADER.FIELDS (SUBJECT)] {42}\r\nSubject: Inner =?utf-8?q?=C3=BCbject?=\r\n\r\n'),
    ('BODY.PEEK[]<10.20>', b'BODY[]<10> {20}\r\nr@example.org\r\nTo: y'),
    ('BODY.PEEK[]<99999.20>', b'BODY[]<99999> {0}\r\n'),
    ('BODY.PEEK[TEXT]<0.5>', b'BODY[TEXT]<0> {5}\r\n--out'),
    ('RFC822.HEADER', b'RFC822.HEADER {144}\r\nFrom: outer@example.org\r\nTo: y@example.org\r\nSubject: Fwd: inner\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="outer-boundary"\r\n\r\n'),
    ('BODY.PEEK[HEADER]', b'BODY[HEADER] {144}\r\nFrom: outer@example.org\r\nTo: y@example.org\r\nSubject: Fwd: inner\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="outer-boundary"\r\n\r\n'),
    ('BODY.PEEK[2.1.1]', b'BODY[2.1.1] {26}\r\nthe inner body\r\nline two\r\n'),
]
ALTERNATIVE_SECTIONS = [
    ('BODY.PEEK[1.1]', b'BODY[1.1] {31}\r\nHallo Zo\xc3\xab,\r\nsch\xc3\xb6ne Gr\xc3\xbc\xc3\x9fe.\r\n'),
    ('BODY.PEEK[1.2.MIME]', b'BODY[1.2.MIME] {96}\r\nContent-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\nMIME-Version: 1.0\r\n\r\n'),
    ('BODY.PEEK[3]', b'BODY[3] {16}\r\ncol1,col2\r\n1,2\r\n'),
    ('BODY.PEEK[2]<0.30>', b'BODY[2]<0> {30}\r\nAAECAwQFBgcICQoLDA0ODxAREhMUFR'),
    ('BODY.PEEK[1]', b'BODY[1] {307}\r\n--alt-boundary\r\nContent-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\nHallo Zo\xc3\xab,\r\nsch\xc3\xb6ne Gr\xc3\xbc\xc3\x9fe.\r\n\r\n--alt-boundary\r\nContent-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\nMIME-Version: 1.0\r\n\r\n<p>Hallo Zo&euml;, <b>sch\xc3\xb6ne</b> Gr\xc3\xbc\xc3\x9fe.</p>\r\n\r\n--alt-boundary--\r\n'),
]


@pytest.mark.parametrize(("item", "expected"), NESTED_SECTIONS)
def test_sections_of_a_nested_message_are_dovecots(item, expected):
    """Sections (HEADER, HEADER.FIELDS[.NOT], TEXT, MIME, part numbers into message/rfc822, partials) are byte-exact."""
    assert fetch(nested(), item) == b"* 3 FETCH (" + expected + b")\r\n"


@pytest.mark.parametrize(("item", "expected"), ALTERNATIVE_SECTIONS)
def test_sections_of_alternative_with_attachments_are_dovecots(item, expected):
    """Parts of a multipart inside a multipart, and a partial of a base64 attachment, are byte-exact."""
    assert fetch(alternative(), item) == b"* 3 FETCH (" + expected + b")\r\n"


def test_whole_message_needs_no_structure_and_partial_label_has_the_origin():
    """BODY[] and RFC822 are the whole file without parsing it; a partial is labelled with its origin only."""
    data = simple()
    request = FetchRequest.parse(["BODY.PEEK[]<0.10>"])
    assert request.needs_message and not request.needs_structure and not request.sets_seen
    assert fetch(data, "BODY.PEEK[]<0.10>") == b"* 3 FETCH (BODY[]<0> {10}\r\n" + data[:10] + b")\r\n"
    assert fetch(data, "RFC822") == b"* 3 FETCH (RFC822 {%d}\r\n" % len(data) + data + b")\r\n"
    assert fetch(data, "BODY[]<%d.5>" % (len(data) - 2)) == b"* 3 FETCH (BODY[]<%d> {2}\r\n\r\n)\r\n" % (len(data) - 2)


def test_simple_items_and_the_ones_the_server_adds():
    """FLAGS, UID, INTERNALDATE, RFC822.SIZE and MODSEQ come from MessageInfo; UID, FLAGS and MODSEQ are added when asked."""
    data = simple()
    flags = frozenset({"$Junk", "\\Seen", "\\Answered"})
    request = FetchRequest.parse(["FAST"])
    assert not request.needs_message and not request.sets_seen and not request.wants_modseq
    out = render(request, 5, info(data, flags=flags), None, None, add_uid=True, add_modseq=True).value()
    assert out == (
        b'* 5 FETCH (UID 7 FLAGS (\\Answered \\Seen $Junk) INTERNALDATE " 2-Dec-2026 00:31:54 +0000" '
        b"RFC822.SIZE %d MODSEQ (42))\r\n" % len(data)
    )
    request = FetchRequest.parse([["UID", "BODY[TEXT]"]])
    assert request.sets_seen and request.needs_structure
    out = render(request, 5, info(data, flags=flags), io.BytesIO(data), parse(data), add_uid=True, add_modseq=False,
                 flags_changed=True).value()
    body = data[data.index(b"\r\n\r\n") + 4:]
    # UID once though asked and added; FLAGS because \\Seen was just set (RFC 3501 6.4.5).
    assert out == b"* 5 FETCH (UID 7 BODY[TEXT] {%d}\r\n%s FLAGS (\\Answered \\Seen $Junk))\r\n" % (len(body), body)
    out = render(FetchRequest.parse(["FLAGS"]), 1, info(data), None, None, add_uid=False, add_modseq=False, recent=True)
    assert out.value() == b"* 1 FETCH (FLAGS (\\Recent))\r\n"


def test_internal_date_and_flags_format():
    """INTERNALDATE is RFC 3501's date-time with a space-padded day; flags list system flags first."""
    assert format_internal_date(837_571_465) == "17-Jul-1996 02:44:25 +0000"
    assert format_internal_date(0) == " 1-Jan-1970 00:00:00 +0000"
    assert format_flags(frozenset({"b", "\\Seen", "A"})) == "(\\Seen A b)"
    assert format_flags(frozenset()) == "()"


@pytest.mark.parametrize(
    ("tokens", "labels"),
    [
        (["ALL"], ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]),
        (["full"], ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]),
        ([["uid", "flags", "UID"]], ["UID", "FLAGS"]),
        (["UID", "RFC822.HEADER", "body.peek[1.mime]"], ["UID", "RFC822.HEADER", "BODY[1.MIME]"]),
        ([["MODSEQ"], ["CHANGEDSINCE", "12", "VANISHED"]], ["MODSEQ"]),
        (["BODY.PEEK[HEADER.FIELDS (Subject from)]<5.10>"], ["BODY[HEADER.FIELDS (SUBJECT FROM)]<5>"]),
    ],
)
def test_fetch_items_parse(tokens, labels):
    """Macros, lists, the server's flat atoms, modifiers and sections parse to the items they name."""
    request = FetchRequest.parse(tokens)
    assert [item.label for item in request.items] == labels


def test_fetch_request_says_what_the_server_must_do():
    """needs_message, needs_structure, sets_seen and wants_modseq follow the items asked."""
    assert not FetchRequest.parse(["FLAGS"]).needs_message
    assert FetchRequest.parse(["ENVELOPE"]).needs_structure
    assert FetchRequest.parse(["RFC822.HEADER"]).needs_structure
    assert not FetchRequest.parse(["RFC822.HEADER"]).sets_seen
    assert FetchRequest.parse(["RFC822.TEXT"]).sets_seen
    assert FetchRequest.parse(["RFC822"]).sets_seen and not FetchRequest.parse(["RFC822"]).needs_structure
    assert not FetchRequest.parse(["RFC822.SIZE"]).needs_message
    assert FetchRequest.parse([["FLAGS"], ["CHANGEDSINCE", "5"]]).changed_since == 5
    assert FetchRequest.parse([["FLAGS"], ["CHANGEDSINCE", "5"]]).wants_modseq
    assert not FetchRequest.parse(["FLAGS"]).wants_modseq


@pytest.mark.parametrize(
    "tokens",
    [
        [],
        [[]],
        ["NOPE"],
        ["BODY[HEADER.FIELDS]"],
        ["BODY[HEADER.FIELDS ()]"],
        ["BODY[1.0]"],
        ["BODY[0]"],
        ["BODY[TEXTS]"],
        ["BODY[MIME]"],
        ["BODY[]<1>"],
        ["BODY[]<1.0>"],
        ["BODY[]<x.1>"],
        ["BODY[1"],
        ["BINARY[1]"],
        [[b"FLAGS"]],
        [["FLAGS"], ["VANISHED"]],
        [["FLAGS"], ["CHANGEDSINCE", "x"]],
        [["FLAGS"], "x", "y"],
    ],
)
def test_bad_fetch_items_are_value_errors(tokens):
    """What is not a FETCH item raises ValueError (the server answers BAD with its text)."""
    with pytest.raises(ValueError):
        FetchRequest.parse(tokens)


def test_section_spec_round_trip():
    """A section reads back as what it names, in upper case."""
    spec = SectionSpec.parse("1.2.header.fields.not (a B)")
    assert (spec.part, spec.kind, spec.fields) == ((1, 2), "HEADER.FIELDS.NOT", ("A", "B"))
    assert str(spec) == "1.2.HEADER.FIELDS.NOT (A B)"
    assert str(SectionSpec.parse("")) == ""
    assert SectionSpec.parse('HEADER.FIELDS ("Subject" from)').fields == ("SUBJECT", "FROM")
    with pytest.raises(ValueError):
        SectionSpec.parse('HEADER.FIELDS ("a b")')


def test_imap_strings():
    """Strings are quoted when safe, literals with CR, LF, quotes, backslashes, 8-bit or length; NIL when empty."""
    assert imap_string("abc") == b'"abc"'
    assert imap_string(b'a"b') == b'{3}\r\na"b'
    assert imap_string(b"a\\b") == b"{3}\r\na\\b"
    assert imap_string("é") == b"{2}\r\n\xc3\xa9"
    assert imap_string(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert imap_string(b"x" * 2000).startswith(b"{2000}\r\n")
    assert nstring(b"") == b"NIL" and nstring(None) == b"NIL" and nstring("a") == b'"a"'


def test_header_values_are_decoded_for_search():
    """header_values unfolds and decodes RFC 2047 words; raw UTF-8 reads as text; a missing field is empty."""
    parts = parse(base64_text())
    assert parts.header_values("subject") == ["été à Paris"]
    assert parts.header_values("FROM") == ["François <francois@example.fr>"]
    assert parts.header_values("cc") == []
    assert parse(EIGHT_BIT).header_values("subject") == ["Grüße"]
    assert parse(ODD).header_values("Subject") == ["a folded\tsubject  line"]
    assert str(parts.sent_date()) == "2026-11-29"
    assert parse(ODD).sent_date() is None


def test_body_search_decodes_base64_quoted_printable_and_charsets():
    """SEARCH BODY finds text inside base64 (iso-8859-1) and quoted-printable (utf-8) parts, not in headers."""
    data = base64_text()
    parts = parse(data)
    source = io.BytesIO(data)
    assert parts.body_contains(source, "TRÈS CHAUD")
    assert parts.body_contains(source, "brûlée")
    assert not parts.body_contains(source, "Paris est")
    assert not parts.body_contains(source, "francois@example.fr")
    assert parts.text_contains(source, "francois@example.fr")
    assert parts.text_contains(source, "brûlée")
    assert not parts.text_contains(source, "absent")
    nested_data = nested()
    nested_parts = parse(nested_data)
    # As Dovecot: BODY searches no header, TEXT every one (MIME parts', the encapsulated message's).
    assert not nested_parts.body_contains(io.BytesIO(nested_data), "inner übject")
    assert nested_parts.text_contains(io.BytesIO(nested_data), "inner übject")
    assert not nested_parts.body_contains(io.BytesIO(nested_data), "a.png")
    assert nested_parts.text_contains(io.BytesIO(nested_data), "a.png")
    assert nested_parts.body_contains(io.BytesIO(nested_data), "LINE TWO")
    assert not nested_parts.body_contains(io.BytesIO(nested_data), "PNGDATA")
    assert not nested_parts.text_contains(io.BytesIO(nested_data), "PNGDATA")


@pytest.mark.parametrize("charset", ["zlib_codec", "base64", "rot13", "utf-16", "a\x00b", "no-such-charset", ""])
def test_body_search_with_odd_charsets(charset):
    """A charset that is no text encoding, unknown, or fails without a BOM is read as UTF-8, never run as a codec."""
    data = b'Content-Type: text/plain; charset="' + charset.encode() + b'"\r\n\r\nhello secret\r\n'
    parts = parse(data)
    assert parts.body_contains(io.BytesIO(data), "SECRET")
    assert not parts.body_contains(io.BytesIO(data), "public")


def test_body_search_finds_text_across_read_boundaries(tmp_path):
    """A word that straddles two 64 KiB reads, raw or in base64, is still found."""
    filler = "x" * (64 * 1024 - 3)
    m = EmailMessage(policy=email.policy.SMTP)
    m["Subject"] = "big"
    m.set_content(filler + "NEEDLE" + "\n", cte="base64")
    m.add_attachment(filler + "HAYSTACK\n", subtype="plain", cte="7bit")
    m.set_boundary("bb")
    data = m.as_bytes()
    parts = parse(data)
    assert parts.body_contains(io.BytesIO(data), "needle")
    assert parts.body_contains(io.BytesIO(data), "haystack")
    assert not parts.body_contains(io.BytesIO(data), "needles")


def _write_big(path, header: bytes, line: bytes, size: int, trailer: bytes = b"") -> int:
    with open(path, "wb") as f:
        f.write(header)
        written = len(header)
        block = line * (65536 // len(line))
        while written < size:
            f.write(block)
            written += len(block)
        f.write(trailer)
        return written + len(trailer)


def test_a_20_mb_message_is_read_and_fetched_in_little_memory(tmp_path):
    """Reading the structure of a 20 MB message, and streaming its BODY[], keeps the peak of Python memory under 1 MiB."""
    path = tmp_path / "big.eml"
    header = EmailMessage(policy=email.policy.SMTP)
    header["Subject"] = "big"
    header["Content-Type"] = "text/plain"
    size = _write_big(path, header.as_bytes(), b"0123456789" * 7 + b"abcd\r\n", 20_000_000)
    request = FetchRequest.parse(["BODY.PEEK[TEXT]"])
    tracemalloc.start()
    try:
        with open(path, "rb") as source:
            parts = MessageParts.read(source)
            response = render(request, 1, info(b"", size=size), source, parts, add_uid=False, add_modseq=False)
            total = 0
            biggest = 0
            for chunk in response.chunks():
                total += len(chunk)
                biggest = max(biggest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parts.root.size == size - len(header.as_bytes())
    assert parts.root.body_lines == parts.root.size // 76
    assert total > size - 100 and biggest <= 64 * 1024
    assert peak < 1024 * 1024, peak


def test_a_20_mb_attachment_in_a_multipart_is_read_in_little_memory(tmp_path):
    """A 20 MB base64 attachment inside multipart/mixed is walked line by line, and its structure is right."""
    path = tmp_path / "attached.eml"
    head = (
        b"From: a@b.c\r\nContent-Type: multipart/mixed; boundary=xyz\r\n\r\n--xyz\r\n\r\nhello\r\n"
        b"--xyz\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    size = _write_big(path, head, b"QUJD" * 19 + b"\r\n", 20_000_000, b"--xyz--\r\n")
    tracemalloc.start()
    try:
        with open(path, "rb") as source:
            parts = MessageParts.read(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    attachment = parts.root.children[1]
    assert attachment.size == size - len(head) - len(b"\r\n--xyz--\r\n")
    assert parts.bodystructure(False).endswith(b'("application" "zip" NIL NIL NIL "base64" %d) "mixed")' % attachment.size)
    assert peak < 1024 * 1024, peak


# Not a performance claim (those are in benchmarks/): a guard against the
# quadratic parsing these inputs cost before (30 to 45 s each), with room for
# a loaded machine (these take milliseconds).
HANG = 10.0


@pytest.mark.parametrize(
    "field",
    [
        '"a' * 30000,
        "(" * 30000,
        "<" * 60000,
        "=?utf-8?q?a?= " * 4000 + "<a@b>",
        "a@b," * 16000,
        "Team: " + '"a' * 30000 + ";",
        "Team: " + "(" * 30000 + ";",
    ],
    ids=["quotes", "comments", "angles", "encoded-words", "commas", "group-quotes", "group-comments"],
)
def test_hostile_address_fields_cost_little(field):
    """An address field built to make a parser slow (quadratic quoting, deep comments) costs well under a second."""
    data = f"From: a@b.c\r\nTo: {field}\r\nCc: {field}\r\n\r\nx".encode()
    started = time.monotonic()
    envelope = parse(data).envelope()
    assert envelope.startswith(b"(NIL NIL ((NIL NIL \"a\" \"b.c\"))")
    assert time.monotonic() - started < HANG


@pytest.mark.parametrize("subject", ["=?utf-8?q?a" * 10000, ("=?utf-8?q?a" * 90 + " ") * 100, "=?utf-8?q?a?= " * 10000])
def test_hostile_encoded_words_cost_little(subject):
    """Encoded-words that open and never close (quadratic for email.header) are decoded for SEARCH in bounded time."""
    data = f"Subject: {subject}\r\n\r\nx".encode()
    started = time.monotonic()
    parts = parse(data)
    assert parts.header_values("subject")[0].startswith(("=?utf-8?q?a", "a"))
    assert not parts.text_contains(io.BytesIO(data), "zz")
    assert time.monotonic() - started < HANG


def test_a_long_list_of_addresses_is_read_in_full():
    """2,000 recipients (70 kB, a group too) are all in ENVELOPE, quickly."""
    to = ", ".join(f'"User {i}" <user{i}@example.org>' for i in range(2000))
    data = f"To: {to}\r\nCc: List: {to};\r\n\r\nx".encode()
    started = time.monotonic()
    envelope = parse(data).envelope()
    # The group's name is lost past MAX_GROUP_LIST, its members are not.
    assert envelope.count(b'"example.org"') == 4000
    assert time.monotonic() - started < HANG


def test_limits_on_parts_and_header_size():
    """Beyond MAX_PARTS parts the boundaries are text, and a header beyond MAX_HEADER is cut, its offsets kept."""
    many = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n" + b"--q\r\n\r\nx\r\n" * (MAX_PARTS + 50) + b"--q--\r\n"
    parts = parse(many)
    assert len(parts.root.children) == MAX_PARTS - 1
    assert parts.bodystructure(False).count(b'("text"') == MAX_PARTS - 1
    long_header = b"Subject: s\r\nX-Long: " + b"y" * (MAX_HEADER + 1000) + b"\r\n\r\nbody\r\n"
    parts = parse(long_header)
    assert len(parts.root.header) == MAX_HEADER
    assert parts.root.header_end == len(long_header) - len(b"body\r\n")
    assert fetch(long_header, "BODY.PEEK[TEXT]") == b"* 3 FETCH (BODY[TEXT] {6}\r\nbody\r\n)\r\n"
    assert parts.header_values("subject") == ["s"]


def test_bare_lf_and_deep_nesting_do_not_break_the_walk():
    """LF-only lines are lines too, and multiparts nested 200 deep end without error."""
    lf = b"Subject: lf\nContent-Type: multipart/mixed; boundary=a\n\n--a\n\none\ntwo\n--a--\n"
    parts = parse(lf)
    assert parts.bodystructure(False) == b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1) "mixed")'
    deep = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(200))
    parts = parse(deep + b"\r\nleaf\r\n")
    assert parts.bodystructure(True).startswith(b"(((((")


def test_encoded_or_too_deep_messages_are_not_read_but_keep_the_grammar():
    """A base64 message/rfc822 gets an empty envelope and body, as Dovecot's; message/global stays a basic part;
    1,200 nested messages stop at MAX_DEPTH instead of recursing without end."""
    data = (
        b"From: a@b.c\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: message/rfc822\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogeA0KDQpib2R5DQo=\r\n--q\r\nContent-Type: message/global\r\n\r\n"
        b"Subject: g\r\n\r\nbody\r\n--q--\r\n"
    )
    # Dovecot says 30 octets and 1 line for the first part, counting the line break that belongs to the boundary.
    assert parse(data).bodystructure(True) == (
        b'(("message" "rfc822" NIL NIL NIL "base64" 28 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) 0 NIL NIL NIL NIL)'
        b'("message" "global" NIL NIL NIL "7bit" 18 NIL NIL NIL NIL) "mixed" ("boundary" "q") NIL NIL NIL)'
    )
    deep = b"Content-Type: message/rfc822\r\n\r\n" * 1200 + b"Subject: x\r\n\r\nbody\r\n"
    parts = parse(deep)
    assert parts.bodystructure(False).count(b'"rfc822"') == 65
    assert fetch(deep, "BODY.PEEK[" + ".".join(["1"] * 70) + "]").endswith(b"Subject: x\r\n\r\nbody\r\n)\r\n")


CASES = (
    b'From: a@b.c\r\nMIME-Version: 1.0\r\nContent-Type: MULTIPART/Mixed; Boundary="ZZ"; Foo=Bar\r\n\r\n--ZZ\r\n'
    b"Content-Type: TEXT/PLAIN; CHARSET=UTF-8; format=flowed\r\nContent-Transfer-Encoding: BASE64\r\n"
    b'Content-Disposition: INLINE; FILENAME="A B.txt"; size=12\r\nContent-Language: EN\r\n\r\naGVsbG8=\r\n--ZZ\r\n'
    b"Content-Type: application/x-thing; name*=utf-8''%41; b=c\r\nContent-Disposition: attachment\r\n"
    b"Content-ID: <x@y>\r\n\r\nAAA\r\n--ZZ\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--ZZ\r\nContent-Type: text\r\n\r\n"
    b"broken type\r\n--ZZ\r\nContent-Type: image/\r\n\r\nno subtype\r\n--ZZ--\r\n"
)


def test_case_as_written_and_where_we_differ_from_dovecot():
    """Types, subtypes, encodings and dispositions keep the header's case, a text part gets charset us-ascii, and a
    language is always a list, as Dovecot answers.

    Dovecot also keeps the case of parameter names ("CHARSET", "Boundary")
    and writes unreadable types as ("text" "") and ("" ""); email.message
    gives the names in lower case (they are case-insensitive, RFC 2045 5.1),
    and RFC 2045 5.2 makes an unreadable type text/plain; charset=us-ascii.
    """
    assert parse(CASES).bodystructure(True) == (
        b'(("TEXT" "PLAIN" ("charset" "UTF-8" "format" "flowed") NIL NIL "BASE64" 8 0 NIL '
        b'("INLINE" ("filename" "A B.txt" "size" "12")) ("EN") NIL)'
        b"(\"application\" \"x-thing\" (\"b\" \"c\" \"name*\" \"utf-8''A\") \"<x@y>\" NIL \"7bit\" 3 NIL (\"attachment\" NIL) NIL NIL)"
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 8 0 NIL NIL NIL NIL)'
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 11 0 NIL NIL NIL NIL)'
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 0 NIL NIL NIL NIL) '
        b'"Mixed" ("boundary" "ZZ" "foo" "Bar") NIL NIL NIL)'
    )
    # What ties to the case is read without it: the boundary, the encoding, the charset.
    assert parse(CASES).body_contains(io.BytesIO(CASES), "HELLO")


class CountingReader(io.BytesIO):
    """A message file that counts the octets read from it."""

    read_octets = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_octets += len(data)
        return data

    def readline(self, size=-1):
        data = super().readline(size)
        self.read_octets += len(data)
        return data


@pytest.mark.parametrize("name", ["simple", "alternative", "nested", "no_close", "header_only", "digest"])
def test_header_only_read_answers_header_items_alike(name):
    """A header-only read gives the same ENVELOPE, HEADER, HEADER.FIELDS and TEXT as a full one, and refuses the rest."""
    data = MESSAGES[name]()
    full, head = parse(data), MessageParts.read(io.BytesIO(data), header_only=True)
    assert head.envelope() == full.envelope()
    for text in ("HEADER", "TEXT", "HEADER.FIELDS (FROM SUBJECT)", "HEADER.FIELDS.NOT (TO)", ""):
        spec = SectionSpec.parse(text)
        assert head.section(spec).read(io.BytesIO(data)) == full.section(spec).read(io.BytesIO(data))
    assert head.header_values("from") == full.header_values("from")
    assert not head.complete and full.complete
    with pytest.raises(ValueError):
        head.bodystructure(False)
    with pytest.raises(ValueError):
        head.section(SectionSpec.parse("1"))
    with pytest.raises(ValueError):
        head.body_contains(io.BytesIO(data), "x")


def test_header_only_reads_only_the_header():
    """For ENVELOPE and header fields of a 5 MB message, only its first read is made, not the body."""
    data = nested() + b"x" * 5_000_000
    source = CountingReader(data)
    MessageParts.read(source, header_only=True)
    assert source.read_octets < 1000
    assert FetchRequest.parse([["UID", "ENVELOPE", "BODY.PEEK[HEADER.FIELDS (FROM)]", "RFC822.SIZE", "BODY.PEEK[TEXT]"]]).header_only
    assert not FetchRequest.parse([["ENVELOPE", "BODYSTRUCTURE"]]).header_only
    assert not FetchRequest.parse([["ENVELOPE", "BODY.PEEK[1]"]]).header_only
    assert not FetchRequest.parse(["FLAGS"]).header_only
