"""Tests for the Secure Channel Root rotation of certgate.console.services.rotation on a real
console process (both storage backends; this module has its own console, since the
rotation is instance-wide).

prepare: a new Secure Channel Root under the Root, trusted beside the old one (trust
configs and device profiles list both), nothing issued by it yet. switch: the console
presents a TLS certificate of the new root at once, every group identity is renewed onto
it through its own identity rotation (listed in the status), nodes still on the old
identities are still accepted. finish: refused while a node presents an old identity,
then forced; old identities and the old root are revoked, nodes set up now trust the new
root alone, the old node is told to set up again; and `audit verify` still accepts the
checkpoints signed under the retired root (issue #11 item 3)."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from typer.testing import CliRunner

from certgate.cli import app
from certgate.console import local
from certgate.console.renewer import Renewer
from certgate.console.services import ca
from certgate.console.state import ConsoleState
from certgate.pki.thumbprint import thumbprint
from tests.console.conftest import local_superadmin_refused
from tests.console.test_renewer import served
from tests.console.test_rotation import _feed_call
from tests.support import CERTGATE, RunningConsole, issued_by, make_csr
from tests.tunnel.conftest import COMPLIANT, create_group, enroll_device, setup_node

pytestmark = pytest.mark.integration  # a real console process

SCR = "/api/v1/groups/{}/rotations/secure-channel-root"


def call(console: RunningConsole, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with console.client(console.admins["root"]) as client:
        return client.request(method, path, **kwargs)


def console_tls_leaf(console: RunningConsole) -> x509.Certificate:
    """The certificate the console presents, over a handshake verified to the Root."""
    ctx = ssl.create_default_context(cafile=str(console.chain_path))
    with (
        socket.create_connection(("127.0.0.1", console.port), timeout=30) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def tunnel_trust(console: RunningConsole, credential: str) -> list[str]:
    """The thumbprints of a new device profile's ``tunnel_trust``."""
    with console.client(api_key=credential) as client:
        response = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    assert response.status_code == 201, response.text
    trusted = response.json()["tunnel_trust"]
    return [thumbprint(x509.load_pem_x509_certificate(pem.encode())) for pem in trusted]


