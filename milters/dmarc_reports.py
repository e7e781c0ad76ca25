"""DMARC aggregate reports (RFC 7489 section 7.2): the evaluation history and the reports.

The dmarc daemon writes one row per evaluation of a domain that publishes a record
(``History.record``) into SQLite, by default ``dmarc.sqlite`` in the gateway's data
directory. ``mailgate dmarc report`` (``mailgate.milters.dmarc_cli``) turns one UTC day
of rows into one report per policy domain:

- the XML of RFC 7489 appendix C (``feedback``: ``version``, ``report_metadata``,
  ``policy_published``, one ``record`` per distinct source and outcome, with its count);
- gzip'd, attached as ``application/gzip`` with the file name of section 7.2.1.1
  (``receiver!policy-domain!begin!end.xml.gz``) to a ``multipart/mixed`` message from the
  configured reporting address, subject ``Report Domain: D Submitter: S Report-ID: <ID>``;
- sent to the ``mailto:`` URIs of the domain's current ``rua``, honouring each URI's size
  limit (``!10m``: a larger report is not sent there) and, for an address outside the
  policy domain's organizational domain, only if that domain agrees to receive them
  (section 7.1: a ``v=DMARC1`` TXT record at ``<policy-domain>._report._dmarc.<its domain>``);
- put into the core's spool like any accepted message, so local delivery or the relay
  takes it from there. A report once queued is marked sent, so the daily run and a manual
  one never send the same day twice (``--force`` does).
"""

from __future__ import annotations

import datetime
import email.message
import email.policy
import email.utils
import gzip
import hashlib
import json
import sqlite3
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailgate.policies.dmarc import (
    DmarcRecord,
    Evaluation,
    RecordError,
    Settings,
    parse_record,
)
from mailgate.policies.psl import normal, organizational_domain
from mailgate.policies.spf import DnsFailure, Lookup, valid_domain

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    day TEXT NOT NULL,
    time INTEGER NOT NULL,
    policy_domain TEXT NOT NULL,
    header_from TEXT NOT NULL,
    envelope_from TEXT NOT NULL,
    envelope_to TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    disposition TEXT NOT NULL,
    dkim TEXT NOT NULL,
    spf TEXT NOT NULL,
    reasons TEXT NOT NULL,
    auth TEXT NOT NULL,
    policy TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_day ON evaluations (day, policy_domain);
