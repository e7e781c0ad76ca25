"""What the relay tests share: the test zone, a sending gateway, and reading DSNs back."""

from __future__ import annotations

import email
import email.message
import email.policy
import time
from pathlib import Path

from conftest import DOMAIN, Gateway, add_default_users, make_gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"

# Every mail domain of the tests points at 127.0.0.1; the port comes from relay_port.
ZONE = """
$TTL 60
remote.test.          IN SOA ns.remote.test. hostmaster.remote.test. 1 3600 600 86400 60
remote.test.          IN MX 10 mx.remote.test.
mx.remote.test.       IN A 127.0.0.1
example.test.         IN MX 10 mx.example.test.
mx.example.test.      IN A 127.0.0.1
test.example.         IN MX 10 mx.test.example.
mx.test.example.      IN A 127.0.0.1
nullmx.test.          IN MX 0 .
afallback.test.       IN A 127.0.0.1
v6.test.              IN MX 10 mx.v6.test.
mx.v6.test.           IN AAAA ::1
"""


def sending_gateway(
    tmp_path: Path, dns_address: str, relay_port: int, *, users: bool = True, **settings: object
) -> Gateway:
    """A gateway for example.test that relays for 127.0.0.1, with fast retries.

    ``users=False``: the data directory already has them (the same gateway restarted)."""
    values: dict[str, object] = {
        "dns_nameservers": dns_address,
        "relay_port": relay_port,
        "relay_networks": "127.0.0.1/32",
        "relay_retry_base": 1,
        "relay_retry_max": 2,
        "rate_limit_connections": 10000,
        "auth_failure_delay": 0,
    }
    values.update(settings)
    tmp_path.mkdir(parents=True, exist_ok=True)
    gateway = make_gateway(tmp_path, **values)
    if users:
        add_default_users(gateway)
    return gateway


def send(
    port: int,
    mail_from: str,
    rcpts: list[str],
    body: bytes,
    *,
    mail_params: str = "",
    rcpt_params: str = "",
) -> str:
    """One message over SMTP; returns the queue id from the 250 reply."""
    with Wire(port) as wire:
        wire.reply()
        assert wire.cmd("EHLO client.test")[0] == 250
        code, text = wire.cmd(f"MAIL FROM:<{mail_from}>{mail_params}")
        assert code == 250, text
        for rcpt in rcpts:
            code, text = wire.cmd(f"RCPT TO:<{rcpt}>{rcpt_params}")
            assert code == 250, text
        assert wire.cmd("DATA")[0] == 354
        wire.send(body.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + b".\r\n")
        code, text = wire.reply()
        assert code == 250, text
        wire.cmd("QUIT")
        return text.rsplit(" ", 1)[-1]


def message(subject: str, sender: str = ALICE, extra: str = "") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <bob@remote.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@client.test>\r\n{extra}\r\nHello.\r\n"
    ).encode()


def parse(raw: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def reports(
    gateway: Gateway, address: str, count: int, timeout: float = 30.0
) -> list[email.message.EmailMessage]:
    """The DSNs in ``address``'s Maildir, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    found: list[email.message.EmailMessage] = []
    while time.monotonic() < deadline:
        found = [parse(raw) for raw in gateway.delivered(address)]
        found = [m for m in found if m.get_content_type() == "multipart/report"]
        if len(found) >= count:
            break
        time.sleep(0.1)
    return found


def status_blocks(report: email.message.EmailMessage) -> list[email.message.Message]:
    """The message/delivery-status blocks: [per-message, per-recipient ...]."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def wait_for(predicate: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def spool_empty(gateway: Gateway) -> bool:
    spool = gateway.data_dir / "spool"
    return not any((spool / "incoming").iterdir()) and not any((spool / "deferred").iterdir())
