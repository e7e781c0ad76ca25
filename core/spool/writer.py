"""The spool writer: a process of its own for the file writes of accepting and delivering.

Accepting a message durably and putting a copy into a Maildir are each a dozen system
calls (create, write, fsync, link, the directory's fsync, unlink). Made from threads of
the server process, every one of them ends in a wait for the interpreter lock, which the
event loop holds while it serves the SMTP sessions: under load a third of the server's
CPU went to handing that lock back and forth. The writer does those calls in a process
of its own, as Postfix's ``cleanup`` and ``virtual`` do beside ``smtpd``: the server sends
a request over a Unix socket and goes on serving until the answer comes.

The writer runs exactly the code the server would otherwise run in its threads
(``Spool._accept_new``, ``MaildirStore.deliver``, ``Spool.rewrite_now`` for ``defer`` and
``update_envelope``, ``Spool._unlink_everywhere``), with the same guarantees: an
acceptance is answered only after the file and its directory are fsync'd, so the server
still says 250 only for a message on disk. If the writer dies,
every request it had not answered fails (the SMTP client gets a temporary error and
sends again, delivery retries later) and the next request starts a new writer. Writes it
had finished stay on disk; one it was making is left in ``tmp/``, which recovery clears.

Frames: a request is the lengths of its head and payload (4 octets each), the pickled
head, then the message bytes, which are never pickled or joined; an answer is a 4-octet
length and the pickled answer::

    request:  head length, payload length, head = (id, op, args), payload
    answer:   length, (id, ok, result or (error kind, text, permanent))

The writer serves requests on a pool of threads, so group commit of the directory fsyncs
works there as it does in the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailgate.core.errors import CorruptSpoolFile, DeliveryError, NoSuchMessage, SpoolError

if TYPE_CHECKING:
    from mailgate.core.spool.envelope import SpoolEnvelope

log = logging.getLogger("mailgate.spool.writer")

_LENGTH = struct.Struct("!I")
_REQUEST = struct.Struct("!II")
# Messages up to this size go through the writer; bigger ones are written by the server's
# own threads (paced), since copying tens of megabytes through a socket costs the event
# loop more than the interpreter lock does.
MAX_PAYLOAD = 1024 * 1024
# Few threads: the writer's work is system calls, and each one returning waits for the
# interpreter lock if another thread holds it. Measured under benchmark B, the writer
# used about half the CPU per message with 2-4 threads that it did with 16, and
# accepted no fewer messages: fsync is short here, and the directory fsyncs are still
# shared among the threads.
DEFAULT_THREADS = 4

Payload = Sequence[bytes | bytearray | memoryview]


class WriterUnavailable(SpoolError):
    """The writer process died, or could not be started, before it answered."""


def _error(kind: str, text: str, detail: Any) -> Exception:
    """The exception a failed request raises in the server: the writer's, rebuilt."""
    if kind == "delivery":
        return DeliveryError(text, permanent=bool(detail))
    if kind == "nosuch":
        return NoSuchMessage(text)
    if kind == "corrupt":
        return CorruptSpoolFile(Path(text), str(detail))
    return SpoolError(text)


# -- the server's side ---------------------------------------------------------------


class _Answers(asyncio.Protocol):
    """Reads the writer's answers and settles the waiting futures."""

    def __init__(self, owner: SpoolWriter) -> None:
        self._owner = owner
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if len(buffer) < end:
                break
            answer = pickle.loads(memoryview(buffer)[start + _LENGTH.size : end])
            start = end
            self._owner._settle(answer)
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(self)


