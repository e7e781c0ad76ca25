"""The dmarc daemon: pure parts, then the daemon against a loopback DNS server, Postfix, the core.

The test zone gives every DMARC outcome: an SPF-aligned pass (strict and relaxed), a
DKIM-aligned pass with a key generated here and a signature made with dkimpy, fails under
p=reject / p=quarantine / p=none, a subdomain under sp=, a non-existent subdomain under
np=, pct=0, a SERVFAIL (temperror), no record, and broken records. The daemon runs the
shipped rules (rules/dmarc.yaml) with only its settings pointed at the test server.
"""

from __future__ import annotations

import base64
import random
import re
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import authres
import dkim
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsserver import dns_server

from mailgate.policies.dmarc import (
    Discovery,
    DkimItem,
    RecordError,
    Settings,
    aligned,
    authentication_results,
    discover,
    evaluate,
    from_domain,
    parse_record,
    sample,
    select_policy,
)
from mailgate.policies.psl import organizational_domain
from mailgate.policies.spf import DnsFailure, SpfResult

from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway
from daemon_milter_client import run_message
from daemon_process import REPO, Daemon
from smtpwire import Wire

SERVER_ID = "mx.dmarc.test"

# -- pure parts -----------------------------------------------------------------------------


def test_record_parsing() -> None:
    record = parse_record(
        "v=DMARC1; p=reject; sp=quarantine; np=reject; pct=50; adkim=s; aspf=r; "
        "rua=mailto:a@example.com!10m, mailto:b@example.net; ruf=mailto:f@example.com; "
        "fo=1:d; rf=afrf; ri=3600; future=yes"
    )
    assert (record.p, record.sp, record.np, record.pct) == ("reject", "quarantine", "reject", 50)
    assert (record.adkim, record.aspf, record.fo, record.ri) == ("s", "r", "1:d", 3600)
    assert [(u.mailto, u.max_size) for u in record.rua] == [
        ("a@example.com", 10 * 1024 * 1024),
        ("b@example.net", 0),
    ]
    assert record.ruf[0].mailto == "f@example.com"
    assert record.problems == ("unknown tag future; ignored",)
    # Defaults, case and spacing.
    plain = parse_record("v = DMARC1 ;P=Quarantine")
    assert (plain.p, plain.sp, plain.np, plain.pct, plain.adkim, plain.aspf) == (
        "quarantine",
        None,
        None,
        100,
        "r",
        "r",
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        ("v=DMARC2; p=reject", "does not begin with v=DMARC1"),
        ("p=reject; v=DMARC1", "does not begin with v=DMARC1"),
        ("v=spf1 -all", "does not begin with v=DMARC1"),
        ("v=DMARC1", "no p= tag and no valid rua"),
        ("v=DMARC1; p=block", "invalid p='block' and no valid rua"),
        ("v=DMARC1; p=reject; sp=nah", "invalid sp='nah' and no valid rua"),
    ],
)
def test_unusable_records(text: str, problem: str) -> None:
    with pytest.raises(RecordError, match=re.escape(problem)):
        parse_record(text)


def test_broken_records_with_a_rua_become_p_none_and_bad_tags_their_defaults() -> None:
    # RFC 7489 6.6.3: no valid p but a valid rua → as if p=none.
    record = parse_record("v=DMARC1; p=maybe; rua=mailto:r@example.com")
    assert record.p == "none"
    assert "treated as p=none" in record.problems[0]
    bad = parse_record("v=DMARC1; p=reject; pct=150; adkim=x; aspf=; fo=9; ri=-1; rua=nope; np=x")
    assert (bad.pct, bad.adkim, bad.aspf, bad.fo, bad.ri, bad.rua, bad.np) == (
        100,
        "r",
        "r",
        "0",
        86400,
        (),
        None,
    )
    assert len(bad.problems) == 7, bad.problems


def test_organizational_domains_from_the_shipped_list() -> None:
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.example.com.") == "example.com"
    assert organizational_domain("EXAMPLE.COM") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"  # a public suffix is its own
    assert organizational_domain("x.y.example.test") == "example.test"  # the * rule
    assert organizational_domain("foo.bar.blogspot.com") == "bar.blogspot.com"  # private part


def test_alignment_relaxed_and_strict() -> None:
    assert aligned("mail.example.co.uk", "news.example.co.uk", "r")
    assert not aligned("mail.example.co.uk", "news.example.co.uk", "s")
    assert aligned("Example.COM.", "example.com", "s")
    assert not aligned("example.co.uk", "other.co.uk", "r")  # the suffix is not enough
    assert not aligned("a.blogspot.com", "b.blogspot.com", "r")  # private registrations
    assert not aligned("", "example.com", "r")


def test_from_domain_per_rfc_7489_6_6_1() -> None:
    assert from_domain([("From", "Bob <bob@Example.COM>")]) == ("example.com", "")
    assert from_domain([("From", "a@example.com, b@example.com")]) == ("example.com", "")
    assert from_domain([("Subject", "x")])[1] == "the message has no From field"
    assert from_domain([("From", "a@x.example"), ("From", "b@x.example")])[1] == (
        "the message has 2 From fields"
    )
    assert "different domains" in from_domain([("From", "a@x.example, b@y.example")])[1]
    assert "no address" in from_domain([("From", "undisclosed-recipients:;")])[1]
    # A local name: no policy can exist for it, which discovery says (not a permerror).
    assert from_domain([("From", "root@localhost")]) == ("localhost", "")


