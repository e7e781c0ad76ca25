"""The dnsbl daemon: its pure logic, then the daemon as a real process against test zones.

The zones are served by the loopback DNS server (tests/dnsserver.py), which counts the
queries it gets (the TTL cache) and misbehaves on purpose under slow.test.example (no
reply) and broken.test.example (SERVFAIL). The daemon is driven through the milter
protocol by tests/daemon_milter_client.py, by real Postfix and by our own core.
"""

from __future__ import annotations

import ipaddress
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsserver import dns_server
from pydantic import ValidationError

from mailgate.policies.dnsbl import (
    CodePattern,
    Settings,
    Zone,
    classify,
    client_address,
    failed,
    query_name,
    summarize,
)

from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway
from daemon_milter_client import SMFIP_NR_CONN, SMFIP_NR_RCPT, MilterSession, run_message
from daemon_process import REPO, Daemon
from smtpwire import Wire

# -- the pure logic -----------------------------------------------------------------------


def test_query_names_follow_rfc5782() -> None:
    v4 = ipaddress.ip_address("192.0.2.99")
    assert query_name(v4, "zen.spamhaus.org") == "99.2.0.192.zen.spamhaus.org"
    v6 = ipaddress.ip_address("2001:db8:1:2::abc")
    name = query_name(v6, "bl.example.")
    assert name == ("c.b.a.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example")
    assert len(name.split(".")) == 32 + 2


def test_client_addresses_in_every_spelling() -> None:
    assert str(client_address("[192.0.2.1]")) == "192.0.2.1"
    assert str(client_address("IPv6:2001:db8::1")) == "2001:db8::1"
    # An IPv4 client on a dual-stack socket is looked up as IPv4.
    assert str(client_address("::ffff:192.0.2.7")) == "192.0.2.7"
    assert str(client_address("fe80::1%eth0")) == "fe80::1"
    assert client_address("") is None
    assert client_address("unknown") is None


def test_code_patterns() -> None:
    a = ipaddress.IPv4Address
    assert CodePattern.parse("127.0.0.2").matches(a("127.0.0.2"))
    assert not CodePattern.parse("127.0.0.2").matches(a("127.0.0.3"))
    xbl = CodePattern.parse("127.0.0.4/30")
    assert [xbl.matches(a(f"127.0.0.{n}")) for n in (3, 4, 7, 8)] == [False, True, True, False]
    high = CodePattern.parse("127.0.*.3")
    assert high.matches(a("127.0.15.3")) and not high.matches(a("127.0.15.2"))
    for bad in ("127.0.0", "127.0.*", "127.0.x.1", "banana", "127.0.0.256"):
        with pytest.raises(ValueError):
            CodePattern.parse(bad)


def test_error_codes_and_foreign_answers_are_never_listings() -> None:
    zone = Zone(zone="zen.spamhaus.org", weight=3)
    for answer, words in [
        ("127.255.255.254", "public or open resolvers"),
        ("127.255.255.255", "too many queries"),
        ("127.255.255.252", "typing error"),
        ("127.255.255.200", "error code"),
        ("192.0.2.1", "outside 127.0.0.0/8"),
        ("::1", "outside 127.0.0.0/8"),
    ]:
        outcome = classify(zone, [answer])
        assert not outcome.listed and outcome.weight == 0
        assert outcome.error is not None and words in outcome.error
    # A real listing beside an error code still counts; the error is still told.
    both = classify(zone, ["127.0.0.2", "127.255.255.254"])
    assert both.listed and both.weight == 3 and both.codes == ("127.0.0.2",)
    assert both.error is not None
    dnswl = Zone(zone="list.dnswl.org", type="allow", weight=-1, errors=["127.0.0.255"])
    refused = classify(dnswl, ["127.0.0.255"])
    assert not refused.listed and "refused" in (refused.error or "")


