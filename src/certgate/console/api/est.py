"""EST (RFC 7030) on the console: ``/.well-known/est/`` cacerts, simpleenroll,
simplereenroll, csrattrs.

Provisioners are the existing ones: ``simpleenroll`` enrolls a new device with a one-time
enrollment token (``Authorization: Bearer``) or an enrollment user's credentials (HTTP
Basic, RFC 7030 §3.2.3, over TLS); ``simplereenroll`` is authenticated by the device's
current certificate over mTLS (§3.3.2). Both then issue through the Per-App Tunnel
profile delivery (``devices.deliver_profile``): the same Device Root profile, identity and
feed entries as any device certificate, and a re-enrollment supersedes the previous
certificate (nodes refuse it). A group answers EST only once its settings say
``"enrollment": {"est": true}``. Failures are the app's: a precise 4xx with the JSON
error body and an audit entry with the reason.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from cryptography import x509
from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from certgate.console.api import schemas as s
from certgate.console.api.deps import bearer, device_actor, state_of
from certgate.console.services import audit, ca, compliance, devices
from certgate.console.services.groups import get_group, protocol_enabled
from certgate.console.store.models import Device
from certgate.errors import AuthError, BadRequest, PermissionDenied
from certgate.httpserver import peer_cert_der
from certgate.protocol import est

router = APIRouter(
    prefix="/.well-known/est", responses=s.error_responses(*s.ANY_REQUEST, 400, 401, 403, 404, 409)
)
PKCS10 = "application/pkcs10"
CSR_BODY = s.binary_body(PKCS10, "A base64 DER PKCS#10 request (RFC 7030 §4.2.1).")
ISSUED = s.binary_answer("The issued certificate, base64 PKCS#7 (§4.2.3).", est.CERTS_ONLY)
EST_PLATFORM = "linux"  # EST clients do not say; the enrollment is recorded as Linux


def _b64_response(body: bytes, media_type: str) -> Response:
    return Response(body, media_type=media_type, headers={"content-transfer-encoding": "base64"})


def _audit_public(request: Request, action: str) -> None:
    """Every EST request is audited, the public ones too (who asked, from where)."""
    client = request.client.host if request.client else "unknown"
    with state_of(request).db.transaction() as session:
        audit.append(session, f"anonymous@{client}", action)


@router.get(
    "/cacerts", response_class=Response, responses=s.binary_answer("base64 PKCS#7", est.CERTS_ONLY)
)
def cacerts(request: Request) -> Response:
    """The Device Root and the instance Root: what issued EST certificates chain to
    (§4.1.3). Public, as the CA certificates are."""
    pki = state_of(request).pki
    _audit_public(request, "est.cacerts")
    return _b64_response(
        est.certs_only([pki.certs[ca.DEVICE_ROOT], pki.certs[ca.ROOT]]), est.CERTS_ONLY
    )


@router.get(
    "/csrattrs",
    response_class=Response,
    responses=s.binary_answer("base64 DER CsrAttrs", est.CSRATTRS_TYPE),
)
def csrattrs(request: Request) -> Response:
    """What the CSR should carry (§4.5): a P-256 key, signed with SHA-256 ECDSA."""
    _audit_public(request, "est.csrattrs")
    return _b64_response(base64.encodebytes(est.CSRATTRS), est.CSRATTRS_TYPE)


async def _csr_of(request: Request) -> bytes:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != PKCS10:
        raise BadRequest(f"EST enrollment needs Content-Type {PKCS10} (RFC 7030 §4.2.1)")
    try:
        return est.decode_csr(await request.body())
    except est.ESTBodyError as exc:
        raise BadRequest(f"EST request: {exc}") from exc


def _basic(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        username, sep, password = (
            base64.b64decode(value.strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise AuthError("malformed HTTP Basic credentials") from exc
    return (username, password) if sep and username else None


def _require_est(session: Session, device: Device) -> None:
    if not protocol_enabled(get_group(session, device.group_id), "est"):
        raise PermissionDenied(f"EST is not enabled for group {device.group_id!r}")


def _issue(request: Request, session: Session, device: Device, csr: bytes, action: str) -> Response:
    delivered = devices.deliver_profile(session, state_of(request).pki, device, csr)
    audit.append(
        session,
        request.state.actor,
        action,
        group_id=device.group_id,
        device=device.uid,
        thumbprint=delivered["thumbprint"],
    )
    cert = x509.load_pem_x509_certificate(delivered["certificate"].encode())
    return _b64_response(est.certs_only([cert]), est.CERTS_ONLY)


@router.post("/simpleenroll", response_class=Response, responses=ISSUED, openapi_extra=CSR_BODY)
async def simpleenroll(request: Request) -> Response:
    """A new device: its certificate for the CSR's key (§4.2.1)."""
    basic, token = _basic(request), bearer(request)
    if basic is None and token is None:
        raise AuthError("EST enrollment needs an enrollment token or HTTP Basic credentials")
    csr = await _csr_of(request)
    request.state.actor = f"est:{basic[0] if basic else 'token'}"

    def enroll(session: Session) -> Response:
        device = devices.enroll(
            session,
            token=token,
            username=basic[0] if basic else None,
            password=basic[1] if basic else None,
            platform=EST_PLATFORM,
            name="est",
        ).device
        request.state.group_id = device.group_id
        _require_est(session, device)
        return _issue(request, session, device, csr, "est.simpleenroll")

    return await _in_transaction(request, enroll)


@router.post("/simplereenroll", response_class=Response, responses=ISSUED, openapi_extra=CSR_BODY)
async def simplereenroll(request: Request) -> Response:
    """The device proven by its current certificate gets a new one; the old one is
    superseded (§4.2.2)."""
    csr, peer = await _csr_of(request), peer_cert_der(request.scope)

    def reenroll(session: Session) -> Response:
        device = compliance.device_by_cert(session, state_of(request).pki, peer)
        request.state.actor, request.state.group_id = device_actor(device), device.group_id
        _require_est(session, device)
        return _issue(request, session, device, csr, "est.simplereenroll")

    return await _in_transaction(request, reenroll)


async def _in_transaction(request: Request, work: Callable[[Session], Response]) -> Response:
    """``work`` in one transaction on a worker thread (the body was read on the loop)."""

    def run() -> Response:
        with state_of(request).db.transaction() as session:
            response: Response = work(session)
            return response

    return await run_in_threadpool(run)