def audit_verify(console: RunningConsole) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CERTGATE, "console", "audit", "verify", "-d", str(console.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_only_a_top_level_superadmin_rotates_the_secure_channel_root(
    console: RunningConsole,
) -> None:
    local_superadmin_refused(console, SCR, "secure-channel-root")


def test_secure_channel_root_rotation_prepare_switch_finish(
    console: RunningConsole, tmp_path: Path
) -> None:
    group = create_group(console, COMPLIANT)
    node = setup_node(console, group, tmp_path / "node-a", "node-a")
    (old_root,) = node.secure_channel_roots
    device = enroll_device(console, group)
    before_tls = console_tls_leaf(console)
    assert issued_by(before_tls, old_root)

    started = call(console, "POST", SCR.format(group), json={"overlap_s": 0})
    assert started.status_code == 201, started.text
    shown = started.json()
    assert (shown["kind"], shown["group_id"], shown["phase"]) == (
        "secure-channel-root",
        None,
        "prepared",
    )
    assert shown["old"]["thumbprint"] == thumbprint(old_root) != shown["new"]["thumbprint"]
    new_thumb = shown["new"]["thumbprint"]

    # Prepared: both roots are trusted (the current one first), the old one still issues.
    both = setup_node(console, group, tmp_path / "node-b", "node-b")
    assert [thumbprint(r) for r in both.secure_channel_roots] == [thumbprint(old_root), new_thumb]
    assert both.secure_channel_root == old_root  # the tunnel identity is still the old one's
    root_thumb = thumbprint(node.root)
    assert tunnel_trust(console, device.credential) == [thumbprint(old_root), new_thumb, root_thumb]
    refused = call(console, "POST", SCR.format(group) + "/finish")
    assert refused.status_code == 409 and "cannot finish" in refused.json()["detail"]

    # Switched: the console presents a certificate of the new root at once; every group's
    # identities are renewed onto it by their own rotations; the old node is still served.
    switched = call(console, "POST", SCR.format(group) + "/switch")
    assert switched.status_code == 200, switched.text
    renewals = switched.json()["dependents"]["identity_rotations"]
    assert {(r["group_id"], r["kind"], r["phase"]) for r in renewals} >= {
        (group, "tunnel-identity", "switched"),
        (group, "console-identity", "switched"),
        ("global", "console-identity", "switched"),
    }
    after_tls = console_tls_leaf(console)
    new_root = next(r for r in both.secure_channel_roots if thumbprint(r) == new_thumb)
    assert issued_by(after_tls, new_root) and after_tls != before_tls
    renewed = setup_node(console, group, tmp_path / "node-c", "node-c")
    assert [thumbprint(r) for r in renewed.secure_channel_roots] == [
        new_thumb,
        thumbprint(old_root),
    ]
    assert renewed.secure_channel_root == new_root
    assert issued_by(renewed.tunnel_cert, new_root)
    assert issued_by(renewed.console_identity, new_root)
    assert _feed_call(node).status_code in (200, 204)  # the old identity, still accepted

    # Finish waits for the node still on the old identity; forced, it is refused.
    blocked = call(console, "POST", SCR.format(group) + "/finish")
    assert blocked.status_code == 409, blocked.text
    assert "tunnel-identity rotation" in blocked.json()["detail"]
    assert "node node-a still presents the old identity" in blocked.json()["detail"]
    status = call(console, "GET", f"/api/v1/groups/{group}/rotations").json()
    running = next(r for r in status if r["kind"] == "secure-channel-root")
    assert running["dependents"]["old_ca_certificates"] == {
        "console-identity": 1,
        "tunnel-identity": 1,
    }
    assert running["dependents"]["console_tls_old"] is False
    forced = call(console, "POST", SCR.format(group) + "/finish", params={"force": True})
    assert forced.status_code == 200 and forced.json()["forced"] is True, forced.text

    after = setup_node(console, group, tmp_path / "node-d", "node-d")
    assert [thumbprint(r) for r in after.secure_channel_roots] == [new_thumb]
    retired = _feed_call(node)
    assert retired.status_code == 401 and "retired by rotation" in retired.json()["detail"]
    assert _feed_call(after).status_code in (200, 204)
    certs = call(console, "GET", f"/api/v1/groups/{group}/certificates").json()
    by_thumb = {c["thumbprint"]: c for c in certs}
    assert by_thumb[node.tunnel_thumbprint]["revoked_at"] is not None
    status = call(console, "GET", f"/api/v1/groups/{group}/rotations").json()
    assert {r["phase"] for r in status} == {"finished"}
    audit = call(console, "GET", "/api/v1/audit", params={"group_id": group}).json()
    assert {"rotation.prepare", "rotation.switch", "rotation.finish.forced"} <= {
        e["action"] for e in audit
    }

    # The checkpoint the console signed at start (under the retired root) still holds,
    # beside one signed now by the renewed console identity.
    config = local.load_config(console.data_dir)
    db, pki = local.open_db(config)
    try:
        assert local.checkpointer(config, db, pki).checkpoint() is not None
    finally:
        db.dispose()
    verified = audit_verify(console)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "audit chain OK" in verified.stdout
    assert "REJECTED" not in verified.stderr


def test_a_console_renews_its_tls_onto_a_root_another_process_switched(
    console: RunningConsole,
) -> None:
    """A switch made by the CLI (another process): a console's renewer issues its TLS
    certificate again under the new root at its next tick and loads it into the live
    listener context; a handshake anchored on the Root alone verifies it."""
    state = ConsoleState.open(local.load_config(console.data_dir))
    try:
        ctx = state.tls_context()
        root = state.pki.certs[ca.ROOT]
        first = served(ctx, root)
        renewer = Renewer(state, 3600)
        assert renewer.renew_once() == []
        cli(console, "secure-channel-root", "global", "--overlap", "0s")
        assert renewer.renew_once() == []  # prepared: the old root still issues
        cli(console, "switch", "secure-channel-root", "global")
        assert "console TLS certificate" in renewer.renew_once()
        second = served(ctx, root)
        assert second != first
        assert issued_by(second, state.pki.certs[ca.SECURE_CHANNEL_ROOT])
        assert not issued_by(second, state.pki.others[ca.SECURE_CHANNEL_ROOT][1])
    finally:
        state.db.dispose()
    cli(console, "finish", "secure-channel-root", "global", "--force")


def cli(console: RunningConsole, *args: str) -> None:
    result = CliRunner().invoke(app, ["console", "rotate", *args, "-d", str(console.data_dir)])
    assert result.exit_code == 0, result.output
