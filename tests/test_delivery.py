"""The delivery agent against a real spool and real Maildirs on tmp_path."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mailgate.core.errors import DeliveryError, UserStoreError
from mailgate.core.spool.delivery import DeliveryAgent
from mailgate.core.spool.envelope import SpoolEnvelope
from mailgate.core.spool.maildir import MaildirStore
from mailgate.core.spool.queue_id import new_queue_id
from mailgate.core.spool.spool import Spool

MESSAGE = b"From: alice@example.org\r\nSubject: test\r\n\r\nhello\r\n"
LOCAL_DOMAINS = {"example.org"}


class FakeResolver:
    """A user store in memory: users, and aliases that expand one level."""

    def __init__(self, users: set[str], aliases: dict[str, list[str]] | None = None) -> None:
        self.users = users
        self.aliases = aliases or {}
        self.failures = 0  # this many resolve() calls fail before answers come back

    def resolve(self, recipient: str) -> list[str] | None:
        if self.failures:
            self.failures -= 1
            raise UserStoreError("database is locked")
        if recipient in self.aliases:
            return self.aliases[recipient]
        return [recipient] if recipient in self.users else None

    def user_exists(self, address: str) -> bool:
        return address in self.users


class FlakyMaildir(MaildirStore):
    """A MaildirStore whose deliveries to some addresses fail a number of times."""

    def __init__(self, root: Path, fail: dict[str, int] | None = None) -> None:
        super().__init__(root, "mx.example.org")
        self.fail = dict(fail or {})
        self.permanent: set[str] = set()
        self.calls: list[str] = []

    def deliver(
        self, address: str, content: bytes, *, return_path: str, binary: bool = False
    ) -> Path:
        self.calls.append(address)
        if address in self.permanent:
            raise DeliveryError("5.2.1 mailbox disabled", permanent=True)
        if self.fail.get(address, 0) > 0:
            self.fail[address] -= 1
            raise DeliveryError("4.3.0 No space left on device", permanent=False)
        return super().deliver(address, content, return_path=return_path, binary=binary)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.spool = Spool(tmp_path / "spool")
        self.maildir = FlakyMaildir(tmp_path / "mail")
        self.resolver = FakeResolver(
            {"bob@example.org", "carol@example.org", "dave@example.org"},
            {"team@example.org": ["bob@example.org", "carol@example.org", "dave@example.org"]},
        )
        self.agents: list[DeliveryAgent] = []

    def agent(self, **options: object) -> DeliveryAgent:
        settings: dict[str, object] = {
            "retry_base": 0.05,
            "retry_max": 0.2,
            "scan_interval": 0,
            "is_local_domain": lambda domain: domain in LOCAL_DOMAINS,
        }
        settings.update(options)
        agent = DeliveryAgent(self.spool, self.maildir, self.resolver, **settings)  # type: ignore[arg-type]
        self.agents.append(agent)
        return agent

    async def store(self, rcpts: list[str], sender: str = "alice@example.org") -> str:
        envelope = SpoolEnvelope(new_queue_id(), sender, rcpts)
        await self.spool.store(envelope, MESSAGE)
        return envelope.queue_id

    def mailbox(self, address: str) -> list[bytes]:
        local, _, domain = address.partition("@")
        new = self.tmp_path / "mail" / domain / local / "new"
        if not new.is_dir():
            return []
        return [(new / name).read_bytes() for name in sorted(os.listdir(new))]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    for agent in h.agents:
        await agent.stop()
    h.spool.close()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_delivers_and_removes_from_spool(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.delivery")
    agent = harness.agent()
    await agent.start()
    queue_id = await harness.store(["bob@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: f"{queue_id}: removed" in caplog.text)
    assert harness.spool.list_ids() == []
    (copy,) = harness.mailbox("bob@example.org")
    assert copy.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: bob@example.org\n")
    assert copy.endswith(b"\nhello\n")
    assert f"{queue_id}: to=<bob@example.org>, status=sent (delivered to maildir)" in caplog.text
    assert all(r.name == "mailgate.delivery" for r in caplog.records if queue_id in r.message)


async def test_start_delivers_what_was_spooled_before(harness: Harness) -> None:
    ids = [await harness.store(["bob@example.org"]) for _ in range(5)]
    assert sorted(harness.spool.list_ids()) == sorted(ids)
    await harness.agent().start()
    await eventually(lambda: harness.spool.list_ids() == [])
    assert len(harness.mailbox("bob@example.org")) == 5


async def test_scan_picks_up_messages_nobody_submitted(harness: Harness) -> None:
    agent = harness.agent(scan_interval=0.05)
    await agent.start()
    await harness.store(["bob@example.org"])  # the SMTP session died before submit()
    await eventually(lambda: harness.spool.list_ids() == [])
    assert len(harness.mailbox("bob@example.org")) == 1


async def test_alias_delivers_each_member_once(harness: Harness) -> None:
    agent = harness.agent()
    await agent.start()
    # The alias and a direct recipient reach bob twice: one copy.
    agent.submit(await harness.store(["team@example.org", "bob@example.org"]))
    await eventually(lambda: harness.spool.list_ids() == [])
    for user in ("bob@example.org", "carol@example.org", "dave@example.org"):
        (copy,) = harness.mailbox(user)
        assert f"Delivered-To: {user}\n".encode() in copy


async def test_alias_to_remote_address_stays_deferred(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.delivery")
    harness.resolver.aliases["fwd@example.org"] = ["bob@example.org", "bob@elsewhere.example"]
    agent = harness.agent()
    await agent.start()
    queue_id = await harness.store(["fwd@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: harness.spool.list_ids("deferred") == [queue_id])
    await agent.stop()

    assert len(harness.mailbox("bob@example.org")) == 1
    envelope, content = harness.spool.load(queue_id)
    assert content == MESSAGE
    assert envelope.relay == {"bob@elsewhere.example": "fwd@example.org"}
    assert envelope.done == {"fwd@example.org": "relay"}
    assert envelope.awaiting_outbound() and not envelope.pending_recipients()
    assert (
        f"{queue_id}: to=<bob@elsewhere.example>, orig_to=<fwd@example.org>, "
        "status=deferred (outbound relay not configured)" in caplog.text
    )

    # A restart neither drops it nor delivers the local copy again.
    again = harness.agent()
    await again.start()
    await asyncio.sleep(0.2)
    assert harness.spool.list_ids("deferred") == [queue_id]
    assert len(harness.mailbox("bob@example.org")) == 1


async def test_relayed_recipient_of_authenticated_user_is_kept(harness: Harness) -> None:
    agent = harness.agent()
    await agent.start()
    queue_id = await harness.store(["friend@remote.example", "bob@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: harness.spool.list_ids("deferred") == [queue_id])
    envelope, _ = harness.spool.load(queue_id)
    assert envelope.relay == {"friend@remote.example": "friend@remote.example"}
    assert envelope.done == {"friend@remote.example": "relay", "bob@example.org": "sent"}


async def test_unknown_local_user_bounces_and_waits_for_the_bounce(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.delivery")
    agent = harness.agent()
    await agent.start()
    queue_id = await harness.store(["gone@example.org", "bob@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: harness.spool.list_ids("deferred") == [queue_id])
    envelope, _ = harness.spool.load(queue_id)
    assert envelope.bounced == {"gone@example.org": "5.1.1 unknown user"}
    assert envelope.done["gone@example.org"] == "bounced"
    assert f"{queue_id}: to=<gone@example.org>, status=bounced (5.1.1 unknown user)" in caplog.text
    assert len(harness.mailbox("bob@example.org")) == 1


async def test_bounce_to_null_sender_is_not_kept(harness: Harness) -> None:
    agent = harness.agent()
    await agent.start()
    agent.submit(await harness.store(["gone@example.org"], sender=""))
    await eventually(lambda: harness.spool.list_ids() == [])


async def test_permanent_mailbox_failure_is_recorded_as_bounce(harness: Harness) -> None:
    harness.maildir.permanent.add("carol@example.org")
    agent = harness.agent()
    await agent.start()
    queue_id = await harness.store(["carol@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: harness.spool.list_ids("deferred") == [queue_id])
    envelope, _ = harness.spool.load(queue_id)
    assert envelope.bounced == {"carol@example.org": "5.2.1 mailbox disabled"}
    assert harness.maildir.calls == ["carol@example.org"]  # never retried


async def test_full_disk_defers_and_retries_with_backoff(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.delivery")
    harness.maildir.fail["bob@example.org"] = 3
    agent = harness.agent(retry_base=0.1, retry_max=10.0)
    await agent.start()
    queue_id = await harness.store(["bob@example.org"])
    agent.submit(queue_id)

    await eventually(lambda: harness.spool.list_ids("deferred") == [queue_id])
    first = harness.spool.info(queue_id).envelope
    assert first.attempts == 1
    assert first.errors == {"bob@example.org": "4.3.0 No space left on device"}
    assert first.next_attempt > time.time()
    assert harness.mailbox("bob@example.org") == []

    await eventually(lambda: harness.spool.list_ids() == [], within=10)
    assert len(harness.mailbox("bob@example.org")) == 1
    assert harness.maildir.calls == ["bob@example.org"] * 4
    assert (
        f"{queue_id}: to=<bob@example.org>, status=deferred (4.3.0 No space left on device)"
        in caplog.text
    )


async def test_backoff_doubles_up_to_the_maximum(harness: Harness) -> None:
    harness.maildir.fail["bob@example.org"] = 100
    agent = harness.agent(retry_base=100.0, retry_max=350.0)
    await agent.start()
    queue_id = await harness.store(["bob@example.org"])
    delays = []
    for attempt in range(1, 5):
        agent.submit(queue_id)  # an explicit submit runs a deferred message at once

        def attempted(n: int = attempt) -> bool:
            return harness.spool.info(queue_id).envelope.attempts == n

        await eventually(attempted)
        delays.append(round(harness.spool.info(queue_id).envelope.next_attempt - time.time()))
    assert delays == [100, 200, 350, 350]
    assert harness.spool.list_ids("deferred") == [queue_id]


async def test_user_store_failure_is_temporary(harness: Harness) -> None:
    harness.resolver.failures = 2
    agent = harness.agent()
    await agent.start()
    queue_id = await harness.store(["bob@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: harness.spool.list_ids() == [])
    assert len(harness.mailbox("bob@example.org")) == 1


async def test_deferred_retry_survives_a_restart(harness: Harness) -> None:
    harness.maildir.fail["bob@example.org"] = 1
    agent = harness.agent(retry_base=30.0)
    await agent.start()
    queue_id = await harness.store(["bob@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: harness.spool.list_ids("deferred") == [queue_id])
    await agent.stop()

    # The next process finds the message deferred and retries it when it is due.
    envelope, _ = harness.spool.load(queue_id)
    envelope.next_attempt = time.time() + 0.1
    await harness.spool.update_envelope(queue_id, envelope)
    await harness.agent().start()
    await asyncio.sleep(0.05)
    assert harness.spool.list_ids() == [queue_id]  # not before it is due
    await eventually(lambda: harness.spool.list_ids() == [])
    assert len(harness.mailbox("bob@example.org")) == 1


async def test_progress_is_recorded_so_a_restart_skips_delivered_targets(
    harness: Harness,
) -> None:
    harness.maildir.fail["dave@example.org"] = 1
    agent = harness.agent(retry_base=30.0)
    await agent.start()
    queue_id = await harness.store(["team@example.org"])
    agent.submit(queue_id)
    await eventually(lambda: harness.spool.list_ids("deferred") == [queue_id])
    await agent.stop()
    envelope, _ = harness.spool.load(queue_id)
    assert envelope.delivered == ["bob@example.org", "carol@example.org"]
    assert envelope.pending_recipients() == ["team@example.org"]

    envelope.next_attempt = 0.0
    await harness.spool.update_envelope(queue_id, envelope)
    await harness.agent().start()
    await eventually(lambda: harness.spool.list_ids() == [])
    for user in ("bob@example.org", "carol@example.org", "dave@example.org"):
        assert len(harness.mailbox(user)) == 1


async def test_recorded_delivery_is_not_repeated(harness: Harness) -> None:
    envelope = SpoolEnvelope(new_queue_id(), "alice@example.org", ["team@example.org"])
    envelope.delivered = ["bob@example.org"]
    await harness.spool.store(envelope, MESSAGE)
    await harness.agent().start()
    await eventually(lambda: harness.spool.list_ids() == [])
    assert harness.mailbox("bob@example.org") == []
    assert len(harness.mailbox("carol@example.org")) == 1


CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from mailgate.core.spool.delivery import DeliveryAgent
    from mailgate.core.spool.maildir import MaildirStore
    from mailgate.core.spool.spool import Spool

    class Resolver:
        def resolve(self, rcpt):
            return [f"user{n}@example.org" for n in range(6)]
        def user_exists(self, address):
            return True

    class Dying(MaildirStore):
        count = 0
        def deliver(self, address, content, *, return_path, binary=False):
            Dying.count += 1
            if Dying.count == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().deliver(address, content, return_path=return_path, binary=binary)

    async def main():
        root = Path(sys.argv[1])
        agent = DeliveryAgent(Spool(root / "spool"), Dying(root / "mail", "mx"), Resolver())
        await agent.start()
        await asyncio.sleep(30)

    asyncio.run(main())
    """
)


