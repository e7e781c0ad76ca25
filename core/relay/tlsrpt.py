"""TLS-RPT (RFC 8460): the daily JSON report of one policy domain, and `mailgate tls-report`.

The relay counts every TLS session to an MX host in ``tls.sqlite3`` (``tlsstore``); this
module turns one UTC day of those counts into the report of section 4 (one per policy
domain: ``policies`` with ``policy``, ``summary`` and ``failure-details``), finds where the
domain wants it (the ``rua`` of its ``_smtp._tls`` TXT record, section 3) and, with
``--send``, queues it to the ``mailto:`` addresses as a ``multipart/report;
report-type=tlsrpt`` message with the gzipped JSON attached (section 5.3). HTTPS
reporting (``rua=https:``) is not implemented: such addresses are skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import email.message
import email.policy
import email.utils
import gzip
import json
import sys
import time
import urllib.parse
from typing import Any

from mailgate.core.config import Config
from mailgate.core.config_cli import add_config_option, config_from_args
from mailgate.core.dns import DnsTempError, Resolver
from mailgate.core.relay.tlsstore import TlsStore, utc_day


def build_report(
    store: TlsStore, day: str, domain: str, *, organization: str, contact: str
) -> dict[str, Any]:
    """The RFC 8460 section 4.4 report of ``domain`` for the UTC day ``day`` (YYYY-MM-DD)."""
    policies: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in store.sessions(day, domain):
        key = (row["policy_type"], row["policy_string"], row["mx_host"])
        entry = policies.get(key)
        if entry is None:
            policy: dict[str, Any] = {"policy-type": row["policy_type"]}
            strings = json.loads(row["policy_string"])
            if strings:
                policy["policy-string"] = strings
            policy["policy-domain"] = domain
            if row["mx_host"]:
                policy["mx-host"] = row["mx_host"].split(",")
            entry = policies[key] = {
                "policy": policy,
                "summary": {
                    "total-successful-session-count": 0,
                    "total-failure-session-count": 0,
                },
                "failure-details": [],
            }
        if not row["result_type"]:
            entry["summary"]["total-successful-session-count"] += row["count"]
            continue
        entry["summary"]["total-failure-session-count"] += row["count"]
        detail: dict[str, Any] = {"result-type": row["result_type"]}
        for field, name in (
            ("sending_ip", "sending-mta-ip"),
            ("receiving_mx", "receiving-mx-hostname"),
            ("receiving_ip", "receiving-ip"),
        ):
            if row[field]:
                detail[name] = row[field]
        detail["failed-session-count"] = row["count"]
        if row["reason"]:
            detail["failure-reason-code"] = row["reason"]
        entry["failure-details"].append(detail)
    for entry in policies.values():
        if not entry["failure-details"]:
            del entry["failure-details"]
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    end = start + datetime.timedelta(days=1)
    return {
        "organization-name": organization,
        "date-range": {
            "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end-datetime": (end - datetime.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "contact-info": contact,
        "report-id": f"{day}.{domain}@{organization}",
        "policies": list(policies.values()),
    }


def parse_rua(records: list[bytes]) -> list[str]:
    """The ``rua`` URIs of a domain's TLSRPTv1 record (section 3); [] without one."""
    found = [r for r in records if r.startswith(b"v=TLSRPTv1")]
    if len(found) != 1:
        return []
    for part in found[0].decode("ascii", "replace").split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip() == "rua":
            return [uri.strip() for uri in value.split(",") if uri.strip()]
    return []


