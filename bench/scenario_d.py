"""Scenario D, fairness: does one small message get through while big ones stream in?

Ten sessions send 20 MB messages at once (``bench.load``; two each in the full run) while
a probe process (``bench.load --probe 0.1``) sends a 1 KB message every 100 ms on its own
connection.
The figure is the probe's latency (MAIL to the 250 after the dot), p50 and p99, over the
time the big messages take. Peers: ``mailgate serve`` (durable, delivering to Maildir;
the run waits for delivery before the next begins) and stock aiosmtpd (Sink).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import clients, procs, servers
from bench.common import Settings, case_summary, rotated, size_label
from bench.servers import PYTHON, REPO, clean_env

EXTRA = (
    "probe.latency_ms.p50",
    "probe.latency_ms.p99",
    "probe.latency_ms.max",
    "probe.messages",
    "probe.errors",
    "bulk_mb_per_s",
)


def _start_probe(port: int, max_time: float) -> tuple[subprocess.Popen[bytes], Path]:
    fd, name = tempfile.mkstemp(prefix="bench-probe-", suffix=".json")
    os.close(fd)
    out = Path(name)
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [
                *(PYTHON, "-m", "bench.load", "--port", str(port), "--probe", "0.1"),
                *("--size", "1024", "--max-time", str(max_time), "--timeout", str(max_time)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=clean_env(),
        )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "probe ready", once its event loop runs
    if b"probe ready" not in line:
        raise clients.LoadFailed(f"probe did not start: {line!r}")
    return proc, out


def _stop_probe(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = out.read_text()
    out.unlink(missing_ok=True)
    if proc.stderr is not None:
        proc.stderr.close()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise clients.LoadFailed(f"probe printed nothing (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run(settings: Settings) -> dict[str, Any]:
    sessions, size = (2, 2 * 1024 * 1024) if settings.smoke else (10, 20 * 1024 * 1024)
    # Two waves in the full run: more probes, so that p99 is not just the maximum.
    per_session = 1 if settings.smoke else 2
    work = settings.work / "D"
    peers: list[servers.Peer] = [servers.MailgateServe(work), servers.StockAiosmtpd(work)]
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
    try:
        for peer in peers:
            peer.start()
        for repeat in range(settings.repeats):
            for peer in rotated(peers, repeat):
                before = peer.delivered()
                meter = procs.Meter([peer.pid]).start()
                probe, probe_out = _start_probe(peer.port, 600)
                time.sleep(0.3)  # a few probes before the load, as a baseline
                try:
                    bulk = clients.pyload(
                        peer.port,
                        sessions=sessions,
                        size=size,
                        count=sessions * per_session,
                        max_time=600,
                    )
                finally:
                    probe_result = _stop_probe(probe, probe_out)
                if peer.delivers:
                    target = before + bulk["messages"] + probe_result["messages"]
                    servers.wait_delivered(peer, target, 300)
                usage = meter.stop()
                bulk["probe"] = probe_result
                bulk["server_cpu_s"] = usage.cpu_seconds
                bulk["peak_rss_mb"] = usage.peak_rss_mb
                bulk["cpu_per_1k"] = (
                    usage.cpu_seconds / bulk["messages"] * 1000 if bulk["messages"] else None
                )
                bulk["bulk_mb_per_s"] = (
                    bulk["messages"] * size / 2**20 / bulk["elapsed"] if bulk["elapsed"] else None
                )
                bulk["peer"] = peer.name
                runs[peer.name].append(bulk)
                lat = probe_result["latency_ms"]
                settings.say(
                    f"D #{repeat + 1} {peer.name}: probe p50 {lat['p50'] or 0:.1f} ms, "
                    f"p99 {lat['p99'] or 0:.1f} ms ({probe_result['messages']} probes); "
                    f"bulk {bulk['bulk_mb_per_s'] or 0:.1f} MB/s"
                )
    finally:
        for peer in peers:
            peer.stop()
    return {
        "title": f"D. Fairness ({sessions} x {size_label(size)} + a 1 KB probe every 100 ms)",
        "peers": [p.name for p in peers],
        "sessions": sessions,
        "size": size,
        "median": case_summary(runs, EXTRA),
        "runs": runs,
    }
