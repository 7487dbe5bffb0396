"""Tests for certgate.console.services.rotation: the one state machine, and the rotation
API on a real console (both storage backends): precise refusals with the JSON error body,
finish refused while something depends on the old identity, a forced finish audited,
a tunnel-name change turned into a rotation, the CLI on the same service."""

from __future__ import annotations

import itertools
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from certgate.cli import app
from certgate.console.services import ca, rotation
from certgate.console.services.rotation import Phase, next_phase
from certgate.errors import Conflict
from certgate.feed import RotationPhase
from certgate.pki.profiles import RENEWAL_WINDOW, TUNNEL_IDENTITY
from certgate.tunnel.config import TunnelState
from tests.support import RunningConsole
from tests.tunnel.conftest import COMPLIANT, create_group, setup_node, tunnel_client

pytestmark = pytest.mark.integration  # a real console process

ROTATIONS = "/api/v1/groups/{}/rotations"


@pytest.mark.parametrize(
    ("current", "step"),
    [
        (current, step)
        for current, step in itertools.product([None, *Phase], RotationPhase)
        if (current, step)
        not in {
            (None, RotationPhase.PREPARE),
            (Phase.PREPARED, RotationPhase.SWITCH),
            (Phase.SWITCHED, RotationPhase.FINISH),
        }
    ],
)
def test_every_other_step_is_refused(current: Phase | None, step: RotationPhase) -> None:
    with pytest.raises(Conflict, match=f"cannot {step.value}"):
        next_phase(current, step)


def test_the_three_steps_in_order() -> None:
    phase = next_phase(None, RotationPhase.PREPARE)
    phase = next_phase(phase, RotationPhase.SWITCH)
    assert next_phase(phase, RotationPhase.FINISH) is Phase.FINISHED


@pytest.fixture
def group(console: RunningConsole) -> str:
    return create_group(console, COMPLIANT)


