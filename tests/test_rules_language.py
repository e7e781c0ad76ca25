"""The rule language: every test and action, evaluation order, precise load errors, fuzzing."""

from __future__ import annotations

import io
import textwrap
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.policies.facts import MessageFacts
from mailgate.policies.rules import RuleError, RuleSet, load_rules, parse_rules, run_tests
from mailgate.policies.rules.matching import wildcard_to_regex
from mailgate.policies.rules.schema import schema_json
from mailgate.policies.verdict import HeaderChange, RuleMatch, Verdict

ROOT = Path(__file__).resolve().parent.parent
PE = b"MZ\x90\x00" + b"\x00" * 60 + b"PE\x00\x00"


def ruleset(*rules: dict[str, Any]) -> RuleSet:
    return parse_rules(yaml.safe_dump({"daemon": "content", "rules": list(rules)}), "t.yaml")


def reason(condition: Any, facts: MessageFacts) -> str | None:
    """Why ``condition`` holds for ``facts``, or None if it does not."""
    verdict = ruleset({"name": "r", "if": condition, "then": "accept"}).evaluate(facts)
    return verdict.matched[0].reason if verdict.matched else None


def message(text: str = "Subject: hello\n\nbody\n", **envelope: Any) -> MessageFacts:
    return MessageFacts.from_bytes(text.encode(), **envelope)


def with_attachments(*parts: tuple[bytes, str, str], text: str = "hi") -> MessageFacts:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Subject"] = "files"
    msg.set_content(text)
    for data, mime, filename in parts:
        maintype, subtype = mime.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return MessageFacts.from_bytes(msg.as_bytes())


def problems(text: str, filename: str = "bad.yaml") -> list[str]:
    with pytest.raises(RuleError) as info:
        parse_rules(textwrap.dedent(text), filename)
    return info.value.problems


# -- header ---------------------------------------------------------------------------------


def test_header_comparisons_and_reasons() -> None:
    facts = message("Subject: Buy VIAGRA now\nX-Score: 7.5 (hits)\n\n")
    assert reason({"header": {"name": "Subject", "contains": "viagra"}}, facts) == (
        "header Subject contains 'viagra'"
    )
    assert reason({"header": {"name": "subject", "is": "buy viagra now"}}, facts)
    assert reason({"header": {"name": "Subject", "is": "buy"}}, facts) is None
    assert reason({"header": {"name": "Subject", "matches": "buy*n?w"}}, facts) == (
        "header Subject matches 'buy*n?w'"
    )
    assert reason({"header": {"name": "Subject", "matches": "viagra*"}}, facts) is None
    assert reason({"header": {"name": "Subject", "regex": r"v[i1]agra"}}, facts)
    assert reason({"header": {"name": "X-Score", "over": 5}}, facts) == (
        "header X-Score 7.5 over 5"
    )
    assert reason({"header": {"name": "X-Score", "under": 5}}, facts) is None
    assert reason({"header": {"name": "Missing", "contains": ""}}, facts) is None


def test_header_case_sensitivity_lists_and_decoding() -> None:
    facts = message("Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nX-Tag: Alpha\n\n")
    assert reason({"header": {"name": "Subject", "is": "grüße"}}, facts)
    sensitive = {"name": "X-Tag", "contains": "alpha", "case_sensitive": True}
    assert reason({"header": sensitive}, facts) is None
    assert reason({"header": {**sensitive, "contains": "Alpha"}}, facts)
    assert (
        reason({"header": {"name": "X-Tag", "regex": "^alpha$", "case_sensitive": True}}, facts)
        is None
    )
    either = {"name": ["X-Other", "X-Tag"], "is": ["beta", "ALPHA"]}
    assert reason({"header": either}, facts) == "header X-Tag is 'ALPHA'"


