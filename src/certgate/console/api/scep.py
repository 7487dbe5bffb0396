"""SCEP (RFC 8894) on the console at ``/scep``: GetCACaps, GetCACert, PKIOperation (GET
with the base64 message, or POST with the DER body, §4.1), and the admin calls that make
challenge passwords (per device, or per profile for a new device of a group; each for the
Per-App Tunnel device certificate or, naming an app, for its Proxy-mode certificate).

A PKIOperation that parses is always answered with a CertRep (§3.3.2): SUCCESS with the
certificate, or FAILURE with a failInfo, and audited either way with the reason (a
refused transaction id is remembered, so it cannot be replayed). A message that cannot
be read at all (malformed PKCS#7, a signature that does not verify, an envelope not for
this RA) has no one to answer to: it is a 400 with the JSON error, audited by the app.
"""

from __future__ import annotations

import base64
import binascii
from datetime import timedelta

from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from certgate.console.api import schemas as s
from certgate.console.api.deps import admin_tx, state_of
from certgate.console.services import audit, devices
from certgate.console.services import scep as service
from certgate.console.services.rbac import Permission as P
from certgate.console.services.rbac import require
from certgate.console.services.secrets import IssuedSecret
from certgate.errors import BadRequest, CertgateError, NotFound
from certgate.pki import identity
from certgate.pki.thumbprint import thumbprint
from certgate.protocol import scep

router = APIRouter()
PKI_MESSAGE = "application/x-pki-message"
CA_RA_CERT = "application/x-x509-ca-ra-cert"


BundleId = Field(
    default=None,
    pattern=f"^(?:{identity.BUNDLE_ID_RE.pattern})$",  # JSON Schema patterns search
    description="The app whose Proxy-mode certificate the challenge issues; without it, "
    "the Per-App Tunnel device certificate.",
)


class ChallengeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expires_in_s: s.Whole = Field(default=3600, ge=60, le=30 * 86400)
    bundle_id: str | None = BundleId


class ProfileChallengeIn(ChallengeIn):
    owner: str = s.USERNAME  # an enrollment user of the group (else 404)


def _answer(issued: IssuedSecret, body: ChallengeIn) -> dict[str, object]:
    mode = "per_app" if body.bundle_id is None else "proxy"
    return {
        "id": issued.id,
        "challenge": issued.token,
        "expires_in_s": body.expires_in_s,
        "mode": mode,
        "bundle_id": body.bundle_id,
    }


@router.post("/api/v1/devices/{uid}/scep/challenge", status_code=201, responses=s.CALL_ERRORS)
def create_challenge(request: Request, uid: str, body: ChallengeIn) -> dict[str, object]:
    """A single-use challenge password that issues for this device over SCEP (shown
    once): its device certificate, or with ``bundle_id`` that app's Proxy-mode one."""
    with admin_tx(request) as (session, who):
        device = devices.get_device(session, uid)
        require(session, who.admin, P.ENROLLMENT_WRITE, device.group_id)
        issued = service.create_device_challenge(
            session,
            device,
            request.state.actor,
            timedelta(seconds=body.expires_in_s),
            body.bundle_id,
        )
        audit.append(
            session,
            request.state.actor,
            "scep.challenge.create",
            group_id=device.group_id,
            device=uid,
            token_id=issued.id,
            app=body.bundle_id,
        )
        return _answer(issued, body)


@router.post("/api/v1/groups/{group_id}/scep/challenge", status_code=201, responses=s.CALL_ERRORS)
def create_profile_challenge(
    request: Request, group_id: str, body: ProfileChallengeIn
) -> dict[str, object]:
    """A single-use challenge password that enrolls a new device of ``owner`` in the
    group over SCEP (shown once); with ``bundle_id`` it issues that app's Proxy-mode
    certificate, otherwise the Per-App Tunnel device certificate."""
    with admin_tx(request, group_id) as (session, who):
        require(session, who.admin, P.ENROLLMENT_WRITE, group_id)
        issued = service.create_profile_challenge(
            session,
            group_id,
            body.owner,
            request.state.actor,
            timedelta(seconds=body.expires_in_s),
            body.bundle_id,
        )
        audit.append(
            session,
            request.state.actor,
            "scep.challenge.create",
            group_id=group_id,
            owner=body.owner,
            token_id=issued.id,
            app=body.bundle_id,
        )
        return _answer(issued, body)


