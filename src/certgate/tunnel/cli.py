"""``certgate tunnel``: set a node up (from the console or an installer bundle), show it.

``run`` (the data plane) is added by ``certgate.tunnel.server``'s owner.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from certgate.cliconfig import ConfigFile
from certgate.errors import CertgateError
from certgate.feed import PolicyUpdate
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel import setup as setup_mod
from certgate.tunnel.config import TunnelState, load_state
from certgate.tunnel.persist import TableStore

app = typer.Typer(help="Tunnel gateway: setup, install, status, run.", no_args_is_help=True)

out = Console()
err = Console(stderr=True)

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir", envvar="CERTGATE_TUNNEL_DIR", help="Tunnel state directory (mode 0700)."
    ),
]
NodeName = Annotated[
    str, typer.Option("--node-name", help="This node's name, unique in the group.")
]
Pin = Annotated[
    str | None,
    typer.Option("--pin-sha256", help="SHA-256 thumbprint of the instance root to pin."),
]
Address = Annotated[str, typer.Option(help="Address the console records for this node.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@app.command()
def setup(
    console: Annotated[str, typer.Option("--console", help="Console URL (https://...).")],
    group: Annotated[str, typer.Option("--group", help="Group id of the tunnel.")],
    api_key: Annotated[
        str, typer.Option("--api-key", envvar="CERTGATE_API_KEY", help="Admin API key.")
    ],
    admin_cert: Annotated[
        Path,
        typer.Option("--admin-cert", help="Admin certificate: PKCS#12, or PEM with --admin-key."),
    ],
    state_dir: StateDir,
    node_name: NodeName,
    admin_key: Annotated[
        Path | None, typer.Option("--admin-key", help="Admin key (PEM) for a PEM --admin-cert.")
    ] = None,
    p12_password: Annotated[
        str | None,
        typer.Option("--p12-password", envvar="CERTGATE_P12_PASSWORD", help="PKCS#12 password."),
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="The instance root (PEM) to trust.")
    ] = None,
    pin_sha256: Pin = None,
    address: Address = "",
) -> None:
    """Fetch the group's tunnel identity and trust from the console (API key + admin cert)."""
    try:
        admin = setup_mod.load_admin_credential(
            api_key, admin_cert, key_path=admin_key, password=p12_password
        )
        root = setup_mod.resolve_root(console, ca_file=ca_file, pin_sha256=pin_sha256)
        state = setup_mod.setup(console, group, admin, root, state_dir, node_name, address=address)
    except (CertgateError, OSError) as exc:
        raise fail(str(exc)) from exc
    out.print(f"tunnel node [bold]{node_name}[/] set up for group [bold]{state.group_id}[/]")
    out.print(_state_table(state))


@app.command()
def install(
    bundle: Annotated[Path, typer.Argument(help="Installer bundle (.tar.gz) from the console.")],
    state_dir: StateDir,
    node_name: NodeName,
    pin_sha256: Pin = None,
    address: Address = "",
) -> None:
    """Verify an installer bundle, redeem its one-time token, store the tunnel state."""
    try:
        state = setup_mod.install(
            bundle, state_dir, node_name, pin_sha256=pin_sha256, address=address
        )
    except (CertgateError, OSError) as exc:
        raise fail(str(exc)) from exc
    out.print(f"tunnel node [bold]{node_name}[/] installed for group [bold]{state.group_id}[/]")
    out.print(_state_table(state))


@app.command()
def status(
    state_dir: StateDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (the /healthz keys).")] = (
        False
    ),
) -> None:
    """Show (and verify) a state directory: identity, trust, persisted device table, and
    the group policy in force (version, staleness budget, long-poll, restart required)."""
    try:
        state = load_state(state_dir)
        report = status_report(state)
    except CertgateError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    out.print(_status_table(state, report))


def status_report(state: TunnelState) -> dict[str, Any]:
    """What ``/healthz`` says of a running node, read from its state directory: the
    follower loads the persisted table as the node does at start (the policy in force is
    its latest, else the trust config's), and the ports the node bound when it last
    started say whether the policy moved one of them."""
    from certgate.tunnel.service import BoundListeners, moved_ports
    from certgate.tunnel.sync import FeedFollower

    # Makes no request and writes nothing: the node may be running beside it.
    follower = FeedFollower(state, state_dir=state.state_dir, read_only=True)
    sync = follower.status()
    info = TableStore(state.state_dir, read_only=True).describe()
    listeners = BoundListeners.load(state.state_dir)
    restart = None
    if listeners is not None:
        restart = moved_ports(listeners.bound, listeners.from_policy, follower.policy)
    return {
        "status": "ok" if sync["fresh"] else "stale",
        "group_id": state.group_id,
        "table_entries": sync["entries"],
        "table_seq": sync["seq"],
        "policy_version": sync["policy_version"],
        "policy": _policy_summary(follower.policy),
        "restart_required": restart,  # None: the node never started from this directory
        "bound": None if listeners is None else listeners.bound,
        "sync": sync,
        "store": {
            "snapshot_seq": info.snapshot_seq,
            "snapshot_entries": info.snapshot_entries,
            "journal_batches": info.journal_batches,
            "journal_bytes": info.journal_bytes,
        },
    }


def _policy_summary(policy: PolicyUpdate) -> dict[str, Any]:
    """The policy's version, timings and ports (its rules are the console's to show)."""
    encoded = policy.encode()
    return {key: encoded[key] for key in ("version", "feed", "tunnel")}


