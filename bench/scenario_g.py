"""Scenario G, authentication: DKIM cost per message, and the SPF/DKIM/DMARC/ARC chain
against Postfix with opendkim + opendmarc.

1. Crypto cost: signing and verifying a 10 KB message with RSA-2048 and Ed25519, in this
   process, with the functions the dkim daemon runs (``milters/dkim.py``: ``sign_message``
   over ``signed_fields`` of the shipped settings, ``verify_message`` with the shipped
   limits). The key record comes from a dict, so no DNS time is included. Median
   microseconds per operation over many iterations.
2. The chain: ``mailgate serve`` with spf, dkim (verifying), dmarc and arc, their shipped
   rule files with the settings pointed at a loopback DNS server and
   ``authentication_results: false`` on spf, dkim and arc (docs/daemon-dmarc.md: dmarc
   writes the one header), against Postfix with opendkim (verify mode, the key in its
   TestDNSData) and opendmarc (SPF checked by itself, DKIM from opendkim's
   Authentication-Results). Both get the same message, signed once in advance with an
   RSA-2048 key published in the zone, from a domain with SPF (``ip4:127.0.0.1 -all``),
   DKIM and DMARC (``p=reject``) records: every message passes, and a message that did
   not would be refused and counted as an error.

OpenDMARC resolves through /etc/resolv.conf only (port 53), so it runs as
tests/test_dmarc.py runs it: in its own network and mount namespace, with the same zone
served on 127.0.0.1:53 there, and a Unix socket Postfix reaches from outside. Its DNS
server's CPU is not counted on Postfix's side, as mailgate's (in this process) is not.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bench import clients, procs, servers
from bench.common import Settings, case_summary, paired_ratios, rotated
from bench.load import build_message
from bench.scenario_e import write_rules
from bench.stats import ratio
from mailgate.milters.dkim import (
    LoadedKey,
    parse_private_key,
    sign_message,
    verify_message,
)
from mailgate.milters.dkim_cli import dns_record, txt_strings
from mailgate.policies.dkim import Settings as DkimSettings
from mailgate.policies.dkim import signed_fields

SESSIONS = 10
SIZE = 10 * 1024
DELIVERY_TIMEOUT = 300.0
SENDER_DOMAIN = "signed.example"
SENDER = f"news@{SENDER_DOMAIN}"
SELECTOR = "rsa2026"
# The authserv-id opendkim writes and opendmarc trusts; mailgate's daemons use their own.
AUTHSERV_ID = "mx.test.example"
CHAIN = ("spf", "dkim", "dmarc", "arc")
EXTRA = ("ms_per_msg", "server_cpu_ms_per_msg", "dkim_cpu_ms_per_msg")


# -- keys and the message ---------------------------------------------------------------------


def rsa_key(bits: int = 2048) -> LoadedKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return parse_private_key(pem)


def ed25519_key() -> LoadedKey:
    seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return parse_private_key(base64.b64encode(seed))


def plain_message(size: int = SIZE) -> bytes:
    """load.py's 10 KB message From the signed domain, without the DATA terminator."""
    return build_message(size, sender=SENDER, recipient=servers.RECIPIENT)[: -len(b".\r\n")]


def _headers(message: bytes) -> list[tuple[str, str]]:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    return [(n, v.strip()) for n, v in (line.split(":", 1) for line in head.split("\r\n"))]


def sign(message: bytes, key: LoadedKey, selector: str, settings: DkimSettings) -> bytes:
    """``message`` with a DKIM-Signature on top, made as the dkim daemon makes it."""
    value = sign_message(
        message,
        SENDER_DOMAIN,
        selector,
        key,
        key.algorithm,
        signed_fields(settings, _headers(message)),
        settings.canonicalization,
    )
    return b"DKIM-Signature: " + value.replace("\n", "\r\n").encode() + b"\r\n" + message


