"""Scenario: SCEP (RFC 8894) on a real console with Debian's ``scepclient`` (package
``scep``) as the client, and a real tunnel node judging what it is issued.

Off by default (the client gets a CertRep FAILURE); once the group enables it, a
per-profile challenge (the group's enrollment token) enrolls a new device whose
certificate the node admits; the same challenge again is refused (single use); a
per-device challenge re-issues for that device, and the node then admits the new
certificate and refuses the old. A challenge made for an app issues that app's
Proxy-mode certificate, which the node admits in Proxy mode (curl) and refuses on the
Per-App listener, as it refuses a device certificate in Proxy mode. Bad requests from a
Python requester built with ``certgate.protocol.scep`` (replayed transaction id, CSR
asking CA:TRUE, an RSA key too small, a key of the wrong type or curve, malformed PKCS#7)
get the protocol's answer, and every request its audit entry.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import time
from typing import Any

import httpx
import pytest
from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import AttributeOID, NameOID
from sqlalchemy import select

from certgate.console.store.models import AuditEntry
from certgate.device.state import CertifiedKey
from certgate.pki import identity
from certgate.protocol.scep import (
    MESSAGE_TYPE,
    PKI_STATUS,
    SENDER_NONCE,
    TRANSACTION_ID,
    envelope_for,
    open_envelope,
    signed_message,
)
from tests.integration.cluster import (
    DEFAULT_SETTINGS,
    GROUP,
    Cluster,
    curl,
    fetch_per_app,
    start_cluster,
)
from tests.tunnel.dataplane import PAGE

pytestmark = pytest.mark.integration
FAIL_INFO = "2.16.840.1.113733.1.9.4"
MAIL, CHAT = "com.example.mail", "com.example.chat"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("scep")
    with start_cluster(work, DEFAULT_SETTINGS, node_names=("node-1",)) as started:
        yield started


def admin(cluster: Cluster) -> httpx.Client:
    return cluster.console.client(cluster.console.admins["root"])


def set_scep(cluster: Cluster, on: bool) -> None:
    with admin(cluster) as client:
        response = client.patch(
            f"/api/v1/groups/{GROUP}/settings", json={"enrollment": {"scep": on}}
        )
    assert response.status_code == 200, response.text


def enrollment_token(cluster: Cluster) -> str:
    with admin(cluster) as client:
        answer = client.post(f"/api/v1/groups/{GROUP}/enrollment-tokens", json={"owner": "dora"})
    return str(answer.json()["token"])


def ca_certs(cluster: Cluster) -> list[x509.Certificate]:
    with httpx.Client(verify=cluster.console.ssl_context(), timeout=30) as client:
        answer = client.get(f"{cluster.console.url}/scep", params={"operation": "GetCACert"})
    assert answer.headers["content-type"] == "application/x-x509-ca-ra-cert"
    return pkcs7.load_der_pkcs7_certificates(answer.content)


def ra_of(cluster: Cluster) -> x509.Certificate:
    (ra,) = [c for c in ca_certs(cluster) if "SCEP RA" in c.subject.rfc4514_string()]
    return ra


def scepclient(cluster: Cluster, name: str, challenge: str) -> subprocess.CompletedProcess[str]:
    """Debian's scepclient, trusting the console's chain (Go reads SSL_CERT_FILE) and
    encrypting to the RA picked by its SHA-256 fingerprint. Each run in its own directory:
    the client keeps its self-signed signer (self.pem) and CSR beside the key and reuses
    them."""
    fingerprint = hashlib.sha256(ra_of(cluster).public_bytes(Encoding.DER)).hexdigest()
    work = cluster.work / name
    work.mkdir()
    return subprocess.run(
        ["scepclient", "-server-url", f"{cluster.console.url}/scep", "-challenge", challenge,
         "-private-key", str(work / f"{name}.key"), "-certificate", str(work / f"{name}.pem"),
         "-ca-fingerprint", fingerprint, "-cn", name],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SSL_CERT_FILE": str(cluster.console.chain_path)},
    )  # fmt: skip


def fetch_through_node(cluster: Cluster, name: str) -> bytes | str:
    """A request through the node's Per-App listener with scepclient's key and cert: the
    page, or the node's refusal reason."""
    work = cluster.work / name
    device = CertifiedKey.from_pem(
        (work / f"{name}.pem").read_bytes() + (work / f"{name}.key").read_bytes()
    )
    return fetch_per_app(cluster, device, "com.example.scep")


def fetch_through_proxy(cluster: Cluster, name: str) -> bytes | str:
    """curl through the node's Proxy-mode listener with scepclient's key and cert: the
    page, or the node's refusal (``certgate: REASON``)."""
    work = cluster.work / name
    client = (work / f"{name}.pem", work / f"{name}.key")
    done = curl(cluster, port=cluster.nodes[0].proxy_port, client=client)
    return PAGE if done.stdout.encode() == PAGE else done.stdout + done.stderr


