"""Scenario: console + two tunnel nodes of one group behind a real HAProxy (TCP passthrough),
real curl as the Proxy-mode client, a real origin.

Shows, in order: both nodes got the same tunnel certificate and admit the same device;
a console restart does not interrupt admission; a compliance change closes live tunnels on
both nodes and refuses the next request (time to enforce printed); with the console gone
past the staleness budget the tunnels fail closed, and recover when it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from certgate.console.services import ca
from certgate.pki.keys import load_private_key_pem, private_key_pem
from tests.support import (
    CERTGATE,
    RunningConsole,
    free_port,
    init_console,
    make_csr,
    start_console,
    wait_for_tls_port,
)
from tests.tunnel.dataplane import PAGE, Origin

pytestmark = pytest.mark.integration

GROUP = "ha"
APP = "com.example.browser"
P12_PASSWORD = "p12-password-for-tests"


@dataclass
class Node:
    name: str
    state_dir: Path
    proxy_port: int
    per_app_port: int
    admin_port: int
    proc: subprocess.Popen[bytes] | None = None

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10).text

    def health(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=10)


@dataclass
class Cluster:
    work: Path
    console: RunningConsole
    nodes: list[Node]
    haproxy_port: int
    origin: Origin
    device_uid: str
    app_cert: Path
    app_key: Path

    def restart_console(self) -> None:
        restarted = start_console(self.work, self.console.data_dir, self.console.port)
        restarted.admins = self.console.admins
        self.console = restarted


def _setup_node(cluster_work: Path, console: RunningConsole, name: str) -> Node:
    node = Node(name, cluster_work / name, free_port(), free_port(), free_port())
    admin = console.admins["setup"]
    subprocess.run(
        [
            *CERTGATE,
            "tunnel",
            "setup",
            "--console",
            console.url,
            "--group",
            GROUP,
            "--api-key",
            admin.api_key,
            "--admin-cert",
            str(cluster_work / "setup.p12"),
            "--p12-password",
            P12_PASSWORD,
            "--ca-file",
            str(cluster_work / "instance-root.pem"),
            "--state-dir",
            str(node.state_dir),
            "--node-name",
            name,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return node


def _start_node(node: Node, work: Path) -> None:
    with (work / f"{node.name}.log").open("ab") as log:
        node.proc = _popen_node(node, log)
    wait_for_tls_port(node.proxy_port, node.proc, 30)


def _popen_node(node: Node, log: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *CERTGATE,
            "tunnel",
            "run",
            "--state-dir",
            str(node.state_dir),
            "--proxy-listen",
            f"127.0.0.1:{node.proxy_port}",
            "--per-app-listen",
            f"127.0.0.1:{node.per_app_port}",
            "--admin-listen",
            f"127.0.0.1:{node.admin_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _haproxy(work: Path, nodes: list[Node]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    servers = "\n".join(
        f"  server {n.name} 127.0.0.1:{n.proxy_port} check inter 500ms" for n in nodes
    )
    config = work / "haproxy.cfg"
    config.write_text(f"""global
  maxconn 2000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend tunnel_proxy
  bind 127.0.0.1:{port}
  default_backend tunnel_nodes