def test_wildcards_follow_sieve() -> None:
    assert wildcard_to_regex("a*b?c") == "a.*b.c"
    facts = message("Subject: price: 5* (only)\n\n")
    assert reason({"header": {"name": "Subject", "matches": r"*5\* (only)"}}, facts)
    assert reason({"header": {"name": "Subject", "matches": r"*5\? (only)"}}, facts) is None
    assert reason({"header": {"name": "Subject", "matches": "[a]*"}}, message("Subject: [a]x\n\n"))


# -- address, envelope, size, exists ------------------------------------------------------


def test_address_parts() -> None:
    facts = message('From: "Alice A." <Alice@Example.COM>\nTo: b@x.example, c@y.example\n\n')
    assert reason({"address": {"name": "From", "part": "domain", "is": "example.com"}}, facts) == (
        "address From domain is 'example.com'"
    )
    assert reason({"address": {"name": "From", "part": "localpart", "is": "alice"}}, facts)
    assert reason({"address": {"name": "From", "is": "alice@example.com"}}, facts) == (
        "address From is 'alice@example.com'"
    )
    assert reason({"address": {"name": ["Cc", "To"], "part": "domain", "is": "y.example"}}, facts)
    assert reason({"address": {"name": "From", "contains": "Alice A."}}, facts) is None


def test_envelope() -> None:
    facts = message(mail_from="<bob@Example.com>", rcpt_tos=["x@a.example", "y@b.example"])
    cond = {"envelope": {"part": "domain", "from": {"is": "example.com"}}}
    assert reason(cond, facts) == "envelope from domain is 'example.com'"
    assert reason({"envelope": {"to": {"is": "y@b.example"}}}, facts) == (
        "envelope to is 'y@b.example'"
    )
    both = {
        "envelope": {"part": "domain", "from": {"is": "example.com"}, "to": {"is": "c.example"}}
    }
    assert reason(both, facts) is None
    null_sender = message(mail_from="")
    assert reason({"envelope": {"from": {"is": ""}}}, null_sender)
    assert reason({"envelope": {"part": "localpart", "to": {"is": "x"}}}, facts)


def test_size_with_units() -> None:
    facts = message("Subject: x\n\n" + "a" * 3000)
    assert reason({"size": {"over": "2K"}}, facts) == f"size {facts.size} over 2K"
    assert reason({"size": {"over": "1M"}}, facts) is None
    assert reason({"size": {"under": "0.5M", "over": 100}}, facts)
    assert reason({"size": {"is": facts.size}}, facts)


def test_exists() -> None:
    facts = message("From: a@b\nDate: today\n\n")
    assert reason({"exists": "From"}, facts) == "header From exists"
    assert reason({"exists": ["from", "date"]}, facts) == "headers from, date exist"
    assert reason({"exists": ["From", "Message-ID"]}, facts) is None


def test_combinators() -> None:
    facts = message("Subject: hi\nFrom: a@b.example\n\n")
    subject = {"header": {"name": "Subject", "is": "hi"}}
    other = {"header": {"name": "Subject", "is": "bye"}}
    assert reason({"allof": [subject, {"exists": "From"}]}, facts) == (
        "header Subject is 'hi' and header From exists"
    )
    assert reason({"allof": [subject, other]}, facts) is None
    assert reason({"anyof": [other, subject]}, facts) == "header Subject is 'hi'"
    assert reason({"not": other}, facts) == "not (header Subject is 'bye')"
    assert reason({"not": subject}, facts) is None
    assert reason(True, facts) == "always"
    assert reason(False, facts) is None
    nested = {"not": {"anyof": [other, {"not": subject}]}}
    assert reason(nested, facts) is not None


# -- facts: body, attachments, auth, client, daemons ----------------------------------------


