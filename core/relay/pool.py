"""Connection reuse: idle SMTP connections kept per destination for a short while.

After a transaction the connection is parked here under its destination's key (see
``routes.Destination``); the next message to that destination takes it instead of
connecting, greeting and negotiating TLS again (Postfix's connection cache). A parked
connection is closed with QUIT after ``idle_time`` seconds, or when the pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from mailgate.core.relay.client import SmtpClient

# Transactions per connection before it is retired (Postfix smtp_connection_reuse_count_limit
# is unlimited by default; a cap keeps one long-lived session from hiding a server change).
MAX_TRANSACTIONS = 100
_MAX_IDLE_PER_DESTINATION = 8


class ConnectionPool:
    def __init__(self, idle_time: float) -> None:
        self.idle_time = idle_time
        self._idle: dict[str, list[tuple[float, SmtpClient]]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.reused = 0  # connections taken from the pool, for tests and the log

    def take(self, key: str) -> SmtpClient | None:
        """An idle connection to ``key``'s destination, or None."""
        parked = self._idle.get(key)
        now = time.monotonic()
        while parked:
            expires, client = parked.pop()
            if expires > now and not client.broken:
                self.reused += 1
                return client
            self._retire(client)
        return None

    def put(self, key: str, client: SmtpClient) -> None:
        """Park ``client`` (or close it if it cannot or should not be reused)."""
        if (
            self.idle_time <= 0
            or client.broken
            or client.transactions >= MAX_TRANSACTIONS
            or len(self._idle.get(key, ())) >= _MAX_IDLE_PER_DESTINATION
        ):
            self._retire(client)
            return
        self._idle.setdefault(key, []).append((time.monotonic() + self.idle_time, client))
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="mailgate-relay-pool")

    def _retire(self, client: SmtpClient) -> None:
        task = asyncio.create_task(client.quit())
        # Keep a reference until it is done; nobody waits for a QUIT.
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _reap(self) -> None:
        while any(self._idle.values()):
            await asyncio.sleep(min(self.idle_time, 1.0))
            now = time.monotonic()
            for key, parked in list(self._idle.items()):
                keep = [(expires, client) for expires, client in parked if expires > now]
                for expires, client in parked:
                    if expires <= now:
                        self._retire(client)
                self._idle[key] = keep

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        clients = [client for parked in self._idle.values() for _, client in parked]
        self._idle.clear()
        await asyncio.gather(*(client.quit() for client in clients), return_exceptions=True)
        if _closing:
            await asyncio.gather(*list(_closing), return_exceptions=True)


_closing: set[asyncio.Task[None]] = set()
