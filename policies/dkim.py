"""DKIM (RFC 6376, RFC 8463): settings, which mail is signed, results and their header texts.

Owns everything about DKIM that needs neither a socket nor a key file: the ``settings:``
model of the ``dkim`` daemon (DNS, signing keys per domain and selector, what is signed,
canonicalization, the header fields signed), the decision which domain a message is signed
as, the mapping of each signature's verification outcome to the RFC 8601 results and to
the facts rules see (``dkim``, ``dkim_result``, ``dkim_pass_domains``, ``dkim_domains``,
``dkim_results``, ``dkim_sign``), the header fields signed, the application of a verdict's
header changes to the header list (so a signature covers the message as it leaves), and the
``Authentication-Results`` text (built with authres), plus the removal of forged
Authentication-Results fields claiming our authserv-id.

The cryptography and the DNS lookups (dkimpy, ``mailgate.core.dns``) are the daemon's,
in ``mailgate.milters.dkim``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Literal

import authres  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailgate.policies.settings import DnsSettings
from mailgate.policies.verdict import HeaderChange

# RFC 8601 section 2.7.1 results, best first (the order dkim_result picks from).
Result = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror", "none"]
RESULTS: tuple[Result, ...] = (
    "pass",
    "fail",
    "neutral",
    "policy",
    "temperror",
    "permerror",
    "none",
)
# The one summary result of a message: a pass wins; a temporary error next (a retry may
# pass); then the failures.
_SUMMARY_ORDER: tuple[Result, ...] = (
    "pass",
    "temperror",
    "fail",
    "permerror",
    "policy",
    "neutral",
    "none",
)
Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
Canonicalization = Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"]

FACTS = ("dkim", "dkim_result", "dkim_pass_domains", "dkim_domains", "dkim_results")

# The header a rule adds to steer signing ("no": do not sign this message; "yes": sign it
# even though the settings do not select it). The daemon consumes it: it never reaches the
# message, and the same field arriving in a message means nothing.
SIGN_CONTROL = "X-Mailgate-DKIM-Sign"

# RFC 6376 section 5.4.1: the fields a signer SHOULD sign (those present are signed).
DEFAULT_HEADERS: tuple[str, ...] = (
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)
# Fields a signature must not cover: they change in transit (RFC 6376 5.4).
_NEVER_SIGNED = frozenset(
    {"return-path", "received", "comments", "keywords", "dkim-signature", "authentication-results"}
)

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$", re.IGNORECASE)
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def valid_domain(domain: str) -> bool:
    """A domain name DKIM can use as d= (letters, digits, '-', '_', at least two labels)."""
    domain = domain.rstrip(".")
    if not domain or len(domain) > 253 or "." not in domain:
        return False
    return all(_LABEL.match(label) for label in domain.split("."))


def valid_selector(selector: str) -> bool:
    """A selector (RFC 6376 3.1): one or more dot-separated labels."""
    return bool(selector) and all(_LABEL.match(label) for label in selector.split("."))


# -- settings -------------------------------------------------------------------------------


class KeySettings(BaseModel):
    """One signing key of a domain: ``{selector: s2026, key: /etc/mailgate/dkim/x.key}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: str = Field(description="the selector: the key's record is SELECTOR._domainkey.D")
    key: Path = Field(description="the private key file (PEM; written by mailgate dkim keygen)")
    algorithm: Algorithm | None = Field(
        default=None, description="rsa-sha256 or ed25519-sha256; default: from the key"
    )
    sign: bool = Field(
        default=True,
        description="sign with this key now; false keeps it listed (published, or retiring)",
    )

    @field_validator("selector")
    @classmethod
    def _valid_selector(cls, value: str) -> str:
        value = value.strip().lower()
        if not valid_selector(value):
            raise ValueError(f"{value!r}: a selector is DNS labels (letters, digits, '-', '_')")
        return value