def test_code_filters_and_weights() -> None:
    zen = Zone(zone="zen.spamhaus.org", weight=3, codes=["127.0.0.2", "127.0.0.4/30"])
    assert classify(zen, []).listed is False
    assert classify(zen, ["127.0.0.10"]).listed is False  # PBL: not this entry's business
    listed = classify(zen, ["127.0.0.4", "127.0.0.2", "127.0.0.10"])
    # A plain list of codes counts the zone's weight once, however many codes match.
    assert (listed.weight, listed.codes) == (3, ("127.0.0.2", "127.0.0.4"))
    mapped = Zone(zone="bl.example", weight=1, codes={"127.0.0.2": 2, "127.0.0.3": None})
    assert classify(mapped, ["127.0.0.2", "127.0.0.3"]).weight == 3  # each entry once
    anything = Zone(zone="bl.example", weight=1.5)
    assert classify(anything, ["127.0.0.77"]).weight == 1.5


def test_scores_and_facts() -> None:
    settings = Settings()  # the shipped defaults
    zen, pbl, spamcop, dnswl = settings.zones
    outcomes = [
        classify(zen, ["127.0.0.2", "127.0.0.11"]),
        classify(pbl, ["127.0.0.2", "127.0.0.11"]),
        classify(spamcop, ["127.0.0.2"]),
        classify(dnswl, ["127.0.9.1"]),
        failed(Zone(zone="slow.example"), "no answer within the deadline of 5s"),
    ]
    facts = summarize(outcomes)
    assert facts["dnsbl"] == ["zen.spamhaus.org", "spamhaus-pbl", "bl.spamcop.net"]
    assert facts["dnswl"] == ["list.dnswl.org"]
    assert facts["dnsbl_score"] == 3 + 0 + 2 - 3 and isinstance(facts["dnsbl_score"], int)
    assert facts["dnsbl_codes"] == {
        "zen.spamhaus.org": ["127.0.0.2"],
        "spamhaus-pbl": ["127.0.0.11"],
        "bl.spamcop.net": ["127.0.0.2"],
        "list.dnswl.org": ["127.0.9.1"],
    }
    assert "list.dnswl.org=127.0.9.1" in facts["dnsbl_listings"]
    assert facts["dnsbl_errors"] == {"slow.example": "no answer within the deadline of 5s"}


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="use type: allow"):
        Zone(zone="list.dnswl.org", weight=-2)
    with pytest.raises(ValidationError, match="subtract"):
        Zone(zone="list.dnswl.org", type="allow", codes={"127.0.*.3": 5})
    with pytest.raises(ValidationError, match="not a DNS zone"):
        Zone(zone="no zone")
    with pytest.raises(ValidationError, match="return code"):
        Zone(zone="bl.example", codes=["127.0.0.x"])
    with pytest.raises(ValidationError, match="distinct name"):
        Settings(zones=[Zone(zone="bl.example"), Zone(zone="bl.example")])
    with pytest.raises(ValidationError):
        Settings(decide_at="data")
    with pytest.raises(ValidationError, match="IP network"):
        Settings(skip_networks=["10.0.0.0/33"])
    settings = Settings(skip_networks=["10.0.0.0/8"])
    assert settings.skipped(ipaddress.ip_address("10.1.2.3"))
    assert not settings.skipped(ipaddress.ip_address("192.0.2.1"))
    assert Settings().skipped(ipaddress.ip_address("127.0.0.1"))
    assert Settings().skipped(ipaddress.ip_address("fd00::1"))


