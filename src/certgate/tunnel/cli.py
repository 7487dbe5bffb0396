"""``certgate tunnel``: set a node up (from the console or an installer bundle), show it.

``run`` (the data plane) is added by ``certgate.tunnel.server``'s owner.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from certgate.cliconfig import ConfigFile
from certgate.errors import CertgateError
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
def status(state_dir: StateDir) -> None:
    """Show (and verify) a state directory: identity, trust, persisted device table."""
    try:
        state = load_state(state_dir)
    except CertgateError as exc:
        raise fail(str(exc)) from exc
    table = _state_table(state)
    info = TableStore(state_dir).describe()
    table.add_row("table seq (snapshot)", _text(info.snapshot_seq))
    table.add_row("table entries (snapshot)", _text(info.snapshot_entries))
    table.add_row("journal", f"{info.journal_batches} batches, {info.journal_bytes} bytes")
    budget = state.trust.feed.max_staleness_s
    if info.last_exchange_at is None:
        table.add_row("last console exchange", "never")
    else:
        age = time.time() - info.last_exchange_at
        fresh = "fresh" if 0 <= age < budget else "STALE"
        table.add_row("last console exchange", f"{age:.0f}s ago ({fresh}, budget {budget:g}s)")
    out.print(table)


def _state_table(state: TunnelState) -> Table:
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
    table.add_row("ports", f"proxy {tunnel.proxy_port}, per-app {tunnel.per_app_port}")
    table.add_row("staleness budget", f"{state.trust.feed.max_staleness_s:g}s")
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
            "default: OpenSSL's list."
        ),
    ] = None,
    config_file: ConfigFile = None,
) -> None:
    """Serve the data plane: follow the console's signed feed, admit known devices."""
    from certgate.tunnel.runner import RunOptions
    from certgate.tunnel.runner import run as run_tunnel
    from certgate.tunnel.service import Endpoint

    try:
        options = RunOptions(
            state_dir=state_dir,
            listen_host=listen_host,
            proxy=Endpoint.parse(proxy_listen) if proxy_listen else None,
            per_app=Endpoint.parse(per_app_listen) if per_app_listen else None,
            admin=Endpoint.parse(admin_listen),
            loop=loop,
            drain_s=drain_s,
        )
        run_tunnel(options)
    except (CertgateError, ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
