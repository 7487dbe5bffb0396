"""``certgate plan`` through typer's CliRunner: both modes, JSON, HAProxy emission, errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from certgate.planner.cli import app
from tests.planner.test_certcheck import make_certificate, write_pem

VIP = "access.example.com"
runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def invoke_json(*args: str) -> dict[str, object]:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


def namespace_args(public: str, dmz: str, cert_type: str, lb: str) -> list[str]:
    return ["--public-ns", public, "--dmz-ns", dmz, "--cert-type", cert_type, "--lb", lb]


@pytest.fixture
def wildcard_pem(tmp_path: Path) -> Path:
    cert, key = make_certificate(["*.example.com"])
    return write_pem(tmp_path / "wildcard.pem", cert, key)


def cert_args(cert: Path, lb: str, *nodes: str) -> list[str]:
    node_args = [arg for node in nodes for arg in ("--node-fqdn", node)]
    return ["--cert", str(cert), "--vip-fqdn", VIP, *node_args, "--lb", lb]


@pytest.mark.parametrize(
    ("public", "dmz", "cert_type", "lb", "required", "row"),
    [
        ("example.com", "example.com", "wildcard", "reencrypt", False, 1),
        ("example.com", "example.com", "single-host-cn", "reencrypt", True, 2),
        ("example.com", "example.com", "san", "passthrough", False, 3),
        ("example.com", "example.dmz", "wildcard", "reencrypt", True, 4),
        ("example.com", "example.dmz", "single-host-cn", "reencrypt", True, 4),
        ("example.com", "example.dmz", "san", "reencrypt", False, 5),
        ("example.com", "example.dmz", "san", "passthrough", False, 6),
        ("example.com", "example.dmz", "wildcard", "passthrough", False, None),
    ],
)
def test_namespace_mode_json(
    public: str, dmz: str, cert_type: str, lb: str, required: bool, row: int | None
) -> None:
    payload = invoke_json(*namespace_args(public, dmz, cert_type, lb))
    assert payload["port_5263_required"] is required
    assert payload["table_row"] == row
    assert payload["from_table"] is (row is not None)
    assert payload["ports"] == ([443, 5262, 5263] if required else [443, 5262])
    assert payload["warnings"] == []
    assert isinstance(payload["reason"], str) and payload["reason"]


def test_human_output_is_a_rich_panel_and_json_mode_is_pure_json() -> None:
    args = namespace_args("example.com", "example.com", "single-host-cn", "reencrypt")
    human = invoke(*args)
    assert human.exit_code == 0, human.output
    assert "Port 5263 required" in human.stdout and "YES" in human.stdout
    assert "Table 1 row 2" in human.stdout and "╭" in human.stdout
    machine = invoke(*args, "--json")
    assert machine.stdout.lstrip().startswith("{")
    assert "╭" not in machine.stdout and "\x1b[" not in machine.stdout
    json.loads(machine.stdout)


def test_cert_mode_json(wildcard_pem: Path) -> None:
    payload = invoke_json(*cert_args(wildcard_pem, "reencrypt", "node1.example.dmz"))
    assert payload["port_5263_required"] is True
    assert payload["table_row"] == 4
    assert payload["uncovered_names"] == ["node1.example.dmz"]
    assert "NOT covered" in str(payload["reason"])


def test_cert_mode_reports_expiry(tmp_path: Path) -> None:
    start = datetime.now(UTC) - timedelta(days=400)
    cert, _key = make_certificate(["*.example.com"], not_before=start, not_after=start)
    path = write_pem(tmp_path / "expired.pem", cert)
    args = cert_args(path, "passthrough", "node1.example.com")
    payload = invoke_json(*args)
    warnings = payload["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1
    assert "expired" in warnings[0]
    human = invoke(*args)
    assert human.exit_code == 0 and "warning: certificate has expired" in human.stdout


def test_emit_haproxy_writes_the_config(tmp_path: Path, wildcard_pem: Path) -> None:
    ca_file = write_pem(tmp_path / "ca.pem", make_certificate(["node1.example.dmz"])[0])
    out = tmp_path / "haproxy.cfg"
    args = cert_args(wildcard_pem, "reencrypt", "node1.example.dmz")
    emit_args = ["--emit", "haproxy", "--out", str(out), "--ca-file", str(ca_file)]
    payload = invoke_json(*args, *emit_args, "--node", "node1.example.dmz=10.0.0.11")
    assert payload["haproxy_config"] == str(out)
    config = out.read_text(encoding="utf-8")
    assert f"ssl crt {wildcard_pem.absolute()}" in config
    assert "frontend certproxy_5263" in config and "bind 127.0.0.1:5262" in config
    human = invoke(*args, *emit_args, "--node", "node1.example.dmz=10.0.0.11", "--bind", "::1")
    assert human.exit_code == 0, human.output
    assert "HAProxy configuration written to" in human.stdout
    assert "bind [::1]:443 ssl crt" in out.read_text(encoding="utf-8")


def test_emit_passthrough_needs_no_ca_file(tmp_path: Path, wildcard_pem: Path) -> None:
    out = tmp_path / "haproxy.cfg"
    args = cert_args(wildcard_pem, "passthrough", "node1.example.com")
    result = invoke(*args, "--emit", "haproxy", "--out", str(out), "--node", "node1.example.com=n1")
    assert result.exit_code == 0, result.output
    assert "server node1.example.com n1:443 send-proxy-v2 check" in out.read_text(encoding="utf-8")


def test_emit_ports_health_path_and_balance_are_flags(tmp_path: Path, wildcard_pem: Path) -> None:
    ca_file = write_pem(tmp_path / "ca.pem", make_certificate(["node1.example.dmz"])[0])
    out = tmp_path / "haproxy.cfg"
    args = cert_args(wildcard_pem, "reencrypt", "node1.example.dmz")
    emit_args = ["--emit", "haproxy", "--out", str(out), "--ca-file", str(ca_file)]
    flags = {
        "--lb-https-port": "8443",
        "--lb-certproxy-port": "15262",
        "--lb-secondary-port": "15263",
        "--node-https-port": "9443",
        "--node-certproxy-port": "25262",
        "--node-secondary-port": "25263",
        "--health-check-path": "/ready",
        "--balance": "source",
        "--lb-source": "10.0.0.2",
    }
    given = [arg for pair in flags.items() for arg in pair]
    invoke_json(*args, *emit_args, "--node", "node1.example.dmz=10.0.0.11", *given)
    config = out.read_text(encoding="utf-8")
    for bind in ("127.0.0.1:8443 ssl crt", "127.0.0.1:15262\n", "127.0.0.1:15263\n"):
        assert f"bind {bind}" in config
    for port in (9443, 25262, 25263):
        assert f"server node1.example.dmz 10.0.0.11:{port} " in config
    assert "uri /ready " in config and "balance roundrobin" not in config
    assert "\n    source 10.0.0.2\n" in config
    defaults = invoke_json(*args, *emit_args, "--node", "node1.example.dmz=10.0.0.11")
    assert defaults["haproxy_config"] == str(out)
    config = out.read_text(encoding="utf-8")
    assert "bind 127.0.0.1:443 ssl crt" in config and "10.0.0.11:5263 send-proxy-v2" in config
    assert "uri /healthz " in config and "balance source" not in config
    assert "\n    source " not in config


@pytest.mark.parametrize("flag", ["--lb-https-port", "--node-secondary-port", "--balance"])
def test_emit_flags_need_emit(wildcard_pem: Path, flag: str) -> None:
    value = "roundrobin" if flag == "--balance" else "8443"
    result = invoke(*cert_args(wildcard_pem, "reencrypt", "node1.example.dmz"), flag, value)
    assert result.exit_code == 2 and f"{flag} only make sense with --emit" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Missing option '--lb'"),
        (["--lb", "reencrypt"], "give either"),
        (["--lb", "sideways", "--public-ns", "example.com"], "sideways"),
        (
            [*namespace_args("example.com", "example.dmz", "san", "reencrypt"), "--cert", "x.pem"],
            "not both",
        ),
        (["--lb", "reencrypt", "--public-ns", "example.com"], "--dmz-ns, --cert-type"),
        (["--lb", "reencrypt", "--cert", "c.pem", "--vip-fqdn", VIP], "--node-fqdn"),
        (namespace_args("example.com", "example_dmz", "san", "reencrypt"), "DMZ namespace"),
        (
            [
                *namespace_args("example.com", "example.dmz", "san", "reencrypt"),
                "--emit",
                "haproxy",
            ],
            "--emit needs the certificate mode",
        ),
        (
            [*namespace_args("example.com", "example.dmz", "san", "passthrough"), "--out", "f"],
            "--out",
        ),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--emit", "haproxy", "--node", "node1.example.dmz=h"], "--out"),
        (["--emit", "haproxy", "--out", "o.cfg"], "--node"),
        (["--emit", "haproxy", "--out", "o.cfg", "--node", "node1.example.dmz"], "NODE_FQDN=HOST"),
        (["--emit", "haproxy", "--out", "o.cfg", "--node", "other.example.dmz=h"], "one --node"),
        (["--node", "node1.example.dmz=h"], "only make sense with --emit"),
    ],
)
def test_emit_usage_errors_exit_2(wildcard_pem: Path, extra: list[str], message: str) -> None:
    result = invoke(*cert_args(wildcard_pem, "passthrough", "node1.example.dmz"), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_reencrypt_emit_needs_ca_file(wildcard_pem: Path) -> None:
    args = cert_args(wildcard_pem, "reencrypt", "node1.example.dmz")
    result = invoke(*args, "--emit", "haproxy", "--out", "o.cfg", "--node", "node1.example.dmz=h")
    assert result.exit_code == 2 and "--ca-file" in result.output


def test_unreadable_certificate_exits_1(tmp_path: Path) -> None:
    args = cert_args(tmp_path / "missing.pem", "reencrypt", "node1.example.dmz")
    human = invoke(*args)
    assert human.exit_code == 1
    assert "error: cannot read certificate file" in human.stderr and human.stdout == ""
    machine = invoke(*args, "--json")
    assert machine.exit_code == 1
    error = json.loads(machine.stdout)
    assert error["error_type"] == "UnreadableCertificate" and "missing.pem" in error["error"]


def test_certificate_not_covering_the_vip_exits_1(tmp_path: Path) -> None:
    cert, _key = make_certificate(["*.example.dmz"])
    path = write_pem(tmp_path / "dmz.pem", cert)
    result = invoke(*cert_args(path, "passthrough", "node1.example.dmz"), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error_type"] == "CertificateMismatch"


def test_mounted_as_certgate_plan() -> None:
    root = typer.Typer()

    @root.command()
    def version() -> None:
        """A sibling command, as the real certgate app has."""

    root.add_typer(app, name="plan")
    args = namespace_args("example.com", "example.dmz", "san", "passthrough")
    result = runner.invoke(root, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["table_row"] == 6
