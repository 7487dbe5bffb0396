"""Unauthenticated endpoints: health, trust anchors, the Device Root CRL."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response

from certgate.console.api.deps import state_of
from certgate.console.services import ca

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/pki/root.pem", response_class=Response)
def root_pem(request: Request) -> Response:
    return Response(
        ca.pem(state_of(request).pki.certs[ca.ROOT]), media_type="application/x-pem-file"
    )


@router.get("/pki/chain.pem", response_class=Response)
def chain_pem(request: Request) -> Response:
    """Root, Secure Channel Root, Device Root and Admin CA, in that order."""
    certs = state_of(request).pki.certs
    body = "".join(ca.pem(certs[label]) for label in (ca.ROOT, *ca.INTERMEDIATES))
    return Response(body, media_type="application/x-pem-file")


@router.get("/pki/device-root.crl", response_class=Response)
def device_root_crl(request: Request) -> Response:
    state = state_of(request)
    with state.db.transaction() as session:
        der = ca.device_root_crl(session, state.pki, timedelta(seconds=state.config.crl_validity_s))
    return Response(der, media_type="application/pkix-crl")
