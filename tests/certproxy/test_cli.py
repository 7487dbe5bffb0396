"""``certgate certproxy serve`` and how it builds the proxy of an installation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from certgate.access.config import TLSMode
from certgate.certproxy.cli import build_proxy
from certgate.cli import app
from certgate.pki.thumbprint import thumbprint
from tests.access.harness import ConsolePKI, Installed, PublicPKI, install_request, installed


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    request = install_request(ConsolePKI(), PublicPKI.create(), port=9443)
    return installed(tmp_path_factory.mktemp("access"), request)


def test_serve_needs_an_installation(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["certproxy", "serve", "-d", str(tmp_path)], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 1
    assert "not an Access data directory" in result.output


def test_5262_only_unless_an_offload_port_is_given(setup: Installed) -> None:
    only = build_proxy(setup.config, setup.material, host="127.0.0.1", port=5262, offload_port=None)
    both = build_proxy(setup.config, setup.material, host="127.0.0.1", port=5262, offload_port=5263)
    assert [(lst.name, lst.port) for lst in only.listeners] == [("5262", 5262)]
    assert [(lst.name, lst.port) for lst in both.listeners] == [("5262", 5262), ("5263", 5263)]


def test_the_destination_is_this_access(setup: Installed) -> None:
    proxy = build_proxy(setup.config, setup.material, host="127.0.0.1", port=1, offload_port=None)
    assert proxy.upstream.authority == b"127.0.0.1:9443"
    wildcard = dataclasses.replace(setup.config, host="0.0.0.0")
    proxy = build_proxy(wildcard, setup.material, host="127.0.0.1", port=1, offload_port=None)
    assert proxy.upstream.authority == b"127.0.0.1:9443"  # a wildcard is reached on loopback


@pytest.mark.parametrize("mode", list(TLSMode))
def test_the_pinned_access_certificate_follows_the_mode(setup: Installed, mode: TLSMode) -> None:
    """Passthrough: Access's public leaf; offloaded: the install root, which issues Access's
    self-signed leaf and its renewals (and no other server certificate)."""
    config = dataclasses.replace(setup.config, tls_mode=mode)
    proxy = build_proxy(config, setup.material, host="127.0.0.1", port=1, offload_port=None)
    expected = setup.material.public_chain[0]
    if mode is TLSMode.OFFLOAD:
        expected = setup.material.install_root
    assert proxy.upstream.pinned_thumbprint == thumbprint(expected)
    assert proxy.upstream.ssl_context.cert_store_stats()["x509"] == 1  # nothing else trusted
