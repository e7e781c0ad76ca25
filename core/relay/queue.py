"""The outbound queue and its scheduler: remote targets from spool/deferred/ to next hops.

Local delivery hands a message over (``submit``) once its local work is done and remote
targets or notifications are left. Every remote target becomes an entry of the envelope's
``remote`` map with its own state (queued, deferred, sent, bounced), attempts, next
attempt and last reply, all in the spool file itself. A pass over a message:

1. targets due now are grouped by destination (domain, or the route's next hop) and
   delivered (``attempt``), at most ``relay_destination_concurrency`` messages at a time
   per destination and ``relay_concurrency`` in all;
2. a target the next hop took is recorded durably *at once*, right after the 250 and
   before anything else (the next transaction, QUIT, other targets): a crash can repeat a
   delivery only if it falls between the remote 250 and the end of that fsync;
3. a temporary failure is retried after ``relay_retry_base`` * 2^(attempts-1), capped at
   ``relay_retry_max``, with ±20% jitter so that retries of many messages spread out;
   after ``relay_max_lifetime`` it turns into a failure (status 4.4.7);
4. notices owed to the sender (failure, delay after ``relay_delay_warning`` when NOTIFY
   asked for delays, success when asked and not passed on) are sent (``notices``);
5. a message with nothing left is removed; otherwise its next wake-up is scheduled.

Loop protection: a message with more than ``max_hops`` Received headers is not relayed
but bounced (5.4.6). Messages on hold are never touched.

Routes of transport ``hold`` keep their targets queued (until ``relay_max_lifetime``)
for the domain's customer, who takes them with ATRN (``turn``, RFC 2645). ETRN
(``flush_matching``, RFC 1985) asks for an attempt now. A message sent with DELIVERBY
(RFC 2852) is returned at its deadline (R mode, 5.4.7) or reported delayed (N mode).

Operator requests (``mailgate queue flush|bounce``) arrive as files in
``spool/requests/`` plus SIGUSR1 (``flush`` here), so no other process ever rewrites a
spool file the relay may be writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

from mailgate.core.config import Config
from mailgate.core.dns import Resolver
from mailgate.core.errors import SpoolError
from mailgate.core.relay.attempt import (
    AttemptSettings,
    Outcome,
    attempt,
    deliver_over,
    header_block,
)
from mailgate.core.relay.client import SmtpClient
from mailgate.core.relay.notices import send_notices
from mailgate.core.relay.pool import ConnectionPool
from mailgate.core.relay.routes import Router
from mailgate.core.relay.tlspolicy import TlsPolicies
from mailgate.core.smtp.deliverby import EXPIRED_STATUS, by_of
from mailgate.core.smtp.dsnparams import notify_of
from mailgate.core.spool.envelope import NoticeKind, RemoteState, SpoolEnvelope
from mailgate.core.spool.queue_id import is_valid_queue_id
from mailgate.core.spool.spool import CorruptSpoolFile, NoSuchMessage, Spool

log = logging.getLogger("mailgate.relay")

_RECEIVED = re.compile(rb"^Received:", re.IGNORECASE | re.MULTILINE)
_MAX_DOUBLINGS = 30
JITTER = 0.2
REQUESTS_DIR = "requests"


def backoff(attempts: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds until the next try after ``attempts`` failed ones: exponential, jittered."""
    delay = min(base * float(2 ** min(max(attempts - 1, 0), _MAX_DOUBLINGS)), cap)
    return delay * rng.uniform(1 - JITTER, 1 + JITTER)


