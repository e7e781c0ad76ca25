"""Scenario A, the protocol floor: how fast can each server take messages it throws away?

Peers: smtp-sink (the C ceiling), stock aiosmtpd with its Sink handler, and mailgate's
core with an empty chain and a discarding spool, on the default asyncio loop and on
uvloop. All stay up for the whole scenario. Every case (message size x concurrent
sessions x connection reuse) runs both generators against every peer, the peers in a
rotated order for each repeat: ``bench.load`` for a fixed time, then ``smtp-source`` for
as many messages as ``bench.load`` managed against that peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench import clients, servers
from bench.common import Settings, case_summary, paired_ratios, rate_ratios, rotated, size_label

SUBJECTS = ("mailgate-asyncio", "mailgate-uvloop")
BASELINES = ("aiosmtpd", "smtp-sink")


@dataclass(frozen=True)
class Case:
    size: int
    sessions: int
    reuse: bool

    @property
    def id(self) -> str:
        return f"{size_label(self.size)}/{self.sessions}s/{'reuse' if self.reuse else 'no-reuse'}"


def cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case(1024, 10, True), Case(100 * 1024, 10, True)]
    out = [Case(1024, s, reuse) for s in (1, 10, 100) for reuse in (True, False)]
    out += [Case(100 * 1024, s, True) for s in (10, 100)]
    return out


def run(settings: Settings) -> dict[str, Any]:
    duration = 0.3 if settings.smoke else 1.0
    work = settings.work / "A"
    peers: list[servers.Peer] = [
        servers.SmtpSink(work),
        servers.StockAiosmtpd(work),
        servers.CoreRunner(work, "asyncio"),
        servers.CoreRunner(work, "uvloop"),
    ]
    results: list[dict[str, Any]] = []
    try:
        for peer in peers:
            peer.start()
        for case in cases(settings.smoke):
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {
                "pyload": {p.name: [] for p in peers},
                "smtp-source": {p.name: [] for p in peers},
            }
            for repeat in range(settings.repeats):
                for peer in rotated(peers, repeat):
                    py = clients.measured(
                        peer,
                        lambda peer=peer, case=case: clients.pyload(
                            peer.port,
                            sessions=case.sessions,
                            size=case.size,
                            reuse=case.reuse,
                            duration=duration,
                        ),
                    )
                    runs["pyload"][peer.name].append(py)
                    count = max(int(py["rate"] * duration), case.sessions * 5, 50)
                    ss = clients.measured(
                        peer,
                        lambda peer=peer, count=count, case=case: clients.smtp_source(
                            peer.port,
                            sessions=case.sessions,
                            size=case.size,
                            count=count,
                            reuse=case.reuse,
                        ),
                    )
                    runs["smtp-source"][peer.name].append(ss)
                    settings.say(
                        f"A {case.id} #{repeat + 1} {peer.name}: "
                        f"{py['rate']:.0f} msg/s (bench.load), {ss['rate']:.0f} (smtp-source)"
                    )
            for generator, generator_runs in runs.items():
                medians = case_summary(generator_runs)
                results.append(
                    {
                        "id": f"{case.id}/{generator}",
                        "size": case.size,
                        "sessions": case.sessions,
                        "reuse": case.reuse,
                        "generator": generator,
                        "median": medians,
                        "ratios": rate_ratios(medians, SUBJECTS, BASELINES),
                        "paired_ratios": {
                            f"{s}/{b}": paired_ratios(generator_runs, s, b)
                            for s in SUBJECTS
                            for b in BASELINES
                        },
                        "runs": generator_runs,
                    }
                )
    finally:
        for peer in peers:
            peer.stop()
    return {
        "title": "A. Protocol floor (no delivery)",
        "peers": [p.name for p in peers],
        "duration_per_run_s": duration,
        "cases": results,
    }
