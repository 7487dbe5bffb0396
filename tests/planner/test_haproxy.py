"""HAProxy configuration for both spec figures, checked by the real ``haproxy -c``."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from certgate.errors import ConfigError
from certgate.planner.haproxy import Balance, HAProxyOptions, NodeAddress, emit
from certgate.planner.matrix import CertType, LBMode, Plan, decide
from tests.planner.test_certcheck import make_certificate, write_pem
from tests.support import free_port

HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy binary not installed (the Makefile installs it for CI)"
)

VIP = "access.example.com"
NODES = [
    NodeAddress("node1.example.dmz", "10.0.0.11"),
    NodeAddress("node2.example.dmz", "10.0.0.12"),
]

# Figure 1: only 5262 (SSL passthrough on 443). Figure 2: 5262 and 5263 (re-encryption with
# a certificate that cannot be installed on the nodes).
FIGURE_1 = decide("example.com", "example.dmz", CertType.SAN, LBMode.PASSTHROUGH)
FIGURE_2 = decide("example.com", "example.dmz", CertType.WILDCARD, LBMode.REENCRYPT)
REENCRYPT_NO_5263 = decide("example.com", "example.dmz", CertType.SAN, LBMode.REENCRYPT)


@dataclass(frozen=True)
class TLSFiles:
    """The load balancer's certificate+key PEM and the CA file trusting the nodes."""

    lb_pem: Path
    ca_file: Path


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    public, public_key = make_certificate(["*.example.com"])
    node_cert, _node_key = make_certificate([node.name for node in NODES])
    return TLSFiles(
        lb_pem=write_pem(tmp_path / "public.pem", public, public_key),
        ca_file=write_pem(tmp_path / "nodes-ca.pem", node_cert),
    )


