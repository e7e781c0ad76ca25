"""The facts a policy decides on: the SMTP envelope, the message, and what daemons learned.

A milter adapter (or `mailgate rules test`, or the core's offline `rules explain`) fills a
MessageFacts; the rule language evaluates conditions against it. MIME parsing is lazy so a
rule set that never looks at the body never pays for it.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from functools import cached_property
from typing import Any


@dataclass
class MessageFacts:
    """One message as seen at end of data (earlier stages leave later fields empty)."""

    client_ip: str = ""
    client_name: str = ""
    helo: str = ""
    auth_user: str | None = None
    mail_from: str = ""
    rcpt_tos: list[str] = field(default_factory=list)
    # Header fields in order, names as sent, values unfolded without the leading space.
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # Facts other daemons or stages added: "spf", "dkim", "dmarc", "dnsbl", "spam_score",
    # "virus", ... (each daemon documents its own).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, raw: bytes, **envelope: Any) -> MessageFacts:
        """Build facts from a complete RFC 5322 message (CRLF or LF line endings)."""
        text = raw.replace(b"\r\n", b"\n")
        head, sep, body = text.partition(b"\n\n")
        if not sep:
            head, body = text, b""
        headers: list[tuple[str, str]] = []
        for line in head.split(b"\n"):
            if not line:
                continue
            if line[:1] in (b" ", b"\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"))
                continue
            raw_name, colon, raw_value = line.partition(b":")
            if not colon:
                continue
            headers.append(
                (
                    raw_name.decode("ascii", "replace").strip(),
                    raw_value.strip().decode("utf-8", "replace"),
                )
            )
        return cls(headers=headers, body=body, **envelope)

    @property
    def size(self) -> int:
        return sum(len(n) + len(v) + 4 for n, v in self.headers) + 2 + len(self.body)

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def raw_message(self) -> bytes:
        head = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        body = self.body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return head.encode("utf-8", "surrogateescape") + b"\r\n" + body

    @cached_property
    def message(self) -> EmailMessage:
        """The parsed MIME structure (stdlib email, default policy)."""
        parsed = BytesParser(policy=email.policy.default).parsebytes(self.raw_message())
        assert isinstance(parsed, EmailMessage)
        return parsed
