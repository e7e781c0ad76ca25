"""The spool writer process: acceptance, Maildir copies and removals made in a process of
its own, with the same results and guarantees as the spool's threads, and what happens
when that process dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_spool import MESSAGE, make_envelope

from mailgate.core.errors import DeliveryError, SpoolError
from mailgate.core.spool.delivery import DeliveryAgent
from mailgate.core.spool.maildir import MaildirStore
from mailgate.core.spool.spool import CorruptSpoolFile, NoSuchMessage, Spool
from mailgate.core.spool.writer import MAX_PAYLOAD, SpoolWriter, WriterUnavailable

from conftest import DOMAIN, Gateway

HOSTNAME = "mx.example.org"


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[SpoolWriter]:
    writer = SpoolWriter(tmp_path / "spool", tmp_path / "mail", HOSTNAME)
    yield writer
    await writer.stop()


@pytest.fixture
async def spool(tmp_path: Path, writer: SpoolWriter) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool")
    spool.writer = writer
    await writer.start()
    yield spool
    spool.writer = None
    spool.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it is gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_acceptance_through_the_writer_matches_the_threads(
    spool: Spool, writer: SpoolWriter, tmp_path: Path
) -> None:
    by_writer = make_envelope()
    await spool.store(by_writer, MESSAGE, prefix=b"Received: by writer\r\n")
    assert writer.pid is not None and writer.pid != os.getpid()
    direct = Spool(tmp_path / "direct")
    by_threads = make_envelope(queue_id=by_writer.queue_id)
    await direct.store(by_threads, MESSAGE, prefix=b"Received: by writer\r\n")
    direct.close()

    written = (spool.incoming_dir / by_writer.queue_id).read_bytes()
    assert written == (direct.incoming_dir / by_writer.queue_id).read_bytes()
    envelope, content = spool.load(by_writer.queue_id)
    assert envelope == by_writer
    assert content == b"Received: by writer\r\n" + MESSAGE
    assert os.listdir(spool.tmp_dir) == []


async def test_hold_goes_to_hold_through_the_writer(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.hold(envelope, bytearray(MESSAGE), "suspicious")
    assert (spool.hold_dir / envelope.queue_id).exists()
    assert not (spool.incoming_dir / envelope.queue_id).exists()
    held, content = spool.load(envelope.queue_id)
    assert held.quarantine_reason == "suspicious"
    assert content == MESSAGE


async def test_a_queue_id_in_use_is_refused_by_the_writer(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    with pytest.raises(SpoolError, match="already in use"):
        await spool.store(make_envelope(queue_id=envelope.queue_id), b"other\r\n")
    assert spool.load(envelope.queue_id)[1] == MESSAGE


async def test_removal_through_the_writer(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    await spool.remove(envelope.queue_id, durable=False)
    assert not (spool.incoming_dir / envelope.queue_id).exists()
    with pytest.raises(NoSuchMessage):
        await spool.remove(envelope.queue_id)


async def test_maildir_copy_through_the_writer_matches_the_store(
    writer: SpoolWriter, tmp_path: Path
) -> None:
    path = await writer.deliver(
        "bob@example.org", b"Subject: hi\r\n\r\nbody\r\n", return_path="alice@example.org"
    )
    assert path.parent == tmp_path / "mail" / "example.org" / "bob" / "new"
    assert path.read_bytes() == (
        b"Return-Path: <alice@example.org>\nDelivered-To: bob@example.org\nSubject: hi\n\nbody\n"
    )
    # The writer's name carries its own pid, so it cannot collide with the server's.
    assert f"P{writer.pid}Q" in path.name
    local = MaildirStore(tmp_path / "mail", HOSTNAME).deliver(
        "bob@example.org", b"Subject: hi\r\n\r\nbody\r\n", return_path="alice@example.org"
    )
    assert local.read_bytes() == path.read_bytes()
    binary = await writer.deliver("bob@example.org", b"a\r\nb\x00\r\n", return_path="", binary=True)
    assert binary.read_bytes().endswith(b"a\r\nb\x00\r\n")


async def test_delivery_errors_keep_their_kind(writer: SpoolWriter, tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as permanent:
        await writer.deliver("no-at-sign", b"x\r\n", return_path="")
    assert permanent.value.permanent
    # A file where the domain's directory should be: a file system error, retried later.
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "example.net").write_text("in the way")
    with pytest.raises(DeliveryError) as temporary:
        await writer.deliver("bob@example.net", b"x\r\n", return_path="")
    assert not temporary.value.permanent


async def test_concurrent_requests_are_answered_each_to_its_caller(spool: Spool) -> None:
    envelopes = [make_envelope() for _ in range(40)]
    bodies = [f"Subject: {n}\r\n\r\n".encode() + os.urandom(2000 + 97 * n) for n in range(40)]
    await asyncio.gather(*(spool.store(e, b) for e, b in zip(envelopes, bodies, strict=True)))
    for envelope, body in zip(envelopes, bodies, strict=True):
        assert spool.load(envelope.queue_id)[1] == body


async def test_a_dead_writer_fails_its_requests_and_the_next_one_starts_a_new_writer(
    spool: Spool, writer: SpoolWriter
) -> None:
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    envelope = make_envelope()
    pending = asyncio.create_task(spool.store(envelope, MESSAGE))
    await asyncio.sleep(0.2)
    assert not pending.done()  # the writer has the request and cannot answer it
    os.kill(first, signal.SIGKILL)
    with pytest.raises(WriterUnavailable, match="exited"):
        await asyncio.wait_for(pending, 10)
    # Never acknowledged; the copy it may have begun is in tmp/, which recovery clears.
    assert not (spool.incoming_dir / envelope.queue_id).exists()

    again = make_envelope()
    await spool.store(again, MESSAGE)
    assert writer.pid not in (None, first)
    assert spool.load(again.queue_id)[1] == MESSAGE
    for _ in range(50):
        if not _alive(first):
            break
        await asyncio.sleep(0.1)
    assert not _alive(first)


async def test_big_messages_bypass_the_writer(spool: Spool, writer: SpoolWriter) -> None:
    pid = writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a request sent to it now would wait
    try:
        envelope = make_envelope()
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (MAX_PAYLOAD // 1000 + 1)
        await asyncio.wait_for(spool.store(envelope, big), 30)
        assert spool.load(envelope.queue_id)[1] == big
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_stop_finishes_requests_then_ends_the_process(
    spool: Spool, writer: SpoolWriter
) -> None:
    pid = writer.pid
    assert pid is not None
    envelopes = [make_envelope() for _ in range(10)]
    stores = [asyncio.create_task(spool.store(e, MESSAGE)) for e in envelopes]
    await asyncio.sleep(0)
    await writer.stop()
    await asyncio.gather(*stores)
    assert all((spool.incoming_dir / e.queue_id).exists() for e in envelopes)
    assert writer.pid is None
    assert not _alive(pid)
    with pytest.raises(WriterUnavailable, match="stopped"):
        await spool.store(make_envelope(), MESSAGE)


class _Users:
    def resolve(self, recipient: str) -> list[str] | None:
        if recipient == "team@example.org":
            return ["bob@example.org", "carol@example.org"]
        return [recipient] if recipient.endswith("@example.org") else None

    def user_exists(self, address: str) -> bool:
        return address.endswith("@example.org")


async def test_local_delivery_writes_its_copies_through_the_writer(
    spool: Spool, writer: SpoolWriter, tmp_path: Path
) -> None:
    agent = DeliveryAgent(
        spool, MaildirStore(tmp_path / "mail", HOSTNAME), _Users(), scan_interval=0
    )
    await agent.start()
    try:
        envelope = make_envelope(rcpt_tos=["team@example.org"], rcpt_options=[[]])
        await spool.store(envelope, MESSAGE)
        agent.submit(envelope.queue_id, stored=(envelope, MESSAGE))
        for _ in range(200):
            if not spool.list_ids():
                break
            await asyncio.sleep(0.02)
        assert spool.list_ids() == []
    finally:
        await agent.stop()
    for user in ("bob", "carol"):
        new = tmp_path / "mail" / "example.org" / user / "new"
        (name,) = os.listdir(new)
        assert f"P{writer.pid}Q" in name
        assert (new / name).read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))


def _writer_pids(server: int) -> list[int]:
    children: list[int] = []
    for task in os.listdir(f"/proc/{server}/task"):
        with open(f"/proc/{server}/task/{task}/children") as listing:
            children += [int(pid) for pid in listing.read().split()]
    found = []
    for pid in children:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/cmdline", "rb") as cmd:
            if b"mailgate.core.spool.writer" in cmd.read():
                found.append(pid)
    return found


def _send(gateway: Gateway, subject: str) -> None:
    with gateway.smtp() as client:
        client.sendmail(
            "someone@example.net",
            [f"bob@{DOMAIN}"],
            f"Subject: {subject}\r\n\r\nbody\r\n".encode(),
        )


def test_the_server_runs_a_writer_and_replaces_one_that_dies(fresh_gateway: Gateway) -> None:
    fresh_gateway.start()
    assert fresh_gateway.process is not None
    (writer,) = _writer_pids(fresh_gateway.process.pid)
    # In a session of its own, out of reach of a Ctrl-C meant for the server.
    assert os.getsid(writer) == writer != os.getsid(fresh_gateway.process.pid)
    _send(fresh_gateway, "first")
    assert len(fresh_gateway.wait_delivered(f"bob@{DOMAIN}", 1)) == 1

    os.kill(writer, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "spool writer exited" not in fresh_gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "spool writer exited; the next request starts a new one" in fresh_gateway.log()
    # No request was in flight, so none fails: the next message starts a new writer.
    _send(fresh_gateway, "second")
    delivered = fresh_gateway.wait_delivered(f"bob@{DOMAIN}", 2)
    assert [b"Subject: second" in message for message in delivered].count(True) == 1
    (replacement,) = _writer_pids(fresh_gateway.process.pid)
    assert replacement != writer
    assert f"spool writer started (pid {replacement})" in fresh_gateway.log()

    assert fresh_gateway.stop() == 0
    for _ in range(100):
        if not _alive(replacement):
            break
        time.sleep(0.05)
    assert not _alive(replacement), "the writer outlived the server"


def test_without_a_writer_the_server_writes_itself(fresh_gateway: Gateway) -> None:
    fresh_gateway.env["MAILGATE_SPOOL_WRITER_THREADS"] = "0"
    fresh_gateway.start()
    assert fresh_gateway.process is not None
    assert _writer_pids(fresh_gateway.process.pid) == []
    _send(fresh_gateway, "threads")
    (message,) = fresh_gateway.wait_delivered(f"bob@{DOMAIN}", 1)
    assert b"Subject: threads" in message
    assert (
        f"P{fresh_gateway.process.pid}Q"
        in os.listdir(fresh_gateway.maildir(f"bob@{DOMAIN}") / "new")[0]
    )


async def test_stop_signals_do_not_end_the_writer(spool: Spool, writer: SpoolWriter) -> None:
    """A group-wide SIGTERM or SIGINT (systemd stopping the unit, Ctrl-C) reaches the
    writer too; it keeps serving until the server closes its socket."""
    pid = writer.pid
    assert pid is not None
    await spool.store(make_envelope(), MESSAGE)  # the writer is up, its handlers set
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(pid, signum)
    await asyncio.sleep(0.2)
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    assert writer.pid == pid
    assert spool.load(envelope.queue_id)[1] == MESSAGE


def test_a_stop_sent_to_every_process_still_lets_open_sessions_finish(
    fresh_gateway: Gateway,
) -> None:
    """systemd stops a unit by signalling each of its processes: the writer must outlast
    the server's grace period, in which open sessions still get their 250."""
    fresh_gateway.start()
    assert fresh_gateway.process is not None
    server = fresh_gateway.process.pid
    (writer,) = _writer_pids(server)
    client = fresh_gateway.smtp()
    client.ehlo("client.example")
    client.mail("someone@example.net")
    client.rcpt(f"bob@{DOMAIN}")
    for pid in (server, writer):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "shutting down" not in fresh_gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "shutting down" in fresh_gateway.log()
    code, reply = client.data(b"Subject: during the stop\r\n\r\nbody\r\n")
    assert code == 250, reply
    client.quit()
    assert fresh_gateway.process.wait(30) == 0
    queue_id = reply.decode().rsplit(" ", 1)[-1]
    spooled = fresh_gateway.data_dir / "spool" / "incoming" / queue_id
    delivered = fresh_gateway.delivered(f"bob@{DOMAIN}")
    assert spooled.exists() or any(b"during the stop" in m for m in delivered)
    assert not _alive(writer)


