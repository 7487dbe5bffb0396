"""``certgate console``: set up and run the console, and administer it locally.

Local commands open the data directory directly (master key + database); each change is
audited with the operator's OS user as actor, exactly like an API call would be.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    load_pem_private_key,
    pkcs12,
)
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import make_url, select
from sqlalchemy.orm import Session
from typer.core import TyperGroup

from certgate.cliconfig import ConfigFile
from certgate.console import backup as backup_mod
from certgate.console import local, remote, sso_secret
from certgate.console.api.schemas import (
    AdminOut,
    ApiKeyOut,
    AuditOut,
    AuditVerifyOut,
    CertOut,
    DeviceOut,
    SettingsIn,
)
from certgate.console.services import (
    admins,
    audit,
    ca,
    checkpoints,
    compliance,
    devices,
    dryrun,
    groups,
    rotation,
    scep,
    signin,
    tunnels,
)
from certgate.console.services.rbac import ROLES
from certgate.console.store.models import (
    Admin,
    AuditEntry,
    Certificate,
    Device,
    Group,
    RoleBinding,
)
from certgate.errors import CertgateError
from certgate.heap import freeze_startup_heap
from certgate.pki.keys import KeyAlgorithm, private_key_pem
from certgate.pki.thumbprint import thumbprint
from certgate.pki.token import TokenConfig

app = typer.Typer(
    help="Management console: PKI, groups, admins, devices, audit.", no_args_is_help=True
)
admin_app = typer.Typer(help="Admin accounts and API keys.", no_args_is_help=True)
group_app = typer.Typer(help="Organization groups.", no_args_is_help=True)
device_app = typer.Typer(help="Devices, enrollment, compliance.", no_args_is_help=True)
cert_app = typer.Typer(help="Issued certificates.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
app.add_typer(group_app, name="group")
app.add_typer(device_app, name="device")
app.add_typer(cert_app, name="cert")
app.add_typer(audit_app, name="audit")
sso_app = typer.Typer(help="Web console single sign-on.", no_args_is_help=True)
app.add_typer(sso_app, name="sso")

out = Console()
err = Console(stderr=True)
DataDir = Annotated[
    Path,
    typer.Option("--data-dir", "-d", envvar="CERTGATE_CONSOLE_DIR", help="Console data directory."),
]


PASSWORD_ENV = "CERTGATE_ADMIN_PASSWORD"  # an admin's new web console password


def fail(message: str, code: int = 1) -> typer.Exit:
    # Escaped: messages quote user input and regexes such as "[a-z0-9]", which rich would
    # otherwise take for markup tags and silently drop.
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def show_secret(label: str, secret: str) -> None:
    """Print a shown-once secret on one unbroken line, whatever the terminal width."""
    out.print(f"{label} (shown once): [bold]{escape(secret)}[/]", soft_wrap=True)


def write_owner_only(path: Path, data: bytes) -> None:
    """Write a secret-bearing file with mode 0600, also when it already existed wider."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode applies to new files only
        handle.write(data)


