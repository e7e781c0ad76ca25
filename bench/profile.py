"""Profile mailgate under one scenario's load with py-spy; print where its time goes.

    .venv/bin/python -m bench.profile A        # core, 1 KB, 100 reused sessions
    .venv/bin/python -m bench.profile A100k    # core, 100 KB, 10 reused sessions
    .venv/bin/python -m bench.profile B        # mailgate serve, 10 KB, 20 sessions
    .venv/bin/python -m bench.profile C        # mailgate serve + 4 no-op milters
    .venv/bin/python -m bench.profile D        # mailgate serve, 10 x 20 MB + probe
    options: --seconds 8  --loop asyncio  --milters 4  --out DIR (keeps the raw stacks)

Starts the peer as the benchmark does, attaches ``py-spy record`` (needs ``pip install
py-spy`` into the venv and root, or ptrace rights) for the duration of the load, and
summarizes the collapsed stacks: the functions with the most samples on top of the stack
(self) and anywhere in it (inclusive), in percent of all samples of busy threads (py-spy
leaves idle threads out), and the share of each thread.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import clients, servers

#: (sessions, message size) of each scenario's load; D is 10 x 20 MB, counted.
LOADS = {"A": (100, 1024), "A100k": (10, 100 * 1024), "B": (20, 10 * 1024), "C": (10, 1024)}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", str(servers.REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


#: Leaf frames where a thread waits rather than works (py-spy's idle detection misses them
#: with --nonblocking): the thread pool's queue.get and the event loop's epoll_wait.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py:81)", "EpollSelector.select (")


def summarize(raw: Path, top: int = 25) -> str:
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread ", "process ")):
            label = frames.pop(0)
            while frames and frames[0].startswith(("thread ", "process ")):
                label = frames.pop(0)
            threads[label.rsplit(": ", 1)[-1]] += count
        if not frames:
            continue
        if any(frames[-1].startswith(leaf) or leaf in frames[-1] for leaf in IDLE_LEAVES):
            idle += count
            continue
        total += count
        names = [_short(frame) for frame in frames]
        self_counts[names[-1]] += count
        for name in set(names):
            incl_counts[name] += count
    if not total:
        return "no samples (was the process busy? is py-spy allowed to attach?)\n"
    lines = [f"{total} samples of busy threads ({idle} waiting in queue.get/epoll left out)"]
    if threads:
        shares = [f"{name} {c * 100 / total:.0f}%" for name, c in threads.most_common(6)]
        lines.append("threads: " + ", ".join(shares))
    lines += ["", "self %  function (where)"]
    lines += [f"{c * 100 / total:5.1f}  {name}" for name, c in self_counts.most_common(top)]
    lines += ["", "incl %  function (where)"]
    lines += [f"{c * 100 / total:5.1f}  {name}" for name, c in incl_counts.most_common(top)]
    return "\n".join(lines) + "\n"


def _pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return found


def record(pid: int, seconds: float, raw: Path) -> subprocess.Popen[bytes]:
    argv = [_pyspy(), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", "250", "--nonblocking", "--threads", "--format", "raw", "-o", str(raw)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile")
    ap.add_argument("scenario", choices=("A", "A100k", "B", "C", "D"))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    ap.add_argument("--milters", type=int, default=4, help="for C")
    ap.add_argument("--out", type=Path, default=None, help="keep the raw stacks here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mailgate-profile-", dir="/var/tmp"))
    work.chmod(0o755)
    servers.test_peers().make_traversable(work)
    milters: servers.NoopMilters | None = None
    peer: servers.Peer
    if args.scenario.startswith("A"):
        peer = servers.CoreRunner(work, args.loop)
    elif args.scenario == "C":
        milters = servers.NoopMilters(work / "milters", args.milters).start()
        peer = servers.MailgateServe(work, loop=args.loop, milters=milters.sockets(args.milters))
    else:
        peer = servers.MailgateServe(work, loop=args.loop)
    raw = (args.out or work) / f"profile-{args.scenario}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    try:
        peer.start()
        spy = record(peer.pid, args.seconds + 1, raw)
        time.sleep(0.5)
        if args.scenario == "D":
            load = clients.pyload(peer.port, sessions=10, size=20 * 1024 * 1024, count=10)
        else:
            sessions, size = LOADS[args.scenario]
            load = clients.pyload(peer.port, sessions=sessions, size=size, duration=args.seconds)
        _, err = spy.communicate(timeout=120)
        print(f"load: {load['messages']} messages, {load['rate']:.0f} msg/s")
        if spy.returncode:
            print(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        print(summarize(raw))
        if args.out:
            print(f"raw stacks: {raw}")
    finally:
        peer.stop()
        if milters is not None:
            milters.stop()
        if not args.out:
            servers.remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
