"""MX resolution (core/relay/mx.py) and routes against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
from dnsserver import TestDnsServer, dns_server

from mailgate.core.config import load_config
from mailgate.core.dns import Resolver
from mailgate.core.errors import RelayError
from mailgate.core.relay.mx import Hop, host_hops, mx_hops, order_mx
from mailgate.core.relay.routes import Router

ZONE = """
$TTL 60
mx.test.             IN SOA ns.mx.test. hostmaster.mx.test. 1 3600 600 86400 60
pref.mx.test.        IN MX 20 backup.mx.test.
pref.mx.test.        IN MX 10 one.mx.test.
pref.mx.test.        IN MX 10 two.mx.test.
one.mx.test.         IN A 192.0.2.1
two.mx.test.         IN A 192.0.2.2
two.mx.test.         IN AAAA 2001:db8::2
backup.mx.test.      IN A 192.0.2.9
null.mx.test.        IN MX 0 .
bare.mx.test.        IN A 192.0.2.50
bare.mx.test.        IN AAAA 2001:db8::50
noaddr.mx.test.      IN MX 10 nowhere.mx.test.
nowhere.mx.test.     IN TXT "no address here"
text.mx.test.        IN TXT "exists without MX or address"
flaky.mx.test.       IN MX 10 mx.broken.mx.test.
"""


@pytest.fixture(scope="module")
def server() -> Iterator[TestDnsServer]:
    with dns_server(ZONE, servfail_suffixes=["broken.mx.test", "down.mx.test"]) as srv:
        yield srv


def hops(server: TestDnsServer, domain: str, seed: int = 0) -> list[Hop]:
    resolver = Resolver([server.address], timeout=2)
    return asyncio.run(mx_hops(resolver, domain, 25, random.Random(seed)))


def failure(server: TestDnsServer, domain: str) -> RelayError:
    with pytest.raises(RelayError) as caught:
        hops(server, domain)
    return caught.value


def test_preference_order_with_equal_preferences_shuffled(server: TestDnsServer) -> None:
    orders = set()
    for seed in range(20):
        found = hops(server, "pref.mx.test", seed)
        names = [hop.host for hop in found]
        assert names[-1] == "backup.mx.test"  # preference 20 always after the two 10s
        orders.add(tuple(dict.fromkeys(names[:-1])))
        # IPv6 before IPv4 for a host with both.
        two = [hop.address for hop in found if hop.host == "two.mx.test"]
        assert two == ["2001:db8::2", "192.0.2.2"]
    assert orders == {("one.mx.test", "two.mx.test"), ("two.mx.test", "one.mx.test")}


def test_order_mx_is_stable_across_preferences() -> None:
    records = [(30, "c"), (10, "a"), (20, "b")]
    assert order_mx(records, random.Random(1)) == ["a", "b", "c"]


def test_no_mx_falls_back_to_the_domains_own_addresses(server: TestDnsServer) -> None:
    assert hops(server, "bare.mx.test") == [
        Hop("bare.mx.test", "2001:db8::50", 25),
        Hop("bare.mx.test", "192.0.2.50", 25),
    ]


def test_permanent_failures(server: TestDnsServer) -> None:
    assert failure(server, "null.mx.test").status == "5.1.10"  # RFC 7505
    assert failure(server, "missing.mx.test").status == "5.1.2"  # NXDOMAIN
    assert failure(server, "text.mx.test").status == "5.1.2"  # neither MX nor address
    assert failure(server, "noaddr.mx.test").status == "5.4.4"  # MX host without address


def test_temporary_failures(server: TestDnsServer) -> None:
    assert failure(server, "down.mx.test").status == "4.4.3"  # SERVFAIL on the MX lookup
    assert failure(server, "flaky.mx.test").status == "4.4.3"  # SERVFAIL on the MX host


def test_address_literals_and_fixed_hops(server: TestDnsServer) -> None:
    assert hops(server, "[192.0.2.77]") == [Hop("[192.0.2.77]", "192.0.2.77", 25)]
    assert hops(server, "[IPv6:2001:db8::77]")[0].address == "2001:db8::77"
    resolver = Resolver([server.address], timeout=2)
    assert asyncio.run(host_hops(resolver, "one.mx.test", 587)) == [
        Hop("one.mx.test", "192.0.2.1", 587)
    ]
    with pytest.raises(RelayError) as caught:
        asyncio.run(host_hops(resolver, "missing.mx.test", 587))
    assert caught.value.permanent


def test_routes_exact_parent_and_smarthost() -> None:
    config = load_config(
        environ={
            "MAILGATE_RELAY_ROUTES": "example.org=[192.0.2.1]:2525,*=smart.example:587",
            "MAILGATE_RELAY_PORT": "2500",
        }
    )
    router = Router(config.relay_routes, port=config.relay_port)
    exact = router.destination("example.org")
    assert (exact.route and exact.route.host, exact.port) == ("192.0.2.1", 2525)
    assert router.destination("sub.example.org").key == exact.key  # parent domain route
    smart = router.destination("elsewhere.test")
    assert smart.route is not None and smart.key == "route:smart.example:587"
    plain = Router([], port=2500).destination("Elsewhere.TEST.")
    assert (plain.route, plain.key, plain.port) == (None, "mx:elsewhere.test", 2500)


def test_route_settings_are_validated() -> None:
    from mailgate.core.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(
            environ={
                "MAILGATE_RELAY_ROUTES": '[{"domain": "*", "host": "h", "username": "u", '
                '"password": "p"}]'
            }
        )
    assert "AUTH needs tls: starttls or implicit" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"MAILGATE_RELAY_ROUTES": "example.org=a.example,example.org=b"})
    assert "has two routes" in str(caught.value)
    with pytest.raises(ConfigError):
        load_config(environ={"MAILGATE_RELAY_MAX_LIFETIME": "5 fortnights"})
    assert load_config(environ={"MAILGATE_RELAY_DELAY_WARNING": "4h"}).relay_delay_warning == 14400
