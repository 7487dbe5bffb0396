"""``certgate tunnel run --workers 2`` on real processes: a console, one node with two
worker processes, real TLS clients.

Shows: connections spread over both workers; both map the one shared table file (the same
inode, shared, never written by them) and what each holds privately; a compliance change
closes live tunnels held by either worker, and so does a policy change (a new table
generation); the node's report to the console sums both workers' denials; a killed worker
is started again while the other keeps serving, and only the killed worker's tunnels are
lost; a rotated tunnel identity reaches both; SIGTERM drains both workers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import select

from certgate.console.store.models import TunnelNode
from certgate.tunnel.workers import REPORT_INTERVAL_S
from tests.integration.cluster import (
    DEFAULT_SETTINGS,
    GROUP,
    Cluster,
    Node,
    admissions,
    closed_within,
    curl,
    open_tunnel,
    start_cluster,
    start_node,
    stop_node,
)
from tests.integration.test_rotation import cli as rotate_cli
from tests.integration.test_rotation import served_thumbprint, sync_status
from tests.tunnel.dataplane import PAGE

WAIT_S = 30.0
ALLOW_LOOPBACK: dict[str, Any] = DEFAULT_SETTINGS["server_rules"]
TUNNELS = 16


def wait_until(check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:g} s: {check}")


def workers(node: Node) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = node.health().json()["workers"]
    return body


def ready_pids(node: Node) -> list[int] | None:
    found = workers(node)
    return [w["pid"] for w in found] if all(w["ready"] for w in found) else None


def per_worker_connections(node: Node) -> dict[str, float]:
    found = re.findall(
        r'certgate_tunnel_worker_connections\{worker="(\d+)"\} ([0-9.e+]+)', node.metrics()
    )
    return {worker: float(count) for worker, count in found}


def accepted_since(node: Node, before: dict[str, float], count: int) -> dict[str, float] | None:
    """Per-worker accepted connections once ``count`` more than ``before`` were counted."""
    now = per_worker_connections(node)
    return now if sum(now.values()) - sum(before.values()) >= count else None


def holding(node: Node, count: int) -> list[dict[str, Any]] | None:
    """The workers, once they report ``count`` open connections between them in two
    reports in a row (one report may still count a connection that just closed while
    missing one that just opened)."""
    first = workers(node)
    if sum(w["connections"] for w in first) != count:
        return None
    time.sleep(2 * REPORT_INTERVAL_S)
    found = workers(node)
    same = [w["connections"] for w in found] == [w["connections"] for w in first]
    return found if same else None


def settled(node: Node) -> float:
    """The node's admissions once two worker reports in a row agree (the supervisor sums
    what its workers last reported: one report may not yet count the latest)."""
    deadline = time.monotonic() + WAIT_S
    first = admissions(node)
    while time.monotonic() < deadline:
        time.sleep(2 * REPORT_INTERVAL_S)
        first, then = admissions(node), first
        if first == then:
            return first
    raise AssertionError(f"{node.name}'s admissions kept changing for {WAIT_S:g} s")


def replaced(node: Node, dead: int) -> list[int] | None:
    pids = ready_pids(node)
    return pids if pids is not None and dead not in pids else None


def set_server_rules(cluster: Cluster, rules: dict[str, Any]) -> None:
    admin = cluster.console.admins["root"]
    with cluster.console.client(admin) as client:
        path = f"/api/v1/groups/{GROUP}/settings"
        client.patch(path, json={"server_rules": rules}).raise_for_status()


def set_compliance(cluster: Cluster, status: str) -> None:
    admin = cluster.console.admins["root"]
    with cluster.console.client(admin) as client:
        path = f"/api/v1/devices/{cluster.device_uid}/compliance"
        client.put(path, json={"status": status}).raise_for_status()


def relays(tls: ssl.SSLSocket) -> bool:
    """A request through an open tunnel gets the origin's page."""
    tls.settimeout(10)
    tls.sendall(b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n")
    data = b""
    while not data.endswith(PAGE):
        chunk = tls.recv(4096)
        if not chunk:
            return False
        data += chunk
    return True


def table_mapping(pid: int) -> tuple[str, dict[str, int]]:
    """(device:inode and perms of the shared table's mapping, its smaps counters in kB)."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for index, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 6 and re.search(r"/certgate-table-[^/]+/table-\d+\.map$", fields[5]):
            counters: dict[str, int] = {}
            for detail in lines[index + 1 :]:
                name, _, value = detail.partition(":")
                if not value.strip().endswith("kB"):
                    break
                counters[name] = int(value.split()[0])
            return f"{fields[3]}:{fields[4]} {fields[1]}", counters
    raise AssertionError(f"worker {pid} maps no shared table")


def private_kb(pid: int) -> int:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(m) for m in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", rollup, re.M))


def test_two_workers_share_the_table_and_the_load(tmp_path: Path) -> None:
    with start_cluster(tmp_path, node_names=("node-1",)) as cluster, ExitStack() as opened:
        node = cluster.nodes[0]
        stop_node(node)
        node.workers = 2
        start_node(node, tmp_path)
        pids = wait_until(lambda: ready_pids(node))
        assert len(set(pids)) == 2 and node.proc is not None and node.proc.pid not in pids
        wait_until(lambda: curl(cluster, port=node.proxy_port).stdout.encode() == PAGE)

        # Spread: the kernel hands connections to both workers (SO_REUSEPORT).
        before = per_worker_connections(node)
        tunnels = [opened.enter_context(open_tunnel(cluster, node)) for _ in range(TUNNELS)]
        counts = wait_until(lambda: accepted_since(node, before, TUNNELS))
        assert len(counts) == 2 and all(v > before.get(k, 0) for k, v in counts.items()), counts
        held = wait_until(lambda: holding(node, TUNNELS))
        assert all(w["connections"] > 0 for w in held), held
        # Workers log as the node does: their admissions are in its log (INFO), whatever
        # a library imported in the worker configured.
        admitted = (tmp_path / f"{node.name}.log").read_text(errors="replace")
        assert admitted.count("admit device=") >= TUNNELS, admitted[-2000:]

        # One table: both workers map the same file, shared and read-only.
        mappings = [table_mapping(pid) for pid in pids]
        assert mappings[0][0] == mappings[1][0] and mappings[0][0].endswith(" r--s")
        for _, counters in mappings:  # in memory, and every page of it shared
            assert counters["Rss"] > 0
            assert counters["Private_Clean"] + counters["Private_Dirty"] == 0, counters
        print("worker private memory (kB):", [private_kb(pid) for pid in pids])

        # A compliance change closes the device's live tunnels in both workers.
        set_compliance(cluster, "noncompliant")
        assert all(closed_within(t, WAIT_S) is not None for t in tunnels)
        set_compliance(cluster, "compliant")
        wait_until(lambda: curl(cluster, port=node.proxy_port).stdout.encode() == PAGE)

        # A policy change (a new table generation, the policy sent along) reaches both too.
        tunnels = [opened.enter_context(open_tunnel(cluster, node)) for _ in range(TUNNELS)]
        wait_until(lambda: holding(node, TUNNELS))
        set_server_rules(cluster, {"default": "deny", "rules": []})
        assert all(closed_within(t, WAIT_S) is not None for t in tunnels)
        # Either worker's denials reach the console, summed in the supervisor's report.
        wait_until(lambda: denied_and_reported(cluster, node) > 0)
        set_server_rules(cluster, ALLOW_LOOPBACK)
        wait_until(lambda: curl(cluster, port=node.proxy_port).stdout.encode() == PAGE)

        # A killed worker: its tunnels go, the other's stay and relay, a new one starts.
        tunnels = [opened.enter_context(open_tunnel(cluster, node)) for _ in range(TUNNELS)]
        held = wait_until(lambda: holding(node, TUNNELS))
        victim = held[0]
        os.kill(victim["pid"], signal.SIGKILL)
        lost = [t for t in tunnels if closed_within(t, 2.0) is not None]
        alive = [t for t in tunnels if t not in lost]
        assert len(lost) == victim["connections"] and len(alive) == held[1]["connections"]
        assert all(relays(t) for t in alive)
        pids = wait_until(lambda: replaced(node, victim["pid"]))
        assert held[1]["pid"] in pids
        assert re.search(r"certgate_tunnel_worker_restarts_total 1\.0", node.metrics())
        for _ in range(6):
            assert curl(cluster, port=node.proxy_port).stdout.encode() == PAGE

        # A rotated tunnel identity: both workers present it to new connections.
        prepared = rotate_cli(cluster, "tunnel-identity", GROUP, "--overlap", "15s")
        assert prepared.returncode == 0, prepared.stderr
        new = json.loads(prepared.stdout)["new"]["thumbprint"]
        wait_until(lambda: sync_status(node)["next_tunnel_identity"] == new)
        with cluster.console.client(cluster.console.admins["root"]) as client:
            switch = f"/api/v1/groups/{GROUP}/rotations/tunnel-identity/switch"
            client.post(switch).raise_for_status()
        wait_until(lambda: served_thumbprint(cluster, node) == new)
        before = per_worker_connections(node)
        assert all(served_thumbprint(cluster, node) == new for _ in range(TUNNELS))
        counts = wait_until(lambda: accepted_since(node, before, TUNNELS))
        assert all(v > before.get(k, 0) for k, v in counts.items()), counts
        assert "certgate_tunnel_identity_swaps_total 1.0" in node.metrics()

        # SIGTERM drains every worker: no new connection, open tunnels relay until they
        # end, then the node and all its workers exit.
        draining = opened.enter_context(open_tunnel(cluster, node))  # the origin closes
        # after one response, so the tunnels above are spent
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(node.proxy_port))
        assert relays(draining)
        draining.close()
        assert node.proc.wait(timeout=WAIT_S) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def denied_and_reported(cluster: Cluster, node: Node) -> int:
    """One request the server rules deny, then the node's reported destination denials."""
    assert curl(cluster, port=node.proxy_port).stdout.encode() != PAGE
    with cluster.console.local() as (session, _):
        row = session.execute(
            select(TunnelNode).where(TunnelNode.group_id == GROUP, TunnelNode.name == node.name)
        ).scalar_one()
        denials: dict[str, int] = (row.report or {}).get("denials") or {}
    return denials.get("destination_denied", 0)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_cascade_front_and_back_end_each_serve_with_two_workers(tmp_path: Path) -> None:
    """A front end's workers each relay to the back end, whose workers each admit again
    from their shared table; a compliance change closes tunnels held by any of them."""
    with (
        start_cluster(tmp_path, node_names=("back", "front"), back_ends=("back",)) as cluster,
        ExitStack() as opened,
    ):
        front, back = (
            next(n for n in cluster.nodes if n.name == name) for name in ("front", "back")
        )
        for node in (front, back):
            stop_node(node)
        for node in (back, front):  # the back end first, as start_cluster starts them
            node.workers = 2
            start_node(node, tmp_path)
            assert len(set(wait_until(lambda node=node: ready_pids(node)))) == 2
        wait_until(lambda: curl(cluster, port=front.proxy_port).stdout.encode() == PAGE)

        admitted = {node.name: settled(node) for node in (front, back)}
        before = {node.name: per_worker_connections(node) for node in (front, back)}
        # Each open tunnel is a CONNECT the back end answered, having dialled the origin.
        tunnels = [opened.enter_context(open_tunnel(cluster, front)) for _ in range(TUNNELS)]
        for node in (front, back):  # each hop is a connection to the back end's listener
            counts = wait_until(lambda node=node: accepted_since(node, before[node.name], TUNNELS))
            assert len(counts) == 2, counts
            assert all(v > before[node.name].get(k, 0) for k, v in counts.items()), counts
            held = wait_until(lambda node=node: holding(node, TUNNELS))
            assert all(w["connections"] > 0 for w in held), (node.name, held)
        gained = {node.name: settled(node) - admitted[node.name] for node in (front, back)}
        assert gained["back"] == gained["front"] >= TUNNELS, gained

        set_compliance(cluster, "noncompliant")
        assert all(closed_within(t, WAIT_S) is not None for t in tunnels)
        refused = curl(cluster, "-w", " %{http_code}", port=front.proxy_port)
        assert refused.stdout == "certgate: noncompliant\n 403", refused
        set_compliance(cluster, "compliant")
        wait_until(lambda: curl(cluster, port=front.proxy_port).stdout.encode() == PAGE)
