"""The console API against a real console process over real mTLS.

Covers every bad input of the admin API (each a precise 4xx with an audit entry, never a
500), the role x endpoint matrix, tunnel setup, installer tokens, device enrollment, the
Proxy-mode and Per-App Tunnel issuance paths, and the signed long-poll feed.
"""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from certgate import jws
from certgate.console.services import audit, ca, groups
from certgate.console.store.models import (
    AuditEntry,
    Certificate,
    FeedEvent,
    OneTimeToken,
    ProfileDelivery,
)
from certgate.pki import identity
from certgate.pki.authority import Authority, Names
from certgate.pki.keys import generate_key
from certgate.pki.profiles import ADMIN_CLIENT
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.snapshot import decode_page
from certgate.tunnel.table import DeviceTable
from tests.support import AdminCreds, RunningConsole, make_csr

pytestmark = pytest.mark.integration

ROLES = ("superadmin", "tunnel-setup", "device-admin", "read-only")


@pytest.fixture(scope="module")
def env(console: RunningConsole) -> RunningConsole:
    root = console.admins["root"]
    with console.client(root) as client:
        for gid in ("acme", "other"):
            assert (
                client.post("/api/v1/groups", json={"id": gid, "parent_id": "global"}).status_code
                == 201
            )
        assert (
            client.post("/api/v1/groups", json={"id": "acme-eu", "parent_id": "acme"}).status_code
            == 201
        )
    for role in ROLES:
        console.make_admin(f"acme-{role}", role, "acme")
    console.make_admin("other-tunnel-setup", "tunnel-setup", "other")
    return console


def last_denial(console: RunningConsole) -> AuditEntry:
    with console.local() as (session, _):
        entry = (
            session.execute(
                select(AuditEntry)
                .where(AuditEntry.outcome == "denied")
                .order_by(AuditEntry.id.desc())
            )
            .scalars()
            .first()
        )
        assert entry is not None
        return entry


def assert_denied(
    console: RunningConsole, response: httpx.Response, status: int, phrase: str
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert phrase in body["detail"], body
    entry = last_denial(console)
    assert entry.detail["status"] == status
    assert phrase in entry.detail["reason"]


SETUP = "/api/v1/groups/acme/tunnel/setup"


def test_missing_api_key_is_401_and_audited(env: RunningConsole) -> None:
    with env.client(env.admins["acme-tunnel-setup"], send_key=False) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, "missing API key")


@pytest.mark.parametrize(
    ("api_key", "phrase"),
    [
        ("cgk_0123456789abcdef_wrongsecret", "unknown or wrong API key"),
        ("not-a-key", "malformed cgk credential"),
        ("cgk_short_x", "malformed cgk credential"),
    ],
)
def test_wrong_api_key_is_401(env: RunningConsole, api_key: str, phrase: str) -> None:
    creds = env.admins["acme-tunnel-setup"]
    with env.client(creds, api_key=api_key) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, phrase)


def test_right_key_with_wrong_secret_is_401(env: RunningConsole) -> None:
    creds = env.admins["acme-tunnel-setup"]
    forged = creds.api_key[:-4] + ("AAAA" if not creds.api_key.endswith("AAAA") else "BBBB")
    with env.client(creds, api_key=forged) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, "unknown or wrong API key")


def test_key_without_cert_is_401(env: RunningConsole) -> None:
    with env.client(env.admins["acme-tunnel-setup"], send_cert=False) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, "missing admin client certificate")


def test_key_and_cert_of_different_admins_is_401(env: RunningConsole) -> None:
    setup, reader = env.admins["acme-tunnel-setup"], env.admins["acme-read-only"]
    mixed = AdminCreds("mixed", setup.id, reader.api_key, setup.cert_path, setup.key_path)
    with env.client(mixed) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, "belong to different admins")


def test_revoked_api_key_is_401(env: RunningConsole) -> None:
    creds = env.make_admin("short-lived", "tunnel-setup", "acme")
    with env.client(creds) as client:
        key_id = creds.api_key.split("_")[1]
        assert client.delete(f"/api/v1/api-keys/{key_id}").status_code == 204
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, "API key revoked")


def test_revoked_admin_cert_is_401(env: RunningConsole) -> None:
    creds = env.make_admin("rotated", "tunnel-setup", "acme")
    with env.local() as (session, pki):
        from certgate.console.services import admins
        from certgate.console.store.models import Admin

        admin = session.get(Admin, creds.id)
        assert admin is not None
        admins.issue_admin_cert(session, pki, admin)  # supersedes the one we hold
    with env.client(creds) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, "revoked (superseded)")


