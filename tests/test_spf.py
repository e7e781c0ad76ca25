"""The spf daemon: pure parts, then the daemon against a loopback DNS server, Postfix, the core.

The test zone gives every RFC 7208 result, broken and hostile records included; the daemon
runs the shipped rules (rules/spf.yaml) with only its settings pointed at the test server.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import authres
import pytest
from dnsserver import dns_server
from pydantic import ValidationError

from mailgate.policies.authresults import authserv_id_of, forged_removals
from mailgate.policies.spf import (
    DnsFailure,
    Settings,
    authentication_results,
    check_host,
    header_changes,
    quote,
    received_spf,
    valid_domain,
)

from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway
from daemon_milter_client import MilterSession, run_message
from daemon_process import REPO, Daemon
from smtpwire import Wire

SERVER_ID = "mx.spf.test"

# -- pure parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeAnswer:
    status: str = "ok"
    records: tuple[str, ...] = ()
    txt: tuple[bytes, ...] = ()
    mx: tuple[tuple[int, str], ...] = ()


def table_lookup(table: dict[tuple[str, str], FakeAnswer]):
    asked: list[tuple[str, str]] = []

    def lookup(name: str, rdtype: str, timeout: float) -> FakeAnswer:
        asked.append((name, rdtype))
        if name.startswith("down."):
            raise DnsFailure("timed out")
        return table.get((name, rdtype), FakeAnswer(status="nxdomain"))

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


TABLE = {
    ("ok.example", "TXT"): FakeAnswer(txt=(b"v=spf1 ip4:192.0.2.0/24 -all",)),
    ("broken.example", "TXT"): FakeAnswer(txt=(b"v=spf1 ip4:192.0.2.0/33 -all",)),
}


def test_results_and_texts_without_dns() -> None:
    lookup = table_lookup(TABLE)
    passed = check_host("192.0.2.9", "bob@ok.example", "mx.ok.example", lookup)
    assert (passed.result, passed.identity, passed.domain) == ("pass", "mailfrom", "ok.example")
    assert passed.mechanism == "ip4:192.0.2.0/24"
    failed = check_host("203.0.113.1", "bob@ok.example", "mx.ok.example", lookup)
    assert failed.result == "fail"
    assert failed.explanation == (
        "domain of ok.example does not designate 203.0.113.1 as permitted sender"
    )
    broken = check_host("192.0.2.9", "bob@broken.example", "h.example", lookup)
    assert broken.result == "permerror" and "CIDR" in broken.reason
    down = check_host("192.0.2.9", "bob@down.example", "h.example", lookup)
    assert down.result == "temperror" and "timed out" in down.reason
    # The null sender checks postmaster@HELO; a HELO that is no domain is "none", unasked.
    helo = check_host("192.0.2.9", "", "ok.example", lookup)
    assert (helo.identity, helo.sender, helo.result) == ("helo", "postmaster@ok.example", "pass")
    before = len(lookup.asked)  # type: ignore[attr-defined]
    for name in ("[192.0.2.9]", "localhost", "bad..example", "x" * 64 + ".example"):
        assert check_host("192.0.2.9", "", name, lookup).result == "none"
    assert len(lookup.asked) == before  # type: ignore[attr-defined]


def test_concurrent_checks_each_use_their_own_lookup() -> None:
    """pyspf's DNS hook is process-wide; the lookup function is the calling thread's."""
    from concurrent.futures import ThreadPoolExecutor

    def lookup_for(allowed: str):
        def lookup(name: str, rdtype: str, timeout: float) -> FakeAnswer:
            time.sleep(0.001)  # let the threads interleave
            if (name, rdtype) == ("t.example", "TXT"):
                return FakeAnswer(txt=(f"v=spf1 ip4:{allowed} -all".encode(),))
            return FakeAnswer(status="nxdomain")

        return lookup

    def one(n: int) -> str:
        allowed = "192.0.2.1" if n % 2 else "192.0.2.2"
        return check_host("192.0.2.1", "a@t.example", "h.example", lookup_for(allowed)).result

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(64)))
    assert results == ["pass" if n % 2 else "fail" for n in range(64)]


def test_a_hostile_explanation_is_one_short_line() -> None:
    long_exp = "bad\r\nline " + "x" * 500
    table = {
        ("e.example", "TXT"): FakeAnswer(txt=(b"v=spf1 -all exp=exp.e.example",)),
        ("exp.e.example", "TXT"): FakeAnswer(txt=(long_exp.encode(),)),
    }
    failed = check_host("192.0.2.1", "a@e.example", "h.example", table_lookup(table))
    assert failed.result == "fail"
    assert len(failed.explanation) <= 200 and "\n" not in failed.explanation
    assert failed.explanation.startswith("bad line xxx")


def test_received_spf_and_authentication_results_texts() -> None:
    lookup = table_lookup(TABLE)
    result = check_host("192.0.2.9", "bob@ok.example", "mx.ok.example", lookup)
    value = received_spf(result, SERVER_ID)
    assert value == (
        "Pass (mx.spf.test: domain of ok.example designates 192.0.2.9 as permitted sender) "
        'client-ip=192.0.2.9; envelope-from="bob@ok.example"; helo=mx.ok.example; '
        'mechanism="ip4:192.0.2.0/24"; receiver=mx.spf.test; identity=mailfrom'
    )
    header = authres.AuthenticationResultsHeader.parse_value(
        authentication_results(result, SERVER_ID)
    )
    assert header.authserv_id == SERVER_ID
    assert (header.results[0].method, header.results[0].result) == ("spf", "pass")
    assert header.results[0].smtp_mailfrom == "bob@ok.example"
    helo = check_host("192.0.2.9", "", "ok.example", lookup)
    assert "identity=helo" in received_spf(helo, SERVER_ID)
    assert 'envelope-from="";' in received_spf(helo, SERVER_ID)
    parsed = authres.AuthenticationResultsHeader.parse_value(authentication_results(helo, "a.b"))
    assert parsed.results[0].smtp_helo == "ok.example"
    assert quote("a.b") == "a.b" and quote('a "b"') == '"a \\"b\\""'


def test_forged_authentication_results_are_found_by_authserv_id() -> None:
    assert authserv_id_of("mx.spf.test; spf=pass") == "mx.spf.test"
    assert authserv_id_of(" (comment (nested)) mx.spf.test 1; none") == "mx.spf.test"
    assert authserv_id_of("mx.spf.test") == "mx.spf.test"
    assert authserv_id_of("") == ""
    headers = [
        ("Authentication-Results", "MX.spf.test; spf=pass smtp.mailfrom=a@b.example"),
        ("Received", "from x"),
        ("Authentication-Results", "other.example; dkim=pass"),
        ("authentication-results", "mx.spf.test; dmarc=pass"),
    ]
    removals = forged_removals(headers, SERVER_ID)
    assert [(c.op, c.index, c.value) for c in removals] == [("change", 3, ""), ("change", 1, "")]
    settings = Settings(authserv_id=SERVER_ID, authentication_results=False)
    assert header_changes(settings, None, headers) == ([], [])


def test_settings_are_checked() -> None:
    assert Settings().decide_at == "mail"
    assert Settings().server_id  # the host name
    with pytest.raises(ValidationError):
        Settings(decide_at="eom")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings(authserv_id="bad id; spf=pass")
    with pytest.raises(ValidationError):
        Settings(timeout=0)
    assert valid_domain("a.example") and not valid_domain("example")


def test_shipped_rules_check_and_pass_their_tests() -> None:
    path = REPO / "rules" / "spf.yaml"
    for command in ("check", "test"):
        done = subprocess.run(
            [MAILGATE, "rules", command, str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert "11 passed, 0 failed" in done.stdout


def test_shipped_settings_are_the_model_defaults() -> None:
    import yaml

    written = yaml.safe_load((REPO / "rules" / "spf.yaml").read_text())["settings"]
    assert Settings.model_validate(written) == Settings()


# -- the daemon against a loopback DNS server -----------------------------------------------

# An SPF record over 512 bytes: several strings of a TXT record, and TCP.
BIG = "v=spf1 " + " ".join(f"ip4:10.{i}.0.0/16" for i in range(60)) + " ip4:192.0.2.0/24 -all"
BIG_STRINGS = " ".join(f'"{BIG[i : i + 200]}"' for i in range(0, len(BIG), 200))
MANY = " ".join(f"a:a{i}.spf.test" for i in range(1, 12))
HOSTS = "\n".join(f"a{i}                IN A 10.9.9.{i}" for i in range(1, 12))

ZONE = f"""
$ORIGIN spf.test.
$TTL 300
@                 IN SOA ns.spf.test. hostmaster.spf.test. 1 3600 600 86400 60
pass-ip4          IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
pass-a            IN TXT "v=spf1 a -all"
pass-a            IN A 192.0.2.20
pass-mx           IN TXT "v=spf1 mx -all"
pass-mx           IN MX 10 mail.pass-mx.spf.test.
mail.pass-mx      IN A 192.0.2.21
pass-include      IN TXT "v=spf1 include:pass-ip4.spf.test -all"
pass-redirect     IN TXT "v=spf1 redirect=pass-ip4.spf.test"
fail              IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
fail-exp          IN TXT "v=spf1 ip4:198.51.100.0/24 -all exp=explain.spf.test"
explain           IN TXT "%{{s}} may not send from %{{i}} for %{{d}}"
softfail          IN TXT "v=spf1 ~all"
neutral           IN TXT "v=spf1 ?all"
nospf             IN TXT "just some verification token"
syntax            IN TXT "v=spf1 ip4:192.0.2.300 -all"
two               IN TXT "v=spf1 -all"
two               IN TXT "v=spf1 +all"
loop              IN TXT "v=spf1 include:loop.spf.test -all"
toomany           IN TXT "v=spf1 {MANY} -all"
{HOSTS}
void              IN TXT "v=spf1 a:nx1.spf.test a:nx2.spf.test a:nx3.spf.test ip4:192.0.2.0/24 -all"
big               IN TXT {BIG_STRINGS}
v6                IN TXT "v=spf1 ip6:2001:db8:25::/48 -all"
macro             IN TXT "v=spf1 exists:%{{i}}._ip.%{{d}} -all exp=explain.spf.test"
192.0.2.30._ip.macro IN A 127.0.0.2
cname-spf         IN CNAME pass-ip4.spf.test.
badhelo           IN TXT "v=spf1 -all"
goodhelo          IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
auth-only         IN TXT "v=spf1 -all"
local             IN TXT "v=spf1 ip4:127.0.0.1 -all"
"""

SETTINGS = """settings:
  dns: {{nameservers: ["{ns}"], timeout: 1.0}}
  decide_at: {stage}
  timeout: 5.0
  authserv_id: {server_id}
  received_spf: true
  authentication_results: true

