"""Dry-runs (``?dry_run=true``) against a real console process on each backend, over mTLS.

A node's report goes in through the real report route with the group's tunnel identity.
Each dry-run is then checked against the real change made right after it: the dry-run
must name exactly what the feed operations the change commits refuse, as judged here
directly by ``admission.admit`` and ``rules.evaluate`` (not through the dry-run's code).
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from sqlalchemy import func, select, update

from certgate.console.services import ca, feed
from certgate.console.store.models import (
    AuditEntry,
    Certificate,
    Device,
    Group,
    TunnelNode,
)
from certgate.feed import FEED_VERSION, Delete, Entry, Op, PolicyUpdate, decode_op
from certgate.tunnel.admission import AdmissionRequest, Mode, PeerIdentity, admit, peer_identity
from certgate.tunnel.report import STALE_REPORT_S
from certgate.tunnel.rules import evaluate
from tests.support import RunningConsole, make_csr

pytestmark = pytest.mark.integration

APP = "com.example.mail"
RULES = {
    "default": "deny",
    "rules": [
        {"action": "allow", "hosts": ["intranet.test"], "ports": [443]},
        {"action": "allow", "cidrs": ["10.0.0.0/8"], "ports": "any"},
    ],
}
STATUS = {"policy_version": 1, "table_seq": 0, "fresh": True, "age_s": 1.0, "restart_required": []}


@dataclass
class Holder:
    """An enrolled device, its credentials and its certificates' thumbprints."""

    uid: str
    credential: str
    user: str
    password: str
    device_tp: str = ""
    app_tp: str = ""


@dataclass
class Env:
    console: RunningConsole
    group: str
    node: httpx.Client
    holders: dict[str, Holder]
    live: list[dict[str, Any]] = field(default_factory=list)

    def admin(self) -> httpx.Client:
        return self.console.client(self.console.admins["root"])


def enroll(console: RunningConsole, group: str) -> Holder:
    user, password = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    with console.client(console.admins["root"]) as admin:
        made = admin.post(
            f"/api/v1/groups/{group}/enrollment-users",
            json={"username": user, "password": password},
        )
        assert made.status_code == 201, made.text
    with console.client() as client:
        body = {"username": user, "password": password, "platform": "ios", "name": user}
        enrolled = client.post("/api/v1/enroll", json=body)
    assert enrolled.status_code == 201, enrolled.text
    holder = Holder(enrolled.json()["device_uid"], enrolled.json()["credential"], user, password)
    with console.client(api_key=holder.credential) as device:
        profile = device.post("/api/v1/device/profile", json={"csr": make_csr()[0].decode()})
        assert profile.status_code == 201, profile.text
        holder.device_tp = profile.json()["thumbprint"]
        app = device.post(
            f"/api/v1/device/apps/{APP}/certificate",
            json={"username": user, "password": password, "csr": make_csr()[0].decode()},
        )
        assert app.status_code == 201, app.text
        holder.app_tp = app.json()["thumbprint"]
    return holder


def tunnel(holder: Holder, mode: str, host: str, port: int, address: str) -> dict[str, Any]:
    """A live tunnel as ``TunnelService.live_tunnels`` reports it."""
    return {
        "thumbprint": holder.app_tp if mode == "proxy" else holder.device_tp,
        "device_uid": holder.uid,
        "mode": mode,
        "app": APP,
        "host": host,
        "port": port,
        "addresses": [address],
        "since": time.time() - 60,
    }


def node_client(console: RunningConsole, group: str, name: str) -> httpx.Client:
    """A client holding the group's tunnel identity, naming itself ``name``."""
    with console.client(console.admins["root"]) as admin:
        bundle = admin.post(f"/api/v1/groups/{group}/tunnel/setup", json={"node_name": name})
    assert bundle.status_code == 200, bundle.text
    cert, key = console.work / f"{group}-{name}.pem", console.work / f"{group}-{name}.key"
    cert.write_text(bundle.json()["tunnel_identity"])
    key.write_text(bundle.json()["tunnel_key"])
    return httpx.Client(
        base_url=console.url,
        verify=console.ssl_context(cert, key),
        headers={"Certgate-Node": name},
        timeout=30,
    )