def fetch_as_issued(cluster: Cluster, name: str) -> bytes | str:
    """Through the listener of the certificate's mode: Proxy for an app certificate,
    Per-App Tunnel for a device certificate."""
    cert = x509.load_pem_x509_certificate((cluster.work / name / f"{name}.pem").read_bytes())
    if identity.identity_of(cert).kind is identity.IdentityKind.APP:
        return fetch_through_proxy(cluster, name)
    return fetch_through_node(cluster, name)


def issued_to(cluster: Cluster, name: str) -> identity.Identity:
    cert = x509.load_pem_x509_certificate((cluster.work / name / f"{name}.pem").read_bytes())
    return identity.identity_of(cert)


def challenge(cluster: Cluster, path: str, **body: object) -> str:
    with admin(cluster) as client:
        answer = client.post(path, json=body)
    assert answer.status_code == 201, answer.text
    mode = "proxy" if body.get("bundle_id") else "per_app"
    assert (answer.json()["mode"], answer.json()["bundle_id"]) == (mode, body.get("bundle_id"))
    return str(answer.json()["challenge"])


def eventually(probe: Any, done: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        seen = probe()
        if done(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.3)


def is_page(result: bytes | str) -> bool:
    return isinstance(result, bytes) and result.endswith(PAGE)


def last_audit(cluster: Cluster, action_prefix: str) -> dict[str, Any]:
    with cluster.console.local() as (session, _):
        entry = (
            session.execute(
                select(AuditEntry)
                .where(AuditEntry.action.startswith(action_prefix))
                .order_by(AuditEntry.id.desc())
            )
            .scalars()
            .first()
        )
        assert entry is not None
        return {"action": entry.action, "outcome": entry.outcome, **entry.detail}


def test_scepclient_enrolls_and_the_node_follows(cluster: Cluster) -> None:
    token = enrollment_token(cluster)
    refused = scepclient(cluster, "off", token)
    assert refused.returncode != 0 and "failInfo: badRequest (2)" in refused.stdout
    denied = last_audit(cluster, "scep.")
    assert denied["outcome"] == "denied"
    assert denied["reason"] == f"SCEP is not enabled for group {GROUP!r}"
    set_scep(cluster, True)

    token = enrollment_token(cluster)  # the refused request used nothing up
    done = scepclient(cluster, "first", token)
    assert done.returncode == 0, done.stdout + done.stderr
    first = x509.load_pem_x509_certificate((cluster.work / "first" / "first.pem").read_bytes())
    ident = identity.identity_of(first)
    assert ident.kind is identity.IdentityKind.DEVICE and ident.group_id == GROUP
    assert is_page(eventually(lambda: fetch_through_node(cluster, "first"), is_page))
    issued = last_audit(cluster, "scep.")
    assert (issued["action"], issued["outcome"]) == ("scep.pkcs_req", "ok")
    assert issued["device"] == ident.device_uid

    again = scepclient(cluster, "again", token)  # the same challenge: single use
    assert again.returncode != 0
    assert "wrong challenge password" in last_audit(cluster, "scep.")["reason"]

    with admin(cluster) as client:
        challenge = client.post(
            f"/api/v1/devices/{ident.device_uid}/scep/challenge", json={"expires_in_s": 600}
        ).json()["challenge"]
    done = scepclient(cluster, "second", challenge)
    assert done.returncode == 0, done.stdout + done.stderr
    second = x509.load_pem_x509_certificate((cluster.work / "second" / "second.pem").read_bytes())
    assert identity.identity_of(second).device_uid == ident.device_uid
    old = eventually(lambda: fetch_through_node(cluster, "first"), lambda r: isinstance(r, str))
    assert isinstance(old, str) and "unknown_thumbprint" in old  # superseded, out of the feed
    assert is_page(eventually(lambda: fetch_through_node(cluster, "second"), is_page))
    renew_and_poll(cluster, "second")


def renew_and_poll(cluster: Cluster, name: str) -> None:
    """RenewalReq signed with the device's current certificate (no challenge), then
    GetCertInitial for the same transaction answers with the same certificate."""
    work = cluster.work / name
    current = CertifiedKey.from_pem(
        (work / f"{name}.pem").read_bytes() + (work / f"{name}.key").read_bytes()
    )
    assert isinstance(current.key, rsa.RSAPrivateKey)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    request_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renew")]))
        .sign(new_key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )
    ra = ra_of(cluster)

    def message(kind: str, content: bytes) -> bytes:
        fields = [
            (MESSAGE_TYPE, core.PrintableString(kind)),
            (TRANSACTION_ID, core.PrintableString(f"renew-{name}")),
            (SENDER_NONCE, core.OctetString(os.urandom(16))),
        ]
        return signed_message(envelope_for(ra, content), fields, current.cert, current.key)

    renewed = post(cluster, message("17", request_csr))
    assert status_of(renewed.content) == ("0", None)
    issued = open_answer(renewed.content, current)
    assert issued.public_key() == new_key.public_key()
    # The same device, kind and app: a device certificate renews as one, an app's as its.
    assert identity.identity_of(issued) == identity.identity_of(current.cert)
    assert last_audit(cluster, "scep.")["action"] == "scep.renewal_req"
    polled = post(cluster, message("20", b"issuer-and-subject"))
    assert status_of(polled.content) == ("0", None)
    assert open_answer(polled.content, current) == issued
    stale = eventually(lambda: fetch_as_issued(cluster, name), lambda r: isinstance(r, str))
    assert isinstance(stale, str) and "unknown_thumbprint" in stale  # renewed: superseded


def test_proxy_mode_challenges_issue_app_certificates_the_proxy_listener_admits(
    cluster: Cluster,
) -> None:
    """A challenge made for an app issues that app's Proxy-mode certificate (per profile:
    a new device; per device: another app of it), which the node admits in Proxy mode and
    refuses on the Per-App listener; a challenge without an app issues the device
    certificate, admitted only there. Apps do not supersede each other."""
    set_scep(cluster, True)
    profile = challenge(
        cluster, f"/api/v1/groups/{GROUP}/scep/challenge", owner="dora", bundle_id=MAIL
    )
    assert profile.startswith("cgp_")
    done = scepclient(cluster, "mail", profile)
    assert done.returncode == 0, done.stdout + done.stderr
    mail = issued_to(cluster, "mail")
    assert (mail.kind, mail.bundle_id, mail.group_id) == (identity.IdentityKind.APP, MAIL, GROUP)
    issued = last_audit(cluster, "scep.")
    assert (issued["outcome"], issued["app"], issued["device"]) == ("ok", MAIL, mail.device_uid)
    assert is_page(eventually(lambda: fetch_through_proxy(cluster, "mail"), is_page))
    assert "wrong_kind" in str(fetch_through_node(cluster, "mail"))

    uid = mail.device_uid
    per_device = challenge(cluster, f"/api/v1/devices/{uid}/scep/challenge", bundle_id=CHAT)
    assert scepclient(cluster, "chat", per_device).returncode == 0
    assert issued_to(cluster, "chat") == identity.app(str(uid), GROUP, CHAT)
    per_app = challenge(cluster, f"/api/v1/devices/{uid}/scep/challenge")
    assert scepclient(cluster, "tunnel", per_app).returncode == 0
    assert issued_to(cluster, "tunnel") == identity.device(str(uid), GROUP)

    assert is_page(eventually(lambda: fetch_through_proxy(cluster, "chat"), is_page))
    assert is_page(eventually(lambda: fetch_through_node(cluster, "tunnel"), is_page))
    assert is_page(fetch_through_proxy(cluster, "mail"))  # another app: not superseded
    assert "certgate: wrong_kind" in str(fetch_through_proxy(cluster, "tunnel"))
    renew_and_poll(cluster, "chat")  # an app certificate renews as that app's
    assert is_page(fetch_through_proxy(cluster, "mail"))


def test_the_challenge_not_the_csr_decides_the_certificate(cluster: Cluster) -> None:
    """A CSR naming a device identity under a Proxy challenge still gets the app's
    certificate, one naming an app under a Per-App challenge the device certificate; a
    SCEP challenge is no enrollment token (the agent's enrollment refuses it)."""
    set_scep(cluster, True)
    path = f"/api/v1/groups/{GROUP}/scep/challenge"
    proxy = challenge(cluster, path, owner="dora", bundle_id=MAIL)
    per_app = challenge(cluster, path, owner="dora")
    with httpx.Client(verify=cluster.console.ssl_context(), timeout=30) as client:
        refused = client.post(
            f"{cluster.console.url}/api/v1/enroll", json={"token": proxy, "platform": "linux"}
        )
    assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
    for secret, asked, kind in (
        (proxy, identity.device("0" * 32, GROUP), identity.IdentityKind.APP),
        (per_app, identity.app("0" * 32, GROUP, CHAT), identity.IdentityKind.DEVICE),
    ):
        answer = post(cluster, pkcs_req(cluster, csr(secret, uri=asked.uri()), f"tx-{kind.value}"))
        assert status_of(answer.content) == ("0", None)
        got = identity.identity_of(open_answer(answer.content, signer_key()))
        assert got.kind is kind and got.device_uid != asked.device_uid
        assert got.bundle_id == (MAIL if kind is identity.IdentityKind.APP else None)


def open_answer(answer: bytes, requester: CertifiedKey) -> x509.Certificate:
    envelope = cms.ContentInfo.load(answer)["content"]["encap_content_info"]["content"].native
    assert isinstance(requester.key, rsa.RSAPrivateKey)
    (cert,) = pkcs7.load_der_pkcs7_certificates(
        open_envelope(envelope, requester.cert, requester.key)
    )
    return cert


# -- bad requests from a requester built with certgate.protocol.scep ----------------------

CLIENT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache  # one signer: an answer is encrypted to the certificate that asked
def client_cert() -> x509.Certificate:
    from datetime import UTC, datetime, timedelta

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SCEP SIGNER")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(CLIENT_KEY.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
        .sign(CLIENT_KEY, hashes.SHA256())
    )  # fmt: skip