def _status_table(state: TunnelState, report: dict[str, Any]) -> Table:
    sync, store = report["sync"], report["store"]
    table = _state_table(state, report["policy"])
    table.add_row("table seq", f"{report['table_seq']} ({report['table_entries']} entries)")
    table.add_row("table seq (snapshot)", _text(store["snapshot_seq"]))
    table.add_row("table entries (snapshot)", _text(store["snapshot_entries"]))
    table.add_row("journal", f"{store['journal_batches']} batches, {store['journal_bytes']} bytes")
    if sync["age_s"] is None:
        table.add_row("last console exchange", "never")
    else:
        fresh = "fresh" if sync["fresh"] else "STALE"
        budget = sync["max_staleness_s"]
        table.add_row(
            "last console exchange", f"{sync['age_s']:.0f}s ago ({fresh}, budget {budget:g}s)"
        )
    table.add_row("restart required", _restart_text(report["restart_required"]))
    return table


def _restart_text(problems: list[str] | None) -> str:
    if problems is None:
        return "unknown (the node has not run from this directory)"
    return "; ".join(problems) if problems else "no"


def _state_table(state: TunnelState, policy: dict[str, Any] | None = None) -> Table:
    """``policy``: a ``_policy_summary``, the one in force; default: the trust config's."""
    shown = policy or _policy_summary(state.trust.policy)
    table = Table("setting", "value", title=f"tunnel state {state.state_dir}")
    table.add_row("group", state.group_id)
    table.add_row("node", state.node_name)
    table.add_row("console", state.console_url)
    table.add_row("instance root", thumbprint(state.root))
    table.add_row("tunnel identity", state.tunnel_thumbprint)
    table.add_row("tunnel identity expires", _when(state.tunnel_cert.not_valid_after_utc))
    table.add_row("console identity (pinned)", thumbprint(state.console_identity))
    table.add_row(
        "trust config expires", _when(datetime.fromtimestamp(state.trust.expires_at, UTC))
    )
    tunnel = state.trust.tunnel
    table.add_row("names", ", ".join([*tunnel.hostnames, *tunnel.ip_addresses]))
    ports = shown["tunnel"]
    table.add_row("ports", f"proxy {ports['proxy_port']}, per-app {ports['per_app_port']}")
    table.add_row("policy version", str(shown["version"]))
    table.add_row("staleness budget", f"{shown['feed']['max_staleness_s']:g}s")
    table.add_row("long-poll", f"{shown['feed']['long_poll_s']:g}s")
    return table


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _text(value: int | None) -> str:
    return "-" if value is None else str(value)


@app.command()
def run(
    state_dir: StateDir,
    listen_host: Annotated[str, typer.Option(help="Address of both data listeners.")] = (
        "127.0.0.1"
    ),
    proxy_listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the Proxy-mode listener (default: trust config port)."),
    ] = None,
    per_app_listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the Per-App Tunnel listener (default: trust config port)."),
    ] = None,
    admin_listen: Annotated[str, typer.Option(help="HOST:PORT for /healthz and /metrics.")] = (
        "127.0.0.1:9102"
    ),
    loop: Annotated[str, typer.Option(help="Event loop: asyncio (default) or uvloop.")] = (
        "asyncio"
    ),
    drain_s: Annotated[float, typer.Option(help="Graceful shutdown budget.")] = 30.0,
    tls_curve: Annotated[
        str | None,
        typer.Option(
            help="Pin one key-exchange curve (prime256v1, secp384r1, X25519); "
            "default: X25519, P-256 and P-384."
        ),
    ] = None,
    config_file: ConfigFile = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Data-plane processes sharing the listeners and one device table "
            "(default: the usable CPUs); 1 serves from this process."
        ),
    ] = None,
    role: Annotated[
        str,
        typer.Option(
            help="standalone (default); front-end: admit, then relay to a back end; "
            "back-end: accept only this group's front ends and reach the destinations."
        ),
    ] = "standalone",
    back_end: Annotated[
        list[str] | None,
        typer.Option(help="HOST:PORT (IP address) of a back end; repeat for several."),
    ] = None,
    tls_backend: Annotated[
        str,
        typer.Option(
            help="TLS library of the data plane: pyopenssl (default: OpenSSL of the "
            "cryptography wheel, faster) or ssl (Python's, the system OpenSSL)."
        ),
    ] = "pyopenssl",
) -> None:
    """Serve the data plane: follow the console's signed feed, admit known devices."""
    from certgate.tunnel.cascade import Role
    from certgate.tunnel.runner import RunOptions
    from certgate.tunnel.runner import run as run_tunnel
    from certgate.tunnel.service import Endpoint
    from certgate.tunnel.workers import usable_cpus

    try:
        options = RunOptions(
            state_dir=state_dir,
            listen_host=listen_host,
            proxy=Endpoint.parse(proxy_listen) if proxy_listen else None,
            per_app=Endpoint.parse(per_app_listen) if per_app_listen else None,
            admin=Endpoint.parse(admin_listen),
            loop=loop,
            drain_s=drain_s,
            tls_curve=tls_curve,
            workers=usable_cpus() if workers is None else workers,
            role=Role(role),
            back_ends=tuple(Endpoint.parse(text) for text in back_end or ()),
            tls_backend=tls_backend,
        )
        run_tunnel(options)
    except (CertgateError, ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
