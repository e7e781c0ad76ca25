"""The dkim daemon and `mailgate dkim keygen|check`.

Pure parts first (settings, which mail is signed, the header texts, sign-then-verify with a
table of key records), then the commands and the daemon against a loopback DNS server
whose zone holds RSA (split into several strings) and Ed25519 keys, a key in bad base64, a
revoked key and a name that answers SERVFAIL; then Postfix with the daemon as its milter,
and mailgate's core with the daemon beside opendkim, each verifying the other's signature.
"""

from __future__ import annotations

import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import authres
import pytest
from dnsserver import dns_server
from pydantic import ValidationError

from mailgate.core.dns import Resolver
from mailgate.milters.dkim import (
    KeyFileError,
    KeyLookupError,
    LoadedKey,
    load_key,
    make_dnsfunc,
    parse_private_key,
    sign_message,
    verify_message,
)
from mailgate.milters.dkim_cli import dns_record, txt_strings
from mailgate.policies.authresults import forged_removals
from mailgate.policies.dkim import (
    Settings,
    SignatureResult,
    apply_changes,
    authentication_results,
    facts,
    selected,
    sign_control,
    signed_fields,
    signing_domain,
    summary,
)
from mailgate.policies.verdict import HeaderChange

import daemon_milter_client
from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway
from daemon_milter_client import ALL_PROTOCOL, SMFIP_HDR_LEADSPC, MilterSession
from daemon_process import REPO, Daemon

SERVER_ID = "mx.dkim.test"
ZONE_DOMAIN = "dkim.test"


