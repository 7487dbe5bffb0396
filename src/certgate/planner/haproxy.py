"""HAProxy 2.6 configuration for a plan: the spec's Figure 1 and Figure 2 as a load balancer.

* 5262 is always a ``mode tcp`` passthrough frontend: CertProxy on each node presents the
  publicly trusted certificate itself.
* 443 is a ``mode tcp`` passthrough frontend under SSL passthrough, or a ``mode http``
  frontend that terminates TLS with the public certificate and re-encrypts to each node,
  verifying the node's certificate against ``ca_file`` with SNI and host name checks.
* 5263 is a ``mode tcp`` frontend, present only when the plan requires it.

Every server line has ``send-proxy-v2``: the node learns the device's address from a PROXY
v2 header (health checks send one too), so Access and the cert proxy must list the load
balancer with ``--load-balancer``. 443 is checked with ``GET /healthz``, which Access
answers 200. Backends balance ``roundrobin`` by default: a sign-in spans /authorize (443),
the certificate step (5262 or 5263) and /token (443), each of which may reach another
node, and Access nodes share their sign-in transactions through the console
(``certgate.access.signins``, Access's default). ``source`` (one client address, one node
on every port) is offered for nodes that keep sign-ins in memory. Listeners bind to
loopback unless told otherwise. The emitter only builds text: ``haproxy -c -f`` is how the
result is checked.
"""

from __future__ import annotations

import ipaddress
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from certgate.errors import ConfigError
from certgate.planner.matrix import InvalidName, LBMode, Plan, normalize_domain

__all__ = ["Balance", "HAProxyOptions", "NodeAddress", "emit"]

# HAProxy refuses whitespace in unquoted words, and '#' starts a comment; quoting is avoided
# entirely by refusing anything that would need it.
_SAFE_WORD_RE = re.compile(r"^[A-Za-z0-9_./:@+=,~-]+$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
# An RFC 3986 §3.3 path (and query) restricted to characters haproxy.cfg takes literally.
_HEALTH_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/%=&?+,:@-]*$")


class NodeAddress(NamedTuple):
    """One node: its FQDN (server name, SNI and verified host), address and service ports."""

    name: str
    host: str
    port_443: int = 443
    port_5262: int = 5262
    port_5263: int | None = 5263


class Balance(Enum):
    """HAProxy ``balance`` algorithms the emitter offers."""

    ROUNDROBIN = "roundrobin"  # any node: sign-in transactions shared through the console
    SOURCE = "source"  # one client address, one node: for sign-ins kept in a node's memory


ACCESS_HEALTH_PATH = "/healthz"  # served by certgate.access.app


@dataclass(frozen=True)
class HAProxyOptions:
    """Listener addresses, ports and timings; defaults are safe for tests (loopback)."""

    bind_address: str = "127.0.0.1"
    https_port: int = 443
    certproxy_port: int = 5262
    certproxy_secondary_port: int = 5263
    health_check_path: str = ACCESS_HEALTH_PATH
    balance: Balance = Balance.ROUNDROBIN
    send_proxy_v2: bool = True
    # The address the nodes see the load balancer connect from (HAProxy ``source``): what
    # their --load-balancer lists. None lets the kernel choose.
    source_address: str | None = None
    timeout_connect_s: int = 5
    timeout_client_s: int = 60
    timeout_server_s: int = 60
    timeout_check_s: int = 5
    check_interval_s: int = 5
    maxconn: int = 4096


def _check_word(value: str, what: str) -> str:
    """Refuse a value that would need quoting in haproxy.cfg (or could inject a directive)."""
    if not _SAFE_WORD_RE.fullmatch(value):
        raise ConfigError(f"{what} {value!r} must be a single word without spaces, quotes or '#'")
    return value


def _check_port(port: int, what: str) -> int:
    """A TCP port number (1-65535)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} {port!r} is not a TCP port (1-65535)")
    return port


def _address(host: str, port: int, what: str) -> str:
    """``host:port``, with IPv6 literals bracketed as haproxy accepts them."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host) or ".." in host:
            raise ConfigError(f"{what} {host!r} is neither an IP address nor a host name") from None
        return f"{host}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _named(node: NodeAddress) -> NodeAddress:
    """The node with its name checked and lower-cased (it is the SNI and the verified host)."""
    try:
        return node._replace(name=normalize_domain(node.name, what="node name"))
    except InvalidName as exc:
        raise ConfigError(str(exc)) from exc


