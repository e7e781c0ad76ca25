"""A real DNS server on loopback serving test zones (dnslib), over UDP and TCP.

Zones are written in BIND master-file syntax. Unlike dnslib's own ZoneResolver this one
answers NOERROR with an empty answer (NODATA) for a name that exists without records of
the asked type, follows CNAMEs, and serves wildcards. Two kinds of names misbehave on
purpose, for the failure tests:

- a name under a ``drop_suffixes`` entry gets no reply at all (a timeout);
- a name under a ``servfail_suffixes`` entry gets SERVFAIL.

For DNSSEC tests (DANE), a name under an ``authentic_suffixes`` entry is answered with
the AD bit set, as a validating resolver does for data it validated. No signature exists
anywhere: this stands in for the resolver's verdict, which is all a stub (mailgate) sees.

Usage::

    with dns_server(ZONE) as server:
        resolver = Resolver([server.address])       # "127.0.0.1:PORT"
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Sequence

from dnslib import QTYPE, RCODE, RR, DNSLabel, DNSRecord
from dnslib.server import BaseResolver, DNSError, DNSServer

HOST = "127.0.0.1"


class TestZoneResolver(BaseResolver):  # type: ignore[misc]
    __test__ = False  # not a pytest test class

    def __init__(
        self,
        zone: str,
        *,
        drop_suffixes: Sequence[str] = (),
        servfail_suffixes: Sequence[str] = (),
        authentic_suffixes: Sequence[str] = (),
    ) -> None:
        self._lock = threading.Lock()
        self.authentic = [DNSLabel(s) for s in authentic_suffixes]
        self.records: list[RR] = []
        self.drop = [DNSLabel(s) for s in drop_suffixes]
        self.servfail = [DNSLabel(s) for s in servfail_suffixes]
        self.queries: list[tuple[str, str]] = []
        self.set_zone(zone)

    def set_zone(self, zone: str) -> None:
        records = list(RR.fromZone(zone))
        with self._lock:
            self.records = records

    def count(self, name: str, qtype: str | None = None) -> int:
        """How many queries for ``name`` (and ``qtype``) the server answered or dropped."""
        wanted = name.rstrip(".").lower()
        with self._lock:
            return sum(
                1
                for qname, kind in self.queries
                if qname == wanted and (qtype is None or kind == qtype)
            )

    @staticmethod
    def _matching(records: list[RR], qname: DNSLabel) -> list[RR]:
        exact = [rr for rr in records if rr.rname == qname]
        if exact:
            return exact
        # A wildcard matches a name with no records of its own.
        for rr in records:
            label = rr.rname.label
            wildcard = bool(label) and label[0] == b"*"
            if wildcard and qname.matchSuffix(DNSLabel(label[1:])):
                exact.append(RR(qname, rr.rtype, rr.rclass, rr.ttl, rr.rdata))
        return exact

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((str(qname).rstrip(".").lower(), qtype))
            records = list(self.records)
        if any(qname.matchSuffix(suffix) for suffix in self.drop):
            raise DNSError("dropped on purpose")
        reply = request.reply()
        if any(qname.matchSuffix(suffix) for suffix in self.servfail):
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        self._answer(records, reply, qname, qtype)
        # dnslib's reply() copies the query's flags; AD (which mailgate sets to ask for the
        # DNSSEC status, RFC 6840 5.7) must only come back where the data "validated".
        reply.header.ad = int(any(qname.matchSuffix(suffix) for suffix in self.authentic))
        return reply

    def _answer(self, records: list[RR], reply: DNSRecord, qname: DNSLabel, qtype: str) -> None:
        name = qname
        for _ in range(8):
            found = self._matching(records, name)
            if not found:
                if name == qname:
                    reply.header.rcode = RCODE.NXDOMAIN
                return
            wanted = [rr for rr in found if qtype in ("ANY", QTYPE[rr.rtype])]
            if wanted:
                for rr in wanted:
                    reply.add_answer(rr)
                return
            cnames = [rr for rr in found if QTYPE[rr.rtype] == "CNAME"]
            if not cnames:
                return  # NODATA
            reply.add_answer(cnames[0])
            name = cnames[0].rdata.label


class TestDnsServer:
    __test__ = False

    def __init__(self, resolver: TestZoneResolver, port: int) -> None:
        self.resolver = resolver
        self.port = port
        self.host = HOST

    @property
    def address(self) -> str:
        """The server as a nameserver setting: ``127.0.0.1:PORT``."""
        return f"{self.host}:{self.port}"

    def set_zone(self, zone: str) -> None:
        self.resolver.set_zone(zone)


class _QuietLogger:
    def __getattr__(self, name: str) -> object:
        return lambda *args: None


def _free_port() -> int:
    # A port free for both UDP and TCP.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for the DNS server")


@contextlib.contextmanager
def dns_server(
    zone: str,
    *,
    drop_suffixes: Sequence[str] = (),
    servfail_suffixes: Sequence[str] = (),
    authentic_suffixes: Sequence[str] = (),
) -> Iterator[TestDnsServer]:
    """Serve ``zone`` on 127.0.0.1 (UDP and TCP, one port) until the block ends."""
    resolver = TestZoneResolver(
        zone,
        drop_suffixes=drop_suffixes,
        servfail_suffixes=servfail_suffixes,
        authentic_suffixes=authentic_suffixes,
    )
    port = _free_port()
    servers = [
        DNSServer(resolver, port=port, address=HOST, logger=_QuietLogger()),
        DNSServer(resolver, port=port, address=HOST, tcp=True, logger=_QuietLogger()),
    ]
    for server in servers:
        server.start_thread()
    try:
        yield TestDnsServer(resolver, port)
    finally:
        for server in servers:
            server.stop()
            server.server.server_close()
