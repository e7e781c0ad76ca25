"""Compiled actions: what a matching rule does to the verdict being built.

Final actions (accept, reject, tempfail, discard, quarantine) set the verdict's action and
end evaluation; the others (header changes, subject tag, recipients) accumulate in an
EvalState, which also tracks the Subject and the recipient list as earlier actions left
them, so that tag_subject stays idempotent and redirect really replaces every recipient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from mailgate.policies.facts import MessageFacts
from mailgate.policies.rules.conditions import decode_words, fact_values
from mailgate.policies.rules.schema import ActionSpec, BareAction, ReplySpec
from mailgate.policies.verdict import FINAL_ACTIONS, HeaderChange, Verdict


@dataclass
class EvalState:
    """The verdict under construction and the message as the actions so far changed it."""

    facts: MessageFacts
    verdict: Verdict = field(default_factory=Verdict)
    recipients: list[str] = field(default_factory=list)
    subject: str | None = None

    @classmethod
    def start(cls, facts: MessageFacts) -> EvalState:
        subjects = facts.header_values("Subject")
        return cls(
            facts, recipients=list(facts.rcpt_tos), subject=subjects[0] if subjects else None
        )

    def finish(self) -> Verdict:
        """The verdict, with recipient changes as the difference from the envelope."""
        original = {_key(r) for r in self.facts.rcpt_tos}
        final = {_key(r) for r in self.recipients}
        self.verdict.add_recipients = [r for r in self.recipients if _key(r) not in original]
        self.verdict.remove_recipients = [r for r in self.facts.rcpt_tos if _key(r) not in final]
        return self.verdict


def _key(address: str) -> str:
    return address.strip().strip("<>").lower()


# ${name} in a reply text, a header value or a quarantine reason: a fact's value.
_PLACEHOLDER = re.compile(r"\$\{([a-z][a-z0-9_]*)\}")
_ENVELOPE_FIELDS = ("client_ip", "client_name", "helo", "mail_from", "auth_user")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def render(template: str, facts: MessageFacts) -> str:
    """``template`` with each ``${name}`` replaced by the value of that fact.

    Names are the envelope fields (client_ip, client_name, helo, mail_from, auth_user),
    ``recipient`` (the latest RCPT TO) and any daemon fact (a list shows its items joined
    by ", "). An unknown or missing fact renders as nothing; control characters a fact
    may carry never reach a header or a reply line.
    """
    if "${" not in template:
        return template

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in _ENVELOPE_FIELDS:
            text = getattr(facts, name) or ""
        elif name == "recipient":
            text = facts.rcpt_tos[-1] if facts.rcpt_tos else ""
        else:
            text = ", ".join(fact_values(facts.fact(name)))
        return _CONTROL.sub(" ", str(text))

    return _PLACEHOLDER.sub(value, template)


def _render(template: str | None, facts: MessageFacts) -> str | None:
    return None if template is None else render(template, facts)


class Action(Protocol):
    @property
    def final(self) -> bool: ...

    def apply(self, state: EvalState) -> None: ...


@dataclass(frozen=True, slots=True)
class Decide:
    """accept, discard, reject, tempfail or quarantine."""

    action: BareAction
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    reason: str | None = None

    @property
    def final(self) -> bool:
        return self.action in FINAL_ACTIONS

    def apply(self, state: EvalState) -> None:
        if self.action == "continue":
            return
        verdict = state.verdict
        verdict.action = self.action
        verdict.code, verdict.enhanced = self.code, self.enhanced
        verdict.text = _render(self.text, state.facts)
        quarantine = self.action == "quarantine"
        verdict.quarantine_reason = _render(self.reason, state.facts) if quarantine else None


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str
    index: int | None = None

    final = False

    def apply(self, state: EvalState) -> None:
        value = render(self.value, state.facts)
        if self.index is None:
            change = HeaderChange("add", self.name, value)
        else:
            change = HeaderChange("insert", self.name, value, self.index)
        state.verdict.header_changes.append(change)
        if self.name.lower() == "subject" and state.subject is None:
            state.subject = value


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    name: str
    value: str
    index: int = 1

    final = False

    def apply(self, state: EvalState) -> None:
        value = render(self.value, state.facts)
        state.verdict.header_changes.append(HeaderChange("change", self.name, value, self.index))
        if self.name.lower() == "subject" and self.index == 1:
            state.subject = value or None


@dataclass(frozen=True, slots=True)
class TagSubject:
    prefix: str

    final = False

    def apply(self, state: EvalState) -> None:
        subject = state.subject
        if subject is None:
            state.verdict.header_changes.append(HeaderChange("add", "Subject", self.prefix))
            state.subject = self.prefix
            return
        tag = self.prefix.strip()
        if subject.lstrip().startswith(tag) or decode_words(subject).lstrip().startswith(tag):
            return
        tagged = (
            f"{self.prefix} {subject}" if not self.prefix.endswith(" ") else self.prefix + subject
        )
        state.verdict.header_changes.append(HeaderChange("change", "Subject", tagged, 1))
        state.subject = tagged


@dataclass(frozen=True, slots=True)
class AddRecipients:
    addresses: tuple[str, ...]

    final = False

    def apply(self, state: EvalState) -> None:
        present = {_key(r) for r in state.recipients}
        for address in self.addresses:
            if _key(address) not in present:
                state.recipients.append(address)
                present.add(_key(address))


@dataclass(frozen=True, slots=True)
class Redirect:
    addresses: tuple[str, ...]

    final = False

    def apply(self, state: EvalState) -> None:
        state.recipients = list(dict.fromkeys(self.addresses))


def _reply(kind: BareAction, reply: ReplySpec) -> Decide:
    return Decide(kind, reply.code, reply.enhanced, reply.text)


def compile_action(spec: BareAction | ActionSpec, rule: str) -> Action:
    """The runnable form of one validated action of rule ``rule``."""
    if isinstance(spec, str):
        reason = f"rule {rule}" if spec == "quarantine" else None
        return Decide(spec, reason=reason)
    if spec.reject is not None:
        return _reply("reject", spec.reject)
    if spec.tempfail is not None:
        return _reply("tempfail", spec.tempfail)
    if spec.quarantine is not None:
        return Decide("quarantine", reason=spec.quarantine.reason)
    if spec.add_header is not None:
        add = spec.add_header
        return AddHeader(add.name, add.value, add.index)
    if spec.change_header is not None:
        change = spec.change_header
        return ChangeHeader(change.name, change.value, change.index)
    if spec.tag_subject is not None:
        return TagSubject(spec.tag_subject.prefix)
    if spec.add_recipient is not None:
        return AddRecipients(tuple(spec.add_recipient))
    if spec.redirect is not None:
        return Redirect(tuple(spec.redirect))
    raise ValueError("empty action")  # the schema rejects these; kept for type checkers
