"""Sizes of a run (full or smoke) and the shared world every scenario starts from."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from bench import fixture
from bench.fixture import Admin, Console, DeviceCert, RelayCerts
from bench.procs import Supervisor

RELAY_GROUP = "bench"
FLEET_GROUP = "fleet"


@dataclass(frozen=True)
class Sizes:
    transfer_bytes: int  # per direction, per repetition, one stream
    transfer_reps: int
    rate_seconds: float  # per relay and handshake kind
    rate_threads: int
    storm_seconds: float  # TCP connect-and-close probes per relay, as fast as they go
    idle_tunnels: int
    active_tunnels: int
    active_bytes: int  # per active tunnel and direction
    devices: int
    feed_changes: int
    lookups: int
    enforce_changes: int
    issuance_pki: int  # certificates signed in the PKI-layer run
    issuance_api_seconds: float
    issuance_api_clients: int
    issuance_devices: int


FULL = Sizes(
    transfer_bytes=256 * 2**20,
    transfer_reps=3,
    rate_seconds=5.0,
    rate_threads=4,
    storm_seconds=3.0,
    idle_tunnels=10_000,
    active_tunnels=100,
    active_bytes=4 * 2**20,
    devices=1_000_000,
    feed_changes=100_000,
    lookups=200_000,
    enforce_changes=100,
    issuance_pki=3_000,
    issuance_api_seconds=10.0,
    issuance_api_clients=8,
    issuance_devices=8,
)

SMOKE = Sizes(
    transfer_bytes=48 * 2**20,  # enough CPU time to be a number
    transfer_reps=1,
    rate_seconds=0.3,
    rate_threads=2,
    storm_seconds=0.2,
    idle_tunnels=20,
    active_tunnels=4,
    active_bytes=4 * 2**20,
    devices=2_000,
    feed_changes=200,
    lookups=2_000,
    enforce_changes=2,
    issuance_pki=20,
    issuance_api_seconds=0.5,
    issuance_api_clients=2,
    issuance_devices=2,
)


def resized(sizes: Sizes, overrides: list[str]) -> Sizes:
    """``sizes`` with ``NAME=VALUE`` overrides, each VALUE of the field's own type."""
    types = {f.name: f.type for f in fields(Sizes)}
    changed: dict[str, int | float] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"not a size: {item!r} (one of {', '.join(types)})")
        changed[name] = float(value) if types[name] in (float, "float") else int(value)
    return replace(sizes, **changed)


@dataclass
class World:
    """A running console with two groups: ``bench`` (relay benchmarks, one enrolled app) and
    ``fleet`` (the device table benchmarks, two tunnel nodes set up)."""

    sizes: Sizes
    work: Path
    sup: Supervisor
    loadgen_cores: set[int]
    relay_cores: set[int]
    console: Console
    root: Admin
    relay_state: Path
    relay_app: DeviceCert
    certs: RelayCerts
    fleet_states: list[Path]
    fleet_app: DeviceCert
    fleet_user: str
    relay_user: str
    notes: list[str] = field(default_factory=list)


def build(sizes: Sizes, work: Path, sup: Supervisor, cores: tuple[set[int], set[int]]) -> World:
    console = Console.init(work)
    for group in (RELAY_GROUP, FLEET_GROUP):
        console.create_group(group)
    root = console.make_admin("root", "superadmin", "global")
    console.start(sup)
    relay_user = fixture.add_enrollment_user(console, root, RELAY_GROUP)
    fleet_user = fixture.add_enrollment_user(console, root, FLEET_GROUP)
    relay_app = fixture.enroll_app(console, relay_user, "relay-app")
    fleet_app = fixture.enroll_app(console, fleet_user, "fleet-app")
    relay_state = fixture.setup_node(console, root, RELAY_GROUP, "relay")
    fleet_states = [fixture.setup_node(console, root, FLEET_GROUP, f"fleet-{i}") for i in (1, 2)]
    return World(
        sizes=sizes,
        work=work,
        sup=sup,
        loadgen_cores=cores[0],
        relay_cores=cores[1],
        console=console,
        root=root,
        relay_state=relay_state,
        relay_app=relay_app,
        certs=fixture.relay_certs(relay_state, work),
        fleet_states=fleet_states,
        fleet_app=fleet_app,
        fleet_user=fleet_user,
        relay_user=relay_user,
    )
