"""The ClamAV daemon (``mailgate milter clamav``): each message scanned by clamd.

At end of message the daemon publishes three facts and lets the rule file decide:
``clamav`` (clean / infected / error / skipped), ``virus`` (the signature clamd named) and
``clamav_error`` (why a message was not scanned). The scan is a LazyFact: it runs only when
a rule first asks for one of these facts, so rules placed before that one (trusted
networks, authenticated senders) let those messages through unscanned.

What clamd sees is the whole message as the MTA passed it to the milter, header fields
included, as clamav-milter sends it. Talking to clamd is ``mailgate.milters.clamd``; the
settings and the outcomes are ``mailgate.policies.clamav``.
"""

from __future__ import annotations

from typing import ClassVar

from mailgate.milters.adapter import PolicyMilter
from mailgate.milters.clamd import ClamdError, instream
from mailgate.policies import clamav
from mailgate.policies.facts import LazyFact, MessageFacts

# Covers the default max_size (25M) with room for the header section; a larger max_size
# needs --body-limit to match, or such messages end as "error" (never as "clean").
CLAMAV_BODY_LIMIT = 32 * 1024 * 1024


class ClamavMilter(PolicyMilter):
    """One MTA connection of the clamav daemon."""

    body_limit: ClassVar[int] = CLAMAV_BODY_LIMIT

    def prepare(self, facts: MessageFacts) -> None:
        settings = getattr(self.context.policy.current, "settings", None)
        if not isinstance(settings, clamav.Settings):
            settings = clamav.Settings()
        scan = LazyFact(lambda: self._scan(facts, settings))
        facts.extra["clamav"] = LazyFact(lambda: scan.get().outcome)
        facts.extra["virus"] = LazyFact(lambda: scan.get().virus)
        facts.extra["clamav_error"] = LazyFact(lambda: scan.get().error)

    def _scan(self, facts: MessageFacts, settings: clamav.Settings) -> clamav.ScanOutcome:
        size = facts.size  # the whole message, even where the body was capped
        truncated = bool(facts.extra.get("body_truncated"))
        decided = clamav.outcome_for(size, not truncated, len(facts.body), settings.max_size)
        if decided is None:
            decided = self._ask_clamd(facts, settings)
        level = self.logger.warning if decided.outcome == "error" else self.logger.info
        detail = decided.virus or decided.error or ""
        level(
            "%s: clamav %s%s; clamd=%s size=%d",
            self.qid,
            decided.outcome,
            f" ({detail})" if detail else "",
            settings.clamd,
            size,
        )
        return decided

    def _ask_clamd(self, facts: MessageFacts, settings: clamav.Settings) -> clamav.ScanOutcome:
        try:
            reply = instream(settings.address, facts.raw_message(), timeout=settings.timeout)
        except ClamdError as exc:
            return clamav.failed(str(exc))
        if reply.virus is None:
            return clamav.clean()
        return clamav.infected(reply.virus)
