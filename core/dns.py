"""The one resolver layer every DNS lookup of mailgate goes through.

Built on dnspython. It adds what mail policy needs and dnspython leaves to its callers:

- **answers as data**: a lookup returns a :class:`DnsAnswer` whose ``status`` says "ok",
  "nxdomain" (the name does not exist) or "nodata" (it exists without records of that
  type); policies need that difference (RFC 7208 void lookups, DNSBL "not listed");
- **failures as one exception**: a timeout, SERVFAIL, REFUSED, a truncated or garbled
  reply, no reachable nameserver are all :class:`DnsTempError`, which callers map to a
  temporary error (temperror, tempfail), never to pass or fail;
- **a small cache** shared by the threads of a daemon, keeping each answer as long as its
  TTL says (capped by ``max_ttl``) and negative answers for ``negative_ttl``;
- **configurable nameservers** (``ADDRESS[:PORT]``), else those of /etc/resolv.conf;
- **DNSSEC status on request**: ``query(..., dnssec=True)`` sets the EDNS DO bit (and AD,
  RFC 6840 section 5.7) and reports the reply's AD bit as ``DnsAnswer.authentic``. The AD
  bit is only believed when the resolver was built with ``trust_ad=True`` (setting
  ``dns_dnssec_trusted``): a validating recursive resolver on a path nobody can tamper with
  (loopback, or a link the operator controls). Otherwise ``authentic`` is always False, so
  nothing that depends on it (DANE) ever applies. Validation is the resolver's job, never
  this module's.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename

from mailgate.policies.settings import DnsSettings, parse_nameserver

Status = Literal["ok", "nxdomain", "nodata"]


class DnsTempError(Exception):
    """The lookup did not get an answer this time (timeout, SERVFAIL, no server ...)."""

    def __init__(self, name: str, rdtype: str, why: str) -> None:
        super().__init__(f"{name}/{rdtype}: {why}")
        self.name = name
        self.rdtype = rdtype
        self.why = why


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The records of one name and type (text form), or why there are none."""

    name: str
    rdtype: str
    status: Status
    records: tuple[str, ...] = ()
    ttl: int = 0
    # TXT records as their strings joined without separators (RFC 7208 3.3), as bytes.
    txt: tuple[bytes, ...] = field(default=(), repr=False)
    # MX records as (preference, exchange without the final dot).
    mx: tuple[tuple[int, str], ...] = field(default=(), repr=False)
    # DNSSEC-validated by a trusted resolver (AD bit); only ever True for dnssec=True lookups.
    authentic: bool = False

    @property
    def exists(self) -> bool:
        """True unless the name does not exist at all."""
        return self.status != "nxdomain"


