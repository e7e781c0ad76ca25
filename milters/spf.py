"""The SPF daemon (``mailgate milter spf``): RFC 7208 checks of HELO and MAIL FROM.

A drop-in replacement for pypolicyd-spf as a milter. At MAIL FROM (``settings.decide_at``,
or at each RCPT TO) the rules run with the SPF facts (``spf``, ``spf_helo`` ...) as lazy
facts: a check runs, through the process's cached resolver (``mailgate.core.dns``), only
when a rule first asks for its result, so the allow-list rules placed before (authenticated
users, trusted networks, per-domain exceptions) cost no DNS query. Only a reject or a
tempfail is answered there; the rules run again at end-of-message, on the results already
known, and the daemon then adds ``Received-SPF`` and ``Authentication-Results`` for the
check that ran, and removes forged Authentication-Results fields claiming our
authserv-id. The SPF logic itself is in ``mailgate.policies.spf``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mailgate.core.dns import DnsTempError, resolver_for
from mailgate.milters.adapter import DaemonContext, PolicyMilter, Stage
from mailgate.policies.facts import MessageFacts
from mailgate.policies.spf import (
    DnsFailure,
    MessageCheck,
    Settings,
    SpfResult,
    header_changes,
)
from mailgate.policies.verdict import Verdict


class SpfMilter(PolicyMilter):
    """One MTA connection of the spf daemon."""

    def __init__(self, context: DaemonContext) -> None:
        super().__init__(context)
        # The settings in force when the connection began serve it to its end, so the
        # stage negotiated stays consistent across a reload.
        settings = getattr(context.policy.current, "settings", None)
        self.settings: Settings = settings if isinstance(settings, Settings) else Settings()
        # HELO results of this connection, by (client address, HELO name).
        self._helo_results: dict[tuple[str, str], SpfResult] = {}

    # -- per-message state -------------------------------------------------------------

    def _reset_message(self) -> None:
        super()._reset_message()
        self.check: MessageCheck | None = None
        self._decided = False

    def _lookup(self, name: str, rdtype: str, timeout: float) -> Any:
        resolver = resolver_for(self.settings.dns)
        try:
            return resolver.query(name, rdtype, timeout=min(timeout, self.settings.dns.timeout))
        except DnsTempError as exc:
            raise DnsFailure(exc.why) from exc

    def _logged(self, result: SpfResult) -> None:
        self.logger.info(
            "%s: SPF %s %s: domain=%s client=[%s] helo=%s from=<%s>%s",
            self.qid,
            result.identity,
            result.result,
            result.domain,
            result.client_ip,
            result.helo,
            result.mail_from,
            f" ({result.reason})" if result.result not in ("pass", "none") else "",
        )

    def _spf_facts(self, facts: MessageFacts) -> None:
        """Make the SPF facts available (lazily) to this message's rule runs."""
        if self.check is None:
            if not self.client_ip:
                # A local (unix-socket) client has no address to check: no SPF facts.
                return
            self.check = MessageCheck(
                self.settings,
                self._lookup,
                client_ip=self.client_ip,
                helo=self.helo_name,
                mail_from=self.mail_from,
                helo_cache=self._helo_results,
                on_result=self._logged,
            )
            self.message_facts.update(self.check.lazy_facts())
        facts.extra.update(self.message_facts)

    # -- the decision ------------------------------------------------------------------

    def reply_stages(self) -> frozenset[Stage]:
        return frozenset({self.settings.decide_at})

    def _decide_early(self, facts: MessageFacts) -> Verdict | None:
        self._decided = True
        self._spf_facts(facts)
        verdict = self.context.policy.current.evaluate(facts)
        # Only a refusal is answered now; anything else is decided at end-of-message.
        return verdict if verdict.action in ("reject", "tempfail") else None

    def at_mail(self, facts: MessageFacts) -> Verdict | None:
        return self._decide_early(facts)

    def at_rcpt(self, facts: MessageFacts, recipient: str) -> Verdict | None:
        # Each recipient is judged on its own (a rule may exempt postmaster@).
        return self._decide_early(dataclasses.replace(facts, rcpt_tos=[recipient]))

    def prepare(self, facts: MessageFacts) -> None:
        self._spf_facts(facts)

    def decide(self, facts: MessageFacts) -> Verdict:
        verdict = super().decide(facts)
        if verdict.action in ("reject", "tempfail") and self._decided:
            # The decision stage already refused what the rules refuse; what is left got
            # past it. Keep the changes, not the refusal.
            self.logger.debug(
                "%s: %s at end-of-message ignored: decided at %s",
                self.qid,
                verdict.action,
                self.settings.decide_at,
            )
            verdict.action = "continue"
            verdict.code = verdict.enhanced = verdict.text = None
        if verdict.action in ("reject", "tempfail", "discard"):
            return verdict
        result = self.check.header_result if self.check is not None else None
        removals, additions = header_changes(self.settings, result, facts.headers)
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
        return verdict
