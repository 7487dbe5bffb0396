"""``access init``: the install root and its two leaves, sealed keys, and loading them back."""

from __future__ import annotations

import base64
import dataclasses
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certgate.access.config import TLSMode
from certgate.access.install import ConsoleTrust, install, load_material
from certgate.errors import ConfigError, KeystoreError
from certgate.pki.keys import generate_key, private_key_pem
from certgate.pki.keystore import ENV_VAR
from certgate.pki.thumbprint import thumbprint
from certgate.pki.verify import verify_client_chain, verify_server_chain
from certgate.tlsconf import pem_of
from tests.access.harness import ConsolePKI, PublicPKI, install_request, installed


@pytest.fixture(scope="module")
def console_pki() -> ConsolePKI:
    return ConsolePKI()


@pytest.fixture(scope="module")
def public() -> PublicPKI:
    return PublicPKI.create()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_creates_a_private_data_directory(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    setup = installed(tmp_path / "access", install_request(console_pki, public))
    files = setup.config.files
    assert _mode(files.root) == 0o700
    assert _mode(files.master_key) == 0o600 and _mode(files.console_api_key) == 0o600
    sealed = sorted(p.name for p in (files.root / "keys").iterdir())
    assert sealed == [
        "access-tls.sealed",
        "certproxy-client.sealed",
        "console-admin.sealed",
        "console-api-key.sealed",
        "id-token.sealed",
        "install-root.sealed",
        "public-tls.sealed",
    ]
    assert all(_mode(p) == 0o600 for p in (files.root / "keys").iterdir())
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in files.root.rglob("*.pem"))
    everything = b"".join(p.read_bytes() for p in files.root.rglob("*") if p.is_file())
    assert b"cgk_test_key" not in everything  # the console API key is sealed too
    assert setup.material.console_api_key == "cgk_test_key"


def test_install_root_signs_access_tls_and_the_pinned_proxy_cert(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    setup = installed(tmp_path / "access", install_request(console_pki, public))
    m = setup.material
    verify_server_chain(m.access_cert, [], [m.install_root], "node1.example.dmz")
    verify_server_chain(m.access_cert, [], [m.install_root], "127.0.0.1")
    verify_client_chain(m.certproxy_cert, [], [m.install_root])
    bc = m.install_root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    eku = m.certproxy_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert setup.config.certproxy_thumbprint == thumbprint(m.certproxy_cert)


def test_serving_certificate_follows_the_mode(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    setup = installed(tmp_path / "a", install_request(console_pki, public))
    assert setup.material.serving(TLSMode.OFFLOAD)[0] == [setup.material.access_cert]
    chain, key = setup.material.serving(TLSMode.PASSTHROUGH)
    assert chain[0] == public.leaf.cert and key.public_key() == public.leaf.key.public_key()


def test_install_refuses_to_overwrite(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    request = install_request(console_pki, public)
    installed(tmp_path / "access", request)
    with pytest.raises(ConfigError, match="already holds"):
        install(tmp_path / "access", request)


def test_public_key_must_match_its_certificate(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    request = dataclasses.replace(
        install_request(console_pki, public), public_key_pem=private_key_pem(generate_key())
    )
    with pytest.raises(ConfigError, match="does not match"):
        install(tmp_path / "access", request)
    assert not (tmp_path / "access").exists()


def test_console_chain_needs_the_device_root(console_pki: ConsolePKI) -> None:
    assert (
        ConsoleTrust.from_pem(console_pki.chain_pem()).device_root == console_pki.device_root.cert
    )
    with pytest.raises(ConfigError, match="Device Root"):
        ConsoleTrust.from_pem(pem_of([console_pki.root.cert, console_pki.admin_ca.cert]))
    with pytest.raises(ConfigError, match="self-signed Root"):
        ConsoleTrust.from_pem(pem_of([console_pki.device_root.cert]))
    with pytest.raises(ConfigError, match="not PEM"):
        ConsoleTrust.from_pem(b"garbage")


def test_a_readable_secret_is_refused(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    setup = installed(tmp_path / "access", install_request(console_pki, public))
    setup.config.files.console_api_key.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        load_material(setup.config)


def test_a_swapped_proxy_certificate_is_refused(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    setup = installed(tmp_path / "access", install_request(console_pki, public))
    setup.config.files.certproxy_client.write_bytes(pem_of([public.leaf.cert]))
    with pytest.raises(ConfigError, match="pinned thumbprint"):
        load_material(setup.config)


def test_a_sealed_key_moved_to_another_label_does_not_open(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI
) -> None:
    setup = installed(tmp_path / "access", install_request(console_pki, public))
    files = setup.config.files
    files.sealed("id-token").write_bytes(files.sealed("access-tls").read_bytes())
    with pytest.raises(KeystoreError, match="does not open"):
        load_material(setup.config)


def test_a_wrong_master_key_is_named(
    tmp_path: Path, console_pki: ConsolePKI, public: PublicPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = installed(tmp_path / "access", install_request(console_pki, public))
    monkeypatch.setenv(ENV_VAR, base64.urlsafe_b64encode(os.urandom(32)).decode())
    with pytest.raises(KeystoreError, match=r"does not open with the key from \$CERTGATE_MASTER"):
        load_material(setup.config)
