"""Scenario: a Device Root rotation without downtime, on real processes (its own cluster:
the rotation is instance-wide and retires the cluster's app certificate).

A console, two tunnel nodes behind a real HAProxy, real curl clients (Proxy mode) in a
loop through HAProxy and live CONNECT tunnels to each node and through HAProxy, to a real
echo server (helpers of tests/integration/test_rotation.py). Shown, in order:

* prepare by the CLI: both nodes trust both Device Roots (healthz, the console's status),
  the clients on the old root go on;
* switch by the API: the running console issues from the new root without a restart; a
  client renews (a new-root certificate), opens new tunnels and a curl loop of its own,
  and closes its old-root ones itself, as a renewing agent does; a device made
  noncompliant during the rotation loses its live tunnels and is refused;
* finish: refused while an old-root certificate is active, then forced; the old-root
  certificate is refused by both nodes and through HAProxy, the new-root one admitted.

0 failed curl requests and 0 live tunnels closed by a node while their certificate was
valid, through prepare, switch and finish (counted, printed).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from certgate.pki.thumbprint import thumbprint
from tests.integration.cluster import (
    GROUP,
    Cluster,
    enroll_app,
    start_cluster,
)
from tests.integration.test_rotation import (
    CurlLoop,
    LiveTunnel,
    admin,
    admits,
    cli,
    connect,
    echo_port,  # noqa: F401 (a fixture)
    new_device_refused_when_noncompliant,
    report,
    rotation_of,
    sync_status,
    wait_until,
)

pytestmark = pytest.mark.integration

ROTATION = f"/api/v1/groups/{GROUP}/rotations/device-root"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("device-root")) as running:
        yield running


def start_loop(cluster: Cluster) -> tuple[CurlLoop, threading.Thread]:
    loop = CurlLoop(cluster)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    return loop, thread


def stop_loop(loop: CurlLoop, thread: threading.Thread) -> None:
    loop.stop.set()
    thread.join(timeout=60)


def open_tunnels(
    cluster: Cluster, echo: int, cert: tuple[Path, Path], tag: str
) -> list[LiveTunnel]:
    ports = {n.name: n.proxy_port for n in cluster.nodes} | {"haproxy": cluster.haproxy_port}
    return [
        LiveTunnel(f"{tag}-{name}", connect(cluster, port, echo, cert))
        for name, port in ports.items()
    ]


def test_device_root_rotation_without_a_failed_connection(
    cluster: Cluster,
    echo_port: int,  # noqa: F811 (the fixture imported above)
) -> None:
    old_pair = (cluster.app_cert, cluster.app_key)
    old_loop, old_thread = start_loop(cluster)
    old_tunnels = open_tunnels(cluster, echo_port, old_pair, "old")
    new_loop: CurlLoop | None = None
    new_thread: threading.Thread | None = None
    new_tunnels: list[LiveTunnel] = []
    try:
        wait_until("the loop has made requests", lambda: old_loop.ok >= 3)
        old_root = sync_status(cluster.nodes[0])["device_roots"][0]

        prepared = cli(cluster, "device-root", GROUP, "--overlap", "0s")
        assert prepared.returncode == 0, prepared.stderr
        new_root = json.loads(prepared.stdout)["new"]["thumbprint"]
        took = wait_until(
            "both nodes trust both Device Roots",
            lambda: all(
                sync_status(n)["device_roots"] == [old_root, new_root] for n in cluster.nodes
            ),
        )
        wait_until(
            "the status shows both nodes with the new root",
            lambda: all(n["has_new"] for n in rotation_of(cluster, "device-root")["nodes"]),
        )
        report(f"prepare (nodes trusted both after {took * 1000:.0f} ms)", old_loop, old_tunnels)

        with admin(cluster) as client:
            client.post(ROTATION + "/switch").raise_for_status()
        took = wait_until(
            "both nodes list the new root first",
            lambda: all(
                sync_status(n)["device_roots"] == [new_root, old_root] for n in cluster.nodes
            ),
        )
        report(f"switch (nodes swapped after {took * 1000:.0f} ms)", old_loop, old_tunnels)

        # The client renews: its new certificate comes from the new root (the running
        # console issues from it, no restart), and both nodes admit it.
        _, cert, key = enroll_app(cluster.console, cluster.work, "renewed")
        issued = x509.load_pem_x509_certificate(cert.read_bytes())
        with cluster.console.client() as client:
            served = x509.load_pem_x509_certificates(client.get("/pki/chain.pem").content)
        by_thumbprint = {thumbprint(c): c for c in served}
        assert new_root in by_thumbprint and old_root not in by_thumbprint
        issued.verify_directly_issued_by(by_thumbprint[new_root])
        wait_until(
            "both nodes admit the renewed client",
            lambda: all(
                admits(cluster, n.proxy_port, echo_port, (cert, key)) for n in cluster.nodes
            ),
        )
        new_tunnels = open_tunnels(cluster, echo_port, (cert, key), "new")
        new_loop, new_thread = start_loop(dataclasses.replace(cluster, app_cert=cert, app_key=key))
        wait_until("the renewed loop has made requests", lambda: new_loop.ok >= 3)
        report("renewed client (new root)", new_loop, new_tunnels)

        # A device made noncompliant during the rotation loses its live tunnels on both
        # nodes and is refused, within the usual time to enforce.
        new_device_refused_when_noncompliant(cluster, echo_port, "Device Root")

        # The old-root client has renewed: it ends its own old loop and tunnels.
        status = rotation_of(cluster, "device-root")
        assert status["devices"]["old_root_certificates"] == {"app": 1}
        stop_loop(old_loop, old_thread)
        report("old-root client done", old_loop, old_tunnels)
        for tunnel in old_tunnels:
            tunnel.tls.close()

        refused = cli(cluster, "finish", "device-root", GROUP)
        assert refused.returncode == 1, refused
        said = " ".join(refused.stderr.split())  # the CLI wraps long lines
        assert "the old Device Root is still needed: 1 active app certificate(s)" in said
        forced = cli(cluster, "finish", "device-root", GROUP, "--force")
        assert forced.returncode == 0, forced.stderr
        took = wait_until(
            "both nodes trust the new root alone",
            lambda: all(sync_status(n)["device_roots"] == [new_root] for n in cluster.nodes),
        )
        time.sleep(3)  # traffic keeps flowing after finish (the loop counts every request)
        report(
            f"finish (nodes dropped the old root after {took * 1000:.0f} ms)", new_loop, new_tunnels
        )

        for port in [*(n.proxy_port for n in cluster.nodes), cluster.haproxy_port]:
            assert not admits(cluster, port, echo_port, old_pair), f"old root admitted on {port}"
            assert admits(cluster, port, echo_port, (cert, key))
        assert old_loop.failures == [] and new_loop.failures == [], (
            old_loop.failures,
            new_loop.failures,
        )
        print(
            f"device-root rotation: {old_loop.ok + new_loop.ok} curl requests, 0 failed;"
            f" {len(old_tunnels)} old-root live tunnels closed by their client after renewal,"
            f" {len(new_tunnels)} new-root live tunnels, 0 closed"
        )
    finally:
        old_loop.stop.set()
        if new_loop is not None and new_thread is not None:
            stop_loop(new_loop, new_thread)
        for tunnel in [*old_tunnels, *new_tunnels]:
            tunnel.tls.close()
