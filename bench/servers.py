"""The servers under test, each a real process (tree) on a free loopback port.

Launchers reuse the test suite's peer recipes (tests/peers.py: its ``Daemon`` process
handling and ``postfix_with_milter``), so the benchmark runs Postfix exactly as the
interoperability tests do. Every peer has ``name``, ``port``, ``pid`` (the root of its
process tree, for ``procs.Meter``), ``start()``/``stop()`` and, if it delivers,
``delivered()`` (messages in the benchmark mailbox so far).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MAILGATE = str(Path(sys.executable).parent / "mailgate")
HOST = "127.0.0.1"
_SINK_COUNT = re.compile(r"mesg=(\d+)")
DOMAIN = "test.example"
RECIPIENT = f"bench@{DOMAIN}"


def test_module(name: str) -> ModuleType:
    """A helper module of tests/ (not part of the package), imported from the repository."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


def test_peers() -> ModuleType:
    """tests/peers.py: the real peers' recipes."""
    return test_module("peers")


def clean_env() -> dict[str, str]:
    """The environment without MAILGATE_* settings, with the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _tail_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _count(directory: Path) -> int:
    try:
        return len(os.listdir(directory))
    except FileNotFoundError:
        return 0


def _add_user(data_dir: Path) -> None:
    from mailgate.core.users.sqlite import SQLiteUserStore

    data_dir.mkdir(parents=True, exist_ok=True)
    store = SQLiteUserStore(data_dir / "users.sqlite3")
    try:
        if RECIPIENT not in store.list_users():
            store.add_user(RECIPIENT, "benchmark password")
            # A quota far above any run, so the quota daemon measures but never refuses.
            store.set_limits(RECIPIENT, storage=1 << 50)
    finally:
        store.close()


class Peer:
    name = "peer"
    delivers = False

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = 0
        self.daemon: Any = None
        # Processes outside the peer's own tree that do its work (Postfix's policy server
        # and milters), measured as part of the server.
        self.companions: list[int] = []

    @property
    def pid(self) -> int:
        return int(self.daemon.pid)

    def start(self) -> Peer:
        raise NotImplementedError

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def log(self) -> str:
        return str(self.daemon.log()) if self.daemon is not None else ""

    def delivered(self) -> int:
        return 0

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _launch(
        self, argv: list[str], ready: str | None, *, env: dict[str, str] | None = None
    ) -> None:
        tp = test_peers()
        self.work.mkdir(parents=True, exist_ok=True)
        log_path = self.work / f"{self.name}.log"
        # A restarted peer appends to its log: only what this start writes counts.
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.daemon = tp.Daemon(self.name, argv, log_path, cwd=REPO, env=env or clean_env())
        self.daemon.start()
        if ready is None:
            self.daemon.wait_ready(lambda: tp._smtp_banner(self.port), 30)
        else:
            self.daemon.wait_ready(lambda: ready in _tail_from(log_path, offset), 30)


class SmtpSink(Peer):
    """Postfix's smtp-sink: the C ceiling (no delivery, PIPELINING announced)."""

    name = "smtp-sink"

    def start(self) -> Peer:
        tp = test_peers()
        binary = tp.require("smtp-sink", "postfix")
        self.port = tp.free_port()
        argv = [binary, "-u", "nobody", "-m", "2000", f"{HOST}:{self.port}", "1000"]
        self._launch(argv, None)
        return self


class CountingSink(Peer):
    """smtp-sink as a next hop (scenario F): ``-c`` prints ``msg=N`` after every DATA."""

    name = "smtp-sink"

    def start(self) -> Peer:
        tp = test_peers()
        binary = tp.require("smtp-sink", "postfix")
        self.port = tp.free_port()
        argv = [binary, "-c", "-u", "nobody", "-m", "2000", f"{HOST}:{self.port}", "1000"]
        self._launch(argv, None)
        return self

    def received(self) -> int:
        """Messages the sink has taken so far (its last ``mesg=N``)."""
        try:
            with (self.work / f"{self.name}.log").open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(log.tell() - 256, 0))
                tail = log.read().decode(errors="replace")
        except FileNotFoundError:
            return 0
        match = _SINK_COUNT.findall(tail)
        return int(match[-1]) if match else 0


