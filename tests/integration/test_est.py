"""Scenario: EST (RFC 7030) on a real console, driven by curl and openssl only, with a real
tunnel node judging the certificates it issues.

Off by default for the group (403); once the group's settings enable it: cacerts and
csrattrs parse with openssl; simpleenroll with enrollment-user credentials (HTTP Basic)
issues a device certificate the node admits; simplereenroll over mTLS with that
certificate issues a new one, and the node then admits the new and refuses the old.
Bad input gets a precise 4xx with the JSON error body and an audit entry with the reason
(body, CA request, key too small, key of the wrong type or curve, credentials; a replayed
one-time token, EST's only replayable credential, and a SCEP challenge are refused).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from certgate.console.store.models import AuditEntry
from certgate.device.state import CertifiedKey
from certgate.pki import identity
from certgate.protocol import est
from tests.integration.cluster import (
    DEFAULT_SETTINGS,
    GROUP,
    Cluster,
    fetch_per_app,
    start_cluster,
)
from tests.tunnel.dataplane import PAGE

pytestmark = pytest.mark.integration
EST = "/.well-known/est"
USER = ("dora", "dora-password")  # the cluster's enrollment user


def run(*argv: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(argv, input=data, capture_output=True, timeout=60, check=True)
    return done.stdout


def openssl_csr(work: Path, name: str, *key_args: str, ca: bool = False) -> tuple[Path, Path]:
    """(base64 DER CSR, key PEM) made by openssl req."""
    key, der, b64 = work / f"{name}.key", work / f"{name}.der", work / f"{name}.b64"
    extra = ["-addext", "basicConstraints=critical,CA:TRUE"] if ca else []
    run("openssl", "req", "-new", "-newkey", *key_args, "-nodes", "-keyout", str(key),
        "-subj", f"/CN={name}", "-outform", "DER", "-out", str(der), *extra)  # fmt: skip
    run("openssl", "base64", "-in", str(der), "-out", str(b64))
    return b64, key


def p256_csr(work: Path, name: str) -> tuple[Path, Path]:
    return openssl_csr(work, name, "ec", "-pkeyopt", "ec_paramgen_curve:P-256")


def curl(cluster: Cluster, path: str, *args: str) -> tuple[int, bytes]:
    """(HTTP status, body) of curl against the console, trusting its chain only."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--cacert", str(cluster.console.chain_path),
         "-o", "-", "-w", "\n%{http_code}", *args, f"{cluster.console.url}{EST}{path}"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def enroll_post(cluster: Cluster, path: str, csr: Path, *auth: str) -> tuple[int, bytes]:
    return curl(cluster, path, "-H", "Content-Type: application/pkcs10",
                "--data-binary", f"@{csr}", *auth)  # fmt: skip


def certs_of(b64: bytes) -> list[x509.Certificate]:
    """openssl's reading of a base64 certs-only PKCS#7 answer."""
    der = run("openssl", "base64", "-d", data=b64)
    pems = run("openssl", "pkcs7", "-inform", "DER", "-print_certs", data=der)
    return x509.load_pem_x509_certificates(pems)


def fetch_through_node(cluster: Cluster, cert: x509.Certificate, key: Path) -> bytes | str:
    """A request through the node's Per-App listener with this device certificate: the
    page, or the node's refusal reason."""
    device = CertifiedKey.from_pem(cert.public_bytes(Encoding.PEM) + key.read_bytes())
    return fetch_per_app(cluster, device, "com.example.est")


def _is_page(result: bytes | str) -> bool:
    return isinstance(result, bytes) and result.endswith(PAGE)


def _is_refusal(result: bytes | str) -> bool:
    return isinstance(result, str) and result != ""


