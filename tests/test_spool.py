"""The durable spool: round trips, fsync discipline, group commit, recovery, corruption, CLI."""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.core.errors import SpoolError
from mailgate.core.spool import cli as queue_cli
from mailgate.core.spool.envelope import SpoolEnvelope
from mailgate.core.spool.queue_id import ALPHABET, QUEUE_ID_LENGTH, new_queue_id
from mailgate.core.spool.spool import CorruptSpoolFile, NoSuchMessage, Spool

ALL_BYTES = bytes(range(256))
MESSAGE = (
    b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: caf\xc3\xa9\r\n\r\n"
    b"8-bit body \xe9\xff\x00 and every byte:\r\n" + ALL_BYTES + b"\r\n"
)


def make_envelope(**changes: object) -> SpoolEnvelope:
    envelope = SpoolEnvelope(
        queue_id=new_queue_id(),
        mail_from="alice@example.org",
        rcpt_tos=["bob@example.org", "carol@example.org"],
        received_at=1_700_000_000.25,
        client_address="192.0.2.7",
        client_name="mx.example.net",
        helo="mx.example.net",
        auth_user=None,
        mail_options=["BODY=8BITMIME", "SIZE=1234"],
        rcpt_options=[["NOTIFY=FAILURE"], []],
        body_type="8BITMIME",
        smtputf8=False,
    )
    for name, value in changes.items():
        setattr(envelope, name, value)
    return envelope


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.close()


# -- queue ids -------------------------------------------------------------------------


def test_queue_ids_are_unique_short_safe_and_time_ordered() -> None:
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == QUEUE_ID_LENGTH == 16 for i in ids)
    assert set("".join(ids)) <= set(ALPHABET)
    assert set(ALPHABET) <= set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_queue_ids_from_threads_do_not_collide() -> None:
    found: list[list[str]] = []

    def make() -> None:
        found.append([new_queue_id() for _ in range(5000)])

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for chunk in found for i in chunk]
    assert len(set(everything)) == len(everything) == 20000


# -- envelope --------------------------------------------------------------------------


def test_envelope_json_round_trip_with_progress_and_odd_text() -> None:
    envelope = make_envelope(
        mail_from="j\u00f6rg@b\u00fccher.example",
        smtputf8=True,
        auth_user="alice@example.org",
        attempts=3,
        next_attempt=1_700_000_600.5,
        done={"bob@example.org": "sent"},
        delivered=["bob@example.org"],
        relay={"x@remote.example": "carol@example.org"},
        bounced={"z@example.org": "5.1.1 unknown user"},
        errors={"carol@example.org": "disk full"},
        helo="bad\udcffbyte",
    )
    again = SpoolEnvelope.from_json(envelope.to_json())
    assert again == envelope
    assert again.helo == "bad\udcffbyte"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"v": 99, "queue_id": "A", "mail_from": "", "rcpt_tos": []}',
        '{"v": 1, "queue_id": "A", "mail_from": "", "rcpt_tos": "bob"}',
        '{"v": 1, "queue_id": "A", "mail_from": "", "rcpt_tos": [], "body_type": "X"}',
        '{"v": 1, "queue_id": "A", "mail_from": "", "rcpt_tos": [], "body_type": []}',
        '{"v": 1, "queue_id": "A", "mail_from": "", "rcpt_tos": [], "surprise": 1}',
        '{"v": 1, "queue_id": "A", "rcpt_tos": []}',
        '{"v": 1, "queue_id": "A", "mail_from": "", "rcpt_tos": [], "done": {"b": "odd"}}',
    ],
)
def test_envelope_from_json_refuses_bad_data(text: str) -> None:
    with pytest.raises(SpoolError):
        SpoolEnvelope.from_json(text)


# -- store and load --------------------------------------------------------------------


