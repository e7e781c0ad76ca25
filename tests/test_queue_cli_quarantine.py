"""`mailgate queue quarantine ...` and the hold-aware `queue` commands, run as subprocesses."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.core.spool.envelope import SpoolEnvelope
from mailgate.core.spool.queue_id import new_queue_id
from mailgate.core.spool.spool import Spool

from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway

MESSAGE = b"From: alice@example.org\r\nSubject: quarantined\r\n\r\nbody \xe9 bytes\r\n"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}


def mailgate(data_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILGATE, *argv, "--data-dir", str(data_dir)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )


def envelope(sender: str = "alice@example.org", rcpts: list[str] | None = None) -> SpoolEnvelope:
    return SpoolEnvelope(
        new_queue_id(),
        sender,
        rcpts or ["bob@example.org", "carol@example.org"],
        received_at=1_700_000_000.0,
    )


def hold(root: Path, reason: str, env: SpoolEnvelope | None = None) -> str:
    env = env or envelope()
    spool = Spool(root)
    try:
        asyncio.run(spool.hold(env, MESSAGE, reason))
    finally:
        spool.close()
    return env.queue_id


def store(root: Path) -> str:
    env = envelope(rcpts=["dave@example.org"])
    spool = Spool(root)
    try:
        asyncio.run(spool.store(env, MESSAGE))
    finally:
        spool.close()
    return env.queue_id


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def spool_dir(data_dir: Path) -> Path:
    return data_dir / "spool"


# -- list and show ---------------------------------------------------------------------


def test_quarantine_list_shows_only_held_messages(data_dir: Path, spool_dir: Path) -> None:
    first = hold(spool_dir, "virus found: Eicar-Test-Signature")
    second = hold(spool_dir, "rule 'big-attachments'\nmatched", envelope(sender=""))
    active = store(spool_dir)

    result = mailgate(data_dir, "queue", "quarantine", "list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert first in out and second in out and active not in out
    assert "-----Held Time------" in out and "----Arrival Time----" in out
    arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(1_700_000_000.0))
    assert out.count(arrival) == 2
    assert "alice@example.org" in out and "MAILER-DAEMON" in out
    assert "bob@example.org" in out and "carol@example.org" in out
    assert "reason: virus found: Eicar-Test-Signature" in out
    assert "reason: rule 'big-attachments'\\x0amatched" in out  # one line, escaped
    assert "in 2 held Requests." in out

    result = mailgate(data_dir, "queue", "list")
    assert result.returncode == 0, result.stderr
    assert active in result.stdout and first not in result.stdout and second not in result.stdout
    assert "in 1 Request." in result.stdout
    assert "(2 messages on hold: see `mailgate queue quarantine list`)" in result.stdout


def test_quarantine_list_empty(data_dir: Path, spool_dir: Path) -> None:
    store(spool_dir)
    result = mailgate(data_dir, "queue", "quarantine", "list")
    assert result.returncode == 0 and "Quarantine is empty" in result.stdout


def test_queue_list_with_only_held_messages(data_dir: Path, spool_dir: Path) -> None:
    hold(spool_dir, "spam")
    result = mailgate(data_dir, "queue", "list")
    assert result.returncode == 0
    assert "Mail queue is empty" in result.stdout
    assert "(1 message on hold" in result.stdout


def test_quarantine_show_and_body(data_dir: Path, spool_dir: Path) -> None:
    held = hold(spool_dir, "spam score 14.2")
    active = store(spool_dir)

    result = mailgate(data_dir, "queue", "quarantine", "show", held)
    assert result.returncode == 0, result.stderr
    assert f"queue id:     {held} (hold)" in result.stdout
    assert "reason:       spam score 14.2" in result.stdout
    assert "held:         " in result.stdout and "released:" not in result.stdout
    assert "Subject: quarantined" in result.stdout and "bytes" not in result.stdout

    body = subprocess.run(
        [MAILGATE, "queue", "quarantine", "show", held, "--body", "--data-dir", str(data_dir)],
        env=ENV,
        capture_output=True,
        timeout=30,
    )
    assert body.returncode == 0 and body.stdout == MESSAGE

    # `queue show` takes any queue and says which; `quarantine show` only held ones.
    result = mailgate(data_dir, "queue", "show", held)
    assert result.returncode == 0 and f"queue id:     {held} (hold)" in result.stdout
    result = mailgate(data_dir, "queue", "show", active)
    assert result.returncode == 0 and f"queue id:     {active} (incoming)" in result.stdout
    result = mailgate(data_dir, "queue", "quarantine", "show", active)
    assert result.returncode == 1
    assert f"{active}: not on hold (it is in incoming/)" in result.stderr


# -- delete ----------------------------------------------------------------------------


def test_quarantine_delete_removes_only_held_messages(data_dir: Path, spool_dir: Path) -> None:
    held = hold(spool_dir, "spam")
    other = hold(spool_dir, "spam")
    active = store(spool_dir)

    result = mailgate(data_dir, "queue", "quarantine", "delete", held, active, "NOSUCHID")
    assert result.returncode == 1
    assert f"{held}: removed" in result.stdout
    assert f"{active}: not on hold (it is in incoming/)" in result.stderr
    assert "NOSUCHID" in result.stderr
    viewer = Spool(spool_dir, recover=False)
    assert viewer.list_ids() == sorted([other, active])

    result = mailgate(data_dir, "queue", "delete", other)  # plain delete takes any queue
    assert result.returncode == 0 and f"{other}: removed" in result.stdout
    assert viewer.list_ids() == [active]


def test_queue_delete_removes_a_damaged_held_file(data_dir: Path, spool_dir: Path) -> None:
    held = hold(spool_dir, "spam")
    (spool_dir / "hold" / held).write_bytes(b"damaged")
    result = mailgate(data_dir, "queue", "quarantine", "delete", held)
    assert result.returncode == 0, result.stderr
    assert not (spool_dir / "hold" / held).exists()


# -- release ---------------------------------------------------------------------------


def test_release_without_a_server(data_dir: Path, spool_dir: Path) -> None:
    held = hold(spool_dir, "spam")
    result = mailgate(data_dir, "queue", "quarantine", "release", held)
    assert result.returncode == 0, result.stderr
    assert f"{held}: released to incoming/" in result.stdout
    assert "no running server" in result.stdout
    assert "delivered when `mailgate serve` starts" in result.stdout

    viewer = Spool(spool_dir, recover=False)
    assert viewer.list_ids("hold") == [] and viewer.list_ids("incoming") == [held]
    released = viewer.info(held).envelope
    assert released.released_at is not None and released.quarantine_reason == "spam"
    result = mailgate(data_dir, "queue", "show", held)
    assert f"queue id:     {held} (incoming)" in result.stdout
    assert "reason:       spam" in result.stdout and "released:     " in result.stdout


def test_release_reports_failures_and_releases_the_rest(data_dir: Path, spool_dir: Path) -> None:
    held = hold(spool_dir, "spam")
    active = store(spool_dir)
    result = mailgate(data_dir, "queue", "quarantine", "release", "NOSUCHID", active, held)
    assert result.returncode == 1
    assert "NOSUCHID: no such message" in result.stderr
    assert f"{active}: not on hold" in result.stderr
    assert f"{held}: released to incoming/" in result.stdout
    assert Spool(spool_dir, recover=False).list_ids("incoming") == sorted([held, active])


FAKE_SERVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    pid_file, marker = Path(sys.argv[2]), Path(sys.argv[3])
    received = []

    def on_usr1(signum, frame):
        received.append(signum)
        marker.write_text(str(len(received)))

    signal.signal(signal.SIGUSR1, on_usr1)
    # Written only now: a SIGUSR1 before the handler is in place would kill this process.
    pid_file.write_text(f"{os.getpid()}\\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    """
)


