"""MTA-STS (RFC 8461): parsing, the policy fetch from a real HTTPS server, the cache, and
enforcement by a sending gateway towards a second mailgate over STARTTLS.

Every certificate comes from a test CA made here (``tls_helpers.TestCa``); the sending
gateway trusts it through ``mta_sts_ca_file`` and fetches policies on
``mta_sts_https_port`` (both test settings). Names resolve through a loopback DNS server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsserver import TestDnsServer, dns_server
from relay_helpers import ALICE, message, send, sending_gateway, wait_for
from tls_helpers import Issued, PolicyServer, TestCa, policy_server, self_signed

from mailgate.core.dns import Resolver
from mailgate.core.relay.mtasts import (
    StsError,
    StsResolver,
    mx_matches,
    parse_policy,
    parse_txt,
)
from mailgate.core.relay.tlsstore import TlsStore, utc_day

from conftest import MAILGATE, PASSWORD, Gateway, make_gateway

ZONE = """
$TTL 1
remote.test.            IN MX 10 mx.remote.test.
mx.remote.test.         IN A 127.0.0.1
mta-sts.remote.test.    IN A 127.0.0.1
_mta-sts.remote.test.   IN TXT "v=STSv1; id=20261125a;"
other.test.             IN MX 10 mx.other.test.
mx.other.test.          IN A 127.0.0.1
mta-sts.other.test.     IN A 127.0.0.1
_mta-sts.other.test.    IN TXT "v=STSv1; id=1;"
testing.test.           IN MX 10 mx.testing.test.
mx.testing.test.        IN A 127.0.0.1
mta-sts.testing.test.   IN A 127.0.0.1
_mta-sts.testing.test.  IN TXT "v=STSv1; id=1;"
example.test.           IN MX 10 mx.example.test.
mx.example.test.        IN A 127.0.0.1
"""

ENFORCE = b"version: STSv1\r\nmode: enforce\r\nmx: mx.remote.test\r\nmax_age: 86400\r\n"


def policy(mode: str, *mx: str, max_age: int = 86400) -> tuple[int, str, bytes]:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return 200, "text/plain", ("\r\n".join(lines) + "\r\n").encode()


# -- parsing ------------------------------------------------------------------------------


def test_txt_record() -> None:
    assert parse_txt([b"v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt([b"v=STSv1;id=abc; ext=1"]) == "abc"
    assert parse_txt([b"v=spf1 -all", b"v=STSv1; id=x1"]) == "x1"
    assert parse_txt([]) is None
    assert parse_txt([b"v=STSv1; id=a", b"v=STSv1; id=b"]) is None  # two: no policy
    assert parse_txt([b"v=STSv1;"]) is None  # id is required
    assert parse_txt([b"v=STSv1; id=not-alnum"]) is None
    assert parse_txt([b"v=STSv1; id=" + b"a" * 33]) is None


def test_policy_parsing_is_strict() -> None:
    parsed = parse_policy(ENFORCE.decode())
    assert (parsed.mode, parsed.max_age, parsed.mx) == ("enforce", 86400, ("mx.remote.test",))
    assert parsed.lines == (
        "version: STSv1",
        "mode: enforce",
        "mx: mx.remote.test",
        "max_age: 86400",
    )
    lf = parse_policy(
        "version: STSv1\nmode: testing\nmx: *.Example.COM\nmx: a.test\nmax_age: 5\nfoo: bar\n"
    )
    assert lf.mx == ("*.example.com", "a.test") and lf.mode == "testing"
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n").mx == ()
    bad = [
        "mode: enforce\nversion: STSv1\nmx: a.test\nmax_age: 1\n",  # version not first
        "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforcing\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmax_age: 100\n",  # no mx
        "version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 100\n",
        "version: STSv1\nthis line has no colon\n",
        "",
    ]
    for text in bad:
        with pytest.raises(StsError) as caught:
            parse_policy(text)
        assert caught.value.result_type == "sts-policy-invalid", text


def test_mx_patterns() -> None:
    assert mx_matches("mx.example.com", "MX.example.com.")
    assert mx_matches("*.example.com", "mx1.example.com")
    assert not mx_matches("*.example.com", "a.b.example.com")  # one label only
    assert not mx_matches("*.example.com", "example.com")
    assert not mx_matches("mx.example.com", "mx.example.com.evil.test")


# -- fetching and caching against a real HTTPS server --------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def web_cert(ca: TestCa) -> Issued:
    return ca.issue(
        "mta-sts", ["mta-sts.remote.test", "mta-sts.other.test", "mta-sts.testing.test"]
    )


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDnsServer]:
    with dns_server(ZONE) as server:
        yield server


def sts_resolver(dns: TestDnsServer, store: TlsStore, ca: TestCa, web: PolicyServer) -> StsResolver:
    resolver = Resolver([dns.address], cache_size=0)
    return StsResolver(resolver, store, timeout=5, ca_file=ca.ca_file, port=web.port)


def test_fetch_checks_status_type_size_redirects_and_certificate(
    tmp_path: Path, dns: TestDnsServer, ca: TestCa, web_cert: Issued
) -> None:
    store = TlsStore(tmp_path / "tls.sqlite3")
    policies = {"mta-sts.remote.test": (200, "text/plain; charset=utf-8", ENFORCE)}
    with policy_server(web_cert, policies) as web:
        sts = sts_resolver(dns, store, ca, web)
        fetched = asyncio.run(sts.fetch("remote.test"))
        assert fetched.mode == "enforce"
        assert web.requests == ["mta-sts.remote.test/.well-known/mta-sts.txt"]

        failures = {
            (404, "text/plain", b"gone"): "HTTP 404",
            (301, "text/plain", b""): "HTTP 301",  # never followed
            (200, "text/html", ENFORCE): "not text/plain",
            (200, "text/plain", ENFORCE + b"x" * 70000): "larger than",
        }
        for entry, why in failures.items():
            policies["mta-sts.remote.test"] = entry
            with pytest.raises(StsError, match=why) as caught:
                asyncio.run(sts.fetch("remote.test"))
            assert caught.value.result_type == "sts-policy-fetch-error"
        assert len(web.requests) == 5  # the 301 was not followed anywhere
        policies["mta-sts.remote.test"] = (200, "text/plain", b"version: STSv1\nmode: x\n")
        with pytest.raises(StsError) as caught:
            asyncio.run(sts.fetch("remote.test"))
        assert caught.value.result_type == "sts-policy-invalid"

    # A certificate the trusted CA did not sign, and one for another name: WebPKI failures.
    rogue = self_signed(tmp_path, "rogue", ["mta-sts.remote.test"])
    wrong_name = ca.issue("wrong", ["www.remote.test"])
    for issued in (rogue, wrong_name):
        with policy_server(issued, {"mta-sts.remote.test": (200, "text/plain", ENFORCE)}) as web:
            sts = sts_resolver(dns, store, ca, web)
            with pytest.raises(StsError) as caught:
                asyncio.run(sts.fetch("remote.test"))
            assert caught.value.result_type == "sts-webpki-invalid"
            assert web.requests == []
    store.close()


def test_cache_honours_id_and_max_age(
    tmp_path: Path, dns: TestDnsServer, ca: TestCa, web_cert: Issued
) -> None:
    store = TlsStore(tmp_path / "tls.sqlite3")
    policies = {"mta-sts.remote.test": policy("enforce", "mx.remote.test")}
    with policy_server(web_cert, policies) as web:
        sts = sts_resolver(dns, store, ca, web)
        found, error = asyncio.run(sts.policy("remote.test"))
        assert found is not None and found.mode == "enforce" and error is None
        assert len(web.requests) == 1
        cached = store.policy("remote.test")
        assert cached is not None and cached.id == "20261125a"
        assert cached.expires - cached.fetched == 86400

        # Same id: the cache answers, even if the server now says something else.
        policies["mta-sts.remote.test"] = policy("testing", "mx.remote.test")
        found, _ = asyncio.run(sts.policy("remote.test"))
        assert found is not None and found.mode == "enforce" and len(web.requests) == 1

        # A new id: fetched again.
        dns.set_zone(ZONE.replace("id=20261125a", "id=20261125b"))
        found, _ = asyncio.run(sts.policy("remote.test"))
        assert found is not None and found.mode == "testing" and len(web.requests) == 2

        # Another new id, but the fetch fails: the cached policy stays in force.
        dns.set_zone(ZONE.replace("id=20261125a", "id=20261125c"))
        policies["mta-sts.remote.test"] = (500, "text/plain", b"oops")
        found, error = asyncio.run(sts.policy("remote.test"))
        assert found is not None and found.mode == "testing"
        assert error is not None and "HTTP 500" in str(error)

        # The TXT record disappears (an attacker strips it): still the cached policy.
        dns.set_zone(ZONE.replace('_mta-sts.remote.test.   IN TXT "v=STSv1; id=20261125a;"', ""))
        found, error = asyncio.run(sts.policy("remote.test"))
        assert found is not None and found.mode == "testing" and error is None

        # max_age over: the policy is gone, and without a TXT record there is none.
        store.store_policy(
            type(cached)("remote.test", "20261125b", found.text, 0.0, time.time() - 1)
        )
        assert asyncio.run(sts.policy("remote.test")) == (None, None)
        dns.set_zone(ZONE)
    store.close()


# -- enforcement by a real gateway ---------------------------------------------------------


def receiving_gateway(tmp_path: Path, dns: TestDnsServer, cert: Issued) -> Gateway:
    tmp_path.mkdir(parents=True, exist_ok=True)
    gateway = make_gateway(
        tmp_path,
        hostname="mx.remote.test",
        local_domains="remote.test,other.test,testing.test",
        dns_nameservers=dns.address,
        tls_cert=cert.cert_path,
        tls_key=cert.key_path,
        rate_limit_connections=10000,
        auth_failure_delay=0,
    )
    store = gateway.users()
    try:
        for user in ("bob@remote.test", "dave@other.test", "tess@testing.test"):
            store.add_user(user, PASSWORD)
    finally:
        store.close()
    return gateway


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def tls_report(gateway: Gateway, domain: str) -> dict[str, object]:
    done = subprocess.run(
        [MAILGATE, "tls-report", "--domain", domain, "--date", utc_day(time.time())],
        env=gateway.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    report = json.loads(done.stdout)
    assert isinstance(report, dict)
    return report


def summary(report: dict[str, object]) -> tuple[int, int, list[str]]:
    policies = report["policies"]
    assert isinstance(policies, list)
    ok = sum(p["summary"]["total-successful-session-count"] for p in policies)
    failed = sum(p["summary"]["total-failure-session-count"] for p in policies)
    kinds = [d["result-type"] for p in policies for d in p.get("failure-details", [])]
    return ok, failed, kinds


def start_pair(
    tmp_path: Path,
    dns: TestDnsServer,
    ca: TestCa,
    web: PolicyServer,
    receiver_cert: Issued,
    gateways: list[Gateway],
) -> tuple[Gateway, Gateway]:
    receiver = receiving_gateway(tmp_path / "b", dns, receiver_cert)
    sender = sending_gateway(
        tmp_path / "a",
        dns.address,
        receiver.smtp_port,
        mta_sts_ca_file=ca.ca_file,
        mta_sts_https_port=web.port,
        mta_sts_fetch_timeout=5,
    )
    for gateway in (receiver, sender):
        gateway.start()
        gateways.append(gateway)
    return sender, receiver


@pytest.mark.slow
def test_enforce_and_testing_modes_with_a_valid_certificate(
    tmp_path: Path, dns: TestDnsServer, ca: TestCa, web_cert: Issued, gateways: list[Gateway]
) -> None:
    policies = {
        "mta-sts.remote.test": policy("enforce", "mx.remote.test"),
        "mta-sts.other.test": policy("enforce", "*.elsewhere.test"),
        "mta-sts.testing.test": policy("testing", "*.elsewhere.test"),
    }
    mx_cert = ca.issue("mx", ["mx.remote.test", "mx.other.test", "mx.testing.test"])
    with policy_server(web_cert, policies) as web:
        sender, receiver = start_pair(tmp_path, dns, ca, web, mx_cert, gateways)
        send(sender.smtp_port, ALICE, ["bob@remote.test"], message("sts enforce"))
        send(sender.smtp_port, ALICE, ["dave@other.test"], message("sts wrong mx"))
        send(sender.smtp_port, ALICE, ["tess@testing.test"], message("sts testing"))
        bob = receiver.wait_delivered("bob@remote.test", 1)
        tess = receiver.wait_delivered("tess@testing.test", 1)
        assert len(bob) == 1 and b"with ESMTPS" in bob[0]
        assert len(tess) == 1
        assert wait_for(lambda: "not an MX host allowed by the MTA-STS policy" in sender.log())
        time.sleep(0.5)
        # The host the policy does not name is never used, not even in clear text.
        assert receiver.delivered("dave@other.test") == []
    log = sender.log()
    assert "MTA-STS policy of remote.test: mode enforce" in log
    assert "to=<dave@other.test>" in log and "status=deferred (4.7.5" in log
    ok, failed, _ = summary(tls_report(sender, "remote.test"))
    assert ok >= 1 and failed == 0
    report = tls_report(sender, "other.test")
    ok, failed, kinds = summary(report)
    assert ok == 0 and failed >= 1 and set(kinds) == {"validation-failure"}
    policies_ = report["policies"]
    assert isinstance(policies_, list)
    assert policies_[0]["policy"]["policy-type"] == "sts"
    assert policies_[0]["policy"]["mx-host"] == ["*.elsewhere.test"]
    assert "mode: enforce" in policies_[0]["policy"]["policy-string"]
    # testing mode: delivered, and the MX outside the policy still counts as a failure.
    ok, failed, kinds = summary(tls_report(sender, "testing.test"))
    assert ok == 0 and failed >= 1 and set(kinds) == {"validation-failure"}


@pytest.mark.slow
def test_untrusted_certificate_defers_in_enforce_and_delivers_in_testing(
    tmp_path: Path, dns: TestDnsServer, ca: TestCa, web_cert: Issued, gateways: list[Gateway]
) -> None:
    policies = {
        "mta-sts.remote.test": policy("enforce", "mx.remote.test"),
        "mta-sts.testing.test": policy("testing", "mx.testing.test"),
    }
    rogue = self_signed(tmp_path, "mx", ["mx.remote.test", "mx.testing.test"])
    with policy_server(web_cert, policies) as web:
        sender, receiver = start_pair(tmp_path, dns, ca, web, rogue, gateways)
        send(sender.smtp_port, ALICE, ["bob@remote.test"], message("must not leak"))
        send(sender.smtp_port, ALICE, ["tess@testing.test"], message("testing anyway"))
        tess = receiver.wait_delivered("tess@testing.test", 1)
        assert len(tess) == 1
        assert wait_for(lambda: "status=deferred (4.7.5" in sender.log())
        time.sleep(0.5)
        assert receiver.delivered("bob@remote.test") == []  # no downgrade, no bad cert
    log = sender.log()
    assert "MTA-STS testing mode: delivering without the policy" in log
    _, failed, kinds = summary(tls_report(sender, "remote.test"))
    assert failed >= 1 and set(kinds) == {"certificate-not-trusted"}
    _, failed, kinds = summary(tls_report(sender, "testing.test"))
    assert failed >= 1 and set(kinds) == {"certificate-not-trusted"}