async def test_store_load_round_trip_keeps_every_byte(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    loaded, content = spool.load(envelope.queue_id)
    assert content == MESSAGE
    assert loaded == envelope
    assert spool.list_ids() == [envelope.queue_id]
    assert os.listdir(spool.tmp_dir) == []
    path = spool.incoming_dir / envelope.queue_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.incoming_dir.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("recipients", "size"),
    [(2, 10), (2, 256 * 1024), (2, 3 * 1024 * 1024), (12000, 10), (12000, 1024 * 1024)],
)
async def test_load_reads_envelopes_and_messages_of_any_size(
    spool: Spool, recipients: int, size: int
) -> None:
    # 12,000 recipients make an envelope larger than load()'s first read; the message sizes
    # end inside it, at its edge and beyond it. The Received prefix is stored in front.
    rcpts = [f"user{n}@example.org" for n in range(recipients)]
    envelope = make_envelope(rcpt_tos=rcpts, rcpt_options=[[] for _ in rcpts])
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    await spool.store(envelope, bytearray(body), prefix=b"Received: by test\r\n")
    loaded, content = spool.load(envelope.queue_id)
    assert loaded == envelope
    assert content == b"Received: by test\r\n" + body


async def test_big_message_is_written_in_flushed_steps(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushes: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        flushes.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    small, big = make_envelope(), make_envelope()
    await spool.store(small, b"x" * 100_000)
    assert flushes == []  # a small message is written at once, then fsync'd
    body = os.urandom(5 * 1024 * 1024 + 123)
    await spool.store(big, body)
    # Every step (1 MiB, the last one shorter) is flushed before the next is written.
    steps = [b - a for a, b in itertools.pairwise([0, *flushes])]
    assert steps[:-1] == [1024 * 1024] * 5 and 0 < steps[-1] < 1024 * 1024
    assert spool.load(big.queue_id)[1] == body


async def test_store_accepts_memoryview_and_binary_content(spool: Spool) -> None:
    body = bytearray(os.urandom(300_000)) + b"\r\n.\r\n" + ALL_BYTES
    envelope = make_envelope(body_type="BINARYMIME")
    await spool.store(envelope, memoryview(body))
    _, content = spool.load(envelope.queue_id)
    assert content == bytes(body)
    entry = spool.info(envelope.queue_id)
    assert entry.size == len(body)
    assert entry.queue == "incoming"


async def test_empty_message_round_trips(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, b"")
    assert spool.load(envelope.queue_id)[1] == b""


class FsyncLog:
    """Records every fsync (which path) and every link into incoming/, in one order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dir_delay: float = 0.0) -> None:
        self.events: list[tuple[int, str, str]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        real_fsync, real_link = os.fsync, os.link

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            self._add("dir-start" if is_dir else "file", path)
            if is_dir and dir_delay:
                time.sleep(dir_delay)  # widen the window in which stores pile up
            real_fsync(fd)
            if is_dir:
                self._add("dir-end", path)

        def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            real_link(src, dst)
            self._add("link", os.fspath(dst))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "link", link)

    def _add(self, kind: str, path: str) -> None:
        with self._lock:
            self.events.append((next(self._seq), kind, path))

    def mark(self, kind: str, path: str) -> int:
        with self._lock:
            seq = next(self._seq)
            self.events.append((seq, kind, path))
            return seq

    def of(self, kind: str, path: str | None = None) -> list[int]:
        return [s for s, k, p in self.events if k == kind and (path is None or p == path)]


async def test_store_fsyncs_file_then_directory_before_returning(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncLog(monkeypatch)
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    done = fsyncs.mark("done", envelope.queue_id)
    final = str(spool.incoming_dir / envelope.queue_id)
    (link,) = fsyncs.of("link", final)
    file_syncs = fsyncs.of("file")
    assert len(file_syncs) == 1 and file_syncs[0] < link
    dir_ends = fsyncs.of("dir-end", str(spool.incoming_dir))
    dir_starts = fsyncs.of("dir-start", str(spool.incoming_dir))
    assert len(dir_starts) == 1 and link < dir_starts[0] < dir_ends[0] < done


async def test_group_commit_shares_directory_fsyncs(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncLog(monkeypatch, dir_delay=0.02)
    envelopes = [make_envelope() for _ in range(60)]
    done: dict[str, int] = {}

    async def one(envelope: SpoolEnvelope) -> None:
        await spool.store(envelope, MESSAGE)
        done[envelope.queue_id] = fsyncs.mark("done", envelope.queue_id)

    await asyncio.gather(*(one(e) for e in envelopes))

    incoming = str(spool.incoming_dir)
    starts = fsyncs.of("dir-start", incoming)
    ends = fsyncs.of("dir-end", incoming)
    assert len(fsyncs.of("file")) == len(envelopes)  # data fsync stays per file
    assert 1 <= len(starts) < len(envelopes) // 2  # directory fsyncs are shared
    batches = list(zip(starts, ends, strict=True))
    for envelope in envelopes:
        (link,) = fsyncs.of("link", str(spool.incoming_dir / envelope.queue_id))
        # Some directory fsync began after this rename and ended before store() returned.
        assert any(link < start and end < done[envelope.queue_id] for start, end in batches)
    assert sorted(spool.list_ids()) == sorted(e.queue_id for e in envelopes)


async def test_directory_fsync_failure_fails_the_stores_it_covers(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SpoolError, match="fsync directory"):
        await spool.store(make_envelope(), MESSAGE)


async def test_store_failure_leaves_nothing_behind(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(SpoolError, match="No space left"):
        await spool.store(make_envelope(), MESSAGE)
    assert os.listdir(spool.tmp_dir) == []
    assert spool.list_ids() == []


async def test_store_refuses_a_queue_id_in_use(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, b"first")
    with pytest.raises(SpoolError, match="already in use"):
        await spool.store(envelope, b"second")
    assert spool.load(envelope.queue_id)[1] == b"first"
    assert os.listdir(spool.tmp_dir) == []


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 65, "A.B"])
async def test_queue_ids_never_become_paths(spool: Spool, bad: str) -> None:
    with pytest.raises(SpoolError, match="invalid queue id"):
        spool.load(bad)
    with pytest.raises(SpoolError, match="invalid queue id"):
        await spool.remove(bad)
    with pytest.raises(SpoolError, match="invalid queue id"):
        await spool.store(make_envelope(queue_id=bad), b"x")


# -- progress, defer, remove -----------------------------------------------------------


async def test_update_envelope_rewrites_atomically_and_keeps_content(spool: Spool) -> None:
    envelope = make_envelope()
    body = MESSAGE * 1000
    await spool.store(envelope, body)
    envelope.delivered.append("bob@example.org")
    envelope.done["bob@example.org"] = "sent"
    envelope.attempts = 1
    await spool.update_envelope(envelope.queue_id, envelope)
    loaded, content = spool.load(envelope.queue_id)
    assert loaded.delivered == ["bob@example.org"]
    assert loaded.done == {"bob@example.org": "sent"}
    assert content == body
    assert os.listdir(spool.tmp_dir) == []


async def test_update_envelope_without_copy_file_range(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    envelope = make_envelope()
    body = os.urandom(3 * 1024 * 1024 + 17)
    await spool.store(envelope, body)
    envelope.attempts = 2
    await spool.update_envelope(envelope.queue_id, envelope)
    loaded, content = spool.load(envelope.queue_id)
    assert loaded.attempts == 2 and content == body


async def test_update_envelope_of_a_removed_message_does_not_resurrect_it(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    await spool.remove(envelope.queue_id)
    with pytest.raises(NoSuchMessage):
        await spool.update_envelope(envelope.queue_id, envelope)
    assert spool.list_ids() == []


async def test_update_envelope_refuses_a_different_queue_id(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    with pytest.raises(SpoolError, match="names queue id"):
        await spool.update_envelope(envelope.queue_id, make_envelope())


async def test_defer_moves_to_deferred_then_remove(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    envelope.next_attempt = 1234.0
    await spool.defer(envelope.queue_id, envelope)
    assert spool.list_ids("incoming") == []
    assert spool.list_ids("deferred") == [envelope.queue_id]
    entry = spool.info(envelope.queue_id)
    assert entry.queue == "deferred" and entry.envelope.next_attempt == 1234.0
    # Deferring again updates in place.
    envelope.attempts = 5
    await spool.defer(envelope.queue_id, envelope)
    assert spool.load(envelope.queue_id)[0].attempts == 5
    await spool.remove(envelope.queue_id)
    assert spool.list_ids() == []
    with pytest.raises(NoSuchMessage):
        await spool.remove(envelope.queue_id)
    with pytest.raises(NoSuchMessage):
        spool.load(envelope.queue_id)


async def test_remove_fsyncs_the_directory(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    fsyncs = FsyncLog(monkeypatch)
    await spool.remove(envelope.queue_id)
    assert fsyncs.of("dir-end", str(spool.incoming_dir))


# -- recovery and corruption -----------------------------------------------------------


async def test_open_cleans_tmp_and_settles_half_done_defer(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    first = Spool(root)
    envelope = make_envelope()
    await first.store(envelope, MESSAGE)
    first.close()
    # What a crash leaves: a half-written file in tmp/, and a message copied to deferred/
    # whose incoming/ original was not yet unlinked.
    (root / "tmp" / "HALFWRITTEN.1.0").write_bytes(b"MGSPOOL1 99")
    original = (root / "incoming" / envelope.queue_id).read_bytes()
    envelope.attempts = 4
    await first.defer(envelope.queue_id, envelope)
    (root / "incoming" / envelope.queue_id).write_bytes(original)
    first.close()

    viewer = Spool(root, recover=False)
    assert os.listdir(root / "tmp") == ["HALFWRITTEN.1.0"]  # a viewer touches nothing
    assert viewer.info(envelope.queue_id).queue == "deferred"

    owner = Spool(root)
    assert os.listdir(root / "tmp") == []
    assert owner.list_ids("incoming") == []
    assert owner.load(envelope.queue_id)[0].attempts == 4


async def test_spool_creates_its_directories(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "spool"
    Spool(root)
    for name in ("tmp", "incoming", "deferred", "corrupt"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o700


def test_viewer_of_a_missing_spool_sees_an_empty_queue(tmp_path: Path) -> None:
    assert Spool(tmp_path / "nothing", recover=False).list_ids() == []
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"garbage\n" + data, id="bad-magic"),
        pytest.param(lambda data: data[:-10], id="truncated-message"),
        pytest.param(lambda data: data[:40], id="truncated-envelope"),
        pytest.param(lambda data: data + b"extra", id="trailing-bytes"),
        pytest.param(lambda data: data.replace(b'"v":1', b'"v":"x"'), id="bad-version"),
        pytest.param(lambda data: data.replace(b"{", b"[", 1), id="bad-json"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"MGSPOOL1 abc 3\n", id="bad-lengths"),
    ],
)
async def test_corrupt_file_raises_spool_error_naming_the_file(
    spool: Spool, damage: object
) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    path = spool.incoming_dir / envelope.queue_id
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CorruptSpoolFile) as caught:
        spool.load(envelope.queue_id)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, SpoolError)
    with pytest.raises(CorruptSpoolFile):
        spool.info(envelope.queue_id)
    with pytest.raises(CorruptSpoolFile):
        await spool.update_envelope(envelope.queue_id, envelope)


async def test_file_under_another_queue_id_is_corrupt(spool: Spool) -> None:
    envelope = make_envelope()
    await spool.store(envelope, MESSAGE)
    os.rename(spool.incoming_dir / envelope.queue_id, spool.incoming_dir / "OTHERID")
    with pytest.raises(CorruptSpoolFile, match="names queue id"):
        spool.load("OTHERID")


async def test_quarantine_moves_to_corrupt(spool: Spool) -> None:
    (spool.incoming_dir / "BROKEN1").write_bytes(b"junk")
    await spool.quarantine("BROKEN1")
    assert spool.list_ids() == []
    assert (spool.corrupt_dir / "BROKEN1").read_bytes() == b"junk"


CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from mailgate.core.spool.envelope import SpoolEnvelope
    from mailgate.core.spool.queue_id import new_queue_id
    from mailgate.core.spool.spool import Spool

    async def main():
        spool = Spool(Path(sys.argv[1]))
        body = b"Subject: crash\\r\\n\\r\\n" + bytes(range(256)) * 400

        async def writer():
            while True:
                env = SpoolEnvelope(new_queue_id(), "a@example.org", ["b@example.org"])
                await spool.store(env, body)
                sys.stdout.write(env.queue_id + "\\n")
                sys.stdout.flush()

        await asyncio.gather(*(writer() for _ in range(8)))

    asyncio.run(main())
    """
)


