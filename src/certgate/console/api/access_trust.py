"""The Device Roots Access and its cert proxy trust, for Access nodes (``access/trust.py``).

``GET /api/v1/access/device-roots`` lists every Device Root a device certificate may chain
to now, as the tunnel nodes get them in their trust config (``InstancePKI.device_roots``):
the current one first, then a rotation's next or retiring one; a retired one is not
listed. Each comes with its row label, whose CRL is ``/pki/crl/<label>.crl``. The caller is
an admin (API key AND client certificate) who may read devices somewhere: Access's role
``access`` (or ``read-only``), over the mTLS channel Access pins to the console's Root.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from certgate.console.api import schemas as s
from certgate.console.api.deps import admin_tx, state_of
from certgate.console.services import ca, rbac
from certgate.console.services.rbac import Permission as P

router = APIRouter(prefix="/api/v1/access", responses=s.CALL_ERRORS)


class DeviceRootOut(BaseModel):
    label: str = Field(max_length=64, examples=["device-root@7"])
    status: Literal["current", "next", "retiring"]
    certificate: str = Field(max_length=16384, description="PEM")


class DeviceRootsOut(BaseModel):
    device_roots: list[DeviceRootOut] = Field(min_length=1, max_length=3)
    # The instance Roots (two during a Root rotation, the current one first) and the
    # rotation's cross certificates, which vouch for the Root Access does not pin yet.
    roots: list[str] = Field(min_length=1, max_length=2, description="PEM")
    root_cross: list[str] = Field(max_length=2, description="PEM")


@router.get("/device-roots")
def device_roots(request: Request) -> DeviceRootsOut:
    pki = state_of(request).pki
    with admin_tx(request) as (session, who):
        rbac.require_somewhere(session, who.admin, P.DEVICES_READ)
        pki.refresh(session, 0)  # never list a Device Root another process retired
        trusted = pki.trusted_device_roots()
        roots, crosses = pki.roots(), pki.root_crosses()
    return DeviceRootsOut(
        roots=[ca.pem(c) for c in roots],
        root_cross=[ca.pem(c) for c in crosses],
        device_roots=[
            DeviceRootOut(label=label, status=status, certificate=ca.pem(cert))  # type: ignore[arg-type]
            for label, status, cert in trusted
        ],
    )
