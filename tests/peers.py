"""Real mail software as test peers: Postfix, Sendmail, OpenDKIM, clamav-milter, spamass-milter.

Every fixture here is a context manager that starts the real program (from Debian packages)
in the foreground, from a private directory under the caller's tmp dir, on free loopback
ports; waits until it answers; yields an object with its ports, paths and log; and on exit
stops it with SIGTERM, waits for it, and kills whatever is left of its process group. The
recipes follow shared/PEERS.md. Everything must run as root (Postfix's master, the service
users of opendkim and spamd). Nothing installs packages: a missing program raises
`PeerUnavailable` naming the Debian package, which `.ci/system-packages` lists and
`bootstrap.sh` installs.

Milter socket specs come in two spellings: pymilter and Sendmail write `inet:PORT@HOST`,
Postfix writes `inet:HOST:PORT`. Every fixture that takes a spec accepts either; every
milter fixture exposes both (`pymilter_socket`, `postfix_socket`).

    with peers.header_milter(tmp) as milter:
        with peers.postfix_with_milter(tmp, milter.postfix_socket) as mta:
            with mta.smtp() as client:
                client.sendmail("a@test.example", ["b@test.example"], peers.message())
            assert b"X-Peer-Test: yes" in mta.wait_delivered(1)[0]
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
DOMAIN = "test.example"

#: Where the unpacked Sendmail (apt-get download + dpkg-deb -x) is kept between runs.
SENDMAIL_CACHE = Path(
    os.environ.get("MAILGATE_SENDMAIL_CACHE", "/var/cache/mailgate-tests/sendmail")
)
SENDMAIL_PACKAGES = ("sendmail-bin", "sendmail-base", "sendmail-cf")
SENDMAIL_HOSTNAME = f"smtest.{DOMAIN}"
#: The shared libraries the unpacked sendmail binary needs (Debian 12 names; all are in
#: .ci/system-packages, since sendmail-bin itself is never installed).
SENDMAIL_LIBRARY_PACKAGES = (
    "libdb5.3",
    "libnsl2",
    "libldap-2.5-0",
    "libwrap0",
    "libsasl2-2",
    "libssl3",
)

#: The EICAR test file (https://www.eicar.org), for clamd; built in two parts so that no
#: scanner flags this source file.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: SpamAssassin's GTUBE string: any message containing it scores ~1000.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*" + b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class PeerUnavailable(RuntimeError):
    """A peer program is not installed, or could not be set up on this machine."""


class PeerFailed(RuntimeError):
    """A peer program exited early or did not become ready in time (the message has its log)."""


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def require(program: str, package: str) -> str:
    """Return the path of `program` (a path or a name on PATH) or say which package to install."""
    found = program if os.path.isabs(program) else shutil.which(program)
    if not found or not os.access(found, os.X_OK):
        raise PeerUnavailable(
            f"{program} not found: install the Debian package {package!r} "
            "(it is listed in .ci/system-packages, which ./bootstrap.sh installs)"
        )
    return found


def require_root() -> None:
    if os.geteuid() != 0:
        raise PeerUnavailable("the real mail peers must run as root (Postfix, opendkim, spamd)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def postfix_spec(spec: str) -> str:
    """`inet:PORT@HOST` or `inet:HOST:PORT` → Postfix's `inet:HOST:PORT` (unix: unchanged)."""
    match = re.fullmatch(r"inet:(\d+)@(.+)", spec)
    if match:
        return f"inet:{match[2]}:{match[1]}"
    return spec


def pymilter_spec(spec: str) -> str:
    """`inet:HOST:PORT` or `inet:PORT@HOST` → the pymilter/Sendmail form `inet:PORT@HOST`."""
    match = re.fullmatch(r"inet:([^@]+):(\d+)", spec)
    if match:
        return f"inet:{match[2]}@{match[1]}"
    return spec


def _specs(milter_socket: str | Sequence[str] | None) -> list[str]:
    if milter_socket is None:
        return []
    if isinstance(milter_socket, str):
        return [part for part in re.split(r"[\s,]+", milter_socket) if part]
    return list(milter_socket)


