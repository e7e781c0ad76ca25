"""Per-daemon settings: the ``settings:`` section of a rule file and the model that checks it.

Rules say what to do with a message; settings say how the daemon finds out about it (the
DNSBL zones and their weights, clamd's address, greylisting's delay and store). Both live
in the daemon's one rule file, so an operator edits, checks, tests and reloads them
together.

A daemon's policy module, ``mailgate.policies.<daemon>``, declares its settings as a
pydantic model named ``Settings`` whose every field has a default. A daemon without such a
module or model takes no settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator


def settings_model(daemon: str) -> type[BaseModel] | None:
    """The ``Settings`` model of ``daemon``'s policy module, or None if it takes none."""
    module_name = f"mailgate.policies.{daemon}"
    if importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    model = getattr(module, "Settings", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


class DnsSettings(BaseModel):
    """How a daemon resolves names: the ``dns:`` part of its settings.

    Every lookup goes through one resolver layer (``mailgate.core.dns``) with a small cache
    that honours the records' TTLs; a DNS failure is a temporary error, never an answer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nameservers: tuple[str, ...] = Field(
        default=(),
        description="ADDRESS or ADDRESS:PORT ([v6]:PORT); empty: those of /etc/resolv.conf",
    )
    timeout: float = Field(
        default=3.0, gt=0, le=60, description="seconds for one lookup, all tries"
    )
    cache_size: int = Field(default=10000, ge=0, description="answers kept; 0 disables the cache")
    negative_ttl: int = Field(
        default=60, ge=0, le=86400, description="seconds an NXDOMAIN or empty answer is kept"
    )
    max_ttl: int = Field(default=86400, ge=0, description="no answer is kept longer than this")

    @field_validator("nameservers", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("nameservers")
    @classmethod
    def _valid_servers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for server in value:
            parse_nameserver(server)
        return value


def parse_nameserver(text: str) -> tuple[str, int]:
    """``127.0.0.1``, ``127.0.0.1:5300``, ``::1``, ``[::1]:5300`` → (address, port)."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 nameserver as [ADDRESS]:PORT")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: a nameserver is an IP address, not a name") from None
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: the port must be a number from 1 to 65535")
    return int(text)
