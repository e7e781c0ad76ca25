"""`mailgate dmarc report` and `mailgate dmarc check`: DMARC aggregate reports and records.

    mailgate dmarc report [--day YYYY-MM-DD] [--domain D]     # what the day's reports hold
    mailgate dmarc report --dry-run [--out DIR]               # the XML (to DIR: .xml.gz files)
    mailgate dmarc report --send [--force]                    # queue them to the rua addresses
    mailgate dmarc check DOMAIN                               # the record, parsed and checked

The day is a UTC day, yesterday by default. The settings (DNS, the history file, the
reporting address) come from the dmarc rule file (the shipped one unless ``--rules``);
the data directory, host name and spool from the gateway's configuration (``--config``,
``--data-dir``, MAILGATE_* variables). ``register(sub)`` adds the commands to the
`mailgate` command line (core/cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from mailgate.core.config_cli import add_config_option, config_from_args
from mailgate.core.dns import DnsTempError, resolver_for
from mailgate.core.errors import ConfigError
from mailgate.milters.dmarc_reports import (
    History,
    build_report,
    destinations,
    history_path,
    send_reports,
    utc_day,
)
from mailgate.policies.dmarc import Settings, describe, discover
from mailgate.policies.psl import organizational_domain
from mailgate.policies.spf import DnsFailure, valid_domain


class _UsageError(Exception):
    pass


def _settings(rules: Path | None) -> Settings:
    from mailgate.milters import registry
    from mailgate.milters.runner import DaemonError, default_rules
    from mailgate.policies.rules import RuleError, load_rules

    if rules is None:
        try:
            rules = default_rules(registry.get("dmarc"))
        except DaemonError:
            return Settings()
    try:
        ruleset = load_rules(rules, check_test_files=False)
    except RuleError as exc:
        raise _UsageError("\n".join(exc.problems) if exc.problems else f"{rules}: {exc}") from None
    except OSError as exc:
        raise _UsageError(f"{rules}: cannot read the rules: {exc.strerror or exc}") from None
    if ruleset.daemon != "dmarc":
        raise _UsageError(f"{rules}: a rule file for {ruleset.daemon}, not dmarc")
    return ruleset.settings if isinstance(ruleset.settings, Settings) else Settings()


def _lookup(settings: Settings) -> Any:
    resolver = resolver_for(settings.dns)

    def lookup(name: str, rdtype: str, timeout: float) -> Any:
        try:
            return resolver.query(name, rdtype, timeout=min(timeout, settings.dns.timeout))
        except DnsTempError as exc:
            raise DnsFailure(exc.why) from exc

    return lookup


def _yesterday() -> str:
    return utc_day(time.time() - 86400)


def _report(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args.rules)
        config = config_from_args(args)
    except (_UsageError, ConfigError) as exc:
        problems = getattr(exc, "problems", None) or [str(exc)]
        for problem in problems:
            print(f"mailgate: {problem}", file=sys.stderr)
        return 2
    try:
        time.strptime(args.day, "%Y-%m-%d")
    except ValueError:
        print(f"mailgate: --day {args.day!r}: use YYYY-MM-DD", file=sys.stderr)
        return 2
    path = history_path(settings, config.data_dir)
    if not path.exists():
        print(f"no DMARC evaluation recorded yet ({path})")
        return 0
    history = History(path)
    try:
        domains = [args.domain.lower()] if args.domain else history.domains(args.day)
        if args.send:
            return _send(args, settings, config, history, domains)
        org_name = settings.reports.org_name or config.hostname
        sender = settings.reports.sender or f"postmaster@{config.hostname}"
        receiver = org_name if valid_domain(org_name) else config.hostname
        if not domains:
            print(f"no DMARC evaluation recorded on {args.day}")
        for domain in domains:
            report = build_report(
                history,
                args.day,
                domain,
                org_name=org_name,
                email_address=sender,
                receiver=receiver,
                contact_info=settings.reports.contact_info,
                max_records=settings.reports.max_records,
            )
            if report is None:
                print(f"{domain}: nothing recorded on {args.day}")
                continue
            if args.dry_run and args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                target = args.out / report.filename
                target.write_bytes(report.gzipped)
                print(f"{domain}: {report.messages} messages, {report.records} records: {target}")
            elif args.dry_run:
                sys.stdout.write(report.xml.decode("utf-8"))
            else:
                sent = history.sent(args.day, domain)
                note = f"; sent as {sent}" if sent else ""
                print(f"{domain}: {report.messages} messages, {report.records} records{note}")
    finally:
        history.close()
    return 0


def _send(
    args: argparse.Namespace,
    settings: Settings,
    config: Any,
    history: History,
    domains: list[str],
) -> int:
    from mailgate.core.spool.cli import notify_server
    from mailgate.core.spool.envelope import SpoolEnvelope
    from mailgate.core.spool.queue_id import new_queue_id
    from mailgate.core.spool.spool import Spool

    spool = Spool(config.spool_dir, recover=False)

    def queue(sender: str, recipients: list[str], message: bytes) -> str:
        envelope = SpoolEnvelope(
            queue_id=new_queue_id(),
            mail_from=sender,
            rcpt_tos=list(recipients),
            client_address="127.0.0.1",
            helo=config.hostname,
            body_type="7BIT",
        )
        asyncio.run(spool.store(envelope, message))
        return str(envelope.queue_id)

    try:
        outcome = send_reports(
            history,
            args.day,
            domains,
            settings=settings,
            hostname=config.hostname,
            lookup=_lookup(settings),
            queue=queue,
            force=args.force,
        )
    finally:
        spool.close()
    for line in outcome.lines:
        print(line)
    # The history would otherwise grow for ever; the reports of those days are long sent.
    removed = history.expire(settings.reports.keep_days)
    if removed:
        print(f"removed {removed} evaluations older than {settings.reports.keep_days} days")
    if outcome.queued:
        print(notify_server(config))
    elif not domains:
        print(f"no DMARC evaluation recorded on {args.day}")
    return 1 if outcome.failed else 0


def _check(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args.rules)
    except _UsageError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 2
    domain = args.domain.strip().rstrip(".").lower()
    if not valid_domain(domain):
        print(f"mailgate: {args.domain!r} is not a domain name", file=sys.stderr)
        return 2
    psl = settings.public_suffix_list
    lookup = _lookup(settings)
    found = discover(domain, lookup, timeout=settings.dns.timeout, psl=psl)
    print(f"domain: {domain}")
    print(f"organizational domain: {organizational_domain(domain, psl)}")
    for note in found.notes:
        print(f"note: {note}")
    if found.result == "temperror":
        print("result: temperror (the record could not be looked up; try again)")
        return 1
    if found.result == "none" or found.record is None:
        print("result: no DMARC record applies")
        return 1
    record = found.record
    where = "the domain itself" if found.domain == domain else "the organizational domain"
    print(f"record at _dmarc.{found.domain} ({where}):")
    print(f"  {record.text}")
    print("as it applies:")
    for line in describe(record):
        print(f"  {line}")
    for problem in record.problems:
        print(f"problem: {problem}")
    if record.rua:
        where_to = destinations(found.domain, lookup, psl=psl)
        for address, limit in where_to.addresses:
            print(
                f"aggregate reports go to: {address}" + (f" (max {limit} bytes)" if limit else "")
            )
        for note in where_to.skipped:
            print(f"reports: {note}")
    print("result: valid" + (" with problems" if record.problems else ""))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dmarc = sub.add_parser("dmarc", help="DMARC aggregate reports and record checks")
    commands = dmarc.add_subparsers(dest="dmarc_command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report", help="the day's RFC 7489 aggregate reports, one per policy domain"
    )
    report.add_argument(
        "--day", default=_yesterday(), help="the UTC day, YYYY-MM-DD (default: yesterday)"
    )
    report.add_argument("--domain", help="only this policy domain")
    report.add_argument(
        "--dry-run", action="store_true", help="build the reports and show them; send nothing"
    )
    report.add_argument(
        "--out", type=Path, help="with --dry-run: write each report's .xml.gz file here"
    )
    report.add_argument(
        "--send", action="store_true", help="queue each report to its domain's rua addresses"
    )
    report.add_argument(
        "--force", action="store_true", help="with --send: send reports already sent again"
    )
    report.add_argument("--rules", type=Path, help="the dmarc rule file (its settings count)")
    add_config_option(report)
    report.set_defaults(handler=_report_checked)

    check = commands.add_parser("check", help="look up a domain's DMARC record and validate it")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--rules", type=Path, help="the dmarc rule file (its DNS settings count)")
    check.set_defaults(handler=_check)


def _report_checked(args: argparse.Namespace) -> int:
    if args.send and args.dry_run:
        print("mailgate: --send and --dry-run exclude each other", file=sys.stderr)
        return 2
    if args.out is not None and not args.dry_run:
        print("mailgate: --out goes with --dry-run", file=sys.stderr)
        return 2
    return _report(args)