rules:"""


def rules_text(ns: str, stage: str = "mail", rules: str | None = None) -> str:
    """The shipped rule file with its settings pointed at the test server."""
    text = (REPO / "rules" / "spf.yaml").read_text()
    settings = SETTINGS.format(ns=ns, stage=stage, server_id=SERVER_ID)
    text = re.sub(r"(?ms)^settings:.*?^rules:", lambda _: settings, text)
    if rules is not None:
        text = re.sub(r"(?ms)^rules:.*", lambda _: rules, text)
    return text


@pytest.fixture(scope="module")
def dns() -> Iterator[object]:
    with dns_server(
        ZONE, drop_suffixes=["slow.spf.test"], servfail_suffixes=["broken.spf.test"]
    ) as server:
        yield server


def start_daemon(tmp: Path, text: str, name: str = "spf", socket: str | None = None) -> Daemon:
    rules = tmp / f"{name}.yaml"
    rules.write_text(text)
    spec = socket or f"unix:{tmp / 'run' / (name + '.sock')}"
    return Daemon("spf", spec, tmp / f"{name}.log", rules=rules).start()


@pytest.fixture(scope="module")
def daemon(dns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("spf")
    process = start_daemon(tmp, rules_text(dns.address))
    yield process
    assert process.stop() == 0


def send(daemon: Daemon, sender: str, ip: str = "192.0.2.10", helo: str = "client.example", **kw):
    return run_message(
        daemon.address, mail_from=sender, client=("client.example", ip), helo=helo, **kw
    )


def inserted(result) -> dict[str, str]:
    return {name: value for _, name, value in result.headers_inserted()}


def parse_received_spf(value: str) -> tuple[str, dict[str, str]]:
    """Received-SPF: result (comment) key=value; ... (RFC 7208 9.1)."""
    match = re.match(r"^(\w+) \((.*?)\) (.*)$", value)
    assert match, value
    pairs = {}
    for part in re.findall(r'([\w-]+)=("(?:[^"\\]|\\.)*"|[^;\s]+)', match.group(3)):
        key, raw = part
        pairs[key] = raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw
    return match.group(1).lower(), pairs


def spf_of(result) -> str:
    """The result the daemon's Received-SPF header tells."""
    return parse_received_spf(inserted(result)["Received-SPF"])[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sender, ip",
    [
        ("bob@pass-ip4.spf.test", "192.0.2.10"),
        ("bob@pass-a.spf.test", "192.0.2.20"),
        ("bob@pass-mx.spf.test", "192.0.2.21"),
        ("bob@pass-include.spf.test", "192.0.2.11"),
        ("bob@pass-redirect.spf.test", "192.0.2.12"),
        ("bob@cname-spf.spf.test", "192.0.2.13"),
        ("bob@big.spf.test", "192.0.2.14"),
    ],
)
def test_pass_through_every_mechanism(daemon: Daemon, sender: str, ip: str) -> None:
    result = send(daemon, sender, ip)
    assert result.action == "accept"
    result_word, pairs = parse_received_spf(inserted(result)["Received-SPF"])
    assert result_word == "pass"
    assert pairs["client-ip"] == ip
    assert pairs["envelope-from"] == sender
    assert pairs["helo"] == "client.example"
    assert pairs["receiver"] == SERVER_ID
    assert pairs["identity"] == "mailfrom"
    assert pairs["mechanism"]
    ar = authres.AuthenticationResultsHeader.parse_value(inserted(result)["Authentication-Results"])
    assert ar.authserv_id == SERVER_ID
    assert (ar.results[0].method, ar.results[0].result) == ("spf", "pass")
    assert ar.results[0].smtp_mailfrom == sender
    # Both trace fields go on top of the message.
    assert [index for index, _, _ in result.headers_inserted()] == [0, 0]


