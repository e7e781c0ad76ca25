"""Greylisting: its settings and its decisions, without any I/O.

A greylisting MTA answers the first delivery attempt of an unknown *triplet* (client
network, sender, recipient) with a temporary error; a real mail server retries after a
while and is let through, most spam software does not. This module owns:

- :class:`Settings` (the ``settings:`` section of ``rules/greylist.yaml``) and
  :class:`StoreSettings`, the state store section shared with the rate-limit daemon;
- the triplet: :func:`client_network` (the client's address masked to /24 or /64 by
  default, so a sender's pool of neighbouring servers counts as one), :func:`normal_sender`
  (the sender without the parts that change with every message: +extensions, SRS and
  BATV wrappers, VERP numbers; as postgrey does) and :func:`triplet_key`;
- the state machine :func:`step`: from a triplet's stored :class:`Record` (or none) and
  the time, the outcome (``new``, ``early``, ``passed``) and what to store. Time is a
  parameter, so the machine is tested with any clock.

The store itself (SQLite or Redis) lives in ``mailgate.milters.store``; the daemon that
puts the two together is ``mailgate.milters.greylist``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailgate.policies.settings import DnsSettings

State = Literal["new", "early", "passed"]


class StoreSettings(BaseModel):
    """Where a daemon keeps state that outlives a connection: the ``store:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["sqlite", "redis"] = Field(
        default="sqlite",
        description="sqlite: one file on this host; redis: shared by several gateways",
    )
    path: str = Field(
        default="",
        description="the SQLite file (its directory is created if missing); empty: "
        "DAEMON.sqlite in the gateway's data directory",
    )
    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="the Redis server: redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS, "
        "unix:///path?db=N",
    )
    prefix: str = Field(default="mailgate:greylist:", description="prepended to every key")
    timeout: float = Field(
        default=2.0,
        gt=0,
        le=30,
        description="seconds an operation may take (connect, lock wait, reply)",
    )
    cleanup_interval: int = Field(
        default=3600, ge=60, description="SQLite: seconds between removals of expired entries"
    )

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value and not value.strip():
            raise ValueError("the path must not be blank")
        return value.strip()


class Settings(BaseModel):
    """The greylisting daemon's settings (every one has a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay: int = Field(
        default=300, ge=0, le=86400, description="seconds before a retry is accepted"
    )
    retry_window: int = Field(
        default=2 * 86400,
        ge=1,
        description="seconds after the delay during which a retry passes; a later retry "
        "starts over",
    )
    expiry: int = Field(
        default=35 * 86400,
        ge=1,
        description="seconds a passed triplet (or an auto-allowed client) is remembered "
        "after its last message",
    )
    auto_allow_clients: int = Field(
        default=5,
        ge=0,
        description="a client network whose triplets passed this many times is no longer "
        "greylisted (0: never)",
    )
    ipv4_mask: int = Field(default=24, ge=8, le=32, description="prefix length of an IPv4 client")
    ipv6_mask: int = Field(default=64, ge=16, le=128, description="prefix length of an IPv6 client")
    normalize_sender: bool = Field(
        default=True,
        description="strip +extensions, SRS and BATV wrappers and VERP numbers from the sender",
    )
    dnswl_zones: tuple[str, ...] = Field(
        default=("list.dnswl.org",),
        description="DNS allow-lists asked for the fact dnswl (only when a rule asks)",
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    dns: DnsSettings = Field(default_factory=DnsSettings)

    @field_validator("dnswl_zones", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("dnswl_zones")
    @classmethod
    def _zones(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        zones = tuple(zone.strip().strip(".").lower() for zone in value)
        for zone in zones:
            if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+", zone):
                raise ValueError(f"{zone!r} is not a DNS zone name")
        return zones


# -- the triplet ---------------------------------------------------------------------------


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address as the MTA gave it (``[192.0.2.1]``, ``IPv6:2001:db8::1``,
    ``::ffff:192.0.2.1`` as IPv4); None when there is none (a local client)."""
    text = text.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_network(client_ip: str, ipv4_mask: int = 24, ipv6_mask: int = 64) -> str:
    """The network a client counts as: ``192.0.2.0/24``, ``2001:db8:1:2::/64``.

    A client without an address (a local one) is ``local``.
    """
    address = parse_ip(client_ip)
    if address is None:
        return "local"
    mask = ipv4_mask if address.version == 4 else ipv6_mask
    return str(ipaddress.ip_network(f"{address}/{mask}", strict=False))


