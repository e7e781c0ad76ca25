"""The ARC daemon (``mailgate milter arc``): validates ARC chains, seals forwarded mail.

A drop-in replacement for OpenARC (RFC 8617, with dkimpy). At end of message:

- **validation**: the whole chain of ARC sets is validated (every ARC-Message-Signature
  and ARC-Seal, the newest AMS must pass, the cv= of each seal must fit); the facts
  (``arc``, ``arc_instances``, ``arc_oldest_pass``, ``arc_domains``, ``arc_reason``) are
  lazy, so rules placed before the first rule that asks cost no key lookup. Keys are looked
  up through the process's cached resolver (``mailgate.core.dns``, the dkim daemon's
  ``make_dnsfunc``); a DNS failure is ``temperror``, never a pass or a fail. A chain of
  more than 50 sets fails without a lookup;
- **sealing**, after the rules: a message the settings select (``seal.all``, an
  authenticated client, a client in ``seal.networks``) or a rule selects
  (``X-Mailgate-ARC-Seal: yes``), whose verdict lets it through, gets the next ARC set
  (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results, i = previous + 1, cv= from
  the validation) on top. The AAR carries our authserv-id, the chain's result and, as
  ``seal.report`` says, SPF and DKIM results checked here with the spf and dkim policies.
  No seal is added to a chain whose newest seal says cv=fail, to a chain of 50 sets, or
  when the chain could not be validated (DNS).

Header values are kept as the MTA sent them (``SMFIP_HDR_LEADSPC`` when offered), as the
dkim daemon does. The decision logic and header texts are in ``mailgate.policies.arc``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import authres  # type: ignore[import-untyped]
import dkim  # type: ignore[import-untyped]

from mailgate.core.dns import DnsTempError, resolver_for
from mailgate.milters.dkim import (
    KeyFileError,
    KeyLookupError,
    LoadedKey,
    load_key,
    make_dnsfunc,
    verify_message,
    wire_message,
)
from mailgate.milters.raw_headers import RawHeaderMilter
from mailgate.policies import dkim as dkim_policy
from mailgate.policies import spf as spf_policy
from mailgate.policies.arc import (
    FACTS,
    MAX_INSTANCES,
    ChainResult,
    InstanceResult,
    Settings,
    arc_result,
    authentication_results,
    interpret,
    parsed_results,
    seal_control,
    seal_cv,
    selected,
    signed_fields,
    temperror,
)
from mailgate.policies.arc import facts as chain_facts
from mailgate.policies.authresults import authserv_id_of, forged_removals
from mailgate.policies.dkim import apply_changes, clean
from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.verdict import HeaderChange, Verdict

# Validating and sealing need the whole body; above the core's default max_message_size.
ARC_BODY_LIMIT = 32 * 1024 * 1024

# dkimpy logs each signature that does not verify as an ERROR of its own; the daemon's one
# line per message says the same, so dkimpy's lines go nowhere.
_DKIMPY_LOG = logging.getLogger("mailgate.milters.arc.dkimpy")
_DKIMPY_LOG.propagate = False
_DKIMPY_LOG.addHandler(logging.NullHandler())

_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_TAG_D = re.compile(rb"(?:^|;)\s*d\s*=\s*([^;\s]+)", re.IGNORECASE)
_TAG_CV = re.compile(rb"(?:^|;)\s*cv\s*=\s*([^;\s]+)", re.IGNORECASE)


# -- validation -----------------------------------------------------------------------------


def _seal_tags(arc_headers: Sequence[tuple[int, tuple[bytes, bytes]]]) -> dict[int, bytes]:
    """The ARC-Seal value of each instance (the first one met when there are two)."""
    seals: dict[int, bytes] = {}
    for instance, (name, value) in arc_headers:
        if name.lower() == b"arc-seal":
            seals.setdefault(instance, value)
    return seals


def _tag(pattern: re.Pattern[bytes], value: bytes) -> str:
    found = pattern.search(value)
    return found.group(1).decode("ascii", "replace").lower() if found else ""


def verify_chain(
    message: bytes, settings: Settings, dnsfunc: Callable[..., bytes | None]
) -> ChainResult:
    """Validate the ARC chain of ``message`` (RFC 8617 section 5.2). Never raises."""
    try:
        validator = dkim.ARC(
            message,
            logger=_DKIMPY_LOG,
            minkey=settings.min_key_bits,
            timeout=settings.dns.timeout,
            linesep=b"\r\n",
        )
        instances, arc_headers = validator.sorted_arc_headers()
    except Exception as exc:
        return interpret(0, (), "fail", (), clean(f"message not parsable: {exc}"))
    seals = _seal_tags(arc_headers)
    domains = [_tag(_TAG_D, seals[i]) for i in sorted(seals)]
    latest_cv = _tag(_TAG_CV, seals.get(instances, b""))
    if instances == 0:
        if any(name.lower() in _ARC_FIELDS for name, _ in validator.headers):
            return interpret(0, (), "fail", (), "ARC header fields without an instance (i=)")
        return interpret(0, (), "none", (), "")
    if instances > MAX_INSTANCES:
        # Fails whatever the signatures say; no key is looked up for it.
        return interpret(instances, domains, "fail", (), "", latest_cv)
    try:
        cv, data, reason = validator.verify(dnsfunc=dnsfunc)
    except KeyLookupError as exc:
        return temperror(instances, domains, f"key lookup failed: {exc}")
    except Exception as exc:  # dkimpy on a malformed set: the chain cannot pass
        return interpret(
            instances, domains, "fail", (), f"not verifiable: {type(exc).__name__}: {exc}"
        )
    details = [
        InstanceResult(
            instance=int(item.get("instance", 0)),
            cv=bytes(item.get("cv", b"")).decode("ascii", "replace").lower(),
            seal_domain=bytes(item.get("as-domain", b"")).decode("ascii", "replace").lower(),
            ams_valid=bool(item.get("ams-valid")),
            seal_valid=bool(item.get("as-valid")),
        )
        for item in data
    ]
    outcome = cv.decode("ascii", "replace").lower() if isinstance(cv, bytes) else cv
    return interpret(instances, domains, outcome, details, str(reason), latest_cv)


# -- sealing --------------------------------------------------------------------------------


def seal_message(
    message: bytes,
    domain: str,
    selector: str,
    loaded: LoadedKey,
    authserv_id: str,
    include: Sequence[str],
) -> list[tuple[str, str]]:
    """The next ARC set for ``message``: (name, value) for ARC-Seal, -Message-Signature, AAR.

    ``message`` must hold one Authentication-Results field naming ``authserv_id`` with
    one ``arc=`` result (the cv): dkimpy copies its results into the AAR. Values are
    folded with LF, as milters send them.
    """
    if loaded.algorithm != "rsa-sha256":
        # RFC 8617 section 4.1.3: rsa-sha256 is the only algorithm of ARC.
        raise KeyFileError(f"ARC seals with RSA keys only; this is an {loaded.algorithm} key")
    sealer = dkim.ARC(message, logger=_DKIMPY_LOG, linesep=b"\n", minkey=512)
    lines = sealer.sign(
        selector.encode("ascii"),
        domain.encode("ascii"),
        loaded.private,
        authserv_id.encode("ascii"),
        include_headers=[name.encode("ascii") for name in include],
    )
    if len(lines) != 3:
        raise dkim.ParameterError("no ARC set could be made (no results for our authserv-id)")
    fields = []
    for line in lines:
        name, _, value = bytes(line).partition(b":")
        fields.append((name.decode("ascii"), value.strip().decode("ascii")))
    return fields


def _without_our_results(
    headers: Sequence[tuple[bytes, bytes]], authserv_id: str
) -> list[tuple[bytes, bytes]]:
    wanted = authserv_id.lower()
    return [
        (name, value)
        for name, value in headers
        if not (
            name.lower() == b"authentication-results"
            and authserv_id_of(value.decode("utf-8", "replace")).lower() == wanted
        )
    ]


# -- the daemon -----------------------------------------------------------------------------


class Validation:
    """The validation of one message's chain, run once, when first asked for."""

    def __init__(
        self,
        settings: Settings,
        message: bytes,
        body_complete: bool,
        log: Callable[[ChainResult], None],
    ) -> None:
        self.settings = settings
        self.message = message
        self.body_complete = body_complete
        self.log = log
        self._lock = threading.Lock()
        self.chain: ChainResult | None = None

    @property
    def computed(self) -> bool:
        return self.chain is not None

    def run(self) -> ChainResult:
        with self._lock:
            if self.chain is None:
                if not self.body_complete:
                    self.chain = ChainResult(
                        "none", reason="not validated: the message is over the body limit"
                    )
                else:
                    dnsfunc = make_dnsfunc(
                        resolver_for(self.settings.dns), time.monotonic() + self.settings.timeout
                    )
                    self.chain = verify_chain(self.message, self.settings, dnsfunc)
                self.log(self.chain)
            return self.chain

    def lazy_facts(self) -> dict[str, LazyFact]:
        return {
            name: LazyFact(lambda name=name: chain_facts(self.run())[name])  # type: ignore[misc]
            for name in FACTS
        }