def test_body_sees_decoded_text_and_html_without_markup() -> None:
    msg = EmailMessage()
    msg["Subject"] = "offer"
    msg.set_content("Grüße aus Köln\n", charset="utf-8", cte="base64")
    msg.add_alternative(
        "<html><head><style>.x{}</style></head><body><p>Buy&nbsp;<b>bitcoin</b></p>"
        "<script>var hidden = 'malware';</script></body></html>",
        subtype="html",
    )
    facts = MessageFacts.from_bytes(msg.as_bytes())
    assert reason({"body": {"contains": "köln"}}, facts) == "body contains 'köln'"
    assert reason({"body": {"contains": "buy bitcoin"}}, facts)
    assert reason({"body": {"contains": "<b>"}}, facts) is None
    assert reason({"body": {"contains": "malware"}}, facts) is None
    assert reason({"body": {"regex": r"^buy\s+bitcoin$"}}, facts)


def test_attachment_properties() -> None:
    facts = with_attachments(
        (PE, "application/octet-stream", "invoice.pdf.exe"),
        (b"%PDF-1.4\n" + b"x" * 2000, "application/pdf", "report.pdf"),
    )
    got = reason({"attachment": {"filename": {"matches": "*.exe"}}}, facts)
    assert got == "attachment 'invoice.pdf.exe' filename matches '*.exe'"
    assert reason({"attachment": {"sniffed": {"is": "application/x-dosexec"}}}, facts)
    assert reason(
        {"attachment": {"type": {"is": "application/pdf"}, "size": {"over": "1K"}}}, facts
    )
    # All properties must hold for the same attachment.
    same = {"filename": {"matches": "*.exe"}, "type": {"is": "application/pdf"}}
    assert reason({"attachment": same}, facts) is None
    assert reason({"attachment": {"count": {"is": 2}}}, facts) == "2 attachments, count is 2"
    assert (
        reason({"attachment": {"filename": {"matches": "*.pdf"}, "count": {"over": 1}}}, facts)
        is None
    )
    assert reason({"attachment": {}}, facts) == "attachment 'invoice.pdf.exe'"
    assert reason({"attachment": {"count": {"is": 0}}}, message()) == "0 attachments, count is 0"


def test_attachment_archives() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a/b/run.exe", PE)
    facts = with_attachments((buffer.getvalue(), "application/zip", "files.zip"))
    assert reason({"attachment": {"member": {"matches": "*.exe"}}}, facts) == (
        "attachment 'files.zip' member 'a/b/run.exe' matches '*.exe'"
    )
    assert reason({"attachment": {"encrypted": False}}, facts)
    assert reason({"attachment": {"encrypted": True}}, facts) is None


def test_auth() -> None:
    anonymous = message()
    alice = message(auth_user="alice@example.com")
    assert reason({"auth": True}, alice) == "authenticated as 'alice@example.com'"
    assert reason({"auth": True}, anonymous) is None
    assert reason({"auth": False}, anonymous) == "not authenticated"
    assert reason({"auth": {"user": {"matches": "*@example.com"}}}, alice) == (
        "auth user matches '*@example.com'"
    )
    assert reason({"auth": {"user": {"matches": "*"}}}, anonymous) is None


@pytest.mark.parametrize(
    ("client_ip", "networks", "expected"),
    [
        ("192.0.2.7", ["10.0.0.0/8", "192.0.2.0/24"], "client IP 192.0.2.7 in 192.0.2.0/24"),
        ("[192.0.2.7]", "192.0.2.7", "client IP 192.0.2.7 in 192.0.2.7/32"),
        ("::ffff:192.0.2.7", "192.0.2.0/24", "client IP 192.0.2.7 in 192.0.2.0/24"),
        ("IPv6:2001:db8::1", "2001:db8::/32", "client IP 2001:db8::1 in 2001:db8::/32"),
        ("198.51.100.1", "192.0.2.0/24", None),
        ("", "0.0.0.0/0", None),
        ("not-an-ip", "0.0.0.0/0", None),
    ],
)
def test_client_ip(client_ip: str, networks: Any, expected: str | None) -> None:
    assert reason({"client_ip": networks}, message(client_ip=client_ip)) == expected


