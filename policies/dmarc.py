"""DMARC (RFC 7489, with the settled DMARCbis updates): settings, records, alignment, policy.

Owns everything about DMARC that needs no socket:

- the ``settings:`` model of the ``dmarc`` daemon (DNS, the SPF and DKIM checks it runs
  itself, the Authentication-Results header, the evaluation history and the aggregate
  reports' sender);
- the strict parsing and validation of a DMARC record (section 6.3: ``v`` first, then
  ``p sp np pct adkim aspf rua ruf fo rf ri``; unknown tags ignored; a bad value of an
  optional tag falls back to its default, with a note; an invalid or missing ``p`` makes
  the record ``p=none`` when it has a valid ``rua``, else no record at all (6.6.3));
- policy discovery (6.6.3): ``_dmarc.<From domain>``, else ``_dmarc.<organizational
  domain>``; several DMARC records at one name count as none; a DNS failure is a
  ``temperror``;
- the RFC5322.From domain of a message (6.6.1: no From, several From fields or addresses
  in different domains are a ``permerror``);
- identifier alignment (3.1), relaxed through the organizational domain of the Public
  Suffix List (``mailgate.policies.psl``) or strict;
- the policy to apply: ``p`` for the From domain, ``sp`` for its subdomains, ``np`` for a
  subdomain that does not exist (DMARCbis), then ``pct`` sampling (6.6.4: a message not
  sampled gets the next lower policy) with an injectable random source;
- the facts rules see (``dmarc``, ``dmarc_policy``, ``dmarc_domain`` ...) and the
  ``Authentication-Results`` text with the spf, dkim and dmarc results (built with authres).

DNS is reached through a lookup function the caller gives (the daemon passes the process's
cached resolver of ``mailgate.core.dns``), as in ``mailgate.policies.spf``.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Literal

import authres  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailgate.policies.authresults import forged_removals
from mailgate.policies.psl import normal, organizational_domain
from mailgate.policies.settings import DnsSettings
from mailgate.policies.spf import DnsFailure, Lookup, SpfResult, valid_domain
from mailgate.policies.verdict import HeaderChange

Result = Literal["pass", "fail", "none", "temperror", "permerror"]
Disposition = Literal["none", "quarantine", "reject"]
DISPOSITIONS: tuple[Disposition, ...] = ("none", "quarantine", "reject")

FACTS = (
    "dmarc",
    "dmarc_policy",
    "dmarc_domain",
    "dmarc_org_domain",
    "dmarc_spf_aligned",
    "dmarc_dkim_aligned",
    "dmarc_record_policy",
    "dmarc_record_domain",
    "dmarc_sampled_out",
    "dmarc_reason",
)

_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# A reporting URI with its optional size limit (section 6.4): mailto:a@b.example!10m
_URI = re.compile(r"^(?P<uri>[a-zA-Z][a-zA-Z0-9+.-]*:[^!\s]+)(?:!(?P<size>\d+)(?P<unit>[kmgt])?)?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# -- settings -------------------------------------------------------------------------------


class ReportSettings(BaseModel):
    """Aggregate reports (``mailgate dmarc report``): who sends them and as whom."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    org_name: str = Field(default="", description="report_metadata org_name; empty: the host name")
    sender: str = Field(
        default="",
        description="the reporting address (From and MAIL FROM); empty: postmaster@HOSTNAME",
    )
    contact_info: str = Field(default="", description="extra_contact_info of the reports")
    max_records: int = Field(
        default=10000, ge=1, description="rows per report at most (the busiest sources first)"
    )
    keep_days: int = Field(
        default=14,
        ge=2,
        le=366,
        description="days of evaluations kept; older ones are removed after each --send",
    )

    @field_validator("sender")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if value and not _ADDRESS.match(value):
            raise ValueError(f"{value!r}: the reporting address is local-part@domain")
        return value


