"""The durable spool: accepted messages on disk until delivery is finished.

Layout under the spool root (every directory mode 0700, every file 0600)::

    tmp/        files being written; anything here at start-up is a leftover and is removed
    incoming/   accepted messages that local delivery has not finished
    deferred/   messages with work left: a retry after a temporary failure, or remote
                targets and bounces waiting for the outbound relay
    hold/       quarantined messages (Postfix's hold queue): accepted and kept, never
                delivered, until the operator releases them to incoming/ or deletes them
    corrupt/    files that could not be parsed, kept for the operator instead of retried

One file per message, named by its queue id, holds everything, so accepting a message is
one atomic rename::

    MGSPOOL1 <envelope length> <message length>\\n
    <envelope JSON>\\n
    <message bytes, exactly as received>

``store`` (into incoming/) and ``hold`` (into hold/) return only when the file's data is
fsync'd and the directory holding its new name is fsync'd too: the SMTP server answers 250
after that, and a crash at any later moment cannot lose the message. Directory fsyncs are
shared by group commit: every rename finished before a directory fsync starts is covered
by it, so many concurrent sessions pay for one directory fsync per batch instead of one
each. The file's own fsync stays per file. Progress updates write a new file and rename it
over the old one, so a crash leaves either the old or the new version, never a mix.

Moves between queues are two steps: the new copy is made durable in the target directory
first, and only then is the old one unlinked. A crash in between leaves both copies, and
opening the spool with recovery keeps the one further along (deferred/ over incoming/,
incoming/ or deferred/ over hold/). Readers apply the same rule, so a message is never
seen twice, never lost, and never delivered from hold/ once it has been released.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import io
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar, TypeVarTuple, Unpack, cast

from mailgate.core.errors import CorruptSpoolFile as CorruptSpoolFile  # re-exported
from mailgate.core.errors import NoSuchMessage as NoSuchMessage  # re-exported
from mailgate.core.errors import SpoolError
from mailgate.core.spool.dirsync import DirSync, fsync_dir
from mailgate.core.spool.envelope import SpoolEnvelope
from mailgate.core.spool.queue_id import is_valid_queue_id
from mailgate.core.spool.writer import MAX_PAYLOAD, SpoolWriter

log = logging.getLogger("mailgate.spool")

QueueName = Literal["incoming", "deferred", "hold"]
# The queues delivery works on; hold/ is never among them.
ACTIVE_QUEUES: tuple[QueueName, ...] = ("deferred", "incoming")
# The order in which a message is looked up: after a crash between the two steps of a move
# both copies exist, and the first one found is the newer (defer: deferred over incoming;
# release: either active queue over hold).
QUEUES: tuple[QueueName, ...] = (*ACTIVE_QUEUES, "hold")
# The order in which directories are listed: the direction messages move in, so that a
# message moving while a listing runs is seen in the later directory if not the earlier.
_LISTING_ORDER: tuple[QueueName, ...] = ("hold", "incoming", "deferred")

MAGIC = b"MGSPOOL1"
_MAX_HEADER_LINE = 64
_MAX_ENVELOPE = 16 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024
# What load() reads first: header, envelope and the whole of most messages.
_HEAD_READ = 256 * 1024
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# copy_file_range refuses some file system combinations; those get a plain copy instead.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
# Hard links are the no-overwrite rename; file systems without them fall back to rename.
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS}

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """A spooled message without its bytes: where it is, its envelope and its size."""

    queue_id: str
    queue: QueueName
    path: Path
    envelope: SpoolEnvelope
    size: int


def _write_all(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        written = os.writev(fd, views)
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0


# A big message goes to disk in steps of this size, each flushed (fdatasync) before the
# next is written, so the disk's queue holds at most a step per big message: a small
# message committed meanwhile waits behind that, not behind every big file at once (ten
# 20 MB messages ending together held a 1 KB message's fsync for 100-300 ms).
_PACE_STEP = 1024 * 1024


def _write_paced(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write ``parts``; past two steps, flushing each step before the next."""
    total = sum(len(part) for part in parts)
    if total <= 2 * _PACE_STEP:
        _write_all(fd, parts)
        return
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        step: list[memoryview] = []
        room = _PACE_STEP
        while views and room:
            view = views[0]
            if len(view) <= room:
                step.append(views.pop(0))
                room -= len(view)
            else:
                step.append(view[:room])
                views[0] = view[room:]
                room = 0
        _write_all(fd, step)
        os.fdatasync(fd)


