"""Every command and extension of the MX listener, spoken over real sockets to a real process."""

from __future__ import annotations

import re
import time

import pytest

from conftest import DOMAIN, Gateway
from smtpwire import Wire, has_enhanced

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def message(subject: str, body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: sender@remote.example\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@remote.example>\r\n\r\n{body}"
    ).encode()


def test_greeting_and_ehlo_extensions(gateway: Gateway) -> None:
    with Wire(gateway.smtp_port) as wire:
        code, text = wire.reply()
        assert code == 220 and "mx.example.test" in text and "ESMTP" in text
        code, text = wire.cmd("EHLO client.example")
        assert code == 250
        lines = text.split("\n")
        assert lines[0] == "mx.example.test"
        for extension in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"):
            assert extension in lines
        assert f"SIZE {25 * 1024 * 1024}" in lines
        # No AUTH before TLS on a non-loopback-exempt configuration.
        assert not any(line.startswith("AUTH") for line in lines)


def test_helo_noop_rset_help_vrfy_expn_quit(gateway: Gateway) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        assert wire.cmd("HELO client.example") == (250, "mx.example.test")
        code, text = wire.cmd("NOOP")
        assert code == 250 and has_enhanced(code, text)
        code, text = wire.cmd("RSET")
        assert (code, text) == (250, "2.0.0 Ok")
        code, text = wire.cmd("HELP")
        assert code == 214 and "MAIL" in text and "STARTTLS" in text
        code, text = wire.cmd(f"VRFY {ALICE}")
        assert code == 252 and text.startswith("2.5.0")
        code, text = wire.cmd("EXPN team")
        assert code == 502 and text.startswith("5.5.1")
        code, text = wire.cmd("QUIT")
        assert code == 221 and text.startswith("2.0.0")
        assert wire.closed()