def test_policy_selection_and_pct_sampling() -> None:
    record = parse_record("v=DMARC1; p=reject; sp=quarantine; np=none")
    asked: list[str] = []

    def exists() -> bool:
        asked.append("x")
        return False

    assert select_policy(record, "example.com", "example.com", exists) == "reject"
    assert asked == []  # the domain's own policy needs no existence check
    assert select_policy(record, "ghost.example.com", "example.com", exists) == "none"
    assert select_policy(record, "sub.example.com", "example.com", lambda: True) == "quarantine"
    no_np = parse_record("v=DMARC1; p=reject; sp=quarantine")
    assert select_policy(no_np, "ghost.example.com", "example.com", exists) == "quarantine"
    assert len(asked) == 1  # without np= nothing to ask
    only_p = parse_record("v=DMARC1; p=reject")
    assert select_policy(only_p, "sub.example.com", "example.com", lambda: True) == "reject"
    # pct (6.6.4): not sampled → the next lower policy.
    seeded = random.Random(7)
    outcomes = [sample("reject", 30, seeded.random) for _ in range(1000)]
    applied = sum(1 for policy, out in outcomes if policy == "reject" and not out)
    assert 230 < applied < 370
    assert {p for p, out in outcomes if out} == {"quarantine"}
    assert sample("quarantine", 0, lambda: 0.0) == ("none", True)
    assert sample("reject", 0, lambda: 0.0) == ("quarantine", True)
    assert sample("reject", 100, lambda: 0.999) == ("reject", False)
    assert sample("none", 0, lambda: 0.5) == ("none", False)
    assert sample("reject", 50, lambda: 0.49) == ("reject", False)
    assert sample("reject", 50, lambda: 0.5) == ("quarantine", True)


def spf_result(result: str, domain: str, identity: str = "mailfrom") -> SpfResult:
    return SpfResult(
        identity=identity,  # type: ignore[arg-type]
        result=result,  # type: ignore[arg-type]
        domain=domain,
        sender=f"bob@{domain}",
        mail_from=f"bob@{domain}" if identity == "mailfrom" else "",
        helo=domain if identity == "helo" else "client.example",
        client_ip="192.0.2.1",
        reason=f"{result} for {domain}",
        explanation="",
    )


def found(text: str, domain: str = "example.com") -> Discovery:
    return Discovery("found", parse_record(text), domain, organizational_domain(domain))


def test_evaluation_outcomes() -> None:
    reject = found("v=DMARC1; p=reject")
    spf_pass = spf_result("pass", "bounce.example.com")
    passed = evaluate(reject, "example.com", spf_pass, [])
    assert (passed.result, passed.policy, passed.spf_aligned, passed.dkim_aligned) == (
        "pass",
        "none",
        True,
        False,
    )
    strict = evaluate(found("v=DMARC1; p=reject; aspf=s"), "example.com", spf_pass, [])
    assert (strict.result, strict.policy) == ("fail", "reject")
    dkim_pass = evaluate(
        found("v=DMARC1; p=reject; adkim=s"),
        "example.com",
        spf_result("fail", "other.example"),
        [DkimItem("pass", "other.example"), DkimItem("pass", "example.com")],
    )
    assert (dkim_pass.result, dkim_pass.dkim_aligned, dkim_pass.spf_aligned) == (
        "pass",
        True,
        False,
    )
    unaligned = evaluate(reject, "example.com", spf_pass, [], rand=lambda: 0.0)
    assert unaligned.result == "pass"  # relaxed: bounce.example.com aligns
    failed = evaluate(reject, "example.com", spf_result("pass", "other.example"), [])
    assert (failed.result, failed.policy, failed.record_policy) == ("fail", "reject", "reject")
    sampled = evaluate(
        found("v=DMARC1; p=quarantine; pct=0"), "example.com", None, [], rand=lambda: 0.0
    )
    assert (sampled.result, sampled.policy, sampled.sampled_out) == ("fail", "none", True)
    none = evaluate(Discovery("none", org_domain="example.com"), "example.com", spf_pass, [])
    assert (none.result, none.policy, none.spf_aligned) == ("none", "none", True)
    temp = evaluate(Discovery("temperror", domain="example.com"), "example.com", None, [])
    assert temp.result == "temperror"
    # An aligned identifier that could not be checked: a retry may pass.
    spf_temp = evaluate(reject, "example.com", spf_result("temperror", "example.com"), [])
    assert (spf_temp.result, spf_temp.policy) == ("temperror", "none")
    dkim_temp = evaluate(reject, "example.com", None, [DkimItem("temperror", "example.com")])
    assert dkim_temp.result == "temperror"
    # The null sender: the HELO identity counts.
    helo = evaluate(reject, "example.com", spf_result("pass", "mx.example.com", "helo"), [])
    assert helo.result == "pass"
    # sp and np for subdomains.
    tree = found("v=DMARC1; p=none; sp=reject; np=quarantine")
    sub = evaluate(tree, "sub.example.com", None, [], exists=lambda: True)
    assert (sub.result, sub.policy, sub.record_policy) == ("fail", "reject", "reject")
    ghost = evaluate(tree, "ghost.example.com", None, [], exists=lambda: False)
    assert (ghost.policy, ghost.record_policy) == ("quarantine", "quarantine")