def make_traversable(path: Path) -> None:
    """Give "others" search (x) permission on `path` and its ancestors.

    The service users (postfix, nobody, opendkim) must reach files under pytest's tmp dir,
    whose top (/tmp/pytest-of-root) is mode 0700. Only the search bit is added, never read.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH | stat.S_IXGRP)


def _private_dir(tmp_dir: Path, name: str) -> Path:
    base = Path(tmp_dir).resolve() / name
    if base.exists():
        index = 2
        while (base.parent / f"{name}{index}").exists():
            index += 1
        base = base.parent / f"{name}{index}"
    base.mkdir(parents=True)
    base.chmod(0o755)
    make_traversable(base)
    return base


def _chown(path: Path, user: str, group: str | None = None, *, recursive: bool = False) -> None:
    shutil.chown(path, user, group)
    if recursive:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                shutil.chown(os.path.join(root, name), user, group)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _run(argv: Sequence[str], *, what: str, timeout: float = 60.0, cwd: Path | None = None) -> str:
    """Run a setup command and return its stdout; on failure raise PeerUnavailable."""
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"{what}: {argv[0]} timed out after {timeout}s") from exc
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        errors = result.stderr.decode(errors="replace")
        raise PeerUnavailable(
            f"{what} failed (exit {result.returncode}): {' '.join(argv)}\n{output}{errors}"
        )
    return output


def _smtp_banner(port: int, host: str = HOST, timeout: float = 2.0) -> bool:
    """True once something on the port sends an SMTP 220 greeting."""
    try:
        with socket.create_connection((host, port), timeout) as sock:
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(1024)
                if not chunk:
                    return False
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
                sock.recv(1024)
            return data.startswith(b"220")
    except OSError:
        return False


def _port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


def _line_exchange(port: int, request: bytes, *, host: str = HOST, timeout: float = 2.0) -> bytes:
    """Send `request`, half-close, return everything the server says until it closes."""
    try:
        with socket.create_connection((host, port), timeout) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return b""


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------

#: Every daemon started through this module and not yet stopped (a safety net for tests).
_RUNNING: dict[int, Daemon] = {}
_RUNNING_LOCK = threading.Lock()
#: The process groups of every daemon ever started here (each daemon leads its own).
_STARTED_GROUPS: set[int] = set()


@dataclass
class Daemon:
    """One foreground program in its own process group, its output appended to `log_path`."""

    name: str
    argv: list[str]
    log_path: Path
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    #: Called right after SIGTERM: libmilter notices a stop request only when its accept
    #: loop wakes (every 5 s), so milters get a connection that wakes it at once.
    after_term: Callable[[], object] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=dict(self.env) if self.env is not None else None,
                start_new_session=True,
            )
        with _RUNNING_LOCK:
            _RUNNING[self.process.pid] = self
            _STARTED_GROUPS.add(self.process.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return _read(self.log_path)

    def wait_ready(
        self, ready: Callable[[], bool], timeout: float, extra_log: Callable[[], str] | None = None
    ) -> None:
        """Poll `ready` until it is true; fail early if the program exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise PeerFailed(self._report("exited during start-up", extra_log))
            if ready():
                return
            if time.monotonic() > deadline:
                raise PeerFailed(self._report(f"not ready after {timeout:.0f}s", extra_log))
            time.sleep(0.05)

    def _report(self, what: str, extra_log: Callable[[], str] | None) -> str:
        code = self.process.poll() if self.process else None
        text = f"{self.name} {what} (exit status {code}): {' '.join(self.argv)}\n"
        text += f"--- {self.log_path}\n{_tail(self.log())}\n"
        if extra_log is not None:
            text += f"--- log\n{_tail(extra_log())}\n"
        return text

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait for the exit, then clear out the rest of the process group."""
        if self.process is None:
            return None
        pid = self.process.pid
        try:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                if self.after_term is not None:
                    time.sleep(0.05)
                    self.after_term()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    _killpg(pid, signal.SIGKILL)
                    self.process.wait(5)
            _reap_group(pid)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(pid, None)
        return self.process.returncode


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat_line[stat_line.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _reap_group(pgid: int, grace: float = 3.0) -> None:
    """Children that outlive their leader (Postfix's smtpd, spamd's children): TERM, then KILL.

    Orphans that already exited stay zombies until init reaps them; they are ignored.
    """
    if not group_members(pgid):
        return
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return
        time.sleep(0.05)
    _killpg(pgid, signal.SIGKILL)


def started_groups() -> frozenset[int]:
    """The process groups of every daemon started so far (to compare before/after a test)."""
    with _RUNNING_LOCK:
        return frozenset(_STARTED_GROUPS)


def running_daemons(exclude: frozenset[int] = frozenset()) -> list[Daemon]:
    """Daemons started here and not stopped, except those whose group is in `exclude`."""
    with _RUNNING_LOCK:
        daemons = [daemon for pid, daemon in _RUNNING.items() if pid not in exclude]
    return [daemon for daemon in daemons if daemon.alive()]


def stop_all(exclude: frozenset[int] = frozenset()) -> None:
    """Stop every daemon still running (but those in `exclude`): a last-resort cleanup."""
    for daemon in running_daemons(exclude):
        daemon.stop(5)


atexit.register(stop_all)


def leftover_processes(exclude: frozenset[int] = frozenset()) -> list[str]:
    """`ps` lines of live processes in the group of any daemon started here (but `exclude`).

    Use `before = started_groups()` ahead of a test and `leftover_processes(before)` after
    it to see what that test left behind.
    """
    pids = [pid for pgid in started_groups() - exclude for pid in group_members(pgid)]
    if not pids:
        return []
    result = subprocess.run(
        ["ps", "-o", "pid=,pgid=,stat=,args=", "-p", ",".join(map(str, pids))],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


@dataclass
class MilterEndpoint:
    """A milter listening on 127.0.0.1:port, with its socket spec in every spelling."""

    port: int
    host: str = HOST

    @property
    def pymilter_socket(self) -> str:
        """`inet:PORT@HOST`: pymilter, libmilter and Sendmail's `S=`."""
        return f"inet:{self.port}@{self.host}"

    @property
    def sendmail_socket(self) -> str:
        return self.pymilter_socket

    @property
    def postfix_socket(self) -> str:
        """`inet:HOST:PORT`: Postfix's smtpd_milters."""
        return f"inet:{self.host}:{self.port}"


# --------------------------------------------------------------------------------------
# the SMTP sink
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    """One message as the sink received it (data is exactly the DATA payload, CRLF lines)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    helo: str
    peer: tuple[str, int]


class _SinkHandler(socketserver.StreamRequestHandler):
    server: _SinkServer
    timeout = 60

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        sink = self.server.sink
        self.reply(f"220 {sink.hostname} ESMTP mailgate test sink")
        helo = ""
        mail_from: str | None = None
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
            verb = line[:4].upper()
            arg = line[4:].strip()
            if verb == "EHLO":
                helo = arg
                mail_from, rcpts = None, []
                self.wfile.write(
                    f"250-{sink.hostname}\r\n250-8BITMIME\r\n250-PIPELINING\r\n"
                    "250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n".encode()
                )
                self.wfile.flush()
            elif verb == "HELO":
                helo = arg
                mail_from, rcpts = None, []
                self.reply(f"250 {sink.hostname}")
            elif verb == "MAIL" and arg.upper().startswith("FROM:"):
                mail_from, rcpts = _address(arg[5:]), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT" and arg.upper().startswith("TO:"):
                if mail_from is None:
                    self.reply("503 5.5.1 MAIL first")
                    continue
                rcpts.append(_address(arg[3:]))
                self.reply(sink.rcpt_reply)
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self.reply("503 5.5.1 need MAIL and RCPT")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                if data is None:
                    return
                reply = sink.data_reply
                if reply.startswith("2"):
                    sink._record(
                        SinkMessage(mail_from, tuple(rcpts), data, helo, self.client_address)
                    )
                self.reply(reply)
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not implemented")

    def _read_data(self) -> bytes | None:
        lines: list[bytes] = []
        while True:
            raw = self.rfile.readline(1 << 20)
            if not raw:
                return None
            if raw in (b".\r\n", b".\n"):
                return b"".join(lines)
            lines.append(raw[1:] if raw.startswith(b".") else raw)


def _address(text: str) -> str:
    text = text.strip()
    if text.startswith("<"):
        return text[1 : text.find(">")] if ">" in text else text[1:]
    return text.split()[0] if text else ""


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    sink: SmtpSink


class SmtpSink:
    """A tiny threaded SMTP server on 127.0.0.1 that records every message it accepts.

    Attributes: `host`, `port`, `messages` (list of SinkMessage), `directory` (if given,
    each message is also written there as NNNN.eml), `rcpt_reply` and `data_reply` (the
    replies it gives; set `data_reply = "451 4.3.0 try later"` to refuse messages).
    """

    def __init__(self, directory: Path | None = None, hostname: str = "sink.test.example") -> None:
        self.hostname = hostname
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.messages: list[SinkMessage] = []
        self.rcpt_reply = "250 2.1.5 Ok"
        self.data_reply = "250 2.0.0 Ok: queued"
        self._cond = threading.Condition()
        self._server = _SinkServer((HOST, 0), _SinkHandler)
        self._server.sink = self
        self.host = HOST
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _record(self, message: SinkMessage) -> None:
        with self._cond:
            self.messages.append(message)
            if self.directory is not None:
                (self.directory / f"{len(self.messages):04d}.eml").write_bytes(message.data)
            self._cond.notify_all()

    def delivered(self) -> list[bytes]:
        with self._cond:
            return [message.data for message in self.messages]

    def wait_for(self, count: int = 1, timeout: float = 30.0) -> list[SinkMessage]:
        """Wait until at least `count` messages arrived; return what arrived (maybe fewer)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> SmtpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def smtp_sink(tmp_dir: Path | None = None) -> Iterator[SmtpSink]:
    """An SmtpSink (messages also saved under tmp_dir/sink/ when tmp_dir is given)."""
    sink = SmtpSink(Path(tmp_dir) / "sink" if tmp_dir is not None else None)
    try:
        yield sink
    finally:
        sink.close()


