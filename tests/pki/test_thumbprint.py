"""CertThumbprint: the value ``openssl x509 -outform DER | sha256sum`` prints."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.pki.thumbprint import is_thumbprint, thumbprint, thumbprint_der
from tests.pki.conftest import LEAF_NAMES, Hierarchy


def openssl_thumbprint(pem: Path) -> str:
    pipeline = f"openssl x509 -in '{pem}' -outform DER | sha256sum"
    result = subprocess.run(
        ["sh", "-c", pipeline], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.split()[0]


@pytest.mark.parametrize("name", ["root", *LEAF_NAMES])
def test_thumbprint_matches_openssl(pem_dir: Path, hierarchy: Hierarchy, name: str) -> None:
    cert = hierarchy.root.cert if name == "root" else hierarchy.leaves[name].cert
    expected = openssl_thumbprint(pem_dir / f"{name}.pem")
    assert len(expected) == 64
    assert thumbprint(cert) == expected


def test_thumbprint_of_der_is_the_same(hierarchy: Hierarchy) -> None:
    cert = hierarchy.leaves["device"].cert
    assert thumbprint_der(cert.public_bytes(Encoding.DER)) == thumbprint(cert)


def test_thumbprints_differ_between_certificates(hierarchy: Hierarchy) -> None:
    prints = {thumbprint(leaf.cert) for leaf in hierarchy.leaves.values()}
    assert len(prints) == len(hierarchy.leaves)


def test_thumbprint_is_canonical(hierarchy: Hierarchy) -> None:
    assert is_thumbprint(thumbprint(hierarchy.leaves["device"].cert))


@pytest.mark.parametrize(
    "value",
    [
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "a" * 64 + "\n",
        ":".join(["ab"] * 32),
        "",
    ],
    ids=["upper", "short", "long", "not-hex", "newline", "colons", "empty"],
)
def test_non_canonical_thumbprints_are_refused(value: str) -> None:
    assert not is_thumbprint(value)