def _validated_nodes(plan: Plan, nodes: Sequence[tuple[object, ...]]) -> list[NodeAddress]:
    """Nodes as :class:`NodeAddress`, checked for names, addresses, ports and 5263 presence."""
    if not nodes:
        raise ConfigError("at least one node is required")
    checked = [_named(NodeAddress._make(node)) for node in nodes]
    names = [node.name for node in checked]
    if len(set(names)) != len(names):
        raise ConfigError(f"node names must be unique: {names}")
    for node in checked:
        _address(node.host, _check_port(node.port_443, "port_443"), f"node {node.name} host")
        _check_port(node.port_5262, "port_5262")
        if plan.port_5263_required and node.port_5263 is None:
            raise ConfigError(f"the plan requires port 5263 but node {node.name} has none")
        if plan.port_5263_required and node.port_5263 is not None:
            _check_port(node.port_5263, "port_5263")
    return checked


def _header(plan: Plan, vip: str, options: HAProxyOptions) -> list[str]:
    """Comment lines recording what was planned and why."""
    lines = [
        "# Generated by certgate plan. Edit the plan, not this file.",
        f"# VIP {vip}; 443: {plan.lb_requirement}; 5262: SSL passthrough (Layer 4).",
        f"# Port 5263 required: {'yes' if plan.port_5263_required else 'no'}.",
    ]
    if options.send_proxy_v2:
        lines.append(
            "# Nodes receive PROXY v2: run Access and the cert proxy with --load-balancer "
            "<this load balancer's address>."
        )
    if options.balance is Balance.ROUNDROBIN:
        lines.append(
            "# Round-robin: run Access with its sign-ins in the console (--signins console, "
            "the default)."
        )
    return [*lines, *(f"# {line}" for line in textwrap.wrap(plan.reason, width=96))]


def _global_and_defaults(options: HAProxyOptions) -> list[str]:
    """Process-wide TLS floor and the timeouts every proxy inherits."""
    return [
        "global",
        f"    maxconn {options.maxconn}",
        "    log stdout format raw local0 info",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "    ssl-default-server-options ssl-min-ver TLSv1.2",
        "    ssl-server-verify required",
        "",
        "defaults",
        "    log global",
        "    option dontlognull",
        "    option log-health-checks",
        f"    timeout connect {options.timeout_connect_s}s",
        f"    timeout client {options.timeout_client_s}s",
        f"    timeout server {options.timeout_server_s}s",
        f"    timeout check {options.timeout_check_s}s",
        f"    default-server inter {options.check_interval_s}s fall 3 rise 2",
        *_source(options),
    ]


def _source(options: HAProxyOptions) -> list[str]:
    """``source ADDR`` for every server connection and check, when one is chosen."""
    if options.source_address is None:
        return []
    try:
        ip = ipaddress.ip_address(options.source_address)
    except ValueError:
        raise ConfigError(f"source address {options.source_address!r} is not an IP") from None
    return [f"    source {f'[{ip}]' if ip.version == 6 else ip}"]


def _server_options(options: HAProxyOptions) -> str:
    """What every server line ends with: the PROXY v2 header (doc/proxy-protocol.txt), and
    health checks (which then send one too, with the LOCAL command)."""
    return " send-proxy-v2 check" if options.send_proxy_v2 else " check"


def _tcp_passthrough(
    name: str,
    bind: str,
    servers: Sequence[tuple[str, str]],
    comment: str,
    options: HAProxyOptions,
) -> list[str]:
    """A Layer 4 frontend/backend pair: TLS passes through untouched, checks are TCP connects."""
    lines = [
        f"frontend {name}",
        f"    # {comment}",
        "    mode tcp",
        "    option tcplog",
        f"    bind {bind}",
        f"    default_backend {name}_nodes",
        "",
        f"backend {name}_nodes",
        "    mode tcp",
        f"    balance {options.balance.value}",
    ]
    suffix = _server_options(options)
    return lines + [f"    server {server} {address}{suffix}" for server, address in servers]