async def test_kill_9_mid_message_resumes_without_duplicates(harness: Harness) -> None:
    queue_id = await harness.store(["all@example.org"])
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_SCRIPT, str(harness.tmp_path)
    )
    assert await asyncio.wait_for(child.wait(), 20) == -9
    users = [f"user{n}@example.org" for n in range(6)]
    assert [len(harness.mailbox(u)) for u in users] == [1, 1, 1, 0, 0, 0]

    harness.resolver.users.update(users)
    harness.resolver.aliases["all@example.org"] = users
    Spool(harness.tmp_path / "spool")  # the new process's recovery
    await harness.agent().start()
    await eventually(lambda: harness.spool.list_ids() == [])
    assert [len(harness.mailbox(u)) for u in users] == [1] * 6
    assert queue_id not in harness.spool.list_ids()


async def test_corrupt_spool_file_is_set_aside_and_others_still_flow(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    broken = harness.spool.incoming_dir / "BROKEN0000000001"
    broken.write_bytes(b"MGSPOOL1 12 5\n{not json}!\nhello")
    good = await harness.store(["bob@example.org"])
    await harness.agent().start()
    await eventually(lambda: harness.spool.list_ids() == [])
    assert (harness.spool.corrupt_dir / broken.name).exists()
    assert str(broken) in caplog.text
    assert len(harness.mailbox("bob@example.org")) == 1
    assert good not in harness.spool.list_ids()


async def test_stop_finishes_in_flight_and_leaves_the_rest_spooled(harness: Harness) -> None:
    release = threading.Event()
    started = threading.Event()
    real_deliver = harness.maildir.deliver

    def slow(address: str, content: bytes, *, return_path: str, binary: bool = False) -> Path:
        started.set()
        release.wait(5)
        return real_deliver(address, content, return_path=return_path, binary=binary)

    harness.maildir.deliver = slow  # type: ignore[method-assign]
    agent = harness.agent(concurrency=1)
    await agent.start()
    ids = [await harness.store(["bob@example.org"]) for _ in range(4)]
    for queue_id in ids:
        agent.submit(queue_id)
    await asyncio.to_thread(started.wait, 5)
    stopping = asyncio.create_task(agent.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waits for the message being delivered
    release.set()
    await stopping
    assert len(harness.mailbox("bob@example.org")) == 1
    assert sorted(harness.spool.list_ids("incoming")) == sorted(ids[1:])

    agent.submit(ids[1])  # ignored after stop: stays spooled for the next start
    harness.maildir.deliver = real_deliver  # type: ignore[method-assign]
    await harness.agent().start()
    await eventually(lambda: harness.spool.list_ids() == [])
    assert len(harness.mailbox("bob@example.org")) == 4


async def test_many_messages_with_concurrency(harness: Harness) -> None:
    agent = harness.agent(concurrency=8)
    await agent.start()
    ids = await asyncio.gather(*(harness.store(["bob@example.org"]) for _ in range(100)))
    for queue_id in ids:
        agent.submit(queue_id)
        agent.submit(queue_id)  # a duplicate submit is harmless
    await eventually(lambda: harness.spool.list_ids() == [], within=20)
    assert len(harness.mailbox("bob@example.org")) == 100


# -- the hold queue and scan_now -------------------------------------------------------


async def hold(harness: Harness, rcpts: list[str]) -> str:
    envelope = SpoolEnvelope(new_queue_id(), "alice@example.org", rcpts)
    await harness.spool.hold(envelope, MESSAGE, "spam score 12.5")
    return envelope.queue_id


async def test_held_messages_are_never_delivered(harness: Harness) -> None:
    held = await hold(harness, ["carol@example.org"])  # there before start(): recovery
    agent = harness.agent(scan_interval=0.02)
    await agent.start()
    agent.submit(held)  # even a submit of a held id finds nothing to deliver
    agent.scan_now()
    active = await harness.store(["bob@example.org"])
    agent.submit(active)
    await eventually(lambda: harness.spool.list_ids() == [held])
    await asyncio.sleep(0.15)  # several periodic scans
    assert harness.spool.list_ids("hold") == [held]
    assert harness.mailbox("carol@example.org") == []
    assert harness.maildir.calls == ["bob@example.org"]
    assert harness.spool.load(held)[0].attempts == 0


async def test_released_mail_is_delivered_after_scan_now(harness: Harness) -> None:
    queue_id = await hold(harness, ["carol@example.org"])
    agent = harness.agent(scan_interval=0)  # no periodic scan: only scan_now finds it
    await agent.start()
    operator = Spool(harness.tmp_path / "spool", recover=False)  # as `mailgate queue` does
    await operator.release(queue_id)
    operator.close()
    await asyncio.sleep(0.1)
    assert harness.spool.list_ids("incoming") == [queue_id]  # nobody told the agent yet

    agent.scan_now()
    await eventually(lambda: harness.spool.list_ids() == [])
    (copy,) = harness.mailbox("carol@example.org")
    assert copy.endswith(b"\nhello\n")


async def test_scan_now_from_a_signal_handler_and_from_another_thread(
    harness: Harness,
) -> None:
    agent = harness.agent(scan_interval=0)
    await agent.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, agent.scan_now)  # what `mailgate serve` does
    try:
        await harness.store(["bob@example.org"])
        os.kill(os.getpid(), signal.SIGUSR1)
        await eventually(lambda: harness.spool.list_ids() == [])
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)

    await harness.store(["bob@example.org"])
    thread = threading.Thread(target=agent.scan_now)
    thread.start()
    thread.join()
    await eventually(lambda: harness.spool.list_ids() == [])
    assert len(harness.mailbox("bob@example.org")) == 2


