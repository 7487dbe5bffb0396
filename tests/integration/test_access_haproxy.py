"""Android SSO by device certificate behind a real HAProxy, in every topology the planner emits.

Figure 1: 443 is SSL passthrough, so Access serves the publicly trusted certificate and the
cert proxy listens on 5262 only. Figure 2: the load balancer offloads 443 (re-encrypting to
Access's self-signed certificate), so the cert proxy also listens on 5263 with that
self-signed certificate. Re-encryption without 5263: the same 443, the cert proxy on 5262
only. HAProxy's configuration is ``certgate.planner.haproxy``'s, with its defaults: health
checks (``GET /healthz`` when re-encrypting) and PROXY v2 to every node. HAProxy connects
from 127.0.0.2 (``source``), the address Access and the cert proxy list as their load
balancer, while clients and the cert proxy's own hop to Access come from 127.0.0.1: so the
logs show whose address the nodes record.

Everything is a real process: the console (``certgate console serve``, SQLite), Access
(``certgate access init`` then ``serve``), the cert proxy (``certgate certproxy serve``)
and ``haproxy``. Devices enroll through the console API and get their certificate from a
Per-App Tunnel profile delivery; compliance is set through the admin API. The client is
authlib's OAuth 2.0 session (PKCE S256, state) over ``requests``, choosing its TLS client
certificate per origin like an Android client does; the ID token is verified with joserfc
against the published JWKS.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from requests.adapters import HTTPAdapter

from certgate.pki.keys import private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.planner.haproxy import HAProxyOptions, NodeAddress, emit
from certgate.planner.matrix import CertType, LBMode, Plan, decide
from certgate.protocol.proxy_protocol import Command, Family, ProxyHeader, Transport, encode
from certgate.tlsconf import pem_of
from tests.access.harness import ConsolePKI, Leaf, PublicPKI
from tests.support import (
    CERTGATE,
    RunningConsole,
    free_port,
    init_console,
    make_csr,
    start_console,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]

CLIENT_ID = "com.example.mail"
REDIRECT_URI = "com.example.mail:/oauth2redirect"
VIP = "access.example.com"
NODE = "node1.example.dmz"
START_TIMEOUT_S = 30.0
FIGURE_1 = decide("example.com", "example.dmz", CertType.SAN, LBMode.PASSTHROUGH)
FIGURE_2 = decide("example.com", "example.dmz", CertType.WILDCARD, LBMode.REENCRYPT)
REENCRYPT_NO_5263 = decide("example.com", "example.dmz", CertType.SAN, LBMode.REENCRYPT)
TOPOLOGIES = {
    "figure-1-passthrough": FIGURE_1,
    "figure-2-reencrypt": FIGURE_2,
    "reencrypt-without-5263": REENCRYPT_NO_5263,
}
LB_SOURCE = "127.0.0.2"  # what HAProxy connects from; the nodes' --load-balancer


@dataclass
class Device:
    uid: str
    leaf: Leaf


@dataclass
class Org:
    """The console, Access's read-only admin credentials, and enrolled devices."""

    console: RunningConsole
    work: Path
    compliant: Device
    noncompliant: Device
    access_admin: dict[str, Any]


def _ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def _enroll(console: RunningConsole, compliance: str, user: str = "alice") -> Device:
    with console.client() as anonymous:
        enrolled = _ok(
            anonymous.post(
                "/api/v1/enroll",
                json={"username": user, "password": f"{user}-password", "platform": "android"},
            ),
            201,
        )
    csr, key = make_csr()
    with console.client(api_key=enrolled["credential"]) as device:
        profile = _ok(device.post("/api/v1/device/profile", json={"csr": csr.decode()}), 201)
    with console.client(console.admins["root"]) as admin:
        _ok(
            admin.put(
                f"/api/v1/devices/{enrolled['device_uid']}/compliance", json={"status": compliance}
            )
        )
    cert = x509.load_pem_x509_certificate(profile["certificate"].encode())
    chain = tuple(x509.load_pem_x509_certificate(c.encode()) for c in profile["chain"][:1])
    return Device(enrolled["device_uid"], Leaf(cert, key, chain))


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Org]:
    with running_org(tmp_path_factory.mktemp("access-haproxy")) as running:
        yield running


