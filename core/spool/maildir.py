"""Final delivery into Maildir mailboxes under ``root/<domain>/<localpart>/``.

Each delivery follows the Maildir protocol: a unique name, the file written in ``tmp/``,
fsync'd, renamed into ``new/``, and ``new/`` fsync'd, so a mailbox never shows a partial
message and a delivered one survives a crash. The ``new/`` fsyncs of concurrent deliveries
into one mailbox are shared by group commit: ``deliver`` returns only after an fsync of
``new/`` that *started* after its rename has finished, and one such fsync covers every
rename made before it began. Names are
``<sec>.M<usec>P<pid>Q<counter>.<host>,S=<size>`` (the ``,S=`` size is what Dovecot
reads to skip a stat).

The stored message gets ``Return-Path:`` and ``Delivered-To:`` prepended, as final
delivery does (RFC 5321 section 4.4), and Unix line ends like Postfix's local delivery
and Dovecot write; a BINARYMIME message is stored byte for byte instead.

Address parts become path components only through ``mailbox_component``, which
%-encodes everything outside a conservative set and any leading dot, so no address can
name a path outside the root.

``maildir_usage`` measures a mailbox for quotas: the messages in ``new/`` and ``cur/`` of
the Maildir and of its Maildir++ folders (``.Name/``), each counted by the ``,S=`` size
in its name (written here and by Dovecot) or, without one, by ``stat``.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mailgate.core.errors import DeliveryError
from mailgate.core.spool.dirsync import DirSync, fsync_dir

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+=-")
_MAX_COMPONENT = 255
_DIR_MODE = 0o700
_FILE_MODE = 0o600
# Errors that retrying cannot fix: the address itself cannot become a file name.
_PERMANENT_ERRNOS = {errno.ENAMETOOLONG}


def mailbox_component(text: str) -> str:
    """``text`` as one safe path component: %XX for unsafe bytes and a leading dot.

    The encoding is reversible ("%" itself is encoded), so distinct addresses never share
    a mailbox.
    """
    out = []
    for index, ch in enumerate(text):
        if ch in _SAFE and not (index == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{byte:02X}" for byte in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def mailbox_path(root: Path, address: str) -> Path:
    """The Maildir of ``address`` under ``root``; DeliveryError (permanent) if it is no
    address. The one place that maps addresses to mailboxes (delivery, quotas)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise DeliveryError(f"invalid mailbox address {address!r}", permanent=True)
    parts = (mailbox_component(domain.lower()), mailbox_component(local))
    if any(len(part) > _MAX_COMPONENT for part in parts):
        raise DeliveryError(f"mailbox address too long: {address!r}", permanent=True)
    return Path(root).joinpath(*parts)


# The size a Maildir++ name carries: ",S=<bytes>" before the ":2,flags" info part.
_SIZE_IN_NAME = re.compile(r",S=(\d+)")


@dataclass(frozen=True, slots=True)
class MaildirUsage:
    """What a mailbox holds: bytes and messages."""

    bytes: int = 0
    messages: int = 0


