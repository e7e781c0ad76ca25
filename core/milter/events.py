"""The frames of the milter protocol as small immutable classes, one per command and reply.

Requests travel from the MTA to the milter (SMFIC_*), responses from the milter to the MTA
(SMFIR_*). Strings are ``str`` (UTF-8 on the wire, with undecodable bytes kept as
surrogate escapes so that every frame round-trips); bodies are ``bytes``. The classes carry
no behaviour: ``codec`` turns them into bytes and back, ``client`` gives them meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from mailgate.core.milter import protocol as p

# -- requests: MTA -> milter --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionNegotiation:
    """SMFIC_OPTNEG: the protocol version, the actions and the protocol flags on offer."""

    version: int
    actions: int
    protocol: int


@dataclass(frozen=True, slots=True)
class DefineMacros:
    """SMFIC_MACRO: macro values for the event whose command code is ``command``."""

    command: bytes
    macros: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Connect:
    """SMFIC_CONNECT. ``port`` and ``address`` are absent on the wire for family 'U'."""

    hostname: str
    family: bytes = p.SMFIA_UNKNOWN
    port: int = 0
    address: str = ""


@dataclass(frozen=True, slots=True)
class Helo:
    """SMFIC_HELO: the HELO/EHLO argument."""

    name: str


@dataclass(frozen=True, slots=True)
class Mail:
    """SMFIC_MAIL: ``<sender>`` followed by the ESMTP parameters."""

    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rcpt:
    """SMFIC_RCPT: ``<recipient>`` followed by the ESMTP parameters."""

    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Data:
    """SMFIC_DATA."""


@dataclass(frozen=True, slots=True)
class Header:
    """SMFIC_HEADER: one header; folded lines are separated by LF."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    """SMFIC_EOH."""


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """SMFIC_BODY: up to MILTER_CHUNK_SIZE bytes of body in wire form (CRLF lines)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """SMFIC_BODYEOB. libmilter accepts a last chunk here; MTAs send it empty."""

    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Abort:
    """SMFIC_ABORT: forget the current message (no reply)."""


@dataclass(frozen=True, slots=True)
class Quit:
    """SMFIC_QUIT: the SMTP session is over (no reply)."""


@dataclass(frozen=True, slots=True)
class QuitNewConnection:
    """SMFIC_QUIT_NC: the session is over, another one follows on this socket."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """SMFIC_UNKNOWN: an SMTP command the MTA does not know."""

    command: str


Request: TypeAlias = (
    OptionNegotiation
    | DefineMacros
    | Connect
    | Helo
    | Mail
    | Rcpt
    | Data
    | Header
    | EndOfHeaders
    | BodyChunk
    | EndOfMessage
    | Abort
    | Quit
    | QuitNewConnection
    | Unknown
)

# -- responses: milter -> MTA ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NegotiationReply:
    """SMFIC_OPTNEG answered: what the milter takes, plus its own macro lists by stage."""

    version: int
    actions: int
    protocol: int
    macros: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Continue:
    """SMFIR_CONTINUE."""


@dataclass(frozen=True, slots=True)
class Accept:
    """SMFIR_ACCEPT."""


@dataclass(frozen=True, slots=True)
class Reject:
    """SMFIR_REJECT."""


@dataclass(frozen=True, slots=True)
class Tempfail:
    """SMFIR_TEMPFAIL."""


@dataclass(frozen=True, slots=True)
class Discard:
    """SMFIR_DISCARD."""


@dataclass(frozen=True, slots=True)
class Skip:
    """SMFIR_SKIP."""


@dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """SMFIR_SHUTDOWN."""


@dataclass(frozen=True, slots=True)
class ConnectionFailure:
    """SMFIR_CONNFAIL."""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """SMFIR_REPLYCODE: a complete SMTP reply, lines separated by CRLF."""

    text: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    """SMFIR_ADDHEADER: append a header."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """SMFIR_INSHEADER: insert a header at position ``index`` (0 = top)."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """SMFIR_CHGHEADER: change the ``index``-th header of that name; empty value deletes."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class AddRecipient:
    """SMFIR_ADDRCPT."""

    address: str


@dataclass(frozen=True, slots=True)
class AddRecipientPar:
    """SMFIR_ADDRCPT_PAR: a recipient and its ESMTP arguments (one string, or none)."""

    address: str
    args: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    """SMFIR_DELRCPT."""

    address: str


@dataclass(frozen=True, slots=True)
class ChangeFrom:
    """SMFIR_CHGFROM: a new envelope sender and its ESMTP arguments (one string, or none)."""

    address: str
    args: str | None = None


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """SMFIR_REPLBODY: one chunk of the new body; consecutive chunks concatenate."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Quarantine:
    """SMFIR_QUARANTINE: hold the message, with a reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class SetSymbolList:
    """SMFIR_SETSYMLIST as a frame of its own (libmilter embeds it in the OPTNEG reply)."""

    stage: int
    macros: str


Modification: TypeAlias = (
    AddHeader
    | InsertHeader
    | ChangeHeader
    | AddRecipient
    | AddRecipientPar
    | DeleteRecipient
    | ChangeFrom
    | ReplaceBody
)

Response: TypeAlias = (
    NegotiationReply
    | Continue
    | Accept
    | Reject
    | Tempfail
    | Discard
    | Skip
    | Progress
    | Shutdown
    | ConnectionFailure
    | ReplyCode
    | Quarantine
    | SetSymbolList
    | Modification
)

#: Responses that end the MTA's wait for an event (everything else is progress,
#: a quarantine note or a modification, and more frames follow).
Decision: TypeAlias = (
    Continue
    | Accept
    | Reject
    | Tempfail
    | Discard
    | Skip
    | Shutdown
    | ConnectionFailure
    | ReplyCode
)
DECISIONS = (
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    Skip,
    Shutdown,
    ConnectionFailure,
    ReplyCode,
)
MODIFICATIONS = (
    AddHeader,
    InsertHeader,
    ChangeHeader,
    AddRecipient,
    AddRecipientPar,
    DeleteRecipient,
    ChangeFrom,
    ReplaceBody,
)
