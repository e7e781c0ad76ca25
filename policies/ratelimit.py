"""Rate limits: their settings and their arithmetic, without any I/O.

Three counters (``connections`` at CONNECT, ``messages`` at MAIL FROM, ``recipients`` at
each RCPT TO) are kept per key of three kinds: the client (``client_ip``, an IPv6 client
counted as its /64 by default), the authenticated user (``auth_user``) and the sender's
domain (``sender_domain``). Each (kind, counter) pair may have a limit: at most ``count``
events in any ``window`` seconds, a true sliding window (every event is kept with its time
until it leaves the window; see ``mailgate.milters.store``).

An event is admitted when, for every limit that applies, fewer than ``count`` events are
in the window; only admitted events are recorded, so a client that is refused gets its
turn back as its earlier events age out (:func:`retry_after` says when), however often
it retries meanwhile.

The daemon is ``mailgate.milters.ratelimit``; the store that keeps the windows is
``mailgate.milters.store``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mailgate.policies.greylist import StoreSettings, client_network

Counter = Literal["connections", "messages", "recipients"]
KeyKind = Literal["client_ip", "auth_user", "sender_domain"]

COUNTERS: tuple[Counter, ...] = ("connections", "messages", "recipients")
KINDS: tuple[KeyKind, ...] = ("client_ip", "auth_user", "sender_domain")


class Limit(BaseModel):
    """At most ``count`` events in any ``window`` seconds (``count: 0`` switches it off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=0, description="events allowed in the window; 0: no limit")
    window: int = Field(default=3600, ge=1, le=7 * 86400, description="seconds")


class Limits(BaseModel):
    """The limits of one key kind, per counter (leave one out, or null: no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connections: Limit | None = None
    messages: Limit | None = None
    recipients: Limit | None = None

    def of(self, counter: Counter) -> Limit | None:
        limit: Limit | None = getattr(self, counter)
        return limit if limit is not None and limit.count > 0 else None


def _client_limits() -> Limits:
    return Limits(
        connections=Limit(count=100, window=60),
        messages=Limit(count=500, window=3600),
        recipients=Limit(count=2000, window=3600),
    )


def _user_limits() -> Limits:
    return Limits(messages=Limit(count=300, window=3600), recipients=Limit(count=1000, window=3600))


def _domain_limits() -> Limits:
    return Limits(
        messages=Limit(count=2000, window=3600), recipients=Limit(count=5000, window=3600)
    )


class Settings(BaseModel):
    """The rate-limit daemon's settings (every one has a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_ip: Limits = Field(default_factory=_client_limits)
    auth_user: Limits = Field(default_factory=_user_limits)
    sender_domain: Limits = Field(default_factory=_domain_limits)
    ipv4_mask: int = Field(default=32, ge=8, le=32, description="prefix length of an IPv4 client")
    ipv6_mask: int = Field(default=64, ge=16, le=128, description="prefix length of an IPv6 client")
    store: StoreSettings = Field(
        default_factory=lambda: StoreSettings(prefix="mailgate:ratelimit:")
    )

    def limits(self, kind: KeyKind) -> Limits:
        limits: Limits = getattr(self, kind)
        return limits


@dataclass(frozen=True, slots=True)
class Check:
    """One limit that applies to an event: which key, and its limit."""

    kind: KeyKind
    counter: Counter
    value: str
    limit: Limit

    @property
    def name(self) -> str:
        """``client_ip.connections``: what the fact ``ratelimit`` lists."""
        return f"{self.kind}.{self.counter}"

    @property
    def key(self) -> str:
        """The store key of this key's window."""
        return f"{self.kind}:{self.counter}:{self.limit.window}:{self.value}"


def sender_domain(sender: str) -> str:
    """The sender's domain, lower case; empty for the null sender or a bare local part."""
    sender = sender.strip().strip("<>")
    return sender.rpartition("@")[2].lower() if "@" in sender else ""


def checks(
    counter: Counter,
    settings: Settings,
    *,
    client_ip: str,
    auth_user: str | None = None,
    sender: str = "",
) -> list[Check]:
    """The limits that apply to one event of ``counter``."""
    values: dict[KeyKind, str] = {}
    network = client_network(client_ip, settings.ipv4_mask, settings.ipv6_mask)
    if network != "local":
        values["client_ip"] = network
    if auth_user:
        values["auth_user"] = auth_user.strip().lower()
    domain = sender_domain(sender)
    if domain:
        values["sender_domain"] = domain
    found: list[Check] = []
    for kind in KINDS:
        limit = settings.limits(kind).of(counter)
        if limit is not None and kind in values:
            found.append(Check(kind, counter, values[kind], limit))
    return found


def exceeded(count: int, check: Check) -> bool:
    """True when one more event would exceed the limit (``count`` are in the window)."""
    return count >= check.limit.count


def retry_after(oldest: float | None, now: float, check: Check) -> int:
    """Whole seconds until the oldest event in the window leaves it (at least 1)."""
    if oldest is None:
        return 1
    left = oldest + check.limit.window - now
    whole = int(left)
    return max(whole if whole >= left else whole + 1, 1)


def describe(check: Check, count: int) -> str:
    """``client 192.0.2.1/32: 100 connections in 60 s (limit 100)``, for reply texts."""
    who = {"client_ip": "client", "auth_user": "user", "sender_domain": "sender domain"}
    return (
        f"{who[check.kind]} {check.value}: {count} {check.counter} in "
        f"{check.limit.window} s (limit {check.limit.count})"
    )
