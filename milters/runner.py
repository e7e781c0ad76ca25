"""The shared runner of every policy daemon: socket, logging, rules, reload and signals.

One daemon per process. The runner loads the daemon's rules, opens the milter socket, says
``ready on SPEC`` and serves until SIGTERM/SIGINT; SIGHUP re-reads the rules, and a bad new
file leaves the old rules in force.

libmilter and Python share the process like this. ``smfi_main`` blocks the thread that
calls it, and blocks SIGHUP, SIGTERM and SIGINT in that thread (and the threads it starts)
for a sigwait() thread of its own that *stops the milter* on any of the three, SIGHUP
included. So libmilter runs in a worker thread and the main thread keeps the signals
unblocked for Python's handlers: SIGHUP reloads, SIGTERM/SIGINT stop.

Keeping them unblocked is not enough. While it waits, the sigwait() thread takes the
three signals too, and Linux hands a process-directed signal to that thread whenever the
main thread cannot take it at that instant: a signal already pending for it (a SIGHUP
followed closely by a SIGTERM, say) or all signals blocked for a moment (as while it
starts a thread). The milter then stops at once: a SIGHUP ends the daemon, a SIGTERM drops
the messages in progress. So once libmilter has started, the runner parks that thread:
a private real-time signal sent to it alone runs ``pause()`` as the handler, where it
sleeps with the three signals blocked (its own mask) for the rest of the process. From
then on every libmilter thread blocks them and only the runner's threads can take them:
none is ever lost. Where parking is impossible (no ``/proc``, an unexpected thread
layout) the runner says so and runs as before; should the milter then stop without
being asked, the runner says that too and exits with status 75, for the supervisor
(`mailgate serve`) to start the daemon again. ``MAILGATE_MILTER_SIGNAL_THREAD=keep``
leaves libmilter's thread alone on purpose.

On SIGTERM/SIGINT the runner first lets messages in progress get their verdict (up to
``--shutdown-grace``), since libmilter drops every open session the moment it stops. Then
it calls ``smfi_stop``, which waits for libmilter's accept loop to re-check (every 5 s),
so it runs on a helper thread while the runner connects to its own socket to wake the loop.
A second SIGTERM/SIGINT ends either wait at once. If libmilter has still not stopped after
``STOP_TIMEOUT`` the process ends with ``os._exit`` rather than hang.
"""

from __future__ import annotations

import contextlib
import ctypes
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
# How often the main loop checks on libmilter's thread, wake-up byte or not.
WATCH_INTERVAL = 1.0
# How long start-up waits for libmilter's signal thread to appear and to be parked.
SIGNAL_THREAD_TIMEOUT = 5.0
# The exit status when libmilter stopped without being asked (EX_TEMPFAIL): restart me.
EXIT_MILTER_STOPPED = 75
# "keep": leave libmilter's signal thread alone (see the module docstring).
SIGNAL_THREAD_ENV = "MAILGATE_MILTER_SIGNAL_THREAD"
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
        # The test cases' message files belong to `mailgate rules test`, not to the policy.
        ruleset = load_rules(path, check_test_files=False)
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


# -- libmilter's signal thread ------------------------------------------------------------

# The signals libmilter's own sigwait() thread waits for: any of them stops the milter.
_LIBMILTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_LIBMILTER_MASK = sum(1 << (signum - 1) for signum in _LIBMILTER_SIGNALS)
# Sent to that thread alone to park it; nothing else in the process uses it.
PARK_SIGNAL = signal.SIGRTMAX


class SignalThreadError(Exception):
    """libmilter's signal thread cannot be found or parked."""


