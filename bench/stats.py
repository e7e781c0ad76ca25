"""Small statistics: percentiles, medians of runs, ratios, a least-squares slope."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """The pct-th percentile of already sorted values (nearest rank), or None if empty."""
    if not sorted_values:
        return None
    rank = max(math.ceil(pct / 100 * len(sorted_values)), 1)
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(present)) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def slope(xs: Sequence[float], ys: Sequence[float | None]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of y over x, ignoring missing points."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    b = sxy / sxx
    return b, mean_y - b * mean_x


def summarize(runs: list[dict[str, object]], keys: Sequence[str]) -> dict[str, float | None]:
    """The median over runs of each numeric key (dotted keys reach into nested dicts)."""
    out: dict[str, float | None] = {}
    for key in keys:
        values: list[float | None] = []
        for run in runs:
            value: object = run
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            values.append(float(value) if isinstance(value, int | float) else None)
        out[key] = median(values)
    return out
