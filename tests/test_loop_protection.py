"""Loop protection at the door: a message that has passed through too many MTAs is refused."""

from __future__ import annotations

import smtplib

import pytest

from conftest import DOMAIN, Gateway


def _message(hops: int, subject: str) -> bytes:
    received = "".join(
        f"Received: from hop{i}.example.net by hop{i + 1}.example.net; "
        "Wed, 25 Nov 2026 12:00:00 +0000\r\n"
        for i in range(hops)
    )
    return (
        f"{received}From: loop@remote.example\r\nTo: alice@{DOMAIN}\r\n"
        f"Subject: {subject}\r\n\r\nround and round\r\n"
    ).encode()


def test_max_hops_received_headers_are_refused_554_5_4_6(gateway: Gateway) -> None:
    with gateway.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("loop@remote.example", [f"alice@{DOMAIN}"], _message(50, "looped"))
        assert refused.value.smtp_code == 554
        assert refused.value.smtp_error.startswith(b"5.4.6 Too many hops (50 Received headers)")
        # One fewer is still mail: with ours it makes 50, which the relay would still pass.
        client.sendmail("loop@remote.example", [f"alice@{DOMAIN}"], _message(49, "not looped"))
    delivered = gateway.wait_delivered(f"alice@{DOMAIN}", 1)
    assert any(b"Subject: not looped" in m for m in delivered)
    assert not any(b"Subject: looped" in m for m in gateway.delivered(f"alice@{DOMAIN}"))


def test_received_in_the_body_does_not_count(gateway: Gateway) -> None:
    body = "".join(f"Received: from quoted{i}\r\n" for i in range(60))
    message = (
        f"From: a@remote.example\r\nTo: alice@{DOMAIN}\r\nSubject: quoted trace\r\n\r\n{body}"
    ).encode()
    with gateway.smtp() as client:
        client.sendmail("a@remote.example", [f"alice@{DOMAIN}"], message)
