"""Scenario: tunnel nodes that miss rotation steps recover by themselves (issue #11), on
real processes (its own cluster: the Device Root rotation is instance-wide and retires the
cluster's app certificate, so it runs last).

Beside the cluster's two nodes behind HAProxy (a real curl loop through them, 0 failed
requests), two more nodes of the group run outside HAProxy:

* node-3 is stopped before each rotation's prepare and started after its finish, with its
  persisted table: it replays the steps it missed, or, for a console identity whose old
  key is gone, finds the feed signed by one it does not pin and takes it from a snapshot;
* node-4 loses its persisted table while stopped and is started in the middle of the
  overlap, so it must take what is in use from a snapshot's trust operations. (A
  ``SequenceGap`` takes the node down the same path, ``fetch_snapshot``; it cannot be
  caused for real: the console never drops feed events.)

Shown for the console identity (both follow the feed the new identity signs: a new device
admitted, then refused once blocked), the tunnel identity (node-4 presents the new one)
and the Device Root (both admit a new-root device and refuse the old root after finish).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator

import pytest
from cryptography import x509

from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.persist import JOURNAL_FILE, SNAPSHOT_FILE
from tests.integration.cluster import (
    GROUP,
    Cluster,
    Node,
    enroll_app,
    setup_node,
    start_cluster,
    start_node,
    stop_node,
)
from tests.integration.test_rotation import (
    CurlLoop,
    admin,
    admits,
    cli,
    echo_port,  # noqa: F401 (a fixture)
    healthy,
    running_rotation,
    served_thumbprint,
    sync_status,
    wait_until,
)

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class Late:
    """node-3 (keeps its table) and node-4 (loses it), started and stopped by the tests."""

    keeps: Node
    loses: Node

    def stop_both(self) -> None:
        """Both down; node-4's persisted table gone (a lost disk, a corrupt file)."""
        stop_node(self.keeps)
        stop_node(self.loses)
        for name in (SNAPSHOT_FILE, JOURNAL_FILE):
            (self.loses.state_dir / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("catchup")) as running:
        yield running


@pytest.fixture(scope="module")
def late(cluster: Cluster) -> Iterator[Late]:
    nodes = Late(
        setup_node(cluster.work, cluster.console, "node-3"),
        setup_node(cluster.work, cluster.console, "node-4"),
    )
    try:
        for node in (nodes.keeps, nodes.loses):
            start_node(node, cluster.work)
            wait_until(f"{node.name} is fresh", lambda n=node: healthy(n))  # type: ignore[misc]
        yield nodes
    finally:
        stop_node(nodes.keeps)
        stop_node(nodes.loses)


@dataclasses.dataclass
class Traffic:
    """The curl loop through HAProxy (the cluster's two nodes) for the length of a test."""

    loop: CurlLoop
    thread: threading.Thread

    def end(self) -> None:
        """Stop the loop and wait for its last request; 0 failed requests, printed."""
        self.loop.stop.set()
        self.thread.join(timeout=60)
        assert self.loop.failures == [], self.loop.failures
        print(f"curl through HAProxy meanwhile: {self.loop.ok} requests, 0 failed")


@pytest.fixture
def traffic(cluster: Cluster) -> Iterator[Traffic]:
    loop = CurlLoop(cluster)
    running = Traffic(loop, threading.Thread(target=loop.run, daemon=True))
    running.thread.start()
    try:
        wait_until("the loop has made requests", lambda: loop.ok >= 3)
        yield running
    finally:
        if running.thread.is_alive():
            running.end()


def console_identity_of(node: Node) -> str:
    pem = (node.state_dir / "console-identity.pem").read_bytes()
    return thumbprint(x509.load_pem_x509_certificate(pem))


def follows_the_feed(cluster: Cluster, nodes: list[Node], echo: int, user: str) -> None:
    """A device enrolled now is admitted by ``nodes``, and refused once blocked: both
    reach them only in batches the group's current console identity signs."""
    uid, cert, key = enroll_app(cluster.console, cluster.work, user)
    wait_until(
        f"{user} is admitted by {[n.name for n in nodes]}",
        lambda: all(admits(cluster, n.proxy_port, echo, (cert, key)) for n in nodes),
    )
    with admin(cluster) as client:
        client.post(f"/api/v1/devices/{uid}/block").raise_for_status()
    wait_until(
        f"{user}, blocked, is refused by {[n.name for n in nodes]}",
        lambda: not any(admits(cluster, n.proxy_port, echo, (cert, key)) for n in nodes),
    )