@dataclass(frozen=True)
class FakeAnswer:
    status: str = "ok"
    records: tuple[str, ...] = ()
    txt: tuple[bytes, ...] = ()
    mx: tuple[tuple[int, str], ...] = ()


def test_discovery_order_and_errors() -> None:
    table = {
        "_dmarc.example.com": FakeAnswer(txt=(b"v=DMARC1; p=reject", b"some other text")),
        "_dmarc.own.example.net": FakeAnswer(txt=(b"v=DMARC1; p=quarantine",)),
        "_dmarc.example.net": FakeAnswer(txt=(b"v=DMARC1; p=none",)),
        "_dmarc.two.example": FakeAnswer(txt=(b"v=DMARC1; p=none", b"v=DMARC1; p=reject")),
        "_dmarc.bad.example": FakeAnswer(txt=(b"v=DMARC1; p=bogus",)),
    }
    asked: list[str] = []

    def lookup(name: str, rdtype: str, timeout: float) -> FakeAnswer:
        asked.append(name)
        if name.endswith("down.example"):
            raise DnsFailure("SERVFAIL")
        return table.get(name, FakeAnswer(status="nxdomain"))

    org = discover("a.b.example.com", lookup)
    assert (org.result, org.domain, org.record.p) == ("found", "example.com", "reject")
    assert asked == ["_dmarc.a.b.example.com", "_dmarc.example.com"]  # no walk in between
    own = discover("own.example.net", lookup)
    assert (own.domain, own.record.p) == ("own.example.net", "quarantine")
    assert discover("two.example", lookup).result == "none"
    assert "2 DMARC records" in discover("two.example", lookup).notes[0]
    assert discover("bad.example", lookup).result == "none"
    assert discover("x.down.example", lookup).result == "temperror"
    assert discover("nothing.example", lookup).result == "none"
    asked.clear()
    local = discover("localhost", lookup)
    assert local.result == "none" and "not a domain name" in local.notes[0]
    assert asked == []


def test_authentication_results_text_parses() -> None:
    evaluation = evaluate(
        found("v=DMARC1; p=reject"), "example.com", spf_result("fail", "example.com"), []
    )
    text = authentication_results(SERVER_ID, evaluation, evaluation.spf, [])
    parsed = authres.AuthenticationResultsHeader.parse_value(text)
    assert parsed.authserv_id == SERVER_ID
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "fail"),
        ("dkim", "none"),
        ("dmarc", "fail"),
    ]
    assert "header.from=example.com" in text
    assert "policy.dmarc=reject" in text


