"""Loading rule files: YAML text to a compiled RuleSet, or every problem at once.

Each problem is reported as ``file:line: field.path: message``. The line comes from the
YAML node tree (the key's line for a mapping entry, the item's line for a list item),
mapped to pydantic's error locations by walking the parsed data alongside them. Checks
that span the file (unique rule names, test expectations naming real rules, test
message files that exist) run on the raw data, so they are reported together with the
schema's findings rather than after they are fixed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mailgate.policies.rules.engine import RuleSet
from mailgate.policies.rules.errors import RuleError
from mailgate.policies.rules.schema import BARE_ACTIONS, DAEMONS, RuleFileSpec, known_keys
from mailgate.policies.settings import settings_model
from mailgate.policies.yamllines import YamlPath, YamlSyntaxError, load_with_lines

_KNOWN_KEYS = sorted(known_keys())


class RuleLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. In a rule file ``is: yes`` or ``contains: on``
    compare against the text as written, not against a boolean (YAML 1.1 would turn them
    into True); settings that really are booleans still accept yes/no through validation.
    """


RuleLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RuleLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_rules(path: str | Path, *, check_test_files: bool = True) -> RuleSet:
    """Read, validate and compile the rule file at ``path``; raise RuleError if it is bad.

    A daemon loading its production rules passes ``check_test_files=False``: the messages
    its test cases name belong to `mailgate rules test`, not to the running policy.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise RuleError([f"{path}: not UTF-8 text"]) from None
    return parse_rules(text, str(path), base_dir=path.parent, check_test_files=check_test_files)


def parse_rules(
    text: str,
    filename: str = "<rules>",
    *,
    base_dir: Path | None = None,
    check_test_files: bool = True,
) -> RuleSet:
    """Validate and compile rule-file ``text``; ``filename`` is used in problems.

    ``base_dir`` is where test cases' message files are found (default: the directory of
    ``filename``).
    """
    if base_dir is None:
        base_dir = Path(filename).parent
    data, lines, problems = _read_yaml(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RuleError([f"{filename}:1: the top level must be a mapping (daemon, rules, tests)"])
    spec: RuleFileSpec | None = None
    try:
        spec = RuleFileSpec.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            problems.append(_describe(error, data, lines))
    settings, settings_problems = _settings(data, lines)
    problems.extend(settings_problems)
    problems.extend(_cross_checks(data, lines, base_dir if check_test_files else None))
    if problems or spec is None:
        raise RuleError(_format(problems, filename))
    return RuleSet.from_spec(spec, filename, base_dir, settings)


def _settings(data: dict[Any, Any], lines: Mapping[YamlPath, int]) -> tuple[Any, list[Problem]]:
    """The daemon's validated settings, or the problems with them."""
    daemon = data.get("daemon")
    if not isinstance(daemon, str) or daemon not in DAEMONS:
        return None, []  # the schema reports the daemon itself
    raw = data.get("settings", {})
    model = settings_model(daemon)
    if model is None:
        if raw:
            line = lines.get(("settings",), 1)
            return None, [(line, f"settings: daemon {daemon!r} takes no settings")]
        return None, []
    if not isinstance(raw, dict):
        return None, []  # the schema reports the type
    try:
        return model.model_validate(raw), []
    except ValidationError as exc:
        problems = []
        fields = sorted(info.alias or name for name, info in model.model_fields.items())
        for error in exc.errors():
            located = dict(error)
            located["loc"] = ("settings", *error["loc"])
            line, message = _describe(located, data, lines)
            if error.get("type") == "extra_forbidden" and len(error["loc"]) == 1:
                key = str(error["loc"][0])
                message = (
                    f"settings.{key}: unknown setting {key!r} of daemon {daemon!r}"
                    f"{_did_you_mean(key, fields)}"
                )
            problems.append((line, message))
        return None, problems


# -- YAML with line numbers -------------------------------------------------------------

Problem = tuple[int, str]


def _read_yaml(text: str, filename: str) -> tuple[Any, dict[YamlPath, int], list[Problem]]:
    try:
        data, lines, duplicates = load_with_lines(text, RuleLoader)
    except YamlSyntaxError as exc:
        where = f"{filename}:{exc.line}" if exc.line is not None else filename
        raise RuleError([f"{where}: invalid YAML: {exc.problem}"]) from None
    # PyYAML would silently keep the last value of a repeated key; an operator never means that.
    problems: list[Problem] = [
        (line, f"{_field_path(path)}: duplicate key {path[-1]!r}") for line, path in duplicates
    ]
    return data, lines, problems


