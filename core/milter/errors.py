"""The exceptions of the milter client: a malformed byte stream, and a milter that failed.

``MilterProtocolError`` comes from the pure codec and says only that some bytes are not a
valid frame. ``MilterFailure`` comes from the connection and means that one milter can no
longer be used for this SMTP session (it timed out, hung up, broke the protocol or sent a
decision that makes no sense); the chain answers it with that milter's default action.
"""

from __future__ import annotations

from typing import Literal

from mailgate.core.errors import MailgateError

FailureKind = Literal["connect", "timeout", "io", "protocol", "config"]


class MilterError(MailgateError):
    """Base of every error raised deliberately by mailgate.core.milter."""


class MilterProtocolError(MilterError):
    """Bytes that are not a valid milter frame, or a frame that is too large."""


class MilterFailure(MilterError):
    """One milter is unusable for the rest of the SMTP session.

    ``kind`` tells the chain which default reply applies: Postfix answers ``config``
    errors (a malformed reply text, an impossible header edit) with "451 4.3.5 Server
    configuration problem" rather than the configured reject text.
    """

    def __init__(self, milter: str, kind: FailureKind, reason: str) -> None:
        super().__init__(f"milter {milter}: {reason}")
        self.milter = milter
        self.kind: FailureKind = kind
        self.reason = reason