CREATE TABLE IF NOT EXISTS reports_sent (
    day TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    report_id TEXT NOT NULL,
    time INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain)
);
"""

_RANK = {"none": 0, "quarantine": 1, "reject": 2}


def utc_day(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")


def day_range(day: str) -> tuple[int, int]:
    """(first second, last second) of the UTC day ``day`` (YYYY-MM-DD), as Unix times."""
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    begin = int(start.timestamp())
    return begin, begin + 86399


# -- the history ----------------------------------------------------------------------------


@dataclass
class Row:
    """One evaluation as the reports need it."""

    policy_domain: str
    header_from: str
    envelope_from: str
    envelope_to: str
    source_ip: str
    disposition: str
    dkim: str  # the policy_evaluated results: pass / fail (aligned or not)
    spf: str
    reasons: list[tuple[str, str]] = field(default_factory=list)
    auth: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    when: float = 0.0


def policy_published(domain: str, record: DmarcRecord) -> dict[str, Any]:
    return {
        "domain": domain,
        "adkim": record.adkim,
        "aspf": record.aspf,
        "p": record.p,
        "sp": record.sp or record.p,
        "pct": record.pct,
        "fo": record.fo,
    }


def row_of(
    evaluation: Evaluation,
    source_ip: str,
    recipients: Sequence[str],
    action: str,
    rules: str = "",
    when: float | None = None,
    mail_from: str | None = None,
) -> Row:
    """The history row of an evaluation and the action the rules took."""
    disposition = {"reject": "reject", "quarantine": "quarantine"}.get(action, "none")
    reasons: list[tuple[str, str]] = []
    if evaluation.result == "fail":
        if evaluation.sampled_out:
            pct = evaluation.record.pct if evaluation.record else 100
            reasons.append(("sampled_out", f"pct={pct}"))
        if _RANK[disposition] != _RANK[evaluation.policy]:
            reasons.append(("local_policy", f"rules: {rules}" if rules else ""))
    spf = evaluation.spf
    auth: dict[str, Any] = {
        "dkim": [[item.domain, item.selector, item.result] for item in evaluation.dkim],
        "spf": (
            [evaluation.spf_domain, "mfrom" if spf.identity == "mailfrom" else "helo", spf.result]
            if spf is not None
            else []
        ),
    }
    envelope_to = ""
    if recipients:
        envelope_to = normal(recipients[0].rpartition("@")[2])
    # The RFC5321.MailFrom domain ("" for the null sender).
    envelope_from = ""
    if mail_from is not None:
        envelope_from = normal(mail_from.rpartition("@")[2]) if "@" in mail_from else ""
    elif spf is not None and spf.identity == "mailfrom":
        envelope_from = spf.domain
    return Row(
        policy_domain=evaluation.record_domain,
        header_from=evaluation.from_domain,
        envelope_from=envelope_from,
        envelope_to=envelope_to,
        source_ip=source_ip,
        disposition=disposition,
        dkim="pass" if evaluation.dkim_aligned else "fail",
        spf="pass" if evaluation.spf_aligned else "fail",
        reasons=reasons,
        auth=auth,
        policy=(
            policy_published(evaluation.record_domain, evaluation.record)
            if evaluation.record
            else {}
        ),
        when=time.time() if when is None else when,
    )


class History:
    """The evaluation store (SQLite, thread-safe through one lock)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=timeout, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def record(self, row: Row) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO evaluations (day, time, policy_domain, header_from, envelope_from,"
                " envelope_to, source_ip, disposition, dkim, spf, reasons, auth, policy)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    utc_day(row.when),
                    int(row.when),
                    row.policy_domain,
                    row.header_from,
                    row.envelope_from,
                    row.envelope_to,
                    row.source_ip,
                    row.disposition,
                    row.dkim,
                    row.spf,
                    json.dumps(row.reasons),
                    json.dumps(row.auth, sort_keys=True),
                    json.dumps(row.policy, sort_keys=True),
                ),
            )

    def domains(self, day: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT policy_domain FROM evaluations WHERE day = ? ORDER BY 1", (day,)
            ).fetchall()
        return [r[0] for r in rows]

    def rows(self, day: str, domain: str) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(
                "SELECT * FROM evaluations WHERE day = ? AND policy_domain = ? ORDER BY id",
                (day, domain),
            ).fetchall()

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])

    def sent(self, day: str, domain: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT report_id FROM reports_sent WHERE day = ? AND policy_domain = ?",
                (day, domain),
            ).fetchone()
        return None if row is None else str(row[0])

    def mark_sent(self, day: str, domain: str, report_id: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO reports_sent VALUES (?, ?, ?, ?)",
                (day, domain, report_id, int(time.time())),
            )

    def expire(self, keep_days: int, now: float | None = None) -> int:
        """Remove evaluations older than ``keep_days`` days; return how many went."""
        cutoff = utc_day((time.time() if now is None else now) - keep_days * 86400)
        with self._lock, self._db:
            cursor = self._db.execute("DELETE FROM evaluations WHERE day < ?", (cutoff,))
            self._db.execute("DELETE FROM reports_sent WHERE day < ?", (cutoff,))
        return int(cursor.rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()


_HISTORIES: dict[Path, History] = {}
_HISTORIES_LOCK = threading.Lock()


def history_path(settings: Settings, data_dir: Path | None = None) -> Path:
    """The history file: ``history_path``, else ``dmarc.sqlite`` in the data directory."""
    if settings.history_path:
        return Path(settings.history_path)
    if data_dir is not None:
        return data_dir / "dmarc.sqlite"
    from mailgate.milters.store import default_path

    return default_path("dmarc")


def history_for(settings: Settings) -> History:
    """The daemon process's history for these settings (opened on first use, then shared)."""
    path = history_path(settings)
    with _HISTORIES_LOCK:
        history = _HISTORIES.get(path)
        if history is None:
            history = _HISTORIES[path] = History(path)
        return history


# -- the report -----------------------------------------------------------------------------


@dataclass
class Report:
    """One aggregate report: its XML, and what the message around it needs."""

    domain: str
    day: str
    report_id: str
    receiver: str
    begin: int
    end: int
    xml: bytes
    records: int
    messages: int

    @property
    def filename(self) -> str:
        """Section 7.2.1.1: receiver "!" policy-domain "!" begin "!" end "." extension."""
        return f"{self.receiver}!{self.domain}!{self.begin}!{self.end}.xml.gz"

    @property
    def gzipped(self) -> bytes:
        # mtime=0: the same report gzips to the same bytes.
        return gzip.compress(self.xml, mtime=0)


def report_id(receiver: str, domain: str, day: str) -> str:
    """Stable per (receiver, domain, day): a dry run names the report the send will."""
    digest = hashlib.sha256(f"{receiver}\0{domain}\0{day}".encode()).hexdigest()[:16]
    return f"{day.replace('-', '')}.{digest}@{receiver}"


def _sub(parent: ET.Element, name: str, text: object | None = None) -> ET.Element:
    element = ET.SubElement(parent, name)
    if text is not None:
        element.text = str(text)
    return element


def build_report(
    history: History,
    day: str,
    domain: str,
    *,
    org_name: str,
    email_address: str,
    receiver: str,
    contact_info: str = "",
    max_records: int = 10000,
) -> Report | None:
    """The report of ``domain`` for the UTC day ``day``; None if nothing was recorded."""
    rows = history.rows(day, domain)
    if not rows:
        return None
    begin, end = day_range(day)
    ident = report_id(receiver, domain, day)
    groups: dict[tuple[Any, ...], int] = {}
    for row in rows:
        key = (
            row["source_ip"],
            row["disposition"],
            row["dkim"],
            row["spf"],
            row["reasons"],
            row["envelope_to"],
            row["envelope_from"],
            row["header_from"],
            row["auth"],
        )
        groups[key] = groups.get(key, 0) + 1
    policy = json.loads(rows[-1]["policy"]) or {"domain": domain, "p": "none"}

    feedback = ET.Element("feedback")
    _sub(feedback, "version", "1.0")
    metadata = _sub(feedback, "report_metadata")
    _sub(metadata, "org_name", org_name)
    _sub(metadata, "email", email_address)
    if contact_info:
        _sub(metadata, "extra_contact_info", contact_info)
    _sub(metadata, "report_id", ident)
    date_range = _sub(metadata, "date_range")
    _sub(date_range, "begin", begin)
    _sub(date_range, "end", end)
    published = _sub(feedback, "policy_published")
    _sub(published, "domain", policy.get("domain", domain))
    for name in ("adkim", "aspf"):
        if name in policy:
            _sub(published, name, policy[name])
    _sub(published, "p", policy.get("p", "none"))
    _sub(published, "sp", policy.get("sp", policy.get("p", "none")))
    _sub(published, "pct", policy.get("pct", 100))
    _sub(published, "fo", policy.get("fo", "0"))
    ordered = sorted(groups.items(), key=lambda item: (-item[1], item[0]))[:max_records]
    for key, count in ordered:
        source_ip, disposition, dkim, spf, reasons, env_to, env_from, header_from, auth = key
        record = _sub(feedback, "record")
        row_el = _sub(record, "row")
        _sub(row_el, "source_ip", source_ip)
        _sub(row_el, "count", count)
        evaluated = _sub(row_el, "policy_evaluated")
        _sub(evaluated, "disposition", disposition)
        _sub(evaluated, "dkim", dkim)
        _sub(evaluated, "spf", spf)
        for reason_type, comment in json.loads(reasons):
            reason = _sub(evaluated, "reason")
            _sub(reason, "type", reason_type)
            if comment:
                _sub(reason, "comment", comment)
        identifiers = _sub(record, "identifiers")
        if env_to:
            _sub(identifiers, "envelope_to", env_to)
        # Required by the RFC 7489 schema; empty for the null sender.
        _sub(identifiers, "envelope_from", env_from)
        _sub(identifiers, "header_from", header_from)
        results = _sub(record, "auth_results")
        details = json.loads(auth)
        for dkim_domain, selector, result in details.get("dkim", []):
            if not dkim_domain:
                continue  # a signature without d= names no domain to report
            item = _sub(results, "dkim")
            _sub(item, "domain", dkim_domain)
            if selector:
                _sub(item, "selector", selector)
            _sub(item, "result", result)
        spf_detail = details.get("spf") or [env_from or header_from, "mfrom", "none"]
        item = _sub(results, "spf")
        _sub(item, "domain", spf_detail[0] or header_from)
        _sub(item, "scope", spf_detail[1])
        _sub(item, "result", spf_detail[2])
    ET.indent(feedback)
    xml = ET.tostring(feedback, encoding="utf-8", xml_declaration=True)
    return Report(
        domain=domain,
        day=day,
        report_id=ident,
        receiver=receiver,
        begin=begin,
        end=end,
        xml=xml + b"\n",
        records=len(ordered),
        messages=sum(count for _, count in ordered),
    )


def report_message(report: Report, org_name: str, sender: str, recipients: Sequence[str]) -> bytes:
    """The report as mail (section 7.2.1.1): text part and the gzip'd XML attached."""
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = (
        f"Report Domain: {report.domain} Submitter: {report.receiver} "
        f"Report-ID: <{report.report_id}>"
    )
    message["Date"] = email.utils.formatdate(time.time())
    message["Message-ID"] = email.utils.make_msgid(domain=report.receiver)
    message.set_content(
        f"This is a DMARC aggregate report from {org_name} for {report.domain}, "
        f"{report.day} (UTC): {report.messages} messages in {report.records} records.\n"
    )
    message.add_attachment(
        report.gzipped, maintype="application", subtype="gzip", filename=report.filename
    )
    return message.as_bytes()


# -- where a report goes --------------------------------------------------------------------


@dataclass
class Destination:
    """The addresses a report goes to, and those it does not (with why)."""

    addresses: list[tuple[str, int]] = field(default_factory=list)  # (address, max size)
    skipped: list[str] = field(default_factory=list)
    temporary: bool = False


def external_allowed(policy_domain: str, address_domain: str, lookup: Lookup) -> bool:
    """Section 7.1: does ``address_domain`` accept reports about ``policy_domain``?"""
    name = f"{normal(policy_domain)}._report._dmarc.{normal(address_domain)}"
    answer = lookup(name, "TXT", 5.0)
    if answer.status != "ok":
        return False
    return any(
        raw.decode("utf-8", "replace").replace(" ", "").startswith("v=DMARC1") for raw in answer.txt
    )


def destinations(policy_domain: str, lookup: Lookup, *, psl: str = "") -> Destination:
    """The ``rua`` of the domain's current record, checked (a DnsFailure: try again later)."""
    found = Destination()
    try:
        answer = lookup(f"_dmarc.{policy_domain}", "TXT", 5.0)
    except DnsFailure as exc:
        found.temporary = True
        found.skipped.append(f"_dmarc.{policy_domain}: DNS failure ({exc}); not sent")
        return found
    texts = [raw.decode("utf-8", "replace") for raw in answer.txt] if answer.status == "ok" else []
    texts = [t for t in texts if t.replace(" ", "").startswith("v=DMARC1")]
    if len(texts) != 1:
        found.skipped.append(f"_dmarc.{policy_domain}: no single DMARC record now; not sent")
        return found
    try:
        record = parse_record(texts[0])
    except RecordError as exc:
        found.skipped.append(f"_dmarc.{policy_domain}: {exc}; not sent")
        return found
    if not record.rua:
        found.skipped.append(f"_dmarc.{policy_domain}: the record has no rua; not sent")
    own = organizational_domain(policy_domain, psl)
    for uri in record.rua:
        address = uri.mailto
        if address is None:
            found.skipped.append(f"{uri}: only mailto: reporting is supported")
            continue
        domain = normal(address.rpartition("@")[2])
        if not valid_domain(domain):
            found.skipped.append(f"{uri}: not a valid address")
            continue
        if organizational_domain(domain, psl) != own:
            try:
                allowed = external_allowed(policy_domain, domain, lookup)
            except DnsFailure as exc:
                found.temporary = True
                found.skipped.append(f"{uri}: verification lookup failed ({exc})")
                continue
            if not allowed:
                found.skipped.append(
                    f"{uri}: {domain} does not accept reports for {policy_domain} "
                    f"(no v=DMARC1 at {policy_domain}._report._dmarc.{domain}, RFC 7489 7.1)"
                )
                continue
        found.addresses.append((address, uri.max_size))
    return found


@dataclass
class Outcome:
    """What one report run did, in words for the operator."""

    lines: list[str] = field(default_factory=list)
    queued: int = 0
    failed: int = 0


def send_reports(
    history: History,
    day: str,
    domains: Sequence[str],
    *,
    settings: Settings,
    hostname: str,
    lookup: Lookup,
    queue: Callable[[str, list[str], bytes], str],
    force: bool = False,
) -> Outcome:
    """Build, address and queue the day's reports; ``queue(sender, rcpts, message)`` → id."""
    outcome = Outcome()
    org_name = settings.reports.org_name or hostname
    sender = settings.reports.sender or f"postmaster@{hostname}"
    receiver = org_name if valid_domain(org_name) else hostname
    for domain in domains:
        previous = history.sent(day, domain)
        if previous and not force:
            outcome.lines.append(f"{domain}: already sent ({previous}); --force sends again")
            continue
        report = build_report(
            history,
            day,
            domain,
            org_name=org_name,
            email_address=sender,
            receiver=receiver,
            contact_info=settings.reports.contact_info,
            max_records=settings.reports.max_records,
        )
        if report is None:
            continue
        where = destinations(domain, lookup, psl=settings.public_suffix_list)
        outcome.lines.extend(f"{domain}: {note}" for note in where.skipped)
        if where.temporary:
            outcome.failed += 1
        addresses = [a for a, _ in where.addresses]
        if not addresses:
            continue
        message = report_message(report, org_name, sender, addresses)
        fits = [a for a, limit in where.addresses if not limit or len(message) <= limit]
        for address, limit in where.addresses:
            if limit and len(message) > limit:
                outcome.lines.append(
                    f"{domain}: {address}: the report ({len(message)} bytes) is over its "
                    f"limit of {limit} bytes; not sent there"
                )
        if not fits:
            continue
        if fits != addresses:
            message = report_message(report, org_name, sender, fits)
        queue_id = queue(sender, fits, message)
        history.mark_sent(day, domain, report.report_id)
        outcome.queued += 1
        outcome.lines.append(
            f"{domain}: report {report.report_id} ({report.messages} messages, "
            f"{report.records} records) queued as {queue_id} for {', '.join(fits)}"
        )
    return outcome