@contextlib.contextmanager
def running_org(work: Path) -> Iterator[Org]:
    """A console with group android, Access's admin (role ``access``: device reads and
    shared sign-ins), a compliant and a noncompliant enrolled device."""
    data_dir, port = init_console(work)
    console = start_console(work, data_dir, port)
    try:
        console.make_admin("root", "superadmin", "global")
        with console.client(console.admins["root"]) as admin:
            _ok(admin.post("/api/v1/groups", json={"id": "android", "parent_id": "global"}), 201)
            access_admin = _ok(
                admin.post(
                    "/api/v1/admins",
                    json={"username": "access-svc", "role": "access", "group_id": "global"},
                ),
                201,
            )
            _ok(
                admin.post(
                    "/api/v1/groups/android/enrollment-users",
                    json={"username": "alice", "password": "alice-password"},
                ),
                201,
            )
        yield Org(
            console,
            work,
            _enroll(console, "compliant"),
            _enroll(console, "noncompliant"),
            access_admin,
        )
    finally:
        console.stop()


@dataclass
class Topology:
    """One figure's processes and how a client reaches them."""

    name: str
    plan: Plan
    work: Path
    public: PublicPKI
    ports: dict[str, int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.ports['lb443']}"

    @property
    def install_root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(
            (self.work / "access" / "install-root.pem").read_bytes()
        )

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on {port}:\n{log.read_text()}")


def _start(topo: Topology, name: str, args: list[str], port: int) -> None:
    log = topo.work / f"{name}.log"
    topo.logs[name] = log
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    topo.procs.append(proc)
    _wait_listening(port, proc, name, log)


