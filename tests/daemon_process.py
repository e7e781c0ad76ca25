"""A policy daemon (`mailgate milter NAME`) as a real child process, for the daemon tests."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@cache
def milter_command() -> list[str]:
    """`mailgate milter` through the main command line once it is wired there, else the
    milters package's own entry point (the same register() and handler either way)."""
    from mailgate.core import cli

    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "milter" in action.choices:
            return [sys.executable, "-m", "mailgate.core.cli", "milter"]
    return [sys.executable, "-m", "mailgate.milters.cli", "milter"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*milter_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        check=False,
    )


@dataclass
class Daemon:
    """One daemon process; its stderr (the log) goes to ``log_path``."""

    name: str
    socket: str
    log_path: Path
    rules: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=clean_env)
    process: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        argv = [*milter_command(), self.name, "--socket", self.socket, "--log-level", "DEBUG"]
        if self.rules is not None:
            argv += ["--rules", str(self.rules)]
        return argv + self.extra_args

    @property
    def address(self) -> str | tuple[str, int]:
        kind, _, rest = self.socket.partition(":")
        if kind == "unix":
            return rest
        port, _, host = rest.partition("@")
        return (host, int(port))

    def start(self, timeout: float = 20.0, wait_ready: bool = True) -> Daemon:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_for("ready on", timeout)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        """Wait until ``text`` appears in the log past offset ``after``; return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log[after:]:
                return log
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}):\n{log}")
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def reload(self, timeout: float = 10.0) -> str:
        """SIGHUP, then wait until the reload's outcome is logged; return the new log part."""
        start = len(self.log())
        self.send(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            part = self.log()[start:]
            if "reloaded rules" in part or "previous rules stay in force" in part:
                return part
            time.sleep(0.02)
        raise AssertionError(f"no reload outcome logged:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            threads = self.thread_report()
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(
                f"daemon did not stop within {timeout}s:\n{self.log()}\nits threads:\n{threads}"
            ) from None

    # -- threads and thread-directed signals ------------------------------------------------

    def threads(self) -> dict[int, dict[str, str]]:
        """The daemon's threads: id -> the fields of /proc/PID/task/ID/status (and wchan)."""
        assert self.process is not None
        found: dict[int, dict[str, str]] = {}
        task_dir = Path(f"/proc/{self.process.pid}/task")
        for task in task_dir.iterdir():
            try:
                text = (task / "status").read_text()
                wchan = (task / "wchan").read_text().strip()
            except OSError:
                continue  # gone meanwhile
            fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
            fields["wchan"] = wchan
            found[int(task.name)] = fields
        return found

    def thread_report(self) -> str:
        """One line per thread: state, blocked/pending signal masks, where it sleeps."""
        try:
            threads = self.threads()
        except OSError as exc:
            return f"(no thread list: {exc})"
        return "\n".join(
            f"  {tid}: {f.get('State', '?')} SigBlk={f.get('SigBlk', '?')} "
            f"SigPnd={f.get('SigPnd', '?')} ShdPnd={f.get('ShdPnd', '?')} wchan={f['wchan']}"
            for tid, f in sorted(threads.items())
        )

    def signal_thread(self, tid: int, signum: int) -> None:
        """tgkill: ``signum`` to one thread of the daemon, as if the kernel had picked it."""
        assert self.process is not None
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.tgkill(self.process.pid, tid, signum) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), f"tgkill {tid}")

    def signal_every_thread(self, signum: int) -> None:
        for tid in self.threads():
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                self.signal_thread(tid, signum)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)
