"""The rule engine: a loaded, compiled rule set and its evaluation against one message.

Rules run in file order. A matching rule's actions apply in order; if one of them is final
(accept, reject, tempfail, discard, quarantine) evaluation stops there. Modifying actions
of every matching rule accumulate. Each matching rule is recorded in Verdict.matched with
the reason its condition held. With no final action the verdict is "continue".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailgate.policies.content import ContentFacts
from mailgate.policies.facts import MessageFacts
from mailgate.policies.rules.actions import Action, EvalState, compile_action
from mailgate.policies.rules.conditions import Condition, Context, compile_condition
from mailgate.policies.rules.schema import RuleFileSpec, RuleSpec, RuleTestSpec
from mailgate.policies.verdict import RuleMatch, Verdict


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule."""

    name: str
    condition: Condition
    actions: tuple[Action, ...]
    enabled: bool = True
    description: str = ""

    @property
    def final(self) -> bool:
        return any(action.final for action in self.actions)

    @classmethod
    def compile(cls, spec: RuleSpec) -> Rule:
        return cls(
            name=spec.name,
            condition=compile_condition(spec.if_),
            actions=tuple(compile_action(action, spec.name) for action in spec.then),
            enabled=spec.enabled,
            description=spec.description,
        )


@dataclass(frozen=True)
class RuleSet:
    """A validated rule file, ready to evaluate messages."""

    daemon: str
    rules: tuple[Rule, ...] = ()
    tests: tuple[RuleTestSpec, ...] = ()
    source: str = "<rules>"
    # Where the test cases' message files are looked up (the rule file's directory).
    base_dir: Path = field(default_factory=Path)
    # The daemon's validated ``Settings`` model (policies/settings.py), None if it takes none.
    settings: Any = None

    @classmethod
    def from_spec(
        cls, spec: RuleFileSpec, source: str, base_dir: Path, settings: Any = None
    ) -> RuleSet:
        return cls(
            daemon=spec.daemon,
            rules=tuple(Rule.compile(rule) for rule in spec.rules),
            tests=tuple(spec.tests),
            source=source,
            base_dir=base_dir,
            settings=settings,
        )

    def evaluate(self, facts: MessageFacts, *, content: ContentFacts | None = None) -> Verdict:
        """The verdict of these rules on one message.

        ``content`` lets a caller that already analysed the message share the result;
        without it the content facts are computed only if a rule needs them.
        """
        ctx = Context(facts, content)
        state = EvalState.start(facts)
        for rule in self.rules:
            if not rule.enabled:
                continue
            reason = rule.condition.evaluate(ctx)
            if reason is None:
                continue
            state.verdict.matched.append(RuleMatch(rule.name, reason))
            for action in rule.actions:
                action.apply(state)
            if rule.final:
                break
        return state.finish()
