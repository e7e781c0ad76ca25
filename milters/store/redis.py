"""The Redis state store: state shared by several gateways.

- values are Redis strings with a TTL (``SET key value PX ttl``), counters ``INCR`` plus
  ``PEXPIRE`` in one MULTI/EXEC transaction, so Redis itself forgets what has expired;
- an event window is a sorted set per key, scored by the event's time: a read removes the
  events that left the window (``ZREMRANGEBYSCORE``) and counts the rest (``ZCARD``), an
  event is a ``ZADD`` of a unique member, and the set lives as long as its window;
- every command has the store's timeout for connecting and for the reply, and is not
  retried (redis-py would otherwise retry with a backoff): a Redis that is down, slow or
  answers garbage is a StoreError within the timeout, and the next operation tries again.

The client (and its connection pool) is thread-safe and shared by the daemon's threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mailgate.milters.store import Clock, Store, StoreError, Window

T = TypeVar("T")


class RedisStore(Store):
    """State in a Redis server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "",
        timeout: float = 2.0,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(prefix=prefix, timeout=timeout, clock=clock)
        self.url = url
        self.client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            decode_responses=True,
            health_check_interval=0,
        )
        self._counter = 0
        self._counter_lock = threading.Lock()

    def describe(self) -> str:
        # The URL without a password.
        scheme, sep, rest = self.url.partition("://")
        if "@" in rest:
            rest = rest.split("@", 1)[1]
        return f"{scheme}{sep}{rest}"

    def _run(self, work: Callable[[redis.Redis], T]) -> T:
        try:
            return work(self.client)
        except (redis.RedisError, OSError, ValueError, TypeError) as exc:
            raise StoreError(f"{self.describe()}: {type(exc).__name__}: {exc}") from exc

    # -- values ------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        value = self._run(lambda r: r.get(self.prefix + key))
        return None if value is None else str(value)

    def put(self, key: str, value: str, ttl: float) -> None:
        self._run(lambda r: r.set(self.prefix + key, value, px=_ms(ttl)))

    def incr(self, key: str, ttl: float) -> int:
        def work(r: redis.Redis) -> int:
            pipe = r.pipeline(transaction=True)
            pipe.incr(self.prefix + key)
            pipe.pexpire(self.prefix + key, _ms(ttl))
            count, _ = pipe.execute()
            return int(count)

        return self._run(work)

    # -- event windows -----------------------------------------------------------------

    def window(self, key: str, window: float, now: float | None = None) -> Window:
        def work(r: redis.Redis) -> Window:
            at = self.clock() if now is None else now
            name = self.prefix + key
            pipe = r.pipeline(transaction=True)
            pipe.zremrangebyscore(name, "-inf", at - window)
            pipe.zcount(name, f"({at - window}", at)
            pipe.zrangebyscore(name, f"({at - window}", at, start=0, num=1, withscores=True)
            _, count, first = pipe.execute()
            oldest = float(first[0][1]) if first else None
            return Window(int(count), oldest)

        return self._run(work)

    def add(self, keys: Iterable[tuple[str, float]], now: float | None = None) -> None:
        rows = list(keys)
        if not rows:
            return

        def work(r: redis.Redis) -> None:
            at = self.clock() if now is None else now
            pipe = r.pipeline(transaction=True)
            for key, window in rows:
                name = self.prefix + key
                pipe.zadd(name, {self._member(at): at})
                pipe.pexpire(name, _ms(window) + 1000)
            pipe.execute()

        self._run(work)

    def _member(self, at: float) -> str:
        """A member unique across threads, processes and hosts (a set keeps each once)."""
        with self._counter_lock:
            self._counter += 1
            counter = self._counter
        return f"{at:.6f}:{os.getpid()}:{threading.get_ident()}:{counter}:{os.urandom(4).hex()}"

    # -- housekeeping ------------------------------------------------------------------

    def cleanup(self) -> int:
        return 0  # keys carry their TTLs; Redis removes them itself

    def ping(self) -> None:
        self._run(lambda r: r.ping())

    def close(self) -> None:
        self.client.close()

    def delete_prefix(self) -> int:
        """Remove every key under this store's prefix (for tests and for operators)."""

        def work(r: redis.Redis) -> int:
            removed = 0
            for name in r.scan_iter(match=_glob_escape(self.prefix) + "*", count=500):
                removed += int(r.delete(name))
            return removed

        return self._run(work)


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _glob_escape(text: str) -> str:
    out: list[str] = []
    for char in text:
        if char in "*?[]\\":
            out.append("\\")
        out.append(char)
    return "".join(out)