def _access_init(topo: Topology, org: Org, mode: str) -> None:
    w, admin = topo.work, org.access_admin
    leaf = topo.public.leaf
    args = [
        *CERTGATE, "access", "init", "-d", str(w / "access"),
        "--issuer", topo.issuer,
        "--console-url", org.console.url,
        "--console-chain", str(org.console.chain_path),
        "--console-cert", str(_write(w / "admin.pem", admin["certificate"].encode())),
        "--console-key", str(_write(w / "admin.key", admin["private_key"].encode(), 0o600)),
        "--console-api-key-file", str(_write(w / "api-key", admin["api_key"].encode(), 0o600)),
        "--public-cert", str(_write(w / "public.pem", pem_of([leaf.cert, *leaf.chain]))),
        "--public-key", str(_write(w / "public.key", private_key_pem(leaf.key), 0o600)),
        "--client", f"{CLIENT_ID}={REDIRECT_URI}",
        "--mode", mode,
        "--certproxy-url", f"https://127.0.0.1:{topo.ports['lb5262']}",
        "--port", str(topo.ports["access"]),
        "--dns-name", NODE, "--dns-name", "localhost", "--ip-address", "127.0.0.1",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _haproxy_config(topo: Topology) -> Path:
    """The planner's configuration with its defaults; only ports and source are chosen."""
    p = topo.ports
    node = NodeAddress(NODE, "127.0.0.1", p["access"], p["proxy5262"], p.get("proxy5263"))
    options = HAProxyOptions(
        https_port=p["lb443"],
        certproxy_port=p["lb5262"],
        certproxy_secondary_port=p.get("lb5263", 5263),
        check_interval_s=1,
        source_address=LB_SOURCE,
    )
    if topo.plan.lb is LBMode.REENCRYPT:
        leaf = topo.public.leaf
        lb_pem = _write(
            topo.work / "lb.pem", pem_of([leaf.cert]) + private_key_pem(leaf.key), 0o600
        )
        ca_file = topo.work / "access" / "install-root.pem"
        config = emit(topo.plan, VIP, [node], str(lb_pem), ca_file=str(ca_file), options=options)
    else:
        config = emit(topo.plan, VIP, [node], None, options=options)
    return _write(topo.work / "haproxy.cfg", config.encode())


def _topology(org: Org, tmp: Path, name: str) -> Topology:
    plan = TOPOLOGIES[name]
    offload = plan.lb is LBMode.REENCRYPT
    names = ["lb443", "lb5262", "access", "proxy5262"]
    names += ["lb5263", "proxy5263"] if plan.port_5263_required else []
    public = PublicPKI.create((VIP,))
    topo = Topology(name, plan, tmp, public, {n: free_port() for n in names})
    _access_init(topo, org, "offload" if offload else "passthrough")
    p = topo.ports
    data = ["-d", str(tmp / "access"), "--load-balancer", LB_SOURCE]
    try:
        _start(topo, "access", [*CERTGATE, "access", "serve", *data], p["access"])
        proxy = [*CERTGATE, "certproxy", "serve", *data, "--port", str(p["proxy5262"])]
        proxy += ["--offload-port", str(p["proxy5263"])] if plan.port_5263_required else []
        _start(topo, "certproxy", proxy, p["proxy5262"])
        haproxy = ["haproxy", "-f", str(_haproxy_config(topo))]
        _start(topo, "haproxy", haproxy, p["lb443"])
        _wait_listening(p["lb5262"], topo.procs[-1], "haproxy", topo.logs["haproxy"])
    except Exception:
        topo.stop()
        raise
    return topo


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def topo(
    request: pytest.FixtureRequest, org: Org, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Topology]:
    built = _topology(org, tmp_path_factory.mktemp(request.param), request.param)
    try:
        yield built
    finally:
        built.stop()


class _TLSAdapter(HTTPAdapter):
    """A requests adapter with its own SSLContext: one trust store and client certificate
    per origin, the way an Android client picks its KeyChain certificate per server."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ctx
        super().init_poolmanager(*args, **kwargs)


def _context(trust: x509.Certificate, leaf: Leaf | None, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=trust.public_bytes(Encoding.PEM).decode())
    if leaf is not None:
        cert = _write(
            tmp / f"client-{thumbprint(leaf.cert)[:8]}.pem", pem_of([leaf.cert, *leaf.chain])
        )
        key = _write(cert.with_suffix(".key"), private_key_pem(leaf.key), 0o600)
        ctx.load_cert_chain(cert, key)
    return ctx


def android(topo: Topology, leaf: Leaf | None) -> OAuth2Session:
    """The relying party's OAuth client on the device; ``leaf`` is the device certificate
    it offers to the cert proxy (and only there)."""
    session = OAuth2Session(
        CLIENT_ID,
        redirect_uri=REDIRECT_URI,
        scope="openid",
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
    )
    public_root = topo.public.root.cert
    session.mount(topo.issuer + "/", _TLSAdapter(_context(public_root, None, topo.work)))
    cert_proxy = f"https://127.0.0.1:{topo.ports['lb5262']}/"
    session.mount(cert_proxy, _TLSAdapter(_context(public_root, leaf, topo.work)))
    if "lb5263" in topo.ports:  # 5263 shares Access's self-signed certificate
        secondary = f"https://127.0.0.1:{topo.ports['lb5263']}/"
        session.mount(secondary, _TLSAdapter(_context(topo.install_root, leaf, topo.work)))
    return session


@dataclass
class SignIn:
    session: OAuth2Session
    metadata: dict[str, Any]
    verifier: str
    nonce: str
    callback: str

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.callback).query)


def sign_in(
    topo: Topology, leaf: Leaf | None, via_port: str = "lb5262", *, fresh: bool = False
) -> SignIn:
    """Discovery, /authorize, then the certificate step at the cert proxy behind HAProxy;
    ``fresh``: every request of the session on a new connection (one balancing decision)."""
    session = android(topo, leaf)
    if fresh:
        session.headers["Connection"] = "close"
    discovery = f"{topo.issuer}/.well-known/openid-configuration"
    metadata = session.get(discovery, withhold_token=True, timeout=30).json()
    verifier, nonce = generate_token(64), generate_token(24)
    url, _ = session.create_authorization_url(
        metadata["authorization_endpoint"], code_verifier=verifier, nonce=nonce
    )
    to_proxy = session.get(url, allow_redirects=False, withhold_token=True, timeout=30)
    assert to_proxy.status_code == 302, to_proxy.text
    location = to_proxy.headers["location"]
    assert location.startswith(f"https://127.0.0.1:{topo.ports['lb5262']}/authorize/cert?req=")
    if via_port != "lb5262":
        location = location.replace(str(topo.ports["lb5262"]), str(topo.ports[via_port]), 1)
    back = session.get(location, allow_redirects=False, withhold_token=True, timeout=30)
    assert back.status_code == 302, back.text
    callback = back.headers["location"]
    assert callback.startswith(REDIRECT_URI + "?")
    return SignIn(session, metadata, verifier, nonce, callback)


def _assert_valid_id_token(topo: Topology, signin: SignIn, device: Device) -> None:
    token = signin.session.fetch_token(
        signin.metadata["token_endpoint"],
        authorization_response=signin.callback,
        code_verifier=signin.verifier,
    )
    jwks = signin.session.get(signin.metadata["jwks_uri"], withhold_token=True, timeout=30).json()
    id_token = jwt.decode(token["id_token"], KeySet.import_key_set(jwks), algorithms=["ES256"])
    JWTClaimsRegistry(
        iss={"essential": True, "value": topo.issuer},
        aud={"essential": True, "value": CLIENT_ID},
        sub={"essential": True, "value": device.uid},
        nonce={"essential": True, "value": signin.nonce},
        exp={"essential": True},
        iat={"essential": True},
    ).validate(id_token.claims)
    claims = id_token.claims
    assert claims["group"] == "android" and claims["platform"] == "android"
    assert claims["compliance"] == "compliant" and claims["owner"] == "alice"
    assert claims["cert_thumbprint"] == thumbprint(device.leaf.cert)


def test_every_backend_passes_its_health_check(topo: Topology) -> None:
    """HAProxy's checks (PROXY v2 LOCAL header, then TLS, and GET /healthz when
    re-encrypting) succeed on every backend: none is marked down."""
    backends = ["access_443_nodes", "certproxy_5262_nodes"]
    backends += ["certproxy_5263_nodes"] if topo.plan.port_5263_required else []
    layer = "Layer7" if topo.plan.lb is LBMode.REENCRYPT else "Layer4"
    passed = [f"{backend}/{NODE} succeeded" for backend in backends]
    _wait_for(lambda: all(line in topo.log("haproxy") for line in passed), 30)
    assert f"{backends[0]}/{NODE} succeeded, reason: {layer} check passed" in topo.log("haproxy")
    assert "failed" not in topo.log("haproxy") and " is DOWN" not in topo.log("haproxy")


def test_an_android_device_completes_the_sso_flow(topo: Topology, org: Org) -> None:
    signin = sign_in(topo, org.compliant.leaf)
    assert signin.query["iss"] == [topo.issuer]
    _assert_valid_id_token(topo, signin, org.compliant)
    assert f"admitted device {org.compliant.uid}" in topo.log("access")


def test_the_nodes_record_the_devices_address_not_the_balancers(topo: Topology, org: Org) -> None:
    """The cert proxy learns the device's address (127.0.0.1) from HAProxy's PROXY v2 header
    and passes it to Access, which logs it; 127.0.0.2 is only ever the relay."""
    sign_in(topo, org.compliant.leaf)
    forwarded = [line for line in topo.log("certproxy").splitlines() if "forwarded GET" in line]
    assert forwarded and all(f"via {LB_SOURCE}:" in line for line in forwarded), forwarded
    assert all(" from 127.0.0.1:" in line for line in forwarded), forwarded
    admitted = [line for line in topo.log("access").splitlines() if "admitted device" in line]
    assert admitted and all(line.endswith("via cert proxy for 127.0.0.1") for line in admitted)


def test_port_5263_exists_exactly_when_the_plan_requires_it(topo: Topology, org: Org) -> None:
    """Figure 2's certificate step also works on 5263, with Access's self-signed certificate."""
    config = (topo.work / "haproxy.cfg").read_text()
    if "lb5263" not in topo.ports:
        assert not topo.plan.port_5263_required and "certproxy_5263" not in config
        assert "cert proxy 5263 listening" not in topo.log("certproxy")
        return
    assert topo.plan.port_5263_required and "frontend certproxy_5263" in config
    assert "cert proxy 5263 listening" in topo.log("certproxy")
    signin = sign_in(topo, org.compliant.leaf, via_port="lb5263")
    _assert_valid_id_token(topo, signin, org.compliant)


def test_a_noncompliant_device_is_refused(topo: Topology, org: Org) -> None:
    query = sign_in(topo, org.noncompliant.leaf).query
    assert query["error"] == ["access_denied"]
    assert query["error_description"] == ["device is not compliant (status: noncompliant)"]
    assert "code" not in query
    assert "device is not compliant (status: noncompliant)" in topo.log("access")


def test_no_certificate_at_all_is_refused(topo: Topology) -> None:
    query = sign_in(topo, None).query
    assert query["error"] == ["access_denied"]
    assert query["error_description"] == ["no device certificate was presented to the cert proxy"]


def test_a_certificate_from_another_ca_is_refused(topo: Topology) -> None:
    stranger = ConsolePKI().device()
    with pytest.raises(requests.exceptions.SSLError, match="unknown ca"):
        sign_in(topo, stranger)
    _wait_for(lambda: "client certificate rejected" in topo.log("certproxy"))


@pytest.mark.parametrize("port", ["access", "lb443"])
def test_a_forged_client_cert_header_sent_to_access_is_refused(
    topo: Topology, org: Org, port: str
) -> None:
    """Straight to Access's own port, and through the load balancer's 443."""
    der = org.compliant.leaf.cert.public_bytes(Encoding.DER)
    forged = {"Client-Cert": f":{base64.b64encode(der).decode()}:"}
    offloaded = topo.plan.lb is LBMode.REENCRYPT and port == "access"
    trust = topo.install_root if offloaded else topo.public.root.cert
    response = requests.get(
        f"https://127.0.0.1:{topo.ports[port]}/authorize/cert?req=anything",
        headers=forged,
        verify=_write(topo.work / "trust.pem", trust.public_bytes(Encoding.PEM)),
        timeout=30,
    )
    assert response.status_code == 403
    assert response.json()["error"] == "client_cert_not_accepted"
    _wait_for(lambda: "Client-Cert header on a connection that is not" in topo.log("access"))
    denials = [line for line in topo.log("access").splitlines() if "Client-Cert header" in line]
    # Through HAProxy or not, Access names the client (via PROXY v2), never the balancer.
    assert denials and all(" from 127.0.0.1:" in line for line in denials), denials


def test_a_proxy_header_from_a_peer_that_is_not_the_balancer_is_refused(
    topo: Topology,
) -> None:
    """127.0.0.1 is not a configured load balancer: its header claiming another address is
    refused at Access and at the cert proxy, and logged."""
    header = encode(
        ProxyHeader(
            Command.PROXY, Family.INET, Transport.STREAM, ("198.51.100.9", 1), ("127.0.0.1", 443)
        )
    )
    for name, port in (("access", topo.ports["access"]), ("certproxy", topo.ports["proxy5262"])):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall(header + b"\x16\x03\x01\x00\x05hello")
            # Closed without a TLS answer: a FIN, or a reset since our bytes were left unread.
            with contextlib.suppress(ConnectionResetError):
                assert raw.recv(1024) == b""
        _wait_for(
            lambda n=name: "PROXY header from a peer that is not a load balancer" in topo.log(n)
        )


def _wait_for(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {seconds} s"
        time.sleep(0.05)