@pytest.mark.slow
def test_fail_is_refused_at_mail_from_with_the_explanation(daemon: Daemon) -> None:
    plain = send(daemon, "bob@fail.spf.test", "192.0.2.10")
    assert (plain.stage, plain.action) == ("mail", "reject")
    assert plain.reply.text == (
        "550 5.7.23 SPF fail for fail.spf.test: domain of fail.spf.test does not designate "
        "192.0.2.10 as permitted sender"
    )
    exp = send(daemon, "bob@fail-exp.spf.test", "192.0.2.10")
    assert exp.reply.text == (
        "550 5.7.23 SPF fail for fail-exp.spf.test: "
        "bob@fail-exp.spf.test may not send from 192.0.2.10 for fail-exp.spf.test"
    )
    assert "SPF mailfrom fail" in daemon.log()


@pytest.mark.slow
@pytest.mark.parametrize(
    "sender, expected",
    [
        ("bob@softfail.spf.test", "softfail"),
        ("bob@neutral.spf.test", "neutral"),
        ("bob@nospf.spf.test", "none"),
        ("bob@nothere.spf.test", "none"),
        ("bob@syntax.spf.test", "permerror"),
        ("bob@two.spf.test", "permerror"),
        ("bob@loop.spf.test", "permerror"),
        ("bob@toomany.spf.test", "permerror"),
        ("bob@void.spf.test", "permerror"),
    ],
)
def test_results_that_are_accepted_with_headers(daemon: Daemon, sender: str, expected: str) -> None:
    result = send(daemon, sender)
    assert result.action == "accept"
    assert spf_of(result) == expected
    ar = authres.AuthenticationResultsHeader.parse_value(inserted(result)["Authentication-Results"])
    assert ar.results[0].result == expected
    if expected == "permerror":
        assert "problem=" in inserted(result)["Received-SPF"]