class ArcMilter(RawHeaderMilter):
    """One MTA connection of the arc daemon."""

    body_limit: ClassVar[int] = ARC_BODY_LIMIT

    def _reset_message(self) -> None:
        super()._reset_message()
        self.validation: Validation | None = None
        self.settings: Settings = Settings()

    def _current_settings(self) -> Settings:
        settings = getattr(self.context.policy.current, "settings", None)
        return settings if isinstance(settings, Settings) else Settings()

    def _wire_headers(self) -> list[tuple[bytes, bytes]]:
        # ARC canonicalizes relaxed only, so whitespace after the colon changes no hash;
        # dkimpy finds an AMS by " i=" and needs the space there.
        wired = []
        for name, value in self.received_headers():
            wired.append((name, value if value[:1] in (b" ", b"\t") else b" " + value))
        return wired

    def _logged(self, chain: ChainResult) -> None:
        self.logger.info(
            "%s: ARC %s i=%d sealers=%s%s",
            self.qid,
            chain.result,
            chain.instances,
            ",".join(chain.domains) or "-",
            f" ({chain.reason})" if chain.reason and chain.result != "none" else "",
        )

    # -- the decision ------------------------------------------------------------------

    def prepare(self, facts: MessageFacts) -> None:
        self.settings = self._current_settings()
        body_complete = self._body_received <= len(self._body)
        message = wire_message(self._wire_headers(), bytes(self._body))
        self.validation = Validation(self.settings, message, body_complete, self._logged)
        facts.extra.update(self.validation.lazy_facts())

    def decide(self, facts: MessageFacts) -> Verdict:
        verdict = super().decide(facts)
        wanted, verdict.header_changes = seal_control(verdict.header_changes)
        if verdict.action in ("reject", "tempfail", "discard"):
            return verdict
        settings = self.settings
        validation = self.validation
        assert validation is not None
        by_settings = selected(settings, facts.auth_user, facts.client_ip)
        sealing = settings.seal.enabled and (wanted if wanted is not None else by_settings)
        if wanted and not settings.seal.enabled:
            self.logger.warning("%s: a rule asked for a seal, but seal.domain is empty", self.qid)
        if sealing:
            validation.run()  # the seal's cv= is the chain's result
        if settings.authentication_results:
            removals = forged_removals(facts.headers, settings.server_id)
            if removals:
                self.logger.info(
                    "%s: removing %d forged Authentication-Results header%s claiming %s",
                    self.qid,
                    len(removals),
                    "" if len(removals) == 1 else "s",
                    settings.server_id,
                )
            verdict.header_changes[:0] = removals
            # Mail a rule accepted before asking (our own users) is validated only if
            # something needs the result.
            if validation.computed or verdict.action != "accept":
                verdict.header_changes.append(
                    HeaderChange(
                        op="insert",
                        name="Authentication-Results",
                        value=authentication_results(
                            settings.server_id, [arc_result(validation.run(), facts.client_ip)]
                        ),
                        index=0,
                    )
                )
        if sealing:
            failure = self._seal(facts, verdict, validation.run())
            if failure is not None:
                return failure
        elif wanted is False and by_settings:
            self.logger.info("%s: not sealed: a rule said no", self.qid)
        return self.spaced(verdict)

    def _report(self, facts: MessageFacts) -> list[Any]:
        """The SPF and DKIM results (``seal.report``) for the AAR, checked here."""
        settings = self.settings
        results: list[Any] = []
        if "spf" in settings.seal.report and facts.client_ip:
            resolver = resolver_for(settings.dns)

            def lookup(name: str, rdtype: str, timeout: float) -> Any:
                try:
                    return resolver.query(name, rdtype, timeout=min(timeout, settings.dns.timeout))
                except DnsTempError as exc:
                    raise spf_policy.DnsFailure(exc.why) from exc

            spf = spf_policy.check_host(
                facts.client_ip,
                facts.mail_from,
                self.helo_name,
                lookup,
                timeout=settings.timeout,
                receiver=settings.server_id,
            )
            results += parsed_results(spf_policy.authentication_results(spf, settings.server_id))
        if "dkim" in settings.seal.report:
            dnsfunc = make_dnsfunc(resolver_for(settings.dns), time.monotonic() + settings.timeout)
            signatures = verify_message(
                wire_message(self.received_headers(), bytes(self._body)),
                dkim_policy.Settings(dns=settings.dns, min_key_bits=settings.min_key_bits),
                dnsfunc,
                body_complete=self._body_received <= len(self._body),
            )
            results += parsed_results(
                dkim_policy.authentication_results(signatures, settings.server_id)
            )
        return results

    def _seal(self, facts: MessageFacts, verdict: Verdict, chain: ChainResult) -> Verdict | None:
        """Add the next ARC set to ``verdict``; a tempfail verdict if it cannot."""
        settings = self.settings
        seal = settings.seal
        cv, why = seal_cv(chain)
        if cv is None:
            self.logger.info("%s: not sealed: %s", self.qid, why)
            return None
        problem = ""
        fields: list[tuple[str, str]] = []
        if self._body_received > len(self._body):
            problem = f"the body is over the limit of {self.context.body_limit} bytes"
        else:
            # What leaves: the headers after the rules' changes, without any result field
            # claiming our authserv-id but the one the AAR is made from.
            headers = _without_our_results(
                apply_changes(self._wire_headers(), verdict.header_changes), settings.server_id
            )
            text_headers = [
                (name.decode("ascii", "replace"), value.decode("utf-8", "replace").strip())
                for name, value in headers
            ]
            try:
                results = [arc_result(chain, facts.client_ip), *self._report(facts)]
                ours = authentication_results(settings.server_id, results)
                stamped = [(b"Authentication-Results", b" " + ours.encode("utf-8")), *headers]
                assert seal.key is not None
                fields = seal_message(
                    wire_message(stamped, bytes(self._body)),
                    seal.domain,
                    seal.selector,
                    load_key(seal.key),
                    settings.server_id,
                    signed_fields(settings, text_headers),
                )
            except (KeyFileError, dkim.DKIMException, authres.core.SyntaxError) as exc:
                problem = f"d={seal.domain} s={seal.selector}: {exc}"
        if problem:
            self.logger.error("%s: cannot seal: %s", self.qid, problem)
            if seal.on_error == "tempfail":
                return Verdict(
                    action="tempfail",
                    code=451,
                    enhanced="4.3.0",
                    text="ARC sealing failed; try again later",
                    matched=verdict.matched,
                )
            return None
        self.logger.info(
            "%s: ARC sealed i=%d cv=%s d=%s s=%s",
            self.qid,
            chain.instances + 1,
            cv,
            seal.domain,
            seal.selector,
        )
        # Inserted in reverse, the ARC-Seal ends on top.
        for name, value in reversed(fields):
            verdict.header_changes.append(
                HeaderChange(op="insert", name=name, value=value, index=0)
            )
        return None