def test_expired_admin_cert_is_401_not_a_tls_failure(env: RunningConsole) -> None:
    creds = env.make_admin("expired-admin", "tunnel-setup", "acme")
    past = datetime.now(UTC) - timedelta(days=400)
    key = generate_key()
    with env.local() as (session, pki):
        old = Authority(clock=lambda: past).issue(
            pki.issuer(ca.ADMIN_CA),
            ADMIN_CLIENT,
            Names("expired", identity.admin(creds.id)),
            key.public_key(),
        )
        ca.record_certificate(session, old, ca.ADMIN_CA, ca.Record("admin", admin_id=creds.id))
    expired = env.write_creds("expired-admin-old", creds.id, creds.api_key, ca.pem(old), key)
    with env.client(expired) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 401, "expired")


def test_cert_from_another_ca_is_refused_at_handshake(env: RunningConsole) -> None:
    """A client cert not chaining to the instance root never reaches the app."""
    rogue_key = generate_key()
    rogue = Authority().create_root(rogue_key, Names("rogue"))
    creds = env.write_creds("rogue", "0" * 32, env.admins["root"].api_key, ca.pem(rogue), rogue_key)
    with env.client(creds) as client, pytest.raises(httpx.TransportError):
        client.post(SETUP, json={"node_name": "n1"})


def test_admin_of_another_group_gets_404(env: RunningConsole) -> None:
    with env.client(env.admins["other-tunnel-setup"]) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
        assert_denied(env, response, 404, "group 'acme' not found")
        # ...and cannot even learn that acme exists, or read its children
        assert client.get("/api/v1/groups/acme").status_code == 404
        assert client.get("/api/v1/groups/acme-eu").status_code == 404
        listed = {g["id"] for g in client.get("/api/v1/groups").json()}
    assert listed == {"other"}


def test_wrong_role_gets_403(env: RunningConsole) -> None:
    with env.client(env.admins["acme-read-only"]) as client:
        response = client.post(SETUP, json={"node_name": "n1"})
    assert_denied(env, response, 403, "lacks tunnel:setup")


