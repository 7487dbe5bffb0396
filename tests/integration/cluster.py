"""A tunnel cluster of real processes for scenario tests: a console, tunnel nodes of one
group behind a real HAProxy (TCP passthrough), one enrolled Proxy-mode app, a real origin,
and real clients (curl, Python's ssl sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from certgate.console.services import ca
from certgate.device.state import CertifiedKey
from certgate.device.tunnel_client import TunnelClient, TunnelRefused
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

GROUP = "ha"
APP = "com.example.browser"
P12_PASSWORD = "p12-password-for-tests"
# Short feed timings so that staleness scenarios finish in seconds.
DEFAULT_SETTINGS: dict[str, Any] = {
    "initial_compliance": "compliant",
    "feed": {"long_poll_s": 2, "max_staleness_s": 10},
    "server_rules": {
        "default": "deny",
        "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
    },
}


@dataclass
class Node:
    name: str
    state_dir: Path
    proxy_port: int
    per_app_port: int
    admin_port: int
    proc: subprocess.Popen[bytes] | None = None
    # Scenarios pin one process unless they are about workers (test_workers.py): their
    # timings and metrics were measured on one.
    workers: int = 1
    extra_args: tuple[str, ...] = ()  # more `tunnel run` options (cascade roles)

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


def setup_node(cluster_work: Path, console: RunningConsole, name: str) -> Node:
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


def start_node(node: Node, work: Path, attempts: int = 3) -> None:
    """Start a node and wait for its listeners. Ports come from ``free_port()``, which
    another process may take before the node binds it: then the node exits with "Address
    already in use", and it is started again on fresh ports (bounded)."""
    log_path = work / f"{node.name}.log"
    for attempt in range(attempts):
        with log_path.open("ab") as log:
            node.proc = popen_node(node, log)
        try:
            for port in (node.proxy_port, node.per_app_port, node.admin_port):
                wait_for_tls_port(port, node.proc, 30)
            return
        except RuntimeError:
            if attempt == attempts - 1 or "Address already in use" not in log_path.read_text(
                errors="replace"
            ):
                raise
            node.proxy_port, node.per_app_port, node.admin_port = (
                free_port(),
                free_port(),
                free_port(),
            )


