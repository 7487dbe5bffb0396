"""Device-facing API: enrollment, Proxy-mode app certificates, Per-App Tunnel profiles, and
the long-poll of the group policy (device traffic rules) that running agents follow."""

from __future__ import annotations

import time
from typing import Any

from cryptography import x509
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from certgate.console.api import schemas as s
from certgate.console.api.deps import as_device, device_actor, device_tx, state_of
from certgate.console.services import audit, devices
from certgate.console.services.ca import InstancePKI
from certgate.console.store.models import Device
from certgate.pki.thumbprint import thumbprint

router = APIRouter(prefix="/api/v1", responses=s.CALL_ERRORS)
POLICY_WAIT_MAX_S = 60.0
CROSS_NODE_RECHECK_S = 1.0  # as the tunnel feed: commits on other console nodes


@router.post("/enroll", status_code=201)
def enroll(request: Request, body: s.EnrollIn) -> s.EnrollOut:
    state = state_of(request)
    request.state.actor = f"enroll:{body.username or 'token'}"
    with state.db.transaction() as session:
        result = devices.enroll(
            session,
            token=body.token,
            username=body.username,
            password=body.password,
            platform=body.platform,
            name=body.name,
        )
        device = result.device
        audit.append(
            session,
            request.state.actor,
            "device.enroll",
            group_id=device.group_id,
            device=device.uid,
            platform=device.platform,
            method="token" if body.token else "password",
        )
        return s.EnrollOut(
            device_uid=device.uid,
            group_id=device.group_id,
            credential=result.credential.token,
            compliance_status=device.compliance_status,
        )


@router.get("/device")
def device_status(request: Request) -> s.DeviceOut:
    with device_tx(request) as (_, device):
        return s.DeviceOut.model_validate(device, from_attributes=True)


@router.post("/device/apps/{bundle_id}/certificate", status_code=201)
def app_certificate(request: Request, bundle_id: str, body: s.AppCertIn) -> s.IssuedCert:
    """Proxy mode: the app authenticates with the enrollment credentials the first time."""
    state = state_of(request)
    with device_tx(request) as (session, device):
        cert_pem, chain = devices.issue_app_cert(
            session, state.pki, device, bundle_id, body.username, body.password, body.csr.encode()
        )
        tp = _thumbprint(cert_pem)
        audit.append(
            session,
            request.state.actor,
            "cert.issue.app",
            group_id=device.group_id,
            device=device.uid,
            app=bundle_id,
            thumbprint=tp,
        )
        return s.IssuedCert(certificate=cert_pem, chain=chain, thumbprint=tp)


@router.post("/device/profile", status_code=201)
async def profile(request: Request, body: s.ProfileIn) -> dict[str, Any]:
    """Per-App Tunnel: profile delivery generates the per-device certificate. Deliveries are
    group-committed (``certgate.console.writer``): each answer follows its commit."""
    pki, csr = state_of(request).pki, body.csr.encode()
    return await as_device(
        request, lambda session, device: audited_profile(session, pki, device, csr)
    )


def audited_profile(
    session: Session, pki: InstancePKI, device: Device, csr: bytes
) -> dict[str, Any]:
    """The profile delivery's unit of work: the certificate issued and audited (also timed
    in process by ``bench/issuance_path.py``)."""
    delivered = devices.deliver_profile(session, pki, device, csr)
    audit.append(
        session,
        device_actor(device),
        "cert.issue.device",
        group_id=device.group_id,
        device=device.uid,
        version=delivered["version"],
        thumbprint=delivered["thumbprint"],
    )
    return delivered


def _policy_once(request: Request, after: int) -> tuple[str, int, dict[str, Any] | None]:
    """(group, its notifier mark taken before the policy was read, the policy or None)."""
    with device_tx(request) as (session, device):
        mark = state_of(request).notifier.mark(device.group_id)
        return device.group_id, mark, devices.device_policy(session, device, after)


@router.get(
    "/device/policy",
    response_model=s.DevicePolicyOut,
    responses={
        200: {"description": "The group policy, newer than `after`."},
        204: {"description": "No newer policy came within `wait` seconds."},
        401: {"model": s.ErrorOut, "description": "Missing or unknown device credential."},
        403: {"model": s.ErrorOut, "description": "The device is unenrolled, wiped or blocked."},
    },
)
async def policy(
    request: Request,
    after: int = Query(0, ge=0),
    wait: float = Query(25.0, ge=0, le=POLICY_WAIT_MAX_S),
) -> s.DevicePolicyOut | Response:
    """The device traffic rules and tunnel endpoints of the device's group as soon as its
    policy version exceeds ``after``; 204 when none came within ``wait`` (bounded by the
    console's long-poll maximum). A commit on this node wakes the wait at once."""
    state = state_of(request)
    deadline = time.monotonic() + min(wait, state.config.long_poll_max_s)
    while True:
        group_id, mark, current = await run_in_threadpool(_policy_once, request, after)
        if current is not None:
            return s.DevicePolicyOut.model_validate(current)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            return Response(status_code=204)
        await state.notifier.wait(group_id, min(remaining, CROSS_NODE_RECHECK_S), since=mark)


def _thumbprint(cert_pem: str) -> str:
    return thumbprint(x509.load_pem_x509_certificate(cert_pem.encode()))
