"""The quota policy: settings of ``mailgate milter quota`` and its decisions, without I/O.

The daemon (``mailgate.milters.quota``) reads the user store and measures mailboxes; this
module says what those numbers mean. A recipient is resolved to the local mailboxes it
delivers to (a user, or the users an alias expands to), each with its usage and its limits
in force. Then:

* at RCPT a recipient is *full* when every one of its mailboxes is at or over its storage
  quota, or would go over it with the size the client declared (``SIZE=`` at MAIL FROM);
* at end of data a recipient is *exceeded* when the message's actual size would take
  every one of its mailboxes over quota;
* the message breaks an attachment limit of a recipient when it does so for every one of
  its mailboxes, and of the authenticated sender when it breaks the sender's own limit.

"Every one of its mailboxes": a list is refused only when none of its members can take
the message, so one full mailbox does not stop the mail of a whole team. A user, and an
alias that forwards to one user, are that one mailbox.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AttachmentInfo",
    "Mailbox",
    "Settings",
    "attachment_problem",
    "exceeded",
    "format_size",
    "full",
]


class Settings(BaseModel):
    """The ``settings:`` of a quota rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_db: Path | None = Field(
        default=None,
        description="the user database; empty: the core's (MAILGATE_CONFIG / MAILGATE_*)",
    )
    mail_dir: Path | None = Field(
        default=None,
        description="the root of the Maildirs; empty: the core's (MAILGATE_CONFIG / MAILGATE_*)",
    )
    cache_ttl: float = Field(
        default=60.0, ge=0, le=86400, description="seconds a mailbox's measured usage is kept"
    )
    timeout: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="seconds for one user store lookup or one mailbox measurement",
    )


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One local mailbox as the policy sees it; None limits mean unlimited."""

    address: str
    usage: int = 0
    storage: int | None = None
    max_attachment: int | None = None
    max_attachments: int | None = None


def _all_of(mailboxes: Sequence[Mailbox], test: Callable[[Mailbox], bool]) -> bool:
    return bool(mailboxes) and all(test(box) for box in mailboxes)


def full(mailboxes: Sequence[Mailbox], declared: int | None) -> Mailbox | None:
    """At RCPT: the first mailbox, if every one is full (at or over quota, or over it with
    the declared size); None if the recipient can take mail."""

    def is_full(box: Mailbox) -> bool:
        if box.storage is None:
            return False
        return box.usage >= box.storage or box.usage + (declared or 0) > box.storage

    return mailboxes[0] if _all_of(mailboxes, is_full) else None


def exceeded(mailboxes: Sequence[Mailbox], size: int) -> Mailbox | None:
    """At end of data: the first mailbox, if a message of ``size`` bytes would take every
    one over its quota; None otherwise."""

    def is_exceeded(box: Mailbox) -> bool:
        return box.storage is not None and box.usage + size > box.storage

    return mailboxes[0] if _all_of(mailboxes, is_exceeded) else None


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """What the limits look at: each attachment's file name and decoded size."""

    name: str
    size: int


def attachment_problem(
    who: str, mailboxes: Sequence[Mailbox], attachments: Sequence[AttachmentInfo]
) -> tuple[str, str] | None:
    """``(kind, text)`` if the attachments break a limit of every one of ``mailboxes``
    (``who`` names them in the text); kind is ``too_big`` or ``too_many``."""
    if not attachments or not mailboxes:
        return None
    largest = max(attachments, key=lambda item: item.size)
    if _all_of(
        mailboxes, lambda box: box.max_attachment is not None and largest.size > box.max_attachment
    ):
        limit = max(box.max_attachment or 0 for box in mailboxes)
        name = f" '{largest.name}'" if largest.name else ""
        return (
            "too_big",
            f"attachment{name} of {format_size(largest.size)} exceeds the "
            f"{format_size(limit)} limit of {who}",
        )
    count = len(attachments)
    if _all_of(
        mailboxes, lambda box: box.max_attachments is not None and count > box.max_attachments
    ):
        limit = max(box.max_attachments or 0 for box in mailboxes)
        return (
            "too_many",
            f"{count} attachments exceed the limit of {limit} per message of {who}",
        )
    return None


_UNITS = (("G", 1024**3), ("M", 1024**2), ("K", 1024))


def format_size(size: int) -> str:
    """Bytes for people: ``1G``, ``1.5M``, ``512K``, ``300`` (powers of 1024)."""
    for unit, factor in _UNITS:
        if size >= factor:
            value = size / factor
            text = f"{value:.0f}" if size % factor == 0 else f"{value:.1f}"
            return text + unit
    return str(size)
