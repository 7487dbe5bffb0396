"""Renewal before expiry over the API: ``POST /api/v1/rotations/renew``.

What ``certgate console rotate renew`` does on the console host (``rotation.renew_audited``):
every group identity within 30 days of its end is rotated, and such rotations nothing
depends on any more are finished. Instance-wide, so a top-level superadmin's (403
otherwise). The remote CLI's ``rotate renew`` calls it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from certgate.console.api import schemas as s
from certgate.console.api.deps import admin_tx, state_of
from certgate.console.services import rbac, rotation

router = APIRouter(prefix="/api/v1/rotations", responses=s.CALL_ERRORS)


@router.post("/renew")
def renew(request: Request) -> list[dict[str, Any]]:
    """The rotations this renewal started, switched or finished (an empty list: none due)."""
    with admin_tx(request) as (session, who):
        rbac.require_global(session, who.admin, "renewing every group's identities")
        return rotation.renew_audited(session, state_of(request).pki, request.state.actor)