class Resolver:
    """Thread-safe lookups with a TTL cache; one per daemon process (or per settings)."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 3.0,
        cache_size: int = 10000,
        negative_ttl: int = 60,
        max_ttl: int = 86400,
        trust_ad: bool = False,
    ) -> None:
        if nameservers:
            servers = [parse_nameserver(server) for server in nameservers]
        else:
            system = dns.resolver.Resolver(configure=True)
            servers = [(str(ns), int(system.port)) for ns in system.nameservers]
        self.servers: tuple[tuple[str, int], ...] = tuple(servers)
        self.timeout = timeout
        self.cache_size = cache_size
        self.negative_ttl = negative_ttl
        self.max_ttl = max_ttl
        self.trust_ad = trust_ad
        self._cache: OrderedDict[tuple[str, str, bool], tuple[float, DnsAnswer]] = OrderedDict()
        self._lock = threading.Lock()
        self.lookups = 0  # queries sent (cache misses), for tests and statistics

    @classmethod
    def from_settings(cls, settings: DnsSettings) -> Resolver:
        return cls(
            settings.nameservers,
            timeout=settings.timeout,
            cache_size=settings.cache_size,
            negative_ttl=settings.negative_ttl,
            max_ttl=settings.max_ttl,
        )

    # -- lookups ----------------------------------------------------------------------

    def query(
        self, name: str, rdtype: str, *, timeout: float | None = None, dnssec: bool = False
    ) -> DnsAnswer:
        """The answer for ``name``/``rdtype``; DnsTempError when there is none this time.

        ``dnssec`` asks for the DNSSEC status (see the module docstring): the answer's
        ``authentic`` is True only if a trusted resolver set the AD bit.
        """
        key = (_normal(name), rdtype.upper(), dnssec)
        cached = self._cached(key)
        if cached is not None:
            return cached
        answer = self._ask(key[0], key[1], self.timeout if timeout is None else timeout, dnssec)
        self._store(key, answer)
        return answer

    def a(self, name: str) -> list[str]:
        return list(self.query(name, "A").records)

    def aaaa(self, name: str) -> list[str]:
        return list(self.query(name, "AAAA").records)

    def addresses(self, name: str) -> list[str]:
        """A then AAAA records of ``name``."""
        return self.a(name) + self.aaaa(name)

    def txt(self, name: str) -> list[bytes]:
        return list(self.query(name, "TXT").txt)

    def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted(self.query(name, "MX").mx)

    def ptr(self, address: str) -> list[str]:
        """The names of ``address`` (reverse lookup), without the final dot."""
        reverse = dns.reversename.from_address(address).to_text()
        return list(self.query(reverse, "PTR").records)

    def verified_ptr(self, address: str) -> str | None:
        """The first reverse name of ``address`` that resolves back to it (FCrDNS)."""
        wanted = ipaddress.ip_address(address)
        for name in self.ptr(address)[:10]:
            try:
                found = self.a(name) if wanted.version == 4 else self.aaaa(name)
            except DnsTempError:
                continue
            if any(ipaddress.ip_address(a) == wanted for a in found):
                return name
        return None

    # -- the cache --------------------------------------------------------------------

    def _cached(self, key: tuple[str, str, bool]) -> DnsAnswer | None:
        if not self.cache_size:
            return None
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            expires, answer = entry
            if expires <= time.monotonic():
                del self._cache[key]
                return None
            self._cache.move_to_end(key)
            return answer

    def _store(self, key: tuple[str, str, bool], answer: DnsAnswer) -> None:
        if not self.cache_size:
            return
        ttl = answer.ttl if answer.status == "ok" else self.negative_ttl
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0:
            return
        with self._lock:
            self._cache[key] = (time.monotonic() + ttl, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- the wire ---------------------------------------------------------------------

    def _ask(self, name: str, rdtype: str, timeout: float, dnssec: bool = False) -> DnsAnswer:
        if not self.servers:
            raise DnsTempError(name, rdtype, "no nameserver configured")
        try:
            qname = dns.name.from_text(name)
            qtype = dns.rdatatype.from_text(rdtype)
        except (dns.exception.DNSException, ValueError) as exc:
            # A name no server could answer for (an empty label, one over 63 octets):
            # it cannot exist.
            if isinstance(exc, dns.rdatatype.UnknownRdatatype):
                raise
            return DnsAnswer(name, rdtype, "nxdomain")
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        # Each server gets its share of the time, twice round, as a stub resolver would.
        for attempt in range(2):
            for host, port in self.servers:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                share = max(left / max(len(self.servers) * (2 - attempt), 1), 0.05)
                try:
                    response = self._exchange(qname, qtype, host, port, min(share, left), dnssec)
                except (dns.exception.Timeout, TimeoutError):
                    problems.append(f"{host}:{port} timed out")
                    continue
                except (OSError, dns.exception.DNSException) as exc:
                    problems.append(f"{host}:{port} {type(exc).__name__}: {exc}")
                    continue
                self.lookups += 1
                answer = _answer(name, rdtype, qname, qtype, response, problems)
                if dnssec and self.trust_ad and response.flags & dns.flags.AD:
                    answer = replace(answer, authentic=True)
                return answer
        why = "; ".join(problems[-3:]) or "timed out"
        raise DnsTempError(name, rdtype, why)

    @staticmethod
    def _exchange(
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
        host: str,
        port: int,
        timeout: float,
        dnssec: bool = False,
    ) -> dns.message.Message:
        request = dns.message.make_query(qname, qtype, use_edns=0, payload=1232, want_dnssec=dnssec)
        request.flags |= dns.flags.RD
        if dnssec:
            # RFC 6840 section 5.7: AD in a query asks for the AD bit in the reply, which a
            # validating resolver then sets on data it validated.
            request.flags |= dns.flags.AD
        response = dns.query.udp(request, host, port=port, timeout=timeout, ignore_unexpected=True)
        if response.flags & dns.flags.TC:
            response = dns.query.tcp(request, host, port=port, timeout=timeout)
        return response


def _answer(
    name: str,
    rdtype: str,
    qname: dns.name.Name,
    qtype: dns.rdatatype.RdataType,
    response: dns.message.Message,
    problems: list[str],
) -> DnsAnswer:
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return DnsAnswer(name, rdtype, "nxdomain")
    if rcode != dns.rcode.NOERROR:
        raise DnsTempError(name, rdtype, f"the server answered {dns.rcode.to_text(rcode)}")
    # Follow CNAMEs within the answer section, as a stub resolver's recursive server gave them.
    target = qname
    for _ in range(16):
        cname = response.get_rrset(response.answer, target, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            break
        target = cname[0].target
    rrset = response.get_rrset(response.answer, target, dns.rdataclass.IN, qtype)
    if rrset is None or len(rrset) == 0:
        return DnsAnswer(name, rdtype, "nodata")
    records: list[str] = []
    txt: list[bytes] = []
    mx: list[tuple[int, str]] = []
    for rdata in rrset:
        if qtype == dns.rdatatype.TXT:
            joined = b"".join(rdata.strings)
            txt.append(joined)
            records.append(joined.decode("utf-8", "replace"))
        elif qtype == dns.rdatatype.MX:
            exchange = rdata.exchange.to_text(omit_final_dot=True)
            mx.append((int(rdata.preference), exchange))
            records.append(f"{rdata.preference} {exchange}")
        elif qtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
            records.append(rdata.target.to_text(omit_final_dot=True))
        else:
            records.append(rdata.to_text())
    return DnsAnswer(
        name, rdtype, "ok", tuple(records), int(rrset.ttl), tuple(txt), tuple(sorted(mx))
    )


def _normal(name: str) -> str:
    return name.rstrip(".").lower() + "."


_SHARED: dict[DnsSettings, Resolver] = {}
_SHARED_LOCK = threading.Lock()


def resolver_for(settings: DnsSettings) -> Resolver:
    """The process's resolver for these settings (one cache per distinct settings)."""
    with _SHARED_LOCK:
        resolver = _SHARED.get(settings)
        if resolver is None:
            resolver = _SHARED[settings] = Resolver.from_settings(settings)
        return resolver
