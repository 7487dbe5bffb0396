"""Scenario: rotations without downtime, on real processes.

A console, two tunnel nodes behind a real HAProxy, a loop of real curl clients (Proxy
mode) through HAProxy, and live CONNECT tunnels (one to each node, one through HAProxy)
to a real echo server, which exchange data after every step. Shown, in order:

* tunnel-identity rotation by the CLI and the API: prepare (both nodes hold the next
  identity, still present the old one), switch (both nodes present the new one to new
  connections and to the console, and stored it), finish (refused while the overlap
  runs, then done; the old identity is refused by the console with what to do);
  0 failed curl requests and 0 closed live tunnels throughout (counted, printed);
* a change of the group's tunnel names is a rotation too: the nodes present the new
  names without a failed request, and a device made noncompliant during that rotation
  is refused within the usual time to enforce;
* console-identity rotation: announced in a batch the old identity signs, pinned by the
  nodes at the switch, the feed signed by the new one enforced as before (a blocked
  device's live tunnels closed); 0 failed curl requests and 0 closed live tunnels;
* a node restart and a console restart between prepare and switch, a node restart after
  the switch (it serves the identity it stored), and a node down for the whole rotation:
  refused by the console with what to do, and serving again once that is done.
"""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from certgate.pki.keys import private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.config import load_identity
from tests.integration.cluster import (
    GROUP,
    Cluster,
    Node,
    closed_within,
    curl,
    enroll_app,
    setup_node,
    start_cluster,
    start_node,
    stop_node,
)
from tests.support import CERTGATE
from tests.tunnel.dataplane import PAGE

pytestmark = pytest.mark.integration

STEP_TIMEOUT_S = 60  # generous: nodes act on their next long-poll answer (milliseconds)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@dataclass
class CurlLoop:
    """Real curl clients through HAProxy, one after another, until stopped."""

    cluster: Cluster
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            result = curl(self.cluster)
            if result.returncode == 0 and result.stdout.encode() == PAGE:
                self.ok += 1
            else:
                self.failures.append(f"rc={result.returncode} {result.stderr.strip()[:200]}")


@dataclass
class LiveTunnel:
    name: str
    tls: ssl.SSLSocket
    exchanges: int = 0

    def exchange(self) -> None:
        """Data both ways over the open tunnel; raises if it was closed."""
        message = f"{self.name} #{self.exchanges}\n".encode()
        self.tls.sendall(message)
        received = b""
        while len(received) < len(message):
            chunk = self.tls.recv(4096)
            assert chunk, f"live tunnel {self.name} was closed"
            received += chunk
        assert received == message
        self.exchanges += 1


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("rotation")) as running:
        yield running


@pytest.fixture
def traffic(cluster: Cluster, echo_port: int) -> Iterator[tuple[CurlLoop, list[LiveTunnel]]]:
    """The curl loop running and three live tunnels open for the length of a test."""
    loop = CurlLoop(cluster)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    ports = {n.name: n.proxy_port for n in cluster.nodes} | {"haproxy": cluster.haproxy_port}
    tunnels = [LiveTunnel(name, connect(cluster, port, echo_port)) for name, port in ports.items()]
    try:
        yield loop, tunnels
    finally:
        loop.stop.set()
        thread.join(timeout=60)
        for tunnel in tunnels:
            tunnel.tls.close()


