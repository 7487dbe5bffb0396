"""Scenario: cascade mode (issue #16). Console, two front ends behind a real HAProxy (TCP
passthrough) relaying to one back end, real curl as the Proxy-mode client, a real origin
on 127.0.0.3.

How it shows that a front end never dials the origin: every node runs on this machine's
loopback, so the origin's peer address (127.0.0.1 for all of them) cannot tell them apart;
instead, while a tunnel through a front end is open, the kernel's socket table
(/proc/net/tcp, and /proc/PID/fd of each node) names the process holding the connection to
the origin, and it is the back end's, never a front end's; the back end's own log line
names the origin as the destination it admitted. With the back end gone, a front end
answers 502 ``back_end_unreachable`` although the origin is up and reachable from its
host: it has no path of its own to a destination.

Enforcement through both ends: a compliance change (both ends judge admission) and a
server-rule change (only the back end applies the rules) each close a live tunnel and
refuse the next request, the reason passed on by the front end.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster import (
    GROUP,
    Cluster,
    Node,
    admissions,
    closed_within,
    curl,
    open_tunnel,
    start_cluster,
    stop_node,
    wait_admitted_everywhere,
)
from tests.tunnel.dataplane import PAGE

pytestmark = pytest.mark.integration

ORIGIN_HOST = "127.0.0.3"  # only the back end dials it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(
        tmp_path_factory.mktemp("cascade"),
        node_names=("back", "front-1", "front-2"),
        back_ends=("back",),
        origin_host=ORIGIN_HOST,
    ) as running:
        yield running


def fronts(cluster: Cluster) -> list[Node]:
    return [n for n in cluster.nodes if n.name.startswith("front")]


def back(cluster: Cluster) -> Node:
    return next(n for n in cluster.nodes if n.name == "back")


def node_log(cluster: Cluster, node: Node) -> str:
    return (cluster.work / f"{node.name}.log").read_text(errors="replace")


def closed_by_policy(node: Node, reason: str) -> float:
    found = re.search(
        rf'certgate_tunnel_closed_by_policy_total\{{mode="proxy",reason="{reason}"\}} ([0-9.e+]+)',
        node.metrics(),
    )
    return float(found.group(1)) if found else 0.0


def origin_socket_owners(cluster: Cluster) -> set[str]:
    """Names of the nodes holding a TCP connection to the origin (from the kernel's tables:
    the inodes of sockets whose remote end is the origin, matched to each node's fds)."""
    # /proc/net/tcp spells an IPv4 address as a host-order (here little-endian) integer.
    wanted = f"{socket.inet_aton(ORIGIN_HOST)[::-1].hex().upper()}:{cluster.origin.port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == wanted and fields[3] == "01":  # ESTABLISHED
            inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for node in cluster.nodes:
        assert node.proc is not None
        fd_dir = Path(f"/proc/{node.proc.pid}/fd")
        links = {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
        if links & inodes:
            owners.add(node.name)
    return owners


def test_curl_through_either_front_end_reaches_the_origin_through_the_back_end(
    cluster: Cluster,
) -> None:
    before = {n.name: admissions(n) for n in cluster.nodes}
    for _ in range(6):
        result = curl(cluster)
        assert result.returncode == 0, result.stderr
        assert result.stdout.encode() == PAGE
    gained = {n.name: admissions(n) - before[n.name] for n in cluster.nodes}
    assert all(gained[n.name] > 0 for n in fronts(cluster)), gained  # HAProxy used both
    # Every tunnel a front end admitted was admitted again by the back end.
    assert gained["back"] == sum(gained[n.name] for n in fronts(cluster)), gained


def test_only_the_back_end_holds_the_connection_to_the_origin(cluster: Cluster) -> None:
    for front in fronts(cluster):
        # The 200 comes once the origin accepted the connection; it then waits for a
        # request, so the connection stays established while the kernel is asked.
        tunnel = open_tunnel(cluster, front)
        try:
            assert origin_socket_owners(cluster) == {"back"}
        finally:
            tunnel.close()
    destination = f"dest={ORIGIN_HOST}:{cluster.origin.port}"
    assert re.search(
        rf"admit device={cluster.device_uid} .*{destination}", node_log(cluster, back(cluster))
    )


def test_compliance_change_closes_a_live_tunnel_through_both_ends(cluster: Cluster) -> None:
    nodes = cluster.nodes
    before = sum(closed_by_policy(n, "noncompliant") for n in nodes)
    tunnels = [open_tunnel(cluster, front) for front in fronts(cluster)]
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        admin.put(
            f"/api/v1/devices/{cluster.device_uid}/compliance", json={"status": "noncompliant"}
        ).raise_for_status()
    closed = [closed_within(t, 15) for t in tunnels]
    for tls in tunnels:
        tls.close()
    try:
        assert all(c is not None for c in closed), "a live tunnel stayed open"
        # Each tunnel was closed by policy at one end at least (whichever judged first;
        # the other end then saw its peer go).
        assert sum(closed_by_policy(n, "noncompliant") for n in nodes) - before >= len(tunnels)
        refused = curl(cluster, "-w", " %{http_code}")
        assert refused.stdout == "certgate: noncompliant\n 403", refused
    finally:
        with cluster.console.client(cluster.console.admins["root"]) as admin:
            admin.put(
                f"/api/v1/devices/{cluster.device_uid}/compliance", json={"status": "compliant"}
            ).raise_for_status()
    wait_admitted_everywhere(cluster)


def test_server_rule_change_is_enforced_by_the_back_end(cluster: Cluster) -> None:
    """A front end applies no server rules (it routes nothing): the back end closes the
    live tunnel, the front end follows, and passes the back end's refusal on."""
    path = f"/api/v1/groups/{GROUP}/settings"
    before = closed_by_policy(back(cluster), "destination_denied")
    tunnels = [open_tunnel(cluster, front) for front in fronts(cluster)]
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        rules = admin.get(f"/api/v1/groups/{GROUP}").json()["settings"]["server_rules"]
        admin.patch(
            path, json={"server_rules": {"default": "deny", "rules": []}}
        ).raise_for_status()
    closed = [closed_within(t, 15) for t in tunnels]
    for tls in tunnels:
        tls.close()
    try:
        assert all(c is not None for c in closed), "a live tunnel stayed open"
        assert closed_by_policy(back(cluster), "destination_denied") - before == len(tunnels)
        assert all(closed_by_policy(f, "destination_denied") == 0 for f in fronts(cluster))
        refused = curl(cluster, "-w", " %{http_code}")
        assert refused.stdout == "certgate: destination_denied\n 403", refused
    finally:
        with cluster.console.client(cluster.console.admins["root"]) as admin:
            admin.patch(path, json={"server_rules": rules}).raise_for_status()
    wait_admitted_everywhere(cluster)


def test_a_front_end_without_its_back_end_reaches_nothing(cluster: Cluster) -> None:
    """Last: it stops the back end. The origin is still up and reachable from this host."""
    with socket.create_connection((ORIGIN_HOST, cluster.origin.port), timeout=5):
        pass
    stop_node(back(cluster))
    deadline = time.monotonic() + 15
    refused = curl(cluster, "-w", " %{http_code}")
    while refused.stdout.endswith(" 000") and time.monotonic() < deadline:
        time.sleep(0.2)  # HAProxy may still be routing to a front end coming up
        refused = curl(cluster, "-w", " %{http_code}")
    assert refused.stdout == "certgate: back_end_unreachable\n 502", refused
    assert "reason=back_end_unreachable" in node_log(cluster, fronts(cluster)[0]) + node_log(
        cluster, fronts(cluster)[1]
    )
