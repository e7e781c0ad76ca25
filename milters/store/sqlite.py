"""The SQLite state store: the default, one file on the host.

Safe for the threads of one daemon and for several daemon processes on one file:

- WAL journal: readers never wait for the writer, and a writer waits only for another
  writer, for at most the store's timeout (SQLite's busy timeout), after which the
  operation fails with StoreError rather than hang;
- one connection per process, used under a lock that is itself waited for at most the
  timeout; every write is one statement (an upsert, a ``RETURNING``) or one short
  transaction, so nothing is half done;
- a file that cannot be opened (a missing directory that cannot be made, no permission,
  not a database) fails each operation at once with StoreError; the store tries again
  at the next one, so it recovers without a restart.

Tables: ``kv`` (values with an absolute expiry time) and ``events`` (one row per
rate-limit event: the exact sliding window, at the cost of one small row per event).
Expired rows are ignored by every read and removed every ``cleanup_interval`` seconds
by whichever operation comes along first.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from mailgate.milters.store import Clock, Store, StoreError, Window

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires);
CREATE TABLE IF NOT EXISTS events (
    key TEXT NOT NULL,
    ts REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_key_ts ON events (key, ts);
CREATE INDEX IF NOT EXISTS events_expires ON events (expires);
"""


class SQLiteStore(Store):
    """State in one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        prefix: str = "",
        timeout: float = 2.0,
        cleanup_interval: float = 3600.0,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(prefix=prefix, timeout=timeout, clock=clock)
        self.path = path
        self.cleanup_interval = cleanup_interval
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._last_cleanup = clock()

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    # -- connection --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path),
            timeout=self.timeout,
            isolation_level=None,  # autocommit; transactions are explicit
            check_same_thread=False,  # shared by the daemon's threads, under self._lock
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if not self._lock.acquire(timeout=self.timeout):
            raise StoreError(f"{self.describe()}: busy for more than {self.timeout:g}s")
        try:
            if self._conn is None:
                self._conn = self._connect()
            yield self._conn
        except (sqlite3.Error, OSError) as exc:
            # A broken connection is dropped; the next operation opens a new one.
            if self._conn is not None and not isinstance(exc, sqlite3.OperationalError):
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
            raise StoreError(f"{self.describe()}: {exc}") from exc
        finally:
            self._lock.release()

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._connection() as conn:
            result = work(conn)
        self._maybe_cleanup()
        return result

    # -- values ------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        def work(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT value FROM kv WHERE key = ? AND expires > ?",
                (self.prefix + key, self.clock()),
            ).fetchone()
            return None if row is None else str(row[0])

        return self._run(work)

    def put(self, key: str, value: str, ttl: float) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO kv (key, value, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "expires = excluded.expires",
                (self.prefix + key, value, self.clock() + ttl),
            )

        self._run(work)

    def incr(self, key: str, ttl: float) -> int:
        def work(conn: sqlite3.Connection) -> int:
            now = self.clock()
            # One statement: atomic between the threads and processes sharing the file.
            row = conn.execute(
                "INSERT INTO kv (key, value, expires) VALUES (?, '1', ?) "
                "ON CONFLICT (key) DO UPDATE SET "
                "value = CASE WHEN kv.expires <= ? THEN '1' "
                "ELSE CAST(CAST(kv.value AS INTEGER) + 1 AS TEXT) END, "
                "expires = excluded.expires "
                "RETURNING value",
                (self.prefix + key, now + ttl, now),
            ).fetchone()
            return int(row[0])

        return self._run(work)

    # -- event windows -----------------------------------------------------------------

    def window(self, key: str, window: float, now: float | None = None) -> Window:
        def work(conn: sqlite3.Connection) -> Window:
            at = self.clock() if now is None else now
            count, oldest = conn.execute(
                "SELECT COUNT(*), MIN(ts) FROM events WHERE key = ? AND ts > ? AND ts <= ?",
                (self.prefix + key, at - window, at),
            ).fetchone()
            return Window(int(count), None if oldest is None else float(oldest))

        return self._run(work)

    def add(self, keys: Iterable[tuple[str, float]], now: float | None = None) -> None:
        rows = list(keys)
        if not rows:
            return

        def work(conn: sqlite3.Connection) -> None:
            at = self.clock() if now is None else now
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO events (key, ts, expires) VALUES (?, ?, ?)",
                    [(self.prefix + key, at, at + window) for key, window in rows],
                )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

        self._run(work)

    # -- housekeeping ------------------------------------------------------------------

    def cleanup(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            now = self.clock()
            removed = conn.execute("DELETE FROM kv WHERE expires <= ?", (now,)).rowcount
            removed += conn.execute("DELETE FROM events WHERE expires <= ?", (now,)).rowcount
            return int(removed)

        with self._connection() as conn:
            removed = work(conn)
        self._last_cleanup = self.clock()
        return removed

    def _maybe_cleanup(self) -> None:
        if self.clock() - self._last_cleanup < self.cleanup_interval:
            return
        self._last_cleanup = self.clock()
        # Housekeeping never fails an operation that itself succeeded.
        with contextlib.suppress(StoreError):
            self.cleanup()

    def ping(self) -> None:
        self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
