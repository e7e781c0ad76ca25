"""The gateway on the standard asyncio loop too (uvloop is the default the rest runs on)."""

from __future__ import annotations

import smtplib
import ssl

import pytest

from conftest import DOMAIN, PASSWORD, Gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_auth_pipelining_and_delivery_on_each_loop(fresh_gateway: Gateway, loop: str) -> None:
    fresh_gateway.env["MAILGATE_EVENT_LOOP"] = loop
    fresh_gateway.start()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", fresh_gateway.submission_port, timeout=10) as client:
        client.starttls(context=context)
        client.login(ALICE, PASSWORD)
        assert client.sendmail(ALICE, [BOB], f"Subject: on {loop}\r\n\r\nx\r\n".encode()) == {}
    with Wire(fresh_gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        wire.send(f"MAIL FROM:<a@remote.example>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode())
        assert [wire.reply()[0] for _ in range(3)] == [250, 250, 354]
        wire.send(b"Subject: pipelined on loop\r\n\r\nx\r\n.\r\nQUIT\r\n")
        assert wire.reply()[0] == 250
        assert wire.reply()[0] == 221
    messages = fresh_gateway.wait_delivered(BOB, 2)
    assert any(f"Subject: on {loop}".encode() in m for m in messages)
    assert f"event loop {loop}" in fresh_gateway.log()