def test_daemon_facts() -> None:
    facts = message(
        extra={
            "spf": "softfail",
            "spam_score": 7.5,
            "dnsbl": ["zen.spamhaus.example", "bl.example"],
            "dkim": {"example.com": "pass"},
            "virus": None,
            "tls": True,
        }
    )
    assert reason({"fact": {"name": "spf", "is": ["fail", "softfail"]}}, facts) == (
        "spf is 'softfail'"
    )
    assert reason({"fact": {"name": "spam_score", "over": 5}}, facts) == "spam_score 7.5 over 5"
    assert reason({"fact": {"name": "spam_score", "under": 5}}, facts) is None
    assert reason({"fact": {"name": "dnsbl", "matches": "zen.*"}}, facts)
    assert reason({"fact": {"name": "dnsbl"}}, facts) == (
        "dnsbl present ('zen.spamhaus.example', 'bl.example')"
    )
    assert reason({"fact": {"name": "dkim", "is": "example.com"}}, facts)
    assert reason({"fact": {"name": "virus"}}, facts) is None
    assert reason({"fact": {"name": "absent"}}, facts) is None
    assert reason({"fact": {"name": "tls", "is": True}}, facts) == "tls is 'true'"


def test_mime_error_is_a_fact() -> None:
    broken = message('Content-Type: multipart/mixed; boundary="b"\n\n--b\n\nunterminated\n')
    assert reason({"fact": {"name": "mime_error"}}, broken) is not None
    assert reason({"fact": {"name": "mime_error"}}, message()) is None


# -- actions ------------------------------------------------------------------------------


def verdict_of(then: Any, facts: MessageFacts | None = None) -> Verdict:
    return ruleset({"name": "r", "then": then}).evaluate(facts or message())


def test_final_actions() -> None:
    assert verdict_of("accept").action == "accept"
    assert verdict_of("discard").action == "discard"
    rejected = verdict_of("reject")
    assert (rejected.action, rejected.reply()) == ("reject", (550, "5.7.1", "Command rejected"))
    custom = verdict_of({"reject": {"code": 554, "enhanced": "5.7.0", "text": "go away"}})
    assert (custom.code, custom.enhanced, custom.text) == (554, "5.7.0", "go away")
    assert verdict_of({"reject": "no thanks"}).reply() == (550, "5.7.1", "no thanks")
    temp = verdict_of({"tempfail": {"code": 450, "enhanced": "4.2.0"}})
    assert (temp.action, temp.reply()) == (
        "tempfail",
        (450, "4.2.0", "Service unavailable - try again later"),
    )
    assert verdict_of({"quarantine": "looks bad"}).quarantine_reason == "looks bad"
    assert verdict_of("quarantine").quarantine_reason == "rule r"
    assert verdict_of("continue").action == "continue"


def test_header_actions() -> None:
    verdict = verdict_of(
        [
            {"add_header": {"name": "X-A", "value": "1"}},
            {"add_header": {"name": "X-B", "value": "2", "index": 0}},
            {"change_header": {"name": "X-C", "value": "", "index": 2}},
        ]
    )
    assert verdict.header_changes == [
        HeaderChange("add", "X-A", "1"),
        HeaderChange("insert", "X-B", "2", 0),
        HeaderChange("change", "X-C", "", 2),
    ]
    assert verdict.action == "continue"


def test_tag_subject_is_idempotent() -> None:
    tag = {"tag_subject": "[SPAM]"}
    assert verdict_of(tag, message("Subject: hi\n\n")).header_changes == [
        HeaderChange("change", "Subject", "[SPAM] hi", 1)
    ]
    assert verdict_of(tag, message("Subject: [SPAM] hi\n\n")).header_changes == []
    assert verdict_of([tag, tag]).header_changes == [
        HeaderChange("change", "Subject", "[SPAM] hello", 1)
    ]
    assert verdict_of(tag, message("From: a@b\n\n")).header_changes == [
        HeaderChange("add", "Subject", "[SPAM]")
    ]
    encoded = message("Subject: =?utf-8?q?=5BSPAM=5D_hi?=\n\n")
    assert verdict_of(tag, encoded).header_changes == []


