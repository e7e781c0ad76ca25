"""The state store of the greylisting and rate-limit daemons, both backends for real:
an SQLite file (threads and several processes on one file) and the Redis server at
127.0.0.1:6379 (a unique key prefix per test, removed afterwards), and every way a
backend can fail: down, hung, locked, unreadable, garbage.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailgate.milters.store import Store, StoreError, StoreSettings, open_store
from mailgate.milters.store.redis import RedisStore
from mailgate.milters.store.sqlite import SQLiteStore

REDIS_URL = "redis://127.0.0.1:6379/0"


def settings_for(kind: str, tmp_path: Path) -> StoreSettings:
    if kind == "sqlite":
        return StoreSettings(path=str(tmp_path / "state" / "store.sqlite"), timeout=2)
    return StoreSettings(
        backend="redis", url=REDIS_URL, prefix=f"mgtest:store:{uuid.uuid4().hex}:", timeout=2
    )


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSettings]:
    settings = settings_for(request.param, tmp_path)
    yield settings
    if settings.backend == "redis":
        cleanup = RedisStore(settings.url, prefix=settings.prefix)
        cleanup.delete_prefix()
        cleanup.close()


@pytest.fixture
def store(store_settings: StoreSettings) -> Iterator[Store]:
    opened = open_store(store_settings)
    yield opened
    opened.close()


def test_values_and_their_lifetime(store: Store) -> None:
    assert store.get("missing") is None
    store.put("a", "one", 60)
    store.put("short", "gone soon", 0.2)
    assert store.get("a") == "one"
    store.put("a", "two", 60)
    assert store.get("a") == "two"
    time.sleep(0.3)
    assert store.get("short") is None
    assert store.get("a") == "two"


def test_counters_are_atomic_across_threads(store: Store) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.incr("hits", 60), range(200)))
    assert sorted(results) == list(range(1, 201))
    assert store.get("hits") == "200"


def test_an_expired_counter_starts_again(store: Store) -> None:
    assert store.incr("c", 0.2) == 1
    assert store.incr("c", 0.2) == 2
    time.sleep(0.3)
    assert store.incr("c", 60) == 1


def test_sliding_windows(store: Store) -> None:
    t0 = time.time()
    for offset in (0, 10, 20, 30):
        store.add([("ip", 60), ("user", 60)], now=t0 + offset)
    window = store.window("ip", 60, now=t0 + 30)
    assert (window.count, window.oldest) == (4, pytest.approx(t0))
    # 25 s later the first event (t0) has left a 50 s window ending at t0 + 55.
    later = store.window("ip", 50, now=t0 + 55)
    assert (later.count, later.oldest) == (3, pytest.approx(t0 + 10))
    assert store.window("user", 60, now=t0 + 30).count == 4
    assert store.window("other", 60, now=t0 + 30).count == 0
    assert store.window("other", 60, now=t0 + 30).oldest is None


def test_events_at_the_same_instant_all_count(store: Store) -> None:
    now = time.time()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: store.add([("burst", 60)], now=now), range(40)))
    assert store.window("burst", 60, now=now).count == 40


_WORKER = """
import sys
from mailgate.milters.store import StoreSettings, open_store
settings = StoreSettings.model_validate_json(sys.argv[1])
store = open_store(settings)
for _ in range(int(sys.argv[2])):
    store.incr("shared", 60)
    store.add([("events", 60)])
store.close()
"""


def test_several_processes_share_one_store(store_settings: StoreSettings, store: Store) -> None:
    """Two daemons (processes) on one SQLite file or one Redis count together."""
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, store_settings.model_dump_json(), "150"])
        for _ in range(3)
    ]
    for worker in workers:
        assert worker.wait(60) == 0
    assert store.get("shared") == "450"
    assert store.window("events", 60).count == 450


def test_sqlite_cleanup_removes_what_expired(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SQLiteStore(
        tmp_path / "s.sqlite", timeout=2, cleanup_interval=100, clock=lambda: now[0]
    )
    store.put("old", "x", 10)
    store.put("new", "y", 1000)
    store.add([("ev", 10)])
    now[0] += 50
    assert store.get("old") is None
    assert store.cleanup() == 2
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        assert [row[0] for row in conn.execute("SELECT key FROM kv")] == ["new"]
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    # Periodic: an operation after cleanup_interval does it by itself.
    store.put("brief", "z", 1)
    now[0] += 200
    store.get("new")
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        assert [row[0] for row in conn.execute("SELECT key FROM kv")] == ["new"]
    store.close()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "w.sqlite")
    store.put("k", "v", 60)
    with sqlite3.connect(tmp_path / "w.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


# -- failures --------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Server:
    """A TCP server that accepts and then stays silent, or answers garbage."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(20)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                try:
                    conn.recv(1024)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def _every_operation_fails(store: Store) -> None:
    for operation in (
        lambda: store.get("k"),
        lambda: store.put("k", "v", 10),
        lambda: store.incr("k", 10),
        lambda: store.window("k", 10),
        lambda: store.add([("k", 10)]),
        store.ping,
    ):
        with pytest.raises(StoreError):
            operation()


@pytest.mark.timeout(30)
def test_redis_down_hung_or_garbage_is_a_store_error() -> None:
    hung, garbage = _Server(None), _Server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    try:
        for port in (_closed_port(), hung.port, garbage.port):
            store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.5)
            _every_operation_fails(store)
            store.close()
    finally:
        hung.close()
        garbage.close()


@pytest.mark.timeout(30)
def test_sqlite_unreadable_or_garbage_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database " * 1000)
    for path in (blocker / "sub" / "s.sqlite", garbage, tmp_path):
        _every_operation_fails(SQLiteStore(path, timeout=0.5))


@pytest.mark.timeout(30)
def test_sqlite_locked_by_another_process_is_a_store_error_in_time(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite"
    store = SQLiteStore(path, timeout=0.3)
    store.put("k", "v", 60)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError):
            store.put("k", "w", 60)
        with pytest.raises(StoreError):
            store.incr("n", 60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The lock gone, the same store works again.
    store.put("k", "w", 60)
    assert store.get("k") == "w"
    store.close()


def test_an_empty_path_means_the_gateways_data_directory(tmp_path: Path, monkeypatch) -> None:
    from mailgate.milters.store import StoreError, default_path
    from mailgate.policies.greylist import StoreSettings as Settings

    for name in [n for n in os.environ if n.startswith("MAILGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path / "data"))
    assert default_path("greylist") == tmp_path / "data" / "greylist.sqlite"
    store = open_store(Settings(), daemon="greylist")
    store.put("k", "v", 60)
    assert store.get("k") == "v"
    assert (tmp_path / "data" / "greylist.sqlite").is_file()
    store.close()
    monkeypatch.setenv("MAILGATE_NO_SUCH_SETTING", "1")
    with pytest.raises(StoreError, match="configuration cannot be loaded"):
        default_path("greylist")
