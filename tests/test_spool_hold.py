"""The hold queue of the spool: hold() durability, release() exactly once, crash recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_spool import MESSAGE, FsyncLog, make_envelope

from mailgate.core.errors import SpoolError
from mailgate.core.spool.envelope import SpoolEnvelope
from mailgate.core.spool.spool import ACTIVE_QUEUES, NoSuchMessage, Spool

REASON = "virus found: Eicar-Test-Signature"


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.close()


class Crash(BaseException):
    """Stands in for the process dying at a chosen point (nothing may catch it)."""


# -- the envelope ----------------------------------------------------------------------


def test_envelope_without_hold_fields_loads_and_is_written_without_them() -> None:
    # A file from before the hold queue, and one a message that was never held gets now:
    # the same JSON, so older versions can still read it after a downgrade.
    old = make_envelope()
    data = json.loads(old.to_json())
    assert not {"quarantine_reason", "held_at", "released_at"} & set(data)
    again = SpoolEnvelope.from_json(json.dumps(data))
    assert again.quarantine_reason is None and again.held_at is None
    assert again.released_at is None


def test_envelope_hold_fields_round_trip() -> None:
    envelope = make_envelope(quarantine_reason="spam \u2603\n", held_at=5, released_at=7.5)
    again = SpoolEnvelope.from_json(envelope.to_json())
    assert again == envelope
    assert isinstance(again.held_at, float)


@pytest.mark.parametrize(
    "extra",
    ['"quarantine_reason": 3', '"held_at": "now"', '"released_at": true', '"held_at": []'],
)
def test_envelope_refuses_bad_hold_fields(extra: str) -> None:
    text = '{"v": 1, "queue_id": "A", "mail_from": "", "rcpt_tos": [], ' + extra + "}"
    with pytest.raises(SpoolError):
        SpoolEnvelope.from_json(text)


# -- hold ------------------------------------------------------------------------------


async def test_hold_stores_into_hold_with_reason_and_time(spool: Spool) -> None:
    envelope = make_envelope()
    before = time.time()
    await spool.hold(envelope, MESSAGE, REASON)
    assert envelope.quarantine_reason == REASON
    assert envelope.held_at is not None and before <= envelope.held_at <= time.time()

    loaded, content = spool.load(envelope.queue_id)
    assert loaded == envelope and content == MESSAGE
    entry = spool.info(envelope.queue_id)
    assert entry.queue == "hold" and entry.path == spool.hold_dir / envelope.queue_id
    assert spool.queue_of(envelope.queue_id) == "hold"
    assert spool.list_ids("hold") == [envelope.queue_id]
    assert spool.list_ids() == [envelope.queue_id]
    assert spool.list_ids("incoming") == spool.list_ids(ACTIVE_QUEUES) == []
    assert os.listdir(spool.tmp_dir) == []
    assert stat.S_IMODE(entry.path.stat().st_mode) == 0o600


async def test_hold_fsyncs_file_then_hold_directory_before_returning(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncLog(monkeypatch)
    envelope = make_envelope()
    await spool.hold(envelope, MESSAGE, REASON)
    done = fsyncs.mark("done", envelope.queue_id)
    (link,) = fsyncs.of("link", str(spool.hold_dir / envelope.queue_id))
    file_syncs = fsyncs.of("file")
    assert len(file_syncs) == 1 and file_syncs[0] < link
    starts = fsyncs.of("dir-start", str(spool.hold_dir))
    ends = fsyncs.of("dir-end", str(spool.hold_dir))
    assert len(starts) == 1 and link < starts[0] < ends[0] < done
    assert not fsyncs.of("dir-start", str(spool.incoming_dir))


async def test_concurrent_holds_share_directory_fsyncs(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncLog(monkeypatch, dir_delay=0.02)
    envelopes = [make_envelope() for _ in range(40)]
    done: dict[str, int] = {}

    async def one(envelope: SpoolEnvelope) -> None:
        await spool.hold(envelope, MESSAGE, REASON)
        done[envelope.queue_id] = fsyncs.mark("done", envelope.queue_id)

    await asyncio.gather(*(one(e) for e in envelopes))
    starts = fsyncs.of("dir-start", str(spool.hold_dir))
    ends = fsyncs.of("dir-end", str(spool.hold_dir))
    assert 1 <= len(starts) < len(envelopes) // 2
    batches = list(zip(starts, ends, strict=True))
    for envelope in envelopes:
        (link,) = fsyncs.of("link", str(spool.hold_dir / envelope.queue_id))
        assert any(link < s and e < done[envelope.queue_id] for s, e in batches)


async def test_held_message_survives_reopen(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool")
    envelope = make_envelope()
    await first.hold(envelope, MESSAGE, REASON)
    first.close()
    again = Spool(tmp_path / "spool")  # recovery leaves hold/ alone
    assert again.list_ids("hold") == [envelope.queue_id]
    assert again.load(envelope.queue_id) == (envelope, MESSAGE)


async def test_spool_creates_hold_directory(tmp_path: Path) -> None:
    Spool(tmp_path / "spool")
    assert stat.S_IMODE((tmp_path / "spool" / "hold").stat().st_mode) == 0o700


async def test_queue_id_is_unique_across_hold_and_the_active_queues(spool: Spool) -> None:
    held = make_envelope()
    await spool.hold(held, b"held", REASON)
    with pytest.raises(SpoolError, match="already in use in hold/"):
        await spool.store(held, b"second")
    stored = make_envelope()
    await spool.store(stored, b"stored")
    with pytest.raises(SpoolError, match="already in use in incoming/"):
        await spool.hold(stored, b"second", REASON)
    assert spool.load(held.queue_id)[1] == b"held"
    assert spool.load(stored.queue_id)[1] == b"stored"
    assert os.listdir(spool.tmp_dir) == []


async def test_held_messages_are_invisible_to_the_delivery_path(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.hold(envelope, MESSAGE, REASON)
    with pytest.raises(NoSuchMessage):
        spool.load(envelope.queue_id, include_held=False)
    with pytest.raises(NoSuchMessage):
        spool.info(envelope.queue_id, include_held=False)
    with pytest.raises(NoSuchMessage):  # defer() must never pull a message out of hold/
        await spool.defer(envelope.queue_id, envelope)
    assert spool.list_ids("hold") == [envelope.queue_id]


async def test_remove_deletes_a_held_message(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    envelope = make_envelope()
    await spool.hold(envelope, MESSAGE, REASON)
    fsyncs = FsyncLog(monkeypatch)
    await spool.remove(envelope.queue_id)
    assert fsyncs.of("dir-end", str(spool.hold_dir))
    assert spool.list_ids() == []
    with pytest.raises(NoSuchMessage):
        await spool.remove(envelope.queue_id)


# -- release ---------------------------------------------------------------------------


async def test_release_moves_to_incoming_keeping_the_history(spool: Spool) -> None:
    envelope = make_envelope()
    body = MESSAGE * 500
    await spool.hold(envelope, body, REASON)
    before = time.time()
    await spool.release(envelope.queue_id)

    assert spool.list_ids("hold") == []
    assert spool.list_ids("incoming") == spool.list_ids() == [envelope.queue_id]
    assert os.listdir(spool.hold_dir) == [] and os.listdir(spool.tmp_dir) == []
    loaded, content = spool.load(envelope.queue_id, include_held=False)
    assert content == body
    assert loaded.quarantine_reason == REASON and loaded.held_at == envelope.held_at
    assert loaded.released_at is not None and before <= loaded.released_at <= time.time()
    assert spool.info(envelope.queue_id).queue == "incoming"


async def test_release_fsyncs_incoming_before_unlinking_the_held_copy(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    envelope = make_envelope()
    await spool.hold(envelope, MESSAGE, REASON)
    fsyncs = FsyncLog(monkeypatch)
    held = str(spool.hold_dir / envelope.queue_id)
    real_unlink = os.unlink

    def unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        real_unlink(path)
        if os.fspath(path) == held:
            fsyncs.mark("unlink-held", held)

    monkeypatch.setattr(os, "unlink", unlink)
    await spool.release(envelope.queue_id)
    done = fsyncs.mark("done", envelope.queue_id)

    (link,) = fsyncs.of("link", str(spool.incoming_dir / envelope.queue_id))
    (file_sync,) = fsyncs.of("file")
    (incoming_start,) = fsyncs.of("dir-start", str(spool.incoming_dir))
    (incoming_end,) = fsyncs.of("dir-end", str(spool.incoming_dir))
    (unlinked,) = fsyncs.of("unlink-held", held)
    (hold_start,) = fsyncs.of("dir-start", str(spool.hold_dir))
    (hold_end,) = fsyncs.of("dir-end", str(spool.hold_dir))
    assert file_sync < link < incoming_start < incoming_end < unlinked
    assert unlinked < hold_start < hold_end < done


async def test_release_refuses_what_is_not_held(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    with pytest.raises(SpoolError, match=r"not on hold \(it is in incoming/\)"):
        await spool.release(envelope.queue_id)
    with pytest.raises(NoSuchMessage):
        await spool.release(make_envelope().queue_id)
    with pytest.raises(SpoolError, match="invalid queue id"):
        await spool.release("../incoming")
    assert spool.list_ids("incoming") == [envelope.queue_id]


async def test_second_release_is_refused(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.hold(envelope, MESSAGE, REASON)
    await spool.release(envelope.queue_id)
    with pytest.raises(SpoolError, match="not on hold"):
        await spool.release(envelope.queue_id)
    assert spool.list_ids() == [envelope.queue_id]


async def crash_between_release_steps(
    spool: Spool, queue_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Release ``queue_id`` and "die" after the incoming/ copy is durable, before the unlink."""
    real_unlink = os.unlink
    held = str(spool.hold_dir / queue_id)

    def unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        if os.fspath(path) == held:
            raise Crash
        real_unlink(path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", unlink)
        with pytest.raises(Crash):
            await spool.release(queue_id)
    spool.close()


async def test_crash_between_release_steps_is_settled_without_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "spool"
    first = Spool(root)
    envelope = make_envelope()
    await first.hold(envelope, MESSAGE, REASON)
    await crash_between_release_steps(first, envelope.queue_id, monkeypatch)
    queue_id = envelope.queue_id
    assert (root / "hold" / queue_id).exists() and (root / "incoming" / queue_id).exists()

    # Before any recovery, readers already count the message once, as released.
    viewer = Spool(root, recover=False)
    assert viewer.list_ids("hold") == []
    assert viewer.list_ids() == viewer.list_ids("incoming") == [queue_id]
    assert viewer.info(queue_id).queue == "incoming"
    assert viewer.load(queue_id)[0].released_at is not None

    owner = Spool(root)
    assert os.listdir(root / "hold") == []
    assert owner.list_ids() == [queue_id]
    loaded, content = owner.load(queue_id, include_held=False)
    assert content == MESSAGE and loaded.released_at is not None


async def test_release_repeated_after_a_crash_only_finishes_the_cleanup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "spool"
    first = Spool(root)
    envelope = make_envelope()
    await first.hold(envelope, MESSAGE, REASON)
    await crash_between_release_steps(first, envelope.queue_id, monkeypatch)
    released = (root / "incoming" / envelope.queue_id).read_bytes()

    viewer = Spool(root, recover=False)  # the operator retries while the server runs
    await viewer.release(envelope.queue_id)
    viewer.close()
    assert os.listdir(root / "hold") == []
    assert (root / "incoming" / envelope.queue_id).read_bytes() == released


async def test_crash_after_release_then_delivered_removes_every_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server delivers the released copy before anyone cleans up hold/: removing the
    # delivered message must take the leftover too, or a later release would repeat it.
    root = tmp_path / "spool"
    first = Spool(root)
    envelope = make_envelope()
    await first.hold(envelope, MESSAGE, REASON)
    await crash_between_release_steps(first, envelope.queue_id, monkeypatch)
    server = Spool(root, recover=False)
    await server.remove(envelope.queue_id)
    server.close()
    assert Spool(root).list_ids() == []
    assert os.listdir(root / "hold") == []


async def test_crash_after_release_then_deferred_is_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "spool"
    first = Spool(root)
    envelope = make_envelope()
    await first.hold(envelope, MESSAGE, REASON)
    await crash_between_release_steps(first, envelope.queue_id, monkeypatch)
    server = Spool(root, recover=False)
    loaded, _ = server.load(envelope.queue_id, include_held=False)
    loaded.attempts = 1
    await server.defer(envelope.queue_id, loaded)
    server.close()

    assert Spool(root, recover=False).list_ids("hold") == []
    owner = Spool(root)
    assert owner.list_ids() == owner.list_ids("deferred") == [envelope.queue_id]
    assert os.listdir(root / "hold") == [] and os.listdir(root / "incoming") == []


RELEASE_CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from mailgate.core.spool.spool import Spool

    async def main():
        spool = Spool(Path(sys.argv[1]), recover=False)
        for queue_id in spool.list_ids("hold"):
            await spool.release(queue_id)
            sys.stdout.write(queue_id + "\\n")
            sys.stdout.flush()

    asyncio.run(main())
    """
)


async def test_kill_9_during_releases_neither_loses_nor_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    body = MESSAGE * 200
    envelopes = [make_envelope() for _ in range(300)]
    await asyncio.gather(*(spool.hold(e, body, REASON) for e in envelopes))
    ids = [e.queue_id for e in envelopes]
    spool.close()

    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RELEASE_CRASH_SCRIPT, str(root), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    acknowledged = [(await child.stdout.readline()).decode().strip() for _ in range(20)]
    child.send_signal(signal.SIGKILL)
    rest, _ = await child.communicate()
    acknowledged += rest.decode().split()
    assert child.returncode == -signal.SIGKILL
    assert len(acknowledged) < len(ids), "the child finished before it was killed"

    owner = Spool(root)
    incoming, held = owner.list_ids("incoming"), owner.list_ids("hold")
    assert set(acknowledged) <= set(incoming)
    assert sorted(incoming + held) == sorted(ids)  # each message once, none lost
    assert not set(os.listdir(root / "incoming")) & set(os.listdir(root / "hold"))
    assert os.listdir(root / "tmp") == []
    for queue_id in incoming:
        envelope, content = owner.load(queue_id)
        assert content == body and envelope.released_at is not None
