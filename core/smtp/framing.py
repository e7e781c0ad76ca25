"""Sans-I/O framing of the SMTP byte stream: command lines and the DATA body.

``LineBuffer`` splits the stream into command lines under a length limit; ``DataReader``
consumes a DATA body in bulk (no per-line Python loop on the hot path): it finds the
``CRLF.CRLF`` terminator, removes dot-stuffing, measures the longest line and notices
8-bit octets, and hands back whatever followed the terminator (pipelined commands).
Bytes in, results out; the session owns the socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TERMINATOR = b"\r\n.\r\n"


@dataclass(frozen=True, slots=True)
class TooLong:
    """A command line exceeded the limit; the whole line has been discarded."""

    length: int


class LineBuffer:
    """Accumulates received bytes and yields complete CRLF (or bare LF) terminated lines."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = 0

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def clear(self) -> None:
        """Drop everything buffered (after STARTTLS, plaintext must not be acted upon)."""
        self._buf.clear()
        self._discarding = 0

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` octets from the front (a BDAT chunk's data, not a line)."""
        data = bytes(self._buf[:limit])
        # CPython deletes a bytearray prefix by moving its start: what remains is not copied.
        del self._buf[:limit]
        return data

    def take_all(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def __len__(self) -> int:
        return len(self._buf)

    def next_line(self) -> bytes | TooLong | None:
        """The next line without its line ending, a TooLong marker, or None if incomplete."""
        newline = self._buf.find(b"\n")
        if newline < 0:
            if len(self._buf) > self.max_line:
                # Keep memory bounded: forget the overlong prefix, remember we are skipping.
                self._discarding += len(self._buf)
                self._buf.clear()
            return None
        length = newline + 1 + self._discarding
        line = bytes(self._buf[:newline])
        del self._buf[: newline + 1]
        if self._discarding or length > self.max_line:
            self._discarding = 0
            return TooLong(length)
        return line[:-1] if line.endswith(b"\r") else line


@dataclass(slots=True)
class DataResult:
    """A finished body. ``content`` is the reader's own buffer (a bytearray for DATA),
    handed over rather than copied; it is never written to again."""

    content: bytes | bytearray
    size: int
    size_exceeded: bool
    line_too_long: bool
    has_8bit: bool
    has_nul: bool


_LF_DOT = re.compile(rb"\n\.")
# Dots looked at one by one before the regex takes over: a body with few dots (base64, the
# bulk of big messages, has none) is searched with memchr alone, many times faster.
_DOT_PROBES = 8


def first_lf_dot(buf: bytes) -> int:
    """The index of the first LF followed by a dot in ``buf``, or -1: ``buf.find(b"\n.")``."""
    pos = buf.find(b".", 1)
    for _ in range(_DOT_PROBES):
        if pos < 0:
            return -1
        if buf[pos - 1] == 0x0A:
            return pos - 1
        pos = buf.find(b".", pos + 1)
    if pos < 0:
        return -1
    match = _LF_DOT.search(buf, pos - 1)
    return match.start() if match else -1


def has_long_line(data: bytes | bytearray, limit: int) -> bool:
    """Whether ``data`` holds a run of ``limit`` or more octets without a LF.

    The run includes a line's CR: with ``limit`` 1000, a line of 1000 octets counting its
    CRLF passes (RFC 5321's limit) and one of 1001 does not. A regex
    such as ``[^\n]{1000}`` would retry at every offset, some 40 times slower on a big
    message, and stall the event loop.

    From a line start, the window of ``limit`` octets must hold a LF, and every line that
    starts before the window's last LF fits in it; the next line starts after that LF. So
    each step is one ``rfind`` in C and skips nearly ``limit`` octets, with no copy and no
    object per line (splitting a 20 MB message makes some 250,000 of them).
    """
    start = 0
    end = len(data)
    while start + limit <= end:
        last = data.rfind(b"\n", start, start + limit)
        if last < 0:
            return True
        start = last + 1
    return False


class DataReader:
    """Incremental reader of one DATA body; feed chunks until ``done``."""

    def __init__(self, max_size: int, max_line: int) -> None:
        self.max_size = max_size
        self._max_line = max_line
        # The body grows in one buffer as lines arrive: a big buffer grows by remapping
        # pages, and the end of the message needs no join (a 20 MB copy, page faults and
        # all, on the event loop thread while every other session waits).
        self._body = bytearray()
        self._pending = b""
        self._size = 0
        self._size_exceeded = False
        self._line_too_long = False
        self._has_8bit = False
        self._has_nul = False
        self.done = False
        self._at_start = True

    def feed(self, data: bytes | bytearray) -> bytes:
        """Consume received bytes; returns what followed the terminator (once ``done``)."""
        if self.done:
            return bytes(data)
        buf = self._pending + data if self._pending else bytes(data)
        self._pending = b""
        if self._at_start and buf.startswith(b".\r\n"):
            self.done = True
            return buf[3:]
        # One scan finds both a stuffed dot and the terminator, whose LF-dot comes first:
        # without a LF-dot there is neither (a scan costs ~1 ms per MB, so it is done once).
        dot = first_lf_dot(buf)
        if dot >= 0:
            end = buf.find(_TERMINATOR, max(dot - 1, 0))
            if end >= 0:
                self._absorb(buf[: end + 2], stuffed=True)
                self.done = True
                return buf[end + len(_TERMINATOR) :]
        # Keep the last partial line (and anything that may start the terminator) pending;
        # absorb complete lines so memory use and line checks stay incremental.
        cut = buf.rfind(b"\n", 0, max(len(buf) - 4, 0))
        if cut >= 0:
            self._absorb(buf[: cut + 1], stuffed=0 <= dot < cut)
            buf = buf[cut + 1 :]
        if has_long_line(buf, self._max_line):
            self._line_too_long = True
            if len(buf) > self._max_line + 8:
                # An endless line: the message is refused anyway, so keep memory bounded.
                self._size += len(buf) - 4
                self._body = bytearray()
                buf = buf[-4:]
        if self._size + len(buf) > self.max_size:
            self._size_exceeded = True
        self._pending = buf
        return b""

    def _absorb(self, chunk: bytes, *, stuffed: bool) -> None:
        """Take complete lines: unstuff dots, check lines, count size.

        ``stuffed``: the chunk holds a LF followed by a dot (the caller has looked).
        """
        # Every absorbed chunk begins at a line start, so its first dot is stuffing too.
        if chunk.startswith(b"."):
            chunk = chunk[1:]
        self._at_start = False
        if stuffed:
            chunk = chunk.replace(b"\n.", b"\n")
        if not self._line_too_long and has_long_line(chunk, self._max_line):
            self._line_too_long = True
        if not self._has_8bit and not chunk.isascii():
            self._has_8bit = True
        if not self._has_nul and b"\x00" in chunk:
            self._has_nul = True
        self._size += len(chunk)
        if self._size > self.max_size:
            self._size_exceeded = True
            self._body = bytearray()
        elif not self._size_exceeded and not self._line_too_long:
            self._body += chunk

    def result(self) -> DataResult:
        refused = self._size_exceeded or self._line_too_long
        content = bytearray() if refused else self._body
        self._body = bytearray()
        return DataResult(
            content=content,
            size=self._size,
            size_exceeded=self._size_exceeded,
            line_too_long=self._line_too_long,
            has_8bit=self._has_8bit,
            has_nul=self._has_nul,
        )