def haproxy_check(config: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """Run ``haproxy -c`` on ``config``; it parses every directive and loads every file."""
    assert HAPROXY is not None
    path = directory / "haproxy.cfg"
    path.write_text(config, encoding="utf-8")
    return subprocess.run(
        [HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def assert_valid(config: str, directory: Path) -> None:
    result = haproxy_check(config, directory)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


def _frontend(config: str, name: str) -> str:
    """The text of one frontend section."""
    start = config.index(f"frontend {name}\n")
    return config[start : config.index("\n\n", start)]


@needs_haproxy
def test_figure_1_passthrough_only_5262(tmp_path: Path) -> None:
    config = emit(FIGURE_1, VIP, NODES, None)
    assert_valid(config, tmp_path)
    assert "mode tcp" in _frontend(config, "access_443")
    assert "bind 127.0.0.1:443\n" in config and "bind 127.0.0.1:5262\n" in config
    assert "mode http" not in config and "ssl crt" not in config
    assert "5263" not in config.split("\nglobal\n", 1)[1]
    assert "server node1.example.dmz 10.0.0.11:5262 send-proxy-v2 check" in config


@needs_haproxy
def test_figure_2_reencrypt_with_5262_and_5263(tmp_path: Path, tls_files: TLSFiles) -> None:
    config = emit(FIGURE_2, VIP, NODES, str(tls_files.lb_pem), ca_file=str(tls_files.ca_file))
    assert_valid(config, tmp_path)
    https = _frontend(config, "access_443")
    assert "mode http" in https and f"bind 127.0.0.1:443 ssl crt {tls_files.lb_pem}" in https
    assert (
        f"server node1.example.dmz 10.0.0.11:443 ssl verify required ca-file {tls_files.ca_file} "
        "sni str(node1.example.dmz) verifyhost node1.example.dmz send-proxy-v2 check "
        "check-sni node1.example.dmz"
    ) in config
    assert "mode tcp" in _frontend(config, "certproxy_5262")
    assert "mode tcp" in _frontend(config, "certproxy_5263")
    assert "server node2.example.dmz 10.0.0.12:5263 send-proxy-v2 check" in config
    assert f"hdr Host {VIP}" in config


@needs_haproxy
def test_reencrypt_without_5263(tmp_path: Path, tls_files: TLSFiles) -> None:
    config = emit(
        REENCRYPT_NO_5263, VIP, NODES, str(tls_files.lb_pem), ca_file=str(tls_files.ca_file)
    )
    assert_valid(config, tmp_path)
    assert "certproxy_5263" not in config and "frontend certproxy_5262" in config


@needs_haproxy
def test_haproxy_check_really_loads_the_certificate_files(
    tmp_path: Path, tls_files: TLSFiles
) -> None:
    missing = tmp_path / "missing.pem"
    config = emit(FIGURE_2, VIP, NODES, str(missing), ca_file=str(tls_files.ca_file))
    assert haproxy_check(config, tmp_path).returncode != 0


@needs_haproxy
def test_ipv6_addresses_custom_ports_and_options(tmp_path: Path, tls_files: TLSFiles) -> None:
    nodes = [("node1.example.dmz", "2001:db8::11", 8443, 15262, 15263), NODES[1]]
    options = HAProxyOptions(
        bind_address="::1",
        https_port=8443,
        certproxy_port=15262,
        certproxy_secondary_port=15263,
        health_check_path="/SAAS/API/1.0/REST/system/health",
        timeout_client_s=30,
        balance=Balance.SOURCE,
        send_proxy_v2=False,
        source_address="::1",
    )
    config = emit(
        FIGURE_2, VIP, nodes, str(tls_files.lb_pem), ca_file=str(tls_files.ca_file), options=options
    )
    assert_valid(config, tmp_path)
    assert "bind [::1]:15263" in config
    assert "server node1.example.dmz [2001:db8::11]:15263 check" in config
    assert "send-proxy" not in config and "PROXY v2" not in config
    assert "\n    source [::1]\n" in config
    assert config.count("balance source") == 3 and "balance roundrobin" not in config
    assert "Round-robin" not in config
    assert "uri /SAAS/API/1.0/REST/system/health" in config
    assert "timeout client 30s" in config


@pytest.mark.parametrize("plan", [FIGURE_1, FIGURE_2, REENCRYPT_NO_5263])
def test_defaults_check_access_health_and_send_proxy_v2_everywhere(plan: Plan) -> None:
    config = emit(plan, VIP, NODES, "/etc/lb.pem", ca_file="/etc/ca.pem")
    servers = [line for line in config.splitlines() if line.strip().startswith("server ")]
    assert servers and all(" send-proxy-v2 check" in line for line in servers)
    assert "--load-balancer" in config.split("\nglobal\n")[0]  # the header says what nodes need
    backends = config.count("\nbackend ")
    # Any node may serve any step of a sign-in: Access shares them through the console.
    assert config.count("    balance roundrobin\n") == backends
    assert "--signins console" in config.split("\nglobal\n")[0]
    if plan.lb is LBMode.REENCRYPT:
        assert "http-check send meth GET uri /healthz ver HTTP/1.1" in config
    else:
        assert "httpchk" not in config


def test_header_records_the_plan() -> None:
    config = emit(FIGURE_1, VIP, NODES, None)
    assert config.startswith("# Generated by certgate plan.")
    assert "# Port 5263 required: no." in config
    assert all(line.startswith("#") for line in config.split("\nglobal\n")[0].splitlines())


def test_node_names_are_normalized() -> None:
    config = emit(FIGURE_1, VIP, [("NODE1.Example.DMZ.", "node1.internal", 443, 5262, None)], None)
    assert "server node1.example.dmz node1.internal:443 send-proxy-v2 check" in config


def _plan_with(lb: LBMode, required: bool) -> Plan:
    cert_type = CertType.SINGLE_HOST_CN if required else CertType.SAN
    return decide("example.com", "example.dmz", cert_type, lb)


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([], "at least one node"),
        ([NODES[0], NODES[0]], "unique"),
        ([NodeAddress("node1", "10.0.0.1")], "node name"),
        ([NodeAddress("n.example.dmz", "bad host")], "neither an IP address nor a host name"),
        ([NodeAddress("n.example.dmz", "10.0.0.1", 0)], "not a TCP port"),
        ([NodeAddress("n.example.dmz", "10.0.0.1", 443, 70000)], "not a TCP port"),
        ([NodeAddress("n.example.dmz", "10.0.0.1", 443, 5262, None)], "requires port 5263"),
    ],
)
def test_bad_nodes_raise(nodes: list[NodeAddress], message: str) -> None:
    plan = _plan_with(LBMode.REENCRYPT, required=True)
    with pytest.raises(ConfigError, match=message):
        emit(plan, VIP, nodes, "/etc/lb.pem", ca_file="/etc/ca.pem")


@pytest.mark.parametrize(
    ("pem", "ca_file", "options", "message"),
    [
        (None, "/etc/ca.pem", HAProxyOptions(), "needs the public certificate"),
        ("/etc/lb.pem", None, HAProxyOptions(), "needs the public certificate"),
        ("/etc/my lb.pem", "/etc/ca.pem", HAProxyOptions(), "single word"),
        ("/etc/lb.pem", "/etc/ca.pem#x", HAProxyOptions(), "single word"),
        ("/etc/lb.pem", "/etc/ca.pem", HAProxyOptions(bind_address="*"), "bind address"),
        ("/etc/lb.pem", "/etc/ca.pem", HAProxyOptions(https_port=0), "not a TCP port"),
        ("/etc/lb.pem", "/etc/ca.pem", HAProxyOptions(health_check_path="x y"), "URI path"),
        ("/etc/lb.pem", "/etc/ca.pem", HAProxyOptions(source_address="lb"), "not an IP"),
    ],
)
def test_bad_reencrypt_inputs_raise(
    pem: str | None, ca_file: str | None, options: HAProxyOptions, message: str
) -> None:
    plan = _plan_with(LBMode.REENCRYPT, required=False)
    with pytest.raises(ConfigError, match=message):
        emit(plan, VIP, NODES, pem, ca_file=ca_file, options=options)


def test_bad_vip_raises() -> None:
    with pytest.raises(ConfigError, match="VIP FQDN"):
        emit(FIGURE_1, "access.example.com\n    bind *:80", NODES, None)


class _NodeHandler(http.server.BaseHTTPRequestHandler):
    """Stands in for Access on a node: echoes the headers the load balancer set."""

    def do_GET(self) -> None:
        body = f"host={self.headers['Host']} proto={self.headers['X-Forwarded-Proto']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


def _wait_for_listener(port: int, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"haproxy did not listen on {port}")


@contextlib.contextmanager
def _tls_node(cert_pem: Path) -> Iterator[int]:
    """A TLS HTTP server on loopback presenting the node certificate; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NodeHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def _haproxy(config_path: Path) -> Iterator[None]:
    assert HAPROXY is not None
    process = subprocess.Popen(
        [HAPROXY, "-f", str(config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.integration
@needs_haproxy
def test_figure_2_config_serves_traffic(tmp_path: Path) -> None:
    public, public_key = make_certificate(["*.example.com"])
    node_cert, node_key = make_certificate(["node1.example.dmz"])
    lb_pem = write_pem(tmp_path / "public.pem", public, public_key)
    node_pem = write_pem(tmp_path / "node.pem", node_cert, node_key)
    ca_file = write_pem(tmp_path / "node-ca.pem", node_cert)
    # The stand-in node speaks no PROXY protocol and answers any path: this checks only the
    # emitted HTTP plumbing; real Access nodes behind every emitted topology, with PROXY v2
    # and /healthz, are in tests/integration/test_access_haproxy.py.
    ports = HAProxyOptions(
        https_port=free_port(),
        certproxy_port=free_port(),
        certproxy_secondary_port=free_port(),
        send_proxy_v2=False,
    )
    with _tls_node(node_pem) as node_port:
        node = NodeAddress("node1.example.dmz", "127.0.0.1", node_port, node_port, node_port)
        config = emit(FIGURE_2, VIP, [node], str(lb_pem), ca_file=str(ca_file), options=ports)
        config_path = tmp_path / "haproxy.cfg"
        config_path.write_text(config, encoding="utf-8")
        with _haproxy(config_path):
            _wait_for_listener(ports.https_port)
            # 443 re-encrypts: the client sees the public certificate, the node sees HTTPS.
            client = ssl.create_default_context(cafile=str(lb_pem))
            with (
                socket.create_connection(("127.0.0.1", ports.https_port), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname=VIP) as tls,
            ):
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n".encode())
                response = b""
                while chunk := tls.recv(4096):
                    response += chunk
            assert response.startswith(b"HTTP/1.")
            assert b" 200 " in response.split(b"\r\n", 1)[0]
            assert response.endswith(f"host={VIP} proto=https".encode())
            # 5262 and 5263 pass TLS through: the client sees the node's own certificate.
            for port in (ports.certproxy_port, ports.certproxy_secondary_port):
                trust_node = ssl.create_default_context(cafile=str(ca_file))
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    trust_node.wrap_socket(raw, server_hostname="node1.example.dmz") as tls,
                ):
                    assert tls.getpeercert() is not None
