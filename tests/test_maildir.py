"""Maildir delivery: layout, names, headers, line ends, unsafe addresses, fsync, full disks."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

from mailgate.core.errors import DeliveryError
from mailgate.core.spool.maildir import MaildirStore, mailbox_component

MESSAGE = b"From: alice@example.org\r\nSubject: hi\r\n\r\nline one\r\nline two \xe9\r\n"
NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.mx\.example\.org,S=(\d+)$")


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "mail", "mx.example.org")


def test_delivery_creates_maildir_and_names_file_per_spec(store: MaildirStore) -> None:
    path = store.deliver("bob@Example.ORG", MESSAGE, return_path="alice@example.org")
    mailbox = store.root / "example.org" / "bob"
    assert path.parent == mailbox / "new"
    for sub in ("cur", "new", "tmp"):
        assert stat.S_IMODE((mailbox / sub).stat().st_mode) == 0o700
    assert os.listdir(mailbox / "tmp") == []
    match = NAME_RE.match(path.name)
    assert match, path.name
    assert int(match.group(3)) == os.getpid()
    assert int(match.group(5)) == path.stat().st_size
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_headers_prepended_and_line_ends_made_unix(store: MaildirStore) -> None:
    path = store.deliver("bob@example.org", MESSAGE, return_path="alice@example.org")
    assert path.read_bytes() == (
        b"Return-Path: <alice@example.org>\nDelivered-To: bob@example.org\n"
        b"From: alice@example.org\nSubject: hi\n\nline one\nline two \xe9\n"
    )


def test_null_sender_gets_empty_return_path(store: MaildirStore) -> None:
    path = store.deliver("bob@example.org", MESSAGE, return_path="")
    assert path.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: bob@example.org\n")


def test_header_values_cannot_inject_lines(store: MaildirStore) -> None:
    path = store.deliver("bob@example.org", MESSAGE, return_path="a@b\r\nBcc: evil@x")
    assert path.read_bytes().startswith(b"Return-Path: <a@bBcc: evil@x>\nDelivered-To:")


def test_binary_message_is_stored_byte_for_byte(store: MaildirStore) -> None:
    body = b"Content-Type: application/octet-stream\r\n\r\n" + bytes(range(256)) * 4
    path = store.deliver("bob@example.org", body, return_path="a@example.org", binary=True)
    assert path.read_bytes() == (
        b"Return-Path: <a@example.org>\r\nDelivered-To: bob@example.org\r\n" + body
    )


def test_many_deliveries_get_unique_names(store: MaildirStore) -> None:
    paths = {store.deliver("bob@example.org", MESSAGE, return_path="a@b") for _ in range(200)}
    assert len(paths) == 200
    assert len(os.listdir(store.root / "example.org" / "bob" / "new")) == 200


@pytest.mark.parametrize(
    "address",
    [
        "../../../etc/passwd@example.org",
        "a/b@example.org",
        ".hidden@example.org",
        "..@example.org",
        "nul\0byte@example.org",
        '"quoted local"@example.org',
        "user@../../escape",
        "j\u00f6rg@example.org",
    ],
)
def test_unsafe_addresses_stay_inside_the_root(store: MaildirStore, address: str) -> None:
    path = store.deliver(address, MESSAGE, return_path="a@b")
    root = store.root.resolve()
    assert path.resolve().is_relative_to(root)
    domain_dir, local_dir = path.parent.parent.relative_to(store.root).parts
    for part in (domain_dir, local_dir):
        assert not part.startswith(".") and "/" not in part and "\0" not in part


def test_component_encoding_is_reversible_so_addresses_never_share_a_mailbox() -> None:
    names = ["a/b", "a%2Fb", ".x", "%2Ex", "a b", "a+b", "A"]
    encoded = [mailbox_component(name) for name in names]
    assert len(set(encoded)) == len(names)
    assert mailbox_component("bob.smith+tag") == "bob.smith+tag"
    assert mailbox_component(".x") == "%2Ex"


def test_invalid_or_overlong_address_is_permanent(store: MaildirStore) -> None:
    with pytest.raises(DeliveryError) as caught:
        store.deliver("no-at-sign", MESSAGE, return_path="a@b")
    assert caught.value.permanent
    with pytest.raises(DeliveryError) as caught:
        store.deliver("x" * 300 + "@example.org", MESSAGE, return_path="a@b")
    assert caught.value.permanent


def test_full_disk_is_a_temporary_failure_and_leaves_no_file(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.deliver("bob@example.org", MESSAGE, return_path="a@b")  # the mailbox exists

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(DeliveryError, match="No space left") as caught:
        store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    assert not caught.value.permanent
    mailbox = store.root / "example.org" / "bob"
    assert os.listdir(mailbox / "tmp") == []
    assert len(os.listdir(mailbox / "new")) == 1


@pytest.mark.parametrize("shift", [240, 241, 242])
def test_big_message_is_converted_slice_by_slice_without_splitting_crlf(
    store: MaildirStore, shift: int
) -> None:
    # The first 256 KiB slice ends just after a LF, between CR and LF, or just before a
    # CR (shift 240, 241, 242); a bare CR and a bare LF come through unchanged.
    line = b"x" * 1021 + b"\r\n"
    body = b"a" * shift + line * 700 + b"bare\rcr and bare\nlf\r\n" + line * 300
    message = b"Subject: big\r\n\r\n" + body
    path = store.deliver("bob@example.org", message, return_path="alice@example.org")
    written = path.read_bytes()
    prefix = b"Return-Path: <alice@example.org>\nDelivered-To: bob@example.org\n"
    assert written == prefix + message.replace(b"\r\n", b"\n")
    match = NAME_RE.match(path.name)
    assert match, path.name
    assert int(match.group(5)) == len(written)


def test_file_and_new_directory_are_fsynced(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    # The file was fsync'd under its tmp/ name, then new/ after the rename.
    assert synced == [str(path.parent.parent / "tmp" / path.name), str(path.parent)]


def test_first_delivery_makes_new_directories_durable(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    mailbox = str(store.root / "example.org" / "bob")
    assert str(store.root / "example.org") in synced  # holds the new mailbox's name
    assert mailbox in synced  # holds cur/ new/ tmp/


def test_mailbox_removed_behind_our_back_is_recreated(store: MaildirStore) -> None:
    store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    mailbox = store.root / "example.org" / "bob"
    for sub in ("cur", "new", "tmp"):
        for name in os.listdir(mailbox / sub):
            os.unlink(mailbox / sub / name)
        os.rmdir(mailbox / sub)
    os.rmdir(mailbox)
    path = store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    assert path.exists()


def test_hostname_separators_are_escaped(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path, "odd/host:name")
    path = store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    assert ".odd\\057host\\072name,S=" in path.name


def test_concurrent_deliveries_share_the_new_directory_fsync(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from mailgate.core.spool import dirsync

    store.deliver("bob@example.org", MESSAGE, return_path="a@b")  # the mailbox exists
    new = store.root / "example.org" / "bob" / "new"
    real = dirsync.fsync_dir
    events: list[tuple[str, int]] = []  # ("start"|"end", files in new/ when it happened)
    lock = threading.Lock()

    def slow_fsync(path: Path) -> None:
        with lock:
            events.append(("start", len(os.listdir(new))))
        time.sleep(0.05)
        real(path)
        with lock:
            events.append(("end", len(os.listdir(new))))

    monkeypatch.setattr(dirsync, "fsync_dir", slow_fsync)
    results: list[Path] = []

    def deliver() -> None:
        results.append(store.deliver("bob@example.org", MESSAGE, return_path="a@b"))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(path.exists() for path in results)
    starts = [count for kind, count in events if kind == "start"]
    assert 1 <= len(starts) < 8  # shared, yet at least one ran after the renames
    assert starts[-1] == 9  # the last fsync began after every rename


def test_failed_new_directory_fsync_is_a_temporary_failure(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailgate.core.spool import dirsync

    store.deliver("bob@example.org", MESSAGE, return_path="a@b")

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(dirsync, "fsync_dir", failing)
    with pytest.raises(DeliveryError, match="Input/output error") as caught:
        store.deliver("bob@example.org", MESSAGE, return_path="a@b")
    assert not caught.value.permanent
