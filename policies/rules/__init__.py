"""mailgate.policies.rules: the YAML rule language shared by every policy daemon.

``load_rules(path)`` reads and validates a rule file into a RuleSet (or raises RuleError
with every problem as ``file:line: field: message``); ``RuleSet.evaluate(facts)`` gives the
Verdict; ``run_tests(ruleset)`` runs the file's own test cases. The format is documented in
``rules/README.md`` and described by ``rules/schema.json`` (from ``schema.json_schema()``).
"""

from mailgate.policies.rules.engine import Rule, RuleSet
from mailgate.policies.rules.errors import RuleError
from mailgate.policies.rules.loader import load_rules, parse_rules
from mailgate.policies.rules.testcases import TestResult, run_tests

__all__ = ["Rule", "RuleError", "RuleSet", "TestResult", "load_rules", "parse_rules", "run_tests"]
