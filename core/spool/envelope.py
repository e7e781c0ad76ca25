"""The envelope of a spooled message: what the SMTP session learned, plus delivery progress.

The first group of fields is fixed when the message is accepted. The second group records
the quarantine history: why and when the message was put on hold and when the operator
released it. Whether a message *is* on hold is decided by the spool directory it sits in,
not by these fields; they stay after the release as the record of what happened. The
third group records delivery progress so that a restart resumes where the last attempt
stopped instead of delivering twice: which recipients are finished (and how), which final
mailboxes already hold a copy, which remote targets and bounces wait for the outbound relay.

The JSON form is versioned and checked field by field on reading: a spool file written by
something else, or damaged, is refused with a SpoolError rather than half-understood.
Quarantine fields that are unset are left out of the JSON, so the files of messages that
were never held stay readable by versions that predate the hold queue; files written
before the hold queue existed load with the fields unset.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from mailgate.core.errors import SpoolError

BodyType = Literal["7BIT", "8BITMIME", "BINARYMIME"]
# Terminal states of an original recipient as far as local delivery is concerned:
# "sent"    every target is in a mailbox (or was a duplicate of one that is);
# "relay"   at least one target is remote and waits for the outbound relay;
# "bounced" no target could be delivered, permanently.
RecipientState = Literal["sent", "relay", "bounced"]

FORMAT_VERSION = 1
_BODY_TYPES: frozenset[str] = frozenset(get_args(BodyType))
_RECIPIENT_STATES: frozenset[str] = frozenset(get_args(RecipientState))
_OMIT_IF_UNSET = ("quarantine_reason", "held_at", "released_at")


@dataclass
class SpoolEnvelope:
    """One message's envelope. ``mail_from`` is "" for the null sender ``<>``."""

    queue_id: str
    mail_from: str
    rcpt_tos: list[str]
    received_at: float = field(default_factory=time.time)
    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    auth_user: str | None = None
    mail_options: list[str] = field(default_factory=list)
    # Parallel to rcpt_tos: the ESMTP parameters given with each RCPT TO (NOTIFY=, ORCPT=).
    rcpt_options: list[list[str]] = field(default_factory=list)
    body_type: BodyType = "7BIT"
    smtputf8: bool = False

    # Quarantine history (see the module docstring).
    quarantine_reason: str | None = None
    held_at: float | None = None
    released_at: float | None = None

    # Delivery progress.
    attempts: int = 0
    next_attempt: float = 0.0
    done: dict[str, RecipientState] = field(default_factory=dict)
    delivered: list[str] = field(default_factory=list)
    relay: dict[str, str] = field(default_factory=dict)  # remote target -> original recipient
    bounced: dict[str, str] = field(default_factory=dict)  # target or recipient -> reason
    errors: dict[str, str] = field(default_factory=dict)  # recipient -> last temporary error

    def pending_recipients(self) -> list[str]:
        """Recipients local delivery has not finished, in order, without duplicates."""
        return [rcpt for rcpt in dict.fromkeys(self.rcpt_tos) if rcpt not in self.done]

    def awaiting_outbound(self) -> bool:
        """Whether the outbound relay still has work: remote targets or bounces to send.

        Bounces to the null sender are never sent (RFC 5321 section 6.1), so they do not
        keep a message in the spool.
        """
        return bool(self.relay) or (bool(self.bounced) and self.mail_from != "")

    def to_json(self) -> str:
        # A plain dict of the fields in declaration order: what asdict() gives for these
        # JSON-only values, without its deep copy (this runs for every accepted message).
        data = {
            name: value
            for name in _FIELD_NAMES
            if (value := getattr(self, name)) is not None or name not in _OMIT_IF_UNSET
        }
        data["v"] = FORMAT_VERSION
        # ASCII output keeps lone surrogates (undecodable bytes smuggled in as str) intact.
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SpoolEnvelope:
        """Parse and check an envelope; SpoolError says what is wrong."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SpoolError(f"envelope is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpoolError("envelope is not a JSON object")
        version = data.pop("v", None)
        if version != FORMAT_VERSION:
            raise SpoolError(f"unsupported envelope version {version!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpoolError(f"unknown envelope fields: {', '.join(unknown)}")
        for name, check in _CHECKS.items():
            if name in data and not check(data[name]):
                raise SpoolError(f"envelope field {name!r} has an invalid value")
        for name in ("queue_id", "mail_from", "rcpt_tos"):
            if name not in data:
                raise SpoolError(f"envelope field {name!r} is missing")
        data["received_at"] = float(data.get("received_at", 0.0))
        data["next_attempt"] = float(data.get("next_attempt", 0.0))
        for name in ("held_at", "released_at"):
            if data.get(name) is not None:
                data[name] = float(data[name])
        return cls(**data)


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SpoolEnvelope))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_optional_number(value: Any) -> bool:
    return value is None or _is_number(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_str_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(item, str) for item in value.values())


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "queue_id": _is_str,
    "mail_from": _is_str,
    "rcpt_tos": _is_str_list,
    "received_at": _is_number,
    "client_address": _is_str,
    "client_name": _is_str,
    "helo": _is_str,
    "auth_user": lambda v: v is None or isinstance(v, str),
    "mail_options": _is_str_list,
    "rcpt_options": lambda v: isinstance(v, list) and all(_is_str_list(item) for item in v),
    "body_type": lambda v: isinstance(v, str) and v in _BODY_TYPES,
    "smtputf8": lambda v: isinstance(v, bool),
    "quarantine_reason": lambda v: v is None or isinstance(v, str),
    "held_at": _is_optional_number,
    "released_at": _is_optional_number,
    "attempts": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "next_attempt": _is_number,
    "done": lambda v: _is_str_dict(v) and all(s in _RECIPIENT_STATES for s in v.values()),
    "delivered": _is_str_list,
    "relay": _is_str_dict,
    "bounced": _is_str_dict,
    "errors": _is_str_dict,
}
