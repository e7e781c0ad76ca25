"""Scenario E, policy daemons: what each daemon costs per message, and the whole chain
against Postfix with postgrey + clamav-milter + spamass-milter.

The backends are real and started once: a DNS server on loopback serving the DNSBL and
DNSWL test zones (tests/dnsserver.py), clamd with the EICAR database, spamd with the stock
rules. Each daemon runs with its shipped rules; only its settings are pointed at those
backends (and given limits a benchmark does not trip: a quota far above the load, rate
limits above it, a one-second greylist delay warmed up before measuring).

- Per daemon: ``mailgate serve`` with that daemon alone, then with none, alternating; the
  daemon's cost is the difference in time per message at 10 sessions, and in the serve
  tree's CPU per message (the daemon is a child of serve). The backend's own CPU (clamd,
  spamd) is reported beside it.
- The chain: mailgate with all six issue daemons (dnsbl, greylist, ratelimit, clamav,
  spamassassin, quota) against Postfix with postgrey (check_policy_service),
  clamav-milter and spamass-milter in front of the same clamd and spamd. Postfix's side
  does less (no DNSBL, quota or rate limits); the ratio is reported as measured.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import yaml

from bench import clients, servers
from bench.common import Settings, case_summary, paired_ratios, rotated
from bench.stats import ratio
from mailgate.policies.rules import load_rules
from mailgate.policies.rules.loader import RuleLoader

SESSIONS = 10
SIZE = 10 * 1024
DELIVERY_TIMEOUT = 300.0
GREYLIST_DELAY = 1
EXTRA = ("ms_per_msg", "server_cpu_ms_per_msg", "backend_cpu_ms_per_msg")
DAEMONS = ("content", "dnsbl", "greylist", "ratelimit", "clamav", "spamassassin", "quota")
CHAIN = ("dnsbl", "greylist", "ratelimit", "clamav", "spamassassin", "quota")

ZONE = """
$ORIGIN bench.example.
$TTL 300
@                   IN SOA ns.bench.example. hostmaster.bench.example. 1 3600 600 86400 60
2.0.0.127.bl        IN A 127.0.0.2
2.0.0.127.wl        IN A 127.0.10.1
"""


def _settings(
    name: str, dns: str, clamd_port: int, spamd_port: int, work: Path
) -> dict[str, Any] | None:
    """Daemon ``name``'s settings for the benchmark (None: the shipped ones)."""
    resolver = {"nameservers": [dns], "timeout": 2.0}
    if name == "dnsbl":
        return {
            "dns": resolver,
            "deadline": 2.0,
            "decide_at": "rcpt",
            "skip_networks": [],
            "zones": [
                {"zone": "bl.bench.example", "weight": 3, "codes": ["127.0.0.2"]},
                {"zone": "wl.bench.example", "type": "allow", "weight": -2},
            ],
        }
    if name == "greylist":
        return {
            "delay": GREYLIST_DELAY,
            "dnswl_zones": ["wl.bench.example"],
            "store": {"backend": "sqlite", "path": str(work / "greylist.sqlite")},
            "dns": resolver,
        }
    if name == "ratelimit":
        high = {"count": 100_000_000, "window": 60}
        limits = {"connections": high, "messages": high, "recipients": high}
        return {
            "client_ip": limits,
            "sender_domain": limits,
            "store": {"backend": "sqlite", "path": str(work / "ratelimit.sqlite")},
        }
    if name == "clamav":
        return {"clamd": f"tcp:127.0.0.1:{clamd_port}", "timeout": 60}
    if name == "spamassassin":
        return {"address": f"127.0.0.1:{spamd_port}", "timeout": 60}
    return None


