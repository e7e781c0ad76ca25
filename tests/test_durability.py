"""Nothing lost: kill -9 under load, restart, count; graceful shutdown answers 421 4.3.2."""

from __future__ import annotations

import signal
import smtplib
import threading
import time

import pytest

from conftest import DOMAIN, Gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def count_subjects(gateway: Gateway, address: str, prefix: bytes) -> set[bytes]:
    found = set()
    for message in gateway.delivered(address):
        for line in message.split(b"\n"):
            if line.startswith(b"Subject: " + prefix):
                found.add(line[len(b"Subject: ") :].strip())
    return found


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_message(fresh_gateway: Gateway) -> None:
    gateway = fresh_gateway
    gateway.start()
    acknowledged: set[bytes] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        sequence = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=10) as client:
                    client.ehlo("loader.example")
                    for _ in range(10):
                        subject = f"load-{worker}-{sequence}".encode()
                        sequence += 1
                        body = b"Subject: " + subject + b"\r\n\r\n" + b"payload line\r\n" * 40
                        client.sendmail("load@remote.example", [ALICE, f"team@{DOMAIN}"], body)
                        with lock:
                            acknowledged.add(subject)
            except (OSError, smtplib.SMTPException):
                if stop.is_set():
                    return
                time.sleep(0.05)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    gateway.kill9()
    stop.set()
    for thread in threads:
        thread.join(30)
    acked = set(acknowledged)
    assert len(acked) >= 200

    gateway.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alice = count_subjects(gateway, ALICE, b"load-")
        bob = count_subjects(gateway, BOB, b"load-")
        if acked <= alice and acked <= bob:
            break
        time.sleep(0.2)
    assert not acked - alice, f"lost for alice: {sorted(acked - alice)[:5]}"
    assert not acked - bob, f"lost for bob: {sorted(acked - bob)[:5]}"
    # The spool drained: nothing is left waiting once everything is delivered.
    incoming = gateway.data_dir / "spool" / "incoming"
    deadline = time.monotonic() + 20
    while any(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(incoming.iterdir())


def test_sigterm_closes_idle_sessions_with_421_after_grace(fresh_gateway: Gateway) -> None:
    gateway = fresh_gateway
    gateway.env["MAILGATE_SHUTDOWN_GRACE"] = "1"
    gateway.start()
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        gateway.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        started = time.monotonic()
        code, text = wire.reply()
        assert (code, text[:5]) == (421, "4.3.2")
        assert time.monotonic() - started >= 0.9
        assert wire.closed()
    assert gateway.process.wait(10) == 0  # type: ignore[union-attr]
    assert "shutting down" in gateway.log()


def test_sigterm_lets_a_transaction_finish_within_grace(fresh_gateway: Gateway) -> None:
    gateway = fresh_gateway
    gateway.env["MAILGATE_SHUTDOWN_GRACE"] = "10"
    gateway.start()
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        wire.cmd("MAIL FROM:<a@remote.example>")
        wire.cmd(f"RCPT TO:<{BOB}>")
        gateway.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.3)
        # New connections are refused at once; the running session goes on.
        with pytest.raises(OSError), Wire(gateway.smtp_port, timeout=2) as late:
            late.reply()
        assert wire.cmd("DATA")[0] == 354
        wire.send(b"Subject: during shutdown\r\n\r\nx\r\n.\r\n")
        code, text = wire.reply()
        assert code == 250 and "queued as" in text
        assert wire.cmd("QUIT")[0] == 221
    assert gateway.process.wait(15) == 0  # type: ignore[union-attr]
    # Delivered before exit, or on the next start: either way it is not lost.
    gateway.start()
    assert any(b"during shutdown" in m for m in gateway.wait_delivered(BOB, 1))
