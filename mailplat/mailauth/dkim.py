"""DKIM (RFC 6376; Ed25519 keys as RFC 8463 defines them): our keys, signing, and verifying others' signatures.

Keys are PEM private keys, RSA (2048 bits when we make them) or Ed25519, in
files only their owner may read; :func:`load_private_key` is the one place
a key file is read and judged (the config check, the signer, the doctor).
Each key's public half is published as a TXT record at
``SELECTOR._domainkey.DOMAIN``: :func:`dns_record` gives its value.  An RSA
record is longer than the 255 octets one TXT string holds; DNS tools split
it into several strings, which verifiers join again.

Signing and verifying use the ``dkimpy`` library.  What to know about it:

- It needs the whole message in memory, as one bytes object: it splits it
  into lines, joins the body again and canonicalizes that (relaxed
  canonicalization rewrites every line).  Signing or verifying a message of
  N bytes briefly holds about 3.5 N more on top of the message itself
  (measured with a 20 MB message: 72 MB more at the peak).  Callers bound
  that by the message size limit and by how many messages they handle at
  once.
- It accepts CRLF and LF line ends alike (it splits on ``\\r?\\n`` and hashes
  CRLF), so the signature of a CRLF message is the one of the same message
  with LF lines.  A lone CR inside a line stays part of that line.  Our
  messages are CRLF; the header it returns is folded with CRLF.
- It is CPU work (an RSA-2048 signature takes about a millisecond, the
  canonicalization and hash of the body about 35 ms per MB), and
  verification asks DNS for the keys: :meth:`Signer.sign` and
  :func:`verify_dkim` are plain blocking functions, to be run in a thread
  (``deferToThread``), never in the reactor.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import email.utils
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Protocol

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailplat.mailauth.names import domain_name
from mailplat.wire.dns import DNS_TIMEOUT, DNSTemporaryError, Resolver

__all__ = [
    "ALGORITHMS",
    "SIGNED_HEADERS",
    "DKIMResult",
    "KeyFileError",
    "Signer",
    "SigningError",
    "dns_record",
    "generate_key",
    "load_private_key",
    "parse_tags",
    "verify_dkim",
]

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
# RFC 8301 3.2: verifiers ignore smaller RSA keys, so we never sign with one.
MIN_RSA_BITS = 1024
# Signatures verified per message (RFC 6376 6.1 lets verifiers limit it):
# each costs a DNS lookup and a pass over the body.
MAX_SIGNATURES = 8

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# RFC 6376 5.4.1's list, less the ones we never want (List-*, Resent-*):
# signed once per occurrence when present, and From once more so that a
# second From added on the way breaks the signature.
SIGNED_HEADERS = (
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To", "References",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
)
OVERSIGNED = ("From",)


def _from_domain(message: bytes) -> str:
    """The domain of the single address in the From header, or ""."""
    end = message.find(b"\r\n\r\n")
    header = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message[: end + 2 if end >= 0 else len(message)])
    values = header.get_all("From") or []
    addresses = email.utils.getaddresses([str(v) for v in values])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return ""
    return addresses[0][1].rpartition("@")[2].strip().lower()


class SigningError(Exception):
    """The message could not be signed (its header section is malformed)."""


def generate_key(path: str, algorithm: str = "rsa") -> str:
    """Write a new private key to ``path`` (mode 0600) and return its DNS record.

    Refuses to overwrite anything: an existing file raises FileExistsError,
    so a published key is never replaced by mistake.  Missing parent folders
    are made, readable by the owner only.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DKIM key algorithm {algorithm!r}; use rsa or ed25519")
    key: PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    # O_EXCL: fail when the name exists, a symbolic link included.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # The umask may have removed bits, never added any; make it exact.
        os.fchmod(fd, 0o600)
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return _record(key)


class KeyFileError(ValueError):
    """A key file that cannot sign: ``problem`` says why, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def load_private_key(path: str, domain: str = "DOMAIN") -> PrivateKey:
    """The RSA (of MIN_RSA_BITS or more) or Ed25519 private key in a PEM file.

    OSError when the file cannot be read; KeyFileError for one that cannot
    sign (its fix names ``domain`` in the command that makes a new key).
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {e}", f"create one with: mailplat --config FILE dkim keygen {domain}")
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise KeyFileError(f"{path} is neither an RSA nor an Ed25519 key", "DKIM signs with rsa-sha256 or ed25519-sha256")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise KeyFileError(f"{path} is a {key.key_size}-bit RSA key; verifiers ignore keys under {MIN_RSA_BITS} bits", f"use {RSA_BITS} bits")
    return key


