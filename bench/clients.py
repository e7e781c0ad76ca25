"""Running the load generators as child processes, and measuring a peer around them.

Both generators run as their own processes so that the orchestrator's own work never
slows them down: ``bench.load`` (ours: PIPELINING, per-message latency) and Postfix's
``smtp-source`` (C, no pipelining, one message per connection unless ``-d``). Each
returns a dict with at least ``messages``, ``errors``, ``elapsed``, ``rate`` and
``client_cpu_s``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs
from bench.servers import HOST, PYTHON, RECIPIENT, REPO, Peer, clean_env, wait_delivered

SENDER = "load@client.example"


class LoadFailed(RuntimeError):
    pass


def _run(argv: list[str], timeout: float) -> tuple[int, str, str, float]:
    """Run a client; (exit code, stdout, stderr, its CPU seconds)."""
    fd, name = tempfile.mkstemp(prefix="bench-client-", suffix=".out")
    os.close(fd)
    out_path = Path(name)
    err_path = out_path.with_suffix(".err")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO, env=clean_env()
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    out_path.unlink(missing_ok=True)
    err_path.unlink(missing_ok=True)
    return proc.returncode, stdout, stderr, usage.ru_utime + usage.ru_stime


def pyload(
    port: int,
    *,
    sessions: int,
    size: int,
    reuse: bool = True,
    duration: float | None = None,
    count: int | None = None,
    max_time: float = 300.0,
    recipient: str | None = None,
    sender: str | None = None,
    message: Path | None = None,
) -> dict[str, Any]:
    argv = [PYTHON, "-m", "bench.load", "--port", str(port), "--sessions", str(sessions)]
    if recipient is not None:
        argv += ["--recipient", recipient]
    if sender is not None:
        argv += ["--sender", sender]
    if message is not None:  # a fixed message file (scenario G: pre-signed); size is ignored
        argv += ["--message", str(message)]
    argv += ["--size", str(size), "--max-time", str(max_time)]
    if duration is not None:
        argv += ["--duration", str(duration)]
    if count is not None:
        argv += ["--count", str(count)]
    if not reuse:
        argv.append("--no-reuse")
    code, out, err, cpu = _run(argv, max_time + 60)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise LoadFailed(f"bench.load exited {code}: {err[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["client_cpu_s"] = cpu
    return result


def smtp_source(
    port: int, *, sessions: int, size: int, count: int, reuse: bool = True, timeout: float = 300
) -> dict[str, Any]:
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    argv = [binary, "-s", str(sessions), "-m", str(count), "-l", str(size)]
    argv += ["-f", SENDER, "-t", RECIPIENT, "-M", "client.example"]
    if reuse:
        argv.append("-d")
    argv.append(f"{HOST}:{port}")
    start = time.perf_counter()
    code, out, err, cpu = _run(argv, timeout)
    elapsed = time.perf_counter() - start
    if code != 0:
        raise LoadFailed(f"smtp-source exited {code}: {(out + err)[-2000:]}")
    return {
        "generator": "smtp-source",
        "messages": count,
        "errors": 0,
        "elapsed": elapsed,
        "rate": count / elapsed if elapsed > 0 else 0.0,
        "message_size": size,
        "sessions": sessions,
        "reuse": reuse,
        "latency_ms": {"p50": None, "p99": None},
        "client_cpu_s": cpu,
    }


def measured(
    peer: Peer,
    load: Callable[[], dict[str, Any]],
    *,
    extra_pids: list[int] | None = None,
    wait_delivery: float | None = None,
) -> dict[str, Any]:
    """Run ``load`` against ``peer``; the load's result plus the peer's CPU and peak RSS.

    With ``wait_delivery`` (seconds), the run also waits until every accepted message is
    in the peer's Maildir, and CPU covers that too (acceptance + delivery).
    ``extra_pids`` (milters) are measured separately as ``helper_cpu_s``.
    """
    before = peer.delivered() if wait_delivery is not None else 0
    meter = procs.Meter([peer.pid, *peer.companions]).start()
    helpers = procs.Meter(extra_pids).start() if extra_pids else None
    start = time.perf_counter()
    result = load()
    accepted_at = time.perf_counter()
    if wait_delivery is not None:
        done_at = wait_delivered(peer, before + int(result["messages"]), wait_delivery)
        result["delivered"] = peer.delivered() - before
        if done_at is None:
            result["delivered_s"] = None
            result["delivery_incomplete"] = True
        else:
            # From the first message sent to the last one in the Maildir.
            result["delivered_s"] = done_at - start
        result["accept_wall_s"] = accepted_at - start
    usage = meter.stop()
    result["server_cpu_s"] = usage.cpu_seconds
    result["peak_rss_mb"] = usage.peak_rss_mb
    result["peak_rss_reset"] = usage.peak_reset
    result["processes"] = usage.processes
    if helpers is not None:
        result["helper_cpu_s"] = helpers.stop().cpu_seconds
    messages = int(result["messages"])
    result["cpu_per_1k"] = usage.cpu_seconds / messages * 1000 if messages else None
    result["peer"] = peer.name
    return result