def maildir_usage(mailbox: Path) -> MaildirUsage:
    """The messages of ``mailbox`` and its Maildir++ folders; a missing mailbox holds none.

    Raises OSError when a directory that exists cannot be read (permissions, I/O).
    Files that vanish while counting (moved or expunged meanwhile) are skipped.
    """
    total = count = 0
    folders = [mailbox]
    try:
        with os.scandir(mailbox) as entries:
            folders += [
                Path(entry.path)
                for entry in entries
                if entry.name.startswith(".")
                and entry.name not in (".", "..")
                and entry.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return MaildirUsage()
    for folder in folders:
        for sub in ("new", "cur"):
            try:
                with os.scandir(folder / sub) as entries:
                    for entry in entries:
                        if entry.name.startswith("."):
                            continue
                        size = _size_of(entry)
                        if size is not None:
                            total += size
                            count += 1
            except FileNotFoundError:
                continue
    return MaildirUsage(total, count)


def _size_of(entry: os.DirEntry[str]) -> int | None:
    match = _SIZE_IN_NAME.search(entry.name.partition(":")[0])
    if match:
        return int(match.group(1))
    try:
        if not entry.is_file(follow_symlinks=False):
            return None
        return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return None


def _host_component(hostname: str) -> str:
    # The Maildir specification's escapes for the two characters a name must not hold.
    return hostname.replace("/", "\\057").replace(":", "\\072")


def _header_value(text: str) -> str:
    # Envelope addresses come from SMTP and cannot hold line ends; never let one slip
    # into the header block anyway.
    return text.replace("\r", "").replace("\n", "")


class MaildirStore:
    """Mailboxes under ``root``; ``hostname`` goes into the unique file names."""

    def __init__(self, root: Path, hostname: str) -> None:
        self.root = Path(root)
        self.hostname = hostname
        self._host = _host_component(hostname)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._ready: set[Path] = set()
        self._syncs: dict[Path, DirSync] = {}

    def mailbox_path(self, address: str) -> Path:
        """The Maildir of ``address``; DeliveryError (permanent) if it is no address."""
        return mailbox_path(self.root, address)

    def deliver(
        self, address: str, content: bytes, *, return_path: str, binary: bool = False
    ) -> Path:
        """Deliver one copy to ``address``'s Maildir; the path of the new file.

        Raises DeliveryError: permanent for an address that cannot be a mailbox,
        temporary for file system errors (a full disk defers the mail, never loses it).
        """
        mailbox = self.mailbox_path(address)
        eol = b"\r\n" if binary else b"\n"
        headers = (
            b"Return-Path: <"
            + _header_value(return_path).encode("utf-8", "surrogateescape")
            + b">"
            + eol
            + b"Delivered-To: "
            + _header_value(address).encode("utf-8", "surrogateescape")
            + eol
        )
        # Small bodies are converted in one piece; big ones are written slice by slice.
        small = binary or len(content) <= _SLICE
        body = content if binary else content.replace(b"\r\n", b"\n") if small else b""
        size = len(headers) + (len(body) if small else _lf_size(content))
        tmp_path: Path | None = None
        try:
            tmp_path, fd = self._create_tmp(mailbox, size)
            final = mailbox / "new" / tmp_path.name
            try:
                if small:
                    _write_all(fd, (headers, body))
                else:
                    _write_lf(fd, headers, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, final)
            tmp_path = None
            self._dir_sync(mailbox / "new").sync()
        except OSError as exc:
            if tmp_path is not None:
                _unlink_quietly(tmp_path)
            raise DeliveryError(
                f"cannot write to {mailbox}: {exc.strerror or exc}",
                permanent=exc.errno in _PERMANENT_ERRNOS,
            ) from exc
        return final

    def _dir_sync(self, directory: Path) -> DirSync:
        with self._lock:
            sync = self._syncs.get(directory)
            if sync is None:
                sync = self._syncs[directory] = DirSync(directory)
            return sync

    def _create_tmp(self, mailbox: Path, size: int) -> tuple[Path, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._prepare(mailbox)
        path = mailbox / "tmp" / self._unique_name(size)
        try:
            return path, os.open(path, flags, _FILE_MODE)
        except FileNotFoundError:
            # The mailbox was removed behind our back since we created it: make it again.
            with self._lock:
                self._ready.discard(mailbox)
            self._prepare(mailbox)
            return path, os.open(path, flags, _FILE_MODE)

    def _unique_name(self, size: int) -> str:
        now = time.time_ns() // 1000
        seconds, micros = divmod(now, 1_000_000)
        with self._lock:
            counter = next(self._counter)
        return f"{seconds}.M{micros}P{os.getpid()}Q{counter}.{self._host},S={size}"

    def _prepare(self, mailbox: Path) -> None:
        """Create the Maildir on first use, every new directory entry made durable."""
        if mailbox in self._ready:
            return
        if not self.root.is_dir():
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            fsync_dir(self.root.parent)
        for path in (mailbox.parent, mailbox, mailbox / "tmp", mailbox / "new", mailbox / "cur"):
            _make_dir(path)
        with self._lock:
            self._ready.add(mailbox)


def _make_dir(path: Path) -> None:
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    # The new name must survive a crash along with the mail about to be put inside it.
    fsync_dir(path.parent)


# Line-end conversion works on slices of this size, and for a big message one thread at
# a time: each slice's replace holds the GIL only briefly, and the write after it lets
# the event loop thread run. Ten big messages converted at once would otherwise keep the
# SMTP sessions waiting for the GIL for a good part of a second.
_SLICE = 256 * 1024
_BIG_CONVERSION = threading.Lock()


def _slices(content: bytes) -> list[tuple[int, int]]:
    """Bounds of slices of about _SLICE octets, none splitting a CRLF."""
    bounds = []
    start = 0
    while start < len(content):
        end = min(start + _SLICE, len(content))
        if end < len(content) and content[end - 1] == 0x0D:
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


def _lf_size(content: bytes) -> int:
    """The size of ``content`` once every CRLF is a LF (counted slice by slice)."""
    return len(content) - sum(content.count(b"\r\n", a, b) for a, b in _slices(content))


def _write_lf(fd: int, headers: bytes, content: bytes) -> None:
    """Write ``headers``, then ``content`` with CRLF turned into LF, slice by slice."""
    _write_all(fd, (headers,))
    with _BIG_CONVERSION:
        for start, end in _slices(content):
            _write_all(fd, (content[start:end].replace(b"\r\n", b"\n"),))


def _write_all(fd: int, parts: tuple[bytes, ...]) -> None:
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.writev(fd, views)
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        return
