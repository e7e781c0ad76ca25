"""Every SMTP reply the core sends, built in one place, each with its RFC 3463 enhanced code.

RFC 2034 puts an enhanced status code on every 2xx/4xx/5xx reply except the greeting and
the replies to HELO/EHLO; ``Reply.render`` follows that. Replies that still come from
aiosmtpd's own code paths (QUIT, NOOP, STARTTLS, AUTH ...) pass through ``normalize``,
which gives them the same shape, so no reply on the wire lacks its enhanced code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def render(self) -> str:
        """The reply as one or more lines (without CRLF), continuation marked with '-'."""
        lines = self.text.split("\n")
        prefix = f"{self.code} {self.enhanced} " if self.enhanced else f"{self.code} "
        cont = f"{self.code}-{self.enhanced} " if self.enhanced else f"{self.code}-"
        out = [cont + line for line in lines[:-1]]
        out.append(prefix + lines[-1])
        return "\r\n".join(out)

    def __str__(self) -> str:
        return self.render()

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    @property
    def is_error(self) -> bool:
        return self.code >= 400


def ok(text: str = "Ok") -> Reply:
    return Reply(250, "2.0.0", text)


# -- connection level ------------------------------------------------------------------
def greeting(hostname: str) -> str:
    return f"220 {hostname} ESMTP mailgate"


BYE = Reply(221, "2.0.0", "Bye")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing transmission channel")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing transmission channel")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
RATE_LIMITED = Reply(421, "4.7.0", "Connection rate limit exceeded, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
TLS_REQUIRED_CLOSE = Reply(421, "4.7.0", "TLS handshake failed")

# -- syntax and sequence -----------------------------------------------------------------
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
UNRECOGNIZED = Reply(500, "5.5.2", "Command not recognized")
EMPTY_COMMAND = Reply(500, "5.5.2", "Empty command line")
BAD_CHARACTERS = Reply(500, "5.5.2", "Command contains invalid characters")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: HELO hostname")
SYNTAX_EHLO = Reply(501, "5.5.4", "Syntax: EHLO hostname")
SYNTAX_NO_ARGS = Reply(501, "5.5.4", "Syntax error: no arguments allowed")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Unsupported parameter")
PARAM_BAD = Reply(501, "5.5.4", "Invalid parameter value")
# CHUNKING (RFC 3030): a DATA/BDAT mix or BINARYMIME over DATA is a bad sequence (503).
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA not allowed after BDAT in the same transaction")
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT instead of DATA")


def syntax_error(text: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax error: {text}")


# -- addresses ---------------------------------------------------------------------------
BAD_SENDER_SYNTAX = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RCPT_SYNTAX = Reply(553, "5.1.3", "Bad recipient address syntax")
NON_ASCII_NEEDS_SMTPUTF8 = Reply(
    553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter on MAIL"
)
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
LOOKUP_FAILED = Reply(451, "4.3.0", "Recipient address lookup failed, try again later")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by authenticated user")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
NULL_RCPT = Reply(553, "5.1.3", "Null recipient not allowed")

# -- size and content --------------------------------------------------------------------
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Message line too long")


def too_many_hops(hops: int) -> Reply:
    """A message that has been through too many MTAs: a mail loop (RFC 5321 section 6.3)."""
    return Reply(554, "5.4.6", f"Too many hops ({hops} Received headers): mail forwarding loop")


EIGHT_BIT_UNANNOUNCED = Reply(
    554, "5.6.0", "Message contains 8-bit data but BODY=8BITMIME was not given"
)
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
SPOOL_FAILED = Reply(451, "4.3.0", "Message could not be queued, try again later")
PROCESSING_TIMEOUT = Reply(451, "4.4.2", "Message processing timed out, try again later")


def chunk_received(size: int) -> Reply:
    """The reply to a BDAT chunk that is not the last one."""
    return Reply(250, "2.0.0", f"{size} octets received")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# -- AUTH and TLS --------------------------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "AUTH not available")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
AUTH_BAD_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_DURING_MAIL = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")

# -- VRFY/EXPN -------------------------------------------------------------------------------
VRFY_DISABLED = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message for local users")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN not available")


# -- normalization of replies composed elsewhere -------------------------------------------
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_ENHANCED = {
    211: "2.0.0",
    214: "2.0.0",
    220: "2.0.0",
    221: "2.0.0",
    235: "2.7.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.5.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}
# Exact rewrites of texts aiosmtpd composes on its own, so they read like ours.
_REWRITES = {
    "503 Error: send HELO first": NEED_HELO,
    "503 Error: send EHLO first": Reply(503, "5.5.1", "Send EHLO first"),
    "501 Syntax: QUIT": SYNTAX_NO_ARGS,
    "501 Syntax: RSET": SYNTAX_NO_ARGS,
    "501 Syntax: STARTTLS": SYNTAX_NO_ARGS,
    "454 TLS not available": TLS_NOT_AVAILABLE,
    "220 Ready to start TLS": READY_TLS,
    "221 Bye": BYE,
    "250 OK": ok(),
    "503 Already authenticated": AUTH_ALREADY,
    "501 Not enough value": syntax_error("AUTH mechanism [initial-response]"),
    "501 Too many values": syntax_error("AUTH mechanism [initial-response]"),
    "501 5.7.0 Auth aborted": AUTH_ABORTED,
    "501 5.5.2 Can't decode base64": AUTH_BAD_BASE64,
    "500 Error: command 'AUTH' not recognized": Reply(503, "5.5.1", "Send EHLO first"),
}


def normalize(status: str) -> str:
    """Give a reply composed outside this module an enhanced code (RFC 2034) if it lacks one.

    Codes 220 (greeting), 334 (AUTH challenge) and 354 (start data) never carry one.
    """
    rewrite = _REWRITES.get(status)
    if rewrite is not None:
        return rewrite.render()
    if len(status) < 3 or not status[:3].isdigit():
        return status
    code = int(status[:3])
    if code in (220, 334, 354) or _HAS_ENHANCED.match(status):
        return status
    enhanced = _DEFAULT_ENHANCED.get(code)
    if enhanced is None:
        enhanced = f"{status[0]}.0.0" if status[0] in "245" else ""
    if not enhanced:
        return status
    rest = status[4:] if len(status) > 4 else ""
    rest = rest.removeprefix("Error: ")
    sep = status[3:4] or " "
    return f"{code}{sep}{enhanced} {rest}".rstrip()
