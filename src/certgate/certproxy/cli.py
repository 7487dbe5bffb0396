"""``certgate certproxy serve``: the cert proxy of one Access installation.

It runs on the Access node and reads the Access data directory: the public certificate it
presents on 5262, the Access self-signed certificate it shares on 5263 (``--offload-port``),
its own client certificate for Access, and the console's Device Root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from certgate.access.config import CERTPROXY_PORT, AccessConfig, load_config, parse_networks
from certgate.access.install import Material, load_material
from certgate.certproxy.server import (
    CertProxy,
    Limits,
    Listener,
    Upstream,
    listener_context,
    upstream_context,
)
from certgate.cliconfig import ConfigFile
from certgate.errors import CertgateError
from certgate.pki.thumbprint import thumbprint

__all__ = ["app", "build_proxy"]

app = typer.Typer(help="CertProxy: device certificate step on 5262/5263.", no_args_is_help=True)
err = Console(stderr=True)
DataDir = Annotated[
    Path,
    typer.Option("--data-dir", "-d", envvar="CERTGATE_ACCESS_DIR", help="Access data directory."),
]


def _local_destination(config: AccessConfig) -> str:
    """Access listens on ``config.host``; a wildcard address is reached on loopback."""
    try:
        if ipaddress.ip_address(config.host).is_unspecified:
            return "127.0.0.1"
    except ValueError:
        pass
    return config.host


def build_proxy(
    config: AccessConfig,
    material: Material,
    *,
    host: str,
    port: int,
    offload_port: int | None,
    access_host: str | None = None,
    access_port: int | None = None,
    limits: Limits | None = None,
    load_balancers: tuple[str, ...] | None = None,
) -> CertProxy:
    """The proxy for this installation: 5262 presents the public certificate, 5263 (when
    asked for) the Access self-signed one; both forward only to this Access."""
    device_root = material.console.device_root
    listeners = [
        Listener(
            "5262",
            host,
            port,
            listener_context(list(material.public_chain), material.public_key, device_root),
        )
    ]
    if offload_port is not None:
        ctx = listener_context([material.access_cert], material.access_key, device_root)
        listeners.append(Listener("5263", host, offload_port, ctx))
    serving_chain, _ = material.serving(config.tls_mode)
    upstream = Upstream(
        access_host or _local_destination(config),
        access_port or config.port,
        upstream_context(serving_chain[0], material.certproxy_cert, material.certproxy_key),
        thumbprint(serving_chain[0]),
    )
    balancers = parse_networks(config.load_balancers if load_balancers is None else load_balancers)
    return CertProxy(listeners, upstream, device_root, material.console.root, limits, balancers)


async def _run(proxy: CertProxy) -> None:
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    serving = asyncio.ensure_future(proxy.serve_forever())
    await stop.wait()
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    await proxy.aclose()


@app.command()
def serve(
    data_dir: DataDir,
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Device-facing port (public cert).")] = CERTPROXY_PORT,
    offload_port: Annotated[
        int | None,
        typer.Option(help="Also listen here with the Access self-signed cert (5263)."),
    ] = None,
    access_host: Annotated[str | None, typer.Option(help="Access address (forced).")] = None,
    access_port: Annotated[int | None, typer.Option(help="Access port (forced).")] = None,
    load_balancer: Annotated[
        list[str] | None,
        typer.Option(
            "--load-balancer",
            help="Address or CIDR of a load balancer sending PROXY v2 headers (repeatable; "
            "default: Access's setting).",
        ),
    ] = None,
    config_file: ConfigFile = None,
) -> None:
    """Run the cert proxy: verify device certificates, forward the step to Access."""
    try:
        config = load_config(data_dir)
        proxy = build_proxy(
            config,
            load_material(config),
            host=host,
            port=port,
            offload_port=offload_port,
            access_host=access_host,
            access_port=access_port,
            load_balancers=tuple(load_balancer) if load_balancer else None,
        )
    except CertgateError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    ports = f"{port}" + (f" and {offload_port}" if offload_port is not None else "")
    err.print(
        f"cert proxy on {host} port {ports}, forwarding to {proxy.upstream.authority.decode()}"
    )
    asyncio.run(_run(proxy))