class StockAiosmtpd(Peer):
    """aiosmtpd 1.4 as shipped, its Sink handler (no PIPELINING, per-line DATA)."""

    name = "aiosmtpd"

    def start(self) -> Peer:
        self.port = test_peers().free_port()
        argv = [PYTHON, "-m", "aiosmtpd", "-n", "-l", f"{HOST}:{self.port}"]
        self._launch([*argv, "-c", "aiosmtpd.handlers.Sink"], None)
        return self


class CoreRunner(Peer):
    """mailgate's SMTP core with a discarding spool (bench/core_runner.py)."""

    def __init__(self, work: Path, loop: str) -> None:
        super().__init__(work)
        self.loop = loop
        self.name = f"mailgate-{loop}"

    def start(self) -> Peer:
        self.port = test_peers().free_port()
        data_dir = self.work / f"{self.name}-data"
        _add_user(data_dir)
        argv = [PYTHON, "-m", "bench.core_runner", "--data-dir", str(data_dir)]
        argv += ["--listen", f"{HOST}:{self.port}", "--loop", self.loop]
        self._launch(argv, "core runner ready")
        return self


class MailgateServe(Peer):
    """`mailgate serve`: durable spool (fsync), local delivery to Maildir."""

    delivers = True

    def __init__(
        self,
        work: Path,
        *,
        loop: str = "uvloop",
        milters: list[str] | None = None,
        config: str = "",
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(work)
        self.loop = loop
        # Extra MAILGATE_* settings (scenario F: the route to the sink).
        self.extra_env = env or {}
        self.milters = milters or []
        # YAML for MAILGATE_CONFIG (a chain of policy daemons with their rule files).
        self.config = config
        # uvloop is what `mailgate serve` runs on unless configured otherwise.
        self.name = name or ("mailgate" if loop == "uvloop" else f"mailgate-{loop}")
        self.data_dir = work / f"{self.name}-data"

    @property
    def maildir(self) -> Path:
        return self.data_dir / "mail" / DOMAIN / "bench"

    def start(self) -> Peer:
        self.port = test_peers().free_port()
        _add_user(self.data_dir)
        env = clean_env()
        env.update(
            {
                "MAILGATE_DATA_DIR": str(self.data_dir),
                "MAILGATE_HOSTNAME": "mx.test.example",
                "MAILGATE_SMTP_LISTEN": f"{HOST}:{self.port}",
                "MAILGATE_SUBMISSION_LISTEN": "",
                "MAILGATE_SMTPS_LISTEN": "",
                "MAILGATE_LOCAL_DOMAINS": DOMAIN,
                "MAILGATE_MAX_CONNECTIONS": "5000",
                "MAILGATE_MAX_CONNECTIONS_PER_IP": "5000",
                "MAILGATE_RATE_LIMIT_CONNECTIONS": "0",
                "MAILGATE_EVENT_LOOP": self.loop,
                "MAILGATE_SHUTDOWN_GRACE": "5",
                "MAILGATE_MILTERS": ",".join(
                    f"noop{i}={spec}" for i, spec in enumerate(self.milters, 1)
                ),
            }
        )
        env.update(self.extra_env)
        if self.config:
            config = self.data_dir / "config.yaml"
            config.write_text(self.config)
            env["MAILGATE_CONFIG"] = str(config)
            del env["MAILGATE_MILTERS"]
        self._launch([MAILGATE, "serve"], "mailgate ready", env=env)
        return self

    def delivered(self) -> int:
        return _count(self.maildir / "new")


class Postfix(Peer):
    """Postfix 3.7 from tests/peers.py: queue fsync'd by cleanup, virtual(8) to Maildir."""

    name = "postfix"
    delivers = True

    def __init__(
        self,
        work: Path,
        *,
        milters: list[str] | None = None,
        main_cf: dict[str, str] | None = None,
        name: str = "postfix",
    ) -> None:
        super().__init__(work)
        self.milters = milters or []
        self.main_cf = main_cf or {}
        self.name = name
        self._stack: contextlib.ExitStack | None = None
        self.mta: Any = None

    @property
    def pid(self) -> int:
        return int(self.mta.daemon.pid)

    def start(self) -> Peer:
        tp = test_peers()
        self.work.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        try:
            self.mta = self._stack.enter_context(
                tp.postfix_with_milter(
                    self.work,
                    self.milters or None,
                    main_cf={
                        "milter_connect_timeout": "30s",
                        "milter_command_timeout": "30s",
                        **self.main_cf,
                    },
                )
            )
        except BaseException:
            self._stack.close()
            raise
        self.port = int(self.mta.port)
        return self

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
            self.mta = None

    def log(self) -> str:
        return str(self.mta.log()) if self.mta is not None else ""

    def delivered(self) -> int:
        return _count(self.mta.maildir / "new") if self.mta is not None else 0


class NoopMilters:
    """N no-op pymilter processes (bench/noop_milter.py), one per hop."""

    def __init__(self, work: Path, count: int) -> None:
        self.work = work
        self.count = count
        self.daemons: list[Any] = []
        self.ports: list[int] = []

    def start(self) -> NoopMilters:
        tp = test_peers()
        self.work.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            port = tp.free_port()
            spec = f"inet:{port}@{HOST}"
            argv = [PYTHON, "-m", "bench.noop_milter", spec, f"noop{index + 1}"]
            daemon = tp.Daemon(
                f"noop{index + 1}",
                argv,
                self.work / f"noop{index + 1}.log",
                cwd=REPO,
                env=clean_env(),
                after_term=lambda port=port: tp._port_open(port),
            )
            daemon.start()
            self.daemons.append(daemon)
            self.ports.append(port)
        for daemon, port in zip(self.daemons, self.ports, strict=True):
            daemon.wait_ready(lambda port=port: tp._port_open(port), 30)
        return self

    def sockets(self, n: int) -> list[str]:
        """The first n milters, in pymilter's spelling (both MTAs accept it)."""
        return [f"inet:{port}@{HOST}" for port in self.ports[:n]]

    @property
    def pids(self) -> list[int]:
        return [int(d.pid) for d in self.daemons]

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        self.daemons.clear()


def wait_delivered(peer: Peer, target: int, timeout: float) -> float | None:
    """Poll until ``peer.delivered() >= target``; the perf_counter time it got there."""
    deadline = time.perf_counter() + timeout
    while True:
        if peer.delivered() >= target:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(0.02)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def postgrey(work: Path, delay: int) -> Iterator[Any]:
    """postgrey (Postfix's greylisting policy server) on a free loopback port."""
    tp = test_peers()
    binary = shutil.which("postgrey") or "/usr/sbin/postgrey"
    if not os.path.exists(binary):
        raise tp.PeerUnavailable("postgrey is not installed (Debian package postgrey)")
    work.mkdir(parents=True, exist_ok=True)
    db = work / "db"
    db.mkdir(exist_ok=True)
    shutil.chown(db, "postgrey", "postgrey")
    tp.make_traversable(db)  # postgrey runs as its own user, e.g. under pytest's tmp dir
    port = tp.free_port()
    argv = [
        binary, f"--inet=127.0.0.1:{port}", f"--dbdir={db}", f"--delay={delay}",
        "--user=postgrey", "--group=postgrey", f"--pidfile={work / 'postgrey.pid'}",
        "--whitelist-clients=/dev/null", "--whitelist-recipients=/dev/null",
    ]  # fmt: skip
    daemon = tp.Daemon("postgrey", argv, work / "postgrey.out", cwd=work)
    daemon.start()
    try:
        daemon.wait_ready(lambda: tp._port_open(port), 30.0)
        daemon.port = port
        yield daemon
    finally:
        daemon.stop()
