"""Scenario: a tunnel node down for a whole Root rotation recovers by itself; one down for
two, or for a whole Secure Channel Root rotation, does not, and says what to run (its own
cluster: the rotations are instance-wide).

A console, node-1 behind HAProxy, and node-late and node-bare outside it, stopped before
a rotation's prepare and started after its finish with their old state directories. The
rotations are taken by the CLI (another process: the console presents each step's chain
by itself, and node-1, which follows them, stays fresh):

* one missed Root rotation, node-bare losing its persisted table meanwhile: finish is
  refused while they have not reported the new Root ("node node-late does not trust the
  new Root yet"), then forced. Started again, both pin the old Root alone; the console's
  TLS chain ends at the cross certificate the old Root signed for the new one
  (``root-cross``, offered after finish), so both verify the console; node-late replays
  the rotation's prepare, switch and finish from its feed, node-bare takes the Root step
  of a snapshot page (the new Root taken because the pinned Root vouches for it,
  ``pki.verify.vouched_roots``); both pin the new Root alone (root.pem) and admit a
  compliant device, with no operator step;
* two missed Root rotations: the console offers only the last one's cross certificate,
  which no Root the node pins signed; the node cannot verify the console, stays stale
  (fails closed: a compliant device is refused) and ``/healthz`` ``sync.action_required``
  says to run ``certgate tunnel setup`` for its group again;
* a missed Secure Channel Root rotation (node-bare, which followed the Root rotations):
  its switch renewed the group's tunnel identity and its finish retired the old one,
  whose holder the console never hands the new key; the console refuses the node (401,
  "run 'certgate tunnel setup' for group G again"), which fails closed and says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from cryptography import x509

from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.persist import JOURNAL_FILE, SNAPSHOT_FILE
from tests.integration.cluster import (
    GROUP,
    Cluster,
    Node,
    setup_node,
    start_cluster,
    start_node,
    stop_node,
)
from tests.integration.test_rotation import (
    admin,
    admits,
    cli,
    echo_port,  # noqa: F401 (a fixture)
    healthy,
    rotation_of,
    sync_status,
    wait_until,
)

pytestmark = pytest.mark.integration

ROTATION = f"/api/v1/groups/{GROUP}/rotations/root"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("rootcatchup"), node_names=("node-1",)) as c:
        yield c


@pytest.fixture(scope="module")
def late(cluster: Cluster) -> Iterator[Node]:
    yield from started_node(cluster, "node-late")


@pytest.fixture(scope="module")
def bare(cluster: Cluster) -> Iterator[Node]:
    """A node that also loses its persisted table while it is down."""
    yield from started_node(cluster, "node-bare")


def started_node(cluster: Cluster, name: str) -> Iterator[Node]:
    node = setup_node(cluster.work, cluster.console, name)
    try:
        start_node(node, cluster.work)
        wait_until(f"{name} is fresh", lambda: healthy(node))
        yield node
    finally:
        stop_node(node)


def pinned_roots(node: Node) -> list[str]:
    """The Roots the node stored (root.pem), the current one first."""
    pem = (node.state_dir / "root.pem").read_bytes()
    return [thumbprint(root) for root in x509.load_pem_x509_certificates(pem)]


def rotation_nodes(cluster: Cluster) -> list[dict[str, object]]:
    nodes: list[dict[str, object]] = rotation_of(cluster, "root")["nodes"]
    return nodes


def rotate_root_while_down(cluster: Cluster, *down: Node) -> str:
    """A whole Root rotation by the CLI (``certgate console rotate``: another process than
    the console, which presents each step's chain by itself) while ``down`` are stopped;
    finish forced only because of them. Returns the new Root."""
    prepared = cli(cluster, "root", GROUP, "--overlap", "0s")
    assert prepared.returncode == 0, prepared.stderr
    new_root = str(json.loads(prepared.stdout)["new"]["thumbprint"])
    (up,) = cluster.nodes
    switched = cli(cluster, "switch", "root", GROUP)
    assert switched.returncode == 0, switched.stderr
    wait_until(
        f"the status shows {up.name} with the new Root",
        lambda: any(n["name"] == up.name and n["has_new"] for n in rotation_nodes(cluster)),
    )
    refused = cli(cluster, "finish", "root", GROUP)
    said = " ".join(refused.stderr.split())  # the CLI wraps long lines
    assert refused.returncode == 1, refused
    for node in down:
        assert f"node {node.name} does not trust the new Root yet" in said, said
    print(f"finish refused: {said}")
    forced = cli(cluster, "finish", "root", GROUP, "--force")
    assert forced.returncode == 0, forced.stderr
    wait_until(
        f"{up.name} trusts the new Root alone and follows the feed",
        lambda: sync_status(up)["roots"] == [new_root] and sync_status(up)["last_error"] is None,
    )
    return new_root


def test_a_node_down_for_a_whole_root_rotation_takes_the_new_root_by_itself(
    cluster: Cluster,
    late: Node,
    bare: Node,
    echo_port: int,  # noqa: F811 (the fixture imported above)
) -> None:
    device = (cluster.app_cert, cluster.app_key)
    (old_root,) = pinned_roots(late)
    for node in (late, bare):  # down from before prepare until after finish
        stop_node(node)
    for name in (SNAPSHOT_FILE, JOURNAL_FILE):  # node-bare: from a snapshot page
        (bare.state_dir / name).unlink(missing_ok=True)
    new_root = rotate_root_while_down(cluster, late, bare)

    for node in (late, bare):
        start_node(node, cluster.work)
    for node in (late, bare):
        took = wait_until(
            f"{node.name} trusts the new Root alone, is fresh and admits the compliant device",
            lambda n=node: (  # type: ignore[misc]
                healthy(n)
                and sync_status(n)["roots"] == [new_root]
                and admits(cluster, n.proxy_port, echo_port, device)
            ),
        )
        print(f"{node.name} took the new Root in {took:.1f} s after its start")
        assert pinned_roots(node) == [new_root]  # stored: a restart starts from the new Root
        status = sync_status(node)
        assert (status["action_required"], status["identity_error"]) == (None, None)
    assert old_root != new_root
    log = (cluster.work / "node-late.log").read_text(errors="replace")
    assert "(root finish): now using root " + new_root in log  # replayed from its feed
    assert healthy(cluster.nodes[0])  # the node that followed the rotation is fresh too


def test_a_node_down_for_two_root_rotations_says_what_to_run(
    cluster: Cluster,
    late: Node,
    echo_port: int,  # noqa: F811 (the fixture imported above)
) -> None:
    device = (cluster.app_cert, cluster.app_key)
    pinned = pinned_roots(late)
    stop_node(late)
    rotate_root_while_down(cluster, late)
    rotate_root_while_down(cluster, late)  # the console now offers this one's cross alone

    start_node(late, cluster.work)
    wait_until(
        "node-late says what to run",
        lambda: "run 'certgate tunnel setup'" in str(sync_status(late)["action_required"]),
    )
    # Its last exchange was before the rotations: once the staleness budget (10 s) has
    # passed since then, it fails closed, and goes on saying what to run.
    wait_until("node-late is stale", lambda: late.health().status_code == 503)
    health = late.health().json()
    said = health["sync"]["action_required"]
    print(f"node down for two Root rotations: {said}")
    assert f"for group {GROUP} again" in said and "certificate verify failed" in said
    assert said in health["warnings"] and not health["sync"]["fresh"]
    assert not admits(cluster, late.proxy_port, echo_port, device)
    assert pinned_roots(late) == pinned  # nothing taken from a console it cannot verify
    assert healthy(cluster.nodes[0])


def test_a_node_down_for_a_whole_secure_channel_root_rotation_says_what_to_run(
    cluster: Cluster,
    bare: Node,
    echo_port: int,  # noqa: F811 (the fixture imported above)
) -> None:
    """Its tunnel identity was renewed by the switch and retired at finish: the console
    never hands the new key to a retired identity (a thief holding the old pair would get
    it), so the node cannot recover by itself; it says what to run and fails closed."""
    device = (cluster.app_cert, cluster.app_key)
    wait_until("node-bare is fresh", lambda: healthy(bare))  # it followed the Root rotations
    identity = sync_status(bare)["tunnel_identity"]
    stop_node(bare)
    base = f"/api/v1/groups/{GROUP}/rotations/secure-channel-root"
    with admin(cluster) as client:
        client.post(base, json={"overlap_s": 0}).raise_for_status()
        client.post(base + "/switch").raise_for_status()
        refused = client.post(base + "/finish")
        assert refused.status_code == 409, refused.text
        assert "node node-bare still presents the old identity" in refused.json()["detail"]
        client.post(base + "/finish", params={"force": "true"}).raise_for_status()

    start_node(bare, cluster.work)
    wait_until(
        "node-bare says what to run",
        lambda: "run 'certgate tunnel setup'" in str(sync_status(bare)["action_required"]),
    )
    wait_until("node-bare is stale", lambda: bare.health().status_code == 503)
    health = bare.health().json()
    said = health["sync"]["action_required"]
    print(f"node down for a whole Secure Channel Root rotation: {said}")
    assert "tunnel identity was retired by rotation" in said
    assert f"run 'certgate tunnel setup' for group {GROUP} again" in said
    assert said in health["warnings"] and not health["sync"]["fresh"]
    assert sync_status(bare)["tunnel_identity"] == identity  # it took nothing
    assert not admits(cluster, bare.proxy_port, echo_port, device)