@pytest.mark.slow
def test_the_processing_limits_are_named(daemon: Daemon) -> None:
    too_many = inserted(send(daemon, "bob@toomany.spf.test", "192.0.2.40"))["Received-SPF"]
    assert "Too many DNS lookups" in too_many
    void = inserted(send(daemon, "bob@void.spf.test", "192.0.2.41"))["Received-SPF"]
    assert "Void lookup limit of 2 exceeded" in void
    two = inserted(send(daemon, "bob@two.spf.test", "192.0.2.42"))["Received-SPF"]
    assert "Two or more type TXT spf records found" in two


@pytest.mark.slow
def test_dns_failures_are_temperrors(daemon: Daemon) -> None:
    for sender in ("bob@x.broken.spf.test", "bob@x.slow.spf.test"):
        result = send(daemon, sender)
        assert (result.stage, result.action) == ("mail", "tempfail"), sender
        domain = sender.split("@")[1]
        assert result.reply.text == f"451 4.4.3 SPF temporary error for {domain}; try again later"
    assert "SPF mailfrom temperror" in daemon.log()


@pytest.mark.slow
def test_helo_identity(daemon: Daemon) -> None:
    # The null sender: MAIL FROM is postmaster@HELO.
    bounce = send(daemon, "", "192.0.2.10", helo="goodhelo.spf.test")
    assert bounce.action == "accept"
    word, pairs = parse_received_spf(inserted(bounce)["Received-SPF"])
    assert (word, pairs["identity"], pairs["envelope-from"]) == ("pass", "helo", "")
    ar = authres.AuthenticationResultsHeader.parse_value(inserted(bounce)["Authentication-Results"])
    assert ar.results[0].smtp_helo == "goodhelo.spf.test"
    # A HELO fail decides alone, for any sender.
    refused = send(daemon, "bob@pass-ip4.spf.test", "192.0.2.10", helo="badhelo.spf.test")
    assert (refused.stage, refused.action) == ("mail", "reject")
    assert refused.reply.text.startswith("550 5.7.23 SPF fail for HELO badhelo.spf.test: ")


