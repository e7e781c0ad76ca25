"""A small client of SpamAssassin's spamd, speaking the SPAMD protocol (SPAMC/1.5).

Owns the wire: one request per connection, as spamc does. A request is a line
``VERB SPAMC/1.5``, header lines (``Content-length``, ``User``, and for TELL
``Message-class`` and ``Set``/``Remove``), an empty line and the message. spamd answers
``SPAMD/1.x CODE MESSAGE``, header lines (``Spam: True ; 1000.0 / 5.0``, ``Content-length``,
``DidSet``/``DidRemove``), an empty line and a body (the symbols or the report), then
closes the connection.

Verbs used: PING, CHECK (the verdict only), SYMBOLS (plus the names of the rules that
hit), REPORT (plus SpamAssassin's report) and TELL (teach Bayes; spamd must run with
``--allow-tell``). The client is synchronous and thread-safe (it keeps no connection):
the milter calls it from libmilter's connection threads, `mailgate spam learn` from the
command line. Every failure (no connection, a timeout, spamd's error codes, a reply that
is not the protocol) raises :class:`SpamdError`, and no request outlives its timeout.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

PROTOCOL = "SPAMC/1.5"
DEFAULT_PORT = 783
# spamd's replies are small (a report is a few KB); anything far larger is not spamd.
MAX_REPLY = 1024 * 1024

_STATUS_RE = re.compile(rb"^SPAMD/(\d+\.\d+) +(\d+) +(.*)$")
# "True ; 1000.0 / 5.0" (spamd writes "Yes"/"No" in older versions).
_SPAM_RE = re.compile(
    r"^\s*(true|false|yes|no)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.IGNORECASE
)
# One line of a report's table: " 2.7 MISSING_DATE  Missing Date: header".
_REPORT_LINE_RE = re.compile(r"^\s*-?\d+(?:\.\d+)?\s+([A-Z0-9_]+)\b")
# spamd's exit codes in error replies (sysexits.h), named as spamd names them.
_EX_NAMES = {
    64: "EX_USAGE",
    65: "EX_DATAERR",
    66: "EX_NOINPUT",
    67: "EX_NOUSER",
    68: "EX_NOHOST",
    69: "EX_UNAVAILABLE",
    70: "EX_SOFTWARE",
    71: "EX_OSERR",
    72: "EX_OSFILE",
    73: "EX_CANTCREAT",
    74: "EX_IOERR",
    75: "EX_TEMPFAIL",
    76: "EX_PROTOCOL",
    77: "EX_NOPERM",
    78: "EX_CONFIG",
}

Request = Literal["check", "symbols", "report"]
LearnClass = Literal["spam", "ham"]


class SpamdError(Exception):
    """spamd could not be asked, or did not answer with a result (the one error type)."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where spamd listens: TCP ``host``/``port``, or a Unix socket ``path``."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``HOST``, ``HOST:PORT``, ``[v6]:PORT``, ``unix:/path`` or ``/path`` → an Address."""
    text = text.strip()
    if not text:
        raise ValueError("an empty spamd address")
    if text.startswith("unix:") or text.startswith("/"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: a Unix socket needs an absolute path")
        return Address(path=path)
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{text!r}: not a host name or address")
    return Address(host=host, port=port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: the port must be a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply of spamd: the status line, the header fields and the body."""

    version: str
    code: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What CHECK, SYMBOLS or REPORT found out about a message."""

    spam: bool  # spamd's verdict: score >= required
    score: float
    required: float
    symbols: tuple[str, ...] = ()  # SYMBOLS (and REPORT, from its table)
    report: str | None = None  # REPORT only


@dataclass(frozen=True, slots=True)
class TellResult:
    """What TELL changed: the databases spamd says it set or removed the message in."""

    did_set: tuple[str, ...] = ()
    did_remove: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """False when spamd already knew the message that way (nothing to do)."""
        return bool(self.did_set or self.did_remove)


class SpamdClient:
    """Asks one spamd. ``timeout`` bounds a whole request: connect, send, and the reply."""

    def __init__(
        self,
        address: Address | str = Address(),
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        user: str | None = None,
    ) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        if user is not None and not _token_ok(user):
            raise ValueError(f"user {user!r}: no spaces or control characters")
        self.user = user or None

    # -- the verbs ---------------------------------------------------------------------

    def ping(self) -> bool:
        """True when spamd answers PONG (raises SpamdError when it cannot be reached)."""
        reply = self.request("PING")
        return reply.message.strip().upper() == "PONG"

    def check(self, message: bytes, request: Request = "symbols") -> CheckResult:
        """Score ``message`` with CHECK, SYMBOLS (default) or REPORT."""
        reply = self.request(request.upper(), message)
        return _check_result(reply, request)

    def tell(self, message: bytes, learn: LearnClass | None, *, forget: bool = False) -> TellResult:
        """Teach the Bayes database ``message`` as ``learn`` (spam/ham), or forget it.

        ``forget=True`` removes what was learned from the message (``learn`` may then be
        None). spamd refuses TELL unless it runs with ``--allow-tell``.
        """
        headers: list[tuple[str, str]] = []
        if learn is not None and not forget:
            headers.append(("Message-class", learn))
            headers.append(("Set", "local"))
        elif forget:
            headers.append(("Remove", "local"))
        else:
            raise ValueError("tell: say spam or ham, or forget")
        reply = self.request("TELL", message, headers)
        return TellResult(
            did_set=_list(reply.header("DidSet")), did_remove=_list(reply.header("DidRemove"))
        )

    # -- one exchange ------------------------------------------------------------------

    def request(
        self,
        verb: str,
        message: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        """Send one request; return spamd's reply (code 0), else raise SpamdError."""
        lines = [f"{verb} {PROTOCOL}"]
        if message is not None:
            lines.append(f"Content-length: {len(message)}")
        if self.user and verb != "PING":
            lines.append(f"User: {self.user}")
        lines += [f"{name}: {value}" for name, value in headers]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (message or b"")
        raw = self._exchange(verb, data)
        reply = parse_reply(raw)
        if reply.code != 0:
            name = _EX_NAMES.get(reply.code, "error")
            raise SpamdError(
                f"spamd at {self.address} refused {verb}: {reply.code} {name} {reply.message}"
            )
        return reply

    def _exchange(self, verb: str, data: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        where = str(self.address)
        try:
            sock = self._connect()
        except TimeoutError:
            raise SpamdError(f"spamd at {where}: no connection within the timeout") from None
        except OSError as exc:
            raise SpamdError(f"spamd at {where}: cannot connect: {_os_text(exc)}") from None
        try:
            with sock:
                view = memoryview(data)
                while view:
                    sock.settimeout(_remaining(deadline))
                    sent = sock.send(view[:65536])
                    view = view[sent:]
                # spamc half-closes too: spamd then knows no more is coming.
                sock.shutdown(socket.SHUT_WR)
                chunks: list[bytes] = []
                total = 0
                while True:
                    sock.settimeout(_remaining(deadline))
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > MAX_REPLY:
                        raise SpamdError(f"spamd at {where}: reply to {verb} too long")
                return b"".join(chunks)
        except (TimeoutError, _Expired):
            raise SpamdError(
                f"spamd at {where}: no answer to {verb} within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise SpamdError(f"spamd at {where}: {verb} failed: {_os_text(exc)}") from None

    def _connect(self) -> socket.socket:
        if self.address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(self.address.path)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection(
            (self.address.host, self.address.port), timeout=self.connect_timeout
        )


class _Expired(Exception):
    """The request's deadline passed between two socket operations."""


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Expired
    return left


# -- parsing (pure: bytes in, values out) -----------------------------------------------


def parse_reply(raw: bytes) -> Reply:
    """Parse a whole reply of spamd; raise SpamdError when it is not the protocol."""
    if not raw:
        raise SpamdError("spamd closed the connection without a reply")
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        # Error replies and PONG are a status line alone.
        head, body = raw.rstrip(b"\r\n"), b""
    status, *header_lines = head.split(b"\r\n")
    match = _STATUS_RE.match(status)
    if match is None:
        raise SpamdError(f"not a spamd reply: {_shown(status)}")
    version, code, message = match.groups()
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise SpamdError(f"bad header line in spamd's reply: {_shown(line)}")
        headers[name.strip().decode("ascii", "replace").lower()] = value.strip().decode(
            "utf-8", "replace"
        )
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise SpamdError(f"bad Content-length in spamd's reply: {length!r}")
        if len(body) < int(length):
            raise SpamdError(
                f"spamd's reply was cut short: {len(body)} of {length} bytes of its body"
            )
        body = body[: int(length)]
    return Reply(
        version=version.decode(),
        code=int(code),
        message=message.decode("utf-8", "replace").strip(),
        headers=headers,
        body=body,
    )


def parse_spam_header(value: str) -> tuple[bool, float, float]:
    """``True ; 1000.0 / 5.0`` → (True, 1000.0, 5.0); raise SpamdError otherwise."""
    match = _SPAM_RE.match(value)
    if match is None:
        raise SpamdError(f"bad Spam header in spamd's reply: {value!r}")
    verdict, score, required = match.groups()
    return verdict.lower() in ("true", "yes"), float(score), float(required)


def report_symbols(report: str) -> tuple[str, ...]:
    """The rule names of a REPORT's table (" pts rule name description" and below)."""
    symbols: list[str] = []
    in_table = False
    for line in report.splitlines():
        if line.startswith("----"):
            in_table = True
            continue
        if in_table:
            match = _REPORT_LINE_RE.match(line)
            if match:
                symbols.append(match.group(1))
    return tuple(dict.fromkeys(symbols))


def _check_result(reply: Reply, request: Request) -> CheckResult:
    spam_header = reply.header("Spam")
    if spam_header is None:
        raise SpamdError(f"spamd's reply to {request.upper()} has no Spam header")
    spam, score, required = parse_spam_header(spam_header)
    text = reply.body.decode("utf-8", "replace")
    if request == "symbols":
        symbols = tuple(s.strip() for s in text.strip().split(",") if s.strip())
        return CheckResult(spam, score, required, symbols)
    if request == "report":
        return CheckResult(spam, score, required, report_symbols(text), text)
    return CheckResult(spam, score, required)


def _list(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _token_ok(value: str) -> bool:
    return bool(value) and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value)


def _shown(data: bytes) -> str:
    text = data[:80].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(data) > 80 else ""))


def _os_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
