"""The DNS block/allow list daemon (``mailgate milter dnsbl``).

At connect it asks every configured zone about the client at once, on a small thread pool
shared by all connections, through the process's cached resolver
(``mailgate.core.dns``). The connect callback does not wait for the answers unless the
rules decide there: the lookups run while the client says EHLO, MAIL and RCPT, and the
facts (``dnsbl``, ``dnswl``, ``dnsbl_score`` ...) wait for them, up to the deadline, only
when a rule first asks for one. Rules placed before that rule (authenticated users,
postmaster@) therefore never wait. A zone that has not answered by the deadline, or failed,
counts as not listing the client and is named in ``dnsbl_errors``.

The rules decide at the stage of ``settings.decide_at`` (RCPT by default, where a reject
refuses each recipient the rules do not exempt). There only a reject or tempfail is
answered; the rules run again at end-of-message for header changes and quarantine, which
the protocol allows only there, without refusing again what the decision stage let pass.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any

from mailgate.core.dns import DnsTempError, resolver_for
from mailgate.milters.adapter import DaemonContext, PolicyMilter, Stage
from mailgate.policies.dnsbl import (
    DnsblResult,
    IPAddress,
    Settings,
    ZoneOutcome,
    classify,
    client_address,
    failed,
    query_name,
)
from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.verdict import Verdict

# One pool for every connection: a zone's query is short (a UDP exchange) and bounded by
# the deadline, so a few threads serve many concurrent connections.
POOL_SIZE = 32
_POOL = concurrent.futures.ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="dnsbl")


class Lookup:
    """The queries of one client in every zone, started at once, read by the deadline."""

    def __init__(self, settings: Settings, address: IPAddress, logger: Any, where: str) -> None:
        self.settings = settings
        self.address = address
        self.logger = logger
        self.where = where
        self.deadline = time.monotonic() + settings.deadline
        self._lock = threading.Lock()
        self._result: DnsblResult | None = None
        resolver = resolver_for(settings.dns)
        self.zones = [zone for zone in settings.zones if zone.serves(address)]
        # One query per name: a zone listed twice (with different codes) is asked once.
        self.futures: dict[str, concurrent.futures.Future[list[str]]] = {}
        for zone in self.zones:
            name = query_name(address, zone.zone)
            if name not in self.futures:
                self.futures[name] = _POOL.submit(self._ask, resolver, name)

    def _ask(self, resolver: Any, name: str) -> list[str]:
        left = self.deadline - time.monotonic()
        if left <= 0:
            # Queued behind other connections' queries past the deadline: not worth asking.
            raise DnsTempError(name, "A", "not asked before the deadline")
        answer = resolver.query(name, "A", timeout=min(self.settings.dns.timeout, left))
        return list(answer.records) if answer.status == "ok" else []

    def result(self) -> DnsblResult:
        """Every zone's outcome; waits for the answers until the deadline at most."""
        with self._lock:
            if self._result is None:
                self._result = self._collect()
                self._log(self._result)
            return self._result

    def _collect(self) -> DnsblResult:
        left = max(self.deadline - time.monotonic(), 0.0)
        concurrent.futures.wait(list(self.futures.values()), timeout=left)
        outcomes: list[ZoneOutcome] = []
        for zone in self.zones:
            future = self.futures[query_name(self.address, zone.zone)]
            if not future.done():
                outcomes.append(
                    failed(zone, f"no answer within the deadline of {self.settings.deadline:g}s")
                )
                continue
            try:
                answers = future.result()
            except DnsTempError as exc:
                outcomes.append(failed(zone, f"lookup failed: {exc.why}"))
                continue
            except Exception as exc:  # a resolver bug must not lose the connection
                self.logger.exception("%s: lookup in %s failed", self.where, zone.zone)
                outcomes.append(failed(zone, f"lookup failed: {type(exc).__name__}"))
                continue
            outcomes.append(classify(zone, answers))
        return DnsblResult.of(outcomes)

    def _log(self, result: DnsblResult) -> None:
        told: set[tuple[str, str]] = set()  # a zone asked once for two entries fails once
        for outcome in result.outcomes:
            if outcome.listed:
                self.logger.info(
                    "%s: listed on %s (%s) weight %g",
                    self.where,
                    outcome.label,
                    ", ".join(outcome.codes),
                    outcome.weight,
                )
            if outcome.error and (outcome.zone.zone, outcome.error) not in told:
                told.add((outcome.zone.zone, outcome.error))
                self.logger.warning("%s: zone %s: %s", self.where, outcome.zone.zone, outcome.error)
        self.logger.debug("%s: dnsbl score %s", self.where, result.score)


