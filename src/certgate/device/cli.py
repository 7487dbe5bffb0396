"""``certgate device``: enroll, authenticate apps, fetch profiles, run the local agent.

Exit codes: 0 success, 1 error, 2 usage, 3 the console unenrolled this device (the
message says how to enroll again). Secrets never appear on the command line: passwords
come from the environment variable named by ``--password-env``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from certgate.device import posture
from certgate.device.agent import (
    DEFAULT_APP,
    DEFAULT_POLICY_WAIT_S,
    EXIT_UNENROLLED,
    Agent,
    AgentConfig,
    exec_command,
)
from certgate.device.enroll import (
    ConsoleAPI,
    DeviceUnenrolled,
    authenticate_app,
    enroll,
    reenroll_guidance,
)
from certgate.device.listeners import ListenAddress
from certgate.device.profile import (
    DEFAULT_RENEW_FRACTION,
    fetch_profile,
    load_profile,
    maintain,
)
from certgate.device.state import StateDir
from certgate.device.udp import UDPForwardSpec
from certgate.errors import CertgateError, ConfigError

app = typer.Typer(
    help="Device agent: enrollment, app certificates, Per-App Tunnel profile, local proxy.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

StateOption = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        "-s",
        envvar="CERTGATE_DEVICE_DIR",
        help="Device state directory (created 0700).",
    ),
]
DEFAULT_STATE = Path.home() / ".certgate" / "device"


def _fail(exc: CertgateError, state: StateDir | None = None) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}")
    if isinstance(exc, DeviceUnenrolled) and state is not None:
        err.print(escape(reenroll_guidance(state, _console_url(state))), soft_wrap=True)
        return typer.Exit(EXIT_UNENROLLED)
    return typer.Exit(1)


def _console_url(state: StateDir) -> str | None:
    try:
        return state.enrollment().console_url
    except CertgateError:
        return None


def _password(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"environment variable {variable} is not set")
    return value


@app.command("enroll")
def enroll_command(
    console: Annotated[str, typer.Option("--console", help="Console URL (https://...).")],
    ca_file: Annotated[Path, typer.Option("--ca-file", help="Console root CA (PEM).")],
    token: Annotated[str | None, typer.Option("--token", help="One-time enrollment token.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Enrollment user.")] = None,
    password_env: Annotated[
        str | None, typer.Option("--password-env", help="Variable holding the password.")
    ] = None,
    platform: Annotated[str | None, typer.Option(help="Platform (default: this OS).")] = None,
    name: Annotated[str, typer.Option(help="Device name shown in the console.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing enrollment.")] = False,
    state_dir: StateOption = DEFAULT_STATE,
) -> None:
    """Enroll this device; stores its DeviceUid and credential in the state directory."""
    state = StateDir(state_dir)
    try:
        enrollment, compliance = enroll(
            state,
            console,
            ca_file.read_bytes(),
            token=token,
            username=user,
            password=_password(password_env),
            platform=platform,
            name=name,
            force=force,
        )
    except OSError as exc:
        raise _fail(ConfigError(f"cannot read {ca_file}: {exc.strerror}")) from exc
    except CertgateError as exc:
        raise _fail(exc) from exc
    out.print(
        f"enrolled: DeviceUid [bold]{enrollment.device_uid}[/] in group {enrollment.group_id}"
    )
    out.print(f"compliance: {compliance}; state in {state.path}")


@app.command("app-auth")
def app_auth_command(
    bundle: Annotated[str, typer.Option("--app", help="Application bundle id.")],
    user: Annotated[str, typer.Option("--user", help="Enrollment user.")],
    password_env: Annotated[
        str, typer.Option("--password-env", help="Variable with the password.")
    ],
    export_password_env: Annotated[
        str | None,
        typer.Option(
            "--export-password-env",
            "--p12-password-env",
            help="Variable with the password of the key exports (key.pem, identity.p12); "
            "without one only the certificate is exported.",
        ),
    ] = None,
    state_dir: StateOption = DEFAULT_STATE,
) -> None:
    """Proxy mode: the app's first authentication earns its app+device certificate."""
    state = StateDir(state_dir)
    try:
        password = _password(password_env)
        assert password is not None
        export = _password(export_password_env)
        issued = authenticate_app(
            state, bundle, user, password, export.encode() if export else None
        )
    except CertgateError as exc:
        raise _fail(exc, state) from exc
    files = issued.files
    out.print(f"app certificate for {escape(bundle)}: {issued.identity.thumbprint}")
    table = Table("file", "use")
    table.add_row(str(files.identity), "certificate + chain + key, sealed (the agent's)")
    table.add_row(str(files.cert), "PEM certificate + chain (curl --proxy-cert)")
    if files.key.exists():
        table.add_row(str(files.key), "encrypted PEM key (curl --proxy-key, --proxy-pass)")
        table.add_row(str(files.pkcs12), "PKCS#12 (browsers; curl --proxy-cert-type P12)")
    else:
        table.add_row("(no key export)", "give --export-password-env to export the key")
    out.print(table)


