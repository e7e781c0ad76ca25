"""`mailgate queue` for the outbound queue: list (filters, counts), show, hold, release,
delete, and flush/bounce as requests to a running server."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
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
    status_blocks,
    wait_for,
)

from mailgate.core.spool import cli as queue_cli
from mailgate.core.spool.envelope import RemoteState, SpoolEnvelope
from mailgate.core.spool.queue_id import new_queue_id
from mailgate.core.spool.spool import Spool

from conftest import MAILGATE, Gateway

MESSAGE = b"Subject: queued\r\n\r\nbody\r\n"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mailgate")
    sub = parser.add_subparsers(dest="command")
    queue_cli.register(sub)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


async def make_queue(root: Path) -> tuple[str, str]:
    spool = Spool(root)
    first = SpoolEnvelope(
        new_queue_id(), "alice@example.test", ["bob@remote.test", "carol@far.test"]
    )
    first.done = {"bob@remote.test": "relay", "carol@far.test": "relay"}
    first.relay = {"bob@remote.test": "bob@remote.test", "carol@far.test": "carol@far.test"}
    first.remote = {
        "bob@remote.test": RemoteState(
            "bob@remote.test",
            status="deferred",
            attempts=3,
            next_attempt=time.time() + 600,
            last_reply="451 4.7.1 greylisted",
            last_status="4.7.1",
            remote_mta="mx.remote.test[127.0.0.1]:25",
        ),
        "carol@far.test": RemoteState("carol@far.test", status="sent", last_reply="250 ok"),
    }
    second = SpoolEnvelope(new_queue_id(), "zed@example.test", ["dan@remote.test"])
    second.done = {"dan@remote.test": "relay"}
    second.relay = {"dan@remote.test": "dan@remote.test"}
    for envelope in (first, second):
        await spool.store(envelope, MESSAGE)
        await spool.defer(envelope.queue_id, envelope)
    spool.close()
    return first.queue_id, second.queue_id


async def test_list_show_hold_release_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    first, second = await make_queue(tmp_path / "spool")
    data = ["--data-dir", str(tmp_path)]

    def cli(*argv: str) -> tuple[int, str]:
        code = run_cli([*argv, *data])
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(cli, "queue", "list")
    assert code == 0
    assert "bob@remote.test: deferred: 451 4.7.1 greylisted (attempt 3, next" in out
    assert "carol@far.test: sent (250 ok)" in out
    assert "dan@remote.test  (deferred: outbound relay not configured (dan@remote.test))" in out

    code, out = await asyncio.to_thread(cli, "queue", "list", "--counts")
    assert out.splitlines() == [
        "messages: 0 incoming, 2 deferred, 0 hold",
        "recipients: 1 queued, 1 deferred, 1 sent, 0 relay, 0 bounced",
    ]
    _, out = await asyncio.to_thread(cli, "queue", "list", "--domain", "far.test")
    assert first in out and second not in out
    _, out = await asyncio.to_thread(cli, "queue", "list", "--sender", "zed@")
    assert second in out and first not in out
    _, out = await asyncio.to_thread(cli, "queue", "list", "--state", "bounced")
    assert "No matching messages" in out
    _, out = await asyncio.to_thread(cli, "queue", "list", "--state", "sent", "--counts")
    assert "messages: 0 incoming, 1 deferred, 0 hold" in out

    code, out = await asyncio.to_thread(cli, "queue", "show", first)
    assert code == 0
    assert "outbound:" in out
    assert (
        "  <bob@remote.test>, 3 attempt(s), via mx.remote.test[127.0.0.1]:25: "
        "deferred: 451 4.7.1 greylisted" in out
    )

    code, out = await asyncio.to_thread(cli, "queue", "hold", first, "--reason", "check it")
    assert (code, out.strip()) == (0, f"{first}: moved to hold/")
    _, out = await asyncio.to_thread(cli, "queue", "list", "--counts")
    assert "messages: 0 incoming, 1 deferred, 1 hold" in out
    _, out = await asyncio.to_thread(cli, "queue", "quarantine", "list")
    assert first in out and "reason: check it" in out
    # Held messages are not flushed or bounced: they are not in the outbound queue.
    code, _ = await asyncio.to_thread(cli, "queue", "flush", first)
    assert code == 1

    code, out = await asyncio.to_thread(cli, "queue", "release", first)
    assert code == 0 and f"{first}: released to incoming/" in out
    spool = Spool(tmp_path / "spool", recover=False)
    entry = spool.info(first)
    assert entry.queue == "incoming" and entry.envelope.remote["carol@far.test"].status == "sent"

    code, out = await asyncio.to_thread(cli, "queue", "delete", first, second)
    assert code == 0
    assert spool.list_ids() == []


async def test_flush_and_bounce_without_server_leave_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    first, _ = await make_queue(tmp_path / "spool")
    data = ["--data-dir", str(tmp_path)]
    assert await asyncio.to_thread(run_cli, ["queue", "flush", *data]) == 0
    assert await asyncio.to_thread(run_cli, ["queue", "bounce", first, *data]) == 0
    out = capsys.readouterr().out
    assert "ALL: flush requested" in out and f"{first}: bounce requested" in out
    assert "no running server" in out
    requests = sorted(p.name for p in (tmp_path / "spool" / "requests").iterdir())
    assert requests == sorted(["ALL.flush", f"{first}.bounce"])


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDnsServer]:
    with dns_server(ZONE) as server:
        yield server


@pytest.mark.slow
def test_flush_and_bounce_with_a_running_server(tmp_path: Path, dns: TestDnsServer) -> None:
    def always_451(line: str, fake: FakeSmtp) -> str | None:
        return "451 4.3.0 not now" if line.startswith("RCPT") else None

    with running(FakeSmtp(script=always_451)) as fake:
        # Retries far away: only a flush makes the second attempt happen now.
        gateway: Gateway = sending_gateway(
            tmp_path, dns.address, fake.port, relay_retry_base=600, relay_retry_max=600
        )
        gateway.start()
        try:
            queue_id = send(gateway.smtp_port, ALICE, ["bob@remote.test"], message("stuck"))
            assert wait_for(lambda: fake.rcpt_count == 1)

            def cli(*argv: str) -> str:
                done = subprocess.run(
                    [MAILGATE, "queue", *argv], env=gateway.env, capture_output=True, check=True
                )
                return done.stdout.decode()

            assert wait_for(lambda: "attempt 1, next" in cli("list"))
            assert "notified the running server" in cli("flush")
            assert wait_for(lambda: fake.rcpt_count == 2)
            assert "recipients: 0 queued, 1 deferred" in cli("list", "--counts")

            assert f"{queue_id}: bounce requested" in cli("bounce", queue_id)
            (report,) = reports(gateway, ALICE, 1)
            _, rcpt = status_blocks(report)
            assert (rcpt["Action"], rcpt["Status"]) == ("failed", "5.0.0")
            assert "returned by the operator (last: 451 4.3.0 not now)" in rcpt["Diagnostic-Code"]
            assert wait_for(lambda: "Mail queue is empty" in cli("list"))
        finally:
            gateway.stop()
