"""CLI glue for configuration: the shared --config/--data-dir options and `config check`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mailgate.core.config import FIELDS, Config, flag_name, load_config
from mailgate.core.errors import ConfigError

_BOOL_FIELDS = {name for name, f in Config.model_fields.items() if f.annotation is bool}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """--config and --data-dir: what every command needs to find the gateway's state."""
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("MAILGATE_CONFIG") or None,
        help="YAML configuration file (default: $MAILGATE_CONFIG, else built-in defaults)",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="data directory (./var)")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (--smtp-listen, --max-recipients ...), the highest precedence."""
    group = parser.add_argument_group("settings (override the file and MAILGATE_* variables)")
    for field in FIELDS:
        if field == "data_dir":
            continue
        if field in _BOOL_FIELDS:
            group.add_argument(
                flag_name(field), dest=field, default=None, action=argparse.BooleanOptionalAction
            )
        else:
            group.add_argument(flag_name(field), dest=field, default=None, metavar="VALUE")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    for field in FIELDS:
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    return load_config(args.config, overrides=overrides)


def _check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{count} problem{'s' if count != 1 else ''} found", file=sys.stderr)
        return 1
    print(f"{path or '(defaults)'}: OK")
    if args.verbose:
        for field in FIELDS:
            print(f"  {field}: {_show(getattr(config, field))}")
    return 0


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "(none)"
    return "(unset)" if value is None else str(value)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = sub.add_parser("config", help="inspect and validate the configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True
    check = config_sub.add_parser(
        "check", help="validate a configuration file; print every error with file, line and field"
    )
    check.add_argument("file", nargs="?", type=Path, help="the file to check (default: --config)")
    check.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("MAILGATE_CONFIG") or None,
        help=argparse.SUPPRESS,
    )
    check.add_argument("-v", "--verbose", action="store_true", help="print the effective settings")
    check.set_defaults(handler=_check)