@app.command("profile")
def profile_command(state_dir: StateOption = DEFAULT_STATE) -> None:
    """Per-App Tunnel: fetch the profile; a newer one replaces the device certificate."""
    state = StateDir(state_dir)
    try:
        with ConsoleAPI.for_state(state) as api:
            delivery = fetch_profile(state, api)
    except CertgateError as exc:
        raise _fail(exc, state) from exc
    profile = delivery.profile
    out.print(f"profile v{profile.version}: device certificate {delivery.identity.thumbprint}")
    if delivery.previous_thumbprint:
        out.print(f"replaces {delivery.previous_thumbprint} (removed)")
    hosts = ", ".join(f"{h}:{profile.tunnel.per_app_port}" for h in profile.tunnel.hosts)
    out.print(f"tunnel (Per-App): {hosts}; proxy port {profile.tunnel.proxy_port}")
    out.print(f"rules: {len(profile.rules.rules)}, default {profile.rules.default.value}")


@app.command("status")
def status_command(state_dir: StateOption = DEFAULT_STATE) -> None:
    """Show the local state and what the console says about this device."""
    state = StateDir(state_dir)
    try:
        enrollment = state.enrollment()
        profile = load_profile(state)
        with ConsoleAPI.for_state(state) as api:
            remote = api.device_status()
    except CertgateError as exc:
        raise _fail(exc, state) from exc
    out.print(f"DeviceUid {enrollment.device_uid}, group {enrollment.group_id}")
    out.print(f"console: {remote.get('enrollment_status')}, {remote.get('compliance_status')}")
    out.print(f"profile: v{profile.version}" if profile else "profile: none yet")
    if profile is not None:
        out.print(f"policy: v{profile.policy_version}")
    for bundle in state.apps():
        out.print(f"app certificate: {bundle}")
    if remote.get("enrollment_status") != "enrolled":
        raise _fail(DeviceUnenrolled(f"device is {remote.get('enrollment_status')}"), state)


@app.command("checkin")
def checkin_command(
    state_dir: StateOption = DEFAULT_STATE,
    show: Annotated[bool, typer.Option("--show", help="Print the report; send nothing.")] = False,
) -> None:
    """Report this host's posture with the device certificate; print the verdict."""
    if show:
        out.print_json(data=posture.collect().to_dict())
        return
    state = StateDir(state_dir)
    try:
        verdict = posture.check_in(state)
    except CertgateError as exc:
        raise _fail(exc, state) from exc
    out.print(f"compliance: {verdict.get('compliance_status')}")
    for failure in verdict.get("failures", []):
        out.print(f"  failing {escape(failure['rule'])}: {escape(failure['reason'])}")


@app.command("renew")
def renew_command(
    fraction: Annotated[
        float, typer.Option(help="Renew when less than this fraction of lifetime remains.")
    ] = DEFAULT_RENEW_FRACTION,
    state_dir: StateOption = DEFAULT_STATE,
) -> None:
    """Renew the device certificate if it is due; list app certificates that are due."""
    state = StateDir(state_dir)
    try:
        with ConsoleAPI.for_state(state) as api:
            report = maintain(state, api, fraction)
    except CertgateError as exc:
        raise _fail(exc, state) from exc
    if report.delivery is not None:
        out.print(f"renewed ({report.reason}): {report.delivery.identity.thumbprint}")
    else:
        out.print("device certificate: not due")
    for due in report.apps_due:
        err.print(
            f"[yellow]warning:[/] app certificate of {escape(due.bundle_id)} expires "
            f"{due.not_after:%Y-%m-%d}; renewing needs the enrollment credentials: "
            f"certgate device app-auth --app {escape(due.bundle_id)} ..."
        )


