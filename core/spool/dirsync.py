"""Directory fsync, and its group commit for callers in threads.

A new file's name is durable only once its directory is fsync'd. Callers that rename or
link into one directory at about the same time share one such fsync: the spool's
acceptance threads (incoming/ and hold/) and local delivery's (each Maildir's new/).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Round:
    """One directory fsync: the tickets it covers, and how it ended."""

    __slots__ = ("covers", "done", "error")

    def __init__(self, covers: int) -> None:
        self.covers = covers
        self.done = threading.Event()
        self.error: OSError | None = None


class DirSync:
    """Group commit of one directory's fsync, for callers in threads.

    A caller takes a ticket after its rename and returns once an fsync that started after
    the ticket was taken has finished: that fsync covers the rename. While one fsync runs,
    later callers wait and the next fsync, run by one of them, covers them all. A failed
    fsync fails every caller it covered (their renames are not known to be durable).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._requested = 0
        self._current: _Round | None = None

    def sync(self) -> None:
        with self._lock:
            self._requested += 1
            ticket = self._requested
        while True:
            with self._lock:
                current = self._current
                leader = current is None
                if current is None:
                    current = self._current = _Round(self._requested)
            if leader:
                try:
                    fsync_dir(self._path)
                except OSError as exc:
                    current.error = exc
                finally:
                    with self._lock:
                        self._current = None
                    current.done.set()
            else:
                current.done.wait()
            if current.covers >= ticket:
                error = current.error
                if error is not None:
                    # A copy for each waiter: one exception object raised in many threads
                    # would share (and garble) its traceback.
                    raise OSError(error.errno, error.strerror, str(self._path)) from error
                return
            # That fsync began before our ticket was taken; ours is a later one.
