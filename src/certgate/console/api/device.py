"""Device-facing API: enrollment, Proxy-mode app certificates, Per-App Tunnel profiles."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from certgate.console.api import schemas as s
from certgate.console.api.deps import as_device, device_actor, device_tx, state_of
from certgate.console.services import audit, devices
from certgate.console.store.models import Device
from certgate.pki.thumbprint import thumbprint

router = APIRouter(prefix="/api/v1")


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

    def deliver(session: Session, device: Device) -> dict[str, Any]:
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

    return await as_device(request, deliver)


def _thumbprint(cert_pem: str) -> str:
    return thumbprint(x509.load_pem_x509_certificate(cert_pem.encode()))
