"""Access renews its own certificates before they expire, and puts them to use live.

The clock is moved by passing ``now`` (within the renewal window of the installed
certificates); issuance, TLS and the listeners are real.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from certgate.access import renewal
from certgate.access.app import renew_now
from certgate.access.config import TLSMode, load_config
from certgate.access.install import INSTALL_ROOT_KEY, load_material, replace_public_certificate
from certgate.pki.keys import private_key_pem
from certgate.pki.profiles import RENEWAL_WINDOW
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of
from tests.access.harness import (
    ConsolePKI,
    ConsoleStandIn,
    Installed,
    PublicPKI,
    access_server,
    device_context,
    due_for_renewal,
    install_request,
    installed,
    issue_public,
)
from tests.support import free_port


def _in_window(cert: x509.Certificate) -> float:
    """A moment within ``cert``'s renewal window."""
    return (cert.not_valid_after_utc - RENEWAL_WINDOW + timedelta(days=1)).timestamp()


@pytest.fixture
def setup(tmp_path: Path) -> Installed:
    return installed(tmp_path / "access", install_request(ConsolePKI(), PublicPKI.create()))


def test_nothing_is_due_until_the_renewal_window(setup: Installed) -> None:
    cert = setup.material.access_cert
    outside = (cert.not_valid_after_utc - RENEWAL_WINDOW - timedelta(days=1)).timestamp()
    assert renewal.due(setup.material, outside) == []
    assert renewal.renew(setup.config, setup.material, outside) == (
        setup.config,
        setup.material,
        [],
    )
    assert renewal.due(setup.material, _in_window(cert)) == ["access-tls", "certproxy-client"]


def test_renewal_issues_both_leaves_again_sealed_and_pinned(setup: Installed) -> None:
    config = dataclasses.replace(setup.config, tls_lifetime_days=90)
    old = setup.material
    config, material, names = renewal.renew(config, old, _in_window(old.access_cert))
    assert names == ["access-tls", "certproxy-client"]
    for new, before in (
        (material.access_cert, old.access_cert),
        (material.certproxy_cert, old.certproxy_cert),
    ):
        assert new.serial_number != before.serial_number
        new.verify_directly_issued_by(old.install_root)
        assert new.subject == before.subject
        san = x509.SubjectAlternativeName
        assert new.extensions.get_extension_for_class(san) == (
            before.extensions.get_extension_for_class(san)
        )
        lifetime = new.not_valid_after_utc - new.not_valid_before_utc
        assert timedelta(days=90) <= lifetime <= timedelta(days=90, minutes=10)
    assert material.access_key.public_key() != old.access_key.public_key()
    # What a restart loads: the new certificates, the proxy's pinned in access.json.
    stored = load_config(setup.config.data_dir)
    assert stored.certproxy_thumbprint == thumbprint(material.certproxy_cert)
    assert load_material(stored).access_cert == material.access_cert
    files = setup.config.files.root
    everything = b"".join(p.read_bytes() for p in files.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" not in everything  # the new keys are sealed too
    assert not list(files.rglob("*.tmp"))


def test_settings_given_on_the_command_line_are_not_stored_by_a_renewal(
    setup: Installed,
) -> None:
    overridden = dataclasses.replace(setup.config, port=1234, host="0.0.0.0")
    renewal.renew(overridden, setup.material, _in_window(setup.material.access_cert))
    stored = json.loads(setup.config.files.settings.read_text())
    assert (stored["port"], stored["host"]) == (setup.config.port, setup.config.host)


def test_an_installation_without_the_install_root_key_says_what_to_do(setup: Installed) -> None:
    setup.config.files.sealed(INSTALL_ROOT_KEY).unlink()  # as `access init` made it before
    material = load_material(setup.config)
    assert material.install_root_key is None
    with pytest.raises(Exception, match=r"keeps no install root key .* run `certgate access init`"):
        renewal.renew(setup.config, material, _in_window(material.access_cert))


def _served(port: int, trust: x509.Certificate) -> x509.Certificate:
    """The certificate a new TLS connection to ``port`` is served."""
    ctx = device_context(trust)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_access_serves_its_renewed_certificate_without_a_restart(tmp_path: Path) -> None:
    """Offloaded, Access serves its self-signed leaf: a renewal loads the new one into the
    listening context. New connections get it; one already open goes on."""
    port, pki = free_port(), ConsolePKI()
    request = install_request(pki, PublicPKI.create(), port=port, mode=TLSMode.OFFLOAD)
    setup = installed(tmp_path / "access", request)
    root = setup.material.install_root
    with access_server(setup, ConsoleStandIn(pki), port) as state:
        assert state.tls is not None
        ctx = device_context(root)
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ctx, timeout=30) as kept:
            assert kept.get("/livez").status_code == 200  # a connection is open
            before = _served(port, root)
            assert before == setup.material.access_cert
            renewed = renew_now(state, _in_window(before))
            assert renewed == ["access-tls", "certproxy-client"]
            after = _served(port, root)
            assert after != before and after == state.material.access_cert
            assert kept.get("/livez").status_code == 200  # the open connection goes on
        health = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx).json()
    names = {c["name"]: c for c in health["certificates"]}
    assert names["access-tls"]["not_after"] == int(after.not_valid_after_utc.timestamp())
    assert health["warnings"] == []
    assert state.pins == (
        thumbprint(state.material.certproxy_cert),
        thumbprint(setup.material.certproxy_cert),
    )


