"""Scenario B, durable acceptance: 250 only after fsync, then delivery to Maildir.

Peers: ``mailgate serve`` (fsync'd spool with group commit, then its Maildir delivery)
and Postfix (cleanup fsyncs each queue file, virtual(8) writes the Maildir), both with
their data on the same disk (the suite's work directory). 20 sessions with connection
reuse. A run counts as done when every message is acknowledged (acceptance rate); the
suite then waits until every accepted message is in the Maildir (time to delivery), and
CPU covers both. Each run finishes delivering before the next begins.
"""

from __future__ import annotations

from typing import Any

from bench import clients, servers
from bench.common import Settings, case_summary, paired_ratios, rate_ratios, rotated, size_label

EXTRA = ("delivered_s", "delivery_rate", "accept_wall_s")
DELIVERY_TIMEOUT = 300.0


def _with_delivery_rate(run: dict[str, Any]) -> dict[str, Any]:
    seconds = run.get("delivered_s")
    run["delivery_rate"] = run["messages"] / seconds if seconds else None
    return run


def run(settings: Settings) -> dict[str, Any]:
    duration = 0.5 if settings.smoke else 2.0
    sizes = [10 * 1024] if settings.smoke else [10 * 1024, 100 * 1024]
    sessions = 20
    work = settings.work / "B"
    peers: list[servers.Peer] = [servers.MailgateServe(work), servers.Postfix(work)]
    results: list[dict[str, Any]] = []
    try:
        for peer in peers:
            peer.start()
        for size in sizes:
            case_id = f"{size_label(size)}/{sessions}s/reuse"
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {
                "pyload": {p.name: [] for p in peers},
                "smtp-source": {p.name: [] for p in peers},
            }
            for repeat in range(settings.repeats):
                for peer in rotated(peers, repeat):
                    py = clients.measured(
                        peer,
                        lambda peer=peer, size=size: clients.pyload(
                            peer.port, sessions=sessions, size=size, duration=duration
                        ),
                        wait_delivery=DELIVERY_TIMEOUT,
                    )
                    runs["pyload"][peer.name].append(_with_delivery_rate(py))
                    count = max(int(py["messages"]), sessions * 5)
                    ss = clients.measured(
                        peer,
                        lambda peer=peer, count=count, size=size: clients.smtp_source(
                            peer.port, sessions=sessions, size=size, count=count
                        ),
                        wait_delivery=DELIVERY_TIMEOUT,
                    )
                    runs["smtp-source"][peer.name].append(_with_delivery_rate(ss))
                    settings.say(
                        f"B {case_id} #{repeat + 1} {peer.name}: {py['rate']:.0f} msg/s accepted, "
                        f"{py['delivery_rate'] or 0:.0f} delivered (bench.load); "
                        f"{ss['rate']:.0f} / {ss['delivery_rate'] or 0:.0f} (smtp-source)"
                    )
            for generator, generator_runs in runs.items():
                medians = case_summary(generator_runs, EXTRA)
                ratios = rate_ratios(medians, ["mailgate"], ["postfix"])
                delivered = medians.get("mailgate", {}).get("delivery_rate")
                base = medians.get("postfix", {}).get("delivery_rate")
                ratios["mailgate/postfix delivered"] = (
                    delivered / base if delivered and base else None
                )
                results.append(
                    {
                        "id": f"{case_id}/{generator}",
                        "size": size,
                        "sessions": sessions,
                        "reuse": True,
                        "generator": generator,
                        "median": medians,
                        "ratios": ratios,
                        "paired_ratios": {
                            "mailgate/postfix": paired_ratios(generator_runs, "mailgate", "postfix")
                        },
                        "runs": generator_runs,
                    }
                )
    finally:
        for peer in peers:
            peer.stop()
    return {
        "title": "B. Durable acceptance (fsync'd, then Maildir)",
        "peers": [p.name for p in peers],
        "duration_per_run_s": duration,
        "cases": results,
    }