@pytest.fixture(scope="module")
def env(console: RunningConsole) -> Iterator[Env]:
    group = f"dry{secrets.token_hex(3)}"
    settings = {"initial_compliance": "compliant", "server_rules": RULES}
    with console.client(console.admins["root"]) as admin:
        made = admin.post("/api/v1/groups", json={"id": group, "parent_id": "global"})
        assert made.status_code == 201, made.text
        assert admin.patch(f"/api/v1/groups/{group}/settings", json=settings).status_code == 200
    holders = {name: enroll(console, group) for name in ("alice", "bob")}
    alice, bob = holders["alice"], holders["bob"]
    with node_client(console, group, "n1") as node:
        yield Env(
            console,
            group,
            node,
            holders,
            [
                tunnel(alice, "per_app", "intranet.test", 443, "10.1.2.3"),
                tunnel(alice, "proxy", "wiki.test", 443, "10.9.9.9"),
                tunnel(bob, "per_app", "10.2.3.4", 22, "10.2.3.4"),
            ],
        )


def post_report(env: Env, **status: Any) -> None:
    body = {
        "node": "n1",
        "at": time.time(),
        "live_total": len(env.live),
        "live": env.live,
        "status": {**STATUS, **status},
    }
    response = env.node.post("/api/v1/tunnel/report", json=body)
    assert response.status_code == 204, response.text


# What the console holds, read directly


def feed_seq(env: Env) -> int:
    with env.console.local() as (session, _):
        group = session.get(Group, env.group)
        assert group is not None
        return group.feed_seq


def committed_ops(env: Env, after: int) -> list[Op]:
    with env.console.local() as (session, _):
        events = feed.batch_after(session, env.group, after)
        return [decode_op(e.entry, f"seq {e.seq}", FEED_VERSION) for e in events]


def count_audit(env: Env, action: str) -> int:
    with env.console.local() as (session, _):
        query = select(func.count()).where(AuditEntry.action == action)
        return int(session.execute(query).scalar_one())


def peer_and_entry(env: Env, thumbprint: str) -> tuple[PeerIdentity, Entry | None]:
    """The certificate's admission identity, and its entry as the feed holds it now."""
    with env.console.local() as (session, _):
        cert = session.execute(
            select(Certificate).where(Certificate.thumbprint == thumbprint)
        ).scalar_one()
        peer = peer_identity(x509.load_pem_x509_certificate(cert.cert_pem.encode()))
        device = session.get(Device, cert.device_uid)
        assert device is not None
        live = cert.revoked_at is None
        return peer, feed.entry_of(cert, device) if live else None


# The expected answer: the committed operations judged by admit and evaluate


def final_entries(ops: list[Op]) -> dict[str, Entry | None]:
    """Thumbprint -> entry after the batch (None: deleted); the last operation wins."""
    final: dict[str, Entry | None] = {}
    for op in ops:
        if isinstance(op, Entry):
            final[op.thumbprint] = op
        elif isinstance(op, Delete):
            final[op.thumbprint] = None
    return final


def mode_of(peer: PeerIdentity) -> Mode:
    return Mode.PROXY if peer.identity.bundle_id else Mode.PER_APP


def expected_devices(env: Env, ops: list[Op]) -> list[dict[str, Any]]:
    refused = []
    for thumbprint, entry in sorted(final_entries(ops).items()):
        peer, _ = peer_and_entry(env, thumbprint)
        request = AdmissionRequest(table_fresh=True, app_bundle_id=peer.identity.bundle_id or APP)
        decision = admit(peer, entry, mode_of(peer), request, time.time(), env.group)
        if not decision.admitted:
            assert decision.reason is not None
            refused.append(
                {
                    "device_uid": peer.identity.device_uid,
                    "thumbprint": thumbprint,
                    "app": peer.identity.bundle_id,
                    "reason": decision.reason.value,
                }
            )
    return refused


def expected_closed(env: Env, ops: list[Op], policy_before: PolicyUpdate) -> set[tuple[str, ...]]:
    final = final_entries(ops)
    policies = [op for op in ops if isinstance(op, PolicyUpdate)]
    rules = (policies[-1] if policies else policy_before).server_rules
    closed = set()
    for t in env.live:
        if not policies and t["thumbprint"] not in final:
            continue  # the node judges only the tunnels of the certificates touched
        peer, entry_now = peer_and_entry(env, t["thumbprint"])
        entry = final.get(t["thumbprint"], entry_now)
        request = AdmissionRequest(table_fresh=True, app_bundle_id=t["app"])
        decision = admit(peer, entry, Mode(t["mode"]), request, time.time(), env.group)
        addresses = [ipaddress.ip_address(a) for a in t["addresses"]]
        if decision.admitted and evaluate(rules, t["host"], t["port"], addresses).allowed:
            continue
        reason = decision.reason.value if decision.reason else "destination_denied"
        closed.add((t["thumbprint"], f"{t['host']}:{t['port']}", reason))
    return closed


