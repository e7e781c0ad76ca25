"""CLI glue for rule files: `mailgate rules check|test|explain|schema`.

``check`` validates files and prints every problem as ``file:line: field: message``;
``test`` runs each file's own test cases; ``explain`` shows the verdict of a file on one
message and why; ``schema`` prints the JSON Schema committed as rules/schema.json. Each
exits 1 when anything is wrong, so they fit CI and pre-commit hooks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mailgate.policies.facts import MessageFacts
from mailgate.policies.rules import RuleError, RuleSet, load_rules, run_tests
from mailgate.policies.rules.schema import schema_json
from mailgate.policies.verdict import Verdict


def _load(path: Path) -> RuleSet | None:
    try:
        return load_rules(path)
    except RuleError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _check(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        ruleset = _load(path)
        if ruleset is None:
            failed += 1
            continue
        print(
            f"{path}: OK ({ruleset.daemon}, {_plural(len(ruleset.rules), 'rule')}, "
            f"{_plural(len(ruleset.tests), 'test')})"
        )
    if failed:
        print(f"{_plural(failed, 'file')} with problems", file=sys.stderr)
    return 1 if failed else 0


def _test(args: argparse.Namespace) -> int:
    passed = failed = 0
    for path in args.files:
        ruleset = _load(path)
        if ruleset is None:
            failed += 1
            continue
        if not ruleset.tests:
            print(f"{path}: no test cases")
        for result in run_tests(ruleset):
            if result.passed:
                passed += 1
                print(f"PASS {path}: {result.name}")
                continue
            failed += 1
            print(f"FAIL {path}: {result.name}: {result.reason}")
            for line in result.diff:
                print(f"    {line}")
            if result.verdict is not None:
                for match in result.verdict.matched:
                    print(f"    matched {match.rule}: {match.reason}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _fact(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, yaml.safe_load(value)
    except yaml.YAMLError:
        return name, value


def _explain(args: argparse.Namespace) -> int:
    chain = _explain_chain(args)
    if chain is None:
        return 1
    try:
        raw = sys.stdin.buffer.read() if str(args.message) == "-" else args.message.read_bytes()
    except OSError as exc:
        print(f"{args.message}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    facts = MessageFacts.from_bytes(
        raw,
        mail_from=args.sender,
        rcpt_tos=list(args.recipients),
        client_ip=args.client_ip,
        auth_user=args.auth_user,
        extra=dict(args.facts),
    )
    final: Verdict | None = None
    for name, ruleset in chain:
        if ruleset is None:
            print(f"{name}: external milter, not evaluated offline")
            continue
        print(f"{name} ({ruleset.source}):")
        verdict = ruleset.evaluate(facts)
        _print_verdict(verdict, indent="  ")
        # As in the chain: the first daemon that rejects, tempfails or discards decides.
        if final is None and verdict.action in ("reject", "tempfail", "discard"):
            final = verdict
    if final is None:
        held = [v for _, rs in chain if rs is not None for v in [rs.evaluate(facts)]]
        final = next((v for v in held if v.action == "quarantine"), Verdict("accept"))
    print(f"final: {_describe_action(final)}")
    return 0


def _explain_chain(args: argparse.Namespace) -> list[tuple[str, RuleSet | None]] | None:
    """The rule sets to run: --rules files, else the daemons of the configured chain."""
    if args.rules:
        chain: list[tuple[str, RuleSet | None]] = []
        for path in args.rules:
            ruleset = _load(path)
            if ruleset is None:
                return None
            chain.append((ruleset.daemon, ruleset))
        return chain
    from mailgate.core.config import load_config
    from mailgate.core.errors import ConfigError
    from mailgate.milters import registry
    from mailgate.milters.runner import DaemonError, default_rules

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None
    if not config.milters:
        print("no milters are configured; name rule files with --rules FILE", file=sys.stderr)
        return None
    chain = []
    for milter in config.milters:
        if milter.daemon is None:
            chain.append((milter.name, None))
            continue
        try:
            path = milter.rules or default_rules(registry.get(milter.daemon))
        except (DaemonError, LookupError) as exc:
            print(f"milter {milter.name}: {exc}", file=sys.stderr)
            return None
        ruleset = _load(path)
        if ruleset is None:
            return None
        chain.append((milter.name, ruleset))
    return chain


def _describe_action(verdict: Verdict) -> str:
    action: str = verdict.action
    if action in ("reject", "tempfail"):
        code, enhanced, text = verdict.reply()
        return f"{action} {code} {enhanced} {text}"
    if action == "quarantine":
        return f"quarantine ({verdict.quarantine_reason})"
    return action


def _print_verdict(verdict: Verdict, indent: str = "") -> None:
    print(f"{indent}action: {_describe_action(verdict)}")
    for match in verdict.matched:
        print(f"{indent}matched {match.rule}: {match.reason}")
    for change in verdict.header_changes:
        where = f" #{change.index}" if change.op != "add" else ""
        print(f"{indent}header {change.op}{where}: {change.name}: {change.value}")
    for address in verdict.add_recipients:
        print(f"{indent}add recipient: {address}")
    for address in verdict.remove_recipients:
        print(f"{indent}remove recipient: {address}")


def _schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_json())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = sub.add_parser("rules", help="validate, test and explain rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="ACTION")
    rules_sub.required = True

    check = rules_sub.add_parser(
        "check", help="validate rule files; print every problem with file, line and field"
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.set_defaults(handler=_check)

    test = rules_sub.add_parser("test", help="run the test cases of rule files")
    test.add_argument("files", nargs="+", type=Path, metavar="FILE")
    test.set_defaults(handler=_test)

    explain = rules_sub.add_parser(
        "explain",
        help="run a message through the configured chain offline: per daemon, which rule "
        "matched and why, and the final verdict",
    )
    explain.add_argument("message", type=Path, metavar="MESSAGE", help="an .eml file, - = stdin")
    explain.add_argument(
        "--rules",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="rule files to use instead of the configured chain (repeatable, in order)",
    )
    explain.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("MAILGATE_CONFIG") or None,
        help="configuration naming the chain (default: $MAILGATE_CONFIG)",
    )
    explain.add_argument("--from", dest="sender", default="", help="envelope sender")
    explain.add_argument(
        "--to", dest="recipients", action="append", default=[], help="envelope recipient"
    )
    explain.add_argument("--client-ip", default="", help="the client's IP address")
    explain.add_argument("--auth-user", default=None, help="the SMTP AUTH identity")
    explain.add_argument(
        "--fact",
        dest="facts",
        action="append",
        default=[],
        type=_fact,
        metavar="NAME=VALUE",
        help="a fact of another daemon, e.g. spam_score=7.5 (repeatable)",
    )
    explain.set_defaults(handler=_explain)

    schema = rules_sub.add_parser("schema", help="print the JSON Schema of rule files")
    schema.set_defaults(handler=_schema)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mailgate.core.rules_cli rules ...`: the same commands without the rest."""
    parser = argparse.ArgumentParser(prog="mailgate")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