def dns_record(key_path: str) -> str:
    """The TXT record value to publish for an existing private key."""
    return _record(load_private_key(key_path))


def _record(key: PrivateKey) -> str:
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        # RFC 8463 4.2: the raw 32-octet public key, not a SubjectPublicKeyInfo.
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
    # What every signer publishes and every verifier reads: the DER
    # SubjectPublicKeyInfo (opendkim-genkey's "MIIBIjAN..." form).
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


@dataclass(frozen=True)
class _Key:
    selector: bytes
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes  # in the form dkimpy wants for that algorithm


def _dkimpy_key(key: PrivateKey) -> tuple[bytes, bytes]:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        # dkimpy (through PyNaCl) takes the 32-octet seed, base64-encoded.
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return b"ed25519-sha256", base64.b64encode(seed)
    # dkimpy parses PKCS#1 ("BEGIN RSA PRIVATE KEY") only; the file may be PKCS#8.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return b"rsa-sha256", pem


class KeySettings(Protocol):
    """What the signer reads of a ``[dkim."domain"]`` table (config's DKIMSettings)."""

    @property
    def selector(self) -> str: ...

    @property
    def key(self) -> str: ...


class Signer:
    """Signs mail from the domains of ``[dkim."domain"]``, each with its key.

    Keys are read once, here: a key file replaced later takes effect at the
    next start.
    """

    def __init__(self, keys: Mapping[str, KeySettings]) -> None:
        self._keys: dict[str, _Key] = {}
        for domain, settings in keys.items():
            algorithm, private = _dkimpy_key(load_private_key(settings.key, domain))
            self._keys[domain.strip().rstrip(".").lower()] = _Key(settings.selector.encode("ascii"), algorithm, private)

    def domains(self) -> tuple[str, ...]:
        """The domains there is a key for."""
        return tuple(sorted(self._keys))

    def sign_message(self, source: IO[bytes]) -> bytes:
        """The signature header for a whole message, by the key of its From
        domain (the one DMARC aligns with); b"" when we hold none for it."""
        data = source.read()
        domain = _from_domain(data)
        return self.sign(domain, data) if domain else b""

    def sign(self, domain: str, message: bytes | IO[bytes]) -> bytes:
        """The ``DKIM-Signature`` header (CRLF-terminated, folded) to put on top.

        ``domain`` is the domain of the message's From address; b"" when
        there is no key for it.  ``message`` is the whole message (bytes or
        a binary file, read to its end).  Blocking and CPU-bound: run it in
        a thread.  Raises SigningError for a malformed header section.
        """
        key = self._keys.get(domain.strip().rstrip(".").lower())
        if key is None:
            return b""
        data = message if isinstance(message, bytes) else message.read()
        try:
            signer = dkimpy.DKIM(data, signature_algorithm=key.algorithm, linesep=b"\r\n")
            present = [name.decode("ascii", "replace").lower() for name, _ in signer.headers]
            wanted = {name.lower() for name in SIGNED_HEADERS}
            # Each present header once per occurrence (dkimpy signs instances
            # bottom up), then From again: h= names one From more than exists.
            include = [name for name in present if name in wanted]
            include += [name.lower() for name in OVERSIGNED]
            return signer.sign(
                key.selector,
                domain.strip().rstrip(".").lower().encode("ascii"),
                key.private,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[name.encode("ascii") for name in include],
            )
        except dkimpy.DKIMException as e:
            raise SigningError(f"cannot sign for {domain}: {e}") from e


def parse_tags(text: str) -> dict[str, str]:
    """A tag list (RFC 6376 3.2), the syntax of DKIM key records and of DMARC records (RFC 7489 6.4).

    Names are lower-cased and values stripped of the whitespace around
    them; a tag given twice keeps its first value.  Parts without "=" are
    skipped.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


# --- verifying -------------------------------------------------------------------------


_SELECTOR = re.compile(r"(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)*(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)


@dataclass(frozen=True)
class DKIMResult:
    """One DKIM-Signature's verification."""

    result: str  # pass fail neutral policy temperror permerror
    domain: str = ""  # d=, when it is a domain name
    selector: str = ""  # s=, when it is a selector
    reason: str = ""