class SignSettings(BaseModel):
    """Which mail the daemon signs (besides what rules select with X-Mailgate-DKIM-Sign)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    authenticated: bool = Field(
        default=True, description="sign mail of clients that authenticated (submission)"
    )
    networks: tuple[str, ...] = Field(
        default=(), description="sign mail from these client networks (internal hosts)"
    )
    subdomains: bool = Field(
        default=False,
        description="sign mail From a subdomain with its parent domain's key",
    )

    @field_validator("networks", mode="before")
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


class Settings(BaseModel):
    """The ``settings:`` section of a dkim rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dns: DnsSettings = Field(default_factory=DnsSettings)
    timeout: float = Field(
        default=10.0, gt=0, le=300, description="seconds for all key lookups of one message"
    )
    max_signatures: int = Field(
        default=5, ge=1, le=50, description="signatures verified per message; the rest: policy"
    )
    min_key_bits: int = Field(
        default=1024, ge=512, le=8192, description="shorter RSA keys do not pass (RFC 8301)"
    )
    keys: dict[str, tuple[KeySettings, ...]] = Field(
        default_factory=dict, description="signing keys: domain -> list of selectors and keys"
    )
    sign: SignSettings = Field(default_factory=SignSettings)
    canonicalization: Canonicalization = Field(
        default="relaxed/relaxed", description="header/body canonicalization of signatures"
    )
    headers: tuple[str, ...] = Field(
        default=DEFAULT_HEADERS, description="the header fields signed, when present"
    )
    oversign: tuple[str, ...] = Field(
        default=("From",),
        description="fields signed once more than present, so none can be added",
    )
    on_sign_error: Literal["tempfail", "accept"] = Field(
        default="tempfail",
        description="a message to sign whose key cannot be used: tempfail, or accept unsigned",
    )
    authserv_id: str = Field(
        default="", description="the name in Authentication-Results; empty: the host name"
    )
    authentication_results: bool = Field(
        default=True,
        description="add Authentication-Results and remove forged ones claiming authserv_id",
    )

    @field_validator("keys", mode="before")
    @classmethod
    def _key_lists(cls, value: object) -> object:
        # One key per domain may be written without the list.
        if isinstance(value, dict):
            return {
                domain: [keys] if isinstance(keys, dict) else keys for domain, keys in value.items()
            }
        return value

    @field_validator("keys")
    @classmethod
    def _valid_keys(
        cls, value: dict[str, tuple[KeySettings, ...]]
    ) -> dict[str, tuple[KeySettings, ...]]:
        normal: dict[str, tuple[KeySettings, ...]] = {}
        for domain, keys in value.items():
            name = domain.strip().rstrip(".").lower()
            if not valid_domain(name):
                raise ValueError(f"{domain!r} is not a domain name")
            if name in normal:
                raise ValueError(f"{domain!r} is listed twice")
            if not keys:
                raise ValueError(f"{domain}: list at least one key")
            selectors = [key.selector for key in keys]
            if len(set(selectors)) != len(selectors):
                raise ValueError(f"{domain}: a selector is listed twice")
            normal[name] = keys
        return normal

    @field_validator("headers", "oversign", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("headers", "oversign")
    @classmethod
    def _valid_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"{name!r} is not a header field name")
            if name.lower() in _NEVER_SIGNED:
                raise ValueError(f"{name} changes in transit and must not be signed")
        return value

    @field_validator("authserv_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        value = value.strip()
        if value and not _AUTHSERV_ID.match(value):
            raise ValueError(f"{value!r}: use a host name (letters, digits, '.', '-', '_')")
        return value

    @model_validator(mode="after")
    def _from_is_signed(self) -> Settings:
        if "from" not in {name.lower() for name in self.headers}:
            raise ValueError("headers: From must be signed (RFC 6376 5.4)")
        return self

    @property
    def server_id(self) -> str:
        """The authserv-id in force."""
        return self.authserv_id or socket.gethostname() or "localhost"


# -- which mail is signed -------------------------------------------------------------------


def from_domains(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The domains of the addresses in the From header fields, lower case."""
    values = [value for name, value in headers if name.lower() == "from"]
    domains = []
    for _, address in getaddresses(values):
        if "@" in address:
            domains.append(address.rpartition("@")[2].strip().rstrip(".").lower())
    return domains


def signing_domain(settings: Settings, headers: Iterable[tuple[str, str]]) -> str | None:
    """The domain of ``settings.keys`` a message From: that domain is signed as, or None.

    One From field with one address is required (RFC 5322 3.6; a message with several
    authors has no one domain to sign as). With ``sign.subdomains`` the nearest parent
    domain with keys serves its subdomains.
    """
    headers = list(headers)
    if sum(1 for name, _ in headers if name.lower() == "from") != 1:
        return None
    domains = from_domains(headers)
    if len(domains) != 1:
        return None
    domain = domains[0]
    if domain in settings.keys:
        return domain
    if settings.sign.subdomains:
        labels = domain.split(".")
        for start in range(1, len(labels) - 1):
            parent = ".".join(labels[start:])
            if parent in settings.keys:
                return parent
    return None


def selected(settings: Settings, auth_user: str | None, client_ip: str) -> bool:
    """Whether the settings select this message for signing (before any rule's word)."""
    if settings.sign.authenticated and auth_user:
        return True
    if settings.sign.networks and client_ip:
        try:
            address = ipaddress.ip_address(client_ip.strip("[]").removeprefix("IPv6:"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(
            address in ipaddress.ip_network(network, strict=False)
            for network in settings.sign.networks
        )
    return False


def active_keys(settings: Settings, domain: str) -> list[KeySettings]:
    """The keys a message signed as ``domain`` is signed with (one signature each)."""
    return [key for key in settings.keys.get(domain, ()) if key.sign]


def sign_control(changes: Sequence[HeaderChange]) -> tuple[bool | None, list[HeaderChange]]:
    """What the rules said about signing (True, False, None: nothing), and the other changes.

    The last X-Mailgate-DKIM-Sign value a rule set counts: "no" (or "false") prevents the
    signature, "yes" (or "true") asks for it.
    """
    wanted: bool | None = None
    rest: list[HeaderChange] = []
    for change in changes:
        if change.name.lower() != SIGN_CONTROL.lower():
            rest.append(change)
            continue
        value = change.value.strip().lower()
        if value in ("no", "false", "0"):
            wanted = False
        elif value in ("yes", "true", "1"):
            wanted = True
    return wanted, rest


def signed_fields(settings: Settings, headers: Iterable[tuple[str, str]]) -> list[str]:
    """The h= list: every configured field as often as present, oversigned ones once more."""
    counts: dict[str, int] = {}
    for name, _ in headers:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    fields: list[str] = []
    seen: set[str] = set()
    for name in settings.headers:
        lower = name.lower()
        if lower in seen:
            continue
        seen.add(lower)
        fields.extend([lower] * counts.get(lower, 0))
    for name in settings.oversign:
        lower = name.lower()
        fields.append(lower)
    return fields


def apply_changes(
    headers: Sequence[tuple[bytes, bytes]], changes: Iterable[HeaderChange]
) -> list[tuple[bytes, bytes]]:
    """The raw header list (name, value as on the wire after the colon) after ``changes``.

    The same rules the MTA follows (Postfix's cleanup_milter.c, mailgate's core): "add"
    appends, "insert" puts the field before the index-th (0-based), "change" replaces the
    index-th field of that name (1-based) and an empty value deletes it; changing a field
    that is not there appends it. Values from the rules get the one space after the colon.
    """
    result = list(headers)
    for change in changes:
        name = change.name.encode("ascii", "replace")
        value = b" " + change.value.encode("utf-8").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if change.op == "add":
            result.append((name, value))
        elif change.op == "insert":
            result.insert(max(change.index, 0), (name, value))
        else:
            wanted = max(change.index, 1)
            seen = 0
            for position, (existing, _) in enumerate(result):
                if existing.lower() == name.lower():
                    seen += 1
                    if seen == wanted:
                        if change.value:
                            result[position] = (existing, value)
                        else:
                            del result[position]
                        break
            else:
                if change.value:
                    result.append((name, value))
    return result


# -- verification results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """The verification of one DKIM-Signature field."""

    result: Result
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""
    identity: str = ""  # i= ("" when absent)
    b_prefix: str = ""  # the first characters of b=, to name the signature (RFC 6008)

    def fact(self) -> dict[str, str]:
        return {
            key: value
            for key, value in asdict(self).items()
            if key in ("result", "domain", "selector", "algorithm", "reason")
        }


def summary(results: Sequence[SignatureResult]) -> Result:
    """The message's one result: pass if any signature passed, else the most telling."""
    found = {item.result for item in results}
    for result in _SUMMARY_ORDER:
        if result in found:
            return result
    return "none"


def facts(results: Sequence[SignatureResult]) -> dict[str, object]:
    """The facts rules see, from the signatures' results (no signature: ``dkim`` is none)."""
    return {
        "dkim": [item.result for item in results] or ["none"],
        "dkim_result": summary(results),
        "dkim_pass_domains": sorted({item.domain for item in results if item.result == "pass"}),
        "dkim_domains": sorted({item.domain for item in results if item.domain}),
        "dkim_results": [item.fact() for item in results],
    }


def clean(text: str, limit: int = 200) -> str:
    """One short line of text (a reason that quotes what a sender published)."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- header texts ---------------------------------------------------------------------------


def authentication_results(results: Sequence[SignatureResult], authserv_id: str) -> str:
    """The value of an Authentication-Results field with one result per signature."""
    items = []
    if not results:
        items.append(authres.DKIMAuthenticationResult(result="none"))
    for item in results:
        entry = authres.DKIMAuthenticationResult(
            result=item.result,
            result_comment=clean(item.reason, 120) if item.reason else None,
            header_d=item.domain or None,
            header_i=item.identity or None,
            header_s=item.selector or None,
            header_a=item.algorithm or None,
        )
        if item.b_prefix:
            # RFC 6008: header.b names the signature when one domain signed twice.
            entry.properties.append(
                authres.AuthenticationResultProperty("header", "b", item.b_prefix)
            )
        items.append(entry)
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=items)
    text = str(header)
    prefix = "Authentication-Results: "
    return text[len(prefix) :] if text.startswith(prefix) else text
