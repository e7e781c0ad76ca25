"""The resolver layer (core/dns.py) against a real DNS server on loopback."""

from __future__ import annotations

import pytest
from dnsserver import dns_server

from mailgate.core.dns import DnsTempError, Resolver
from mailgate.policies.settings import DnsSettings, parse_nameserver

ZONE = """
$ORIGIN test.example.
$TTL 300
@               IN SOA ns.test.example. hostmaster.test.example. 1 3600 600 86400 60
@               IN MX 20 mx2.test.example.
@               IN MX 10 mx1.test.example.
@               IN TXT "v=spf1 " "ip4:192.0.2.0/24 -all"
mx1             IN A 192.0.2.1
mx1             IN AAAA 2001:db8::1
mx2             IN A 192.0.2.2
alias           IN CNAME mx1.test.example.
short     5     IN A 192.0.2.5
*.wild          IN A 192.0.2.99
2.0.0.127.bl    IN A 127.0.0.2
1.2.0.192.in-addr.arpa. IN PTR mx1.test.example.
big             IN TXT "{}" "{}" "{}"
""".format("a" * 250, "b" * 250, "c" * 250)


@pytest.fixture(scope="module")
def server():
    with dns_server(
        ZONE, drop_suffixes=["slow.test.example"], servfail_suffixes=["broken.test.example"]
    ) as srv:
        yield srv


def resolver(server, **kwargs) -> Resolver:
    return Resolver([server.address], **kwargs)


def test_records_of_each_type(server) -> None:
    r = resolver(server)
    assert r.mx("test.example") == [(10, "mx1.test.example"), (20, "mx2.test.example")]
    assert r.a("mx1.test.example") == ["192.0.2.1"]
    assert r.aaaa("mx1.test.example") == ["2001:db8::1"]
    assert r.addresses("mx1.test.example") == ["192.0.2.1", "2001:db8::1"]
    assert r.txt("test.example") == [b"v=spf1 ip4:192.0.2.0/24 -all"]
    assert r.a("alias.test.example") == ["192.0.2.1"]
    assert r.a("anything.wild.test.example") == ["192.0.2.99"]
    assert r.ptr("192.0.2.1") == ["mx1.test.example"]
    assert r.verified_ptr("192.0.2.1") == "mx1.test.example"
    # An answer too large for UDP comes over TCP, joined as RFC 7208 says.
    assert r.txt("big.test.example") == [b"a" * 250 + b"b" * 250 + b"c" * 250]


def test_nxdomain_and_nodata_are_told_apart(server) -> None:
    r = resolver(server)
    missing = r.query("nothere.test.example", "A")
    assert (missing.status, missing.exists, missing.records) == ("nxdomain", False, ())
    empty = r.query("mx2.test.example", "TXT")
    assert (empty.status, empty.exists) == ("nodata", True)
    assert r.a("2.0.0.127.bl.test.example") == ["127.0.0.2"]
    assert r.a("3.0.0.127.bl.test.example") == []


def test_failures_are_temporary_errors_never_answers(server) -> None:
    r = resolver(server, timeout=0.5)
    with pytest.raises(DnsTempError, match="timed out"):
        r.a("x.slow.test.example")
    with pytest.raises(DnsTempError, match="SERVFAIL"):
        r.a("x.broken.test.example")
    empty = resolver(server)
    empty.servers = ()
    with pytest.raises(DnsTempError, match="no nameserver"):
        empty.a("test.example")


def test_the_cache_honours_ttls_and_keeps_negative_answers(server) -> None:
    r = resolver(server, negative_ttl=60)
    before = server.resolver.count("mx2.test.example", "A")
    assert r.a("mx2.test.example") == ["192.0.2.2"]
    assert r.a("MX2.test.example.") == ["192.0.2.2"]
    assert server.resolver.count("mx2.test.example", "A") == before + 1
    r.query("gone.test.example", "A")
    r.query("gone.test.example", "A")
    assert server.resolver.count("gone.test.example", "A") == 1
    uncached = resolver(server, cache_size=0)
    uncached.a("mx2.test.example")
    uncached.a("mx2.test.example")
    assert server.resolver.count("mx2.test.example", "A") == before + 3


def test_the_cache_drops_an_answer_when_its_ttl_ends(server, monkeypatch) -> None:
    import mailgate.core.dns as dns_module

    now = [1000.0]
    monkeypatch.setattr(dns_module.time, "monotonic", lambda: now[0])
    r = resolver(server)
    before = server.resolver.count("short.test.example", "A")
    r.a("short.test.example")
    now[0] += 4
    r.a("short.test.example")
    assert server.resolver.count("short.test.example", "A") == before + 1
    now[0] += 2
    r.a("short.test.example")
    assert server.resolver.count("short.test.example", "A") == before + 2


def test_a_second_server_answers_when_the_first_is_down(server) -> None:
    r = Resolver(["127.0.0.1:9", server.address], timeout=2.0)
    assert r.a("mx1.test.example") == ["192.0.2.1"]


def test_nameserver_settings_are_checked() -> None:
    assert parse_nameserver("127.0.0.1:5300") == ("127.0.0.1", 5300)
    assert parse_nameserver("[::1]:53") == ("::1", 53)
    assert parse_nameserver("::1") == ("::1", 53)
    for bad in ("dns.example", "127.0.0.1:0", "[::1", "1.2.3.4:x"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    assert DnsSettings.model_validate({"nameservers": "127.0.0.1"}).nameservers == ("127.0.0.1",)
