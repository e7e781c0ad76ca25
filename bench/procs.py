"""What a server process tree costs: CPU seconds and peak RSS, read from /proc.

A peer is the process a launcher started in its own session (``start_new_session``) and
everything in that session: Postfix's master with its smtpd, cleanup, qmgr and virtual
children, or a single Python process. Its CPU is the sum over the live members of
utime + stime + cutime + cstime (a child that exits and is reaped moves its time into its
parent's cutime, so nothing is lost or counted twice); a run's cost is the difference of
two readings. Peak RSS is VmHWM: reset for every member before a run (writing 5 to
/proc/PID/clear_refs), sampled during it so that members that exit are not forgotten, and
summed over the tree (the sum of per-process peaks).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    session: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    own_ticks: int  # utime + stime


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime ...; comm may hold spaces and parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        cpu_ticks=utime + stime + cutime + cstime,
        own_ticks=utime + stime,
    )


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def tree(root: int) -> list[ProcStat]:
    """The root and every process in its session or process group, or descended from it."""
    stats = [s for s in (read_stat(pid) for pid in _all_pids()) if s is not None]
    members = {s.pid for s in stats if s.pid == root or s.session == root or s.pgrp == root}
    # Descendants that started a session of their own (rare) are found through ppid.
    children: dict[int, list[int]] = {}
    for s in stats:
        children.setdefault(s.ppid, []).append(s.pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    return [s for s in stats if s.pid in members]


def tree_cpu_seconds(root: int) -> float:
    return sum(s.cpu_ticks for s in tree(root)) / CLK_TCK


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def reset_peaks(pids: list[int]) -> bool:
    """Reset VmHWM of every pid to its current RSS; False if the kernel refused any."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


@dataclass
class Usage:
    cpu_seconds: float
    peak_rss_mb: float
    peak_reset: bool
    processes: int


@dataclass
class Meter:
    """Measures one peer's process tree over one run: ``start()``, the load, ``stop()``."""

    roots: list[int]
    interval: float = 0.1
    _cpu0: float = 0.0
    _peaks: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _reset_ok: bool = True

    def _members(self) -> list[int]:
        pids: set[int] = set()
        for root in self.roots:
            pids.update(s.pid for s in tree(root))
        return sorted(pids)

    def _cpu(self) -> float:
        return sum(tree_cpu_seconds(root) for root in self.roots)

    def _sample(self) -> None:
        for pid in self._members():
            hwm = _hwm_kib(pid)
            if hwm > self._peaks.get(pid, 0):
                self._peaks[pid] = hwm

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self._sample()

    def start(self) -> Meter:
        self._reset_ok = reset_peaks(self._members())
        self._peaks.clear()
        self._sample()
        self._cpu0 = self._cpu()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-meter")
        self._thread.start()
        return self

    def stop(self) -> Usage:
        cpu = self._cpu() - self._cpu0
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self._sample()
        return Usage(
            cpu_seconds=max(cpu, 0.0),
            peak_rss_mb=sum(self._peaks.values()) / 1024,
            peak_reset=self._reset_ok,
            processes=len(self._peaks),
        )


def wait_rusage(pid: int) -> tuple[int, float, float]:
    """Wait for a child; (exit status, its CPU seconds, its peak RSS in MB)."""
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def now() -> float:
    return time.perf_counter()
