"""The DMARC daemon (``mailgate milter dmarc``): RFC 7489 checks and the one A-R header.

A drop-in replacement for OpenDMARC. Milters in a chain do not see each other's header
changes, so this daemon does not read the results of the spf and dkim daemons: at end of
message it checks SPF itself (the MAIL FROM identity, or HELO for the null sender, with
``mailgate.policies.spf``), verifies every DKIM signature itself (with the verification of
``mailgate.milters.dkim``), finds the From domain's DMARC record and evaluates alignment
and policy (``mailgate.policies.dmarc``). All of it is computed once, when a rule first
asks for one of the facts (``dmarc``, ``dmarc_policy``, ``spf``, ``dkim`` ...), so the
authenticated-users rule placed first costs no lookup. Every DNS query goes through the
process's cached resolver (``mailgate.core.dns``); a failure is a temperror, never a pass
or a fail.

After the rules, unless the message is refused, the daemon writes the one
``Authentication-Results`` field of the gateway (spf, dkim and dmarc results, under
``authserv_id``) and removes the forged ones that claim that authserv-id. Each evaluation
of a domain that publishes a record is written to the evaluation history
(``mailgate.milters.dmarc_reports``) with the disposition the rules applied, for the
aggregate reports of ``mailgate dmarc report``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from mailgate.core.dns import DnsTempError, resolver_for
from mailgate.milters.dkim import make_dnsfunc, verify_message, wire_message
from mailgate.milters.dmarc_reports import History, history_for, row_of
from mailgate.milters.raw_headers import RawHeaderMilter
from mailgate.policies import dkim as dkim_policy
from mailgate.policies.dmarc import (
    FACTS,
    DkimItem,
    Evaluation,
    Settings,
    authentication_results,
    discover,
    evaluate,
    from_domain,
    from_error,
    header_changes,
)
from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.spf import DnsFailure, SpfResult, check_host
from mailgate.policies.verdict import Verdict

# Verifying DKIM needs the whole body; above the core's default max_message_size.
DMARC_BODY_LIMIT = 32 * 1024 * 1024

SPF_FACTS = ("spf", "spf_domain", "spf_identity", "spf_reason")


class MessageCheck:
    """SPF, DKIM and DMARC of one message, computed together once, when first asked for."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_ip: str,
        helo: str,
        mail_from: str,
        headers: list[tuple[str, str]],
        message: Callable[[], bytes],
        body_complete: bool,
        log: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.client_ip = client_ip
        self.helo = helo
        self.mail_from = mail_from
        self.headers = headers
        self.message = message
        self.body_complete = body_complete
        self.log = log
        self._lock = threading.Lock()
        self.spf: SpfResult | None = None
        self.dkim: list[dkim_policy.SignatureResult] = []
        self.evaluation: Evaluation | None = None

    @property
    def computed(self) -> bool:
        return self.evaluation is not None

    def _lookup(self, deadline: float) -> Callable[[str, str, float], Any]:
        resolver = resolver_for(self.settings.dns)

        def lookup(name: str, rdtype: str, timeout: float) -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DnsFailure("no time left for the lookup")
            try:
                return resolver.query(
                    name, rdtype, timeout=min(timeout, left, self.settings.dns.timeout)
                )
            except DnsTempError as exc:
                raise DnsFailure(exc.why) from exc

        return lookup

    def run(self) -> Evaluation:
        with self._lock:
            if self.evaluation is None:
                self.evaluation = self._compute()
            return self.evaluation

    def _compute(self) -> Evaluation:
        settings = self.settings
        deadline = time.monotonic() + settings.timeout
        lookup = self._lookup(deadline)
        if self.client_ip:
            self.spf = check_host(
                self.client_ip,
                self.mail_from,
                self.helo,
                lookup,
                timeout=max(deadline - time.monotonic(), 0.001),
                receiver=settings.server_id,
            )
        dkim_settings = dkim_policy.Settings(
            dns=settings.dns,
            timeout=settings.timeout,
            min_key_bits=settings.min_key_bits,
            max_signatures=settings.max_signatures,
        )
        dnsfunc = make_dnsfunc(resolver_for(settings.dns), deadline)
        self.dkim = verify_message(
            self.message(), dkim_settings, dnsfunc, body_complete=self.body_complete
        )
        items = [DkimItem(item.result, item.domain, item.selector) for item in self.dkim]
        domain, problem = from_domain(self.headers)
        if problem:
            evaluation = from_error(problem, self.spf, items)
        else:
            psl = settings.public_suffix_list
            discovery = discover(domain, lookup, timeout=settings.dns.timeout, psl=psl)
            evaluation = evaluate(
                discovery,
                domain,
                self.spf,
                items,
                exists=lambda: _exists(domain, lookup),
                psl=psl,
            )
        spf_text = f"spf={self.spf.result} ({self.spf.domain})" if self.spf else "spf=-"
        dkim_text = " ".join(f"dkim={d.result} ({d.domain})" for d in self.dkim) or "dkim=none"
        self.log(
            f"DMARC {evaluation.result} policy={evaluation.policy} "
            f"from={evaluation.from_domain or '-'} record={evaluation.record_domain or '-'} "
            f"{spf_text} {dkim_text} spf_aligned={evaluation.spf_aligned} "
            f"dkim_aligned={evaluation.dkim_aligned} ({evaluation.reason})"
        )
        return evaluation

    def lazy_facts(self) -> dict[str, LazyFact]:
        facts: dict[str, LazyFact] = {
            name: LazyFact(lambda name=name: self.run().facts()[name])  # type: ignore[misc]
            for name in FACTS
        }
        for name in SPF_FACTS:
            facts[name] = LazyFact(lambda name=name: self._spf_fact(name))  # type: ignore[misc]
        for name in dkim_policy.FACTS:
            facts[name] = LazyFact(lambda name=name: self._dkim_fact(name))  # type: ignore[misc]
        return facts

    def _spf_fact(self, name: str) -> object:
        self.run()
        if self.spf is None:
            return None
        return self.spf.facts()[name]

    def _dkim_fact(self, name: str) -> object:
        self.run()
        return dkim_policy.facts(self.dkim)[name]