class SpoolWriter:
    """The server's handle on the writer process: start, send requests, stop.

    ``spool_root`` and ``mail_root`` are the directories the writer works in; ``hostname``
    goes into Maildir file names. The process is started by ``start`` and again by the
    first request after it died.
    """

    def __init__(
        self,
        spool_root: Path,
        mail_root: Path,
        hostname: str,
        *,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self.spool_root = Path(spool_root)
        self.mail_root = Path(mail_root)
        self.hostname = hostname
        self.threads = threads
        self._process: asyncio.subprocess.Process | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _Answers | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._outgoing: list[bytes | bytearray | memoryview] = []
        self._next_id = 0
        self._starting: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the process unless it runs (concurrent callers share one start)."""
        if self._closed:
            raise WriterUnavailable("the spool writer is stopped")
        if self._transport is not None and not self._transport.is_closing():
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._spawn())
        await asyncio.shield(self._starting)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [
                sys.executable,
                "-m",
                "mailgate.core.spool.writer",
                "--fd",
                str(theirs.fileno()),
                "--spool",
                str(self.spool_root),
                "--mail",
                str(self.mail_root),
                "--hostname",
                self.hostname,
                "--threads",
                str(self.threads),
            ]
            # A session of its own: a Ctrl-C at the terminal goes to the server alone.
            self._process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(theirs.fileno(),), start_new_session=True
            )
        except OSError as exc:
            ours.close()
            raise WriterUnavailable(f"cannot start the spool writer: {exc}") from exc
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_unix_connection(lambda: _Answers(self), sock=ours)
        self._transport = transport
        self._protocol = protocol
        log.info("spool writer started (pid %d)", self._process.pid)

    async def stop(self) -> None:
        """Let the writer finish what it was asked, then end it."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(Exception):
                await self._starting
        if self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        if self._transport is not None:
            # EOF on its socket tells the writer to finish and exit.
            self._transport.close()
            self._transport = None
        process = self._process
        self._process = None
        if process is not None:
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()

    async def _call(self, op: str, args: tuple[Any, ...], payload: Payload = ()) -> Any:
        await self.start()
        transport = self._transport
        if transport is None or transport.is_closing():
            raise WriterUnavailable("the spool writer is not running")
        self._next_id += 1
        request_id = self._next_id
        size = sum(memoryview(part).nbytes for part in payload)
        head = pickle.dumps((request_id, op, args), protocol=pickle.HIGHEST_PROTOCOL)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[request_id] = future
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing += [_REQUEST.pack(len(head), size), head]
        self._outgoing += [part for part in payload if len(part)]
        return await future

    def _flush(self) -> None:
        # The requests of one turn of the event loop go in one write: each write to the
        # socket is a system call and wakes the writer, and that is most of a request's
        # cost to the server.
        outgoing, self._outgoing = self._outgoing, []
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.writelines(outgoing)

    def _settle(self, answer: tuple[int, bool, Any]) -> None:
        request_id, ok, result = answer
        future = self._pending.pop(request_id, None)
        if future is None or future.done():
            return  # the caller gave up (its session was cancelled); the work is done
        if ok:
            future.set_result(result)
            return
        future.set_exception(_error(*result))

    def _lost(self, protocol: _Answers) -> None:
        if protocol is not self._protocol:
            return
        self._transport = None
        self._protocol = None
        # Requests not yet sent are failed with the rest, never sent to a later writer.
        self._outgoing = []
        pending, self._pending = self._pending, {}
        if not self._closed:
            unanswered = f" with {len(pending)} request(s) unanswered" if pending else ""
            log.error("spool writer exited%s; the next request starts a new one", unanswered)
        for future in pending.values():
            if not future.done():
                future.set_exception(WriterUnavailable("the spool writer exited"))
        process = self._process
        if process is not None and process.returncode is None and not self._closed:
            # Its socket is gone, so it can do nothing more for us (the event loop's child
            # watcher reaps it).
            process.kill()

    # -- requests --------------------------------------------------------------------

    async def accept(self, queue_id: str, queue: str, parts: Payload) -> None:
        """Write ``parts`` as spool file ``queue_id`` in ``queue`` (incoming or hold),
        durably, as ``Spool.store`` does."""
        await self._call("accept", (queue_id, queue), parts)

    async def deliver(
        self, address: str, content: bytes | bytearray, *, return_path: str, binary: bool = False
    ) -> Path:
        """One copy into ``address``'s Maildir, as ``MaildirStore.deliver``; its path."""
        try:
            path: str = await self._call("deliver", (address, return_path, binary), (content,))
        except WriterUnavailable as exc:
            raise DeliveryError(str(exc)) from exc
        return Path(path)

    async def rewrite(self, queue_id: str, envelope: SpoolEnvelope, *, defer: bool) -> None:
        """``Spool.defer`` (with ``defer``) or ``Spool.update_envelope``, durably."""
        await self._call("rewrite", (queue_id, envelope, defer))

    async def unlink(self, queue_id: str) -> list[str]:
        """Remove ``queue_id`` from every queue; the queues it was in."""
        queues: list[str] = await self._call("unlink", (queue_id,))
        return queues


# -- the writer's side ---------------------------------------------------------------


class _Worker:
    """The writer process: reads requests, runs each on a thread, answers in any order."""

    def __init__(self, sock: socket.socket, spool_root: Path, mail_root: Path, hostname: str):
        from mailgate.core.spool.maildir import MaildirStore
        from mailgate.core.spool.spool import Spool

        self._sock = sock
        self._reader = sock.makefile("rb")
        self._answers: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._spool = Spool(spool_root, recover=False)
        self._maildir = MaildirStore(mail_root, hostname)
        self._queues = {"incoming": self._spool.incoming_dir, "hold": self._spool.hold_dir}

    def serve(self, threads: int) -> None:
        sender = threading.Thread(target=self._send_answers, name="mailgate-writer-answers")
        sender.start()
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="mailgate-writer") as pool:
                while True:
                    request = self._read()
                    if request is None:
                        return  # the server closed its end: finish the work in hand, exit
                    pool.submit(self._run, *request)
        finally:
            self._answers.put(None)
            sender.join()

    def _read(self) -> tuple[int, str, tuple[Any, ...], bytes] | None:
        prefix = self._reader.read(_REQUEST.size)
        if len(prefix) < _REQUEST.size:
            return None
        head_size, payload_size = _REQUEST.unpack(prefix)
        head = self._reader.read(head_size)
        payload = self._reader.read(payload_size) if payload_size else b""
        if len(head) < head_size or len(payload) < payload_size:
            return None
        request_id, op, args = pickle.loads(head)
        return request_id, op, args, payload

    def _run(self, request_id: int, op: str, args: tuple[Any, ...], payload: bytes) -> None:
        try:
            result: tuple[int, bool, Any] = (request_id, True, self._do(op, args, payload))
        except DeliveryError as exc:
            result = (request_id, False, ("delivery", str(exc), exc.permanent))
        except NoSuchMessage as exc:
            result = (request_id, False, ("nosuch", str(exc), False))
        except CorruptSpoolFile as exc:
            problem = str(exc).removeprefix(f"{exc.path}: ")
            result = (request_id, False, ("corrupt", str(exc.path), problem))
        except SpoolError as exc:
            result = (request_id, False, ("spool", str(exc), False))
        except Exception as exc:  # an answer for every request, whatever went wrong
            result = (request_id, False, ("spool", f"spool writer: {exc!r}", False))
        head = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        self._answers.put(_LENGTH.pack(len(head)) + head)

    def _send_answers(self) -> None:
        # One thread sends, and everything finished meanwhile goes in one write: the
        # server is woken once for a batch of answers instead of once for each.
        while True:
            batch = [self._answers.get()]
            while True:
                try:
                    batch.append(self._answers.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            frames = [frame for frame in batch if frame is not None]
            if frames:
                try:
                    self._sock.sendall(b"".join(frames))
                except OSError:
                    return  # the server is gone; nobody is waiting for these answers
            if done:
                return

    def _do(self, op: str, args: tuple[Any, ...], payload: bytes) -> Any:
        if op == "accept":
            queue_id, queue = args
            self._spool._accept_new(queue_id, [payload], self._queues[queue])
            return None
        if op == "deliver":
            address, return_path, binary = args
            return str(
                self._maildir.deliver(address, payload, return_path=return_path, binary=binary)
            )
        if op == "rewrite":
            queue_id, envelope, defer = args
            self._spool.rewrite_now(queue_id, envelope, defer=defer)
            return None
        if op == "unlink":
            (queue_id,) = args
            return [path.name for path in self._spool._unlink_everywhere(queue_id)]
        raise ValueError(f"unknown request {op!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailgate-spool-writer")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--spool", type=Path, required=True)
    parser.add_argument("--mail", type=Path, required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args(argv)
    # The server decides when the writer ends (EOF on the socket, after the last answer it
    # waits for). A stop signal sent to the whole group (Ctrl-C in a terminal, systemd's
    # stop of the unit's processes) must not end it while the server, draining its
    # sessions, still needs it.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="mailgate spool writer: %(message)s")
    sock = socket.socket(fileno=args.fd)
    _Worker(sock, args.spool, args.mail, args.hostname).serve(args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