def prestart_threads(executor: ThreadPoolExecutor, count: int) -> None:
    """Make ``executor`` start ``count`` threads now rather than on demand.

    A pool starts a thread when work arrives and none is idle, and the submitting thread
    (the event loop's) then waits for the new one to get the GIL: in a burst of big
    messages, while other threads hold the GIL, that wait took over 100 ms.
    """
    gate = threading.Event()
    # Each task blocks until all are submitted, so no thread is idle when the next one
    # comes and every submit starts a thread.
    tasks = [executor.submit(gate.wait) for _ in range(count)]
    gate.set()
    for task in tasks:
        task.result()


def _copy_range(src: int, dst: int, offset: int, count: int, path: Path) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst`` (in the kernel if it can)."""
    use_copy_range = hasattr(os, "copy_file_range")
    while count:
        if use_copy_range:
            try:
                copied = os.copy_file_range(src, dst, count, offset)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                use_copy_range = False
                continue
        else:
            chunk = os.pread(src, min(count, _COPY_CHUNK), offset)
            _write_all(dst, [chunk])
            copied = len(chunk)
        if copied == 0:
            raise CorruptSpoolFile(path, "message is shorter than its header says")
        offset += copied
        count -= copied


def _encode_header(envelope: SpoolEnvelope, size: int) -> bytes:
    text = envelope.to_json().encode("ascii")
    return b"%s %d %d\n%s\n" % (MAGIC, len(text), size, text)


def _read_header(
    f: BinaryIO, path: Path, queue_id: str, actual: int | None = None
) -> tuple[SpoolEnvelope, int, int]:
    """Parse the header of an open spool file: (envelope, message offset, message size).

    ``actual`` is the file's size when the caller knows it (else fstat tells).
    """
    line = f.readline(_MAX_HEADER_LINE)
    parts = line.split()
    if not line.endswith(b"\n") or len(parts) != 3 or parts[0] != MAGIC:
        raise CorruptSpoolFile(path, "not a mailgate spool file (bad header line)")
    try:
        envelope_size, size = int(parts[1]), int(parts[2])
    except ValueError:
        raise CorruptSpoolFile(path, "bad header line") from None
    if not 0 < envelope_size <= _MAX_ENVELOPE or size < 0:
        raise CorruptSpoolFile(path, "bad lengths in header line")
    raw = f.read(envelope_size + 1)
    if len(raw) != envelope_size + 1 or not raw.endswith(b"\n"):
        raise CorruptSpoolFile(path, "envelope truncated")
    try:
        envelope = SpoolEnvelope.from_json(raw[:-1])
    except SpoolError as exc:
        raise CorruptSpoolFile(path, str(exc)) from None
    if envelope.queue_id != queue_id:
        raise CorruptSpoolFile(path, f"envelope names queue id {envelope.queue_id!r}")
    offset = len(line) + envelope_size + 1
    if actual is None:
        actual = os.fstat(f.fileno()).st_size
    if actual != offset + size:
        raise CorruptSpoolFile(
            path, f"file is {actual} bytes, its header says {offset + size} (truncated?)"
        )
    return envelope, offset, size


def _checked_id(queue_id: str) -> str:
    # Queue ids arrive from the command line too: never let one become a path.
    if not is_valid_queue_id(queue_id):
        raise SpoolError(f"invalid queue id {queue_id!r}")
    return queue_id


def _os_error(action: str, path: Path, exc: OSError) -> SpoolError:
    return SpoolError(f"cannot {action} {path}: {exc.strerror or exc}")


class _GroupSync:
    """Group commit of one directory's fsync.

    A caller takes a ticket after its rename; it is done when an fsync that *started*
    after the ticket was taken has finished. While one fsync runs, later callers queue
    up and the next fsync covers all of them at once.
    """

    def __init__(self, path: Path, run: Callable[[Path], Awaitable[None]]) -> None:
        self._path = path
        self._run = run
        self._requested = 0
        self._synced = 0
        self._inflight: asyncio.Future[None] | None = None
        self._inflight_covers = 0

    async def sync(self) -> None:
        self._requested += 1
        ticket = self._requested
        while self._synced < ticket:
            if self._inflight is None:
                self._inflight_covers = self._requested
                self._inflight = asyncio.ensure_future(self._fsync(self._requested))
                # Consumed here so that a failure nobody waits for any more is not reported
                # as "exception never retrieved".
                self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
            inflight, covers = self._inflight, self._inflight_covers
            try:
                # Shielded: a cancelled SMTP session must not cancel the fsync others wait on.
                await asyncio.shield(inflight)
            except OSError as exc:
                if covers >= ticket:
                    raise _os_error("fsync directory", self._path, exc) from exc
                # That fsync began before our rename; ours is the next one.

    async def _fsync(self, covers: int) -> None:
        try:
            await self._run(self._path)
            self._synced = max(self._synced, covers)
        finally:
            self._inflight = None


class Spool:
    """The spool under ``root``.

    With ``recover`` (the default, for the process that owns the spool) the directories
    are created, ``tmp/`` is emptied and half-finished moves are settled. Tools that only
    look at or delete messages while a server runs pass ``recover=False``, so they never
    remove a file the server is writing.
    """

    def __init__(self, root: Path, *, recover: bool = True, io_threads: int = 64) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.incoming_dir = self.root / "incoming"
        self.deferred_dir = self.root / "deferred"
        self.hold_dir = self.root / "hold"
        self.corrupt_dir = self.root / "corrupt"
        self._dirs: dict[QueueName, Path] = {
            "incoming": self.incoming_dir,
            "deferred": self.deferred_dir,
            "hold": self.hold_dir,
        }
        self._io_threads = io_threads
        # The process that writes acceptances, rewrites and removals of messages up to
        # its MAX_PAYLOAD (SpoolWriter), if one is used: the server sets it; without it
        # the spool's own threads do all the writing.
        self.writer: SpoolWriter | None = None
        # Three pools, so that no kind of work waits behind another: acceptance (store and
        # hold: write and fsync the new file), directory fsyncs (at most one in flight per
        # directory, and every acceptance waits for one), and the rest (delivery's updates,
        # moves and removals, which must not hold up acceptance).
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._executor_lock = threading.Lock()
        self._tmp_seq = itertools.count()
        # Group commit among threads (the acceptance threads here, the spool writer's
        # threads in its process); _syncs below serves the event loop's callers.
        self._thread_syncs = {
            path: DirSync(path) for path in (self.incoming_dir, self.deferred_dir, self.hold_dir)
        }
        self._syncs = {
            path: _GroupSync(path, self._fsync_dir_async)
            for path in (self.incoming_dir, self.deferred_dir, self.hold_dir, self.corrupt_dir)
        }
        if recover:
            self._recover()

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the I/O threads (after their current work). The spool stays usable."""
        with self._executor_lock:
            executors = list(self._executors.values())
            self._executors.clear()
        for executor in executors:
            executor.shutdown(wait=True)

    def _recover(self) -> None:
        for path in (
            self.root,
            self.tmp_dir,
            self.incoming_dir,
            self.deferred_dir,
            self.hold_dir,
            self.corrupt_dir,
        ):
            self._make_dir(path)
        removed = 0
        for name in os.listdir(self.tmp_dir):
            try:
                os.unlink(self.tmp_dir / name)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _os_error("remove", self.tmp_dir / name, exc) from exc
        if removed:
            log.info("spool: removed %d unfinished file(s) from %s", removed, self.tmp_dir)
        # A crash inside defer() can leave the message in both queues; the deferred copy
        # holds the newer progress, and delivering from the older one would repeat work.
        held = set(os.listdir(self.hold_dir))
        incoming = set(os.listdir(self.incoming_dir))
        deferred = set(os.listdir(self.deferred_dir))
        both = incoming & deferred
        for name in sorted(both):
            os.unlink(self.incoming_dir / name)
            log.info("%s: removed stale copy from incoming/ (moved to deferred/)", name)
        if both:
            fsync_dir(self.incoming_dir)
        # Likewise a crash inside release(): once the active copy exists, delivery may have
        # begun from it, so the held copy must go or a second release would deliver twice.
        released = held & (incoming | deferred)
        for name in sorted(released):
            os.unlink(self.hold_dir / name)
            log.info("%s: removed stale copy from hold/ (released)", name)
        if released:
            fsync_dir(self.hold_dir)

    def _make_dir(self, path: Path) -> None:
        try:
            if not path.is_dir():
                path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                # The new directory's own name must survive a crash as well.
                fsync_dir(path.parent)
        except OSError as exc:
            raise _os_error("create", path, exc) from exc

    def _pool(self, kind: str = "work") -> ThreadPoolExecutor:
        with self._executor_lock:
            executor = self._executors.get(kind)
            if executor is None:
                executor = self._executors[kind] = ThreadPoolExecutor(
                    max_workers=self._threads(kind), thread_name_prefix=f"mailgate-spool-{kind}"
                )
            return executor

    def _threads(self, kind: str) -> int:
        return len(self._syncs) if kind == "dirsync" else self._io_threads

    def start_threads(self, count: int = 16) -> None:
        """Start up to ``count`` I/O threads per pool ahead of need (the server does)."""
        for kind in ("accept", "work", "dirsync"):
            prestart_threads(self._pool(kind), min(count, self._threads(kind)))

    async def _run(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    async def _run_accept(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool("accept"), fn, *args)

    async def _fsync_dir_async(self, path: Path) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool("dirsync"), fsync_dir, path)

    def _queue_dir(self, queue: QueueName) -> Path:
        return self._dirs[queue]

    def _tmp_path(self, queue_id: str) -> Path:
        return self.tmp_dir / f"{queue_id}.{os.getpid()}.{next(self._tmp_seq)}"

    # -- writing ---------------------------------------------------------------------

    async def store(
        self,
        envelope: SpoolEnvelope,
        content: bytes | bytearray | memoryview,
        *,
        prefix: bytes = b"",
    ) -> None:
        """Accept a message: when this returns it is on disk and survives any crash.

        ``prefix`` (a trace header) is stored in front of ``content`` without joining the
        two in memory first: for a big message that copy would hold up the event loop.
        """
        queue_id = _checked_id(envelope.queue_id)
        header = _encode_header(envelope, len(prefix) + memoryview(content).nbytes)
        await self._accept(queue_id, [header, prefix, content], "incoming")

    async def hold(
        self,
        envelope: SpoolEnvelope,
        content: bytes | bytearray | memoryview,
        reason: str,
        *,
        prefix: bytes = b"",
    ) -> None:
        """Accept a message into hold/ (quarantine), with the same guarantee as ``store``.

        Sets ``envelope.quarantine_reason`` and ``envelope.held_at`` (now) before writing,
        so the caller's envelope matches the file. Delivery never takes a message from
        hold/; ``release`` hands it over, ``remove`` deletes it.
        """
        queue_id = _checked_id(envelope.queue_id)
        envelope.quarantine_reason = reason
        envelope.held_at = time.time()
        envelope.released_at = None
        header = _encode_header(envelope, len(prefix) + memoryview(content).nbytes)
        await self._accept(queue_id, [header, prefix, content], "hold")

    async def _accept(
        self, queue_id: str, parts: Sequence[bytes | bytearray | memoryview], queue: QueueName
    ) -> None:
        writer = self.writer
        if writer is not None and sum(memoryview(part).nbytes for part in parts) <= MAX_PAYLOAD:
            await writer.accept(queue_id, queue, parts)
        else:
            await self._run_accept(self._accept_new, queue_id, parts, self._dirs[queue])

    def _accept_new(
        self, queue_id: str, parts: Sequence[bytes | bytearray | memoryview], directory: Path
    ) -> None:
        """In an acceptance thread: write the file, link it, fsync its directory.

        The directory fsync is shared with the other acceptance threads (group commit
        among threads), so a message costs one trip to a thread and back, not two.
        """
        self._write_new(queue_id, parts, directory)
        self._sync_dir_now(directory)

    def _sync_dir_now(self, directory: Path) -> None:
        try:
            self._thread_syncs[directory].sync()
        except OSError as exc:
            raise _os_error("fsync directory", directory, exc) from exc

    def _write_new(
        self, queue_id: str, parts: Sequence[bytes | bytearray | memoryview], directory: Path
    ) -> None:
        tmp = self._tmp_path(queue_id)
        final = directory / queue_id
        try:
            fd = os.open(tmp, _WRITE_FLAGS, _FILE_MODE)
        except OSError as exc:
            raise _os_error("create", tmp, exc) from exc
        try:
            try:
                _write_paced(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._link_new(tmp, final)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _os_error("write", final, exc) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _link_new(self, tmp: Path, final: Path, *, allowed: Path | None = None) -> None:
        """Give ``tmp`` the name ``final`` unless the queue id is in use in any queue.

        ``allowed`` is the one directory where the id may exist: the source of a move.
        """
        # link() fails if the name exists, where rename() would silently replace an
        # accepted message; ids are unique, so this only guards against a bug.
        for directory in self._dirs.values():
            if directory not in (final.parent, allowed) and (directory / final.name).exists():
                raise SpoolError(f"{final.name}: queue id already in use in {directory.name}/")
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise SpoolError(f"{final}: queue id already in use") from None
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            if final.exists():
                raise SpoolError(f"{final}: queue id already in use") from None
            os.replace(tmp, final)
            return
        os.unlink(tmp)

    async def update_envelope(self, queue_id: str, envelope: SpoolEnvelope) -> None:
        """Durably replace the envelope of a spooled message, in the queue it is in."""
        await self._rewrite_envelope(queue_id, envelope, defer=False)

    async def defer(self, queue_id: str, envelope: SpoolEnvelope) -> None:
        """Move a message to deferred/ with a new envelope (in place if already there).

        Only for messages in incoming/ or deferred/: a held message is NoSuchMessage here,
        so that nothing on the delivery path can take a message out of hold/.
        """
        await self._rewrite_envelope(queue_id, envelope, defer=True)

    async def _rewrite_envelope(
        self, queue_id: str, envelope: SpoolEnvelope, *, defer: bool
    ) -> None:
        queue_id = self._matching_id(queue_id, envelope)
        if self.writer is not None:
            await self.writer.rewrite(queue_id, envelope, defer=defer)
        else:
            await self._run(functools.partial(self.rewrite_now, queue_id, envelope, defer=defer))

    def rewrite_now(self, queue_id: str, envelope: SpoolEnvelope, *, defer: bool) -> None:
        """``defer`` (with ``defer``) or ``update_envelope`` as one blocking call, in a
        thread of the spool or of the spool writer: the directory fsyncs are shared among
        the calling threads."""
        queue_id = self._matching_id(queue_id, envelope)
        if not defer:
            queue, path = self._locate(queue_id)
            directory = self._queue_dir(queue)
            self._rewrite(path, directory, queue_id, lambda _: envelope, os.replace)
            self._sync_dir_now(directory)
            return
        queue, path = self._locate(queue_id, ACTIVE_QUEUES)
        self._rewrite(path, self.deferred_dir, queue_id, lambda _: envelope, os.replace)
        self._sync_dir_now(self.deferred_dir)
        if queue == "incoming":
            # Only after the deferred copy is durable may the incoming one go.
            _unlink_quietly(path)
            self._sync_dir_now(self.incoming_dir)

    def _matching_id(self, queue_id: str, envelope: SpoolEnvelope) -> str:
        if envelope.queue_id != queue_id:
            raise SpoolError(f"{queue_id}: envelope names queue id {envelope.queue_id!r}")
        return _checked_id(queue_id)

    async def release(self, queue_id: str) -> None:
        """Move a held message to incoming/ for delivery: durable, and exactly once.

        The new copy in incoming/ carries the quarantine history plus ``released_at``; it is
        made durable (file and directory fsync) before the held copy is unlinked, so a crash
        leaves the message in hold/, in both queues, or in incoming/ alone; recovery, and
        every reader meanwhile, treat "both" as released. A release repeated after such a
        crash only finishes the cleanup. Delivery does not start by itself: submit the id
        or call ``DeliveryAgent.scan_now``.
        """
        queue_id = _checked_id(queue_id)
        await self._run(self._release_copy, queue_id, time.time())
        await self._syncs[self.incoming_dir].sync()
        # The release is done and durable; what follows only tidies up. A failure here is
        # no reason to report the release as failed: readers ignore the leftover and the
        # next recovery removes it.
        try:
            await self._run(os.unlink, self.hold_dir / queue_id)
        except FileNotFoundError:
            pass  # delivered and removed meanwhile, or another release got there first
        except OSError as exc:
            log.warning(
                "%s: released, but the copy in hold/ stays until restart: %s", queue_id, exc
            )
            return
        try:
            await self._syncs[self.hold_dir].sync()
        except SpoolError as exc:
            log.warning("%s: released; %s", queue_id, exc)

    async def hold_queued(self, queue_id: str, reason: str) -> None:
        """Move a message from incoming/ or deferred/ to hold/ (``mailgate queue hold``).

        The held copy is made durable before the active one is unlinked. A crash in
        between leaves both, and the lookup rule (active over hold) keeps the message
        active: a hold that did not finish is as if it never happened, never a loss.
        """
        queue_id = _checked_id(queue_id)
        queue, path = self._locate(queue_id, ACTIVE_QUEUES)
        now = time.time()
        await self._run(
            self._rewrite,
            path,
            self.hold_dir,
            queue_id,
            lambda old: replace(old, quarantine_reason=reason, held_at=now, released_at=None),
            lambda tmp, final: self._link_new(tmp, final, allowed=self._queue_dir(queue)),
        )
        await self._syncs[self.hold_dir].sync()
        await self._run(_unlink_quietly, path)
        await self._syncs[self._queue_dir(queue)].sync()

    def _release_copy(self, queue_id: str, released_at: float) -> None:
        held = self.hold_dir / queue_id
        for queue in ACTIVE_QUEUES:
            if (self._queue_dir(queue) / queue_id).exists():
                if held.exists():
                    return  # an interrupted release passed its commit point; only cleanup is left
                raise SpoolError(f"{queue_id}: not on hold (it is in {queue}/)")
        self._rewrite(
            held,
            self.incoming_dir,
            queue_id,
            lambda old: replace(old, released_at=released_at),
            lambda tmp, final: self._link_new(tmp, final, allowed=self.hold_dir),
        )

    def _rewrite(
        self,
        src: Path,
        dst_dir: Path,
        queue_id: str,
        new_envelope: Callable[[SpoolEnvelope], SpoolEnvelope],
        install: Callable[[Path, Path], None],
    ) -> None:
        """Write ``src`` with ``new_envelope(old envelope)`` to tmp/, then ``install`` it.

        ``install(tmp, final)`` gives the copy its name in ``dst_dir``: os.replace for an
        update in place, a no-overwrite link for a move into a queue.
        """
        try:
            f = open(src, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise NoSuchMessage(f"{queue_id}: no such message in the spool") from None
        except OSError as exc:
            raise _os_error("open", src, exc) from exc
        tmp = self._tmp_path(queue_id)
        with f:
            try:
                old, offset, size = _read_header(f, src, queue_id)
                envelope = new_envelope(old)
                fd = os.open(tmp, _WRITE_FLAGS, _FILE_MODE)
            except OSError as exc:
                raise _os_error("rewrite", src, exc) from exc
            try:
                try:
                    _write_all(fd, [_encode_header(envelope, size)])
                    _copy_range(f.fileno(), fd, offset, size, src)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # Checked as late as possible: a message deleted meanwhile (mailgate queue
                # delete) must not come back to life.
                if not src.exists():
                    raise NoSuchMessage(f"{queue_id}: removed while being updated")
                install(tmp, dst_dir / queue_id)
            except OSError as exc:
                _unlink_quietly(tmp)
                raise _os_error("rewrite", src, exc) from exc
            except BaseException:
                _unlink_quietly(tmp)
                raise

    async def remove(self, queue_id: str, *, durable: bool = True) -> None:
        """Delete a message for good, from whichever queues hold it (hold/ included).

        Used after delivery and by the operator; removing every copy also clears what an
        interrupted release left in hold/. Without ``durable`` the directory is not
        fsync'd here: delivery removes a finished message that way, as Postfix does, and
        the removal becomes durable with the directory's next fsync (the next message
        accepted, usually within milliseconds) or the file system's own commit. A crash
        before then delivers the message once more; it never loses one.
        """
        queue_id = _checked_id(queue_id)
        if self.writer is not None:
            queues = await self.writer.unlink(queue_id)
            removed = [self._dirs[cast(QueueName, queue)] for queue in queues]
        else:
            removed = await self._run(self._unlink_everywhere, queue_id)
        if not removed:
            raise NoSuchMessage(f"{queue_id}: no such message in the spool")
        if durable:
            for directory in removed:
                await self._syncs[directory].sync()

    def _unlink_everywhere(self, queue_id: str) -> list[Path]:
        removed = []
        for queue in QUEUES:
            directory = self._queue_dir(queue)
            try:
                os.unlink(directory / queue_id)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _os_error("remove", directory / queue_id, exc) from exc
            removed.append(directory)
        return removed

    async def quarantine(self, queue_id: str) -> None:
        """Move an unreadable message to corrupt/, out of delivery's way but kept.

        Not the hold queue: that is ``hold``/``release``, for readable messages that policy
        quarantined.
        """
        queue_id = _checked_id(queue_id)
        queue, path = self._locate(queue_id)
        target = self.corrupt_dir / queue_id

        def move() -> None:
            self._make_dir(self.corrupt_dir)
            try:
                os.replace(path, target)
            except OSError as exc:
                raise _os_error("move", path, exc) from exc

        await self._run(move)
        await self._syncs[self.corrupt_dir].sync()
        await self._syncs[self._queue_dir(queue)].sync()

    # -- reading ---------------------------------------------------------------------

    def list_ids(self, queue: QueueName | Sequence[QueueName] | None = None) -> list[str]:
        """Queue ids in ``queue`` or queues (every queue if None), oldest first, each once.

        A message is listed under the queue it is in by the lookup rule (see QUEUES): the
        held copy an interrupted release left beside an active one does not count as held.
        """
        wanted = QUEUES if queue is None else (queue,) if isinstance(queue, str) else queue
        # Listing every directory when hold/ is wanted finds those leftovers.
        listing = {
            name: self._names_in(name)
            for name in _LISTING_ORDER
            if name in wanted or "hold" in wanted
        }
        ids: set[str] = set()
        for name in wanted:
            if name == "hold":
                ids |= listing["hold"] - listing["incoming"] - listing["deferred"]
            else:
                ids |= listing[name]
        return sorted(ids)

    def _names_in(self, queue: QueueName) -> set[str]:
        directory = self._queue_dir(queue)
        try:
            return {n for n in os.listdir(directory) if is_valid_queue_id(n)}
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise _os_error("list", directory, exc) from exc

    def _locate(
        self, queue_id: str, queues: Sequence[QueueName] = QUEUES
    ) -> tuple[QueueName, Path]:
        for queue in queues:
            path = self._queue_dir(queue) / queue_id
            if path.exists():
                return queue, path
        raise NoSuchMessage(f"{queue_id}: no such message in the spool")

    def is_fresh(self, queue_id: str) -> bool:
        """Whether the message is in incoming/ and not in deferred/: as it was stored.

        Looks at names only (two stats, cheap enough for the event loop).
        """
        queue_id = _checked_id(queue_id)
        return not os.path.exists(self.deferred_dir / queue_id) and os.path.exists(
            self.incoming_dir / queue_id
        )

    def queue_of(self, queue_id: str) -> QueueName:
        """The queue a message is in (by the lookup rule), without reading its file."""
        return self._locate(_checked_id(queue_id))[0]

    def _open(
        self, queue_id: str, queues: Sequence[QueueName] = QUEUES
    ) -> tuple[QueueName, Path, BinaryIO]:
        queue_id = _checked_id(queue_id)
        for queue in queues:
            path = self._queue_dir(queue) / queue_id
            try:
                return queue, path, open(path, "rb")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _os_error("open", path, exc) from exc
        raise NoSuchMessage(f"{queue_id}: no such message in the spool")

    def info(self, queue_id: str, *, include_held: bool = True) -> SpoolEntry:
        """Where a message is, its envelope and its size, without reading the message.

        With ``include_held=False`` a message on hold is NoSuchMessage.
        """
        queue, path, f = self._open(queue_id, QUEUES if include_held else ACTIVE_QUEUES)
        with f:
            try:
                envelope, _, size = _read_header(f, path, queue_id)
            except OSError as exc:
                raise _os_error("read", path, exc) from exc
        return SpoolEntry(queue_id, queue, path, envelope, size)

    def load(self, queue_id: str, *, include_held: bool = True) -> tuple[SpoolEnvelope, bytes]:
        """The envelope and the message bytes; CorruptSpoolFile if the file is damaged.

        With ``include_held=False`` (what delivery uses) a message on hold is NoSuchMessage.
        Reads with as few system calls as it can (open, fstat, one or two preads, close):
        in a thread, each call is a trip through the GIL.
        """
        queue_id = _checked_id(queue_id)
        path, fd = self._open_fd(queue_id, QUEUES if include_held else ACTIVE_QUEUES)
        try:
            try:
                actual = os.fstat(fd).st_size
                head = os.pread(fd, min(actual, _HEAD_READ), 0)
                line = head[: head.find(b"\n") + 1]
                fields = line.split()
                if len(fields) == 3 and fields[1].isdigit():
                    # The envelope did not fit in the first read: read the header whole.
                    wanted = len(line) + int(fields[1]) + 1
                    if len(head) < wanted <= actual:
                        head = os.pread(fd, wanted, 0)
                envelope, offset, size = _read_header(io.BytesIO(head), path, queue_id, actual)
                if offset + size <= len(head):
                    content = head[offset : offset + size]
                else:
                    content = _pread_all(fd, size, offset)
            except OSError as exc:
                raise _os_error("read", path, exc) from exc
        finally:
            os.close(fd)
        if len(content) != size:
            raise CorruptSpoolFile(path, "message truncated")
        return envelope, content

    def _open_fd(self, queue_id: str, queues: Sequence[QueueName]) -> tuple[Path, int]:
        for queue in queues:
            path = self._queue_dir(queue) / queue_id
            try:
                return path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _os_error("open", path, exc) from exc
        raise NoSuchMessage(f"{queue_id}: no such message in the spool")


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes from ``offset`` (fewer only at the end of the file)."""
    first = os.pread(fd, size, offset)
    if len(first) == size or not first:
        return first
    parts = [first]
    done = len(first)
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
