"""Access and its cert proxy through a Device Root rotation and a renewal of Access's own
certificate, on real processes with nothing restarted.

A console (``certgate console serve``), Access (``certgate access serve``, SSL offloaded:
it serves its self-signed certificate), the cert proxy (``certgate certproxy serve`` on
5262 and 5263) and HAProxy re-encrypting 443 to Access (Figure 2, the planner's config,
which verifies Access by its install root), as in ``test_access_haproxy.py``. Access asks
the console for its Device Roots every second and checks its certificates every few
seconds; the proxy reloads the data directory every second.

Shown, in order:

* renewal: Access was installed with a TLS certificate inside its renewal window; Access
  renews it, and the new one is served on 443 (through HAProxy), on Access's port and on
  the proxy's 5263, while a loop of fresh connections to all three sees 0 failures;
* Device Root rotation (prepare, switch, finish through the console API): after the switch
  a device enrolled with a new-root certificate signs in through the cert proxy, and the
  old-root device still does; after finish Access and the proxy trust the new root alone,
  and the old-root certificate is refused at the proxy's TLS handshake.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import requests
from cryptography import x509

from certgate.access.config import load_config
from certgate.access.install import load_material
from certgate.pki.profiles import RENEWAL_WINDOW
from certgate.pki.thumbprint import thumbprint
from certgate.tlsconf import pem_of
from tests.access.harness import Installed, Leaf, PublicPKI, due_for_renewal
from tests.integration.test_access_haproxy import (
    FIGURE_2,
    LB_SOURCE,
    Org,
    Topology,
    _access_init,
    _assert_valid_id_token,
    _enroll,
    _haproxy_config,
    _start,
    _wait_for,
    _wait_listening,
    android,
    running_org,
    sign_in,
)
from tests.support import CERTGATE, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]

ROTATION = "/api/v1/groups/global/rotations/device-root"
SHORT = timedelta(days=20)  # inside the 30-day renewal window
# Access's first check: late enough for the traffic loop to run before and after it.
RENEW_CHECK_S = 20


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Org]:
    with running_org(tmp_path_factory.mktemp("access-rotation-org")) as running:
        yield running


def _install_due_for_renewal(topo: Topology, org: Org) -> x509.Certificate:
    """``access init``, then its TLS certificate replaced by one 20 days from its end (an
    installation that has run for a year), signed by the install root like the first;
    quick intervals in ``access.json``. Returns the short-lived certificate."""
    _access_init(topo, org, "offload")
    data_dir = topo.work / "access"
    settings = data_dir / "access.json"
    data = json.loads(settings.read_text())
    data.update(trust_refresh_s=1, renew_check_s=RENEW_CHECK_S)
    settings.write_text(json.dumps(data))
    config = load_config(data_dir)
    return due_for_renewal(Installed(config, load_material(config)), SHORT).material.access_cert


@dataclass
class Running:
    topo: Topology
    short: x509.Certificate  # the TLS certificate Access started with, due for renewal


@pytest.fixture(scope="module")
def running(org: Org, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    names = ["lb443", "lb5262", "lb5263", "access", "proxy5262", "proxy5263"]
    work = tmp_path_factory.mktemp("access-rotation")
    built = Topology("rotation", FIGURE_2, work, PublicPKI.create(("access.example.com",)),
                     {n: free_port() for n in names})  # fmt: skip
    short = _install_due_for_renewal(built, org)
    p, data = built.ports, ["-d", str(work / "access"), "--load-balancer", LB_SOURCE]
    try:
        _start(built, "access", [*CERTGATE, "access", "serve", *data], p["access"])
        proxy = [*CERTGATE, "certproxy", "serve", *data, "--port", str(p["proxy5262"])]
        proxy += ["--offload-port", str(p["proxy5263"]), "--reload-interval", "1"]
        _start(built, "certproxy", proxy, p["proxy5262"])
        _start(built, "haproxy", ["haproxy", "-f", str(_haproxy_config(built))], p["lb443"])
        _wait_listening(p["lb5262"], built.procs[-1], "haproxy", built.logs["haproxy"])
    except Exception:
        built.stop()
        raise
    try:
        yield Running(built, short)
    finally:
        built.stop()


def served(port: int, trust: x509.Certificate) -> x509.Certificate:
    """The certificate a new TLS connection to ``port`` is served (verified by ``trust``)."""
    ctx = ssl.create_default_context(cadata=pem_of([trust]).decode())
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@dataclass
class Loop:
    """Fresh connections, one after the other, to Access through HAProxy (443), to Access
    itself and to the cert proxy's 5263; every failure is kept."""

    topo: Topology
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        p, root = self.topo.ports, self.topo.install_root
        public = pem_of([self.topo.public.root.cert]).decode()
        targets = [
            (f"https://127.0.0.1:{p['lb443']}/healthz", ssl.create_default_context(cadata=public)),
            (f"https://127.0.0.1:{p['access']}/healthz", _trusting(root)),
            (f"https://127.0.0.1:{p['proxy5263']}/livez", _trusting(root)),
        ]
        while not self.stop.is_set():
            for url, ctx in targets:
                try:
                    with requests.Session() as session:
                        session.mount("https://", _Adapter(ctx))
                        response = session.get(url, timeout=20, headers={"connection": "close"})
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{url}: HTTP {response.status_code}")
                except requests.RequestException as exc:
                    self.failures.append(f"{url}: {exc}")
            time.sleep(0.1)


