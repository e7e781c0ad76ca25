"""Configured limits, each breached on purpose with small values: the right code, and a log line."""

from __future__ import annotations

import time

from conftest import DOMAIN, Gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"


def start_with(gateway: Gateway, **settings: object) -> Gateway:
    for key, value in settings.items():
        gateway.env[f"MAILGATE_{key.upper()}"] = str(value)
    gateway.start()
    return gateway


def open_transaction(wire: Wire, rcpt: str = ALICE) -> None:
    wire.reply()
    assert wire.cmd("EHLO client.example")[0] == 250
    assert wire.cmd("MAIL FROM:<a@remote.example>")[0] == 250
    assert wire.cmd(f"RCPT TO:<{rcpt}>")[0] == 250


def test_message_size_limit(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, max_message_size="4k")
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        code, text = wire.cmd("EHLO client.example")
        assert "SIZE 4096" in text.split("\n")
        code, text = wire.cmd("MAIL FROM:<a@remote.example> SIZE=5000")
        assert (code, text[:5]) == (552, "5.3.4")
        assert wire.cmd("MAIL FROM:<a@remote.example> SIZE=100")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        # The client lied about SIZE: the limit is enforced while reading DATA.
        wire.send(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 100 + b".\r\n")
        code, text = wire.reply()
        assert (code, text[:5]) == (552, "5.3.4")
        assert wire.cmd("NOOP")[0] == 250
    assert gateway.wait_delivered(ALICE, 1, timeout=1.0) == []
    assert "message too large" in gateway.log()


def test_recipient_limit(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, max_recipients=2)
    with Wire(gateway.smtp_port) as wire:
        open_transaction(wire)
        assert wire.cmd(f"RCPT TO:<bob@{DOMAIN}>")[0] == 250
        code, text = wire.cmd(f"RCPT TO:<info@{DOMAIN}>")
        assert (code, text[:5]) == (452, "4.5.3")
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: two\r\n\r\nx\r\n.\r\n")
        assert wire.reply()[0] == 250
    assert "too many recipients" in gateway.log()


def test_command_timeout(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, command_timeout=1)
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        time.sleep(1.5)
        code, text = wire.reply()
        assert (code, text[:5]) == (421, "4.4.2")
        assert wire.closed()
    assert "timeout from [127.0.0.1]" in gateway.log()


def test_data_timeouts(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, data_init_timeout=1, data_block_timeout=1)
    with Wire(gateway.smtp_port) as wire:
        open_transaction(wire)
        assert wire.cmd("DATA")[0] == 354
        time.sleep(1.5)
        code, text = wire.reply()
        assert (code, text[:5]) == (421, "4.4.2")
    with Wire(gateway.smtp_port) as wire:
        open_transaction(wire)
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: slow\r\n")
        time.sleep(1.5)
        code, _ = wire.reply()
        assert code == 421
    assert gateway.wait_delivered(ALICE, 1, timeout=0.5) == []


def test_connections_per_ip_and_total(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, max_connections_per_ip=2, max_connections=50)
    first, second = Wire(gateway.smtp_port), Wire(gateway.smtp_port)
    try:
        assert first.reply()[0] == 220 and second.reply()[0] == 220
        with Wire(gateway.smtp_port) as third:
            code, text = third.reply()
            assert (code, text[:5]) == (421, "4.7.0")
            assert third.closed()
        first.cmd("QUIT")
    finally:
        first.close()
        second.close()
    time.sleep(0.3)
    with Wire(gateway.smtp_port) as again:
        assert again.reply()[0] == 220
    assert "per_ip limit" in gateway.log()


def test_total_connection_limit(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, max_connections=1)
    with Wire(gateway.smtp_port) as first:
        assert first.reply()[0] == 220
        with Wire(gateway.submission_port) as second:
            code, text = second.reply()
            assert (code, text[:5]) == (421, "4.7.0")


def test_connection_rate_limit(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, rate_limit_connections=3, rate_limit_window=60)
    for _ in range(3):
        with Wire(gateway.smtp_port) as wire:
            assert wire.reply()[0] == 220
            wire.cmd("QUIT")
    with Wire(gateway.smtp_port) as wire:
        code, text = wire.reply()
        assert (code, text[:5]) == (421, "4.7.0")
        assert "rate" in text
    assert "rate limit" in gateway.log()


def test_error_limit_disconnects(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, max_errors=3)
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        assert wire.cmd("BOGUS")[0] == 500
        assert wire.cmd("BOGUS")[0] == 500
        assert wire.cmd("BOGUS")[0] == 500
        code, text = wire.reply()
        assert (code, text[:5]) == (421, "4.7.0")
        assert wire.closed()


def test_reject_undeclared_8bit_when_configured(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, reject_8bit_without_8bitmime="true")
    with Wire(gateway.smtp_port) as wire:
        open_transaction(wire)
        assert wire.cmd("DATA")[0] == 354
        wire.send("Subject: 8bit\r\n\r\nÄrger\r\n.\r\n".encode())
        code, text = wire.reply()
        assert (code, text[:5]) == (554, "5.6.0")
        assert wire.cmd("MAIL FROM:<a@remote.example> BODY=8BITMIME")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send("Subject: 8bit\r\n\r\nÄrger\r\n.\r\n".encode())
        assert wire.reply()[0] == 250


def test_vrfy_when_enabled(fresh_gateway: Gateway) -> None:
    gateway = start_with(fresh_gateway, vrfy="true")
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        assert "VRFY" in wire.cmd("EHLO client.example")[1].split("\n")
        assert wire.cmd(f"VRFY <{ALICE}>") == (250, f"2.1.5 <{ALICE}>")
        code, text = wire.cmd(f"VRFY nobody@{DOMAIN}")
        assert (code, text[:5]) == (550, "5.1.1")
        assert wire.cmd("VRFY x@elsewhere.example")[0] == 252