def write_rules(name: str, directory: Path, settings: dict[str, Any] | None) -> Path:
    """The shipped rule file of ``name`` with the benchmark's settings.

    The load comes from loopback, which the shipped rules trust (nothing is checked or
    counted for it), so the rule named trusted-networks is disabled: the benchmark
    measures the work done for a stranger.
    """
    text = (servers.REPO / "rules" / f"{name}.yaml").read_text()
    data = yaml.load(text, Loader=RuleLoader)  # YAML 1.2 booleans, as the daemons read it
    if settings is not None:
        data["settings"] = settings
    for rule in data.get("rules", []):
        if rule.get("name") == "trusted-networks":
            rule["enabled"] = False
    data.pop("tests", None)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    load_rules(path, check_test_files=False)  # a RuleError here names file, line and field
    return path


class Backends:
    """The DNS server, clamd and spamd, shared by every run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._stack = contextlib.ExitStack()
        self.dns: Any = None
        self.clamd: Any = None
        self.spamd: Any = None

    def start(self) -> Backends:
        tp = servers.test_peers()
        dnsserver = servers.test_module("dnsserver")
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self.dns = self._stack.enter_context(dnsserver.dns_server(ZONE))
            self.clamd = self._stack.enter_context(tp.clamd_server(self.work))
            self.spamd = self._stack.enter_context(tp.spamd_server(self.work))
        except BaseException:
            self._stack.close()
            raise
        return self

    @property
    def pids(self) -> list[int]:
        return [int(self.clamd.daemon.pid), int(self.spamd.daemon.pid)]

    def stop(self) -> None:
        self._stack.close()


def _per_message(run: dict[str, Any]) -> dict[str, Any]:
    messages = run["messages"] or 0
    run["ms_per_msg"] = 1000 / run["rate"] if run["rate"] else None
    run["server_cpu_ms_per_msg"] = run["server_cpu_s"] * 1000 / messages if messages else None
    helper = run.get("helper_cpu_s")
    run["backend_cpu_ms_per_msg"] = helper * 1000 / messages if messages and helper else None
    return run


def _milters_yaml(names: tuple[str, ...], rules: dict[str, Path]) -> str:
    # TCP sockets, like Postfix's milters here (and no Unix path to outgrow 108 bytes).
    free_port = servers.test_peers().free_port
    lines = ["milters:"]
    for name in names:
        lines += [
            f"  - name: {name}",
            f"    daemon: {name}",
            f"    rules: {rules[name]}",
            f"    socket: inet:{free_port()}@127.0.0.1",
        ]
    return "\n".join(lines) + "\n"


def _warm(peer: servers.Peer, settings: Settings) -> None:
    """Let greylisting meet the benchmark's triplet once, then wait out its delay."""
    with contextlib.suppress(clients.LoadFailed):
        clients.pyload(peer.port, sessions=1, size=1024, count=2, max_time=60)
    time.sleep(GREYLIST_DELAY + 0.5)


