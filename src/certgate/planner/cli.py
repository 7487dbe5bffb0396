"""``certgate plan``: decide whether CertProxy needs port 5263, and optionally emit HAProxy.

Two mutually exclusive modes:

* from a description: ``--public-ns example.com --dmz-ns example.dmz --cert-type san``
  (Table 1 of the spec, generalized by :mod:`certgate.planner.matrix`);
* from a certificate: ``--cert FILE --vip-fqdn F --node-fqdn N ...``
  (:mod:`certgate.planner.certcheck`), optionally ``--emit haproxy --out FILE --node N=HOST``.

Exit codes: 0 planned; 1 the inputs are well formed but no plan can be made (unreadable or
mismatching certificate, unusable HAProxy input, unwritable output); 2 usage errors.
The command is the sub-app's callback so that mounting it with
``add_typer(app, name="plan")`` gives ``certgate plan --lb ...`` with no extra word.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from certgate.errors import CertgateError
from certgate.planner.certcheck import decide_from_cert, load_certificate
from certgate.planner.haproxy import Balance, HAProxyOptions, NodeAddress, emit
from certgate.planner.matrix import CertType, InvalidName, LBMode, Plan, decide, normalize_domain

__all__ = ["app"]

app = typer.Typer(
    name="plan",
    help="Decide whether CertProxy needs port 5263 (spec Table 1) and emit HAProxy config.",
    add_completion=False,
)

_NAMESPACE_OPTIONS = "--public-ns/--dmz-ns/--cert-type"
_CERT_OPTIONS = "--cert/--vip-fqdn/--node-fqdn"


class PlanUsageError(typer.BadParameter):
    """A usage error (exit code 2) whose message stands alone, without "Invalid value"."""

    def format_message(self) -> str:
        return self.message


class EmitFormat(Enum):
    """Configuration formats ``--emit`` can write."""

    HAPROXY = "haproxy"


@dataclass(frozen=True)
class EmitPorts:
    """Ports of ``--emit``; None keeps today's (443, 5262, 5263 on the LB and the nodes)."""

    lb_https: int | None = None
    lb_certproxy: int | None = None
    lb_secondary: int | None = None
    node_https: int | None = None
    node_certproxy: int | None = None
    node_secondary: int | None = None

    def given(self) -> dict[str, object]:
        return {f"--{name.replace('_', '-')}-port": value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class PlanArgs:
    """The command line, gathered before validation."""

    lb: LBMode
    public_ns: str | None
    dmz_ns: str | None
    cert_type: CertType | None
    cert: Path | None
    vip_fqdn: str | None
    node_fqdns: tuple[str, ...]
    json_output: bool
    emit: EmitFormat | None
    out: Path | None
    nodes: tuple[str, ...]
    lb_pem: Path | None
    ca_file: Path | None
    bind: str | None
    ports: EmitPorts = field(default_factory=lambda: EmitPorts())
    health_check_path: str | None = None
    balance: Balance | None = None
    lb_source: str | None = None

    @property
    def namespace_mode(self) -> bool:
        """Any option of the description mode was given."""
        return any(v is not None for v in (self.public_ns, self.dmz_ns, self.cert_type))

    @property
    def cert_mode(self) -> bool:
        """Any option of the certificate mode was given."""
        return self.cert is not None or self.vip_fqdn is not None or bool(self.node_fqdns)

    @property
    def emit_options_given(self) -> list[str]:
        """The HAProxy-only options present on the command line."""
        given: dict[str, object] = {"--out": self.out, "--lb-pem": self.lb_pem}
        given |= {"--ca-file": self.ca_file, "--bind": self.bind, "--node": self.nodes or None}
        given |= {"--health-check-path": self.health_check_path, "--balance": self.balance}
        given |= {"--lb-source": self.lb_source}
        given |= self.ports.given()
        return [name for name, value in given.items() if value is not None]


@app.callback(invoke_without_command=True)
def plan(
    lb: Annotated[
        LBMode,
        typer.Option(
            "--lb", help="How the load balancer handles 443 (5262 is always passthrough)."
        ),
    ],
    public_ns: Annotated[
        str | None, typer.Option("--public-ns", help="Public namespace, e.g. example.com.")
    ] = None,
    dmz_ns: Annotated[
        str | None, typer.Option("--dmz-ns", help="DMZ namespace of the nodes, e.g. example.dmz.")
    ] = None,
    cert_type: Annotated[
        CertType | None, typer.Option("--cert-type", help="Shape of the public certificate.")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Public certificate file (PEM, DER or chain).")
    ] = None,
    vip_fqdn: Annotated[
        str | None, typer.Option("--vip-fqdn", help="FQDN clients use for the VIP.")
    ] = None,
    node_fqdn: Annotated[
        list[str] | None, typer.Option("--node-fqdn", help="A node FQDN; repeat per node.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON object.")] = False,
    emit_format: Annotated[
        EmitFormat | None, typer.Option("--emit", help="Also write a load balancer config.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where --emit writes.")] = None,
    node: Annotated[
        list[str] | None, typer.Option("--node", help="NODE_FQDN=HOST for --emit; repeat per node.")
    ] = None,
    lb_pem: Annotated[
        Path | None,
        typer.Option("--lb-pem", help="Certificate+key PEM the LB serves (default --cert)."),
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="CA file trusting the nodes' 443 certificates.")
    ] = None,
    bind: Annotated[
        str | None, typer.Option("--bind", help="LB listener address (default 127.0.0.1).")
    ] = None,
    lb_https_port: Annotated[int | None, typer.Option(help="LB port for Access (443).")] = None,
    lb_certproxy_port: Annotated[
        int | None, typer.Option(help="LB port for the cert proxy (5262).")
    ] = None,
    lb_secondary_port: Annotated[
        int | None, typer.Option(help="LB port for the cert proxy's secondary port (5263).")
    ] = None,
    node_https_port: Annotated[int | None, typer.Option(help="Access port on nodes (443).")] = None,
    node_certproxy_port: Annotated[
        int | None, typer.Option(help="Cert proxy port on nodes (5262).")
    ] = None,
    node_secondary_port: Annotated[
        int | None, typer.Option(help="Cert proxy secondary port on nodes (5263).")
    ] = None,
    health_check_path: Annotated[
        str | None, typer.Option(help="What re-encryption checks on nodes (/healthz).")
    ] = None,
    balance: Annotated[
        Balance | None,
        typer.Option(help="roundrobin (default: sign-ins shared through the console) or source."),
    ] = None,
    lb_source: Annotated[
        str | None,
        typer.Option(help="Address the LB connects to nodes from (their --load-balancer)."),
    ] = None,
) -> None:
    """Decide whether CertProxy needs port 5263, from a description or from a certificate."""
    args = PlanArgs(
        lb=lb,
        public_ns=public_ns,
        dmz_ns=dmz_ns,
        cert_type=cert_type,
        cert=cert,
        vip_fqdn=vip_fqdn,
        node_fqdns=tuple(node_fqdn or ()),
        json_output=json_output,
        emit=emit_format,
        out=out,
        nodes=tuple(node or ()),
        lb_pem=lb_pem,
        ca_file=ca_file,
        bind=bind,
        ports=EmitPorts(
            lb_https_port,
            lb_certproxy_port,
            lb_secondary_port,
            node_https_port,
            node_certproxy_port,
            node_secondary_port,
        ),
        health_check_path=health_check_path,
        balance=balance,
        lb_source=lb_source,
    )
    _validate_modes(args)
    try:
        result, extra = _run(args)
    except InvalidName as exc:
        raise PlanUsageError(str(exc)) from exc
    except (CertgateError, OSError) as exc:
        _fail(args.json_output, exc)
    _print(result, extra, args.json_output)