def connect(
    cluster: Cluster, port: int, target_port: int, cert: tuple[Path, Path] | None = None
) -> ssl.SSLSocket:
    """A live CONNECT tunnel to ``target_port`` (the cluster's app certificate unless
    ``cert`` names another)."""
    ctx = ssl.create_default_context(cafile=str(cluster.work / "chain.pem"))
    ctx.load_cert_chain(*(cert or (cluster.app_cert, cluster.app_key)))
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    try:
        tls.sendall(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            assert chunk, "tunnel closed during CONNECT"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
    except BaseException:
        tls.close()
        raise
    return tls


def admits(cluster: Cluster, port: int, target_port: int, cert: tuple[Path, Path]) -> bool:
    try:
        connect(cluster, port, target_port, cert).close()
    except (AssertionError, ssl.SSLError, ConnectionError):
        return False
    return True


def served_cert(cluster: Cluster, node: Node, server_name: str = "localhost") -> x509.Certificate:
    """The tunnel identity a node presents to a new connection now."""
    ctx = ssl.create_default_context(cafile=str(cluster.work / "chain.pem"))
    ctx.load_cert_chain(cluster.app_cert, cluster.app_key)
    with (
        socket.create_connection(("127.0.0.1", node.proxy_port), timeout=15) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def served_thumbprint(cluster: Cluster, node: Node) -> str:
    return thumbprint(served_cert(cluster, node))


def healthy(node: Node) -> bool:
    """The node answers /healthz with 200 (fresh); False while it is not listening yet."""
    try:
        return node.health().status_code == 200
    except httpx.HTTPError:
        return False


def last_error(node: Node) -> str:
    """The node's last sync error ('' while it is not listening yet)."""
    try:
        return str(sync_status(node)["last_error"])
    except httpx.HTTPError:
        return ""


def sync_status(node: Node) -> dict[str, Any]:
    sync = node.health().json()["sync"]
    assert isinstance(sync, dict)
    return sync


def wait_until(what: str, check: Callable[[], bool], timeout: float = STEP_TIMEOUT_S) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CERTGATE, "console", "rotate", *args, "-d", str(cluster.console.data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def noncompliant_closes(cluster: Cluster, uid: str, tunnels: list[ssl.SSLSocket]) -> float:
    """Mark ``uid`` noncompliant: every one of its live ``tunnels`` must close. Returns the
    milliseconds from the API call to the last close."""
    with admin(cluster) as client:
        changed_at = time.monotonic()
        client.put(
            f"/api/v1/devices/{uid}/compliance", json={"status": "noncompliant"}
        ).raise_for_status()
    closed = [closed_within(t, 15) for t in tunnels]
    enforce_ms = (time.monotonic() - changed_at) * 1000
    for tls in tunnels:
        tls.close()
    assert all(c is not None for c in closed), "a live tunnel of the noncompliant device stayed"
    return enforce_ms


def new_device_refused_when_noncompliant(cluster: Cluster, echo_port: int, rotation: str) -> None:
    """A device enrolled during a rotation is admitted by both nodes; made noncompliant, it
    loses its live tunnels on both and is refused, within the usual time to enforce
    (printed)."""
    uid, cert, key = enroll_app(cluster.console, cluster.work, "eve")
    wait_until(
        "both nodes admit the new device",
        lambda: all(admits(cluster, n.proxy_port, echo_port, (cert, key)) for n in cluster.nodes),
    )
    theirs = [connect(cluster, n.proxy_port, echo_port, (cert, key)) for n in cluster.nodes]
    enforce_ms = noncompliant_closes(cluster, uid, theirs)
    assert not admits(cluster, cluster.haproxy_port, echo_port, (cert, key))
    print(f"time to enforce during the {rotation} rotation: {enforce_ms:.0f} ms")


def admin(cluster: Cluster) -> httpx.Client:
    return cluster.console.client(cluster.console.admins["root"])


def tunnel_identity_of(cluster: Cluster) -> str:
    with admin(cluster) as client:
        nodes = client.get(f"/api/v1/groups/{GROUP}/certificates").json()
    current = [c for c in nodes if c["kind"] == "tunnel-identity" and not c["revoked_at"]]
    return str(current[-1]["thumbprint"])


def running_rotation(cluster: Cluster) -> dict[str, Any]:
    with admin(cluster) as client:
        shown = client.get(f"/api/v1/groups/{GROUP}/rotations").json()
    assert isinstance(shown[0], dict)
    return shown[0]


def rotation_of(cluster: Cluster, kind: str) -> dict[str, Any]:
    """The newest rotation of ``kind`` as the group's rotation status shows it."""
    with admin(cluster) as client:
        shown = client.get(f"/api/v1/groups/{GROUP}/rotations").json()
    found: dict[str, Any] = next(r for r in shown if r["kind"] == kind)
    return found


def feed_call_with(cluster: Cluster, cert: Path, key: Path) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(cluster.work / "instance-root.pem"))
    ctx.load_cert_chain(cert, key)
    with httpx.Client(base_url=cluster.console.url, verify=ctx, timeout=30) as client:
        return client.get("/api/v1/tunnel/feed", params={"after": 0, "wait": 0, "version": 3})


def report(step: str, loop: CurlLoop, tunnels: list[LiveTunnel]) -> None:
    for tunnel in tunnels:
        tunnel.exchange()
    print(
        f"{step}: curl ok={loop.ok} failed={len(loop.failures)};"
        f" live tunnels open={len(tunnels)} closed=0"
    )


def test_tunnel_identity_rotation_without_a_failed_connection(
    cluster: Cluster, traffic: tuple[CurlLoop, list[LiveTunnel]], tmp_path: Path
) -> None:
    loop, tunnels = traffic
    node = cluster.nodes[0]
    old_cert, old_key = tmp_path / "old.pem", tmp_path / "old.key"
    old_cert.write_bytes((node.state_dir / "tunnel.pem").read_bytes())
    # The node keeps its key sealed; the test plays a thief holding the old pair in clear.
    old_key.write_bytes(private_key_pem(load_identity(node.state_dir)))
    old = thumbprint(x509.load_pem_x509_certificate(old_cert.read_bytes()))
    wait_until("the loop has made requests", lambda: loop.ok >= 3)

    prepared = cli(cluster, "tunnel-identity", GROUP, "--overlap", "15s")
    assert prepared.returncode == 0, prepared.stderr
    new = json.loads(prepared.stdout)["new"]["thumbprint"]
    took = wait_until(
        "both nodes hold the next identity",
        lambda: all(sync_status(n)["next_tunnel_identity"] == new for n in cluster.nodes),
    )
    assert all(served_thumbprint(cluster, n) == old for n in cluster.nodes)
    wait_until(
        "the status shows both nodes with the new identity",
        lambda: all(n["has_new"] for n in running_rotation(cluster)["nodes"]),
    )
    report(f"prepare (nodes held it after {took * 1000:.0f} ms)", loop, tunnels)

    with admin(cluster) as client:
        early = client.post(f"/api/v1/groups/{GROUP}/rotations/tunnel-identity/finish")
        assert early.status_code == 409, early.text
        assert "cannot finish: the rotation is prepared" in early.json()["detail"]
        client.post(f"/api/v1/groups/{GROUP}/rotations/tunnel-identity/switch").raise_for_status()
        # At once, while the 15 s overlap surely runs (a loaded machine may take longer
        # than that over the waits below).
        refused = client.post(f"/api/v1/groups/{GROUP}/rotations/tunnel-identity/finish")
        assert refused.status_code == 409, refused.text
        assert "the overlap runs until" in refused.json()["detail"]
    took = wait_until(
        "both nodes present the new identity to new connections",
        lambda: all(served_thumbprint(cluster, n) == new for n in cluster.nodes),
    )
    for each in cluster.nodes:
        stored = x509.load_pem_x509_certificate((each.state_dir / "tunnel.pem").read_bytes())
        assert thumbprint(stored) == new
        assert sync_status(each)["tunnel_identity"] == new
    wait_until(
        "both nodes call the console with the new identity",
        lambda: all(n["presents"] == "new" for n in running_rotation(cluster)["nodes"]),
    )
    report(f"switch (nodes swapped after {took * 1000:.0f} ms)", loop, tunnels)

    wait_until(
        "the overlap has passed",
        lambda: cli(cluster, "finish", "tunnel-identity", GROUP).returncode == 0,
    )
    assert running_rotation(cluster)["phase"] == "finished"
    time.sleep(3)  # traffic keeps flowing after finish (the loop counts every request)
    report("finish", loop, tunnels)

    answer = feed_call_with(cluster, old_cert, old_key)
    assert answer.status_code == 401, answer.text
    assert "retired by rotation" in answer.json()["detail"]
    assert "run 'certgate tunnel setup'" in answer.json()["detail"]
    assert tunnel_identity_of(cluster) == new
    metrics = node.metrics()
    assert 'certgate_tunnel_certificate_expires_seconds{certificate="tunnel-identity"}' in metrics
    assert "certgate_tunnel_identity_swaps_total 1.0" in metrics
    assert node.health().json()["warnings"] == []  # fresh certificates: none due
    stored_cert = x509.load_pem_x509_certificate((node.state_dir / "tunnel.pem").read_bytes())
    assert load_identity(node.state_dir).public_key() == stored_cert.public_key()
    assert loop.failures == [], loop.failures
    print(f"tunnel-identity rotation: {loop.ok} curl requests, 0 failed; 3 live tunnels, 0 closed")


def test_a_tunnel_name_change_is_a_rotation_and_enforcement_goes_on(
    cluster: Cluster, traffic: tuple[CurlLoop, list[LiveTunnel]], echo_port: int
) -> None:
    loop, tunnels = traffic
    uid, cert, key = enroll_app(cluster.console, cluster.work, "eve")
    wait_until(
        "both nodes admit the second device",
        lambda: all(admits(cluster, n.proxy_port, echo_port, (cert, key)) for n in cluster.nodes),
    )
    old = served_thumbprint(cluster, cluster.nodes[0])
    names = {"tunnel": {"hostnames": ["localhost", "tunnel.example"]}}
    with admin(cluster) as client:
        client.patch(f"/api/v1/groups/{GROUP}/settings", json=names).raise_for_status()
        again = client.patch(
            f"/api/v1/groups/{GROUP}/settings", json={"tunnel": {"hostnames": ["localhost"]}}
        )
    assert again.status_code == 409 and "finish it before" in again.json()["detail"], again.text
    rotation = running_rotation(cluster)
    assert (rotation["kind"], rotation["phase"]) == ("tunnel-identity", "switched")

    # A device made noncompliant while the rotation runs loses its live tunnels on both
    # nodes and is refused, within the usual time to enforce.
    theirs = [connect(cluster, n.proxy_port, echo_port, (cert, key)) for n in cluster.nodes]
    enforce_ms = noncompliant_closes(cluster, uid, theirs)
    print(f"time to enforce during the rotation: {enforce_ms:.0f} ms")
    assert not admits(cluster, cluster.haproxy_port, echo_port, (cert, key))

    took = wait_until(
        "both nodes present the new names",
        lambda: all(served_thumbprint(cluster, n) != old for n in cluster.nodes),
    )
    for node in cluster.nodes:
        names_in_cert = (
            served_cert(cluster, node)
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value.get_values_for_type(x509.DNSName)
        )
        assert "tunnel.example" in names_in_cert
    report(f"tunnel names changed (nodes swapped after {took * 1000:.0f} ms)", loop, tunnels)
    wait_until(
        "both nodes call the console with the new identity",
        lambda: all(n["presents"] == "new" for n in running_rotation(cluster)["nodes"]),
    )
    refused = cli(cluster, "finish", "tunnel-identity", GROUP)
    assert refused.returncode == 1 and "the overlap runs until" in refused.stderr, refused
    forced = cli(cluster, "finish", "tunnel-identity", GROUP, "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["forced"] is True
    with admin(cluster) as client:
        audit = client.get("/api/v1/audit", params={"group_id": GROUP}).json()
    assert any(entry["action"] == "rotation.finish.forced" for entry in audit)
    report("finish (forced)", loop, tunnels)
    assert loop.failures == [], loop.failures
    print(f"tunnel name rotation: {loop.ok} curl requests, 0 failed; 3 live tunnels, 0 closed")


def test_console_identity_rotation_without_a_failed_connection(
    cluster: Cluster, traffic: tuple[CurlLoop, list[LiveTunnel]], echo_port: int
) -> None:
    loop, tunnels = traffic
    old = thumbprint(
        x509.load_pem_x509_certificate(
            (cluster.nodes[0].state_dir / "console-identity.pem").read_bytes()
        )
    )
    base = f"/api/v1/groups/{GROUP}/rotations/console-identity"
    with admin(cluster) as client:
        prepared = client.post(base, json={"overlap_s": 0})
    assert prepared.status_code == 201, prepared.text
    new = prepared.json()["new"]["thumbprint"]
    took = wait_until(
        "both nodes hold the announced console identity",
        lambda: all(sync_status(n)["next_console_identity"] == new for n in cluster.nodes),
    )
    assert all(sync_status(n)["console_identity"] == old for n in cluster.nodes)
    report(f"prepare (nodes held it after {took * 1000:.0f} ms)", loop, tunnels)

    switched = cli(cluster, "switch", "console-identity", GROUP)
    assert switched.returncode == 0, switched.stderr
    took = wait_until(
        "both nodes pin the new console identity",
        lambda: all(sync_status(n)["console_identity"] == new for n in cluster.nodes),
    )
    for node in cluster.nodes:
        pinned = (node.state_dir / "console-identity.pem").read_bytes()
        assert thumbprint(x509.load_pem_x509_certificate(pinned)) == new
    report(f"switch (nodes pinned it after {took * 1000:.0f} ms)", loop, tunnels)

    # Batches are now signed by the new identity, and nodes enforce them as before.
    uid, cert, key = enroll_app(cluster.console, cluster.work, "fred")
    wait_until(
        "both nodes admit the new device (a batch the new identity signed)",
        lambda: all(admits(cluster, n.proxy_port, echo_port, (cert, key)) for n in cluster.nodes),
    )
    theirs = [connect(cluster, n.proxy_port, echo_port, (cert, key)) for n in cluster.nodes]
    with admin(cluster) as client:
        changed_at = time.monotonic()
        client.post(f"/api/v1/devices/{uid}/block").raise_for_status()
    closed = [closed_within(t, 15) for t in theirs]
    enforce_ms = (time.monotonic() - changed_at) * 1000
    for tls in theirs:
        tls.close()
    assert all(c is not None for c in closed), "a blocked device's live tunnel stayed open"
    print(f"time to enforce after the console identity switch: {enforce_ms:.0f} ms")

    wait_until(
        "the status shows both nodes on the new console identity",
        lambda: all(n["presents"] == "new" for n in running_rotation(cluster)["nodes"]),
    )
    finished = cli(cluster, "finish", "console-identity", GROUP)
    assert finished.returncode == 0, finished.stderr
    time.sleep(3)  # traffic keeps flowing after finish (the loop counts every request)
    report("finish", loop, tunnels)
    assert all(sync_status(n)["last_error"] is None for n in cluster.nodes)
    assert loop.failures == [], loop.failures
    print(f"console-identity rotation: {loop.ok} curl requests, 0 failed; 3 live tunnels, 0 closed")


def test_restarts_during_a_rotation_and_a_node_down_for_all_of_it(cluster: Cluster) -> None:
    """Node and console restarts in the middle change nothing; a node down for the whole
    rotation is refused by the console with what to do, and recovers by doing it."""
    late = setup_node(cluster.work, cluster.console, "node-3")
    started: list[Node] = [late]
    try:
        start_node(late, cluster.work)
        wait_until("node-3 is fresh", lambda: healthy(late))
        stop_node(late)  # down from before prepare until after finish
        base = f"/api/v1/groups/{GROUP}/rotations/tunnel-identity"
        with admin(cluster) as client:
            prepared = client.post(base, json={"overlap_s": 0})
        assert prepared.status_code == 201, prepared.text
        new = prepared.json()["new"]["thumbprint"]

        first, second = cluster.nodes
        stop_node(first)  # a node restart between prepare and switch
        start_node(first, cluster.work)
        cluster.console.stop()  # and a console restart
        cluster.restart_console()
        with admin(cluster) as client:
            client.post(base + "/switch").raise_for_status()
        wait_until(
            "both nodes present the new identity",
            lambda: all(served_thumbprint(cluster, n) == new for n in cluster.nodes),
        )
        stop_node(second)  # a restart after the switch serves what the node stored
        start_node(second, cluster.work)
        assert served_thumbprint(cluster, second) == new
        assert sync_status(second)["tunnel_identity"] == new
        wait_until("curl passes both nodes", lambda: curl(cluster).stdout.encode() == PAGE)

        with admin(cluster) as client:
            refused = client.post(base + "/finish")
            assert refused.status_code == 409, refused.text
            assert "node node-3 still presents the old identity" in refused.json()["detail"]
            client.post(base + "/finish", params={"force": "true"}).raise_for_status()

        start_node(late, cluster.work)  # back after the overlap, with the retired identity
        wait_until(
            "node-3 says what to do",
            lambda: "run 'certgate tunnel setup'" in last_error(late),
        )
        print(f"node down for the whole rotation: {last_error(late)}")
        said = sync_status(late)["action_required"]  # in /healthz, where operators look
        assert f"run 'certgate tunnel setup' for group {GROUP} again" in said
        assert said in late.health().json()["warnings"]
        stop_node(late)
        late = setup_node(cluster.work, cluster.console, "node-3")  # what it said to do
        started.append(late)
        start_node(late, cluster.work)
        wait_until(
            "node-3 serves the new identity and is fresh",
            lambda: healthy(late) and served_thumbprint(cluster, late) == new,
        )
    finally:
        for node in started:
            stop_node(node)
