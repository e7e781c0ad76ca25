"""The shared state store of the greylisting and rate-limit daemons: one small interface.

Two kinds of state, both with a lifetime:

- **values** (greylist triplets, auto-allowed clients): ``get``/``put`` a short text under
  a key for ``ttl`` seconds, and ``incr`` a counter atomically;
- **event windows** (rate-limit counters): ``window`` tells how many events a key has had
  in the last ``window`` seconds (and when the oldest of them happened); ``add`` records
  one more.

Backends: :class:`~mailgate.milters.store.sqlite.SQLiteStore` (the default, one file on the
host; safe for the threads of a daemon and for several daemon processes) and
:class:`~mailgate.milters.store.redis.RedisStore` (several gateways sharing state). Every
failure of a backend (down, slow, locked, garbage) is raised as :class:`StoreError`
within the store's timeout, so a daemon can apply its configured default and never hang.

:func:`store_for` gives the process's store for one ``StoreSettings``, shared by the
connection threads of a daemon (one per distinct settings, like the DNS resolver).
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mailgate.policies.greylist import StoreSettings

__all__ = ["Store", "StoreError", "StoreSettings", "Window", "open_store", "store_for"]

Clock = Callable[[], float]


class StoreError(Exception):
    """The store could not answer this time (down, timed out, locked, unreadable...)."""


@dataclass(frozen=True, slots=True)
class Window:
    """Events of one key within a sliding window: how many, and when the oldest was."""

    count: int
    oldest: float | None = None


class Store(ABC):
    """What the daemons need from a state store. Keys are plain text; the store prefixes them."""

    def __init__(self, *, prefix: str = "", timeout: float = 2.0, clock: Clock = time.time) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.clock = clock

    @abstractmethod
    def get(self, key: str) -> str | None:
        """The value of ``key``, or None when there is none (or it expired)."""

    @abstractmethod
    def put(self, key: str, value: str, ttl: float) -> None:
        """Set ``key`` to ``value`` for ``ttl`` seconds (replacing any value and lifetime)."""

    @abstractmethod
    def incr(self, key: str, ttl: float) -> int:
        """Add one to the counter ``key`` (missing or expired: 0), keep it ``ttl`` more
        seconds, and return the new count. Atomic across threads, processes and hosts."""

    @abstractmethod
    def window(self, key: str, window: float, now: float | None = None) -> Window:
        """The events of ``key`` in the ``window`` seconds up to ``now``."""

    @abstractmethod
    def add(self, keys: Iterable[tuple[str, float]], now: float | None = None) -> None:
        """Record one event at ``now`` for each ``(key, window)``; an event is kept as long
        as its window needs it."""

    @abstractmethod
    def cleanup(self) -> int:
        """Remove what has expired; return how many entries went (0 where the backend
        expires entries itself)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreError unless the store answers."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (the store reconnects if used again)."""

    def describe(self) -> str:
        return type(self).__name__


def default_path(daemon: str) -> Path:
    """``DAEMON.sqlite`` in the gateway's data directory (as `mailgate serve` has it: serve
    gives its daemons MAILGATE_DATA_DIR; alone, MAILGATE_CONFIG and MAILGATE_* count)."""
    from mailgate.core.config import ConfigError, load_config

    try:
        config = load_config(os.environ.get("MAILGATE_CONFIG") or None)
    except ConfigError as exc:
        raise StoreError(
            "store.path is empty and the gateway's configuration cannot be loaded: "
            + "; ".join(exc.problems)
        ) from None
    return Path(config.data_dir) / f"{daemon}.sqlite"


def open_store(
    settings: StoreSettings, *, daemon: str = "store", clock: Clock = time.time
) -> Store:
    """A new store for ``settings`` (nothing is connected until the first operation)."""
    if settings.backend == "redis":
        from mailgate.milters.store.redis import RedisStore

        return RedisStore(
            settings.url, prefix=settings.prefix, timeout=settings.timeout, clock=clock
        )
    from mailgate.milters.store.sqlite import SQLiteStore

    return SQLiteStore(
        Path(settings.path) if settings.path else default_path(daemon),
        prefix=settings.prefix,
        timeout=settings.timeout,
        cleanup_interval=settings.cleanup_interval,
        clock=clock,
    )


_SHARED: dict[StoreSettings, Store] = {}
_SHARED_LOCK = threading.Lock()


def store_for(settings: StoreSettings, daemon: str) -> Store:
    """The process's store for these settings (created on first use, then shared)."""
    with _SHARED_LOCK:
        store = _SHARED.get(settings)
        if store is None:
            store = _SHARED[settings] = open_store(settings, daemon=daemon)
        return store