def test_oversized_body_is_413(env: RunningConsole) -> None:
    with env.client(env.admins["acme-tunnel-setup"]) as client:
        response = client.post(
            SETUP,
            content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 413
    assert "exceeds" in response.json()["detail"]


def test_malformed_json_and_unknown_fields_are_422(env: RunningConsole) -> None:
    with env.client(env.admins["acme-tunnel-setup"]) as client:
        bad_json = client.post(
            SETUP, content=b"{nope", headers={"content-type": "application/json"}
        )
        extra = client.post(SETUP, json={"node_name": "n1", "is_admin": True})
    assert bad_json.status_code == 422
    assert extra.status_code == 422 and "is_admin" in extra.json()["detail"]
    assert last_denial(env).detail["code"] == "invalid_request"


def _status(client: httpx.Client, endpoint: str, device_uid: str) -> int:
    calls: dict[str, Any] = {
        "tunnel.setup": lambda: client.post(SETUP, json={"node_name": "matrix"}),
        "tunnel.installer": lambda: client.get("/api/v1/groups/acme/tunnel/installer"),
        "tunnel.nodes": lambda: client.get("/api/v1/groups/acme/tunnel/nodes"),
        "devices.list": lambda: client.get("/api/v1/groups/acme/devices"),
        "devices.compliance": lambda: client.put(
            f"/api/v1/devices/{device_uid}/compliance", json={"status": "compliant"}
        ),
        "enrollment.user": lambda: client.post(
            "/api/v1/groups/acme/enrollment-users",
            json={"username": f"u{id(client)}", "password": "password123"},
        ),
        "audit.read": lambda: client.get("/api/v1/audit", params={"group_id": "acme"}),
        "groups.create_child": lambda: client.post(
            "/api/v1/groups", json={"id": f"c{id(client) % 10**9}", "parent_id": "acme"}
        ),
        "admins.create": lambda: client.post(
            "/api/v1/admins",
            json={"username": f"a{id(client)}", "role": "read-only", "group_id": "acme"},
        ),
        "groups.settings": lambda: client.patch(
            "/api/v1/groups/acme/settings", json={"feed": {"long_poll_s": 20}}
        ),
    }
    return int(calls[endpoint]().status_code)


OK = {200, 201, 204}
MATRIX = {
    #                      superadmin tunnel-setup device-admin read-only
    "tunnel.setup": (True, True, False, False),
    "tunnel.installer": (True, True, False, False),
    "tunnel.nodes": (True, True, False, True),
    "devices.list": (True, False, True, True),
    "devices.compliance": (True, False, True, False),
    "enrollment.user": (True, False, True, False),
    "audit.read": (True, False, False, True),
    "groups.create_child": (True, False, False, False),
    "admins.create": (True, False, False, False),
    "groups.settings": (True, False, False, False),
}


@pytest.mark.parametrize("endpoint", sorted(MATRIX))
@pytest.mark.parametrize("role", ROLES)
def test_role_endpoint_matrix(
    env: RunningConsole, device: dict[str, Any], role: str, endpoint: str
) -> None:
    allowed = MATRIX[endpoint][ROLES.index(role)]
    with env.client(env.admins[f"acme-{role}"]) as client:
        status = _status(client, endpoint, device["device_uid"])
    if allowed:
        assert status in OK, (role, endpoint, status)
    else:
        assert status == 403, (role, endpoint, status)


def test_a_device_of_another_group_answers_like_an_unknown_device(
    env: RunningConsole, device: dict[str, Any]
) -> None:
    """Same status and body as for a device that does not exist: the answer neither
    confirms the device nor names its group."""
    uid, unknown = device["device_uid"], "0" * 32
    with env.client(env.admins["other-tunnel-setup"]) as client:
        for path in ("/api/v1/devices/{}", "/api/v1/devices/{}/compliance"):
            method = "GET" if path.endswith("}") else "PUT"
            body = {"status": "compliant"} if method == "PUT" else None
            theirs = client.request(method, path.format(uid), json=body)
            absent = client.request(method, path.format(unknown), json=body)
            assert theirs.status_code == absent.status_code == 404, theirs.text
            assert theirs.json() == {**absent.json(), "detail": f"device {uid!r} not found"}
            assert "acme" not in theirs.text


def test_a_certificate_of_another_group_answers_like_an_unknown_one(
    env: RunningConsole, device: dict[str, Any]
) -> None:
    """Revoking a certificate of a group the admin cannot read: the answer for a serial that
    does not exist, neither confirming the certificate nor naming its group."""
    with device_client(env, device) as dev:
        issued = dev.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    serial = format(
        x509.load_pem_x509_certificate(issued.json()["certificate"].encode()).serial_number, "x"
    )
    path, body = "/api/v1/certificates/{}/revoke", {"reason": "keyCompromise"}
    with env.client(env.admins["other-tunnel-setup"]) as client:
        theirs = client.post(path.format(serial), json=body)
        absent = client.post(path.format("1" + serial), json=body)
    assert theirs.status_code == absent.status_code == 404, theirs.text
    assert theirs.json() == {**absent.json(), "detail": f"device certificate {serial} not found"}
    assert "acme" not in theirs.text


@pytest.fixture(scope="module")
def enrollment_user(env: RunningConsole) -> tuple[str, str]:
    with env.client(env.admins["acme-device-admin"]) as client:
        response = client.post(
            "/api/v1/groups/acme/enrollment-users",
            json={"username": "alice", "password": "correct horse"},
        )
    assert response.status_code == 201, response.text
    return "alice", "correct horse"


@pytest.fixture(scope="module")
def device(env: RunningConsole, enrollment_user: tuple[str, str]) -> dict[str, Any]:
    user, password = enrollment_user
    with env.client() as client:
        response = client.post(
            "/api/v1/enroll",
            json={"username": user, "password": password, "platform": "android", "name": "pixel"},
        )
    assert response.status_code == 201, response.text
    enrolled: dict[str, Any] = response.json()
    return enrolled


def device_client(env: RunningConsole, device: dict[str, Any]) -> httpx.Client:
    return env.client(api_key=device["credential"])


def test_enroll_with_wrong_password_is_401(
    env: RunningConsole, enrollment_user: tuple[str, str]
) -> None:
    with env.client() as client:
        response = client.post(
            "/api/v1/enroll",
            json={
                "username": enrollment_user[0],
                "password": "wrong password",
                "platform": "android",
            },
        )
    assert_denied(env, response, 401, "wrong enrollment credentials")


def test_enrollment_token_is_single_use(
    env: RunningConsole, enrollment_user: tuple[str, str]
) -> None:
    with env.client(env.admins["acme-device-admin"]) as admin:
        token = admin.post(
            "/api/v1/groups/acme/enrollment-tokens", json={"owner": enrollment_user[0]}
        ).json()["token"]
    with env.client() as client:
        first = client.post("/api/v1/enroll", json={"token": token, "platform": "ios"})
        second = client.post("/api/v1/enroll", json={"token": token, "platform": "ios"})
    assert first.status_code == 201 and first.json()["group_id"] == "acme"
    assert_denied(env, second, 401, "enroll token already used")


def test_app_cert_needs_enrollment_credentials(
    env: RunningConsole, device: dict[str, Any], enrollment_user: tuple[str, str]
) -> None:
    csr, _ = make_csr()
    url = "/api/v1/device/apps/com.example.browser/certificate"
    with device_client(env, device) as client:
        denied = client.post(
            url, json={"username": enrollment_user[0], "password": "nope-nope", "csr": csr.decode()}
        )
        issued = client.post(
            url,
            json={
                "username": enrollment_user[0],
                "password": enrollment_user[1],
                "csr": csr.decode(),
            },
        )
    assert denied.status_code == 401
    assert issued.status_code == 201, issued.text
    cert = x509.load_pem_x509_certificate(issued.json()["certificate"].encode())
    ident = identity.identity_of(cert)
    assert (ident.kind, ident.device_uid, ident.group_id, ident.bundle_id) == (
        identity.IdentityKind.APP,
        device["device_uid"],
        "acme",
        "com.example.browser",
    )
    assert issued.json()["thumbprint"] == thumbprint(cert)


def test_reissue_supersedes_only_the_cert_of_its_kind(
    env: RunningConsole, enrollment_user: tuple[str, str]
) -> None:
    user, password = enrollment_user
    with env.client() as client:
        enrolled = client.post(
            "/api/v1/enroll", json={"username": user, "password": password, "platform": "ios"}
        ).json()

    def issue(client: httpx.Client, path: str, **extra: str) -> str:
        body = {"csr": make_csr()[0].decode(), **extra}
        response = client.post(path, json=body)
        assert response.status_code == 201, response.text
        thumb: str = response.json()["thumbprint"]
        return thumb

    app = "/api/v1/device/apps/{}/certificate"
    with device_client(env, enrolled) as client:
        profile = issue(client, "/api/v1/device/profile")
        first_a = issue(client, app.format("com.example.a"), username=user, password=password)
        only_b = issue(client, app.format("com.example.b"), username=user, password=password)
        second_a = issue(client, app.format("com.example.a"), username=user, password=password)
        newer_profile = issue(client, "/api/v1/device/profile")
    with env.client(env.admins["acme-device-admin"]) as admin:
        certs = {c["thumbprint"]: c for c in admin.get("/api/v1/groups/acme/certificates").json()}
    issued = (profile, first_a, only_b, second_a, newer_profile)
    revoked = {tp for tp in issued if certs[tp]["revoked_at"] is not None}
    assert revoked == {profile, first_a}
    assert {certs[tp]["revocation_reason"] for tp in revoked} == {"superseded"}


@pytest.mark.parametrize(
    ("csr_kind", "phrase"),
    [
        ("garbage", "not a valid PEM PKCS#10"),
        ("ca_true", "requests CA:TRUE"),
    ],
)
def test_bad_csr_is_422(
    env: RunningConsole, device: dict[str, Any], csr_kind: str, phrase: str
) -> None:
    csr = (
        make_csr(ca_true=True)[0].decode()
        if csr_kind == "ca_true"
        else ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    )
    with device_client(env, device) as client:
        response = client.post("/api/v1/device/profile", json={"csr": csr})
    assert_denied(env, response, 422, phrase)
    denial = last_denial(env)  # the device was authenticated: it is named in the entry
    assert (denial.actor, denial.group_id) == (f"device:{device['device_uid']}", "acme")


@pytest.mark.parametrize(
    ("credential", "phrase"),
    [
        ("cgd_0123456789abcdef_unknownsecret", "unknown device credential"),
        ("not-a-credential", "malformed cgd credential"),
        (None, "missing device credential"),
    ],
)
def test_profile_needs_a_known_device_credential(
    env: RunningConsole, credential: str | None, phrase: str
) -> None:
    with env.client(api_key=credential) as client:
        response = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    assert_denied(env, response, 401, phrase)
    assert last_denial(env).actor.startswith("anonymous@")


def test_profile_redelivery_revokes_the_old_cert(
    env: RunningConsole, device: dict[str, Any]
) -> None:
    with device_client(env, device) as client:
        first = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
        second = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    assert first.status_code == second.status_code == 201
    one, two = first.json(), second.json()
    assert two["version"] == one["version"] + 1
    assert one["thumbprint"] != two["thumbprint"]
    assert two["tunnel"]["per_app_port"] == 8443 and "rules" in two
    with env.client(env.admins["acme-device-admin"]) as admin:
        certs = {c["thumbprint"]: c for c in admin.get("/api/v1/groups/acme/certificates").json()}
    assert certs[one["thumbprint"]]["revocation_reason"] == "superseded"
    assert certs[two["thumbprint"]]["revoked_at"] is None


BURST_DEVICES, BURST_CLIENTS_PER_DEVICE, BURST_ROUNDS = 4, 2, 6
BAD_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


def burst_devices(env: RunningConsole, group: str) -> dict[str, str]:
    """{credential: device uid} of devices enrolled in a new group of their own."""
    user = f"{group}-user"
    with env.client(env.admins["root"]) as admin:
        created = admin.post("/api/v1/groups", json={"id": group, "parent_id": "global"})
        added = admin.post(
            f"/api/v1/groups/{group}/enrollment-users",
            json={"username": user, "password": "burst password"},
        )
    assert created.status_code == added.status_code == 201, created.text + added.text
    with env.client() as client:
        enrolled = [
            client.post(
                "/api/v1/enroll",
                json={"username": user, "password": "burst password", "platform": "linux"},
            ).json()
            for _ in range(BURST_DEVICES)
        ]
    return {e["credential"]: e["device_uid"] for e in enrolled}


def deliver_burst(
    env: RunningConsole, credentials: Iterable[str], bad_every: int = 0
) -> list[tuple[str, httpx.Response]]:
    """(credential, response) of profile deliveries from several clients per device at once
    (same device included); with ``bad_every``, every so many requests of a client sends
    a CSR that is no CSR."""
    responses: list[tuple[str, httpx.Response]] = []
    lock = threading.Lock()

    def client(credential: str) -> None:
        with env.client(api_key=credential) as device:
            for n in range(BURST_ROUNDS):
                bad = bad_every and n % bad_every == 0
                csr = BAD_CSR if bad else make_csr()[0].decode()
                response = device.post("/api/v1/device/profile", json={"csr": csr})
                with lock:
                    responses.append((credential, response))

    threads = [
        threading.Thread(target=client, args=(c,))
        for c in credentials
        for _ in range(BURST_CLIENTS_PER_DEVICE)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_concurrent_deliveries_are_each_recorded_once(env: RunningConsole) -> None:
    responses = deliver_burst(env, burst_devices(env, "burst"))
    assert [r.status_code for _, r in responses] == [201] * len(responses)
    assert_burst(env, "burst", [r.json() for _, r in responses])


def test_failures_in_a_burst_are_their_own(env: RunningConsole) -> None:
    """Deliveries that fail among concurrent ones that succeed: each failure is answered
    and audited on its own; the others are recorded as if none had failed."""
    uids = burst_devices(env, "burst-bad")
    responses = deliver_burst(env, uids, bad_every=3)
    failed = [(c, r) for c, r in responses if r.status_code != 201]
    assert {r.status_code for _, r in failed} == {422}
    assert len(failed) == len(responses) // 3
    assert all("not a valid PEM PKCS#10" in r.json()["detail"] for _, r in failed)
    assert_burst(env, "burst-bad", [r.json() for _, r in responses if r.status_code == 201])
    with env.local() as (session, _):
        denied = session.execute(
            select(AuditEntry.actor).where(
                AuditEntry.group_id == "burst-bad", AuditEntry.outcome == "denied"
            )
        ).scalars()
        assert sorted(denied) == sorted(f"device:{uids[c]}" for c, _ in failed)


def assert_burst(env: RunningConsole, group: str, bodies: list[dict[str, Any]]) -> None:
    """Each device's versions are 1..n, every serial is new, and the store agrees."""
    versions: dict[str, list[int]] = {}
    for body in bodies:
        versions.setdefault(body["device_uid"], []).append(body["version"])
    assert len(versions) == BURST_DEVICES
    assert all(sorted(v) == list(range(1, len(v) + 1)) for v in versions.values())
    serials = {
        format(x509.load_pem_x509_certificate(b["certificate"].encode()).serial_number, "x")
        for b in bodies
    }
    assert len(serials) == len(bodies)
    latest = {
        b["device_uid"]: b["thumbprint"]
        for b in bodies
        if b["version"] == len(versions[b["device_uid"]])
    }
    with env.local() as (session, _):
        assert_burst_stored(session, group, bodies, latest)


def _all(session: Session, statement: Any) -> list[Any]:
    return list(session.execute(statement).scalars())


def assert_burst_stored(
    session: Session, group: str, bodies: list[dict[str, Any]], latest: dict[str, str]
) -> None:
    device_certs = (Certificate.group_id == group, Certificate.kind == "device")
    certs = _all(session, select(Certificate).where(*device_certs))
    assert {c.thumbprint for c in certs} == {b["thumbprint"] for b in bodies}
    active = {c.device_uid: c.thumbprint for c in certs if c.revoked_at is None}
    assert active == latest  # one valid cert per device: the newest profile's
    assert {c.revocation_reason for c in certs if c.revoked_at is not None} == {"superseded"}
    in_group = ProfileDelivery.device_uid.in_(latest)
    deliveries = _all(session, select(ProfileDelivery.cert_serial).where(in_group))
    assert sorted(deliveries) == sorted(c.serial for c in certs)
    feed = select(FeedEvent.seq).where(FeedEvent.group_id == group).order_by(FeedEvent.seq)
    assert _all(session, feed) == list(range(1, 2 * len(bodies) - len(latest) + 1))  # gapless
    issued = select(AuditEntry.detail).where(
        AuditEntry.group_id == group, AuditEntry.action == "cert.issue.device"
    )
    thumbprints = sorted(d["thumbprint"] for d in _all(session, issued))
    assert thumbprints == sorted(b["thumbprint"] for b in bodies)
    assert audit.verify_chain(session).ok


def test_tunnel_setup_gives_every_node_the_same_pair(env: RunningConsole) -> None:
    with env.client(env.admins["acme-tunnel-setup"]) as client:
        one = client.post(SETUP, json={"node_name": "node-1"}).json()
        two = client.post(SETUP, json={"node_name": "node-2"}).json()
        nodes = {n["name"] for n in client.get("/api/v1/groups/acme/tunnel/nodes").json()}
    assert one["tunnel_identity"] == two["tunnel_identity"]
    assert one["tunnel_key"] == two["tunnel_key"]
    assert {"node-1", "node-2"} <= nodes
    console_cert = x509.load_pem_x509_certificate(one["console_identity"].encode())
    trust = jws.verify(one["trust"], console_cert, jws.TYP_TRUST, "acme")
    assert trust["console_url"] == env.url
    assert trust["tunnel_identity_thumbprint"] == thumbprint(
        x509.load_pem_x509_certificate(one["tunnel_identity"].encode())
    )


def test_each_group_has_its_own_identity_pair(env: RunningConsole) -> None:
    with env.local() as (session, pki):
        acme = groups.identity_pair(session, pki, "acme")
        other = groups.identity_pair(session, pki, "other")
    assert thumbprint(acme[0]) != thumbprint(other[0])
    assert thumbprint(acme[2]) != thumbprint(other[2])


def _installer(env: RunningConsole) -> dict[str, bytes]:
    with env.client(env.admins["acme-tunnel-setup"]) as client:
        response = client.get("/api/v1/groups/acme/tunnel/installer")
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_installer_is_signed_and_its_token_single_use(env: RunningConsole) -> None:
    files = _installer(env)
    console_cert = x509.load_pem_x509_certificate(files["console-identity.pem"])
    manifest = jws.verify(files["manifest.jws"].decode(), console_cert, jws.TYP_INSTALLER, "acme")
    import hashlib

    for name, digest in manifest["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == digest
    token = files["install-token"].decode()
    with env.client() as client:
        first = client.post("/api/v1/tunnel/install", json={"token": token, "node_name": "i1"})
        second = client.post("/api/v1/tunnel/install", json={"token": token, "node_name": "i2"})
    assert first.status_code == 200 and "tunnel_key" in first.json()
    assert_denied(env, second, 401, "install token already used")


def test_installer_token_expires(env: RunningConsole) -> None:
    token = _installer(env)["install-token"].decode()
    with env.local() as (session, _):
        row = session.get(OneTimeToken, token.split("_")[1])
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    with env.client() as client:
        response = client.post("/api/v1/tunnel/install", json={"token": token, "node_name": "x"})
    assert_denied(env, response, 401, "install token expired")


def _tunnel_client(env: RunningConsole, group: str) -> httpx.Client:
    with env.client(env.admins["root"]) as client:
        bundle = client.post(
            f"/api/v1/groups/{group}/tunnel/setup", json={"node_name": "feed-test"}
        ).json()
    cert_path, key_path = env.work / f"tunnel-{group}.pem", env.work / f"tunnel-{group}.key"
    cert_path.write_text(bundle["tunnel_identity"])
    key_path.write_text(bundle["tunnel_key"])
    (env.work / f"console-{group}.pem").write_text(bundle["console_identity"])
    return httpx.Client(base_url=env.url, verify=env.ssl_context(cert_path, key_path), timeout=60)


def test_feed_requires_the_tunnel_identity(env: RunningConsole) -> None:
    with env.client(env.admins["root"]) as client:
        response = client.get("/api/v1/tunnel/feed/snapshot")
    assert_denied(env, response, 401, "not a tunnel identity")


def test_long_poll_returns_a_signed_change(env: RunningConsole, device: dict[str, Any]) -> None:
    with device_client(env, device) as dev:  # a device without certificates has no entries
        dev.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    with _tunnel_client(env, "acme") as tunnel:
        _check_long_poll(env, device, tunnel)


def _check_long_poll(env: RunningConsole, device: dict[str, Any], tunnel: httpx.Client) -> None:
    snapshot_token = tunnel.get("/api/v1/tunnel/feed/snapshot").text
    acme_console = x509.load_pem_x509_certificate((env.work / "console-acme.pem").read_bytes())
    snapshot = jws.verify(snapshot_token, acme_console, jws.TYP_SNAPSHOT, "acme")
    result: dict[str, httpx.Response] = {}

    def poll() -> None:
        result["r"] = tunnel.get(
            "/api/v1/tunnel/feed", params={"after": snapshot["seq"], "wait": 30}
        )

    waiter = threading.Thread(target=poll)
    waiter.start()
    with env.client(env.admins["acme-device-admin"]) as admin:
        changed = admin.put(
            f"/api/v1/devices/{device['device_uid']}/compliance", json={"status": "noncompliant"}
        )
    assert changed.status_code == 200
    waiter.join(timeout=40)
    response = result["r"]
    assert response.status_code == 200, "long-poll timed out instead of returning the change"
    batch = jws.verify(response.text, acme_console, jws.TYP_BATCH, "acme")
    assert batch["from_seq"] == snapshot["seq"] + 1
    changed_entries = [e for e in batch["entries"] if e["device_uid"] == device["device_uid"]]
    assert changed_entries and all(
        e["compliance_status"] == "noncompliant" for e in changed_entries
    )
    _tunnel_client(env, "other").close()
    other_console = x509.load_pem_x509_certificate((env.work / "console-other.pem").read_bytes())
    with pytest.raises(jws.SignatureError):
        jws.verify(response.text, other_console, jws.TYP_BATCH)


def test_long_poll_without_change_answers_204(env: RunningConsole) -> None:
    with _tunnel_client(env, "other") as tunnel:
        snapshot = tunnel.get("/api/v1/tunnel/feed/snapshot").text
        other = x509.load_pem_x509_certificate((env.work / "console-other.pem").read_bytes())
        current = jws.verify(snapshot, other, jws.TYP_SNAPSHOT)["seq"]
        response = tunnel.get("/api/v1/tunnel/feed", params={"after": current, "wait": 1})
    assert response.status_code == 204


def test_device_root_crl_lists_revoked_certs(env: RunningConsole, device: dict[str, Any]) -> None:
    with device_client(env, device) as client:
        old = client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()}).json()
        client.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
        crl = x509.load_der_x509_crl(client.get("/pki/device-root.crl").content)
    serial = x509.load_pem_x509_certificate(old["certificate"].encode()).serial_number
    revoked = crl.get_revoked_certificate_by_serial_number(serial)
    assert revoked is not None


def test_openapi_is_served(env: RunningConsole) -> None:
    with env.client() as client:
        spec = client.get("/openapi.json").json()
    assert "/api/v1/groups/{group_id}/tunnel/setup" in spec["paths"]


def test_api_keys_list_shows_last_use_not_the_key(env: RunningConsole) -> None:
    creds = env.admins["acme-read-only"]
    with env.client(creds) as client:
        keys = client.get(f"/api/v1/admins/{creds.id}/api-keys").json()
    assert [k["id"] for k in keys] == [creds.api_key.split("_")[1]]
    assert keys[0]["last_used_at"] is not None
    assert creds.api_key not in str(keys)


def test_grant_role_needs_admins_write_and_cannot_escalate(env: RunningConsole) -> None:
    target = env.admins["other-tunnel-setup"]
    with env.client(env.admins["acme-device-admin"]) as device_admin:
        denied = device_admin.post(
            f"/api/v1/admins/{target.id}/roles", json={"role": "read-only", "group_id": "acme"}
        )
    assert denied.status_code == 403
    with env.client(env.admins["root"]) as root:
        granted = root.post(
            f"/api/v1/admins/{target.id}/roles", json={"role": "read-only", "group_id": "acme-eu"}
        )
    assert granted.status_code == 201
    with env.client(target) as client:
        assert client.get("/api/v1/groups/acme-eu").status_code == 200
        assert client.get("/api/v1/groups/acme").status_code == 404


def issue_certs(env: RunningConsole, device: dict[str, Any], apps: Iterable[str]) -> None:
    """An app certificate for each of ``apps`` in turn, then a profile, for ``device``."""
    with device_client(env, device) as dev:
        for app in apps:
            dev.post(
                f"/api/v1/device/apps/{app}/certificate",
                json={
                    "username": "alice",
                    "password": "correct horse",
                    "csr": make_csr()[0].decode(),
                },
            )
        dev.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})