def test_delivery_to_maildir_with_trace_headers(gateway: Gateway) -> None:
    before = len(gateway.delivered(ALICE))
    with gateway.smtp() as client:
        client.ehlo("client.example")
        client.mail("sender@remote.example")
        code, _ = client.rcpt(ALICE)
        assert code == 250
        code, text = client.data(message("plain delivery"))
    assert code == 250
    match = re.match(rb"2\.0\.0 Ok: queued as (\S+)", text)
    assert match, text
    queue_id = match.group(1).decode()
    messages = gateway.wait_delivered(ALICE, before + 1)
    assert len(messages) == before + 1
    delivered = next(m for m in messages if b"plain delivery" in m)
    head = delivered.split(b"\n\n", 1)[0].decode()
    assert head.startswith("Return-Path: <sender@remote.example>")
    assert f"Delivered-To: {ALICE}" in head
    assert "Received: from client.example ([127.0.0.1])" in head
    assert f"by mx.example.test (mailgate) with ESMTP id {queue_id}" in head
    assert f"for <{ALICE}>" in head
    # The queue ID follows the message through the log (delivery logs just after the copy).
    sent = rf"{queue_id}: to=<{re.escape(ALICE)}>.*status=sent"
    deadline = time.monotonic() + 10
    while not re.search(sent, gateway.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = gateway.log()
    assert f"{queue_id}: message-id=<plain-delivery@remote.example>" in log
    assert re.search(sent, log)


def test_alias_expansion_and_unknown_user(gateway: Gateway) -> None:
    alice_before, bob_before = len(gateway.delivered(ALICE)), len(gateway.delivered(BOB))
    with gateway.smtp() as client:
        client.ehlo("client.example")
        client.mail("sender@remote.example")
        code, text = client.rcpt(f"nobody@{DOMAIN}")
        assert code == 550 and text.startswith(b"5.1.1")
        assert client.rcpt(f"team@{DOMAIN}")[0] == 250
        assert client.data(message("to the team"))[0] == 250
    assert len(gateway.wait_delivered(ALICE, alice_before + 1)) == alice_before + 1
    assert len(gateway.wait_delivered(BOB, bob_before + 1)) == bob_before + 1


def test_postmaster_without_domain_is_accepted(gateway: Gateway) -> None:
    before = len(gateway.delivered(ALICE))
    with gateway.smtp() as client:
        client.ehlo("client.example")
        client.mail("")
        code, text = client.rcpt("<Postmaster>")
        assert code == 250, text
        assert client.data(message("to postmaster"))[0] == 250
    messages = gateway.wait_delivered(ALICE, before + 1)
    assert any(b"to postmaster" in m and b"Return-Path: <>" in m for m in messages)


def test_pipelined_session(gateway: Gateway) -> None:
    before = len(gateway.delivered(BOB))
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO pipeliner.example")
        wire.send(
            b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<" + BOB.encode() + b">\r\n"
            b"RCPT TO:<nobody@" + DOMAIN.encode() + b">\r\nDATA\r\n"
        )
        assert wire.reply()[0] == 250
        assert wire.reply()[0] == 250
        assert wire.reply()[0] == 550
        assert wire.reply()[0] == 354
        wire.send(b"Subject: pipelined\r\n\r\n..leading dot\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        code, text = wire.reply()
        assert code == 250 and "queued as" in text
        assert wire.reply()[0] == 250
        assert wire.reply()[0] == 250
        assert wire.reply()[0] == 221
    messages = gateway.wait_delivered(BOB, before + 1)
    body = next(m for m in messages if b"Subject: pipelined" in m)
    assert body.endswith(b"\n\n.leading dot\n")


def test_size_extension(gateway: Gateway) -> None:
    with gateway.smtp() as client:
        client.ehlo("client.example")
        code, text = client.mail("a@remote.example", [f"SIZE={26 * 1024 * 1024}"])
        assert code == 552 and text.startswith(b"5.3.4")
        code, _ = client.mail("a@remote.example", ["SIZE=1000"])
        assert code == 250


def test_8bitmime_and_smtputf8(gateway: Gateway) -> None:
    before = len(gateway.delivered(ALICE))
    body = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGrüße\r\n".encode()
    with gateway.smtp() as client:
        client.ehlo("client.example")
        assert client.mail("a@remote.example", ["BODY=8BITMIME"])[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        assert client.data(body)[0] == 250
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        code, text = wire.cmd("MAIL FROM:<jörg@bücher.example>")
        assert code == 553 and text.startswith("5.6.7")
        assert wire.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send("Subject: utf8\r\nFrom: jörg@bücher.example\r\n\r\nHallo\r\n.\r\n".encode())
        assert wire.reply()[0] == 250
        # BODY=BINARYMIME is accepted (with BDAT: tests/test_smtp_chunking.py); others not.
        code, text = wire.cmd("MAIL FROM:<a@remote.example> BODY=BINARY")
        assert code == 501
        code, text = wire.cmd("MAIL FROM:<a@remote.example> FOO=BAR")
        assert code == 555 and text.startswith("5.5.4")
    messages = gateway.wait_delivered(ALICE, before + 2)
    assert any("Grüße".encode() in m for m in messages)
    utf8 = next(m for m in messages if b"Subject: utf8" in m)
    assert "Return-Path: <jörg@bücher.example>".encode() in utf8
    assert b"with UTF8SMTP id" in utf8


def test_every_reply_carries_an_enhanced_code(gateway: Gateway) -> None:
    commands = [
        "EHLO client.example",
        "NOOP",
        "MAIL FROM:<a@remote.example>",
        "MAIL FROM:<b@remote.example>",
        f"RCPT TO:<{ALICE}>",
        "RCPT TO:<someone@elsewhere.example>",
        "RCPT TO:<bad address>",
        "VRFY x",
        "BOGUS",
        "RSET",
        "DATA",
        "RCPT TO:<x@y.example>",
        "STARTTLS now",
        "AUTH PLAIN",
        "HELP",
    ]
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        for command in commands:
            code, text = wire.cmd(command)
            if command.startswith("EHLO"):
                continue
            assert has_enhanced(code, text), (command, code, text)


def test_commands_out_of_order(gateway: Gateway) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        code, text = wire.cmd("MAIL FROM:<a@remote.example>")
        assert code == 503 and text.startswith("5.5.1")
        wire.cmd("EHLO client.example")
        code, text = wire.cmd(f"RCPT TO:<{ALICE}>")
        assert code == 503 and text.startswith("5.5.1")
        code, text = wire.cmd("DATA")
        assert code == 503 and text.startswith("5.5.1")
        assert wire.cmd("MAIL FROM:<a@remote.example>")[0] == 250
        code, text = wire.cmd("MAIL FROM:<a@remote.example>")
        assert code == 503 and text.startswith("5.5.1")
        code, text = wire.cmd("DATA")
        assert code == 503 and text.startswith("5.5.1")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x00\x01\x02garbage", 500),
        (b"NOOP\x00", 500),
        (b"\xff\xfe\xfd", 500),
        (b"HELO", 501),
        (b"EHLO", 501),
        (b"MAIL FROM:<unterminated", 503),
        (b"X" * 2000, 500),
        (b"", 500),
        (b"  ", 500),
        (b"DATA extra", 503),
    ],
)
def test_bad_input_gets_a_reply_not_a_traceback(
    gateway: Gateway, payload: bytes, code: int
) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        got, text = wire.cmd(payload)
        assert got == code, text
        assert has_enhanced(got, text)
        assert "Traceback" not in text and "Error" not in text
        # The session goes on after a bad line.
        assert wire.cmd("NOOP")[0] == 250
    assert "Traceback" not in gateway.log()


def test_overlong_lines(gateway: Gateway) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        code, text = wire.cmd(b"MAIL FROM:<" + b"a" * 1100 + b"@remote.example>")
        assert (code, text[:5]) == (500, "5.5.2")
        assert wire.cmd("MAIL FROM:<a@remote.example>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n.\r\n")
        code, text = wire.reply()
        assert (code, text[:5]) == (500, "5.5.2")
        # The transaction is over; a new one works.
        assert wire.cmd("MAIL FROM:<a@remote.example>")[0] == 250


def test_eight_bit_without_8bitmime_is_accepted_by_default(gateway: Gateway) -> None:
    with gateway.smtp() as client:
        client.ehlo("client.example")
        client.mail("a@remote.example")
        client.rcpt(ALICE)
        code, _ = client.data("Subject: undeclared\r\n\r\nÄrger\r\n".encode())
        assert code == 250


def test_smtplib_sendmail_roundtrip(gateway: Gateway) -> None:
    before = len(gateway.delivered(BOB))
    with gateway.smtp() as client:
        refused = client.sendmail("a@remote.example", [BOB], message("sendmail api"))
    assert refused == {}
    assert len(gateway.wait_delivered(BOB, before + 1)) == before + 1


def test_quit_mid_transaction_delivers_nothing(gateway: Gateway) -> None:
    before = len(gateway.delivered(BOB))
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        wire.cmd("MAIL FROM:<a@remote.example>")
        wire.cmd(f"RCPT TO:<{BOB}>")
        wire.cmd("DATA")
        wire.send(b"Subject: cut off\r\n\r\npartial")
    # A new session still works, and the cut-off message was never accepted.
    with gateway.smtp() as client:
        assert client.noop()[0] == 250
    assert not any(b"cut off" in m for m in gateway.wait_delivered(BOB, before + 1, timeout=1.0))