def test_recipient_actions() -> None:
    facts = message(rcpt_tos=["a@x.example", "b@x.example"])
    added = verdict_of({"add_recipient": ["c@x.example", "A@x.example"]}, facts)
    assert (added.add_recipients, added.remove_recipients) == (["c@x.example"], [])
    redirected = verdict_of(
        [{"redirect": "<abuse@x.example>"}, {"add_recipient": "b@x.example"}], facts
    )
    assert redirected.add_recipients == ["abuse@x.example"]
    assert redirected.remove_recipients == ["a@x.example"]


# -- evaluation ---------------------------------------------------------------------------


def test_order_continue_and_accumulation() -> None:
    rules = ruleset(
        {"name": "disabled", "enabled": False, "then": "reject"},
        {"name": "tag", "then": [{"add_header": {"name": "X-1", "value": "a"}}, "continue"]},
        {"name": "implicit", "then": {"add_header": {"name": "X-2", "value": "b"}}},
        {"name": "no", "if": False, "then": "discard"},
        {"name": "decide", "then": [{"add_header": {"name": "X-3", "value": "c"}}, "quarantine"]},
        {"name": "never", "then": "reject"},
    )
    verdict = rules.evaluate(message())
    assert verdict.action == "quarantine"
    assert [m.rule for m in verdict.matched] == ["tag", "implicit", "decide"]
    assert [c.name for c in verdict.header_changes] == ["X-1", "X-2", "X-3"]
    assert verdict.matched[0] == RuleMatch("tag", "always")


def test_no_match_is_continue() -> None:
    rules = ruleset({"name": "r", "if": {"exists": "X-Nope"}, "then": "reject"})
    assert rules.evaluate(message()) == Verdict()


def test_content_facts_only_computed_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(facts: MessageFacts) -> None:
        raise AssertionError("content analysed although no rule needs it")

    monkeypatch.setattr("mailgate.policies.rules.conditions.content_facts", boom)
    ruleset({"name": "r", "if": {"exists": "Subject"}, "then": "accept"}).evaluate(message())


# -- load errors: file:line: field: message ----------------------------------------------------