def popen_node(node: Node, log: IO[bytes]) -> subprocess.Popen[bytes]:
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
            "--workers",
            str(node.workers),
            *node.extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def start_haproxy(
    work: Path, nodes: list[Node], listener: str = "proxy", port: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """HAProxy in front of the nodes' ``listener`` ("proxy" or "per_app") ports."""
    port = port or free_port()
    servers = "\n".join(
        f"  server {n.name} 127.0.0.1:{getattr(n, f'{listener}_port')} check inter 500ms"
        for n in nodes
    )
    config = work / ("haproxy.cfg" if listener == "proxy" else f"haproxy-{listener}.cfg")
    config.write_text(f"""global
  maxconn 2000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend tunnel_{listener}
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


def enroll_app(
    console: RunningConsole, work: Path, username: str = "dora"
) -> tuple[str, Path, Path]:
    """Enroll a device of ``username`` with an app certificate (files named after the user
    but for the cluster's own device, whose files are app.pem and app.key)."""
    root = console.admins["root"]
    with console.client(root) as admin:
        admin.post(
            f"/api/v1/groups/{GROUP}/enrollment-users",
            json={"username": username, "password": f"{username}-password"},
        ).raise_for_status()
    with console.client() as anon:
        device = anon.post(
            "/api/v1/enroll",
            json={"username": username, "password": f"{username}-password", "platform": "android"},
        ).json()
    csr, key = make_csr()
    with console.client(api_key=device["credential"]) as dev:
        issued = dev.post(
            f"/api/v1/device/apps/{APP}/certificate",
            json={"username": username, "password": f"{username}-password", "csr": csr.decode()},
        ).json()
    stem = "app" if username == "dora" else f"app-{username}"
    cert_path, key_path = work / f"{stem}.pem", work / f"{stem}.key"
    cert_path.write_text(issued["certificate"])
    key_path.write_bytes(private_key_pem(key))
    return device["device_uid"], cert_path, key_path


def write_setup_p12(console: RunningConsole, work: Path) -> None:
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


@contextlib.contextmanager
def start_cluster(
    work: Path,
    settings: dict[str, Any] | None = None,
    node_names: tuple[str, ...] = ("node-1", "node-2"),
    db_url: str | None = None,
    back_ends: tuple[str, ...] = (),
    origin_host: str = "127.0.0.1",
) -> Iterator[Cluster]:
    """Console, tunnel nodes of GROUP behind HAProxy, one enrolled app, an origin.

    ``back_ends``: names of nodes run as cascade back ends (tunnel.cascade); they start
    first, the other nodes run as front ends relaying to them, and only the front ends are
    behind HAProxy. Everything started is registered for cleanup at once, so a failure
    halfway through setup leaves no process behind."""
    with contextlib.ExitStack() as cleanup:
        data_dir, port = init_console(work, db_url=db_url)
        holder: dict[str, RunningConsole] = {"console": start_console(work, data_dir, port)}
        cleanup.callback(lambda: holder["console"].stop())
        console = holder["console"]
        console.make_admin("root", "superadmin", "global")
        create_group(console, settings or DEFAULT_SETTINGS)
        console.make_admin("setup", "tunnel-setup", GROUP)
        write_setup_p12(console, work)
        nodes = [setup_node(work, console, name) for name in node_names]
        backs = [n for n in nodes if n.name in back_ends]
        fronts = [n for n in nodes if n.name not in back_ends]
        for node in backs:
            node.extra_args = ("--role", "back-end")
            cleanup.callback(stop_node, node)
            start_node(node, work)
        for node in fronts:
            if backs:  # after the back ends started: their ports are final
                relay = [a for b in backs for a in ("--back-end", f"127.0.0.1:{b.proxy_port}")]
                node.extra_args = ("--role", "front-end", *relay)
            cleanup.callback(stop_node, node)
            start_node(node, work)
        haproxy, hport = start_haproxy(work, fronts)
        cleanup.callback(stop_process, haproxy)
        device_uid, cert, key = enroll_app(console, work)
        origin = cleanup.enter_context(Origin(origin_host))
        cluster = Cluster(work, console, fronts + backs, hport, origin, device_uid, cert, key)
        cleanup.callback(lambda: holder.update(console=cluster.console))  # after restarts
        wait_admitted_everywhere(cluster)
        yield cluster


def create_group(console: RunningConsole, settings: dict[str, Any]) -> None:
    with console.client(console.admins["root"]) as admin:
        admin.post(
            "/api/v1/groups", json={"id": GROUP, "parent_id": "global", "settings": settings}
        ).raise_for_status()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=40)


def stop_node(node: Node) -> None:
    if node.proc is not None:
        stop_process(node.proc)


def curl(
    cluster: Cluster,
    *extra: str,
    port: int | None = None,
    client: tuple[Path, Path] | None = None,
) -> subprocess.CompletedProcess[str]:
    """curl through HAProxy (or a node's ``port``) in Proxy mode, as the cluster's app or
    as ``client`` (certificate and key files)."""
    cert, key = client or (cluster.app_cert, cluster.app_key)
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
            str(cert),
            "--proxy-key",
            str(key),
            f"http://{cluster.origin.host}:{cluster.origin.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_admitted_everywhere(cluster: Cluster, timeout: float = 30) -> None:
    """Both nodes learn the device through their feeds; wait (bounded) until they do.
    (Back ends take only front ends as clients: they are reached through them.)"""
    deadline = time.monotonic() + timeout
    reachable = [n for n in cluster.nodes if "back-end" not in n.extra_args]
    while time.monotonic() < deadline:
        if all(curl(cluster, port=node.proxy_port).stdout.encode() == PAGE for node in reachable):
            return
        time.sleep(0.2)
    raise AssertionError("nodes never admitted the enrolled device")


def admissions(node: Node) -> float:
    match = re.search(
        r'certgate_tunnel_admissions_total\{mode="proxy"\} ([0-9.e+]+)', node.metrics()
    )
    return float(match.group(1)) if match else 0.0


def open_tunnel(
    cluster: Cluster,
    node: Node,
    destination: str | None = None,
    *,
    suppress_ragged_eofs: bool = True,
) -> ssl.SSLSocket:
    """A Proxy-mode CONNECT tunnel through ``node`` (to the cluster's origin by default)."""
    ctx = ssl.create_default_context(cafile=str(cluster.work / "chain.pem"))
    ctx.load_cert_chain(cluster.app_cert, cluster.app_key)
    raw = socket.create_connection(("127.0.0.1", node.proxy_port), timeout=15)
    tls = ctx.wrap_socket(
        raw, server_hostname="localhost", suppress_ragged_eofs=suppress_ragged_eofs
    )
    destination = destination or f"{cluster.origin.host}:{cluster.origin.port}"
    try:
        tls.sendall(f"CONNECT {destination} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = tls.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    except BaseException:
        tls.close()  # not left for the garbage collector to report in a later test
        raise
    return tls


def closed_within(tls: ssl.SSLSocket, timeout: float) -> float | None:
    tls.settimeout(timeout)
    start = time.monotonic()
    try:
        data = tls.recv(4096)
    except (ssl.SSLError, ConnectionError):
        data = b""
    except TimeoutError:
        return None
    return time.monotonic() - start if data == b"" else None


def device_exec(state_dir: Path, app: str, *command: str) -> list[str]:
    """The argv of ``certgate device exec``: ``command`` with its traffic attributed to
    ``app``, through the device's running agent or one of its own."""
    return [*CERTGATE, "device", "exec", "--app", app, "-s", str(state_dir), "--", *command]


def fetch_per_app(cluster: Cluster, device: CertifiedKey, app: str) -> bytes | str:
    """One request through the first node's Per-App listener as ``device`` (certgate's own
    tunnel client): the origin's answer, or the node's refusal reason."""
    chain = x509.load_pem_x509_certificates((cluster.work / "chain.pem").read_bytes())
    endpoint = [("127.0.0.1", cluster.nodes[0].per_app_port)]
    client = TunnelClient.for_identity(endpoint, chain, device, GROUP)

    async def fetch() -> bytes:
        upstream = await client.open(app, "127.0.0.1", cluster.origin.port)
        upstream.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = upstream.initial + await upstream.reader.read()
        upstream.writer.close()
        return data

    try:
        return asyncio.run(fetch())
    except TunnelRefused as refused:
        return refused.reason
