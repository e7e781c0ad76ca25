"""Running a rule file's own test cases: build each message, evaluate, compare.

A test case names a message (a file beside the rule file, or inline text), its envelope and
the facts other daemons would have added, and the verdict it expects. Only the keys the
expectation gives are compared; a failure carries a diff of expected (-) against actual (+).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mailgate.policies.facts import MessageFacts
from mailgate.policies.rules.engine import RuleSet
from mailgate.policies.rules.schema import ExpectSpec, RuleTestSpec
from mailgate.policies.verdict import HeaderChange, Verdict


@dataclass(frozen=True, slots=True)
class TestResult:
    """The outcome of one test case."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    name: str
    passed: bool
    diff: tuple[str, ...] = ()  # "- key: expected" / "+ key: actual" lines
    verdict: Verdict | None = None
    error: str | None = None  # the case could not run (e.g. unreadable message file)

    @property
    def reason(self) -> str:
        """One line saying why the case failed ("" when it passed)."""
        if self.passed:
            return ""
        if self.error is not None:
            return self.error
        expected = next((line[2:] for line in self.diff if line.startswith("- ")), "")
        actual = next((line[2:] for line in self.diff if line.startswith("+ ")), "")
        return f"expected {expected}, got {actual}"


def run_tests(ruleset: RuleSet, base_dir: Path | str | None = None) -> list[TestResult]:
    """Run every test case of ``ruleset``; message files are found under ``base_dir``
    (default: the rule file's directory)."""
    root = Path(base_dir) if base_dir is not None else ruleset.base_dir
    return [run_test(ruleset, case, root) for case in ruleset.tests]


def run_test(ruleset: RuleSet, case: RuleTestSpec, base_dir: Path) -> TestResult:
    try:
        facts = build_facts(case, base_dir)
    except OSError as exc:
        return TestResult(case.name, False, error=f"cannot read message: {exc}")
    verdict = ruleset.evaluate(facts)
    diff = compare(case.expect, verdict)
    return TestResult(case.name, not diff, tuple(diff), verdict)


def build_facts(case: RuleTestSpec, base_dir: Path) -> MessageFacts:
    """The MessageFacts a daemon would have gathered for this test case."""
    raw = b""
    if case.message is not None:
        if case.message.file is not None:
            raw = (base_dir / case.message.file).read_bytes()
        elif case.message.raw is not None:
            raw = case.message.raw.encode("utf-8")
    envelope = case.envelope
    return MessageFacts.from_bytes(
        raw,
        mail_from=envelope.from_,
        rcpt_tos=list(envelope.to),
        client_ip=envelope.client_ip or "",
        client_name=envelope.client_name,
        helo=envelope.helo,
        auth_user=envelope.auth_user,
        extra=dict(case.facts),
    )


def actual_fields(verdict: Verdict) -> dict[str, Any]:
    """The verdict in the terms of a test expectation."""
    deciding = verdict.matched[-1] if verdict.matched else None
    return {
        "action": verdict.action,
        "rule": deciding.rule if deciding else None,
        "matched": [match.rule for match in verdict.matched],
        "reason": deciding.reason if deciding else None,
        "code": verdict.code,
        "enhanced": verdict.enhanced,
        "text": verdict.text,
        "quarantine_reason": verdict.quarantine_reason,
        "header_changes": [_change(change) for change in verdict.header_changes],
        "add_recipients": verdict.add_recipients,
        "remove_recipients": verdict.remove_recipients,
    }


def _change(change: HeaderChange) -> dict[str, Any]:
    return {"op": change.op, "name": change.name, "value": change.value, "index": change.index}


def compare(expect: ExpectSpec, verdict: Verdict) -> list[str]:
    """Diff lines for every expected key the verdict disagrees with (empty: passed)."""
    diff: list[str] = []
    for key, got in actual_fields(verdict).items():
        if key not in expect.model_fields_set:
            continue
        wanted: Any = getattr(expect, key)
        if key == "header_changes":
            wanted = [change.model_dump() for change in expect.header_changes or []]
        # The reason is prose; an expectation names the part of it that matters.
        same = (got is not None and wanted in got) if key == "reason" else wanted == got
        if not same:
            diff.append(f"- {key}: {_show(wanted)}")
            diff.append(f"+ {key}: {_show(got)}")
    return diff


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
