"""DSN (RFC 3461/3464): the SMTP parameters, the report format, and local success notices."""

from __future__ import annotations

import email
import email.policy

import pytest
from relay_helpers import reports, status_blocks

from mailgate.core.relay.dsn import FULL_LIMIT, RecipientStatus, build_report
from mailgate.core.smtp.dsnparams import (
    check_rcpt_param,
    envid_of,
    notify_of,
    orcpt_of,
    wants,
    xtext_decode,
    xtext_encode,
)
from mailgate.core.spool.envelope import SpoolEnvelope

from conftest import DOMAIN, Gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
ORIGINAL = b"From: <alice@example.test>\r\nSubject: hello\r\n\r\nbody line\r\n"


def test_xtext_round_trip_and_errors() -> None:
    for text in ("plain", "a+b=c d", "\x01\x7f"):
        assert xtext_decode(xtext_encode(text)) == text
    assert xtext_encode("caf\u00e9") == "caf+C3+A9"
    assert xtext_encode("a+b=c") == "a+2Bb+3Dc"
    assert xtext_decode("env+2B42") == "env+42"
    for bad in ("a+2", "a+zz", "a=b", "a b"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


def test_reading_stored_parameters() -> None:
    assert notify_of(["NOTIFY=SUCCESS,DELAY"]) == {"SUCCESS", "DELAY"}
    assert notify_of(["NOTIFY=NEVER"]) == frozenset()
    assert notify_of([]) is None
    assert wants(None, "FAILURE") and not wants(None, "DELAY") and not wants(None, "SUCCESS")
    assert not wants(frozenset(), "FAILURE")
    assert orcpt_of(["ORCPT=rfc822;a+2Bb@example.org"]) == ("rfc822", "a+b@example.org")
    assert envid_of(["RET=HDRS", "ENVID=x+20y"]) == "x y"
    assert check_rcpt_param("NOTIFY", "NEVER,SUCCESS") is not None
    assert check_rcpt_param("NOTIFY", "success,failure") is None
    assert check_rcpt_param("XFOO", None) is not None


def make_report(kind: str = "failure", options: list[str] | None = None, content: bytes = ORIGINAL):
    envelope = SpoolEnvelope(
        "0ABCDEFGHJKMNPQR", ALICE, ["x@remote.test"], mail_options=options or []
    )
    statuses = [
        RecipientStatus(
            "x@remote.test",
            "failed" if kind == "failure" else "delayed",
            "5.1.1" if kind == "failure" else "4.4.1",
            ("rfc822", "orig@remote.test"),
            "mx.remote.test[192.0.2.1]:25",
            "550 5.1.1 no such\r\nuser",
            1_700_000_000.0,
        )
    ]
    raw = build_report(
        envelope, content, kind, statuses, reporting_mta="mx.example.test", now=1_700_000_000
    )  # type: ignore[arg-type]
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return raw, parsed


def test_report_structure() -> None:
    raw, report = make_report(options=["ENVID=abc"])
    assert raw.isascii() and b"\r\n" in raw
    assert report["To"].addresses[0].addr_spec == ALICE
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.test"
    text, _, returned = report.iter_parts()
    assert text.get_content_type() == "text/plain"
    per_message, per_rcpt = status_blocks(report)
    assert per_message["Original-Envelope-Id"] == "abc"
    assert per_message["Arrival-Date"]
    assert per_rcpt["Original-Recipient"] == "rfc822; orig@remote.test"
    # A multi-line reply stays one field.
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert per_rcpt["Last-Attempt-Date"]
    assert returned.get_content_type() == "message/rfc822"


def test_what_comes_back_follows_ret_and_size() -> None:
    big = ORIGINAL + b"x" * (FULL_LIMIT + 1) + b"\r\n"
    assert list(make_report(content=big)[1].iter_parts())[2].get_content_type() == (
        "text/rfc822-headers"
    )
    full = make_report(options=["RET=FULL"], content=big)[1]
    assert list(full.iter_parts())[2].get_content_type() == "message/rfc822"
    hdrs = make_report(options=["RET=HDRS"])[1]
    part = list(hdrs.iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert b"body line" not in part.as_bytes()
    delay = make_report("delay")[1]
    assert list(delay.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    eight_bit = make_report(content="Subject: caf\u00e9\r\n\r\n\u00e9t\u00e9\r\n".encode())[0]
    assert b"Content-Transfer-Encoding: 8bit" in eight_bit


@pytest.mark.parametrize(
    ("command", "code", "enhanced"),
    [
        ("MAIL FROM:<a@remote.test> RET=FULL ENVID=id+2B1", 250, "2.0.0"),
        ("MAIL FROM:<a@remote.test> RET=BOTH", 501, "5.5.4"),
        ("MAIL FROM:<a@remote.test> ENVID=bad+zz", 501, "5.5.4"),
        (f"MAIL FROM:<a@remote.test> ENVID={'x' * 101}", 501, "5.5.4"),
    ],
)
def test_mail_parameters(gateway: Gateway, command: str, code: int, enhanced: str) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        _, ehlo = wire.cmd("EHLO client.test")
        assert "DSN" in ehlo.splitlines()
        reply = wire.cmd(command)
        assert (reply[0], reply[1][:5]) == (code, enhanced), reply


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ("NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;bob@example.test", 250),
        ("NOTIFY=NEVER", 250),
        ("NOTIFY=NEVER,FAILURE", 501),
        ("NOTIFY=SOMETIMES", 501),
        ("NOTIFY=FAILURE,FAILURE", 501),
        ("ORCPT=bob@example.test", 501),
        ("ORCPT=rfc822;bad+zz", 501),
        ("XFOO=1", 555),
    ],
)
def test_rcpt_parameters(gateway: Gateway, params: str, code: int) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        assert wire.cmd("MAIL FROM:<a@remote.test>")[0] == 250
        reply = wire.cmd(f"RCPT TO:<{BOB}> {params}")
        assert reply[0] == code, reply


def test_success_notice_for_local_delivery(gateway: Gateway) -> None:
    before = len(reports(gateway, ALICE, 0, timeout=0))
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        assert wire.cmd(f"MAIL FROM:<{ALICE}> ENVID=local-1 RET=HDRS")[0] == 250
        assert wire.cmd(f"RCPT TO:<{BOB}> NOTIFY=SUCCESS ORCPT=rfc822;Bob@example.test")[0] == 250
        assert wire.cmd(f"RCPT TO:<info@{DOMAIN}> NOTIFY=NEVER")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: success please\r\n\r\nhi\r\n.\r\n")
        assert wire.reply()[0] == 250
    found = reports(gateway, ALICE, before + 1)
    report = [r for r in found if r["Subject"] == "Successful Mail Delivery Report"][-1]
    per_message, rcpt = status_blocks(report)
    assert per_message["Original-Envelope-Id"] == "local-1"
    assert (rcpt["Action"], rcpt["Status"]) == ("delivered", "2.0.0")
    assert rcpt["Final-Recipient"] == f"rfc822; {BOB}"
    assert rcpt["Original-Recipient"] == "rfc822; Bob@example.test"
    assert len(status_blocks(report)) == 2  # NOTIFY=NEVER for info@: nothing about it
