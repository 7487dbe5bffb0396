"""The ``certgate`` command: one typer sub-app per component."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from certgate import cliconfig, logs
from certgate.access.cli import app as access_app
from certgate.certproxy.cli import app as certproxy_app
from certgate.console.cli import app as console_app
from certgate.device.cli import app as device_app
from certgate.planner.cli import app as plan_app
from certgate.tunnel.cli import app as tunnel_app

app = typer.Typer(
    help="certgate: certificate-based zero-trust tunnel",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(console_app, name="console")
app.add_typer(plan_app, name="plan")
app.add_typer(tunnel_app, name="tunnel")
app.add_typer(device_app, name="device")
app.add_typer(access_app, name="access")
app.add_typer(certproxy_app, name="certproxy")


def main() -> None:
    # The formats name no process, thread or task: not collecting them saves a getpid()
    # and a few lookups on every record (the tunnel logs each admission).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logs.configure(logs.LogOptions())
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


@app.callback()
def logging_options(
    ctx: typer.Context,
    log_format: Annotated[
        logs.LogFormat, typer.Option(help="stderr format: one line of text or of JSON.")
    ] = logs.LogFormat.TEXT,
    log_level: Annotated[logs.LogLevel, typer.Option(help="Lowest level logged.")] = (
        logs.LogLevel.INFO
    ),
    syslog: Annotated[
        str | None,
        typer.Option(help="Also send RFC 5424 syslog to udp://H:P, tcp://H:P or tls://H:P."),
    ] = None,
    syslog_ca: Annotated[
        str | None, typer.Option(help="CA file to verify a tls:// syslog collector.")
    ] = None,
) -> None:
    """Logging for every command (a service's --config file may set these too)."""
    options = logs.LogOptions(log_format, log_level, syslog, syslog_ca)
    explicit = {
        field for key, field in cliconfig.LOG_KEYS.items() if _given(ctx, key.replace("-", "_"))
    }
    try:
        logs.configure(options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--syslog") from exc
    cliconfig.remember_log_flags(ctx, options, explicit)


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


@app.command()
def demo(
    keep: bool = typer.Option(False, "--keep", help="Leave the system running afterwards."),
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Write everything here and keep it (default: a temporary directory, removed).",
        ),
    ] = None,
) -> None:
    """Run the whole system end to end on loopback and show each step."""
    from certgate.demo import run

    raise typer.Exit(run(keep=keep, work_dir=work_dir))