@pytest.mark.slow
def test_ipv6_client_and_macros(daemon: Daemon) -> None:
    v6 = send(daemon, "bob@v6.spf.test", "2001:db8:25::7")
    assert spf_of(v6) == "pass"
    assert send(daemon, "bob@v6.spf.test", "2001:db8:26::7").action == "reject"
    # exists:%{i}._ip.%{d}: only 192.0.2.30 is named in the zone.
    assert spf_of(send(daemon, "carol@macro.spf.test", "192.0.2.30")) == "pass"
    refused = send(daemon, "carol@macro.spf.test", "192.0.2.31")
    assert refused.reply.text.endswith(
        "carol@macro.spf.test may not send from 192.0.2.31 for macro.spf.test"
    )


@pytest.mark.slow
def test_forged_authentication_results_are_removed(daemon: Daemon) -> None:
    message = (
        b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x@y.example\r\n"
        b"Authentication-Results: mx.spf.test; spf=pass smtp.mailfrom=bob@fail.spf.test\r\n"
        b"Subject: forged\r\n\r\nHello.\r\n"
    )
    result = send(daemon, "bob@pass-ip4.spf.test", message=message)
    assert result.action == "accept"
    assert result.headers_changed() == [(2, "Authentication-Results", "")]
    # The deletion comes before our own field is inserted (indexes stay right).
    kinds = [m[0] for m in result.modifications]
    assert kinds.index("chgheader") < kinds.index("insheader")
    assert "removing 1 forged Authentication-Results header" in daemon.log()


@pytest.mark.slow
def test_authenticated_users_cost_no_dns_query(daemon: Daemon, dns) -> None:
    result = send(
        daemon,
        "alice@auth-only.spf.test",
        "203.0.113.50",
        helo="auth-helo.spf.test",
        auth_user="alice",
    )
    assert result.action == "accept"
    assert inserted(result) == {}
    assert dns.resolver.count("auth-only.spf.test") == 0
    assert dns.resolver.count("auth-helo.spf.test") == 0
    # The same sender unauthenticated is checked (and fails).
    assert send(daemon, "alice@auth-only.spf.test", "203.0.113.50").action == "reject"
    assert dns.resolver.count("auth-only.spf.test", "TXT") == 1


@pytest.mark.slow
def test_two_messages_on_one_connection_share_the_helo_check(daemon: Daemon, dns) -> None:
    with MilterSession(daemon.address) as session:
        session.connect("client.example", "192.0.2.10")
        session.helo("goodhelo2.spf.test")
        for sender in ("a@pass-ip4.spf.test", "b@fail.spf.test"):
            session.send_message(sender, ["r@example.test"], b"Subject: x\r\n\r\nx\r\n")
    assert dns.resolver.count("goodhelo2.spf.test", "TXT") == 1


