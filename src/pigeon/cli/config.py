"""Where ``pigeon serve`` takes its settings from: the command line, the environment
(``PIGEON_<OPTION>``), a TOML file (``--config``), in that order of precedence; what
``--print-config`` shows; how logs are written; what SIGHUP reloads."""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

__all__ = ["load_config_file", "print_config", "reloaded", "setup_logging"]

_SOURCES = {
    ParameterSource.COMMANDLINE: "command line",
    ParameterSource.ENVIRONMENT: "environment",
    ParameterSource.DEFAULT_MAP: "config file",
    ParameterSource.DEFAULT: "default",
}
_NOT_SETTINGS = {"config", "print_config"}
RELOADABLE = ("token", "tls_cert", "tls_key", "log_level")


def _settings(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name and p.name not in _NOT_SETTINGS}


def _read(path: Path, command: click.Command) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    known = _settings(command)
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown setting(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(sorted(known))}",
            param_hint="--config",
        )
    return values


def load_config_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """``--config FILE``: its settings become the defaults (below env and command line)."""
    if value is not None:
        values = _read(value, ctx.command)
        ctx.default_map = {**(ctx.default_map or {}), **values}
        ctx.meta["pigeon.config_file"] = value
    return value


def print_config(ctx: click.Context, values: dict[str, Any]) -> None:
    """Every setting, its value, and where it came from."""
    width = max(map(len, values))
    for name, value in values.items():
        if name in _NOT_SETTINGS:
            continue
        source = _SOURCES.get(ctx.get_parameter_source(name), "default")  # type: ignore[arg-type]
        shown = "***" if name == "token" and value else value
        click.echo(f"{name:<{width}}  {shown!s:<32}  ({source})")


def reloaded(ctx: click.Context, current: dict[str, Any]) -> dict[str, Any]:
    """The reloadable settings as they are now in the environment and the config file;
    those given on the command line keep their value."""
    path: Path | None = ctx.meta.get("pigeon.config_file")
    file = _read(path, ctx.command) if path is not None else {}
    params = _settings(ctx.command)
    out = {}
    for name in RELOADABLE:
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            out[name] = current[name]
            continue
        env = [e for e in _envvars(params[name]) if e in os.environ]
        if env:
            out[name] = params[name].type_cast_value(ctx, os.environ[env[0]])
        elif name in file:
            out[name] = file[name]
        else:
            # the option's own default: not ``get_default(ctx)``, which answers from the
            # context's default map, i.e. the config file as it was read at the start; and
            # click >= 8.2 marks "no default" with a truthy sentinel: no value is None
            default = params[name].default
            default = default() if callable(default) else default
            out[name] = default if isinstance(default, str) else None
    return out


def _envvars(param: click.Parameter) -> list[str]:
    given = param.envvar
    names: list[str] = (
        [str(n) for n in given]
        if isinstance(given, list | tuple)
        else [given]
        if isinstance(given, str)
        else []
    )
    return [*names, f"PIGEON_{(param.name or '').upper()}"]


def setup_logging(level: str, fmt: str) -> None:
    """Text lines, or one JSON object per line (python-json-logger) with stable keys:
    time, level, logger, message."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
