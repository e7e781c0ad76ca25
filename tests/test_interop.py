"""Interoperability with real mail software from Debian, both ways round.

- mailgate's core as the MTA in front of third-party milters: opendkim signing (and a
  second opendkim verifying the signature in the same chain), clamav-milter with clamd,
  spamass-milter with spamd.
- Sendmail as the MTA in front of mailgate's content daemon, exactly as an operator would
  attach it with INPUT_MAIL_FILTER (Postfix is covered in test_content_daemon.py).
"""

from __future__ import annotations

import email.policy
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

import peers
from conftest import DOMAIN, Gateway, add_default_users, make_gateway
from daemon_process import Daemon

ALICE = f"alice@{DOMAIN}"

pytestmark = pytest.mark.slow


def core_with_milters(tmp_path: Path, sockets: list[str]) -> Gateway:
    gateway = make_gateway(tmp_path)
    add_default_users(gateway)
    entries = "".join(
        f"  - name: m{index}\n    socket: {socket}\n    default_action: tempfail\n"
        for index, socket in enumerate(sockets)
    )
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n{entries}")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    return gateway


@pytest.fixture
def stopper() -> Iterator[list[Gateway]]:
    gateways: list[Gateway] = []
    yield gateways
    for gateway in gateways:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def test_core_with_opendkim_signer_and_verifier(tmp_path: Path, stopper: list[Gateway]) -> None:
    with (
        peers.opendkim_signer(tmp_path / "sign") as signer,
        peers.opendkim_verifier(tmp_path / "verify", signer.dns_records) as verifier,
    ):
        gateway = core_with_milters(tmp_path, [signer.pymilter_socket, verifier.pymilter_socket])
        stopper.append(gateway)
        signed = peers.message(sender="news@test.example", recipient=ALICE, subject="sign me")
        other = peers.message(sender="x@other.example", recipient=ALICE, subject="not mine")
        with gateway.smtp() as client:
            assert client.sendmail("news@test.example", [ALICE], signed) == {}
            assert client.sendmail("x@other.example", [ALICE], other) == {}
        messages = gateway.wait_delivered(ALICE, 2)
    mine = next(m for m in messages if b"sign me" in m)
    theirs = next(m for m in messages if b"not mine" in m)
    assert b"DKIM-Signature:" in mine and b"d=test.example" in mine and b"s=sel1" in mine
    # The verifier runs after the signer in the chain and sees its signature: it verifies.
    assert b"dkim=pass" in mine
    assert b"DKIM-Signature:" not in theirs


def test_core_with_clamav_milter_rejects_eicar(tmp_path: Path, stopper: list[Gateway]) -> None:
    with peers.clamav_milter(tmp_path / "clam") as clam:
        gateway = core_with_milters(tmp_path, [clam.pymilter_socket])
        stopper.append(gateway)
        with gateway.smtp() as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("a@remote.example", [ALICE], peers.eicar_message(recipient=ALICE))
            assert info.value.smtp_code == 550
            assert info.value.smtp_error.startswith(b"5.7.1")
            clean = peers.message(recipient=ALICE, subject="clean one")
            assert client.sendmail("a@remote.example", [ALICE], clean) == {}
        delivered = gateway.wait_delivered(ALICE, 1)
    assert any(b"clean one" in m and b"X-Virus-Status: Clean" in m for m in delivered)
    assert not any(b"EICAR" in m for m in gateway.delivered(ALICE))


def test_core_with_spamass_milter_rejects_gtube(tmp_path: Path, stopper: list[Gateway]) -> None:
    with peers.spamass_milter(tmp_path / "spam") as spam:
        gateway = core_with_milters(tmp_path, [spam.pymilter_socket])
        stopper.append(gateway)
        with gateway.smtp() as client:
            gtube = peers.message(recipient=ALICE, subject="gtube", body=peers.GTUBE + b"\r\n")
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("a@remote.example", [ALICE], gtube)
            assert info.value.smtp_code == 550


SENDMAIL_RULES = """\
daemon: content
rules:
  - name: blocked-sender
    if: {envelope: {part: domain, from: {is: blocked.example}}}
    then: {reject: {code: 554, enhanced: 5.7.1, text: "Sender blocked"}}
  - name: hold-docm
    if: {attachment: {filename: {matches: "*.docm"}}}
    then: {quarantine: "macro document"}
  - name: stamp
    if: true
    then: [{add_header: {name: X-Mailgate-Content, value: checked}}, continue]
"""


def with_attachment(filename: str) -> bytes:
    message = EmailMessage()
    message["From"] = "a@remote.example"
    message["To"] = "r@test.example"
    message["Subject"] = "with an attachment"
    message.set_content("See attached.")
    message.add_attachment(
        b"PK\x03\x04 not really", "application", "octet-stream", filename=filename
    )
    return message.as_bytes(policy=email.policy.SMTP)


def test_sendmail_with_the_content_daemon(tmp_path: Path) -> None:
    rules = tmp_path / "content.yaml"
    rules.write_text(SENDMAIL_RULES)
    port = peers.free_port()
    daemon = Daemon("content", f"inet:{port}@127.0.0.1", tmp_path / "daemon.log", rules=rules)
    daemon.start()
    try:
        with peers.sendmail_with_milter(tmp_path / "sm", f"inet:{port}@127.0.0.1") as mta:
            with mta.smtp() as client:
                client.sendmail("a@remote.example", ["r@test.example"], peers.message())
                with pytest.raises(smtplib.SMTPDataError) as rejected:
                    client.sendmail("x@blocked.example", ["r@test.example"], peers.message())
                docm = with_attachment("q.docm")
                client.sendmail("a@remote.example", ["r@test.example"], docm)
            assert rejected.value.smtp_code == 554
            assert b"Sender blocked" in rejected.value.smtp_error
            delivered = mta.wait_delivered(1)
            assert b"X-Mailgate-Content: checked" in delivered[0]
            assert "macro document" in mta.queue(quarantined=True)
    finally:
        assert daemon.stop() == 0