def zone(rsa_record: str) -> str:
    strings = " ".join(f'"{part}"' for part in txt_strings(rsa_record))
    return f"""
$ORIGIN {SENDER_DOMAIN}.
$TTL 300
@           IN SOA ns.{SENDER_DOMAIN}. hostmaster.{SENDER_DOMAIN}. 1 3600 600 86400 60
@           IN TXT "v=spf1 ip4:127.0.0.1 -all"
@           IN A 127.0.0.1
@           IN MX 10 mx.{SENDER_DOMAIN}.
mx          IN A 127.0.0.1
_dmarc      IN TXT "v=DMARC1; p=reject"
{SELECTOR}._domainkey IN TXT {strings}
"""


# -- part 1: crypto cost in process ----------------------------------------------------------


def _median_us(operation: Callable[[], object], iterations: int) -> float:
    times = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        operation()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def _primitive_costs(key: LoadedKey, iterations: int) -> dict[str, float]:
    """The bare signature primitive over a SHA-256 digest: dkimpy's, and OpenSSL's.

    dkimpy computes RSA in Python (``pow`` on big integers) and Ed25519 with PyNaCl
    (libsodium); opendkim and the ``cryptography`` package call OpenSSL. This separates
    the primitive from canonicalization and hashing in the figures above.
    """
    import hashlib

    import dkim.crypto
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    data = b"x" * 64
    if key.algorithm != "rsa-sha256":
        import nacl.signing

        seed = base64.b64decode(key.private)
        nacl_key = nacl.signing.SigningKey(seed)
        private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        digest = hashlib.sha256(data).digest()  # RFC 8463 signs the SHA-256 digest
        return {
            "dkimpy_primitive_sign_us": _median_us(lambda: nacl_key.sign(digest), iterations),
            "openssl_primitive_sign_us": _median_us(lambda: private.sign(digest), iterations),
        }
    parsed = dkim.crypto.parse_pem_private_key(key.private)
    openssl = serialization.load_pem_private_key(key.private, password=None)
    assert isinstance(openssl, rsa.RSAPrivateKey)
    return {
        "dkimpy_primitive_sign_us": _median_us(
            lambda: dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(data), parsed), iterations
        ),
        "openssl_primitive_sign_us": _median_us(
            lambda: openssl.sign(data, padding.PKCS1v15(), hashes.SHA256()), iterations
        ),
    }


def crypto_costs(settings: Settings) -> dict[str, Any]:
    """Median µs per sign and per verify of the 10 KB message, RSA-2048 and Ed25519."""
    iterations = 20 if settings.smoke else 300
    dkim_settings = DkimSettings()  # the shipped defaults: relaxed/relaxed, the header list
    message = plain_message()
    name = f"{SELECTOR}._domainkey.{SENDER_DOMAIN}".encode()
    costs: dict[str, Any] = {}
    for label, key in (("rsa-2048", rsa_key()), ("ed25519", ed25519_key())):
        record = dns_record(key.algorithm, key.public).encode()

        # dkimpy's dnsfunc, answered from memory: the figures are the crypto, not DNS.
        def dnsfunc(query: bytes | str, timeout: float = 5.0, _r: bytes = record) -> bytes | None:
            wanted = query.encode() if isinstance(query, str) else query
            return _r if wanted.rstrip(b".") == name else None

        signed = sign(message, key, SELECTOR, dkim_settings)
        outcome = verify_message(signed, dkim_settings, dnsfunc)
        if [r.result for r in outcome] != ["pass"]:
            raise RuntimeError(f"{label}: the signed message does not verify: {outcome}")
        sign_runs, verify_runs = [], []
        for _ in range(settings.repeats):
            sign_runs.append(
                _median_us(lambda k=key: sign(message, k, SELECTOR, dkim_settings), iterations)
            )
            verify_runs.append(
                _median_us(
                    lambda s=signed, f=dnsfunc: verify_message(s, dkim_settings, f), iterations
                )
            )
        costs[label] = {
            "sign_us": statistics.median(sign_runs),
            "verify_us": statistics.median(verify_runs),
            "sign_runs_us": sign_runs,
            "verify_runs_us": verify_runs,
            "iterations": iterations,
            **_primitive_costs(key, iterations),
        }
        settings.say(
            f"G crypto {label}: sign {costs[label]['sign_us']:.0f} µs, "
            f"verify {costs[label]['verify_us']:.0f} µs"
        )
    return costs


# -- part 2: opendmarc offline ---------------------------------------------------------------

