"""The SpamAssassin daemon (``mailgate milter spamassassin``): spamd's score for the rules.

Gathers the message as the MTA sends it (header fields as received, folding kept, so
SpamAssassin's header and DKIM rules see what the sender wrote) and, when a rule first
asks for a spam fact, sends it to spamd (SYMBOLS by default; REPORT or CHECK by the rule
file's ``request`` setting). One check per message, and none at all for messages that a
rule placed earlier decides (authenticated senders, trusted networks).

spamd being down, slow or confused never hangs a message: the check ends within the
``timeout`` setting with ``spamassassin: error`` and the rules decide (the shipped rules
accept and mark the message "not checked"). The facts are described in
``mailgate.policies.spamassassin``; the protocol in ``mailgate.milters.spamd``.
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import formatdate
from typing import Any, ClassVar

from mailgate.milters.adapter import DEFAULT_BODY_LIMIT, PolicyMilter
from mailgate.milters.spamd import SpamdClient, SpamdError, parse_address
from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.spamassassin import (
    FACT_NAMES,
    Settings,
    checked_facts,
    error_facts,
    skipped_facts,
    too_large,
)


class SpamAssassinMilter(PolicyMilter):
    """One MTA connection of the spamassassin daemon."""

    # max_size (500K by default) decides what is checked; a body cut at this limit is
    # never sent, since a truncated message would score as something it is not.
    body_limit: ClassVar[int] = DEFAULT_BODY_LIMIT

    def _reset_message(self) -> None:
        super()._reset_message()
        # The header fields exactly as received (the base class keeps them unfolded).
        self._raw_headers: list[tuple[str, bytes]] = []

    def header_bytes(self, name: str, value: bytes) -> int:
        try:
            self._raw_headers.append((name, value))
        except Exception:
            self._failed("header")
        return super().header_bytes(name, value)

    def settings(self) -> Settings:
        settings = getattr(self.context.policy.current, "settings", None)
        return settings if isinstance(settings, Settings) else Settings()

    def prepare(self, facts: MessageFacts) -> None:
        settings = self.settings()
        raw = self._raw_message(facts)
        check = LazyFact(lambda: self._check(raw, facts, settings))
        for name in FACT_NAMES:
            facts.extra[name] = LazyFact(_one_of(check, name))

    def _raw_message(self, facts: MessageFacts) -> bytes:
        if not self._raw_headers:
            message = facts.raw_message()
        else:
            head = b"".join(
                name.encode("ascii", "replace") + b": " + value + b"\r\n"
                for name, value in self._raw_headers
            )
            # Folded values come with bare LF or CRLF depending on the MTA: make them CRLF.
            head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            message = head + b"\r\n" + facts.body
        return self._received() + message

    def _received(self) -> bytes:
        """A Received field for this hop, for spamd's eyes only (as spamass-milter makes).

        MTAs add their own Received field after the milters have seen the message, so
        without it SpamAssassin would not know the client: no DNSBL lookups of its
        address, no trust path, and NO_RELAYS on every message.
        """
        if not self.client_ip:
            return b""
        name = self.client_name
        if not name or name.startswith("[") or name == "unknown":
            name = "unknown"  # no reverse name; SpamAssassin reads Postfix's spelling
        helo = _clean(self.helo_name) or name
        by = _clean(self._macro("j") or "") or "localhost"
        protocol = "ESMTPA" if self.auth_user else "ESMTP"
        queue_id = f" id {_clean(self.queue_id)}" if self.queue_id else ""
        line = (
            f"Received: from {helo} ({_clean(name)} [{_clean(self.client_ip)}])\r\n"
            f"\tby {by} (mailgate) with {protocol}{queue_id};\r\n"
            f"\t{formatdate(localtime=True)}\r\n"
        )
        return line.encode("utf-8", "replace")

    def _check(self, raw: bytes, facts: MessageFacts, settings: Settings) -> dict[str, Any]:
        truncated = bool(facts.extra.get("body_truncated"))
        if too_large(facts.size, truncated, settings):
            self.logger.info(
                "%s: spamd: not checked: %d bytes, over max_size %d",
                self.qid,
                facts.size,
                settings.max_size,
            )
            return skipped_facts()
        client = SpamdClient(
            parse_address(settings.address),
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
            user=settings.user,
        )
        try:
            result = client.check(raw, settings.request)
        except SpamdError as exc:
            self.logger.warning("%s: spamd: not checked: %s", self.qid, exc)
            return error_facts(str(exc))
        self.logger.info(
            "%s: spamd: %s score=%.1f required=%.1f tests=%s",
            self.qid,
            "spam" if result.spam else "ham",
            result.score,
            result.required,
            ",".join(result.symbols) or "none",
        )
        return checked_facts(
            result.spam, result.score, result.required, result.symbols, result.report
        )


def _clean(text: str | None) -> str:
    """One token of a Received field: no spaces, no control characters, no parentheses."""
    return "".join(c for c in (text or "") if c.isprintable() and c not in " ()[];")[:255]


def _one_of(check: LazyFact, name: str) -> Callable[[], Any]:
    """Fact ``name`` of the (shared, lazy) check: the first fact asked for runs it."""
    return lambda: check.get().get(name)