def _field_path(path: YamlPath) -> str:
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
    return text.lstrip(".") or "(top level)"


def _locate(data: Any, loc: YamlPath) -> tuple[YamlPath, YamlPath]:
    """(the field path to show, the deepest part of it that exists in the YAML)."""
    shown: list[Any] = []
    found: list[Any] = []
    node: Any = data
    exists = True
    for part in loc:
        if isinstance(part, str) and part.startswith("<"):
            continue  # a union tag of the schema, not a key of the file
        if exists and _has(node, part):
            node = node[part]
        elif exists and isinstance(part, int) and not isinstance(node, list):
            continue  # a single value the schema accepted as a one-item list
        else:
            exists = False
        shown.append(part)
        if exists:
            found.append(part)
    return tuple(shown), tuple(found)


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _describe(error: Mapping[str, Any], data: Any, lines: Mapping[YamlPath, int]) -> Problem:
    shown, found = _locate(data, tuple(error["loc"]))
    line = 1
    for depth in range(len(found), -1, -1):
        if found[:depth] in lines:
            line = lines[found[:depth]]
            break
    return line, f"{_field_path(shown)}: {_message(error, shown)}"


_TYPE_MESSAGES = {
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
}


def _message(error: Mapping[str, Any], shown: YamlPath) -> str:
    kind = error.get("type", "")
    given = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        key = str(shown[-1]) if shown else ""
        if key in BARE_ACTIONS:
            return f"write {key} as a plain action name, not as a key"
        if key in _KNOWN_KEYS:
            return f"{key!r} is not allowed here"
        return f"unknown key {key!r}{_did_you_mean(key, _KNOWN_KEYS)}"
    if kind == "literal_error":
        if shown == ("daemon",):
            return f"unknown daemon {given!r} (known: {', '.join(DAEMONS)})"
        expected = str(ctx.get("expected", ""))
        choices = re.findall(r"'([^']*)'", expected)
        return f"{given!r} is not one of {expected}{_did_you_mean(str(given), choices)}"
    if kind == "too_short":
        return "must not be empty"
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]}, got {_show(given)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return str(error.get("msg", "out of range")).replace("Input should be", "must be")
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- checks across the file ------------------------------------------------------------------


def _cross_checks(
    data: dict[Any, Any], lines: Mapping[YamlPath, int], base_dir: Path | None
) -> list[Problem]:
    problems: list[Problem] = []
    names: dict[str, int] = {}
    rules = data.get("rules")
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        name = rule.get("name") if isinstance(rule, dict) else None
        if not isinstance(name, str):
            continue
        path = ("rules", index, "name")
        if name in names:
            problems.append(
                (lines.get(path, 1), f"{_field_path(path)}: duplicate rule name {name!r}")
            )
        names.setdefault(name, index)
    tests = data.get("tests")
    for index, test in enumerate(tests if isinstance(tests, list) else []):
        if isinstance(test, dict):
            problems.extend(_check_test(test, ("tests", index), names, lines, base_dir))
    return problems


def _check_test(
    test: dict[Any, Any],
    path: YamlPath,
    rule_names: Mapping[str, int],
    lines: Mapping[YamlPath, int],
    base_dir: Path | None,
) -> list[Problem]:
    problems: list[Problem] = []

    def problem(where: YamlPath, message: str) -> None:
        problems.append((lines.get(where, lines.get(path, 1)), f"{_field_path(where)}: {message}"))

    expect = test.get("expect")
    if isinstance(expect, dict):
        rule = expect.get("rule")
        if isinstance(rule, str) and rule not in rule_names:
            problem((*path, "expect", "rule"), f"no rule named {rule!r} in this file")
        matched = expect.get("matched")
        for index, name in enumerate(matched if isinstance(matched, list) else []):
            if isinstance(name, str) and name not in rule_names:
                problem((*path, "expect", "matched", index), f"no rule named {name!r} in this file")
    message = test.get("message")
    if base_dir is not None and isinstance(message, dict) and isinstance(message.get("file"), str):
        file = base_dir / message["file"]
        if not file.is_file():
            problem((*path, "message", "file"), f"no such file: {file}")
    return problems


def _format(problems: list[Problem], filename: str) -> list[str]:
    ordered = sorted(dict.fromkeys(problems), key=lambda problem: problem[0])
    return [f"{filename}:{line}: {message}" for line, message in ordered]
