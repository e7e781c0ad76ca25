"""The arc daemon: ARC chain validation and sealing (RFC 8617).

Pure parts first (settings, the chain's interpretation, which mail is sealed and with which
cv=), then chains built here with generated keys and validated against a loopback DNS
server: sealed once, twice by two domains, a broken seal, a body changed after a valid
seal, no ARC at all, a key whose lookup fails (SERVFAIL), too many sets, a terminated
chain. Then the daemon as a real process through the milter protocol (sealing, our seal on
top of another, control by rules, a key that cannot be used), Postfix with the daemon as
its milter, and mailgate's core with the daemon in its chain.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import authres
import pytest
from dnsserver import dns_server
from pydantic import ValidationError

from mailgate.core.dns import Resolver
from mailgate.milters.arc import seal_message, verify_chain
from mailgate.milters.dkim import LoadedKey, load_key, make_dnsfunc, sign_message
from mailgate.milters.dkim_cli import dns_record, txt_strings
from mailgate.policies.arc import (
    ChainResult,
    InstanceResult,
    Settings,
    arc_result,
    authentication_results,
    facts,
    interpret,
    oldest_pass,
    seal_control,
    seal_cv,
    selected,
    signed_fields,
)
from mailgate.policies.verdict import HeaderChange

import daemon_milter_client
from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway
from daemon_milter_client import ALL_PROTOCOL, SMFIP_HDR_LEADSPC, MilterSession
from daemon_process import REPO, Daemon

SERVER_ID = "mx.arc.test"
ZONE = "arc.test"


def keygen(directory: Path, domain: str) -> tuple[LoadedKey, Path]:
    done = subprocess.run(
        [MAILGATE, "dkim", "keygen", domain, "s1", "--dir", str(directory), "--bits", "1024"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    path = directory / f"{domain}.s1.key"
    return load_key(path), path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[LoadedKey, Path]]:
    directory = tmp_path_factory.mktemp("arckeys")
    return {
        name: keygen(directory, f"{name}.{ZONE}") for name in ("a", "b", "gw", "broken", "other")
    }


def quoted(text: str) -> str:
    return " ".join(f'"{part}"' for part in txt_strings(text))


@pytest.fixture(scope="module")
def dns(keys) -> Iterator[object]:
    lines = [
        f"$ORIGIN {ZONE}.",
        "$TTL 300",
        f"@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60",
    ]
    for name in ("a", "b", "gw", "broken"):
        key = keys[name][0]
        lines.append(f"s1._domainkey.{name} IN TXT {quoted(dns_record(key.algorithm, key.public))}")
    lines.append('s1._domainkey.garbage IN TXT "v=DKIM1; k=rsa; p=MIIBIjANBgkq!!!notbase64"')
    lines.append('s1._domainkey.notakey IN TXT "hello world"')
    with dns_server(
        "\n".join(lines) + "\n",
        servfail_suffixes=[f"broken.{ZONE}"],
        drop_suffixes=[f"slow.{ZONE}"],
    ) as server:
        yield server


def message(subject: str = "hello", body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: News <news@sender.example>\r\nTo: alice@{DOMAIN}\r\nSubject: {subject}\r\n"
        f"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{time.time_ns()}@arc.test>\r\n"
        "\r\n"
    ).encode() + body


def sealed(raw: bytes, key: LoadedKey, name: str, cv: str) -> bytes:
    """``raw`` with the next ARC set by ``name``.arc.test (a forwarder's, as it would add it)."""
    domain = f"{name}.{ZONE}"
    chain = ChainResult(cv)  # type: ignore[arg-type]
    ar = authentication_results(f"mx.{domain}", [arc_result(chain, "192.0.2.1")])
    stamped = b"Authentication-Results: " + ar.encode() + b"\r\n" + raw
    fields = seal_message(stamped, domain, "s1", key, f"mx.{domain}", ["from", "to", "subject"])
    head = b"".join(
        n.encode() + b": " + v.replace("\n", "\r\n").encode() + b"\r\n" for n, v in fields
    )
    return head + raw


def validate(dns, raw: bytes) -> ChainResult:
    dnsfunc = make_dnsfunc(Resolver([dns.address], timeout=1.0), time.monotonic() + 10)
    return verify_chain(raw, Settings(), dnsfunc)


# -- pure parts -----------------------------------------------------------------------------


def test_settings_are_checked(tmp_path: Path) -> None:
    seal = {"domain": "Example.COM.", "selector": "arc", "key": str(tmp_path / "k")}
    assert Settings.model_validate({"seal": seal}).seal.domain == "example.com"
    assert Settings.model_validate({"seal": seal}).seal.enabled
    assert not Settings().seal.enabled
    with pytest.raises(ValidationError, match="give all three"):
        Settings.model_validate({"seal": {"domain": "example.com"}})
    with pytest.raises(ValidationError, match="not a domain name"):
        Settings.model_validate({"seal": {**seal, "domain": "nodots"}})
    with pytest.raises(ValidationError, match="selector"):
        Settings.model_validate({"seal": {**seal, "selector": "bad sel"}})
    with pytest.raises(ValidationError, match="must not be covered"):
        Settings.model_validate({"seal": {"headers": ["From", "ARC-Seal"]}})
    with pytest.raises(ValidationError, match="From must be covered"):
        Settings.model_validate({"seal": {"headers": ["Subject"]}})
    with pytest.raises(ValidationError, match="not an IP network"):
        Settings.model_validate({"seal": {"networks": ["10.0.0.0/33"]}})
    with pytest.raises(ValidationError):
        Settings.model_validate({"seal": {"report": ["dmarc"]}})
    with pytest.raises(ValidationError):
        Settings.model_validate({"unknown": 1})


def test_shipped_rules_check_and_pass_their_tests() -> None:
    import yaml

    path = REPO / "rules" / "arc.yaml"
    for command in ("check", "test"):
        done = subprocess.run(
            [MAILGATE, "rules", command, str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed, 0 failed" in done.stdout
    written = yaml.safe_load(path.read_text())["settings"]
    assert Settings.model_validate(written) == Settings()


def test_chain_interpretation_and_seal_decisions() -> None:
    details = [
        InstanceResult(3, "pass", "c.example", ams_valid=True, seal_valid=True),
        InstanceResult(2, "pass", "b.example", ams_valid=False, seal_valid=True),
        InstanceResult(1, "none", "a.example", ams_valid=True, seal_valid=True),
    ]
    assert oldest_pass(details) == 3
    assert oldest_pass([InstanceResult(1, "none", ams_valid=True)]) == 0
    chain = interpret(3, ["a.example", "b.example", "c.example"], "pass", details, "success")
    assert (chain.result, chain.oldest_pass, chain.terminated) == ("pass", 3, False)
    assert facts(chain) == {
        "arc": "pass",
        "arc_instances": 3,
        "arc_oldest_pass": 3,
        "arc_domains": ["a.example", "b.example", "c.example"],
        "arc_reason": "chain of 3 ARC sets validated",
    }
    assert seal_cv(chain) == ("pass", "")
    assert interpret(0, [], "none", [], "").result == "none"
    assert seal_cv(interpret(0, [], "none", [], "")) == ("none", "")
    # A failure is sealed with cv=fail unless the newest seal already said so.
    failed = interpret(2, ["a", "b"], "fail", [], "ARC-Seal[1] did not validate", "pass")
    assert failed.result == "fail" and seal_cv(failed) == ("fail", "")
    ended = interpret(2, ["a", "b"], None, [], "terminated", "fail")
    assert ended.result == "fail" and ended.terminated and seal_cv(ended)[0] is None
    # More than 50 sets: fail, whatever was verified; 50 sets: valid but not extended.
    assert interpret(51, [], "pass", [], "").result == "fail"
    at_limit = interpret(50, [], "pass", [], "")
    assert at_limit.result == "pass" and seal_cv(at_limit)[0] is None
    temp = ChainResult("temperror", instances=1)
    assert seal_cv(temp)[0] is None
    # The A-R text names our authserv-id, the result, the sealers and the client.
    text = authentication_results(SERVER_ID, [arc_result(chain, "192.0.2.7")])
    assert "(chain of 3 ARC sets validated; sealed by a.example b.example c.example)" in text
    parsed = authres.AuthenticationResultsHeader.parse_value(text)
    assert parsed.authserv_id == SERVER_ID
    (item,) = parsed.results
    assert (item.method, item.result) == ("arc", "pass")
    props = {(p.type, p.name): p.value for p in item.properties}
    assert props == {("header", "oldest-pass"): "3", ("smtp", "remote-ip"): "192.0.2.7"}


def test_which_mail_is_sealed(tmp_path: Path) -> None:
    seal = {"domain": "gw.example", "selector": "s", "key": str(tmp_path / "k")}
    settings = Settings.model_validate({"seal": {**seal, "networks": ["10.1.0.0/16"]}})
    assert selected(settings, None, "10.1.2.3") and selected(settings, None, "::ffff:10.1.2.3")
    assert not selected(settings, None, "10.2.0.1") and not selected(settings, "alice", "")
    auth = Settings.model_validate({"seal": {**seal, "authenticated": True}})
    assert selected(auth, "alice", "203.0.113.1") and not selected(auth, None, "203.0.113.1")
    assert selected(Settings.model_validate({"seal": {**seal, "all": True}}), None, "")
    changes = [
        HeaderChange(op="add", name="X-Mailgate-ARC-Seal", value="no"),
        HeaderChange(op="add", name="X-Other", value="1"),
        HeaderChange(op="add", name="x-mailgate-arc-seal", value="yes"),
    ]
    wanted, rest = seal_control(changes)
    assert wanted is True and [c.name for c in rest] == ["X-Other"]
    assert seal_control(rest) == (None, rest)
    headers = [("From", "a"), ("To", "b"), ("To", "c"), ("Received", "x"), ("X-A", "s")]
    assert signed_fields(Settings(), headers) == ["from", "to", "to"]


# -- chains validated against the loopback DNS server ----------------------------------------


@pytest.mark.slow
def test_every_chain_result(dns, keys) -> None:
    a, b, other, broken = keys["a"][0], keys["b"][0], keys["other"][0], keys["broken"][0]
    raw = message()
    # No ARC headers at all.
    none = validate(dns, raw)
    assert (none.result, none.instances, none.domains) == ("none", 0, ())
    # Sealed once.
    once = sealed(raw, a, "a", "none")
    chain = validate(dns, once)
    assert (chain.result, chain.instances, chain.oldest_pass) == ("pass", 1, 0)
    assert chain.domains == (f"a.{ZONE}",)
    # Twice, by two domains.
    twice = sealed(once, b, "b", "pass")
    chain = validate(dns, twice)
    assert (chain.result, chain.instances) == ("pass", 2)
    assert chain.domains == (f"a.{ZONE}", f"b.{ZONE}")
    # Signed by a key other than the one published: AMS and seal both fail.
    forged = sealed(raw, other, "a", "none")
    assert validate(dns, forged).result == "fail"
    # A broken seal beside a valid AMS (the AAR, covered by the seal only, was changed).
    broken_seal = once.replace(b"arc=none", b"arc=pass", 1)
    assert broken_seal != once
    chain = validate(dns, broken_seal)
    assert chain.result == "fail" and "ARC-Seal[1] did not validate" in chain.reason
    # A seal whose signed ARC fields were changed afterwards.
    tampered = twice.replace(b"arc=pass", b"arc=fail", 1)
    assert tampered != twice
    assert validate(dns, tampered).result == "fail"
    # The body changed after a valid seal: the newest AMS fails, so the chain does.
    changed = validate(dns, once.replace(b"Hello.", b"Changed."))
    assert changed.result == "fail" and "ARC-Message-Signature" in changed.reason
    # cv=pass claimed on the first set: invalid.
    assert validate(dns, once.replace(b"cv=none", b"cv=pass", 1)).result == "fail"
    # The key's lookup fails (SERVFAIL): temperror, neither pass nor fail.
    chain = validate(dns, sealed(raw, broken, "broken", "none"))
    assert chain.result == "temperror" and "key lookup failed" in chain.reason
    assert seal_cv(chain)[0] is None
    # Garbage where the key should be: the seal does not verify (fail), nothing breaks.
    for name in ("garbage", "notakey"):
        chain = validate(dns, sealed(raw, a, name, "none"))
        assert chain.result == "fail", (name, chain)
    # A missing set in the middle, and ARC fields without an instance.
    gap = sealed(once, b, "b", "pass").replace(b"i=1;", b"i=7;")
    assert validate(dns, gap).result == "fail"
    assert validate(dns, b"ARC-Seal: cv=none; d=x.example\r\n" + raw).result == "fail"
    # More than 50 sets fail at once, without a lookup.
    before = dns.resolver.count(f"s1._domainkey.a.{ZONE}")
    many = once.replace(b"i=1;", b"i=51;")
    chain = validate(dns, many)
    assert (chain.result, chain.instances) == ("fail", 51)
    assert dns.resolver.count(f"s1._domainkey.a.{ZONE}") == before
    # A chain whose newest seal says cv=fail is over.
    ended = validate(dns, sealed(forged, b, "b", "fail"))
    assert ended.result == "fail" and ended.terminated and seal_cv(ended)[0] is None


# -- the daemon -----------------------------------------------------------------------------


def rules_text(
    ns: str, seal: str = "", custom: str = "", authentication_results: bool = True
) -> str:
    """The shipped rule file with its settings pointed at the test server and keys."""
    text = (REPO / "rules" / "arc.yaml").read_text()
    settings = (
        "settings:\n"
        f'  dns: {{nameservers: ["{ns}"], timeout: 1.0}}\n'
        "  timeout: 5.0\n"
        f"  seal: {seal or '{}'}\n"
        f"  authserv_id: {SERVER_ID}\n"
        f"  authentication_results: {str(authentication_results).lower()}\n\nrules:"
    )
    text = re.sub(r"(?ms)^settings:.*?^rules:", lambda _: settings, text)
    if custom:
        text = text.replace("\nrules:\n", "\nrules:\n" + custom, 1)
    return text


CUSTOM_RULES = """  - name: seal-relay
    if: {client_ip: [198.51.100.0/24]}
    then: [{add_header: {name: X-Mailgate-ARC-Seal, value: "yes"}}, continue]
  - name: no-seal-bulk
    if: {envelope: {part: localpart, from: {is: bulk}}}
    then: [{add_header: {name: X-Mailgate-ARC-Seal, value: "no"}}, continue]
  - name: tag
    if: {header: {name: Subject, contains: tagme}}
    then: [{tag_subject: "[LIST]"}, continue]
"""


def seal_yaml(key: Path, **extra: str) -> str:
    more = "".join(f", {name}: {value}" for name, value in extra.items())
    return f"{{domain: gw.{ZONE}, selector: s1, key: '{key}', networks: [10.9.0.0/16]{more}}}"


def start_daemon(tmp: Path, text: str, name: str = "arc", socket: str | None = None) -> Daemon:
    rules = tmp / f"{name}.yaml"
    rules.write_text(text)
    spec = socket or f"unix:{tmp / 'run' / (name + '.sock')}"
    return Daemon("arc", spec, tmp / f"{name}.log", rules=rules).start()


@pytest.fixture(scope="module")
def daemon(dns, keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("arcd")
    process = start_daemon(
        tmp, rules_text(dns.address, seal_yaml(keys["gw"][1]), custom=CUSTOM_RULES)
    )
    yield process
    assert process.stop() == 0


def send(
    daemon: Daemon,
    raw: bytes,
    *,
    sender: str = "news@sender.example",
    ip: str = "192.0.2.10",
    auth_user: str | None = None,
    leading_space: bool = True,
):
    protocol = ALL_PROTOCOL if leading_space else ALL_PROTOCOL & ~SMFIP_HDR_LEADSPC
    mail = {"i": "4ARC1"}
    if auth_user:
        mail["{auth_authen}"] = auth_user
    with MilterSession(daemon.address, protocol=protocol) as session:
        session.connect("client.example", ip)
        session.helo("client.example")
        negotiated = bool(session.protocol & SMFIP_HDR_LEADSPC)
        original = daemon_milter_client._headers
        if negotiated:
            # With HDR_LEADSPC an MTA sends each value as it is, its leading space included.
            daemon_milter_client._headers = _headers_as_they_are
        try:
            result = session.send_message(
                sender, [f"alice@{DOMAIN}"], raw, macros={"mail": mail, "eom": {"i": "4ARC1"}}
            )
        finally:
            daemon_milter_client._headers = original
    return result, negotiated


def _headers_as_they_are(head: bytes) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + line.decode())
        elif line:
            name, _, value = line.partition(b":")
            fields.append((name.decode(), value.decode()))
    return fields


def inserted(result, name: str) -> list[str]:
    return [v for _, n, v in result.headers_inserted() if n == name]


def arc_ar(result) -> str:
    (value,) = inserted(result, "Authentication-Results")
    parsed = authres.AuthenticationResultsHeader.parse_value(value.strip())
    assert parsed.authserv_id == SERVER_ID
    (item,) = parsed.results
    assert item.method == "arc"
    return str(item.result)


def as_delivered(result, raw: bytes, leading_space: bool) -> bytes:
    """``raw`` with the inserted fields on top, as the MTA writes them (each at index 0)."""
    head = b""
    for index, name, value in result.headers_inserted():
        assert index == 0
        value = value if leading_space else " " + value
        head = name.encode() + b":" + value.replace("\n", "\r\n").encode() + b"\r\n" + head
    return head + raw


@pytest.mark.slow
def test_daemon_records_every_result(daemon: Daemon, keys) -> None:
    a, broken = keys["a"][0], keys["broken"][0]
    raw = message()
    once = sealed(raw, a, "a", "none")
    cases = [
        (raw, "none"),
        (once, "pass"),
        (sealed(once, keys["b"][0], "b", "pass"), "pass"),
        (sealed(raw, keys["other"][0], "a", "none"), "fail"),
        (once.replace(b"Hello.", b"Changed."), "fail"),
        (sealed(raw, broken, "broken", "none"), "temperror"),
        # A nameserver that does not answer: temperror once the lookup times out.
        (sealed(raw, broken, "slow", "none"), "temperror"),
    ]
    for text, expected in cases:
        for leading_space in (True, False):
            result, negotiated = send(daemon, text, leading_space=leading_space)
            assert negotiated == leading_space
            assert result.action == "accept", result.reply
            assert arc_ar(result) == expected
            assert inserted(result, "ARC-Seal") == []  # not selected for sealing
    log = daemon.log()
    assert "body hash mismatch" not in log  # dkimpy's own lines are not logged
    assert f"ARC temperror i=1 sealers=broken.{ZONE}" in log
    assert f"ARC pass i=2 sealers=a.{ZONE},b.{ZONE}" in log


@pytest.mark.slow
def test_daemon_seals_and_the_seal_validates(daemon: Daemon, dns, keys) -> None:
    # Unsealed mail from a forwarding host: i=1 cv=none, SPF and DKIM reported in the AAR.
    raw = message(subject="forwarded")
    result, leading_space = send(daemon, raw, ip="10.9.1.1")
    assert result.action == "accept"
    (seal,) = inserted(result, "ARC-Seal")
    assert "i=1;" in seal and "cv=none" in seal and f"d=gw.{ZONE}" in seal
    (aar,) = inserted(result, "ARC-Authentication-Results")
    assert re.match(rf"\s*i=1; {re.escape(SERVER_ID)};", aar)
    assert "arc=none" in aar and "spf=" in aar and "dkim=none" in aar
    names = [n for _, n, _ in result.headers_inserted()]
    assert names == [
        "Authentication-Results",
        "ARC-Authentication-Results",
        "ARC-Message-Signature",
        "ARC-Seal",
    ]
    delivered = as_delivered(result, raw, leading_space)
    chain = validate(dns, delivered)
    assert (chain.result, chain.instances, chain.domains) == ("pass", 1, (f"gw.{ZONE}",))
    # Our seal on top of another's: i=2 cv=pass, and the whole chain validates.
    once = sealed(message(subject="via a list"), keys["a"][0], "a", "none")
    for leading_space in (True, False):
        result, negotiated = send(daemon, once, ip="10.9.1.1", leading_space=leading_space)
        (seal,) = inserted(result, "ARC-Seal")
        assert "i=2;" in seal and "cv=pass" in seal
        chain = validate(dns, as_delivered(result, once, negotiated))
        assert (chain.result, chain.instances) == ("pass", 2)
        assert chain.domains == (f"a.{ZONE}", f"gw.{ZONE}")
    # A DKIM signature of the message is checked and reported in the AAR.
    gw = keys["gw"][0]
    value = sign_message(
        raw, f"gw.{ZONE}", "s1", gw, gw.algorithm, ["from", "subject"], "relaxed/relaxed"
    )
    dkim_signed = b"DKIM-Signature: " + value.replace("\n", "\r\n").encode() + b"\r\n" + raw
    result, _ = send(daemon, dkim_signed, ip="10.9.1.1")
    (aar,) = inserted(result, "ARC-Authentication-Results")
    assert re.search(rf"dkim=pass[^;]*header\.d=gw\.{ZONE}", " ".join(aar.split())), aar
    # A broken chain is sealed with cv=fail; one that already ended is not sealed again.
    broken = once.replace(b"Hello.", b"Changed.")
    result, _ = send(daemon, broken, ip="10.9.1.1")
    (seal,) = inserted(result, "ARC-Seal")
    assert "i=2;" in seal and "cv=fail" in seal
    result, _ = send(daemon, sealed(broken, keys["b"][0], "b", "fail"), ip="10.9.1.1")
    assert inserted(result, "ARC-Seal") == [] and arc_ar(result) == "fail"
    # A chain that could not be validated is not sealed.
    result, _ = send(daemon, sealed(raw, keys["broken"][0], "broken", "none"), ip="10.9.1.1")
    assert inserted(result, "ARC-Seal") == [] and arc_ar(result) == "temperror"
    assert "not sealed: the chain could not be validated" in daemon.log()
    assert f"ARC sealed i=2 cv=pass d=gw.{ZONE} s=s1" in daemon.log()


@pytest.mark.slow
def test_rules_steer_sealing_and_changes_are_sealed(daemon: Daemon, dns) -> None:
    raw = message(subject="tagme")
    # A rule asks for a seal where the settings do not; the subject is sealed as tagged.
    result, leading_space = send(daemon, raw, ip="198.51.100.7")
    assert len(inserted(result, "ARC-Seal")) == 1
    assert "X-Mailgate-ARC-Seal" not in str(result.modifications)
    assert result.headers_changed() == [
        (1, "Subject", (" " if leading_space else "") + "[LIST] tagme")
    ]
    delivered = as_delivered(
        result, raw.replace(b"Subject: tagme", b"Subject: [LIST] tagme"), leading_space
    )
    assert validate(dns, delivered).result == "pass"
    # A rule says no for a selected client.
    result, _ = send(daemon, raw, sender="bulk@sender.example", ip="10.9.1.1")
    assert inserted(result, "ARC-Seal") == []
    # Authenticated users are accepted first: nothing is validated, nothing added.
    result, _ = send(daemon, raw, auth_user="alice")
    assert result.headers_inserted() == []


@pytest.mark.slow
def test_forged_results_are_removed(daemon: Daemon) -> None:
    raw = message().replace(
        b"Subject:",
        f"Authentication-Results: {SERVER_ID}; arc=pass\r\n".encode()
        + b"Authentication-Results: other.example; arc=pass\r\nSubject:",
    )
    result, _ = send(daemon, raw)
    assert result.headers_changed() == [(1, "Authentication-Results", "")]
    assert arc_ar(result) == "none"


@pytest.mark.slow
def test_an_unusable_key_tempfails_or_passes_unsealed(dns, keys, tmp_path: Path) -> None:
    seal = seal_yaml(tmp_path / "missing.key")
    daemon = start_daemon(tmp_path, rules_text(dns.address, seal))
    try:
        result, _ = send(daemon, message(), ip="10.9.1.1")
        assert result.action == "tempfail"
        assert result.reply.text.startswith("451 4.3.0 ARC sealing failed")
        assert f"cannot seal: d=gw.{ZONE} s=s1" in daemon.log()
        # on_error: accept lets it through unsealed (after a reload).
        (tmp_path / "arc.yaml").write_text(
            rules_text(dns.address, seal_yaml(tmp_path / "missing.key", on_error="accept"))
        )
        assert "reloaded rules" in daemon.reload()
        result, _ = send(daemon, message(), ip="10.9.1.1")
        assert result.action == "accept" and inserted(result, "ARC-Seal") == []
        # An Ed25519 key cannot seal (RFC 8617: rsa-sha256 only).
        ed = tmp_path / "ed"
        ed.mkdir()
        done = subprocess.run(
            [MAILGATE, "dkim", "keygen", f"gw.{ZONE}", "s1", "--dir", str(ed), "--ed25519"],
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0
        (tmp_path / "arc.yaml").write_text(
            rules_text(dns.address, seal_yaml(ed / f"gw.{ZONE}.s1.key"))
        )
        assert "reloaded rules" in daemon.reload()
        result, _ = send(daemon, message(), ip="10.9.1.1")
        assert result.action == "tempfail" and "RSA keys only" in daemon.log()
        # With the dmarc daemon writing the one Authentication-Results field, this daemon
        # adds none, and still seals.
        (tmp_path / "arc.yaml").write_text(
            rules_text(dns.address, seal_yaml(keys["gw"][1]), authentication_results=False)
        )
        assert "reloaded rules" in daemon.reload()
        raw = message()
        result, leading_space = send(daemon, raw, ip="10.9.1.1")
        names = [n for _, n, _ in result.headers_inserted()]
        assert names == ["ARC-Authentication-Results", "ARC-Message-Signature", "ARC-Seal"]
        assert validate(dns, as_delivered(result, raw, leading_space)).result == "pass"
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_dns_down_gives_temperror_within_the_timeout(keys, tmp_path: Path) -> None:
    import peers

    # A nameserver that never answers: the result comes within the timeouts, as temperror.
    silent = f"127.0.0.1:{peers.free_port()}"
    daemon = start_daemon(tmp_path, rules_text(silent))
    try:
        result, _ = send(daemon, sealed(message(), keys["a"][0], "a", "none"))
        assert result.action == "accept" and arc_ar(result) == "temperror"
    finally:
        assert daemon.stop() == 0


# -- real MTAs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_postfix_with_the_daemon_seals_on_top_of_a_chain(dns, keys, tmp_path: Path) -> None:
    import peers

    port = peers.free_port()
    seal = seal_yaml(keys["gw"][1]).replace("10.9.0.0/16", "127.0.0.0/8")
    daemon = start_daemon(tmp_path, rules_text(dns.address, seal), socket=f"inet:{port}@127.0.0.1")
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            raw = sealed(message(subject="via postfix"), keys["a"][0], "a", "none")
            with mta.smtp() as client:
                client.sendmail("news@sender.example", [f"r@{peers.DOMAIN}"], raw)
            delivered = mta.wait_delivered(1)
            assert len(delivered) == 1, mta.log()
    finally:
        assert daemon.stop() == 0
    crlf = delivered[0].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = crlf.split(b"\r\n\r\n")[0].decode()
    assert re.search(rf"^Authentication-Results: {re.escape(SERVER_ID)};\s+arc=pass", head, re.M)
    chain = validate(dns, crlf)
    assert (chain.result, chain.instances) == ("pass", 2), head
    assert chain.domains == (f"a.{ZONE}", f"gw.{ZONE}")


@pytest.mark.slow
def test_core_chain_records_the_arc_result(dns, keys, tmp_path: Path) -> None:
    rules = tmp_path / "arc.yaml"
    rules.write_text(rules_text(dns.address))
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n  - name: arc\n    daemon: arc\n    rules: {rules}\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    try:
        with gateway.smtp() as client:
            raw = sealed(message(subject="core"), keys["a"][0], "a", "none")
            assert client.sendmail("news@sender.example", [f"alice@{DOMAIN}"], raw) == {}
            broken = raw.replace(b"Hello.", b"Changed.")
            assert client.sendmail("news@sender.example", [f"alice@{DOMAIN}"], broken) == {}
        delivered = gateway.wait_delivered(f"alice@{DOMAIN}", 2)
    finally:
        gateway.stop()
    assert len(delivered) == 2, gateway.log()
    results = sorted(
        re.search(
            rf"Authentication-Results: {re.escape(SERVER_ID)};\s+arc=(\w+)", item.decode()
        ).group(1)
        for item in delivered
    )
    assert results == ["fail", "pass"]
