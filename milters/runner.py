"""The shared runner of every policy daemon: socket, logging, rules, reload and signals.

One daemon per process. The runner loads the daemon's rules, opens the milter socket, says
``ready on SPEC`` and serves until SIGTERM/SIGINT; SIGHUP re-reads the rules, and a bad new
file leaves the old rules in force.

libmilter and Python share the process like this. ``smfi_main`` blocks the thread that
calls it, and blocks SIGHUP, SIGTERM and SIGINT in that thread (and the threads it starts)
for a sigwait() thread of its own that *stops the milter* on any of the three, SIGHUP
included. So libmilter runs in a worker thread and the main thread keeps the signals
unblocked: Linux hands a process-directed signal to the main thread whenever that thread
can take it, so Python's handlers see SIGHUP (reload) and SIGTERM/SIGINT (stop). Should
libmilter's thread ever win a signal anyway, the milter stops and the runner exits as if
told to stop; the supervisor (`mailgate serve`) restarts it.

On SIGTERM/SIGINT the runner first lets messages in progress get their verdict (up to
``--shutdown-grace``), since libmilter drops every open session the moment it stops. Then
it calls ``smfi_stop``, which waits for libmilter's accept loop to re-check (every 5 s),
so it runs on a helper thread while the runner connects to its own socket to wake the loop.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import Milter  # pymilter; it re-exports the libmilter binding (`milter`) it wraps

from mailgate.milters.adapter import (
    ACTIONS,
    DaemonContext,
    PolicyMilter,
)

if TYPE_CHECKING:
    from mailgate.milters.registry import DaemonEntry
    from mailgate.policies.rules import RuleSet

LOG_FORMAT = "%(asctime)s mailgate-milter/{name}[%(process)d]: %(levelname)s %(message)s"
DEFAULT_SOCKET_MODE = 0o660
DEFAULT_SHUTDOWN_GRACE = 5.0
# How long the runner keeps waking libmilter's accept loop before giving up on a clean stop.
STOP_TIMEOUT = 10.0
_MILTER_ENDED = b"\0"


class DaemonError(Exception):
    """A daemon cannot start: a bad socket spec, a socket in use, rules missing or invalid.

    ``problems`` holds one line per problem (for rules: ``file:line: field: message``).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