_SRS = re.compile(r"^srs0[=+-][^=]+=[^=]+=([^=]+)=(.+)$")
_SRS1 = re.compile(r"^srs1[=+-].*==[^=]+=[^=]+=([^=]+)=(.+)$")
_BATV = re.compile(r"^(?:prvs|msprvs1|btv1)=[^=]+=(.+)$")
_BATV_REVERSED = re.compile(r"^(.+)=[0-9a-f]{4}[0-9a-f]{6}=prvs$")
_NUMBERS = re.compile(r"\d+")


def normal_sender(sender: str) -> str:
    """The sender as one stable text for all messages of one mailer (postgrey's way).

    Lower case; the null sender stays empty. SRS (``SRS0=HHH=TT=orig.example=user@fwd``)
    gives back the original address, BATV (``prvs=TAG=user@``) its address, an
    ``+extension`` goes, and every run of digits in the local part becomes ``#`` so VERP
    addresses (``bounce-12345@``) make one triplet, not one per message.
    """
    sender = sender.strip().strip("<>").lower()
    if not sender or "@" not in sender:
        return sender
    local, _, domain = sender.rpartition("@")
    srs = _SRS.match(local) or _SRS1.match(local)
    if srs:
        domain, local = srs.group(1), srs.group(2)
    batv = _BATV.match(local)
    if batv:
        local = batv.group(1)
    else:
        reversed_batv = _BATV_REVERSED.match(local)
        if reversed_batv:
            local = reversed_batv.group(1)
    local = local.split("+", 1)[0] if not local.startswith("+") else local
    local = _NUMBERS.sub("#", local)
    return f"{local}@{domain}"


def normal_recipient(recipient: str) -> str:
    return recipient.strip().strip("<>").lower()


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """The store key of a triplet (the parts cannot contain the separator)."""
    return f"{network}/{sender}/{recipient}"


# -- the state machine ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """What the store keeps of one triplet."""

    first_seen: float
    last_seen: float
    passed: bool = False

    def dumps(self) -> str:
        return json.dumps([round(self.first_seen, 3), round(self.last_seen, 3), self.passed])

    @classmethod
    def loads(cls, text: str | None) -> Record | None:
        """The record stored as ``text``; None for none or for anything unreadable (a
        damaged entry is treated as a triplet never seen, never as a pass)."""
        if not text:
            return None
        try:
            first, last, passed = json.loads(text)
            return cls(float(first), float(last), passed is True)
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one delivery attempt of a triplet, and what to store."""

    state: State
    record: Record
    # Seconds to keep the record from now.
    ttl: float
    # Seconds until a retry passes (new/early), else 0.
    wait: int
    # True when this attempt is the triplet's first pass (counts for auto-allow).
    first_pass: bool = False


def step(record: Record | None, now: float, settings: Settings) -> Step:
    """One attempt of a triplet at time ``now``.

    - unknown, or not retried within ``delay + retry_window``, or passed but silent for
      longer than ``expiry``: ``new`` (the clock starts now);
    - retried before ``delay`` is over: ``early`` (the clock keeps running from the first
      attempt; retrying often does not help);
    - retried after the delay within the window, or passed before: ``passed``, and the
      triplet is remembered for ``expiry`` from this message on.
    """
    delay, window = settings.delay, settings.retry_window
    if record is not None and record.passed and now - record.last_seen <= settings.expiry:
        return Step("passed", Record(record.first_seen, now, True), settings.expiry, 0)
    if record is None or record.passed or now - record.first_seen > delay + window:
        if delay == 0:
            # No delay: the first attempt passes (greylisting then only learns clients).
            return Step("passed", Record(now, now, True), settings.expiry, 0, first_pass=True)
        return Step("new", Record(now, now), delay + window, delay)
    elapsed = now - record.first_seen
    if elapsed < delay:
        wait = _ceil(delay - elapsed)
        ttl = record.first_seen + delay + window - now
        return Step("early", Record(record.first_seen, now), ttl, wait)
    return Step("passed", Record(record.first_seen, now, True), settings.expiry, 0, first_pass=True)


def _ceil(seconds: float) -> int:
    whole = int(seconds)
    return whole if whole >= seconds else whole + 1


def client_allowed(passes: int, settings: Settings) -> bool:
    """True when a client network has passed often enough to skip greylisting."""
    return settings.auto_allow_clients > 0 and passes >= settings.auto_allow_clients


def format_wait(seconds: int) -> str:
    """``61`` → ``61 seconds``, ``300`` → ``5 minutes`` (from two minutes on, rounded up to
    whole minutes), for reply texts."""
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = _ceil(seconds / 60)
    return f"{minutes} minutes"