def listing(*columns: str, title: str) -> Table:
    """A table whose cells wrap instead of being cut: ids in it must stay copyable."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


CERT_COLUMNS = (
    "serial",
    "kind",
    "group_id",
    "device_uid",
    "bundle_id",
    "thumbprint",
    "not_after",
    "revocation_reason",
)
AUDIT_COLUMNS = ("id", "ts", "actor", "group_id", "action", "outcome", "detail")
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print a JSON list of objects instead of a table.")
]
JsonObjectFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def show_listing(
    rows: list[dict[str, Any]], title: str, as_json: bool, columns: tuple[str, ...] = ()
) -> None:
    """``rows`` as JSON (stdout, machine-readable), or as a table of their fields (or of
    ``columns`` only, when all would not fit a terminal)."""
    if as_json:
        print_json(rows)
        return
    names = columns or tuple(rows[0] if rows else ("(none)",))
    table = listing(*names, title=title)
    for row in rows:
        table.add_row(*(_cell(row[name]) for name in names))
    out.print(table)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)[:120]
    return str(value)


def actor() -> str:
    return f"cli:{getpass.getuser()}"


@contextmanager
def opened(data_dir: Path) -> Iterator[tuple[Session, ca.InstancePKI]]:
    """A transaction on the local data directory; certgate errors become exit code 1."""
    try:
        config = local.load_config(data_dir)
        db, pki = local.open_db(config)
    except CertgateError as exc:
        raise fail(str(exc)) from exc
    try:
        with db.transaction() as session:
            yield session, pki
    except CertgateError as exc:
        raise fail(str(exc)) from exc
    finally:
        db.dispose()


@app.command()
def init(
    data_dir: DataDir,
    key_algorithm: Annotated[KeyAlgorithm, typer.Option(help="CA key type.")] = (
        KeyAlgorithm.EC_P256
    ),
    public_url: Annotated[str, typer.Option(help="URL tunnels and devices use.")] = (
        "https://127.0.0.1:7443"
    ),
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.")] = 7443,
    db: Annotated[str | None, typer.Option(help="Database URL (default: SQLite).")] = None,
    pkcs11_module: Annotated[
        str | None, typer.Option(help="PKCS#11 module: generate and keep the CA keys in a token.")
    ] = None,
    pkcs11_token: Annotated[str | None, typer.Option(help="The token's label.")] = None,
    pkcs11_pin_env: Annotated[
        str | None, typer.Option(help="Variable holding the token's user PIN.")
    ] = None,
) -> None:
    """Create the instance PKI (Root, Secure Channel Root, Device Root, Admin CA)."""
    try:
        token = None
        if pkcs11_module or pkcs11_token or pkcs11_pin_env:
            token = TokenConfig(pkcs11_module or "", pkcs11_token or "", pkcs11_pin_env or "")
        _, pki = local.init(data_dir, key_algorithm, public_url, host, port, db, token)
    except CertgateError as exc:
        raise fail(str(exc)) from exc
    # Plain lines, not a table: a table cell would cut the 64-hex thumbprint short on an
    # 80-column terminal, and operators compare it with `openssl x509 -outform DER | sha256sum`.
    out.print("Instance PKI (CA, CertThumbprint = SHA-256 of DER, subject):")
    for label, cert in pki.certs.items():
        line = f"  {label:<20} {thumbprint(cert)}  {cert.subject.rfc4514_string()}"
        out.print(line, soft_wrap=True, markup=False, highlight=False)
    if token is not None:
        out.print(f"CA keys: in {token.describe()}, non-extractable", markup=False)
    key_file = data_dir / "master.key"
    where = f"{key_file}, mode 0600" if key_file.exists() else "from $CERTGATE_MASTER_KEY"
    out.print(f"data directory: {data_dir} (master key: {where})")


@app.command()
def serve(
    data_dir: DataDir,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    config_file: ConfigFile = None,
) -> None:
    """Run the console API over HTTPS (mTLS optional at the handshake, required per route)."""
    from certgate.console.app import create_app
    from certgate.console.state import ConsoleState
    from certgate.httpserver import make_server

    try:
        config = local.load_config(data_dir, host=host, port=port)
        local.open_db(config)[0].dispose()  # migrates the schema before serving
        state = ConsoleState.open(config)
        server = make_server(create_app(state), config.host, config.port, state.tls_context())
    except CertgateError as exc:
        raise fail(str(exc)) from exc
    err.print(f"console listening on https://{config.host}:{config.port}")
    # Once start-up is done: full collections stop traversing it (certgate.heap).
    frozen = freeze_startup_heap()
    err.print(f"console: {frozen} start-up objects left out of garbage collection")
    server.run()


@admin_app.command("create")
def admin_create(
    data_dir: DataDir,
    username: Annotated[str, typer.Argument()],
    role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")],
    group: Annotated[str, typer.Option(help="Group the role is bound to.")] = local.TOP_GROUP,
    out_dir: Annotated[Path, typer.Option(help="Where to write cert, key, PKCS#12.")] = (Path(".")),
    p12_password: Annotated[
        str | None, typer.Option(envvar="CERTGATE_P12_PASSWORD", help="PKCS#12 password.")
    ] = None,
) -> None:
    """Create an admin; print its API key once; write its client cert (PEM + PKCS#12).

    The files are written inside the transaction: if writing fails, no admin is created
    whose key nobody holds."""
    password = p12_password or secrets.token_urlsafe(18)
    with opened(data_dir) as (session, pki):
        admin = admins.create_admin(session, username, role, group)
        key = admins.issue_api_key(session, admin, "initial")
        cert, private = admins.issue_admin_cert(session, pki, admin)
        audit.append(
            session,
            actor(),
            "admin.create",
            group_id=group,
            admin=username,
            role=role,
            api_key_id=key.id,
        )
        try:
            chain = pki.chain(ca.ADMIN_CA)
            paths = _write_admin_files(out_dir, username, cert, private, chain, password)
        except OSError as exc:
            raise fail(f"cannot write admin files to {out_dir}: {exc}") from exc
    out.print(f"admin [bold]{username}[/] ({role} on {group}) id={admin.id}")
    show_secret("API key", key.token)
    for path in paths:
        out.print(f"wrote {path}")
    if not p12_password:
        show_secret("PKCS#12 password", password)


def _write_admin_files(
    out_dir: Path, name: str, cert: Any, key: Any, chain: list[Any], password: str
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        out_dir / f"{name}.pem": (ca.pem(cert) + "".join(ca.pem(c) for c in chain)).encode(),
        out_dir / f"{name}.key": private_key_pem(key),
        out_dir / f"{name}.p12": pkcs12.serialize_key_and_certificates(
            name.encode(), key, cert, chain, BestAvailableEncryption(password.encode())
        ),
    }
    for path, data in files.items():
        write_owner_only(path, data)
    return list(files)


def _admin_rows(session: Session, username: str | None = None) -> list[dict[str, Any]]:
    """Every admin (the local mode acts as the instance), as the API's AdminOut."""
    query = select(Admin).order_by(Admin.username)
    if username is not None:
        query = query.where(Admin.username == username)
    rows = []
    for admin in session.execute(query).scalars():
        bindings = session.execute(
            select(RoleBinding).where(RoleBinding.admin_id == admin.id)
        ).scalars()
        roles = [f"{b.role}@{b.group_id}" for b in bindings]
        out_row = AdminOut(
            id=admin.id, username=admin.username, roles=roles, disabled=admin.disabled
        )
        rows.append(out_row.model_dump())
    return rows


@admin_app.command("list")
def admin_list(data_dir: DataDir, as_json: JsonFlag = False) -> None:
    with opened(data_dir) as (session, _):
        rows = _admin_rows(session)
    show_listing(rows, "Admins", as_json)


@admin_app.command("show")
def admin_show(data_dir: DataDir, username: str, as_json: JsonFlag = False) -> None:
    """One admin by username: id, roles, whether disabled."""
    with opened(data_dir) as (session, _):
        rows = _admin_rows(session, username)
    show_admin(rows, username, as_json)


def show_admin(rows: list[dict[str, Any]], username: str, as_json: bool) -> None:
    """The local and remote ``admin show``: the admin, or exit 1 when there is none."""
    if not rows:
        raise fail(f"admin {username!r} not found")
    show_listing(rows, f"Admin {username}", as_json)


@admin_app.command("keys")
def admin_keys(data_dir: DataDir, username: str, as_json: JsonFlag = False) -> None:
    """List an admin's API keys (ids, last use, revocation); keys are never stored."""
    with opened(data_dir) as (session, _):
        admin = admins.by_username(session, username)
        rows = [
            ApiKeyOut.model_validate(k, from_attributes=True).model_dump()
            for k in admins.api_keys_of(session, admin)
        ]
    show_listing(rows, f"API keys of {username}", as_json)


@admin_app.command("new-key")
def admin_new_key(
    data_dir: DataDir, username: str, label: Annotated[str, typer.Option()] = "cli"
) -> None:
    """Issue another API key for an admin (printed once)."""
    with opened(data_dir) as (session, _):
        admin = admins.by_username(session, username)
        key = admins.issue_api_key(session, admin, label)
        audit.append(session, actor(), "apikey.create", admin=username, api_key_id=key.id)
    show_secret("API key", key.token)


@admin_app.command("grant")
def admin_grant(
    data_dir: DataDir,
    username: str,
    role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")],
    group: Annotated[str, typer.Option()],
) -> None:
    """Bind another role, scoped to GROUP and its subtree, to an admin."""
    with opened(data_dir) as (session, _):
        admin = admins.by_username(session, username)
        admins.bind_role(session, admin, role, group)
        audit.append(session, actor(), "admin.grant", group_id=group, admin=username, role=role)
    out.print(f"{username} now holds {role} on {group}")


@admin_app.command("set-password")
def admin_set_password(
    data_dir: DataDir,
    username: str,
    password: Annotated[
        str | None,
        typer.Option(envvar=PASSWORD_ENV, help="Else asked for on the terminal."),
    ] = None,
) -> None:
    """Set an admin's web console password (scrypt); signs its browsers out."""
    secret = password or typer.prompt("new password", hide_input=True, confirmation_prompt=True)
    with opened(data_dir) as (session, _):
        admin = admins.by_username(session, username)
        signin.set_password(session, admin, secret)
        audit.append(session, actor(), "admin.set_password", admin=username)
    out.print(f"web console password of {username} set")


@admin_app.command("totp")
def admin_totp(data_dir: DataDir, username: str) -> None:
    """Give an admin a new TOTP second factor; prints its otpauth:// URI once (for an
    authenticator app). The previous one stops working and its browsers are signed out."""
    with opened(data_dir) as (session, pki):
        admin = admins.by_username(session, username)
        uri = signin.new_totp(session, pki.master, admin)
        audit.append(session, actor(), "admin.totp", admin=username)
    show_secret("TOTP URI", uri)


@admin_app.command("revoke-key")
def admin_revoke_key(data_dir: DataDir, key_id: str) -> None:
    with opened(data_dir) as (session, _):
        admins.revoke_api_key(session, key_id)
        audit.append(session, actor(), "apikey.revoke", api_key_id=key_id)
    out.print(f"API key {key_id} revoked")


@group_app.command("create")
def group_create(
    data_dir: DataDir,
    group_id: str,
    name: Annotated[str, typer.Option()] = "",
    parent: Annotated[str, typer.Option()] = local.TOP_GROUP,
    settings: Annotated[str | None, typer.Option(help="JSON settings override.")] = None,
) -> None:
    """Create a group under PARENT; issues its unique console + tunnel identity pair."""
    try:
        overrides = json.loads(settings) if settings else None
    except ValueError as exc:
        raise fail(f"--settings is not JSON: {exc}") from exc
    with opened(data_dir) as (session, pki):
        groups.create_group(session, pki, group_id, name, parent, overrides)
        audit.append(session, actor(), "group.create", group_id=group_id, parent=parent)
    out.print(f"group {group_id} created under {parent}")


@group_app.command("list")
def group_list(data_dir: DataDir, as_json: JsonFlag = False) -> None:
    with opened(data_dir) as (session, _):
        groups_ = session.execute(select(Group).order_by(Group.id)).scalars()
        rows = [group_row(group_dict(g)) for g in groups_]
    show_listing(rows, "Groups", as_json)


def group_row(shown: dict[str, Any]) -> dict[str, Any]:
    """A ``group list`` row of a group as ``group_dict`` (or the API's GroupOut) shows it."""
    tunnel = shown["settings"]["tunnel"]
    return {
        "id": shown["id"],
        "name": shown["name"],
        "parent_id": shown["parent_id"],
        "feed_seq": shown["feed_seq"],
        "tunnel_hosts": tunnel["hostnames"] + tunnel["ip_addresses"],
    }


def group_dict(group: Group) -> dict[str, Any]:
    return {
        "id": group.id,
        "name": group.name,
        "parent_id": group.parent_id,
        "feed_seq": group.feed_seq,
        "policy_version": group.policy_version,
        "settings": group.settings,
    }


def print_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=_iso))


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


