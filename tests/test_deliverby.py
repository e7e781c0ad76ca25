"""DELIVERBY (RFC 2852): the BY parameter, its deadline in the queue, and passing it on.

The session checks ``BY=<seconds>;<R|N>[T]`` and advertises its minimum; the relay returns
a message whose R-mode time has run out (failure notice, 5.4.7), sends a delay notice for
N mode, reports relays with T, and gives a next hop that offers DELIVERBY the time left
(a second mailgate here, whose spool shows what it received). Short deadlines, no timing
assertions: the tests wait for outcomes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_smtp import DEFAULT_EXTENSIONS, FakeSmtp, running
from relay_helpers import ALICE, message, reports, status_blocks, wait_for

from mailgate.core.smtp.deliverby import check_mail_param, deadline_of, parse_by, pass_on_param

from conftest import Gateway, add_default_users, free_port, make_gateway
from smtpwire import Wire


@pytest.fixture
def stop_after() -> Iterator[list[Gateway]]:
    gateways: list[Gateway] = []
    yield gateways
    for gateway in gateways:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def relaying_gateway(
    tmp_path: Path, routes: list[str], stop_after: list[Gateway], **settings: object
) -> Gateway:
    values: dict[str, object] = {
        "relay_networks": "127.0.0.1/32",
        "relay_retry_base": 1,
        "relay_retry_max": 1,
        "rate_limit_connections": 10000,
        "deliverby_min": 1,
        "relay_routes": ",".join(routes),
    }
    values.update(settings)
    tmp_path.mkdir(parents=True, exist_ok=True)
    gateway = make_gateway(tmp_path, **values)
    add_default_users(gateway)
    gateway.start()
    stop_after.append(gateway)
    return gateway


def send_by(port: int, by: str, rcpt: str = "bob@remote.test", subject: str = "by") -> None:
    with Wire(port) as wire:
        wire.reply()
        assert wire.cmd("EHLO client.test")[0] == 250
        code, text = wire.cmd(f"MAIL FROM:<{ALICE}> BY={by}")
        assert code == 250, text
        assert wire.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(message(subject) + b".\r\n")
        code, text = wire.reply()
        assert code == 250, text
        wire.cmd("QUIT")


def spooled_envelopes(gateway: Gateway) -> list[dict[str, object]]:
    """The envelopes in a gateway's spool/deferred (the spool file's JSON part)."""
    found = []
    for path in sorted((gateway.data_dir / "spool" / "deferred").iterdir()):
        with path.open("rb") as spool_file:
            header = spool_file.readline().split()
            found.append(json.loads(spool_file.read(int(header[1]))))
    return found


# -- the parameter --------------------------------------------------------------------------


def test_parse_and_check_the_by_parameter() -> None:
    assert parse_by("120;R").mode == "R"
    request = parse_by("-30;nt")
    assert (request.seconds, request.mode, request.trace) == (-30, "N", True)
    assert check_mail_param("120;R", 60) is None
    assert check_mail_param("-5;N", 60) is None  # N mode: the time may be up already
    for bad in (None, "abc", "120", "120;X", "1234567890;R", "12;RR", "+;R"):
        reply = check_mail_param(bad, 60)
        assert reply is not None and (reply.code, reply.enhanced) == (501, "5.5.4"), bad
    zero = check_mail_param("0;R", 60)
    assert zero is not None and zero.code == 501
    short = check_mail_param("30;R", 60)
    assert short is not None and (short.code, short.enhanced) == (555, "5.5.4")


def test_the_deadline_and_the_time_passed_on() -> None:
    options = ["SIZE=100", "BY=600;RT"]
    assert deadline_of(options, 1000.0) == 1600.0
    assert pass_on_param(options, 1000.0, 1100.5) == "BY=499;RT"
    assert pass_on_param(options, 1000.0, 2000.0) == "BY=1;RT"  # R never passes on <= 0
    assert pass_on_param(["BY=10;N"], 1000.0, 1100.0) == "BY=-90;N"
    assert pass_on_param(["SIZE=1"], 1000.0, 1000.0) is None


def test_the_server_advertises_and_checks_deliverby(gateway: Gateway) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        code, text = wire.cmd("EHLO client.test")
        assert "DELIVERBY 60" in text.split("\n")
        cases = {
            "BY=120;R": 250,
            "BY=120;RT": 250,
            "BY=-5;N": 250,
            "BY=30;R": 555,
            "BY=0;R": 501,
            "BY=120;X": 501,
            "BY=1234567890;N": 501,
            "BY": 501,
        }
        for param, expected in cases.items():
            code, text = wire.cmd(f"MAIL FROM:<{ALICE}> {param}")
            assert code == expected, (param, text)
            wire.cmd("RSET")


# -- the deadline in the queue -------------------------------------------------------------


@pytest.mark.slow
def test_r_mode_returns_the_message_when_the_time_runs_out(
    tmp_path: Path, stop_after: list[Gateway]
) -> None:
    dead = free_port()  # nothing listens there: every attempt fails temporarily
    gateway = relaying_gateway(tmp_path, [f"remote.test=127.0.0.1:{dead}"], stop_after)
    send_by(gateway.smtp_port, "2;R", subject="deadline-r")
    [report] = reports(gateway, ALICE, 1)
    blocks = status_blocks(report)
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.4.7"
    assert "delivery time expired" in str(blocks[1]["Diagnostic-Code"])
    assert "status=expired (delivery time expired (BY=2;R)" in gateway.log()
    assert wait_for(lambda: not any((gateway.data_dir / "spool" / "deferred").iterdir()))


@pytest.mark.slow
def test_n_mode_sends_a_delay_notice_and_keeps_trying(
    tmp_path: Path, stop_after: list[Gateway]
) -> None:
    dead = free_port()
    gateway = relaying_gateway(tmp_path, [f"remote.test=127.0.0.1:{dead}"], stop_after)
    send_by(gateway.smtp_port, "1;N", subject="deadline-n")
    [report] = reports(gateway, ALICE, 1)
    assert report["Subject"].startswith("Delayed Mail")
    blocks = status_blocks(report)
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"
    # Still queued, still retried; one delay notice only.
    assert wait_for(lambda: gateway.log().count("status=deferred") >= 3)
    assert len(reports(gateway, ALICE, 2, timeout=1)) == 1
    [envelope] = spooled_envelopes(gateway)
    remote = envelope["remote"]
    assert isinstance(remote, dict) and remote["bob@remote.test"]["status"] == "deferred"


def test_trace_reports_a_relay_to_a_hop_without_deliverby(
    tmp_path: Path, stop_after: list[Gateway]
) -> None:
    with running(FakeSmtp()) as fake:
        gateway = relaying_gateway(tmp_path, [f"remote.test=127.0.0.1:{fake.port}"], stop_after)
        send_by(gateway.smtp_port, "600;RT", subject="trace")
        [sent] = fake.wait_messages(1)
        assert " BY=" not in sent.mail  # the hop does not offer DELIVERBY
        [report] = reports(gateway, ALICE, 1)
        blocks = status_blocks(report)
        assert blocks[1]["Action"] == "relayed"


def test_by_goes_to_a_hop_that_offers_deliverby_with_the_time_left(
    tmp_path: Path, stop_after: list[Gateway]
) -> None:
    with running(FakeSmtp(extensions=(*DEFAULT_EXTENSIONS, "DELIVERBY 1"))) as fake:
        gateway = relaying_gateway(tmp_path, [f"remote.test=127.0.0.1:{fake.port}"], stop_after)
        send_by(gateway.smtp_port, "600;N", subject="fake-by")
        [sent] = fake.wait_messages(1)
        by = sent.mail.split(" BY=", 1)[1].split()[0]
        seconds, mode = by.split(";")
        assert mode == "N" and 0 < int(seconds) <= 600


@pytest.mark.slow
def test_by_is_passed_on_to_a_second_mailgate(tmp_path: Path, stop_after: list[Gateway]) -> None:
    dead = free_port()
    # The second gateway takes the message and keeps it queued (its next hop is down), so
    # its spool shows the BY parameter it was given.
    second = relaying_gateway(tmp_path / "second", [f"remote.test=127.0.0.1:{dead}"], stop_after)
    first = relaying_gateway(
        tmp_path / "first", [f"remote.test=127.0.0.1:{second.smtp_port}"], stop_after
    )
    send_by(first.smtp_port, "600;RT", subject="pass-on")
    assert wait_for(lambda: bool(spooled_envelopes(second)))
    [envelope] = spooled_envelopes(second)
    options = envelope["mail_options"]
    assert isinstance(options, list)
    [by] = [option for option in options if option.startswith("BY=")]
    seconds, mode = by.removeprefix("BY=").split(";")
    assert mode == "RT" and 0 < int(seconds) <= 600
    assert "status=sent" in first.log()
    # The second mailgate took BY and DSN: reporting the relay is its business now.
    assert reports(first, ALICE, 1, timeout=1) == []
