"""DMARC aggregate reports: the history, the RFC 7489 XML, the addressing, the sending.

The pure parts run on a history written here; the end-to-end test runs a real
`mailgate serve` with the dmarc daemon in its chain and `dmarc_reports: true`: yesterday's
report goes out at start, today's evaluations are recorded from real SMTP sessions, and
`mailgate dmarc report --dry-run` / `--send` build and queue them. The reports are
delivered to a local rua mailbox and read back with the email package.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from dnsserver import dns_server

from mailgate.milters.dmarc_reports import (
    History,
    build_report,
    day_range,
    destinations,
    report_message,
    row_of,
    send_reports,
    utc_day,
)
from mailgate.policies.dmarc import Discovery, DkimItem, Settings, evaluate, parse_record
from mailgate.policies.psl import organizational_domain
from mailgate.policies.spf import DnsFailure, SpfResult

from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway
from daemon_process import REPO
from smtpwire import Wire

# -- the RFC 7489 appendix C structure ------------------------------------------------------

DISPOSITIONS = {"none", "quarantine", "reject"}
DKIM_RESULTS = {"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"}
SPF_RESULTS = {"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"}
REASONS = {"forwarded", "sampled_out", "trusted_forwarder", "mailing_list", "local_policy", "other"}


def children(element: ET.Element) -> list[str]:
    return [child.tag for child in element]


def text(element: ET.Element, path: str) -> str:
    found = element.find(path)
    assert found is not None, f"{path} missing in {element.tag}"
    assert found.text is not None and found.text.strip(), f"{path} empty"
    return found.text


def validate(xml: bytes) -> ET.Element:
    """Check every required element of RFC 7489 appendix C, in its order; return the root."""
    root = ET.fromstring(xml)
    assert root.tag == "feedback"
    tags = children(root)
    assert tags[:3] == ["version", "report_metadata", "policy_published"], tags
    assert tags[3:] and set(tags[3:]) == {"record"}, tags
    assert text(root, "version") == "1.0"
    meta = root.find("report_metadata")
    order = [t for t in children(meta) if t != "extra_contact_info"]
    assert order[:4] == ["org_name", "email", "report_id", "date_range"], order
    for path in ("org_name", "email", "report_id"):
        text(meta, path)
    begin, end = int(text(meta, "date_range/begin")), int(text(meta, "date_range/end"))
    assert begin < end
    published = root.find("policy_published")
    assert children(published)[0] == "domain"
    text(published, "domain")
    assert text(published, "p") in DISPOSITIONS
    assert text(published, "sp") in DISPOSITIONS
    assert 0 <= int(text(published, "pct")) <= 100
    for name in ("adkim", "aspf"):
        if published.find(name) is not None:
            assert text(published, name) in ("r", "s")
    for record in root.findall("record"):
        assert children(record) == ["row", "identifiers", "auth_results"], children(record)
        row = record.find("row")
        assert children(row) == ["source_ip", "count", "policy_evaluated"]
        text(row, "source_ip")
        assert int(text(row, "count")) >= 1
        evaluated = row.find("policy_evaluated")
        assert children(evaluated)[:3] == ["disposition", "dkim", "spf"]
        assert text(evaluated, "disposition") in DISPOSITIONS
        assert text(evaluated, "dkim") in ("pass", "fail")
        assert text(evaluated, "spf") in ("pass", "fail")
        for reason in evaluated.findall("reason"):
            assert text(reason, "type") in REASONS
        identifiers = record.find("identifiers")
        assert [t for t in children(identifiers) if t != "envelope_to"] == [
            "envelope_from",
            "header_from",
        ]
        text(identifiers, "header_from")
        results = record.find("auth_results")
        tags = children(results)
        assert tags and tags[-1] == "spf", tags  # dkim*, then spf+
        assert tags == sorted(tags), tags
        for dkim in results.findall("dkim"):
            text(dkim, "domain")
            assert text(dkim, "result") in DKIM_RESULTS
        for spf in results.findall("spf"):
            text(spf, "domain")
            assert text(spf, "result") in SPF_RESULTS
            if spf.find("scope") is not None:
                assert text(spf, "scope") in ("helo", "mfrom")
    return root


# -- pure parts -----------------------------------------------------------------------------


def spf(result: str, domain: str) -> SpfResult:
    return SpfResult(
        identity="mailfrom",
        result=result,  # type: ignore[arg-type]
        domain=domain,
        sender=f"b@{domain}",
        mail_from=f"b@{domain}",
        helo="client.example",
        client_ip="192.0.2.1",
        reason="",
        explanation="",
    )


def evaluation(record: str, from_dom: str, spf_result: SpfResult, dkim=(), rand=lambda: 0.0):
    found = Discovery("found", parse_record(record), from_dom, organizational_domain(from_dom))
    return evaluate(found, from_dom, spf_result, list(dkim), rand=rand)


DAY = "2026-11-20"
WHEN = day_range(DAY)[0] + 3600


def test_rows_are_grouped_into_an_rfc_7489_report(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    passed = evaluation("v=DMARC1; p=reject; pct=50", "a.test", spf("pass", "a.test"))
    failed = evaluation(
        "v=DMARC1; p=reject; pct=50",
        "a.test",
        spf("fail", "a.test"),
        [DkimItem("fail", "a.test", "s1"), DkimItem("pass", "other.test", "s2")],
        rand=lambda: 0.9,  # sampled out: quarantine applied
    )
    assert failed.sampled_out and failed.policy == "quarantine"
    for _ in range(3):
        history.record(row_of(passed, "192.0.2.1", ["x@example.test"], "accept", when=WHEN))
    history.record(row_of(failed, "203.0.113.9", ["x@example.test"], "quarantine", when=WHEN))
    overridden = evaluation("v=DMARC1; p=reject", "a.test", spf("fail", "a.test"))
    history.record(
        row_of(overridden, "203.0.113.10", ["y@example.test"], "accept", "allow-list", when=WHEN)
    )
    history.record(row_of(passed, "192.0.2.1", ["x@example.test"], "accept", when=WHEN + 86400))
    assert history.domains(DAY) == ["a.test"]
    report = build_report(
        history,
        DAY,
        "a.test",
        org_name="Example Org",
        email_address="dmarc@mx.example.test",
        receiver="mx.example.test",
        contact_info="https://example.test/dmarc",
    )
    assert report is not None
    root = validate(report.xml)
    assert (report.messages, report.records) == (5, 3)
    assert text(root, "report_metadata/org_name") == "Example Org"
    assert text(root, "report_metadata/extra_contact_info") == "https://example.test/dmarc"
    begin, end = day_range(DAY)
    assert (int(text(root, "report_metadata/date_range/begin")), end - begin) == (begin, 86399)
    # The policy as last seen that day (the domain dropped pct=50 in between).
    assert [text(root, f"policy_published/{n}") for n in ("domain", "p", "sp", "pct")] == [
        "a.test",
        "reject",
        "reject",
        "100",
    ]
    records = root.findall("record")
    first = records[0]  # the busiest source first
    assert (text(first, "row/source_ip"), text(first, "row/count")) == ("192.0.2.1", "3")
    assert text(first, "row/policy_evaluated/spf") == "pass"
    by_ip = {text(r, "row/source_ip"): r for r in records}
    sampled = by_ip["203.0.113.9"]
    assert text(sampled, "row/policy_evaluated/disposition") == "quarantine"
    assert text(sampled, "row/policy_evaluated/reason/type") == "sampled_out"
    dkims = [
        (text(d, "domain"), text(d, "selector"), text(d, "result"))
        for d in sampled.findall("auth_results/dkim")
    ]
    assert dkims == [("a.test", "s1", "fail"), ("other.test", "s2", "pass")]
    assert text(sampled, "identifiers/envelope_to") == "example.test"
    local = by_ip["203.0.113.10"]
    assert text(local, "row/policy_evaluated/disposition") == "none"
    assert text(local, "row/policy_evaluated/reason/type") == "local_policy"
    assert "allow-list" in text(local, "row/policy_evaluated/reason/comment")
    # The same report, gzip'd, and the same id every time (a dry run names what a send sends).
    assert gzip.decompress(report.gzipped) == report.xml
    assert report.filename == f"mx.example.test!a.test!{begin}!{end}.xml.gz"
    again = build_report(
        history, DAY, "a.test", org_name="x", email_address="d@x.test", receiver="mx.example.test"
    )
    assert again is not None and again.report_id == report.report_id
    assert (
        build_report(
            history,
            "2026-01-01",
            "a.test",
            org_name="x",
            email_address="d@x.test",
            receiver="r.test",
        )
        is None
    )
    history.close()


@dataclass(frozen=True)
class FakeAnswer:
    status: str = "ok"
    records: tuple[str, ...] = ()
    txt: tuple[bytes, ...] = ()
    mx: tuple[tuple[int, str], ...] = ()


def fake(table: dict[str, tuple[bytes, ...]]):
    def lookup(name: str, rdtype: str, timeout: float) -> FakeAnswer:
        if "down" in name:
            raise DnsFailure("SERVFAIL")
        if name in table:
            return FakeAnswer(txt=table[name])
        return FakeAnswer(status="nxdomain")

    return lookup


def test_rua_addresses_are_verified_and_size_limits_kept() -> None:
    lookup = fake(
        {
            "_dmarc.a.test": (
                b"v=DMARC1; p=none; rua=mailto:r@a.test,mailto:r@reports.a.test!50k,"
                b"mailto:agg@vendor.test,mailto:x@stranger.test,https://a.test/r,"
                b"mailto:y@down.test",
            ),
            "a.test._report._dmarc.vendor.test": (b"v=DMARC1",),
            "_dmarc.norua.test": (b"v=DMARC1; p=reject",),
        }
    )
    found = destinations("a.test", lookup)
    assert found.addresses == [
        ("r@a.test", 0),
        ("r@reports.a.test", 50 * 1024),
        ("agg@vendor.test", 0),
    ]
    notes = "\n".join(found.skipped)
    assert "stranger.test does not accept reports for a.test" in notes
    assert "a.test._report._dmarc.stranger.test" in notes
    assert "only mailto: reporting is supported" in notes
    assert found.temporary and "verification lookup failed" in notes
    assert destinations("norua.test", lookup).skipped == [
        "_dmarc.norua.test: the record has no rua; not sent"
    ]
    assert destinations("gone.test", lookup).addresses == []
    assert destinations("x.down.test", lookup).temporary


def test_the_history_keeps_only_the_days_it_is_told_to(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    passed = evaluation("v=DMARC1; p=none", "a.test", spf("pass", "a.test"))
    for days_ago in (0, 1, 5, 20, 40):
        history.record(
            row_of(passed, "192.0.2.1", ["x@example.test"], "accept", when=WHEN - days_ago * 86400)
        )
    history.mark_sent(utc_day(WHEN - 40 * 86400), "a.test", "old-report")
    assert history.count() == 5
    assert history.expire(14, now=WHEN) == 2
    assert history.count() == 3
    assert history.domains(utc_day(WHEN - 5 * 86400)) == ["a.test"]
    assert history.domains(utc_day(WHEN - 20 * 86400)) == []
    assert history.sent(utc_day(WHEN - 40 * 86400), "a.test") is None
    history.close()


def test_send_reports_honours_limits_and_marks_the_day_sent(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    ev = evaluation("v=DMARC1; p=none", "a.test", spf("pass", "a.test"))
    history.record(row_of(ev, "192.0.2.1", ["x@example.test"], "accept", when=WHEN))
    lookup = fake(
        {"_dmarc.a.test": (b"v=DMARC1; p=none; rua=mailto:big@a.test,mailto:tiny@a.test!1k",)}
    )
    queued: list[tuple[str, list[str], bytes]] = []

    def queue(sender: str, rcpts: list[str], message: bytes) -> str:
        queued.append((sender, rcpts, message))
        return f"Q{len(queued)}"

    settings = Settings.model_validate({"reports": {"sender": "dmarc@gw.test", "org_name": "GW"}})
    outcome = send_reports(
        history, DAY, ["a.test"], settings=settings, hostname="gw.test", lookup=lookup, queue=queue
    )
    assert outcome.queued == 1 and not outcome.failed
    assert queued[0][:2] == ("dmarc@gw.test", ["big@a.test"])
    assert any(
        "tiny@a.test: the report" in line and "over its limit of 1024 bytes" in line
        for line in outcome.lines
    )
    again = send_reports(
        history, DAY, ["a.test"], settings=settings, hostname="gw.test", lookup=lookup, queue=queue
    )
    assert again.queued == 0 and "already sent" in again.lines[0]
    forced = send_reports(
        history,
        DAY,
        ["a.test"],
        settings=settings,
        hostname="gw.test",
        lookup=lookup,
        queue=queue,
        force=True,
    )
    assert forced.queued == 1 and len(queued) == 2
    history.close()


def test_report_message_per_rfc_7489_7_2_1_1(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    ev = evaluation("v=DMARC1; p=none", "a.test", spf("pass", "a.test"))
    history.record(row_of(ev, "192.0.2.1", [], "accept", when=WHEN))
    report = build_report(
        history, DAY, "a.test", org_name="GW", email_address="d@gw.test", receiver="gw.test"
    )
    assert report is not None
    parsed = email.message_from_bytes(
        report_message(report, "GW", "d@gw.test", ["r@a.test"]), policy=email.policy.default
    )
    check_report_mail(parsed, "a.test", "gw.test")
    history.close()


FILENAME = re.compile(
    r"^(?P<receiver>[A-Za-z0-9.-]+)!(?P<domain>[A-Za-z0-9.-]+)!(?P<begin>\d+)!(?P<end>\d+)(?:![A-Za-z0-9._-]+)?\.xml\.gz$"
)


def check_report_mail(parsed, domain: str, receiver: str) -> ET.Element:
    """The message of section 7.2.1.1; returns the report's XML root."""
    assert parsed.is_multipart()
    assert parsed.get_content_type() == "multipart/mixed"
    subject = str(parsed["Subject"])
    assert re.fullmatch(
        rf"Report Domain: {re.escape(domain)} Submitter: {re.escape(receiver)} Report-ID: <[^>]+>",
        subject,
    ), subject
    parts = [p for p in parsed.iter_attachments()]
    assert len(parts) == 1
    attachment = parts[0]
    assert attachment.get_content_type() == "application/gzip"
    name = attachment.get_filename()
    match = FILENAME.match(name)
    assert match, name
    assert (match["receiver"], match["domain"]) == (receiver, domain)
    root = validate(gzip.decompress(attachment.get_content()))
    assert text(root, "policy_published/domain") == domain
    assert int(text(root, "report_metadata/date_range/begin")) == int(match["begin"])
    assert int(text(root, "report_metadata/date_range/end")) == int(match["end"])
    assert text(root, "report_metadata/report_id") in subject
    return root