async def test_scan_now_during_a_scan_scans_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = harness.agent(scan_interval=0)
    await agent.start()
    listed = threading.Event()
    go_on = threading.Event()
    scans: list[list[str]] = []
    real_list_ids = harness.spool.list_ids

    def slow_list_ids(queue: object = None) -> list[str]:
        ids = real_list_ids(queue)  # type: ignore[arg-type]
        scans.append(ids)
        listed.set()
        go_on.wait(5)
        return ids

    monkeypatch.setattr(harness.spool, "list_ids", slow_list_ids)
    first = await harness.store(["bob@example.org"])
    agent.scan_now()
    await asyncio.to_thread(listed.wait, 5)
    # Arrives after the running scan listed incoming/: only a second scan can find it.
    second = await harness.store(["carol@example.org"])
    for _ in range(20):
        agent.scan_now()  # coalesced into that one further scan
    await asyncio.sleep(0.05)
    go_on.set()
    await eventually(lambda: real_list_ids() == [])
    assert scans[0] == [first] and second in scans[1]
    assert len(scans) == 2
    assert len(harness.mailbox("carol@example.org")) == 1


async def test_scan_now_outside_start_and_stop_is_ignored(harness: Harness) -> None:
    agent = harness.agent(scan_interval=0)
    agent.scan_now()  # never started: nothing to hand the work to
    await harness.store(["bob@example.org"])
    await agent.start()
    await eventually(lambda: harness.spool.list_ids() == [])
    await agent.stop()
    queue_id = await harness.store(["bob@example.org"])
    agent.scan_now()
    await asyncio.sleep(0.1)
    assert harness.spool.list_ids() == [queue_id]