def _app_ports(values: list[str]) -> tuple[tuple[str, ListenAddress], ...]:
    ports = []
    for value in values:
        bundle, sep, port = value.partition("=")
        if not sep:
            raise ConfigError(f"--app-port needs BUNDLE=PORT or BUNDLE=HOST:PORT, got {value!r}")
        address = ListenAddress.parse(port if ":" in port else f"127.0.0.1:{port}")
        ports.append((bundle, address))
    return tuple(ports)


@app.command("run")
def run_command(
    socks: Annotated[str, typer.Option(help="SOCKS5 listener ('' to disable).")] = "127.0.0.1:1080",
    http: Annotated[
        str, typer.Option(help="HTTP proxy listener ('' to disable).")
    ] = "127.0.0.1:3128",
    app_port: Annotated[
        list[str] | None, typer.Option("--app-port", help="BUNDLE=PORT: a port for one app.")
    ] = None,
    udp_forward: Annotated[
        list[str] | None,
        typer.Option(
            "--udp-forward",
            help="BUNDLE=[HOST:]PORT:DEST_HOST:DEST_PORT: a local UDP port for one app, "
            "carried through the tunnel to one destination.",
        ),
    ] = None,
    default_app: Annotated[str, typer.Option(help="App for unattributed traffic.")] = DEFAULT_APP,
    renew_fraction: Annotated[
        float, typer.Option(help="Renewal threshold.")
    ] = DEFAULT_RENEW_FRACTION,
    check_interval: Annotated[float, typer.Option(help="Seconds between console checks.")] = 300.0,
    policy_wait: Annotated[
        float,
        typer.Option(help="Seconds a long-poll for policy changes waits (0: do not follow)."),
    ] = DEFAULT_POLICY_WAIT_S,
    unsafe_listen_any: Annotated[
        bool, typer.Option("--unsafe-listen-any", help="Allow non-loopback listeners.")
    ] = False,
    state_dir: StateOption = DEFAULT_STATE,
) -> None:
    """Run the local SOCKS5 / HTTP proxy that applies the device rules per app."""
    state = StateDir(state_dir)
    try:
        config = AgentConfig(
            socks=ListenAddress.parse(socks) if socks else None,
            http=ListenAddress.parse(http) if http else None,
            app_ports=_app_ports(app_port or []),
            udp_forwards=tuple(UDPForwardSpec.parse(v) for v in udp_forward or []),
            default_app=default_app,
            unsafe_listen_any=unsafe_listen_any,
            renew_fraction=renew_fraction,
            check_interval_s=check_interval,
            policy_wait_s=policy_wait or None,
            publish_runtime=True,
        )
        code = asyncio.run(_serve(state, config))
    except CertgateError as exc:
        raise _fail(exc, state) from exc
    except OSError as exc:
        raise _fail(ConfigError(f"cannot listen: {exc}")) from exc
    raise typer.Exit(code)


async def _serve(state: StateDir, config: AgentConfig) -> int:
    agent = Agent(state, config)
    await agent.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    stopping = loop.create_task(stop_requested.wait())
    finished = loop.create_task(agent.wait())
    await asyncio.wait({stopping, finished}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not finished.done():
        await agent.stop()
    return await finished  # on exit code 3 the agent has logged the guidance


@app.command(
    "exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_cmd(
    ctx: typer.Context,
    bundle: Annotated[str, typer.Option("--app", help="Application bundle id.")],
    state_dir: StateOption = DEFAULT_STATE,
) -> None:
    """Run COMMAND with its traffic attributed to an app: certgate device exec --app B -- CMD"""
    state = StateDir(state_dir)
    try:
        code = exec_command(state, bundle, list(ctx.args))
    except CertgateError as exc:
        raise _fail(exc, state) from exc
    raise typer.Exit(code)
