"""The `mailgate` command line: one argparse tree; each command family registers itself."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mailgate.core.errors import MailgateError

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    # Imported here so that `mailgate --help` stays cheap and an import error in one family
    # names itself instead of breaking the whole command line at import time.
    from mailgate.core.config_cli import register as register_config
    from mailgate.core.relay.tlsrpt import register as register_tls_report
    from mailgate.core.rules_cli import register as register_rules
    from mailgate.core.serve import register as register_serve
    from mailgate.core.spool.cli import register as register_queue
    from mailgate.core.users.cli import register as register_users
    from mailgate.milters.cli import register as register_milter
    from mailgate.milters.dkim_cli import register as register_dkim
    from mailgate.milters.dmarc_cli import register as register_dmarc
    from mailgate.milters.spam_cli import register as register_spam

    return [
        register_serve,
        register_config,
        register_users,
        register_queue,
        register_tls_report,
        register_rules,
        register_milter,
        register_spam,
        register_dkim,
        register_dmarc,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgate",
        description="mailgate: a lean SMTP core and a chain of milter policy daemons.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except MailgateError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