async def test_progress_is_recorded_only_when_another_copy_follows(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded: list[list[str]] = []
    real_update = harness.spool.update_envelope

    async def update(queue_id: str, envelope: SpoolEnvelope) -> None:
        recorded.append(list(envelope.delivered))
        await real_update(queue_id, envelope)

    monkeypatch.setattr(harness.spool, "update_envelope", update)
    agent = harness.agent()
    await agent.start()
    # One copy: remove() follows at once, so no rewrite of the spool file.
    agent.submit(await harness.store(["bob@example.org"]))
    await eventually(lambda: harness.spool.list_ids() == [])
    assert recorded == []
    # Three copies through an alias: recorded after the first two, not after the last.
    agent.submit(await harness.store(["team@example.org"]))
    await eventually(lambda: harness.spool.list_ids() == [])
    assert recorded == [["bob@example.org"], ["bob@example.org", "carol@example.org"]]
    assert len(harness.mailbox("dave@example.org")) == 1


async def test_unrecorded_last_copy_is_kept_by_defer(harness: Harness) -> None:
    # carol's mailbox fails after bob's copy, the last one written in this pass: the
    # move to deferred/ must carry bob's copy, or the retry would write it again.
    harness.maildir.fail["carol@example.org"] = 1
    agent = harness.agent()
    await agent.start()
    agent.submit(await harness.store(["carol@example.org", "bob@example.org"]))
    await eventually(lambda: harness.spool.list_ids() == [], within=10)
    assert harness.maildir.calls.count("bob@example.org") == 1
    assert len(harness.mailbox("bob@example.org")) == 1
    assert len(harness.mailbox("carol@example.org")) == 1


async def test_message_handed_over_in_memory_is_delivered_without_reading_it_back(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.delivery")
    agent = harness.agent()
    await agent.start()
    envelope = SpoolEnvelope(new_queue_id(), "alice@example.org", ["bob@example.org"])
    await harness.spool.store(envelope, MESSAGE)
    loads: list[str] = []
    real_load = harness.spool.load

    def load(queue_id: str, **options: bool) -> tuple[SpoolEnvelope, bytes]:
        loads.append(queue_id)
        return real_load(queue_id, **options)

    monkeypatch.setattr(harness.spool, "load", load)
    agent.submit(envelope.queue_id, (envelope, MESSAGE))
    await eventually(lambda: f"{envelope.queue_id}: removed" in caplog.text)
    assert loads == []
    (copy,) = harness.mailbox("bob@example.org")
    assert copy.endswith(b"\nhello\n")
    assert harness.spool.list_ids() == []


async def test_handed_over_message_put_on_hold_meanwhile_is_not_delivered(
    harness: Harness,
) -> None:
    agent = harness.agent()
    await agent.start()
    envelope = SpoolEnvelope(new_queue_id(), "alice@example.org", ["bob@example.org"])
    await harness.spool.store(envelope, MESSAGE)
    # The operator holds it before delivery gets to it: the copy in memory is stale.
    await harness.spool.hold_queued(envelope.queue_id, "operator")
    agent.submit(envelope.queue_id, (envelope, MESSAGE))
    await asyncio.sleep(0.3)
    assert harness.mailbox("bob@example.org") == []
    assert harness.spool.list_ids("hold") == [envelope.queue_id]


def test_default_concurrency_is_four(harness: Harness) -> None:
    assert harness.agent()._concurrency == 4