def closed_of(body: dict[str, Any]) -> set[tuple[str, ...]]:
    return {(t["thumbprint"], t["destination"], t["reason"]) for t in body["live_tunnels"]}


def current_policy(env: Env) -> PolicyUpdate:
    with env.console.local() as (session, _):
        group = session.get(Group, env.group)
        assert group is not None
        return feed.policy_of(group)


def rehearse_then_apply(
    env: Env, method: str, path: str, action: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Dry-run: nothing changes and only the dry-run is audited. Then the real change: the
    dry-run named exactly what its committed operations refuse. Returns the dry-run."""
    post_report(env)
    before, policy = feed_seq(env), current_policy(env)
    audited, rehearsed = count_audit(env, action), count_audit(env, f"{action}.dry_run")
    with env.admin() as admin:
        dry = admin.request(method, path, params={"dry_run": "true"}, json=body)
        assert dry.status_code == 200, dry.text
        assert feed_seq(env) == before and current_policy(env) == policy
        assert count_audit(env, action) == audited
        assert count_audit(env, f"{action}.dry_run") == rehearsed + 1
        real = admin.request(method, path, json=body)
        assert real.status_code == 200, real.text
    ops = committed_ops(env, before)
    answer: dict[str, Any] = dry.json()
    assert answer["dry_run"] is True
    assert answer["devices"] == expected_devices(env, ops)
    assert closed_of(answer) == expected_closed(env, ops, policy)
    assert "n1" in [n["node"] for n in answer["nodes_reporting"]]
    return answer


def set_compliance(env: Env, holder: Holder, status: str) -> None:
    with env.admin() as admin:
        path = f"/api/v1/devices/{holder.uid}/compliance"
        assert admin.put(path, json={"status": status}).status_code == 200


def set_settings(env: Env, changes: dict[str, Any]) -> None:
    with env.admin() as admin:
        path = f"/api/v1/groups/{env.group}/settings"
        assert admin.patch(path, json=changes).status_code == 200


# Tests


def test_compliance_dry_run_names_what_the_change_refuses(env: Env) -> None:
    alice = env.holders["alice"]
    try:
        answer = rehearse_then_apply(
            env,
            "PUT",
            f"/api/v1/devices/{alice.uid}/compliance",
            "device.compliance",
            {"status": "noncompliant"},
        )
    finally:
        set_compliance(env, alice, "compliant")
    assert {(d["thumbprint"], d["app"], d["reason"]) for d in answer["devices"]} == {
        (alice.device_tp, None, "noncompliant"),
        (alice.app_tp, APP, "noncompliant"),
    }
    assert closed_of(answer) == {
        (alice.device_tp, "intranet.test:443", "noncompliant"),
        (alice.app_tp, "wiki.test:443", "noncompliant"),
    }
    assert {t["node"] for t in answer["live_tunnels"]} == {"n1"}


def test_server_rules_dry_run_names_the_tunnels_the_rules_close(env: Env) -> None:
    rules = {
        "default": "deny",
        "rules": [
            {"action": "deny", "hosts": ["intranet.test"]},
            {"action": "allow", "cidrs": ["10.0.0.0/8"]},
        ],
    }
    path = f"/api/v1/groups/{env.group}/settings"
    try:
        answer = rehearse_then_apply(env, "PATCH", path, "group.settings", {"server_rules": rules})
    finally:
        set_settings(env, {"server_rules": RULES})
    alice = env.holders["alice"]
    assert answer["devices"] == []
    assert closed_of(answer) == {(alice.device_tp, "intranet.test:443", "destination_denied")}
    assert "rule 0" in answer["live_tunnels"][0]["detail"]


def test_a_udp_tunnel_is_judged_by_the_rules_for_udp(env: Env) -> None:
    """A node reports UDP tunnels with ``"transport": "udp"``; a dry-run judges them with
    the rules for UDP, which a rule set without ``protocols`` does not open."""
    udp = {
        **tunnel(env.holders["alice"], "per_app", "10.5.5.5", 53, "10.5.5.5"),
        "transport": "udp",
    }
    env.live.append(udp)
    path = f"/api/v1/groups/{env.group}/settings"
    tcp_only = {"default": "allow", "rules": []}
    udp_too = {
        "default": "allow",
        "rules": [{"action": "allow", "cidrs": ["10.0.0.0/8"], "protocols": ["udp"]}],
    }
    try:
        post_report(env)
        with env.admin() as admin:
            answers = [
                admin.patch(path, params={"dry_run": "true"}, json={"server_rules": rules})
                for rules in (tcp_only, udp_too)
            ]
    finally:
        env.live.remove(udp)
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    closed = answers[0].json()["live_tunnels"]
    assert [(t["destination"], t["reason"]) for t in closed] == [
        ("10.5.5.5:53", "destination_denied")
    ]
    assert "refuse udp to 10.5.5.5:53" in closed[0]["detail"]
    assert answers[1].json()["live_tunnels"] == []


def test_block_dry_run_names_every_certificate_of_the_device(env: Env) -> None:
    bob = env.holders["bob"]
    try:
        answer = rehearse_then_apply(
            env, "POST", f"/api/v1/devices/{bob.uid}/block", "device.block"
        )
    finally:
        with env.admin() as admin:
            assert admin.post(f"/api/v1/devices/{bob.uid}/unblock").status_code == 200
    assert {d["reason"] for d in answer["devices"]} == {"blocked"}
    assert {d["thumbprint"] for d in answer["devices"]} == {bob.device_tp, bob.app_tp}
    assert closed_of(answer) == {(bob.device_tp, "10.2.3.4:22", "blocked")}


def test_unenroll_dry_run_names_the_deleted_certificates(env: Env) -> None:
    carol = enroll(env.console, env.group)
    env.live.append(tunnel(carol, "per_app", "intranet.test", 443, "10.1.2.3"))
    try:
        answer = rehearse_then_apply(
            env, "POST", f"/api/v1/devices/{carol.uid}/unenroll", "device.unenroll"
        )
    finally:
        env.live.pop()
    # The batch publishes "unenrolled", then deletes: a node ends without the entries.
    assert {(d["thumbprint"], d["reason"]) for d in answer["devices"]} == {
        (carol.device_tp, "unknown_thumbprint"),
        (carol.app_tp, "unknown_thumbprint"),
    }
    assert closed_of(answer) == {(carol.device_tp, "intranet.test:443", "unknown_thumbprint")}


def test_a_lowered_staleness_budget_closes_nothing_at_once(env: Env) -> None:
    """A node applies the policy from a successful exchange, which restarts its budget: a
    budget below the node's reported table age does not close its tunnels."""
    post_report(env, age_s=100.0)
    path = f"/api/v1/groups/{env.group}/settings"
    try:
        answer = rehearse_then_apply(
            env, "PATCH", path, "group.settings", {"feed": {"max_staleness_s": 60}}
        )
    finally:
        set_settings(env, {"feed": {"max_staleness_s": 300}})
    assert answer["devices"] == [] and answer["live_tunnels"] == []


def test_a_stale_report_is_listed_and_its_tunnels_not_judged(env: Env) -> None:
    post_report(env)
    with env.console.local() as (session, _):
        old = ca.now() - timedelta(seconds=STALE_REPORT_S + 5)
        session.execute(
            update(TunnelNode)
            .where(TunnelNode.group_id == env.group, TunnelNode.name == "n1")
            .values(reported_at=old)
        )
    alice = env.holders["alice"]
    with env.admin() as admin:
        response = admin.put(
            f"/api/v1/devices/{alice.uid}/compliance",
            params={"dry_run": "true"},
            json={"status": "noncompliant"},
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["live_tunnels"] == [] and answer["nodes_reporting"] == []
    [stale] = [n for n in answer["stale_reports"] if n["node"] == "n1"]
    assert stale["age_s"] > STALE_REPORT_S and stale["live"] == len(env.live)
    assert {d["thumbprint"] for d in answer["devices"]} == {alice.device_tp, alice.app_tp}


def test_a_node_that_never_reported_is_listed_as_stale(env: Env) -> None:
    node_client(env.console, env.group, "n-silent").close()
    post_report(env)
    with env.admin() as admin:
        response = admin.patch(
            f"/api/v1/groups/{env.group}/settings",
            params={"dry_run": "true"},
            json={"server_rules": RULES},
        )
    assert response.status_code == 200, response.text
    [silent] = [n for n in response.json()["stale_reports"] if n["node"] == "n-silent"]
    assert silent["reported_at"] is None and silent["live"] == 0


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "phrase"),
    [
        ("PATCH", "/api/v1/groups/{g}/settings", {"server_rules": {"x": 1}}, 422, "server_rules.x"),
        (
            "PATCH",
            "/api/v1/groups/{g}/settings",
            {"feed": {"long_poll_s": 200}},  # merged: over half of the stored staleness
            400,
            "long_poll_s must be at most half",
        ),
        ("PATCH", "/api/v1/groups/{g}/settings", {"colour": "red"}, 422, "colour"),
        ("PATCH", "/api/v1/groups/nope/settings", {"server_rules": RULES}, 404, "not found"),
        ("PUT", "/api/v1/devices/{uid}/compliance", {"status": "great"}, 422, "status"),
        ("PUT", "/api/v1/devices/" + "0" * 32 + "/compliance", {"status": "compliant"}, 404, ""),
        ("POST", "/api/v1/devices/{uid}/explode", None, 404, "no device action"),
    ],
)
def test_a_dry_run_refuses_what_the_real_call_refuses(
    env: Env, method: str, path: str, body: Any, status: int, phrase: str
) -> None:
    path = path.format(g=env.group, uid=env.holders["alice"].uid)
    before = feed_seq(env)
    with env.admin() as admin:
        dry = admin.request(method, path, params={"dry_run": "true"}, json=body)
        real = admin.request(method, path, json=body)
    assert (dry.status_code, real.status_code) == (status, status), dry.text
    assert dry.json() == real.json() and phrase in dry.json()["detail"]
    assert feed_seq(env) == before