class _Quiet(logging.Logger):
    """dkimpy logs every failure at error level: we report them ourselves."""

    def __init__(self) -> None:
        super().__init__("mailplat.dkimpy", logging.CRITICAL + 1)
        self.addHandler(logging.NullHandler())
        self.propagate = False


_QUIET = _Quiet()


class _KeyLookup:
    """dkimpy's ``dnsfunc``: the TXT record at the selector, by our resolver."""

    def __init__(self, resolver: Resolver, deadline: float | None) -> None:
        self.resolver = resolver
        self.deadline = deadline
        self.missing = False

    def __call__(self, name: bytes | str, timeout: float = DNS_TIMEOUT) -> bytes | None:
        try:
            text = name.decode("ascii") if isinstance(name, bytes) else name
        except UnicodeDecodeError:
            self.missing = True
            return None
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
        try:
            records = self.resolver.txt(text.rstrip("."), timeout)
        except DNSTemporaryError as e:
            raise dkimpy.DnsTimeoutError(str(e))
        if not records:
            self.missing = True
            return None
        return records[0]


def _tag(signature: bytes, tag: bytes) -> bytes:
    match = re.search(rb"(?:^|;)\s*" + tag + rb"\s*=\s*([^;]*)", signature)
    return re.sub(rb"\s+", b"", match.group(1)) if match else b""


def _names(signature: bytes) -> tuple[str, str]:
    """d= and s= of a signature, each "" unless it is a clean name we may print."""
    domain = domain_name(_tag(signature, b"d").decode("ascii", "replace"))
    selector = _tag(signature, b"s").decode("ascii", "replace")
    return domain, selector if _SELECTOR.fullmatch(selector) else ""


def verify_dkim(resolver: Resolver, message: bytes, deadline: float | None = None) -> tuple[DKIMResult, ...]:
    """Every DKIM signature of ``message`` (up to MAX_SIGNATURES), verified.

    rsa-sha1 signatures do not count (``policy``, RFC 8301), nor do RSA
    keys under 1024 bits (``permerror``).  Blocking and CPU-bound: run it
    in a thread.  ``deadline`` (of ``time.monotonic()``) bounds the DNS
    lookups of all the signatures; without one, each lookup has the
    resolver's own time limit.
    """
    try:
        verifier = dkimpy.DKIM(message, logger=_QUIET, minkey=MIN_RSA_BITS)
    except dkimpy.DKIMException:
        return (DKIMResult("neutral", reason="header section not parseable"),)
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    results = []
    for index, raw in enumerate(signatures[:MAX_SIGNATURES]):
        domain, selector = _names(raw)
        try:
            prepared = verifier.verify_headerprep(index)
        except dkimpy.DKIMException:
            results.append(DKIMResult("neutral", domain, selector, "signature not valid"))
            continue
        if not prepared:
            break
        sig, include_headers, headers = prepared
        if sig.get(b"a", b"").lower() == b"rsa-sha1":
            # RFC 8301 3.1: verifiers must not consider rsa-sha1 valid.
            results.append(DKIMResult("policy", domain, selector, "rsa-sha1"))
            continue
        lookup = _KeyLookup(resolver, deadline)
        try:
            verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = dkimpy.load_pk_from_dns(
                sig[b"s"] + b"._domainkey." + sig[b"d"] + b".", lookup, timeout=DNS_TIMEOUT
            )
        except dkimpy.DnsTimeoutError:
            results.append(DKIMResult("temperror", domain, selector, "DNS error"))
            continue
        except (dkimpy.DKIMException, binascii.Error, ValueError):
            results.append(DKIMResult("permerror", domain, selector, "no key" if lookup.missing else "bad key"))
            continue
        try:
            good = verifier.verify_sig_process(sig, include_headers, headers[index], lookup)
        except dkimpy.KeyFormatError:
            results.append(DKIMResult("permerror", domain, selector, "key too small"))
            continue
        except dkimpy.ValidationError as e:
            if "body hash" in str(e):
                results.append(DKIMResult("fail", domain, selector, "body hash mismatch"))
            else:
                # A key published for TLS reports only (s=tlsrpt), not for mail.
                results.append(DKIMResult("permerror", domain, selector, "key not for mail"))
            continue
        except (dkimpy.DKIMException, ValueError, TypeError):
            results.append(DKIMResult("neutral", domain, selector, "signature not valid"))
            continue
        results.append(DKIMResult("pass", domain, selector) if good else DKIMResult("fail", domain, selector, "signature mismatch"))
    return tuple(results)
