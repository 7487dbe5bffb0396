"""``--config FILE`` for the service commands: a TOML file whose keys are the flags' names.

``data-dir = "/var/lib/certgate"`` stands for ``--data-dir /var/lib/certgate``. The file
fills click's ``default_map``, so a flag on the command line (or its environment variable)
overrides the file, and each value is converted and checked like the flag's. A key that
names no flag of the command is refused with its name: a typo must not be silently ignored.
The logging flags of ``certgate`` itself (``log-format``, ``log-level``, ``syslog``,
``syslog-ca``) are accepted too, so one file configures a whole service.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperOption

from certgate import logs

# TOML key -> logs.LogOptions field; the root command's flags have the same names.
LOG_KEYS = {
    "log-format": "format",
    "log-level": "level",
    "syslog": "syslog",
    "syslog-ca": "syslog_ca",
}
_LOG_META = "certgate.log"
CONFIG_PARAM = "config_file"  # the parameter's name in each service command


def flag_keys(params: list[Any]) -> dict[str, str]:
    """TOML key -> parameter name, for every long option but ``--config`` itself."""
    keys: dict[str, str] = {}
    for param in params:
        if not isinstance(param, TyperOption) or param.name in (None, CONFIG_PARAM):
            continue
        for opt in param.opts + param.secondary_opts:
            if opt.startswith("--"):
                keys[opt[2:]] = param.name
    return keys


def read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{path} is not valid TOML: {exc}") from exc


def defaults_from(path: Path, params: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the command's default_map, the logging settings) from a config file."""
    data = read(path)
    known = flag_keys(params)
    unknown = sorted(set(data) - set(known) - set(LOG_KEYS))
    if unknown:
        raise typer.BadParameter(
            f"{path}: unknown key {unknown[0]!r} (keys are this command's flags: "
            f"{', '.join(sorted([*known, *LOG_KEYS]))})"
        )
    defaults = {known[key]: value for key, value in data.items() if key in known}
    logging_ = {LOG_KEYS[key]: value for key, value in data.items() if key in LOG_KEYS}
    return defaults, logging_


def remember_log_flags(ctx: typer.Context, options: logs.LogOptions, explicit: set[str]) -> None:
    """The root command's logging flags, which a config file must not override."""
    ctx.meta[_LOG_META] = (options, explicit)


def _apply_log_settings(ctx: typer.Context, from_file: dict[str, Any]) -> None:
    if not from_file:
        return
    options, explicit = ctx.meta.get(_LOG_META, (logs.LogOptions(), set()))
    chosen = {k: v for k, v in from_file.items() if k not in explicit}
    try:
        if "format" in chosen:
            chosen["format"] = logs.LogFormat(chosen["format"])
        if "level" in chosen:
            chosen["level"] = logs.LogLevel(chosen["level"])
        logs.configure(dataclasses.replace(options, **chosen))
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(f"logging settings: {exc}") from exc


def _load(ctx: typer.Context, value: Path | None) -> Path | None:
    if value is None or ctx.resilient_parsing:
        return value
    defaults, logging_ = defaults_from(value, ctx.command.params)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    _apply_log_settings(ctx, logging_)
    return value


ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=_load,
        help="TOML file of this command's flags (same names); flags given here override it.",
    ),
]
