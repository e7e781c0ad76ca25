"""The facts a policy decides on: the SMTP envelope, the message, and what daemons learned.

A milter adapter (or `mailgate rules test`, or the core's offline `rules explain`) fills a
MessageFacts; the rule language evaluates conditions against it. MIME parsing is lazy so a
rule set that never looks at the body never pays for it.
"""

from __future__ import annotations

import email.policy
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from functools import cached_property
from threading import Lock
from typing import Any


class LazyFact:
    """A fact computed only when a rule first asks for it (a virus scan, a DNS lookup,
    a greylist check), then remembered. Rules placed before the first rule that asks for
    it (allow-lists, trusted networks, authenticated users) therefore skip the work.
    """

    __slots__ = ("_compute", "_done", "_lock", "_value")

    def __init__(self, compute: Callable[[], Any]) -> None:
        self._compute = compute
        self._done = False
        self._value: Any = None
        self._lock = Lock()

    @property
    def computed(self) -> bool:
        return self._done

    def get(self) -> Any:
        if not self._done:
            with self._lock:
                if not self._done:
                    self._value = self._compute()
                    self._done = True
        return self._value


def resolve(value: Any) -> Any:
    """A fact's value, computing it first if it is lazy."""
    return value.get() if isinstance(value, LazyFact) else value


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
    # "virus", ... (each daemon documents its own). A value may be a LazyFact.
    extra: dict[str, Any] = field(default_factory=dict)

    def fact(self, name: str) -> Any:
        """The value of fact ``name`` (computed now if it is lazy), or None."""
        return resolve(self.extra.get(name))

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