@group_app.command("show")
def group_show(
    data_dir: DataDir,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    """A group's settings and policy version (what its tunnel nodes and devices apply)."""
    with opened(data_dir) as (session, _):
        shown = group_dict(groups.get_group(session, group_id))
    print_group(shown, as_json)


def print_group(shown: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(shown)
        return
    group_id = shown["id"]
    out.print(
        f"group {escape(group_id)} ({escape(shown['name'])}) parent={shown['parent_id'] or '-'}"
        f" feed seq={shown['feed_seq']} policy version={shown['policy_version']}"
    )
    typer.echo(json.dumps(shown["settings"], indent=2, sort_keys=True))


@group_app.command("set")
def group_set(
    data_dir: DataDir,
    group_id: str,
    server_rules: Annotated[
        Path | None, typer.Option(help="JSON file: the group's server traffic rules.")
    ] = None,
    device_rules: Annotated[
        Path | None, typer.Option(help="JSON file: the group's device traffic rules.")
    ] = None,
    feed: Annotated[
        list[str] | None,
        typer.Option(help='Feed timings: JSON ({"max_staleness_s": 60}) or key=value; repeatable.'),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Change nothing; show whom it would refuse.")
    ] = False,
    as_json: JsonObjectFlag = False,
) -> None:
    """Change a group's policy, as PATCH /groups/G/settings does (published to its nodes)."""
    changes = settings_changes(server_rules, device_rules, feed or [])
    with opened(data_dir) as (session, pki):

        def change(tx: Session) -> Group:
            return groups.update_settings(tx, pki, group_id, changes)

        if dry_run:
            shown = rehearse_settings(session, group_id, change, sorted(changes))
        else:
            shown = group_dict(change(session))
            audit.append(
                session, actor(), "group.settings", group_id=group_id, keys=sorted(changes)
            )
    print_settings_result(group_id, sorted(changes), shown, dry_run, as_json)


def print_settings_result(
    group_id: str, keys: list[str], shown: dict[str, Any], dry_run: bool, as_json: bool
) -> None:
    if as_json:
        print_json(shown)
    elif dry_run:
        print_dry_run(group_id, shown)
    else:
        out.print(
            f"group {escape(group_id)}: {', '.join(keys)} set"
            f" (policy version {shown['policy_version']}, feed seq {shown['feed_seq']})"
        )


def rehearse_settings(
    session: Session, group_id: str, change: Callable[[Session], object], keys: list[str]
) -> dict[str, Any]:
    result = dryrun.rehearse(session, group_id, change)
    audit.append(
        session,
        actor(),
        "group.settings.dry_run",
        group_id=group_id,
        keys=keys,
        devices=len(result.devices),
        live_tunnels=len(result.live_tunnels),
    )
    return result.to_dict()


def settings_changes(
    server_rules: Path | None, device_rules: Path | None, feed: list[str]
) -> dict[str, Any]:
    """The settings changes of ``group set``, validated as the API validates its body."""
    raw: dict[str, Any] = {}
    if server_rules is not None:
        raw["server_rules"] = json_file(server_rules, "--server-rules")
    if device_rules is not None:
        raw["device_rules"] = json_file(device_rules, "--device-rules")
    if feed:
        raw["feed"] = feed_settings(feed)
    if not raw:
        raise fail("nothing to set: give --server-rules, --device-rules or --feed")
    try:
        return SettingsIn.model_validate(raw).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise fail("; ".join(_problem(e) for e in exc.errors())) from exc


def _problem(error: Any) -> str:
    return f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg')}"


def json_file(path: Path, option: str) -> object:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise fail(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise fail(f"{option}: {path} is not JSON: {exc}") from exc


def feed_settings(items: list[str]) -> dict[str, Any]:
    """``--feed`` values: JSON objects or ``key=value`` (the value read as JSON if it is)."""
    merged: dict[str, Any] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                value = json.loads(item)
            except ValueError as exc:
                raise fail(f"--feed is not JSON: {exc}") from exc
            if not isinstance(value, dict):
                raise fail("--feed JSON must be an object")
            merged.update(value)
            continue
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise fail(f"--feed takes JSON or key=value, got {item!r}")
        merged[key.strip()] = _scalar(text.strip())
    return merged


def _scalar(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def print_dry_run(group_id: str, result: dict[str, Any]) -> None:
    out.print(f"dry run on group {escape(group_id)}: nothing was changed")
    if result["devices"]:
        refused = listing("device", "thumbprint", "app", "reason", title="Certificates refused")
        for d in result["devices"]:
            refused.add_row(d["device_uid"], d["thumbprint"], d["app"] or "-", d["reason"])
        out.print(refused)
    if result["live_tunnels"]:
        closed = listing("node", "device", "app", "destination", "reason", title="Tunnels closed")
        for t in result["live_tunnels"]:
            closed.add_row(
                t["node"], t["device_uid"], t["app"] or "-", t["destination"], t["reason"]
            )
        out.print(closed)
    out.print(
        f"{len(result['devices'])} certificates refused,"
        f" {len(result['live_tunnels'])} live tunnels closed"
    )
    for label, key in (("nodes reporting", "nodes_reporting"), ("stale reports", "stale_reports")):
        names = [_node_line(n) for n in result[key]]
        out.print(f"{label}: {', '.join(names) or 'none'}", markup=False)


def _node_line(node: dict[str, Any]) -> str:
    if node["age_s"] is None:
        return f"{node['node']} (never reported)"
    cut = f" of {node['live_total']}" if node["live"] < node["live_total"] else ""
    return f"{node['node']} ({node['live']}{cut} tunnels, {node['age_s']:.1f} s ago)"


@device_app.command("enroll-user")
def device_enroll_user(
    data_dir: DataDir,
    group_id: str,
    username: str,
    password: Annotated[
        str, typer.Option(prompt=True, hide_input=True, envvar="CERTGATE_ENROLL_PASSWORD")
    ],
) -> None:
    """Create an enrollment user (devices enroll and apps authenticate with it)."""
    with opened(data_dir) as (session, _):
        devices.create_enrollment_user(session, group_id, username, password)
        audit.append(
            session, actor(), "enrollment_user.create", group_id=group_id, username=username
        )
    out.print(f"enrollment user {username} created in {group_id}")


@device_app.command("enroll-token")
def device_enroll_token(
    data_dir: DataDir,
    group_id: str,
    owner: str,
    ttl_hours: Annotated[int, typer.Option(min=1, max=720)] = 168,
) -> None:
    """Print a one-time enrollment token (shown once)."""
    with opened(data_dir) as (session, _):
        token = devices.create_enrollment_token(
            session, group_id, owner, actor(), timedelta(hours=ttl_hours)
        )
        audit.append(
            session,
            actor(),
            "enrollment_token.create",
            group_id=group_id,
            token_id=token.id,
            owner=owner,
        )
    show_secret(f"enrollment token (one use, {ttl_hours} h)", token.token)


ScepApp = Annotated[
    str | None,
    typer.Option("--app", help="Bundle id: issue that app's Proxy-mode certificate instead."),
]
ScepTTL = Annotated[int, typer.Option(min=1, max=720, help="Hours until it expires.")]


@device_app.command("scep-challenge")
def device_scep_challenge(
    data_dir: DataDir, uid: str, app_id: ScepApp = None, ttl_hours: ScepTTL = 1
) -> None:
    """Print a one-time SCEP challenge that issues for this device (shown once): its
    Per-App Tunnel device certificate, or with --app that app's Proxy-mode one."""
    with opened(data_dir) as (session, _):
        device = devices.get_device(session, uid)
        issued = scep.create_device_challenge(
            session, device, actor(), timedelta(hours=ttl_hours), app_id
        )
        audit.append(session, actor(), "scep.challenge.create", group_id=device.group_id,
                     device=uid, token_id=issued.id, app=app_id)  # fmt: skip
    show_challenge(issued.token, app_id, ttl_hours)


@device_app.command("scep-profile-challenge")
def device_scep_profile_challenge(
    data_dir: DataDir, group_id: str, owner: str, app_id: ScepApp = None, ttl_hours: ScepTTL = 1
) -> None:
    """Print a one-time SCEP challenge that enrolls a new device of OWNER (an enrollment
    user of the group) over SCEP only (shown once); with --app, for that app's Proxy mode."""
    with opened(data_dir) as (session, _):
        issued = scep.create_profile_challenge(
            session, group_id, owner, actor(), timedelta(hours=ttl_hours), app_id
        )
        audit.append(session, actor(), "scep.challenge.create", group_id=group_id,
                     owner=owner, token_id=issued.id, app=app_id)  # fmt: skip
    show_challenge(issued.token, app_id, ttl_hours)


def show_challenge(challenge: str, app_id: str | None, ttl_hours: int) -> None:
    mode = f"Proxy mode for {app_id}" if app_id else "Per-App Tunnel"
    show_secret(f"SCEP challenge ({mode}, one use, {ttl_hours} h)", challenge)


@device_app.command("list")
def device_list(data_dir: DataDir, group_id: str, as_json: JsonFlag = False) -> None:
    """The group's devices in uid order (the API's device objects with --json)."""
    with opened(data_dir) as (session, _):
        query = select(Device).where(Device.group_id == group_id).order_by(Device.uid)
        rows = [
            DeviceOut.model_validate(d, from_attributes=True).model_dump()
            for d in session.execute(query).scalars()
        ]
    show_listing(rows, f"Devices of {group_id}", as_json)


@device_app.command("set")
def device_set(
    data_dir: DataDir,
    uid: str,
    compliance: Annotated[str | None, typer.Option(help="compliant|noncompliant|unknown")] = None,
    action: Annotated[str | None, typer.Option(help="unenroll|wipe|block|unblock")] = None,
) -> None:
    """Change a device's compliance or enrollment state (tunnels enforce it via the feed)."""
    with opened(data_dir) as (session, _):
        device = devices.get_device(session, uid)
        if compliance:
            devices.set_compliance(session, device, compliance)
        if action in ("unenroll", "wipe"):
            devices.unenroll(session, device, wipe=action == "wipe")
        elif action in ("block", "unblock"):
            devices.set_blocked(session, device, action == "block")
        elif action is not None:
            raise fail(f"unknown action {action!r}")
        audit.append(
            session,
            actor(),
            "device.set",
            group_id=device.group_id,
            device=uid,
            compliance=compliance,
            change=action,
        )
    print_device_state(DeviceOut.model_validate(device, from_attributes=True).model_dump())


def print_device_state(device: dict[str, Any]) -> None:
    out.print(
        f"device {device['uid']}: compliance={device['compliance_status']} "
        f"enrollment={device['enrollment_status']} blocked={device['blocked']}"
    )


class ShowByDefault(TyperGroup):
    """A command group whose first command is the default: ``device compliance UID``
    stays the listing, beside ``device compliance override|clear UID`` (a device uid is
    never a command name)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own click Context
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)


COMPLIANCE_HELP = "A device's compliance and history (`compliance UID`); admin overrides."
compliance_app = typer.Typer(cls=ShowByDefault, help=COMPLIANCE_HELP, no_args_is_help=True)
device_app.add_typer(compliance_app, name="compliance")
OverrideStatus = Annotated[
    str, typer.Option("--status", help="compliant|noncompliant|unknown (what tunnels see).")
]
OverrideExpiry = Annotated[
    str, typer.Option("--expires", help="How long it holds: 90m, 12h, 7d (at most 90d).")
]
OverrideReason = Annotated[
    str, typer.Option("--reason", help="Why (kept in the history and the audit log).")
]
ClearReason = Annotated[str | None, typer.Option("--reason", help="Why it ends now.")]
HistoryLimit = Annotated[int, typer.Option(min=1, max=1000, help="History rows, newest first.")]


@compliance_app.command("show")
def device_compliance(
    data_dir: DataDir,
    uid: str,
    limit: HistoryLimit = 20,
    as_json: JsonObjectFlag = False,
) -> None:
    """A device's compliance: status, failing rules, override, history (the default).

    Overrides set, cleared and expired are rows of the history."""
    with opened(data_dir) as (session, _):
        shown = compliance.state_of(session, devices.get_device(session, uid), limit)
    print_compliance(uid, shown, as_json)


@compliance_app.command("override")
def device_compliance_override(
    data_dir: DataDir,
    uid: str,
    status: OverrideStatus,
    expires: OverrideExpiry,
    reason: OverrideReason,
    as_json: JsonObjectFlag = False,
) -> None:
    """Set the device's compliance by hand until it expires.

    Tunnels enforce it through the feed at once; once it expires the policy judges the
    device again."""
    ttl = parse_duration(expires)
    with opened(data_dir) as (session, _):
        device = devices.get_device(session, uid)
        verdict = compliance.set_override(session, device, status, ttl, actor(), reason)
        audit.append(session, actor(), "device.compliance_override", group_id=device.group_id,
                     device=uid, status=status, expires_in_s=int(ttl.total_seconds()),
                     reason=reason)  # fmt: skip
    print_verdict(uid, verdict.to_dict(), as_json)


@compliance_app.command("clear")
def device_compliance_clear(
    data_dir: DataDir,
    uid: str,
    reason: ClearReason = None,
    as_json: JsonObjectFlag = False,
) -> None:
    """End the device's override now; the policy judges it again."""
    with opened(data_dir) as (session, _):
        device = devices.get_device(session, uid)
        verdict = compliance.set_override(session, device, None, None, actor(), reason)
        audit.append(session, actor(), "device.compliance_override.end",
                     group_id=device.group_id, device=uid, reason=reason)  # fmt: skip
    print_verdict(uid, verdict.to_dict(), as_json)


def print_verdict(uid: str, verdict: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(verdict)
        return
    held = " (override)" if verdict["overridden"] else ""
    failing = ", ".join(f["rule"] for f in verdict["failures"]) or "none"
    out.print(f"device {uid}: {verdict['compliance_status']}{held}; failing rules: {failing}")


# The API's JSON of a compliance answer (times as pydantic writes them), so that both
# modes print the same bytes.
_AS_API_JSON = TypeAdapter(dict[str, Any])


def print_compliance(uid: str, shown: dict[str, Any], as_json: bool) -> None:
    shown = _AS_API_JSON.dump_python(shown, mode="json")
    if as_json:
        print_json(shown)
        return
    held = shown["override"]
    override = _override_line(held) if held else "none"
    out.print(f"device {uid}: {shown['compliance_status']}, override: {escape(override)}")
    columns = ("when", "status", "cause", "failing rules", "override")
    table = listing(*columns, title="Compliance history")
    for event in shown["history"]:
        reasons = "; ".join(f"{f['rule']}: {f['reason']}" for f in event["failures"])
        note = _override_note(event.get("override"))
        row = (_when(event["at"]), event["status"], event["cause"], reasons, note)
        table.add_row(*(escape(cell) for cell in row))
    out.print(table)


def _override_line(held: dict[str, Any]) -> str:
    """``noncompliant until 2026-12-07 10:00:00 by admin:root: lost laptop``."""
    why = f": {held['reason']}" if held.get("reason") else ""
    return f"{held['status']} until {_when(held['until'])} by {held['by']}{why}"


def _override_note(note: dict[str, Any] | None) -> str:
    """A history row's override: set, cleared (by whom, why) or expired, and which."""
    if not note:
        return ""
    if note["action"] == "set":
        return f"set {_override_line(note)}"
    why = f": {note['reason']}" if note.get("reason") else ""
    who = f" by {note['by']}" if note.get("by") else ""
    verb = "cleared" if note["action"] == "clear" else "expired"
    return f"{verb}{who}{why} (was {_override_line(note['ended'])})"


def _when(value: datetime | str) -> str:
    """A UTC time to the second, from a datetime (local) or ISO text (the API's JSON)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return f"{moment:%Y-%m-%d %H:%M:%S}"


@cert_app.command("list")
def cert_list(
    data_dir: DataDir,
    group_id: Annotated[str | None, typer.Option("--group")] = None,
    as_json: JsonFlag = False,
) -> None:
    with opened(data_dir) as (session, _):
        # The API's order (its keyset), so both modes list a group alike.
        query = select(Certificate).order_by(Certificate.thumbprint)
        if group_id:
            query = query.where(Certificate.group_id == group_id)
        rows = [
            CertOut.model_validate(c, from_attributes=True).model_dump()
            for c in session.execute(query).scalars()
        ]
    show_listing(rows, "Certificates", as_json, CERT_COLUMNS)


@cert_app.command("revoke")
def cert_revoke(
    data_dir: DataDir, serial: str, reason: Annotated[str, typer.Option()] = "privilegeWithdrawn"
) -> None:
    with opened(data_dir) as (session, _):
        row = session.get(Certificate, serial.lower())
        if row is None:
            raise fail(f"certificate {serial} not found")
        if row.kind in ("device", "app"):
            devices.revoke_client_cert(session, row, reason)
        else:
            ca.revoke(session, row.serial, reason)
        audit.append(
            session, actor(), "cert.revoke", group_id=row.group_id, serial=row.serial, reason=reason
        )
    out.print(f"certificate {serial} revoked ({reason})")


@audit_app.command("list")
def audit_list(
    data_dir: DataDir,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    group_id: Annotated[str | None, typer.Option("--group", help="Only this group's.")] = None,
    as_json: JsonFlag = False,
) -> None:
    with opened(data_dir) as (session, _):
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if group_id:
            query = query.where(AuditEntry.group_id == group_id)
        rows = [
            AuditOut.model_validate(e, from_attributes=True).model_dump()
            for e in session.execute(query).scalars()
        ]
    show_listing(rows, "Audit log (newest first)", as_json, AUDIT_COLUMNS)


@audit_app.command("verify")
def audit_verify(data_dir: DataDir, as_json: JsonFlag = False) -> None:
    """Recompute the keyed audit chain of DIR's database and hold it to the signed
    checkpoints in DIR; exit 1 at the first entry that does not fit, or if a checkpoint
    line does not verify."""
    with opened(data_dir) as (session, pki):
        config = local.load_config(data_dir)
        verdict = checkpoints.verify(session, pki, config.audit_sink, local.TOP_GROUP)
    database = make_url(config.db_url).render_as_string(hide_password=True)
    result = AuditVerifyOut.of(verdict)
    show_audit_verdict(result, f"database {database}; checkpoints {config.audit_sink}", as_json)


def show_audit_verdict(result: AuditVerifyOut, where: str, as_json: bool) -> None:
    """The local and remote ``audit verify``: the verdict, exit 1 unless it holds."""
    if as_json:
        print_json(result.model_dump())
    else:
        out.print(where, soft_wrap=True)
        for problem in result.checkpoint_problems:
            err.print(f"checkpoint REJECTED: {escape(problem)}", soft_wrap=True)
    if not result.chain_ok:
        at = f" at entry {result.first_bad_id}" if result.first_bad_id else ""
        raise fail(f"audit chain BROKEN{at}: {result.problem} ({result.entries} checked)")
    if result.checkpoint_problems:
        count = len(result.checkpoint_problems)
        raise fail(f"{count} checkpoint line(s) do not verify (forged or damaged)")
    if not as_json:
        held = result.checkpoints
        out.print(f"audit chain OK: {result.entries} entries, {held} signed checkpoints hold")
    if not result.checkpoints:
        err.print("warning: no signed checkpoint yet: a deleted tail would go unnoticed")


@app.command("installer")
def installer(
    data_dir: DataDir,
    group_id: str,
    out_file: Annotated[Path, typer.Option("--out")],
    ttl_hours: Annotated[int, typer.Option(min=1, max=720)] = 24,
) -> None:
    """Write a tunnel installer bundle for GROUP_ID (packaged now, one-time token inside)."""
    with opened(data_dir) as (session, pki):
        config = local.load_config(data_dir)
        data, token_id = tunnels.installer(
            session, pki, group_id, config.public_url, actor(), timedelta(hours=ttl_hours)
        )
        audit.append(
            session, actor(), "tunnel.installer", group_id=group_id, install_token_id=token_id
        )
    write_owner_only(out_file, data)
    out.print(f"wrote {out_file} (install token {token_id}, single use, {ttl_hours} h)")


@app.command("backup")
def backup(
    data_dir: DataDir,
    out_file: Annotated[Path, typer.Option("--out")],
    passphrase: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            envvar="CERTGATE_BACKUP_PASSPHRASE",
        ),
    ],
) -> None:
    """Export the instance CAs (certificates and keys), encrypted under a passphrase."""
    with opened(data_dir) as (session, pki):
        blob = backup_mod.export_cas(session, pki, passphrase)
        audit.append(session, actor(), "pki.backup", labels=sorted(pki.certs))
    write_owner_only(out_file, blob)
    out.print(f"wrote encrypted CA backup {out_file}")


@app.command("restore")
def restore(
    data_dir: DataDir,
    backup_file: Annotated[Path, typer.Option("--from")],
    passphrase: Annotated[
        str, typer.Option(prompt=True, hide_input=True, envvar="CERTGATE_BACKUP_PASSPHRASE")
    ],
    public_url: Annotated[str, typer.Option()] = "https://127.0.0.1:7443",
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7443,
    db: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Initialise a NEW data directory from a CA backup: same roots, new master key."""
    try:
        pki = backup_mod.restore_into(
            data_dir, backup_file.read_bytes(), passphrase, public_url, host, port, db
        )
    except (CertgateError, OSError) as exc:
        raise fail(str(exc)) from exc
    out.print(f"restored {len(pki.certs)} CAs into {data_dir}")


# The SSO client secret (console/sso_secret.py): sealed under the master key, never in argv.


@sso_app.command("set-secret")
def sso_set_secret(data_dir: DataDir) -> None:
    """Seal the OIDC client secret into the data directory (from a pipe on stdin, else asked
    for on the terminal, hidden); console.json's sso block then says
    "client_secret_sealed": true."""
    try:
        value = sso_secret.checked(_secret_from_stdin_or_terminal())
    except ValueError as exc:
        raise fail(f"refused: {exc}", code=2) from exc
    with opened(data_dir) as (session, pki):
        config = local.load_config(data_dir)
        replaced = config.sso_secret_file.exists()
        sso_secret.SealedSecret(config.sso_secret_file, pki.master).write(value)
        file = config.sso_secret_file.name
        audit.append(session, actor(), "sso.secret.set", file=file, replaced=replaced)
    out.print(f"SSO client secret sealed into {config.sso_secret_file} (mode 0600)")
    settings = config.sso_config
    if settings is None or not settings.client_secret_sealed:
        err.print('note: console.json\'s "sso" block must say "client_secret_sealed": true')


def _secret_from_stdin_or_terminal() -> str:
    """A piped secret (one trailing line ending dropped), else a hidden prompt. Read with a
    bound: anything longer than a secret may be is refused, not taken whole."""
    if sys.stdin.isatty():
        return str(typer.prompt("SSO client secret", hide_input=True, confirmation_prompt=True))
    raw = sys.stdin.buffer.read(sso_secret.MAX_BYTES + 3)
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ValueError("the client secret is not UTF-8") from exc
    return text.removesuffix("\n").removesuffix("\r")


@sso_app.command("clear-secret")
def sso_clear_secret(data_dir: DataDir) -> None:
    """Remove the sealed client secret (single sign-on is then unavailable until a new one
    is set, when console.json says "client_secret_sealed": true)."""
    with opened(data_dir) as (session, pki):
        config = local.load_config(data_dir)
        if not sso_secret.SealedSecret(config.sso_secret_file, pki.master).remove():
            raise fail(f"no sealed SSO client secret in {data_dir}")
        audit.append(session, actor(), "sso.secret.clear", file=config.sso_secret_file.name)
    out.print(f"SSO client secret removed from {data_dir}")


# Rotations (services.rotation): prepare with `rotate KIND GROUP`, then switch, finish.

rotate_app = typer.Typer(
    help="Rotate what the system presents or trusts, without downtime: prepare, switch, finish.",
    no_args_is_help=True,
)
app.add_typer(rotate_app, name="rotate")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``7d`` (a bare number is seconds)."""
    unit = text[-1:] if text[-1:] in _DURATION_UNITS else "s"
    number = text[:-1] if text[-1:] in _DURATION_UNITS else text
    if not number.isdigit():
        raise fail(f"duration {text!r}: use a whole number with s, m, h or d (e.g. 12h)")
    return timedelta(seconds=int(number) * _DURATION_UNITS[unit])


def print_rotation(shown: dict[str, Any]) -> None:
    out.print(
        f"rotation {shown['id']} of {shown['kind']} in group {escape(str(shown['group_id']))}:"
        f" {shown['phase']} (old {shown['old']['thumbprint'][:16]}...,"
        f" new {shown['new']['thumbprint'][:16]}...)"
    )
    for node in shown["nodes"]:
        out.print(
            f"  node {escape(node['name'])}: has new={node['has_new']}"
            f" presents={node['presents']} last seen {node['last_seen_at']}"
        )
    devices = shown.get("devices") or {}
    if devices:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(devices["old_root_certificates"].items()))
        out.print(
            f"  old-root certificates still active: {kinds or 'none'}"
            f" ({devices['device_count']} devices, {devices['live_tunnels']} live tunnels)"
        )
    dependents = shown.get("dependents") or {}
    if dependents:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(dependents["old_ca_certificates"].items()))
        renewals = ", ".join(
            f"{r['kind']} rotation {r['id']} of group {escape(str(r['group_id']))} ({r['phase']})"
            for r in dependents["identity_rotations"]
        )
        out.print(f"  old-root identities still active: {kinds or 'none'}")
        out.print(f"  renewing onto the new root: {renewals or 'nothing'}")
    for blocker in shown["blockers"]:
        out.print(f"  finish waits: {escape(blocker)}")


RotateKind = Annotated[str, typer.Argument(help=f"One of {', '.join(rotation.KINDS)}.")]


def rotate_start(
    data_dir: DataDir,
    kind: str,
    group_id: str,
    overlap: str,
    as_json: bool,
) -> None:
    """Prepare: issue the new one and distribute it; old and new are both trusted."""
    with opened(data_dir) as (session, pki):
        started = rotation.prepare(session, pki, group_id, kind, actor(), parse_duration(overlap))
        audit.append(
            session,
            actor(),
            "rotation.prepare",
            group_id=group_id,
            kind=kind,
            rotation=started.id,
            overlap_s=started.overlap_s,
        )
        shown = rotation.describe(session, started)
    print_json(shown) if as_json else print_rotation(shown)


def _register_start(kind: str) -> None:
    """``certgate console rotate KIND GROUP [--overlap 1h]``: one command per kind."""

    def start(
        data_dir: DataDir,
        group_id: str,
        overlap: Annotated[
            str, typer.Option(help="Least time between switch and finish (e.g. 1h, 7d).")
        ] = "1h",
        as_json: JsonObjectFlag = False,
    ) -> None:
        rotate_start(data_dir, kind, group_id, overlap, as_json)

    start.__doc__ = f"Prepare a {kind} rotation: the new one is issued and distributed."
    rotate_app.command(kind)(start)


for _kind in rotation.KINDS:
    _register_start(_kind)


@rotate_app.command("switch")
def rotate_switch(
    data_dir: DataDir,
    kind: RotateKind,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    """Switch: the new one is used for new work."""
    with opened(data_dir) as (session, pki):
        switched = rotation.switch(session, pki, group_id, kind)
        audit.append(
            session, actor(), "rotation.switch", group_id=group_id, kind=kind, rotation=switched.id
        )
        shown = rotation.describe(session, switched)
    print_json(shown) if as_json else print_rotation(shown)


@rotate_app.command("renew-devices")
def rotate_renew_devices(
    data_dir: DataDir,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    """After a device-root switch: devices still on the old root renew at their next check."""
    with opened(data_dir) as (session, pki):
        uids = rotation.renew_devices(session, pki, group_id)
        audit.append(
            session,
            actor(),
            "rotation.renew_devices",
            group_id=group_id,
            kind=rotation.DEVICE,
            devices=len(uids),
        )
    print_renewing({"devices": uids}, as_json)


def print_renewing(shown: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(shown)
    else:
        count = len(shown["devices"])
        out.print(f"{count} device(s) will renew from the new Device Root at their next check")


@rotate_app.command("finish")
def rotate_finish(
    data_dir: DataDir,
    kind: RotateKind,
    group_id: str,
    force: Annotated[
        bool, typer.Option("--force", help="Finish although something depends on the old one.")
    ] = False,
    as_json: JsonObjectFlag = False,
) -> None:
    """Finish: the old one is no longer trusted and is revoked."""
    with opened(data_dir) as (session, pki):
        finished = rotation.finish(session, pki, group_id, kind, force=force)
        audit.append(
            session,
            actor(),
            "rotation.finish.forced" if force else "rotation.finish",
            group_id=group_id,
            kind=kind,
            rotation=finished.id,
        )
        shown = rotation.describe(session, finished)
    print_json(shown) if as_json else print_rotation(shown)


@rotate_app.command("status")
def rotate_status(
    data_dir: DataDir,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    """The group's rotations: per node, who has the new one and who presents the old."""
    with opened(data_dir) as (session, _):
        shown = rotation.status(session, group_id)
    if as_json:
        print_json(shown)
        return
    if not shown:
        out.print(f"no rotations in group {escape(group_id)}")
    for one in shown:
        print_rotation(one)


@rotate_app.command("renew")
def rotate_renew(
    data_dir: DataDir,
    as_json: JsonObjectFlag = False,
) -> None:
    """Renewal before expiry (run it daily, e.g. from a systemd timer): rotate every group
    identity within 30 days of its end, and finish such rotations nothing depends on."""
    with opened(data_dir) as (session, pki):
        shown = rotation.renew_audited(session, pki, actor())
    print_renewals(shown, as_json)


def print_renewals(shown: list[dict[str, Any]], as_json: bool) -> None:
    """The local and remote ``rotate renew``: the rotations it moved."""
    if as_json:
        print_json(shown)
        return
    if not shown:
        out.print("nothing is due for renewal")
    for one in shown:
        print_rotation(one)


# Remote mode (console.remote): the admin commands against a console's API, printed as the
# local commands print. `certgate console remote --url U --ca-file F --admin-cert P12 CMD`.

remote_app = typer.Typer(
    help="The admin commands over the console's API (no shell on the console host needed).",
    no_args_is_help=True,
)
app.add_typer(remote_app, name="remote")
remote_group = typer.Typer(help="Organization groups.", no_args_is_help=True)
remote_device = typer.Typer(help="Devices, enrollment, compliance.", no_args_is_help=True)
remote_cert = typer.Typer(help="Issued certificates.", no_args_is_help=True)
remote_admin = typer.Typer(help="API keys and roles (admins by id).", no_args_is_help=True)
remote_audit = typer.Typer(help="The audit log.", no_args_is_help=True)
remote_rotate = typer.Typer(help="Rotations: prepare, switch, finish.", no_args_is_help=True)
remote_tunnel = typer.Typer(help="Tunnel nodes.", no_args_is_help=True)
for _sub, _name in (
    (remote_group, "group"),
    (remote_device, "device"),
    (remote_cert, "cert"),
    (remote_admin, "admin"),
    (remote_audit, "audit"),
    (remote_rotate, "rotate"),
    (remote_tunnel, "tunnel"),
):
    remote_app.add_typer(_sub, name=_name)
PageLimitOpt = Annotated[int, typer.Option("--limit", min=1, max=1000, help="Rows per page.")]
AllPages = Annotated[bool, typer.Option("--all", help="Follow the pages to the last one.")]


@remote_app.callback()
def remote_target(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="CERTGATE_CONSOLE_URL", help="Console API URL.")],
    admin_cert: Annotated[
        Path,
        typer.Option(
            envvar="CERTGATE_ADMIN_CERT",
            help="Admin PKCS#12 file, or PEM certificate with --admin-key.",
        ),
    ],
    ca_file: Annotated[
        Path | None,
        typer.Option(envvar="CERTGATE_CONSOLE_CA", help="PEM CA(s) the console chains to."),
    ] = None,
    pin: Annotated[
        str | None,
        typer.Option(
            envvar="CERTGATE_CONSOLE_PIN",
            help="Instead of --ca-file: the SHA-256 thumbprint of the console's Root.",
        ),
    ] = None,
    admin_key: Annotated[
        Path | None, typer.Option(envvar="CERTGATE_ADMIN_KEY", help="PEM key (encrypted).")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Variable holding the API key (never the key itself).")
    ] = "CERTGATE_API_KEY",
    password_env: Annotated[
        str, typer.Option(help="Variable holding the PKCS#12 / key password.")
    ] = "CERTGATE_ADMIN_CERT_PASSWORD",
) -> None:
    """Where the console is and who the admin is; secrets only from environment variables."""
    ctx.obj = remote.Target(url, ca_file, admin_cert, admin_key, api_key_env, password_env, pin)


@contextmanager
def connected(ctx: typer.Context) -> Iterator[remote.RemoteConsole]:
    """A client of the console named on the command line; failures as stderr + exit code."""
    try:
        with remote.RemoteConsole(ctx.obj) as client:
            yield client
    except remote.RemoteFailure as exc:
        raise fail(exc.message, exc.exit_code) from exc


def remote_rows(
    client: remote.RemoteConsole,
    command: str,
    model: Any,
    limit: int,
    every: bool,
    query: dict[str, Any] | None = None,
    **params: str,
) -> list[dict[str, Any]]:
    """A listing's rows, read back through the API's own schema (so they print as the
    local mode's do); a note on stderr when pages were left unread."""
    items, more = client.listing(command, limit, every, query or {}, **params)
    if more:
        err.print(f"(first {limit} rows; --all lists every page)")
    return [model.model_validate(item).model_dump() for item in items]


@remote_group.command("list")
def remote_group_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    with connected(ctx) as client:
        rows = [group_row(g) for g in client.call("group list")]
    show_listing(rows, "Groups", as_json)


@remote_group.command("show")
def remote_group_show(
    ctx: typer.Context,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    with connected(ctx) as client:
        shown = client.call("group show", group_id=group_id)
    print_group(shown, as_json)


@remote_group.command("create")
def remote_group_create(
    ctx: typer.Context,
    group_id: str,
    name: Annotated[str, typer.Option()] = "",
    parent: Annotated[str, typer.Option()] = local.TOP_GROUP,
    settings: Annotated[str | None, typer.Option(help="JSON settings override.")] = None,
) -> None:
    try:
        overrides = json.loads(settings) if settings else None
    except ValueError as exc:
        raise fail(f"--settings is not JSON: {exc}") from exc
    body = {"id": group_id, "name": name, "parent_id": parent, "settings": overrides}
    with connected(ctx) as client:
        client.call("group create", body=body)
    out.print(f"group {group_id} created under {parent}")


@remote_group.command("set")
def remote_group_set(
    ctx: typer.Context,
    group_id: str,
    server_rules: Annotated[Path | None, typer.Option(help="JSON file: server rules.")] = None,
    device_rules: Annotated[Path | None, typer.Option(help="JSON file: device rules.")] = None,
    feed: Annotated[list[str] | None, typer.Option(help="JSON or key=value.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Change nothing.")] = False,
    as_json: JsonObjectFlag = False,
) -> None:
    changes = settings_changes(server_rules, device_rules, feed or [])
    with connected(ctx) as client:
        query = {"dry_run": "true"} if dry_run else None
        shown = client.call("group set", body=changes, query=query, group_id=group_id)
    print_settings_result(group_id, sorted(changes), shown, dry_run, as_json)


@remote_device.command("list")
def remote_device_list(
    ctx: typer.Context,
    group_id: str,
    limit: PageLimitOpt = 100,
    every: AllPages = False,
    as_json: JsonFlag = False,
) -> None:
    with connected(ctx) as client:
        rows = remote_rows(client, "device list", DeviceOut, limit, every, group_id=group_id)
    show_listing(rows, f"Devices of {group_id}", as_json)


@remote_device.command("set")
def remote_device_set(
    ctx: typer.Context,
    uid: str,
    compliance: Annotated[str | None, typer.Option(help="compliant|noncompliant|unknown")] = None,
    action: Annotated[str | None, typer.Option(help="unenroll|wipe|block|unblock")] = None,
) -> None:
    """As the local command, in two calls when both are given (compliance first)."""
    with connected(ctx) as client:
        if compliance:
            body = {"status": compliance}
            shown = client.call("device set compliance", body=body, uid=uid)
        if action:
            shown = client.call("device set action", uid=uid, action=action)
        if not (compliance or action):
            shown = client.call("device show", uid=uid)
    print_device_state(shown)


remote_compliance = typer.Typer(cls=ShowByDefault, help=COMPLIANCE_HELP, no_args_is_help=True)
remote_device.add_typer(remote_compliance, name="compliance")


@remote_compliance.command("show")
def remote_device_compliance(
    ctx: typer.Context,
    uid: str,
    limit: HistoryLimit = 20,
    as_json: JsonObjectFlag = False,
) -> None:
    with connected(ctx) as client:
        shown = client.call("device compliance", query={"limit": limit}, uid=uid)
    print_compliance(uid, shown, as_json)


@remote_compliance.command("override")
def remote_device_compliance_override(
    ctx: typer.Context,
    uid: str,
    status: OverrideStatus,
    expires: OverrideExpiry,
    reason: OverrideReason,
    as_json: JsonObjectFlag = False,
) -> None:
    ttl_s = int(parse_duration(expires).total_seconds())
    body = {"status": status, "expires_in_s": ttl_s, "reason": reason}
    with connected(ctx) as client:
        verdict = client.call("device compliance override", body=body, uid=uid)
    print_verdict(uid, verdict, as_json)


@remote_compliance.command("clear")
def remote_device_compliance_clear(
    ctx: typer.Context,
    uid: str,
    reason: ClearReason = None,
    as_json: JsonObjectFlag = False,
) -> None:
    query = {"reason": reason} if reason is not None else None
    with connected(ctx) as client:
        verdict = client.call("device compliance clear", query=query, uid=uid)
    print_verdict(uid, verdict, as_json)


@remote_device.command("enroll-user")
def remote_device_enroll_user(
    ctx: typer.Context,
    group_id: str,
    username: str,
    password: Annotated[
        str, typer.Option(prompt=True, hide_input=True, envvar="CERTGATE_ENROLL_PASSWORD")
    ],
) -> None:
    body = {"username": username, "password": password}
    with connected(ctx) as client:
        client.call("device enroll-user", body=body, group_id=group_id)
    out.print(f"enrollment user {username} created in {group_id}")


@remote_device.command("enroll-token")
def remote_device_enroll_token(
    ctx: typer.Context,
    group_id: str,
    owner: str,
    ttl_hours: Annotated[int, typer.Option(min=1, max=720)] = 168,
) -> None:
    body = {"owner": owner, "ttl_s": ttl_hours * 3600}
    with connected(ctx) as client:
        token = client.call("device enroll-token", body=body, group_id=group_id)
    show_secret(f"enrollment token (one use, {ttl_hours} h)", token["token"])


@remote_device.command("scep-challenge")
def remote_device_scep_challenge(
    ctx: typer.Context, uid: str, app_id: ScepApp = None, ttl_hours: ScepTTL = 1
) -> None:
    body = {"expires_in_s": ttl_hours * 3600, "bundle_id": app_id}
    with connected(ctx) as client:
        issued = client.call("device scep-challenge", body=body, uid=uid)
    show_challenge(issued["challenge"], app_id, ttl_hours)


@remote_device.command("scep-profile-challenge")
def remote_device_scep_profile_challenge(
    ctx: typer.Context, group_id: str, owner: str, app_id: ScepApp = None, ttl_hours: ScepTTL = 1
) -> None:
    body = {"owner": owner, "expires_in_s": ttl_hours * 3600, "bundle_id": app_id}
    with connected(ctx) as client:
        issued = client.call("device scep-profile-challenge", body=body, group_id=group_id)
    show_challenge(issued["challenge"], app_id, ttl_hours)


@remote_cert.command("list")
def remote_cert_list(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Option("--group")],
    limit: PageLimitOpt = 100,
    every: AllPages = False,
    as_json: JsonFlag = False,
) -> None:
    with connected(ctx) as client:
        rows = remote_rows(client, "cert list", CertOut, limit, every, group_id=group_id)
    show_listing(rows, "Certificates", as_json, CERT_COLUMNS)


@remote_cert.command("revoke")
def remote_cert_revoke(
    ctx: typer.Context, serial: str, reason: Annotated[str, typer.Option()] = "privilegeWithdrawn"
) -> None:
    with connected(ctx) as client:
        client.call("cert revoke", body={"reason": reason}, serial=serial)
    out.print(f"certificate {serial} revoked ({reason})")


@remote_admin.command("create")
def remote_admin_create(
    ctx: typer.Context,
    username: Annotated[str, typer.Argument()],
    role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")],
    group: Annotated[str, typer.Option(help="Group the role is bound to.")] = local.TOP_GROUP,
    out_dir: Annotated[Path, typer.Option(help="Where to write cert, key, PKCS#12.")] = (Path(".")),
    p12_password: Annotated[
        str | None, typer.Option(envvar="CERTGATE_P12_PASSWORD", help="PKCS#12 password.")
    ] = None,
) -> None:
    """As the local command: the console answers the new API key, certificate and private
    key once; they are written here as the local command writes them (PEM with the CA
    chain from the console's public /pki/chain.pem, key, PKCS#12), all mode 0600."""
    password = p12_password or secrets.token_urlsafe(18)
    body = {"username": username, "role": role, "group_id": group}
    with connected(ctx) as client:
        created = client.call("admin create", body=body)
        pool = x509.load_pem_x509_certificates(client.send("pki chain").content)
    cert = x509.load_pem_x509_certificate(created["certificate"].encode())
    key = load_pem_private_key(created["private_key"].encode(), None)
    chain = remote.issuer_chain(cert, pool)
    try:
        paths = _write_admin_files(out_dir, username, cert, key, chain, password)
    except OSError as exc:
        raise fail(f"cannot write admin files to {out_dir}: {exc}") from exc
    out.print(f"admin [bold]{username}[/] ({role} on {group}) id={created['id']}")
    show_secret("API key", created["api_key"])
    for path in paths:
        out.print(f"wrote {path}")
    if not p12_password:
        show_secret("PKCS#12 password", password)


AdminArg = Annotated[str, typer.Argument(help="The admin's username (or its id).")]


def admin_id_of(client: remote.RemoteConsole, admin: str) -> str:
    """The id of the admin named ``admin`` that the caller manages; else ``admin`` is
    taken for an id (the console answers 404 if it is none)."""
    found = client.call("admin list", query={"username": admin})
    return str(found[0]["id"]) if found else admin


@remote_admin.command("list")
def remote_admin_list(
    ctx: typer.Context, limit: PageLimitOpt = 50, every: AllPages = False, as_json: JsonFlag = False
) -> None:
    """The admins this admin manages (itself, and those bound only where it may write)."""
    with connected(ctx) as client:
        rows = remote_rows(client, "admin list", AdminOut, limit, every)
    show_listing(rows, "Admins", as_json)


@remote_admin.command("show")
def remote_admin_show(ctx: typer.Context, username: str, as_json: JsonFlag = False) -> None:
    with connected(ctx) as client:
        found = client.call("admin list", query={"username": username})
    show_admin([AdminOut.model_validate(a).model_dump() for a in found], username, as_json)


@remote_admin.command("keys")
def remote_admin_keys(ctx: typer.Context, admin: AdminArg, as_json: JsonFlag = False) -> None:
    """An admin's API keys."""
    with connected(ctx) as client:
        keys = client.call("admin keys", admin_id=admin_id_of(client, admin))
    rows = [ApiKeyOut.model_validate(k).model_dump() for k in keys]
    show_listing(rows, f"API keys of {admin}", as_json)


@remote_admin.command("new-key")
def remote_admin_new_key(ctx: typer.Context, admin: AdminArg) -> None:
    with connected(ctx) as client:
        key = client.call("admin new-key", admin_id=admin_id_of(client, admin))
    show_secret("API key", key["api_key"])


@remote_admin.command("grant")
def remote_admin_grant(
    ctx: typer.Context,
    admin: AdminArg,
    role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")],
    group: Annotated[str, typer.Option()],
) -> None:
    body = {"role": role, "group_id": group}
    with connected(ctx) as client:
        client.call("admin grant", body=body, admin_id=admin_id_of(client, admin))
    out.print(f"{admin} now holds {role} on {group}")


@remote_admin.command("set-password")
def remote_admin_set_password(ctx: typer.Context, admin: AdminArg) -> None:
    """As the local command; the password from $CERTGATE_ADMIN_PASSWORD, else asked for
    on the terminal (never a flag: it would show in ps)."""
    secret = os.environ.get(PASSWORD_ENV) or typer.prompt(
        "new password", hide_input=True, confirmation_prompt=True
    )
    with connected(ctx) as client:
        client.call(
            "admin set-password", body={"password": secret}, admin_id=admin_id_of(client, admin)
        )
    out.print(f"web console password of {admin} set")


@remote_admin.command("totp")
def remote_admin_totp(ctx: typer.Context, admin: AdminArg) -> None:
    """As the local command: the new factor's otpauth:// URI, printed once."""
    with connected(ctx) as client:
        made = client.call("admin totp", admin_id=admin_id_of(client, admin))
    show_secret("TOTP URI", made["otpauth_uri"])


@remote_admin.command("revoke-key")
def remote_admin_revoke_key(ctx: typer.Context, key_id: str) -> None:
    with connected(ctx) as client:
        client.call("admin revoke-key", key_id=key_id)
    out.print(f"API key {key_id} revoked")


@remote_audit.command("list")
def remote_audit_list(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Option("--group")],
    limit: PageLimitOpt = 50,
    every: AllPages = False,
    as_json: JsonFlag = False,
) -> None:
    with connected(ctx) as client:
        query = {"group_id": group_id}
        rows = remote_rows(client, "audit list", AuditOut, limit, every, query)
    show_listing(rows, "Audit log (newest first)", as_json, AUDIT_COLUMNS)


@remote_audit.command("verify")
def remote_audit_verify(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The console recomputes its audit chain and holds it to its signed checkpoints;
    exit 1 unless both hold (as the local command)."""
    with connected(ctx) as client:
        result = AuditVerifyOut.model_validate(client.call("audit verify"))
    show_audit_verdict(result, f"console {ctx.obj.url}", as_json)


@remote_app.command("installer")
def remote_installer(
    ctx: typer.Context, group_id: str, out_file: Annotated[Path, typer.Option("--out")]
) -> None:
    """Download a tunnel installer bundle (the console's installer TTL applies)."""
    with connected(ctx) as client:
        data = client.send("installer", group_id=group_id).content
    write_owner_only(out_file, data)
    out.print(f"wrote {out_file}")


@remote_tunnel.command("nodes")
def remote_tunnel_nodes(ctx: typer.Context, group_id: str, as_json: JsonFlag = False) -> None:
    with connected(ctx) as client:
        rows = client.call("tunnel nodes", group_id=group_id)
    show_listing(rows, f"Tunnel nodes of {group_id}", as_json)


@remote_rotate.command("renew")
def remote_rotate_renew(
    ctx: typer.Context,
    as_json: JsonObjectFlag = False,
) -> None:
    """As the local command (a top-level superadmin): rotate every group identity within
    30 days of its end, and finish such rotations nothing depends on."""
    with connected(ctx) as client:
        shown = client.call("rotate renew")
    print_renewals(shown, as_json)


@remote_rotate.command("status")
def remote_rotate_status(
    ctx: typer.Context,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    with connected(ctx) as client:
        shown = client.call("rotate status", group_id=group_id)
    if as_json:
        print_json(shown)
        return
    if not shown:
        out.print(f"no rotations in group {escape(group_id)}")
    for one in shown:
        print_rotation(one)


def _register_remote_start(kind: str) -> None:
    """``certgate console remote rotate KIND GROUP``: as the local ``rotate KIND GROUP``."""

    def start(
        ctx: typer.Context,
        group_id: str,
        overlap: Annotated[str, typer.Option(help="e.g. 1h, 7d.")] = "1h",
        as_json: JsonObjectFlag = False,
    ) -> None:
        body = {"overlap_s": int(parse_duration(overlap).total_seconds())}
        with connected(ctx) as client:
            shown = client.call("rotate start", body=body, group_id=group_id, kind=kind)
        print_json(shown) if as_json else print_rotation(shown)

    start.__doc__ = f"Prepare a {kind} rotation: the new one is issued and distributed."
    remote_rotate.command(kind)(start)


for _kind in rotation.KINDS:
    _register_remote_start(_kind)


@remote_rotate.command("switch")
def remote_rotate_switch(
    ctx: typer.Context,
    kind: RotateKind,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    with connected(ctx) as client:
        shown = client.call("rotate switch", group_id=group_id, kind=kind)
    print_json(shown) if as_json else print_rotation(shown)


@remote_rotate.command("renew-devices")
def remote_rotate_renew_devices(
    ctx: typer.Context,
    group_id: str,
    as_json: JsonObjectFlag = False,
) -> None:
    """After a device-root switch: devices still on the old root renew at their next check."""
    with connected(ctx) as client:
        shown = client.call("rotate renew-devices", group_id=group_id)
    print_renewing(shown, as_json)


@remote_rotate.command("finish")
def remote_rotate_finish(
    ctx: typer.Context,
    kind: RotateKind,
    group_id: str,
    force: Annotated[bool, typer.Option("--force")] = False,
    as_json: JsonObjectFlag = False,
) -> None:
    query = {"force": "true"} if force else None
    with connected(ctx) as client:
        shown = client.call("rotate finish", query=query, group_id=group_id, kind=kind)
    print_json(shown) if as_json else print_rotation(shown)
