"""Compiled comparisons: Sieve's :is, :contains, :matches and :regex, and numeric over/under.

A Matcher is built once from a MatchSpec at load time (wildcards and regexes compiled), then
asked about values many times. Every answer that is "yes" comes back as the human-readable
reason fragment (``contains 'viagra'``) that ends up in Verdict.matched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mailgate.policies.rules.schema import MatchSpec, NumberSpec
from mailgate.policies.rules.values import Quantity

_LEADING_NUMBER = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))")
_QUOTE_LIMIT = 60


def quote(value: str) -> str:
    """A value as shown in reasons: single-quoted, shortened, one line."""
    text = value if len(value) <= _QUOTE_LIMIT else value[: _QUOTE_LIMIT - 3] + "..."
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return "'" + text.replace("'", "\\'") + "'"


def wildcard_to_regex(pattern: str) -> str:
    """Sieve :matches (RFC 5228 2.7.1): ``*`` any run, ``?`` one character, ``\\`` escapes."""
    out: list[str] = []
    chars = iter(pattern)
    for char in chars:
        if char == "\\":
            out.append(re.escape(next(chars, "\\")))
        elif char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        else:
            out.append(re.escape(char))
    return "".join(out)


def leading_number(value: str) -> float | None:
    """The number a header or fact value starts with ("7.5 (hits)" -> 7.5), if any."""
    match = _LEADING_NUMBER.match(value)
    return float(match.group(1)) if match else None


def _number_text(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _range(over: Quantity | None, under: Quantity | None, value: float) -> bool:
    return (over is None or value > over.value) and (under is None or value < under.value)


def _range_text(over: Quantity | None, under: Quantity | None) -> str:
    parts = []
    if over is not None:
        parts.append(f"over {over.text}")
    if under is not None:
        parts.append(f"under {under.text}")
    return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class Matcher:
    """One comparison against string values (numbers for over/under are read from them)."""

    kind: str  # "is" | "contains" | "matches" | "regex" | "range" | "present"
    keys: tuple[str, ...]  # as written, for reasons
    probes: tuple[str, ...]  # casefolded unless case-sensitive, for is/contains
    patterns: tuple[re.Pattern[str], ...]  # for matches/regex
    over: Quantity | None = None
    under: Quantity | None = None
    case_sensitive: bool = False

    @classmethod
    def compile(cls, spec: MatchSpec) -> Matcher:
        flags = 0 if spec.case_sensitive else re.IGNORECASE
        texts = {"is": spec.is_, "contains": spec.contains, "matches": spec.matches}
        texts["regex"] = spec.regex
        for kind, given in texts.items():
            if given is None:
                continue
            keys = tuple(given)
            probes = keys if spec.case_sensitive else tuple(k.casefold() for k in keys)
            patterns: tuple[re.Pattern[str], ...] = ()
            if kind == "matches":
                patterns = tuple(re.compile(wildcard_to_regex(k), flags | re.DOTALL) for k in keys)
            elif kind == "regex":
                patterns = tuple(re.compile(k, flags) for k in keys)
            return cls(kind, keys, probes, patterns, case_sensitive=spec.case_sensitive)
        kind = "range" if spec.over is not None or spec.under is not None else "present"
        return cls(kind, (), (), (), spec.over, spec.under, spec.case_sensitive)

    def match(self, value: str) -> str | None:
        """The reason fragment if ``value`` matches, else None."""
        if self.kind == "present":
            return "present"
        if self.kind == "range":
            number = leading_number(value)
            if number is None or not _range(self.over, self.under, number):
                return None
            return f"{_number_text(number)} {_range_text(self.over, self.under)}"
        if self.patterns:
            for key, pattern in zip(self.keys, self.patterns, strict=True):
                found = (
                    pattern.fullmatch(value) if self.kind == "matches" else pattern.search(value)
                )
                if found:
                    return f"{self.kind} {quote(key)}"
            return None
        subject = value if self.case_sensitive else value.casefold()
        for key, probe in zip(self.keys, self.probes, strict=True):
            if (subject == probe) if self.kind == "is" else (probe in subject):
                return f"{self.kind} {quote(key)}"
        return None

    def match_any(self, values: Iterable[str]) -> tuple[str, str] | None:
        """The first (value, reason fragment) that matches, else None."""
        for value in values:
            reason = self.match(value)
            if reason is not None:
                return value, reason
        return None

    def describe(self) -> str:
        if self.kind == "present":
            return "present"
        if self.kind == "range":
            return _range_text(self.over, self.under)
        keys = ", ".join(quote(key) for key in self.keys)
        text = f"{self.kind} {keys}" if len(self.keys) == 1 else f"{self.kind} any of {keys}"
        return text + (" (case-sensitive)" if self.case_sensitive else "")


@dataclass(frozen=True, slots=True)
class NumberMatcher:
    """A numeric comparison (sizes, counts) from a NumberSpec."""

    equal: Quantity | None
    over: Quantity | None
    under: Quantity | None

    @classmethod
    def compile(cls, spec: NumberSpec) -> NumberMatcher:
        return cls(spec.is_, spec.over, spec.under)

    def match(self, value: float) -> str | None:
        if self.equal is not None:
            return f"is {self.equal.text}" if value == self.equal.value else None
        if _range(self.over, self.under, value):
            return _range_text(self.over, self.under)
        return None

    def describe(self) -> str:
        if self.equal is not None:
            return f"is {self.equal.text}"
        return _range_text(self.over, self.under)