def test_a_failed_renewal_keeps_the_certificates_and_is_reported(tmp_path: Path) -> None:
    port, pki = free_port(), ConsolePKI()
    setup = installed(tmp_path / "access", install_request(pki, PublicPKI.create(), port=port))
    setup.config.files.sealed(INSTALL_ROOT_KEY).unlink()
    setup = Installed(setup.config, load_material(setup.config))
    ctx: ssl.SSLContext = device_context(setup.material.install_root)
    with access_server(setup, ConsoleStandIn(pki), port) as state:
        when = _in_window(setup.material.access_cert)
        assert renew_now(state, when) == []
        assert state.material is setup.material
        health = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx).json()
    assert any("renewal failed" in w and "access init" in w for w in health["warnings"])


def _metric(port: int, ctx: ssl.SSLContext, line_start: str) -> str:
    text = httpx.get(f"https://127.0.0.1:{port}/metrics", verify=ctx).text
    (line,) = [x for x in text.splitlines() if x.startswith(line_start)]
    return line.rsplit(" ", 1)[1]


def test_a_certificate_in_its_window_is_warned_about_until_renewed(tmp_path: Path) -> None:
    port, pki = free_port(), ConsolePKI()
    setup = installed(tmp_path / "access", install_request(pki, PublicPKI.create(), port=port))
    setup = due_for_renewal(setup, timedelta(days=20))
    ctx = device_context(setup.material.install_root)
    due = 'certgate_certificate_renewal_due{certificate="access-tls"}'
    with access_server(setup, ConsoleStandIn(pki), port) as state:
        health = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx).json()
        assert health["warnings"] == [
            "access-tls expires in 19 days: renew access-tls (Access renews access-tls and"
            " certproxy-client itself; public-tls: certgate access public-cert; a Device"
            " Root: certgate console rotate device-root)"
        ]
        assert _metric(port, ctx, due) == "1.0"
        left = _metric(port, ctx, 'certgate_certificate_expires_seconds{certificate="access-tls"}')
        assert 18 * 86400 < float(left) <= 20 * 86400
        assert renew_now(state, time.time()) == ["access-tls"]
        assert _metric(port, ctx, due) == "0.0"
        health = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx).json()
    assert health["warnings"] == []


def test_a_later_renewal_of_one_certificate_keeps_the_renewed_pin(setup: Installed) -> None:
    """The configuration a renewal returns carries the proxy's new pin: a later renewal of
    the TLS certificate alone loads the installation against it."""
    config, first, _ = renewal.renew(
        setup.config, setup.material, _in_window(setup.material.access_cert)
    )
    assert config.certproxy_thumbprint == thumbprint(first.certproxy_cert)
    later = due_for_renewal(Installed(config, first), timedelta(days=20))
    config, second, names = renewal.renew(config, later.material, time.time())
    assert names == ["access-tls"]
    assert second.certproxy_cert == first.certproxy_cert
    assert second.access_cert not in (first.access_cert, later.material.access_cert)


def test_a_replaced_public_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """Passthrough: Access serves the public certificate on 443; one the operator replaces
    (``access public-cert``) is loaded at Access's next check, alone (nothing is due)."""
    port, pki, public = free_port(), ConsolePKI(), PublicPKI.create()
    request = install_request(pki, public, port=port, mode=TLSMode.PASSTHROUGH)
    setup = installed(tmp_path / "access", request)
    renewed = PublicPKI(public.root, issue_public(public))
    with access_server(setup, ConsoleStandIn(pki), port) as state:
        assert _served(port, public.root.cert) == public.leaf.cert
        assert renew_now(state, time.time()) == []  # nothing changed yet
        replace_public_certificate(
            setup.config, pem_of([renewed.leaf.cert]), private_key_pem(renewed.leaf.key)
        )
        assert renew_now(state, time.time()) == ["public-tls"]
        assert _served(port, public.root.cert) == renewed.leaf.cert
    assert state.pins == (setup.config.certproxy_thumbprint,)  # the proxy's is unchanged
