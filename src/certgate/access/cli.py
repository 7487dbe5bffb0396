"""``certgate access``: install (``init``) and run (``serve``) the Access identity service."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table

from certgate.access.config import (
    CERTPROXY_PORT,
    DEFAULT_PORT,
    AccessConfig,
    AccessFiles,
    ClientRegistration,
    SignInStoreKind,
    TLSMode,
    load_config,
    parse_networks,
    register_client_secret,
)
from certgate.access.install import (
    InstallRequest,
    Material,
    install,
    load_material,
    replace_public_certificate,
)
from certgate.access.oidc import secret_hash
from certgate.cliconfig import ConfigFile
from certgate.errors import CertgateError, ConfigError
from certgate.pki.thumbprint import thumbprint

__all__ = ["app", "parse_clients"]

app = typer.Typer(
    help="Access: OpenID Connect sign-in by device certificate.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)
DataDir = Annotated[
    Path,
    typer.Option("--data-dir", "-d", envvar="CERTGATE_ACCESS_DIR", help="Access data directory."),
]
LoadBalancers = Annotated[
    list[str] | None,
    typer.Option(
        "--load-balancer",
        help="Address or CIDR of a load balancer sending PROXY v2 headers (repeatable); "
        "a connection from it must carry one, from anywhere else must not.",
    ),
]
SignInStoreOption = Annotated[
    SignInStoreKind | None,
    typer.Option(
        help="Where sign-in transactions live: the console's database (any node finishes any "
        "sign-in; the console admin's role must be 'access') or this node's memory (one node "
        "only). serve: default access.json's 'signins'; init: default console.",
    ),
]
MAX_HEADER_BYTES = 32 * 1024


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def parse_clients(values: list[str]) -> tuple[ClientRegistration, ...]:
    """``CLIENT_ID=REDIRECT_URI`` pairs; a client named twice gets both redirect URIs."""
    uris: dict[str, list[str]] = {}
    for value in values:
        client_id, sep, uri = value.partition("=")
        if not sep or not client_id or not uri:
            raise ConfigError(f"--client takes CLIENT_ID=REDIRECT_URI, got {value!r}")
        uris.setdefault(client_id, []).append(uri)
    return tuple(ClientRegistration(cid, tuple(u)) for cid, u in uris.items())


def _default_certproxy_url(issuer: str) -> str:
    host = urlsplit(issuer).hostname or "localhost"
    return f"https://{f'[{host}]' if ':' in host else host}:{CERTPROXY_PORT}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@app.command()
def init(
    data_dir: DataDir,
    issuer: Annotated[str, typer.Option(help="Public https URL of Access (the OIDC issuer).")],
    console_url: Annotated[str, typer.Option(help="Console API URL.")],
    console_chain: Annotated[Path, typer.Option(help="Console /pki/chain.pem.")],
    console_cert: Annotated[Path, typer.Option(help="Read-only admin certificate (PEM).")],
    console_key: Annotated[Path, typer.Option(help="Its private key (PEM).")],
    console_api_key_file: Annotated[Path, typer.Option(help="File holding its API key.")],
    public_cert: Annotated[Path, typer.Option(help="Publicly trusted certificate chain.")],
    public_key: Annotated[Path, typer.Option(help="Its private key (PEM).")],
    client: Annotated[list[str], typer.Option(help="CLIENT_ID=REDIRECT_URI (repeatable).")],
    mode: Annotated[TLSMode, typer.Option(help="What the load balancer does with 443.")] = (
        TLSMode.OFFLOAD
    ),
    certproxy_url: Annotated[
        str | None, typer.Option(help="Where devices reach the cert proxy (default :5262).")
    ] = None,
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.")] = DEFAULT_PORT,
    dns_name: Annotated[
        list[str] | None, typer.Option(help="DNS name for the self-signed certificate.")
    ] = None,
    ip_address: Annotated[
        list[str] | None, typer.Option(help="IP address for the self-signed certificate.")
    ] = None,
    load_balancer: LoadBalancers = None,
    signins: SignInStoreOption = None,
) -> None:
    """Install: generate the self-signed certificate, the cert proxy credential and the ID
    token key; store the public certificate and the console credentials."""
    try:
        request = InstallRequest(
            issuer=issuer,
            console_url=console_url,
            certproxy_url=certproxy_url or _default_certproxy_url(issuer),
            clients=parse_clients(client),
            console_chain_pem=_read(console_chain, "console chain"),
            console_admin_cert_pem=_read(console_cert, "console admin certificate"),
            console_admin_key_pem=_read(console_key, "console admin key"),
            console_api_key=_read(console_api_key_file, "console API key file").decode().strip(),
            public_chain_pem=_read(public_cert, "public certificate"),
            public_key_pem=_read(public_key, "public key"),
            tls_mode=mode,
            host=host,
            port=port,
            dns_names=tuple(dns_name or ("localhost",)),
            ip_addresses=tuple(ip_address or ("127.0.0.1",)),
            load_balancers=tuple(load_balancer or ()),
            signins=signins or SignInStoreKind.CONSOLE,
        )
        config = install(data_dir, request)
        material = load_material(config)
    except (CertgateError, ValueError) as exc:
        raise fail(str(exc)) from exc
    _report(config, material)


def _report(config: AccessConfig, material: Material) -> None:
    """What the operator needs next: the install root for the load balancer's ca-file,
    and the thumbprints to compare."""
    table = Table("what", "file", "CertThumbprint (SHA-256 of DER)", title="Access installation")
    files = config.files
    table.add_row(
        "install root (LB ca-file)", str(files.install_root), thumbprint(material.install_root)
    )
    table.add_row("Access self-signed", str(files.access_tls), thumbprint(material.access_cert))
    table.add_row("cert proxy (pinned)", str(files.certproxy_client), config.certproxy_thumbprint)
    table.add_row(
        "public certificate", str(files.public_chain), thumbprint(material.public_chain[0])
    )
    out.print(table)
    out.print(
        f"mode {config.tls_mode.value}; issuer {config.issuer}; cert step at {config.certproxy_url}"
    )


@app.command("public-cert")
def public_cert(
    data_dir: DataDir,
    cert: Annotated[Path, typer.Option(help="The new publicly trusted certificate chain.")],
    key: Annotated[Path, typer.Option(help="Its private key (PEM).")],
) -> None:
    """Install a renewed public certificate, without a restart: the cert proxy presents it
    on 5262 at its next reload, Access (on 443 under passthrough) at its next check."""
    try:
        config = load_config(data_dir)
        leaf = replace_public_certificate(
            config, _read(cert, "public certificate"), _read(key, "public key")
        )
        load_material(config)  # the installation still loads as a whole
    except (CertgateError, ValueError) as exc:
        raise fail(str(exc)) from exc
    out.print(
        f"public certificate {thumbprint(leaf)} installed, valid until"
        f" {leaf.not_valid_after_utc:%Y-%m-%d}; in use within the cert proxy's reload interval"
        f" and Access's renew_check_s ({config.renew_check_s:g} s)"
    )


@app.command("client-secret")
def client_secret(
    data_dir: DataDir,
    client_id: Annotated[str, typer.Argument(help="A client registered at init.")],
) -> None:
    """Make CLIENT_ID a confidential client (client_secret_basic), or give it a new secret:
    prints the secret once (give it to the relying party, e.g. `certgate console sso
    set-secret`); access.json keeps only its SHA-256. Access takes it at its next start."""
    secret = secrets.token_urlsafe(32)  # 256 bits: a hash is enough to keep
    try:
        register_client_secret(AccessFiles(data_dir), client_id, secret_hash(secret))
    except (CertgateError, OSError) as exc:
        raise fail(str(exc)) from exc
    print(secret)  # stdout alone, so that it pipes; the note goes to stderr
    err.print(f"client {client_id}: secret shown once; restart Access to require it")


@app.command()
def serve(
    data_dir: DataDir,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    load_balancer: LoadBalancers = None,
    config_file: ConfigFile = None,
    signins: SignInStoreOption = None,
) -> None:
    """Run Access over HTTPS (self-signed certificate when offloaded, public otherwise)."""
    from certgate.access.app import (
        AccessState,
        ConsoleTransport,
        access_tls_context,
        console_client,
        create_app,
    )
    from certgate.access.proxied import make_access_server

    try:
        balancers = tuple(load_balancer) if load_balancer else None
        config = load_config(
            data_dir, host=host, port=port, load_balancers=balancers, signins=signins
        )
        material = load_material(config)
        transport = ConsoleTransport(material)
        console = console_client(config, material, transport)
        state = AccessState.build(config, material, console, transport)
        state.tls = access_tls_context(config, material)  # renewal loads into it live
        server = make_access_server(
            create_app(state, console),
            config.host,
            config.port,
            state.tls,
            parse_networks(config.load_balancers),
            proxy_headers=False,  # who may speak for a client is decided by Access, not uvicorn
            access_log=False,  # Access logs its own decisions; URLs carry sign-in handles
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_keep_alive=5,
            limit_concurrency=1000,
        )
    except CertgateError as exc:
        raise fail(str(exc)) from exc
    err.print(f"access listening on https://{config.host}:{config.port} ({config.tls_mode.value})")
    server.run()