def _blocked(tid: int) -> int | None:
    """The signal mask of one thread of this process; None once the thread is gone."""
    try:
        with open(f"/proc/self/task/{tid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigBlk:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return None


def _sigwaiting_threads() -> list[int]:
    """The threads, other than Python's, that have SIGHUP, SIGTERM and SIGINT unblocked.

    Every thread libmilter starts inherits the three blocked, except its signal thread
    while it sits in sigwait(), which unblocks what it waits for during the wait.
    """
    ours = {thread.native_id for thread in threading.enumerate()}
    found = []
    try:
        names = os.listdir("/proc/self/task")
    except OSError as exc:
        raise SignalThreadError(f"cannot list this process's threads: {exc}") from None
    for name in names:
        tid = int(name)
        if tid in ours:
            continue
        blocked = _blocked(tid)
        if blocked is not None and blocked & _LIBMILTER_MASK == 0:
            found.append(tid)
    return found


def _find_signal_thread(milter: threading.Thread, timeout: float) -> int:
    """Wait for libmilter's sigwait() thread (smfi_main starts it first); return its id."""
    deadline = time.monotonic() + timeout
    while True:
        found = _sigwaiting_threads()
        if len(found) == 1:
            return found[0]
        if not milter.is_alive():
            raise SignalThreadError("libmilter ended before its signal thread was found")
        if time.monotonic() > deadline:
            if found:
                raise SignalThreadError(
                    f"{len(found)} threads wait for the signals, not one "
                    f"({', '.join(map(str, sorted(found)))})"
                )
            raise SignalThreadError(
                f"no thread of libmilter waits for the signals after {timeout:g}s"
            )
        time.sleep(0.005)


def _park(tid: int, timeout: float) -> None:
    """Park libmilter's signal thread for good, in a ``pause()`` run as a signal handler.

    The handler runs with the thread's own mask, which blocks SIGHUP, SIGTERM and SIGINT
    (libmilter blocked them before starting it), so no signal ever wakes it again and it
    never returns to sigwait(). The handler is installed only for the moment the private
    signal is in flight, with that signal blocked in the main thread meanwhile.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sig_handler = libc.signal
        tgkill = libc.tgkill
        pause = ctypes.cast(libc.pause, ctypes.c_void_p).value
    except (OSError, AttributeError) as exc:
        raise SignalThreadError(f"the C library lacks what parking needs: {exc}") from None
    sig_handler.restype = ctypes.c_void_p
    sig_handler.argtypes = [ctypes.c_int, ctypes.c_void_p]
    tgkill.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    sig_err = ctypes.c_void_p(-1).value
    sig_ign = 1
    park_bit = 1 << (PARK_SIGNAL - 1)
    main_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {PARK_SIGNAL})
    try:
        previous = sig_handler(PARK_SIGNAL, pause)
        if previous == sig_err:
            raise SignalThreadError(f"cannot set a handler: {os.strerror(ctypes.get_errno())}")
        try:
            if tgkill(os.getpid(), tid, PARK_SIGNAL) != 0:
                raise SignalThreadError(f"cannot signal it: {os.strerror(ctypes.get_errno())}")
            deadline = time.monotonic() + timeout
            while True:
                blocked = _blocked(tid)
                if blocked is None:
                    raise SignalThreadError("it ended (it took a signal first)")
                # In the handler: the private signal blocked on top of the thread's mask.
                if blocked & park_bit and blocked & _LIBMILTER_MASK == _LIBMILTER_MASK:
                    return
                if time.monotonic() > deadline:
                    raise SignalThreadError(f"it did not take the parking signal in {timeout:g}s")
                time.sleep(0.002)
        finally:
            # Ignoring first discards the parking signal should it still be pending, so
            # the default action (the end of the process) can never meet it.
            sig_handler(PARK_SIGNAL, sig_ign)
            sig_handler(PARK_SIGNAL, previous)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, main_mask)


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
        self._milter_returned = False
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
        # Before "ready": from then on a signal reaches the runner, whoever sent it.
        parking = self._park_signal_thread(thread)
        self.log.info(
            "ready on %s: daemon %s, rules %s",
            self.options.socket,
            self.entry.name,
            rules.describe(),
        )
        self._report_parking(parking, thread)
        self._main_loop(wake_r, rules, thread)
        status = self._shutdown(wake_r, rules, thread, context)
        if thread.is_alive() and not self._milter_returned:
            # libmilter would not stop: end here rather than risk the interpreter's
            # shutdown waiting on (or running callbacks for) a libmilter still at work.
            logging.shutdown()
            os._exit(status)
        return status

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
            # The flag, not the thread's end, tells the main loop libmilter returned: the
            # thread may still be winding down when the main loop reads the byte.
            self._milter_returned = True
            with contextlib.suppress(OSError):
                os.write(wake_w, _MILTER_ENDED)

    def _park_signal_thread(self, thread: threading.Thread) -> int | str:
        """Park libmilter's signal thread; its thread id, or why it stays as it is."""
        if os.environ.get(SIGNAL_THREAD_ENV, "").strip().lower() == "keep":
            return f"{SIGNAL_THREAD_ENV}=keep"
        try:
            tid = _find_signal_thread(thread, SIGNAL_THREAD_TIMEOUT)
            _park(tid, SIGNAL_THREAD_TIMEOUT)
        except SignalThreadError as exc:
            return str(exc)
        return tid

    def _report_parking(self, outcome: int | str, thread: threading.Thread) -> None:
        if isinstance(outcome, int):
            self.log.debug(
                "libmilter's signal thread %d is parked; SIGHUP, SIGTERM and SIGINT reach "
                "only the runner",
                outcome,
            )
        elif thread.is_alive() and not self._milter_returned:
            self.log.warning(
                "libmilter's signal thread is not parked (%s): a SIGHUP, SIGTERM or SIGINT "
                "it takes stops the milter, and the daemon then exits with status %d",
                outcome,
                EXIT_MILTER_STOPPED,
            )

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
        # The timeout is a watchdog: the end of libmilter is noticed even without its byte.
        while thread.is_alive() and not self._milter_returned:
            for byte in self._signals(wake_r, WATCH_INTERVAL):
                if byte == signal.SIGHUP:
                    rules.reload()
                elif byte in (signal.SIGTERM, signal.SIGINT):
                    self._stop_requested = True
                    self.log.info("%s: stopping", signal.Signals(byte).name)
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
        while context.in_flight.count > 0 and thread.is_alive() and not self._milter_returned:
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
        if not self._stop_requested:
            # libmilter returned; a stop signal that came with its end still counts.
            for byte in self._signals(wake_r, 0):
                if byte in (signal.SIGTERM, signal.SIGINT):
                    self._stop_requested = True
                    self.log.info("%s: stopping", signal.Signals(byte).name)
                    break
        if self._stop_requested:
            self._drain(wake_r, rules, thread, context)
            if not self._stop_milter(wake_r, thread):
                self.log.error(
                    "libmilter did not stop within %.0fs; ending the process", STOP_TIMEOUT
                )
                status = 1
        else:
            # Returned (or returning) by itself: give the thread a moment to wind down.
            thread.join(STOP_TIMEOUT)
            if self._thread_error:
                self.log.error("libmilter failed: %s", self._thread_error)
                status = 1
            else:
                self.log.error(
                    "libmilter stopped without being asked to (most likely its own signal "
                    "thread took a SIGHUP, SIGTERM or SIGINT meant for the runner); exiting "
                    "with status %d so that the daemon is started again",
                    EXIT_MILTER_STOPPED,
                )
                status = EXIT_MILTER_STOPPED
        self._remove_socket()
        self.log.info("stopped: %s", context.stats.summary())
        return status

    def _stop_milter(self, wake_r: int, thread: threading.Thread) -> bool:
        """smfi_stop, then wake libmilter's accept loop until it returns.

        True once libmilter has returned, or when a second SIGTERM/SIGINT says not to wait;
        False when it has not returned within STOP_TIMEOUT.
        """
        if not thread.is_alive() or self._milter_returned:
            return True
        threading.Thread(target=Milter.stop, name="milter-stop", daemon=True).start()
        deadline = time.monotonic() + STOP_TIMEOUT
        while thread.is_alive() and not self._milter_returned:
            if time.monotonic() >= deadline:
                return False
            self._wake_listener()
            for byte in self._signals(wake_r, 0.05):
                if byte in (signal.SIGTERM, signal.SIGINT):
                    self.log.info("%s again: not waiting for libmilter", signal.Signals(byte).name)
                    return True
        thread.join(1.0)
        return True

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
