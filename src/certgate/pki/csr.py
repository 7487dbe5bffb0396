"""Requester side: build a PKCS#10 CSR for a key that never leaves the device."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from certgate.pki.keys import PrivateKey


def build_csr(key: PrivateKey, common_name: str) -> bytes:
    """A PEM CSR proving possession of ``key``. The console decides the certificate's names."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return csr.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)