def test_shipped_rules_check_and_pass_their_tests() -> None:
    path = REPO / "rules" / "dnsbl.yaml"
    for command in ("check", "test"):
        done = subprocess.run(
            [MAILGATE, "rules", command, str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert "12 passed, 0 failed" in done.stdout


def test_shipped_settings_are_the_model_defaults() -> None:
    import yaml

    written = yaml.safe_load((REPO / "rules" / "dnsbl.yaml").read_text())["settings"]
    assert Settings.model_validate(written) == Settings()


# -- the daemon -----------------------------------------------------------------------------

V6_CLIENT = "2001:db8::25"
V6_NAME = query_name(ipaddress.ip_address(V6_CLIENT), "bl.test.example")

ZONE = f"""
$ORIGIN test.example.
$TTL 300
@                 IN SOA ns.test.example. hostmaster.test.example. 1 3600 600 86400 60
10.2.0.192.bl     IN A 127.0.0.2
11.2.0.192.bl     IN A 127.0.0.2
11.2.0.192.wl     IN A 127.0.10.3
12.2.0.192.bl     IN A 127.0.0.2
12.2.0.192.wl     IN A 127.0.10.1
13.2.0.192.bl     IN A 127.0.0.9
20.2.0.192.bl     IN A 127.255.255.254
21.2.0.192.bl     IN A 127.0.0.2
22.2.0.192.wl     IN A 127.0.0.255
30.2.0.192.bl     IN A 127.0.0.2
31.2.0.192.bl2    IN A 127.0.0.2
40.2.0.192.bl     IN A 127.0.0.2
41.2.0.192.bl     IN A 127.0.0.2
1.0.0.127.bl      IN A 127.0.0.2
{V6_NAME}.        IN A 127.0.0.2
"""

RULES = """\
daemon: dnsbl
settings:
  dns: {{nameservers: ["{ns}"], timeout: {timeout}}}
  deadline: {deadline}
  decide_at: {stage}
  skip_networks: {skip}
  zones:
{zones}
rules:
  # First, so every verdict shows the facts (the shipped rules ask for them later).
  - name: errors
    if: {{fact: {{name: dnsbl_errors}}}}
    then: [{{add_header: {{name: X-Test-Errors, value: "${{dnsbl_errors}}"}}}}, continue]
  - name: stamp
    if: true
    then:
      - add_header: {{name: X-Test-Score, value: "${{dnsbl_score}}"}}
      - add_header: {{name: X-Test-Listings, value: "${{dnsbl_listings}}"}}
      - continue
  - name: authenticated
    if: {{auth: true}}
    then: accept
  - name: postmaster
    if: {{envelope: {{part: localpart, to: {{is: postmaster}}}}}}
    then: accept
  - name: trusted
    if: {{fact: {{name: dnsbl_listings, matches: "wl.test.example=127.0.*.3"}}}}
    then: accept
  - name: listed
    if: {{fact: {{name: dnsbl_score, over: 2}}}}
    then:
      reject:
        code: 554
        enhanced: 5.7.1
        text: "Client [${{client_ip}}] blocked using ${{dnsbl}}"
"""

ZONES = """\
    - {zone: bl.test.example, weight: 3, codes: [127.0.0.2, 127.0.0.3]}
    - zone: wl.test.example
      type: allow
      codes: {127.0.*.1: -2, 127.0.*.3: -5}
      errors: 127.0.0.255
"""


def rules_text(
    ns: str,
    *,
    zones: str = ZONES,
    stage: str = "rcpt",
    deadline: float = 3.0,
    timeout: float = 2.0,
    skip: str = "[10.0.0.0/8]",
) -> str:
    return RULES.format(
        ns=ns, zones=zones, stage=stage, deadline=deadline, timeout=timeout, skip=skip
    )


@pytest.fixture(scope="module")
def dns() -> Iterator[object]:
    with dns_server(
        ZONE, drop_suffixes=["slow.test.example"], servfail_suffixes=["broken.test.example"]
    ) as server:
        yield server


def start_daemon(tmp: Path, text: str, name: str = "dnsbl") -> Daemon:
    rules = tmp / f"{name}.yaml"
    rules.write_text(text)
    daemon = Daemon(
        "dnsbl", f"unix:{tmp / 'run' / (name + '.sock')}", tmp / f"{name}.log", rules=rules
    )
    return daemon.start()


@pytest.fixture(scope="module")
def daemon(dns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("dnsbl")
    process = start_daemon(tmp, rules_text(dns.address))
    yield process
    assert process.stop() == 0


def headers(result) -> dict[str, str]:
    return dict(result.headers_added())


@pytest.mark.slow
def test_a_listed_client_is_refused_at_rcpt(daemon: Daemon) -> None:
    result = run_message(daemon.address, client=("bad.example", "192.0.2.10"))
    rcpt = result.replies["rcpt rcpt@example.test"]
    assert rcpt.action == "replycode"
    assert rcpt.text == "554 5.7.1 Client [192.0.2.10] blocked using bl.test.example"
    # The recipient is refused, not the message: nothing else is refused at end-of-message.
    assert result.stage == "eom" and result.action == "accept"
    assert "listed on bl.test.example (127.0.0.2) weight 3" in daemon.log()


@pytest.mark.slow
def test_connect_is_not_held_up_and_recipients_are_judged_one_by_one(daemon: Daemon) -> None:
    with MilterSession(daemon.address) as session:
        # Deciding at RCPT: connect is negotiated without a reply, so it never waits.
        assert session.protocol & SMFIP_NR_CONN
        assert not session.protocol & SMFIP_NR_RCPT
        session.connect("bad.example", "192.0.2.21")
        session.helo("bad.example")
        result = session.send_message(
            "a@remote.example",
            ["postmaster@example.test", "alice@example.test"],
            b"Subject: hi\r\n\r\nHello.\r\n",
        )
    assert result.replies["rcpt postmaster@example.test"].action == "continue"
    assert result.replies["rcpt alice@example.test"].text.startswith("554 5.7.1")
    assert result.action == "accept"
    assert headers(result)["X-Test-Score"] == "3"


@pytest.mark.slow
def test_an_authenticated_client_is_accepted(daemon: Daemon) -> None:
    result = run_message(daemon.address, client=("bad.example", "192.0.2.40"), auth_user="alice")
    assert result.replies["rcpt rcpt@example.test"].action == "continue"
    assert result.action == "accept"


@pytest.mark.slow
def test_a_clean_client_passes(daemon: Daemon) -> None:
    result = run_message(daemon.address, client=("good.example", "192.0.2.99"))
    assert result.replies["rcpt rcpt@example.test"].action == "continue"
    assert result.action == "accept"
    assert headers(result)["X-Test-Score"] == "0"
    assert "X-Test-Errors" not in headers(result)


@pytest.mark.slow
def test_dnswl_subtracts_and_high_trust_accepts(daemon: Daemon) -> None:
    # Listed on the block list (3) and on the allow list with high trust: accepted.
    trusted = run_message(daemon.address, client=("a.example", "192.0.2.11"))
    assert trusted.replies["rcpt rcpt@example.test"].action == "continue"
    # Low trust subtracts 2: a score of 1 is not refused.
    low = run_message(daemon.address, client=("b.example", "192.0.2.12"))
    assert low.replies["rcpt rcpt@example.test"].action == "continue"
    assert headers(low)["X-Test-Score"] == "1"
    assert headers(low)["X-Test-Listings"] == (
        "bl.test.example=127.0.0.2, wl.test.example=127.0.10.1"
    )


@pytest.mark.slow
def test_codes_outside_the_filter_are_ignored(daemon: Daemon) -> None:
    result = run_message(daemon.address, client=("c.example", "192.0.2.13"))  # 127.0.0.9
    assert result.replies["rcpt rcpt@example.test"].action == "continue"
    assert headers(result)["X-Test-Score"] == "0"


@pytest.mark.slow
def test_error_codes_are_logged_published_and_not_counted(daemon: Daemon) -> None:
    result = run_message(daemon.address, client=("d.example", "192.0.2.20"))
    assert result.replies["rcpt rcpt@example.test"].action == "continue"
    assert headers(result)["X-Test-Score"] == "0"
    assert headers(result)["X-Test-Errors"] == "bl.test.example"
    assert "refuses queries through public or open resolvers" in daemon.log()
    refused = run_message(daemon.address, client=("e.example", "192.0.2.22"))  # 127.0.0.255
    assert headers(refused)["X-Test-Errors"] == "wl.test.example"


@pytest.mark.slow
def test_an_ipv6_client_is_looked_up_by_nibbles(daemon: Daemon, dns) -> None:
    result = run_message(daemon.address, client=("v6.example", V6_CLIENT))
    assert result.replies["rcpt rcpt@example.test"].text == (
        f"554 5.7.1 Client [{V6_CLIENT}] blocked using bl.test.example"
    )
    assert dns.resolver.count(V6_NAME, "A") == 1


@pytest.mark.slow
def test_the_cache_saves_the_second_lookup(daemon: Daemon, dns) -> None:
    for _ in range(2):
        result = run_message(daemon.address, client=("f.example", "192.0.2.41"))
        assert result.replies["rcpt rcpt@example.test"].text.startswith("554 5.7.1")
    assert dns.resolver.count("41.2.0.192.bl.test.example", "A") == 1
    assert dns.resolver.count("41.2.0.192.wl.test.example", "A") == 1  # NXDOMAIN, cached too


@pytest.mark.slow
def test_private_clients_are_not_looked_up(daemon: Daemon, dns) -> None:
    result = run_message(daemon.address, client=("lan.example", "10.1.2.3"))
    assert result.action == "accept"
    assert dns.resolver.count("3.2.1.10.bl.test.example") == 0


@pytest.mark.slow
def test_deciding_at_connect(dns, tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, rules_text(dns.address, stage="connect"))
    try:
        with MilterSession(daemon.address) as session:
            assert not session.protocol & SMFIP_NR_CONN
            reply = session.connect("bad.example", "192.0.2.30")
        assert reply is not None and reply.action == "replycode"
        assert reply.text == "554 5.7.1 Client [192.0.2.30] blocked using bl.test.example"
        clean = run_message(daemon.address, client=("good.example", "192.0.2.98"))
        assert clean.action == "accept"
        assert "reject at connect: 554 5.7.1" in daemon.log()
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_deciding_at_mail(dns, tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, rules_text(dns.address, stage="mail"))
    try:
        refused = run_message(daemon.address, client=("bad.example", "192.0.2.30"))
        assert refused.stage == "mail" and refused.action == "reject"
        assert refused.reply.text == "554 5.7.1 Client [192.0.2.30] blocked using bl.test.example"
        # AUTH is known at MAIL FROM: the authenticated rule still exempts the user.
        user = run_message(daemon.address, client=("bad.example", "192.0.2.30"), auth_user="bob")
        assert user.stage == "eom" and user.action == "accept"
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_failing_zones_count_as_not_listed_within_the_deadline(dns, tmp_path: Path) -> None:
    zones = ZONES + (
        "    - {zone: slow.test.example, weight: 3}\n    - {zone: broken.test.example, weight: 3}\n"
    )
    # Each lookup may take 5 s; the deadline of 1 s for all of them together wins.
    text = rules_text(dns.address, zones=zones, deadline=1.0, timeout=5.0)
    daemon = start_daemon(tmp_path, text)
    try:
        clean = run_message(daemon.address, client=("good.example", "192.0.2.97"))
        assert clean.replies["rcpt rcpt@example.test"].action == "continue"
        assert clean.action == "accept"
        assert headers(clean)["X-Test-Errors"] == "slow.test.example, broken.test.example"
        log = daemon.log()
        assert "zone slow.test.example: no answer within the deadline of 1s" in log
        assert "zone broken.test.example: lookup failed:" in log and "SERVFAIL" in log
        assert dns.resolver.count("97.2.0.192.slow.test.example") >= 1
        # The zones that work still decide.
        listed = run_message(daemon.address, client=("bad.example", "192.0.2.10"))
        assert listed.replies["rcpt rcpt@example.test"].text.startswith("554 5.7.1")
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_reload_changes_the_zones(dns, tmp_path: Path) -> None:
    only_bl2 = "    - {zone: bl2.test.example, weight: 3}\n"
    daemon = start_daemon(tmp_path, rules_text(dns.address, zones=only_bl2))
    try:
        before = run_message(daemon.address, client=("x.example", "192.0.2.30"))
        assert before.replies["rcpt rcpt@example.test"].action == "continue"
        (tmp_path / "dnsbl.yaml").write_text(rules_text(dns.address))
        assert "reloaded rules" in daemon.reload()
        after = run_message(daemon.address, client=("x.example", "192.0.2.30"))
        assert after.replies["rcpt rcpt@example.test"].text.startswith("554 5.7.1")
        # A bad file keeps the zones in force.
        (tmp_path / "dnsbl.yaml").write_text(
            rules_text(dns.address, zones="    - {zone: bl.test.example, weight: -1}\n")
        )
        assert "previous rules stay in force" in daemon.reload()
        kept = run_message(daemon.address, client=("x.example", "192.0.2.30"))
        assert kept.replies["rcpt rcpt@example.test"].text.startswith("554 5.7.1")
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_postfix_as_the_mta(dns, tmp_path: Path) -> None:
    """Postfix connects from 127.0.0.1, listed in the test zone (skip_networks is empty)."""
    import peers

    rules = tmp_path / "dnsbl.yaml"
    rules.write_text(rules_text(dns.address, skip="[]"))
    port = peers.free_port()
    daemon = Daemon("dnsbl", f"inet:{port}@127.0.0.1", tmp_path / "daemon.log", rules=rules)
    daemon.start()
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            message = b"Subject: dnsbl via postfix\r\nFrom: a@remote.example\r\n\r\nHello.\r\n"
            with mta.smtp() as client:
                with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                    client.sendmail("a@remote.example", [f"r@{peers.DOMAIN}"], message)
                client.sendmail("a@remote.example", [f"postmaster@{peers.DOMAIN}"], message)
            code, text = refused.value.recipients[f"r@{peers.DOMAIN}"]
            assert code == 554
            assert b"5.7.1 Client [127.0.0.1] blocked using bl.test.example" in text
            delivered = mta.wait_delivered(1)
            assert b"X-Test-Score: 3" in delivered[0]
            assert "milter-reject: RCPT from" in mta.log()
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_in_the_core_chain(dns, tmp_path: Path) -> None:
    rules = tmp_path / "dnsbl.yaml"
    rules.write_text(rules_text(dns.address, skip="[]"))
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n  - name: dnsbl\n    daemon: dnsbl\n    rules: {rules}\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    try:
        with Wire(gateway.smtp_port) as wire:
            wire.reply()
            wire.cmd("EHLO client.example")
            assert wire.cmd("MAIL FROM:<a@remote.example>")[0] == 250
            code, text = wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
            assert (code, text) == (554, "5.7.1 Client [127.0.0.1] blocked using bl.test.example")
            assert wire.cmd(f"RCPT TO:<postmaster@{DOMAIN}>")[0] == 250
            assert wire.cmd("DATA")[0] == 354
            wire.send(b"Subject: core chain\r\nFrom: a@remote.example\r\n\r\nHello.\r\n.\r\n")
            assert wire.reply()[0] == 250
        deadline = time.monotonic() + 10
        found = []
        while not found and time.monotonic() < deadline:
            found = [m for m in gateway.delivered(f"alice@{DOMAIN}") if b"core chain" in m]
            time.sleep(0.05)
        assert found and b"X-Test-Score: 3" in found[0]
    finally:
        gateway.stop()