# -- end to end: the daemon in a real gateway, reports through its spool --------------------

ZONE = """
$TTL 300
local.test.                 IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.local.test.          IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@example.test"
local.test._report._dmarc.example.test. IN TXT "v=DMARC1"
reject.test.                IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.reject.test.         IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@example.test"
reject.test._report._dmarc.example.test. IN TXT "v=DMARC1"
quar.test.                  IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.quar.test.           IN TXT "v=DMARC1; p=quarantine; rua=mailto:dmarc@example.test"
tiny.test.                  IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.tiny.test.           IN TXT "v=DMARC1; p=none; rua=mailto:dmarc@example.test!100"
tiny.test._report._dmarc.example.test. IN TXT "v=DMARC1"
old.test.                   IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.old.test.            IN TXT "v=DMARC1; p=none; rua=mailto:dmarc@example.test"
old.test._report._dmarc.example.test. IN TXT "v=DMARC1"
"""


def message(sender: str, subject: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: alice@{DOMAIN}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.time_ns()}@t>\r\n\r\nHello.\r\n"
    ).encode()


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    return predicate()


@pytest.mark.slow
def test_reports_end_to_end(tmp_path: Path) -> None:
    with dns_server(ZONE) as dns:
        rules = tmp_path / "dmarc.yaml"
        text_ = (REPO / "rules" / "dmarc.yaml").read_text()
        text_ = text_.replace("nameservers: []", f'nameservers: ["{dns.address}"]')
        text_ = text_.replace('authserv_id: ""', "authserv_id: mx.example.test")
        text_ = text_.replace('org_name: ""', 'org_name: "Example Gateway"')
        text_ = text_.replace('sender: ""', 'sender: "dmarc-noreply@example.test"')
        rules.write_text(text_)
        gateway = make_gateway(tmp_path, rate_limit_connections=10000, dmarc_reports="true")
        add_default_users(gateway)
        store = gateway.users()
        try:
            store.add_alias(f"dmarc@{DOMAIN}", f"bob@{DOMAIN}")
        finally:
            store.close()
        # Yesterday's evaluations, as the daemon would have written them: the daily run at
        # start sends them.
        yesterday = utc_day(time.time() - 86400)
        history = History(gateway.data_dir / "dmarc.sqlite")
        ev = evaluation(
            "v=DMARC1; p=none; rua=mailto:dmarc@example.test", "old.test", spf("pass", "old.test")
        )
        history.record(
            row_of(ev, "127.0.0.1", [f"alice@{DOMAIN}"], "accept", when=time.time() - 86400)
        )
        history.close()
        config = tmp_path / "mailgate.yaml"
        config.write_text(f"milters:\n  - name: dmarc\n    daemon: dmarc\n    rules: {rules}\n")
        gateway.extra_args = ["--config", str(config)]
        gateway.start()
        try:

            def reports() -> list[email.message.EmailMessage]:
                return [
                    email.message_from_bytes(raw, policy=email.policy.default)
                    for raw in gateway.delivered(f"bob@{DOMAIN}")
                ]

            daily = wait_for(reports)
            assert len(daily) == 1, gateway.log_path.read_text()[-5000:]
            root = check_report_mail(daily[0], "old.test", "mx.example.test")
            assert text(root, "report_metadata/org_name") == "Example Gateway"
            assert str(daily[0]["From"]) == "dmarc-noreply@example.test"
            assert day_range(yesterday)[0] == int(text(root, "report_metadata/date_range/begin"))

            # Today's mail through the chain: a pass, a reject, a quarantine, a p=none.
            outcomes = {}
            with Wire(gateway.smtp_port) as wire:
                wire.reply()
                wire.cmd("EHLO client.example")
                for sender in (
                    "a@local.test",
                    "b@local.test",
                    "c@reject.test",
                    "d@quar.test",
                    "e@tiny.test",
                ):
                    assert wire.cmd(f"MAIL FROM:<{sender}>")[0] == 250
                    assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")[0] == 250
                    assert wire.cmd("DATA")[0] == 354
                    wire.send(message(sender, f"from {sender}") + b".\r\n")
                    outcomes[sender] = wire.reply()[0]
            assert outcomes == {
                "a@local.test": 250,
                "b@local.test": 250,
                "c@reject.test": 550,
                "d@quar.test": 250,
                "e@tiny.test": 250,
            }
            today = utc_day(time.time())
            env = dict(gateway.env)
            base = [
                MAILGATE,
                "dmarc",
                "report",
                "--day",
                today,
                "--rules",
                str(rules),
                "--config",
                str(config),
            ]
            out = tmp_path / "out"
            dry = subprocess.run(
                [*base, "--dry-run", "--out", str(out)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert dry.returncode == 0, dry.stderr
            files = sorted(p.name for p in out.iterdir())
            assert len(files) == 4, files
            for name in files:
                match = FILENAME.match(name)
                assert match and match["receiver"] == "mx.example.test", name
                root = validate(gzip.decompress((out / name).read_bytes()))
                assert text(root, "policy_published/domain") == match["domain"]
            local = validate(gzip.decompress(next(out.glob("*!local.test!*")).read_bytes()))
            assert [text(r, "row/count") for r in local.findall("record")] == ["2"]
            assert text(local, "record/row/policy_evaluated/spf") == "pass"
            assert text(local, "record/row/source_ip") == "127.0.0.1"
            assert text(local, "record/identifiers/envelope_from") == "local.test"
            refused = validate(gzip.decompress(next(out.glob("*!reject.test!*")).read_bytes()))
            assert text(refused, "record/row/policy_evaluated/disposition") == "reject"
            assert text(refused, "record/auth_results/spf/result") == "fail"
            held = validate(gzip.decompress(next(out.glob("*!quar.test!*")).read_bytes()))
            assert text(held, "record/row/policy_evaluated/disposition") == "quarantine"
            printed = subprocess.run(
                [*base, "--dry-run", "--domain", "local.test"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            validate(printed.stdout.encode())

            sent = subprocess.run(
                [*base, "--send"], env=env, capture_output=True, text=True, timeout=60
            )
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert "quar.test: _dmarc.quar.test" not in sent.stdout
            assert (
                "quar.test: mailto:dmarc@example.test: example.test does not accept reports "
                "for quar.test" in sent.stdout
            )
            assert "tiny.test: dmarc@example.test: the report" in sent.stdout
            delivered = wait_for(lambda: len(reports()) >= 3 and reports())
            by_domain = {}
            for parsed in delivered:
                domain = str(parsed["Subject"]).split()[2]
                by_domain[domain] = parsed
            assert sorted(by_domain) == ["local.test", "old.test", "reject.test"]
            for domain in ("local.test", "reject.test"):
                check_report_mail(by_domain[domain], domain, "mx.example.test")
            # Sent once: a second run (the daily one, or an operator's) sends nothing again.
            again = subprocess.run(
                [*base, "--send"], env=env, capture_output=True, text=True, timeout=60
            )
            assert "local.test: already sent" in again.stdout
            time.sleep(0.5)
            assert len(reports()) == 3
        finally:
            gateway.stop()
