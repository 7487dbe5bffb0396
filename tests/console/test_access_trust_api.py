"""``GET /api/v1/access/device-roots`` against a real console process over real mTLS, on
SQLite and PostgreSQL: the Device Roots an Access node must trust through a Device Root
rotation (prepare, switch, finish), and the refusals (no credential, a role that may not
read devices) as precise statuses with the JSON error body."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509

from certgate.access.trust import parse_device_roots
from certgate.pki.thumbprint import thumbprint
from tests.support import RunningConsole

pytestmark = pytest.mark.integration

PATH = "/api/v1/access/device-roots"
ROTATION = "/api/v1/groups/global/rotations/device-root"


@pytest.fixture(scope="module")
def env(console: RunningConsole) -> RunningConsole:
    console.make_admin("access-svc", "access", "global")
    console.make_admin("setup-only", "tunnel-setup", "global")
    return console


def roots(env: RunningConsole) -> list[tuple[str, str, str]]:
    """(label, status, thumbprint) of each Device Root, as Access's admin reads them."""
    with env.client(env.admins["access-svc"]) as client:
        response = client.get(PATH)
    assert response.status_code == 200, response.text
    return [
        (
            r["label"],
            r["status"],
            thumbprint(x509.load_pem_x509_certificate(r["certificate"].encode())),
        )
        for r in response.json()["device_roots"]
    ]


def step(env: RunningConsole, path: str, **kwargs: Any) -> dict[str, Any]:
    with env.client(env.admins["root"]) as client:
        response = client.post(path, **kwargs)
    assert response.status_code in (200, 201), response.text
    shown: dict[str, Any] = response.json()
    return shown


def test_the_device_roots_follow_a_rotation(env: RunningConsole) -> None:
    with env.client() as anonymous:
        chain = x509.load_pem_x509_certificates(anonymous.get("/pki/chain.pem").content)
    old = thumbprint(chain[2])  # Root, Secure Channel Root, Device Root, Admin CA
    assert roots(env) == [("device-root", "current", old)]

    prepared = step(env, ROTATION, json={"overlap_s": 0})
    new, label = prepared["new"]["thumbprint"], f"device-root@{prepared['id']}"
    assert roots(env) == [("device-root", "current", old), (label, "next", new)]

    step(env, ROTATION + "/switch")
    assert roots(env) == [(label, "current", new), ("device-root", "retiring", old)]

    step(env, ROTATION + "/finish", params={"force": "true"})
    assert roots(env) == [(label, "current", new)]  # the retired root is not listed
    with env.client() as anonymous:  # its CRL stays published, by its label
        assert anonymous.get("/pki/crl/device-root.crl").status_code == 200


def test_a_caller_without_credentials_or_device_reads_is_refused(env: RunningConsole) -> None:
    with env.client() as anonymous:
        response = anonymous.get(PATH)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    with env.client(env.admins["setup-only"]) as client:
        response = client.get(PATH)
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "forbidden" and "devices:read" in body["detail"]


def test_the_answer_is_what_access_accepts(env: RunningConsole) -> None:
    """The console's answer parses as Access's trust set under the pinned Root."""
    with env.client() as anonymous:
        root = x509.load_pem_x509_certificate(anonymous.get("/pki/root.pem").content)
    with env.client(env.admins["access-svc"]) as client:
        answer = client.get(PATH).json()
    parsed = parse_device_roots(answer, root)
    assert [r.label for r in parsed.roots] == [r[0] for r in roots(env)]
