"""``certgate console``: typer's CliRunner for most commands, real processes for a few.

Every command opens a fresh data directory made by ``init_console``; assertions look at
what the command printed, the files it wrote and the rows it committed.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from certgate.cli import app
from certgate.console import local
from certgate.console.services import ca, devices, tunnels
from certgate.console.services.rbac import ROLES
from certgate.console.services.secrets import sha256_hex
from certgate.console.store.models import (
    Admin,
    ApiKey,
    AuditEntry,
    Certificate,
    Device,
    EnrollmentUser,
    FeedEvent,
    Group,
    GroupIdentity,
    TunnelNode,
)
from certgate.errors import AuthError
from certgate.pki.keystore import ENV_VAR
from certgate.pki.thumbprint import thumbprint
from certgate.tunnel.rules import RuleSet
from tests.support import CERTGATE, init_console, make_csr, start_console

runner = CliRunner()
# Wide output so table cells are never cut; secrets must not depend on it (checked below
# by the subprocess tests, whose output is not a terminal and so 80 columns wide).
BASE_ENV: dict[str, str | None] = {
    "COLUMNS": "200",
    ENV_VAR: None,
    "CERTGATE_CONSOLE_DIR": None,
    "CERTGATE_P12_PASSWORD": None,
    "CERTGATE_ENROLL_PASSWORD": None,
    "CERTGATE_BACKUP_PASSPHRASE": None,
}
API_KEY_RE = re.compile(r"\bcgk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\b")
ENROLL_TOKEN_RE = re.compile(r"\bcge_[0-9a-f]{16}_[A-Za-z0-9_-]{43}\b")
THUMBPRINT_LINE_RE = re.compile(r"^\s+([a-z-]+)\s+([0-9a-f]{64})\s", re.MULTILINE)
PASSWORD = "correct horse battery"
ACTOR = f"cli:{getpass.getuser()}"
SUBPROCESS_TIMEOUT_S = 60


def invoke(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    # catch_exceptions=False: a crash must surface as a traceback, not as "exit code 1".
    return runner.invoke(
        app, ["console", *args], env={**BASE_ENV, **(env or {})}, catch_exceptions=False
    )


def succeed(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, result.output
    return result


def refuse(*args: str, env: Mapping[str, str | None] | None = None) -> str:
    """Run a command that must fail cleanly; return its error output."""
    result = invoke(*args, env=env)
    assert result.exit_code == 1, result.output
    assert "error:" in result.stderr
    return result.stderr


def run_certgate(*args: str) -> subprocess.CompletedProcess[str]:
    """``certgate ARGS`` in a real process, without the caller's CERTGATE_* settings."""
    env = {k: v for k, v in os.environ.items() if k not in BASE_ENV}
    return subprocess.run(
        [*CERTGATE, *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
        env=env,
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def transaction(data_dir: Path) -> Iterator[tuple[Session, ca.InstancePKI]]:
    db, pki = local.open_db(local.load_config(data_dir))
    try:
        with db.transaction() as session:
            yield session, pki
    finally:
        db.dispose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory, _ = init_console(tmp_path)
    return directory


def enroll_device(data_dir: Path, owner: str = "alice") -> tuple[str, str]:
    """An enrolled device with a delivered Per-App Tunnel profile: (uid, cert serial)."""
    with transaction(data_dir) as (session, pki):
        devices.create_enrollment_user(session, local.TOP_GROUP, owner, PASSWORD)
        enrollment = devices.enroll(
            session, token=None, username=owner, password=PASSWORD, platform="linux", name="pc"
        )
        csr, _ = make_csr()
        profile = devices.deliver_profile(session, pki, enrollment.device, csr)
    cert = x509.load_pem_x509_certificate(profile["certificate"].encode())
    return enrollment.device.uid, format(cert.serial_number, "x")


def last_feed_entry(data_dir: Path) -> dict[str, object]:
    with transaction(data_dir) as (session, _):
        event = session.execute(
            select(FeedEvent).order_by(FeedEvent.seq.desc()).limit(1)
        ).scalar_one()
        return dict(event.entry)


# --- init -------------------------------------------------------------------------------


def printed_thumbprints(output: str) -> dict[str, str]:
    return dict(THUMBPRINT_LINE_RE.findall(output))


def stored_thumbprints(data_dir: Path) -> dict[str, str]:
    with transaction(data_dir) as (_, pki):
        return {label: thumbprint(cert) for label, cert in pki.certs.items()}


def test_init_creates_private_data_dir_and_prints_thumbprints(tmp_path: Path) -> None:
    data_dir = tmp_path / "console"
    result = succeed("init", "-d", str(data_dir))
    assert mode_of(data_dir) == 0o700
    assert mode_of(data_dir / "master.key") == 0o600
    printed = printed_thumbprints(result.stdout)
    assert set(printed) == {ca.ROOT, *ca.INTERMEDIATES}
    assert printed == stored_thumbprints(data_dir)


def test_init_settings_file_holds_no_secret(tmp_path: Path) -> None:
    data_dir = tmp_path / "console"
    succeed("init", "-d", str(data_dir))
    settings = (data_dir / local.SETTINGS_FILE).read_text()
    assert "PRIVATE" not in settings
    assert (data_dir / "master.key").read_text().strip() not in settings
    assert "master" not in json.loads(settings)


def test_second_init_fails_and_keeps_master_key(data_dir: Path) -> None:
    master = (data_dir / "master.key").read_bytes()
    before = stored_thumbprints(data_dir)
    assert "already initialised" in refuse("init", "-d", str(data_dir))
    assert (data_dir / "master.key").read_bytes() == master
    assert stored_thumbprints(data_dir) == before


def test_init_with_master_key_in_environment_writes_no_key_file(tmp_path: Path) -> None:
    env = {ENV_VAR: base64.urlsafe_b64encode(bytes(range(32))).decode()}
    data_dir = tmp_path / "console"
    succeed("init", "-d", str(data_dir), env=env)
    assert not (data_dir / "master.key").exists()
    assert "audit chain OK" in succeed("audit", "verify", "-d", str(data_dir), env=env).stdout
    assert "master key file" in refuse("audit", "verify", "-d", str(data_dir))


def test_init_with_rsa_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "console"
    succeed("init", "-d", str(data_dir), "--key-algorithm", "rsa-2048")
    with transaction(data_dir) as (_, pki):
        for cert in pki.certs.values():
            key = cert.public_key()
            assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


def test_init_refuses_a_plain_http_public_url(tmp_path: Path) -> None:
    message = refuse("init", "-d", str(tmp_path / "c"), "--public-url", "http://example.com")
    assert "https" in message
    assert not (tmp_path / "c" / "master.key").exists()


def test_init_in_a_real_process_prints_full_thumbprints(tmp_path: Path) -> None:
    # Not a terminal, so rich renders 80 columns: the thumbprints must still be whole.
    data_dir = tmp_path / "console"
    proc = run_certgate("console", "init", "-d", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    assert printed_thumbprints(proc.stdout) == stored_thumbprints(data_dir)


# --- serve ------------------------------------------------------------------------------


def test_serve_refuses_a_group_readable_master_key(data_dir: Path) -> None:
    (data_dir / "master.key").chmod(0o644)
    proc = run_certgate("console", "serve", "-d", str(data_dir))
    assert proc.returncode != 0
    assert "0644" in proc.stderr and "0600" in proc.stderr
    assert "listening" not in proc.stderr


def test_serve_leaves_its_start_up_objects_out_of_garbage_collection(tmp_path: Path) -> None:
    data_dir, port = init_console(tmp_path)
    console = start_console(tmp_path, data_dir, port)
    try:
        with console.client() as client:
            assert client.get("/healthz").status_code == 200
    finally:
        console.stop()
    found = re.search(
        r"console: (\d+) start-up objects left out of garbage collection", console.log()
    )
    assert found, console.log()
    assert int(found.group(1)) > 10_000  # modules, routes, schemas: the whole start-up heap


# --- admin ------------------------------------------------------------------------------


def create_admin(data_dir: Path, out_dir: Path, *extra: str, name: str = "ops") -> Result:
    return succeed(
        "admin", "create", "-d", str(data_dir), name, "--role", "tunnel-setup",
        "--group", "global", "--out-dir", str(out_dir), *extra,
    )  # fmt: skip


def printed_value(output: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)} \(shown once\): (\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def test_admin_create_prints_api_key_once_and_writes_private_files(
    data_dir: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "creds"
    output = create_admin(data_dir, out_dir).stdout
    keys = API_KEY_RE.findall(output)
    assert len(keys) == 1
    assert output.count(f"cgk_{keys[0][0]}_{keys[0][1]}") == 1
    for suffix in ("pem", "key", "p12"):
        assert mode_of(out_dir / f"ops.{suffix}") == 0o600


def test_admin_pkcs12_opens_with_printed_password(data_dir: Path, tmp_path: Path) -> None:
    output = create_admin(data_dir, tmp_path).stdout
    admin_id = re.search(r"id=([0-9a-f]{32})", output)
    assert admin_id
    password = printed_value(output, "PKCS#12 password")
    key, cert, chain = pkcs12.load_key_and_certificates(
        (tmp_path / "ops.p12").read_bytes(), password.encode()
    )
    assert cert is not None and key is not None
    assert key.public_key() == cert.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:certgate:admin:{admin_id.group(1)}"
    ]
    with transaction(data_dir) as (_, pki):
        assert chain == pki.chain(ca.ADMIN_CA)


def test_admin_pem_and_key_files_belong_together(data_dir: Path, tmp_path: Path) -> None:
    create_admin(data_dir, tmp_path)
    certs = x509.load_pem_x509_certificates((tmp_path / "ops.pem").read_bytes())
    key = load_pem_private_key((tmp_path / "ops.key").read_bytes(), None)
    assert certs[0].public_key() == key.public_key()
    with transaction(data_dir) as (_, pki):
        assert certs[1:] == pki.chain(ca.ADMIN_CA)


def test_admin_pkcs12_password_from_option_is_not_printed(data_dir: Path, tmp_path: Path) -> None:
    output = create_admin(data_dir, tmp_path, "--p12-password", "given-p12-pass").stdout
    assert "given-p12-pass" not in output
    assert "PKCS#12 password" not in output
    _, cert, _ = pkcs12.load_key_and_certificates(
        (tmp_path / "ops.p12").read_bytes(), b"given-p12-pass"
    )
    assert cert is not None


def sqlite_bytes(data_dir: Path) -> bytes:
    """The database file and any WAL / journal beside it."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("console.db*")))


def test_api_key_is_stored_as_hash_only(data_dir: Path, tmp_path: Path) -> None:
    output = create_admin(data_dir, tmp_path).stdout
    [(key_id, secret)] = API_KEY_RE.findall(output)
    with transaction(data_dir) as (session, _):
        row = session.get(ApiKey, key_id)
        assert row is not None and row.secret_hash == sha256_hex(secret)
    stored = sqlite_bytes(data_dir)
    assert secret.encode() not in stored
    assert f"cgk_{key_id}_{secret}".encode() not in stored


def test_admin_create_with_unknown_role(data_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "creds"
    message = refuse(
        "admin", "create", "-d", str(data_dir), "ops", "--role", "root",
        "--out-dir", str(out_dir),
    )  # fmt: skip
    assert all(role in message for role in ROLES)
    assert not out_dir.exists()
    with transaction(data_dir) as (session, _):
        assert session.execute(select(Admin)).first() is None


def test_admin_create_tightens_existing_key_file(data_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / "ops.key"
    stale.write_text("old")
    stale.chmod(0o644)
    create_admin(data_dir, tmp_path)
    assert mode_of(stale) == 0o600
    assert b"PRIVATE KEY" in stale.read_bytes()


def test_admin_list_and_revoke_key(data_dir: Path, tmp_path: Path) -> None:
    [(key_id, _)] = API_KEY_RE.findall(create_admin(data_dir, tmp_path).stdout)
    listing = succeed("admin", "list", "-d", str(data_dir)).stdout
    assert "ops" in listing and "tunnel-setup@global" in listing
    succeed("admin", "revoke-key", "-d", str(data_dir), key_id)
    with transaction(data_dir) as (session, _):
        row = session.get(ApiKey, key_id)
        assert row is not None and row.revoked_at is not None
    assert "not found" in refuse("admin", "revoke-key", "-d", str(data_dir), "0" * 16)


def test_admin_new_key_and_key_listing(data_dir: Path, tmp_path: Path) -> None:
    [(first_id, _)] = API_KEY_RE.findall(create_admin(data_dir, tmp_path).stdout)
    output = succeed("admin", "new-key", "-d", str(data_dir), "ops", "--label", "ci").stdout
    [(second_id, secret)] = API_KEY_RE.findall(output)
    with transaction(data_dir) as (session, _):
        row = session.get(ApiKey, second_id)
        assert row is not None and row.secret_hash == sha256_hex(secret) and row.label == "ci"
    succeed("admin", "revoke-key", "-d", str(data_dir), first_id)
    listing = succeed("admin", "keys", "-d", str(data_dir), "ops").stdout
    assert first_id in listing and second_id in listing
    assert secret not in listing
    assert "not found" in refuse("admin", "new-key", "-d", str(data_dir), "nobody")


def test_admin_grant_binds_another_role(data_dir: Path, tmp_path: Path) -> None:
    create_admin(data_dir, tmp_path)
    succeed("group", "create", "-d", str(data_dir), "eng")
    grant = ("admin", "grant", "-d", str(data_dir), "ops", "--group", "eng")
    succeed(*grant, "--role", "device-admin")
    listing = succeed("admin", "list", "-d", str(data_dir)).stdout
    assert "tunnel-setup@global" in listing and "device-admin@eng" in listing
    assert "unknown role" in refuse(*grant, "--role", "owner")


def test_admin_create_in_a_real_process_logs_no_private_key(data_dir: Path, tmp_path: Path) -> None:
    proc = run_certgate(
        "console", "admin", "create", "-d", str(data_dir), "ops", "--role", "superadmin",
        "--out-dir", str(tmp_path / "creds"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr
    [(key_id, secret)] = API_KEY_RE.findall(proc.stdout)  # whole on an 80-column line
    assert secret not in proc.stderr
    with transaction(data_dir) as (session, _):
        assert session.get(ApiKey, key_id) is not None


# --- groups -----------------------------------------------------------------------------


def test_group_create_and_list(data_dir: Path) -> None:
    succeed("group", "create", "-d", str(data_dir), "eng", "--name", "Engineering")
    listing = succeed("group", "list", "-d", str(data_dir)).stdout
    assert "eng" in listing and "Engineering" in listing
    with transaction(data_dir) as (session, _):
        group = session.get(Group, "eng")
        assert group is not None and group.parent_id == local.TOP_GROUP
        assert session.get(GroupIdentity, "eng") is not None


def test_group_create_with_settings_override(data_dir: Path) -> None:
    settings = json.dumps({"initial_compliance": "compliant"})
    succeed("group", "create", "-d", str(data_dir), "eng", "--settings", settings)
    with transaction(data_dir) as (session, _):
        group = session.get(Group, "eng")
        assert group is not None and group.settings["initial_compliance"] == "compliant"


def test_group_create_rejects_invalid_id(data_dir: Path) -> None:
    message = refuse("group", "create", "-d", str(data_dir), "Bad_Group")
    # The pattern in the message must survive rich markup, which eats "[a-z0-9]".
    assert "'Bad_Group'" in message and "[a-z0-9][a-z0-9-]{0,62}" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["global"], "exists"),
        (["eng", "--parent", "nowhere"], "not found"),
        (["eng", "--settings", "{not json"], "not JSON"),
    ],
)
def test_group_create_errors(data_dir: Path, args: list[str], expected: str) -> None:
    assert expected in refuse("group", "create", "-d", str(data_dir), *args)


ALLOW_INTRANET = {"default": "deny", "rules": [{"action": "allow", "hosts": ["intranet.test"]}]}
DENY_INTRANET = {"default": "deny", "rules": [{"action": "deny", "hosts": ["intranet.test"]}]}


def json_path(tmp_path: Path, name: str, value: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(value))
    return str(path)


def group_row(data_dir: Path, group_id: str = "global") -> tuple[int, int, dict[str, object]]:
    """(feed seq, policy version, settings) of a group."""
    with transaction(data_dir) as (session, _):
        group = session.get(Group, group_id)
        assert group is not None
        return group.feed_seq, group.policy_version, dict(group.settings)


def audited(data_dir: Path, action: str) -> list[AuditEntry]:
    with transaction(data_dir) as (session, _):
        query = select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id)
        return list(session.execute(query).scalars())


def test_group_show_prints_settings_and_policy_version(data_dir: Path) -> None:
    shown = json.loads(succeed("group", "show", "-d", str(data_dir), "global", "--json").stdout)
    assert (shown["id"], shown["policy_version"]) == ("global", 1)
    assert shown["settings"]["server_rules"] == {"default": "deny", "rules": []}
    text = succeed("group", "show", "-d", str(data_dir), "global").stdout
    assert "policy version=1" in text and '"max_staleness_s": 300' in text


def test_group_set_publishes_the_policy_and_is_audited(data_dir: Path, tmp_path: Path) -> None:
    rules = json_path(tmp_path, "rules.json", ALLOW_INTRANET)
    feed = ("--feed", "max_staleness_s=120", "--feed", '{"long_poll_s": 20}')
    output = succeed("group", "set", "-d", str(data_dir), "global", "--server-rules", rules, *feed)
    assert "policy version 2" in output.stdout
    _, version, settings = group_row(data_dir)
    assert version == 2 and settings["feed"] == {"long_poll_s": 20, "max_staleness_s": 120}
    entry = last_feed_entry(data_dir)
    assert entry["op"] == "policy" and entry["version"] == 2
    assert entry["server_rules"] == RuleSet.from_dict(ALLOW_INTRANET).to_dict()
    [audit] = audited(data_dir, "group.settings")
    assert audit.actor == ACTOR and audit.detail == {"keys": ["feed", "server_rules"]}


def report_tunnel(data_dir: Path, uid: str, serial: str) -> str:
    """A node of ``global`` reporting one Per-App tunnel of the device to intranet.test."""
    with transaction(data_dir) as (session, _):
        cert = session.get(Certificate, serial)
        assert cert is not None
        session.add(
            TunnelNode(
                group_id="global",
                name="n1",
                address="127.0.0.1",
                registered_at=ca.now(),
                last_seen_at=ca.now(),
            )
        )
        session.flush()
        live = {
            "thumbprint": cert.thumbprint,
            "device_uid": uid,
            "mode": "per_app",
            "app": "com.example.mail",
            "host": "intranet.test",
            "port": 443,
            "addresses": ["10.1.2.3"],
            "since": 1.0,
        }
        status = {"policy_version": 2, "table_seq": 3, "fresh": True, "age_s": 1.0}
        report = {"node": "n1", "at": 1.0, "live_total": 1, "live": [live], "status": status}
        tunnels.record_report(session, "global", "n1", report)
        return cert.thumbprint


def test_group_set_dry_run_changes_nothing_and_names_the_tunnels_closed(
    data_dir: Path, tmp_path: Path
) -> None:
    uid, serial = enroll_device(data_dir)
    succeed("device", "set", "-d", str(data_dir), uid, "--compliance", "compliant")
    allow, deny = (
        json_path(tmp_path, n, r) for n, r in (("a", ALLOW_INTRANET), ("d", DENY_INTRANET))
    )
    succeed("group", "set", "-d", str(data_dir), "global", "--server-rules", allow)
    tp = report_tunnel(data_dir, uid, serial)
    before = group_row(data_dir)
    dry = ("group", "set", "-d", str(data_dir), "global", "--server-rules", deny, "--dry-run")
    answer = json.loads(succeed(*dry, "--json").stdout)
    assert group_row(data_dir) == before and len(audited(data_dir, "group.settings")) == 1
    assert answer["dry_run"] is True and answer["devices"] == []
    [closed] = answer["live_tunnels"]
    assert (closed["node"], closed["thumbprint"], closed["device_uid"]) == ("n1", tp, uid)
    assert (closed["destination"], closed["reason"]) == ("intranet.test:443", "destination_denied")
    assert [n["node"] for n in answer["nodes_reporting"]] == ["n1"]
    text = succeed(*dry).stdout
    assert "nothing was changed" in text and "1 live tunnels closed" in text
    assert "destination_denied" in text and "nodes reporting: n1" in text
    dry_runs = audited(data_dir, "group.settings.dry_run")
    assert len(dry_runs) == 2 and dry_runs[0].actor == ACTOR
    assert dry_runs[0].detail == {"keys": ["server_rules"], "devices": 0, "live_tunnels": 1}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "nothing to set"),
        (["--server-rules", "/nonexistent/rules.json"], "cannot read"),
        (["--server-rules", "{tmp}/broken.json"], "is not JSON"),
        (["--server-rules", "{tmp}/list.json"], "server_rules: Input should be a valid dictionary"),
        (["--server-rules", "{tmp}/bad.json"], "server_rules.default: Input should be"),
        (["--feed", "max_staleness_s=5"], "feed.max_staleness_s: Input should be greater"),
        (["--feed", "long_poll_s"], "key=value"),
        (["--feed", "{oops"], "--feed is not JSON"),
        (["--feed", "max_staleness_s=40", "--dry-run"], "long_poll_s must be at most half"),
    ],
)
def test_group_set_refuses_bad_input_as_the_api_does(
    data_dir: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    json_path(tmp_path, "list.json", [])
    json_path(tmp_path, "bad.json", {"default": "maybe", "rules": []})
    before = group_row(data_dir)
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert expected in refuse("group", "set", "-d", str(data_dir), "global", *arguments)
    assert group_row(data_dir) == before


def test_group_set_of_an_unknown_group(data_dir: Path) -> None:
    feed = ("--feed", "max_staleness_s=100")
    for extra in ((), ("--dry-run",)):
        assert "not found" in refuse("group", "set", "-d", str(data_dir), "nope", *feed, *extra)


# --- devices ----------------------------------------------------------------------------


def test_enroll_user_takes_password_from_environment(data_dir: Path) -> None:
    env = {"CERTGATE_ENROLL_PASSWORD": PASSWORD}
    succeed("device", "enroll-user", "-d", str(data_dir), "global", "alice", env=env)
    with transaction(data_dir) as (session, _):
        user = session.get(EnrollmentUser, "alice")
        assert user is not None and user.group_id == "global"
        assert PASSWORD not in user.password_hash
        assert devices.check_enrollment_user(session, "alice", PASSWORD) is user


def test_enroll_user_rejects_short_password(data_dir: Path) -> None:
    env = {"CERTGATE_ENROLL_PASSWORD": "short"}
    message = refuse("device", "enroll-user", "-d", str(data_dir), "global", "alice", env=env)
    assert "8-1024" in message


def test_enroll_token_enrolls_one_device(data_dir: Path) -> None:
    env = {"CERTGATE_ENROLL_PASSWORD": PASSWORD}
    succeed("device", "enroll-user", "-d", str(data_dir), "global", "alice", env=env)
    output = succeed("device", "enroll-token", "-d", str(data_dir), "global", "alice").stdout
    [token] = ENROLL_TOKEN_RE.findall(output)
    with transaction(data_dir) as (session, _):
        device = enroll_with_token(session, token)
        assert device.owner == "alice" and device.group_id == "global"
    with pytest.raises(AuthError, match="already used"), transaction(data_dir) as (session, _):
        enroll_with_token(session, token)


def enroll_with_token(session: Session, token: str) -> Device:
    enrollment = devices.enroll(
        session, token=token, username=None, password=None, platform="ios", name="phone"
    )
    return enrollment.device


def test_enroll_token_needs_an_enrollment_user_of_the_group(data_dir: Path) -> None:
    message = refuse("device", "enroll-token", "-d", str(data_dir), "global", "nobody")
    assert "not an enrollment user" in message


def test_device_list_shows_enrolled_device(data_dir: Path) -> None:
    uid, _ = enroll_device(data_dir)
    listing = succeed("device", "list", "-d", str(data_dir), "global").stdout
    assert uid in listing and "alice" in listing


def device_row(data_dir: Path, uid: str) -> Device:
    with transaction(data_dir) as (session, _):
        device = session.get(Device, uid)
        assert device is not None
        return device


def test_device_set_compliance_publishes_feed_entry(data_dir: Path) -> None:
    uid, _ = enroll_device(data_dir)
    output = succeed(
        "device", "set", "-d", str(data_dir), uid, "--compliance", "noncompliant"
    ).stdout
    assert "compliance=noncompliant" in output
    assert device_row(data_dir, uid).compliance_status == "noncompliant"
    entry = last_feed_entry(data_dir)
    assert entry["op"] == "upsert" and entry["compliance_status"] == "noncompliant"


def test_device_set_block(data_dir: Path) -> None:
    uid, _ = enroll_device(data_dir)
    succeed("device", "set", "-d", str(data_dir), uid, "--action", "block")
    assert device_row(data_dir, uid).blocked
    entry = last_feed_entry(data_dir)
    assert entry["op"] == "upsert" and entry["blocked"] is True


def test_device_set_unenroll_revokes_its_certificate(data_dir: Path) -> None:
    uid, serial = enroll_device(data_dir)
    succeed("device", "set", "-d", str(data_dir), uid, "--action", "unenroll")
    assert device_row(data_dir, uid).enrollment_status == "unenrolled"
    with transaction(data_dir) as (session, _):
        cert = session.get(Certificate, serial)
        assert cert is not None and cert.revocation_reason == "cessationOfOperation"
    assert last_feed_entry(data_dir)["op"] == "delete"


def test_device_set_unknown_action_changes_nothing(data_dir: Path) -> None:
    uid, _ = enroll_device(data_dir)
    message = refuse(
        "device", "set", "-d", str(data_dir), uid, "--compliance", "compliant",
        "--action", "explode",
    )  # fmt: skip
    assert "unknown action" in message
    assert device_row(data_dir, uid).compliance_status == "unknown"  # rolled back


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["0" * 32, "--action", "block"], "not found"),
        (["not-a-uid", "--action", "block"], "not found"),
    ],
)
def test_device_set_unknown_device(data_dir: Path, args: list[str], expected: str) -> None:
    assert expected in refuse("device", "set", "-d", str(data_dir), *args)


def test_device_set_invalid_compliance(data_dir: Path) -> None:
    uid, _ = enroll_device(data_dir)
    message = refuse("device", "set", "-d", str(data_dir), uid, "--compliance", "great")
    assert "compliance must be one of" in message


# --- certificates -----------------------------------------------------------------------


def test_cert_list_shows_device_certificate(data_dir: Path) -> None:
    uid, serial = enroll_device(data_dir)
    listing = succeed("cert", "list", "-d", str(data_dir), "--group", "global").stdout
    assert serial[:16] in listing and uid in listing


def test_cert_revoke_device_certificate(data_dir: Path) -> None:
    _, serial = enroll_device(data_dir)
    succeed("cert", "revoke", "-d", str(data_dir), serial.upper(), "--reason", "keyCompromise")
    with transaction(data_dir) as (session, _):
        cert = session.get(Certificate, serial)
        assert cert is not None and cert.revocation_reason == "keyCompromise"
    entry = last_feed_entry(data_dir)
    assert entry["op"] == "delete"
    assert "keyCompromise" in succeed("cert", "list", "-d", str(data_dir)).stdout


def test_cert_revoke_with_unknown_reason_revokes_nothing(data_dir: Path) -> None:
    _, serial = enroll_device(data_dir)
    message = refuse("cert", "revoke", "-d", str(data_dir), serial, "--reason", "boredom")
    assert "unknown revocation reason" in message
    with transaction(data_dir) as (session, _):
        cert = session.get(Certificate, serial)
        assert cert is not None and cert.revoked_at is None


def test_cert_revoke_unknown_serial(data_dir: Path) -> None:
    assert "not found" in refuse("cert", "revoke", "-d", str(data_dir), "abc123")


# --- audit ------------------------------------------------------------------------------


def test_audit_records_local_commands_with_os_user(data_dir: Path) -> None:
    succeed("group", "create", "-d", str(data_dir), "eng")
    listing = succeed("audit", "list", "-d", str(data_dir)).stdout
    assert ACTOR in listing and "group.create" in listing
    with transaction(data_dir) as (session, _):
        entry = session.execute(
            select(AuditEntry).where(AuditEntry.action == "group.create")
        ).scalar_one()
        assert entry.actor == ACTOR and entry.group_id == "eng"
    assert "audit chain OK" in succeed("audit", "verify", "-d", str(data_dir)).stdout


def test_audit_entry_of_admin_create_holds_no_secret(data_dir: Path, tmp_path: Path) -> None:
    output = create_admin(data_dir, tmp_path).stdout
    [(key_id, secret)] = API_KEY_RE.findall(output)
    with transaction(data_dir) as (session, _):
        entry = session.execute(
            select(AuditEntry).where(AuditEntry.action == "admin.create")
        ).scalar_one()
    assert entry.actor == ACTOR and entry.detail["api_key_id"] == key_id
    assert secret not in json.dumps(entry.detail)


def test_data_dir_from_environment(data_dir: Path) -> None:
    result = succeed("audit", "verify", env={"CERTGATE_CONSOLE_DIR": str(data_dir)})
    assert "audit chain OK" in result.stdout


def test_commands_on_a_directory_without_console(tmp_path: Path) -> None:
    assert "console init" in refuse("audit", "verify", "-d", str(tmp_path))


# --- installer --------------------------------------------------------------------------


def test_installer_bundle_is_private_and_complete(data_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "tunnel.tar.gz"
    succeed("installer", "-d", str(data_dir), "global", "--out", str(bundle))
    assert mode_of(bundle) == 0o600
    with tarfile.open(bundle, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert {"manifest.jws", "install-token", "chain.pem"} <= set(members)
        assert members["install-token"].mode == 0o600
        token_file = tar.extractfile("install-token")
        manifest_file = tar.extractfile("manifest.jws")
        assert token_file is not None and manifest_file is not None
        token = token_file.read().decode()
        manifest = manifest_file.read().decode()
    assert re.fullmatch(r"cgi_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", token)
    assert manifest.count(".") == 2  # JWS compact serialization (RFC 7515 §7.1)


def test_installer_for_unknown_group(data_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "tunnel.tar.gz"
    message = refuse("installer", "-d", str(data_dir), "nowhere", "--out", str(bundle))
    assert "nowhere" in message
    assert not bundle.exists()