def report_message(
    report: dict[str, Any], domain: str, day: str, sender: str, recipients: list[str]
) -> bytes:
    """The report as mail (section 5.3): multipart/report, report-type=tlsrpt, gzipped JSON."""
    organization = report["organization-name"]
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"Report Domain: {domain} Submitter: {organization} Report-ID: " + (
        f"<{report['report-id']}>"
    )
    message["Date"] = email.utils.formatdate(time.time())
    message["Message-ID"] = email.utils.make_msgid(domain=organization or None)
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = organization
    message.set_content(
        f"This is an aggregate TLS report from {organization} for {domain} ({day}).\n"
    )
    body = gzip.compress(json.dumps(report, indent=1).encode())
    stamp = day.replace("-", "")
    message.add_attachment(
        body,
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=f"{organization}!{domain}!{stamp}!{stamp}.json.gz",
    )
    message.replace_header("Content-Type", "multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes()


def _yesterday() -> str:
    return utc_day(time.time() - 86400)


def _organization(config: Config, args: argparse.Namespace) -> str:
    return str(args.organization or config.tls_rpt_organization or config.hostname)


def _tls_report(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if not config.tls_db.exists():
        print(f"mailgate: no TLS session recorded yet ({config.tls_db})", file=sys.stderr)
        return 1
    store = TlsStore(config.tls_db)
    try:
        domains = [args.domain] if args.domain else store.domains(args.date)
        organization = _organization(config, args)
        contact = args.contact or f"postmaster@{config.hostname}"
        reports = [
            build_report(store, args.date, domain, organization=organization, contact=contact)
            for domain in domains
        ]
    finally:
        store.close()
    if not args.send:
        output: Any = reports[0] if args.domain else reports
        print(json.dumps(output, indent=2))
        return 0
    return _send(config, args, reports)


def _send(config: Config, args: argparse.Namespace, reports: list[dict[str, Any]]) -> int:
    from mailgate.core.spool.cli import notify_server
    from mailgate.core.spool.envelope import SpoolEnvelope
    from mailgate.core.spool.queue_id import new_queue_id
    from mailgate.core.spool.spool import Spool

    resolver = Resolver(config.dns_nameservers, timeout=config.dns_timeout)
    spool = Spool(config.spool_dir, recover=False)
    sender = f"postmaster@{config.hostname}"
    queued = 0
    for report in reports:
        domain = report["policies"][0]["policy"]["policy-domain"] if report["policies"] else ""
        if not domain:
            continue
        try:
            uris = parse_rua(resolver.txt(f"_smtp._tls.{domain}"))
        except DnsTempError as exc:
            print(f"{domain}: TLSRPT lookup failed ({exc.why}); not sent", file=sys.stderr)
            continue
        mailto = [
            urllib.parse.unquote(uri[len("mailto:") :].split("?")[0])
            for uri in uris
            if uri.lower().startswith("mailto:")
        ]
        for uri in uris:
            if not uri.lower().startswith("mailto:"):
                print(f"{domain}: {uri}: only mailto: reporting is supported", file=sys.stderr)
        if not mailto:
            print(f"{domain}: no mailto: rua in _smtp._tls.{domain}; not sent", file=sys.stderr)
            continue
        content = report_message(report, domain, args.date, sender, mailto)
        envelope = SpoolEnvelope(
            queue_id=new_queue_id(),
            mail_from=sender,
            rcpt_tos=mailto,
            client_address="127.0.0.1",
            helo=config.hostname,
            body_type="7BIT",
        )
        asyncio.run(spool.store(envelope, content))
        queue_id = envelope.queue_id
        print(f"{domain}: report queued as {queue_id} for {', '.join(mailto)}")
        queued += 1
    spool.close()
    if queued:
        print(notify_server(config))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "tls-report",
        help="the TLS-RPT (RFC 8460) report of a day's outbound TLS sessions, as JSON",
    )
    parser.add_argument(
        "--date", default=_yesterday(), help="the UTC day, YYYY-MM-DD (default: yesterday)"
    )
    parser.add_argument("--domain", help="only this policy domain (prints one report)")
    parser.add_argument("--organization", help="organization-name (default: the hostname)")
    parser.add_argument("--contact", help="contact-info (default: postmaster@HOSTNAME)")
    parser.add_argument(
        "--send",
        action="store_true",
        help="queue each report to the mailto: rua of the domain's _smtp._tls record",
    )
    add_config_option(parser)
    parser.set_defaults(handler=_tls_report)
