"""mailgate.core.milter: the MTA side of the Sendmail milter protocol (codec, client, chain).

Layers, each usable alone: ``protocol`` (constants), ``events`` and ``codec`` (frames and
bytes, no I/O), ``client`` (one asyncio connection to one milter), ``macros``, ``edits``
and ``results`` (pure helpers), and ``chain`` (the configured milters of one SMTP session,
run the way Postfix runs smtpd_milters). The names below are what the SMTP side needs.
"""

from mailgate.core.milter.chain import MilterChain, MilterSpec
from mailgate.core.milter.client import MilterConnection, Outcome, SocketSpec
from mailgate.core.milter.errors import MilterError, MilterFailure, MilterProtocolError
from mailgate.core.milter.macros import DEFAULT_MACROS, MacroStage, SessionInfo
from mailgate.core.milter.results import Action, DefaultAction, EomResult, StageResult

__all__ = [
    "DEFAULT_MACROS",
    "Action",
    "DefaultAction",
    "EomResult",
    "MacroStage",
    "MilterChain",
    "MilterConnection",
    "MilterError",
    "MilterFailure",
    "MilterProtocolError",
    "MilterSpec",
    "Outcome",
    "SessionInfo",
    "SocketSpec",
    "StageResult",
]
