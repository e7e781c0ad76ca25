"""The generic milter adapter: gather a message's facts, ask a policy, act on its verdict.

libmilter calls one :class:`PolicyMilter` object per MTA connection, each callback on the
connection's own thread. The callbacks before end-of-message only collect facts, so they
are negotiated as "no reply" stages: the MTA streams the envelope, headers and body
without waiting for us. At end-of-message the policy (normally a ``RuleSet``) turns the
:class:`MessageFacts` into a :class:`Verdict`, and the verdict becomes milter actions:

=====================  ================================================================
verdict action         milter result
=====================  ================================================================
accept, continue       modifications applied, then ACCEPT
quarantine             modifications applied, quarantine(reason), then ACCEPT
reject                 setreply(5xx, enhanced, text), REJECT
tempfail               setreply(4xx, enhanced, text), TEMPFAIL
discard                DISCARD (modifications are moot)
=====================  ================================================================

A daemon that must answer before end-of-message (a DNSBL at connect, greylisting or a
quota at RCPT) names those stages in :meth:`PolicyMilter.reply_stages` and implements the
matching ``at_*`` hook. Those stages are then negotiated with replies. An early verdict
that rejects or tempfails is answered at once (at RCPT it refuses that recipient only);
one that quarantines or discards takes effect at end-of-message, since the milter
protocol allows those actions only there; header changes an early verdict asks for are
kept and made at end-of-message too.

No Python exception escapes a callback: it is logged with its traceback and the message
is answered TEMPFAIL (at once where the stage has a reply, else at end-of-message).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import Milter

from mailgate.policies.facts import MessageFacts
from mailgate.policies.verdict import Verdict

# What this adapter may ever ask the MTA to do; CHGBODY, CHGFROM and ADDRCPT_PAR are never
# used, so they are not negotiated (the MTA then need not keep the message re-writable).
ACTIONS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.DELRCPT | Milter.QUARANTINE

# Every stage before end-of-message only gathers facts: no reply needed.
_NO_REPLY = (
    Milter.P_NR_CONN
    | Milter.P_NR_HELO
    | Milter.P_NR_MAIL
    | Milter.P_NR_RCPT
    | Milter.P_NR_HDR
    | Milter.P_NR_EOH
    | Milter.P_NR_BODY
)
# Stages with nothing to gather are not sent at all.
_NOT_SENT = Milter.P_NODATA | Milter.P_NOUNKNOWN

# The stages at which a daemon may answer before end-of-message, and their no-reply bits.
Stage = Literal["connect", "helo", "mail", "rcpt"]
_STAGE_NO_REPLY: dict[str, int] = {
    "connect": Milter.P_NR_CONN,
    "helo": Milter.P_NR_HELO,
    "mail": Milter.P_NR_MAIL,
    "rcpt": Milter.P_NR_RCPT,
}

DEFAULT_BODY_LIMIT = 10 * 1024 * 1024

_FOLD = re.compile(r"\r?\n[ \t]*")


class Policy(Protocol):
    """What decides: ``mailgate.policies.rules`` RuleSet satisfies this."""

    def evaluate(self, facts: MessageFacts) -> Verdict: ...


class PolicySource(Protocol):
    """Where a connection finds the policy in force now (it changes on reload)."""

    @property
    def current(self) -> Policy: ...


class InFlight:
    """Counts messages between MAIL FROM and their verdict, so a shutdown lets them finish.

    Idle connections are not counted: between messages an MTA loses nothing when the
    daemon goes away (it reconnects or applies its default action).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def begin(self) -> None:
        with self._lock:
            self._count += 1

    def end(self) -> None:
        with self._lock:
            self._count -= 1


class Stats:
    """Messages per outcome, for the shutdown log line (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def summary(self) -> str:
        counts = self.snapshot()
        total = sum(counts.values())
        parts = " ".join(f"{key}={value}" for key, value in sorted(counts.items()))
        return f"{total} message{'s' if total != 1 else ''}" + (f": {parts}" if parts else "")


@dataclass
class DaemonContext:
    """What the runner gives every connection's adapter object."""

    name: str
    policy: PolicySource
    body_limit: int = DEFAULT_BODY_LIMIT
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("mailgate.milters"))
    stats: Stats = field(default_factory=Stats)
    in_flight: InFlight = field(default_factory=InFlight)


@dataclass
class ReceivedFacts(MessageFacts):
    """MessageFacts whose ``size`` is the size received, even where the body was capped."""

    received_size: int = 0

    @property
    def size(self) -> int:
        return max(self.received_size, super().size)


