"""Sending the notifications a message owes its sender: failure, delay and success DSNs.

``SpoolEnvelope.notices_due`` says what is owed (never anything to the null sender:
RFC 5321 section 6.1, never bounce a bounce); this module turns it into one RFC 3464
report per kind, spools the report as a new message from the null sender to the original
sender, and hands it to local delivery. Local delivery puts it into the sender's Maildir
when the sender is a local user, and otherwise passes it to the outbound queue like any
remote recipient, so a notice is as durable as any accepted message.

The report is spooled before the original's envelope records it as sent: a crash in
between sends it twice, never not at all.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from mailgate.core.relay.dsn import Action, RecipientStatus, build_report
from mailgate.core.smtp.dsnparams import orcpt_of
from mailgate.core.spool.envelope import NoticeKind, SpoolEnvelope
from mailgate.core.spool.queue_id import new_queue_id
from mailgate.core.spool.spool import Spool

log = logging.getLogger("mailgate.relay")

_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


def _status_of(reason: str, default: str) -> str:
    match = _STATUS.match(reason.strip())
    return match.group(1) if match else default


def _recipient_status(
    envelope: SpoolEnvelope, key: str, kind: NoticeKind, lifetime: float
) -> RecipientStatus:
    remote = envelope.remote.get(key)
    orig = remote.orig if remote is not None else envelope.relay.get(key, key)
    orcpt = orcpt_of(envelope.options_of(orig))
    if orcpt is None and orig != key:
        orcpt = ("rfc822", orig)
    if kind == "failure":
        if remote is None or key in envelope.bounced:
            reason = envelope.bounced.get(key, "5.0.0 delivery failed")
            return RecipientStatus(
                key, "failed", _status_of(reason, "5.0.0"), orcpt, diagnostic=reason
            )
        return RecipientStatus(
            key,
            "failed",
            remote.last_status or "5.0.0",
            orcpt,
            remote.remote_mta,
            remote.last_reply,
            remote.last_attempt or None,
        )
    if kind == "delay":
        assert remote is not None
        return RecipientStatus(
            key,
            "delayed",
            remote.last_status or "4.0.0",
            orcpt,
            remote.remote_mta,
            remote.last_reply,
            remote.last_attempt or None,
            envelope.received_at + lifetime,
        )
    action: Action = "relayed" if remote is not None else "delivered"
    if remote is not None:
        return RecipientStatus(
            key, action, "2.0.0", orcpt, remote.remote_mta, remote.last_reply, remote.last_attempt
        )
    return RecipientStatus(key, action, "2.0.0", orcpt, diagnostic="delivered to mailbox")


async def send_notices(
    spool: Spool,
    envelope: SpoolEnvelope,
    content: bytes,
    due: list[tuple[str, NoticeKind]],
    *,
    reporting_mta: str,
    lifetime: float,
    submit: Callable[[str], None],
) -> None:
    """Spool one report per kind in ``due`` and mark each recipient notified (in memory).

    The caller writes the original's envelope afterwards.
    """
    by_kind: dict[NoticeKind, list[str]] = {}
    for key, kind in due:
        by_kind.setdefault(kind, []).append(key)
    now = time.time()
    for kind, keys in by_kind.items():
        statuses = [_recipient_status(envelope, key, kind, lifetime) for key in keys]
        report = build_report(
            envelope, content, kind, statuses, reporting_mta=reporting_mta, now=now
        )
        notice = SpoolEnvelope(
            queue_id=new_queue_id(),
            mail_from="",
            rcpt_tos=[envelope.mail_from],
            client_address="127.0.0.1",
            helo=reporting_mta,
            body_type="7BIT" if report.isascii() else "8BITMIME",
            smtputf8=not envelope.mail_from.isascii(),
        )
        await spool.store(notice, report)
        log.info(
            "%s: sender %s notification: %s (for %s)",
            envelope.queue_id,
            kind,
            notice.queue_id,
            ", ".join(f"<{key}>" for key in keys),
        )
        submit(notice.queue_id)
        for key in keys:
            envelope.notified.setdefault(key, []).append(kind)