BAD_FILES: list[tuple[str, list[str]]] = [
    (
        """\
        daemon: contnt
        rules: []
        """,
        [
            "bad.yaml:1: daemon: unknown daemon 'contnt' (known: content, spf, dkim, dmarc, "
            "arc, dnsbl, greylist, clamav, spamassassin, quota, ratelimit)"
        ],
    ),
    (
        """\
        daemon: content
        rules:
          - name: a
            if:
              header: {name: Subject, contain: x}
            then: accept
        """,
        [
            "bad.yaml:5: rules[0].if.header.contain: unknown key 'contain' "
            "(did you mean 'contains'?)"
        ],
    ),
    (
        """\
        daemon: content
        rules:
          - name: a
            if:
              anyof:
                - header: {name: Subject, regex: "(unclosed"}
            then: accept
        """,
        [
            "bad.yaml:6: rules[0].if.anyof[0].header.regex: bad regex '(unclosed': "
            "missing ), unterminated subpattern at position 0"
        ],
    ),
    (
        """\
        daemon: content
        rules:
          - name: a
            then:
              - reject: {code: 450, enhanced: 4.7.1}
              - tempfail: {code: 550}
        """,
        [
            "bad.yaml:5: rules[0].then[0].reject.code: reject needs a 5xx reply code, got 450",
            "bad.yaml:5: rules[0].then[0].reject.enhanced: reject needs a 5.x.x enhanced code, "
            "got '4.7.1'",
            "bad.yaml:6: rules[0].then[1].tempfail.code: tempfail needs a 4xx reply code, got 550",
        ],
    ),
    (
        """\
        daemon: content
        rules:
          - name: a
            then: [accept, discard]
          - name: a
            then: [reject, continue]
        """,
        [
            "bad.yaml:4: rules[0].then: more than one final action: accept, discard",
            "bad.yaml:5: rules[1].name: duplicate rule name 'a'",
            "bad.yaml:6: rules[1].then: continue contradicts the final action reject",
        ],
    ),
    (
        """\
        daemon: content
        rules:
          - name: a
            if: {header: {name: Subject, is: x}, size: {over: 1K}}
            then: acept
          - if: "yes please"
            then:
        """,
        [
            "bad.yaml:4: rules[0].if: one test per condition, got header, size "
            "(combine them with allof)",
            "bad.yaml:5: rules[0].then: 'acept' is not one of 'accept', 'reject', "
            "'tempfail', 'discard', 'quarantine' or 'continue' (did you mean 'accept'?)",
            "bad.yaml:6: rules[1].name: required",
            "bad.yaml:6: rules[1].if: expected a test such as {header: {...}}, or true or false",
            "bad.yaml:7: rules[1].then: must not be empty (null); leave the key out instead",
        ],
    ),
    (
        """\
        daemon: content
        rules:
          - name: a
            if:
              allof:
                - size: {over: 10Q}
                - client_ip: [10.0.0.0/8, 300.1.1.1]
                - header: {name: X-Bad, contains: x, matches: y}
            then: {add_header: {name: X-A, value: "a\\nb"}}
        """,
        [
            "bad.yaml:6: rules[0].if.allof[0].size.over: expected a number such as 5, 7.5, "
            "100K or 1M, got '10Q'",
            "bad.yaml:7: rules[0].if.allof[1].client_ip[1]: '300.1.1.1' is not an IP address "
            "or network (e.g. 192.0.2.0/24)",
            "bad.yaml:8: rules[0].if.allof[2].header: use one comparison, not contains, matches "
            "(combine tests with allof)",
            "bad.yaml:9: rules[0].then.add_header.value: must be a single line without "
            "control characters",
        ],
    ),
    (
        """\
        daemon: content
        daemon: spf
        rules:
          - name: a
            then: {redirect: "not an address"}
        tests:
          - name: t
            message: {file: missing.eml}
            expect: {action: accept, rule: nope}
        """,
        [
            "bad.yaml:2: daemon: duplicate key 'daemon'",
            "bad.yaml:5: rules[0].then.redirect: 'not an address' is not a mail address "
            "(local@domain)",
            "bad.yaml:8: tests[0].message.file: no such file: missing.eml",
            "bad.yaml:9: tests[0].expect.rule: no rule named 'nope' in this file",
        ],
    ),
    (
        "daemon: [content\n",
        ["bad.yaml:2: invalid YAML: expected ',' or ']', but got '<stream end>'"],
    ),
    ("- a list\n", ["bad.yaml:1: the top level must be a mapping (daemon, rules, tests)"]),
    ("", ["bad.yaml:1: daemon: required"]),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_load_errors_name_file_line_and_field(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="cannot read"):
        load_rules(tmp_path / "absent.yaml")


def test_committed_schema_is_generated() -> None:
    assert (ROOT / "rules" / "schema.json").read_text(encoding="utf-8") == schema_json(), (
        "rules/schema.json is stale: run `mailgate rules schema > rules/schema.json`"
    )


# -- test cases ---------------------------------------------------------------------------


def test_run_tests_reports_diffs(tmp_path: Path) -> None:
    (tmp_path / "m.eml").write_text("Subject: cheap pills\n\nbuy\n")
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(
            """\
            daemon: content
            rules:
              - name: pills
                if: {header: {name: Subject, contains: pills}}
                then: {reject: {text: no pills}}
            tests:
              - name: passes
                message: {file: m.eml}
                expect: {action: reject, rule: pills, text: no pills, reason: "contains 'pills'"}
              - name: fails
                message: {raw: "Subject: hello\\n\\nhi"}
                envelope: {from: a@b.example, to: [c@d.example], client_ip: 192.0.2.1}
                expect: {action: reject, matched: [pills]}
            """
        )
    )
    rules = load_rules(tmp_path / "r.yaml")
    results = run_tests(rules)
    assert [(r.name, r.passed) for r in results] == [("passes", True), ("fails", False)]
    assert results[1].diff == (
        '- action: "reject"',
        '+ action: "continue"',
        '- matched: ["pills"]',
        "+ matched: []",
    )
    assert results[1].reason == 'expected action: "reject", got action: "continue"'
    (tmp_path / "m.eml").unlink()
    gone = run_tests(rules)[0]
    assert not gone.passed and gone.error is not None and "cannot read message" in gone.error