backend tunnel_nodes
  balance roundrobin
{servers}
""")
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_tls_port(port, proc, 30)
    return proc, port


def _enroll_app(console: RunningConsole, work: Path) -> tuple[str, Path, Path]:
    root = console.admins["root"]
    with console.client(root) as admin:
        admin.post(
            f"/api/v1/groups/{GROUP}/enrollment-users",
            json={"username": "dora", "password": "dora-password"},
        ).raise_for_status()
    with console.client() as anon:
        device = anon.post(
            "/api/v1/enroll",
            json={"username": "dora", "password": "dora-password", "platform": "android"},
        ).json()
    csr, key = make_csr()
    with console.client(api_key=device["credential"]) as dev:
        issued = dev.post(
            f"/api/v1/device/apps/{APP}/certificate",
            json={"username": "dora", "password": "dora-password", "csr": csr.decode()},
        ).json()
    cert_path, key_path = work / "app.pem", work / "app.key"
    cert_path.write_text(issued["certificate"])
    key_path.write_bytes(private_key_pem(key))
    return device["device_uid"], cert_path, key_path


def _write_setup_p12(console: RunningConsole, work: Path) -> None:
    creds = console.admins["setup"]
    cert = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    key = load_private_key_pem(creds.key_path.read_bytes())
    (work / "setup.p12").write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"setup", key, cert, None, BestAvailableEncryption(P12_PASSWORD.encode())
        )
    )
    with console.local() as (_, pki):
        (work / "instance-root.pem").write_text(ca.pem(pki.certs[ca.ROOT]))
        (work / "chain.pem").write_text(
            ca.pem(pki.certs[ca.SECURE_CHANNEL_ROOT]) + ca.pem(pki.certs[ca.ROOT])
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Everything started is registered for cleanup at once, so a failure halfway through
    setup leaves no process behind."""
    work = tmp_path_factory.mktemp("ha")
    with contextlib.ExitStack() as cleanup:
        data_dir, port = init_console(work)
        holder: dict[str, RunningConsole] = {"console": start_console(work, data_dir, port)}
        cleanup.callback(lambda: holder["console"].stop())
        console = holder["console"]
        console.make_admin("root", "superadmin", "global")
        _create_group(console)
        console.make_admin("setup", "tunnel-setup", GROUP)
        _write_setup_p12(console, work)
        nodes = [_setup_node(work, console, name) for name in ("node-1", "node-2")]
        for node in nodes:
            cleanup.callback(_stop_node, node)
            _start_node(node, work)
        haproxy, hport = _haproxy(work, nodes)
        cleanup.callback(_stop, haproxy)
        device_uid, cert, key = _enroll_app(console, work)
        origin = cleanup.enter_context(Origin())
        cluster = Cluster(work, console, nodes, hport, origin, device_uid, cert, key)
        cleanup.callback(lambda: holder.update(console=cluster.console))  # after restarts
        _wait_admitted_everywhere(cluster)
        yield cluster


def _create_group(console: RunningConsole) -> None:
    settings = {
        "initial_compliance": "compliant",
        "feed": {"long_poll_s": 2, "max_staleness_s": 10},
        "server_rules": {
            "default": "deny",
            "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
        },
    }
    with console.client(console.admins["root"]) as admin:
        admin.post(
            "/api/v1/groups", json={"id": GROUP, "parent_id": "global", "settings": settings}
        ).raise_for_status()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=40)


def _stop_node(node: Node) -> None:
    if node.proc is not None:
        _stop(node.proc)