def _validate_modes(args: PlanArgs) -> None:
    """Exactly one mode, each complete; HAProxy options only with ``--emit`` in cert mode."""
    if args.namespace_mode and args.cert_mode:
        raise PlanUsageError(f"use either {_NAMESPACE_OPTIONS} or {_CERT_OPTIONS}, not both")
    if not args.namespace_mode and not args.cert_mode:
        raise PlanUsageError(f"give either {_NAMESPACE_OPTIONS} or {_CERT_OPTIONS}")
    if args.namespace_mode:
        described: dict[str, object] = {"--public-ns": args.public_ns, "--dmz-ns": args.dmz_ns}
        _require(described | {"--cert-type": args.cert_type}, "description")
    else:
        certified: dict[str, object] = {"--cert": args.cert, "--vip-fqdn": args.vip_fqdn}
        _require(certified | {"--node-fqdn": args.node_fqdns or None}, "certificate")
    _validate_emit(args)


def _require(options: dict[str, object], mode: str) -> None:
    """Name every missing option of a mode."""
    missing = [name for name, value in options.items() if value is None]
    if missing:
        raise PlanUsageError(f"the {mode} mode also needs {', '.join(missing)}")


def _validate_emit(args: PlanArgs) -> None:
    """``--emit`` needs cert mode, ``--out`` and ``--node``; its options need ``--emit``."""
    if args.emit is None:
        if args.emit_options_given:
            given = ", ".join(args.emit_options_given)
            raise PlanUsageError(f"{given} only make sense with --emit haproxy")
        return
    if args.namespace_mode:
        raise PlanUsageError(f"--emit needs the certificate mode ({_CERT_OPTIONS})")
    _require({"--out": args.out, "--node": args.nodes or None}, "--emit")
    if args.lb is LBMode.REENCRYPT and args.ca_file is None:
        raise PlanUsageError(
            "--emit haproxy with --lb reencrypt needs --ca-file (what the nodes present on 443)"
        )