# -- robustness ------------------------------------------------------------------------------

EVERYTHING = ruleset(
    {
        "name": "h",
        "if": {"header": {"name": ["Subject", "X-A"], "regex": "a+b"}},
        "then": "continue",
    },
    {"name": "n", "if": {"header": {"name": "X-A", "over": 3}}, "then": "continue"},
    {
        "name": "a",
        "if": {"address": {"name": ["From", "To"], "part": "domain", "matches": "*.x"}},
        "then": {"tag_subject": "[T]"},
    },
    {
        "name": "e",
        "if": {"envelope": {"part": "localpart", "from": {"contains": "a"}, "to": {"is": "b"}}},
        "then": {"redirect": "z@z.example"},
    },
    {"name": "s", "if": {"size": {"over": 10}}, "then": {"add_recipient": "y@y.example"}},
    {
        "name": "x",
        "if": {"exists": ["From", "Date"]},
        "then": {"change_header": {"name": "Subject", "value": ""}},
    },
    {"name": "b", "if": {"body": {"contains": "q"}}, "then": "continue"},
    {
        "name": "t",
        "if": {"attachment": {"filename": {"matches": "*.exe"}, "count": {"under": 2}}},
        "then": "continue",
    },
    {"name": "u", "if": {"auth": {"user": {"is": "u"}}}, "then": "continue"},
    {"name": "c", "if": {"client_ip": ["10.0.0.0/8", "::/0"]}, "then": "continue"},
    {
        "name": "f",
        "if": {"anyof": [{"fact": {"name": "k"}}, {"fact": {"name": "k", "under": 1}}]},
        "then": "continue",
    },
    {"name": "m", "if": {"not": {"fact": {"name": "mime_error"}}}, "then": "accept"},
)

header_names = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=12,
)
values = st.text(max_size=40)
fact_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    values,
    st.lists(values, max_size=3),
    st.dictionaries(values, values, max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(["Subject", "From", "To", "X-A", "Content-Type", "Date"])
            | header_names,
            values,
        ),
        max_size=8,
    ),
    body=st.binary(max_size=300),
    mail_from=values,
    rcpt_tos=st.lists(values, max_size=3),
    client_ip=values | st.ip_addresses().map(str),
    auth_user=st.none() | values,
    extra=st.dictionaries(
        st.sampled_from(["k", "mime_error", "spam_score"]), fact_values, max_size=3
    ),
)
def test_random_facts_never_crash_evaluation(
    headers: list[tuple[str, str]],
    body: bytes,
    mail_from: str,
    rcpt_tos: list[str],
    client_ip: str,
    auth_user: str | None,
    extra: dict[str, Any],
) -> None:
    facts = MessageFacts(
        client_ip=client_ip,
        auth_user=auth_user,
        mail_from=mail_from,
        rcpt_tos=rcpt_tos,
        headers=headers,
        body=body,
        extra=extra,
    )
    verdict = EVERYTHING.evaluate(facts)
    assert verdict.action in ("continue", "accept")


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=600))
def test_random_bytes_never_crash_evaluation(raw: bytes) -> None:
    EVERYTHING.evaluate(
        MessageFacts.from_bytes(b"Content-Type: multipart/mixed; boundary=b\n" + raw)
    )
