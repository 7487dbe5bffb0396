"""Tests for the Root rotation of certgate.console.services.rotation on a real console
process (both storage backends; this module has its own console, since the rotation is
instance-wide).

prepare: a new Root, cross certificates both ways, the intermediates issued again under
it with the same subjects and keys; nodes set up now trust both Roots (the new one vouched
for by the cross certificate), and the console's TLS chain verifies for a client trusting
either Root alone. switch: new work chains to the new Root, old leaves stay valid, a node
of the old Root is still served. finish: refused while a node does not trust the new Root,
then forced (audited); the old Root and ``root-back`` are retired, ``root-cross`` (the old
Root vouching for the new one) is offered: the console chain ends at it, so a client
pinning the old Root alone still verifies and Access reaches the new Root from its
install-time pin; nodes set up now trust the new Root alone, and `audit verify` still
accepts the checkpoint signed before the rotation."""

from __future__ import annotations

import socket
import ssl
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate.access.trust import load_device_roots, parse_device_roots, save_device_roots
from certgate.console import local
from certgate.console.services import ca, rotation
from certgate.console.store.models import CACert, Certificate
from certgate.pki.authority import Names
from certgate.pki.keys import KeyAlgorithm, generate_key
from certgate.pki.profiles import DEVICE_CLIENT
from certgate.pki.thumbprint import thumbprint
from certgate.pki.token import TokenKey
from tests.console.conftest import local_superadmin_refused, switched_in_token, token_console
from tests.console.test_rotation import _feed_call
from tests.console.test_rotation_secure_channel import issued_by, tunnel_trust
from tests.softhsm import SoftHSM
from tests.support import CERTGATE, RunningConsole, make_csr
from tests.tunnel.conftest import COMPLIANT, create_group, enroll_device, setup_node

pytestmark = pytest.mark.integration  # a real console process

ROOT = "/api/v1/groups/{}/rotations/root"