# -- socket specs -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """Where the daemon listens, in libmilter's terms."""

    family: Literal["inet", "inet6", "unix"]
    host: str = ""
    port: int = 0
    path: Path | None = None

    @property
    def libmilter(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return (
            f"{self.family}:{self.port}@{self.host}" if self.host else f"{self.family}:{self.port}"
        )

    def __str__(self) -> str:
        return self.libmilter

    def connect_address(self) -> tuple[int, Any]:
        """Where a client on this host reaches the socket (the wildcard means loopback)."""
        if self.family == "unix":
            return socket.AF_UNIX, str(self.path)
        if self.family == "inet6":
            host = self.host if self.host not in ("", "::") else "::1"
            return socket.AF_INET6, (host, self.port)
        host = self.host if self.host not in ("", "0.0.0.0") else "127.0.0.1"
        return socket.AF_INET, (host, self.port)


def parse_socket(spec: str) -> SocketSpec:
    """Parse ``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/path`` (or ``local:``).

    Postfix's spelling ``inet:HOST:PORT`` (and ``inet:[v6addr]:PORT``) is accepted too, as
    the configuration allows it. A missing host means every interface, as in libmilter.
    """
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.lower()
    if not sep or not rest:
        raise DaemonError(_socket_usage(spec))
    if kind in ("unix", "local"):
        return SocketSpec("unix", path=Path(rest).expanduser().absolute())
    if kind not in ("inet", "inet6"):
        raise DaemonError(_socket_usage(spec))
    if "@" in rest:
        port_text, _, host = rest.partition("@")
    elif rest.isdigit():
        port_text, host = rest, ""
    else:
        host, _, port_text = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host, kind = host[1:-1], "inet6"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DaemonError(f"{spec!r}: the port must be a number from 1 to 65535")
    if kind == "inet6" and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    family: Literal["inet", "inet6"] = "inet6" if kind == "inet6" else "inet"
    return SocketSpec(family, host=host, port=int(port_text))


def _socket_usage(spec: str) -> str:
    return f"{spec!r}: expected inet:PORT@HOST, inet6:PORT@HOST or unix:/path"


def _prepare_socket(spec: SocketSpec, log: logging.Logger) -> None:
    """Refuse a socket in use; clear a stale unix socket and make its directory."""
    if spec.family == "unix":
        assert spec.path is not None
        path = spec.path
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, mode=0o755)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise DaemonError(f"{path} exists and is not a socket; not replacing it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()
                log.info("removed a stale socket %s", path)
                return
        raise DaemonError(f"{path}: another process is listening there")
    family = spec.connect_address()[0]
    bind_host = spec.host or ("::" if spec.family == "inet6" else "0.0.0.0")
    try:
        infos = socket.getaddrinfo(bind_host, spec.port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DaemonError(f"{spec}: cannot resolve {bind_host!r}: {exc.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # libmilter sets SO_REUSEADDR too: only a live listener makes this fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(infos[0][4])
        except OSError as exc:
            reason = "the address is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise DaemonError(f"cannot listen on {spec}: {reason}") from None


# -- logging ------------------------------------------------------------------------------


def setup_logging(name: str, level: str | int = "INFO") -> logging.Logger:
    """Log to stderr as ``TIME mailgate-milter/NAME[PID]: LEVEL message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.replace("{name}", name)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return logging.getLogger(f"mailgate.milters.{name}")


# -- rules --------------------------------------------------------------------------------


def shipped_rules_dir() -> Path:
    """The default rule files of the installed distribution.

    Looked for in order: ``$MAILGATE_RULES_DIR`` (the operator's own directory); a
    ``mailgate.rules`` package-data directory; ``rules/`` beside the package (the source
    tree, which the strict editable install links to); ``PREFIX/share/mailgate/rules``.
    """
    override = os.environ.get("MAILGATE_RULES_DIR")
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise DaemonError(f"MAILGATE_RULES_DIR={override}: not a directory")
        return path
    candidates: list[Path] = []
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("mailgate.rules")
        if spec is not None and spec.submodule_search_locations:
            candidates.extend(Path(p) for p in spec.submodule_search_locations)
    # Resolved, so a link tree's symlinked module leads back to the source tree.
    candidates.append(Path(__file__).resolve().parent.parent / "rules")
    candidates.append(Path(sys.prefix) / "share" / "mailgate" / "rules")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DaemonError(
        f"cannot find the shipped rules directory (looked in {looked}); "
        "pass --rules FILE or set MAILGATE_RULES_DIR"
    )


def default_rules(entry: DaemonEntry) -> Path:
    path = shipped_rules_dir() / entry.rules_file
    if not path.is_file():
        raise DaemonError(
            f"daemon {entry.name!r} has no default rules ({path} is missing); pass --rules FILE"
        )
    return path


def _load(path: Path, daemon: str) -> RuleSet:
    """Load and validate one rule file; every problem is raised as a DaemonError."""
    from mailgate.policies.rules import RuleError, load_rules

    try:
        ruleset = load_rules(path)
    except RuleError as exc:
        raise DaemonError(f"{path}: invalid rules", list(exc.problems) or [str(exc)]) from None
    except OSError as exc:
        raise DaemonError(f"{path}: cannot read the rules: {exc.strerror or exc}") from None
    if ruleset.daemon != daemon:
        raise DaemonError(
            f"{path}: these rules are for daemon {ruleset.daemon!r}, not {daemon!r}",
            [f"{path}: daemon: {ruleset.daemon!r} is not the daemon running them ({daemon!r})"],
        )
    return ruleset


def _describe(ruleset: RuleSet) -> str:
    enabled = sum(1 for rule in ruleset.rules if rule.enabled)
    count = len(ruleset.rules)
    text = f"{count} rule{'s' if count != 1 else ''}"
    return text if enabled == count else f"{text}, {enabled} enabled"


class RuleBook:
    """The rules in force: swapped whole on reload, so a message sees one consistent set."""

    def __init__(self, path: Path, daemon: str, log: logging.Logger) -> None:
        self.path = path
        self.daemon = daemon
        self.log = log
        self._current = _load(path, daemon)
        self.loaded_at = time.strftime("%Y-%m-%d %H:%M:%S")

    @property
    def current(self) -> RuleSet:
        return self._current

    def describe(self) -> str:
        return f"{self.path} ({_describe(self._current)})"

    def reload(self) -> bool:
        """Re-read the rule file; on any problem keep the rules in force and say so."""
        self.log.info("reloading rules from %s", self.path)
        try:
            new = _load(self.path, self.daemon)
        except DaemonError as exc:
            self.log.error("%s", exc)
            for problem in exc.problems:
                self.log.error("%s", problem)
            self._keeping()
            return False
        except Exception:
            self.log.exception("%s: the rule loader failed", self.path)
            self._keeping()
            return False
        self._current = new
        self.loaded_at = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log.info("reloaded rules: %s", self.describe())
        return True

    def _keeping(self) -> None:
        self.log.error(
            "reload failed; the previous rules stay in force (%s, loaded %s)",
            _describe(self._current),
            self.loaded_at,
        )


# -- the runner ---------------------------------------------------------------------------


@dataclass
class RunnerOptions:
    socket: SocketSpec
    rules: Path
    # None: the daemon class's own limit (PolicyMilter.body_limit).
    body_limit: int | None = None
    # libmilter's I/O timeout with the MTA; None keeps libmilter's default (7210 s).
    timeout: int | None = None
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    socket_mode: int = DEFAULT_SOCKET_MODE


class Runner:
    """Runs one daemon in this process until it is told to stop."""

    def __init__(
        self, entry: DaemonEntry, options: RunnerOptions, log: logging.Logger | None = None
    ) -> None:
        self.entry = entry
        self.options = options
        self.log = log or logging.getLogger(f"mailgate.milters.{entry.name}")
        self._stop_requested = False
        self._thread_error: str | None = None
        self._socket_inode: int | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status (0 after a clean stop)."""
        # Handlers first: a SIGHUP during start-up is then a reload queued for the main
        # loop, not the end of the process.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        saved = self._install_signals(wake_w)
        try:
            return self._run(wake_r, wake_w)
        finally:
            self._restore_signals(saved)
            os.close(wake_r)
            os.close(wake_w)

    def _run(self, wake_r: int, wake_w: int) -> int:
        try:
            cls = self.entry.load()
        except (ImportError, TypeError):
            self.log.exception(
                "daemon %s cannot be loaded (%s)", self.entry.name, self.entry.target
            )
            return 1
        try:
            rules = RuleBook(self.options.rules, self.entry.name, self.log)
            _prepare_socket(self.options.socket, self.log)
        except DaemonError as exc:
            self.log.error("%s", exc)
            for problem in exc.problems:
                self.log.error("%s", problem)
            return 1
        context = DaemonContext(
            name=self.entry.name,
            policy=rules,
            body_limit=self.options.body_limit or cls.body_limit,
            logger=self.log,
        )
        try:
            self._open(cls, context)
        except (DaemonError, Milter.error) as exc:
            self.log.error("cannot listen on %s: %s", self.options.socket, exc)
            return 1
        thread = threading.Thread(target=self._serve, args=(wake_w,), name="libmilter", daemon=True)
        thread.start()
        self.log.info(
            "ready on %s: daemon %s, rules %s",
            self.options.socket,
            self.entry.name,
            rules.describe(),
        )
        self._main_loop(wake_r, rules, thread)
        return self._shutdown(wake_r, rules, thread, context)

    # -- start --------------------------------------------------------------------------

    def _open(self, cls: type[PolicyMilter], context: DaemonContext) -> None:
        """Register the callbacks and bind the socket (libmilter's half of runmilter)."""
        Milter.factory = lambda: cls(context)
        Milter.set_flags(ACTIONS)
        # A Python error that still escaped a callback tempfails the message, never accepts.
        Milter.set_exception_policy(Milter.TEMPFAIL)
        Milter.set_connect_callback(Milter.connect_callback)
        Milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
        Milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
        Milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
        Milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
        Milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
        Milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
        Milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
        Milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
        Milter.set_close_callback(Milter.close_callback)
        Milter.setconn(self.options.socket.libmilter)
        if self.options.timeout:
            Milter.settimeout(self.options.timeout)
        Milter.register(
            self.entry.name,
            data=lambda ctx: ctx.getpriv().data(),
            unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
            negotiate=Milter.negotiate_callback,
        )
        spec = self.options.socket
        # No window in which the socket exists with wider permissions than asked for.
        old_umask = os.umask(0o177) if spec.family == "unix" else None
        try:
            Milter.opensocket(False)
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if spec.path is not None:
            os.chmod(spec.path, self.options.socket_mode)
            self._socket_inode = spec.path.stat().st_ino

    def _serve(self, wake_w: int) -> None:

        try:
            Milter.main()
        except Milter.error as exc:
            self._thread_error = str(exc)
        finally:
            with contextlib.suppress(OSError):
                os.write(wake_w, _MILTER_ENDED)

    # -- signals ------------------------------------------------------------------------

    def _install_signals(self, wake_w: int) -> dict[int, Any]:
        def noted(signum: int, frame: FrameType | None) -> None:
            # The byte on the wake-up pipe does the work; the handler only has to exist.
            pass

        saved: dict[int, Any] = {}
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            saved[signum] = signal.signal(signum, noted)
        saved[-1] = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        return saved

    @staticmethod
    def _restore_signals(saved: dict[int, Any]) -> None:
        signal.set_wakeup_fd(saved.pop(-1))
        for signum, handler in saved.items():
            signal.signal(signum, handler)

    def _signals(self, wake_r: int, timeout: float | None) -> list[int]:
        """Wait for wake-up bytes (signal numbers, or the end of libmilter's thread)."""
        ready, _, _ = select.select([wake_r], [], [], timeout)
        if not ready:
            return []
        try:
            return list(os.read(wake_r, 256))
        except BlockingIOError:
            return []

    def _main_loop(self, wake_r: int, rules: RuleBook, thread: threading.Thread) -> None:
        while True:
            for byte in self._signals(wake_r, None):
                if byte == signal.SIGHUP:
                    rules.reload()
                elif byte in (signal.SIGTERM, signal.SIGINT):
                    self._stop_requested = True
                    self.log.info("%s: stopping", signal.Signals(byte).name)
                    return
                elif byte == _MILTER_ENDED[0] and not thread.is_alive():
                    return

    # -- stop ---------------------------------------------------------------------------

    def _drain(
        self, wake_r: int, rules: RuleBook, thread: threading.Thread, context: DaemonContext
    ) -> None:
        """Let messages in progress get their verdict before libmilter stops.

        libmilter drops every open session the moment it stops (Debian's build runs its
        worker pool), so the wait comes first. The socket keeps accepting meanwhile: a
        message that starts now is served too, and the grace period bounds the wait. A
        second SIGTERM/SIGINT ends it at once.
        """
        deadline = time.monotonic() + self.options.shutdown_grace
        waiting = context.in_flight.count
        if waiting:
            self.log.info(
                "waiting up to %gs for %d message%s in progress",
                self.options.shutdown_grace,
                waiting,
                "s" if waiting != 1 else "",
            )
        while context.in_flight.count > 0 and thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                self.log.warning(
                    "%d message%s still in progress after %gs; the MTA applies its "
                    "default action to them",
                    context.in_flight.count,
                    "s" if context.in_flight.count != 1 else "",
                    self.options.shutdown_grace,
                )
                return
            for byte in self._signals(wake_r, min(left, 0.05)):
                if byte == signal.SIGHUP:
                    rules.reload()
                elif byte in (signal.SIGTERM, signal.SIGINT):
                    self.log.info("%s again: stopping now", signal.Signals(byte).name)
                    return

    def _shutdown(
        self, wake_r: int, rules: RuleBook, thread: threading.Thread, context: DaemonContext
    ) -> int:

        status = 0
        if self._stop_requested:
            self._drain(wake_r, rules, thread, context)
            threading.Thread(target=Milter.stop, name="milter-stop", daemon=True).start()
            deadline = time.monotonic() + STOP_TIMEOUT
            while thread.is_alive() and time.monotonic() < deadline:
                self._wake_listener()
                thread.join(0.05)
            if thread.is_alive():
                self.log.error("libmilter did not stop within %.0fs", STOP_TIMEOUT)
                status = 1
        elif self._thread_error:
            self.log.error("libmilter failed: %s", self._thread_error)
            status = 1
        else:
            self.log.warning("libmilter stopped on its own (it took a termination signal)")
        self._remove_socket()
        self.log.info("stopped: %s", context.stats.summary())
        return status

    def _wake_listener(self) -> None:
        """Connect once to our own socket: libmilter's accept loop then sees the stop."""
        family, address = self.options.socket.connect_address()
        with socket.socket(family, socket.SOCK_STREAM) as poke:
            poke.settimeout(0.2)
            with contextlib.suppress(OSError):
                poke.connect(address)

    def _remove_socket(self) -> None:
        """Remove our unix socket, never one a successor has bound at the same path since."""
        path = self.options.socket.path
        if path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            info = path.lstat()
            if stat.S_ISSOCK(info.st_mode) and info.st_ino == self._socket_inode:
                path.unlink()
