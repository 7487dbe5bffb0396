"""``certgate console remote``: the admin commands over a real console's API.

The remote command runs in this process (typer's runner) against a real console process
over real mTLS; its output is compared with the local command's on the same data
directory, and its refusals (API key, certificate, CA, role) with their exit codes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
    pkcs12,
)
from cryptography.x509 import load_pem_x509_certificate
from typer.testing import CliRunner, Result

from certgate.cli import app
from certgate.console import local, remote
from certgate.console.services import ca, devices
from certgate.pki.keys import KeyAlgorithm
from certgate.pki.thumbprint import thumbprint
from tests.console.conftest import add_device
from tests.console.test_cli import BASE_ENV
from tests.support import AdminCreds, RunningConsole

runner = CliRunner()
P12_PASSWORD = "p12 secret"


def p12_of(console: RunningConsole, creds: AdminCreds) -> Path:
    """The admin's certificate and key as ``admin create`` writes them (PKCS#12)."""
    key = load_pem_private_key(creds.key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = load_pem_x509_certificate(creds.cert_path.read_bytes())
    path = console.work / f"{creds.username}.p12"
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"admin",
            key,
            cert,
            None,
            BestAvailableEncryption(P12_PASSWORD.encode()),
        )
    )
    return path


def run(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    return runner.invoke(app, ["console", *args], env={**BASE_ENV, **(env or {})})


def remote_run(
    console: RunningConsole,
    creds: AdminCreds,
    *args: str,
    ca_file: Path | None = None,
    pin: str | None = None,
    env: Mapping[str, str | None] | None = None,
) -> Result:
    trust = ["--pin", pin] if pin else ["--ca-file", str(ca_file or console.chain_path)]
    target = ["remote", "--url", console.url, *trust, "--admin-cert", str(p12_of(console, creds))]
    secrets = {"CERTGATE_API_KEY": creds.api_key, "CERTGATE_ADMIN_CERT_PASSWORD": P12_PASSWORD}
    return run(*target, *args, env={**secrets, **(env or {})})


def error_lines(result: Result) -> list[str]:
    """The command's own messages (library log lines left out: their timestamps differ)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def local_run(console: RunningConsole, *args: str) -> Result:
    group, command, *rest = args
    return run(group, command, "-d", str(console.data_dir), *rest)


@pytest.fixture(scope="module")
def seeded(console: RunningConsole) -> list[str]:
    """Five devices of `global` with a certificate each, and a read-only admin."""
    with console.local() as (session, _):
        uids = [add_device(session, "global") for _ in range(5)]
    console.make_admin("viewer", "read-only", "global")
    return sorted(uids)


SAME_OUTPUT = [
    ("group", "list"),
    ("group", "list", "--json"),
    ("group", "show", "global"),
    ("group", "show", "global", "--json"),
    ("device", "list", "global", "--json"),
    ("device", "list", "global"),
    ("cert", "list", "--group", "global", "--json"),
    ("cert", "list", "--group", "global"),
    ("audit", "list", "--group", "global", "--limit", "7", "--json"),
    ("audit", "list", "--group", "global", "--limit", "7"),
]


@pytest.mark.parametrize("command", SAME_OUTPUT, ids=" ".join)
def test_remote_output_equals_local(
    console: RunningConsole, seeded: list[str], command: tuple[str, ...]
) -> None:
    every = ("--all",) if command[:2] in (("device", "list"), ("cert", "list")) else ()
    remote_result = remote_run(console, console.admins["root"], *command, *every)
    local_result = local_run(console, *command)
    assert remote_result.exit_code == 0, remote_result.output
    assert local_result.exit_code == 0, local_result.output
    assert remote_result.stdout == local_result.stdout


def test_remote_device_compliance_and_keys_equal_local(
    console: RunningConsole, seeded: list[str]
) -> None:
    root = console.admins["root"]
    for command in (
        ("device", "compliance", seeded[0], "--json"),
        ("device", "compliance", seeded[0]),
    ):
        remote_out = remote_run(console, root, *command)
        assert remote_out.exit_code == 0, remote_out.output
        assert remote_out.stdout == local_run(console, *command).stdout
    remote_keys = remote_run(console, root, "admin", "keys", root.id, "--json")
    local_keys = local_run(console, "admin", "keys", "root", "--json")
    assert json.loads(remote_keys.stdout) == json.loads(local_keys.stdout)


def test_listing_follows_cursors_only_with_all(console: RunningConsole, seeded: list[str]) -> None:
    root = console.admins["root"]
    page = remote_run(console, root, "device", "list", "global", "--limit", "2", "--json")
    assert [d["uid"] for d in json.loads(page.stdout)] == seeded[:2]
    assert "--all lists every page" in page.stderr
    every = remote_run(console, root, "device", "list", "global", "--limit", "2", "--all", "--json")
    assert [d["uid"] for d in json.loads(every.stdout)] == seeded
    assert "--all" not in every.stderr
    exact = remote_run(console, root, "device", "list", "global", "--limit", "5", "--json")
    assert len(json.loads(exact.stdout)) == 5
    assert "--all" not in exact.stderr  # a full last page: nothing left unread


def test_no_flag_takes_a_secret_value(console: RunningConsole) -> None:
    """An API key on the command line would show in `ps`: there is no such option."""
    result = run("remote", "--url", console.url, "--api-key", "cgk_x", "group", "list")
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_remote_device_set_changes_what_the_console_holds(
    console: RunningConsole, seeded: list[str]
) -> None:
    uid = seeded[-1]
    result = remote_run(
        console, console.admins["root"], "device", "set", uid, "--compliance", "noncompliant"
    )
    assert result.exit_code == 0, result.output
    assert f"device {uid}: compliance=noncompliant enrollment=enrolled blocked=False" in (
        result.stdout
    )
    with console.local() as (session, _):
        assert devices.get_device(session, uid).compliance_status == "noncompliant"
    shown = local_run(console, "device", "compliance", uid, "--json")
    assert json.loads(shown.stdout)["compliance_status"] == "noncompliant"


def test_remote_compliance_override_and_clear_print_as_local(console: RunningConsole) -> None:
    """An override set and cleared remotely on one device and locally on its twin prints
    alike; the history (with those override rows) reads back the same either way, and
    clearing twice is the same refusal."""
    root = console.admins["root"]
    with console.local() as (session, _):
        twins = {add_device(session, "global"): add_device(session, "global")}
    ((remote_uid, local_uid),) = twins.items()
    steps = [
        ("override", "--status", "noncompliant", "--expires", "1h", "--reason", "lost"),
        ("override", "--status", "compliant", "--expires", "2d", "--reason", "found", "--json"),
        ("clear", "--reason", "checked"),
    ]
    for command, *options in steps:
        remote_out = remote_run(root_console := console, root, "device", "compliance",
                                command, remote_uid, *options)  # fmt: skip
        local_out = run("device", "compliance", command, "-d", str(root_console.data_dir),
                        local_uid, *options)  # fmt: skip
        assert remote_out.exit_code == 0, (command, remote_out.output)
        assert local_out.exit_code == 0, (command, local_out.output)
        assert same_but_names(remote_out.stdout, local_out.stdout, twins), command
    shown = local_run(console, "device", "compliance", remote_uid, "--json")
    notes = [event["override"] for event in json.loads(shown.stdout)["history"]]
    assert [n["action"] for n in notes] == ["clear", "set", "set"]
    assert [n["reason"] for n in notes] == ["checked", "found", "lost"]
    assert notes[0]["by"] == f"admin:{root.username}"
    for listing in (("--json",), ()):
        remote_out = remote_run(console, root, "device", "compliance", remote_uid, *listing)
        local_out = local_run(console, "device", "compliance", remote_uid, *listing)
        assert remote_out.stdout == local_out.stdout
    again = remote_run(console, root, "device", "compliance", "clear", remote_uid)
    local_again = run("device", "compliance", "clear", "-d", str(console.data_dir), remote_uid)
    assert again.exit_code == local_again.exit_code == remote.EXIT_REFUSED
    assert error_lines(again) == error_lines(local_again) != []


def test_unknown_device_refused_as_locally(console: RunningConsole, seeded: list[str]) -> None:
    remote_result = remote_run(console, console.admins["root"], "device", "compliance", "nope")
    local_result = local_run(console, "device", "compliance", "nope")
    assert remote_result.exit_code == local_result.exit_code == remote.EXIT_REFUSED
    assert error_lines(remote_result) == error_lines(local_result)
    assert "not found" in remote_result.stderr


@pytest.mark.parametrize(
    "command",
    [("rotate", "finish", "root", "global"), ("rotate", "renew-devices", "global")],
    ids=" ".join,
)
def test_refusal_of_the_service_reads_as_locally(
    console: RunningConsole, seeded: list[str], command: tuple[str, ...]
) -> None:
    """A rule of the console (not of the client) refuses: same message, same exit code."""
    remote_result = remote_run(console, console.admins["root"], *command)
    local_result = local_run(console, *command)
    assert remote_result.exit_code == local_result.exit_code == remote.EXIT_REFUSED
    assert error_lines(remote_result) == error_lines(local_result) != []


def test_role_denial_shown_with_its_exit_code(console: RunningConsole, seeded: list[str]) -> None:
    viewer = console.admins["viewer"]
    listing = remote_run(console, viewer, "device", "list", "global", "--json")
    assert listing.exit_code == 0, listing.output
    denied = remote_run(console, viewer, "device", "set", seeded[0], "--action", "block")
    assert denied.exit_code == remote.EXIT_FORBIDDEN, denied.output
    assert error_lines(denied), denied.stderr
    assert "devices:write" in denied.stderr
    assert denied.stdout == ""
    with console.local() as (session, _):
        assert devices.get_device(session, seeded[0]).blocked is False


def test_wrong_api_key_is_unauthenticated(console: RunningConsole, seeded: list[str]) -> None:
    result = remote_run(
        console,
        console.admins["root"],
        "group",
        "list",
        env={"CERTGATE_API_KEY": "cgk_0000000000000000_" + "A" * 43},
    )
    assert result.exit_code == remote.EXIT_UNAUTHENTICATED, result.output
    assert error_lines(result), result.stderr


def test_another_admins_certificate_is_unauthenticated(
    console: RunningConsole, seeded: list[str]
) -> None:
    """The root's API key with the viewer's certificate: both must belong to one admin."""
    root, viewer = console.admins["root"], console.admins["viewer"]
    result = remote_run(console, viewer, "group", "list", env={"CERTGATE_API_KEY": root.api_key})
    assert result.exit_code == remote.EXIT_UNAUTHENTICATED, result.output


def test_missing_api_key_variable_named(console: RunningConsole, seeded: list[str]) -> None:
    result = remote_run(
        console, console.admins["root"], "group", "list", env={"CERTGATE_API_KEY": None}
    )
    assert result.exit_code == remote.EXIT_CREDENTIALS
    assert "no API key: set $CERTGATE_API_KEY" in result.stderr


def test_wrong_pkcs12_password(console: RunningConsole, seeded: list[str]) -> None:
    result = remote_run(
        console,
        console.admins["root"],
        "group",
        "list",
        env={"CERTGATE_ADMIN_CERT_PASSWORD": "wrong"},
    )
    assert result.exit_code == remote.EXIT_CREDENTIALS
    assert "$CERTGATE_ADMIN_CERT_PASSWORD" in result.stderr


def test_console_not_signed_by_the_ca_file_is_not_trusted(
    console: RunningConsole, seeded: list[str], tmp_path: Path
) -> None:
    """A CA file of another instance: the handshake fails before any secret is sent."""
    other = tmp_path / "other"
    _, pki = local.init(other, KeyAlgorithm.EC_P256, "https://127.0.0.1:1", "127.0.0.1", 1, None)
    ca_file = tmp_path / "other-ca.pem"
    ca_file.write_text(ca.pem(pki.certs[ca.ROOT]))
    result = remote_run(console, console.admins["root"], "group", "list", ca_file=ca_file)
    assert result.exit_code == remote.EXIT_UNREACHABLE, result.output
    assert "not trusted" in result.stderr


def test_console_verified_by_a_pin_on_its_root(console: RunningConsole, seeded: list[str]) -> None:
    with console.local() as (_, pki):
        pin = thumbprint(pki.certs[ca.ROOT])
    root = console.admins["root"]
    pinned = remote_run(console, root, "group", "list", "--json", pin=pin)
    assert pinned.exit_code == 0, pinned.output
    assert pinned.stdout == local_run(console, "group", "list", "--json").stdout
    wrong = remote_run(console, root, "group", "list", pin="sha256:" + "0" * 64)
    assert wrong.exit_code == remote.EXIT_UNREACHABLE, wrong.output
    assert "does not match --pin" in wrong.stderr
    # The pin is of the Root: the error says so, and what to do after a Root rotation.
    assert "after a Root rotation pin the new Root" in " ".join(wrong.stderr.split())


def test_encrypted_pem_key_instead_of_pkcs12(console: RunningConsole, seeded: list[str]) -> None:
    creds = console.admins["root"]
    key = load_pem_private_key(creds.key_path.read_bytes(), None)
    encrypted = console.work / "root-encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(P12_PASSWORD.encode())
        )
    )
    assert b"ENCRYPTED" in encrypted.read_bytes()
    result = run(
        "remote",
        "--url",
        console.url,
        "--ca-file",
        str(console.chain_path),
        "--admin-cert",
        str(creds.cert_path),
        "--admin-key",
        str(encrypted),
        "group",
        "show",
        "global",
        "--json",
        env={"CERTGATE_API_KEY": creds.api_key, "CERTGATE_ADMIN_CERT_PASSWORD": P12_PASSWORD},
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == local_run(console, "group", "show", "global", "--json").stdout


def test_every_route_exists_in_the_console(console: RunningConsole) -> None:
    """The command->route table names only routes the console serves (method and path)."""
    with console.client(console.admins["root"]) as client:
        spec = client.get("/openapi.json")
    assert spec.status_code == 200, spec.text
    paths = spec.json()["paths"]
    for command, (method, path) in remote.ROUTES.items():
        assert method.lower() in paths.get(path, {}), command


def same_but_names(remote_out: str, local_out: str, names: dict[str, str]) -> bool:
    """Outputs equal once the remote run's object names are replaced by the local run's."""
    for remote_name, local_name in names.items():
        remote_out = remote_out.replace(remote_name, local_name)
    return remote_out == local_out


def test_remote_changes_print_as_local_changes(console: RunningConsole, seeded: list[str]) -> None:
    """The same change made remotely on one object and locally on its twin prints alike."""
    root = console.admins["root"]
    names = {"grp-r": "grp-l", "enr-r": "enr-l"}
    steps = [
        ("group", "create", "{g}", "--name", "twin"),
        ("group", "set", "{g}", "--feed", "max_staleness_s=90"),
        ("group", "set", "{g}", "--feed", "max_staleness_s=60", "--dry-run", "--json"),
        ("group", "show", "{g}", "--json"),
        ("device", "enroll-user", "{g}", "{u}"),
        ("rotate", "status", "{g}", "--json"),
    ]
    env = {"CERTGATE_ENROLL_PASSWORD": "enroll password 1"}
    for step in steps:
        remote_args = [a.format(g="grp-r", u="enr-r") for a in step]
        local_args = [a.format(g="grp-l", u="enr-l") for a in step]
        remote_out = remote_run(console, root, *remote_args, env=env)
        local_out = run(step[0], step[1], "-d", str(console.data_dir), *local_args[2:], env=env)
        assert remote_out.exit_code == 0, (step, remote_out.output)
        assert local_out.exit_code == 0, (step, local_out.output)
        assert same_but_names(remote_out.stdout, local_out.stdout, names), step


def test_remote_admin_create_writes_working_credentials(
    console: RunningConsole, seeded: list[str], tmp_path: Path
) -> None:
    """An admin created remotely gets the files the local command writes, and they work."""
    result = remote_run(
        console,
        console.admins["root"],
        "admin",
        "create",
        "remote-ops",
        "--role",
        "read-only",
        "--out-dir",
        str(tmp_path),
        env={"CERTGATE_P12_PASSWORD": P12_PASSWORD},
    )
    assert result.exit_code == 0, result.output
    api_key = result.stdout.split("API key (shown once): ")[1].split()[0]
    for suffix in ("pem", "key", "p12"):
        assert (tmp_path / f"remote-ops.{suffix}").stat().st_mode & 0o777 == 0o600
    # leaf + Admin CA + Root, as `admin create` writes locally
    assert (tmp_path / "remote-ops.pem").read_text().count("BEGIN CERTIFICATE") == 3
    listing = run(
        "remote",
        "--url",
        console.url,
        "--ca-file",
        str(console.chain_path),
        "--admin-cert",
        str(tmp_path / "remote-ops.p12"),
        "group",
        "show",
        "global",
        "--json",
        env={"CERTGATE_API_KEY": api_key, "CERTGATE_ADMIN_CERT_PASSWORD": P12_PASSWORD},
    )
    assert listing.exit_code == 0, listing.output
    assert json.loads(listing.stdout)["id"] == "global"


def test_remote_key_revocation_and_cert_revocation(
    console: RunningConsole, seeded: list[str]
) -> None:
    root = console.admins["root"]
    created = remote_run(console, root, "admin", "new-key", root.id)
    assert created.exit_code == 0, created.output
    key = created.stdout.split("API key (shown once): ")[1].split()[0]
    key_id = key.split("_")[1]
    revoked = remote_run(console, root, "admin", "revoke-key", key_id)
    assert revoked.stdout == f"API key {key_id} revoked\n"
    refused = remote_run(console, root, "group", "list", env={"CERTGATE_API_KEY": key})
    assert refused.exit_code == remote.EXIT_UNAUTHENTICATED, refused.output

    certs = json.loads(
        remote_run(console, root, "cert", "list", "--group", "global", "--all", "--json").stdout
    )
    serial = next(c["serial"] for c in certs if c["device_uid"] == seeded[1])
    done = remote_run(console, root, "cert", "revoke", serial, "--reason", "keyCompromise")
    assert done.stdout == f"certificate {serial} revoked (keyCompromise)\n"
    shown = json.loads(local_run(console, "cert", "list", "--group", "global", "--json").stdout)
    assert next(c for c in shown if c["serial"] == serial)["revocation_reason"] == "keyCompromise"


def test_remote_installer_is_written_owner_only(
    console: RunningConsole, seeded: list[str], tmp_path: Path
) -> None:
    target = tmp_path / "installer.tar.gz"
    result = remote_run(
        console, console.admins["root"], "installer", "global", "--out", str(target)
    )
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert target.stat().st_mode & 0o777 == 0o600
    nodes = remote_run(console, console.admins["root"], "tunnel", "nodes", "global", "--json")
    assert nodes.exit_code == 0, nodes.output
    assert isinstance(json.loads(nodes.stdout), list)


def test_remote_rotation_reads_back_as_local(console: RunningConsole, seeded: list[str]) -> None:
    root = console.admins["root"]
    started = remote_run(console, root, "rotate", "tunnel-identity", "global", "--overlap", "2h")
    assert started.exit_code == 0, started.output
    assert started.stdout.startswith("rotation ")
    for command in (("rotate", "status", "global"), ("rotate", "status", "global", "--json")):
        remote_out = remote_run(console, root, *command)
        assert remote_out.exit_code == 0, remote_out.output
        assert (
            remote_out.stdout
            == run(command[0], command[1], "-d", str(console.data_dir), *command[2:]).stdout
        )