def _reencrypt_443(
    vip: str,
    bind: str,
    nodes: Sequence[NodeAddress],
    pem: str,
    ca_file: str,
    options: HAProxyOptions,
) -> list[str]:
    """Layer 7: terminate TLS with the public certificate, re-encrypt to each node and verify it."""
    lines = [
        "frontend access_443",
        "    # SSL re-encryption: the load balancer presents the public certificate.",
        "    mode http",
        "    option httplog",
        "    option forwardfor",
        f"    bind {bind} ssl crt {pem}",
        "    http-request set-header X-Forwarded-Proto https",
        "    default_backend access_443_nodes",
        "",
        "backend access_443_nodes",
        "    mode http",
        f"    balance {options.balance.value}",
        "    option httpchk",
        f"    http-check send meth GET uri {options.health_check_path} ver HTTP/1.1 hdr Host {vip}",
        "    http-check expect status 200-399",
    ]
    # Checks run outside any stream, so `sni` does not apply to them: `check-sni` repeats it.
    return lines + [
        f"    server {node.name} {_address(node.host, node.port_443, 'host')} ssl verify required "
        f"ca-file {ca_file} sni str({node.name}) verifyhost {node.name}{_server_options(options)} "
        f"check-sni {node.name}"
        for node in nodes
    ]


def emit(
    plan: Plan,
    vip_fqdn: str,
    node_addresses: Sequence[tuple[str, str, int, int, int | None]],
    public_cert_pem_path: str | None,
    *,
    ca_file: str | None = None,
    options: HAProxyOptions | None = None,
) -> str:
    """HAProxy 2.6 configuration text for ``plan``; raise ConfigError on unusable input.

    ``public_cert_pem_path`` (certificate and key in one PEM) and ``ca_file`` (what the nodes
    present on 443: their self-signed certificates when 5263 is required, else the public
    CA) are needed only for re-encryption, where the load balancer terminates TLS.
    """
    opts = options if options is not None else HAProxyOptions()
    vip = _vip(vip_fqdn)
    nodes = _validated_nodes(plan, node_addresses)
    sections = [
        _header(plan, vip, opts),
        _global_and_defaults(opts),
        _https(plan, vip, nodes, opts, public_cert_pem_path, ca_file),
    ]
    sections.append(
        _tcp_passthrough(
            "certproxy_5262",
            _bind(opts, opts.certproxy_port),
            [(n.name, _address(n.host, n.port_5262, "host")) for n in nodes],
            "CertProxy: always SSL passthrough (Layer 4); nodes present the public certificate.",
            opts,
        )
    )
    if plan.port_5263_required:
        sections.append(_secondary(nodes, opts))
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def _vip(vip_fqdn: str) -> str:
    """The VIP FQDN, validated (it lands in a Host header)."""
    try:
        return normalize_domain(vip_fqdn, what="VIP FQDN")
    except InvalidName as exc:
        raise ConfigError(str(exc)) from exc


def _bind(options: HAProxyOptions, port: int) -> str:
    """The listener address for one frontend port."""
    return _address(options.bind_address, _check_port(port, "listener port"), "bind address")


def _https(
    plan: Plan,
    vip: str,
    nodes: Sequence[NodeAddress],
    opts: HAProxyOptions,
    pem: str | None,
    ca_file: str | None,
) -> list[str]:
    """The 443 frontend for the plan's load balancer mode."""
    bind = _bind(opts, opts.https_port)
    if plan.lb is LBMode.PASSTHROUGH:
        return _tcp_passthrough(
            "access_443",
            bind,
            [(n.name, _address(n.host, n.port_443, "host")) for n in nodes],
            "SSL passthrough (Layer 4): nodes present the public certificate on 443.",
            opts,
        )
    if pem is None or ca_file is None:
        raise ConfigError(
            "SSL re-encryption needs the public certificate+key PEM for the load balancer "
            "and a CA file to verify the nodes' 443 certificates"
        )
    if not _HEALTH_PATH_RE.fullmatch(opts.health_check_path):
        raise ConfigError(f"health check path {opts.health_check_path!r} is not a URI path")
    return _reencrypt_443(
        vip,
        bind,
        nodes,
        _check_word(pem, "public certificate PEM path"),
        _check_word(ca_file, "CA file path"),
        opts,
    )


def _secondary(nodes: Sequence[NodeAddress], opts: HAProxyOptions) -> list[str]:
    """The 5263 frontend: CertProxy's secondary port sharing Access's self-signed certificate."""
    servers = [
        (n.name, _address(n.host, n.port_5263, "host")) for n in nodes if n.port_5263 is not None
    ]
    return _tcp_passthrough(
        "certproxy_5263",
        _bind(opts, opts.certproxy_secondary_port),
        servers,
        "CertProxy secondary port: shares the Access self-signed certificate (Layer 4).",
        opts,
    )
