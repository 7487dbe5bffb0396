"""The cert proxy follows the data directory live: the Device Roots Access saves through a
rotation, and the certificates Access renews. Access and the proxy run over real TLS in
process; the console is the stand-in (``tests/access/harness.py``). Reloads and refreshes
are stepped by the test (``Reloader.check``, ``TrustFollower.refresh``), not waited for."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from certgate.access.app import AccessState, renew_now
from certgate.access.config import TLSMode
from certgate.access.install import replace_public_certificate
from certgate.access.trust import DeviceRoot, DeviceRootSet, save_device_roots
from certgate.certproxy.cli import follow_data_dir
from certgate.certproxy.reload import Reloader
from certgate.certproxy.server import CertProxy
from certgate.pki.identity import identity_of
from certgate.pki.keys import private_key_pem
from certgate.pki.profiles import RENEWAL_WINDOW
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of
from tests.access.harness import (
    ConsolePKI,
    Leaf,
    access_server,
    device_context,
    device_record,
    issue_public,
    proxy_server,
)
from tests.access.test_app import Env, authorize, cert_step, make_env

NEXT = "device-root@2"


@dataclass
class Running:
    env: Env
    state: AccessState
    proxy: CertProxy
    reloader: Reloader
    offload_port: int

    def enrolled(self, label: str = "device-root") -> Leaf:
        leaf = self.env.pki.device(label=label)
        uid = identity_of(leaf.cert).device_uid
        assert uid is not None
        self.env.console.devices[uid] = device_record(uid)
        return leaf

    def console_changed(self) -> None:
        """Access asks the console now (its refresh task would within trust_refresh_s)."""
        asyncio.run(self.state.trust.refresh())

    def health(self) -> dict[str, object]:
        with httpx.Client(verify=device_context(self.env.public.root.cert), timeout=30) as c:
            body: dict[str, object] = c.get(f"{self.env.proxy_url}/healthz").json()
        return body


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    env, access_port, proxy_port = make_env(tmp_path / "access", TLSMode.OFFLOAD)
    data_dir = env.setup.config.data_dir
    with (
        access_server(env.setup, env.console, access_port) as state,
        proxy_server(env.setup, access_port, port=proxy_port, offload_port=0) as (proxy, bound),
    ):
        reloader = follow_data_dir(
            proxy,
            data_dir,
            env.setup.material,
            3600,
            access_host="127.0.0.1",
            access_port=access_port,
        )
        yield Running(env, state, proxy, reloader, bound[1][1])


def signs_in(running: Running, leaf: Leaf) -> bool:
    """The certificate step through the proxy ends with a code; False when refused at the
    handshake (the proxy) or by Access (an error redirect)."""
    try:
        return "code" in cert_step(running.env, leaf)
    except httpx.TransportError:
        return False


def test_a_device_root_rotation_is_followed_by_access_and_the_proxy(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    env = running.env
    env.pki.rotate(NEXT)
    old, new = running.enrolled(), running.enrolled(NEXT)
    assert signs_in(running, old) and not signs_in(running, new)

    env.console.trusted.append((NEXT, "next"))  # prepare
    running.console_changed()
    assert running.reloader.check() is True
    assert signs_in(running, old) and signs_in(running, new)
    roots = running.health()["device_roots"]
    assert isinstance(roots, list) and [r["label"] for r in roots] == ["device-root", NEXT]

    env.console.trusted = [(NEXT, "current"), ("device-root", "retiring")]  # switch
    running.console_changed()
    running.reloader.check()
    assert signs_in(running, old) and signs_in(running, new)

    env.console.trusted = [(NEXT, "current")]  # finish
    running.console_changed()
    # Access drops the old root at once: the proxy (not reloaded yet) passes the certificate
    # on, and Access refuses it on its own check.
    location = authorize(env).headers["location"]
    with env.device(old) as device:
        refused = device.get(location)
    assert "not+issued+by+a+trusted+Device+Root" in refused.headers["location"]
    # Once reloaded, the proxy refuses it at the handshake.
    assert running.reloader.check() is True
    with caplog.at_level(logging.WARNING, "certgate.certproxy"):
        assert not signs_in(running, old)
    assert signs_in(running, new)


def test_a_bad_device_root_file_keeps_the_set_in_use_and_shows_in_healthz(
    running: Running,
) -> None:
    old = running.enrolled()
    files = running.env.setup.config.files
    stranger = ConsolePKI()
    forged = DeviceRootSet(
        (running.env.pki.root.cert,),
        (DeviceRoot("device-root", "current", stranger.device_root.cert),),
    )
    save_device_roots(files.device_roots, forged)
    assert running.reloader.check() is False
    health = running.health()
    assert "not signed by the console Root" in str(health["reload_error"])
    assert any("not reloaded" in w for w in health["warnings"])  # type: ignore[attr-defined]
    assert signs_in(running, old)  # the set in use stays
    files.device_roots.unlink()  # back to the console chain's Device Root
    assert running.reloader.check() is True and running.health()["reload_error"] is None


def _served(port: int, trust: x509.Certificate) -> x509.Certificate:
    ctx = device_context(trust)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_renewed_certificates_are_used_without_a_gap(running: Running) -> None:
    """Access renews both leaves; the proxy goes on forwarding before it reloads (Access
    trusted by its install root, the proxy's previous certificate still pinned), then
    presents the new ones (5263, and to Access)."""
    env, leaf = running.env, running.enrolled()
    before = env.setup.material
    when = before.access_cert.not_valid_after_utc - RENEWAL_WINDOW + timedelta(days=1)
    assert renew_now(running.state, when.timestamp()) == ["access-tls", "certproxy-client"]
    assert signs_in(running, leaf)  # the proxy has not reloaded: old client cert, still pinned
    assert _served(running.offload_port, before.install_root) == before.access_cert
    assert running.reloader.check() is True
    renewed = running.state.material
    assert _served(running.offload_port, before.install_root) == renewed.access_cert
    assert signs_in(running, leaf)  # the new client certificate, pinned by Access
    assert json.loads(env.setup.config.files.settings.read_text())["certproxy_thumbprint"] == (
        thumbprint(renewed.certproxy_cert)
    )
    names = {c["name"]: c for c in running.health()["certificates"]}  # type: ignore[attr-defined]
    assert names["certproxy-client"]["not_after"] == int(
        renewed.certproxy_cert.not_valid_after_utc.timestamp()
    )


def test_a_replaced_public_certificate_is_presented_on_5262_after_a_reload(
    running: Running,
) -> None:
    env, leaf = running.env, running.enrolled()
    proxy_port = int(env.proxy_url.rsplit(":", 1)[1])
    renewed = issue_public(env.public)
    replace_public_certificate(
        env.setup.config, pem_of([renewed.cert]), private_key_pem(renewed.key)
    )
    assert running.reloader.check() is True
    assert _served(proxy_port, env.public.root.cert) == renewed.cert
    assert signs_in(running, leaf)
