"""``certgate console remote``: admin list/show by username, keys by username, the web
console factors (set-password, totp), and the audit chain's verification, over a real
console's API (``api/admin_accounts.py``), printed as the local commands print."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
from sqlalchemy import select, update

from certgate.console import remote
from certgate.console.store.models import AuditEntry, Certificate, GroupIdentity
from tests.console.conftest import tamper
from tests.console.test_remote import error_lines, local_run, remote_run
from tests.console.ui.support import browser
from tests.support import RunningConsole


@pytest.fixture(scope="module")
def admins(console: RunningConsole) -> None:
    """A read-only admin of `global` and a device admin of a subgroup."""
    console.make_admin("viewer2", "read-only", "global")
    with console.client(console.admins["root"]) as client:
        made = client.post("/api/v1/groups", json={"id": "branch", "parent_id": "global"})
        assert made.status_code == 201, made.text
    console.make_admin("branch-ops", "device-admin", "branch")


SAME_OUTPUT = [
    ("admin", "list"),
    ("admin", "list", "--json"),
    ("admin", "show", "viewer2"),
    ("admin", "show", "viewer2", "--json"),
    ("admin", "keys", "viewer2"),
    ("admin", "keys", "viewer2", "--json"),
]


@pytest.mark.parametrize("command", SAME_OUTPUT, ids=" ".join)
def test_remote_admin_output_equals_local(
    console: RunningConsole, admins: None, command: tuple[str, ...]
) -> None:
    remote_result = remote_run(console, console.admins["root"], *command)
    local_result = local_run(console, *command)
    assert remote_result.exit_code == 0, remote_result.output
    assert local_result.exit_code == 0, local_result.output
    assert remote_result.stdout == local_result.stdout


def test_admin_show_of_an_unknown_username_fails_as_locally(
    console: RunningConsole, admins: None
) -> None:
    remote_result = remote_run(console, console.admins["root"], "admin", "show", "nobody")
    local_result = local_run(console, "admin", "show", "nobody")
    assert remote_result.exit_code == local_result.exit_code == remote.EXIT_REFUSED
    assert (
        error_lines(remote_result)
        == error_lines(local_result)
        == ["error: admin 'nobody' not found"]
    )


def test_an_admin_lists_only_the_admins_it_manages(console: RunningConsole, admins: None) -> None:
    """A read-only admin manages itself only: the superadmin is not even shown to it."""
    viewer = console.admins["viewer2"]
    listed = remote_run(console, viewer, "admin", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [a["username"] for a in json.loads(listed.stdout)] == ["viewer2"]
    hidden = remote_run(console, viewer, "admin", "show", "root")
    assert hidden.exit_code == remote.EXIT_REFUSED and "not found" in hidden.stderr


def test_admin_listing_pages_follow_the_cursor(console: RunningConsole, admins: None) -> None:
    root = console.admins["root"]
    every = json.loads(remote_run(console, root, "admin", "list", "--json").stdout)
    assert len(every) >= 3
    first = remote_run(console, root, "admin", "list", "--limit", "1", "--json")
    assert [a["username"] for a in json.loads(first.stdout)] == [every[0]["username"]]
    assert "--all lists every page" in first.stderr
    paged = remote_run(console, root, "admin", "list", "--limit", "1", "--all", "--json")
    assert json.loads(paged.stdout) == every


def test_audit_verify_reads_as_locally(console: RunningConsole, admins: None) -> None:
    remote_result = remote_run(console, console.admins["root"], "audit", "verify", "--json")
    local_result = local_run(console, "audit", "verify", "--json")
    assert remote_result.exit_code == local_result.exit_code == 0, remote_result.output
    verdict = json.loads(remote_result.stdout)
    assert verdict == json.loads(local_result.stdout)
    assert verdict["ok"] and verdict["chain_ok"] and verdict["entries"] > 0
    text = remote_run(console, console.admins["root"], "audit", "verify")
    assert f"audit chain OK: {verdict['entries']} entries" in text.stdout


def test_audit_verify_needs_audit_read_on_the_top_group(
    console: RunningConsole, admins: None
) -> None:
    denied = remote_run(console, console.admins["branch-ops"], "audit", "verify")
    assert denied.exit_code == remote.EXIT_FORBIDDEN, denied.output
    assert "audit:read" in denied.stderr and denied.stdout == ""


def test_web_console_factors_set_remotely_sign_in(console: RunningConsole, admins: None) -> None:
    """set-password (from $CERTGATE_ADMIN_PASSWORD, no flag) and totp by username, then a
    real web sign-in with both factors; both changes audited."""
    root = console.admins["root"]
    password = "remote set password"
    env = {"CERTGATE_ADMIN_PASSWORD": password}
    set_result = remote_run(console, root, "admin", "set-password", "viewer2", env=env)
    assert set_result.exit_code == 0, set_result.output
    assert set_result.stdout.strip() == "web console password of viewer2 set"
    made = remote_run(console, root, "admin", "totp", "viewer2")
    assert made.exit_code == 0, made.output
    uri = made.stdout.split("TOTP URI (shown once): ")[1].strip()
    code = pyotp.TOTP(parse_qs(urlsplit(uri).query)["secret"][0]).now()
    with browser(console) as client:
        form = {"username": "viewer2", "password": password, "code": code}
        assert client.post("/ui/login", data=form).status_code == 303
    with console.local() as (session, _):
        actions = session.execute(
            select(AuditEntry.action).where(AuditEntry.actor == "admin:root")
        ).scalars()
        assert {"admin.set_password", "admin.totp"} <= set(actions)


def test_factors_of_an_admin_the_caller_does_not_manage_are_refused(
    console: RunningConsole, admins: None
) -> None:
    viewer, root_id = console.admins["viewer2"], console.admins["root"].id
    for command in (("set-password", root_id), ("totp", root_id)):
        env = {"CERTGATE_ADMIN_PASSWORD": "a long enough one"}
        denied = remote_run(console, viewer, "admin", *command, env=env)
        assert denied.exit_code == remote.EXIT_FORBIDDEN, denied.output
    short = remote_run(
        console, console.admins["root"], "admin", "set-password", "viewer2",
        env={"CERTGATE_ADMIN_PASSWORD": "short"},
    )  # fmt: skip
    assert short.exit_code == remote.EXIT_REFUSED and "password" in short.stderr


def test_remote_rotate_renew_reads_as_local_and_renews_what_is_due(
    console: RunningConsole, admins: None
) -> None:
    root = console.admins["root"]
    remote_result = remote_run(console, root, "rotate", "renew")
    local_result = local_run(console, "rotate", "renew")
    assert remote_result.exit_code == local_result.exit_code == 0, remote_result.output
    assert remote_result.stdout == local_result.stdout == "nothing is due for renewal\n"
    denied = remote_run(console, console.admins["viewer2"], "rotate", "renew")
    assert denied.exit_code == remote.EXIT_FORBIDDEN and "top-level superadmin" in denied.stderr
    with console.local() as (session, _):
        pair = session.get(GroupIdentity, "branch")
        assert pair is not None
        serial = pair.tunnel_serial
    soon = datetime.now(UTC) + timedelta(days=2)  # within the 30-day renewal window
    tamper(console.data_dir, update(Certificate).where(Certificate.serial == serial).values(
        not_after=soon))  # fmt: skip
    renewed = remote_run(console, root, "rotate", "renew", "--json")
    assert renewed.exit_code == 0, renewed.output
    [rotated] = [r for r in json.loads(renewed.stdout) if r["group_id"] == "branch"]
    assert (rotated["kind"], rotated["phase"]) == ("tunnel-identity", "switched")
    with console.local() as (session, _):
        pair = session.get(GroupIdentity, "branch")
        assert pair is not None and pair.tunnel_serial != serial
        moved = (
            session.execute(
                select(AuditEntry).where(AuditEntry.action == "rotation.renew.switched")
            )
            .scalars()
            .all()
        )
    assert [(e.actor, e.group_id) for e in moved] == [("admin:root", "branch")]


def test_a_broken_chain_fails_remote_verify_as_local(console: RunningConsole, admins: None) -> None:
    """Last in the module: it edits an entry of the module's console."""
    with console.client(console.admins["root"]) as client:  # audited: entry 2 exists
        made = client.post("/api/v1/groups", json={"id": "branch2", "parent_id": "global"})
        assert made.status_code == 201, made.text
    tamper(
        console.data_dir,
        update(AuditEntry).where(AuditEntry.id == 2).values(actor="cli:mallory"),
    )
    remote_result = remote_run(console, console.admins["root"], "audit", "verify")
    local_result = local_run(console, "audit", "verify")
    assert remote_result.exit_code == local_result.exit_code == 1, remote_result.output
    assert error_lines(remote_result) == error_lines(local_result)
    assert "audit chain BROKEN at entry 2" in remote_result.stderr
    as_json = json.loads(remote_run(console, console.admins["root"], "audit", "verify",
                                    "--json").stdout)  # fmt: skip
    assert as_json["ok"] is False and as_json["first_bad_id"] == 2