def call(console: RunningConsole, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with console.client(console.admins["root"]) as client:
        return client.request(method, path, **kwargs)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def handshake(console: RunningConsole, anchor: x509.Certificate) -> list[x509.Certificate]:
    """The chain the console presents, over a handshake whose only trust anchor is
    ``anchor``; raises ``ssl.SSLError`` when it does not verify."""
    ctx = ssl.create_default_context(cadata=pem(anchor))
    with (
        socket.create_connection(("127.0.0.1", console.port), timeout=30) as sock,
        ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        # Python 3.11 has no public accessor; 3.13's SSLSocket.get_unverified_chain is this.
        chain = tls._sslobj.get_unverified_chain()  # type: ignore[union-attr]
    return [x509.load_der_x509_certificate(c.public_bytes(2)) for c in chain]  # DER


def revoked_at(session: Session, cert: x509.Certificate) -> datetime | None:
    row = session.get(Certificate, format(cert.serial_number, "x"))
    assert row is not None
    return row.revoked_at


def access_answer(console: RunningConsole) -> Any:
    """``GET /api/v1/access/device-roots`` as Access's admin (role ``access``) reads it."""
    creds = console.admins.get("access-svc") or console.make_admin("access-svc", "access", "global")
    with console.client(creds) as client:
        response = client.get("/api/v1/access/device-roots")
    assert response.status_code == 200, response.text
    return response.json()


def openssl_verifies(
    work: Path, leaf: x509.Certificate, chain: list[x509.Certificate], anchor: x509.Certificate
) -> bool:
    """``openssl verify`` (what curl, Python's ssl and the agent use) of ``leaf`` with the
    untrusted ``chain`` and ``anchor`` as the only trust anchor. (cryptography's own
    verifier builds no path through a self-issued cross certificate.)"""
    files = {"anchor.pem": [anchor], "untrusted.pem": chain, "leaf.pem": [leaf]}
    for name, certs in files.items():
        (work / name).write_text("".join(pem(c) for c in certs))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "any",
            "-CAfile",
            str(work / "anchor.pem"),
            "-untrusted",
            str(work / "untrusted.pem"),
            str(work / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


def test_only_a_top_level_superadmin_rotates_the_root(console: RunningConsole) -> None:
    local_superadmin_refused(console, ROOT, "root")


def test_root_rotation_prepare_switch_finish(console: RunningConsole, tmp_path: Path) -> None:
    group = create_group(console, COMPLIANT)
    node = setup_node(console, group, tmp_path / "node-a", "node-a")
    old_root = node.root
    old_device = enroll_device(console, group)

    started = call(console, "POST", ROOT.format(group), json={"overlap_s": 0})
    assert started.status_code == 201, started.text
    shown = started.json()
    assert (shown["kind"], shown["group_id"], shown["phase"]) == ("root", None, "prepared")
    assert shown["old"]["thumbprint"] == thumbprint(old_root) != shown["new"]["thumbprint"]
    with console.local() as (_, pki):
        new_root = pki.others[f"root@{shown['id']}"][1]
        cross = pki.others[f"root-cross@{shown['id']}"][1]
        back = pki.others[f"root-back@{shown['id']}"][1]
        reissued = {role: pki.others[f"{role}@{shown['id']}"][1] for role in ca.INTERMEDIATES}
        current = {role: pki.certs[role] for role in ca.INTERMEDIATES}
    assert thumbprint(new_root) == shown["new"]["thumbprint"]
    # Cross certificates both ways; the intermediates keep their subjects and keys.
    assert (cross.subject, cross.public_key()) == (new_root.subject, new_root.public_key())
    assert issued_by(cross, old_root) and issued_by(back, new_root)
    assert (back.subject, back.public_key()) == (old_root.subject, old_root.public_key())
    for role, cert in reissued.items():
        assert cert.subject == current[role].subject
        assert cert.public_key() == current[role].public_key()
        assert issued_by(cert, new_root)

    # Prepared: a node set up now trusts both Roots (the current one first) and sends the
    # cross certificate of its Root; the console's chain verifies for either Root alone.
    both = setup_node(console, group, tmp_path / "node-b", "node-b")
    assert [thumbprint(r) for r in both.roots] == [thumbprint(old_root), thumbprint(new_root)]
    assert both.tunnel_chain[1] == back
    assert handshake(console, old_root)[-1] == back
    handshake(console, new_root)
    trusted = tunnel_trust(console, old_device.credential)
    assert {thumbprint(old_root), thumbprint(new_root)} <= set(trusted)
    refused = call(console, "POST", ROOT.format(group) + "/finish")
    assert refused.status_code == 409 and "cannot finish" in refused.json()["detail"]
    # Access reads the Roots and cross certificates beside the Device Roots, and takes the
    # new Root because the Root it pinned at install vouches for it.
    access = parse_device_roots(access_answer(console), old_root)
    assert access.anchors == (old_root, new_root)

    # Switched: new work chains to the new Root (and, by the cross certificate, to the old
    # one); an old leaf verifies under either; the node of the old Root is still served.
    switched = call(console, "POST", ROOT.format(group) + "/switch")
    assert switched.status_code == 200, switched.text
    assert handshake(console, old_root)[-1] == cross
    assert handshake(console, new_root)[-1] == cross
    new_device = enroll_device(console, group)
    with console.client(api_key=new_device.credential) as client:
        response = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    assert response.status_code == 201, response.text
    profile = response.json()
    leaf = x509.load_pem_x509_certificate(profile["certificate"].encode())
    chain = [x509.load_pem_x509_certificate(c.encode()) for c in profile["chain"]]
    assert chain == [reissued[ca.DEVICE_ROOT], cross]
    for anchor in (old_root, new_root):
        assert openssl_verifies(tmp_path, leaf, chain, anchor)
    renewed = setup_node(console, group, tmp_path / "node-c", "node-c")
    assert [thumbprint(r) for r in renewed.roots] == [thumbprint(new_root), thumbprint(old_root)]
    assert renewed.secure_channel_root == reissued[ca.SECURE_CHANNEL_ROOT]
    assert renewed.tunnel_chain[1] == cross
    assert _feed_call(node).status_code in (200, 204)  # its identity: the same key
    # Another instance CA rotation waits for this one.
    busy = call(console, "POST", f"/api/v1/groups/{group}/rotations/device-root")
    assert busy.status_code == 409 and "finish the root rotation" in busy.json()["detail"]

    # Finish waits for the nodes that do not report the new Root; forced, it is audited.
    blocked = call(console, "POST", ROOT.format(group) + "/finish")
    assert blocked.status_code == 409, blocked.text
    assert "node node-a does not trust the new Root yet" in blocked.json()["detail"]
    status = call(console, "GET", f"/api/v1/groups/{group}/rotations").json()
    running = next(r for r in status if r["kind"] == "root")
    assert {n["name"]: n["has_new"] for n in running["nodes"]}["node-a"] is False
    forced = call(console, "POST", ROOT.format(group) + "/finish", params={"force": True})
    assert forced.status_code == 200 and forced.json()["forced"] is True, forced.text
    audit = call(console, "GET", "/api/v1/audit", params={"group_id": group}).json()
    assert {"rotation.prepare", "rotation.switch", "rotation.finish.forced"} <= {
        e["action"] for e in audit
    }

    # The chain ends at root-cross, still offered: a client of the old Root alone (a node
    # down for the whole rotation, an Access installed before it) verifies and climbs.
    assert handshake(console, new_root)[-1] == cross
    assert handshake(console, old_root)[-1] == cross
    after_finish = parse_device_roots(access_answer(console), access.anchors, access.proofs)
    assert after_finish.anchors == (new_root,)
    assert parse_device_roots(access_answer(console), old_root).anchors == (new_root,)
    saved = tmp_path / "device-roots.json"  # an Access restart, from its install-time pin
    save_device_roots(saved, after_finish)
    reloaded = load_device_roots(saved, old_root)
    assert reloaded is not None and reloaded.anchors == (new_root,)
    with console.local() as (session, pki):
        assert pki.root_crosses() == [cross] and pki.roots() == [new_root]
        statuses = {label: status for label, (status, _, _) in pki.others.items()}
        revoked = {
            label: revoked_at(session, cert)
            for label, cert in ((ca.ROOT, old_root), ("cross", cross), ("back", back))
        }
    assert statuses[ca.ROOT] == ca.RETIRED
    assert statuses[f"root-cross@{shown['id']}"] == ca.OFFERED
    assert statuses[f"root-back@{shown['id']}"] == ca.RETIRED
    assert revoked["cross"] is None and None not in (revoked[ca.ROOT], revoked["back"])
    # Admins re-pin: this test's clients take the new Root first (``root_of``).
    console.chain_path.write_text(pem(new_root) + console.chain_path.read_text())
    after = setup_node(console, group, tmp_path / "node-d", "node-d")
    assert [thumbprint(r) for r in after.roots] == [thumbprint(new_root)]
    assert after.tunnel_chain[1] == cross  # the console's rule: chains end at the offered cross
    # Every leaf issued before the rotation is still valid under the new Root.
    old_leaf = node.tunnel_cert
    assert openssl_verifies(tmp_path, old_leaf, [reissued[ca.SECURE_CHANNEL_ROOT]], new_root)
    assert not openssl_verifies(tmp_path, old_leaf, [reissued[ca.SECURE_CHANNEL_ROOT]], old_root)

    # The checkpoint signed at start (under the old Root) still holds.
    config = local.load_config(console.data_dir)
    db, pki = local.open_db(config)
    try:
        assert local.checkpointer(config, db, pki).checkpoint() is not None
    finally:
        db.dispose()
    verified = subprocess.run(
        [*CERTGATE, "console", "audit", "verify", "-d", str(console.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "REJECTED" not in verified.stderr


def test_with_ca_keys_in_a_pkcs11_token_the_new_root_key_is_generated_there(
    hsm: SoftHSM, tmp_path: Path
) -> None:
    """The new Root's key is made in the token (the database holds a reference); the
    cross certificates and the intermediates issued again are signed there, and the
    intermediates keep their token keys (one key row, no copy)."""
    config, db, pki = token_console(hsm, tmp_path, "root-rotation")
    try:
        with db.transaction() as session:
            started = switched_in_token(session, pki, "root", ca.ROOT)
            rows = {r.label: r.key_label for r in session.execute(select(CACert)).scalars()}
            assert rows[ca.version_label(ca.DEVICE_ROOT, started.id)] == rows[ca.DEVICE_ROOT]
            leaf, _ = pki.issue(
                session,
                ca.DEVICE_ROOT,
                DEVICE_CLIENT,
                Names("device"),
                generate_key().public_key(),
                ca.Record("device"),
            )
        _, reopened = local.open_db(config)  # a console started afterwards
        assert isinstance(reopened.issuer(ca.ROOT).key, TokenKey)
        assert isinstance(reopened.issuer(ca.DEVICE_ROOT).key, TokenKey)
        assert issued_by(reopened.certs[ca.DEVICE_ROOT], reopened.certs[ca.ROOT])
        assert issued_by(leaf, reopened.certs[ca.DEVICE_ROOT])
        cross = reopened.others[ca.version_label(ca.ROOT_CROSS, started.id)][1]
        assert issued_by(cross, reopened.others[ca.ROOT][1])
    finally:
        db.dispose()


def test_finish_offers_root_cross_until_the_next_rotation_finishes(tmp_path: Path) -> None:
    """Served after a finish: the cross certificate the old Root signed for the new one
    (status offered, not revoked), never one vouching for a retired Root. During the next
    rotation that rotation's two cross certificates alone are served (before its switch a
    party trusting only its new Root verifies the old intermediates through its
    ``root-back``); its finish retires the one offered before and offers its own."""
    data_dir = tmp_path / "console"
    local.init(data_dir, KeyAlgorithm.EC_P256, "https://127.0.0.1:8443", "127.0.0.1", 8443, None)
    db, pki = local.open_db(local.load_config(data_dir))

    try:
        with db.transaction() as session:
            first = rotation.prepare(session, pki, local.TOP_GROUP, "root", "test").id
            rotation.switch(session, pki, local.TOP_GROUP, "root")
            rotation.finish(session, pki, local.TOP_GROUP, "root", force=True)
        cross = pki.others[ca.version_label(ca.ROOT_CROSS, first)][1]
        assert pki.root_crosses() == [cross]
        assert pki.chain(ca.SECURE_CHANNEL_ROOT)[1] == cross
        with db.transaction() as session:
            second = rotation.prepare(session, pki, local.TOP_GROUP, "root", "test", timedelta(0))
        back = pki.others[ca.version_label(ca.ROOT_BACK, second.id)][1]
        later = pki.others[ca.version_label(ca.ROOT_CROSS, second.id)][1]
        assert sorted(pki.root_crosses(), key=thumbprint) == sorted([back, later], key=thumbprint)
        assert pki.chain(ca.SECURE_CHANNEL_ROOT)[1] == back  # not the offered one
        with db.transaction() as session:
            rotation.switch(session, pki, local.TOP_GROUP, "root")
            rotation.finish(session, pki, local.TOP_GROUP, "root", force=True)
            assert revoked_at(session, cross) is not None  # it vouches for a retired Root
            assert revoked_at(session, later) is None
        assert pki.root_crosses() == [later]
        statuses = {label: status for label, (status, _, _) in pki.others.items()}
        assert statuses[ca.version_label(ca.ROOT_CROSS, first)] == ca.RETIRED
        assert statuses[ca.version_label(ca.ROOT_CROSS, second.id)] == ca.OFFERED
    finally:
        db.dispose()
