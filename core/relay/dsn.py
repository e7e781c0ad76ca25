"""Delivery status notifications: the RFC 3464 report for one message and a set of recipients.

A report is ``multipart/report; report-type=delivery-status`` with three parts: a text
for people, the ``message/delivery-status`` fields for programs (per message: the
reporting MTA, ENVID, arrival date; per recipient: Final-Recipient, Original-Recipient
from ORCPT, Action, Status, Remote-MTA, Diagnostic-Code, dates), and the original
message (``message/rfc822``) or only its header (``text/rfc822-headers``) as RET asked.
Without RET, a failure returns the whole message up to ``FULL_LIMIT`` octets, delays
and successes only the header (as Postfix does).

Building only: the relay decides when a notice is due and sends it with the null sender
(``mailgate.core.relay.notices``). Pure functions, no I/O.
"""

from __future__ import annotations

import email.utils
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mailgate.core.smtp.dsnparams import envid_of, ret_of
from mailgate.core.spool.envelope import NoticeKind, SpoolEnvelope

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
# Postfix's bounce_size_limit: a failure returns the full message up to this size.
FULL_LIMIT = 50000

_SUBJECTS: dict[NoticeKind, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_INTRO: dict[NoticeKind, str] = {
    "failure": (
        "I'm sorry to have to inform you that your message could not be delivered to one\r\n"
        "or more recipients. The problem is described below."
    ),
    "delay": (
        "This is a warning only; you do not need to resend your message.\r\n"
        "Delivery to the following recipients has been delayed; it will be retried."
    ),
    "success": "Your message was successfully delivered to the destinations below.",
}


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """What a report says about one recipient (RFC 3464 section 2.3)."""

    final_recipient: str
    action: Action
    status: str
    original_recipient: tuple[str, str] | None = None  # (addr-type, address) from ORCPT
    remote_mta: str = ""
    diagnostic: str = ""
    last_attempt: float | None = None
    will_retry_until: float | None = None


def _date(stamp: float) -> str:
    return email.utils.formatdate(stamp, localtime=True)


def _clean(text: str) -> str:
    # A field value is one line: a multi-line reply or a stray control character must not
    # start a new field or break the report's structure.
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _address_field(address: str) -> str:
    # RFC 6533: a non-ASCII address is typed utf-8, not rfc822.
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def _header_block(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
        return content if end < 0 else content[: end + 1]
    return content[: end + 2]


def _returned_part(kind: NoticeKind, ret: str | None, content: bytes) -> tuple[str, bytes]:
    full = ret == "FULL" or (ret is None and kind == "failure" and len(content) <= FULL_LIMIT)
    if full:
        return "message/rfc822", content
    return "text/rfc822-headers", _header_block(content)


def delivery_status(
    envelope: SpoolEnvelope, reporting_mta: str, recipients: Sequence[RecipientStatus]
) -> bytes:
    """The ``message/delivery-status`` body: the per-message block, then one per recipient."""
    lines = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Mailgate-Queue-ID: {envelope.queue_id}"]
    envid = envid_of(envelope.mail_options)
    if envid is not None:
        lines.append(f"Original-Envelope-Id: {_clean(envid)}")
    if envelope.mail_from:
        lines.append(f"X-Original-Sender: {_address_field(envelope.mail_from)}")
    lines.append(f"Arrival-Date: {_date(envelope.received_at)}")
    for rcpt in recipients:
        lines.append("")
        if rcpt.original_recipient is not None:
            addr_type, address = rcpt.original_recipient
            lines.append(f"Original-Recipient: {addr_type}; {_clean(address)}")
        lines.append(f"Final-Recipient: {_address_field(rcpt.final_recipient)}")
        lines.append(f"Action: {rcpt.action}")
        lines.append(f"Status: {rcpt.status}")
        if rcpt.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(rcpt.remote_mta)}")
        if rcpt.diagnostic:
            lines.append(f"Diagnostic-Code: smtp; {_clean(rcpt.diagnostic)}")
        if rcpt.last_attempt is not None:
            lines.append(f"Last-Attempt-Date: {_date(rcpt.last_attempt)}")
        if rcpt.will_retry_until is not None:
            lines.append(f"Will-Retry-Until: {_date(rcpt.will_retry_until)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def build_report(
    envelope: SpoolEnvelope,
    content: bytes,
    kind: NoticeKind,
    recipients: Sequence[RecipientStatus],
    *,
    reporting_mta: str,
    now: float,
) -> bytes:
    """The whole notification message (headers and body, CRLF line ends), for ``mail_from``."""
    boundary = f"{envelope.queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    returned_type, returned = _returned_part(kind, ret_of(envelope.mail_options), content)
    eight_bit = not returned.isascii()
    text_lines = [_INTRO[kind], ""]
    for rcpt in recipients:
        detail = f": {_clean(rcpt.diagnostic)}" if rcpt.diagnostic else ""
        via = f" (via {rcpt.remote_mta})" if rcpt.remote_mta else ""
        text_lines.append(f"<{rcpt.final_recipient}>{via}{detail}")
    text_lines.append("")
    text_lines.append(f"The mail system at {reporting_mta}")
    text = "\r\n".join(text_lines) + "\r\n"
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{envelope.mail_from}>",
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{envelope.queue_id}.{secrets.token_hex(6)}.dsn@{reporting_mta}>",
        # RFC 3834: an automatic reply; well-behaved autoresponders leave it alone.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit" if eight_bit else "Content-Transfer-Encoding: 7bit",
    ]
    parts = [
        "\r\n".join(headers).encode("utf-8"),
        b"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
        text.encode("ascii", "replace"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
        delivery_status(envelope, reporting_mta, recipients),
        f"\r\n--{boundary}\r\n".encode(),
        f"Content-Description: {'Undelivered Message' if kind == 'failure' else 'Message'}".encode()
        + (
            f"\r\nContent-Type: {returned_type}\r\n"
            f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}\r\n\r\n"
        ).encode(),
        returned if returned.endswith(b"\n") else returned + b"\r\n",
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)
