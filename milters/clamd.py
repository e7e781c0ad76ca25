"""A small clamd client: INSTREAM over TCP or a Unix socket, within one deadline.

clamd's protocol (clamd(8)): the command ``zINSTREAM\\0``, then the data in chunks, each
prefixed with its length as a 4-byte big-endian number, then a zero-length chunk; clamd
answers one NUL-terminated line: ``stream: OK``, ``stream: NAME FOUND`` or ``... ERROR``
(for example ``INSTREAM size limit exceeded. ERROR`` past its StreamMaxLength, after which
it closes the connection).

The one guarantee that matters to a mail filter: :func:`instream` returns or raises within
``timeout`` seconds *in total* (connecting, sending and waiting for the answer together),
whatever clamd does: refuse, stall, dribble, answer garbage or close early. Every failure
is a :class:`ClamdError`; an answer that is not one of clamd's is never taken as "clean".
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from mailgate.policies.clamav import ClamdAddress

CHUNK_SIZE = 64 * 1024
# clamd's answers are one short line; a longer one is not clamd talking.
MAX_REPLY = 4096


class ClamdError(Exception):
    """clamd could not be asked, or did not answer as clamd answers."""


class ClamdTimeout(ClamdError):
    """The scan did not finish within its deadline."""


@dataclass(frozen=True, slots=True)
class ScanReply:
    """clamd's verdict on one stream: ``virus`` is None for a clean stream."""

    virus: str | None
    raw: str


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def left(self, what: str) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise ClamdTimeout(f"no answer from clamd within {self.timeout:g}s ({what})")
        return remaining


def instream(address: ClamdAddress, data: bytes, *, timeout: float) -> ScanReply:
    """Scan ``data`` with clamd at ``address``; raise ClamdError on any failure."""
    deadline = _Deadline(timeout)
    sock = _connect(address, deadline)
    try:
        try:
            _send_stream(sock, data, deadline)
        except ClamdTimeout:
            raise
        except OSError as exc:
            # clamd closes early after "size limit exceeded"; its answer says why.
            early = _read_reply(sock, deadline, quiet=True)
            if early:
                return parse_reply(early)
            raise ClamdError(f"sending to clamd failed: {_os_text(exc)}") from None
        return parse_reply(_read_reply(sock, deadline))
    finally:
        sock.close()


def ping(address: ClamdAddress, *, timeout: float) -> bool:
    """True if clamd answers PING with PONG in time."""
    deadline = _Deadline(timeout)
    try:
        sock = _connect(address, deadline)
    except ClamdError:
        return False
    try:
        sock.settimeout(deadline.left("sending"))
        sock.sendall(b"zPING\0")
        return _read_reply(sock, deadline) == "PONG"
    except (ClamdError, OSError):
        return False
    finally:
        sock.close()


def parse_reply(reply: str) -> ScanReply:
    """clamd's answer to INSTREAM as a ScanReply; anything else raises ClamdError."""
    text = reply.strip()
    if text.endswith(" ERROR"):
        raise ClamdError(f"clamd: {_cut(text)}")
    name, sep, result = text.partition(": ")
    if not sep or not name or "\n" in text:
        raise ClamdError(f"unexpected answer from clamd: {_cut(text)!r}")
    if result == "OK":
        return ScanReply(None, text)
    if result.endswith(" FOUND") and result[:-6].strip():
        return ScanReply(result[:-6].strip(), text)
    raise ClamdError(f"unexpected answer from clamd: {_cut(text)!r}")


def _connect(address: ClamdAddress, deadline: _Deadline) -> socket.socket:
    where = str(address)
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(deadline.left(f"connecting to {where}"))
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection(
            (address.host, address.port), timeout=deadline.left(f"connecting to {where}")
        )
    except TimeoutError:
        raise ClamdTimeout(
            f"no answer from clamd within {deadline.timeout:g}s (connecting to {where})"
        ) from None
    except OSError as exc:
        raise ClamdError(f"cannot connect to clamd at {where}: {_os_text(exc)}") from None


def _send_stream(sock: socket.socket, data: bytes, deadline: _Deadline) -> None:
    view = memoryview(data)
    # Since Python 3.5 a socket timeout bounds the whole sendall(), not each send().
    sock.settimeout(deadline.left("sending"))
    sock.sendall(b"zINSTREAM\0")
    for start in range(0, len(view), CHUNK_SIZE):
        chunk = view[start : start + CHUNK_SIZE]
        sock.settimeout(deadline.left("sending"))
        try:
            sock.sendall(len(chunk).to_bytes(4, "big"))
            sock.sendall(chunk)
        except TimeoutError:
            raise ClamdTimeout(
                f"no answer from clamd within {deadline.timeout:g}s (sending)"
            ) from None
    sock.settimeout(deadline.left("sending"))
    try:
        sock.sendall(b"\0\0\0\0")
    except TimeoutError:
        raise ClamdTimeout(f"no answer from clamd within {deadline.timeout:g}s (sending)") from None


def _read_reply(sock: socket.socket, deadline: _Deadline, *, quiet: bool = False) -> str:
    """One NUL-terminated answer (or what came before clamd closed the connection)."""
    reply = b""
    while not reply.endswith(b"\0"):
        try:
            sock.settimeout(deadline.left("waiting for the answer"))
            chunk = sock.recv(MAX_REPLY)
        except ClamdTimeout:
            if quiet:
                return ""
            raise
        except TimeoutError:
            if quiet:
                return ""
            raise ClamdTimeout(
                f"no answer from clamd within {deadline.timeout:g}s (waiting for the answer)"
            ) from None
        except OSError as exc:
            if quiet:
                return ""
            raise ClamdError(f"reading clamd's answer failed: {_os_text(exc)}") from None
        if not chunk:
            if not reply and not quiet:
                raise ClamdError("clamd closed the connection without an answer")
            break
        reply += chunk
        if len(reply) > MAX_REPLY:
            raise ClamdError(f"unexpected answer from clamd: {_cut(_text(reply))!r}")
    return _text(reply.rstrip(b"\0"))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
