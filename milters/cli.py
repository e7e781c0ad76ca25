"""`mailgate milter`: run one policy daemon in the foreground, or list the daemons.

    mailgate milter NAME --socket SPEC [--rules FILE] [--log-level LEVEL] ...
    mailgate milter --list

``register(sub)`` adds the command to the `mailgate` argparse tree (core/cli.py);
``python -m mailgate.milters.cli milter ...`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mailgate.milters import registry
from mailgate.milters.runner import (
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SOCKET_MODE,
    DaemonError,
    Runner,
    RunnerOptions,
    default_rules,
    parse_socket,
    setup_logging,
)

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _size(text: str) -> int:
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 10485760 or 10M, got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an octal mode such as 660, got {text!r}"
        ) from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is out of range")
    return value


def _level(text: str) -> str:
    level = text.upper()
    if level not in _LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(_LEVELS)}, got {text!r}")
    return level


def _list() -> int:
    entries = registry.daemons()
    width = max((len(entry.name) for entry in entries), default=0)
    for entry in entries:
        print(f"{entry.name:<{width}}  {entry.description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    if not args.name:
        print("mailgate milter: name a daemon (see `mailgate milter --list`)", file=sys.stderr)
        return 2
    try:
        entry = registry.get(args.name)
    except registry.UnknownDaemon as exc:
        print(f"mailgate milter: {exc}", file=sys.stderr)
        return 2
    if not args.socket:
        print("mailgate milter: --socket SPEC is required", file=sys.stderr)
        return 2
    log = setup_logging(entry.name, args.log_level)
    try:
        options = RunnerOptions(
            socket=parse_socket(args.socket),
            rules=args.rules.absolute() if args.rules else default_rules(entry),
            body_limit=args.body_limit,
            timeout=args.timeout,
            shutdown_grace=args.shutdown_grace,
            socket_mode=args.socket_mode,
        )
    except DaemonError as exc:
        log.error("%s", exc)
        return 1
    return Runner(entry, options, log).run()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "milter",
        help="run a policy daemon (milter) in the foreground, or list them",
        description=(
            "Run one policy daemon until SIGTERM or SIGINT. SIGHUP re-reads its rules; a "
            "file with errors is reported and the rules in force are kept."
        ),
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="the daemon to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the daemons and exit")
    parser.add_argument(
        "--socket",
        "-s",
        metavar="SPEC",
        help="where to listen: inet:PORT@HOST, inet6:PORT@HOST or unix:/path",
    )
    parser.add_argument(
        "--rules",
        "-r",
        type=Path,
        metavar="FILE",
        help="the rule file (default: the shipped rules/NAME.yaml)",
    )
    parser.add_argument(
        "--log-level",
        type=_level,
        default=_level(os.environ.get("MAILGATE_LOG_LEVEL") or "INFO"),
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default: $MAILGATE_LOG_LEVEL, else INFO)",
    )
    parser.add_argument(
        "--body-limit",
        type=_size,
        default=None,
        metavar="SIZE",
        help="keep at most this much of a body for the rules; the size still counts all "
        "(default: the daemon's own limit: 32M for content)",
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=None,
        metavar="SECONDS",
        help="give up on a silent MTA after this long (default: libmilter's 7210)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="on SIGTERM, let messages in progress finish for this long (default: 5)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_mode,
        default=DEFAULT_SOCKET_MODE,
        metavar="MODE",
        help="permissions of a unix socket, octal (default: 660)",
    )
    parser.set_defaults(handler=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `milter` on its own, as `mailgate milter` would."""
    parser = argparse.ArgumentParser(prog="mailgate")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