def test_shipped_rules_check_and_pass_their_tests() -> None:
    rules = REPO / "rules" / "dmarc.yaml"
    checked = subprocess.run(
        [MAILGATE, "rules", "check", str(rules)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([MAILGATE, "rules", "test", str(rules)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "0 failed" in tested.stdout


def test_shipped_settings_are_the_model_defaults() -> None:
    written = yaml.safe_load((REPO / "rules" / "dmarc.yaml").read_text())["settings"]
    assert Settings.model_validate(written) == Settings()


# -- the daemon against a loopback DNS server -----------------------------------------------


def make_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()
    return pem, " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200))


KEY_PEM, KEY_TXT = make_key()

ZONE = f"""
$TTL 300
spfok.test.                 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
mail.spfok.test.            IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
_dmarc.spfok.test.          IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc-reports@spfok.test"
mail.strict.test.           IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
_dmarc.strict.test.         IN TXT "v=DMARC1; p=reject; aspf=s"
dkimok.test.                IN TXT "v=spf1 -all"
sel._domainkey.dkimok.test. IN TXT {KEY_TXT}
sel._domainkey.other.test.  IN TXT {KEY_TXT}
_dmarc.dkimok.test.         IN TXT "v=DMARC1; p=reject; adkim=s"
reject.test.                IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.reject.test.         IN TXT "v=DMARC1; p=reject"
quar.test.                  IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.quar.test.           IN TXT "v=DMARC1; p=quarantine"
none.test.                  IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.none.test.           IN TXT "v=DMARC1; p=none"
pct0.test.                  IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.pct0.test.           IN TXT "v=DMARC1; p=quarantine; pct=0"
_dmarc.parent.test.         IN TXT "v=DMARC1; p=none; sp=reject; np=quarantine"
parent.test.                IN A 198.51.100.1
sub.parent.test.            IN A 198.51.100.2
nodmarc.test.               IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
broken.test.                IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.broken.test.         IN TXT "v=DMARC1; p=bogus"
brokenrua.test.             IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.brokenrua.test.      IN TXT "v=DMARC1; p=bogus; rua=mailto:r@brokenrua.test"
twice.test.                 IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
_dmarc.twice.test.          IN TXT "v=DMARC1; p=reject"
_dmarc.twice.test.          IN TXT "v=DMARC1; p=none"
tempfail.test.              IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
slow.test.                  IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
soft.test.                  IN TXT "v=spf1 ~all"
_dmarc.soft.test.           IN TXT "v=DMARC1; p=reject"
sel._domainkey.revoked.test. IN TXT "v=DKIM1; k=rsa; p="
_dmarc.revoked.test.        IN TXT "v=DMARC1; p=quarantine"
_dmarc.pct0r.test.          IN TXT "v=DMARC1; p=reject; pct=0"
local.test.                 IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.local.test.          IN TXT "v=DMARC1; p=reject"
"""


def rules_text(ns: str, rules: str | None = None, history: str = "") -> str:
    """The shipped rule file with its settings pointed at the test server."""
    text = (REPO / "rules" / "dmarc.yaml").read_text()
    text = text.replace("nameservers: []            # empty", f'nameservers: ["{ns}"]  # empty')
    text = text.replace("    timeout: 3.0\n", "    timeout: 1.0\n", 1)
    text = text.replace('authserv_id: ""', f"authserv_id: {SERVER_ID}")
    text = text.replace('history_path: ""', f'history_path: "{history}"')
    if rules is not None:
        text = re.sub(r"(?ms)^rules:.*", lambda _: rules, text)
    return text


@pytest.fixture(scope="module")
def dns() -> Iterator[object]:
    with dns_server(
        ZONE, servfail_suffixes=["_dmarc.tempfail.test"], drop_suffixes=["_dmarc.slow.test"]
    ) as server:
        yield server


def start_daemon(tmp: Path, text: str, name: str = "dmarc", socket: str | None = None) -> Daemon:
    rules = tmp / f"{name}.yaml"
    rules.write_text(text)
    spec = socket or f"unix:{tmp / 'run' / (name + '.sock')}"
    return Daemon("dmarc", spec, tmp / f"{name}.log", rules=rules).start()


@pytest.fixture(scope="module")
def daemon(dns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("dmarc")
    process = start_daemon(tmp, rules_text(dns.address, history=str(tmp / "history.sqlite")))
    yield process
    assert process.stop() == 0


def message(from_header: str | None, subject: str = "hello", extra: bytes = b"") -> bytes:
    head = extra
    if from_header is not None:
        head += f"From: {from_header}\r\n".encode()
    head += (
        f"To: alice@example.test\r\nSubject: {subject}\r\n"
        f"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{time.time_ns()}@t>\r\n"
    ).encode()
    return head + b"\r\nHello.\r\n"


def signed(raw: bytes, domain: str, canonicalization: bytes = b"relaxed") -> bytes:
    return (
        dkim.sign(
            raw,
            b"sel",
            domain.encode(),
            KEY_PEM,
            canonicalize=(canonicalization, canonicalization),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        + raw
    )


def ar_of(result) -> authres.AuthenticationResultsHeader:
    values = [v for _, n, v in result.headers_inserted() if n == "Authentication-Results"]
    assert len(values) == 1, result.modifications
    return authres.AuthenticationResultsHeader.parse_value(values[0])


def methods(ar) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in ar.results:
        found.setdefault(item.method, item.result)
    return found


# The corpus: (name, MAIL FROM, client IP, From field, DKIM signing domain or None,
# expected action, expected spf, dkim, dmarc results).
SPF_OK = "192.0.2.10"  # allowed by spfok.test and mail.strict.test
NODMARC_OK = "198.51.100.9"  # allowed by nodmarc.test and the other test domains
ELSEWHERE = "203.0.113.5"  # allowed by none

# fmt: off
CORPUS = [
    ("spf-aligned pass", "bob@spfok.test", SPF_OK, "bob@spfok.test", None,
     "accept", "pass", "none", "pass"),
    ("spf relaxed alignment", "b@mail.spfok.test", SPF_OK, "Bob <bob@spfok.test>", None,
     "accept", "pass", "none", "pass"),
    ("spf strict misalignment", "b@mail.strict.test", SPF_OK, "bob@strict.test", None,
     "reject", "pass", "none", "fail"),
    ("spf-aligned, foreign signature", "bob@spfok.test", SPF_OK, "bob@spfok.test", "other.test",
     "accept", "pass", "pass", "pass"),
    ("dkim-aligned pass", "bob@dkimok.test", ELSEWHERE, "bob@dkimok.test", "dkimok.test",
     "accept", "fail", "pass", "pass"),
    ("dkim-aligned pass, bounce", "", ELSEWHERE, "bob@dkimok.test", "dkimok.test",
     "accept", "none", "pass", "pass"),
    ("dkim unaligned (other.test)", "bob@dkimok.test", ELSEWHERE, "bob@dkimok.test", "other.test",
     "reject", "fail", "pass", "fail"),
    ("adkim=s: subdomain", "x@nodmarc.test", NODMARC_OK, "bob@news.dkimok.test", "dkimok.test",
     "reject", "pass", "pass", "fail"),
    ("both fail, p=reject", "bob@reject.test", ELSEWHERE, "bob@reject.test", None,
     "reject", "fail", "none", "fail"),
    ("spf pass but not aligned, p=reject", "x@nodmarc.test", NODMARC_OK, "ceo@reject.test", None,
     "reject", "pass", "none", "fail"),
    ("both fail, p=quarantine", "bob@quar.test", ELSEWHERE, "bob@quar.test", None,
     "quarantine", "fail", "none", "fail"),
    ("both fail, p=none", "bob@none.test", ELSEWHERE, "bob@none.test", None,
     "accept", "fail", "none", "fail"),
    ("pct=0 samples quarantine out", "bob@pct0.test", ELSEWHERE, "bob@pct0.test", None,
     "accept", "fail", "none", "fail"),
    ("existing subdomain: sp=reject", "x@nodmarc.test", NODMARC_OK, "bob@sub.parent.test", None,
     "reject", "pass", "none", "fail"),
    ("ghost subdomain: np", "x@nodmarc.test", NODMARC_OK, "bob@ghost.parent.test", None,
     "quarantine", "pass", "none", "fail"),
    ("the org domain itself: p=none", "x@nodmarc.test", NODMARC_OK, "bob@parent.test", None,
     "accept", "pass", "none", "fail"),
    ("no DMARC record", "bob@nodmarc.test", ELSEWHERE, "bob@nodmarc.test", None,
     "accept", "fail", "none", "none"),
    ("invalid p, no rua: no record", "bob@broken.test", ELSEWHERE, "bob@broken.test", None,
     "accept", "fail", "none", "none"),
    ("invalid p with rua: p=none", "bob@brokenrua.test", ELSEWHERE, "bob@brokenrua.test", None,
     "accept", "fail", "none", "fail"),
    ("two records: none", "bob@twice.test", ELSEWHERE, "bob@twice.test", None,
     "accept", "fail", "none", "none"),
    ("SERVFAIL: temperror", "bob@tempfail.test", NODMARC_OK, "bob@tempfail.test", None,
     "accept", "pass", "none", "temperror"),
    ("softfail is no pass", "bob@soft.test", ELSEWHERE, "bob@soft.test", None,
     "reject", "softfail", "none", "fail"),
    ("a revoked key fails", "bob@nodmarc.test", ELSEWHERE, "bob@revoked.test", "revoked.test",
     "quarantine", "fail", "fail", "fail"),
    ("pct=0 under p=reject: quarantine", "x@nodmarc.test", NODMARC_OK, "bob@pct0r.test", None,
     "quarantine", "pass", "none", "fail"),
    ("From domain in capitals", "bob@spfok.test", SPF_OK, "Bob <BOB@SPFOK.TEST>", None,
     "accept", "pass", "none", "pass"),
    ("DNS timeout: temperror", "bob@slow.test", NODMARC_OK, "bob@slow.test", None,
     "accept", "pass", "none", "temperror"),
    ("no From: permerror", "bob@spfok.test", SPF_OK, None, None,
     "reject", "pass", "none", "permerror"),
    ("From: two domains", "bob@spfok.test", SPF_OK, "bob@spfok.test, eve@reject.test", None,
     "reject", "pass", "none", "permerror"),
    ("From: one domain", "bob@spfok.test", SPF_OK, "bob@spfok.test, ann@spfok.test", None,
     "accept", "pass", "none", "pass"),
    ("ipv6 client, spf fail", "bob@reject.test", "2001:db8::5", "bob@reject.test", "reject.test",
     "reject", "fail", "permerror", "fail"),
    ("a tampered signature fails", "bob@dkimok.test", ELSEWHERE, "bob@dkimok.test", "tampered",
     "reject", "fail", "fail", "fail"),
]
# fmt: on


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, mail_from, ip, from_header, signer, action, spf, dkim_result, dmarc",
    CORPUS,
    ids=[row[0] for row in CORPUS],
)
def test_corpus(
    daemon: Daemon,
    name: str,
    mail_from: str,
    ip: str,
    from_header: str | None,
    signer: str | None,
    action: str,
    spf: str,
    dkim_result: str,
    dmarc: str,
) -> None:
    raw = message(from_header, subject=name)
    if signer == "tampered":
        raw = signed(raw, "dkimok.test").replace(b"Hello.", b"Hello!")
    elif signer is not None:
        raw = signed(raw, signer)
    result = run_message(
        daemon.address,
        mail_from=mail_from,
        client=("client.example", ip),
        helo="client.example",
        message=raw,
    )
    # A quarantine is an accept with the quarantine action among the modifications.
    got = "quarantine" if result.quarantine_reason() else result.action
    assert got == action, (result.modifications, daemon.log()[-3000:])
    if action == "reject":
        assert result.reply.text.startswith("550 5.7.1 "), result.reply.text
        if dmarc == "fail":
            domain = from_header.split("@")[-1].strip(">")
            assert result.reply.text == (f"550 5.7.1 DMARC policy of {domain} rejects this message")
        return
    if action == "quarantine":
        assert result.quarantine_reason().startswith("DMARC policy of ")
    ar = ar_of(result)
    assert ar.authserv_id == SERVER_ID
    found = methods(ar)
    assert found == {"spf": spf, "dkim": dkim_result, "dmarc": dmarc}, str(ar)
    if from_header is not None and dmarc != "permerror":
        dmarc_item = next(r for r in ar.results if r.method == "dmarc")
        props = {(p.type, p.name): p.value for p in dmarc_item.properties}
        expected = from_header.split("@")[-1].strip(">").split(",")[0].lower()
        assert props[("header", "from")] == expected


@pytest.mark.slow
def test_the_header_tells_the_policy_and_removes_forgeries(daemon: Daemon) -> None:
    forged = (
        b"Authentication-Results: other.example; dmarc=pass header.from=quar.test\r\n"
        b"Authentication-Results: mx.dmarc.test; dmarc=pass header.from=quar.test\r\n"
        b"Authentication-Results: (c) mx.dmarc.test ; spf=pass smtp.mailfrom=x@quar.test\r\n"
    )
    result = run_message(
        daemon.address,
        mail_from="bob@quar.test",
        client=("client.example", "203.0.113.5"),
        message=message("bob@quar.test", extra=forged),
    )
    assert result.quarantine_reason() == "DMARC policy of quar.test: quarantine"
    assert result.headers_changed() == [
        (3, "Authentication-Results", ""),
        (2, "Authentication-Results", ""),
    ]
    kinds = [m[0] for m in result.modifications]
    assert kinds.index("chgheader") < kinds.index("insheader")
    value = next(v for _, n, v in result.headers_inserted() if n == "Authentication-Results")
    assert "dmarc=fail (p=quarantine dis=QUARANTINE)" in value
    assert "policy.dmarc=quarantine" in value
    assert "removing 2 forged Authentication-Results headers" in daemon.log()


@pytest.mark.slow
def test_authenticated_users_cost_no_lookup(daemon: Daemon, dns) -> None:
    result = run_message(
        daemon.address,
        mail_from="alice@authonly.test",
        client=("client.example", "203.0.113.50"),
        message=message("alice@authonly.test"),
        auth_user="alice",
    )
    assert result.action == "accept"
    assert result.headers_inserted() == []
    assert dns.resolver.count("_dmarc.authonly.test") == 0
    assert dns.resolver.count("authonly.test") == 0


@pytest.mark.slow
def test_allow_list_overrides_and_dns_failures_never_hang(dns, tmp_path: Path) -> None:
    text = rules_text(dns.address, history=str(tmp_path / "h.sqlite"))
    text = text.replace("    enabled: false\n    if:\n      anyof:", "    if:\n      anyof:")
    text = text.replace("[192.0.2.0/24, ", "[203.0.113.0/24, ")
    daemon = start_daemon(tmp_path, text)
    try:
        allowed = run_message(
            daemon.address,
            mail_from="bob@reject.test",
            client=("client.example", "203.0.113.5"),
            message=message("bob@reject.test"),
        )
        assert allowed.action == "accept"
        assert methods(ar_of(allowed))["dmarc"] == "fail"  # told, though not acted on
        # A nameserver that never answers: temperror within the timeouts, not a hang.
        dead = text.replace(f'"{dns.address}"', '"127.0.0.1:9"')
        (tmp_path / "dmarc.yaml").write_text(dead)
        assert "reloaded rules" in daemon.reload()
        started = time.monotonic()
        result = run_message(
            daemon.address,
            mail_from="bob@reject.test",
            client=("client.example", "198.51.100.5"),
            message=message("bob@reject.test"),
        )
        assert time.monotonic() - started < 30
        assert result.action == "accept"
        assert methods(ar_of(result)) == {"spf": "temperror", "dkim": "none", "dmarc": "temperror"}
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_a_history_that_cannot_be_written_loses_no_message(dns, tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, rules_text(dns.address, history="/proc/no/such/h.sqlite"))
    try:
        result = run_message(
            daemon.address,
            mail_from="bob@reject.test",
            client=("client.example", "203.0.113.5"),
            message=message("bob@reject.test"),
        )
        assert result.action == "reject"
        assert "could not record the DMARC evaluation" in daemon.log()
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_check_command(dns, tmp_path: Path) -> None:
    rules = tmp_path / "dmarc.yaml"
    rules.write_text(rules_text(dns.address))

    def check(domain: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MAILGATE, "dmarc", "check", domain, "--rules", str(rules)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = check("sub.parent.test")
    assert ok.returncode == 0, ok.stderr
    assert "record at _dmarc.parent.test (the organizational domain)" in ok.stdout
    assert "  sp=reject\n" in ok.stdout and "  np=quarantine\n" in ok.stdout
    assert "result: valid\n" in ok.stdout
    rua = check("brokenrua.test")
    assert rua.returncode == 0
    assert "problem: invalid p='bogus': treated as p=none" in rua.stdout
    assert "aggregate reports go to: r@brokenrua.test" in rua.stdout
    assert check("nodmarc.test").returncode == 1
    assert "2 DMARC records" in check("twice.test").stdout
    temp = check("tempfail.test")
    assert temp.returncode == 1 and "temperror" in temp.stdout
    assert check("not a domain").returncode == 2


# -- OpenDMARC as the reference --------------------------------------------------------------

# OpenDMARC resolves through /etc/resolv.conf (port 53), so it runs in its own network and
# mount namespace, with the test zone served on 127.0.0.1:53 there and a resolv.conf
# bind-mounted over the system's; its Unix socket is reachable from outside.
DNS53 = """
import fcntl, socket, struct, sys, time
# The new network namespace's loopback is down: bring it up (SIOCGIFFLAGS, SIOCSIFFLAGS).
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    flags = struct.unpack("16sh", fcntl.ioctl(sock, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
    fcntl.ioctl(sock, 0x8914, struct.pack("16sh", b"lo", flags | 1))
sys.path.insert(0, {tests!r})
from dnsserver import TestZoneResolver, _QuietLogger
from dnslib.server import DNSServer
resolver = TestZoneResolver(
    open({zone!r}).read(),
    servfail_suffixes=["_dmarc.tempfail.test"],
    drop_suffixes=["_dmarc.slow.test"],
)
for tcp in (False, True):
    DNSServer(resolver, port=53, address="127.0.0.1", tcp=tcp, logger=_QuietLogger()).start_thread()
open({ready!r}, "w").close()
while True:
    time.sleep(3600)
"""

RUN_OPENDMARC = """set -e
mount --bind {resolv} /etc/resolv.conf
{python} {dns} &
while [ ! -e {ready} ]; do sleep 0.05; done
exec {opendmarc} -f -c {conf} -u root
"""


@pytest.fixture(scope="module")
def opendmarc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import os
    import signal
    import sys

    import publicsuffixlist

    import peers

    peers.require_root()
    binary = peers.require("/usr/sbin/opendmarc", "opendmarc")
    peers.require("unshare", "util-linux")
    tmp = tmp_path_factory.mktemp("opendmarc")
    (tmp / "zone").write_text(ZONE)
    (tmp / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    tests = str(Path(__file__).parent)
    (tmp / "dns53.py").write_text(
        DNS53.format(tests=tests, zone=str(tmp / "zone"), ready=str(tmp / "dns.ready"))
    )
    socket_path = tmp / "opendmarc.sock"
    # The same Public Suffix List as ours: the comparison is about DMARC, not list versions.
    # OpenDMARC has no default "*" rule for top-level domains the list lacks: add ours.
    psl = tmp / "public_suffix_list.dat"
    shipped = Path(publicsuffixlist.__file__).parent / "public_suffix_list.dat"
    psl.write_bytes(shipped.read_bytes() + b"\ntest\n")
    (tmp / "opendmarc.conf").write_text(
        f"Socket local:{socket_path}\nAuthservID mx.opendmarc.test\nSPFSelfValidate true\n"
        "SPFIgnoreResults true\nRejectFailures true\nBackground false\nSyslog false\n"
        f"PublicSuffixList {psl}\n"
    )
    (tmp / "run.sh").write_text(
        RUN_OPENDMARC.format(
            resolv=tmp / "resolv.conf",
            python=sys.executable,
            dns=tmp / "dns53.py",
            ready=tmp / "dns.ready",
            opendmarc=binary,
            conf=tmp / "opendmarc.conf",
        )
    )
    log = (tmp / "opendmarc.log").open("wb")
    process = subprocess.Popen(
        ["unshare", "--net", "--mount", "sh", str(tmp / "run.sh")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists() and time.monotonic() < deadline:
            assert process.poll() is None, (tmp / "opendmarc.log").read_text()
            time.sleep(0.05)
        assert socket_path.exists(), (tmp / "opendmarc.log").read_text()
        yield str(socket_path)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
        log.close()


# Where OpenDMARC 1.4 and this daemon differ, by design (each explained in the docs).
OPENDMARC_DIFFERS = {
    # RFC 7489 6.6.1: we refuse a From naming several domains (OpenDMARC: only with
    # RejectMultiValueFrom, off by default).
    "From: two domains": (("reject", ""), ("accept", "")),
    # RFC 7489 6.6.3 / 11.4: a DNS failure looking up the record is a temperror, not none.
    "SERVFAIL: temperror": (("accept", "temperror"), ("accept", "none")),
    # OpenDMARC only writes dis=QUARANTINE in its header; we put the message in quarantine.
    "both fail, p=quarantine": (("quarantine", "fail"), ("accept", "fail")),
    # 6.6.4: p=reject not sampled by pct=0 falls to quarantine, which OpenDMARC does not act on.
    "pct=0 under p=reject: quarantine": (("quarantine", "fail"), ("accept", "fail")),
    # np= (DMARCbis) is unknown to OpenDMARC 1.4, which applies sp=reject.
    "ghost subdomain: np": (("quarantine", "fail"), ("reject", "")),
    # 6.6.3: an invalid p= with a valid rua is p=none; without a rua, no DMARC processing.
    "invalid p with rua: p=none": (("accept", "fail"), ("accept", "permerror")),
    "invalid p, no rua: no record": (("accept", "none"), ("accept", "permerror")),
    # 6.6.3: two DMARC records at one name mean no policy; OpenDMARC uses one of them.
    "two records: none": (("accept", "none"), ("reject", "")),
    # 3.1.2, aspf=s: mail.strict.test is not strict.test; OpenDMARC passes it.
    "spf strict misalignment": (("reject", ""), ("accept", "pass")),
}


@pytest.mark.slow
def test_opendmarc_agrees_on_the_spf_corpus(daemon: Daemon, opendmarc: str) -> None:
    """OpenDMARC does not verify DKIM, so the cases without a signature are compared."""
    compared = 0
    differences = {}
    for name, mail_from, ip, from_header, signer, *_ in CORPUS:
        # A dropped query keeps OpenDMARC in libresolv's retries past any milter timeout.
        if signer is not None or from_header is None or "timeout" in name:
            continue
        verdicts = []
        for address in (daemon.address, opendmarc):
            result = run_message(
                address,
                mail_from=mail_from,
                client=("client.example", ip),
                message=message(from_header, subject=name),
            )
            action = "quarantine" if result.quarantine_reason() else result.action
            # Both are "deliver, with the changes made": OpenDMARC answers CONTINUE.
            action = "accept" if action == "continue" else action
            dmarc = ""
            for _, header, value in result.headers_inserted():
                if header == "Authentication-Results" and "dmarc=" in value:
                    dmarc = re.search(r"dmarc=(\w+)", value).group(1)
            verdicts.append((action, dmarc))
        compared += 1
        if verdicts[0] != verdicts[1]:
            differences[name] = (verdicts[0], verdicts[1])
    assert compared >= 15
    assert differences == OPENDMARC_DIFFERS


@pytest.mark.slow
def test_postfix_as_the_mta(dns, tmp_path: Path) -> None:
    """Postfix's clients come from 127.0.0.1, which local.test's SPF record allows."""
    import peers

    port = peers.free_port()
    daemon = start_daemon(
        tmp_path,
        rules_text(dns.address, history=str(tmp_path / "h.sqlite")),
        socket=f"inet:{port}@127.0.0.1",
    )
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            with mta.smtp() as client:
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    client.sendmail(
                        "a@reject.test", [f"r@{peers.DOMAIN}"], message("a@reject.test")
                    )
                client.rset()
                client.sendmail("a@local.test", [f"r@{peers.DOMAIN}"], message("a@local.test"))
                # DKIM-aligned only, simple/simple: the header values must reach the daemon
                # as they were signed (Postfix offers SMFIP_HDR_LEADSPC).
                raw = signed(message("bob@dkimok.test", subject="signed"), "dkimok.test", b"simple")
                client.sendmail("a@local.test", [f"r@{peers.DOMAIN}"], raw)
            assert refused.value.smtp_code == 550
            assert b"5.7.1 DMARC policy of reject.test rejects this message" in (
                refused.value.smtp_error
            )
            delivered = mta.wait_delivered(2)
            assert len(delivered) == 2, mta.log()
            found = []
            for item in delivered:
                head = item.replace(b"\r\n", b"\n").split(b"\n\n")[0].decode()
                fields = re.findall(r"^Authentication-Results:.*(?:\n[ \t].*)*", head, re.M)
                assert len(fields) == 1, head
                ar = authres.AuthenticationResultsHeader.parse(fields[0].replace("\n", ""))
                found.append(("Subject: signed" in head, methods(ar)))
            assert sorted(found, key=lambda x: x[0]) == [
                (False, {"spf": "pass", "dkim": "none", "dmarc": "pass"}),
                (True, {"spf": "pass", "dkim": "pass", "dmarc": "pass"}),
            ]
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_in_the_core_chain(dns, tmp_path: Path) -> None:
    rules = tmp_path / "dmarc.yaml"
    rules.write_text(rules_text(dns.address, history=str(tmp_path / "h.sqlite")))
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n  - name: dmarc\n    daemon: dmarc\n    rules: {rules}\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    try:
        with Wire(gateway.smtp_port) as wire:
            wire.reply()
            wire.cmd("EHLO client.example")
            for sender, subject in (("a@reject.test", "refused"), ("a@local.test", "core chain")):
                assert wire.cmd(f"MAIL FROM:<{sender}>")[0] == 250
                assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")[0] == 250
                assert wire.cmd("DATA")[0] == 354
                forged = b"Authentication-Results: mx.dmarc.test; dmarc=pass header.from=x\r\n"
                wire.send(message(sender, subject=subject, extra=forged) + b".\r\n")
                code, text = wire.reply()
                if subject == "refused":
                    assert code == 550, text
                    assert "DMARC policy of reject.test rejects this message" in text
                else:
                    assert code == 250, text
        deadline = time.monotonic() + 10
        found: list[bytes] = []
        while not found and time.monotonic() < deadline:
            found = [m for m in gateway.delivered(f"alice@{DOMAIN}") if b"core chain" in m]
            time.sleep(0.05)
        assert found
        head = found[0].replace(b"\r\n", b"\n").split(b"\n\n")[0].decode()
        fields = re.findall(r"^Authentication-Results:.*(?:\n[ \t].*)*", head, re.M)
        assert len(fields) == 1, head
        # One space after the colon, as every MTA writes it (the daemon sees values raw).
        assert fields[0].startswith(f"Authentication-Results: {SERVER_ID};"), fields[0]
        ar = authres.AuthenticationResultsHeader.parse(fields[0].replace("\n", ""))
        assert ar.authserv_id == SERVER_ID
        assert methods(ar) == {"spf": "pass", "dkim": "none", "dmarc": "pass"}
    finally:
        gateway.stop()
