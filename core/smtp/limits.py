"""Per-client limits shared by all sessions: concurrent connections, connection rate, AUTH failures.

In-process and O(1) per event; each answers "may this client go on?" and the session turns
a refusal into the right 421/454 reply.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable


class SlidingWindow:
    """Counts events per key over the last ``window`` seconds (exact sliding log)."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: dict[str, deque[float]] = {}
        self._last_sweep = clock()

    def _trim(self, key: str, now: float) -> deque[float]:
        events = self._events.get(key)
        if events is None:
            events = self._events[key] = deque()
        horizon = now - self.window
        while events and events[0] <= horizon:
            events.popleft()
        return events

    def count(self, key: str) -> int:
        events = self._trim(key, self._clock())
        if not events:
            del self._events[key]
            return 0
        return len(events)

    def hit(self, key: str) -> int:
        """Record one event; return how many fell within the window, this one included."""
        now = self._clock()
        self._sweep(now)
        events = self._trim(key, now)
        events.append(now)
        return len(events)

    def exceeded(self, key: str) -> bool:
        return self.count(key) >= self.limit

    def reset(self, key: str) -> None:
        self._events.pop(key, None)

    def _sweep(self, now: float) -> None:
        # Forget idle clients now and then so a scan of many addresses cannot grow memory.
        if now - self._last_sweep < self.window:
            return
        self._last_sweep = now
        horizon = now - self.window
        for key in [k for k, v in self._events.items() if not v or v[-1] <= horizon]:
            del self._events[key]


class ConnectionLimits:
    """Admission control for new connections: total, per IP, and rate per IP."""

    def __init__(
        self, max_total: int, max_per_ip: int, rate_limit: int, rate_window: float
    ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: defaultdict[str, int] = defaultdict(int)
        self.rate = SlidingWindow(rate_limit, rate_window) if rate_limit > 0 else None

    def admit(self, ip: str) -> str | None:
        """Register a connection; return None if admitted, else the breached limit's name."""
        if self.rate is not None and self.rate.hit(ip) > self.rate.limit:
            return "rate"
        if self.total >= self.max_total:
            return "total"
        if self.per_ip[ip] >= self.max_per_ip:
            return "per_ip"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        remaining = self.per_ip[ip] - 1
        if remaining <= 0:
            del self.per_ip[ip]
        else:
            self.per_ip[ip] = remaining