@pytest.fixture
def fake_server(data_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A stand-in for `mailgate serve`: writes the pid file and records each SIGUSR1.

    Its first argument puts "mailgate" into its command line, which is what the CLI checks
    before it signals a pid from the pid file.
    """
    pid_file = data_dir / "mailgate.pid"
    marker = data_dir / "usr1-received"
    process = subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER, "mailgate-fake-serve", str(pid_file), str(marker)]
    )
    deadline = time.monotonic() + 20
    while not pid_file.exists():
        assert process.poll() is None, "the fake server died"
        assert time.monotonic() < deadline, "the fake server did not write its pid file"
        time.sleep(0.02)
    yield process, marker
    process.kill()
    process.wait()


def wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear")


def test_release_signals_the_running_server(
    data_dir: Path, spool_dir: Path, fake_server: tuple[subprocess.Popen[bytes], Path]
) -> None:
    process, marker = fake_server
    first, second = hold(spool_dir, "spam"), hold(spool_dir, "spam")
    result = mailgate(data_dir, "queue", "quarantine", "release", first, second)
    assert result.returncode == 0, result.stderr
    assert f"{first}: released to incoming/" in result.stdout
    assert f"{second}: released to incoming/" in result.stdout
    assert f"notified the running server (pid {process.pid}): delivery starts now" in result.stdout
    assert wait_for(marker) == "1"  # one signal for the whole batch
    assert process.poll() is None


def test_release_that_releases_nothing_does_not_signal(
    data_dir: Path, fake_server: tuple[subprocess.Popen[bytes], Path]
) -> None:
    _, marker = fake_server
    result = mailgate(data_dir, "queue", "quarantine", "release", "NOSUCHID")
    assert result.returncode == 1 and "notified" not in result.stdout
    time.sleep(0.2)
    assert not marker.exists()


def test_release_with_a_stale_pid_file(data_dir: Path, spool_dir: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (data_dir / "mailgate.pid").write_text(f"{gone.pid}\n")
    result = mailgate(data_dir, "queue", "quarantine", "release", hold(spool_dir, "spam"))
    assert result.returncode == 0, result.stderr
    assert f"no running server (stale {data_dir / 'mailgate.pid'}, pid {gone.pid})" in (
        result.stdout
    )


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs procfs")
def test_release_never_signals_an_unrelated_process(data_dir: Path, spool_dir: Path) -> None:
    # The pid in a stale pid file may belong to another program by now; SIGUSR1 kills
    # most programs.
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (data_dir / "mailgate.pid").write_text(f"{bystander.pid}\n")
        result = mailgate(data_dir, "queue", "quarantine", "release", hold(spool_dir, "spam"))
        assert result.returncode == 0, result.stderr
        assert "no running server (stale" in result.stdout
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("content", ["0", "-1", "", "not a pid"])
def test_release_with_a_pid_file_without_a_pid(
    data_dir: Path, spool_dir: Path, content: str
) -> None:
    # 0 and -1 would signal a whole process group, or every process we may signal.
    (data_dir / "mailgate.pid").write_text(content)
    result = mailgate(data_dir, "queue", "quarantine", "release", hold(spool_dir, "spam"))
    assert result.returncode == 0, result.stderr
    assert "holds no process id" in result.stdout


@pytest.mark.slow
def test_release_to_a_real_server_delivers_at_once(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path)
    add_default_users(gateway)
    alice = f"alice@{DOMAIN}"
    held = hold(gateway.data_dir / "spool", "spam", envelope(rcpts=[alice]))
    gateway.start()
    try:
        time.sleep(0.3)
        assert gateway.delivered(alice) == []  # start-up recovery leaves hold/ alone
        result = subprocess.run(
            [MAILGATE, "queue", "quarantine", "release", held],
            env=gateway.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert "notified the running server" in result.stdout
        (copy,) = gateway.wait_delivered(alice, 1, timeout=10)  # long before a periodic scan
        assert copy.endswith(b"body \xe9 bytes\n")
    finally:
        gateway.stop()
    assert f"{held}: removed" in gateway.log()
