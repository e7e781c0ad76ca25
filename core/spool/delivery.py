"""The local delivery agent: takes spooled messages and puts them into Maildirs.

For each recipient not yet finished, the resolver expands aliases; every target that is a
local user gets a copy in its Maildir, and each copy is recorded in the spool at once, so
a crash in the middle of a message repeats at most the one copy that was being written.
A message leaves the spool only when nothing is left to do for it.

What this agent cannot do waits in ``deferred/`` and is never dropped: remote targets
(reached through an alias, or relayed for an authenticated user) and bounce messages need
the outbound relay. Temporary failures (a full disk, a busy user store) are retried with
exponential backoff; permanent ones are recorded as bounces.

Messages on hold (the spool's ``hold/``) are never touched: neither scan looks there, and a
held queue id that is submitted anyway is found nowhere. A released message is in
``incoming/`` and is picked up by the next scan, at once after ``scan_now``.

Log lines follow Postfix and always start with the queue id::

    0PQ3V7K2M1ZX4B8C: to=<bob@example.org>, status=sent (delivered to maildir)
    0PQ3V7K2M1ZX4B8C: to=<bob@example.net>, orig_to=<list@example.org>, status=deferred
        (outbound relay not configured)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar, TypeVarTuple, Unpack

from mailgate.core.errors import DeliveryError, SpoolError
from mailgate.core.spool.envelope import RecipientState, SpoolEnvelope
from mailgate.core.spool.spool import CorruptSpoolFile, NoSuchMessage, Spool, prestart_threads
from mailgate.core.spool.writer import MAX_PAYLOAD

log = logging.getLogger("mailgate.delivery")

RELAY_NOT_CONFIGURED = "outbound relay not configured"
# Caps the backoff exponent so that a message retried for months cannot overflow a float.
_MAX_DOUBLINGS = 30
# Messages delivered at a time unless the caller says otherwise. Most of a delivery is
# waiting for fsync, and the Maildir and spool directory fsyncs of concurrent deliveries
# are shared, so more messages in flight mean fewer fsyncs per message.
DEFAULT_CONCURRENCY = 4
# At most this many message bytes wait in memory for delivery, handed over by the server
# (beyond it, delivery reads the spool file as for any other message).
_MAX_STORED_BYTES = 64 * 1024 * 1024

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class Resolver(Protocol):
    """What delivery needs from the user store: indexed reads, made on the event loop."""

    def resolve(self, recipient: str) -> list[str] | None:
        """Final addresses after alias expansion; None if no user or alias answers."""
        ...

    def user_exists(self, address: str) -> bool: ...


class Mailboxes(Protocol):
    """Final delivery (MaildirStore); blocking, called in a thread."""

    def deliver(
        self, address: str, content: bytes, *, return_path: str, binary: bool = False
    ) -> Path: ...


def _undecided(envelope: SpoolEnvelope, target: str) -> bool:
    """Whether ``target`` has no decision yet from an earlier attempt (may get a copy)."""
    return not (
        target in envelope.delivered or target in envelope.relay or target in envelope.bounced
    )


def _orig(rcpt: str, target: str) -> str:
    return "" if rcpt == target else f", orig_to=<{rcpt}>"


class DeliveryAgent:
    """Delivers spooled messages with ``concurrency`` messages in flight at a time.

    The blocking work (spool reads, user lookups, Maildir writes) runs on the agent's own
    ``concurrency`` threads, so delivery never queues behind the SMTP sessions' lookups or
    the spool's acceptance threads, nor they behind it.

    ``is_local_domain`` decides what an unknown recipient means: in a local domain it
    bounces (the user was removed after the message was accepted); elsewhere it is a
    relayed recipient and waits for the outbound relay. Without it every unknown
    recipient is treated as remote, which keeps the mail rather than bouncing it.
    """

    def __init__(
        self,
        spool: Spool,
        maildir: Mailboxes,
        resolver: Resolver,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry_base: float = 60.0,
        retry_max: float = 3600.0,
        scan_interval: float = 300.0,
        is_local_domain: Callable[[str], bool] | None = None,
        outbound: Callable[[str], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._spool = spool
        self._maildir = maildir
        self._resolver = resolver
        self._concurrency = concurrency
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._scan_interval = scan_interval
        self._is_local_domain = is_local_domain
        # The outbound relay's submit: called once local work is done and remote targets
        # or notifications are left. Without it they wait in deferred/.
        self._outbound = outbound
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        # A second submit of a queued id is a no-op; one of an id being delivered runs it
        # again afterwards, since the submitter may know of work the running pass missed.
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Messages handed over by the server that stored them, not read back (bounded).
        self._stored: dict[str, tuple[SpoolEnvelope, bytes]] = {}
        self._stored_bytes = 0
        self._workers: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._scanner: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self._scan_again = False
        self._running = False
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and take up everything the spool already holds."""
        if self._running:
            return
        self._running = True
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self._concurrency, thread_name_prefix="mailgate-delivery"
        )
        prestart_threads(self._executor, self._concurrency)
        self._workers = [
            asyncio.create_task(self._worker(), name=f"mailgate-delivery-{n}")
            for n in range(self._concurrency)
        ]
        await self._recover()
        if self._scan_interval > 0:
            self._scanner = asyncio.create_task(self._scan_loop(), name="mailgate-delivery-scan")

    async def stop(self) -> None:
        """Finish the messages being delivered; leave the rest in the spool for next time."""
        if not self._running:
            return
        self._stopping = True
        if self._scanner is not None:
            self._scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanner
            self._scanner = None
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan_task
            self._scan_task = None
        self._scan_again = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        while not self._queue.empty():
            queue_id = self._queue.get_nowait()
            if queue_id is not None:
                self._queued.discard(queue_id)
        self._stored.clear()
        self._stored_bytes = 0
        self._again.clear()
        for _ in self._workers:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._executor is not None:
            # The workers are done; a cancelled scan may still finish a listing in a thread.
            self._executor.shutdown(wait=False)
            self._executor = None
        self._running = False

    async def _blocking(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """Run blocking ``fn(*args)`` on the agent's threads (default pool if stopped)."""
        executor = self._executor
        if executor is None:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def submit(self, queue_id: str, stored: tuple[SpoolEnvelope, bytes] | None = None) -> None:
        """Deliver ``queue_id`` soon (called right after Spool.store). Never blocks.

        ``stored``: the envelope and bytes just written, from the server that stored them.
        Delivery then skips reading the file back (a trip to a thread and the reads); it
        still checks that the file is where it was stored, in incoming/ and nowhere newer.
        """
        if self._stopping:
            return  # still spooled: the next start() delivers it
        timer = self._timers.pop(queue_id, None)
        if timer is not None:
            timer.cancel()
        if queue_id in self._active:
            self._again.add(queue_id)
            return
        if queue_id in self._queued:
            return
        if stored is not None and self._stored_bytes + len(stored[1]) <= _MAX_STORED_BYTES:
            self._stored[queue_id] = stored
            self._stored_bytes += len(stored[1])
        self._queued.add(queue_id)
        self._queue.put_nowait(queue_id)

    def _take_stored(self, queue_id: str) -> tuple[SpoolEnvelope, bytes] | None:
        stored = self._stored.pop(queue_id, None)
        if stored is not None:
            self._stored_bytes -= len(stored[1])
        return stored

    def scan_now(self) -> None:
        """Take up everything in incoming/ now instead of at the next periodic scan.

        For messages that reached incoming/ without a submit, above all those released
        from hold/ by another process (``mailgate queue quarantine release`` signals the
        server, which calls this). Never blocks, and may be called from any thread or from
        a signal handler: the work is handed to the agent's event loop. Calls while a scan
        runs cause one more scan after it, since the running one may have listed the
        directory before the caller's message arrived. Ignored unless the agent runs.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed after the check
            loop.call_soon_threadsafe(self._begin_scan)

    def _begin_scan(self) -> None:
        if not self._running or self._stopping:
            return
        if self._scan_task is not None and not self._scan_task.done():
            self._scan_again = True
            return
        self._scan_task = asyncio.create_task(self._scan_now(), name="mailgate-delivery-scan-now")

    async def _scan_now(self) -> None:
        while True:
            self._scan_again = False
            await self._scan_incoming()
            if not self._scan_again:
                return

    async def _scan_incoming(self) -> None:
        try:
            ids = await self._blocking(self._spool.list_ids, "incoming")
        except SpoolError as exc:
            log.warning("delivery: cannot scan the spool: %s", exc)
            return
        for queue_id in ids:
            self.submit(queue_id)

    def _schedule(self, queue_id: str, delay: float) -> None:
        if self._stopping:
            return
        old = self._timers.pop(queue_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[queue_id] = loop.call_later(max(0.0, delay), self._fire, queue_id)

    def _fire(self, queue_id: str) -> None:
        self._timers.pop(queue_id, None)
        self.submit(queue_id)

    async def _recover(self) -> None:
        incoming = await self._blocking(self._spool.list_ids, "incoming")
        for queue_id in incoming:
            self.submit(queue_id)
        retry, waiting, corrupt = await self._blocking(self._scan_deferred)
        now = time.time()
        for queue_id, when in retry:
            self._schedule(queue_id, when - now)
        for queue_id in corrupt:
            await self._quarantine(queue_id)
        if incoming or retry or waiting:
            log.info(
                "delivery: recovered %d incoming, %d deferred for retry, "
                "%d waiting for the outbound relay",
                len(incoming),
                len(retry),
                waiting,
            )

    def _scan_deferred(self) -> tuple[list[tuple[str, float]], int, list[str]]:
        retry: list[tuple[str, float]] = []
        waiting = 0
        corrupt: list[str] = []
        for queue_id in self._spool.list_ids("deferred"):
            try:
                envelope = self._spool.info(queue_id).envelope
            except CorruptSpoolFile as exc:
                log.error("%s: %s", queue_id, exc)
                corrupt.append(queue_id)
                continue
            except SpoolError as exc:
                log.warning("%s: cannot read from the spool: %s", queue_id, exc)
                continue
            if envelope.pending_recipients():
                retry.append((queue_id, envelope.next_attempt))
            else:
                waiting += 1
        return retry, waiting, corrupt

    async def _scan_loop(self) -> None:
        # Picks up what nobody submitted: a store() whose SMTP session was cancelled after
        # the rename, or a message whose last attempt could not even be deferred.
        while True:
            await asyncio.sleep(self._scan_interval)
            await self._scan_incoming()

    async def _worker(self) -> None:
        while True:
            queue_id = await self._queue.get()
            if queue_id is None:
                return
            self._queued.discard(queue_id)
            self._active.add(queue_id)
            try:
                await self._process(queue_id)
            except NoSuchMessage:
                log.info("%s: removed from the spool during delivery", queue_id)
            except Exception:
                # Whatever went wrong, the spool still holds the message and its last
                # recorded progress; the worker must live on for the other messages.
                log.exception("%s: delivery failed unexpectedly; retry later", queue_id)
                self._schedule(queue_id, self._retry_base)
            finally:
                self._active.discard(queue_id)
                if queue_id in self._again:
                    self._again.discard(queue_id)
                    self.submit(queue_id)

    async def _quarantine(self, queue_id: str) -> None:
        try:
            await self._spool.quarantine(queue_id)
        except SpoolError as exc:
            log.error("%s: cannot move to corrupt/: %s", queue_id, exc)
            return
        log.error("%s: moved to %s for the operator", queue_id, self._spool.corrupt_dir)

    # -- one message -----------------------------------------------------------------

    async def _process(self, queue_id: str) -> None:
        stored = self._take_stored(queue_id)
        try:
            if stored is not None and self._spool.is_fresh(queue_id):
                envelope, content = stored
            else:
                envelope, content = await self._blocking(
                    functools.partial(self._spool.load, queue_id, include_held=False)
                )
        except NoSuchMessage:
            # Already delivered (a scan and a submit can race), deleted by the operator, or
            # on hold, which is never delivered from.
            log.debug("%s: no longer in the spool", queue_id)
            return
        except CorruptSpoolFile as exc:
            log.error("%s: %s", queue_id, exc)
            await self._quarantine(queue_id)
            return
        except SpoolError as exc:
            log.warning("%s: cannot read from the spool: %s; retry later", queue_id, exc)
            self._schedule(queue_id, self._retry_base)
            return

        if envelope.pending_recipients():
            envelope.attempts += 1
            log.info(
                "%s: from=<%s>, size=%d, nrcpt=%d",
                queue_id,
                envelope.mail_from,
                len(content),
                len(envelope.rcpt_tos),
            )
        temporary = False
        binary = envelope.body_type == "BINARYMIME"
        pending = envelope.pending_recipients()
        for index, rcpt in enumerate(pending):
            last = index == len(pending) - 1
            state = await self._deliver_recipient(queue_id, envelope, rcpt, content, binary, last)
            if state is None:
                temporary = True
            else:
                envelope.done[rcpt] = state
                envelope.errors.pop(rcpt, None)
        await self._finish(queue_id, envelope, temporary)

    async def _finish(self, queue_id: str, envelope: SpoolEnvelope, temporary: bool) -> None:
        if temporary:
            doublings = min(envelope.attempts - 1, _MAX_DOUBLINGS)
            delay = min(self._retry_base * 2 ** max(doublings, 0), self._retry_max)
            envelope.next_attempt = time.time() + delay
            await self._spool.defer(queue_id, envelope)
            log.info(
                "%s: deferred after attempt %d, next attempt in %.0fs",
                queue_id,
                envelope.attempts,
                delay,
            )
            self._schedule(queue_id, delay)
        elif envelope.awaiting_outbound():
            envelope.next_attempt = 0.0
            await self._spool.defer(queue_id, envelope)
            waiting = []
            if envelope.relay:
                waiting.append(f"{len(envelope.relay)} remote recipient(s)")
            if envelope.notices_due():
                waiting.append("notification(s)")
            log.info(
                "%s: kept in deferred/: %s waiting (%s)",
                queue_id,
                " and ".join(waiting),
                "handed to the outbound relay" if self._outbound else RELAY_NOT_CONFIGURED,
            )
            if self._outbound is not None:
                self._outbound(queue_id)
        else:
            await self._spool.remove(queue_id, durable=False)
            log.info("%s: removed", queue_id)

    async def _deliver_recipient(
        self,
        queue_id: str,
        envelope: SpoolEnvelope,
        rcpt: str,
        content: bytes,
        binary: bool,
        last: bool = True,
    ) -> RecipientState | None:
        """Deliver to every target of ``rcpt``: its final state, or None to retry later.

        ``last`` says that no pending recipient follows this one in this pass.
        """
        try:
            # On the event loop, as the SMTP server's lookups: an indexed read of the user
            # store costs less than the trip to a thread and back.
            targets = self._resolver.resolve(rcpt)
            if targets is None:
                if self._local_domain(rcpt.rpartition("@")[2]):
                    return self._bounce(queue_id, envelope, rcpt, rcpt, "5.1.1 unknown user")
                targets = [rcpt]
        except Exception as exc:
            # The user store is unreachable or misconfigured (an alias loop): that is ours
            # to fix, not the sender's fault, so retry rather than bounce.
            self._defer(queue_id, envelope, rcpt, rcpt, f"recipient lookup failed: {exc}")
            return None
        if not targets:
            return self._bounce(queue_id, envelope, rcpt, rcpt, "5.1.1 alias has no targets")
        unique = list(dict.fromkeys(targets))
        states = []
        for index, target in enumerate(unique):
            # Progress is recorded after a copy only if another copy may follow in this
            # pass (see _deliver_target).
            more = not last or any(_undecided(envelope, later) for later in unique[index + 1 :])
            states.append(
                await self._deliver_target(queue_id, envelope, rcpt, target, content, binary, more)
            )
        if None in states:
            return None
        if "relay" in states:
            return "relay"
        return "sent" if "sent" in states else "bounced"

    async def _deliver_target(
        self,
        queue_id: str,
        envelope: SpoolEnvelope,
        rcpt: str,
        target: str,
        content: bytes,
        binary: bool,
        record: bool = True,
    ) -> RecipientState | None:
        """Deliver one target; with ``record``, the copy is durably recorded before return.

        Without ``record`` (no further copy follows in this pass) the copy is recorded by
        what ends the pass: ``remove`` deletes the message, ``defer`` rewrites it with
        this progress. A crash in between repeats this one copy, the same single-copy
        window as a crash between the Maildir write and the progress record.
        """
        # Decisions from an earlier attempt stand; above all a copy is never written twice.
        if target in envelope.delivered:
            return "sent"
        if target in envelope.relay:
            return "relay"
        if target in envelope.bounced:
            return "bounced"
        try:
            # The lookup on the event loop (an indexed read), the Maildir write in a thread.
            local = self._resolver.user_exists(target)
        except Exception as exc:
            self._defer(queue_id, envelope, rcpt, target, f"user lookup failed: {exc}")
            return None
        try:
            if local:
                await self._write_copy(target, content, envelope.mail_from, binary)
        except DeliveryError as exc:
            if exc.permanent:
                return self._bounce(queue_id, envelope, rcpt, target, str(exc))
            self._defer(queue_id, envelope, rcpt, target, str(exc))
            return None
        except Exception as exc:
            self._defer(queue_id, envelope, rcpt, target, f"delivery failed: {exc!r}")
            return None
        if not local:
            envelope.relay[target] = rcpt
            log.info(
                "%s: to=<%s>%s, status=deferred (%s)",
                queue_id,
                target,
                _orig(rcpt, target),
                "queued for the outbound relay" if self._outbound else RELAY_NOT_CONFIGURED,
            )
            return "relay"
        envelope.delivered.append(target)
        log.info(
            "%s: to=<%s>%s, status=sent (delivered to maildir)",
            queue_id,
            target,
            _orig(rcpt, target),
        )
        if record:
            # Recorded before the next copy is written, so a crash cannot repeat this one.
            await self._spool.update_envelope(queue_id, envelope)
        return "sent"

    async def _write_copy(
        self, target: str, content: bytes, return_path: str, binary: bool
    ) -> None:
        # Copies of up to MAX_PAYLOAD bytes are written by the spool's writer process when
        # it has one; bigger ones, and all without it, in the agent's threads.
        writer = self._spool.writer
        if writer is not None and len(content) <= MAX_PAYLOAD:
            await writer.deliver(target, content, return_path=return_path, binary=binary)
            return
        await self._blocking(
            functools.partial(
                self._maildir.deliver, target, content, return_path=return_path, binary=binary
            )
        )

    def _local_domain(self, domain: str) -> bool:
        if self._is_local_domain is None:
            return False
        return self._is_local_domain(domain.lower())

    def _bounce(
        self, queue_id: str, envelope: SpoolEnvelope, rcpt: str, target: str, reason: str
    ) -> RecipientState:
        envelope.bounced[target] = reason
        log.info(
            "%s: to=<%s>%s, status=bounced (%s)", queue_id, target, _orig(rcpt, target), reason
        )
        return "bounced"

    def _defer(
        self, queue_id: str, envelope: SpoolEnvelope, rcpt: str, target: str, reason: str
    ) -> None:
        envelope.errors[rcpt] = reason
        log.info(
            "%s: to=<%s>%s, status=deferred (%s)", queue_id, target, _orig(rcpt, target), reason
        )
