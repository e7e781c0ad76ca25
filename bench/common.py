"""What every scenario shares: the run settings, progress output, alternation, medians."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.stats import median, ratio, summarize

T = TypeVar("T")

#: The figures kept as medians for every peer of a case (dotted keys reach into dicts).
METRICS = (
    "rate",
    "cpu_per_1k",
    "latency_ms.p50",
    "latency_ms.p99",
    "peak_rss_mb",
    "server_cpu_s",
    "client_cpu_s",
    "messages",
    "errors",
    "elapsed",
)


@dataclass
class Settings:
    smoke: bool
    repeats: int
    work: Path
    started: float = field(default_factory=time.time)
    verbose: bool = True

    def say(self, text: str) -> None:
        if self.verbose:
            stamp = time.time() - self.started
            print(f"[{stamp:7.1f}s] {text}", file=sys.stderr, flush=True)


def rotated(items: Sequence[T], repeat: int) -> list[T]:
    """The peers in a different order for every repeat, so none is always first."""
    if not items:
        return []
    shift = repeat % len(items)
    return list(items[shift:]) + list(items[:shift])


def case_summary(
    runs: dict[str, list[dict[str, Any]]], extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Medians per peer over the repeats of one case."""
    return {peer: summarize(peer_runs, (*METRICS, *extra)) for peer, peer_runs in runs.items()}


def rate_ratios(
    medians: dict[str, dict[str, Any]], subjects: Sequence[str], baselines: Sequence[str]
) -> dict[str, float | None]:
    """``"mailgate-asyncio/aiosmtpd": 2.1``: messages/s of each subject over each baseline."""
    out: dict[str, float | None] = {}
    for subject in subjects:
        for baseline in baselines:
            if subject in medians and baseline in medians:
                out[f"{subject}/{baseline}"] = ratio(
                    medians[subject].get("rate"), medians[baseline].get("rate")
                )
    return out


def paired_ratios(
    runs: dict[str, list[dict[str, Any]]], subject: str, baseline: str, key: str = "rate"
) -> float | None:
    """The median of per-repeat ratios (each pair measured minutes apart at most)."""
    pairs = zip(runs.get(subject, []), runs.get(baseline, []), strict=False)
    return median(ratio(a.get(key), b.get(key)) for a, b in pairs)


def size_label(size: int) -> str:
    if size >= 1024 * 1024 and size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)}MB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024}KB"
    return f"{size}B"
