"""Scenario: console + two tunnel nodes of one group behind a real HAProxy (TCP passthrough),
real curl as the Proxy-mode client, a real origin.

Shows, in order: both nodes got the same tunnel certificate and admit the same device;
a console restart does not interrupt admission; a compliance change closes live tunnels on
both nodes and refuses the next request (time to enforce printed); with the console gone
past the staleness budget the tunnels fail closed, and recover when it returns.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.cluster import (
    GROUP,
    Cluster,
    admissions,
    closed_within,
    curl,
    open_tunnel,
    start_cluster,
    wait_admitted_everywhere,
)
from tests.tunnel.dataplane import PAGE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("ha")) as running:
        yield running


def test_nodes_share_the_group_tunnel_certificate(cluster: Cluster) -> None:
    certs = [(n.state_dir / "tunnel.pem").read_bytes() for n in cluster.nodes]
    assert certs[0] == certs[1]


def test_curl_through_haproxy_reaches_both_nodes(cluster: Cluster) -> None:
    before = [admissions(n) for n in cluster.nodes]
    for _ in range(6):
        result = curl(cluster)
        assert result.returncode == 0, result.stderr
        assert result.stdout.encode() == PAGE
    after = [admissions(n) for n in cluster.nodes]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_console_restart_does_not_interrupt_admission(cluster: Cluster) -> None:
    cluster.console.stop()
    try:
        for _ in range(4):
            result = curl(cluster)
            assert result.stdout.encode() == PAGE, result.stderr
    finally:
        cluster.restart_console()
    # A loaded machine may take longer than the 10 s budget to stop and start the console;
    # the nodes then fail closed until their next exchange, which this waits for (bounded).
    wait_admitted_everywhere(cluster)
    assert curl(cluster).stdout.encode() == PAGE


def test_compliance_change_closes_live_tunnels_on_both_nodes(cluster: Cluster) -> None:
    tunnels = [open_tunnel(cluster, node) for node in cluster.nodes]
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        changed_at = time.monotonic()
        admin.put(
            f"/api/v1/devices/{cluster.device_uid}/compliance", json={"status": "noncompliant"}
        ).raise_for_status()
    closed = [closed_within(t, 15) for t in tunnels]
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
    wait_admitted_everywhere(cluster)


def test_server_rule_change_closes_live_tunnels_on_both_nodes(cluster: Cluster) -> None:
    """Policy is feed content: a rules PATCH reaches running nodes without a new setup."""
    path = f"/api/v1/groups/{GROUP}/settings"
    tunnels = [open_tunnel(cluster, node) for node in cluster.nodes]
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        before = admin.get(f"/api/v1/groups/{GROUP}").json()["settings"]["server_rules"]
        changed_at = time.monotonic()
        admin.patch(
            path, json={"server_rules": {"default": "deny", "rules": []}}
        ).raise_for_status()
    closed = [closed_within(t, 15) for t in tunnels]
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
    wait_admitted_everywhere(cluster)


def test_staleness_budget_fails_closed_then_recovers(cluster: Cluster) -> None:
    tunnels = [open_tunnel(cluster, node) for node in cluster.nodes]
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
        closed = [closed_within(t, 5) for t in tunnels]
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
    wait_admitted_everywhere(cluster)
