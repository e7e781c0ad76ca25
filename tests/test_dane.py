"""DANE for SMTP (RFC 7672): TLSA matching, the AD-bit gate of the resolver, and a sending
gateway that enforces TLSA records towards a second mailgate.

Two kinds of DNS: the loopback DNS server (``dnsserver.py``) sets the AD bit on the names
under ``authentic_suffixes``, standing in for a validating resolver's verdict, for the
rules and their corner cases; and real DNSSEC (``dnssec_peers.py``: knotd signs a zone,
unbound validates it) for one end-to-end run. The sender trusts the AD bit through
``dns_dnssec_trusted``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from dnssec_peers import validating_resolver
from dnsserver import dns_server
from relay_helpers import ALICE, message, send, sending_gateway, wait_for
from tls_helpers import Issued, TestCa, self_signed

from mailgate.core.dns import Resolver
from mailgate.core.errors import RelayError
from mailgate.core.relay.dane import Tlsa, parse_tlsa, tlsa_for, verify_chain
from mailgate.core.relay.mtasts import parse_policy
from mailgate.core.relay.mx import Hop
from mailgate.core.relay.tlspolicy import DomainTls, TlsPolicies
from mailgate.core.relay.tlsstore import TlsStore

from conftest import PASSWORD, Gateway, make_gateway


def der(issued: Issued) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in issued.chain]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def mx_cert(ca: TestCa) -> Issued:
    return ca.issue("mx", ["mx.remote.test", "mx.ta.test", "mx.unusable.test", "mx.other.test"])


# -- TLSA records and matching -------------------------------------------------------------


def test_tlsa_parsing_and_usability() -> None:
    record = parse_tlsa("3 1 1 " + "AB" * 32)
    assert record == Tlsa(3, 1, 1, b"\xab" * 32) and record.usable
    assert parse_tlsa("3 1 1 ABAB ABAB") == Tlsa(3, 1, 1, b"\xab\xab\xab\xab")
    assert not Tlsa(3, 1, 1, b"\xab" * 31).usable  # wrong digest length
    assert Tlsa(2, 0, 2, b"\x00" * 64).usable
    assert Tlsa(3, 0, 0, b"\x30\x82").usable  # full data: any length
    for usage, selector, matching in ((0, 0, 1), (1, 1, 1), (3, 2, 1), (3, 1, 3)):
        assert not Tlsa(usage, selector, matching, b"\x00" * 32).usable
    assert parse_tlsa("3 1 1 nothex") is None
    assert parse_tlsa("3 1") is None


def test_dane_ee_matches_the_leaf_whatever_its_name_and_dates(
    tmp_path: Path, ca: TestCa, mx_cert: Issued
) -> None:
    leaf = mx_cert.cert
    for selector in (0, 1):
        for matching in (0, 1, 2):
            record = tlsa_for(leaf, 3, selector, matching)
            assert verify_chain([record], der(mx_cert), ["mx.remote.test"]) is None
    # DANE-EE ignores names and expiry (RFC 7672 section 3.1.1).
    assert verify_chain([tlsa_for(leaf)], der(mx_cert), ["nothing.test"]) is None
    expired = ca.issue("old", ["mx.remote.test"], expired=True)
    assert verify_chain([tlsa_for(expired.cert)], der(expired), ["mx.remote.test"]) is None
    other = ca.issue("other", ["mx.remote.test"])
    problem = verify_chain([tlsa_for(other.cert)], der(mx_cert), ["mx.remote.test"])
    assert problem == "no TLSA record matches the server's certificate chain"
    # A usable record among unusable ones still decides.
    records = [Tlsa(1, 1, 1, b"\x00" * 32), tlsa_for(leaf)]
    assert verify_chain(records, der(mx_cert), ["x"]) is None


def test_dane_ta_checks_the_chain_the_names_and_the_dates(
    tmp_path: Path, ca: TestCa, mx_cert: Issued
) -> None:
    anchor = tlsa_for(ca.cert, 2, 0, 1)
    assert verify_chain([anchor], der(mx_cert), ["mx.remote.test", "remote.test"]) is None
    assert verify_chain([tlsa_for(ca.cert, 2, 1, 2)], der(mx_cert), ["mx.ta.test"]) is None
    # The leaf must name the MX host or the next-hop domain.
    problem = verify_chain([anchor], der(mx_cert), ["mx.elsewhere.test", "elsewhere.test"])
    assert problem is not None and "names none of" in problem
    # The anchor must be in the chain the server presents.
    assert verify_chain([anchor], der(mx_cert)[:1], ["mx.remote.test"]) is not None
    # A chain whose leaf the anchor did not sign.
    rogue = self_signed(tmp_path, "rogue", ["mx.remote.test"])
    forged = [der(rogue)[0], der(mx_cert)[1]]
    problem = verify_chain([anchor], forged, ["mx.remote.test"])
    assert problem is not None and "not signed" in problem
    # Unlike DANE-EE, DANE-TA minds the dates.
    expired = ca.issue("old-ta", ["mx.remote.test"], expired=True)
    problem = verify_chain([anchor], der(expired), ["mx.remote.test"])
    assert problem is not None and "expired" in problem


# -- the AD-bit gate -------------------------------------------------------------------------

GATE_ZONE = """
$TTL 60
secure.test.            IN MX 10 mx.secure.test.
_25._tcp.mx.secure.test. IN TLSA 3 1 1 {digest}
plain.test.             IN MX 10 mx.plain.test.
_25._tcp.mx.plain.test. IN TLSA 3 1 1 {digest}
"""


def test_ad_bit_counts_only_from_a_trusted_resolver() -> None:
    zone = GATE_ZONE.format(digest="AB" * 32)
    with dns_server(zone, authentic_suffixes=["secure.test"]) as server:
        trusted = Resolver([server.address], trust_ad=True)
        untrusted = Resolver([server.address])
        assert trusted.query("secure.test", "MX", dnssec=True).authentic
        assert not trusted.query("plain.test", "MX", dnssec=True).authentic
        # Without dnssec=True the status is not asked for, and never reported.
        assert not trusted.query("secure.test", "MX").authentic
        # Not configured as trusted: the AD bit is ignored.
        assert not untrusted.query("secure.test", "MX", dnssec=True).authentic
        answer = trusted.query("_25._tcp.mx.secure.test", "TLSA", dnssec=True)
        assert answer.authentic and parse_tlsa(answer.records[0]) == Tlsa(3, 1, 1, b"\xab" * 32)


def test_policy_per_host(tmp_path: Path) -> None:
    zone = GATE_ZONE.format(digest="AB" * 32) + (
        "unusable.test. IN MX 10 mx.unusable.test.\n"
        "_25._tcp.mx.unusable.test. IN TLSA 1 1 1 " + "AB" * 32 + "\n"
        "none.test. IN MX 10 mx.none.test.\n"
    )
    suffixes = ["secure.test", "unusable.test", "none.test"]
    with dns_server(zone, authentic_suffixes=suffixes) as server:
        store = TlsStore(tmp_path / "tls.sqlite3")
        for trust, expected in ((True, "dane"), (False, "opportunistic")):
            resolver = Resolver([server.address], trust_ad=trust)
            policies = TlsPolicies(resolver, store, sts=None, dane=True, report=True)

            async def kind(domain: str, host: str, policies: TlsPolicies = policies) -> str:
                policy = await policies.domain(domain)
                return (await policies.hop(policy, Hop(host, "127.0.0.1", 25))).kind

            assert asyncio.run(kind("secure.test", "mx.secure.test")) == expected
            # An insecure domain, unusable records, no records: opportunistic TLS.
            assert asyncio.run(kind("plain.test", "mx.plain.test")) == "opportunistic"
            assert asyncio.run(kind("unusable.test", "mx.unusable.test")) == "opportunistic"
            assert asyncio.run(kind("none.test", "mx.none.test")) == "opportunistic"
            if trust:
                # DANE overrides MTA-STS: a host with usable TLSA records gets DANE even
                # where an enforced policy does not name it (RFC 8461 section 2).
                sts = parse_policy("version: STSv1\nmode: enforce\nmx: *.else.test\nmax_age: 9\n")
                both = DomainTls("secure.test", sts, None, frozenset({"mx.secure.test"}))
                hop = Hop("mx.secure.test", "127.0.0.1", 25)
                assert asyncio.run(policies.hop(both, hop)).kind == "dane"
            # A host that is not in the validated MX set (a forged MX answer) is not used.
            if trust:
                with pytest.raises(RelayError, match="DNSSEC-validated MX set"):
                    asyncio.run(kind("secure.test", "mx.plain.test"))
            else:
                assert asyncio.run(kind("secure.test", "mx.plain.test")) == "opportunistic"
        store.close()


# -- a sending gateway enforcing DANE --------------------------------------------------------

E2E_ZONE = """
$TTL 60
example.test.              IN MX 10 mx.example.test.
mx.example.test.           IN A 127.0.0.1
remote.test.               IN MX 10 mx.remote.test.
mx.remote.test.            IN A 127.0.0.1
_25._tcp.mx.remote.test.   IN TLSA 3 1 1 {ee}
ta.test.                   IN MX 10 mx.ta.test.
mx.ta.test.                IN A 127.0.0.1
_25._tcp.mx.ta.test.       IN TLSA 2 0 1 {ta}
other.test.                IN MX 10 mx.other.test.
mx.other.test.             IN A 127.0.0.1
_25._tcp.mx.other.test.    IN TLSA 3 1 1 {wrong}
unusable.test.             IN MX 10 mx.unusable.test.
mx.unusable.test.          IN A 127.0.0.1
_25._tcp.mx.unusable.test. IN TLSA 0 0 1 {wrong}
"""


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


@pytest.mark.slow
def test_sender_enforces_tlsa_records(
    tmp_path: Path, ca: TestCa, mx_cert: Issued, gateways: list[Gateway]
) -> None:
    wrong = ca.issue("wrong", ["mx.other.test"])
    zone = E2E_ZONE.format(
        ee=tlsa_for(mx_cert.cert).data.hex(),
        ta=tlsa_for(ca.cert, 2, 0, 1).data.hex(),
        wrong=tlsa_for(wrong.cert).data.hex(),
    )
    suffixes = ["remote.test", "ta.test", "other.test", "unusable.test"]
    with dns_server(zone, authentic_suffixes=suffixes) as dns:
        (tmp_path / "b").mkdir()
        receiver = make_gateway(
            tmp_path / "b",
            hostname="mx.remote.test",
            local_domains=",".join(suffixes),
            dns_nameservers=dns.address,
            tls_cert=mx_cert.cert_path,
            tls_key=mx_cert.key_path,
            rate_limit_connections=10000,
        )
        store = receiver.users()
        try:
            for domain in suffixes:
                store.add_user(f"bob@{domain}", PASSWORD)
        finally:
            store.close()
        sender = sending_gateway(
            tmp_path / "a", dns.address, receiver.smtp_port, dns_dnssec_trusted="true"
        )
        for gateway in (receiver, sender):
            gateway.start()
            gateways.append(gateway)
        for domain in suffixes:
            send(sender.smtp_port, ALICE, [f"bob@{domain}"], message(f"dane {domain}"))
        for domain in ("remote.test", "ta.test", "unusable.test"):
            delivered = receiver.wait_delivered(f"bob@{domain}", 1)
            assert len(delivered) == 1, domain
            assert b"with ESMTPS" in delivered[0]
        assert wait_for(lambda: "to=<bob@other.test>" in sender.log())
        time.sleep(0.5)
        # No TLSA record matches: never delivered, not even in clear text.
        assert receiver.delivered("bob@other.test") == []
    log = sender.log()
    assert "no TLSA record matches the server's certificate chain" in log
    assert "to=<bob@other.test>, relay=mx.other.test[127.0.0.1], status=deferred (4.7.5" in log
    store_ = TlsStore(sender.data_dir / "tls.sqlite3")
    try:
        from mailgate.core.relay.tlsstore import utc_day

        day = utc_day(time.time())
        kinds = {
            (row["policy_type"], row["result_type"])
            for domain in suffixes
            for row in store_.sessions(day, domain)
        }
    finally:
        store_.close()
    assert ("tlsa", "") in kinds  # remote.test and ta.test: successes
    assert ("tlsa", "validation-failure") in kinds  # other.test
    assert ("no-policy-found", "") in kinds  # unusable.test: opportunistic


# -- real DNSSEC: knotd signs, unbound validates ----------------------------------------------


def signed_zone(origin: str, body: str) -> str:
    return (
        f"$ORIGIN {origin}.\n$TTL 60\n"
        f"@ SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 60\n"
        f"@ NS ns.{origin}.\nns A 127.0.0.1\n{body}"
    )


@pytest.mark.slow
def test_dane_through_a_validating_resolver(
    tmp_path: Path, ca: TestCa, mx_cert: Issued, gateways: list[Gateway]
) -> None:
    """Signed zone (knotd), validating resolver (unbound), DANE enforced by the sender."""
    leaf = mx_cert.cert
    wrong = ca.issue("wrong-real", ["mx.plain.test"]).cert
    zones = {
        "dane.test": signed_zone(
            "dane.test",
            "@ MX 10 mx.dane.test.\nmx A 127.0.0.1\n"
            f"_25._tcp.mx TLSA 3 1 1 {tlsa_for(leaf).data.hex()}\n"
            "bad MX 10 mx.bad.dane.test.\nmx.bad A 127.0.0.1\n"
            f"_25._tcp.mx.bad TLSA 3 1 1 {tlsa_for(wrong).data.hex()}\n",
        ),
        "plain.test": signed_zone(
            "plain.test",
            "@ MX 10 mx.plain.test.\nmx A 127.0.0.1\n"
            f"_25._tcp.mx TLSA 3 1 1 {tlsa_for(wrong).data.hex()}\n",
        ),
    }
    with validating_resolver(tmp_path / "dns", zones, signed={"dane.test"}) as address:
        resolver = Resolver([address], trust_ad=True)
        assert resolver.query("dane.test", "MX", dnssec=True).authentic
        assert resolver.query("_25._tcp.mx.dane.test", "TLSA", dnssec=True).authentic
        assert not resolver.query("plain.test", "MX", dnssec=True).authentic

        domains = ["dane.test", "bad.dane.test", "plain.test"]
        (tmp_path / "b").mkdir()
        receiver = make_gateway(
            tmp_path / "b",
            hostname="mx.dane.test",
            local_domains=",".join(domains),
            dns_nameservers=address,
            tls_cert=mx_cert.cert_path,
            tls_key=mx_cert.key_path,
            rate_limit_connections=10000,
        )
        store = receiver.users()
        try:
            for domain in domains:
                store.add_user(f"bob@{domain}", PASSWORD)
        finally:
            store.close()
        sender = sending_gateway(
            tmp_path / "a", address, receiver.smtp_port, dns_dnssec_trusted="true"
        )
        for gateway in (receiver, sender):
            gateway.start()
            gateways.append(gateway)
        for domain in domains:
            send(sender.smtp_port, ALICE, [f"bob@{domain}"], message(f"real {domain}"))
        # Validated, matching TLSA: delivered over TLS.
        delivered = receiver.wait_delivered("bob@dane.test", 1)
        assert len(delivered) == 1 and b"with ESMTPS" in delivered[0]
        # Unsigned zone: its (wrong) TLSA record does not count; opportunistic TLS.
        assert len(receiver.wait_delivered("bob@plain.test", 1)) == 1
        # Validated TLSA that matches nothing: deferred, never sent.
        assert wait_for(lambda: "to=<bob@bad.dane.test>" in sender.log())
        time.sleep(0.5)
        assert receiver.delivered("bob@bad.dane.test") == []
    log = sender.log()
    assert "relay=mx.bad.dane.test[127.0.0.1], status=deferred (4.7.5" in log
    assert "no TLSA record matches the server's certificate chain" in log