def call(console: RunningConsole, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with console.client(console.admins["root"]) as client:
        return client.request(method, path, **kwargs)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    return str(body["detail"])


def test_unknown_kinds_are_refused(console: RunningConsole, group: str) -> None:
    unknown = call(console, "POST", ROTATIONS.format(group) + "/leaf")
    assert "unknown rotation kind 'leaf'" in error_of(unknown, 400)


def test_steps_out_of_order_are_refused(console: RunningConsole, group: str) -> None:
    base = ROTATIONS.format(group) + "/tunnel-identity"
    assert "no tunnel-identity rotation" in error_of(call(console, "POST", base + "/switch"), 404)
    assert call(console, "POST", base).status_code == 201
    assert "already running" in error_of(call(console, "POST", base), 409)
    early = call(console, "POST", base + "/finish")
    assert "cannot finish: the rotation is prepared" in error_of(early, 409)


def test_finish_waits_for_nodes_and_the_overlap_unless_forced(
    console: RunningConsole, group: str, tmp_path: Path
) -> None:
    node = setup_node(console, group, tmp_path / "node", "node-a")
    base = ROTATIONS.format(group) + "/tunnel-identity"
    started = call(console, "POST", base, json={"overlap_s": 3600})
    assert started.status_code == 201, started.text
    old, new = started.json()["old"]["thumbprint"], started.json()["new"]["thumbprint"]
    assert old == node.tunnel_thumbprint
    _feed_call(node)  # the node calls in with the identity it holds
    shown = call(console, "GET", ROTATIONS.format(group)).json()[0]
    assert [(n["name"], n["presents"]) for n in shown["nodes"]] == [("node-a", "old")]
    call(console, "POST", base + "/switch").raise_for_status()
    refused = error_of(call(console, "POST", base + "/finish"), 409)
    assert "node node-a still presents the old identity" in refused
    assert "the overlap runs until" in refused
    forced = call(console, "POST", base + "/finish", params={"force": "true"})
    assert forced.status_code == 200 and forced.json()["forced"] is True, forced.text
    audit = call(console, "GET", "/api/v1/audit", params={"group_id": group}).json()
    actions = [entry["action"] for entry in audit]
    assert {"rotation.prepare", "rotation.switch", "rotation.finish.forced"} <= set(actions)
    certs = call(console, "GET", f"/api/v1/groups/{group}/certificates").json()
    by_thumb = {c["thumbprint"]: c for c in certs}
    assert by_thumb[old]["revoked_at"] is not None and by_thumb[new]["revoked_at"] is None
    retired = _feed_call(node)
    assert retired.status_code == 401 and "retired by rotation" in retired.json()["detail"]


def _feed_call(node: TunnelState) -> httpx.Response:
    with tunnel_client(node) as client:
        return client.get(
            "/api/v1/tunnel/feed",
            params={"after": 0, "wait": 0, "version": 3},
            headers={"Certgate-Node": node.node_name},
        )


def test_only_group_writers_rotate(console: RunningConsole, group: str) -> None:
    setup_only = console.make_admin(f"setup-only-{group}", "tunnel-setup", group)
    with console.client(setup_only) as client:
        refused = client.post(ROTATIONS.format(group) + "/tunnel-identity")
        assert refused.status_code == 403, refused.text
        assert client.get(ROTATIONS.format(group)).status_code == 200


def test_a_tunnel_name_change_is_a_rotation(console: RunningConsole, group: str) -> None:
    settings = f"/api/v1/groups/{group}/settings"
    names = {"tunnel": {"hostnames": ["localhost", "tunnel.example"]}}
    rehearsed = call(console, "PATCH", settings, params={"dry_run": "true"}, json=names)
    assert rehearsed.status_code == 200, rehearsed.text
    assert call(console, "GET", ROTATIONS.format(group)).json() == []  # rolled back
    call(console, "PATCH", settings, json=names).raise_for_status()
    (shown,) = call(console, "GET", ROTATIONS.format(group)).json()
    assert (shown["kind"], shown["phase"], shown["started_by"]) == (
        "tunnel-identity",
        "switched",
        "group.settings",
    )
    certs = call(console, "GET", f"/api/v1/groups/{group}/certificates").json()
    old = next(c for c in certs if c["thumbprint"] == shown["old"]["thumbprint"])
    assert old["revoked_at"] is None  # still accepted from nodes until finish


def test_the_cli_runs_the_same_service(console: RunningConsole, group: str) -> None:
    runner = CliRunner()
    data_dir = str(console.data_dir)
    started = runner.invoke(
        app, ["console", "rotate", "tunnel-identity", group, "-d", data_dir, "--overlap", "0s"]
    )
    assert started.exit_code == 0, started.output
    assert "prepared" in started.output
    switched = runner.invoke(
        app, ["console", "rotate", "switch", "tunnel-identity", group, "-d", data_dir, "--json"]
    )
    assert switched.exit_code == 0 and json.loads(switched.stdout)["phase"] == "switched"
    status = runner.invoke(app, ["console", "rotate", "status", group, "-d", data_dir])
    assert status.exit_code == 0 and "switched" in status.output
    bad = runner.invoke(
        app, ["console", "rotate", "tunnel-identity", group, "-d", data_dir, "--overlap", "soon"]
    )
    assert bad.exit_code == 1
    finished = runner.invoke(
        app, ["console", "rotate", "finish", "tunnel-identity", group, "-d", data_dir]
    )
    assert finished.exit_code == 0, finished.output
    audit = call(console, "GET", "/api/v1/audit", params={"group_id": group}).json()
    assert any(e["action"] == "rotation.finish" and e["actor"].startswith("cli:") for e in audit)


def test_renewal_rotates_identities_near_their_end(console: RunningConsole, group: str) -> None:
    with console.local() as (session, pki):
        assert all(r.group_id != group for r in rotation.renew_due(session, pki))
    with console.local() as (session, pki):
        late = ca.now() + TUNNEL_IDENTITY.validity - RENEWAL_WINDOW + timedelta(days=1)
        started = [r for r in rotation.renew_due(session, pki, late) if r.group_id == group]
        assert [(r.kind, r.phase, r.started_by) for r in started] == [
            ("tunnel-identity", "switched", "renewal")
        ]
    with console.local() as (session, pki):  # once switched, a later run does not start another
        assert all(r.group_id != group for r in rotation.renew_due(session, pki, late))
