"""Supervision of the policy daemons `mailgate serve` runs as child processes.

Like Postfix's master: each configured daemon runs as its own process
(`mailgate milter NAME --socket SPEC`), is restarted with exponential backoff when it
exits, gets SIGHUP forwarded (rule reload) and SIGTERM at shutdown. The SMTP side does
not depend on a daemon being up: the chain applies the milter's default action.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mailgate.core.config import Config, MilterConfig

log = logging.getLogger("mailgate.master")

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
# A child that ran this long before exiting is considered healthy: backoff starts over.
STABLE_AFTER = 60.0
STOP_TIMEOUT = 10.0


@dataclass
class Child:
    milter: MilterConfig
    socket: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    backoff: float = BACKOFF_START
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def daemon_argv(config: Config, milter: MilterConfig) -> list[str]:
    assert milter.daemon is not None
    argv = [
        sys.executable,
        "-m",
        "mailgate.core.cli",
        "milter",
        milter.daemon,
        "--socket",
        config.milter_socket(milter),
        "--log-level",
        config.log_level,
    ]
    if milter.rules is not None:
        argv += ["--rules", str(milter.rules)]
    return argv


class Supervisor:
    """Starts, restarts and stops the daemon children of one `mailgate serve`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.children = [
            Child(milter, config.milter_socket(milter), daemon_argv(config, milter))
            for milter in config.milters
            if milter.daemon is not None
        ]
        self.stopping = False

    async def start(self, ready_timeout: float = 15.0) -> None:
        if not self.children:
            return
        self.config.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        for child in self.children:
            child.task = asyncio.create_task(self._run(child), name=f"milter-{child.milter.name}")
        await asyncio.gather(*(self._wait_ready(child, ready_timeout) for child in self.children))

    async def _run(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            started = loop.time()
            try:
                # Its own session: a Ctrl-C or a signal to serve's process group must not
                # stop a daemon behind the supervisor's back (it would be "restarted").
                child.process = await asyncio.create_subprocess_exec(
                    *child.argv,
                    env=self._child_env(),
                    stdin=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                log.error("milter %s: cannot start: %s", child.milter.name, exc)
                code: int | None = None
            else:
                log.info(
                    "milter %s: started daemon %s (pid %d) on %s",
                    child.milter.name,
                    child.milter.daemon,
                    child.process.pid,
                    child.socket,
                )
                code = await child.process.wait()
            if self.stopping:
                return
            if loop.time() - started >= STABLE_AFTER:
                child.backoff = BACKOFF_START
            child.restarts += 1
            log.warning(
                "milter %s: daemon exited with status %s; restarting in %.0fs",
                child.milter.name,
                code,
                child.backoff,
            )
            await asyncio.sleep(child.backoff)
            child.backoff = min(child.backoff * 2, BACKOFF_MAX)

    def _child_env(self) -> dict[str, str]:
        # Daemons that read the gateway's state (the quota daemon: the user store and the
        # Maildirs) find the data directory serve uses, however serve was told about it
        # (file, variable or flag).
        return {**os.environ, "MAILGATE_DATA_DIR": str(self.config.data_dir.resolve())}

    async def _wait_ready(self, child: Child, timeout: float) -> None:
        """Wait until the daemon accepts connections, so the first message meets it up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await _accepts(child.socket):
                return
            await asyncio.sleep(0.05)
        log.warning(
            "milter %s: not accepting on %s after %.0fs; its default action applies meanwhile",
            child.milter.name,
            child.socket,
            timeout,
        )

    def reload(self) -> None:
        """Forward SIGHUP: each daemon re-reads its rules (and keeps the old on error)."""
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        for child in self.children:
            if child.process is not None:
                try:
                    await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    log.warning("milter %s: did not stop; killing it", child.milter.name)
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
                    await child.process.wait()
            if child.task is not None:
                child.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.task


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when `mailgate serve` dies, even by SIGKILL,
    so an orphaned daemon never keeps the socket the next serve needs."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_PR_SET_PDEATHSIG = 1
# Loaded in the parent: after fork only the call itself runs (no dlopen in the child).
_LIBC = ctypes.CDLL(None, use_errno=True)


async def _accepts(spec: str) -> bool:
    try:
        if spec.startswith("unix:"):
            _, writer = await asyncio.open_unix_connection(spec[5:])
        else:
            host, port = parse_inet(spec)
            _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def parse_inet(spec: str) -> tuple[str, int]:
    """``inet:PORT@HOST`` / ``inet6:PORT@HOST`` (libmilter) or ``inet:HOST:PORT`` (Postfix)."""
    body = spec.split(":", 1)[1]
    if "@" in body:
        port, host = body.split("@", 1)
        return host.strip("[]"), int(port)
    host, port = body.rsplit(":", 1)
    return host.strip("[]"), int(port)


def pid_file(config: Config) -> Path:
    return config.data_dir / "mailgate.pid"


def write_pid_file(config: Config) -> None:
    path = pid_file(config)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def remove_pid_file(config: Config) -> None:
    path = pid_file(config)
    with contextlib.suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