def pkcs_req(cluster: Cluster, csr: bytes, transaction_id: str) -> bytes:
    fields = [
        (MESSAGE_TYPE, core.PrintableString("19")),
        (TRANSACTION_ID, core.PrintableString(transaction_id)),
        (SENDER_NONCE, core.OctetString(os.urandom(16))),
    ]
    return signed_message(envelope_for(ra_of(cluster), csr), fields, client_cert(), CLIENT_KEY)


def signer_key() -> CertifiedKey:
    return CertifiedKey(CLIENT_KEY, client_cert())


def csr(challenge: str, key: Any = CLIENT_KEY, ca: bool = False, uri: str | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")])
    )
    builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if uri is not None:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
        builder = builder.add_extension(san, critical=False)
    signing = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, signing).public_bytes(Encoding.DER)


def post(cluster: Cluster, message: bytes) -> httpx.Response:
    with httpx.Client(verify=cluster.console.ssl_context(), timeout=30) as client:
        return client.post(
            f"{cluster.console.url}/scep",
            params={"operation": "PKIOperation"},
            content=message,
            headers={"content-type": "application/x-pki-message"},
        )


def status_of(answer: bytes) -> tuple[str, str | None]:
    signer_info = cms.ContentInfo.load(answer)["content"]["signer_infos"][0]
    attrs = {a["type"].dotted: a["values"][0].contents for a in signer_info["signed_attrs"]}
    fail = attrs.get(FAIL_INFO)
    return attrs[PKI_STATUS].decode(), fail.decode() if fail else None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("replayed", "transaction id 'replayed-tx' was already used"),
        ("ca", "CSR requests CA:TRUE"),
        ("rsa-1024", "RSA key of 1024 bits is too small"),
        ("ed25519", "unsupported key type"),
        ("p-521", "unsupported curve secp521r1; use P-256 or P-384"),
        ("wrong-challenge", "wrong challenge password"),
    ],
)
def test_bad_requests_get_a_failure_cert_rep_and_an_audit_entry(
    cluster: Cluster, case: str, reason: str
) -> None:
    set_scep(cluster, True)
    token = enrollment_token(cluster)
    if case == "replayed":
        first = post(cluster, pkcs_req(cluster, csr(token), "replayed-tx"))
        assert status_of(first.content) == ("0", None)
        message = pkcs_req(cluster, csr(enrollment_token(cluster)), "replayed-tx")
    elif case == "ca":
        message = pkcs_req(cluster, csr(token, ca=True), f"tx-{case}")
    elif case == "rsa-1024":
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        message = pkcs_req(cluster, csr(token, key=small), f"tx-{case}")
    elif case in ("ed25519", "p-521"):
        key = ed25519.Ed25519PrivateKey.generate()
        if case == "p-521":
            key = ec.generate_private_key(ec.SECP521R1())
        message = pkcs_req(cluster, csr(token, key=key), f"tx-{case}")
    else:
        message = pkcs_req(cluster, csr("cge_0000000000000000_wrong"), f"tx-{case}")
    answer = post(cluster, message)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/x-pki-message"
    assert status_of(answer.content) == ("2", "2")  # FAILURE, badRequest
    entry = last_audit(cluster, "scep.pkcs_req")
    assert entry["outcome"] == "denied" and reason in entry["reason"]


def test_malformed_pkcs7_is_a_400_with_the_reason(cluster: Cluster) -> None:
    answer = post(cluster, b"\x30\x03\x02\x01\x01")
    assert answer.status_code == 400
    assert answer.json()["error"] == "bad_request"
    assert answer.json()["detail"].startswith("SCEP request refused: malformed PKCS#7")
    with httpx.Client(verify=cluster.console.ssl_context(), timeout=30) as client:
        caps = client.get(f"{cluster.console.url}/scep", params={"operation": "GetCACaps"})
        unknown = client.get(f"{cluster.console.url}/scep", params={"operation": "Nope"})
    assert b"POSTPKIOperation" in caps.content and b"AES" in caps.content
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