# As tests/test_dmarc.py: the new network namespace's loopback is down, bring it up, then
# serve the zone on 127.0.0.1:53, which a bind-mounted resolv.conf names.
DNS53 = """
import fcntl, socket, struct, sys, time
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    flags = struct.unpack("16sh", fcntl.ioctl(sock, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
    fcntl.ioctl(sock, 0x8914, struct.pack("16sh", b"lo", flags | 1))
sys.path.insert(0, {tests!r})
from dnsserver import TestZoneResolver, _QuietLogger
from dnslib.server import DNSServer
resolver = TestZoneResolver(open({zone!r}).read())
for tcp in (False, True):
    DNSServer(resolver, port=53, address="127.0.0.1", tcp=tcp, logger=_QuietLogger()).start_thread()
open({ready!r}, "w").close()
while True:
    time.sleep(3600)
"""

# opendmarc runs in the background (not exec'd) so that it is not the session leader: its
# process tree, measured as Postfix's, then excludes the DNS server.
RUN_OPENDMARC = """set -e
mount --bind {resolv} /etc/resolv.conf
{python} {dns} &
while [ ! -e {ready} ]; do sleep 0.05; done
{opendmarc} -f -c {conf} -u root &
wait
"""


class OpenDmarc:
    """opendmarc 1.4 on a Unix socket, resolving in its own namespace against the zone."""

    def __init__(self, work: Path, zone_text: str) -> None:
        self.work = work
        self.zone_text = zone_text
        self.socket = work / "opendmarc.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0

    @property
    def postfix_socket(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> OpenDmarc:
        import publicsuffixlist

        tp = servers.test_peers()
        binary = tp.require("/usr/sbin/opendmarc", "opendmarc")
        tp.require("unshare", "util-linux")
        work = self.work
        work.mkdir(parents=True, exist_ok=True)
        (work / "zone").write_text(self.zone_text)
        (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (work / "dns53.py").write_text(
            DNS53.format(
                tests=str(servers.REPO / "tests"),
                zone=str(work / "zone"),
                ready=str(work / "dns.ready"),
            )
        )
        # mailgate's Public Suffix List; "example" added because OpenDMARC has no default
        # "*" rule for top-level domains the list lacks.
        psl = work / "public_suffix_list.dat"
        shipped = Path(publicsuffixlist.__file__).parent / "public_suffix_list.dat"
        psl.write_bytes(shipped.read_bytes() + b"\nexample\n")
        # IgnoreHosts: by default opendmarc skips mail from 127.0.0.1, where the load comes
        # from; a TEST-NET address in its place makes loopback a stranger (as for opendkim).
        (work / "ignore-hosts").write_text("192.0.2.255\n")
        # HistoryFile: it records every evaluation for reports, as the dmarc daemon does.
        # UMask 000: Postfix's smtpd (user postfix) must connect to the root-owned socket.
        (work / "opendmarc.conf").write_text(
            f"Socket local:{self.socket}\nAuthservID {AUTHSERV_ID}\n"
            f"TrustedAuthservIDs {AUTHSERV_ID}\nSPFSelfValidate true\nSPFIgnoreResults true\n"
            "RejectFailures true\nBackground false\nSyslog false\nUMask 000\n"
            f"PublicSuffixList {psl}\nHistoryFile {work / 'history.dat'}\n"
            f"IgnoreHosts {work / 'ignore-hosts'}\n"
        )
        (work / "run.sh").write_text(
            RUN_OPENDMARC.format(
                resolv=work / "resolv.conf",
                python=sys.executable,
                dns=work / "dns53.py",
                ready=work / "dns.ready",
                opendmarc=binary,
                conf=work / "opendmarc.conf",
            )
        )
        tp.make_traversable(work)
        with (work / "opendmarc.log").open("wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--net", "--mount", "sh", str(work / "run.sh")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not (self.socket.exists() and self.pid) and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"opendmarc exited: {self.log()}")
            self.pid = self._find_pid()
            time.sleep(0.05)
        if not self.socket.exists() or not self.pid:
            self.stop()
            raise RuntimeError(f"opendmarc did not start: {self.log()}")
        return self

    def _find_pid(self) -> int:
        """opendmarc's pid: a child of the namespace's shell named opendmarc."""
        assert self.process is not None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if comm == "opendmarc" and ppid == self.process.pid:
                return int(entry)
        return 0

    def log(self) -> str:
        try:
            return (self.work / "opendmarc.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self.process = None
        # The shell exits at once; opendmarc, signalled with it, takes a moment to finish.
        # Wait for it (then kill it), so no benchmark process outlives the scenario.
        for grace in (15.0, 5.0):  # after SIGTERM, then after SIGKILL
            deadline = time.monotonic() + grace
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = 0

    def _alive(self) -> bool:
        """opendmarc still runs (a zombie waiting for init counts as gone)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return bool(self.pid) and stat[stat.rindex(")") + 2] != "Z"


# -- part 2: the chain -----------------------------------------------------------------------


def _chain_settings(name: str, dns: str, work: Path) -> dict[str, Any]:
    """The shipped settings of ``name`` with DNS on the loopback server (merged, not replaced)."""
    import yaml

    from mailgate.policies.rules.loader import RuleLoader

    text = (servers.REPO / "rules" / f"{name}.yaml").read_text()
    shipped: dict[str, Any] = yaml.load(text, Loader=RuleLoader)["settings"]
    shipped["dns"] = {**shipped["dns"], "nameservers": [dns], "timeout": 2.0}
    if name in ("spf", "dkim", "arc"):
        shipped["authentication_results"] = False  # dmarc writes the one header
    if name == "dmarc":
        shipped["history_path"] = str(work / "dmarc-history.sqlite")
    return shipped


def _milters_yaml(rules: dict[str, Path]) -> str:
    free_port = servers.test_peers().free_port
    lines = ["milters:"]
    for name in CHAIN:
        lines += [
            f"  - name: {name}",
            f"    daemon: {name}",
            f"    rules: {rules[name]}",
            f"    socket: inet:{free_port()}@127.0.0.1",
        ]
    return "\n".join(lines) + "\n"


def _daemon_pid(serve_pid: int, daemon: str) -> int | None:
    """The pid of serve's child running ``daemon`` (its command line names it)."""
    for stat in procs.tree(serve_pid):
        try:
            argv = Path(f"/proc/{stat.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat.pid != serve_pid and b"milter" in b" ".join(argv) and daemon.encode() in argv:
            return stat.pid
    return None


def _auth_results(maildir: Path) -> str:
    """The Authentication-Results fields of the newest delivered message."""
    try:
        newest = max((maildir / "new").iterdir(), key=lambda p: p.stat().st_mtime)
    except (OSError, ValueError):
        return ""
    head = newest.read_bytes().split(b"\n\n", 1)[0].replace(b"\r\n", b"\n").decode(errors="replace")
    unfolded = head.replace("\n ", " ").replace("\n\t", " ")
    found = [
        " ".join(line.split())
        for line in unfolded.split("\n")
        if line.lower().startswith("authentication-results:")
    ]
    return " | ".join(found)


def _per_message(run: dict[str, Any]) -> dict[str, Any]:
    messages = run["messages"] or 0
    run["ms_per_msg"] = 1000 / run["rate"] if run["rate"] else None
    run["server_cpu_ms_per_msg"] = run["server_cpu_s"] * 1000 / messages if messages else None
    helper = run.get("helper_cpu_s")
    run["dkim_cpu_ms_per_msg"] = helper * 1000 / messages if messages and helper else None
    return run


def chain(settings: Settings, work: Path) -> dict[str, Any]:
    duration = 0.5 if settings.smoke else 3.0
    dkim_settings = DkimSettings()
    key = rsa_key()
    record = dns_record(key.algorithm, key.public)
    zone_text = zone(record)
    message_path = work / "signed.eml"
    work.mkdir(parents=True, exist_ok=True)
    message_path.write_bytes(sign(plain_message(), key, SELECTOR, dkim_settings))
    tp = servers.test_peers()
    with contextlib.ExitStack() as stack:
        # The zone for mailgate's daemons, served from this process (their DNS caches keep
        # it out of the per-message cost, as a local caching resolver would).
        dns = stack.enter_context(servers.test_module("dnsserver").dns_server(zone_text))
        rules_dir = work / "rules"
        rules_dir.mkdir(parents=True, exist_ok=True)
        rules = {
            name: write_rules(name, rules_dir, _chain_settings(name, dns.address, work))
            for name in CHAIN
        }
        opendkim = stack.enter_context(
            tp.opendkim_verifier(
                work / "peers",
                {f"{SELECTOR}._domainkey.{SENDER_DOMAIN}": record},
                authserv_id=AUTHSERV_ID,
            )
        )
        opendmarc = OpenDmarc(work / "dmarc", zone_text).start()
        stack.callback(opendmarc.stop)
        mailgate = servers.MailgateServe(
            work / "chain", config=_milters_yaml(rules), name="mailgate-chain"
        )
        postfix = servers.Postfix(
            work / "p",  # short: Postfix's socket paths must fit in 108 bytes
            milters=[opendkim.postfix_socket, opendmarc.postfix_socket],
            name="postfix-chain",
        )
        # opendkim and opendmarc are Postfix's counterparts of mailgate's daemons (serve's
        # children): both sides' server CPU covers them.
        postfix.companions = [int(opendkim.daemon.pid), opendmarc.pid]
        peers: list[servers.Peer] = [mailgate, postfix]
        runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
        verdicts: dict[str, str] = {}
        try:
            for peer in peers:
                peer.start()
            # The DKIM verifier of each side, measured apart as well: the per-message cost
            # of the verification (crypto + milter protocol) in each implementation.
            dkim_pids = {
                "mailgate-chain": [pid]
                if (pid := _daemon_pid(mailgate.pid, "dkim")) is not None
                else [],
                "postfix-chain": [int(opendkim.daemon.pid)],
            }
            for repeat in range(settings.repeats):
                for peer in rotated(peers, repeat):
                    result = clients.measured(
                        peer,
                        lambda peer=peer: clients.pyload(
                            peer.port,
                            sessions=SESSIONS,
                            size=SIZE,
                            duration=duration,
                            sender=SENDER,
                            message=message_path,
                        ),
                        extra_pids=dkim_pids[peer.name] or None,
                        wait_delivery=DELIVERY_TIMEOUT,
                    )
                    runs[peer.name].append(_per_message(result))
                    settings.say(
                        f"G chain #{repeat + 1} {peer.name}: {result['rate']:.0f} msg/s, "
                        f"{result['ms_per_msg'] or 0:.2f} ms/msg, {result['errors']} errors"
                    )
            verdicts["mailgate-chain"] = _auth_results(mailgate.maildir)
            verdicts["postfix-chain"] = _auth_results(postfix.mta.maildir)
        finally:
            for peer in peers:
                peer.stop()
    return {
        "median": case_summary(runs, EXTRA),
        "runs": runs,
        "duration_per_run_s": duration,
        "authentication_results": verdicts,
    }


def run(settings: Settings) -> dict[str, Any]:
    work = settings.work / "G"
    costs = crypto_costs(settings)
    result = chain(settings, work)
    medians = result["median"]
    m, p = medians.get("mailgate-chain", {}), medians.get("postfix-chain", {})
    return {
        "title": "G. Authentication (DKIM crypto; SPF+DKIM+DMARC+ARC chain, 10 KB, 10 sessions)",
        "peers": ["mailgate-chain", "postfix-chain"],
        "size": SIZE,
        "sessions": SESSIONS,
        "crypto": costs,
        "chain": result,
        "ratios": {
            "mailgate spf+dkim+dmarc+arc / postfix opendkim+opendmarc": ratio(
                m.get("rate"), p.get("rate")
            ),
            "server CPU per message, mailgate/postfix": ratio(
                m.get("server_cpu_ms_per_msg"), p.get("server_cpu_ms_per_msg")
            ),
            "DKIM verifier CPU per message, dkim daemon/opendkim": ratio(
                m.get("dkim_cpu_ms_per_msg"), p.get("dkim_cpu_ms_per_msg")
            ),
        },
        "paired_ratios": {
            "mailgate/postfix msg/s": paired_ratios(
                result["runs"], "mailgate-chain", "postfix-chain"
            )
        },
    }
