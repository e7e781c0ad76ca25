"""`mailgate rules check|test|explain|schema` as an operator runs them, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.core.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"

GOOD = """\
daemon: content
rules:
  - name: pills
    if: {header: {name: Subject, contains: pills}}
    then: {reject: {code: 554, enhanced: 5.7.1, text: no pills}}
tests:
  - name: pills are rejected
    message: {raw: "Subject: cheap pills\\n\\nbuy"}
    expect: {action: reject, rule: pills, code: 554}
"""

FAILING = """\
daemon: content
rules:
  - name: pills
    if: {header: {name: Subject, contains: pills}}
    then: reject
tests:
  - name: expects the wrong thing
    message: {raw: "Subject: cheap pills\\n\\nbuy"}
    expect: {action: accept}
"""

BAD = """\
daemon: content
rules:
  - name: pills
    if: {header: {name: Subject, contians: pills}}
    then: {reject: {code: 450}}
"""


def _rules_command() -> list[str]:
    # `mailgate rules ...` once core/cli.py registers the family; until then the very same
    # register() behind a standalone parser.
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    if "rules" in (commands.choices or {}):
        return [sys.executable, "-m", "mailgate.core.cli", "rules"]
    return [sys.executable, "-m", "mailgate.core.rules_cli", "rules"]


def mailgate_rules(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_rules_command(), *map(str, args)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, text in (("good", GOOD), ("failing", FAILING), ("bad", BAD)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


def test_check_good_files(files: dict[str, Path]) -> None:
    result = mailgate_rules("check", files["good"], RULES / "content.yaml")
    assert result.returncode == 0, result.stderr
    assert f"{files['good']}: OK (content, 1 rule, 1 test)" in result.stdout


def test_check_bad_file_prints_every_problem(files: dict[str, Path]) -> None:
    result = mailgate_rules("check", files["good"], files["bad"])
    assert result.returncode == 1
    bad = files["bad"]
    assert result.stderr.splitlines() == [
        f"{bad}:4: rules[0].if.header.contians: unknown key 'contians' (did you mean 'contains'?)",
        f"{bad}:5: rules[0].then.reject.code: reject needs a 5xx reply code, got 450",
        "1 file with problems",
    ]
    assert "OK" in result.stdout


def test_test_passing_and_failing(files: dict[str, Path]) -> None:
    passing = mailgate_rules("test", files["good"])
    assert passing.returncode == 0
    assert passing.stdout.splitlines() == [
        f"PASS {files['good']}: pills are rejected",
        "1 passed, 0 failed",
    ]
    failing = mailgate_rules("test", files["good"], files["failing"])
    assert failing.returncode == 1
    assert failing.stdout.splitlines() == [
        f"PASS {files['good']}: pills are rejected",
        f'FAIL {files["failing"]}: expects the wrong thing: expected action: "accept", '
        'got action: "reject"',
        '    - action: "accept"',
        '    + action: "reject"',
        "    matched pills: header Subject contains 'pills'",
        "1 passed, 1 failed",
    ]


def test_test_on_an_invalid_file_fails(files: dict[str, Path]) -> None:
    result = mailgate_rules("test", files["bad"])
    assert result.returncode == 1
    assert "unknown key 'contians'" in result.stderr


def test_shipped_content_rules_pass_their_own_tests() -> None:
    result = mailgate_rules("test", RULES / "content.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert result.stdout.splitlines()[-1].endswith("passed, 0 failed")


def test_explain(tmp_path: Path) -> None:
    result = mailgate_rules(
        "explain",
        RULES / "tests" / "encrypted-zip.eml",
        "--rules",
        RULES / "content.yaml",
        "--from",
        "billing@supplier.example",
        "--to",
        "alice@example.com",
        "--fact",
        "spam_score=9.5",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("content (") and lines[0].endswith("content.yaml):")
    assert lines[1:] == [
        "  action: continue",
        "  matched encrypted-archives: attachment 'statement.zip' encrypted",
        "  header add: X-Mailgate-Encrypted-Archive: yes",
        "final: accept",
    ]


def test_explain_runs_the_configured_chain(tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        "daemon: content\nrules:\n  - name: no-zip\n"
        "    if: {attachment: {filename: {matches: '*.zip'}}}\n"
        "    then: {reject: {code: 550, enhanced: 5.7.1, text: no archives}}\n"
    )
    config = tmp_path / "mailgate.yaml"
    config.write_text(
        "milters:\n"
        "  - {name: shipped, daemon: content}\n"
        "  - {name: dkim, socket: 'inet:8891@127.0.0.1'}\n"
        f"  - {{name: strict, daemon: content, rules: {strict}}}\n"
    )
    result = mailgate_rules("explain", RULES / "tests" / "encrypted-zip.eml", "--config", config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("shipped (") and "content.yaml" in lines[0]
    assert "dkim: external milter, not evaluated offline" in lines
    assert f"strict ({strict}):" in lines
    assert "  matched no-zip: attachment 'statement.zip' filename matches '*.zip'" in lines
    assert lines[-1] == "final: reject 550 5.7.1 no archives"


def test_schema_matches_the_committed_file() -> None:
    result = mailgate_rules("schema")
    assert result.returncode == 0
    assert result.stdout == (RULES / "schema.json").read_text(encoding="utf-8")


def test_every_shipped_rule_file_is_valid() -> None:
    shipped = sorted(RULES.glob("*.yaml"))
    assert shipped, "rules/ has no rule files"
    result = mailgate_rules("check", *shipped)
    assert result.returncode == 0, result.stderr


def test_usage_errors() -> None:
    result = mailgate_rules("check")
    assert result.returncode == 2
    assert "FILE" in result.stderr
