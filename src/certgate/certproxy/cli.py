"""``certgate certproxy serve``: the cert proxy of one Access installation.

It runs on the Access node and reads the Access data directory: the public certificate it
presents on 5262, the Access self-signed certificate it shares on 5263 (``--offload-port``),
its own client certificate for Access, and the console's Device Roots as Access last
fetched them; it follows that directory live (``certgate.certproxy.reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from certgate.access.config import (
    CERTPROXY_PORT,
    AccessConfig,
    TLSMode,
    load_config,
    parse_networks,
)
from certgate.access.install import Material, load_material
from certgate.certproxy.reload import Built, Reloader
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
from certgate.metrics import CertificateCollector
from certgate.pki.thumbprint import thumbprint

__all__ = ["app", "build_parts", "build_proxy"]

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
    built = build_parts(
        config, material, offload=offload_port is not None, host=access_host, port=access_port
    )
    listeners = [Listener("5262", host, port, built.contexts["5262"])]
    if offload_port is not None:
        listeners.append(Listener("5263", host, offload_port, built.contexts["5263"]))
    balancers = parse_networks(config.load_balancers if load_balancers is None else load_balancers)
    return CertProxy(listeners, built.upstream, material.device_roots, limits, balancers)


def build_parts(
    config: AccessConfig,
    material: Material,
    *,
    offload: bool,
    host: str | None = None,
    port: int | None = None,
) -> Built:
    """The contexts of one load of the installation (at start and at each reload): the
    listeners verify devices against the Device Roots in use; Access is reached at
    ``host``:``port`` (default: where it listens) and trusted by its public leaf, or when
    offloaded by the install root (which renews Access's leaf: no reload needed for it)."""
    roots = material.device_roots.certs
    contexts = {"5262": listener_context(list(material.public_chain), material.public_key, roots)}
    if offload:
        contexts["5263"] = listener_context([material.access_cert], material.access_key, roots)
    offloaded = config.tls_mode is TLSMode.OFFLOAD
    anchor = material.install_root if offloaded else material.public_chain[0]
    upstream = Upstream(
        host or _local_destination(config),
        port or config.port,
        upstream_context(anchor, material.certproxy_cert, material.certproxy_key),
        thumbprint(anchor),
    )
    return Built(material, contexts, upstream)


def follow_data_dir(
    proxy: CertProxy,
    data_dir: Path,
    material: Material,
    interval_s: float,
    *,
    access_host: str | None = None,
    access_port: int | None = None,
) -> Reloader:
    """A :class:`Reloader` for ``proxy``, serving its ``/healthz`` and certificate metrics."""
    offload = any(listener.name == "5263" for listener in proxy.listeners)

    def build() -> Built:
        config = load_config(data_dir)
        fresh = load_material(config)
        return build_parts(config, fresh, offload=offload, host=access_host, port=access_port)

    reloader = Reloader(proxy, data_dir, build, material, interval_s)
    proxy.health = reloader.health
    proxy.metrics.registry.register(
        CertificateCollector(lambda: reloader.certificates_in_use(time.time()))
    )
    return reloader


async def _run(proxy: CertProxy, reloader: Reloader) -> None:
    await proxy.start()
    following = asyncio.ensure_future(reloader.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    serving = asyncio.ensure_future(proxy.serve_forever())
    await stop.wait()
    for task in (serving, following):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
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
    reload_interval: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=3600,
            help="Seconds between checks of the data directory for renewed certificates "
            "and new Device Roots.",
        ),
    ] = 5.0,
    config_file: ConfigFile = None,
) -> None:
    """Run the cert proxy: verify device certificates, forward the step to Access."""
    try:
        config = load_config(data_dir)
        material = load_material(config)
        proxy = build_proxy(
            config,
            material,
            host=host,
            port=port,
            offload_port=offload_port,
            access_host=access_host,
            access_port=access_port,
            load_balancers=tuple(load_balancer) if load_balancer else None,
        )
        reloader = follow_data_dir(
            proxy,
            data_dir,
            material,
            reload_interval,
            access_host=access_host,
            access_port=access_port,
        )
    except CertgateError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    ports = f"{port}" + (f" and {offload_port}" if offload_port is not None else "")
    err.print(
        f"cert proxy on {host} port {ports}, forwarding to {proxy.upstream.authority.decode()}"
    )
    asyncio.run(_run(proxy, reloader))
