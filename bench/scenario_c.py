"""Scenario C, milter cost: the same chain of no-op milters on mailgate and on Postfix.

N no-op pymilter processes (bench/noop_milter.py: every stage CONTINUE) are started once
and shared. For each N, ``mailgate serve`` with ``milters:`` = the first N and Postfix
with ``smtpd_milters`` = the same N are started, and ``bench.load`` sends 1 KB messages
over 10 reused sessions to each in turn (waiting for delivery after each run). The cost
per hop is the least-squares slope of time per message (1 / messages/s, at that fixed
concurrency) over N; the slope of the MTA's own CPU per message is reported beside it
(the milters' CPU is measured separately and is the same code for both MTAs).
"""

from __future__ import annotations

from typing import Any

from bench import clients, servers
from bench.common import Settings, case_summary, rotated
from bench.stats import median, ratio, slope

SESSIONS = 10
SIZE = 1024
DELIVERY_TIMEOUT = 300.0
EXTRA = ("ms_per_msg", "server_cpu_ms_per_msg", "helper_cpu_ms_per_msg")


def _per_message(run: dict[str, Any]) -> dict[str, Any]:
    messages = run["messages"] or 0
    run["ms_per_msg"] = 1000 / run["rate"] if run["rate"] else None
    run["server_cpu_ms_per_msg"] = run["server_cpu_s"] * 1000 / messages if messages else None
    helper = run.get("helper_cpu_s")
    run["helper_cpu_ms_per_msg"] = helper * 1000 / messages if messages and helper else None
    return run


def run(settings: Settings) -> dict[str, Any]:
    duration = 0.5 if settings.smoke else 2.0
    counts = [0, 1, 2] if settings.smoke else [0, 1, 2, 4, 8]
    work = settings.work / "C"
    milters = servers.NoopMilters(work / "milters", max(counts)).start()
    points: list[dict[str, Any]] = []
    names = ("mailgate", "postfix")
    try:
        for n in counts:
            sockets = milters.sockets(n)
            # mailgate keeps one data dir (and its certificate) across N; each run delivers
            # everything before the next, so nothing is left in its spool.
            peers: list[servers.Peer] = [
                servers.MailgateServe(work, milters=sockets),
                servers.Postfix(work / f"n{n}", milters=sockets),
            ]
            runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
            try:
                for peer in peers:
                    peer.start()
                for repeat in range(settings.repeats):
                    for peer in rotated(peers, repeat):
                        result = clients.measured(
                            peer,
                            lambda peer=peer: clients.pyload(
                                peer.port, sessions=SESSIONS, size=SIZE, duration=duration
                            ),
                            extra_pids=milters.pids[:n] or None,
                            wait_delivery=DELIVERY_TIMEOUT,
                        )
                        runs[peer.name].append(_per_message(result))
                        settings.say(
                            f"C N={n} #{repeat + 1} {peer.name}: {result['rate']:.0f} msg/s, "
                            f"{result['ms_per_msg'] or 0:.3f} ms/msg, {result['errors']} errors"
                        )
            finally:
                for peer in peers:
                    peer.stop()
                servers.remove_tree(work / f"n{n}")
            points.append({"milters": n, "median": case_summary(runs, EXTRA), "runs": runs})
    finally:
        milters.stop()
    fits: dict[str, Any] = {}
    for name in names:
        xs = [float(p["milters"]) for p in points]
        for key in ("ms_per_msg", "server_cpu_ms_per_msg"):
            fit = slope(xs, [p["median"].get(name, {}).get(key) for p in points])
            fits[f"{name}.{key}"] = (
                {"per_hop": fit[0], "intercept": fit[1]} if fit is not None else None
            )

    def per_hop(name: str, key: str) -> float | None:
        fit = fits.get(f"{name}.{key}")
        return fit["per_hop"] if fit else None

    return {
        "title": "C. Milter cost (no-op milters, 1 KB, 10 sessions)",
        "peers": list(names),
        "duration_per_run_s": duration,
        "milter_counts": counts,
        "points": points,
        "fits": fits,
        "ratios": {
            "mailgate/postfix per-hop time": ratio(
                per_hop("mailgate", "ms_per_msg"), per_hop("postfix", "ms_per_msg")
            ),
            "mailgate/postfix per-hop server CPU": ratio(
                per_hop("mailgate", "server_cpu_ms_per_msg"),
                per_hop("postfix", "server_cpu_ms_per_msg"),
            ),
        },
        "rate_at_max": {
            name: median([r["rate"] for r in points[-1]["runs"].get(name, [])]) for name in names
        },
    }