# --------------------------------------------------------------------------------------
# a pymilter milter (the tests' own third party)
# --------------------------------------------------------------------------------------

HEADER_MILTER_SOURCE = '''\
"""A pymilter milter for peer tests: adds a header at end of message, then acts."""
import sys

import Milter

SPEC, ACTION, NAME, VALUE = sys.argv[1:5]


class PeerTest(Milter.Base):
    def envfrom(self, mailfrom, *params):
        print("envfrom", mailfrom, flush=True)
        return Milter.CONTINUE

    def eom(self):
        self.addheader(NAME, VALUE)
        print("eom", ACTION, flush=True)
        if ACTION == "quarantine":
            self.quarantine("held by the peer test milter")
        elif ACTION == "reject":
            self.setreply("550", "5.7.1", "rejected by the peer test milter")
            return Milter.REJECT
        elif ACTION == "tempfail":
            self.setreply("451", "4.7.1", "tempfailed by the peer test milter")
            return Milter.TEMPFAIL
        elif ACTION == "discard":
            return Milter.DISCARD
        return Milter.ACCEPT


Milter.factory = PeerTest
Milter.set_flags(Milter.ADDHDRS | Milter.QUARANTINE)
print("starting", SPEC, flush=True)
Milter.runmilter("peer-test", SPEC, timeout=60)
print("stopped", flush=True)
'''


@dataclass
class PyMilter(MilterEndpoint):
    """The header milter: `port`, the socket specs, `daemon`, `log()`."""

    daemon: Daemon | None = None

    def log(self) -> str:
        return self.daemon.log() if self.daemon else ""


@contextlib.contextmanager
def header_milter(
    tmp_dir: Path,
    *,
    action: str = "accept",
    header: tuple[str, str] = ("X-Peer-Test", "yes"),
    python: str = sys.executable,
    start_timeout: float = 20.0,
) -> Iterator[PyMilter]:
    """A pymilter milter in a subprocess that adds `header` and then accepts.

    action: "accept", "quarantine" (Postfix puts the message on hold), "reject" (550 5.7.1),
    "tempfail" (451 4.7.1) or "discard".
    """
    base = _private_dir(Path(tmp_dir), "pymilter")
    script = base / "header_milter.py"
    script.write_text(HEADER_MILTER_SOURCE)
    port = free_port()
    milter = PyMilter(port=port)
    daemon = Daemon(
        "pymilter",
        [python, "-u", str(script), milter.pymilter_socket, action, *header],
        base / "milter.log",
        cwd=base,
        after_term=lambda: _port_open(port),
    )
    milter.daemon = daemon
    daemon.start()
    try:
        daemon.wait_ready(lambda: _port_open(port), start_timeout)
        yield milter
    finally:
        daemon.stop()


# --------------------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------------------

POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"

# Debian's stock services, chroot off (a chroot would need /etc copied into the spool).
_MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


# The queue layout from /etc/postfix/postfix-files (name, owner, group, mode). Creating it
# here takes milliseconds; `postfix check` would do the same in ~2.5 s.
_POSTFIX_QUEUE_DIRS = [
    *((name, "postfix", None, 0o700) for name in (
        "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
        "private", "saved", "trace",
    )),
    ("maildrop", "postfix", "postdrop", 0o730),
    ("public", "postfix", "postdrop", 0o710),
    ("pid", "root", None, 0o755),
]  # fmt: skip


