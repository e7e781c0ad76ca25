"""DNS block and allow lists (DNSBL/DNSWL, RFC 5782): settings, query names, answers, scores.

Owns everything about a DNS list that needs no socket: the ``settings:`` model of the
``dnsbl`` daemon (its zones, weights, return-code filters, deadline and decision stage),
the query name of a client address in a zone (IPv4 reversed octets, IPv6 reversed nibbles),
the meaning of a zone's answers (a listing, an error code such as Spamhaus'
127.255.255.x, or an answer to ignore), and the facts rules see (``dnsbl``, ``dnswl``,
``dnsbl_score`` ...). The lookups themselves run in ``mailgate.milters.dnsbl``.

The scoring model: every zone has a ``type``, ``block`` (a DNSBL) or ``allow`` (a DNSWL),
and a ``weight`` written as it counts: positive (or 0) for a block list, negative (or 0)
for an allow list. The score is the plain sum of the weights of the zones (or of the
return-code entries) that list the client, so allow lists subtract.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailgate.policies.settings import DnsSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 5782 2.3: a listing is an A record in 127.0.0.0/8. Anything else is a broken or
# hostile zone, never a listing.
LISTING_RANGE = ipaddress.IPv4Network("127.0.0.0/8")
# Spamhaus (and lists following its convention) answer errors from 127.255.255.0/24.
ERROR_RANGE = ipaddress.IPv4Network("127.255.255.0/24")
ERROR_MEANINGS: dict[str, str] = {
    "127.255.255.252": "typing error in the list's name",
    "127.255.255.254": "the list refuses queries through public or open resolvers",
    "127.255.255.255": "the list refuses the query: too many queries (over its free limit)",
}

DEFAULT_SKIP_NETWORKS: tuple[str, ...] = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "::1/128",
    "::/128",
    "fc00::/7",
    "fe80::/10",
)

Stage = Literal["connect", "helo", "mail", "rcpt"]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$", re.IGNORECASE)


# -- return-code filters ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodePattern:
    """One return-code filter: ``127.0.0.2``, ``127.0.0.4/30`` or ``127.0.*.3``.

    The wildcard form matches any value of the octets written ``*`` (DNSWL's
    127.0.CATEGORY.TRUST answers need it: one trust level across every category).
    """

    text: str
    network: ipaddress.IPv4Network | None = None
    octets: tuple[int | None, ...] = ()

    @classmethod
    def parse(cls, text: object) -> CodePattern:
        spec = str(text).strip()
        if "*" in spec:
            parts = spec.split(".")
            octets: list[int | None] = []
            for part in parts:
                if part == "*":
                    octets.append(None)
                elif part.isdigit() and int(part) < 256:
                    octets.append(int(part))
                else:
                    octets = []
                    break
            if len(octets) != 4:
                raise ValueError(
                    f"{spec!r}: a wildcard code is four octets, each a number or '*' "
                    "(e.g. 127.0.*.3)"
                )
            return cls(spec, octets=tuple(octets))
        try:
            network = ipaddress.IPv4Network(spec, strict=False)
        except ValueError:
            raise ValueError(
                f"{spec!r}: expected a return code such as 127.0.0.2, 127.0.0.4/30 or 127.0.*.3"
            ) from None
        return cls(spec, network=network)

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        if self.network is not None:
            return address in self.network
        return all(
            want is None or want == have
            for want, have in zip(self.octets, address.packed, strict=True)
        )

    def __str__(self) -> str:
        return self.text


# -- settings -----------------------------------------------------------------------------


class Zone(BaseModel):
    """One DNS list, as the ``zones:`` items of the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    zone: str = Field(description="the list's DNS zone, e.g. zen.spamhaus.org")
    name: str = Field(
        default="",
        description="how facts, logs and reply texts name this entry (default: the zone); "
        "lets one zone appear twice with different codes",
    )
    type: Literal["block", "allow"] = Field(
        default="block", description="block: a DNSBL; allow: a DNSWL (its weights subtract)"
    )
    weight: float = Field(
        default=1.0,
        description="added to the score when the zone lists the client: >= 0 for a block "
        "list, <= 0 for an allow list (default 1, or -1 for an allow list)",
    )
    codes: tuple[str, ...] | dict[str, float | None] = Field(
        default=(),
        description="the answers that count (addresses, networks or wildcards such as "
        "127.0.*.3); a mapping gives each its own weight, each matching entry counting "
        "once; empty: any answer in 127.0.0.0/8 counts",
    )
    errors: tuple[str, ...] = Field(
        default=(),
        description="answers that mean the list refused the query (besides "
        "127.255.255.0/24, always an error), e.g. 127.0.0.255 for list.dnswl.org",
    )
    ipv4: bool = Field(default=True, description="look up IPv4 clients in this zone")
    ipv6: bool = Field(default=True, description="look up IPv6 clients in this zone")

    @model_validator(mode="before")
    @classmethod
    def _default_weight(cls, data: Any) -> Any:
        # An allow list without a weight subtracts 1, as a block list without one adds 1.
        if isinstance(data, Mapping) and data.get("type") == "allow" and "weight" not in data:
            return {**data, "weight": -1}
        return data

    @field_validator("zone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        zone = value.strip().rstrip(".").lower()
        labels = zone.split(".")
        if len(zone) > 200 or len(labels) < 2 or not all(_LABEL.match(lb) for lb in labels):
            raise ValueError(f"{value!r} is not a DNS zone name (e.g. zen.spamhaus.org)")
        return zone

    @field_validator("codes", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, Mapping):
            return {str(key): item for key, item in value.items()}
        return value

    @field_validator("errors", mode="before")
    @classmethod
    def _errors_one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("codes", "errors")
    @classmethod
    def _valid_codes(cls, value: Any) -> Any:
        for code in value:
            CodePattern.parse(code)
        return value

    @model_validator(mode="after")
    def _signs(self) -> Zone:
        weights = [self.weight]
        if isinstance(self.codes, dict):
            weights += [w for w in self.codes.values() if w is not None]
        if self.type == "block" and any(w < 0 for w in weights):
            raise ValueError("a block list's weights must be 0 or more (use type: allow)")
        if self.type == "allow" and any(w > 0 for w in weights):
            raise ValueError("an allow list's weights must be 0 or less; they subtract")
        if not (self.ipv4 or self.ipv6):
            raise ValueError("ipv4 and ipv6 are both false: the zone would never be asked")
        return self

    @property
    def label(self) -> str:
        return self.name or self.zone

    def patterns(self) -> list[tuple[CodePattern, float]]:
        """The code filters with the weight each adds."""
        if isinstance(self.codes, dict):
            return [
                (CodePattern.parse(code), self.weight if weight is None else weight)
                for code, weight in self.codes.items()
            ]
        return [(CodePattern.parse(code), self.weight) for code in self.codes]

    def error_patterns(self) -> list[CodePattern]:
        return [CodePattern.parse(code) for code in self.errors]

    def serves(self, address: IPAddress) -> bool:
        return self.ipv4 if address.version == 4 else self.ipv6


def _default_zones() -> tuple[Zone, ...]:
    return (
        Zone(
            zone="zen.spamhaus.org",
            weight=3,
            codes=("127.0.0.2", "127.0.0.3", "127.0.0.4/30", "127.0.0.9"),
        ),
        Zone(zone="zen.spamhaus.org", name="spamhaus-pbl", weight=0, codes=("127.0.0.10/31",)),
        Zone(zone="bl.spamcop.net", weight=2, codes=("127.0.0.2",)),
        Zone(
            zone="list.dnswl.org",
            type="allow",
            weight=0,
            codes={"127.0.*.0": -2, "127.0.*.1": -3, "127.0.*.2": -4, "127.0.*.3": -5},
            errors=("127.0.0.255",),
        ),
    )


class Settings(BaseModel):
    """The ``settings:`` of a dnsbl rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dns: DnsSettings = Field(default_factory=DnsSettings)
    zones: tuple[Zone, ...] = Field(
        default_factory=_default_zones, description="the lists asked about every client"
    )
    deadline: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="seconds from connect within which every zone must have answered; a "
        "zone that has not counts as not listing the client",
    )
    decide_at: Stage = Field(default="rcpt", description="the SMTP stage at which the rules decide")
    skip_networks: tuple[str, ...] = Field(
        default=DEFAULT_SKIP_NETWORKS,
        description="clients in these networks are never looked up (loopback, private)",
    )

    @field_validator("skip_networks", mode="before")
    @classmethod
    def _networks_one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("skip_networks")
    @classmethod
    def _valid_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for text in value:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an IP network (e.g. 10.0.0.0/8)") from None
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for zone in self.zones:
            if zone.label in seen:
                raise ValueError(
                    f"two zones are named {zone.label!r}; give one of them a distinct name"
                )
            seen.add(zone.label)
        return self

    def skipped(self, address: IPAddress) -> bool:
        """True for a client that is never looked up (by skip_networks)."""
        for text in self.skip_networks:
            network = ipaddress.ip_network(text, strict=False)
            if network.version == address.version and address in network:
                return True
        return False


# -- query names --------------------------------------------------------------------------


def client_address(text: str) -> IPAddress | None:
    """The client address as the MTA gave it (``[a]``, ``IPv6:a``, v4-mapped) or None."""
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if value.lower().startswith("ipv6:"):
        value = value[5:]
    value = value.split("%", 1)[0]  # a zone index (fe80::1%eth0) is not part of the address
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def reversed_name(address: IPAddress) -> str:
    """RFC 5782 2.1 and 2.4: 192.0.2.1 → ``1.2.0.192``; IPv6 → its 32 nibbles reversed."""
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    nibbles = address.exploded.replace(":", "")
    return ".".join(reversed(nibbles))


def query_name(address: IPAddress, zone: str) -> str:
    """The name to look up (type A) for ``address`` in ``zone``."""
    return f"{reversed_name(address)}.{zone.rstrip('.')}"


# -- answers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZoneOutcome:
    """What one zone said about the client."""

    zone: Zone
    listed: bool = False
    weight: float = 0.0
    codes: tuple[str, ...] = ()  # the answers that counted
    error: str | None = None  # why the zone gave no usable answer (or a partial one)

    @property
    def label(self) -> str:
        return self.zone.label


def classify(zone: Zone, answers: Sequence[str]) -> ZoneOutcome:
    """The meaning of ``zone``'s A records for one client (empty: not listed)."""
    errors: list[str] = []
    counted: list[ipaddress.IPv4Address] = []
    error_patterns = zone.error_patterns()
    for text in answers:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            errors.append(f"answered {text!r}, not an address")
            continue
        if not isinstance(address, ipaddress.IPv4Address) or address not in LISTING_RANGE:
            errors.append(f"answered {address}, outside 127.0.0.0/8")
        elif address in ERROR_RANGE:
            meaning = ERROR_MEANINGS.get(str(address), "an error code of the list")
            errors.append(f"answered {address}: {meaning}")
        elif any(pattern.matches(address) for pattern in error_patterns):
            errors.append(f"answered {address}: the list refused the query")
        else:
            counted.append(address)
    error = "; ".join(errors) or None
    patterns = zone.patterns()
    if not patterns:
        if not counted:
            return ZoneOutcome(zone, error=error)
        codes = tuple(str(a) for a in sorted(set(counted)))
        return ZoneOutcome(zone, True, zone.weight, codes, error)
    weight = 0.0
    matched: set[ipaddress.IPv4Address] = set()
    for pattern, pattern_weight in patterns:
        hits = [address for address in counted if pattern.matches(address)]
        if hits:
            # Each entry of a weight mapping counts once (as each site=filter*weight of
            # postscreen does); a plain list of codes is one filter with the zone's weight.
            weight += pattern_weight
            matched.update(hits)
    if not matched:
        return ZoneOutcome(zone, error=error)
    if not isinstance(zone.codes, dict):
        weight = zone.weight
    codes = tuple(str(a) for a in sorted(matched))
    return ZoneOutcome(zone, True, weight, codes, error)


def failed(zone: Zone, why: str) -> ZoneOutcome:
    """A zone that gave no answer in time (a timeout, SERVFAIL ...): not listed."""
    return ZoneOutcome(zone, error=why)


@dataclass(frozen=True, slots=True)
class DnsblResult:
    """Every zone's outcome for one client, and the facts rules see."""

    outcomes: tuple[ZoneOutcome, ...] = ()
    skipped: str | None = None  # why the client was not looked up
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, outcomes: Iterable[ZoneOutcome], skipped: str | None = None) -> DnsblResult:
        items = tuple(outcomes)
        return cls(items, skipped, summarize(items))

    @property
    def score(self) -> float | int:
        return self.facts["dnsbl_score"]  # type: ignore[no-any-return]


def _number(value: float) -> float | int:
    """3.0 → 3: scores read as people write them in facts, logs and reply texts."""
    rounded = round(value, 6)
    return int(rounded) if rounded == int(rounded) else rounded


def summarize(outcomes: Sequence[ZoneOutcome]) -> dict[str, Any]:
    """The facts of the daemon: dnsbl, dnswl, dnsbl_score, dnsbl_codes, dnsbl_listings,
    dnsbl_errors (each present, possibly empty, whenever the client was looked up)."""
    listed = [o for o in outcomes if o.listed]
    return {
        "dnsbl": [o.label for o in listed if o.zone.type == "block"],
        "dnswl": [o.label for o in listed if o.zone.type == "allow"],
        "dnsbl_score": _number(sum(o.weight for o in listed)),
        "dnsbl_codes": {o.label: list(o.codes) for o in listed},
        "dnsbl_listings": [f"{o.label}={code}" for o in listed for code in o.codes],
        "dnsbl_errors": {o.label: o.error for o in outcomes if o.error},
    }


FACT_NAMES: tuple[str, ...] = tuple(summarize(()))