@pytest.mark.slow
def test_deciding_at_rcpt(dns, tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, rules_text(dns.address, stage="rcpt"))
    try:
        result = send(daemon, "bob@fail.spf.test")
        assert "mail" not in result.replies  # not answered at MAIL FROM
        assert result.replies["rcpt rcpt@example.test"].text.startswith("550 5.7.23 SPF fail")
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_reload_changes_the_rules(dns, tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, rules_text(dns.address))
    try:
        assert send(daemon, "bob@softfail.spf.test").action == "accept"
        stricter = rules_text(dns.address).replace(
            "    if: {fact: {name: spf, is: softfail}}\n    then: continue",
            "    if: {fact: {name: spf, is: softfail}}\n"
            "    then: {reject: {code: 550, enhanced: 5.7.23, text: softfail refused}}",
        )
        assert stricter != rules_text(dns.address)
        (tmp_path / "spf.yaml").write_text(stricter)
        assert "reloaded rules" in daemon.reload()
        assert send(daemon, "bob@softfail.spf.test").reply.text == "550 5.7.23 softfail refused"
        (tmp_path / "spf.yaml").write_text(stricter.replace("decide_at: mail", "decide_at: eom"))
        assert "previous rules stay in force" in daemon.reload()
        assert send(daemon, "bob@softfail.spf.test").action == "reject"
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_postfix_as_the_mta(dns, tmp_path: Path) -> None:
    """Postfix's clients come from 127.0.0.1, which local.spf.test allows."""
    import peers

    port = peers.free_port()
    daemon = start_daemon(tmp_path, rules_text(dns.address), socket=f"inet:{port}@127.0.0.1")
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            message = b"Subject: spf via postfix\r\nFrom: a@local.spf.test\r\n\r\nHello.\r\n"
            with mta.smtp() as client:
                with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                    client.sendmail("a@fail.spf.test", [f"r@{peers.DOMAIN}"], message)
                client.rset()
                client.sendmail("a@local.spf.test", [f"r@{peers.DOMAIN}"], message)
            assert refused.value.smtp_code == 550
            assert b"5.7.23 SPF fail for fail.spf.test" in refused.value.smtp_error
            delivered = mta.wait_delivered(1)
            assert delivered, mta.log()
            head = delivered[0].split(b"\r\n\r\n")[0].split(b"\n\n")[0].decode()
            assert re.search(r"^Received-SPF: Pass \(mx\.spf\.test: ", head, re.M), head
            assert "client-ip=127.0.0.1;" in head
            assert re.search(r"^Authentication-Results: mx\.spf\.test;\s+spf=pass", head, re.M)
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_in_the_core_chain(dns, tmp_path: Path) -> None:
    rules = tmp_path / "spf.yaml"
    rules.write_text(rules_text(dns.address))
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n  - name: spf\n    daemon: spf\n    rules: {rules}\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    try:
        with Wire(gateway.smtp_port) as wire:
            wire.reply()
            wire.cmd("EHLO client.example")
            code, text = wire.cmd("MAIL FROM:<a@fail.spf.test>")
            assert code == 550 and text.startswith("5.7.23 SPF fail for fail.spf.test"), text
            assert wire.cmd("MAIL FROM:<a@local.spf.test>")[0] == 250
            assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")[0] == 250
            assert wire.cmd("DATA")[0] == 354
            wire.send(b"Subject: core chain\r\nFrom: a@local.spf.test\r\n\r\nHello.\r\n.\r\n")
            assert wire.reply()[0] == 250
        deadline = time.monotonic() + 10
        found: list[bytes] = []
        while not found and time.monotonic() < deadline:
            found = [m for m in gateway.delivered(f"alice@{DOMAIN}") if b"core chain" in m]
            time.sleep(0.05)
        assert found
        assert b"Received-SPF: Pass (mx.spf.test: domain of local.spf.test" in found[0]
        assert b"Authentication-Results: mx.spf.test; spf=pass" in found[0]
    finally:
        gateway.stop()