def eventually(probe: Any, expect: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if expect(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("est")
    with start_cluster(work, DEFAULT_SETTINGS, node_names=("node-1",)) as started:
        yield started


def enable_est(cluster: Cluster, on: bool) -> None:
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        response = admin.patch(f"/api/v1/groups/{GROUP}/settings", json={"enrollment": {"est": on}})
    assert response.status_code == 200, response.text


def last_entries(cluster: Cluster, count: int) -> list[dict[str, Any]]:
    with cluster.console.local() as (session, _):
        entries = session.execute(
            select(AuditEntry).order_by(AuditEntry.id.desc()).limit(count)
        ).scalars()
        return [{"action": e.action, "actor": e.actor, **e.detail} for e in entries]


def last_denial(cluster: Cluster) -> dict[str, Any]:
    with cluster.console.local() as (session, _):
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
        return {"action": entry.action, **entry.detail}


def test_est_enrolls_and_reenrolls_and_the_node_follows(cluster: Cluster) -> None:
    work, basic = cluster.work, ["--user", ":".join(USER)]
    csr, key = p256_csr(work, "est-1")
    status, body = enroll_post(cluster, "/simpleenroll", csr, *basic)
    assert status == 403 and json.loads(body)["detail"] == f"EST is not enabled for group {GROUP!r}"
    enable_est(cluster, True)

    status, body = curl(cluster, "/cacerts")
    assert status == 200
    subjects = sorted(c.subject.rfc4514_string() for c in certs_of(body))
    assert subjects == ["CN=certgate Device Root,O=certgate", "CN=certgate Root CA,O=certgate"]
    status, body = curl(cluster, "/csrattrs")
    assert [e["action"] for e in last_entries(cluster, 2)] == ["est.csrattrs", "est.cacerts"]
    parsed = run(
        "openssl", "asn1parse", "-inform", "DER", data=run("openssl", "base64", "-d", data=body)
    )
    assert b"ecdsa-with-SHA256" in parsed and b"prime256v1" in parsed

    status, body = enroll_post(cluster, "/simpleenroll", csr, *basic)
    assert status == 200, body
    (first,) = certs_of(body)
    ident = identity.identity_of(first)
    assert ident.kind is identity.IdentityKind.DEVICE and ident.group_id == GROUP
    assert (
        eventually(
            lambda: fetch_through_node(cluster, first, key), lambda r: r == PAGE or PAGE in r
        )
        != ""
    )
    assert PAGE in fetch_through_node(cluster, first, key)  # type: ignore[operator]

    cert_pem = work / "est-1.pem"
    cert_pem.write_bytes(first.public_bytes(Encoding.PEM))
    csr2, key2 = p256_csr(work, "est-2")
    status, body = enroll_post(
        cluster, "/simplereenroll", csr2, "--cert", str(cert_pem), "--key", str(key)
    )
    assert status == 200, body
    (second,) = certs_of(body)
    (reenrolled,) = last_entries(cluster, 1)
    assert reenrolled["action"] == "est.simplereenroll"
    assert reenrolled["actor"] == f"device:{ident.device_uid}"
    assert identity.identity_of(second).device_uid == ident.device_uid
    refused = eventually(
        lambda: fetch_through_node(cluster, first, key), lambda r: isinstance(r, str)
    )
    assert isinstance(refused, str) and refused  # the node's reason for the superseded cert
    assert PAGE in eventually(
        lambda: fetch_through_node(cluster, second, key2), lambda r: isinstance(r, bytes)
    )  # type: ignore[operator]

    # The superseded certificate cannot re-enroll again.
    status, body = enroll_post(
        cluster, "/simplereenroll", csr2, "--cert", str(cert_pem), "--key", str(key)
    )
    assert status == 401 and b"revoked" in body


@pytest.mark.parametrize(
    ("case", "status", "error", "detail"),
    [
        ("garbage", 400, "bad_request", "EST request: body is not base64"),
        ("pem", 400, "bad_request", "EST request: body is not base64"),
        ("not-csr", 400, "bad_request", "body is not a DER PKCS#10 request"),
        ("ca", 422, "invalid_csr", "CSR requests CA:TRUE"),
        ("rsa-1024", 422, "invalid_csr", "RSA key of 1024 bits is too small"),
        ("ed25519", 422, "invalid_csr", "unsupported key type"),
        ("p-521", 422, "invalid_csr", "unsupported curve secp521r1; use P-256 or P-384"),
        ("wrong-password", 401, "unauthenticated", "wrong enrollment credentials"),
        ("no-auth", 401, "unauthenticated", "needs an enrollment token or HTTP Basic"),
        ("content-type", 400, "bad_request", "needs Content-Type application/pkcs10"),
    ],
)
def test_bad_est_requests_get_a_precise_answer_and_an_audit_entry(
    cluster: Cluster, case: str, status: int, error: str, detail: str
) -> None:
    enable_est(cluster, True)
    work = cluster.work
    csr, _ = p256_csr(work, f"bad-{case}")
    auth = ["--user", ":".join(USER)]
    headers = ["-H", "Content-Type: application/pkcs10"]
    if case == "garbage":
        csr.write_bytes(b"%%% not base64 %%%")
    elif case == "pem":
        csr.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    elif case == "not-csr":
        csr.write_bytes(b"MAMCAQE=\n")  # SEQUENCE { INTEGER 1 }
    elif case == "ca":
        csr, _ = openssl_csr(
            work, "bad-ca-req", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", ca=True
        )
    elif case == "rsa-1024":
        csr, _ = openssl_csr(work, "bad-rsa", "rsa:1024")
    elif case == "ed25519":
        csr, _ = openssl_csr(work, "bad-ed25519", "ed25519")
    elif case == "p-521":
        csr, _ = openssl_csr(work, "bad-p521", "ec", "-pkeyopt", "ec_paramgen_curve:P-521")
    elif case == "wrong-password":
        auth = ["--user", "dora:not-her-password"]
    elif case == "no-auth":
        auth = []
    elif case == "content-type":
        headers = ["-H", "Content-Type: text/plain"]
    got, body = curl(cluster, "/simpleenroll", *headers, "--data-binary", f"@{csr}", *auth)
    answer = json.loads(body)
    assert (got, answer["error"]) == (status, error)
    assert detail in answer["detail"]
    denial = last_denial(cluster)
    assert denial["action"] == f"POST {EST}/simpleenroll" and detail in denial["reason"]


def test_an_enrollment_token_enrolls_once(cluster: Cluster) -> None:
    enable_est(cluster, True)
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        token = admin.post(
            f"/api/v1/groups/{GROUP}/enrollment-tokens", json={"owner": USER[0]}
        ).json()["token"]
    csr, _ = p256_csr(cluster.work, "token")
    bearer = ["-H", f"Authorization: Bearer {token}"]
    status, body = enroll_post(cluster, "/simpleenroll", csr, *bearer)
    assert status == 200, body
    assert identity.identity_of(certs_of(body)[0]).group_id == GROUP
    status, body = enroll_post(cluster, "/simpleenroll", csr, *bearer)  # replayed
    assert (status, json.loads(body)["detail"]) == (401, "enroll token already used")
    denial = last_denial(cluster)  # EST has no transaction id: the replay is the token's
    assert denial["action"] == f"POST {EST}/simpleenroll"
    assert denial["reason"] == "enroll token already used"


def test_a_scep_challenge_is_no_est_credential(cluster: Cluster) -> None:
    """A SCEP challenge (here a Proxy-mode one) cannot enroll over EST: the challenge
    decides what it issues, and EST issues only device certificates."""
    enable_est(cluster, True)
    with cluster.console.client(cluster.console.admins["root"]) as admin:
        challenge = admin.post(
            f"/api/v1/groups/{GROUP}/scep/challenge",
            json={"owner": USER[0], "bundle_id": "com.example.mail"},
        ).json()["challenge"]
    csr, _ = p256_csr(cluster.work, "scep-challenge")
    status, body = enroll_post(
        cluster, "/simpleenroll", csr, "-H", f"Authorization: Bearer {challenge}"
    )
    assert (status, json.loads(body)["error"]) == (401, "unauthenticated")
    assert last_denial(cluster)["reason"] == "malformed cge credential"


def test_csrattrs_is_the_base64_der_with_its_media_type(cluster: Cluster) -> None:
    """§4.5.2: 200, application/csrattrs, base64 of the DER CsrAttrs; public, audited."""
    with httpx.Client(verify=cluster.console.ssl_context(), timeout=30) as client:
        answer = client.get(f"{cluster.console.url}{EST}/csrattrs")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == est.CSRATTRS_TYPE
    assert answer.headers["content-transfer-encoding"] == "base64"
    assert base64.b64decode(answer.content, validate=False) == est.CSRATTRS
    assert last_entries(cluster, 1)[0]["action"] == "est.csrattrs"
