"""PNG charts of one run (matplotlib, Agg backend): one file per scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import GENERATOR_NAMES, GENERATORS


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], *, log: bool) -> None:
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def chart_a(a: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for row, generator in enumerate(GENERATORS):
        cases = [c for c in a["cases"] if c["generator"] == generator]
        labels = [c["id"].rsplit("/", 1)[0] for c in cases]
        for col, (key, title) in enumerate(
            (("rate", "messages/s"), ("cpu_per_1k", "server CPU s per 1,000 messages"))
        ):
            series = {
                peer: [c["median"].get(peer, {}).get(key) or 0 for c in cases]
                for peer in a["peers"]
            }
            ax = axes[row][col]
            _bars(ax, labels, series, log=True)
            ax.set_title(f"{title} ({GENERATOR_NAMES[generator]})", fontsize=10)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(a["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_b(b: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{c['id'].split('/')[0]} {GENERATOR_NAMES[c['generator']]}" for c in b["cases"]]
    for ax, (key, title) in zip(
        axes, (("rate", "accepted msg/s"), ("delivery_rate", "delivered msg/s")), strict=True
    ):
        series = {
            peer: [c["median"].get(peer, {}).get(key) or 0 for c in b["cases"]]
            for peer in b["peers"]
        }
        _bars(ax, labels, series, log=False)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(b["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_c(c: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [p["milters"] for p in c["points"]]
    for ax, (key, title) in zip(
        axes,
        (
            ("ms_per_msg", "ms per message (10 sessions)"),
            ("server_cpu_ms_per_msg", "MTA CPU ms/msg"),
        ),
        strict=True,
    ):
        for peer in c["peers"]:
            ys = [p["median"].get(peer, {}).get(key) for p in c["points"]]
            (line,) = ax.plot(
                xs, [y if y is not None else float("nan") for y in ys], "o-", label=peer
            )
            fit = c["fits"].get(f"{peer}.{key}")
            if fit:
                ax.plot(
                    xs,
                    [fit["intercept"] + fit["per_hop"] * x for x in xs],
                    "--",
                    color=line.get_color(),
                    alpha=0.5,
                    label=f"{peer}: {fit['per_hop']:.3f} ms/hop",
                )
        ax.set_xlabel("no-op milters in the chain")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(c["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_d(d: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = ("probe.latency_ms.p50", "probe.latency_ms.p99", "probe.latency_ms.max")
    series = {
        label: [d["median"].get(peer, {}).get(key) or 0 for peer in d["peers"]]
        for label, key in zip(("p50", "p99", "max"), keys, strict=True)
    }
    _bars(ax, d["peers"], series, log=True)
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="target p99 50 ms")
    ax.set_ylabel("probe latency, ms")
    ax.legend(fontsize=8)
    ax.set_title(d["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_e(e: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(e["per_daemon"])
    costs = e["cost_per_message"]
    series = {
        "time ms/msg": [max(costs[n].get("ms_per_msg") or 0, 0) for n in names],
        "serve+daemon CPU ms/msg": [
            max(costs[n].get("server_cpu_ms_per_msg") or 0, 0) for n in names
        ],
        "backend CPU ms/msg": [costs[n].get("backend_cpu_ms_per_msg") or 0 for n in names],
    }
    _bars(left, names, series, log=False)
    left.set_ylabel("cost per message, ms")
    left.legend(fontsize=8)
    left.set_title("each daemon alone, minus no daemon", fontsize=10)
    peers = e["peers"]
    chain = e["chain"]["median"]
    _bars(right, peers, {"msg/s": [chain.get(p, {}).get("rate") or 0 for p in peers]}, log=False)
    right.set_ylabel("messages/s")
    right.set_title("six daemons vs postgrey+clamav-milter+spamass-milter", fontsize=10)
    fig.suptitle(e["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_f(f: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    peers = f["peers"]
    medians = f["median"]
    series = {
        "accepted msg/s": [medians.get(p, {}).get("rate") or 0 for p in peers],
        "relayed msg/s": [medians.get(p, {}).get("relay_rate") or 0 for p in peers],
    }
    _bars(left, peers, series, log=False)
    left.set_ylabel("messages/s")
    left.legend(fontsize=8)
    left.set_title("throughput", fontsize=10)
    cpu = [medians.get(p, {}).get("server_cpu_ms_per_msg") or 0 for p in peers]
    _bars(right, peers, {"server CPU ms/msg": cpu}, log=False)
    right.set_ylabel("CPU ms per message (accept + relay)")
    right.set_title("CPU per message", fontsize=10)
    fig.suptitle(f["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_g(g: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = list(g["crypto"])
    series = {
        "sign µs": [g["crypto"][k].get("sign_us") or 0 for k in labels],
        "verify µs": [g["crypto"][k].get("verify_us") or 0 for k in labels],
    }
    _bars(left, labels, series, log=False)
    left.set_ylabel("µs per operation (10 KB message)")
    left.legend(fontsize=8)
    left.set_title("DKIM in process (the dkim daemon's code)", fontsize=10)
    peers = g["peers"]
    medians = g["chain"]["median"]
    _bars(right, peers, {"msg/s": [medians.get(p, {}).get("rate") or 0 for p in peers]}, log=False)
    right.set_ylabel("messages/s")
    right.set_title("spf+dkim+dmarc+arc vs opendkim+opendmarc", fontsize=10)
    fig.suptitle(g["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


CHARTS = {
    "A": chart_a,
    "B": chart_b,
    "C": chart_c,
    "D": chart_d,
    "E": chart_e,
    "F": chart_f,
    "G": chart_g,
}


def write_charts(scenarios: dict[str, Any], directory: Path, prefix: str) -> list[Path]:
    paths = []
    for key, draw in CHARTS.items():
        if key in scenarios:
            path = directory / f"{prefix}-{key}.png"
            draw(scenarios[key], path)
            paths.append(path)
    return paths