class PolicyMilter(Milter.Base):  # type: ignore[misc]
    """One MTA connection: facts in, verdict out. Subclass it for a daemon.

    Hooks for subclasses: :meth:`prepare` (add facts before the policy runs) and
    :meth:`decide` (ask something other than, or besides, the rule set).
    """

    # How much of a body the daemon's policy needs (``--body-limit`` overrides it); beyond
    # it the body is counted for the size but not kept.
    body_limit: ClassVar[int] = DEFAULT_BODY_LIMIT

    def __init__(self, context: DaemonContext) -> None:
        self.context = context
        self.logger = context.logger
        self._in_message = False
        self._connection_failed = False
        self._protocol = 0
        self._actions = ACTIONS
        self.client_ip = ""
        self.client_name = ""
        self.helo_name = ""
        # Facts learned about the connection (kept for each of its messages) and the part of
        # an early verdict that waits for end-of-message (see _early).
        self.connection_facts: dict[str, Any] = {}
        self._connection_pending: Verdict | None = None
        self._reset_message()

    # -- per-message state -------------------------------------------------------------

    def _begin_message(self) -> None:
        self._end_message()
        self._reset_message()
        self._in_message = True
        self.context.in_flight.begin()

    def _end_message(self) -> None:
        if self._in_message:
            self._in_message = False
            self.context.in_flight.end()

    def _reset_message(self) -> None:
        self.queue_id: str | None = None
        self.mail_from = ""
        self.auth_user: str | None = None
        self.recipients: list[str] = []
        # The recipient exactly as the MTA sent it, by normalised address: delrcpt must
        # name a recipient the way the MTA knows it.
        self._rcpt_as_sent: dict[str, str] = {}
        self.headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._body_received = 0
        self._message_failed = False
        self.message_facts: dict[str, Any] = {}
        self._message_pending: Verdict | None = None

    @property
    def qid(self) -> str:
        """The MTA's queue id for log lines (Postfix's NOQUEUE until it is known)."""
        return self.queue_id or "NOQUEUE"

    def _learn_queue_id(self) -> None:
        if self.queue_id is None:
            self.queue_id = self._macro("i")

    def _macro(self, name: str) -> str | None:
        value = self.getsymval(name)
        if value is None or value == "":
            return None
        return str(value)

    def log(self, *msg: Any) -> None:
        """Milter.Base's logging hook, routed to the daemon's logger."""
        self.logger.info("%s: %s", self.qid, " ".join(str(part) for part in msg))

    def _failed(self, stage: str) -> None:
        self.logger.exception("%s: internal error in the %s stage", self.qid, stage)
        if stage in ("connect", "hello"):
            self._connection_failed = True
        else:
            self._message_failed = True

    # -- negotiation -------------------------------------------------------------------

    def negotiate(self, opts: list[int]) -> int:
        try:
            offered_actions, offered_protocol = opts[0], opts[1]
            self._actions = offered_actions & ACTIONS
            self._protocol = offered_protocol & (_NO_REPLY | _NOT_SENT)
            for stage in self.reply_stages():
                self._protocol &= ~_STAGE_NO_REPLY[stage]
            opts[0], opts[1], opts[2], opts[3] = self._actions, self._protocol, 0, 0
            missing = ACTIONS & ~offered_actions
            if missing:
                self.logger.debug("the MTA does not offer actions 0x%x", missing)
            return int(Milter.CONTINUE)
        except Exception:
            self.logger.exception("option negotiation failed; taking the MTA's defaults")
            return int(Milter.ALL_OPTS)

    def _gathered(self, stage: int) -> int:
        """The answer to a fact-gathering stage: nothing if the MTA agreed not to wait."""
        return int(Milter.NOREPLY if self._protocol & stage else Milter.CONTINUE)

    # -- fact-gathering callbacks ------------------------------------------------------

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        try:
            if isinstance(hostaddr, tuple) and hostaddr:
                self.client_ip = str(hostaddr[0])
            elif isinstance(hostaddr, str):
                self.client_ip = ""  # a local (unix-socket) client has no address
            self.client_name = hostname or ""
            self.logger.debug("connect from %s[%s]", self.client_name, self.client_ip)
            if self._answers("connect"):
                return self._early("connect", self.at_connect(self.facts()))
        except Exception:
            self._failed("connect")
            if self._answers("connect"):
                return int(Milter.TEMPFAIL)
        return self._gathered(Milter.P_NR_CONN)

    def hello(self, hostname: str) -> int:
        try:
            self.helo_name = hostname
            if self._answers("helo"):
                return self._early("helo", self.at_helo(self.facts()))
        except Exception:
            self._failed("hello")
            if self._answers("helo"):
                return int(Milter.TEMPFAIL)
        return self._gathered(Milter.P_NR_HELO)

    # The *_bytes entry points are what libmilter's binding calls. Mail is full of bytes
    # that are not UTF-8: decode them the way MessageFacts.from_bytes does.
    def envfrom_bytes(self, *args: bytes) -> int:
        return self.envfrom(*(_text(arg) for arg in args))

    def envrcpt_bytes(self, *args: bytes) -> int:
        return self.envrcpt(*(_text(arg) for arg in args))

    def header_bytes(self, name: str, value: bytes) -> int:
        return self.header(name, _text(value))

    def envfrom(self, sender: str, *params: str) -> int:
        try:
            self._begin_message()
            self.mail_from = _address(sender)
            self.auth_user = self._macro("{auth_authen}")
            self._learn_queue_id()
            auth = f" auth={self.auth_user}" if self.auth_user else ""
            self.logger.debug("%s: mail from=<%s>%s", self.qid, self.mail_from, auth)
            if self._answers("mail"):
                return self._early("mail", self.at_mail(self.facts()))
        except Exception:
            self._failed("envfrom")
            if self._answers("mail"):
                self._message_failed = False  # answered now; the next message starts clean
                return int(Milter.TEMPFAIL)
        return self._gathered(Milter.P_NR_MAIL)

    def envrcpt(self, recipient: str, *params: str) -> int:
        address = ""
        try:
            address = _address(recipient)
            self.recipients.append(address)
            self._learn_queue_id()
            if self._answers("rcpt"):
                result = self._early("rcpt", self.at_rcpt(self.facts(), address))
                if result in (Milter.REJECT, Milter.TEMPFAIL):
                    # A refused recipient is not part of the message.
                    self.recipients.pop()
                    return result
            self._rcpt_as_sent.setdefault(address.lower(), recipient)
            if self._answers("rcpt"):
                return result
        except Exception:
            self._failed("envrcpt")
            if self._answers("rcpt"):
                self._message_failed = False  # only this recipient is refused
                if self.recipients and self.recipients[-1] == address:
                    self.recipients.pop()
                return int(Milter.TEMPFAIL)
        return self._gathered(Milter.P_NR_RCPT)

    def header(self, name: str, value: str) -> int:
        try:
            self.headers.append((name, _FOLD.sub(" ", value).strip()))
        except Exception:
            self._failed("header")
        return self._gathered(Milter.P_NR_HDR)

    def eoh(self) -> int:
        try:
            self._learn_queue_id()
        except Exception:
            self._failed("eoh")
        return self._gathered(Milter.P_NR_EOH)

    def body(self, chunk: bytes) -> int:
        try:
            self._body_received += len(chunk)
            room = self.context.body_limit - len(self._body)
            if room > 0:
                self._body += chunk[:room]
        except Exception:
            self._failed("body")
        return self._gathered(Milter.P_NR_BODY)

    # -- the decision ------------------------------------------------------------------

    def eom(self) -> int:
        try:
            self._learn_queue_id()
            if self._connection_failed or self._message_failed:
                self.context.stats.count("error")
                self.logger.error("%s: tempfail: an earlier stage failed (see above)", self.qid)
                return int(Milter.TEMPFAIL)
            facts = self.facts()
            self.prepare(facts)
            verdict = self._with_pending(self.decide(facts))
            return self._act(verdict, facts)
        except Exception:
            self.context.stats.count("error")
            self.logger.exception("%s: internal error at end of message; tempfail", self.qid)
            return int(Milter.TEMPFAIL)
        finally:
            self._body = bytearray()
            self._end_message()

    def facts(self) -> ReceivedFacts:
        """The message as gathered so far."""
        body = bytes(self._body)
        facts = ReceivedFacts(
            client_ip=self.client_ip,
            client_name=self.client_name,
            helo=self.helo_name,
            auth_user=self.auth_user,
            mail_from=self.mail_from,
            rcpt_tos=list(self.recipients),
            headers=list(self.headers),
            body=body,
        )
        head_size = sum(len(n) + len(v) + 4 for n, v in facts.headers) + 2
        facts.received_size = head_size + self._body_received
        if self._body_received > len(body):
            facts.extra["body_truncated"] = True
        if self.queue_id:
            facts.extra["queue_id"] = self.queue_id
        facts.extra.update(self.connection_facts)
        facts.extra.update(self.message_facts)
        return facts

    # -- hooks for daemons -------------------------------------------------------------

    def reply_stages(self) -> frozenset[Stage]:
        """The stages before end-of-message this connection answers (default: none)."""
        return frozenset()

    def at_connect(self, facts: MessageFacts) -> Verdict | None:
        """The verdict at connect (called only if "connect" is in reply_stages)."""
        return None

    def at_helo(self, facts: MessageFacts) -> Verdict | None:
        """The verdict at HELO/EHLO (called only if "helo" is in reply_stages)."""
        return None

    def at_mail(self, facts: MessageFacts) -> Verdict | None:
        """The verdict at MAIL FROM (called only if "mail" is in reply_stages)."""
        return None

    def at_rcpt(self, facts: MessageFacts, recipient: str) -> Verdict | None:
        """The verdict on one RCPT TO (called only if "rcpt" is in reply_stages).

        ``facts.rcpt_tos`` ends with ``recipient``; a reject or tempfail refuses it alone.
        """
        return None

    def prepare(self, facts: MessageFacts) -> None:
        """Add daemon-specific facts before the policy runs (default: nothing)."""

    def decide(self, facts: MessageFacts) -> Verdict:
        """Ask the policy in force now."""
        return self.context.policy.current.evaluate(facts)

    # -- early verdicts ----------------------------------------------------------------

    def _answers(self, stage: Stage) -> bool:
        return not self._protocol & _STAGE_NO_REPLY[stage] and stage in self.reply_stages()

    def _early(self, stage: Stage, verdict: Verdict | None) -> int:
        """Answer a stage before end-of-message with ``verdict`` (None: no decision)."""
        if verdict is None:
            return int(Milter.CONTINUE)
        for match in verdict.matched:
            self.logger.debug("%s: %s: rule %s: %s", self.qid, stage, match.rule, match.reason)
        if verdict.action in ("reject", "tempfail"):
            code, enhanced, text = self._reply(verdict)
            self._set_reply(code, enhanced, text)
            # A refused recipient is not a message: the transaction is counted at its end.
            outcome = f"rcpt_{verdict.action}" if stage == "rcpt" else verdict.action
            self.context.stats.count(outcome)
            rules = ",".join(match.rule for match in verdict.matched) or "-"
            where = f"client={self.client_name}[{self.client_ip}]"
            if stage == "rcpt":
                where += f" from=<{self.mail_from}> to=<{self.recipients[-1]}>"
            elif stage == "mail":
                where += f" from=<{self.mail_from}>"
            self.logger.info(
                "%s: %s at %s: %s %s %s; %s rules=%s",
                self.qid,
                verdict.action,
                stage,
                code,
                enhanced,
                text,
                where,
                rules,
            )
            return int(Milter.REJECT if verdict.action == "reject" else Milter.TEMPFAIL)
        # Everything else waits for end-of-message: the protocol allows quarantine and
        # header changes only there, and a discard at connect means every message.
        keep = verdict.header_changes or verdict.action in ("discard", "quarantine")
        if keep:
            if stage in ("connect", "helo"):
                self._connection_pending = _merge(self._connection_pending, verdict)
            else:
                self._message_pending = _merge(self._message_pending, verdict)
        return int(Milter.CONTINUE)

    def _with_pending(self, verdict: Verdict) -> Verdict:
        """The end-of-message verdict with what earlier stages asked for folded in."""
        for pending in (self._message_pending, self._connection_pending):
            if pending is None:
                continue
            verdict.header_changes[:0] = pending.header_changes
            verdict.matched[:0] = pending.matched
            if pending.action in ("discard", "quarantine") and verdict.action in (
                "accept",
                "continue",
            ):
                verdict.action = pending.action
                verdict.quarantine_reason = pending.quarantine_reason
        return verdict

    def _set_reply(self, code: str, enhanced: str, text: str) -> None:
        lines = text.splitlines() or [""]
        # libmilter reads the text as a format: a lone '%' would void the whole reply.
        lines = [line.replace("%", "%%") for line in lines[:32]]
        self.setreply(code, enhanced, *lines)

    def _act(self, verdict: Verdict, facts: MessageFacts) -> int:
        action = verdict.action
        rules = ",".join(match.rule for match in verdict.matched) or "-"
        for match in verdict.matched:
            self.logger.debug("%s: rule %s: %s", self.qid, match.rule, match.reason)
        envelope = (
            f"from=<{facts.mail_from}> to=<{'>,<'.join(facts.rcpt_tos)}> "
            f"size={facts.size} rules={rules}"
        )
        if action in ("reject", "tempfail"):
            code, enhanced, text = self._reply(verdict)
            self._set_reply(code, enhanced, text)
            self.context.stats.count(action)
            self.logger.info(
                "%s: %s %s %s %s; %s", self.qid, action, code, enhanced, text, envelope
            )
            return int(Milter.REJECT if action == "reject" else Milter.TEMPFAIL)
        if action == "discard":
            self.context.stats.count(action)
            self.logger.info("%s: discard; %s", self.qid, envelope)
            return int(Milter.DISCARD)

        needed = self._actions_needed(verdict)
        if needed & ~self._actions:
            # Delivering without a change a rule asked for (a redirect, a quarantine) could
            # hand the message to the wrong place; let the MTA retry once it is configured.
            self.context.stats.count("error")
            self.logger.error(
                "%s: tempfail: the verdict needs milter actions 0x%x the MTA did not grant; %s",
                self.qid,
                needed & ~self._actions,
                envelope,
            )
            return int(Milter.TEMPFAIL)
        changes = self._modify(verdict)
        if action == "quarantine":
            reason = verdict.quarantine_reason or verdict.text or f"rule {rules}"
            self.quarantine(reason)
            self.context.stats.count("quarantine")
            self.logger.info("%s: quarantine (%s)%s; %s", self.qid, reason, changes, envelope)
        else:
            self.context.stats.count("accept")
            self.logger.info("%s: accept%s; %s", self.qid, changes, envelope)
        return int(Milter.ACCEPT)

    @staticmethod
    def _reply(verdict: Verdict) -> tuple[str, str, str]:
        code, enhanced, text = verdict.reply()
        default = Verdict(action=verdict.action).reply()
        # libmilter drops a reply whose class does not match the result (550 with TEMPFAIL).
        wanted_class = "5" if verdict.action == "reject" else "4"
        if not (100 <= code <= 599) or str(code)[0] != wanted_class:
            code = default[0]
        if not enhanced or not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced):
            enhanced = default[1]
        if enhanced[0] != wanted_class:
            enhanced = wanted_class + enhanced[1:]
        return str(code), enhanced, text

    @staticmethod
    def _actions_needed(verdict: Verdict) -> int:
        needed = 0
        for change in verdict.header_changes:
            needed |= Milter.CHGHDRS if change.op == "change" else Milter.ADDHDRS
        if verdict.add_recipients:
            needed |= Milter.ADDRCPT
        if verdict.remove_recipients:
            needed |= Milter.DELRCPT
        if verdict.action == "quarantine":
            needed |= Milter.QUARANTINE
        return int(needed)

    def _modify(self, verdict: Verdict) -> str:
        """Apply header and recipient changes; return a summary for the log line."""
        done: list[str] = []
        for change in verdict.header_changes:
            if change.op == "add":
                self.addheader(change.name, change.value)
                done.append(f"add {change.name}")
            elif change.op == "insert":
                self.addheader(change.name, change.value, max(change.index, 0))
                done.append(f"insert {change.name}@{change.index}")
            else:
                self.chgheader(change.name, change.index, change.value)
                verb = "change" if change.value else "delete"
                done.append(f"{verb} {change.name}[{change.index}]")
        for address in verdict.remove_recipients:
            bare = _address(address)
            self.delrcpt(self._rcpt_as_sent.get(bare.lower(), f"<{bare}>"))
            done.append(f"delrcpt <{bare}>")
        for address in verdict.add_recipients:
            bare = _address(address)
            self.addrcpt(f"<{bare}>")
            done.append(f"addrcpt <{bare}>")
        return f" ({', '.join(done)})" if done else ""

    # -- connection end ----------------------------------------------------------------

    def abort(self) -> int:
        try:
            self._end_message()
            self._reset_message()
        except Exception:
            self.logger.exception("%s: internal error in the abort stage", self.qid)
        return int(Milter.CONTINUE)

    def close(self) -> int:
        self._end_message()
        return int(Milter.CONTINUE)


def _merge(earlier: Verdict | None, later: Verdict) -> Verdict:
    """Two early verdicts kept for end-of-message, as one (the first discard/quarantine wins)."""
    if earlier is None:
        return Verdict(
            action=later.action if later.action in ("discard", "quarantine") else "continue",
            quarantine_reason=later.quarantine_reason,
            header_changes=list(later.header_changes),
            matched=list(later.matched),
        )
    # One rule matching at every RCPT of a transaction asks for its header once.
    earlier.header_changes.extend(
        change for change in later.header_changes if change not in earlier.header_changes
    )
    earlier.matched.extend(m for m in later.matched if m not in earlier.matched)
    if earlier.action == "continue" and later.action in ("discard", "quarantine"):
        earlier.action = later.action
        earlier.quarantine_reason = later.quarantine_reason
    return earlier


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _address(value: str) -> str:
    """``<a@b>`` → ``a@b`` (and ``<>`` → the empty null sender)."""
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value