def _run(args: PlanArgs) -> tuple[Plan, dict[str, object]]:
    """The plan, and any extra JSON fields (where the HAProxy config went)."""
    if args.namespace_mode:
        assert args.public_ns and args.dmz_ns and args.cert_type  # checked by _validate_modes
        return decide(args.public_ns, args.dmz_ns, args.cert_type, args.lb), {}
    assert args.cert is not None and args.vip_fqdn is not None
    result = decide_from_cert(load_certificate(args.cert), args.vip_fqdn, args.node_fqdns, args.lb)
    if args.emit is None:
        return result, {}
    assert args.out is not None
    args.out.write_text(_haproxy_config(args, result), encoding="utf-8")
    return result, {"haproxy_config": str(args.out)}


def _parse_nodes(args: PlanArgs) -> list[NodeAddress]:
    """``--node NAME=HOST`` pairs; the names must be exactly the ``--node-fqdn`` values."""
    pairs = []
    for spec in args.nodes:
        name, sep, host = spec.partition("=")
        if not sep or not name or not host:
            raise PlanUsageError(f"--node {spec!r} must look like NODE_FQDN=HOST")
        pairs.append(_node_address(normalize_domain(name, what="--node name"), host, args.ports))
    named = {pair.name for pair in pairs}
    fqdns = {normalize_domain(n, what="node FQDN") for n in args.node_fqdns}
    if named != fqdns or len(pairs) != len(named):
        raise PlanUsageError(
            f"give one --node per --node-fqdn; --node names {sorted(named)} "
            f"differ from --node-fqdn {sorted(fqdns)}"
        )
    return pairs


def _node_address(name: str, host: str, ports: EmitPorts) -> NodeAddress:
    """One node with the port flags applied over NodeAddress's defaults."""
    node = NodeAddress(name, host)
    return node._replace(
        port_443=ports.node_https or node.port_443,
        port_5262=ports.node_certproxy or node.port_5262,
        port_5263=ports.node_secondary or node.port_5263,
    )


def _haproxy_options(args: PlanArgs) -> HAProxyOptions:
    """HAProxyOptions from the flags given; the others keep their defaults."""
    chosen = {
        "bind_address": args.bind,
        "https_port": args.ports.lb_https,
        "certproxy_port": args.ports.lb_certproxy,
        "certproxy_secondary_port": args.ports.lb_secondary,
        "health_check_path": args.health_check_path,
        "balance": args.balance,
        "source_address": args.lb_source,
    }
    return HAProxyOptions(**{k: v for k, v in chosen.items() if v is not None})  # type: ignore[arg-type]


def _haproxy_config(args: PlanArgs, result: Plan) -> str:
    """Emit the HAProxy configuration for the plan from the command line's node list."""
    assert args.cert is not None and args.vip_fqdn is not None
    pem = (args.lb_pem or args.cert).absolute()
    ca_file = args.ca_file.absolute() if args.ca_file is not None else None
    options = _haproxy_options(args)
    return emit(
        result,
        args.vip_fqdn,
        _parse_nodes(args),
        str(pem),
        ca_file=str(ca_file) if ca_file is not None else None,
        options=options,
    )


def _fail(json_output: bool, exc: Exception) -> NoReturn:
    """Report a planning failure (exit 1): JSON on stdout, or a plain line on stderr."""
    message = str(exc) if not isinstance(exc, OSError) else f"{exc.filename}: {exc.strerror}"
    if json_output:
        typer.echo(json.dumps({"error": message, "error_type": type(exc).__name__}))
    else:
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _print(result: Plan, extra: dict[str, object], json_output: bool) -> None:
    """JSON only (no rich at all) or a short rich panel."""
    if json_output:
        typer.echo(json.dumps(result.to_dict() | extra, indent=2, sort_keys=True))
        return
    console = Console(highlight=False)
    console.print(_panel(result))
    for warning in result.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    if "haproxy_config" in extra:
        console.print(Text(f"HAProxy configuration written to {extra['haproxy_config']}"))


def _panel(result: Plan) -> Panel:
    """The plan as a two-column table above its reason; text is never parsed as markup."""
    table = Table(show_header=False, box=box.SIMPLE)
    table.add_column(style="bold")
    table.add_column()
    verdict = Text("YES", style="bold red") if result.port_5263_required else Text("no")
    source = f"Table 1 row {result.table_row}" if result.from_table else "derived, not Table 1"
    table.add_row("Port 5263 required", verdict)
    table.add_row("443 load balancer", Text(result.lb_requirement))
    table.add_row("5262", Text("SSL passthrough (Layer 4), always"))
    table.add_row("Ports to forward", Text(", ".join(str(p) for p in result.ports)))
    table.add_row("Certificate type", Text(result.cert_type.value))
    table.add_row("Namespace", Text(result.namespace.value))
    table.add_row("Source", Text(source))
    return Panel(Group(table, Text(result.reason)), title="certgate plan", expand=False)