def test_kill_9_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(40)]
    os.kill(child.pid, signal.SIGKILL)
    rest, _ = child.communicate()
    acknowledged += rest.split()
    assert child.returncode == -signal.SIGKILL

    spool = Spool(root)
    assert os.listdir(root / "tmp") == []
    on_disk = set(spool.list_ids())
    assert set(acknowledged) <= on_disk
    for queue_id in on_disk:  # whatever made it into incoming/ is whole
        envelope, content = spool.load(queue_id)
        assert envelope.queue_id == queue_id and content.startswith(b"Subject: crash")


# -- the command line ------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mailgate")
    sub = parser.add_subparsers(dest="command")
    queue_cli.register(sub)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


async def test_cli_list_show_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    spool = Spool(tmp_path / "spool")
    first = make_envelope(
        done={"bob@example.org": "sent"}, errors={"carol@example.org": "4.3.0 disk full"}
    )
    second = make_envelope(mail_from="", rcpt_tos=["dave@example.org"])
    second.done["dave@example.org"] = "relay"
    second.relay["dave@remote.example"] = "dave@example.org"
    await spool.store(first, MESSAGE)
    await spool.store(second, b"Subject: second\r\n\r\nbody\r\n")
    await spool.defer(second.queue_id, second)
    spool.close()
    data = ["--data-dir", str(tmp_path)]

    def run(argv: list[str]) -> int:
        return run_cli(argv)

    assert await asyncio.to_thread(run, ["queue", "list", *data]) == 0
    out = capsys.readouterr().out
    assert first.queue_id in out and second.queue_id in out
    assert "alice@example.org" in out and "MAILER-DAEMON" in out
    assert "bob@example.org  (sent)" in out
    assert "carol@example.org  (deferred: 4.3.0 disk full)" in out
    assert "outbound relay not configured (dave@remote.example)" in out
    assert "in 2 Requests." in out

    assert await asyncio.to_thread(run, ["queue", "show", first.queue_id, *data]) == 0
    out = capsys.readouterr().out
    assert "client:       mx.example.net[192.0.2.7]" in out
    assert "<bob@example.org> [NOTIFY=FAILURE]: sent" in out
    assert "Subject: caf\u00e9" in out
    assert "8-bit body" not in out  # headers only

    assert await asyncio.to_thread(run, ["queue", "delete", first.queue_id, "NOPE", *data]) == 1
    captured = capsys.readouterr()
    assert f"{first.queue_id}: removed" in captured.out
    assert "NOPE" in captured.err
    assert Spool(tmp_path / "spool", recover=False).list_ids() == [second.queue_id]


def test_cli_list_empty_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    assert run_cli(["queue", "list", "--data-dir", str(tmp_path)]) == 0
    assert "Mail queue is empty" in capsys.readouterr().out
