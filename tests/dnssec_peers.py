"""Real DNSSEC on loopback: Knot DNS signs and serves test zones, unbound validates them.

``validating_resolver(zones, signed=...)`` starts ``knotd`` (authoritative; every zone in
``signed`` gets ``dnssec-signing: on``, keys made on the spot) and ``unbound`` (recursive,
with stub zones pointing at knotd, the signed zones' KSKs as trust anchors, the other
zones declared insecure). mailgate then asks unbound, which sets the AD bit only on data
it validated: the whole chain a deployment has, minus the Internet. Both programs come
from Debian (packages ``knot`` and ``unbound``, in .ci/system-packages).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
from dnsserver import _free_port

from peers import PeerUnavailable

HOST = "127.0.0.1"


def _query(
    port: int, name: str, rdtype: str, *, dnssec: bool = False
) -> dns.message.Message | None:
    request = dns.message.make_query(name, rdtype, want_dnssec=dnssec)
    if dnssec:
        request.flags |= dns.flags.AD
    try:
        return dns.query.udp(request, HOST, port=port, timeout=1.0)
    except (OSError, dns.exception.DNSException):
        return None


def _wait(predicate: object, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready in 30 s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def validating_resolver(work: Path, zones: Mapping[str, str], *, signed: set[str]) -> Iterator[str]:
    """Serve ``zones`` (name -> zone file text) and yield unbound's ``127.0.0.1:PORT``."""
    knotd, unbound = shutil.which("knotd"), shutil.which("unbound")
    if knotd is None or unbound is None:
        raise PeerUnavailable("knotd and unbound are needed (Debian packages knot, unbound)")
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("zones", "db", "run"):
        (work / sub).mkdir(exist_ok=True)
    for name, text in zones.items():
        (work / "zones" / f"{name}.zone").write_text(text)
    knot_port = _free_port()
    zone_lines = "".join(
        f"  - domain: {name}\n"
        + ("    dnssec-signing: on\n    dnssec-policy: test\n" if name in signed else "")
        for name in zones
    )
    (work / "knot.conf").write_text(
        f"""server:
    rundir: "{work / "run"}"
    listen: {HOST}@{knot_port}
database:
    storage: "{work / "db"}"
log:
  - target: stderr
    any: info
policy:
  - id: test
    algorithm: ecdsap256sha256
template:
  - id: default
    storage: "{work / "zones"}"
    file: "%s.zone"
    zonefile-sync: -1
    journal-content: none
zone:
{zone_lines}"""
    )
    knot_log = work / "knotd.log"
    with knot_log.open("ab") as out:
        knot = subprocess.Popen(
            [knotd, "-c", str(work / "knot.conf")], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        anchors: list[str] = []
        for name in sorted(signed):

            def ksk(name: str = name) -> bool:
                reply = _query(knot_port, name, "DNSKEY")
                if reply is None or not reply.answer:
                    return False
                for rrset in reply.answer:
                    for rdata in rrset:
                        if rrset.rdtype == dns.rdatatype.DNSKEY and rdata.flags == 257:
                            anchors.append(f'    trust-anchor: "{name}. DNSKEY {rdata.to_text()}"')
                            return True
                return False

            _wait(ksk, f"knotd signing {name}", knot, knot_log)
        unbound_port = _free_port()
        insecure = "".join(f'    domain-insecure: "{n}"\n' for n in zones if n not in signed)
        stubs = "".join(
            f'stub-zone:\n    name: "{n}"\n    stub-addr: {HOST}@{knot_port}\n' for n in zones
        )
        (work / "unbound.conf").write_text(
            f"""server:
    interface: {HOST}@{unbound_port}
    port: {unbound_port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{work}"
    pidfile: "{work / "unbound.pid"}"
    use-syslog: no
    verbosity: 1
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "validator iterator"
    harden-dnssec-stripped: yes
    local-zone: "test." nodefault
{chr(10).join(anchors)}
{insecure}
{stubs}
remote-control:
    control-enable: no
"""
        )
        unbound_log = work / "unbound.log"
        with unbound_log.open("ab") as out:
            resolver = subprocess.Popen(
                [unbound, "-d", "-c", str(work / "unbound.conf")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            first = sorted(signed)[0] if signed else next(iter(zones))

            def validating() -> bool:
                reply = _query(unbound_port, first, "SOA", dnssec=True)
                return reply is not None and bool(reply.flags & dns.flags.AD or not signed)

            _wait(validating, "unbound", resolver, unbound_log)
            yield f"{HOST}:{unbound_port}"
        finally:
            _stop(resolver)
    finally:
        _stop(knot)