def test_a_dry_run_needs_the_permission_of_the_change(env: Env) -> None:
    reader = env.console.make_admin(f"ro{secrets.token_hex(3)}", "read-only", env.group)
    uid = env.holders["alice"].uid
    with env.console.client(reader) as client:
        response = client.put(
            f"/api/v1/devices/{uid}/compliance",
            params={"dry_run": "true"},
            json={"status": "noncompliant"},
        )
    assert response.status_code == 403, response.text


# The report route


def test_a_report_is_kept_as_the_node_sent_it(env: Env) -> None:
    post_report(env, table_seq=7)
    with env.console.local() as (session, _):
        node = session.execute(
            select(TunnelNode).where(TunnelNode.group_id == env.group, TunnelNode.name == "n1")
        ).scalar_one()
        assert node.report is not None and node.reported_at is not None
        assert node.report["live"] == env.live and node.report["status"]["table_seq"] == 7


def report_with(**changes: Any) -> dict[str, Any]:
    live = {
        "thumbprint": "a" * 64,
        "device_uid": "b" * 32,
        "mode": "per_app",
        "app": APP,
        "host": "intranet.test",
        "port": 443,
        "addresses": ["10.1.2.3"],
        "since": 1.0,
    }
    body = {"node": "n1", "at": 1.0, "live_total": 1, "live": [live], "status": dict(STATUS)}
    for key, value in changes.items():
        target = live if key in live else body["status"] if key in STATUS else body
        target[key] = value
    return body


