"""The SpamAssassin policy: the daemon's settings and the facts a spamd check gives the rules.

The daemon (``mailgate.milters.spamassassin``) asks spamd about a message only when a rule
first wants one of these facts; the rule file then decides (tag, quarantine, reject).
This module owns what those facts are and when a message is not checked at all; the
SPAMD protocol itself is in ``mailgate.milters.spamd``.

Facts (absent when they do not apply):

==================  ====================================================================
``spamassassin``    ``checked``, ``error`` (spamd down, slow or confused) or ``skipped``
                    (larger than ``max_size``)
``spam``            spamd's verdict: ``true`` when the score reached its required score
``spam_score``      the score (a number: ``{fact: {name: spam_score, over: 5}}``)
``spam_required``   spamd's threshold (its ``required_score``)
``spam_symbols``    the names of the SpamAssassin rules that hit (a list)
``spam_tests``      the same as SpamAssassin writes them: ``GTUBE,NO_RELAYS``, or ``none``
``spam_report``     SpamAssassin's report (``request: report`` only)
``spamd_error``     why spamd gave no answer (``error`` only)
==================  ====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailgate.policies.rules.values import parse_quantity

# spamc's own default: larger messages are passed on unchecked (SpamAssassin is slow on
# them and spammers rarely send them).
DEFAULT_MAX_SIZE = 500 * 1024

Outcome = Literal["checked", "error", "skipped"]


class Settings(BaseModel):
    """The ``settings:`` section of a spamassassin rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(
        default="127.0.0.1:783",
        description="spamd's address: HOST:PORT, [IPv6]:PORT, or unix:/path of its socket",
    )
    timeout: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="seconds for one check, all included; then spamassassin is 'error'",
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, le=60, description="seconds to wait for the connection to spamd"
    )
    max_size: int = Field(
        default=DEFAULT_MAX_SIZE,
        gt=0,
        description="larger messages are not checked (spamassassin is 'skipped'); 500K, 2M",
    )
    user: str | None = Field(
        default=None,
        description="the user spamd checks for (its User header: per-user rules and Bayes)",
    )
    request: Literal["symbols", "report", "check"] = Field(
        default="symbols",
        description="symbols: score and rule names; report: plus the report; check: score only",
    )

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        # The client owns the address syntax; importing it here brings no socket use.
        from mailgate.milters.spamd import parse_address

        parse_address(value)
        return value.strip()

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return int(parse_quantity(value).value)
        return value

    @field_validator("user")
    @classmethod
    def _valid_user(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value)
        ):
            raise ValueError("a user name, without spaces or control characters")
        return value


def too_large(size: int, truncated: bool, settings: Settings) -> bool:
    """Whether a message is passed on unchecked: over ``max_size``, or not kept whole."""
    return truncated or size > settings.max_size


def checked_facts(
    spam: bool,
    score: float,
    required: float,
    symbols: Sequence[str] = (),
    report: str | None = None,
) -> dict[str, Any]:
    """The facts of a message spamd has scored."""
    facts: dict[str, Any] = {
        "spamassassin": "checked",
        "spam": spam,
        "spam_score": score,
        "spam_required": required,
        "spam_symbols": list(symbols),
        "spam_tests": tests_text(symbols),
        "spamd_error": None,
    }
    if report is not None:
        facts["spam_report"] = report
    return facts


def error_facts(reason: str) -> dict[str, Any]:
    """The facts of a message spamd gave no answer about (down, too slow, garbage)."""
    return {"spamassassin": "error", "spamd_error": reason, **_unscored()}


def skipped_facts() -> dict[str, Any]:
    """The facts of a message not sent to spamd (over ``max_size``)."""
    return {"spamassassin": "skipped", "spamd_error": None, **_unscored()}


def _unscored() -> dict[str, Any]:
    # Absent rather than 0: "score over 5" must not hold, and neither must "under 5".
    return {
        "spam": None,
        "spam_score": None,
        "spam_required": None,
        "spam_symbols": None,
        "spam_tests": None,
    }


def tests_text(symbols: Sequence[str]) -> str:
    """The rule names as SpamAssassin's X-Spam-Status writes them (``tests=...``)."""
    return ",".join(symbols) if symbols else "none"


#: Every fact name this policy publishes (the daemon makes each one lazy).
FACT_NAMES = (
    "spamassassin",
    "spam",
    "spam_score",
    "spam_required",
    "spam_symbols",
    "spam_tests",
    "spam_report",
    "spamd_error",
)