def _trusting(root: x509.Certificate) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pem_of([root]).decode())
    ctx.check_hostname = False  # Access's self-signed leaf names the node, not 127.0.0.1
    return ctx


class _Adapter(requests.adapters.HTTPAdapter):
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ctx
        super().init_poolmanager(*args, **kwargs)


def test_access_renews_its_certificate_while_serving(running: Running) -> None:
    topo, short = running.topo, running.short
    root, p = topo.install_root, topo.ports
    assert served(p["access"], root) == short, "renewed before the loop started"
    loop = Loop(topo)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: served(p["access"], root) != short, RENEW_CHECK_S * 5)
        before = loop.ok
        renewed = served(p["access"], root)
        renewed.verify_directly_issued_by(root)
        assert renewed.subject == short.subject
        assert renewed.not_valid_after_utc - short.not_valid_after_utc > RENEWAL_WINDOW
        _wait_for(lambda: served(p["proxy5263"], root) == renewed, 30)  # the proxy reloaded
        _wait_for(lambda: loop.ok >= before + 15, 60)
    finally:
        loop.stop.set()
        thread.join(timeout=60)
    assert loop.failures == [], loop.failures
    assert before > 0, "no request was made before the renewal"
    assert "renewed before expiry access-tls" in topo.log("access")
    print(
        f"Access certificate renewal: {loop.ok} requests on 443, Access and 5263"
        f" ({before} before the new certificate was served), 0 failed"
    )


def _health(topo: Topology, name: str) -> dict[str, Any]:
    port = topo.ports["access" if name == "access" else "proxy5262"]
    trust = topo.install_root if name == "access" else topo.public.root.cert
    ctx = _trusting(trust)
    with requests.Session() as session:
        session.mount("https://", _Adapter(ctx))
        body: dict[str, Any] = session.get(f"https://127.0.0.1:{port}/healthz", timeout=20).json()
    return body


def _trusted(topo: Topology) -> tuple[list[str], list[str]]:
    """Device Root thumbprints trusted by Access and by the cert proxy."""
    access = [r["thumbprint"] for r in _health(topo, "access")["trust"]["device_roots"]]
    proxy = [r["thumbprint"] for r in _health(topo, "certproxy")["device_roots"]]
    return access, proxy


def _rotate(org: Org, step: str, **kwargs: Any) -> dict[str, Any]:
    with org.console.client(org.console.admins["root"]) as admin:
        response = admin.post(ROTATION + step, **kwargs)
    assert response.status_code in (200, 201), response.text
    shown: dict[str, Any] = response.json()
    return shown


def _refused_at_handshake(topo: Topology, leaf: Leaf) -> bool:
    """The certificate step through HAProxy's 5262 ends in a TLS alert from the proxy."""
    session = android(topo, leaf)
    discovery = f"{topo.issuer}/.well-known/openid-configuration"
    metadata = session.get(discovery, withhold_token=True, timeout=30).json()
    url, _ = session.create_authorization_url(
        metadata["authorization_endpoint"], code_verifier="v" * 64, nonce="n"
    )
    location = session.get(url, allow_redirects=False, withhold_token=True, timeout=30)
    try:
        session.get(
            location.headers["location"], allow_redirects=False, withhold_token=True, timeout=30
        )
    except requests.exceptions.SSLError as exc:
        return "unknown ca" in str(exc).lower()
    return False


def test_access_and_the_proxy_follow_a_device_root_rotation(running: Running, org: Org) -> None:
    topo = running.topo
    old_device = org.compliant
    old_root = thumbprint(old_device.leaf.chain[0])
    assert _trusted(topo) == ([old_root], [old_root])
    _assert_valid_id_token(topo, sign_in(topo, old_device.leaf), old_device)

    new_root = _rotate(org, "", json={"overlap_s": 0})["new"]["thumbprint"]
    _wait_for(lambda: _trusted(topo) == ([old_root, new_root], [old_root, new_root]), 30)
    print("prepare: Access and the cert proxy trust both Device Roots")

    _rotate(org, "/switch")
    _wait_for(lambda: _trusted(topo) == ([new_root, old_root], [new_root, old_root]), 30)
    new_device = _wait_for_new_root_device(org, new_root)
    _assert_valid_id_token(topo, sign_in(topo, new_device.leaf), new_device)
    _assert_valid_id_token(topo, sign_in(topo, old_device.leaf), old_device)
    print("switch: a new-root device signs in through the cert proxy; the old-root one too")

    _rotate(org, "/finish", params={"force": "true"})
    _wait_for(lambda: _trusted(topo) == ([new_root], [new_root]), 30)
    assert _refused_at_handshake(topo, old_device.leaf)
    _assert_valid_id_token(topo, sign_in(topo, new_device.leaf), new_device)
    assert "client certificate rejected" in topo.log("certproxy")
    health = _health(topo, "access")
    assert health["trust"]["error"] is None and health["warnings"] == []
    print("finish: the old-root certificate is refused at the proxy's handshake")


def _wait_for_new_root_device(org: Org, new_root: str) -> Any:
    """A device enrolled now gets a new-root certificate (the console reads its CA rows
    again within a few seconds of the switch)."""
    deadline = time.monotonic() + 30
    while True:
        device = _enroll(org.console, "compliant")
        if thumbprint(device.leaf.chain[0]) == new_root:
            return device
        assert time.monotonic() < deadline, "the console still issues from the old root"
        time.sleep(1)