def _exists(domain: str, lookup: Callable[[str, str, float], Any]) -> bool:
    """Does ``domain`` exist (DMARCbis: some A, AAAA or MX answer)? A DNS failure: yes."""
    for rdtype in ("A", "AAAA", "MX"):
        try:
            answer = lookup(domain, rdtype, 5.0)
        except DnsFailure:
            return True
        if answer.status == "ok":
            return True
    return False


class DmarcMilter(RawHeaderMilter):
    """One MTA connection of the dmarc daemon."""

    body_limit: ClassVar[int] = DMARC_BODY_LIMIT

    def _reset_message(self) -> None:
        super()._reset_message()
        self.check: MessageCheck | None = None
        self.settings: Settings = Settings()

    def _current_settings(self) -> Settings:
        settings = getattr(self.context.policy.current, "settings", None)
        return settings if isinstance(settings, Settings) else Settings()

    def _message(self) -> bytes:
        return wire_message(self.received_headers(), bytes(self._body))

    def _log(self, text: str) -> None:
        self.logger.info("%s: %s", self.qid, text)

    # -- the decision ------------------------------------------------------------------

    def prepare(self, facts: MessageFacts) -> None:
        self.settings = self._current_settings()
        self.check = MessageCheck(
            self.settings,
            client_ip=self.client_ip,
            helo=self.helo_name,
            mail_from=self.mail_from,
            headers=list(facts.headers),
            message=self._message,
            body_complete=self._body_received <= len(self._body),
            log=self._log,
        )
        self.message_facts.update(self.check.lazy_facts())
        facts.extra.update(self.message_facts)

    def decide(self, facts: MessageFacts) -> Verdict:
        verdict = super().decide(facts)
        check = self.check
        if check is None:
            return verdict
        if not check.computed and not facts.auth_user and verdict.action != "tempfail":
            # A local override decided before any rule asked: still tell the result (the
            # header, the report's local_policy reason). Our own users' mail is not checked.
            check.run()
        if check.computed and check.evaluation is not None:
            self._record(check, verdict, facts)
        if verdict.action in ("reject", "tempfail", "discard"):
            return verdict
        value = None
        if check.computed:
            value = authentication_results(
                self.settings.server_id, check.evaluation, check.spf, check.dkim
            )
        removals, additions = header_changes(self.settings, facts.headers, value)
        if removals:
            self.logger.info(
                "%s: removing %d forged Authentication-Results header%s claiming %s",
                self.qid,
                len(removals),
                "" if len(removals) == 1 else "s",
                self.settings.server_id,
            )
        verdict.header_changes[:0] = removals
        verdict.header_changes.extend(additions)
        return self.spaced(verdict)

    def _record(self, check: MessageCheck, verdict: Verdict, facts: MessageFacts) -> None:
        evaluation = check.evaluation
        if evaluation is None or evaluation.record is None or not self.settings.history:
            return
        if evaluation.result not in ("pass", "fail"):
            return
        try:
            history: History = history_for(self.settings)
            rules = ",".join(match.rule for match in verdict.matched)
            row = row_of(
                evaluation,
                self.client_ip,
                facts.rcpt_tos,
                verdict.action,
                rules,
                mail_from=facts.mail_from,
            )
            history.record(row)
        except Exception:
            # The history serves the reports; losing one row must not lose the message.
            self.logger.exception("%s: could not record the DMARC evaluation", self.qid)
