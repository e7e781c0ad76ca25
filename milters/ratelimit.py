"""The rate-limit daemon (``mailgate milter ratelimit``).

It answers at three stages, each with its own counter: CONNECT counts ``connections``
(per client), MAIL FROM ``messages`` and each RCPT TO ``recipients`` (per client, per
authenticated user and per sender domain). At each stage the rule file decides; the
count is the lazy fact ``ratelimit``, so exemption rules placed before the first rule that
asks for it (trusted networks, say) neither count nor are counted.

Facts for the rules, at each of those stages:

- ``ratelimit``: the limits the event would exceed, as ``KIND.COUNTER`` names
  (``client_ip.connections``, ``auth_user.messages``, ``sender_domain.recipients`` ...);
  empty when within every limit (the event is then recorded); ``unavailable`` when the
  store failed (nothing was counted);
- ``ratelimit_counter``: the stage's counter (``connections``, ``messages``,
  ``recipients``);
- ``ratelimit_text``: the first exceeded limit in words
  (``client 192.0.2.7/32: 100 connections in 60 s (limit 100)``);
- ``ratelimit_wait``: whole seconds until that limit admits an event again.

The limits and the arithmetic are ``mailgate.policies.ratelimit``; the windows sit in the
store of ``settings.store`` (``mailgate.milters.store``: SQLite, or Redis when several
gateways share the counts). End of message only says ``continue``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mailgate.milters.adapter import PolicyMilter, Stage
from mailgate.milters.store import Store, StoreError, store_for
from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.ratelimit import (
    Check,
    Counter,
    Settings,
    checks,
    describe,
    exceeded,
    retry_after,
)
from mailgate.policies.verdict import Verdict


@dataclass(frozen=True, slots=True)
class Outcome:
    """What counting one event found."""

    exceeded: list[str] | str = field(default_factory=list)
    text: str = ""
    wait: int = 0


def settings_of(policy: Any) -> Settings:
    settings = getattr(policy, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()


class RateLimitMilter(PolicyMilter):
    """One MTA connection of the rate-limit daemon."""

    # Nothing of the body is needed: every decision is taken before DATA.
    body_limit: ClassVar[int] = 0

    def reply_stages(self) -> frozenset[Stage]:
        return frozenset({"connect", "mail", "rcpt"})

    def at_connect(self, facts: MessageFacts) -> Verdict | None:
        return self._decide("connections", facts)

    def at_mail(self, facts: MessageFacts) -> Verdict | None:
        return self._decide("messages", facts)

    def at_rcpt(self, facts: MessageFacts, recipient: str) -> Verdict | None:
        # `envelope to` tests the recipient being decided, not the earlier ones.
        facts.rcpt_tos = [recipient]
        return self._decide("recipients", facts)

    def decide(self, facts: MessageFacts) -> Verdict:
        # Every event was decided at its stage; the message itself has nothing to add.
        return Verdict()

    def _decide(self, counter: Counter, facts: MessageFacts) -> Verdict:
        policy = self.context.policy.current
        settings = settings_of(policy)
        applying = checks(
            counter,
            settings,
            client_ip=facts.client_ip,
            auth_user=facts.auth_user,
            sender=facts.mail_from,
        )
        outcome = LazyFact(lambda: self._count(settings, counter, applying))
        facts.extra["ratelimit"] = LazyFact(lambda: outcome.get().exceeded)
        facts.extra["ratelimit_text"] = LazyFact(lambda: outcome.get().text)
        facts.extra["ratelimit_wait"] = LazyFact(lambda: outcome.get().wait)
        facts.extra["ratelimit_counter"] = counter
        verdict: Verdict = policy.evaluate(facts)
        return verdict

    def _count(self, settings: Settings, counter: Counter, applying: list[Check]) -> Outcome:
        if not applying:
            return Outcome()
        store = store_for(settings.store, "ratelimit")
        started = time.monotonic()
        try:
            outcome = self._measure(store, applying)
        except StoreError as exc:
            self.logger.warning(
                "%s: ratelimit unavailable after %.1fs: %s; client=%s[%s] counter=%s",
                self.qid,
                time.monotonic() - started,
                exc,
                self.client_name,
                self.client_ip,
                counter,
            )
            return Outcome("unavailable")
        if outcome.exceeded:
            self.logger.info(
                "%s: ratelimit exceeded: %s; client=%s[%s]",
                self.qid,
                outcome.text,
                self.client_name,
                self.client_ip,
            )
        return outcome

    @staticmethod
    def _measure(store: Store, applying: list[Check]) -> Outcome:
        now = time.time()
        over: list[str] = []
        text, wait = "", 0
        for check in applying:
            window = store.window(check.key, check.limit.window, now)
            if exceeded(window.count, check):
                over.append(check.name)
                if not text:
                    text = describe(check, window.count)
                    wait = retry_after(window.oldest, now, check)
        if not over:
            # Within every limit: the event counts for each of its keys.
            store.add([(check.key, check.limit.window) for check in applying], now)
        return Outcome(over, text, wait)
