"""What a policy decides about one message: the verdict and the changes it asks for.

Transport-free: a milter adapter turns a Verdict into milter replies and modification
actions; ``mailgate rules test`` compares it with a test case's expectation; the core's
chain merges the verdicts of several daemons (first reject/tempfail wins, changes in order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Action = Literal["accept", "continue", "reject", "tempfail", "discard", "quarantine"]
# "continue" means "no decision": later rules (and later daemons) still run; at the end of a
# rule file it is the same as accept.
FINAL_ACTIONS: frozenset[str] = frozenset({"accept", "reject", "tempfail", "discard", "quarantine"})


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """One header modification, in milter terms.

    ``op`` is "add" (append at the end), "insert" (at ``index``, 0 = first), or "change"
    (the ``index``-th occurrence of ``name``, 1-based as in smfi_chgheader; an empty
    ``value`` deletes that occurrence).
    """

    op: Literal["add", "insert", "change"]
    name: str
    value: str
    index: int = 1


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """A rule that matched, and why (for logs and `mailgate rules explain`)."""

    rule: str
    reason: str


@dataclass(slots=True)
class Verdict:
    action: Action = "continue"
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    quarantine_reason: str | None = None
    header_changes: list[HeaderChange] = field(default_factory=list)
    add_recipients: list[str] = field(default_factory=list)
    remove_recipients: list[str] = field(default_factory=list)
    matched: list[RuleMatch] = field(default_factory=list)

    @property
    def is_final(self) -> bool:
        return self.action in FINAL_ACTIONS

    def reply(self) -> tuple[int, str, str]:
        """The SMTP reply for reject/tempfail, with defaults like Postfix's milter client."""
        if self.action == "tempfail":
            code, enhanced, text = 451, "4.7.1", "Service unavailable - try again later"
        else:
            code, enhanced, text = 550, "5.7.1", "Command rejected"
        return (self.code or code, self.enhanced or enhanced, self.text or text)
