"""Outbound relay against a scriptable next hop: retries, bounces, delay notices, MX rules.

The next hop here is tests/fake_smtp.py (it answers 451, 550, lacks SMTPUTF8 as each test
needs); the sending side is a real `mailgate serve` whose MX lookups go to a loopback DNS
server. The success paths against real peers (a second mailgate, Postfix) are in
test_relay_peers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsserver import TestDnsServer, dns_server
from fake_smtp import FakeSmtp, running
from relay_helpers import (
    ALICE,
    ZONE,
    message,
    reports,
    send,
    sending_gateway,
    spool_empty,
    status_blocks,
    wait_for,
)

from conftest import Gateway


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDnsServer]:
    with dns_server(ZONE) as server:
        yield server


def start(tmp_path: Path, dns: TestDnsServer, fake: FakeSmtp, **settings: object) -> Gateway:
    gateway = sending_gateway(tmp_path, dns.address, fake.port, **settings)
    gateway.start()
    return gateway


@pytest.fixture
def stop_after() -> Iterator[list[Gateway]]:
    gateways: list[Gateway] = []
    yield gateways
    for gateway in gateways:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def test_temporary_failure_is_retried_until_success(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    def first_451(line: str, fake: FakeSmtp) -> str | None:
        if line.startswith("RCPT") and fake.rcpt_count == 0:
            return "451 4.3.0 try again later"
        return None

    with running(FakeSmtp(script=first_451)) as fake:
        gateway = start(tmp_path, dns, fake)
        stop_after.append(gateway)
        send(gateway.smtp_port, ALICE, ["bob@remote.test"], message("retry"))
        delivered = fake.wait_messages(1)
        assert len(delivered) == 1 and b"Subject: retry" in delivered[0].data
        assert fake.rcpt_count == 2  # refused once, taken on the retry
        assert wait_for(lambda: spool_empty(gateway))
    log = gateway.log()
    assert "status=deferred (4.3.0 451 4.3.0 try again later), attempt 1" in log
    assert "to=<bob@remote.test>, relay=mx.remote.test[127.0.0.1]" in log
    assert "status=sent (250 2.0.0 Ok: queued)" in log
    # A success the sender did not ask to hear about sends nothing.
    assert reports(gateway, ALICE, 1, timeout=0.5) == []


def test_permanent_failure_bounces_to_the_senders_maildir(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    def reject(line: str, fake: FakeSmtp) -> str | None:
        return "550 5.1.1 <bob@remote.test>: no such user" if line.startswith("RCPT") else None

    with running(FakeSmtp(script=reject)) as fake:
        gateway = start(tmp_path, dns, fake)
        stop_after.append(gateway)
        queue_id = send(
            gateway.smtp_port,
            ALICE,
            ["bob@remote.test"],
            message("doomed"),
            mail_params=" RET=FULL ENVID=env+2B42",
            rcpt_params=" NOTIFY=FAILURE ORCPT=rfc822;bob@remote.test",
        )
        (report,) = reports(gateway, ALICE, 1)
        assert wait_for(lambda: spool_empty(gateway))
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    raw = gateway.delivered(ALICE)[0]
    assert raw.startswith(b"Return-Path: <>")  # notifications come from the null sender
    per_message, per_rcpt = status_blocks(report)
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["Original-Envelope-Id"] == "env+42"
    assert per_message["X-Mailgate-Queue-ID"] == queue_id
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@remote.test"
    assert per_rcpt["Original-Recipient"] == "rfc822; bob@remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == f"dns; mx.remote.test[127.0.0.1]:{fake.port}"
    assert "550 5.1.1 <bob@remote.test>: no such user" in per_rcpt["Diagnostic-Code"]
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"  # RET=FULL
    assert b"Subject: doomed" in returned.as_bytes()


def test_delay_notice_then_expiry(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    def always_451(line: str, fake: FakeSmtp) -> str | None:
        return "451 4.7.1 greylisted" if line.startswith("RCPT") else None

    with running(FakeSmtp(script=always_451)) as fake:
        gateway = start(tmp_path, dns, fake, relay_delay_warning=1, relay_max_lifetime=5)
        stop_after.append(gateway)
        send(
            gateway.smtp_port,
            ALICE,
            ["bob@remote.test"],
            message("slow"),
            mail_params=" RET=HDRS",
            rcpt_params=" NOTIFY=DELAY,FAILURE",
        )
        delay, failure = reports(gateway, ALICE, 2, timeout=40)
        assert wait_for(lambda: spool_empty(gateway))
        assert fake.rcpt_count >= 2
    assert delay["Subject"] == "Delayed Mail (still being retried)"
    _, rcpt = status_blocks(delay)
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.7.1"
    assert rcpt["Will-Retry-Until"]
    assert list(delay.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    _, rcpt = status_blocks(failure)
    assert (rcpt["Action"], rcpt["Status"]) == ("failed", "4.4.7")
    assert "451 4.7.1 greylisted" in rcpt["Diagnostic-Code"]
    # RET=HDRS: only the header comes back, also with the failure.
    returned = list(failure.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"


def test_null_mx_fails_at_once_and_a_only_domain_is_its_own_mx(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    with running(FakeSmtp()) as fake:
        gateway = start(tmp_path, dns, fake)
        stop_after.append(gateway)
        send(gateway.smtp_port, ALICE, ["nobody@nullmx.test"], message("nullmx"))
        send(gateway.smtp_port, ALICE, ["bob@afallback.test"], message("fallback"))
        (report,) = reports(gateway, ALICE, 1)
        delivered = fake.wait_messages(1)
        assert wait_for(lambda: spool_empty(gateway))
    _, rcpt = status_blocks(report)
    assert (rcpt["Action"], rcpt["Status"]) == ("failed", "5.1.10")
    assert "null MX" in rcpt["Diagnostic-Code"]
    assert len(delivered) == 1 and b"Subject: fallback" in delivered[0].data
    assert delivered[0].rcpts == ["RCPT TO:<bob@afallback.test> ORCPT=rfc822;bob@afallback.test"]


def test_smtputf8_message_to_a_server_without_it_fails_with_5_6_7(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    with running(FakeSmtp(extensions=("PIPELINING", "8BITMIME", "DSN"))) as fake:
        gateway = start(tmp_path, dns, fake)
        stop_after.append(gateway)
        body = "Subject: caf\u00e9\r\n\r\nbonjour\r\n".encode()
        send(
            gateway.smtp_port,
            ALICE,
            ["b\u00f8b@remote.test"],
            body,
            mail_params=" SMTPUTF8 BODY=8BITMIME",
        )
        (report,) = reports(gateway, ALICE, 1)
        assert fake.messages == [] and fake.rcpt_count == 0
    _, rcpt = status_blocks(report)
    assert (rcpt["Action"], rcpt["Status"]) == ("failed", "5.6.7")
    assert rcpt["Final-Recipient"] == "utf-8; b\u00f8b@remote.test"


def test_loops_and_bounces_of_bounces(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    def reject(line: str, fake: FakeSmtp) -> str | None:
        if line.startswith("RCPT"):
            return "451 4.3.0 later" if mode["now"] == "defer" else "550 5.7.1 go away"
        return None

    def hops(count: int) -> str:
        return "".join(f"Received: from hop{n}.test by hop{n + 1}.test\r\n" for n in range(count))

    mode = {"now": "defer"}
    fake = FakeSmtp(script=reject)
    with running(fake):
        # Accepted under max_hops 10 (5 + ours), then deferred by the next hop ...
        first = start(tmp_path, dns, fake, max_hops=10)
        stop_after.append(first)
        send(first.smtp_port, ALICE, ["bob@remote.test"], message("loop", extra=hops(5)))
        assert wait_for(lambda: fake.rcpt_count >= 1)
        first.stop()
        # ... and due again after a restart with max_hops 5: the relay bounces it unsent.
        tried = fake.rcpt_count
        mode["now"] = "reject"
        gateway = sending_gateway(tmp_path, dns.address, fake.port, users=False, max_hops=5)
        gateway.start()
        stop_after.append(gateway)
        (report,) = reports(gateway, ALICE, 1)
        _, rcpt = status_blocks(report)
        assert (rcpt["Action"], rcpt["Status"]) == ("failed", "5.4.6")
        assert fake.rcpt_count == tried  # not sent again

        # At the door, max_hops Received headers are refused outright.
        with pytest.raises(AssertionError, match=r"5\.4\.6 Too many hops"):
            send(gateway.smtp_port, ALICE, ["bob@remote.test"], message("door", extra=hops(5)))

        # A bounce that bounces is dropped: no notification to the null sender.
        send(gateway.smtp_port, "", ["bob@remote.test"], message("bounce", sender="MAILER-DAEMON"))
        assert wait_for(lambda: fake.rcpt_count == 1)
        assert wait_for(lambda: spool_empty(gateway))
    assert len(reports(gateway, ALICE, 2, timeout=1)) == 1
    assert "status=bounced (5.7.1 550 5.7.1 go away)" in gateway.log()


def test_connection_reuse_and_destination_limit(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    with running(FakeSmtp()) as fake:
        gateway = start(
            tmp_path, dns, fake, relay_destination_concurrency=1, relay_connection_cache_time=5
        )
        stop_after.append(gateway)
        for n in range(4):
            send(
                gateway.smtp_port, ALICE, ["bob@remote.test", "carol@remote.test"], message(f"m{n}")
            )
        delivered = fake.wait_messages(4)
        assert wait_for(lambda: spool_empty(gateway))
    assert len(delivered) == 4
    # One transaction per message carries both recipients, all on one connection.
    assert all(len(t.rcpts) == 2 for t in delivered)
    assert fake.connections == 1


def test_ipv6_next_hop(tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]) -> None:
    with running(FakeSmtp(), host="::1") as fake:
        gateway = start(tmp_path, dns, fake)
        stop_after.append(gateway)
        send(gateway.smtp_port, ALICE, ["bob@v6.test"], message("over v6"))
        delivered = fake.wait_messages(1)
        assert len(delivered) == 1 and b"Subject: over v6" in delivered[0].data
        assert wait_for(lambda: spool_empty(gateway))
    assert f"relay=mx.v6.test[::1]:{fake.port}, status=sent" in gateway.log()


def test_success_notice_when_the_next_hop_lacks_dsn(
    tmp_path: Path, dns: TestDnsServer, stop_after: list[Gateway]
) -> None:
    with running(FakeSmtp(extensions=("PIPELINING", "8BITMIME"))) as fake:
        gateway = start(tmp_path, dns, fake)
        stop_after.append(gateway)
        send(
            gateway.smtp_port,
            ALICE,
            ["bob@remote.test"],
            message("tell me"),
            mail_params=" ENVID=e1",
            rcpt_params=" NOTIFY=SUCCESS",
        )
        (delivered,) = fake.wait_messages(1)
        (report,) = reports(gateway, ALICE, 1)
    # No DSN at the next hop: the parameters stay here, and the success is reported here.
    assert delivered.mail == f"MAIL FROM:<{ALICE}>"
    assert delivered.rcpts == ["RCPT TO:<bob@remote.test>"]
    per_message, rcpt = status_blocks(report)
    assert per_message["Original-Envelope-Id"] == "e1"
    assert (rcpt["Action"], rcpt["Status"]) == ("relayed", "2.0.0")
    assert report["Subject"] == "Successful Mail Delivery Report"
