"""Unauthenticated endpoints: health, trust anchors, the Device Root CRL."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response

from certgate.console.api import schemas as s
from certgate.console.api.deps import state_of
from certgate.console.services import ca

PEM, CRL = "application/x-pem-file", "application/pkix-crl"
router = APIRouter(responses=s.error_responses(*s.ANY_REQUEST))


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/pki/root.pem", response_class=Response, responses=s.binary_answer("PEM", PEM))
def root_pem(request: Request) -> Response:
    return Response(ca.pem(state_of(request).pki.certs[ca.ROOT]), media_type=PEM)


@router.get("/pki/chain.pem", response_class=Response, responses=s.binary_answer("PEM", PEM))
def chain_pem(request: Request) -> Response:
    """Root, Secure Channel Root, Device Root and Admin CA, in that order."""
    certs = state_of(request).pki.certs
    body = "".join(ca.pem(certs[label]) for label in (ca.ROOT, *ca.INTERMEDIATES))
    return Response(body, media_type=PEM)


@router.get("/pki/device-root.crl", response_class=Response, responses=s.binary_answer("DER", CRL))
def device_root_crl(request: Request) -> Response:
    """The Device Root CRL. Re-signed only when a revocation was recorded since, or when a
    quarter of its validity has passed: this endpoint is public, so a GET must not cost a
    signature and a write."""
    state = state_of(request)
    validity = timedelta(seconds=state.config.crl_validity_s)
    with state.crl_lock:
        with state.db.transaction() as session:
            marker = ca.revocation_marker(session)
            cached = state.crl_cache
            if cached is None or cached.marker != marker or cached.age() > validity / 4:
                cached = ca.CachedCRL(ca.device_root_crl(session, state.pki, validity), marker)
                state.crl_cache = cached
    return Response(cached.der, media_type=CRL)
