"""`mailgate spam learn`: teach spamd's Bayes database messages as spam or ham (TELL).

    mailgate spam learn --spam FILE...        # learn as spam
    mailgate spam learn --ham FILE...         # learn as ham
    mailgate spam learn --forget FILE...      # forget what was learned from them

Each FILE is one message (RFC 5322, as a mail client saves it); a directory means every
file in it, and in a Maildir its cur/ and new/; ``-`` reads one message from standard
input. spamd must run with ``--allow-tell``. spamd's address, timeout and user come from
the spamassassin rule file's settings (the shipped one unless ``--rules FILE``), and
``--spamd`` / ``--user`` override them.

The summary line counts learned, already known and failed messages; the exit status is 0
when none failed, 1 otherwise (2 for a usage error). ``register(sub)`` adds the command
to the `mailgate` command line (core/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from mailgate.milters.spamd import LearnClass, SpamdClient, SpamdError, parse_address
from mailgate.policies.spamassassin import Settings

# After this many failures in a row (spamd down, TELL not allowed) the rest is not tried:
# every further attempt would wait for the same timeout to say the same thing.
GIVE_UP_AFTER = 3


def _settings(args: argparse.Namespace) -> Settings:
    """The spamassassin rule file's settings (the shipped file unless --rules)."""
    from mailgate.milters import registry
    from mailgate.milters.runner import DaemonError, default_rules
    from mailgate.policies.rules import RuleError, load_rules

    if args.rules is None:
        try:
            path = default_rules(registry.get("spamassassin"))
        except DaemonError:
            return Settings()
    else:
        path = args.rules
    try:
        ruleset = load_rules(path, check_test_files=False)
    except RuleError as exc:
        raise _UsageError("\n".join(exc.problems) if exc.problems else f"{path}: {exc}") from None
    except OSError as exc:
        raise _UsageError(f"{path}: cannot read the rules: {exc.strerror or exc}") from None
    if ruleset.daemon != "spamassassin":
        raise _UsageError(f"{path}: a rule file for {ruleset.daemon}, not spamassassin")
    return ruleset.settings if isinstance(ruleset.settings, Settings) else Settings()


class _UsageError(Exception):
    pass


def _messages(paths: Sequence[str]) -> Iterator[tuple[str, bytes | OSError]]:
    """(name, message bytes or the error reading it) for every message the paths name."""
    for name in paths:
        if name == "-":
            yield "<stdin>", sys.stdin.buffer.read()
            continue
        path = Path(name)
        if path.is_dir():
            maildir = [path / "cur", path / "new"]
            dirs = [d for d in maildir if d.is_dir()] or [path]
            for directory in dirs:
                for item in sorted(directory.iterdir()):
                    if item.is_file() and not item.name.startswith("."):
                        yield from _read(item)
            continue
        yield from _read(path)


def _read(path: Path) -> Iterator[tuple[str, bytes | OSError]]:
    try:
        yield str(path), path.read_bytes()
    except OSError as exc:
        yield str(path), exc


def _plural(count: int, word: str) -> str:
    return f"{count} message{'' if count == 1 else 's'} {word}"


def _learn(args: argparse.Namespace) -> int:
    if not (args.spam or args.ham or args.forget):
        print("mailgate spam learn: say --spam, --ham or --forget", file=sys.stderr)
        return 2
    try:
        settings = _settings(args)
        address = parse_address(args.spamd or settings.address)
        client = SpamdClient(
            address,
            timeout=args.timeout or settings.timeout,
            connect_timeout=settings.connect_timeout,
            user=args.user or settings.user,
        )
    except (_UsageError, ValueError) as exc:
        print(f"mailgate spam learn: {exc}", file=sys.stderr)
        return 2
    learn: LearnClass | None = None if args.forget else ("spam" if args.spam else "ham")
    verb = "forgotten" if args.forget else f"learned as {learn}"
    done = known = failed = skipped = 0
    in_a_row = 0
    for name, data in _messages(args.files):
        if in_a_row >= GIVE_UP_AFTER:
            skipped += 1
            continue
        if isinstance(data, OSError):
            print(f"{name}: cannot read: {data.strerror or data}", file=sys.stderr)
            failed += 1
            continue
        if not data.strip():
            print(f"{name}: empty, not a message", file=sys.stderr)
            failed += 1
            continue
        try:
            result = client.tell(data, learn, forget=args.forget)
            if not result.changed:
                # A spamd with several children now and then answers "nothing done" for
                # a message it does not know (Bayes locking); asking again is harmless.
                result = client.tell(data, learn, forget=args.forget)
        except SpamdError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
            in_a_row += 1
            continue
        in_a_row = 0
        if result.changed:
            done += 1
            if args.verbose:
                print(f"{name}: {verb}")
        else:
            known += 1
            if args.verbose:
                print(f"{name}: already {verb}" if not args.forget else f"{name}: not known")
    parts = [_plural(done, verb)]
    parts.append(f"{known} already known" if not args.forget else f"{known} not known")
    parts.append(f"{failed} failed")
    if skipped:
        parts.append(f"{skipped} not tried after {GIVE_UP_AFTER} failures in a row")
    print(f"{', '.join(parts)} (spamd at {address})")
    if done + known + failed + skipped == 0:
        print("mailgate spam learn: no messages found", file=sys.stderr)
        return 1
    return 1 if failed or skipped else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "spam",
        help="SpamAssassin: teach spamd's Bayes database (spam learn)",
        description="Work with the SpamAssassin daemon's spamd.",
    )
    commands = parser.add_subparsers(dest="spam_command", metavar="COMMAND")
    commands.required = True
    learn = commands.add_parser(
        "learn",
        help="learn messages as spam or ham, or forget them (spamd TELL; needs --allow-tell)",
        description=(
            "Teach spamd's Bayes database through the SPAMD protocol's TELL request, as "
            "`spamc --learntype` does. spamd must run with --allow-tell. Exit status: 0 when "
            "every message was learned or already known, 1 when any failed."
        ),
    )
    kind = learn.add_mutually_exclusive_group()
    kind.add_argument("--spam", action="store_true", help="learn the messages as spam")
    kind.add_argument("--ham", action="store_true", help="learn the messages as ham (not spam)")
    learn.add_argument(
        "--forget", action="store_true", help="forget what was learned from the messages"
    )
    learn.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="a message file, a directory or Maildir of them, or - for standard input",
    )
    learn.add_argument(
        "--spamd",
        metavar="ADDRESS",
        help="spamd's address: HOST:PORT, [IPv6]:PORT or unix:/path "
        "(default: the rule file's settings, else 127.0.0.1:783)",
    )
    learn.add_argument(
        "--rules",
        "-r",
        type=Path,
        metavar="FILE",
        help="the spamassassin rule file whose settings to use (default: the shipped one)",
    )
    learn.add_argument("--user", metavar="USER", help="whose Bayes database (spamd's User)")
    learn.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="per message (default: the settings')"
    )
    learn.add_argument("--verbose", "-v", action="store_true", help="one line per message")
    learn.set_defaults(handler=_learn)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `spam` on its own, as `mailgate spam` would."""
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
