"""Scenario: a Secure Channel Root rotation without downtime, on real processes (its own
cluster: the rotation is instance-wide and renews every group identity).

A console, two tunnel nodes behind a real HAProxy, real curl clients (Proxy mode) in a
loop through HAProxy and live CONNECT tunnels to each node and through HAProxy, to a real
echo server (helpers of tests/integration/test_rotation.py). Devices trust the Root
alone (curl's CA file), so the new root needs no step of theirs. Shown, in order:

* prepare by the CLI: both nodes trust both Secure Channel Roots (healthz, the console's
  status), the old one still issues;
* switch by the API: the console presents a TLS certificate of the new root at once;
  every group identity is renewed onto it by its own rotation, in the same feed: both
  nodes present a tunnel identity of the new root (sent with the new root) to new
  connections and to the console, and pin the renewed console identity; a device made
  noncompliant during the rotation loses its live tunnels and is refused;
* finish by the API, not forced, once nothing depends on the old root: both nodes trust
  the new root alone; the old tunnel identity is refused by the console with what to do.

0 failed curl requests and 0 closed live tunnels through prepare, switch and finish
(counted, printed). Then a second rotation with a node restarted between prepare and
switch and the other down over the switch: both catch up from what they stored and the
feed, and finish goes through unforced.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from certgate.pki.keys import private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.config import load_identity
from tests.integration.cluster import (
    GROUP,
    Cluster,
    Node,
    curl,
    start_cluster,
    start_node,
    stop_node,
)
from tests.integration.test_rotation import (
    CurlLoop,
    LiveTunnel,
    admin,
    cli,
    echo_port,  # noqa: F401 (a fixture)
    feed_call_with,
    new_device_refused_when_noncompliant,
    report,
    rotation_of,
    served_cert,
    sync_status,
    traffic,  # noqa: F401 (a fixture)
    wait_until,
)
from tests.support import issued_by
from tests.tunnel.dataplane import PAGE

pytestmark = pytest.mark.integration

ROTATION = f"/api/v1/groups/{GROUP}/rotations/secure-channel-root"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("secure-channel-root")) as running:
        yield running


def new_root_of(cluster: Cluster, new_thumbprint: str) -> x509.Certificate:
    """The new Secure Channel Root, as the nodes stored it (chain.pem after the switch)."""
    node = cluster.nodes[0]
    for cert in x509.load_pem_x509_certificates((node.state_dir / "chain.pem").read_bytes()):
        if thumbprint(cert) == new_thumbprint:
            return cert
    raise AssertionError("the node does not send the new Secure Channel Root")


def test_secure_channel_root_rotation_without_a_failed_connection(
    cluster: Cluster,
    traffic: tuple[CurlLoop, list[LiveTunnel]],  # noqa: F811 (the fixture imported above)
    echo_port: int,  # noqa: F811
    tmp_path: Path,
) -> None:
    loop, tunnels = traffic
    first = cluster.nodes[0]
    old_cert, old_key = tmp_path / "old.pem", tmp_path / "old.key"
    old_cert.write_bytes((first.state_dir / "tunnel.pem").read_bytes())
    # The node keeps its key sealed; the test plays a thief holding the old pair in clear.
    old_key.write_bytes(private_key_pem(load_identity(first.state_dir)))
    wait_until("the loop has made requests", lambda: loop.ok >= 3)
    (old_root,) = sync_status(first)["secure_channel_roots"]

    prepared = cli(cluster, "secure-channel-root", GROUP, "--overlap", "0s")
    assert prepared.returncode == 0, prepared.stderr
    new_root = json.loads(prepared.stdout)["new"]["thumbprint"]
    took = wait_until(
        "both nodes trust both Secure Channel Roots",
        lambda: all(
            sync_status(n)["secure_channel_roots"] == [old_root, new_root] for n in cluster.nodes
        ),
    )
    wait_until(
        "the status shows both nodes with the new root",
        lambda: all(n["has_new"] for n in rotation_of(cluster, "secure-channel-root")["nodes"]),
    )
    report(f"prepare (nodes trusted both after {took * 1000:.0f} ms)", loop, tunnels)

    old_identity = sync_status(first)["tunnel_identity"]
    with admin(cluster) as client:
        switched = client.post(ROTATION + "/switch")
    assert switched.status_code == 200, switched.text
    renewals = switched.json()["dependents"]["identity_rotations"]
    assert {(r["kind"], r["phase"]) for r in renewals if r["group_id"] == GROUP} == {
        ("tunnel-identity", "switched"),
        ("console-identity", "switched"),
    }
    took = wait_until(
        "both nodes present a tunnel identity of the new root",
        lambda: all(
            sync_status(n)["tunnel_identity"] != old_identity
            and sync_status(n)["secure_channel_roots"] == [new_root, old_root]
            for n in cluster.nodes
        ),
    )
    scr = new_root_of(cluster, new_root)
    for node in cluster.nodes:  # what a new connection sees, verified to the Root by curl's CA
        assert issued_by(served_cert(cluster, node), scr)
    report(f"switch (nodes swapped after {took * 1000:.0f} ms)", loop, tunnels)

    # A device made noncompliant during the rotation loses its live tunnels on both nodes
    # and is refused, within the usual time to enforce (the feed is now signed by the
    # renewed console identity).
    new_device_refused_when_noncompliant(cluster, echo_port, "Secure Channel Root")
    report("noncompliant device refused", loop, tunnels)

    # Finish, not forced: it goes through once both nodes present the renewed identities
    # and report the new root (the overlap is 0).
    def finished() -> bool:
        with admin(cluster) as client:
            return client.post(ROTATION + "/finish").status_code == 200

    wait_until("the finish is no longer refused", finished)
    took = wait_until(
        "both nodes trust the new root alone",
        lambda: all(sync_status(n)["secure_channel_roots"] == [new_root] for n in cluster.nodes),
    )
    time.sleep(3)  # traffic keeps flowing after finish (the loop counts every request)
    report(f"finish (nodes dropped the old root after {took * 1000:.0f} ms)", loop, tunnels)

    retired = feed_call_with(cluster, old_cert, old_key)
    assert retired.status_code == 401 and "certgate tunnel setup" in retired.json()["detail"]
    for node in cluster.nodes:
        assert sync_status(node)["last_error"] is None
        assert issued_by(served_cert(cluster, node), scr)
    assert loop.failures == [], loop.failures
    print(
        f"secure-channel-root rotation: {loop.ok} curl requests, 0 failed;"
        f" {len(tunnels)} live tunnels, 0 closed"
    )


def test_restarts_and_a_node_down_over_the_switch(cluster: Cluster) -> None:
    """A node restarted between prepare and switch, and a node down over the switch: each
    comes back on what it stored and catches up from the feed (its old
    identity is still accepted until finish); finish then goes through unforced."""
    first, second = cluster.nodes
    (old_root,) = sync_status(first)["secure_channel_roots"]
    with admin(cluster) as client:
        prepared = client.post(ROTATION, json={"overlap_s": 0})
    assert prepared.status_code == 201, prepared.text
    new_root = prepared.json()["new"]["thumbprint"]

    stop_node(first)  # a node restart between prepare and switch
    start_node(first, cluster.work)
    wait_until(
        "both nodes trust both roots",
        lambda: all(
            sync_status(n)["secure_channel_roots"] == [old_root, new_root] for n in cluster.nodes
        ),
    )
    stop_node(second)  # down over the switch
    with admin(cluster) as client:
        client.post(ROTATION + "/switch").raise_for_status()
    scr = new_root_of_state(first, new_root, cluster)
    start_node(second, cluster.work)
    wait_until(
        "both nodes present a tunnel identity of the new root",
        lambda: all(issued_by(served_cert(cluster, n), scr) for n in cluster.nodes),
    )
    wait_until("curl passes both nodes", lambda: curl(cluster).stdout.encode() == PAGE)

    def finished() -> bool:
        with admin(cluster) as client:
            return client.post(ROTATION + "/finish").status_code == 200

    wait_until("the finish is no longer refused", finished)
    wait_until(
        "both nodes trust the new root alone",
        lambda: all(sync_status(n)["secure_channel_roots"] == [new_root] for n in cluster.nodes),
    )
    for node in cluster.nodes:
        assert sync_status(node)["last_error"] is None


def new_root_of_state(node: Node, new_thumbprint: str, cluster: Cluster) -> x509.Certificate:
    """The new root, once ``node`` sends it after its renewed tunnel identity."""
    wait_until(
        f"{node.name} sends the new root",
        lambda: (
            new_thumbprint
            in {
                thumbprint(c)
                for c in x509.load_pem_x509_certificates(
                    (node.state_dir / "chain.pem").read_bytes()
                )
            }
        ),
    )
    return new_root_of(dataclasses.replace(cluster, nodes=[node]), new_thumbprint)
