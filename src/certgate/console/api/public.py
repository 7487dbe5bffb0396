"""Unauthenticated endpoints: health, trust anchors, the Device Root CRL."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from certgate.console import health
from certgate.console.api import schemas as s
from certgate.console.api.deps import state_of
from certgate.console.services import ca
from certgate.errors import NotFound
from certgate.httperrors import RETRY_AFTER_S
from certgate.pki import expiry

PEM, CRL = "application/x-pem-file", "application/pkix-crl"
router = APIRouter(responses=s.error_responses(*s.ANY_REQUEST))


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Ready to serve: 200 when every check in ``console.health`` passes, else 503 naming
    the failed checks (a load balancer takes this console out; ``/livez`` stays 200). Also
    the certificates the console presents or issues with and their time to expiry, and a
    warning for each within its renewal window (``pki.expiry``, the rule the nodes use)."""
    state = state_of(request)
    checks = health.run_checks(state)
    certs = [c.to_dict() for c in state.certificates_in_use(time.time())]
    body: dict[str, Any] = {
        "status": "ok",
        "checks": checks,
        "certificates": certs,
        "warnings": expiry.warnings(
            certs,
            "renew it (the console renews its TLS certificate"
            " and the group identities itself; CAs: certgate console rotate {name} ...)",
        ),
    }
    failed = {name: why for name, why in checks.items() if why != "ok"}
    if not failed:
        return JSONResponse(body)
    detail = "; ".join(f"{name}: {why}" for name, why in failed.items())
    body.update(status="unhealthy", error="unhealthy", detail=detail)
    return JSONResponse(body, status_code=503, headers={"retry-after": str(RETRY_AFTER_S)})


@router.get("/livez")
def livez() -> dict[str, str]:
    """Alive: answered by the event loop without touching storage or keys, so a supervisor
    restarts a hung process, not one that waits for its disk."""
    return {"status": "alive"}


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
    """The current Device Root's CRL."""
    state = state_of(request)
    return _crl(request, state.pki.label(ca.DEVICE_ROOT))


@router.get(
    "/pki/crl/{label}.crl",
    response_class=Response,
    responses={**s.error_responses(404, 422), **s.binary_answer("DER", CRL)},
)
def device_root_crl_of(request: Request, label: str) -> Response:
    """The CRL of any Device Root of the instance by its label (``device-root``,
    ``device-root@7``): a superseded or retired one publishes its revocations here."""
    pki = state_of(request).pki
    if ca.role_of(label) != ca.DEVICE_ROOT or label not in {pki.label(ca.DEVICE_ROOT), *pki.others}:
        raise NotFound(f"no Device Root {label!r}")
    return _crl(request, label)


def _crl(request: Request, label: str) -> Response:
    """Re-signed only when a revocation was recorded since, or when a quarter of its
    validity has passed: this endpoint is public, so a GET must not cost a signature and
    a write."""
    state = state_of(request)
    validity = timedelta(seconds=state.config.crl_validity_s)
    with state.crl_lock:
        with state.db.transaction() as session:
            marker = ca.revocation_marker(session, label, state.pki.family(label))
            cached = state.crl_cache.get(label)
            if cached is None or cached.marker != marker or cached.age() > validity / 4:
                der = ca.device_root_crl(session, state.pki, validity, label)
                cached = state.crl_cache[label] = ca.CachedCRL(der, marker)
    return Response(cached.der, media_type=CRL)
