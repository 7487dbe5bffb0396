"""Unauthenticated endpoints: health, trust anchors, the Device Root CRL."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response

from certgate.console.api.deps import state_of
from certgate.console.services import ca
from certgate.errors import NotFound
from certgate.pki import expiry

router = APIRouter()


@router.get("/healthz")
def healthz(request: Request) -> dict[str, Any]:
    """Up; the certificates the console presents or issues with and their time to
    expiry, and a warning for each within its renewal window (``pki.expiry``, the rule the
    nodes use)."""
    certs = [c.to_dict() for c in state_of(request).certificates_in_use(time.time())]
    return {
        "status": "ok",
        "certificates": certs,
        "warnings": expiry.warnings(
            certs,
            "renew it (the console renews its TLS certificate"
            " and the group identities itself; CAs: certgate console rotate {name} ...)",
        ),
    }


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
    """The current Device Root's CRL."""
    state = state_of(request)
    return _crl(request, state.pki.label(ca.DEVICE_ROOT))


@router.get("/pki/crl/{label}.crl", response_class=Response)
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
            marker = ca.revocation_marker(session, label)
            cached = state.crl_cache.get(label)
            if cached is None or cached.marker != marker or cached.age() > validity / 4:
                der = ca.device_root_crl(session, state.pki, validity, label)
                cached = state.crl_cache[label] = ca.CachedCRL(der, marker)
    return Response(cached.der, media_type="application/pkix-crl")
