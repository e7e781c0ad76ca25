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
from mailgate.core.smtp.dsnparams import notify_of, wants

BodyType = Literal["7BIT", "8BITMIME", "BINARYMIME"]
# Terminal states of an original recipient as far as local delivery is concerned:
# "sent"    every target is in a mailbox (or was a duplicate of one that is);
# "relay"   at least one target is remote and waits for the outbound relay;
# "bounced" no target could be delivered, permanently.
RecipientState = Literal["sent", "relay", "bounced"]

# States of one remote target in the outbound queue: "queued" (not tried yet), "deferred"
# (a temporary failure, retried at ``next_attempt``), "sent" (the next hop answered 250)
# and "bounced" (a permanent failure, or the lifetime ran out).
RemoteStatus = Literal["queued", "deferred", "sent", "bounced"]
REMOTE_FINAL: frozenset[str] = frozenset({"sent", "bounced"})
# Notifications (RFC 3464) a recipient can have had: each is sent at most once.
NoticeKind = Literal["failure", "delay", "success"]

FORMAT_VERSION = 1
_BODY_TYPES: frozenset[str] = frozenset(get_args(BodyType))
_RECIPIENT_STATES: frozenset[str] = frozenset(get_args(RecipientState))
_OMIT_IF_UNSET = ("quarantine_reason", "held_at", "released_at")
_OMIT_IF_EMPTY = ("remote", "notified")
_REMOTE_STATUSES: frozenset[str] = frozenset(get_args(RemoteStatus))
_NOTICE_KINDS: frozenset[str] = frozenset(get_args(NoticeKind))


@dataclass
class RemoteState:
    """One remote target's place in the outbound queue (see docs/relay.md).

    ``dsn_relayed`` records that the next hop took the NOTIFY parameter (it offers DSN), so
    a success notice is its business, not ours (RFC 3461 section 6.2.1).
    """

    orig: str
    status: RemoteStatus = "queued"
    attempts: int = 0
    next_attempt: float = 0.0
    first_attempt: float = 0.0
    last_attempt: float = 0.0
    last_reply: str = ""
    last_status: str = ""  # RFC 3463 code of the last outcome, for notifications
    remote_mta: str = ""
    dsn_relayed: bool = False

    @property
    def final(self) -> bool:
        return self.status in REMOTE_FINAL

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> RemoteState:
        if not isinstance(data, dict) or not isinstance(data.get("orig"), str):
            raise SpoolError("envelope field 'remote' has an invalid entry")
        known = {f.name for f in fields(cls)}
        if set(data) - known or data.get("status", "queued") not in _REMOTE_STATUSES:
            raise SpoolError("envelope field 'remote' has an invalid entry")
        state = cls(**data)
        for name in ("next_attempt", "first_attempt", "last_attempt"):
            value = getattr(state, name)
            if not _is_number(value):
                raise SpoolError("envelope field 'remote' has an invalid entry")
            setattr(state, name, float(value))
        if not (
            isinstance(state.attempts, int)
            and isinstance(state.last_reply, str)
            and isinstance(state.last_status, str)
            and isinstance(state.remote_mta, str)
            and isinstance(state.dsn_relayed, bool)
        ):
            raise SpoolError("envelope field 'remote' has an invalid entry")
        return state


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

    # The outbound queue: one entry per remote target (docs/relay.md), and the
    # notifications already sent, by target or recipient, so none is ever sent twice.
    remote: dict[str, RemoteState] = field(default_factory=dict)
    notified: dict[str, list[NoticeKind]] = field(default_factory=dict)

    def pending_recipients(self) -> list[str]:
        """Recipients local delivery has not finished, in order, without duplicates."""
        return [rcpt for rcpt in dict.fromkeys(self.rcpt_tos) if rcpt not in self.done]

    def awaiting_outbound(self) -> bool:
        """Whether the outbound relay still has work: remote targets or notices to send.

        Notices to the null sender are never sent (RFC 5321 section 6.1), so they do not
        keep a message in the spool.
        """
        for target in self.relay:
            state = self.remote.get(target)
            if state is None or not state.final:
                return True
        return bool(self.notices_due())

    def options_of(self, rcpt: str) -> list[str]:
        """The ESMTP parameters given with RCPT TO for ``rcpt`` (NOTIFY=, ORCPT=)."""
        for index, candidate in enumerate(self.rcpt_tos):
            if candidate == rcpt and index < len(self.rcpt_options):
                return self.rcpt_options[index]
        return []

    def notices_due(self, *, delay_after: float | None = None) -> list[tuple[str, NoticeKind]]:
        """(target or recipient, kind) of every notification owed and not yet sent.

        Failures of local delivery (``bounced``) and of the relay; successes when NOTIFY
        asked for them and no DSN-capable next hop took over; delays (only with
        ``delay_after``, seconds since arrival) for remote targets still waiting.
        """
        if self.mail_from == "":
            return []
        due: list[tuple[str, NoticeKind]] = []

        def owe(key: str, rcpt: str, kind: NoticeKind) -> None:
            if kind not in self.notified.get(key, []) and wants(
                notify_of(self.options_of(rcpt)), kind.upper()
            ):
                due.append((key, kind))

        for key in self.bounced:
            owe(key, self.relay.get(key, key), "failure")
        for target, state in self.remote.items():
            if state.status == "bounced" and target not in self.bounced:
                owe(target, state.orig, "failure")
            elif state.status == "sent" and not state.dsn_relayed:
                owe(target, state.orig, "success")
            elif (
                not state.final
                and delay_after is not None
                and time.time() - self.received_at >= delay_after
            ):
                owe(target, state.orig, "delay")
        for rcpt, state_name in self.done.items():
            if state_name == "sent":
                owe(rcpt, rcpt, "success")
        return due

    def to_json(self) -> str:
        # A plain dict of the fields in declaration order: what asdict() gives for these
        # JSON-only values, without its deep copy (this runs for every accepted message).
        data = {
            name: value
            for name in _FIELD_NAMES
            if ((value := getattr(self, name)) is not None or name not in _OMIT_IF_UNSET)
            and (value or name not in _OMIT_IF_EMPTY)
        }
        if self.remote:
            data["remote"] = {target: state.to_dict() for target, state in self.remote.items()}
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
        if "remote" in data:
            data["remote"] = {
                target: RemoteState.from_dict(entry) for target, entry in data["remote"].items()
            }
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
    "remote": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    "notified": lambda v: (
        isinstance(v, dict)
        and all(
            isinstance(kinds, list) and all(kind in _NOTICE_KINDS for kind in kinds)
            for kinds in v.values()
        )
    ),
}
