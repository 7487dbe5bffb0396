"""Access sign-in transactions API (``services.access_signins``), for Access nodes only.

Callers are Access's admin credential (API key AND client certificate) with the
``access:signin`` permission (role ``access``): on some group to open, read or deny a
sign-in (the device is not known yet), on the device's group to bind a code to it or to
redeem that code. Paths and bodies carry SHA-256 hashes of handles and codes, never the
secrets. Codes bound and redeemed, and denials, are audited with device and client.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import Field

from certgate.console.api import schemas as s
from certgate.console.api.deps import admin_tx
from certgate.console.api.schemas import Strict
from certgate.console.services import access_signins as signins
from certgate.console.services import audit, ca, rbac
from certgate.console.services.rbac import Permission as P
from certgate.console.store.models import AccessSignIn

router = APIRouter(prefix="/api/v1/access", responses=s.CALL_ERRORS)

HASH_PATTERN = r"^[0-9a-f]{64}$"
Hash = Annotated[str, Field(pattern=HASH_PATTERN)]
HashPath = Annotated[str, Path(pattern=HASH_PATTERN)]
Param = Annotated[str, Field(min_length=1, max_length=2048)]


class SignInRequest(Strict):
    """The authorization request Access validated (``oidc.AuthorizationRequest``)."""

    client_id: str = Field(min_length=1, max_length=128)
    redirect_uri: Param
    scope: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(max_length=32)
    state: Param
    nonce: Param
    code_challenge: str = Field(min_length=43, max_length=43)


class SignInBegin(Strict):
    handle_hash: Hash
    request: SignInRequest
    request_ttl_s: int = Field(ge=30, le=1800)
    code_ttl_s: int = Field(ge=10, le=600)  # RFC 6749 §4.1.2: at most 10 minutes


class SignInGrant(Strict):
    """The admitted device (``oidc.DeviceGrant``)."""

    device_uid: str = Field(pattern=r"^[0-9a-f]{32}$")
    group_id: str = Field(min_length=1, max_length=63)
    platform: str = Field(max_length=64)
    owner: str = Field(max_length=128)
    compliance: str = Field(max_length=16)
    cert_thumbprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    auth_time: int = Field(ge=0)


class CodeIn(Strict):
    code_hash: Hash
    grant: SignInGrant
    code_ttl_s: int = Field(ge=10, le=600)


def _out(row: AccessSignIn) -> dict[str, Any]:
    return {
        "state": row.state,
        "request": row.request,
        "grant": row.grant,
        "expires_at": (row.code_expires_at or row.expires_at).isoformat(),
    }


@router.post("/signins", status_code=201)
def signin_begin(request: Request, body: SignInBegin) -> dict[str, Any]:
    with admin_tx(request) as (session, who):
        rbac.require_somewhere(session, who.admin, P.ACCESS_SIGNIN)
        signins.begin(
            session,
            body.handle_hash,
            body.request.model_dump(),
            timedelta(seconds=body.request_ttl_s),
            timedelta(seconds=body.code_ttl_s),
            ca.now(),
        )
        return _out(signins.pending(session, body.handle_hash, ca.now()))


@router.get("/signins/{handle_hash}")
def signin_pending(request: Request, handle_hash: HashPath) -> dict[str, Any]:
    with admin_tx(request) as (session, who):
        rbac.require_somewhere(session, who.admin, P.ACCESS_SIGNIN)
        return _out(signins.pending(session, handle_hash, ca.now()))


@router.post("/signins/{handle_hash}/code")
def signin_code(request: Request, handle_hash: HashPath, body: CodeIn) -> dict[str, Any]:
    grant = body.grant
    with admin_tx(request, grant.group_id) as (session, who):
        rbac.require(session, who.admin, P.ACCESS_SIGNIN, grant.group_id)
        client_id = signins.pending(session, handle_hash, ca.now()).request["client_id"]
        signins.issue_code(
            session,
            handle_hash,
            body.code_hash,
            grant.model_dump(),
            grant.group_id,
            timedelta(seconds=body.code_ttl_s),
            ca.now(),
        )
        audit.append(
            session,
            request.state.actor,
            "access.signin.code",
            group_id=grant.group_id,
            device=grant.device_uid,
            client_id=client_id,
            cert_thumbprint=grant.cert_thumbprint,
        )
        return {"state": signins.SignInState.CODE_ISSUED.value}


@router.post("/signins/{handle_hash}/deny")
def signin_deny(request: Request, handle_hash: HashPath) -> dict[str, Any]:
    with admin_tx(request) as (session, who):
        rbac.require_somewhere(session, who.admin, P.ACCESS_SIGNIN)
        client_id = signins.pending(session, handle_hash, ca.now()).request["client_id"]
        signins.deny(session, handle_hash, ca.now())
        audit.append(session, request.state.actor, "access.signin.denied", client_id=client_id)
        return {"state": signins.SignInState.DENIED.value}


@router.post("/codes/{code_hash}/redeem")
def code_redeem(request: Request, code_hash: HashPath) -> dict[str, Any]:
    with admin_tx(request) as (session, who):
        rbac.require_somewhere(session, who.admin, P.ACCESS_SIGNIN)
        group_id = signins.to_code(session, code_hash, ca.now()).group_id
        assert group_id is not None  # set with the code
        request.state.group_id = group_id
        rbac.require(session, who.admin, P.ACCESS_SIGNIN, group_id)
        row = signins.redeem(session, code_hash, ca.now())
        audit.append(
            session,
            request.state.actor,
            "access.signin.redeemed",
            group_id=group_id,
            device=(row.grant or {}).get("device_uid"),
            client_id=row.request["client_id"],
        )
        return _out(row)