class Settings(BaseModel):
    """The ``settings:`` section of a dmarc rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dns: DnsSettings = Field(default_factory=DnsSettings)
    timeout: float = Field(
        default=20.0, gt=0, le=300, description="seconds for the SPF, DKIM and DMARC lookups"
    )
    authserv_id: str = Field(
        default="", description="the name in Authentication-Results; empty: the host name"
    )
    authentication_results: bool = Field(
        default=True,
        description="add the one Authentication-Results header (spf, dkim, dmarc) and "
        "remove forged ones claiming authserv_id",
    )
    min_key_bits: int = Field(default=1024, ge=512, description="RSA keys shorter fail DKIM")
    max_signatures: int = Field(default=5, ge=1, description="DKIM signatures verified at most")
    public_suffix_list: str = Field(
        default="", description="a public_suffix_list.dat to use; empty: the shipped copy"
    )
    history: bool = Field(default=True, description="record each evaluation for the reports")
    history_path: str = Field(
        default="", description="the SQLite file; empty: dmarc.sqlite in the data directory"
    )
    reports: ReportSettings = Field(default_factory=ReportSettings)

    @field_validator("authserv_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        value = value.strip()
        if value and not _AUTHSERV_ID.match(value):
            raise ValueError(f"{value!r}: use a host name (letters, digits, '.', '-', '_')")
        return value

    @property
    def server_id(self) -> str:
        return self.authserv_id or socket.gethostname() or "localhost"


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportUri:
    """One ``rua``/``ruf`` URI and its size limit in bytes (0: none)."""

    uri: str
    max_size: int = 0

    @property
    def mailto(self) -> str | None:
        """The address of a ``mailto:`` URI (None for other schemes)."""
        if not self.uri.lower().startswith("mailto:"):
            return None
        from urllib.parse import unquote

        address = unquote(self.uri[len("mailto:") :].split("?", 1)[0]).strip()
        return address if _ADDRESS.match(address) else None

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A DMARC record as it applies (defaults filled in), and what was wrong with it."""

    p: Disposition
    sp: Disposition | None = None
    np: Disposition | None = None
    pct: int = 100
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    rua: tuple[ReportUri, ...] = ()
    ruf: tuple[ReportUri, ...] = ()
    fo: str = "0"
    rf: str = "afrf"
    ri: int = 86400
    problems: tuple[str, ...] = ()
    text: str = ""


class RecordError(ValueError):
    """Not a usable DMARC record (the domain then has none)."""


def _uris(value: str, tag: str, problems: list[str]) -> tuple[ReportUri, ...]:
    found: list[ReportUri] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        match = _URI.match(item)
        if not match:
            problems.append(f"{tag}: {item!r} is not a URI; ignored")
            continue
        size = int(match["size"]) * _UNITS[(match["unit"] or "").lower()] if match["size"] else 0
        found.append(ReportUri(match["uri"], size))
    return tuple(found)


def _disposition(value: str) -> Disposition | None:
    value = value.strip().lower()
    return value if value in DISPOSITIONS else None