def request_path(spool_root: Path, queue_id: str, action: str) -> Path:
    """Where ``mailgate queue flush|bounce`` leaves a request for the running relay."""
    return spool_root / REQUESTS_DIR / f"{queue_id}.{action}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class RelayAgent:
    """Delivers the outbound queue; one per ``mailgate serve``."""

    def __init__(
        self,
        spool: Spool,
        config: Config,
        resolver: Resolver,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._spool = spool
        self._config = config
        self._resolver = resolver
        self.router = Router(config.relay_routes, port=config.relay_port, tls=config.relay_tls)
        self._pool = ConnectionPool(config.relay_connection_cache_time)
        self._settings = AttemptSettings(
            helo=config.hostname,
            connect_timeout=config.relay_connect_timeout,
            command_timeout=config.relay_command_timeout,
        )
        self._rng = rng or random.Random()
        # MTA-STS, DANE and TLS-RPT for MX delivery (docs/relay.md).
        self._policies = TlsPolicies.from_config(config, resolver)
        self._requests = spool.root / REQUESTS_DIR
        # Set by serve: hands a spooled notification to local delivery.
        self.local_submit: Callable[[str], None] = lambda queue_id: None
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._again: set[str] = set()
        self._forced: set[str] = set()
        self._bounce: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._turning: set[str] = set()  # hold routes (domains) an ATRN session is emptying
        self.sent = 0  # targets delivered since start, for the log and tests

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._requests.mkdir, mode=0o700, exist_ok=True)
        self._workers = [
            asyncio.create_task(self._worker(), name=f"mailgate-relay-{n}")
            for n in range(self._config.relay_concurrency)
        ]
        waiting = await asyncio.to_thread(self._scan)
        now = time.time()
        for queue_id, when in waiting:
            self._schedule(queue_id, when - now)
        await self._take_requests()
        if waiting:
            log.info("relay: %d message(s) in the outbound queue", len(waiting))

    async def stop(self) -> None:
        """Finish the attempts in flight; everything else stays queued in the spool."""
        if not self._running:
            return
        self._running = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queued.clear()
        for _ in self._workers:
            self._queue.put_nowait(None)
        # An attempt may wait minutes for a slow server; past the grace it is cancelled.
        # Nothing is lost: what a next hop took is recorded the moment it said 250.
        _, pending = await asyncio.wait(self._workers, timeout=self._config.shutdown_grace or 1)
        for worker in pending:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for task in list(self._tasks):
            task.cancel()
        await self._pool.close()
        if self._policies is not None:
            self._policies.close()

    def submit(self, queue_id: str, *, force: bool = False) -> None:
        """Look at ``queue_id`` soon (local delivery calls this). Never blocks."""
        if not self._running:
            return
        if force:
            self._forced.add(queue_id)
        timer = self._timers.pop(queue_id, None)
        if timer is not None:
            timer.cancel()
        if queue_id in self._active:
            self._again.add(queue_id)
            return
        if queue_id in self._queued:
            return
        self._queued.add(queue_id)
        self._queue.put_nowait(queue_id)

    def flush(self) -> None:
        """Act on operator requests now (from a signal handler or any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._begin_requests)

    def _begin_requests(self) -> None:
        if self._running:
            task = asyncio.create_task(self._take_requests())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _take_requests(self) -> None:
        try:
            names = await asyncio.to_thread(os.listdir, self._requests)
        except OSError as exc:
            log.warning("relay: cannot read %s: %s", self._requests, exc)
            return
        flush_all = False
        for name in sorted(names):
            queue_id, _, action = name.partition(".")
            with contextlib.suppress(OSError):
                os.unlink(self._requests / name)
            if queue_id == "ALL" and action == "flush":
                flush_all = True
            elif is_valid_queue_id(queue_id) and action in ("flush", "bounce"):
                if action == "bounce":
                    self._bounce.add(queue_id)
                log.info("%s: operator requested %s", queue_id, action)
                self.submit(queue_id, force=True)
        if flush_all:
            ids = await asyncio.to_thread(self._spool.list_ids, "deferred")
            log.info("relay: flush requested: %d deferred message(s)", len(ids))
            for queue_id in ids:
                self.submit(queue_id, force=True)

    def _scan(self) -> list[tuple[str, float]]:
        """Messages in deferred/ that are the relay's, and when each is due."""
        waiting: list[tuple[str, float]] = []
        for queue_id in self._spool.list_ids("deferred"):
            try:
                envelope = self._spool.info(queue_id, include_held=False).envelope
            except SpoolError:
                continue
            if envelope.pending_recipients():
                continue  # local delivery's; it hands the message over when done
            # Also those with nothing left: a crash after the last record, before the
            # removal. The pass removes them.
            waiting.append((queue_id, self._due(envelope)))
        return waiting

    def _due(self, envelope: SpoolEnvelope) -> float:
        """When the message next needs a pass: its earliest retry or delay notice."""
        times = [
            state.next_attempt
            for target, state in envelope.remote.items()
            if target in envelope.relay and not state.final
        ]
        if any(target not in envelope.remote for target in envelope.relay):
            times.append(0.0)
        if envelope.notices_due():
            times.append(0.0)
        by = by_of(envelope.mail_options)
        if by is not None and times and envelope.received_at + by.seconds > time.time():
            # The deadline needs a pass of its own: a return (R) or a delay notice (N).
            times.append(envelope.received_at + by.seconds)
        return min(times, default=0.0)

    def _schedule(self, queue_id: str, delay: float) -> None:
        if not self._running:
            return
        old = self._timers.pop(queue_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[queue_id] = loop.call_later(max(0.0, delay), self._fire, queue_id)

    def _fire(self, queue_id: str) -> None:
        self._timers.pop(queue_id, None)
        self.submit(queue_id)

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
                log.info("%s: removed from the spool during relay", queue_id)
            except Exception:
                # The spool holds the message and its recorded progress: retry later.
                log.exception("%s: relay failed unexpectedly; retry later", queue_id)
                self._schedule(queue_id, self._config.relay_retry_base)
            finally:
                self._active.discard(queue_id)
                if queue_id in self._again:
                    self._again.discard(queue_id)
                    self.submit(queue_id)

    def _limit(self, key: str) -> asyncio.Semaphore:
        limit = self._limits.get(key)
        if limit is None:
            limit = self._limits[key] = asyncio.Semaphore(
                self._config.relay_destination_concurrency
            )
        return limit

    # -- ETRN and ATRN ------------------------------------------------------------------

    def _pending(self, wanted: Callable[[str], bool]) -> list[str]:
        """Deferred messages with an unfinished remote target whose domain is ``wanted``."""
        found = []
        for queue_id in self._spool.list_ids("deferred"):
            try:
                envelope = self._spool.info(queue_id, include_held=False).envelope
            except SpoolError:
                continue
            targets = [t for t in envelope.relay if not _final(envelope, t)]
            if any(wanted(domain_of(target)) for target in targets):
                found.append(queue_id)
        return found

    async def flush_matching(self, wanted: Callable[[str], bool]) -> int:
        """ETRN: attempt now every message with a waiting target for a ``wanted`` domain.

        Targets of hold routes are not attempted (they wait for ATRN); the caller keeps
        such domains out of ``wanted``. Returns the number of messages started.
        """
        ids = await asyncio.to_thread(self._pending, wanted)
        for queue_id in ids:
            self.submit(queue_id, force=True)
        return len(ids)

    def atrn_domains(self, user: str) -> list[str]:
        """The hold routes' domains ``user`` may take with ATRN."""
        user = user.lower()
        return [
            route.domain
            for route in self.router.hold_routes()
            if user in (name.lower() for name in route.atrn_users)
        ]

    def claim(self, domains: list[str]) -> list[str]:
        """Reserve ``domains`` for one ATRN session; the busy ones if any (nothing reserved).

        Checked and taken in one step on the event loop, so two sessions of the same
        customer never empty a domain at the same time. ``turn`` or ``release`` frees them.
        """
        busy = [domain for domain in domains if domain in self._turning]
        if not busy:
            self._turning.update(domains)
        return busy

    def release(self, domains: list[str]) -> None:
        self._turning.difference_update(domains)

    def _held_for(self, domains: set[str]) -> Callable[[str], bool]:
        def wanted(domain: str) -> bool:
            route = self.router.find(domain)
            return route is not None and route.transport == "hold" and route.domain in domains

        return wanted

    async def held_messages(self, domains: list[str]) -> list[str]:
        """Messages with targets waiting for ATRN by ``domains`` (hold routes' domains)."""
        return await asyncio.to_thread(self._pending, self._held_for(set(domains)))

    async def turn(self, client: SmtpClient, domains: list[str]) -> int:
        """ATRN: deliver the mail held for ``domains`` over ``client`` (the turned session).

        Each message is taken from the scheduler while it is sent, exactly as a worker
        would; what the customer refuses temporarily stays held. Returns the number of
        targets delivered.
        """
        wanted = self._held_for(set(domains))
        self._turning.update(domains)  # normally claimed already (``claim``)
        delivered = 0
        try:
            for queue_id in await asyncio.to_thread(self._pending, wanted):
                while queue_id in self._active:
                    await asyncio.sleep(0.05)  # a worker's pass over it ends soon
                self._active.add(queue_id)
                try:
                    delivered += await self._turn_one(client, queue_id, wanted)
                except (NoSuchMessage, CorruptSpoolFile):
                    continue
                finally:
                    self._active.discard(queue_id)
                    if queue_id in self._again:
                        self._again.discard(queue_id)
                        self.submit(queue_id)
                if client.broken:
                    break
        finally:
            self._turning.difference_update(domains)
        return delivered

    async def _turn_one(
        self, client: SmtpClient, queue_id: str, wanted: Callable[[str], bool]
    ) -> int:
        envelope, content = await asyncio.to_thread(self._spool.load, queue_id, include_held=False)
        for target, orig in envelope.relay.items():
            if target not in envelope.remote:
                envelope.remote[target] = RemoteState(orig)
        targets = {
            target: state.orig
            for target, state in envelope.remote.items()
            if not state.final and wanted(domain_of(target))
        }
        if not targets:
            return 0

        async def on_sent(sent: dict[str, Outcome]) -> None:
            for target, outcome in sent.items():
                self._record(envelope, target, outcome)
            await self._spool.update_envelope(queue_id, envelope)

        outcomes = await deliver_over(client, envelope, content, targets, on_sent)
        until = envelope.received_at + self._config.relay_max_lifetime
        for target, outcome in outcomes.items():
            if outcome.kind != "sent":
                self._record(envelope, target, outcome)
                if envelope.remote[target].status == "deferred":
                    envelope.remote[target].next_attempt = until  # held again
        self._expire(envelope)
        await self._notify(envelope, content)
        await self._finish(queue_id, envelope)
        return sum(1 for outcome in outcomes.values() if outcome.kind == "sent")

    # -- one message --------------------------------------------------------------------

    async def _process(self, queue_id: str) -> None:
        forced = queue_id in self._forced
        self._forced.discard(queue_id)
        bounce = queue_id in self._bounce
        self._bounce.discard(queue_id)
        try:
            envelope, content = await asyncio.to_thread(
                self._spool.load, queue_id, include_held=False
            )
        except NoSuchMessage:
            return
        except CorruptSpoolFile as exc:
            log.error("%s: %s", queue_id, exc)
            await self._spool.quarantine(queue_id)
            return
        if envelope.pending_recipients():
            return  # local delivery is not finished; it submits the message when it is
        for target, orig in envelope.relay.items():
            if target not in envelope.remote:
                envelope.remote[target] = RemoteState(orig)
        if bounce:
            self._operator_bounce(envelope)
        self._deliver_by_expired(envelope)
        now = time.time()
        due = [
            target
            for target, state in envelope.remote.items()
            if not state.final and (forced or state.next_attempt <= now)
        ]
        if due:
            hops = len(_RECEIVED.findall(header_block(content)))
            if hops > self._config.max_hops:
                reason = f"too many Received headers ({hops}): mail forwarding loop"
                for target in due:
                    self._record(envelope, target, Outcome("permanent", "5.4.6", reason))
                due = []
        for domain, targets in _by_domain(envelope, due).items():
            if await self._deliver(queue_id, envelope, content, domain, targets):
                return  # the last target was taken: the message is gone from the spool
        self._expire(envelope)
        await self._notify(envelope, content)
        await self._finish(queue_id, envelope)

    async def _deliver(
        self,
        queue_id: str,
        envelope: SpoolEnvelope,
        content: bytes,
        domain: str,
        targets: dict[str, str],
    ) -> bool:
        """Try ``targets`` of one domain; True if that finished the message and removed it."""
        destination = self.router.destination(domain)
        if destination.transport == "hold":
            self._hold(envelope, targets)
            return False
        removed = False

        async def on_sent(sent: dict[str, Outcome]) -> None:
            nonlocal removed
            for target, outcome in sent.items():
                self._record(envelope, target, outcome)
            if _complete(envelope):
                # Nothing is left to send or to notify: removing the file records the
                # 250 as well as rewriting it would (and without its fsyncs). As after
                # a local delivery's last copy, only a crash of the machine before the
                # directory's next fsync can send the message again.
                await self._spool.remove(queue_id, durable=False)
                log.info("%s: removed", queue_id)
                removed = True
            else:
                await self._spool.update_envelope(queue_id, envelope)

        async with self._limit(destination.key):
            outcomes = await attempt(
                envelope,
                content,
                targets,
                destination,
                resolver=self._resolver,
                pool=self._pool,
                settings=self._settings,
                on_sent=on_sent,
                rng=self._rng,
                policies=self._policies,
            )
        for target, outcome in outcomes.items():
            if outcome.kind != "sent":
                self._record(envelope, target, outcome)
        return removed

    def _record(self, envelope: SpoolEnvelope, target: str, outcome: Outcome) -> None:
        state = envelope.remote[target]
        now = time.time()
        state.attempts += 1
        state.first_attempt = state.first_attempt or now
        state.last_attempt = now
        state.last_reply = outcome.reply
        state.last_status = outcome.status
        state.remote_mta = outcome.remote_mta
        orig = "" if state.orig == target else f", orig_to=<{state.orig}>"
        relay = f", relay={outcome.remote_mta}" if outcome.remote_mta else ""
        if outcome.kind == "sent":
            state.status = "sent"
            state.dsn_relayed = outcome.dsn_relayed
            self.sent += 1
            log.info(
                "%s: to=<%s>%s%s, status=sent (%s)",
                envelope.queue_id, target, orig, relay, outcome.reply,
            )  # fmt: skip
        elif outcome.kind == "permanent":
            state.status = "bounced"
            log.info(
                "%s: to=<%s>%s%s, status=bounced (%s %s)",
                envelope.queue_id, target, orig, relay, outcome.status, outcome.reply,
            )  # fmt: skip
        else:
            state.status = "deferred"
            delay = backoff(
                state.attempts,
                self._config.relay_retry_base,
                self._config.relay_retry_max,
                self._rng,
            )
            state.next_attempt = now + delay
            log.info(
                "%s: to=<%s>%s%s, status=deferred (%s %s), attempt %d, next in %.0fs",
                envelope.queue_id, target, orig, relay, outcome.status, outcome.reply,
                state.attempts, delay,
            )  # fmt: skip

    def _operator_bounce(self, envelope: SpoolEnvelope) -> None:
        for target, state in envelope.remote.items():
            if not state.final:
                previous = f" (last: {state.last_reply})" if state.last_reply else ""
                outcome = Outcome(
                    "permanent", "5.0.0", f"returned by the operator{previous}", state.remote_mta
                )
                self._record(envelope, target, outcome)

    def _expire(self, envelope: SpoolEnvelope) -> None:
        lifetime = self._config.relay_max_lifetime
        if time.time() - envelope.received_at < lifetime:
            return
        for target, state in envelope.remote.items():
            if state.status == "deferred":
                state.status = "bounced"
                state.last_status = "4.4.7"
                state.last_reply = f"message expired after {lifetime:.0f}s; last: " + (
                    state.last_reply or "no attempt succeeded"
                )
                log.info(
                    "%s: to=<%s>, status=expired (%s)",
                    envelope.queue_id, target, state.last_reply,
                )  # fmt: skip

    def _hold(self, envelope: SpoolEnvelope, targets: dict[str, str]) -> None:
        """Targets of a hold route wait, untried, for ATRN until the lifetime runs out."""
        until = envelope.received_at + self._config.relay_max_lifetime
        for target in targets:
            state = envelope.remote[target]
            if state.status == "queued":
                log.info("%s: to=<%s>, status=held (waiting for ATRN)", envelope.queue_id, target)
            state.status = "deferred"
            state.last_status = state.last_status or "4.4.1"
            state.last_reply = state.last_reply or "waiting for the domain to connect (ATRN)"
            state.next_attempt = until

    def _deliver_by_expired(self, envelope: SpoolEnvelope) -> None:
        """RFC 2852 R mode: at the deadline, what is not delivered is returned (5.4.7)."""
        by = by_of(envelope.mail_options)
        if by is None or by.mode != "R" or time.time() < envelope.received_at + by.seconds:
            return
        for target, state in envelope.remote.items():
            if state.final:
                continue
            state.status = "bounced"
            state.last_status = EXPIRED_STATUS
            previous = f"; last: {state.last_reply}" if state.last_reply else ""
            state.last_reply = f"delivery time expired (BY={by.seconds};R){previous}"
            log.info(
                "%s: to=<%s>, status=expired (%s)",
                envelope.queue_id, target, state.last_reply,
            )  # fmt: skip

    async def _notify(self, envelope: SpoolEnvelope, content: bytes) -> None:
        due = envelope.notices_due(delay_after=self._config.relay_delay_warning or None)
        due += [item for item in _deliver_by_notices(envelope) if item not in due]
        if not due:
            return
        await send_notices(
            self._spool,
            envelope,
            content,
            due,
            reporting_mta=self._config.hostname,
            lifetime=self._config.relay_max_lifetime,
            submit=self.local_submit,
        )

    async def _finish(self, queue_id: str, envelope: SpoolEnvelope) -> None:
        if not envelope.awaiting_outbound():
            await self._spool.remove(queue_id)
            log.info("%s: removed", queue_id)
            return
        await self._spool.defer(queue_id, envelope)
        due = self._due(envelope)
        warning = self._config.relay_delay_warning
        if (
            warning
            and envelope.received_at + warning > time.time()
            and any(
                not state.final and "delay" not in envelope.notified.get(target, [])
                for target, state in envelope.remote.items()
            )
        ):
            due = min(due, envelope.received_at + warning)
        self._schedule(queue_id, due - time.time())


def _by_domain(envelope: SpoolEnvelope, targets: list[str]) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for target in targets:
        groups.setdefault(domain_of(target), {})[target] = envelope.remote[target].orig
    return groups


def _complete(envelope: SpoolEnvelope) -> bool:
    """Whether nothing is left for a message: every target final and no notice owed."""
    return (
        not envelope.pending_recipients()
        and not envelope.awaiting_outbound()
        and not _deliver_by_notices(envelope)
    )


def _deliver_by_notices(envelope: SpoolEnvelope) -> list[tuple[str, NoticeKind]]:
    """Notices DELIVERBY asks for beyond NOTIFY (RFC 2852 section 4).

    N mode: a delay notice once the deadline has passed with targets still waiting. T
    (trace): a notice for every target relayed to a next hop that did not take the BY
    parameter over. ``NOTIFY=NEVER`` still means never.
    """
    by = by_of(envelope.mail_options)
    if by is None or envelope.mail_from == "":
        return []
    passed = time.time() >= envelope.received_at + by.seconds
    due: list[tuple[str, NoticeKind]] = []
    for target, state in envelope.remote.items():
        if notify_of(envelope.options_of(state.orig)) == frozenset():
            continue
        notified = envelope.notified.get(target, [])
        if by.mode == "N" and passed and not state.final and "delay" not in notified:
            due.append((target, "delay"))
        elif (
            by.trace
            and state.status == "sent"
            and not state.dsn_relayed
            and "success" not in notified
        ):
            due.append((target, "success"))
    return due


def _final(envelope: SpoolEnvelope, target: str) -> bool:
    state = envelope.remote.get(target)
    return state is not None and state.final
