"""The errors of the rule language."""

from __future__ import annotations


class RuleError(Exception):
    """A rule file cannot be used.

    ``problems`` holds one line per problem, each ``file:line: field.path: message`` where
    the line and field are known (``content.yaml:12: rules[0].then: ...``).
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
