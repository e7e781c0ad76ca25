"""SPF (RFC 7208): settings, the check of the HELO and MAIL FROM identities, and its texts.

Owns everything about SPF that needs no socket: the ``settings:`` model of the ``spf``
daemon, the evaluation of ``check_host()`` with pyspf, the mapping of pyspf's outcome to
the seven RFC 7208 results and to the facts rules see (``spf``, ``spf_helo``,
``spf_domain``, ``spf_explanation``, ``spf_reason`` ...), and the header texts the daemon
adds: ``Received-SPF`` (RFC 7208 section 9.1) and ``Authentication-Results`` (RFC 8601,
built with authres), plus the removal of forged Authentication-Results claiming our
authserv-id.

pyspf does its own DNS by default. Here every lookup it makes goes through a lookup
function its caller gives (in the daemon, the process's cached resolver of
``mailgate.core.dns``): pyspf's module-level ``DNSLookup`` hook is replaced once by a
dispatcher that calls the function installed for the current thread, so concurrent checks
on the daemon's threads never see each other's resolver. A failed lookup (the caller
raises :class:`DnsFailure`) becomes pyspf's TempError, hence ``temperror``, never a pass or
a fail. pyspf enforces RFC 7208's processing limits (section 4.6.4: ten DNS-querying
mechanisms, two void lookups, ten MX or PTR names) in its strict mode, which is used; a
malformed record, or anything pyspf stumbles over, is a ``permerror``, never a crash.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import authres  # type: ignore[import-untyped]
import spf  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailgate.policies.authresults import forged_removals
from mailgate.policies.facts import LazyFact
from mailgate.policies.settings import DnsSettings
from mailgate.policies.verdict import HeaderChange

Result = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
RESULTS: tuple[Result, ...] = (
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "temperror",
    "permerror",
)
Identity = Literal["mailfrom", "helo"]

# The facts the daemon publishes (spf_helo* only when the HELO identity is checked).
MAIL_FACTS = (
    "spf",
    "spf_domain",
    "spf_identity",
    "spf_explanation",
    "spf_reason",
    "spf_mechanism",
)
HELO_FACTS = ("spf_helo", "spf_helo_explanation", "spf_helo_reason")

# An explanation (exp=) is text from the sender's domain: keep it one short line.
MAX_EXPLANATION = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$", re.IGNORECASE)
_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# RFC 5322 dot-atom: the values of Received-SPF that need no quotes.
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


class Settings(BaseModel):
    """The ``settings:`` section of an spf rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dns: DnsSettings = Field(default_factory=DnsSettings)
    decide_at: Literal["mail", "rcpt"] = Field(
        default="mail", description="the stage at which a reject or tempfail is answered"
    )
    check_helo: bool = Field(
        default=True, description="check the HELO identity too (RFC 7208 section 2.3)"
    )
    timeout: float = Field(
        default=20.0,
        gt=0,
        le=300,
        description="seconds for all the SPF lookups of one message (RFC 7208 4.6.4)",
    )
    authserv_id: str = Field(
        default="",
        description="the name in Authentication-Results and Received-SPF; empty: the host name",
    )
    received_spf: bool = Field(default=True, description="add a Received-SPF header")
    authentication_results: bool = Field(
        default=True,
        description="add Authentication-Results and remove forged ones claiming authserv_id",
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
        """The authserv-id (and Received-SPF receiver) in force."""
        return self.authserv_id or socket.gethostname() or "localhost"


# -- routing pyspf's DNS through the caller's resolver --------------------------------------


class DnsFailure(Exception):
    """A lookup got no answer this time (the caller maps its resolver's errors to this)."""


class Answer(Protocol):
    """What a lookup returns (``mailgate.core.dns.DnsAnswer`` has this shape)."""

    @property
    def status(self) -> str: ...  # "ok", "nxdomain" or "nodata"

    @property
    def records(self) -> tuple[str, ...]: ...

    @property
    def txt(self) -> tuple[bytes, ...]: ...

    @property
    def mx(self) -> tuple[tuple[int, str], ...]: ...


# lookup(name, rdtype, timeout_seconds) -> Answer; raises DnsFailure.
Lookup = Callable[[str, str, float], Answer]

_current = threading.local()


def _pyspf_lookup(
    name: str, qtype: str, tcpfallback: Any = True, timeout: float = 30.0
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's ``DNSLookup`` hook: the thread's lookup function, in pyspf's answer format."""
    lookup: Lookup | None = getattr(_current, "lookup", None)
    if lookup is None:
        # Every lookup goes through the resolver layer: none installed is a bug, not a
        # reason to fall back on pyspf's own resolver.
        raise spf.TempError("DNS: no resolver for this check")
    try:
        answer = lookup(name, qtype, max(float(timeout), 0.0))
    except DnsFailure as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    if answer.status != "ok":
        return []
    key = (name, qtype)
    if qtype in ("TXT", "SPF"):
        # pyspf joins a record's strings itself; ours are joined already (RFC 7208 3.3).
        return [(key, (text,)) for text in answer.txt]
    if qtype == "MX":
        return [(key, (preference, host)) for preference, host in answer.mx]
    return [(key, record) for record in answer.records]


# Installed once, at import: the hook itself is process-wide, the lookup per thread.
spf.DNSLookup = _pyspf_lookup


# -- one check_host() -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one identity's check."""

    identity: Identity
    result: Result
    domain: str
    sender: str  # the address checked (postmaster@HELO for the HELO identity)
    mail_from: str  # the envelope sender as given ("" for the null sender)
    helo: str
    client_ip: str
    reason: str  # why, in words (the comment of Received-SPF)
    explanation: str  # for reply texts: the domain's exp= text on a fail, else the reason
    mechanism: str = ""  # the top-level mechanism that matched ("" when none did)
    problem: str = ""  # for a permerror: what was wrong

    def facts(self, prefix: str = "spf") -> dict[str, str]:
        if prefix == "spf":
            return {
                "spf": self.result,
                "spf_domain": self.domain,
                "spf_identity": self.identity,
                "spf_explanation": self.explanation,
                "spf_reason": self.reason,
                "spf_mechanism": self.mechanism,
            }
        return {
            f"{prefix}": self.result,
            f"{prefix}_explanation": self.explanation,
            f"{prefix}_reason": self.reason,
        }


def valid_domain(domain: str) -> bool:
    """A multi-label domain name check_host() can evaluate (RFC 7208 4.3)."""
    domain = domain.rstrip(".")
    if not domain or len(domain) > 253 or "." not in domain:
        return False
    return all(_LABEL.match(label) for label in domain.split("."))


def _clean(text: str, limit: int = MAX_EXPLANATION) -> str:
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(result: str, domain: str, client_ip: str, problem: str) -> str:
    if result == "pass":
        return f"domain of {domain} designates {client_ip} as permitted sender"
    if result == "fail":
        return f"domain of {domain} does not designate {client_ip} as permitted sender"
    if result == "softfail":
        return (
            f"transitioning domain of {domain} does not designate {client_ip} as permitted sender"
        )
    if result == "neutral":
        return f"{client_ip} is neither permitted nor denied by domain of {domain}"
    if result == "none":
        if not valid_domain(domain):
            return f"{domain or 'the empty name'} is not a domain SPF can check"
        return f"domain of {domain} does not publish an SPF record"
    if result == "permerror":
        return _clean(f"permanent error in processing domain of {domain}: {problem}")
    return _clean(f"temporary error in processing during lookup of {domain}: {problem}")


def check_host(
    client_ip: str,
    mail_from: str,
    helo: str,
    lookup: Lookup,
    *,
    timeout: float = 20.0,
    receiver: str = "",
) -> SpfResult:
    """Check the MAIL FROM identity, or with ``mail_from=""`` the HELO identity.

    For the null sender RFC 7208 section 2.4 checks ``postmaster@HELO``. Never raises:
    whatever goes wrong inside pyspf is a temperror (a lookup) or a permerror (a record).
    """
    identity: Identity = "mailfrom" if mail_from else "helo"
    if mail_from:
        local, _, domain = mail_from.rpartition("@")
        sender = f"{local or 'postmaster'}@{domain}"
    else:
        domain = helo
        sender = f"postmaster@{helo}"
    domain = domain.rstrip(".").lower()

    def done(result: Result, mechanism: str = "", problem: str = "", exp: str = "") -> SpfResult:
        reason = _reason(result, domain, client_ip, problem)
        return SpfResult(
            identity=identity,
            result=result,
            domain=domain,
            sender=sender,
            mail_from=mail_from,
            helo=helo,
            client_ip=client_ip,
            reason=reason,
            explanation=_clean(exp) if exp else reason,
            mechanism=mechanism,
            problem=_clean(problem),
        )

    if not valid_domain(domain):
        # An IP literal or a single-label HELO, a broken address: nothing to look up.
        return done("none")
    previous = getattr(_current, "lookup", None)
    _current.lookup = lookup
    try:
        query = spf.query(
            i=client_ip,
            s=sender,
            h=helo,
            receiver=receiver or None,
            timeout=timeout,
            querytime=max(timeout, 0.001),
        )
        result, _code, exp = query.check()
    except Exception as exc:  # pyspf must never take the daemon down with it
        return done("temperror", problem=f"internal error: {type(exc).__name__}: {exc}")
    finally:
        _current.lookup = previous
    if result not in RESULTS:
        return done("permerror", problem=f"unexpected result {result!r}")
    problem = str(getattr(query, "prob", "") or "")
    if result == "permerror" and query.mech:
        problem = f"{problem}: {' '.join(str(m) for m in query.mech)}"
    mechanism = str(query.mechanism or "")
    # exp= text only on a fail, and only when the domain gave one (not pyspf's default).
    explanation = ""
    if result == "fail" and exp and exp != spf.EXPLANATIONS["fail"]:
        explanation = str(exp)
    return done(result, mechanism=mechanism, problem=problem, exp=explanation)


# -- the checks of one message, computed when a rule first asks -----------------------------


class MessageCheck:
    """The SPF checks of one message: HELO and MAIL FROM, each at most once, on demand.

    ``helo_cache`` outlives the message (one per SMTP connection): several messages on
    one connection share the HELO check. All checks of the message share one time limit.
    """

    def __init__(
        self,
        settings: Settings,
        lookup: Lookup,
        *,
        client_ip: str,
        helo: str,
        mail_from: str,
        helo_cache: dict[tuple[str, str], SpfResult] | None = None,
        on_result: Callable[[SpfResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self.lookup = lookup
        self.client_ip = client_ip
        self.helo = helo
        self.mail_from = mail_from
        self.helo_cache = helo_cache if helo_cache is not None else {}
        self.on_result = on_result
        self._deadline: float | None = None
        self._lock = threading.Lock()
        self.helo_result: SpfResult | None = None
        self.mail_result: SpfResult | None = None

    def _time_left(self) -> float:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.settings.timeout
        return max(self._deadline - now, 0.001)

    def check_helo(self) -> SpfResult:
        with self._lock:
            if self.helo_result is None:
                key = (self.client_ip, self.helo.lower())
                cached = self.helo_cache.get(key)
                if cached is None:
                    cached = self._check("")
                    self.helo_cache[key] = cached
                self.helo_result = cached
            return self.helo_result

    def check_mail(self) -> SpfResult:
        if not self.mail_from and self.settings.check_helo:
            # The null sender's identity is the HELO's: one check serves both.
            result = self.check_helo()
            with self._lock:
                self.mail_result = result
            return result
        with self._lock:
            if self.mail_result is None:
                self.mail_result = self._check(self.mail_from)
            return self.mail_result

    def _check(self, mail_from: str) -> SpfResult:
        result = check_host(
            self.client_ip,
            mail_from,
            self.helo,
            self.lookup,
            timeout=self._time_left(),
            receiver=self.settings.server_id,
        )
        if self.on_result is not None:
            self.on_result(result)
        return result

    def lazy_facts(self) -> dict[str, LazyFact]:
        """The facts, each computed (with its identity's check) when a rule first asks."""
        facts: dict[str, LazyFact] = {
            name: LazyFact(lambda name=name: self.check_mail().facts()[name])  # type: ignore[misc]
            for name in MAIL_FACTS
        }
        if self.settings.check_helo:
            for name in HELO_FACTS:
                facts[name] = LazyFact(
                    lambda name=name: self.check_helo().facts("spf_helo")[name]  # type: ignore[misc]
                )
        return facts

    @property
    def header_result(self) -> SpfResult | None:
        """The result the headers tell: MAIL FROM's, else HELO's, if either was checked."""
        return self.mail_result or self.helo_result


# -- header texts ---------------------------------------------------------------------------


def quote(value: str) -> str:
    """A Received-SPF value: as is when a dot-atom, else a quoted-string."""
    if _DOT_ATOM.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_HEADER_RESULT = {
    "pass": "Pass",
    "fail": "Fail",
    "softfail": "SoftFail",
    "neutral": "Neutral",
    "none": "None",
    "temperror": "TempError",
    "permerror": "PermError",
}


def _comment(text: str) -> str:
    # Parentheses and backslashes inside a comment must be quoted (RFC 5322 ccontent).
    return re.sub(r"([()\\])", r"\\\1", text)


def received_spf(result: SpfResult, receiver: str) -> str:
    """The value of a Received-SPF header field (RFC 7208 section 9.1)."""
    pairs = [
        f"client-ip={result.client_ip};",
        f"envelope-from={quote(result.mail_from)};",
        f"helo={quote(result.helo)};",
    ]
    if result.problem and result.result == "permerror":
        pairs.append(f"problem={quote(result.problem)};")
    if result.mechanism and result.result not in ("none", "temperror", "permerror"):
        pairs.append(f"mechanism={quote(result.mechanism)};")
    pairs.append(f"receiver={quote(receiver)};")
    pairs.append(f"identity={result.identity}")
    comment = _comment(f"{receiver}: {result.reason}")
    return f"{_HEADER_RESULT[result.result]} ({comment}) {' '.join(pairs)}"


def authentication_results(result: SpfResult, authserv_id: str) -> str:
    """The value of an Authentication-Results header field with this SPF result."""
    if result.identity == "mailfrom":
        # RFC 8601 2.7.2: smtp.mailfrom is the address (local-part@domain).
        spf_result = authres.SPFAuthenticationResult(
            result=result.result,
            result_comment=_clean(result.reason, 300),
            smtp_mailfrom=result.sender,
        )
    else:
        spf_result = authres.SPFAuthenticationResult(
            result=result.result,
            result_comment=_clean(result.reason, 300),
            smtp_helo=result.helo,
        )
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=[spf_result])
    text = str(header)
    prefix = "Authentication-Results: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def header_changes(
    settings: Settings, result: SpfResult | None, headers: Iterable[tuple[str, str]]
) -> tuple[list[HeaderChange], list[HeaderChange]]:
    """(removals to make first, headers to add last) for one message's verdict."""
    server_id = settings.server_id
    removals: list[HeaderChange] = []
    additions: list[HeaderChange] = []
    if settings.authentication_results:
        removals = forged_removals(headers, server_id)
    if result is not None:
        # Trace fields go on top (RFC 7208 9.1, RFC 8601 5); inserted in this order,
        # Received-SPF ends up first.
        if settings.authentication_results:
            additions.append(
                HeaderChange(
                    op="insert",
                    name="Authentication-Results",
                    value=authentication_results(result, server_id),
                    index=0,
                )
            )
        if settings.received_spf:
            additions.append(
                HeaderChange(
                    op="insert",
                    name="Received-SPF",
                    value=received_spf(result, server_id),
                    index=0,
                )
            )
    return removals, additions
