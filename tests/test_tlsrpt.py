"""TLS-RPT (RFC 8460): session counts, the JSON report of a day, and `mailgate tls-report`
printing it and sending it through a running gateway's queue to the domain's mailto: rua.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
import subprocess
from pathlib import Path

import pytest
from dnsserver import dns_server
from relay_helpers import ALICE, sending_gateway

from mailgate.core.relay.tlsrpt import build_report, parse_rua, report_message
from mailgate.core.relay.tlsstore import Session, TlsStore, utc_day

from conftest import MAILGATE

DAY = "2026-11-24"
WHEN = datetime.datetime(2026, 11, 24, 1, tzinfo=datetime.UTC).timestamp()
STS = ("version: STSv1", "mode: enforce", "mx: mx.remote.test", "max_age: 86400")


def fill(store: TlsStore) -> None:
    base = Session("remote.test", "sts", STS, "mx.remote.test")
    for _ in range(3):
        store.count(replace_(base, sending_ip="127.0.0.1", receiving_mx="mx.remote.test"), WHEN)
    failure = replace_(
        base,
        result_type="certificate-not-trusted",
        sending_ip="127.0.0.1",
        receiving_mx="mx.remote.test",
        receiving_ip="127.0.0.1",
        reason="certificate verify failed",
    )
    store.count(failure, WHEN)
    store.count(failure, WHEN)
    store.count(Session("other.test", "no-policy-found", (), "mx.other.test"), WHEN)
    store.count(Session("remote.test", "sts", STS, "mx.remote.test"), WHEN + 86400)  # next day


def replace_(session: Session, **changes: str) -> Session:
    from dataclasses import replace

    return replace(session, **changes)


def test_store_counts_and_the_report_of_a_day(tmp_path: Path) -> None:
    assert utc_day(WHEN) == DAY
    store = TlsStore(tmp_path / "tls.sqlite3")
    fill(store)
    assert store.domains(DAY) == ["other.test", "remote.test"]
    report = build_report(
        store, DAY, "remote.test", organization="mx.example.test", contact="postmaster@x"
    )
    store.close()
    assert report["organization-name"] == "mx.example.test"
    assert report["date-range"] == {
        "start-datetime": "2026-11-24T00:00:00Z",
        "end-datetime": "2026-11-24T23:59:59Z",
    }
    assert report["contact-info"] == "postmaster@x"
    assert report["report-id"]
    (policy,) = report["policies"]
    assert policy["policy"] == {
        "policy-type": "sts",
        "policy-string": list(STS),
        "policy-domain": "remote.test",
        "mx-host": ["mx.remote.test"],
    }
    assert policy["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 2,
    }
    assert policy["failure-details"] == [
        {
            "result-type": "certificate-not-trusted",
            "sending-mta-ip": "127.0.0.1",
            "receiving-mx-hostname": "mx.remote.test",
            "receiving-ip": "127.0.0.1",
            "failed-session-count": 2,
            "failure-reason-code": "certificate verify failed",
        }
    ]
    json.dumps(report)  # plain JSON all the way down


def test_rua_and_the_report_message() -> None:
    assert parse_rua([b"v=TLSRPTv1; rua=mailto:tls@remote.test,https://r.test/x"]) == [
        "mailto:tls@remote.test",
        "https://r.test/x",
    ]
    assert parse_rua([b"v=spf1 -all"]) == []
    assert parse_rua([b"v=TLSRPTv1; rua=mailto:a@x", b"v=TLSRPTv1; rua=mailto:b@x"]) == []
    report = {"organization-name": "org.test", "report-id": "r1", "policies": []}
    raw = report_message(report, "remote.test", DAY, "postmaster@org.test", ["tls@remote.test"])
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == "remote.test"
    assert parsed["TLS-Report-Submitter"] == "org.test"
    attachment = list(parsed.iter_parts())[1]
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(attachment.get_payload(decode=True))) == report


def test_cli_prints_the_reports(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    store = TlsStore(data_dir / "tls.sqlite3")
    fill(store)
    store.close()
    env = {"MAILGATE_DATA_DIR": str(data_dir), "MAILGATE_HOSTNAME": "mx.example.test", "PATH": ""}
    done = subprocess.run(
        [MAILGATE, "tls-report", "--date", DAY],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    reports = json.loads(done.stdout)
    assert [r["policies"][0]["policy"]["policy-domain"] for r in reports] == [
        "other.test",
        "remote.test",
    ]
    assert reports[0]["policies"][0]["policy"]["policy-type"] == "no-policy-found"
    assert reports[0]["organization-name"] == "mx.example.test"


@pytest.mark.slow
def test_send_queues_the_report_to_the_mailto_rua(tmp_path: Path) -> None:
    zone = f"""
$TTL 60
_smtp._tls.remote.test. IN TXT "v=TLSRPTv1; rua=mailto:{ALICE},https://reports.remote.test/"
example.test.           IN MX 10 mx.example.test.
mx.example.test.        IN A 127.0.0.1
"""
    with dns_server(zone) as dns:
        gateway = sending_gateway(tmp_path, dns.address, 9)
        store = TlsStore(gateway.data_dir / "tls.sqlite3")
        fill(store)
        store.close()
        gateway.start()
        try:
            done = subprocess.run(
                [MAILGATE, "tls-report", "--date", DAY, "--domain", "remote.test", "--send"],
                env=gateway.env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
            assert "report queued as" in done.stdout
            assert "only mailto: reporting is supported" in done.stderr
            # The report domain's rua here is a local user: the gateway delivers it locally.
            delivered = gateway.wait_delivered(ALICE, 1)
        finally:
            gateway.stop()
    assert len(delivered) == 1
    parsed = email.message_from_bytes(delivered[0], policy=email.policy.default)
    assert parsed.get_param("report-type") == "tlsrpt"
    attachment = list(parsed.iter_parts())[1]
    report = json.loads(gzip.decompress(attachment.get_payload(decode=True)))
    assert report["policies"][0]["summary"]["total-failure-session-count"] == 2
