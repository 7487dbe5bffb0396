"""Per-request plumbing shared by the routers: state, credentials, authenticated units of
work. Handlers stay thin: authenticate here, authorize with ``rbac.require``, act via
services, audit, return."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastapi import Request
from sqlalchemy.orm import Session

from certgate.console.services import admins, ca, devices, tunnels
from certgate.console.services.admins import AdminPrincipal
from certgate.console.state import ConsoleState
from certgate.console.store.models import Device
from certgate.httpserver import peer_cert_der

NODE_HEADER = "certgate-node"
T = TypeVar("T")


def state_of(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@contextmanager
def admin_tx(
    request: Request, group_id: str | None = None
) -> Iterator[tuple[Session, AdminPrincipal]]:
    """A transaction whose caller is an admin proven by API key AND client certificate."""
    state = state_of(request)
    request.state.group_id = group_id
    with state.db.transaction() as session:
        principal = admins.authenticate(
            session, state.pki, bearer(request), peer_cert_der(request.scope), ca.now()
        )
        request.state.actor = f"admin:{principal.admin.username}"
        yield session, principal


@contextmanager
def device_tx(request: Request) -> Iterator[tuple[Session, Device]]:
    state = state_of(request)
    with state.db.transaction() as session:
        device = devices.authenticate_device(session, bearer(request))
        request.state.actor = device_actor(device)
        request.state.group_id = device.group_id
        yield session, device


def device_actor(device: Device) -> str:
    return f"device:{device.uid}"


async def as_device(request: Request, act: Callable[[Session, Device], T]) -> T:
    """``act`` for the device proven by the request's credential, run by the writer with
    other requests in one group commit; returns once that transaction has committed. A
    failure after authentication is audited with the device as actor, as in ``device_tx``."""
    credential = bearer(request)
    caller: dict[str, str] = {}

    def work(session: Session) -> T:
        device = devices.authenticate_device(session, credential)
        caller.update(actor=device_actor(device), group_id=device.group_id)
        return act(session, device)

    try:
        return await state_of(request).writer.run(work)
    finally:
        for key, value in caller.items():
            setattr(request.state, key, value)


@contextmanager
def tunnel_tx(request: Request) -> Iterator[tuple[Session, str]]:
    state = state_of(request)
    with state.db.transaction() as session:
        peer = tunnels.tunnel_group_of(session, state.pki, peer_cert_der(request.scope))
        request.state.actor = f"tunnel:{peer.group_id}"
        request.state.group_id = peer.group_id
        node = request.headers.get(NODE_HEADER)
        if node:
            tunnels.touch_node(session, peer, node)
        yield session, peer.group_id
