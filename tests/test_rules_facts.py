"""Lazy daemon facts, ${fact} templates in actions, and the settings section of rule files."""

from __future__ import annotations

import pytest

from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.rules import RuleError, parse_rules

RULES = """
daemon: content
rules:
  - name: trusted
    if: {client_ip: 192.0.2.0/24}
    then: accept
  - name: infected
    if: {fact: {name: virus}}
    then:
      reject: {code: 554, enhanced: 5.7.1, text: "virus ${virus} from ${client_ip} to ${recipient}"}
  - name: mark
    if: true
    then:
      - add_header: {name: X-Scanned, value: "by ${scanner}${nothing}"}
      - continue
"""


def test_a_lazy_fact_is_computed_only_when_a_rule_asks_and_then_once() -> None:
    calls: list[int] = []

    def scan() -> str:
        calls.append(1)
        return "Eicar-Test-Signature"

    rules = parse_rules(RULES)
    trusted = MessageFacts(client_ip="192.0.2.7", extra={"virus": LazyFact(scan)})
    assert rules.evaluate(trusted).action == "accept"
    assert calls == []

    facts = MessageFacts(client_ip="203.0.113.9", rcpt_tos=["a@example.test", "b@example.test"])
    facts.extra["virus"] = LazyFact(scan)
    verdict = rules.evaluate(facts)
    assert verdict.action == "reject"
    assert verdict.text == "virus Eicar-Test-Signature from 203.0.113.9 to b@example.test"
    assert calls == [1]
    rules.evaluate(facts)
    assert calls == [1]


def test_templates_render_missing_facts_as_nothing_and_strip_control_characters() -> None:
    rules = parse_rules(RULES)
    facts = MessageFacts(client_ip="203.0.113.9", extra={"scanner": "clam\r\nX-Evil: 1"})
    verdict = rules.evaluate(facts)
    assert verdict.action == "continue"
    assert [(c.name, c.value) for c in verdict.header_changes] == [
        ("X-Scanned", "by clam X-Evil: 1")
    ]


def test_a_daemon_without_settings_refuses_a_settings_section() -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules("daemon: content\nsettings:\n  zones: []\n", "c.yaml")
    assert caught.value.problems == ["c.yaml:2: settings: daemon 'content' takes no settings"]