def test_console_identity_missed_by_a_stopped_node_and_one_without_its_table(
    cluster: Cluster,
    late: Late,
    traffic: Traffic,
    echo_port: int,  # noqa: F811 (the fixture imported above)
) -> None:
    old = console_identity_of(late.keeps)
    late.stop_both()  # down from before prepare
    base = f"/api/v1/groups/{GROUP}/rotations/console-identity"
    with admin(cluster) as client:
        prepared = client.post(base, json={"overlap_s": 0})
    assert prepared.status_code == 201, prepared.text
    new = prepared.json()["new"]["thumbprint"]
    switched = cli(cluster, "switch", "console-identity", GROUP)
    assert switched.returncode == 0, switched.stderr

    start_node(late.loses, cluster.work)  # mid-overlap, without its table
    took = wait_until(
        "node-4 pins the new console identity from a snapshot and is fresh",
        lambda: healthy(late.loses) and sync_status(late.loses)["console_identity"] == new,
    )
    print(f"node-4 (no table, mid-overlap) pinned the new console identity in {took:.1f} s")
    assert console_identity_of(late.loses) == new  # stored: a restart keeps it

    refused = cli(cluster, "finish", "console-identity", GROUP)
    said = " ".join(refused.stderr.split())  # the CLI wraps long lines
    assert refused.returncode == 1 and "node node-3 still pins" in said, refused
    forced = cli(cluster, "finish", "console-identity", GROUP, "--force")
    assert forced.returncode == 0, forced.stderr

    start_node(late.keeps, cluster.work)  # after finish: the old identity's key is gone
    took = wait_until(
        "node-3 pins the new console identity and is fresh",
        lambda: healthy(late.keeps) and sync_status(late.keeps)["console_identity"] == new,
    )
    print(f"node-3 (down for the whole overlap) pinned the new console identity in {took:.1f} s")
    assert old != new and console_identity_of(late.keeps) == new
    follows_the_feed(cluster, [late.keeps, late.loses, *cluster.nodes], echo_port, "carol")
    for node in (late.keeps, late.loses):
        status = sync_status(node)
        assert (status["identity_error"], status["action_required"]) == (None, None)


def test_tunnel_identity_taken_from_a_snapshot_mid_overlap(
    cluster: Cluster,
    late: Late,
    traffic: Traffic,
) -> None:
    late.stop_both()
    start_node(late.keeps, cluster.work)  # node-3 follows the steps in its feed
    prepared = cli(cluster, "tunnel-identity", GROUP, "--overlap", "0s")
    assert prepared.returncode == 0, prepared.stderr
    new = json.loads(prepared.stdout)["new"]["thumbprint"]
    with admin(cluster) as client:
        client.post(f"/api/v1/groups/{GROUP}/rotations/tunnel-identity/switch").raise_for_status()

    start_node(late.loses, cluster.work)  # mid-overlap, without its table, the old identity
    took = wait_until(
        "node-4 presents the new tunnel identity (its key from the snapshot) and is fresh",
        lambda: healthy(late.loses) and served_thumbprint(cluster, late.loses) == new,
    )
    print(f"node-4 (no table, mid-overlap) swapped its tunnel identity in {took:.1f} s")
    stored = x509.load_pem_x509_certificate((late.loses.state_dir / "tunnel.pem").read_bytes())
    assert thumbprint(stored) == new
    wait_until(
        "every node calls the console with the new identity",
        lambda: all(n["presents"] == "new" for n in running_rotation(cluster)["nodes"]),
    )
    finished = cli(cluster, "finish", "tunnel-identity", GROUP)  # nothing depends on the old
    assert finished.returncode == 0, finished.stderr
    assert all(served_thumbprint(cluster, n) == new for n in [*cluster.nodes, late.keeps])


def test_device_root_missed_by_a_stopped_node_and_one_without_its_table(
    cluster: Cluster,
    late: Late,
    traffic: Traffic,
    echo_port: int,  # noqa: F811 (the fixture imported above)
) -> None:
    old_pair = (cluster.app_cert, cluster.app_key)
    old_root = sync_status(cluster.nodes[0])["device_roots"][0]
    late.stop_both()
    prepared = cli(cluster, "device-root", GROUP, "--overlap", "0s")
    assert prepared.returncode == 0, prepared.stderr
    new_root = json.loads(prepared.stdout)["new"]["thumbprint"]
    with admin(cluster) as client:
        client.post(f"/api/v1/groups/{GROUP}/rotations/device-root/switch").raise_for_status()
    _, cert, key = enroll_app(cluster.console, cluster.work, "renewed")  # from the new root
    renewed = (cert, key)

    start_node(late.loses, cluster.work)  # mid-overlap, without its table
    wait_until(
        "node-4 trusts both Device Roots from a snapshot, admits the new-root device",
        lambda: (
            healthy(late.loses)
            and sync_status(late.loses)["device_roots"] == [new_root, old_root]
            and admits(cluster, late.loses.proxy_port, echo_port, renewed)
        ),
    )
    assert admits(cluster, late.loses.proxy_port, echo_port, old_pair)  # both, in the overlap

    late.stop_both()  # node-4 loses its table again, and misses the finish step too
    traffic.end()  # the old-root client is done: finish revokes its certificate
    forced = cli(cluster, "finish", "device-root", GROUP, "--force")
    assert forced.returncode == 0, forced.stderr
    start_node(late.keeps, cluster.work)  # down for the whole overlap, with its table
    start_node(late.loses, cluster.work)
    for node in (late.keeps, late.loses):
        took = wait_until(
            f"{node.name} trusts the new Device Root alone and admits the new-root device",
            lambda n=node: (
                healthy(n)  # type: ignore[misc]
                and sync_status(n)["device_roots"] == [new_root]
                and admits(cluster, n.proxy_port, echo_port, renewed)
            ),
        )
        print(f"{node.name} took the new Device Root in {took:.1f} s after its start")
        assert not admits(cluster, node.proxy_port, echo_port, old_pair)
        assert sync_status(node)["action_required"] is None
