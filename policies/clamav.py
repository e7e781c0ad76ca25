"""The ClamAV policy: the clamav daemon's settings and what a scan outcome means as facts.

The daemon (``mailgate.milters.clamav``) sends each message to clamd and publishes the
outcome as facts; the rule file decides what each outcome does. This module owns the
``settings:`` model of ``rules/clamav.yaml``, the clamd address syntax, and the mapping
from a scan (or a reason not to scan) to the facts ``clamav``, ``virus`` and
``clamav_error``. It does no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailgate.policies.rules.values import parse_quantity

# Debian's clamav-daemon listens here (LocalSocket in /etc/clamav/clamd.conf).
DEFAULT_CLAMD = "unix:/var/run/clamav/clamd.ctl"
# clamav-milter's MaxFileSize and clamd's StreamMaxLength both default to 25M.
DEFAULT_MAX_SIZE = 25 * 1024 * 1024
# Above this a message is held whole in the daemon's memory for nothing: clamd's own
# StreamMaxLength cannot go past 4G, and no sane deployment scans such messages.
MAX_MAX_SIZE = 1024 * 1024 * 1024

Outcome = Literal["clean", "infected", "error", "skipped"]


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """Where clamd listens: a Unix socket ``path``, or ``host`` and ``port`` over TCP."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_clamd_address(text: str) -> ClamdAddress:
    """``unix:/path``, ``tcp:HOST:PORT`` or ``tcp:[V6ADDR]:PORT`` (clamav-milter's ClamdSocket)."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix":
        if not rest.startswith("/"):
            raise ValueError(f"{text!r}: a Unix socket path must be absolute (unix:/path)")
        return ClamdAddress(path=rest)
    if sep and kind == "tcp":
        if rest.startswith("["):
            host, bracket, port_text = rest[1:].partition("]")
            if not bracket or not port_text.startswith(":"):
                raise ValueError(f"{text!r}: write an IPv6 address as tcp:[ADDRESS]:PORT")
            port_text = port_text[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        else:
            host, colon, port_text = rest.rpartition(":")
            if not colon or not host or ":" in host:
                raise ValueError(f"{text!r}: expected tcp:HOST:PORT")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        return ClamdAddress(host=host, port=int(port_text))
    raise ValueError(f"{text!r}: expected unix:/path or tcp:HOST:PORT")


class Settings(BaseModel):
    """The ``settings:`` section of a clamav rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clamd: str = Field(
        default=DEFAULT_CLAMD,
        description="clamd's socket: unix:/path, tcp:HOST:PORT or tcp:[V6ADDR]:PORT",
    )
    timeout: float = Field(
        default=60.0,
        gt=0,
        le=600,
        description="seconds for one whole scan: connecting, sending, clamd's answer",
    )
    max_size: int = Field(
        default=DEFAULT_MAX_SIZE,
        gt=0,
        le=MAX_MAX_SIZE,
        description="larger messages are not scanned (outcome skipped); 25M, 1G ...",
    )

    @field_validator("clamd")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        parse_clamd_address(value)
        return value.strip()

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return int(parse_quantity(value).value)
        return value

    @property
    def address(self) -> ClamdAddress:
        return parse_clamd_address(self.clamd)


@dataclass(frozen=True, slots=True)
class ScanOutcome:
    """One message's outcome, as the facts ``clamav``, ``virus`` and ``clamav_error``."""

    outcome: Outcome
    virus: str | None = None
    error: str | None = None

    def facts(self) -> dict[str, Any]:
        return {"clamav": self.outcome, "virus": self.virus, "clamav_error": self.error}


def clean() -> ScanOutcome:
    return ScanOutcome("clean")


def infected(signature: str) -> ScanOutcome:
    # clamd names what it found; an empty name would make "${virus}" say nothing.
    return ScanOutcome("infected", virus=signature.strip() or "unknown")


def failed(reason: str) -> ScanOutcome:
    return ScanOutcome("error", error=reason)


def too_big(size: int, max_size: int) -> ScanOutcome:
    return ScanOutcome(
        "skipped", error=f"message size {size} over max_size {max_size}; not scanned"
    )


def not_whole(kept: int, size: int) -> ScanOutcome:
    """The daemon kept only part of a message it should scan: an error, never "clean"."""
    return ScanOutcome(
        "error",
        error=(
            f"only {kept} of {size} bytes of the message were kept (--body-limit is below "
            "max_size); not scanned"
        ),
    )


def outcome_for(size: int, kept_whole: bool, kept: int, max_size: int) -> ScanOutcome | None:
    """The outcome decided without clamd (too big, or not kept whole), or None: scan it."""
    if size > max_size:
        return too_big(size, max_size)
    if not kept_whole:
        return not_whole(kept, size)
    return None