def parse_record(text: str) -> DmarcRecord:
    """Parse a DMARC record strictly (RFC 7489 6.3, 6.6.3); RecordError if it is unusable."""
    text = text.strip()
    parts = [part.strip() for part in text.split(";")]
    if not parts or re.sub(r"\s+", "", parts[0]) != "v=DMARC1":
        raise RecordError("the record does not begin with v=DMARC1")
    tags: dict[str, str] = {}
    problems: list[str] = []
    for part in parts[1:]:
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            problems.append(f"{part!r} is not a tag=value pair; ignored")
            continue
        if name in tags:
            problems.append(f"tag {name} repeated; the first one counts")
            continue
        tags[name] = value.strip()
    known = {"p", "sp", "np", "pct", "adkim", "aspf", "rua", "ruf", "fo", "rf", "ri", "t", "psd"}
    for name in tags:
        if name not in known:
            problems.append(f"unknown tag {name}; ignored")
    rua = _uris(tags.get("rua", ""), "rua", problems)
    ruf = _uris(tags.get("ruf", ""), "ruf", problems)
    p = _disposition(tags["p"]) if "p" in tags else None
    sp: Disposition | None = None
    sp_valid = True
    if "sp" in tags:
        sp = _disposition(tags["sp"])
        sp_valid = sp is not None
    if p is None or not sp_valid:
        # 6.6.3: with a valid rua the record counts as p=none; otherwise there is none.
        what = "no p= tag" if "p" not in tags else f"invalid p={tags.get('p', '')!r}"
        if not sp_valid:
            what = f"invalid sp={tags['sp']!r}" if p is not None else what
        if not rua:
            raise RecordError(f"{what} and no valid rua: the record is not used")
        problems.append(f"{what}: treated as p=none since rua is valid (RFC 7489 6.6.3)")
        p, sp = "none", None
    np: Disposition | None = None
    if "np" in tags:
        np = _disposition(tags["np"])
        if np is None:
            problems.append(f"invalid np={tags['np']!r}; ignored")
    pct = 100
    if "pct" in tags:
        if tags["pct"].isdigit() and 0 <= int(tags["pct"]) <= 100:
            pct = int(tags["pct"])
        else:
            problems.append(f"invalid pct={tags['pct']!r}; 100 is used")
    alignment: dict[str, Literal["r", "s"]] = {"adkim": "r", "aspf": "r"}
    for name in alignment:
        if name in tags:
            value = tags[name].lower()
            if value in ("r", "s"):
                alignment[name] = value  # type: ignore[assignment]
            else:
                problems.append(f"invalid {name}={tags[name]!r}; r is used")
    fo = "0"
    if "fo" in tags:
        options = [o.strip().lower() for o in tags["fo"].split(":")]
        if options and all(o in ("0", "1", "d", "s") for o in options):
            fo = ":".join(options)
        else:
            problems.append(f"invalid fo={tags['fo']!r}; 0 is used")
    rf = "afrf"
    if "rf" in tags:
        formats = [f.strip().lower() for f in tags["rf"].split(":")]
        if "afrf" in formats:
            rf = ":".join(formats)
        else:
            problems.append(f"invalid rf={tags['rf']!r}; afrf is used")
    ri = 86400
    if "ri" in tags:
        if tags["ri"].isdigit() and int(tags["ri"]) < 2**32:
            ri = int(tags["ri"])
        else:
            problems.append(f"invalid ri={tags['ri']!r}; 86400 is used")
    return DmarcRecord(
        p=p,
        sp=sp,
        np=np,
        pct=pct,
        adkim=alignment["adkim"],
        aspf=alignment["aspf"],
        rua=rua,
        ruf=ruf,
        fo=fo,
        rf=rf,
        ri=ri,
        problems=tuple(problems),
        text=text,
    )


@dataclass(frozen=True, slots=True)
class Discovery:
    """Where the policy of a From domain was found (section 6.6.3)."""

    result: Literal["found", "none", "temperror"]
    record: DmarcRecord | None = None
    domain: str = ""  # the domain whose _dmarc record applies
    org_domain: str = ""
    notes: tuple[str, ...] = ()


def _records_at(name: str, lookup: Lookup, timeout: float) -> list[str]:
    answer = lookup(name, "TXT", timeout)
    if answer.status != "ok":
        return []
    texts = [raw.decode("utf-8", "replace") for raw in answer.txt]
    # Records not beginning with v=DMARC1 are discarded (6.6.3 step 2).
    return [t for t in texts if re.sub(r"\s+", "", t.split(";", 1)[0]) == "v=DMARC1"]


