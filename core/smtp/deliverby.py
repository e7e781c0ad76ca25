"""The DELIVERBY extension's MAIL parameter (RFC 2852): checking it and reading it back.

``BY=<by-time>;<by-mode>[T]``: ``by-time`` is a signed number of seconds (at most nine
digits) from the moment the server accepts the message; ``by-mode`` says what happens
when the time runs out before delivery: ``R`` return the message (a failure DSN, status
5.4.7), ``N`` notify the sender (a delay DSN) and go on delivering. The optional ``T``
(trace) asks for notices of the message's progress: a relayed or delivered notice as if
``NOTIFY`` included SUCCESS (and DELAY), unless ``NOTIFY=NEVER``.

The session checks the parameter here (the reply to send on error comes back, never a
string made up elsewhere); the spool keeps it as given in ``mail_options``; the deadline
is the message's arrival time plus ``by-time``. The relay reads it back with the helpers
at the end: the deadline, and the parameter to pass on to a next hop that offers
DELIVERBY, with the time that is left. Pure functions, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mailgate.core.smtp import replies
from mailgate.core.smtp.dsnparams import options_dict
from mailgate.core.smtp.replies import Reply

_BY = re.compile(r"^([+-]?)(\d{1,9});([NnRr])([Tt]?)\Z")
MAX_BY_TIME = 999_999_999
# RFC 2852 section 5: the status of a message returned because its time ran out.
EXPIRED_STATUS = "5.4.7"
BY_TOO_SHORT = Reply(555, "5.5.4", "BY time is shorter than this server's minimum")


@dataclass(frozen=True, slots=True)
class ByRequest:
    seconds: int
    mode: str  # "R" (return) or "N" (notify)
    trace: bool

    def render(self, seconds: int | None = None) -> str:
        value = self.seconds if seconds is None else seconds
        return f"BY={value};{self.mode}{'T' if self.trace else ''}"


def parse_by(value: str) -> ByRequest:
    """Parse a BY value; ValueError says what is wrong."""
    match = _BY.match(value)
    if match is None:
        raise ValueError("BY must be <seconds>;R or <seconds>;N, optionally followed by T")
    sign, digits, mode, trace = match.groups()
    seconds = -int(digits) if sign == "-" else int(digits)
    return ByRequest(seconds, mode.upper(), bool(trace))


def check_mail_param(value: str | None, min_by_time: int) -> Reply | None:
    """The error reply for a bad BY value, or None when it is fine (RFC 2852 section 4)."""
    if value is None:
        return replies.PARAM_BAD.with_text("BY requires a value")
    try:
        request = parse_by(value)
    except ValueError as exc:
        return replies.PARAM_BAD.with_text(str(exc))
    if request.mode == "R":
        # Returning a message whose time is already up would make no sense: R needs a
        # positive time, and one the server can hope to meet (its advertised minimum).
        if request.seconds <= 0:
            return replies.PARAM_BAD.with_text("BY time must be positive with mode R")
        if request.seconds < min_by_time:
            return BY_TOO_SHORT.with_text(
                f"BY time {request.seconds}s is shorter than the minimum of {min_by_time}s"
            )
    return None


# -- reading the stored parameter back -------------------------------------------------------


def by_of(options: Iterable[str]) -> ByRequest | None:
    value = options_dict(options).get("BY")
    if not value:
        return None
    try:
        return parse_by(value)
    except ValueError:
        return None


def deadline_of(options: Iterable[str], received_at: float) -> float | None:
    """When the message must be delivered by (seconds since the epoch), or None."""
    request = by_of(options)
    return None if request is None else received_at + request.seconds


def pass_on_param(options: Iterable[str], received_at: float, now: float) -> str | None:
    """The BY parameter for the next hop: the same mode, the time that is left.

    R mode never passes on less than one second (a message whose time is up is returned,
    not relayed); N mode may pass on zero or a negative time (RFC 2852 section 4).
    """
    request = by_of(options)
    if request is None:
        return None
    left = math.floor(received_at + request.seconds - now)
    if request.mode == "R":
        left = max(left, 1)
    return request.render(max(-MAX_BY_TIME, min(MAX_BY_TIME, left)))