def _measure(
    peers: list[servers.Peer],
    settings: Settings,
    backends: Backends,
    duration: float,
    label: str,
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
    for repeat in range(settings.repeats):
        for peer in rotated(peers, repeat):
            result = clients.measured(
                peer,
                lambda peer=peer: clients.pyload(
                    peer.port, sessions=SESSIONS, size=SIZE, duration=duration
                ),
                extra_pids=backends.pids,
                wait_delivery=DELIVERY_TIMEOUT,
            )
            runs[peer.name].append(_per_message(result))
            settings.say(
                f"E {label} #{repeat + 1} {peer.name}: {result['rate']:.0f} msg/s, "
                f"{result['ms_per_msg'] or 0:.2f} ms/msg, {result['errors']} errors"
            )
    return runs


def run(settings: Settings) -> dict[str, Any]:
    duration = 0.5 if settings.smoke else 3.0
    work = settings.work / "E"
    backends = Backends(work / "backends").start()
    daemons = ("clamav",) if settings.smoke else DAEMONS
    try:
        rules_dir = work / "rules"
        rules_dir.mkdir(parents=True, exist_ok=True)
        rules = {
            name: write_rules(
                name,
                rules_dir,
                _settings(
                    name, backends.dns.address, backends.clamd.port, backends.spamd.port, work
                ),
            )
            for name in DAEMONS
        }
        per_daemon = _per_daemon(settings, backends, rules, daemons, duration, work)
        chain = _chain(settings, backends, rules, duration, work)
    finally:
        backends.stop()
    costs = {
        name: {
            "ms_per_msg": _difference(point, name, "ms_per_msg"),
            "server_cpu_ms_per_msg": _difference(point, name, "server_cpu_ms_per_msg"),
            "backend_cpu_ms_per_msg": point["median"].get(name, {}).get("backend_cpu_ms_per_msg"),
        }
        for name, point in per_daemon.items()
    }
    medians = chain["median"]
    return {
        "title": "E. Policy daemons (10 KB, 10 sessions)",
        "peers": ["mailgate-chain", "postfix-chain"],
        "duration_per_run_s": duration,
        "per_daemon": per_daemon,
        "cost_per_message": costs,
        "chain": chain,
        "ratios": {
            "mailgate six daemons / postfix postgrey+clamav-milter+spamass-milter": paired_ratios(
                chain["runs"], "mailgate-chain", "postfix-chain"
            ),
            "server CPU per message, mailgate/postfix": ratio(
                medians.get("mailgate-chain", {}).get("server_cpu_ms_per_msg"),
                medians.get("postfix-chain", {}).get("server_cpu_ms_per_msg"),
            ),
        },
    }


def _difference(point: dict[str, Any], name: str, key: str) -> float | None:
    with_daemon = point["median"].get(name, {}).get(key)
    without = point["median"].get("none", {}).get(key)
    if with_daemon is None or without is None:
        return None
    return float(with_daemon) - float(without)


def _per_daemon(
    settings: Settings,
    backends: Backends,
    rules: dict[str, Path],
    daemons: tuple[str, ...],
    duration: float,
    work: Path,
) -> dict[str, Any]:
    points: dict[str, Any] = {}
    for name in daemons:
        peers: list[servers.Peer] = [
            servers.MailgateServe(work / name, config=_milters_yaml((name,), rules), name=name),
            servers.MailgateServe(work / name, name="none"),
        ]
        try:
            for peer in peers:
                peer.start()
            if name == "greylist":
                _warm(peers[0], settings)
            runs = _measure(peers, settings, backends, duration, name)
        finally:
            for peer in peers:
                peer.stop()
            servers.remove_tree(work / name)
        points[name] = {"median": case_summary(runs, EXTRA), "runs": runs}
    return points


def _chain(
    settings: Settings,
    backends: Backends,
    rules: dict[str, Path],
    duration: float,
    work: Path,
) -> dict[str, Any]:
    tp = servers.test_peers()
    with contextlib.ExitStack() as stack:
        clamav_milter = stack.enter_context(tp.clamav_milter(work / "peers", clamd=backends.clamd))
        spamass_milter = stack.enter_context(
            tp.spamass_milter(work / "peers", spamd=backends.spamd)
        )
        postgrey = stack.enter_context(servers.postgrey(work / "postgrey", GREYLIST_DELAY))
        mailgate = servers.MailgateServe(
            work / "chain", config=_milters_yaml(CHAIN, rules), name="mailgate-chain"
        )
        postfix = servers.Postfix(
            work / "p",  # short: Postfix's socket paths must fit in 108 bytes
            milters=[clamav_milter.postfix_socket, spamass_milter.postfix_socket],
            main_cf={
                "smtpd_recipient_restrictions": (
                    f"check_policy_service inet:127.0.0.1:{postgrey.port}, permit"
                )
            },
            name="postfix-chain",
        )
        # Postfix's policy server and milters are its counterpart of mailgate's daemons,
        # which run as children of serve: both sides' server CPU covers them.
        postfix.companions = [
            int(postgrey.pid),
            int(clamav_milter.daemon.pid),
            int(spamass_milter.daemon.pid),
        ]
        peers: list[servers.Peer] = [mailgate, postfix]
        try:
            for peer in peers:
                peer.start()
                _warm(peer, settings)
            runs = _measure(peers, settings, backends, duration, "chain")
        finally:
            for peer in peers:
                peer.stop()
    return {"median": case_summary(runs, EXTRA), "runs": runs}