# A message that cannot be read is a 400, an operation that does not exist a 404, a
# replayed transaction a 409 (the answers of ``_operation``); the rest answer in CertReps.
SCEP_ERRORS = s.error_responses(*s.ANY_REQUEST, 400, 404, 409, 422)
SCEP_ANSWER = s.binary_answer(
    "CACaps text, CA/RA certificates or a CertRep.", "text/plain", CA_RA_CERT, PKI_MESSAGE
)
Operation = Query("", json_schema_extra={"enum": ["GetCACaps", "GetCACert", "PKIOperation"]})


@router.get("/scep", response_class=Response, responses={**SCEP_ERRORS, **SCEP_ANSWER})
async def scep_get(
    request: Request,
    operation: str = Operation,
    message: str = Query("", description="PKIOperation: the base64 DER message (§4.3)."),
) -> Response:
    if operation == "GetCACaps":
        await run_in_threadpool(_audit_public, request, "scep.getcacaps")
        return Response(scep.CACAPS, media_type="text/plain")
    if operation == "GetCACert":
        return await run_in_threadpool(_ca_certs, request)
    if operation == "PKIOperation":
        try:
            der = base64.b64decode(message, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"SCEP message is not base64: {exc}") from exc
        return await run_in_threadpool(_operation, request, der)
    raise NotFound(f"no SCEP operation {operation!r}")


@router.post(
    "/scep",
    response_class=Response,
    responses={**SCEP_ERRORS, **SCEP_ANSWER},
    openapi_extra=s.binary_body(PKI_MESSAGE, "A DER SCEP message (RFC 8894 §4.3)."),
)
async def scep_post(request: Request, operation: str = Operation) -> Response:
    if operation != "PKIOperation":
        raise NotFound(f"no SCEP operation {operation!r} by POST")
    body = await request.body()
    return await run_in_threadpool(_operation, request, body)


def _audit_public(request: Request, action: str) -> None:
    client = request.client.host if request.client else "unknown"
    with state_of(request).db.transaction() as session:
        audit.append(session, f"anonymous@{client}", action)


def _ca_certs(request: Request) -> Response:
    state = state_of(request)
    with state.db.transaction() as session:
        ra, _ = service.ra_identity(session, state.pki)
    _audit_public(request, "scep.getcacert")
    body = pkcs7.serialize_certificates(service.ca_certificates(state.pki, ra), Encoding.DER)
    return Response(body, media_type=CA_RA_CERT)


def _operation(request: Request, message: bytes) -> Response:
    state = state_of(request)
    with state.db.transaction() as session:
        ra_cert, ra_key = service.ra_identity(session, state.pki)
    try:
        parsed = scep.parse_request(message, ra_cert, ra_key)
    except scep.SCEPError as exc:
        raise BadRequest(f"SCEP request refused: {exc}") from exc
    request.state.actor = f"scep:{thumbprint(parsed.signer)[:16]}"
    try:
        with state.db.transaction() as session:
            issued = service.issue(session, state.pki, parsed)
            _audit(session, request, parsed, "ok", issued.device.group_id,
                   device=issued.device.uid, app=issued.bundle_id,
                   thumbprint=thumbprint(issued.cert))  # fmt: skip
        answer = scep.cert_rep(parsed, ra_cert, ra_key, [issued.cert])
    except (CertgateError, IntegrityError) as exc:
        reason = str(exc) if isinstance(exc, CertgateError) else "transaction id already used"
        fail = scep.FailInfo.BAD_CERT_ID if isinstance(exc, NotFound) else scep.FailInfo.BAD_REQUEST
        with state.db.transaction() as session:
            service.record(session, parsed.transaction_id, thumbprint(parsed.signer), None)
            _audit(session, request, parsed, "denied", None, reason=reason[:500],
                   fail_info=fail.name)  # fmt: skip
        answer = scep.cert_rep(parsed, ra_cert, ra_key, None, fail)
    return Response(answer, media_type=PKI_MESSAGE)


def _audit(
    session: Session,
    request: Request,
    parsed: scep.PKIRequest,
    outcome: str,
    group_id: str | None,
    **detail: object,
) -> None:
    audit.append(
        session,
        request.state.actor,
        f"scep.{parsed.message_type.name.lower()}",
        outcome,
        group_id,
        transaction_id=parsed.transaction_id,
        **detail,
    )