@pytest.mark.parametrize(
    "body",
    [
        report_with(extra=1),
        report_with(addresses=["10.1.2.300"]),
        report_with(port="443"),
        report_with(mode="socks"),
        report_with(thumbprint="A" * 64),
        report_with(host="h" * 256),
        report_with(live_total=0),
        report_with(restart_required=["x"] * 9),
        report_with(table_seq=-1),
    ],
)
def test_a_malformed_report_is_422(env: Env, body: dict[str, Any]) -> None:
    assert env.node.post("/api/v1/tunnel/report", json=body).status_code == 422


def test_a_report_must_name_a_registered_node_of_the_tunnel_identity(env: Env) -> None:
    body = report_with()
    assert env.node.post("/api/v1/tunnel/report", json=report_with(node="n2")).status_code == 400
    headers = {"Certgate-Node": "ghost"}
    ghost = env.node.post("/api/v1/tunnel/report", json=report_with(node="ghost"), headers=headers)
    assert ghost.status_code == 404, ghost.text
    with env.admin() as admin:
        assert admin.post("/api/v1/tunnel/report", json=body).status_code == 401


def test_a_report_needs_the_node_header(env: Env) -> None:
    client = env.node
    request = client.build_request("POST", "/api/v1/tunnel/report", json=report_with())
    del request.headers["Certgate-Node"]
    assert client.send(request).status_code == 400