def curl(
    cluster: Cluster, *extra: str, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            *extra,
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            f"https://localhost:{port or cluster.haproxy_port}",
            "--proxy-cacert",
            str(cluster.work / "chain.pem"),
            "--proxy-cert",
            str(cluster.app_cert),
            "--proxy-key",
            str(cluster.app_key),
            f"http://127.0.0.1:{cluster.origin.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _wait_admitted_everywhere(cluster: Cluster, timeout: float = 30) -> None:
    """Both nodes learn the device through their feeds; wait (bounded) until they do."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(
            curl(cluster, port=node.proxy_port).stdout.encode() == PAGE for node in cluster.nodes
        ):
            return
        time.sleep(0.2)
    raise AssertionError("nodes never admitted the enrolled device")


def _admissions(node: Node) -> float:
    match = re.search(
        r'certgate_tunnel_admissions_total\{mode="proxy"\} ([0-9.e+]+)', node.metrics()
    )
    return float(match.group(1)) if match else 0.0


def test_nodes_share_the_group_tunnel_certificate(cluster: Cluster) -> None:
    certs = [(n.state_dir / "tunnel.pem").read_bytes() for n in cluster.nodes]
    assert certs[0] == certs[1]


def test_curl_through_haproxy_reaches_both_nodes(cluster: Cluster) -> None:
    before = [_admissions(n) for n in cluster.nodes]
    for _ in range(6):
        result = curl(cluster)
        assert result.returncode == 0, result.stderr
        assert result.stdout.encode() == PAGE
    after = [_admissions(n) for n in cluster.nodes]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_console_restart_does_not_interrupt_admission(cluster: Cluster) -> None:
    cluster.console.stop()
    try:
        for _ in range(4):
            result = curl(cluster)
            assert result.stdout.encode() == PAGE, result.stderr
    finally:
        cluster.restart_console()
    assert curl(cluster).stdout.encode() == PAGE


def _open_tunnel(cluster: Cluster, node: Node) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cluster.work / "chain.pem"))
    ctx.load_cert_chain(cluster.app_cert, cluster.app_key)
    raw = socket.create_connection(("127.0.0.1", node.proxy_port), timeout=15)
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(f"CONNECT 127.0.0.1:{cluster.origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert tls.recv(4096).startswith(b"HTTP/1.1 200")
    return tls


def _closed_within(tls: ssl.SSLSocket, timeout: float) -> float | None:
    tls.settimeout(timeout)
    start = time.monotonic()
    try:
        data = tls.recv(4096)
    except (ssl.SSLError, ConnectionError):
        data = b""
    except TimeoutError:
        return None
    return time.monotonic() - start if data == b"" else None


def test_compliance_change_closes_live_tunnels_on_both_nodes(cluster: Cluster) -> None:
    tunnels = [_open_tunnel(cluster, node) for node in cluster.nodes]
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        changed_at = time.monotonic()
        admin.put(
            f"/api/v1/devices/{cluster.device_uid}/compliance", json={"status": "noncompliant"}
        ).raise_for_status()
    closed = [_closed_within(t, 15) for t in tunnels]
    enforce_ms = (time.monotonic() - changed_at) * 1000
    for tls in tunnels:
        tls.close()
    assert all(c is not None for c in closed), "a live tunnel stayed open"
    print(f"time to enforce on both nodes: {enforce_ms:.0f} ms")
    refused = curl(cluster, "-w", " %{http_code}")
    assert refused.stdout == "certgate: noncompliant\n 403", refused
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        admin.put(
            f"/api/v1/devices/{cluster.device_uid}/compliance", json={"status": "compliant"}
        ).raise_for_status()
    _wait_admitted_everywhere(cluster)


def test_server_rule_change_closes_live_tunnels_on_both_nodes(cluster: Cluster) -> None:
    """Policy is feed content: a rules PATCH reaches running nodes without a new setup."""
    path = f"/api/v1/groups/{GROUP}/settings"
    tunnels = [_open_tunnel(cluster, node) for node in cluster.nodes]
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        before = admin.get(f"/api/v1/groups/{GROUP}").json()["settings"]["server_rules"]
        changed_at = time.monotonic()
        admin.patch(
            path, json={"server_rules": {"default": "deny", "rules": []}}
        ).raise_for_status()
    closed = [_closed_within(t, 15) for t in tunnels]
    enforce_ms = (time.monotonic() - changed_at) * 1000
    for tls in tunnels:
        tls.close()
    try:
        assert all(c is not None for c in closed), "a live tunnel stayed open"
        print(f"server-rule change enforced on both nodes in {enforce_ms:.0f} ms")
        assert enforce_ms < 1000
        refused = curl(cluster, "-w", " %{http_code}")
        assert refused.stdout == "certgate: destination_denied\n 403", refused
        versions = {json.loads(n.health().text)["policy_version"] for n in cluster.nodes}
        assert len(versions) == 1 and versions.pop() > 1
    finally:
        with cluster.console.client(cluster.console.admins["root"]) as admin:
            admin.patch(path, json={"server_rules": before}).raise_for_status()
    _wait_admitted_everywhere(cluster)


def test_staleness_budget_fails_closed_then_recovers(cluster: Cluster) -> None:
    tunnels = [_open_tunnel(cluster, node) for node in cluster.nodes]
    cluster.console.stop()
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(
            n.health().status_code == 200 for n in cluster.nodes
        ):
            time.sleep(0.5)
        health = [n.health() for n in cluster.nodes]
        assert all(h.status_code == 503 for h in health), [h.text for h in health]
        # Live tunnels close too once the budget has passed (the sweeper runs each second).
        closed = [_closed_within(t, 5) for t in tunnels]
        for tls in tunnels:
            tls.close()
        assert all(c is not None for c in closed), "a live tunnel outlived the staleness budget"
        assert json.loads(health[0].text)["status"] == "stale"
        refused = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--proxy",
                f"https://localhost:{cluster.haproxy_port}",
                "--proxytunnel",
                "--proxy-cacert",
                str(cluster.work / "chain.pem"),
                "--proxy-cert",
                str(cluster.app_cert),
                "--proxy-key",
                str(cluster.app_key),
                f"http://127.0.0.1:{cluster.origin.port}/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "503" in refused.stdout + refused.stderr
    finally:
        cluster.restart_console()
    _wait_admitted_everywhere(cluster)