def discover(from_domain: str, lookup: Lookup, *, timeout: float = 5.0, psl: str = "") -> Discovery:
    """Find the DMARC record for ``from_domain``; DnsFailure becomes a temperror."""
    domain = normal(from_domain)
    if not valid_domain(domain):
        note = f"{domain!r} is not a domain name a DMARC record can be published for"
        return Discovery("none", domain=domain, org_domain=domain, notes=(note,))
    org = organizational_domain(domain, psl)
    notes: list[str] = []
    candidates = [domain] if domain == org else [domain, org]
    for name in candidates:
        try:
            texts = _records_at(f"_dmarc.{name}", lookup, timeout)
        except DnsFailure as exc:
            return Discovery("temperror", domain=name, org_domain=org, notes=(f"DNS: {exc}",))
        if len(texts) > 1:
            # 6.6.3 step 5: several records, none applies (and the search ends there).
            notes.append(f"_dmarc.{name} has {len(texts)} DMARC records: none is used")
            return Discovery("none", domain=name, org_domain=org, notes=tuple(notes))
        if texts:
            try:
                record = parse_record(texts[0])
            except RecordError as exc:
                notes.append(f"_dmarc.{name}: {exc}")
                return Discovery("none", domain=name, org_domain=org, notes=tuple(notes))
            return Discovery("found", record, name, org, tuple(notes))
    return Discovery("none", domain=org, org_domain=org, notes=tuple(notes))


# -- the From domain ------------------------------------------------------------------------


