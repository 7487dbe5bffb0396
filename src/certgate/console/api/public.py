"""Unauthenticated endpoints: health, trust anchors, the Device Root CRL."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from certgate.console import health
from certgate.console.api.deps import state_of
from certgate.console.services import ca
from certgate.httperrors import RETRY_AFTER_S

router = APIRouter()


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Ready to serve: 200 when every check in ``console.health`` passes, else 503 naming
    the failed checks (a load balancer takes this console out; ``/livez`` stays 200)."""
    checks = health.run_checks(state_of(request))
    failed = {name: why for name, why in checks.items() if why != "ok"}
    if not failed:
        return JSONResponse({"status": "ok", "checks": checks})
    detail = "; ".join(f"{name}: {why}" for name, why in failed.items())
    body = {"error": "unhealthy", "detail": detail, "checks": checks}
    return JSONResponse(body, status_code=503, headers={"retry-after": str(RETRY_AFTER_S)})


@router.get("/livez")
def livez() -> dict[str, str]:
    """Alive: answered by the event loop without touching storage or keys, so a supervisor
    restarts a hung process, not one that waits for its disk."""
    return {"status": "alive"}


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
    return Response(cached.der, media_type="application/pkix-crl")
