"""ARC (RFC 8617): settings, the chain's result and facts, which mail is sealed, header texts.

Owns everything about ARC that needs neither a socket nor a key file: the ``settings:``
model of the ``arc`` daemon (DNS, the authserv-id, what is sealed and with which key, the
results reported in the seal), the interpretation of a chain validation (dkimpy's raw
outcome becomes one of ``pass``, ``fail``, ``none`` or ``temperror`` plus the number of
sets, the oldest AMS that still passes and the sealing domains), the facts rules see, the
decision whether a message is sealed and with which ``cv=``, the control header rules use
to steer sealing, and the ``Authentication-Results`` text (built with authres).

The cryptography and the DNS lookups (dkimpy, ``mailgate.core.dns``) are the daemon's, in
``mailgate.milters.arc``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import authres  # type: ignore[import-untyped]
import authres.arc  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailgate.policies.dkim import DEFAULT_HEADERS, clean, valid_domain, valid_selector
from mailgate.policies.settings import DnsSettings
from mailgate.policies.verdict import HeaderChange

# The chain's result as rules see it. RFC 8617 knows pass, fail and none; a DNS failure is
# temperror here (RFC 8601), never a pass or a fail.
Result = Literal["pass", "fail", "none", "temperror"]
RESULTS: tuple[Result, ...] = ("pass", "fail", "none", "temperror")

FACTS = ("arc", "arc_instances", "arc_oldest_pass", "arc_domains", "arc_reason")

# RFC 8617 section 4.2.1: at most 50 ARC sets; a longer chain fails and is never extended.
MAX_INSTANCES = 50

# The header a rule adds to steer sealing ("no": do not seal; "yes": seal even though the
# settings do not select the message). Consumed by the daemon, never added to the message.
SEAL_CONTROL = "X-Mailgate-ARC-Seal"

# Header fields an ARC-Message-Signature must not cover (RFC 8617 4.1.2, RFC 6376 5.4):
# they change in transit, or belong to ARC itself.
_NEVER_SIGNED = frozenset(
    {
        "return-path",
        "received",
        "comments",
        "keywords",
        "bcc",
        "resent-bcc",
        "dkim-signature",
        "authentication-results",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
    }
)
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Report = Literal["spf", "dkim"]


# -- settings -------------------------------------------------------------------------------


class SealSettings(BaseModel):
    """What the daemon seals, and as whom (no domain: it only validates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str = Field(default="", description="d= of the seals; empty: no sealing")
    selector: str = Field(default="", description="s=: the key's record is S._domainkey.D")
    key: Path | None = Field(
        default=None, description="the private key file (PEM; mailgate dkim keygen writes one)"
    )
    authenticated: bool = Field(
        default=False, description="seal mail of clients that authenticated"
    )
    networks: tuple[str, ...] = Field(
        default=(), description="seal mail from these client networks (list servers, forwarders)"
    )
    all: bool = Field(
        default=False, description="seal every message that passes (a host that only forwards)"
    )
    headers: tuple[str, ...] = Field(
        default=DEFAULT_HEADERS,
        description="the header fields the ARC-Message-Signature covers, when present",
    )
    report: tuple[Report, ...] = Field(
        default=("spf", "dkim"),
        description="results checked here and written into the ARC-Authentication-Results",
    )
    on_error: Literal["tempfail", "accept"] = Field(
        default="tempfail",
        description="a message to seal whose key cannot be used: tempfail, or accept unsealed",
    )

    @field_validator("networks", "headers", "report", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("networks")
    @classmethod
    def _valid_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP network") from None
        return value

    @field_validator("headers")
    @classmethod
    def _valid_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"{name!r} is not a header field name")
            if name.lower() in _NEVER_SIGNED:
                raise ValueError(f"{name} must not be covered by an ARC-Message-Signature")
        if "from" not in {name.lower() for name in value}:
            raise ValueError("From must be covered (RFC 8617 4.1.2)")
        return value

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        if value and not valid_domain(value):
            raise ValueError(f"{value!r} is not a domain name")
        return value

    @field_validator("selector")
    @classmethod
    def _valid_selector(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not valid_selector(value):
            raise ValueError(f"{value!r}: a selector is DNS labels (letters, digits, '-', '_')")
        return value

    @model_validator(mode="after")
    def _complete(self) -> SealSettings:
        given = [bool(self.domain), bool(self.selector), self.key is not None]
        if any(given) and not all(given):
            raise ValueError("domain, selector and key: give all three to seal, or none")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.domain)


class Settings(BaseModel):
    """The ``settings:`` section of an arc rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dns: DnsSettings = Field(default_factory=DnsSettings)
    timeout: float = Field(
        default=10.0, gt=0, le=300, description="seconds for all key lookups of one message"
    )
    min_key_bits: int = Field(
        default=1024, ge=512, le=8192, description="shorter RSA keys do not validate (RFC 8301)"
    )
    seal: SealSettings = Field(default_factory=SealSettings)
    authserv_id: str = Field(
        default="", description="the name in Authentication-Results; empty: the host name"
    )
    authentication_results: bool = Field(
        default=True,
        description="add Authentication-Results (arc=) and remove forged ones claiming it",
    )

    @field_validator("authserv_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        value = value.strip()
        if value and not _AUTHSERV_ID.match(value):
            raise ValueError(f"{value!r}: use a host name (letters, digits, '.', '-', '_')")
        return value

    @property
    def server_id(self) -> str:
        """The authserv-id in force."""
        return self.authserv_id or socket.gethostname() or "localhost"


# -- the chain ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """One ARC set as validated: its instance, the seal's cv= and what verified."""

    instance: int
    cv: str  # the cv= of its ARC-Seal, lower case
    seal_domain: str = ""
    ams_valid: bool = False
    seal_valid: bool = False


@dataclass(frozen=True, slots=True)
class ChainResult:
    """The validation of a message's ARC chain (RFC 8617 section 5.2)."""

    result: Result
    instances: int = 0  # the highest i= found (the number of sets of a well-formed chain)
    reason: str = ""
    domains: tuple[str, ...] = ()  # d= of the ARC-Seals, i=1 first
    oldest_pass: int | None = None  # on a pass: see oldest_pass()
    # The most recent seal already says cv=fail: the chain is over, nobody extends it.
    terminated: bool = False
    details: tuple[InstanceResult, ...] = field(default=())


def oldest_pass(details: Sequence[InstanceResult]) -> int:
    """RFC 8617 5.2 step 6: the oldest instance whose AMS still validates, counting down
    from the newest without a gap; 0 when every AMS validates."""
    ordered = sorted(details, key=lambda item: item.instance, reverse=True)
    oldest = 0
    for item in ordered:
        if not item.ams_valid:
            return oldest
        oldest = item.instance
    return 0


def interpret(
    instances: int,
    domains: Sequence[str],
    cv: str | None,
    details: Sequence[InstanceResult],
    reason: str,
    latest_cv: str = "",
) -> ChainResult:
    """The chain's result from dkimpy's validation outcome.

    ``cv`` is dkimpy's answer: "pass", "fail", "none", or None for a chain that a seal
    already marked failed; ``latest_cv`` the cv= of the newest ARC-Seal. A chain of more
    than MAX_INSTANCES sets fails whatever dkimpy says (the caller need not validate it).
    """

    def result(
        outcome: Result, why: str, *, ended: bool = False, oldest: int | None = None
    ) -> ChainResult:
        return ChainResult(
            outcome,
            instances=instances,
            reason=clean(why),
            domains=tuple(domains),
            oldest_pass=oldest,
            terminated=ended,
            details=tuple(details),
        )

    terminated = latest_cv.lower() == "fail"
    if instances > MAX_INSTANCES:
        return result(
            "fail", f"{instances} ARC sets, more than the {MAX_INSTANCES} allowed", ended=True
        )
    if cv is None:
        # dkimpy: some seal says cv=fail. Only the newest one ends the chain for good.
        return result("fail", reason or "a seal reported a failed chain", ended=terminated)
    if cv == "pass":
        plural = "" if instances == 1 else "s"
        return result(
            "pass",
            f"chain of {instances} ARC set{plural} validated",
            oldest=oldest_pass(details),
        )
    if cv == "none" and instances == 0:
        return result("none", "no ARC sets")
    return result("fail", reason or "the chain did not validate", ended=terminated)


def temperror(instances: int, domains: Sequence[str], reason: str) -> ChainResult:
    """A chain whose keys could not all be looked up this time."""
    return ChainResult(
        "temperror", instances=instances, domains=tuple(domains), reason=clean(reason)
    )


def facts(chain: ChainResult) -> dict[str, object]:
    """The facts rules see."""
    return {
        "arc": chain.result,
        "arc_instances": chain.instances,
        "arc_oldest_pass": chain.oldest_pass,
        "arc_domains": list(chain.domains),
        "arc_reason": chain.reason,
    }


# -- sealing --------------------------------------------------------------------------------


def selected(settings: Settings, auth_user: str | None, client_ip: str) -> bool:
    """Whether the settings select this message for sealing (before any rule's word)."""
    seal = settings.seal
    if seal.all or (seal.authenticated and auth_user):
        return True
    if seal.networks and client_ip:
        try:
            address = ipaddress.ip_address(client_ip.strip("[]").removeprefix("IPv6:"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(
            address in ipaddress.ip_network(network, strict=False) for network in seal.networks
        )
    return False


def seal_control(changes: Sequence[HeaderChange]) -> tuple[bool | None, list[HeaderChange]]:
    """What the rules said about sealing (True, False, None: nothing), and the other changes.

    The last X-Mailgate-ARC-Seal value a rule set counts: "no" prevents the seal, "yes"
    asks for it.
    """
    wanted: bool | None = None
    rest: list[HeaderChange] = []
    for change in changes:
        if change.name.lower() != SEAL_CONTROL.lower():
            rest.append(change)
            continue
        value = change.value.strip().lower()
        if value in ("no", "false", "0"):
            wanted = False
        elif value in ("yes", "true", "1"):
            wanted = True
    return wanted, rest


def seal_cv(chain: ChainResult) -> tuple[str | None, str]:
    """The cv= a new seal carries, or None and why no seal may be added (RFC 8617 5.1)."""
    if chain.result == "temperror":
        return None, "the chain could not be validated (DNS); a seal would misreport it"
    if chain.instances >= MAX_INSTANCES:
        return None, f"the chain already has {chain.instances} ARC sets (at most {MAX_INSTANCES})"
    if chain.terminated:
        return None, "the most recent seal already reports cv=fail"
    return chain.result, ""


def signed_fields(settings: Settings, headers: Iterable[tuple[str, str]]) -> list[str]:
    """The h= list of the AMS: every configured field as often as present."""
    counts: dict[str, int] = {}
    for name, _ in headers:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    fields: list[str] = []
    for name in dict.fromkeys(name.lower() for name in settings.seal.headers):
        fields.extend([name] * counts.get(name, 0))
    if "from" not in fields:
        fields.append("from")
    return fields


# -- header texts ---------------------------------------------------------------------------


def arc_result(chain: ChainResult, client_ip: str = "") -> authres.AuthenticationResult:
    """The ``arc=`` result of an Authentication-Results field (RFC 8617 section 7.1)."""
    comment = chain.reason
    if chain.domains:
        comment = f"{comment}; sealed by {' '.join(chain.domains)}"
    item = authres.arc.ARCAuthenticationResult(
        result=chain.result,
        result_comment=clean(comment, 200) if comment else None,
    )
    if chain.result == "pass" and chain.oldest_pass is not None:
        # authres leaves out a falsy value: 0 is given as text.
        item.header_oldest_pass = str(chain.oldest_pass)
    if client_ip:
        item.smtp_remote_ip = client_ip
    return item


def authentication_results(
    authserv_id: str, results: Sequence[authres.AuthenticationResult]
) -> str:
    """The value of an Authentication-Results field with ``results``."""
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=list(results))
    text = str(header)
    prefix = "Authentication-Results: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def parsed_results(value: str) -> list[authres.AuthenticationResult]:
    """The results of an Authentication-Results value another policy built."""
    header = authres.AuthenticationResultsHeader.parse_value(value)
    return list(header.results)