def test_snapshot_pages_cover_every_entry_once(env: RunningConsole, device: dict[str, Any]) -> None:
    issue_certs(env, device, ["com.example.pages"] * 2)
    with _tunnel_client(env, "acme") as tunnel:
        acme = x509.load_pem_x509_certificate((env.work / "console-acme.pem").read_bytes())
        whole = jws.verify(tunnel.get("/api/v1/tunnel/feed/snapshot").text, acme, jws.TYP_SNAPSHOT)
        assert whole["next"] is None and len(whole["entries"]) >= 2
        seen, after = [], ""
        while True:
            page = jws.verify(
                tunnel.get(
                    "/api/v1/tunnel/feed/snapshot", params={"after": after, "limit": 1}
                ).text,
                acme,
                jws.TYP_SNAPSHOT,
            )
            seen += [e["thumbprint"] for e in page["entries"]]
            if page["next"] is None:
                break
            after = page["next"]
        bad = tunnel.get("/api/v1/tunnel/feed/snapshot", params={"after": "XYZ"})
    assert seen == sorted(e["thumbprint"] for e in whole["entries"])
    assert bad.status_code == 422


def test_crl_is_cached_until_a_revocation(env: RunningConsole, device: dict[str, Any]) -> None:
    with env.client() as anon:
        first, second = anon.get("/pki/device-root.crl"), anon.get("/pki/device-root.crl")
    assert first.content == second.content  # no re-signing, no write, per public GET
    with device_client(env, device) as dev:
        old = dev.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()}).json()
        dev.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
    with env.client() as anon:
        after = x509.load_der_x509_crl(anon.get("/pki/device-root.crl").content)
    serial = x509.load_pem_x509_certificate(old["certificate"].encode()).serial_number
    assert after.get_revoked_certificate_by_serial_number(serial) is not None
    before = x509.load_der_x509_crl(first.content)
    number = x509.CRLNumber
    assert (
        after.extensions.get_extension_for_class(number).value.crl_number
        > before.extensions.get_extension_for_class(number).value.crl_number
    )


