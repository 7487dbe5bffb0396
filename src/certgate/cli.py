"""The ``certgate`` command: one typer sub-app per component."""

from __future__ import annotations

import logging

import typer

from certgate.console.cli import app as console_app
from certgate.planner.cli import app as plan_app

app = typer.Typer(
    help="certgate: certificate-based zero-trust tunnel",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(console_app, name="console")
app.add_typer(plan_app, name="plan")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    app()