async def test_defer_and_updates_through_the_writer(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    envelope.relay["carol@example.org"] = "carol@example.org"
    envelope.attempts = 1
    await spool.defer(envelope.queue_id, envelope)
    assert not (spool.incoming_dir / envelope.queue_id).exists()
    moved, content = spool.load(envelope.queue_id)
    assert spool.queue_of(envelope.queue_id) == "deferred"
    assert moved == envelope and content == MESSAGE

    envelope.delivered.append("bob@example.org")
    await spool.update_envelope(envelope.queue_id, envelope)
    assert spool.load(envelope.queue_id) == (envelope, MESSAGE)
    assert spool.queue_of(envelope.queue_id) == "deferred"

    held = make_envelope()
    await spool.hold(held, MESSAGE, "suspicious")
    held.quarantine_reason = "reviewed"
    await spool.update_envelope(held.queue_id, held)
    assert spool.load(held.queue_id)[0].quarantine_reason == "reviewed"
    assert spool.queue_of(held.queue_id) == "hold"
    assert os.listdir(spool.tmp_dir) == []


async def test_the_writers_errors_keep_their_type(spool: Spool) -> None:
    missing = make_envelope()
    with pytest.raises(NoSuchMessage):
        await spool.defer(missing.queue_id, missing)
    with pytest.raises(NoSuchMessage):
        await spool.update_envelope(missing.queue_id, missing)
    broken = make_envelope()
    (spool.incoming_dir / broken.queue_id).write_bytes(b"not a spool file\n")
    with pytest.raises(CorruptSpoolFile) as corrupt:
        await spool.defer(broken.queue_id, broken)
    assert corrupt.value.path == spool.incoming_dir / broken.queue_id
    assert str(corrupt.value).startswith(str(spool.incoming_dir / broken.queue_id))
