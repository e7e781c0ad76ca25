"""The greylisting daemon (``mailgate milter greylist``), a replacement for postgrey.

It answers at RCPT TO, for each recipient: the rule file decides, and the greylist check
is the lazy fact ``greylist``, computed (and the triplet recorded) only when a rule asks
for it. Rules placed before that rule (authenticated users, allow-listed networks, sender
domains, host names, DNSWL listings) therefore let mail through without a store lookup,
and without leaving a triplet behind.

Facts for the rules, per recipient:

- ``greylist``: ``new`` (first attempt, or a retry too late), ``early`` (retried before
  the delay was over), ``passed`` (retried in time, or a triplet that passed before),
  ``allowed-client`` (the client network passed ``auto_allow_clients`` times),
  ``local`` (a client without an IP address), ``unavailable`` (the store failed);
- ``greylist_wait`` (seconds until a retry passes), ``greylist_wait_text``
  (``5 minutes``), ``greylist_network`` (the client network of the triplet);

and per connection (each computed once, when a rule first asks):

- ``client_hostname``: the client's host name as the MTA verified it, or, when the MTA
  gave only ``[address]``, the name of a verified reverse lookup (PTR whose name
  resolves back to the address); empty when there is none;
- ``dnswl``: the DNS allow-list zones (``dnswl_zones``) that list the client.

The state sits in the store of ``settings.store`` (``mailgate.milters.store``: SQLite by
default, Redis for several gateways). The decision logic is ``mailgate.policies.greylist``.
End of message only says ``continue``: every decision is taken at RCPT TO.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from mailgate.core.dns import DnsTempError, resolver_for
from mailgate.milters.adapter import PolicyMilter, Stage
from mailgate.milters.store import StoreError, store_for
from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.greylist import (
    Record,
    Settings,
    client_allowed,
    client_network,
    format_wait,
    normal_recipient,
    normal_sender,
    parse_ip,
    step,
    triplet_key,
)
from mailgate.policies.verdict import Verdict


@dataclass(frozen=True, slots=True)
class Check:
    """The greylist outcome for one recipient."""

    state: str
    wait: int = 0


def settings_of(policy: Any) -> Settings:
    """The settings of the rules in force (the defaults for a policy without any)."""
    settings = getattr(policy, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()


def reverse_name(address: str, zone: str) -> str | None:
    """The DNS list query name of ``address`` under ``zone`` (RFC 5782), or None."""
    ip = parse_ip(address)
    if ip is None:
        return None
    if ip.version == 4:
        labels = str(ip).split(".")[::-1]
    else:
        labels = list(ip.exploded.replace(":", ""))[::-1]
    return ".".join([*labels, zone])


# 127.0.0.255 is dnswl.org's "refused" answer (a public resolver, or over the query limit):
# not a listing.
_NOT_LISTED = frozenset({"127.0.0.255"})
_LISTED = ipaddress.ip_network("127.0.0.0/8")


class GreylistMilter(PolicyMilter):
    """One MTA connection of the greylisting daemon."""

    # Nothing of the body is needed: every decision is taken at RCPT TO.
    body_limit: ClassVar[int] = 0

    def reply_stages(self) -> frozenset[Stage]:
        return frozenset({"rcpt"})

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        result = super().connect(hostname, family, hostaddr)
        self.connection_facts["client_hostname"] = LazyFact(self._client_hostname)
        self.connection_facts["dnswl"] = LazyFact(self._dnswl)
        return result

    def at_rcpt(self, facts: MessageFacts, recipient: str) -> Verdict | None:
        policy = self.context.policy.current
        settings = settings_of(policy)
        network = client_network(facts.client_ip, settings.ipv4_mask, settings.ipv6_mask)
        sender = facts.mail_from
        # The rules decide about this recipient: `envelope to` tests it alone, so an earlier
        # recipient that an allow-list matched does not let the later ones through.
        facts.rcpt_tos = [recipient]
        check = LazyFact(lambda: self._check(settings, network, sender, recipient))
        facts.extra["greylist"] = LazyFact(lambda: check.get().state)
        facts.extra["greylist_wait"] = LazyFact(lambda: check.get().wait)
        facts.extra["greylist_wait_text"] = LazyFact(lambda: format_wait(check.get().wait))
        facts.extra["greylist_network"] = network
        return policy.evaluate(facts)

    def decide(self, facts: MessageFacts) -> Verdict:
        # Every recipient was decided at RCPT TO; the message itself has nothing to add.
        return Verdict()

    # -- the check ---------------------------------------------------------------------

    def _check(self, settings: Settings, network: str, sender: str, recipient: str) -> Check:
        if network == "local":
            self.logger.info("%s: greylist local: client without an address", self.qid)
            return Check("local")
        sender_key = normal_sender(sender) if settings.normalize_sender else sender.lower()
        key = triplet_key(network, sender_key, normal_recipient(recipient))
        store = store_for(settings.store, "greylist")
        started = time.monotonic()
        try:
            check = self._consult(store, settings, network, key)
        except StoreError as exc:
            self.logger.warning(
                "%s: greylist unavailable after %.1fs: %s; client=%s[%s] triplet=%s",
                self.qid,
                time.monotonic() - started,
                exc,
                self.client_name,
                self.client_ip,
                key,
            )
            return Check("unavailable")
        wait = f" wait={check.wait}s" if check.state in ("new", "early") else ""
        self.logger.info(
            "%s: greylist %s: client=%s[%s] triplet=%s%s",
            self.qid,
            check.state,
            self.client_name,
            self.client_ip,
            key,
            wait,
        )
        return check

    @staticmethod
    def _consult(store: Any, settings: Settings, network: str, key: str) -> Check:
        client_key = f"client:{network}"
        if settings.auto_allow_clients:
            passes = store.get(client_key)
            if passes is not None and passes.isdigit() and client_allowed(int(passes), settings):
                # Still sending: keep the client allowed for another expiry period.
                store.put(client_key, passes, settings.expiry)
                return Check("allowed-client")
        triplet = f"triplet:{key}"
        now = time.time()
        result = step(Record.loads(store.get(triplet)), now, settings)
        store.put(triplet, result.record.dumps(), result.ttl)
        if result.first_pass and settings.auto_allow_clients:
            store.incr(client_key, settings.expiry)
        return Check(result.state, result.wait)

    # -- connection facts --------------------------------------------------------------

    def _client_hostname(self) -> str:
        name = self.client_name.strip().rstrip(".").lower()
        if name and not name.startswith("[") and name != "unknown":
            return name
        address = parse_ip(self.client_ip)
        if address is None:
            return ""
        settings = settings_of(self.context.policy.current)
        try:
            verified = resolver_for(settings.dns).verified_ptr(str(address))
        except DnsTempError as exc:
            self.logger.info("%s: no verified host name for %s: %s", self.qid, address, exc)
            return ""
        return (verified or "").rstrip(".").lower()

    def _dnswl(self) -> list[str]:
        settings = settings_of(self.context.policy.current)
        resolver = resolver_for(settings.dns)
        listed: list[str] = []
        for zone in settings.dnswl_zones:
            name = reverse_name(self.client_ip, zone)
            if name is None:
                return []
            try:
                answer = resolver.query(name, "A")
            except DnsTempError as exc:
                self.logger.info("%s: DNSWL %s not answered: %s", self.qid, zone, exc)
                continue
            if answer.status == "ok" and any(
                record not in _NOT_LISTED and ipaddress.ip_address(record) in _LISTED
                for record in answer.records
            ):
                listed.append(zone)
        return listed