class DnsblMilter(PolicyMilter):
    """One MTA connection of the dnsbl daemon."""

    def __init__(self, context: DaemonContext) -> None:
        super().__init__(context)
        # The settings in force when the connection began serve it to its end, so the
        # stage negotiated and the zones asked stay consistent across a reload.
        settings = getattr(context.policy.current, "settings", None)
        self.settings: Settings = settings if isinstance(settings, Settings) else Settings()
        self.lookup: Lookup | None = None
        self._decided_connection = False
        self._decided_message = False

    # -- the lookups -------------------------------------------------------------------

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        try:
            self._start(hostaddr)
        except Exception:
            self.logger.exception("cannot start the DNS list lookups; treating as not listed")
            self.connection_facts.update(DnsblResult.of(()).facts)
        return int(super().connect(hostname, family, hostaddr))

    def _start(self, hostaddr: Any) -> None:
        daemon_name = self._macro("{daemon_name}")
        if daemon_name:
            self.connection_facts["daemon_name"] = daemon_name
        text = str(hostaddr[0]) if isinstance(hostaddr, tuple) and hostaddr else ""
        address = client_address(text)
        if address is None or self.settings.skipped(address):
            why = "no client address" if address is None else f"{address} is in skip_networks"
            self.logger.debug("not looking up [%s]: %s", text, why)
            self.connection_facts.update(DnsblResult.of((), skipped=why).facts)
            return
        lookup = Lookup(self.settings, address, self.logger, f"client [{address}]")
        self.lookup = lookup
        for name in DnsblResult.of(()).facts:
            self.connection_facts[name] = LazyFact(
                lambda name=name: lookup.result().facts[name]  # type: ignore[misc]
            )

    # -- the decision ------------------------------------------------------------------

    def reply_stages(self) -> frozenset[Stage]:
        return frozenset({self.settings.decide_at})

    def _decide_early(self, facts: MessageFacts) -> Verdict | None:
        verdict = self.context.policy.current.evaluate(facts)
        # Only a refusal is answered now; anything else is decided at end-of-message.
        return verdict if verdict.action in ("reject", "tempfail") else None

    def at_connect(self, facts: MessageFacts) -> Verdict | None:
        self._decided_connection = True
        return self._decide_early(facts)

    def at_helo(self, facts: MessageFacts) -> Verdict | None:
        self._decided_connection = True
        return self._decide_early(facts)

    def at_mail(self, facts: MessageFacts) -> Verdict | None:
        self._decided_message = True
        return self._decide_early(facts)

    def at_rcpt(self, facts: MessageFacts, recipient: str) -> Verdict | None:
        self._decided_message = True
        # Each recipient is judged on its own: a postmaster@ accepted earlier in the same
        # transaction must not exempt the recipients after it.
        return self._decide_early(dataclasses.replace(facts, rcpt_tos=[recipient]))

    def _reset_message(self) -> None:
        super()._reset_message()
        self._decided_message = False

    def decide(self, facts: MessageFacts) -> Verdict:
        verdict = super().decide(facts)
        if verdict.action in ("reject", "tempfail") and (
            self._decided_connection or self._decided_message
        ):
            # The decision stage already refused what the rules refuse; the recipients
            # left are those it let pass. Keep the changes, not the refusal.
            self.logger.debug(
                "%s: %s at end-of-message ignored: decided at %s",
                self.qid,
                verdict.action,
                self.settings.decide_at,
            )
            verdict.action = "continue"
            verdict.code = verdict.enhanced = verdict.text = None
        return verdict
