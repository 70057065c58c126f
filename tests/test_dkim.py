"""DKIM keys and signing: keys made 0600 and never overwritten, their DNS records, and
signatures that dkimpy's own verifier accepts (and refuses once the message is changed)."""

from __future__ import annotations

import base64
import io
import os
import re
import stat
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailplat.config import DKIMSettings
from mailplat.mailauth.dkim import (
    KeyFileError,
    Signer,
    SigningError,
    dns_record,
    generate_key,
    load_private_key,
)

MESSAGE = (
    b"Received: from client.test by mail.example.org; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@remote.test>,\r\n"
    b"  Carol <carol@remote.test>\r\n"
    b"Subject: a signed  message\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <signed.1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: not signed\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"trailing spaces here   \r\n"
    b"\r\n"
    b"\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """An RSA and an Ed25519 key made by generate_key, with the records it returned."""
    folder = tmp_path_factory.mktemp("dkim")
    made = {}
    for algorithm in ("rsa", "ed25519"):
        path = folder / "keys" / f"{algorithm}.key"
        made[algorithm] = (path, generate_key(str(path), algorithm))
    return made


@pytest.fixture(scope="module")
def signer(keys: dict[str, tuple[Path, str]]) -> Signer:
    return Signer({
        "example.org": DKIMSettings("example.org", "rsa2024", str(keys["rsa"][0])),
        "example.net": DKIMSettings("example.net", "ed", str(keys["ed25519"][0])),
    })


def published(keys: dict[str, tuple[Path, str]]):
    """A dkimpy dnsfunc answering from the records generate_key returned."""
    records = {
        b"rsa2024._domainkey.example.org.": keys["rsa"][1].encode(),
        b"ed._domainkey.example.net.": keys["ed25519"][1].encode(),
    }
    asked: list[bytes] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        asked.append(name)
        return records.get(name)

    dnsfunc.asked = asked  # type: ignore[attr-defined]
    return dnsfunc


def tags(header: bytes) -> dict[str, str]:
    """The tag=value pairs of a DKIM-Signature header, whitespace removed."""
    value = header.split(b":", 1)[1].decode()
    pairs = (part.split("=", 1) for part in value.split(";") if part.strip())
    return {k.strip(): re.sub(r"\s+", "", v) for k, v in pairs}


# --- keys ---------------------------------------------------------------------------


def test_generated_keys_are_private_pem_files(keys):
    """Both keys are PEM files only their owner may read or write, in a folder only the owner may enter."""
    for algorithm, expected in (("rsa", rsa.RSAPrivateKey), ("ed25519", ed25519.Ed25519PrivateKey)):
        path, _ = keys[algorithm]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(key, expected)
    assert serialization.load_pem_private_key(keys["rsa"][0].read_bytes(), None).key_size == 2048


def test_generate_key_is_0600_whatever_the_umask(tmp_path):
    """A permissive umask does not widen the mode; a strict one does not narrow it below 0600."""
    for mask in (0o000, 0o077):
        old = os.umask(mask)
        try:
            path = tmp_path / f"mask{mask:o}.key"
            generate_key(str(path), "ed25519")
        finally:
            os.umask(old)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_generate_key_refuses_to_overwrite(keys, tmp_path):
    """An existing key, or a symbolic link where the key would go, is left alone."""
    path, record = keys["rsa"]
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key(str(path), "rsa")
    assert path.read_bytes() == before
    assert dns_record(str(path)) == record

    target = tmp_path / "elsewhere"
    target.write_text("precious")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        generate_key(str(link), "ed25519")
    assert target.read_text() == "precious"


def test_generate_key_unknown_algorithm(tmp_path):
    with pytest.raises(ValueError, match="rsa or ed25519"):
        generate_key(str(tmp_path / "dsa.key"), "dsa")
    assert not (tmp_path / "dsa.key").exists()


def test_dns_records(keys):
    """RSA: v=DKIM1; k=rsa; p=<DER SubjectPublicKeyInfo>.  Ed25519: k=ed25519 and the raw 32-octet key (RFC 8463)."""
    for algorithm, (path, record) in keys.items():
        assert dns_record(str(path)) == record
        match = re.fullmatch(r"v=DKIM1; k=(rsa|ed25519); p=([A-Za-z0-9+/=]+)", record)
        assert match and match.group(1) == algorithm
        public = serialization.load_pem_private_key(path.read_bytes(), None).public_key()
        p = base64.b64decode(match.group(2))
        if algorithm == "ed25519":
            assert len(p) == 32
            assert p == public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            assert serialization.load_der_public_key(p).public_numbers() == public.public_numbers()


def test_dns_record_of_a_pkcs1_key(tmp_path):
    """A key made elsewhere (openssl genrsa's "BEGIN RSA PRIVATE KEY") gives its record and signs."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "pkcs1.key"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ))
    record = dns_record(str(path))
    header = Signer({"example.org": DKIMSettings("example.org", "old", str(path))}).sign("example.org", MESSAGE)
    assert dkim.verify(header + MESSAGE, dnsfunc=lambda name, timeout=5: record.encode())


# A key too small to sign with (openssl genrsa 512), made once: cryptography makes none under 1024 bits.
RSA_512 = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAvIj2+ebYfzSYEc02\n"
    b"vU4CyTxPx5sj2pI6iQjw9TipfQGmabBNZemshERQ5qgG2SMW778cwn1YRVz5P+8m\n"
    b"U/BGzQIDAQABAkEAkhmJWkrbhmfZWCIwwy4K1qrYIBRHCn+6wKqfH0iTfvxNudtD\n"
    b"yK5SPpdEyp2ML8/Zh0FjXRCFABpJ8v/gc5GteQIhAOH67bouG+KxR4r8D29fuJoa\n"
    b"wYLw6IDUwDOeJBEhQEobAiEA1ZScdWrTbeqcYHJNOnH8VxyI1/qiSjwpbdiBrpnm\n"
    b"wTcCIAvyoWkLkQveRaMSippf3DnBmmOa6yAMn5DbFpsVP/nrAiBt2vOi3WCEv9DR\n"
    b"NtmMP0bo0497b7n77vfsPRlu4lAzfwIgSgkoJs92SmMidSj3TssFhAHOTJ5sIcpa\n"
    b"AML8XVIjoks=\n"
    b"-----END PRIVATE KEY-----\n"
)


@pytest.mark.parametrize("content, problem, fix", [
    (b"not a key\n", "is not an unencrypted PEM private key", "dkim keygen example.org"),
    ("ec", "is neither an RSA nor an Ed25519 key", "rsa-sha256 or ed25519-sha256"),
    ("rsa512", "is a 512-bit RSA key; verifiers ignore keys under 1024 bits", "use 2048 bits"),
])
def test_load_private_key_refuses_what_cannot_sign(tmp_path, content, problem, fix):
    """The one key loader (config check, signer, doctor) says what is wrong with a key file and what to do."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if content == "ec":
        content = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    elif content == "rsa512":
        content = RSA_512  # cryptography refuses to make one
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as raised:
        load_private_key(str(path), "example.org")
    assert raised.value.problem.startswith(f"{path} {problem}")
    assert fix in raised.value.fix
    with pytest.raises(OSError):
        load_private_key(str(tmp_path / "missing.key"))


# --- signing ---------------------------------------------------------------------------


@pytest.mark.parametrize("domain, algorithm, selector", [("example.org", "rsa-sha256", "rsa2024"), ("example.net", "ed25519-sha256", "ed")])
def test_signature_verifies(signer, keys, domain, algorithm, selector):
    """dkimpy's verifier accepts the signature of a CRLF message, fetching our published record."""
    dnsfunc = published(keys)
    header = signer.sign(domain, MESSAGE)
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    # Folded with CRLF only, every continuation line indented.
    assert b"\n" not in header.replace(b"\r\n", b"")
    assert all(line.startswith((b" ", b"\t")) for line in header.split(b"\r\n")[1:-1])
    assert dkim.verify(header + MESSAGE, dnsfunc=dnsfunc)
    assert dnsfunc.asked == [f"{selector}._domainkey.{domain}.".encode()]
    fields = tags(header)
    assert fields["a"] == algorithm
    assert fields["c"] == "relaxed/relaxed"
    assert fields["d"] == domain
    assert fields["s"] == selector


def test_signed_headers_and_oversigned_from(signer):
    """Every listed header that is present is signed, From once more; Received and X-Mailer are not."""
    signed = tags(signer.sign("example.org", MESSAGE))["h"].split(":")
    assert sorted(signed) == sorted(
        ["from", "to", "subject", "date", "message-id", "mime-version", "content-type", "from"]
    )
    assert signed.count("from") == 2


def test_relaxed_canonicalization_survives_rewrapping(signer, keys):
    """relaxed/relaxed: a relay refolding a header or changing whitespace does not break it."""
    message = MESSAGE.replace(b"Subject: a signed  message", b"Subject:   a signed\r\n\tmessage")
    message = message.replace(b"Hello Bob,", b"Hello   Bob,")
    header = signer.sign("example.org", MESSAGE)
    assert dkim.verify(header + message, dnsfunc=published(keys))


def test_changes_break_the_signature(signer, keys):
    """A second From, a changed Subject or body fail; a header we do not sign may be added."""
    dnsfunc = published(keys)
    for domain in ("example.org", "example.net"):
        header = signer.sign(domain, MESSAGE)
        assert dkim.verify(header + MESSAGE, dnsfunc=dnsfunc)
        second_from = MESSAGE.replace(b"X-Mailer", b"From: Mallory <mallory@evil.test>\r\nX-Mailer")
        assert not dkim.verify(header + second_from, dnsfunc=dnsfunc)
        on_top = b"From: Mallory <mallory@evil.test>\r\n" + MESSAGE
        assert not dkim.verify(header + on_top, dnsfunc=dnsfunc)
        assert not dkim.verify(header + MESSAGE.replace(b"a signed", b"an altered"), dnsfunc=dnsfunc)
        assert not dkim.verify(header + MESSAGE.replace(b"Hello Bob", b"Hello Eve"), dnsfunc=dnsfunc)
        assert dkim.verify(b"X-Spam-Score: 0\r\n" + header + MESSAGE + b"\r\n", dnsfunc=dnsfunc)


def test_crlf_and_lf_messages_sign_alike(signer, keys):
    """dkimpy reads LF lines as CRLF: the signature of the LF form verifies the CRLF form."""
    lf = MESSAGE.replace(b"\r\n", b"\n")
    header = signer.sign("example.org", lf)
    assert header.endswith(b"\r\n")
    assert tags(header)["bh"] == tags(signer.sign("example.org", MESSAGE))["bh"]
    assert dkim.verify(header + MESSAGE, dnsfunc=published(keys))


def test_sign_a_file(signer, keys, tmp_path):
    """A message in a file (or any binary stream) signs like its bytes."""
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE)
    with open(path, "rb") as f:
        header = signer.sign("example.org", f)
    assert dkim.verify(header + MESSAGE, dnsfunc=published(keys))
    assert dkim.verify(signer.sign("example.net", io.BytesIO(MESSAGE)) + MESSAGE, dnsfunc=published(keys))


def test_no_key_for_the_domain(signer):
    """No [dkim."domain"] for the From domain: nothing to add."""
    assert signer.sign("remote.test", MESSAGE) == b""
    assert signer.sign("sub.example.org", MESSAGE) == b""
    assert Signer({}).sign("example.org", MESSAGE) == b""


def test_domain_case_and_trailing_dot(signer, keys):
    """The From domain is matched without regard to case or a final dot; d= is lower case."""
    header = signer.sign("Example.ORG.", MESSAGE)
    assert tags(header)["d"] == "example.org"
    assert dkim.verify(header + MESSAGE, dnsfunc=published(keys))
    assert signer.domains() == ("example.net", "example.org")


def test_malformed_header_section(signer):
    """A header line that is no header at all cannot be signed: SigningError, not a bad signature."""
    with pytest.raises(SigningError, match="example.org"):
        signer.sign("example.org", b"From: a@example.org\r\nthis is not a header\r\n\r\nbody\r\n")