def from_domain(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(the RFC5322.From domain, "") or ("", why it has none usable) per RFC 7489 6.6.1."""
    values = [value for name, value in headers if name.lower() == "from"]
    if not values:
        return "", "the message has no From field"
    if len(values) > 1:
        return "", f"the message has {len(values)} From fields"
    addresses = [addr for _, addr in getaddresses(values) if addr]
    domains = {normal(addr.rpartition("@")[2]) for addr in addresses if "@" in addr}
    if not domains:
        return "", "the From field has no address with a domain"
    if len(domains) > 1:
        return "", "the From field names addresses in different domains"
    # A name no record can exist for (root@localhost) is left to discovery: no policy.
    return domains.pop(), ""


# -- alignment and the result ---------------------------------------------------------------


def aligned(identifier: str, from_dom: str, mode: str, psl: str = "") -> bool:
    """Is ``identifier`` aligned with the From domain (3.1: ``s`` strict, ``r`` relaxed)?"""
    a, b = normal(identifier), normal(from_dom)
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a, psl) == organizational_domain(b, psl)


@dataclass(frozen=True, slots=True)
class DkimItem:
    """One DKIM signature's outcome as DMARC needs it."""

    result: str
    domain: str
    selector: str = ""


@dataclass
class Evaluation:
    """The DMARC evaluation of one message, with what the reports need."""

    result: Result
    policy: Disposition = "none"  # what to apply, after p/sp/np and pct
    from_domain: str = ""
    org_domain: str = ""
    record_domain: str = ""
    record: DmarcRecord | None = None
    record_policy: Disposition | None = None  # p, sp or np as published, before pct
    spf_aligned: bool = False
    dkim_aligned: bool = False
    sampled_out: bool = False
    reason: str = ""
    spf: SpfResult | None = None
    dkim: Sequence[DkimItem] = field(default_factory=tuple)
    spf_domain: str = ""

    def facts(self) -> dict[str, object]:
        return {
            "dmarc": self.result,
            "dmarc_policy": self.policy,
            "dmarc_domain": self.from_domain,
            "dmarc_org_domain": self.org_domain,
            "dmarc_spf_aligned": self.spf_aligned,
            "dmarc_dkim_aligned": self.dkim_aligned,
            "dmarc_record_policy": self.record_policy or "",
            "dmarc_record_domain": self.record_domain,
            "dmarc_sampled_out": self.sampled_out,
            "dmarc_reason": self.reason,
        }


def select_policy(
    record: DmarcRecord, from_dom: str, record_domain: str, exists: Callable[[], bool]
) -> Disposition:
    """p for the domain itself; for a subdomain np (if it does not exist), sp, then p.

    ``exists`` is asked only when the answer matters (a subdomain, and np published).
    """
    if normal(from_dom) == normal(record_domain):
        return record.p
    if record.np is not None and not exists():
        return record.np
    return record.sp or record.p


def sample(policy: Disposition, pct: int, rand: Callable[[], float]) -> tuple[Disposition, bool]:
    """(policy applied, sampled out?) under ``pct`` (6.6.4: the next lower policy if not)."""
    if policy == "none" or pct >= 100:
        return policy, False
    if rand() * 100 < pct:
        return policy, False
    return ("quarantine" if policy == "reject" else "none"), True


def evaluate(
    discovery: Discovery,
    from_dom: str,
    spf: SpfResult | None,
    dkim: Sequence[DkimItem],
    *,
    exists: Callable[[], bool] = lambda: True,
    rand: Callable[[], float] = random.random,
    psl: str = "",
) -> Evaluation:
    """The DMARC result and the policy to apply (sections 4.2, 6.6)."""
    spf_domain = ""
    if spf is not None:
        spf_domain = spf.domain if spf.identity == "mailfrom" else normal(spf.helo)
    base = Evaluation(
        result="none",
        from_domain=from_dom,
        org_domain=discovery.org_domain or organizational_domain(from_dom, psl),
        record_domain=discovery.domain if discovery.result == "found" else "",
        record=discovery.record,
        spf=spf,
        dkim=tuple(dkim),
        spf_domain=spf_domain,
    )
    record = discovery.record
    aspf = record.aspf if record else "r"
    adkim = record.adkim if record else "r"
    base.spf_aligned = bool(
        spf is not None and spf.result == "pass" and aligned(spf_domain, from_dom, aspf, psl)
    )
    base.dkim_aligned = any(
        item.result == "pass" and aligned(item.domain, from_dom, adkim, psl) for item in dkim
    )
    if discovery.result == "temperror":
        base.result = "temperror"
        base.reason = "; ".join(discovery.notes) or "DNS failure looking up the DMARC record"
        return base
    if discovery.result == "none" or record is None:
        base.reason = "; ".join(discovery.notes) or f"no DMARC record for {from_dom}"
        return base
    base.record_policy = select_policy(record, from_dom, discovery.domain, exists)
    if base.spf_aligned or base.dkim_aligned:
        base.result = "pass"
        which = [n for n, ok in (("SPF", base.spf_aligned), ("DKIM", base.dkim_aligned)) if ok]
        base.reason = f"aligned {' and '.join(which)} pass for {from_dom}"
        return base
    # No aligned pass. If an aligned identifier could not be checked this time, a retry may
    # pass: temperror, not fail.
    spf_temp = (
        spf is not None and spf.result == "temperror" and aligned(spf_domain, from_dom, aspf, psl)
    )
    dkim_temp = any(
        item.result == "temperror" and aligned(item.domain, from_dom, adkim, psl) for item in dkim
    )
    if spf_temp or dkim_temp:
        base.result = "temperror"
        base.reason = "an aligned SPF or DKIM check had a temporary error"
        return base
    base.result = "fail"
    base.policy, base.sampled_out = sample(base.record_policy, record.pct, rand)
    base.reason = f"no aligned SPF or DKIM pass for {from_dom}"
    if base.sampled_out:
        base.reason += f" (pct={record.pct}: sampled out, {base.policy} applied)"
    return base


def from_error(reason: str, spf: SpfResult | None, dkim: Sequence[DkimItem]) -> Evaluation:
    """The permerror of a message without one usable From domain (6.6.1)."""
    return Evaluation(result="permerror", reason=reason, spf=spf, dkim=tuple(dkim))


# -- header texts ---------------------------------------------------------------------------


def _clean(text: str, limit: int = 200) -> str:
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def authentication_results(
    authserv_id: str,
    evaluation: Evaluation | None,
    spf: SpfResult | None,
    dkim_results: Sequence[object],
) -> str:
    """One Authentication-Results value: spf, every dkim signature, dmarc (RFC 8601).

    ``dkim_results`` are ``mailgate.policies.dkim.SignatureResult`` objects (or anything
    with their attributes): result, domain, selector, algorithm, identity, b_prefix, reason.
    """
    from authres.dmarc import DMARCAuthenticationResult  # type: ignore[import-untyped]

    items: list[object] = []
    if spf is not None:
        if spf.identity == "mailfrom":
            items.append(
                authres.SPFAuthenticationResult(
                    result=spf.result,
                    result_comment=_clean(spf.reason, 200),
                    smtp_mailfrom=spf.sender,
                )
            )
        else:
            items.append(
                authres.SPFAuthenticationResult(
                    result=spf.result,
                    result_comment=_clean(spf.reason, 200),
                    smtp_helo=spf.helo,
                )
            )
    if not dkim_results:
        items.append(authres.DKIMAuthenticationResult(result="none"))
    for item in dkim_results:
        reason = str(getattr(item, "reason", "") or "")
        dkim_item = authres.DKIMAuthenticationResult(
            result=getattr(item, "result", "none"),
            result_comment=_clean(reason, 120) if reason else None,
            header_d=getattr(item, "domain", "") or None,
            header_i=getattr(item, "identity", "") or None,
            header_s=getattr(item, "selector", "") or None,
            header_a=getattr(item, "algorithm", "") or None,
        )
        b_prefix = getattr(item, "b_prefix", "")
        if b_prefix:
            # RFC 6008 header.b: authres has no keyword for it.
            dkim_item.properties.append(
                authres.core.AuthenticationResultProperty("header", "b", b_prefix)
            )
        items.append(dkim_item)
    if evaluation is not None:
        comment = None
        if evaluation.record_policy:
            comment = f"p={evaluation.record.p if evaluation.record else 'none'}"
            comment += f" dis={evaluation.policy.upper()}"
        elif evaluation.reason and evaluation.result != "none":
            comment = _clean(evaluation.reason, 120)
        items.append(
            DMARCAuthenticationResult(
                result=evaluation.result,
                result_comment=comment,
                header_from=evaluation.from_domain or None,
                policy=evaluation.record_policy or None,
            )
        )
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=items)
    text = str(header)
    prefix = "Authentication-Results: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def header_changes(
    settings: Settings,
    headers: Iterable[tuple[str, str]],
    value: str | None,
) -> tuple[list[HeaderChange], list[HeaderChange]]:
    """(forged Authentication-Results to delete first, our field to insert on top)."""
    if not settings.authentication_results:
        return [], []
    removals = forged_removals(headers, settings.server_id)
    additions = []
    if value is not None:
        additions.append(
            HeaderChange(op="insert", name="Authentication-Results", value=value, index=0)
        )
    return removals, additions


def describe(record: DmarcRecord) -> list[str]:
    """The record as it applies, one ``tag=value`` a line (for ``mailgate dmarc check``)."""
    lines = [
        f"p={record.p}",
        f"sp={record.sp or record.p}" + ("" if record.sp else "  (from p)"),
        f"np={record.np or record.sp or record.p}" + ("" if record.np else "  (from sp/p)"),
        f"pct={record.pct}",
        f"adkim={record.adkim}",
        f"aspf={record.aspf}",
        "rua=" + ",".join(_uri_text(u) for u in record.rua),
        "ruf=" + ",".join(_uri_text(u) for u in record.ruf),
        f"fo={record.fo}",
        f"rf={record.rf}",
        f"ri={record.ri}",
    ]
    return lines


def _uri_text(uri: ReportUri) -> str:
    return f"{uri.uri} (max {uri.max_size} bytes)" if uri.max_size else uri.uri
