"""TLS contexts from the [tls] settings, and self-signed certificates for dev and tests."""

from __future__ import annotations

import datetime
import os
import re

from OpenSSL import crypto
from twisted.internet import ssl

__all__ = ["load_server_context", "make_self_signed"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_server_context(certificate: str, key: str) -> ssl.CertificateOptions:
    """Server TLS options from a PEM chain (leaf first) and its private key."""
    with open(certificate, "rb") as f:
        chain = [ssl.Certificate.loadPEM(block) for block in _PEM_CERT.findall(f.read())]
    if not chain:
        raise ValueError(f"{certificate} holds no PEM certificate")
    with open(key, "rb") as f:
        private_key = ssl.KeyPair.load(f.read(), crypto.FILETYPE_PEM)
    return ssl.CertificateOptions(
        privateKey=private_key.original,
        certificate=chain[0].original,
        extraCertChain=[c.original for c in chain[1:]],
    )


def make_self_signed(hostname: str, certificate: str, key: str, days: int = 365) -> None:
    """Write a self-signed certificate for ``hostname`` and its key (mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    for path in (certificate, key):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(certificate, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