def _postfix_queue_dirs(queue: Path, data: Path) -> None:
    for user in ("postfix", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise PeerUnavailable(
                f"no {user!r} user: is the Debian package 'postfix' installed?"
            ) from None
    queue.mkdir(mode=0o755)
    data.mkdir(mode=0o700)
    shutil.chown(data, "postfix")
    for name, owner, group, mode in _POSTFIX_QUEUE_DIRS:
        path = queue / name
        path.mkdir()
        path.chmod(mode)
        shutil.chown(path, owner, group)


def _postfix_diagnosis(config_dir: Path) -> str:
    """What `postfix check` says: Postfix prints its errors only to a terminal, so give it one."""
    script = shutil.which("script")
    if script is None:
        return ""
    command = f"/usr/sbin/postfix -c {config_dir} check"
    result = subprocess.run(
        [script, "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=60
    )
    return f"--- {command}\n{result.stdout}{result.stderr}"


@dataclass
class Postfix:
    """A running Postfix: SMTP on `host`:`port`, every test.example mailbox in one Maildir.

    Paths: `base`, `config_dir` (main.cf, master.cf), `queue_dir`, `mail_dir`,
    `maildir` (where delivered mail lands), `log_path`. `milters` are the smtpd_milters.
    """

    base: Path
    port: int
    milters: list[str]
    daemon: Daemon
    host: str = HOST

    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.base / "spool"

    @property
    def mail_dir(self) -> Path:
        return self.base / "mail"

    @property
    def maildir(self) -> Path:
        return self.mail_dir / "inbox"

    @property
    def log_path(self) -> Path:
        return self.base / "postfix.log"

    def smtp(self, timeout: float = 60.0) -> smtplib.SMTP:
        return smtplib.SMTP(
            self.host, self.port, local_hostname="client.test.example", timeout=timeout
        )

    def log(self) -> str:
        """Postfix's own log (maillog_file) plus the master's stdout/stderr."""
        return _read(self.log_path) + self.daemon.log()

    def delivered(self) -> list[bytes]:
        """Every delivered message, oldest first (all test.example recipients share a Maildir)."""
        files = [
            path
            for sub in ("new", "cur")
            if (self.maildir / sub).is_dir()
            for path in (self.maildir / sub).iterdir()
        ]
        files.sort(key=lambda path: (path.stat().st_mtime, path.name))
        return [path.read_bytes() for path in files]

    def wait_delivered(self, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(messages := self.delivered()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return messages

    def postfix_command(self, program: str, *args: str) -> str:
        return _run(
            [f"/usr/sbin/{program}", "-c", str(self.config_dir), *args], what=program, timeout=30
        )

    def queue(self) -> list[dict[str, object]]:
        """The queue as `postqueue -j` reports it (one dict per message, every queue)."""
        output = self.postfix_command("postqueue", "-j")
        return [json.loads(line) for line in output.splitlines() if line.startswith("{")]

    def held(self) -> list[str]:
        """Queue ids of the messages on hold."""
        return [str(item["queue_id"]) for item in self.queue() if item.get("queue_name") == "hold"]

    def wait_held(self, count: int = 1, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(ids := self.held()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return ids

    def postcat(self, queue_id: str) -> str:
        """The queue file of one message (envelope, headers, body), as `postcat -q` prints it."""
        return self.postfix_command("postcat", "-q", queue_id)

    def release(self, queue_id: str = "ALL") -> None:
        """Take messages off hold (`postsuper -H`), to be delivered."""
        self.postfix_command("postsuper", "-H", queue_id)
        self.postfix_command("postqueue", "-f")


@contextlib.contextmanager
def postfix_with_milter(
    tmp_dir: Path,
    milter_socket: str | Sequence[str] | None,
    *,
    default_action: str = "tempfail",
    relay_to: SmtpSink | tuple[str, int] | None = None,
    main_cf: Mapping[str, str] | None = None,
    start_timeout: float = 30.0,
) -> Iterator[Postfix]:
    """Postfix 3.7 as MTA with `smtpd_milters = milter_socket` on a free loopback port.

    milter_socket: one spec or several (either spelling; None or "" for no milter).
    default_action: milter_default_action (tempfail, accept, reject, quarantine).
    relay_to: where mail for other domains goes (else it bounces: no outbound delivery).
    main_cf: extra or overriding main.cf parameters.
    Mail for any address @test.example is delivered to the Maildir `Postfix.maildir`.
    """
    require_root()
    require(POSTFIX_MASTER, "postfix")
    require("/usr/sbin/postqueue", "postfix")
    base = _private_dir(Path(tmp_dir), "postfix")
    etc, mail = base / "etc", base / "mail"
    etc.mkdir()
    mail.mkdir()
    _chown(mail, "nobody", "nogroup")
    port = free_port()
    milters = [postfix_spec(spec) for spec in _specs(milter_socket)]
    if isinstance(relay_to, SmtpSink):
        relay_to = (relay_to.host, relay_to.port)
    params = {
        "compatibility_level": "3.6",
        "queue_directory": str(base / "spool"),
        "data_directory": str(base / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": f"mx.{DOMAIN}",
        "mydomain": DOMAIN,
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        "maillog_file": str(base / "postfix.log"),
        "maillog_file_prefixes": str(base),
        "smtpd_milters": " ".join(milters),
        "non_smtpd_milters": "",
        "milter_default_action": default_action,
        "milter_connect_timeout": "5s",
        "milter_command_timeout": "20s",
        "milter_content_timeout": "60s",
        "virtual_mailbox_domains": DOMAIN,
        "virtual_mailbox_base": str(mail),
        "virtual_mailbox_maps": "static:inbox/",
        "virtual_uid_maps": "static:65534",
        "virtual_gid_maps": "static:65534",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "biff": "no",
        "notify_classes": "",
        "in_flow_delay": "0s",
        "smtpd_error_sleep_time": "0s",
        "smtpd_banner": "$myhostname ESMTP Postfix (mailgate test peer)",
        "relayhost": f"[{relay_to[0]}]:{relay_to[1]}" if relay_to else "",
        "default_transport": "smtp"
        if relay_to
        else "error:5.3.0 no outbound mail from this test peer",
    }
    params.update(main_cf or {})
    (etc / "main.cf").write_text("".join(f"{key} = {value}\n" for key, value in params.items()))
    (etc / "master.cf").write_text(f"{HOST}:{port} inet n - n - - smtpd\n" + _MASTER_CF_SERVICES)
    # Postfix rereads a table file until its mtime is over a second old (0.3 s naps, ~2 s in
    # all for a file written just now); back-date the files to start at once.
    past = time.time() - 60
    for name in ("main.cf", "master.cf"):
        os.utime(etc / name, (past, past))
    _postfix_queue_dirs(base / "spool", base / "data")
    daemon = Daemon("postfix master", [POSTFIX_MASTER, "-c", str(etc), "-s"], base / "master.out")
    mta = Postfix(base=base, port=port, milters=milters, daemon=daemon)
    daemon.start()
    try:
        daemon.wait_ready(
            lambda: _smtp_banner(port),
            start_timeout,
            extra_log=lambda: _read(mta.log_path) + _postfix_diagnosis(etc),
        )
        yield mta
    finally:
        daemon.stop()


# --------------------------------------------------------------------------------------
# Sendmail (unpacked from Debian's packages, never installed: it conflicts with postfix)
# --------------------------------------------------------------------------------------


def sendmail_root(cache: Path = SENDMAIL_CACHE) -> Path:
    """Download and unpack sendmail-bin, -base and -cf once; return the unpacked root."""
    root = cache / "root"
    marker = root / ".mailgate-complete"
    if marker.exists():
        return root
    require("apt-get", "apt")
    require("dpkg-deb", "dpkg")
    require("m4", "m4")
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return root
        work = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache))
        try:
            debs = work / "debs"
            debs.mkdir()
            _apt_download(debs)
            unpacked = work / "root"
            unpacked.mkdir()
            names = sorted(path.name for path in debs.glob("*.deb"))
            for name in names:
                _run(["dpkg-deb", "-x", str(debs / name), str(unpacked)], what="dpkg-deb -x")
            if not (unpacked / "usr/libexec/sendmail/sendmail").exists():
                raise PeerUnavailable(f"no usr/libexec/sendmail/sendmail in {names}")
            (unpacked / marker.name).write_text("\n".join(names) + "\n")
            if root.exists():
                shutil.rmtree(root)
            unpacked.rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


def _check_libraries(binary: Path) -> None:
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if missing:
        raise PeerUnavailable(
            f"{binary} needs {', '.join(missing)}: install the Debian packages "
            f"{' '.join(SENDMAIL_LIBRARY_PACKAGES)} (listed in .ci/system-packages)"
        )


def _apt_download(directory: Path) -> None:
    # apt's _apt sandbox user cannot write here; apt then downloads as root (a warning).
    command = ["apt-get", "download", "-q", *SENDMAIL_PACKAGES]
    try:
        _run(command, what="apt-get download", timeout=300, cwd=directory)
    except PeerUnavailable:
        # Package lists missing or stale on a fresh machine: refresh them once and retry.
        _run(["apt-get", "update", "-qq"], what="apt-get update", timeout=300)
        _run(command, what="apt-get download", timeout=300, cwd=directory)


_SENDMAIL_FLAGS = {"tempfail": "F=T, ", "reject": "F=R, ", "accept": ""}


@dataclass
class Sendmail:
    """A running Sendmail 8.17: SMTP on `host`:`port`, relaying everything to `sink`.

    Paths: `base`, `root` (the unpacked packages), `cf_path`, `queue_dir`, `traffic_log`
    (-X: both sides of every SMTP conversation). Sendmail logs only to syslog.
    """

    base: Path
    port: int
    milters: list[str]
    sink: SmtpSink
    root: Path
    daemon: Daemon
    host: str = HOST

    @property
    def binary(self) -> Path:
        return self.root / "usr/libexec/sendmail/sendmail"

    @property
    def cf_path(self) -> Path:
        return self.base / "test.cf"

    @property
    def queue_dir(self) -> Path:
        return self.base / "queue"

    @property
    def traffic_log(self) -> Path:
        return self.base / "traffic.log"

    def smtp(self, timeout: float = 60.0) -> smtplib.SMTP:
        return smtplib.SMTP(
            self.host, self.port, local_hostname="client.test.example", timeout=timeout
        )

    def log(self) -> str:
        """The daemon's stdout/stderr, then the -X traffic log."""
        return self.daemon.log() + _read(self.traffic_log)

    def delivered(self) -> list[bytes]:
        """Messages that Sendmail relayed to the sink (after the milters)."""
        return self.sink.delivered()

    def wait_delivered(self, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        return [message.data for message in self.sink.wait_for(count, timeout)]

    def queue(self, quarantined: bool = False) -> str:
        """`sendmail -bp` (or -qQ -bp: the quarantined messages) on this instance's queue."""
        args = ["-qQ"] if quarantined else []
        return _run(
            self.command("-C", str(self.cf_path), *args, "-bp"), what="sendmail -bp", timeout=30
        )

    def command(self, *args: str) -> list[str]:
        """argv to run this Sendmail binary in a UTS namespace with a qualified hostname."""
        return _sendmail_argv(self.binary, *args)


def _sendmail_argv(binary: Path, *args: str) -> list[str]:
    # An unqualified hostname makes Sendmail sleep 60 s at start; set one for it alone.
    unshare = require("unshare", "util-linux")
    script = f'hostname {SENDMAIL_HOSTNAME} && exec "$0" "$@"'
    return [unshare, "--uts", "sh", "-c", script, str(binary), *args]


def _sendmail_mc(
    base: Path, root: Path, port: int, relay_port: int, milters: list[str], default_action: str
) -> str:
    cf_dir = root / "usr/share/sendmail/cf"
    flags = _SENDMAIL_FLAGS[default_action]
    filters = "".join(
        f"INPUT_MAIL_FILTER(`m{index}', `S={spec}, {flags}T=C:10s;S:30s;R:30s;E:5m')dnl\n"
        for index, spec in enumerate(milters)
    )
    return f"""\
divert(-1)
define(`_CF_DIR_', `{cf_dir}/')
divert(0)dnl
include(`{cf_dir}/m4/cf.m4')dnl
VERSIONID(`mailgate test peer')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{SENDMAIL_HOSTNAME}')dnl
define(`QUEUE_DIR', `{base}/queue')dnl
define(`confPID_FILE', `{base}/sendmail.pid')dnl
define(`STATUS_FILE', `{base}/statistics')dnl
define(`ALIAS_FILE', `{base}/aliases')dnl
define(`confCW_FILE', `-o {base}/local-host-names')dnl
define(`confSERVICE_SWITCH_FILE', `{base}/service.switch')dnl
define(`confHOSTS_FILE', `{base}/hosts')dnl
define(`confHELP_FILE', `{cf_dir}/../helpfile')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`confTO_CONNECT', `10s')dnl
define(`confTO_INITIAL', `10s')dnl
define(`confTO_IDENT', `0s')dnl
define(`confDELIVERY_MODE', `background')dnl
define(`confMILTER_LOG_LEVEL', `9')dnl
define(`SMART_HOST', `[127.0.0.1]')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {relay_port}')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {relay_port}')dnl
define(`SMTP_MAILER_ARGS', `TCP $h {relay_port}')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`accept_unqualified_senders')dnl
FEATURE(`promiscuous_relay')dnl
DAEMON_OPTIONS(`Family=inet, Name=MTA-test, Port={port}, Addr=127.0.0.1')dnl
{filters}MAILER(`local')dnl
MAILER(`smtp')dnl
"""


@contextlib.contextmanager
def sendmail_with_milter(
    tmp_dir: Path,
    milter_socket: str | Sequence[str] | None,
    *,
    default_action: str = "tempfail",
    sink: SmtpSink | None = None,
    start_timeout: float = 30.0,
) -> Iterator[Sendmail]:
    """Sendmail 8.17 as MTA with INPUT_MAIL_FILTER = milter_socket, relaying to an SMTP sink.

    The packages are unpacked once into SENDMAIL_CACHE (apt-get download; needs the Debian
    registry the first time). It runs in its own UTS namespace with a qualified hostname
    (unqualified, Sendmail sleeps 60 s at start). default_action: tempfail (F=T), reject
    (F=R) or accept. Without `sink`, a private SmtpSink is started and closed with it.
    """
    require_root()
    require("unshare", "util-linux")
    require("hostname", "hostname")
    root = sendmail_root()
    if default_action not in _SENDMAIL_FLAGS:
        raise ValueError(f"default_action must be one of {sorted(_SENDMAIL_FLAGS)}")
    base = _private_dir(Path(tmp_dir), "sendmail")
    queue = base / "queue"
    queue.mkdir(mode=0o700)
    (base / "aliases").write_text("postmaster: root\nMAILER-DAEMON: postmaster\n")
    (base / "local-host-names").write_text("")
    (base / "statistics").write_bytes(b"")
    (base / "service.switch").write_text("hosts files\naliases files\n")
    (base / "hosts").write_text(f"127.0.0.1 localhost {SENDMAIL_HOSTNAME}\n")
    milters = [pymilter_spec(spec) for spec in _specs(milter_socket)]
    with contextlib.ExitStack() as stack:
        if sink is None:
            sink = stack.enter_context(smtp_sink(base))
        port = free_port()
        mc = base / "test.mc"
        mc.write_text(_sendmail_mc(base, root, port, sink.port, milters, default_action))
        cf_text = _run([require("m4", "m4"), str(mc)], what="m4 test.mc", timeout=30)
        (base / "test.cf").write_text(cf_text)
        binary = root / "usr/libexec/sendmail/sendmail"
        _check_libraries(binary)
        cf = str(base / "test.cf")
        _run(_sendmail_argv(binary, "-C", cf, "-bi"), what="sendmail -bi (newaliases)")
        argv = _sendmail_argv(binary, "-C", cf, "-bD", "-X", str(base / "traffic.log"))
        daemon = Daemon("sendmail", argv, base / "sendmail.out", cwd=base)
        mta = Sendmail(base=base, port=port, milters=milters, sink=sink, root=root, daemon=daemon)
        daemon.start()
        stack.callback(daemon.stop)
        daemon.wait_ready(lambda: _smtp_banner(port), start_timeout)
        yield mta


# --------------------------------------------------------------------------------------
# OpenDKIM
# --------------------------------------------------------------------------------------


@dataclass
class OpenDKIM(MilterEndpoint):
    """opendkim as a signer (mode "s") or a verifier (mode "v").

    Signer: `domain`, `selector`, `dns_name` (sel1._domainkey.test.example),
    `public_key_record` (its TXT value, "v=DKIM1; h=sha256; k=rsa; p=..."),
    `dns_records` ({dns_name: public_key_record}), `private_key_path`.
    Verifier: `dns_records` (what its TestDNSData answers), `authserv_id` (the
    Authentication-Results header it adds to every message). Both: `config_path`, `log()`.
    """

    mode: str = "s"
    domain: str = DOMAIN
    selector: str = "sel1"
    base: Path = Path()
    private_key_path: Path | None = None
    public_key_record: str = ""
    dns_records: dict[str, str] = field(default_factory=dict)
    authserv_id: str = ""
    daemon: Daemon | None = None

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def config_path(self) -> Path:
        return self.base / "opendkim.conf"

    def log(self) -> str:
        return self.daemon.log() if self.daemon else ""


def _txt_record(zone_text: str) -> str:
    """The TXT value from opendkim-genkey's .txt (several quoted strings) as one string."""
    return "".join(re.findall(r'"([^"]*)"', zone_text))


def _opendkim_base(tmp_dir: Path) -> tuple[str, Path]:
    require_root()
    opendkim = require("/usr/sbin/opendkim", "opendkim")
    try:
        pwd.getpwnam("opendkim")
    except KeyError:
        raise PeerUnavailable(
            "no 'opendkim' user: reinstall the Debian package 'opendkim'"
        ) from None
    base = _private_dir(Path(tmp_dir), "opendkim")
    (base / "run").mkdir()
    _chown(base / "run", "opendkim", "opendkim")
    return opendkim, base


@contextlib.contextmanager
def _run_opendkim(
    opendkim: str, milter: OpenDKIM, settings: str, start_timeout: float
) -> Iterator[OpenDKIM]:
    base = milter.base
    # TestDNSData answers TXT queries from this file ("name value"; no spaces in the value).
    (base / "testdns.txt").write_text(
        "".join(f"{name} {value.replace(' ', '')}\n" for name, value in milter.dns_records.items())
    )
    milter.config_path.write_text(
        f"""\
Syslog no
Mode {milter.mode}
Socket {milter.pymilter_socket}
PidFile {base / "run" / "opendkim.pid"}
UserID opendkim:opendkim
UMask 002
Canonicalization relaxed/simple
TestDNSData file:{base / "testdns.txt"}
RequireSafeKeys false
{settings}"""
    )
    port = milter.port
    daemon = Daemon(
        "opendkim",
        [opendkim, "-f", "-x", str(milter.config_path)],
        base / "opendkim.log",
        after_term=lambda: _port_open(port),
    )
    milter.daemon = daemon
    daemon.start()
    try:
        daemon.wait_ready(lambda: _port_open(port), start_timeout)
        yield milter
    finally:
        daemon.stop()


@contextlib.contextmanager
def opendkim_signer(
    tmp_dir: Path,
    *,
    domain: str = DOMAIN,
    selector: str = "sel1",
    bits: int = 2048,
    start_timeout: float = 20.0,
) -> Iterator[OpenDKIM]:
    """opendkim 2.11 signing mail From: *@domain (clients on 127.0.0.1 count as internal).

    The key comes from opendkim-genkey; TestDNSData holds its public record, so no DNS is
    needed. Works as a milter for Postfix (`postfix_socket`) or Sendmail (`pymilter_socket`).
    """
    opendkim, base = _opendkim_base(tmp_dir)
    genkey = require("opendkim-genkey", "opendkim-tools")
    keys = base / "keys"
    keys.mkdir()
    _run(
        [genkey, "-b", str(bits), "-D", str(keys), "-d", domain, "-s", selector],
        what="opendkim-genkey",
    )
    _chown(keys, "opendkim", "opendkim", recursive=True)
    record = _txt_record((keys / f"{selector}.txt").read_text())
    signer = OpenDKIM(
        port=free_port(),
        mode="s",
        domain=domain,
        selector=selector,
        base=base,
        private_key_path=keys / f"{selector}.private",
        public_key_record=record,
    )
    signer.dns_records = {signer.dns_name: record}
    (base / "keytable").write_text(
        f"{signer.dns_name} {domain}:{selector}:{signer.private_key_path}\n"
    )
    (base / "signingtable").write_text(f"*@{domain} {signer.dns_name}\n")
    settings = f"""\
KeyTable file:{base / "keytable"}
SigningTable refile:{base / "signingtable"}
InternalHosts 127.0.0.1
"""
    with _run_opendkim(opendkim, signer, settings, start_timeout) as running:
        yield running


@contextlib.contextmanager
def opendkim_verifier(
    tmp_dir: Path,
    dns_records: Mapping[str, str],
    *,
    authserv_id: str = f"verify.{DOMAIN}",
    start_timeout: float = 20.0,
) -> Iterator[OpenDKIM]:
    """opendkim 2.11 verifying every message (loopback counts as external).

    dns_records: the TXT records it may look up, e.g. a signer's `dns_records`. It adds
    `Authentication-Results: <authserv_id>; dkim=pass ...` (or fail/none) to each message.
    """
    opendkim, base = _opendkim_base(tmp_dir)
    verifier = OpenDKIM(
        port=free_port(),
        mode="v",
        base=base,
        dns_records=dict(dns_records),
        authserv_id=authserv_id,
    )
    settings = f"""\
InternalHosts 192.0.2.255
AuthservID {authserv_id}
AlwaysAddARHeader yes
"""
    with _run_opendkim(opendkim, verifier, settings, start_timeout) as running:
        yield running


# --------------------------------------------------------------------------------------
# clamd + clamav-milter
# --------------------------------------------------------------------------------------


@dataclass
class Clamd:
    """clamd with a local EICAR-only signature database: `port`, `db_dir`, `log()`, `scan()`."""

    port: int
    base: Path
    daemon: Daemon
    host: str = HOST
    socket_path: Path | None = None  # its LocalSocket, with clamd_server(local_socket=True)

    @property
    def db_dir(self) -> Path:
        return self.base / "db"

    def log(self) -> str:
        return _read(self.base / "clamd.log") + self.daemon.log()

    def ping(self) -> bool:
        return _line_exchange(self.port, b"nPING\n", host=self.host).strip() == b"PONG"

    def scan(self, data: bytes) -> str:
        """INSTREAM `data`; clamd's answer, e.g. "stream: Test.EICAR.NDB.UNOFFICIAL FOUND"."""
        with socket.create_connection((self.host, self.port), 10) as sock:
            sock.sendall(b"zINSTREAM\0" + len(data).to_bytes(4, "big") + data + b"\0\0\0\0")
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.rstrip(b"\0").decode()


def _write_eicar_db(db: Path) -> None:
    db.mkdir()
    (db / "test.hdb").write_text("44d88612fea8a8f36de82e1278abb02f:68:Test.EICAR.HDB\n")
    (db / "test.ndb").write_text(
        "Test.EICAR.NDB:0:*:" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE".hex() + "\n"
    )


@contextlib.contextmanager
def clamd_server(
    tmp_dir: Path,
    *,
    start_timeout: float = 60.0,
    local_socket: bool = False,
    extra_config: str = "",
) -> Iterator[Clamd]:
    """clamd 1.4 on a free port with a two-signature EICAR database (no freshclam).

    local_socket: also listen on a Unix socket (`Clamd.socket_path`, mode 666).
    extra_config: more clamd.conf lines, e.g. "StreamMaxLength 1M\n".
    """
    require_root()
    clamd = require("/usr/sbin/clamd", "clamav-daemon")
    base = _private_dir(Path(tmp_dir), "clamd")
    _write_eicar_db(base / "db")
    (base / "tmp").mkdir()
    port = free_port()
    socket_path = base / "clamd.ctl" if local_socket else None
    local = f"LocalSocket {socket_path}\nLocalSocketMode 666\n" if socket_path else ""
    (base / "clamd.conf").write_text(
        f"""\
Foreground yes
DatabaseDirectory {base / "db"}
TCPSocket {port}
TCPAddr {HOST}
LogFile {base / "clamd.log"}
LogTime yes
PidFile {base / "clamd.pid"}
TemporaryDirectory {base / "tmp"}
User root
MaxThreads 4
{local}{extra_config}"""
    )
    daemon = Daemon("clamd", [clamd, "-c", str(base / "clamd.conf")], base / "clamd.out")
    server = Clamd(port=port, base=base, daemon=daemon, socket_path=socket_path)
    daemon.start()
    try:
        daemon.wait_ready(server.ping, start_timeout, extra_log=lambda: _read(base / "clamd.log"))
        yield server
    finally:
        daemon.stop()


@dataclass
class ClamavMilter(MilterEndpoint):
    """clamav-milter in front of `clamd`: socket specs, `on_infected`, `log()`."""

    clamd: Clamd | None = None
    on_infected: str = "Reject"
    base: Path = Path()
    daemon: Daemon | None = None

    def log(self) -> str:
        """Its output (in the foreground it copies its LogFile, clamav-milter.log, there too)."""
        return self.daemon.log() if self.daemon else _read(self.base / "clamav-milter.log")


@contextlib.contextmanager
def clamav_milter(
    tmp_dir: Path,
    *,
    on_infected: str = "Reject",
    clamd: Clamd | None = None,
    start_timeout: float = 30.0,
) -> Iterator[ClamavMilter]:
    """clamav-milter 1.4 (with its own clamd unless `clamd` is given).

    on_infected: Reject (550 5.7.1 at end of data), Quarantine (Postfix puts it on hold),
    Blackhole (accepted and dropped) or Accept. Clean mail gets X-Virus-Status: Clean.
    """
    require_root()
    milter_bin = require("/usr/sbin/clamav-milter", "clamav-milter")
    with contextlib.ExitStack() as stack:
        if clamd is None:
            clamd = stack.enter_context(clamd_server(tmp_dir))
        base = _private_dir(Path(tmp_dir), "clamav-milter")
        (base / "tmp").mkdir()
        milter = ClamavMilter(port=free_port(), clamd=clamd, on_infected=on_infected, base=base)
        (base / "clamav-milter.conf").write_text(
            f"""\
MilterSocket {milter.pymilter_socket}
Foreground yes
PidFile {base / "clamav-milter.pid"}
ClamdSocket tcp:{clamd.host}:{clamd.port}
OnClean Accept
OnInfected {on_infected}
OnFail Defer
AddHeader Replace
LogFile {base / "clamav-milter.log"}
LogTime yes
LogVerbose yes
LogInfected Full
LogClean Basic
TemporaryDirectory {base / "tmp"}
ReadTimeout 60
MaxFileSize 25M
"""
        )
        daemon = Daemon(
            "clamav-milter",
            [milter_bin, "-c", str(base / "clamav-milter.conf")],
            base / "milter.out",
            after_term=lambda: _port_open(milter.port),
        )
        milter.daemon = daemon
        daemon.start()
        stack.callback(daemon.stop)
        daemon.wait_ready(
            lambda: _port_open(milter.port),
            start_timeout,
            extra_log=lambda: _read(base / "clamav-milter.log"),
        )
        yield milter


# --------------------------------------------------------------------------------------
# spamd + spamass-milter
# --------------------------------------------------------------------------------------


@dataclass
class Spamd:
    """spamd 4.0 with the stock rules, no network tests: `port`, `log()`, `check()`."""

    port: int
    base: Path
    daemon: Daemon
    host: str = HOST

    @property
    def bayes_dir(self) -> Path:
        """Where the Bayes database lives (used only with `allow_tell=True`)."""
        return self.base / "home" / "bayes"

    def log(self) -> str:
        return _read(self.base / "spamd.log") + self.daemon.log()

    def ping(self) -> bool:
        return b"PONG" in _line_exchange(self.port, b"PING SPAMC/1.5\r\n\r\n", host=self.host)

    def check(self, message: bytes) -> str:
        """CHECK a message; spamd's reply ("SPAMD/1.1 0 EX_OK ... Spam: True ; 1000.0 / 5.0")."""
        request = (
            b"CHECK SPAMC/1.5\r\nContent-length: "
            + str(len(message)).encode()
            + b"\r\n\r\n"
            + message
        )
        return _line_exchange(self.port, request, host=self.host, timeout=60).decode(
            errors="replace"
        )


@contextlib.contextmanager
def spamd_server(
    tmp_dir: Path, *, start_timeout: float = 90.0, allow_tell: bool = False
) -> Iterator[Spamd]:
    """spamd on a free port: stock rules, Bayes off, no DNS/RBL, running as nobody.

    allow_tell: start with --allow-tell and Bayes on (its database in `Spamd.bayes_dir`,
    no auto-learning), so TELL requests can teach it.
    """
    require_root()
    spamd = require("/usr/sbin/spamd", "spamd")
    require("/usr/share/spamassassin", "spamassassin")
    base = _private_dir(Path(tmp_dir), "spamd")
    site, home = base / "site", base / "home"
    site.mkdir()
    home.mkdir()
    _chown(home, "nobody", "nogroup")
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, site / pre.name)
    bayes = "use_bayes 0\n"
    if allow_tell:
        bayes_dir = home / "bayes"
        bayes_dir.mkdir()
        _chown(bayes_dir, "nobody", "nogroup")
        bayes = f"use_bayes 1\nbayes_path {bayes_dir}/bayes\nbayes_file_mode 0770\n"
    rest = "bayes_auto_learn 0\nskip_rbl_checks 1\ndns_available no\n"
    (site / "local.cf").write_text("required_score 5.0\n" + bayes + rest)
    port = free_port()
    argv = [
        spamd, f"--listen={HOST}:{port}", f"--allowed-ips={HOST}",
        "--configpath=/usr/share/spamassassin", f"--siteconfigpath={site}",
        "--local", "--nouser-config", "--username=nobody", f"--helper-home-dir={home}",
        "--max-children=2", "--min-children=1", f"--pidfile={base / 'spamd.pid'}",
        f"--syslog={base / 'spamd.log'}",
    ]  # fmt: skip
    if allow_tell:
        # One child: two children learning in turn now and then see "nothing to do" for a
        # new message (Bayes database locking), which would make learning tests flaky.
        argv[argv.index("--max-children=2")] = "--max-children=1"
        argv.append("--allow-tell")
    daemon = Daemon("spamd", argv, base / "spamd.out", cwd=base)
    server = Spamd(port=port, base=base, daemon=daemon)
    daemon.start()
    try:
        daemon.wait_ready(server.ping, start_timeout, extra_log=lambda: _read(base / "spamd.log"))
        yield server
    finally:
        daemon.stop()


@dataclass
class SpamassMilter(MilterEndpoint):
    """spamass-milter in front of `spamd`: socket specs, `reject_score`, `log()` (stdout only)."""

    spamd: Spamd | None = None
    reject_score: int | None = 15
    daemon: Daemon | None = None

    def log(self) -> str:
        return self.daemon.log() if self.daemon else ""


@contextlib.contextmanager
def spamass_milter(
    tmp_dir: Path,
    *,
    reject_score: int | None = 15,
    spamd: Spamd | None = None,
    start_timeout: float = 20.0,
) -> Iterator[SpamassMilter]:
    """spamass-milter 0.4 (with its own spamd unless `spamd` is given).

    reject_score: messages scoring at least this are refused with 5.7.1 at end of data
    (None: never reject, only add X-Spam-* headers). GTUBE scores ~1000.
    """
    require_root()
    milter_bin = require("/usr/sbin/spamass-milter", "spamass-milter")
    require("/usr/bin/spamc", "spamc")
    with contextlib.ExitStack() as stack:
        if spamd is None:
            spamd = stack.enter_context(spamd_server(tmp_dir))
        base = _private_dir(Path(tmp_dir), "spamass-milter")
        milter = SpamassMilter(port=free_port(), spamd=spamd, reject_score=reject_score)
        argv = [milter_bin, "-p", milter.pymilter_socket, "-P", str(base / "spamass-milter.pid")]
        if reject_score is not None:
            argv += ["-r", str(reject_score)]
        argv += ["--", "-d", spamd.host, "-p", str(spamd.port)]
        daemon = Daemon(
            "spamass-milter",
            argv,
            base / "spamass-milter.log",
            cwd=base,
            after_term=lambda: _port_open(milter.port),
        )
        milter.daemon = daemon
        daemon.start()
        stack.callback(daemon.stop)
        daemon.wait_ready(lambda: _port_open(milter.port), start_timeout)
        yield milter


# --------------------------------------------------------------------------------------
# message helpers for tests
# --------------------------------------------------------------------------------------


def message(
    *,
    sender: str = f"alice@{DOMAIN}",
    recipient: str = f"bob@{DOMAIN}",
    subject: str = "peer test",
    body: str | bytes = "Hello from the peer tests.\r\n",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    lines = [
        f"From: {sender}",
        f"To: {recipient}",
        f"Subject: {subject}",
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}",
        f"Message-ID: <{time.time_ns()}.{os.getpid()}@{DOMAIN}>",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    head = "\r\n".join(lines).encode() + b"\r\n\r\n"
    if isinstance(body, str):
        body = body.encode()
    return head + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def eicar_message(**kwargs: object) -> bytes:
    """A MIME message with the EICAR test file as an attachment (base64)."""
    import base64

    boundary = "peer-test-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="eicar.com"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{base64.b64encode(EICAR).decode()}\r\n--{boundary}--\r\n"
    )
    headers = {
        "MIME-Version": "1.0",
        "Content-Type": f'multipart/mixed; boundary="{boundary}"',
    }
    return message(body=body, headers=headers, **kwargs)  # type: ignore[arg-type]


def header_values(data: bytes, name: str) -> list[str]:
    """Unfolded values of every `name:` header in a message's header section."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].decode(errors="replace")
    unfolded = re.sub(r"\r?\n[ \t]+", " ", head)
    prefix = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in unfolded.splitlines()
        if line.lower().startswith(prefix)
    ]


# --------------------------------------------------------------------------------------
# Dovecot LMTP
# --------------------------------------------------------------------------------------


@dataclass
class Dovecot:
    """Dovecot 2.3 serving LMTP only: `port`, `users`, `delivered(user)`, `log()`."""

    port: int
    base: Path
    users: tuple[str, ...]
    daemon: Daemon
    host: str = HOST

    def maildir(self, user: str) -> Path:
        return self.base / "mail" / user

    def delivered(self, user: str) -> list[bytes]:
        """The messages in `user`'s Maildir (new/ and cur/), oldest first."""
        paths = [
            path
            for sub in ("new", "cur")
            if (self.maildir(user) / sub).is_dir()
            for path in (self.maildir(user) / sub).iterdir()
        ]
        return [path.read_bytes() for path in sorted(paths, key=lambda p: p.stat().st_mtime)]

    def wait_delivered(self, user: str, count: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.delivered(user)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.delivered(user)

    def log(self) -> str:
        return _read(self.base / "dovecot.log") + self.daemon.log()


@contextlib.contextmanager
def dovecot_lmtp(
    tmp_dir: Path, users: Sequence[str] = ("bob", "carol"), *, start_timeout: float = 30.0
) -> Iterator[Dovecot]:
    """Dovecot's LMTP on a free loopback port, delivering to Maildirs under its base dir.

    The recipe of shared/PEERS.md ("Dovecot 2.3 LMTP"), with one change: the users come
    from a passwd-file (by local part), so that any other recipient is refused with 550
    at RCPT, as a real mailbox server does.
    """
    require_root()
    dovecot = require("/usr/sbin/dovecot", "dovecot-core")
    require("/usr/lib/dovecot/lmtp", "dovecot-lmtpd")
    base = _private_dir(Path(tmp_dir), "dovecot")
    for name in ("run", "state", "mail"):
        (base / name).mkdir()
    _chown(base / "mail", "nobody", "nogroup")
    (base / "users").write_text("".join(f"{user}::::::\n" for user in users))
    port = free_port()
    conf = base / "dovecot.conf"
    conf.write_text(
        f"""base_dir = {base}/run
state_dir = {base}/state
instance_name = mailgate-test-{port}
protocols = lmtp
listen = {HOST}
ssl = no
log_path = {base}/dovecot.log
mail_location = maildir:{base}/mail/%n
mail_uid = nobody
mail_gid = nogroup
first_valid_uid = 1
auth_username_format = %Ln
postmaster_address = postmaster@{DOMAIN}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = passwd-file
  args = {base}/users
  default_fields = uid=nobody gid=nogroup home={base}/mail/%n
}}
service lmtp {{
  inet_listener lmtp {{
    address = {HOST}
    port = {port}
  }}
}}
"""
    )
    daemon = Daemon("dovecot", [dovecot, "-c", str(conf), "-F"], base / "dovecot.out", cwd=base)
    server = Dovecot(port=port, base=base, users=tuple(users), daemon=daemon)
    daemon.start()
    try:
        daemon.wait_ready(
            lambda: _smtp_banner(port), start_timeout, extra_log=lambda: _read(base / "dovecot.log")
        )
        yield server
    finally:
        daemon.stop()


__all__ = [
    "DOMAIN",
    "EICAR",
    "GTUBE",
    "HOST",
    "SENDMAIL_HOSTNAME",
    "ClamavMilter",
    "Clamd",
    "Daemon",
    "Dovecot",
    "MilterEndpoint",
    "OpenDKIM",
    "PeerFailed",
    "PeerUnavailable",
    "Postfix",
    "PyMilter",
    "Sendmail",
    "SinkMessage",
    "SmtpSink",
    "SpamassMilter",
    "Spamd",
    "clamav_milter",
    "clamd_server",
    "dovecot_lmtp",
    "eicar_message",
    "free_port",
    "group_members",
    "header_milter",
    "header_values",
    "leftover_processes",
    "message",
    "opendkim_signer",
    "opendkim_verifier",
    "postfix_spec",
    "postfix_with_milter",
    "pymilter_spec",
    "require",
    "running_daemons",
    "sendmail_root",
    "sendmail_with_milter",
    "smtp_sink",
    "spamass_milter",
    "spamd_server",
    "started_groups",
    "stop_all",
]
