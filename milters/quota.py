"""The quota daemon (``mailgate milter quota``): mailbox storage quotas and attachment limits.

For each recipient it asks the user store which local mailboxes the address delivers to
(aliases expanded as the core's delivery does; remote addresses and unknown ones are not
its business) and the limits in force for each (``mailgate user quota``), and measures
each mailbox that has a storage quota from its Maildir (``maildir_usage``), keeping the
result for ``cache_ttl`` seconds. ``mailgate.policies.quota`` turns those numbers into the
facts the rules read:

* at RCPT (answered at once, for that recipient only): ``quota_over`` and friends when
  the recipient's mailbox is full, or would be with the size declared at MAIL FROM;
* at end of data: ``quota_exceeded`` when the message's real size takes a recipient over
  quota, ``attachment_too_big`` / ``too_many_attachments`` / ``attachment_problem`` when
  it breaks an attachment limit of a recipient or of the authenticated sender;
* ``quota_error`` whenever the store or a mailbox cannot be read in ``timeout`` seconds,
  so the rules (by default: tempfail) decide what an outage means.

Every lookup runs in a worker thread and is waited for at most ``timeout`` seconds: a
locked database or a hung file system delays a message by that much, never more.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import Milter

from mailgate.core.config import load_config
from mailgate.core.errors import ConfigError, DeliveryError, UserStoreError
from mailgate.core.spool.maildir import mailbox_path, maildir_usage
from mailgate.core.users.sqlite import SQLiteUserStore
from mailgate.milters.adapter import PolicyMilter
from mailgate.policies.content import content_facts
from mailgate.policies.facts import MessageFacts
from mailgate.policies.quota import (
    AttachmentInfo,
    Mailbox,
    Settings,
    attachment_problem,
    exceeded,
    full,
)
from mailgate.policies.verdict import Verdict

# Attachment limits must see whole attachments: like the content daemon, above the core's
# default max_message_size (25M).
QUOTA_BODY_LIMIT = 32 * 1024 * 1024

T = TypeVar("T")


class QuotaUnavailable(Exception):
    """The user store or a mailbox could not be read (in time)."""


@dataclass(frozen=True, slots=True)
class _Where:
    user_db: Path
    mail_dir: Path


def _where(settings: Settings) -> _Where:
    """The store and mailboxes to read: the settings', else the core's configuration."""
    if settings.user_db is not None and settings.mail_dir is not None:
        return _Where(settings.user_db, settings.mail_dir)
    try:
        config = load_config(os.environ.get("MAILGATE_CONFIG") or None)
    except ConfigError as exc:
        raise QuotaUnavailable(
            "the core's configuration cannot be loaded: " + "; ".join(exc.problems)
        ) from exc
    return _Where(settings.user_db or config.user_db, settings.mail_dir or config.mail_dir)


class QuotaBackend:
    """The user store and the usage cache of one daemon process (shared by connections)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # _lock guards the usage cache only; _open_lock the opening of the store, which may
        # wait on a locked database (in a worker) and must never hold up the cache.
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._store: SQLiteUserStore | None = None
        self._where: _Where | None = None
        # mailbox path -> (bytes used, monotonic time the value expires)
        self._usage: dict[Path, tuple[int, float]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="quota"
        )

    # -- bounded work ------------------------------------------------------------------

    def bounded(self, what: str, work: Callable[[], T]) -> T:
        """``work()`` in a worker, waited for at most ``timeout``; QuotaUnavailable else."""
        future = self._pool.submit(work)
        try:
            return future.result(timeout=self.settings.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise QuotaUnavailable(f"{what}: no answer within {self.settings.timeout:g}s") from None
        except QuotaUnavailable:
            raise
        except (UserStoreError, OSError, DeliveryError) as exc:
            raise QuotaUnavailable(f"{what}: {exc}") from exc

    def _open(self) -> tuple[SQLiteUserStore, _Where]:
        with self._open_lock:
            if self._store is not None and self._where is not None:
                return self._store, self._where
            where = _where(self.settings)
            # Never create the database: a missing one is an outage, not an empty store.
            store = SQLiteUserStore(where.user_db, create=False)
            self._store, self._where = store, where
            return store, where

    def _failed(self) -> None:
        """Forget the store after an error, so the next lookup opens it afresh."""
        with self._open_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    # -- lookups -----------------------------------------------------------------------

    def mailboxes(self, recipient: str) -> list[Mailbox]:
        """The local mailboxes of ``recipient`` with their limits and usage ([]: none)."""
        return self.bounded(f"<{recipient}>", lambda: self._mailboxes(recipient))

    def sender(self, login: str) -> Mailbox | None:
        """The authenticated sender as a local user with its limits, or None."""
        return self.bounded(f"sender {login}", lambda: self._sender(login))

    def _mailboxes(self, recipient: str) -> list[Mailbox]:
        store, where = self._open()
        try:
            targets = store.resolve(recipient) or []
            boxes = []
            for target in targets:
                if not store.user_exists(target):
                    continue  # a remote address: not our mailbox
                limits = store.effective_limits(target)
                usage = self._measure(where, target) if limits.storage is not None else 0
                boxes.append(
                    Mailbox(
                        target,
                        usage,
                        limits.storage,
                        limits.max_attachment,
                        limits.max_attachments,
                    )
                )
            return boxes
        except UserStoreError:
            self._failed()
            raise

    def _sender(self, login: str) -> Mailbox | None:
        store, _ = self._open()
        try:
            if not store.user_exists(login):
                return None
            limits = store.effective_limits(login)
        except UserStoreError:
            self._failed()
            raise
        return Mailbox(login, 0, None, limits.max_attachment, limits.max_attachments)

    def _measure(self, where: _Where, address: str) -> int:
        path = mailbox_path(where.mail_dir, address)
        now = time.monotonic()
        with self._lock:
            cached = self._usage.get(path)
        if cached is not None and cached[1] > now:
            return cached[0]
        used = maildir_usage(path).bytes
        if self.settings.cache_ttl > 0:
            with self._lock:
                self._usage[path] = (used, now + self.settings.cache_ttl)
        return used

    def delivered(self, addresses: list[str], size: int) -> None:
        """Count an accepted message in the cached usage of its mailboxes at once, so a
        burst of mail cannot overrun a quota for a whole ``cache_ttl``."""
        where = self._where
        if where is None:
            return
        with self._lock:
            for address in addresses:
                try:
                    path = mailbox_path(where.mail_dir, address)
                except DeliveryError:
                    continue
                cached = self._usage.get(path)
                if cached is not None:
                    self._usage[path] = (cached[0] + size, cached[1])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._failed()


_backend_lock = threading.Lock()
_backend: QuotaBackend | None = None


def backend_for(settings: Settings) -> QuotaBackend:
    """The process's backend for ``settings`` (a reload with new settings makes a new one)."""
    global _backend
    with _backend_lock:
        if _backend is None or _backend.settings != settings:
            old, _backend = _backend, QuotaBackend(settings)
            if old is not None:
                old.close()
        return _backend


def _declared_size(params: tuple[str, ...]) -> int | None:
    """The ``SIZE=`` ESMTP parameter of MAIL FROM (RFC 1870), if given and sane."""
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().upper() == "SIZE" and value.strip().isdigit():
            return int(value.strip())
    return None


class QuotaMilter(PolicyMilter):
    """One MTA connection of the quota daemon."""

    body_limit: ClassVar[int] = QUOTA_BODY_LIMIT

    def reply_stages(self) -> frozenset[Any]:
        return frozenset({"rcpt"})

    def _reset_message(self) -> None:
        super()._reset_message()
        self.declared_size: int | None = None
        # Each accepted recipient's mailboxes, as looked up at RCPT.
        self._boxes: dict[str, list[Mailbox]] = {}

    @property
    def backend(self) -> QuotaBackend:
        settings = self.context.policy.current.settings  # type: ignore[attr-defined]
        return backend_for(settings if isinstance(settings, Settings) else Settings())

    def envfrom(self, sender: str, *params: str) -> int:
        result = super().envfrom(sender, *params)
        self.declared_size = _declared_size(params)
        return result

    # -- RCPT ----------------------------------------------------------------------------

    def at_rcpt(self, facts: MessageFacts, recipient: str) -> Verdict | None:
        if self.declared_size is not None:
            facts.extra["quota_declared_size"] = self.declared_size
        try:
            boxes = self.backend.mailboxes(recipient)
        except QuotaUnavailable as exc:
            self.logger.warning("%s: quota of <%s> unknown: %s", self.qid, recipient, exc)
            facts.extra["quota_error"] = str(exc)
            return self.decide(facts)
        self._boxes[recipient] = boxes
        box = full(boxes, self.declared_size)
        if box is not None:
            facts.extra.update(
                quota_over=recipient,
                quota_mailbox=box.address,
                quota_usage=box.usage,
                quota_limit=box.storage,
            )
            self.logger.info(
                "%s: <%s>: mailbox %s full: %d of %d bytes used%s",
                self.qid,
                recipient,
                box.address,
                box.usage,
                box.storage or 0,
                f", {self.declared_size} declared" if self.declared_size is not None else "",
            )
        return self.decide(facts)

    # -- end of data -------------------------------------------------------------------

    def prepare(self, facts: MessageFacts) -> None:
        backend = self.backend
        boxes: dict[str, list[Mailbox]] = {}
        try:
            for recipient in facts.rcpt_tos:
                found = self._boxes.get(recipient)
                boxes[recipient] = backend.mailboxes(recipient) if found is None else found
            sender = backend.sender(facts.auth_user) if facts.auth_user else None
        except QuotaUnavailable as exc:
            self.logger.warning("%s: quotas unknown: %s", self.qid, exc)
            facts.extra["quota_error"] = str(exc)
            return
        self._boxes = boxes
        size = facts.size
        over = [rcpt for rcpt, found in boxes.items() if exceeded(found, size) is not None]
        if over:
            facts.extra["quota_exceeded"] = over
        checked = [(f"<{rcpt}>", rcpt, found) for rcpt, found in boxes.items()]
        if sender is not None:
            checked.append((f"the sender {sender.address}", sender.address, [sender]))
        if not any(
            box.max_attachment is not None or box.max_attachments is not None
            for _, _, found in checked
            for box in found
        ):
            return  # no attachment limit concerns this message: skip the MIME walk
        attachments = [
            AttachmentInfo(item.filename, item.size) for item in content_facts(facts).attachments
        ]
        facts.extra["attachment_count"] = len(attachments)
        facts.extra["attachment_largest"] = max((item.size for item in attachments), default=0)
        too_big: list[str] = []
        too_many: list[str] = []
        for who, address, found in checked:
            problem = attachment_problem(who, found, attachments)
            if problem is None:
                continue
            kind, text = problem
            (too_big if kind == "too_big" else too_many).append(address)
            facts.extra.setdefault("attachment_problem", text)
        if too_big:
            facts.extra["attachment_too_big"] = too_big
        if too_many:
            facts.extra["too_many_attachments"] = too_many

    def _act(self, verdict: Verdict, facts: MessageFacts) -> int:
        result = super()._act(verdict, facts)
        if result == Milter.ACCEPT and "quota_error" not in facts.extra:
            addresses = [box.address for found in self._boxes.values() for box in found]
            self.backend.delivered(addresses, facts.size)
        return result
