"""Where a domain's mail goes: MX resolution (RFC 5321 section 5.1) to a list of next hops.

Every lookup goes through the core's resolver (``mailgate.core.dns``), whose calls block;
they run in a worker thread so the event loop never waits for DNS. The rules:

- MX records in preference order, shuffled among equal preferences (load sharing);
- no MX records (NODATA): the domain's own A/AAAA records, as an implicit MX of
  preference 0;
- a null MX (RFC 7505: a single MX whose exchange is ".") or a domain that does not exist:
  a permanent failure, at once;
- a lookup that fails (timeout, SERVFAIL): a temporary failure, retried later;
- each host's IPv6 and IPv4 addresses, IPv6 first; the caller tries them in order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass
from itertools import groupby

from mailgate.core.dns import DnsTempError, Resolver
from mailgate.core.errors import RelayError

# Postfix's smtp_mx_address_limit: enough for every sensible MX set, bounded for the rest.
MAX_ADDRESSES = 10


@dataclass(frozen=True, slots=True)
class Hop:
    """One address to try: the host name it belongs to, the address and the port."""

    host: str
    address: str
    port: int


def literal_address(domain: str) -> str | None:
    """The address of an address-literal domain (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].upper() == "IPV6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


async def _lookup(resolver: Resolver, name: str, rdtype: str) -> tuple[str, list[str]]:
    answer = await asyncio.to_thread(resolver.query, name, rdtype)
    return answer.status, list(answer.records)


async def host_addresses(resolver: Resolver, host: str) -> tuple[list[str], bool]:
    """IPv6 then IPv4 addresses of ``host``, and whether any lookup failed temporarily."""
    try:
        return [str(ipaddress.ip_address(host))], False
    except ValueError:
        pass
    addresses: list[str] = []
    failed = False
    for rdtype in ("AAAA", "A"):
        try:
            status, records = await _lookup(resolver, host, rdtype)
        except DnsTempError:
            failed = True
            continue
        if status == "ok":
            addresses.extend(records)
    return addresses, failed


async def host_hops(resolver: Resolver, host: str, port: int) -> list[Hop]:
    """The addresses of a fixed next hop (a route's host); RelayError if it has none."""
    addresses, failed = await host_addresses(resolver, host)
    if not addresses:
        raise RelayError(
            f"cannot find an address for the next hop {host}"
            + (" (DNS lookup failed)" if failed else ""),
            status="4.4.3" if failed else "5.4.4",
        )
    return [Hop(host, address, port) for address in addresses[:MAX_ADDRESSES]]


def order_mx(records: list[tuple[int, str]], rng: random.Random) -> list[str]:
    """Exchange names by preference, shuffled within each preference."""
    ordered: list[str] = []
    for _, group in groupby(sorted(records), key=lambda record: record[0]):
        names = [name for _, name in group]
        rng.shuffle(names)
        ordered.extend(names)
    return ordered


def is_null_mx(records: list[tuple[int, str]]) -> bool:
    """RFC 7505: the domain says it accepts no mail (an MX of "." and nothing else)."""
    return len(records) == 1 and records[0][1] in (".", "")


async def mx_hops(
    resolver: Resolver, domain: str, port: int, rng: random.Random | None = None
) -> list[Hop]:
    """The next hops for ``domain``, in the order to try them; RelayError if none."""
    rng = rng or random.Random()
    literal = literal_address(domain)
    if literal is not None:
        return [Hop(domain, literal, port)]
    try:
        answer = await asyncio.to_thread(resolver.query, domain, "MX")
    except DnsTempError as exc:
        raise RelayError(f"MX lookup for {domain} failed: {exc.why}", status="4.4.3") from None
    if answer.status == "nxdomain":
        raise RelayError(f"Host or domain name not found: {domain}", status="5.1.2")
    records = list(answer.mx)
    if is_null_mx(records):
        raise RelayError(f"Domain {domain} does not accept mail (null MX)", status="5.1.10")
    if answer.status == "nodata" or not records:
        # RFC 5321 section 5.1: no MX, so the domain itself is the implicit MX.
        hosts = [domain]
    else:
        hosts = order_mx([r for r in records if r[1] not in (".", "")], rng)
    hops: list[Hop] = []
    failed = False
    for host in hosts:
        addresses, host_failed = await host_addresses(resolver, host)
        failed = failed or host_failed
        hops.extend(Hop(host, address, port) for address in addresses)
        if len(hops) >= MAX_ADDRESSES:
            break
    if not hops:
        if failed:
            raise RelayError(f"address lookup for the MX hosts of {domain} failed", status="4.4.3")
        if hosts == [domain]:
            raise RelayError(f"{domain} has no MX and no address", status="5.1.2")
        raise RelayError(f"no address for any MX host of {domain}", status="5.4.4")
    return hops[:MAX_ADDRESSES]
