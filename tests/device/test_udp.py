"""UDP through the Per-App Tunnel end to end: real ``dig`` against a real ``dnsmasq`` on
loopback, through the agent's local UDP forward, the device's mTLS tunnel and the real
data plane. dnsmasq listens only on its own port; the agent has no path to it but the
tunnel (device rules allow only ``tunnel`` for UDP), and the tunnel's log names each
admission with ``transport=udp``."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socks

from certgate.device.agent import DEFAULT_APP, AgentThread
from certgate.device.listeners import ListenAddress
from certgate.device.udp import FlowTable, UDPForwardSpec
from certgate.errors import ConfigError
from certgate.tunnel.sync import FeedChange
from certgate.tunnel.table import DeviceTable
from tests.device.harness import BROWSER, TunnelLog, agent_config, provision, tunnel_log
from tests.dnsmasq import ANSWER, NAME, dig, start_dnsmasq
from tests.tunnel.dataplane import PKI, Client, ServiceThread, StaticSource, make_service, policy

pytestmark = pytest.mark.integration

DEVICE_RULES: dict[str, Any] = {
    "default": "block",
    "rules": [
        {"apps": [BROWSER, DEFAULT_APP], "domains": ["127.0.0.1"], "action": "tunnel"},
        {"apps": ["*"], "domains": ["127.0.0.2"], "action": "block"},
    ],
}
UDP_RULES: dict[str, Any] = {
    "default": "deny",
    "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"], "protocols": ["udp"]}],
}
TCP_ONLY_RULES: dict[str, Any] = {
    "default": "deny",
    "rules": [{"action": "allow", "cidrs": ["127.0.0.0/8"]}],
}


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with start_dnsmasq(tmp_path_factory.mktemp("dnsmasq")) as port:
        yield port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def log() -> Iterator[TunnelLog]:
    with tunnel_log() as recorder:
        yield recorder


def forwarding(dns_port: int) -> dict[str, Any]:
    spec = UDPForwardSpec(BROWSER, ListenAddress("127.0.0.1", 0), "127.0.0.1", dns_port)
    return {"udp_forwards": (spec,)}


class World:
    """Tunnel data plane + agent with a UDP forward to dnsmasq."""

    def __init__(self, tmp_path: Path, pki: PKI, dns_port: int, rules: dict[str, Any]) -> None:
        self.device: Client = pki.client_cert(f"udp-{tmp_path.name}")
        self.source = StaticSource(DeviceTable.from_snapshot(1, [self.device.entry()]))
        self.tunnel = ServiceThread(make_service(pki, self.source, rules))
        self.tunnel.__enter__()
        state = provision(
            tmp_path / "s", pki, self.device, self.tunnel.service.bound["per_app"], DEVICE_RULES
        )
        self.agent = AgentThread(state, agent_config(**forwarding(dns_port)))
        self.agent.__enter__()
        self.port = self.agent.bound[f"udp:{BROWSER}"].port
        self.dns_port = dns_port

    def close(self) -> None:
        self.agent.__exit__(None, None, None)
        self.tunnel.__exit__(None, None, None)


@pytest.fixture
def world_factory(tmp_path: Path, pki: PKI, dnsmasq: int) -> Iterator[Any]:
    worlds: list[World] = []

    def make(rules: dict[str, Any]) -> World:
        worlds.append(World(tmp_path, pki, dnsmasq, rules))
        return worlds[-1]

    yield make
    for world in worlds:
        world.close()


def test_dig_resolves_through_the_tunnel(world_factory: Any, log: TunnelLog) -> None:
    world = world_factory(UDP_RULES)
    first, second = dig(world.port), dig(world.port)  # two dig runs: two source ports
    assert first.returncode == 0 and first.stdout.strip() == ANSWER, first
    assert second.returncode == 0 and second.stdout.strip() == ANSWER, second
    admits = [line for line in log.admits(app=BROWSER) if "transport=udp" in line]
    assert len(admits) == 1, log.lines  # both flows share one tunnel connection


def test_rules_without_udp_refuse_it(world_factory: Any, log: TunnelLog) -> None:
    world = world_factory(TCP_ONLY_RULES)
    result = dig(world.port, timeout_s=2)
    assert result.returncode == 9, result  # dig: no reply from any server
    denied = log.denials("destination_denied")
    assert denied and "refuse udp to 127.0.0.1" in denied[0], log.lines


def test_a_policy_change_closes_the_live_udp_tunnel(world_factory: Any, log: TunnelLog) -> None:
    world = world_factory(UDP_RULES)
    assert dig(world.port).stdout.strip() == ANSWER

    def tcp_only() -> int:
        world.source.policy = policy(TCP_ONLY_RULES, version=2)
        world.tunnel.service.on_change(FeedChange(None, time.time(), "policy"))
        return len(world.tunnel.service.shared.registry.all)

    assert world.tunnel.run(tcp_only) == 0  # the live UDP tunnel is gone at once
    assert any(
        line.startswith("close ") and "reason=destination_denied" in line for line in log.lines
    )
    assert dig(world.port, timeout_s=2).returncode == 9  # and a new one is refused
    assert log.denials("destination_denied"), log.lines


def dns_query(name: str, ident: int) -> bytes:
    """A standard recursive query for the A record of ``name`` (RFC 1035 section 4.1)."""
    header = ident.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return header + labels + b"\x00\x00\x01\x00\x01"


def socks_udp_client(world: World, timeout_s: float) -> socks.socksocket:
    client = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    client.set_proxy(socks.SOCKS5, "127.0.0.1", world.agent.bound["socks"].port)
    client.settimeout(timeout_s)
    return client


def test_socks5_udp_associate_carries_dns(world_factory: Any, log: TunnelLog) -> None:
    """PySocks, unmodified, asks the agent for UDP ASSOCIATE and sends a DNS query to
    dnsmasq; the answer comes back through the tunnel, wrapped for the client."""
    world = world_factory(UDP_RULES)
    with socks_udp_client(world, 10) as client:
        client.sendto(dns_query(NAME, 0x1234), ("127.0.0.1", world.dns_port))
        answer, source = client.recvfrom(4096)
    assert source == ("127.0.0.1", world.dns_port)
    assert answer[:2] == b"\x12\x34" and answer[3] & 0x0F == 0  # our id, RCODE NOERROR
    assert answer.endswith(socket.inet_aton(ANSWER))
    assert [line for line in log.admits(app=DEFAULT_APP) if "transport=udp" in line], log.lines


def test_socks5_udp_to_a_blocked_destination_is_dropped(world_factory: Any, log: TunnelLog) -> None:
    world = world_factory(UDP_RULES)
    with socks_udp_client(world, 2) as client:
        client.sendto(dns_query(NAME, 1), ("127.0.0.2", world.dns_port))
        with pytest.raises(TimeoutError):
            client.recvfrom(4096)
    assert not log.admits(), log.lines  # the tunnel never saw it


def test_forward_spec_parsing() -> None:
    spec = UDPForwardSpec.parse("com.example.dns=5353:dns.corp.test:53")
    assert spec == UDPForwardSpec(
        "com.example.dns", ListenAddress("127.0.0.1", 5353), "dns.corp.test", 53
    )
    assert UDPForwardSpec.parse("a.b=127.0.0.2:1:h:2").listen == ListenAddress("127.0.0.2", 1)
    for bad in ("a.b", "a.b=53", "a.b=1:h:x", "=1:h:2", "a.b=1:h:70000"):
        with pytest.raises(ConfigError):
            UDPForwardSpec.parse(bad)


def test_flow_table_numbers_senders_and_forgets_idle_ones() -> None:
    flows = FlowTable(idle_s=60, max_flows=2)
    one, two = flows.flow_of(("127.0.0.1", 1)), flows.flow_of(("127.0.0.1", 2))
    assert (one, two) == (1, 2) and flows.flow_of(("127.0.0.1", 1)) == 1
    assert flows.flow_of(("127.0.0.1", 3)) is None  # bounded
    assert flows.address_of(2) == ("127.0.0.1", 2)
    flows.idle_s = -1
    assert flows.flow_of(("127.0.0.1", 3)) == 3  # the idle ones were forgotten
    assert flows.address_of(1) is None


def test_a_udp_forward_listens_on_loopback_only() -> None:
    public = UDPForwardSpec(BROWSER, ListenAddress("0.0.0.0", 5353), "127.0.0.1", 53)
    with pytest.raises(ConfigError, match="not loopback"):
        agent_config(udp_forwards=(public,))
    bad_app = UDPForwardSpec("not a bundle", ListenAddress("127.0.0.1", 0), "127.0.0.1", 53)
    with pytest.raises(ConfigError, match="invalid application bundle id"):
        agent_config(udp_forwards=(bad_app,))
