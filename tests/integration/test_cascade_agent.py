"""Scenario: a device agent's Kerberos and UDP through a cascade (issue #16), real processes.

A console; one back end and two front ends, the front ends behind HAProxy on the Per-App
Tunnel port the device's profile names; a real MIT KDC and a real dnsmasq on loopback; the
device agent (``certgate device run --kdc-proxy --udp-forward``); real ``kinit`` and ``dig``.

Neither the KDC proxy nor UDP needs anything of its own in a cascade: a front end relays
the admitted tunnel's bytes (the KKDCP frame, the datagram frames) and the back end serves
the reserved KDC-proxy name, decodes the frames, applies the server traffic rules and alone
asks the KDC or sends the datagrams (docs/CONVENTIONS.md, "Cascade mode"). Shows:

* kinit obtains a TGT through agent -> front end -> back end -> KDC: the back end logs the
  exchange as ``dest=kdc:REALM`` (it served it), a front end only the hop of the reserved
  name; a non-compliant device is refused by the front end (kinit fails), and served again
  once compliant;
* dig resolves through the agent's UDP forward -> front end -> back end -> dnsmasq, both
  ends logging a ``transport=udp`` admission; server rules without ``udp`` are applied by
  the back end alone (it refuses, a front end passes the refusal on) and dig gets no answer;
* with the back end stopped, kinit and dig fail although the KDC and dnsmasq still answer
  from this host: a front end has no path of its own to either.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from certgate.tunnel.kdcproxy import KDC_PROXY_HOST, KDC_PROXY_PORT
from tests.dnsmasq import ANSWER, dig, start_dnsmasq
from tests.integration.cluster import APP, Cluster, Node, start_cluster, start_haproxy, stop_node
from tests.integration.cluster import stop_process as stop
from tests.integration.test_kdc_proxy import (
    NEEDS_KRB5,
    REALM,
    WAIT_S,
    World,
    kerberos_settings,
    kinit,
    kinit_until,
    patch_settings,
    set_compliance,
    start_agent,
    start_kdc,
    wait_for,
    wait_for_agent_403,
)
from tests.integration.test_live_policy import enroll_device
from tests.support import free_port, free_udp_port

pytestmark = [pytest.mark.integration, NEEDS_KRB5]

LOOPBACK_TCP_AND_UDP: dict[str, Any] = {
    "default": "deny",
    "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"], "protocols": ["tcp", "udp"]}],
}
LOOPBACK_TCP_ONLY: dict[str, Any] = {
    "default": "deny",
    "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
}
# The forward's app may send UDP to loopback only through the tunnel.
DEVICE_RULES: dict[str, Any] = {
    "default": "block",
    "rules": [{"apps": [APP], "domains": ["127.0.0.1"], "action": "tunnel"}],
}


@dataclass
class CascadeWorld(World):
    dns_port: int = 0
    dns_forward_port: int = 0  # the agent's local UDP forward to dnsmasq


def cascade_settings(kdc_port: int, per_app_port: int) -> dict[str, Any]:
    return {
        **kerberos_settings(kdc_port, per_app_port),
        "server_rules": LOOPBACK_TCP_AND_UDP,
        "device_rules": DEVICE_RULES,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CascadeWorld]:
    work = tmp_path_factory.mktemp("cascade-agent")
    per_app_port, kdc_proxy_port, forward_port = free_port(), free_port(), free_udp_port()
    with contextlib.ExitStack() as stack:
        kdc = stack.enter_context(start_kdc(work / "kdc"))
        dns_port = stack.enter_context(start_dnsmasq(work / "dnsmasq"))
        cluster = stack.enter_context(
            start_cluster(
                work,
                cascade_settings(kdc.port, per_app_port),
                node_names=("back", "front-1", "front-2"),
                back_ends=("back",),
            )
        )
        haproxy, _ = start_haproxy(work, fronts(cluster), "per_app", per_app_port)
        stack.callback(stop, haproxy)
        device = enroll_device(cluster, work / "device")
        forward = f"{APP}={forward_port}:127.0.0.1:{dns_port}"
        agent = start_agent(device, work, kdc_proxy_port, "--udp-forward", forward)
        stack.callback(stop, agent)
        yield CascadeWorld(
            cluster, kdc, device, agent, work / "agent.log", kdc_proxy_port, work,
            dns_port, forward_port,
        )  # fmt: skip


def fronts(cluster: Cluster) -> list[Node]:
    return [n for n in cluster.nodes if n.name.startswith("front")]


def back(cluster: Cluster) -> Node:
    return next(n for n in cluster.nodes if n.name == "back")


def log_of(world: World, node: Node) -> str:
    return (world.work / f"{node.name}.log").read_text(errors="replace")


def fronts_log(world: World) -> str:
    return "".join(log_of(world, node) for node in fronts(world.cluster))


def dig_until(world: CascadeWorld, ok: bool) -> subprocess.CompletedProcess[str]:
    """dig through the forward until it is answered (``ok``) or not; bounded by WAIT_S.
    The agent reopens a refused or closed UDP tunnel at most once a second."""
    deadline = time.monotonic() + WAIT_S
    while True:
        done = dig(world.dns_forward_port, timeout_s=2)
        if (done.stdout.strip() == ANSWER) == ok or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def test_kinit_obtains_a_ticket_through_front_and_back_end(world: CascadeWorld) -> None:
    done = kinit(world)
    assert done.returncode == 0, done.stderr + world.agent_log.read_text()
    assert f"krbtgt/{REALM}@{REALM}" in done.stdout
    assert "AS_REQ" in world.kdc.log.read_text()  # the real KDC answered it
    wait_for(lambda: f"dest=kdc:{REALM}" in log_of(world, back(world.cluster)), "back end's line")
    # A front end admitted the device and hopped with the reserved name; it served nothing.
    assert f"dest={KDC_PROXY_HOST}:{KDC_PROXY_PORT}" in fronts_log(world)
    assert f"dest=kdc:{REALM}" not in fronts_log(world)


def test_a_noncompliant_device_is_refused_through_the_cascade(world: CascadeWorld) -> None:
    set_compliance(world, "noncompliant")
    try:
        refused = kinit_until(world, ok=False)
        assert refused.returncode != 0, "kinit got a ticket for a non-compliant device"
        assert "reason=noncompliant" in fronts_log(world)  # the front end judges first
        wait_for_agent_403(world)
    finally:
        set_compliance(world, "compliant")
    again = kinit_until(world, ok=True)
    assert again.returncode == 0, again.stderr


def test_dig_resolves_through_front_and_back_end(world: CascadeWorld) -> None:
    done = dig_until(world, ok=True)
    assert done.returncode == 0 and done.stdout.strip() == ANSWER, done
    destination = f"dest=127.0.0.1:{world.dns_port} transport=udp"
    wait_for(lambda: destination in log_of(world, back(world.cluster)), "back end's udp line")
    assert destination in fronts_log(world)  # admitted there too, then relayed as bytes


def test_rules_without_udp_are_applied_by_the_back_end(world: CascadeWorld) -> None:
    refusal = f"refuse udp to 127.0.0.1:{world.dns_port}"
    assert refusal not in log_of(world, back(world.cluster))
    patch_settings(world, {"server_rules": LOOPBACK_TCP_ONLY})
    try:
        refused = dig_until(world, ok=False)
        assert refused.stdout.strip() != ANSWER, refused
        wait_for(lambda: refusal in log_of(world, back(world.cluster)), "back end's refusal")
        assert refusal not in fronts_log(world)  # a front end routes nothing
    finally:
        patch_settings(world, {"server_rules": LOOPBACK_TCP_AND_UDP})
    assert dig_until(world, ok=True).stdout.strip() == ANSWER


def test_without_its_back_end_a_front_end_reaches_neither(world: CascadeWorld) -> None:
    """Last: it stops the back end. The KDC and dnsmasq still answer from this host."""
    assert dig(world.dns_port).stdout.strip() == ANSWER
    with socket.create_connection(("127.0.0.1", world.kdc.port), timeout=5):
        pass
    stop_node(back(world.cluster))
    refused = kinit(world)
    assert refused.returncode != 0, "kinit got a ticket without the back end"
    assert dig_until(world, ok=False).stdout.strip() != ANSWER
    wait_for(lambda: "reason=back_end_unreachable" in fronts_log(world), "front end's refusal")