def keygen(directory: Path, domain: str, selector: str, *extra: str) -> tuple[LoadedKey, Path]:
    done = subprocess.run(
        [MAILGATE, "dkim", "keygen", domain, selector, "--dir", str(directory), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    path = directory / f"{domain}.{selector}.key"
    return load_key(path), path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[LoadedKey, Path]]:
    directory = tmp_path_factory.mktemp("dkimkeys")
    return {
        "rsa": keygen(directory, ZONE_DOMAIN, "rsa"),
        "ed": keygen(directory, ZONE_DOMAIN, "ed", "--ed25519"),
        "new": keygen(directory, ZONE_DOMAIN, "new", "--bits", "1024"),
        "other": keygen(directory, ZONE_DOMAIN, "other", "--bits", "1024"),
    }


def record(key: LoadedKey) -> str:
    return dns_record(key.algorithm, key.public)


def quoted(text: str) -> str:
    return " ".join(f'"{part}"' for part in txt_strings(text))


def message(
    sender: str = f"news@{ZONE_DOMAIN}",
    subject: str = "hello",
    body: bytes = b"Hello.\r\n",
    extra: bytes = b"",
) -> bytes:
    return (
        (
            f"From: News <{sender}>\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{time.time_ns()}@dkim.test>\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def signed(
    raw: bytes,
    key: LoadedKey,
    selector: str,
    domain: str = ZONE_DOMAIN,
    canonicalization: str = "relaxed/relaxed",
) -> bytes:
    """``raw`` with a DKIM-Signature of ``key`` on top (CRLF line ends)."""
    value = sign_message(
        raw,
        domain,
        selector,
        key,
        key.algorithm,
        ["from", "to", "subject", "date", "message-id", "from"],
        canonicalization,
    )
    return b"DKIM-Signature: " + value.replace("\n", "\r\n").encode() + b"\r\n" + raw


def table(records: dict[str, str | None]):
    def dnsfunc(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        text = (name.decode() if isinstance(name, bytes) else name).rstrip(".")
        if text.endswith("down.test"):
            raise KeyLookupError(f"{text}: timed out")
        value = records.get(text)
        return value.encode() if value is not None else None

    return dnsfunc


# -- pure parts -----------------------------------------------------------------------------


def test_settings_are_checked(tmp_path: Path) -> None:
    key = {"selector": "s1", "key": str(tmp_path / "k")}
    assert Settings.model_validate({"keys": {"Example.COM.": key}}).keys["example.com"][0].key
    with pytest.raises(ValidationError, match="not a domain name"):
        Settings.model_validate({"keys": {"nodots": [key]}})
    with pytest.raises(ValidationError, match="selector"):
        Settings.model_validate({"keys": {"a.example": [{**key, "selector": "bad sel"}]}})
    with pytest.raises(ValidationError, match="listed twice"):
        Settings.model_validate({"keys": {"a.example": [key, key]}})
    with pytest.raises(ValidationError, match="From must be signed"):
        Settings.model_validate({"headers": ["Subject"]})
    with pytest.raises(ValidationError, match="must not be signed"):
        Settings.model_validate({"headers": ["From", "Received"]})
    with pytest.raises(ValidationError, match="not an IP network"):
        Settings.model_validate({"sign": {"networks": ["10.0.0.0/33"]}})
    with pytest.raises(ValidationError):
        Settings.model_validate({"canonicalization": "relaxed"})


def test_shipped_rules_check_and_pass_their_tests() -> None:
    path = REPO / "rules" / "dkim.yaml"
    for command in ("check", "test"):
        done = subprocess.run(
            [MAILGATE, "rules", command, str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert "10 passed, 0 failed" in done.stdout


def test_shipped_settings_are_the_model_defaults() -> None:
    import yaml

    written = yaml.safe_load((REPO / "rules" / "dkim.yaml").read_text())["settings"]
    assert Settings.model_validate(written) == Settings()


def test_which_mail_is_signed(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "keys": {"example.com": [{"selector": "a", "key": str(tmp_path / "a")}]},
            "sign": {"networks": ["10.1.0.0/16", "2001:db8::/32"], "subdomains": True},
        }
    )
    assert selected(settings, "alice", "203.0.113.1")
    assert selected(settings, None, "10.1.2.3")
    assert selected(settings, None, "::ffff:10.1.2.3")
    assert selected(settings, None, "2001:db8::5")
    assert not selected(settings, None, "10.2.0.1")
    assert not selected(settings, None, "")
    assert signing_domain(settings, [("From", "A <a@Example.COM>")]) == "example.com"
    assert signing_domain(settings, [("From", "a@news.example.com")]) == "example.com"
    assert signing_domain(settings, [("From", "a@example.org")]) is None
    # Several authors, or two From fields: no one domain to sign as.
    assert signing_domain(settings, [("From", "a@example.com, b@example.com")]) is None
    assert signing_domain(settings, [("From", "a@example.com"), ("From", "b@example.com")]) is None
    strict = settings.model_copy(
        update={"sign": settings.sign.model_copy(update={"subdomains": False})}
    )
    assert signing_domain(strict, [("From", "a@news.example.com")]) is None


def test_rule_control_of_signing_and_signed_fields() -> None:
    changes = [
        HeaderChange(op="add", name="X-Mailgate-DKIM-Sign", value="yes"),
        HeaderChange(op="add", name="X-Other", value="1"),
        HeaderChange(op="add", name="x-mailgate-dkim-sign", value="no"),
    ]
    wanted, rest = sign_control(changes)
    assert wanted is False and [c.name for c in rest] == ["X-Other"]
    assert sign_control(rest) == (None, rest)
    headers = [("From", "a"), ("To", "b"), ("To", "c"), ("Received", "x"), ("Subject", "s")]
    assert signed_fields(Settings(), headers) == ["from", "subject", "to", "to", "from"]


def test_header_changes_are_applied_like_the_mta() -> None:
    headers = [(b"Subject", b" one"), (b"X-A", b" 1"), (b"X-A", b" 2")]
    changes = [
        HeaderChange(op="change", name="Subject", value="[TAG] one"),
        HeaderChange(op="change", name="X-A", value="", index=2),
        HeaderChange(op="insert", name="X-Top", value="t", index=0),
        HeaderChange(op="add", name="X-End", value="e"),
        HeaderChange(op="change", name="X-Missing", value="m"),
    ]
    assert apply_changes(headers, changes) == [
        (b"X-Top", b" t"),
        (b"Subject", b" [TAG] one"),
        (b"X-A", b" 1"),
        (b"X-End", b" e"),
        (b"X-Missing", b" m"),
    ]


def test_results_facts_and_authentication_results() -> None:
    results = [
        SignatureResult("fail", "a.example", "s1", "rsa-sha256", "body hash did not verify"),
        SignatureResult(
            "pass", "b.example", "s2", "ed25519-sha256", "ed25519 key", b_prefix="abcd"
        ),
    ]
    assert summary(results) == "pass"
    assert summary([SignatureResult("fail"), SignatureResult("temperror")]) == "temperror"
    assert summary([]) == "none"
    found = facts(results)
    assert found["dkim"] == ["fail", "pass"]
    assert found["dkim_pass_domains"] == ["b.example"]
    assert found["dkim_domains"] == ["a.example", "b.example"]
    assert found["dkim_results"][0] == {
        "result": "fail",
        "domain": "a.example",
        "selector": "s1",
        "algorithm": "rsa-sha256",
        "reason": "body hash did not verify",
    }
    assert facts([])["dkim"] == ["none"]
    parsed = authres.AuthenticationResultsHeader.parse_value(
        authentication_results(results, SERVER_ID)
    )
    assert parsed.authserv_id == SERVER_ID
    assert [(r.method, r.result, r.header_d, r.header_s) for r in parsed.results] == [
        ("dkim", "fail", "a.example", "s1"),
        ("dkim", "pass", "b.example", "s2"),
    ]
    none = authres.AuthenticationResultsHeader.parse_value(authentication_results([], SERVER_ID))
    assert [(r.method, r.result) for r in none.results] == [("dkim", "none")]
    headers = [
        ("Authentication-Results", "other.example; dkim=pass"),
        ("Authentication-Results", f"{SERVER_ID}; dkim=pass header.d=forged.example"),
        ("Authentication-Results", f"(c) {SERVER_ID.upper()}; dkim=pass"),
    ]
    assert forged_removals(headers, SERVER_ID) == [
        HeaderChange(op="change", name="Authentication-Results", value="", index=3),
        HeaderChange(op="change", name="Authentication-Results", value="", index=2),
    ]


def test_sign_then_verify_every_result(keys) -> None:
    rsa, ed, other = keys["rsa"][0], keys["ed"][0], keys["other"][0]
    records: dict[str, str | None] = {
        "rsa._domainkey.dkim.test": record(rsa),
        "ed._domainkey.dkim.test": record(ed),
        "bad._domainkey.dkim.test": "v=DKIM1; k=rsa; p=!!notbase64!!",
        "revoked._domainkey.dkim.test": "v=DKIM1; k=rsa; p=",
        "sha1only._domainkey.dkim.test": record(rsa).replace("h=sha256", "h=sha1"),
        "rsa._domainkey.down.test": record(rsa),
    }
    settings = Settings()
    dnsfunc = table(records)

    def verify(raw: bytes) -> list[tuple[str, str]]:
        return [(r.result, r.reason) for r in verify_message(raw, settings, dnsfunc)]

    raw = message()
    for canonicalization in ("relaxed/relaxed", "simple/simple", "relaxed/simple"):
        assert verify(signed(raw, rsa, "rsa", canonicalization=canonicalization))[0][0] == "pass"
    assert verify(signed(raw, ed, "ed")) == [("pass", "ed25519 key")]
    assert verify(signed(raw, rsa, "rsa").replace(b"Hello.", b"Hellx.")) == [
        ("fail", "body hash did not verify")
    ]
    assert verify(signed(raw, rsa, "rsa").replace(b"Subject: hello", b"Subject: hellx")) == [
        ("fail", "signature did not verify")
    ]
    # Signed with another key than the one published: fail.
    assert verify(signed(raw, other, "rsa"))[0] == ("fail", "signature did not verify")
    assert verify(signed(raw, rsa, "bad"))[0][0] == "permerror"
    assert verify(signed(raw, rsa, "revoked")) == [
        ("fail", "key revoked._domainkey.dkim.test revoked")
    ]
    assert verify(signed(raw, rsa, "missing"))[0] == (
        "permerror",
        "no key for signature at missing._domainkey.dkim.test",
    )
    assert verify(signed(raw, rsa, "sha1only"))[0][0] == "permerror"
    assert verify(signed(raw, rsa, "rsa", domain="down.test"))[0][0] == "temperror"
    # An Ed25519 signature against an RSA record: a mismatch, not a crash.
    assert verify(signed(raw, ed, "rsa"))[0][0] == "permerror"
    assert verify(raw) == []
    # Both signatures of a message, each on its own; more than max_signatures: policy.
    twice = signed(signed(raw, rsa, "rsa"), ed, "missing")
    assert [r for r, _ in verify(twice)] == ["permerror", "pass"]
    few = settings.model_copy(update={"max_signatures": 1})
    assert [r.result for r in verify_message(twice, few, dnsfunc)] == ["permerror", "policy"]
    garbled = raw.replace(b"DKIM", b"").replace(b"From:", b"DKIM-Signature: v=1; a=\r\nFrom:")
    assert [r.result for r in verify_message(garbled, settings, dnsfunc)] == ["permerror"]
    truncated = verify_message(signed(raw, rsa, "rsa"), settings, dnsfunc, body_complete=False)
    assert [r.result for r in truncated] == ["policy"]


def test_private_key_formats(keys, tmp_path: Path) -> None:
    ed = keys["ed"][0]
    # dkimpy's dknewkey writes an Ed25519 key as the base64 seed: accepted too.
    seed = tmp_path / "seed.key"
    seed.write_bytes(ed.private + b"\n")
    assert load_key(seed).public == ed.public
    for bad in (b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(KeyFileError):
            parse_private_key(bad)
    with pytest.raises(KeyFileError, match="No such file"):
        load_key(tmp_path / "missing.key")


# -- the commands ---------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILGATE, "dkim", *args], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_keygen_writes_a_private_key_and_prints_the_record(tmp_path: Path, kind: str) -> None:
    extra = ["--ed25519"] if kind == "ed25519" else []
    done = run_cli("keygen", "Example.COM", "s2026", "--dir", str(tmp_path / "keys"), *extra)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "keys" / "example.com.s2026.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    key = load_key(path)
    assert key.algorithm == ("ed25519-sha256" if kind == "ed25519" else "rsa-sha256")
    strings = re.findall(r'"([^"]*)"', done.stdout)
    assert all(len(part.encode()) < 255 for part in strings)
    assert "".join(strings) == record(key)
    assert "s2026._domainkey.example.com. IN TXT" in done.stdout
    if kind == "rsa":
        assert len(strings) == 2 and key.bits == 2048
    # An existing key is never overwritten by accident.
    again = run_cli("keygen", "example.com", "s2026", "--dir", str(tmp_path / "keys"), *extra)
    assert again.returncode == 1 and "exists" in again.stderr
    assert load_key(path) == key
    assert run_cli("keygen", "nodots", "s1").returncode == 2


@pytest.fixture(scope="module")
def dns(keys) -> Iterator[object]:
    rsa, ed, new = keys["rsa"][0], keys["ed"][0], keys["new"][0]
    zone = f"""
$ORIGIN dkim.test.
$TTL 300
@                    IN SOA ns.dkim.test. hostmaster.dkim.test. 1 3600 600 86400 60
rsa._domainkey       IN TXT {quoted(record(rsa))}
ed._domainkey        IN TXT {quoted(record(ed))}
new._domainkey       IN TXT {quoted(record(new))}
bad._domainkey       IN TXT "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0B!!!notbase64"
revoked._domainkey   IN TXT "v=DKIM1; k=rsa; p="
testing._domainkey   IN TXT {quoted("v=DKIM1; k=rsa; t=y; p=" + rsa.public)}
"""
    with dns_server(
        zone, servfail_suffixes=["broken.dkim.test"], drop_suffixes=["slow.dkim.test"]
    ) as server:
        yield server


def test_check_reports_each_problem(keys, dns, tmp_path: Path) -> None:
    ns = ["--nameserver", dns.address]
    rsa_path, ed_path, other_path = keys["rsa"][1], keys["ed"][1], keys["other"][1]
    good = run_cli("check", "dkim.test", "rsa", "--key", str(rsa_path), *ns)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK: a valid 2048-bit RSA key" in good.stdout and "OK: matches" in good.stdout
    ed = run_cli("check", "dkim.test", "ed", "--key", str(ed_path), *ns)
    assert ed.returncode == 0 and "Ed25519 key" in ed.stdout, ed.stdout
    wrong = run_cli("check", "dkim.test", "rsa", "--key", str(other_path), *ns)
    assert wrong.returncode == 1
    assert "FAIL: the record does not hold the public half of" in wrong.stdout
    missing = run_cli("check", "dkim.test", "nothere", "--key", str(rsa_path), *ns)
    assert missing.returncode == 1 and "FAIL: does not exist" in missing.stdout
    revoked = run_cli("check", "dkim.test", "revoked", *ns)
    assert revoked.returncode == 1 and "revoked" in revoked.stdout
    bad = run_cli("check", "dkim.test", "bad", *ns)
    assert bad.returncode == 1 and "not valid base64" in bad.stdout
    testing = run_cli("check", "dkim.test", "testing", *ns)
    assert testing.returncode == 0 and "t=y" in testing.stdout and "record only" in testing.stdout
    broken = run_cli("check", "broken.dkim.test", "rsa", *ns)
    assert broken.returncode == 75 and "no answer" in broken.stdout
    # The key named by the rule file's keys: for that domain and selector.
    rules = tmp_path / "dkim.yaml"
    rules.write_text(
        "daemon: dkim\nsettings:\n"
        f"  dns: {{nameservers: ['{dns.address}']}}\n"
        f"  keys: {{dkim.test: [{{selector: ed, key: '{ed_path}'}}]}}\n"
    )
    from_rules = run_cli("check", "dkim.test", "ed", "--rules", str(rules))
    assert from_rules.returncode == 0 and f"from {rules}" in from_rules.stdout, from_rules.stdout
    unreadable = run_cli("check", "dkim.test", "rsa", "--key", str(tmp_path / "nokey"), *ns)
    assert unreadable.returncode == 2


# -- the daemon against the loopback DNS server ---------------------------------------------

CUSTOM_RULES = """rules:
  - name: no-sign-bulk
    if: {envelope: {part: localpart, from: {is: bulk}}}
    then: [{add_header: {name: X-Mailgate-DKIM-Sign, value: "no"}}, continue]
  - name: sign-relay
    if: {client_ip: [198.51.100.0/24]}
    then: [{add_header: {name: X-Mailgate-DKIM-Sign, value: "yes"}}, continue]
  - name: tag
    if: {header: {name: Subject, contains: tagme}}
    then: [{tag_subject: "[TAG]"}, continue]
  - name: reject-fail-for-bank
    if:
      allof:
        - {address: {name: From, part: domain, is: bank.dkim.test}}
        - not: {fact: {name: dkim_pass_domains, is: bank.dkim.test}}
    then: {reject: {code: 550, enhanced: 5.7.20, text: "No valid DKIM signature"}}
"""


def rules_text(
    ns: str, keys_yaml: str, networks: str = "[10.9.0.0/16]", custom: bool = True
) -> str:
    """The shipped rule file with its settings pointed at the test server and test keys."""
    text = (REPO / "rules" / "dkim.yaml").read_text()
    settings = (
        "settings:\n"
        f'  dns: {{nameservers: ["{ns}"], timeout: 1.0}}\n'
        "  timeout: 5.0\n"
        + (f"  keys:\n{keys_yaml}" if keys_yaml else "  keys: {}\n")
        + f"  sign: {{authenticated: true, networks: {networks}}}\n"
        f"  authserv_id: {SERVER_ID}\n\nrules:"
    )
    text = re.sub(r"(?ms)^settings:.*?^rules:", lambda _: settings, text)
    if custom:
        text = text.replace("\nrules:\n", "\n" + CUSTOM_RULES, 1)
    return text


def keys_yaml(entries: dict[str, list[tuple[str, Path | str, bool]]]) -> str:
    lines = []
    for domain, items in entries.items():
        lines.append(f"    {domain}:\n")
        for selector, path, sign in items:
            lines.append(
                f"      - {{selector: {selector}, key: '{path}', sign: {str(sign).lower()}}}\n"
            )
    return "".join(lines)


def start_daemon(tmp: Path, text: str, name: str = "dkim", socket: str | None = None) -> Daemon:
    rules = tmp / f"{name}.yaml"
    rules.write_text(text)
    spec = socket or f"unix:{tmp / 'run' / (name + '.sock')}"
    return Daemon("dkim", spec, tmp / f"{name}.log", rules=rules).start()


@pytest.fixture(scope="module")
def daemon(dns, keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("dkimd")
    entries = keys_yaml(
        {
            "dkim.test": [("rsa", keys["rsa"][1], True), ("ed", keys["ed"][1], True)],
            "nokey.dkim.test": [("gone", tmp / "missing.key", True)],
        }
    )
    process = start_daemon(tmp, rules_text(dns.address, entries))
    yield process
    assert process.stop() == 0


def send(
    daemon: Daemon,
    raw: bytes,
    *,
    sender: str = "news@remote.example",
    ip: str = "192.0.2.10",
    auth_user: str | None = None,
    leading_space: bool = True,
):
    """One message as Postfix sends it; ``leading_space``: offer SMFIP_HDR_LEADSPC."""
    protocol = ALL_PROTOCOL if leading_space else ALL_PROTOCOL & ~SMFIP_HDR_LEADSPC
    mail = {"i": "4DKIM1"}
    if auth_user:
        mail["{auth_authen}"] = auth_user
    macros = {"mail": mail, "eom": {"i": "4DKIM1"}}
    with MilterSession(daemon.address, protocol=protocol) as session:
        session.connect("client.example", ip)
        session.helo("client.example")
        negotiated = bool(session.protocol & SMFIP_HDR_LEADSPC)
        original = daemon_milter_client._headers
        if negotiated:
            # With HDR_LEADSPC an MTA sends each value as it is, its leading space included.
            daemon_milter_client._headers = _headers_as_they_are
        try:
            result = session.send_message(sender, ["alice@example.test"], raw, macros=macros)
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


def ar_results(result) -> list[tuple[str, str | None]]:
    values = [v for _, n, v in result.headers_inserted() if n == "Authentication-Results"]
    assert len(values) == 1, result.modifications
    parsed = authres.AuthenticationResultsHeader.parse_value(values[0].strip())
    assert parsed.authserv_id == SERVER_ID
    return [(r.result, r.header_d) for r in parsed.results]


def signatures(result) -> list[str]:
    return [v for _, n, v in result.headers_inserted() if n == "DKIM-Signature"]


def as_delivered(result, raw: bytes, leading_space: bool) -> bytes:
    """``raw`` with the daemon's DKIM-Signature fields on top, as the MTA would write it."""
    head = b""
    for value in signatures(result):
        value = value if leading_space else " " + value
        head = b"DKIM-Signature:" + value.replace("\n", "\r\n").encode() + b"\r\n" + head
    return head + raw


def verify_with(dns, raw: bytes) -> list[tuple[str, str, str]]:
    dnsfunc = make_dnsfunc(Resolver([dns.address], timeout=2.0), time.monotonic() + 10)
    return [(r.result, r.domain, r.selector) for r in verify_message(raw, Settings(), dnsfunc)]


@pytest.mark.slow
def test_every_verification_result(daemon: Daemon, keys) -> None:
    rsa, ed = keys["rsa"][0], keys["ed"][0]
    raw = message()
    cases = [
        (signed(raw, rsa, "rsa"), [("pass", "dkim.test")]),
        (signed(raw, ed, "ed"), [("pass", "dkim.test")]),
        (signed(raw, rsa, "rsa").replace(b"Hello.", b"Changed."), [("fail", "dkim.test")]),
        (signed(raw, rsa, "revoked"), [("fail", "dkim.test")]),
        (signed(raw, rsa, "bad"), [("permerror", "dkim.test")]),
        (signed(raw, rsa, "nothere"), [("permerror", "dkim.test")]),
        (signed(raw, rsa, "rsa", domain="broken.dkim.test"), [("temperror", "broken.dkim.test")]),
        (signed(raw, rsa, "rsa", domain="slow.dkim.test"), [("temperror", "slow.dkim.test")]),
        (raw, [("none", None)]),
        (
            signed(signed(raw, ed, "ed"), rsa, "nothere"),
            [("permerror", "dkim.test"), ("pass", "dkim.test")],
        ),
    ]
    for text, expected in cases:
        result, _ = send(daemon, text)
        assert result.action == "accept", result.reply
        assert ar_results(result) == expected, text[:300]
        assert signatures(result) == []  # not ours to sign
    log = daemon.log()
    assert "DKIM temperror d=broken.dkim.test s=rsa" in log
    assert (
        "DKIM fail d=dkim.test s=revoked a=rsa-sha256 (key revoked._domainkey.dkim.test revoked)"
        in log
    )


@pytest.mark.slow
def test_simple_canonicalization_with_and_without_leading_space(daemon: Daemon, keys) -> None:
    raw = message(extra=b"X-Spaced:   three spaces\r\nX-Folded: one\r\n\ttwo\r\n")
    text = signed(raw, keys["rsa"][0], "rsa", canonicalization="simple/simple")
    for leading_space in (True, False):
        result, negotiated = send(daemon, text, leading_space=leading_space)
        assert negotiated == leading_space
        assert ar_results(result) == [("pass", "dkim.test")]


@pytest.mark.slow
def test_authenticated_mail_is_signed_with_both_keys_and_verifies(daemon: Daemon, dns) -> None:
    raw = message(subject="signed by us")
    before = dns.resolver.count("rsa._domainkey.dkim.test")
    result, leading_space = send(daemon, raw, auth_user="news@dkim.test")
    assert result.action == "accept"
    values = signatures(result)
    assert len(values) == 2
    # Inserted on top (index 0), before every other field.
    assert all(index == 0 for index, name, _ in result.headers_inserted())
    assert "Authentication-Results" not in [n for _, n, _ in result.headers_inserted()]
    assert dns.resolver.count("rsa._domainkey.dkim.test") == before  # nothing verified
    found = verify_with(dns, as_delivered(result, raw, leading_space))
    assert sorted(found) == [("pass", "dkim.test", "ed"), ("pass", "dkim.test", "rsa")]
    for value in values:
        assert "c=relaxed/relaxed" in value and "d=dkim.test" in value
        assert re.search(
            r"h=from : subject : date : to : message-id : from;", " ".join(value.split())
        )
    assert "DKIM signed d=dkim.test s=rsa a=rsa-sha256" in daemon.log()
    assert "DKIM signed d=dkim.test s=ed a=ed25519-sha256" in daemon.log()


@pytest.mark.slow
def test_networks_rules_and_changes_decide_what_is_signed(daemon: Daemon, dns) -> None:
    # From an internal network: signed, and not verified (outgoing mail).
    raw = message()
    result, _ = send(daemon, raw, ip="10.9.1.1")
    assert len(signatures(result)) == 2
    assert "Authentication-Results" not in [n for _, n, _ in result.headers_inserted()]
    # A rule says no.
    result, _ = send(daemon, raw, sender="bulk@dkim.test", ip="10.9.1.1")
    assert signatures(result) == []
    assert "X-Mailgate-DKIM-Sign" not in str(result.modifications)
    # A rule says yes for a client the settings do not select.
    result, _ = send(daemon, raw, ip="198.51.100.7")
    assert len(signatures(result)) == 2
    # Not our domain: not signed, even when authenticated.
    result, _ = send(daemon, message(sender="x@elsewhere.example"), auth_user="x")
    assert signatures(result) == []
    # A tagged subject is signed as tagged.
    raw = message(subject="tagme please")
    result, leading_space = send(daemon, raw, ip="10.9.1.1")
    assert result.headers_changed() == [
        (1, "Subject", (" " if leading_space else "") + "[TAG] tagme please")
    ]
    delivered = as_delivered(
        result, raw.replace(b"Subject: tagme", b"Subject: [TAG] tagme"), leading_space
    )
    assert [r for r, _, _ in verify_with(dns, delivered)] == ["pass", "pass"]
    # Not signed when the rules refuse.
    result, _ = send(daemon, message(sender="x@bank.dkim.test"), ip="10.9.1.1")
    assert result.action == "reject" and result.reply.text.startswith("550 5.7.20")


@pytest.mark.slow
def test_an_unusable_key_tempfails(daemon: Daemon) -> None:
    result, _ = send(daemon, message(sender="x@nokey.dkim.test"), auth_user="x")
    assert result.action == "tempfail"
    assert result.reply.text.startswith("451 4.3.0 DKIM signing failed")
    assert "cannot sign: d=nokey.dkim.test s=gone" in daemon.log()


@pytest.mark.slow
def test_forged_authentication_results_are_removed(daemon: Daemon) -> None:
    raw = message(
        extra=(
            b"Authentication-Results: other.example; dkim=pass\r\n"
            + f"Authentication-Results: {SERVER_ID}; dkim=pass header.d=bank.example\r\n".encode()
        )
    )
    result, _ = send(daemon, raw)
    assert result.headers_changed() == [(2, "Authentication-Results", "")]
    kinds = [m[0] for m in result.modifications]
    assert kinds.index("chgheader") < kinds.index("insheader")
    assert "removing 1 forged Authentication-Results header" in daemon.log()


@pytest.mark.slow
def test_key_rotation_two_selectors_live_at_once(dns, keys, tmp_path: Path) -> None:
    """Publish the new selector, sign with both, retire the old: mail verifies throughout."""
    rsa_path, new_path = keys["rsa"][1], keys["new"][1]
    stages = [
        [("rsa", rsa_path, True), ("new", new_path, False)],  # new key published, not used
        [("rsa", rsa_path, True), ("new", new_path, True)],  # both sign
        [("new", new_path, True)],  # the old key retired
    ]
    daemon = start_daemon(tmp_path, rules_text(dns.address, keys_yaml({"dkim.test": stages[0]})))
    try:
        selectors = []
        sent = []
        for index, stage in enumerate(stages):
            if index:
                (tmp_path / "dkim.yaml").write_text(
                    rules_text(dns.address, keys_yaml({"dkim.test": stage}))
                )
                assert "reloaded rules" in daemon.reload()
            raw = message(subject=f"rotation {index}")
            result, leading_space = send(daemon, raw, auth_user="news@dkim.test")
            delivered = as_delivered(result, raw, leading_space)
            found = verify_with(dns, delivered)
            assert all(r == "pass" for r, _, _ in found), found
            selectors.append(sorted(s for _, _, s in found))
            sent.append(delivered)
        assert selectors == [["rsa"], ["new", "rsa"], ["new"]]
        # Mail signed before the retirement still verifies while the old record stays.
        assert [r for r, _, _ in verify_with(dns, sent[0])] == ["pass"]
    finally:
        assert daemon.stop() == 0


# -- real MTAs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_postfix_signs_and_verifies_through_the_daemon(dns, keys, tmp_path: Path) -> None:
    import peers

    port = peers.free_port()
    entries = keys_yaml({"dkim.test": [("rsa", keys["rsa"][1], True)]})
    text = rules_text(dns.address, entries, networks="[127.0.0.0/8]", custom=False)
    daemon = start_daemon(tmp_path, text, socket=f"inet:{port}@127.0.0.1")
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            outgoing = message(sender="news@dkim.test", subject="via postfix")
            incoming = signed(
                message(sender="x@remote.example", subject="pre-signed"), keys["ed"][0], "ed"
            )
            with mta.smtp() as client:
                client.sendmail("news@dkim.test", [f"r@{peers.DOMAIN}"], outgoing)
                client.sendmail("x@remote.example", [f"r@{peers.DOMAIN}"], incoming)
            delivered = mta.wait_delivered(2)
            assert len(delivered) == 2, mta.log()
        by_subject = {}
        for item in delivered:
            crlf = item.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            subject = re.search(rb"^Subject: (.*)\r$", crlf, re.M).group(1).decode()
            by_subject[subject] = crlf
        ours = by_subject["via postfix"]
        assert ours.count(b"DKIM-Signature:") == 1
        assert verify_with(dns, ours) == [("pass", "dkim.test", "rsa")]
        head = by_subject["pre-signed"].split(b"\r\n\r\n")[0].decode()
        assert re.search(
            rf"^Authentication-Results: {re.escape(SERVER_ID)};\s+dkim=pass", head, re.M
        )
        assert "header.d=dkim.test" in head and "header.s=ed" in head
    finally:
        assert daemon.stop() == 0


def core_with_chain(tmp_path: Path, entries: list[str]) -> object:
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text("milters:\n" + "".join(entries))
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    return gateway


@pytest.mark.slow
def test_core_chain_our_signature_verified_by_opendkim(dns, keys, tmp_path: Path) -> None:
    import peers

    rsa, rsa_path = keys["rsa"]
    rules = tmp_path / "dkim.yaml"
    entries = keys_yaml({"dkim.test": [("rsa", rsa_path, True)]})
    rules.write_text(rules_text(dns.address, entries, networks="[127.0.0.0/8]", custom=False))
    records = {"rsa._domainkey.dkim.test": record(rsa)}
    with peers.opendkim_verifier(tmp_path / "verify", records) as verifier:
        gateway = core_with_chain(
            tmp_path,
            [
                f"  - name: dkim\n    daemon: dkim\n    rules: {rules}\n",
                f"  - name: opendkim\n    socket: {verifier.pymilter_socket}\n"
                "    default_action: tempfail\n",
            ],
        )
        try:
            with gateway.smtp() as client:
                raw = message(sender="news@dkim.test", subject="core to opendkim")
                assert client.sendmail("news@dkim.test", [f"alice@{DOMAIN}"], raw) == {}
            delivered = gateway.wait_delivered(f"alice@{DOMAIN}", 1)
        finally:
            gateway.stop()
    assert delivered, gateway.log()
    found = delivered[0]
    assert b"DKIM-Signature:" in found and b"s=rsa" in found
    assert re.search(rb"Authentication-Results: verify\.test\.example;\s+dkim=pass", found), (
        found.decode(errors="replace") + verifier.log()
    )


@pytest.mark.slow
def test_core_chain_opendkim_signature_verified_by_ours(tmp_path: Path) -> None:
    import peers

    with peers.opendkim_signer(tmp_path / "sign") as signer:
        # OpenDKIM's key files serve as they are.
        assert signer.private_key_path is not None
        assert load_key(signer.private_key_path).public in signer.public_key_record
        zone = (
            "$ORIGIN test.example.\n$TTL 300\n"
            "@ IN SOA ns.test.example. h.test.example. 1 3600 600 86400 60\n"
            f"sel1._domainkey IN TXT {quoted(signer.public_key_record)}\n"
        )
        with dns_server(zone) as server:
            rules = tmp_path / "dkim.yaml"
            rules.write_text(rules_text(server.address, "", custom=False))
            gateway = core_with_chain(
                tmp_path,
                [
                    f"  - name: opendkim\n    socket: {signer.pymilter_socket}\n"
                    "    default_action: tempfail\n",
                    f"  - name: dkim\n    daemon: dkim\n    rules: {rules}\n",
                ],
            )
            try:
                with gateway.smtp() as client:
                    raw = peers.message(
                        sender="news@test.example",
                        recipient=f"alice@{DOMAIN}",
                        subject="opendkim to core",
                    )
                    assert client.sendmail("news@test.example", [f"alice@{DOMAIN}"], raw) == {}
                delivered = gateway.wait_delivered(f"alice@{DOMAIN}", 1)
            finally:
                gateway.stop()
    assert delivered, gateway.log()
    found = delivered[0].decode(errors="replace")
    assert "DKIM-Signature:" in found and "s=sel1" in found, signer.log()
    assert re.search(rf"Authentication-Results: {re.escape(SERVER_ID)};\s+dkim=pass", found), found
    assert "header.d=test.example" in found