def by_thumbprint(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda entry: str(entry["thumbprint"]))


def test_format_2_pages_hold_the_format_1_entries(
    env: RunningConsole, device: dict[str, Any]
) -> None:
    issue_certs(env, device, ["com.example.columns", "com.example.rows"])
    with _tunnel_client(env, "acme") as tunnel:
        acme = x509.load_pem_x509_certificate((env.work / "console-acme.pem").read_bytes())
        objects = jws.verify(
            tunnel.get("/api/v1/tunnel/feed/snapshot").text, acme, jws.TYP_SNAPSHOT
        )
        table, after = DeviceTable(objects["seq"]), ""
        while True:  # one entry a page: every cursor is exercised
            params: dict[str, Any] = {"format": 2, "limit": 1} | ({"after": after} if after else {})
            response = tunnel.get("/api/v1/tunnel/feed/snapshot", params=params)
            payload = jws.verify(response.content, acme, jws.TYP_SNAPSHOT_V2, "acme")
            page = decode_page(payload, after, 1)
            table.extend_columns(page.columns)
            if page.next is None:
                table.fit()  # the last page read: its entries placed
                break
            after = page.next
        short = tunnel.get("/api/v1/tunnel/feed/snapshot", params={"format": 2, "after": "a" * 64})
        assert_denied(env, short, 400, "a format 2 cursor has 96 hex digits")
        unknown = tunnel.get("/api/v1/tunnel/feed/snapshot", params={"format": 3})
        assert unknown.status_code == 422
    assert by_thumbprint(table.to_snapshot()) == by_thumbprint(objects["entries"])
    assert len(objects["entries"]) >= 3
