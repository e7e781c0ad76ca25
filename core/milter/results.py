"""What the milter chain tells the SMTP side: stage results, the end-of-message result, and
the SMTP replies Postfix uses for milter decisions.

Replies reuse ``mailgate.core.smtp.replies.Reply`` so that the SMTP side renders them like
every other reply. The texts are Postfix's (milter8.c), so operators and log parsers see
what they know: REJECT is "550 5.7.1 Command rejected", TEMPFAIL and an unavailable milter
with default action tempfail are "451 4.7.1 Service unavailable - try again later".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from mailgate.core.smtp.replies import Reply

Action = Literal["continue", "accept", "reject", "tempfail", "discard", "quarantine"]
DefaultAction = Literal["tempfail", "accept", "reject", "quarantine"]
DEFAULT_ACTIONS: tuple[DefaultAction, ...] = ("tempfail", "accept", "reject", "quarantine")

REJECTED = Reply(550, "5.7.1", "Command rejected")
TEMPFAILED = Reply(451, "4.7.1", "Service unavailable - try again later")
SHUTTING_DOWN = Reply(421, "4.7.0", "Server closing connection")
#: A milter that failed, default action reject.
UNAVAILABLE = Reply(550, "5.5.0", "Service unavailable")
#: A milter that sent something impossible (Postfix's milter8_conf_error).
CONFIGURATION_PROBLEM = Reply(451, "4.3.5", "Server configuration problem - try again later")


@dataclass(frozen=True, slots=True)
class StageResult:
    """The chain's verdict on one SMTP stage.

    ``continue``: go on. ``accept``: go on, and no milter wants more of this message (or
    session, after connect/helo). ``reject``/``tempfail``: answer with ``reply`` (for RCPT
    only that recipient fails). ``discard``: accept, then drop the message. ``quarantine``:
    go on, but the message is to be held (``quarantine`` gives the reason). ``disconnect``
    asks the SMTP side to close the session after the reply (a 421 from a milter).
    """

    action: Action = "continue"
    reply: Reply | None = None
    milter: str | None = None
    disconnect: bool = False
    quarantine: str | None = None

    @property
    def refused(self) -> bool:
        """True when the SMTP command must be answered with ``reply`` (4xx or 5xx)."""
        return self.action in ("reject", "tempfail")


@dataclass(frozen=True, slots=True)
class EomResult(StageResult):
    """The verdict at end of message, with the message as the milters left it.

    ``headers`` use the same wire form as the input (value after the colon, leading space
    and CRLF folding kept) and ``body`` is in wire form. ``recipients`` is the envelope
    after every ADDRCPT/DELRCPT; ``added_recipients`` lists each added recipient with its
    ESMTP parameters, ``deleted_recipients`` each removed one. ``sender_params`` is None
    unless a milter changed the sender (then it holds the new ESMTP parameters).
    """

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    sender: str = ""
    sender_params: tuple[str, ...] | None = None
    recipients: tuple[str, ...] = ()
    added_recipients: tuple[tuple[str, tuple[str, ...]], ...] = ()
    deleted_recipients: tuple[str, ...] = ()
    headers_changed: bool = False
    body_replaced: bool = False
    sender_changed: bool = False


def _unescape_percent(text: str) -> str:
    # Sendmail treats the reply as a format string, so milters double every '%'. Like
    # Postfix, turn '%%' into '%' and drop a lone '%'.
    if "%" not in text:
        return text
    out = []
    chars = iter(text)
    for char in chars:
        out.append(next(chars, "") if char == "%" else char)
    return "".join(out)


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


def parse_reply_text(text: str) -> Reply | None:
    """The SMTP reply in a SMFIR_REPLYCODE, or None when it is malformed.

    The first line must start with a 4xx or 5xx code and a space or '-'; an enhanced code
    that follows must be of the same class (Postfix's checks). Multi-line replies become
    one Reply with lines separated by LF. Without an enhanced code, x.7.1 is used, as the
    core gives every reply one.
    """
    text = _unescape_percent(text)
    lines = text.replace("\r\n", "\n").split("\n")
    while len(lines) > 1 and not lines[-1]:
        lines.pop()
    first = lines[0]
    if (
        len(first) < 4
        or first[0] not in "45"
        or not first[1:3].isdigit()
        or first[3] not in " -"
        or (len(first) > 4 and first[4].isdigit() and first[4] != first[0])
    ):
        return None
    code = first[:3]
    enhanced = ""
    texts = []
    for line in lines:
        rest = line[4:] if line[:3] == code and line[3:4] in (" ", "-", "") else line
        match = _ENHANCED.match(rest)
        if match:
            enhanced = enhanced or match.group(0)
            rest = rest[match.end() :].removeprefix(" ")
        texts.append(rest)
    return Reply(int(code), enhanced or f"{code[0]}.7.1", "\n".join(texts))
