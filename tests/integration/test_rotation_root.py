"""Scenario: a Root rotation without downtime, on real processes (its own cluster: the
rotation is instance-wide).

A console, two tunnel nodes behind a real HAProxy, real curl clients (Proxy mode) in a
loop through HAProxy and live CONNECT tunnels to each node and through HAProxy, to a real
echo server (helpers of tests/integration/test_rotation.py). Shown, in order:

* prepare by the CLI: both nodes trust both Roots (healthz, the console's status) and
  send the cross certificate of their Root: a client anchored on either Root alone
  verifies a node;
* switch by the API: new work chains to the new Root (the nodes' intermediates are its),
  a client anchored on either Root alone still verifies both nodes and the console; a
  device made noncompliant during the rotation loses its live tunnels and is refused;
* finish by the API, not forced, once both nodes report the new Root: they trust it
  alone; their chains and the console's end at the cross certificate the old Root signed
  for the new one (offered after finish), so a client anchored on either Root alone
  still verifies (one that pins the old Root climbs: tests/integration/
  test_rotation_root_catchup.py).

0 failed curl requests and 0 closed live tunnels through prepare, switch and finish
(counted, printed). The curl clients' CA file holds the old Root and its intermediates
(same keys as the new ones), so they need no step of theirs.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from certgate.pki.thumbprint import thumbprint
from tests.integration.cluster import GROUP, Cluster, Node, start_cluster
from tests.integration.test_rotation import (
    CurlLoop,
    LiveTunnel,
    admin,
    cli,
    echo_port,  # noqa: F401 (a fixture)
    new_device_refused_when_noncompliant,
    report,
    rotation_of,
    sync_status,
    traffic,  # noqa: F401 (a fixture)
    wait_until,
)

pytestmark = pytest.mark.integration

ROTATION = f"/api/v1/groups/{GROUP}/rotations/root"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("root")) as running:
        yield running


def roots_of(node: Node) -> list[x509.Certificate]:
    """The Roots the node stored (root.pem), the current one first."""
    return x509.load_pem_x509_certificates((node.state_dir / "root.pem").read_bytes())


def vouches(node: Node, old: x509.Certificate, new: x509.Certificate) -> bool:
    """What the node sends after its Secure Channel Root (chain.pem) is the cross
    certificate of ``new``'s key that ``old`` signed."""
    last = x509.load_pem_x509_certificates((node.state_dir / "chain.pem").read_bytes())[-1]
    try:
        last.verify_directly_issued_by(old)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return last.public_key() == new.public_key()


def anchored_on(cluster: Cluster, port: int, anchor: x509.Certificate) -> bool:
    """A handshake with the node on ``port`` (presenting the app certificate), whose only
    trust anchor is ``anchor``, verifies."""
    ctx = ssl.create_default_context(cadata=anchor.public_bytes(Encoding.PEM).decode())
    ctx.load_cert_chain(cluster.app_cert, cluster.app_key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
    except ssl.SSLCertVerificationError:
        return False


def console_anchored_on(cluster: Cluster, anchor: x509.Certificate) -> bool:
    ctx = ssl.create_default_context(cadata=anchor.public_bytes(Encoding.PEM).decode())
    try:
        with (
            socket.create_connection(("127.0.0.1", cluster.console.port), timeout=15) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return True
    except ssl.SSLCertVerificationError:
        return False


def test_root_rotation_without_a_failed_connection(
    cluster: Cluster,
    traffic: tuple[CurlLoop, list[LiveTunnel]],  # noqa: F811 (the fixture imported above)
    echo_port: int,  # noqa: F811
) -> None:
    loop, tunnels = traffic
    first = cluster.nodes[0]
    wait_until("the loop has made requests", lambda: loop.ok >= 3)
    (old_root,) = sync_status(first)["roots"]
    (old_anchor,) = roots_of(first)

    prepared = cli(cluster, "root", GROUP, "--overlap", "0s")
    assert prepared.returncode == 0, prepared.stderr
    new_root = json.loads(prepared.stdout)["new"]["thumbprint"]
    took = wait_until(
        "both nodes trust both Roots",
        lambda: all(sync_status(n)["roots"] == [old_root, new_root] for n in cluster.nodes),
    )
    wait_until(
        "the status shows both nodes with the new Root",
        lambda: all(n["has_new"] for n in rotation_of(cluster, "root")["nodes"]),
    )
    new_anchor = roots_of(first)[1]
    assert thumbprint(new_anchor) == new_root
    for node in cluster.nodes:  # each sends the cross certificate of its Root
        for anchor in (old_anchor, new_anchor):
            assert anchored_on(cluster, node.proxy_port, anchor), (node.name, thumbprint(anchor))
    report(f"prepare (nodes trusted both after {took * 1000:.0f} ms)", loop, tunnels)

    with admin(cluster) as client:
        switched = client.post(ROTATION + "/switch")
    assert switched.status_code == 200, switched.text
    took = wait_until(
        "both nodes put the new Root first",
        lambda: all(sync_status(n)["roots"] == [new_root, old_root] for n in cluster.nodes),
    )
    for anchor in (old_anchor, new_anchor):
        assert console_anchored_on(cluster, anchor), thumbprint(anchor)
        for node in cluster.nodes:
            assert anchored_on(cluster, node.proxy_port, anchor), (node.name, thumbprint(anchor))
    report(f"switch (nodes took it after {took * 1000:.0f} ms)", loop, tunnels)

    # A device enrolled now gets a certificate under the new Root; made noncompliant
    # during the rotation, it loses its live tunnels on both nodes and is refused.
    new_device_refused_when_noncompliant(cluster, echo_port, "Root")
    report("noncompliant device refused", loop, tunnels)

    # Finish, not forced: it goes through once both nodes report the new Root.
    def finished() -> bool:
        with admin(cluster) as client:
            return client.post(ROTATION + "/finish").status_code == 200

    wait_until("the finish is no longer refused", finished)
    took = wait_until(
        "both nodes trust the new Root alone",
        lambda: all(sync_status(n)["roots"] == [new_root] for n in cluster.nodes),
    )
    wait_until(  # root-cross, offered after finish: the old Root vouching for the new one
        "both nodes' chains end at the cross certificate the old Root signed",
        lambda: all(vouches(n, old_anchor, new_anchor) for n in cluster.nodes),
    )
    for anchor in (old_anchor, new_anchor):  # a party pinning the old Root alone climbs
        assert console_anchored_on(cluster, anchor), thumbprint(anchor)
        for node in cluster.nodes:
            assert anchored_on(cluster, node.proxy_port, anchor), (node.name, thumbprint(anchor))
    time.sleep(3)  # traffic keeps flowing after finish (the loop counts every request)
    report(f"finish (nodes dropped the old Root after {took * 1000:.0f} ms)", loop, tunnels)

    for node in cluster.nodes:
        assert sync_status(node)["last_error"] is None
        assert [thumbprint(r) for r in roots_of(node)] == [new_root]
    assert loop.failures == [], loop.failures
    print(
        f"root rotation: {loop.ok} curl requests, 0 failed; {len(tunnels)} live tunnels, 0 closed"
    )
