"""Tests for the Device Root rotation of certgate.console.services.rotation on a real
console process (both storage backends; this module has its own console, since the
rotation is instance-wide): prepare trusts both roots, a switch made by the CLI (another
process) is used by the running console for issuance without a restart, status counts the
old root's certificates, finish waits for them unless forced, revokes them, retires the
old root and publishes its CRL; only a top-level superadmin rotates the Device Root."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from typer.testing import CliRunner

from certgate.cli import app
from certgate.console import local
from certgate.console.services import ca, rotation
from certgate.pki.authority import Names
from certgate.pki.keys import generate_key
from certgate.pki.profiles import DEVICE_CLIENT
from certgate.pki.thumbprint import thumbprint
from certgate.pki.token import TokenKey
from tests.console.conftest import switched_in_token, token_console
from tests.softhsm import SoftHSM
from tests.support import RunningConsole, make_csr
from tests.tunnel.conftest import COMPLIANT, create_group, enroll_device, setup_node

pytestmark = pytest.mark.integration  # a real console process

DEVICE_ROOT = "/api/v1/groups/{}/rotations/device-root"
REFRESH_WAIT_S = 30  # generous: the console checks its CA rows every 5 s (ca.REFRESH_S)


def call(console: RunningConsole, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with console.client(console.admins["root"]) as client:
        return client.request(method, path, **kwargs)


def deliver(console: RunningConsole, credential: str) -> dict[str, Any]:
    """A new device profile (certificate and chain) for the device of ``credential``."""
    with console.client(api_key=credential) as client:
        response = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def profile_version(console: RunningConsole, credential: str) -> int:
    with console.client(api_key=credential) as client:
        response = client.get("/api/v1/device")
    assert response.status_code == 200, response.text
    return int(response.json()["profile_version"])


def chain_root(delivered: dict[str, Any]) -> str:
    return thumbprint(x509.load_pem_x509_certificate(delivered["chain"][0].encode()))


def cli(console: RunningConsole, *args: str) -> str:
    result = CliRunner().invoke(app, ["console", "rotate", *args, "-d", str(console.data_dir)])
    assert result.exit_code == 0, result.output
    return str(result.output)


def test_only_a_top_level_superadmin_rotates_the_device_root(console: RunningConsole) -> None:
    group = create_group(console, COMPLIANT)
    local_admin = console.make_admin("group-super", "superadmin", group)
    with console.client(local_admin) as client:
        refused = client.post(DEVICE_ROOT.format(group))
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert set(body) == {"error", "detail"}
    assert body["detail"] == "rotating the device-root needs a top-level superadmin"


def test_device_root_rotation_prepare_switch_finish(
    console: RunningConsole, tmp_path: Path
) -> None:
    group = create_group(console, COMPLIANT)
    node = setup_node(console, group, tmp_path / "node-a", "node-a")
    old_root = thumbprint(node.device_root)
    laggard = enroll_device(console, group)  # keeps its old-root certificate throughout
    renewing = enroll_device(console, group)

    started = call(console, "POST", DEVICE_ROOT.format(group), json={"overlap_s": 0})
    assert started.status_code == 201, started.text
    shown = started.json()
    assert (shown["kind"], shown["group_id"], shown["phase"]) == ("device-root", None, "prepared")
    assert shown["old"]["thumbprint"] == old_root != shown["new"]["thumbprint"]
    new_root = shown["new"]["thumbprint"]
    again = call(console, "POST", DEVICE_ROOT.format(group))
    assert again.status_code == 409 and "already running" in again.json()["detail"]
    early = call(console, "POST", DEVICE_ROOT.format(group) + "/renew-devices")
    assert early.status_code == 409 and "after the switch" in early.json()["detail"]

    # Prepared: a node set up now trusts both roots (the current one first); issuance
    # still uses the old one.
    both = setup_node(console, group, tmp_path / "node-b", "node-b")
    assert [thumbprint(r) for r in both.device_roots] == [old_root, new_root]
    assert chain_root(deliver(console, renewing.credential)) == old_root

    # Switched by the CLI, another process: the running console issues from the new root
    # without a restart (it reads its CA rows again within ca.REFRESH_S).
    assert "switched" in cli(console, "switch", "device-root", group)
    deadline = time.monotonic() + REFRESH_WAIT_S
    while chain_root(delivered := deliver(console, renewing.credential)) != new_root:
        assert time.monotonic() < deadline, "the console still issues from the old root"
        time.sleep(1)
    issued = x509.load_pem_x509_certificate(delivered["certificate"].encode())
    assert issued.issuer == x509.load_pem_x509_certificate(delivered["chain"][0].encode()).subject
    switched = setup_node(console, group, tmp_path / "node-c", "node-c")
    assert [thumbprint(r) for r in switched.device_roots] == [new_root, old_root]

    # Forced renewal: the device still on the old root is told a newer profile exists
    # (what its agent renews on); the one already renewed is not.
    versions = {d.uid: profile_version(console, d.credential) for d in (laggard, renewing)}
    renewed = call(console, "POST", DEVICE_ROOT.format(group) + "/renew-devices")
    assert renewed.status_code == 200 and renewed.json() == {"devices": [laggard.uid]}
    assert profile_version(console, laggard.credential) == versions[laggard.uid] + 1
    assert profile_version(console, renewing.credential) == versions[renewing.uid]

    # Status: the old root's certificates still active, per kind, with their devices.
    status = call(console, "GET", f"/api/v1/groups/{group}/rotations").json()
    running = next(r for r in status if r["kind"] == "device-root")
    assert running["devices"]["old_root_certificates"] == {"device": 1}
    assert running["devices"]["devices"] == [laggard.uid]
    shown = " ".join(cli(console, "status", group).split())
    assert "old-root certificates still active: 1 device (1 devices, 0 live tunnels)" in shown
    # Each group's status shows its own nodes and devices only.
    other = create_group(console, COMPLIANT)
    setup_node(console, other, tmp_path / "node-z", "node-z")
    theirs = call(console, "GET", f"/api/v1/groups/{other}/rotations").json()
    seen = next(r for r in theirs if r["kind"] == "device-root")
    assert [n["name"] for n in seen["nodes"]] == ["node-z"]
    assert seen["devices"]["devices"] == [] and laggard.uid not in str(seen["blockers"])
    assert "node-z" not in {n["name"] for n in running["nodes"]}
    refused = call(console, "POST", DEVICE_ROOT.format(group) + "/finish")
    assert refused.status_code == 409, refused.text
    assert "1 active device certificate(s) of the old Device Root" in refused.json()["detail"]
    assert laggard.uid in refused.json()["detail"]

    forced = call(console, "POST", DEVICE_ROOT.format(group) + "/finish", params={"force": True})
    assert forced.status_code == 200 and forced.json()["forced"] is True, forced.text

    # Finished: nodes set up now trust the new root alone; the laggard's certificate and
    # the old root itself are revoked; the old root's CRL, signed by it, lists the laggard.
    after = setup_node(console, group, tmp_path / "node-d", "node-d")
    assert [thumbprint(r) for r in after.device_roots] == [new_root]
    certs = call(console, "GET", f"/api/v1/groups/{group}/certificates").json()
    by_thumb = {c["thumbprint"]: c for c in certs}
    assert by_thumb[laggard.thumbprint]["revoked_at"] is not None
    with console.client() as client:
        old_crl = x509.load_der_x509_crl(client.get("/pki/crl/device-root.crl").content)
        current_crl = x509.load_der_x509_crl(client.get("/pki/device-root.crl").content)
        unknown = client.get("/pki/crl/device-root@999.crl")
    assert old_crl.is_signature_valid(node.device_root.public_key())  # type: ignore[arg-type]
    laggard_serial = int(by_thumb[laggard.thumbprint]["serial"], 16)
    assert old_crl.get_revoked_certificate_by_serial_number(laggard_serial) is not None
    new_root_cert = after.device_roots[0]
    assert current_crl.is_signature_valid(new_root_cert.public_key())  # type: ignore[arg-type]
    assert current_crl.get_revoked_certificate_by_serial_number(laggard_serial) is None
    assert unknown.status_code == 404 and set(unknown.json()) == {"error", "detail"}
    audit = call(console, "GET", "/api/v1/audit", params={"group_id": group}).json()
    assert {"rotation.prepare", "rotation.finish.forced"} <= {e["action"] for e in audit}


def test_with_ca_keys_in_a_pkcs11_token_the_new_root_key_is_generated_there(
    hsm: SoftHSM, tmp_path: Path
) -> None:
    config, db, pki = token_console(hsm, tmp_path, "rotation")
    try:
        with db.transaction() as session:
            started = switched_in_token(session, pki, "device-root", ca.DEVICE_ROOT)
            new_label = ca.version_label(ca.DEVICE_ROOT, started.id)
            leaf, row = pki.issue(
                session,
                ca.DEVICE_ROOT,
                DEVICE_CLIENT,
                Names("device"),
                generate_key().public_key(),
                ca.Record("device"),
            )
            assert row.issuer_label == new_label
        # A console started afterwards finds the new root's key in the token.
        _, reopened = local.open_db(config)
        assert isinstance(reopened.issuer(ca.DEVICE_ROOT).key, TokenKey)
        leaf.verify_directly_issued_by(reopened.certs[ca.DEVICE_ROOT])
        with db.transaction() as session:
            rotation.finish(session, pki, local.TOP_GROUP, "device-root", force=True)
            crl = x509.load_der_x509_crl(
                ca.device_root_crl(session, pki, timedelta(days=1), ca.DEVICE_ROOT)
            )
        old_root = pki.others[ca.DEVICE_ROOT][1]
        assert pki.others[ca.DEVICE_ROOT][0] == ca.RETIRED
        assert crl.is_signature_valid(old_root.public_key())  # type: ignore[arg-type]
    finally:
        db.dispose()
