"""The milter chain of one SMTP session, run stage by stage the way Postfix runs smtpd_milters.

``MilterChain(specs)`` is created per SMTP session and called at every stage, whatever the
earlier results were; it decides whom to consult. Per stage the milters are asked in
configured order, and the first one whose answer is not "go on" ends the stage for the
others (Postfix's milter.c). In detail (milter8.c):

- CONTINUE (or no reply, for an event the milter switched off) passes to the next milter.
- ACCEPT at CONNECT/HELO: that milter is done for the session (its socket is closed);
  later: it is done for this message; either way the next milters are still asked.
- REJECT/TEMPFAIL/REPLYCODE answer the SMTP command (550 5.7.1 "Command rejected", 451
  4.7.1 "Service unavailable - try again later", or the milter's own text). At
  CONNECT/HELO the answer sticks to every later command of the session. At RCPT only that
  recipient fails and the transaction goes on.
- DISCARD (not at CONNECT/HELO, where it is ignored) accepts the message to drop it; no
  milter hears more of that message.
- SHUTDOWN/CONNFAIL and any 421 reply: 421 4.7.0, and the SMTP side should hang up.
- QUARANTINE (any stage) holds the message. Unlike Postfix's loop, which stops at the
  quarantining milter, the next milters are still asked: Sendmail does this, and Postfix
  documents milter_default_action=quarantine as "like accept, but hold".
- A milter that fails (cannot connect, times out, hangs up, breaks the protocol) gets its
  ``default_action`` for the rest of the session: ``accept`` skips it, ``tempfail``
  answers every later command with 451 4.7.1, ``reject`` with 550 5.5.0, ``quarantine``
  holds every message and skips it. A malformed reply text or an impossible header edit
  answers 451 4.3.5 unless the default is accept or quarantine, as in Postfix.

End of message: each milter receives headers, body and end-of-message in turn, and sees
the message as the milters before it left it (Postfix: "Each milter sees the result of
any changes made by a preceding milter"). Modifications are applied in chain order, each
milter's in the order it sent them (see ``edits``). A message ended without
end_of_message(), or one a milter stopped reading early, is closed with SMFIC_ABORT for
the milters that saw part of it; one that reached end of message needs none.

The SMTP side passes ``SessionInfo`` (macro values) at each call; the chain remembers the
sender and the recipients it let through, which are the envelope EomResult edits.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from mailgate.core.milter import events as ev
from mailgate.core.milter import protocol as p
from mailgate.core.milter.client import MilterConnection, Outcome, SocketSpec
from mailgate.core.milter.edits import MessageEditor
from mailgate.core.milter.errors import MilterFailure
from mailgate.core.milter.macros import (
    MacroContext,
    MacroStage,
    SessionInfo,
    bare_address,
    expand,
    stage_names,
)
from mailgate.core.milter.results import (
    CONFIGURATION_PROBLEM,
    DEFAULT_ACTIONS,
    REJECTED,
    SHUTTING_DOWN,
    TEMPFAILED,
    UNAVAILABLE,
    Action,
    DefaultAction,
    EomResult,
    StageResult,
    parse_reply_text,
)
from mailgate.core.smtp.replies import Reply

log = logging.getLogger("mailgate.milter")

_FAMILIES = {
    "inet": p.SMFIA_INET,
    "inet6": p.SMFIA_INET6,
    "unix": p.SMFIA_UNIX,
    "unknown": p.SMFIA_UNKNOWN,
}


@dataclass(frozen=True)
class MilterSpec:
    """One milter of the chain, as configured (timeouts in seconds, Postfix's defaults)."""

    name: str
    socket: str
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0
    default_action: DefaultAction = "tempfail"
    macros: Mapping[MacroStage, Sequence[str]] | None = None

    def __post_init__(self) -> None:
        SocketSpec.parse(self.socket)
        if self.default_action not in DEFAULT_ACTIONS:
            raise ValueError(f"milter {self.name}: bad default action {self.default_action!r}")
        if min(self.connect_timeout, self.command_timeout, self.content_timeout) <= 0:
            raise ValueError(f"milter {self.name}: timeouts must be positive")


class _State(enum.Enum):
    CLOSED = "closed"  # not connected (yet)
    ENVELOPE = "envelope"  # takes events
    ACCEPT_MSG = "accept-message"  # accepted this message: no events until it ends
    ACCEPT_CON = "accept-session"  # accepted the session: no more events
    REJECT_CON = "reject-session"  # refused the session: its reply answers everything
    FAILED = "failed"  # unusable: its default action applies


@dataclass
class _Member:
    spec: MilterSpec
    conn: MilterConnection
    state: _State = _State.CLOSED
    #: The answer to every later command (session refused, or failed with a reply).
    sticky: StageResult | None = None
    #: Quarantine reason for every message (failed with default action quarantine).
    hold: str | None = None
    #: Saw events of the current message and has not finished it (needs an ABORT).
    dirty: bool = False
    #: Macro names per stage, fixed once the milter has negotiated (see ``_names``).
    names: dict[MacroStage, Sequence[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class _Transaction:
    sender: str
    recipients: list[str] = field(default_factory=list)
    last_recipient: str | None = None
    quarantine: str | None = None
    discarded: bool = False


Send = Callable[[_Member], Awaitable[Outcome]]
#: Expanded macros of one stage call, by (stage, id of the name list).
_MacroCache = dict[tuple[str, int], tuple[tuple[str, str], ...]]


class MilterChain:
    """The configured milters for one SMTP session (see the module doc)."""

    def __init__(self, specs: Sequence[MilterSpec], *, session_id: str = "") -> None:
        self._members = [
            _Member(
                spec,
                MilterConnection(
                    spec.name,
                    spec.socket,
                    connect_timeout=spec.connect_timeout,
                    command_timeout=spec.command_timeout,
                    content_timeout=spec.content_timeout,
                ),
            )
            for spec in specs
        ]
        self._prefix = f"{session_id}: " if session_id else ""
        self._connected = False
        self._closed = False
        self._txn: _Transaction | None = None
        self._session_hold: str | None = None

    async def __aenter__(self) -> MilterChain:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- session stages -------------------------------------------------------------------

    async def connect(self, info: SessionInfo) -> StageResult:
        """Open every milter (in order, until one refuses) and report the client."""
        if self._connected or self._closed:
            raise RuntimeError("connect() is called once per chain")
        self._connected = True
        family = info.family
        address = info.client_addr if family != "unknown" else ""
        hostname = info.client_name
        if hostname == "unknown" and address:
            hostname = f"[{address}]"
        port = info.client_port if family in ("inet", "inet6") else 0
        cache: _MacroCache = {}

        async def send(member: _Member) -> Outcome:
            await member.conn.open()
            member.state = _State.ENVELOPE
            macros = self._macros(member, "connect", info, cache)
            return await member.conn.connect(hostname, _FAMILIES[family], port, address, macros)

        return await self._stage("connect", send, session_level=True, states=(_State.CLOSED,))

    async def helo(self, info: SessionInfo) -> StageResult:
        """HELO/EHLO (again after STARTTLS); ends a transaction in progress."""
        self._require_connected()
        await self.abort()
        name = info.helo or ""
        cache: _MacroCache = {}

        async def send(member: _Member) -> Outcome:
            return await member.conn.helo(name, self._macros(member, "helo", info, cache))

        return await self._stage("helo", send, session_level=True)

    async def unknown(self, info: SessionInfo, command: str) -> StageResult:
        """An SMTP command the server does not know (SMFIC_UNKNOWN, no macros)."""
        self._require_connected()

        async def send(member: _Member) -> Outcome:
            return await member.conn.unknown(command)

        return await self._stage("unknown", send)

    # -- transaction stages -----------------------------------------------------------------

    async def mail(self, info: SessionInfo, sender: str, params: Sequence[str] = ()) -> StageResult:
        """MAIL FROM (``sender`` bare or in angle brackets, "" for the null sender)."""
        self._require_connected()
        await self.abort()
        txn = self._txn = _Transaction(bare_address(sender), quarantine=self._session_hold)
        args = (f"<{txn.sender}>", *params)
        cache: _MacroCache = {}

        async def send(member: _Member) -> Outcome:
            member.dirty = True
            return await member.conn.mail(args, self._macros(member, "mail", info, cache))

        result = await self._stage("mail", send)
        if result.refused:
            await self.abort()
        return result

    async def rcpt(
        self, info: SessionInfo, recipient: str, params: Sequence[str] = ()
    ) -> StageResult:
        """RCPT TO for a recipient the SMTP side accepts; a refusal concerns only it."""
        txn = self._require_transaction()
        if txn.discarded:
            return self._with_hold(StageResult("discard"))
        address = bare_address(recipient)
        txn.last_recipient = address
        args = (f"<{address}>", *params)
        cache: _MacroCache = {}

        async def send(member: _Member) -> Outcome:
            member.dirty = True
            return await member.conn.rcpt(args, self._macros(member, "rcpt", info, cache))

        result = await self._stage("rcpt", send)
        if not result.refused:
            txn.recipients.append(address)
        return result

    async def rcpt_rejected(
        self, info: SessionInfo, recipient: str, params: Sequence[str], reply: Reply
    ) -> None:
        """Tell the milters that asked for them (SMFIP_RCPT_REJ) of a recipient the SMTP
        side refused with ``reply``; their answers are ignored, as in Postfix."""
        txn = self._require_transaction()
        if txn.discarded:
            return
        address = bare_address(recipient)
        context = MacroContext(txn.sender, address, reply)
        for member in self._members:
            if member.state is not _State.ENVELOPE or not member.conn.wants_rejected_recipients:
                continue
            names = self._names(member, "rcpt")
            member.dirty = True
            try:
                await member.conn.rcpt((f"<{address}>", *params), expand(names, info, context))
            except MilterFailure as exc:
                await self._fail(member, exc)

    async def data(self, info: SessionInfo) -> StageResult:
        """The DATA command (before the message content is read)."""
        txn = self._require_transaction()
        if txn.discarded:
            return self._with_hold(StageResult("discard"))

        cache: _MacroCache = {}

        async def send(member: _Member) -> Outcome:
            return await member.conn.data(self._macros(member, "data", info, cache))

        return await self._stage("data", send)

    async def end_of_message(
        self, info: SessionInfo, headers: Sequence[tuple[str, str]], body: bytes
    ) -> EomResult:
        """Run the message through every milter in turn and end the transaction.

        ``headers`` are (name, value) with the value in wire form: what follows the colon,
        leading space and CRLF folding included; ``body`` is in wire form (CRLF lines, no
        dot-stuffing, no final "."). Header indexes of the milters' edits count within
        ``headers``.
        """
        txn = self._require_transaction()
        editor = MessageEditor(list(headers), body, txn.sender, list(txn.recipients))
        verdict: StageResult | None = None
        cache: _MacroCache = {}
        if txn.discarded:
            verdict = StageResult("discard")
        else:
            for member in self._members:
                if member.state is not _State.ENVELOPE:
                    verdict = self._bypass(member)
                    if verdict is not None:
                        break
                    continue
                verdict = await self._message_to(member, editor, info, cache)
                if verdict is not None:
                    break
        result = self._with_hold(verdict or self._pass_result())
        await self.abort()
        return EomResult(
            action=result.action,
            reply=result.reply,
            milter=result.milter,
            disconnect=result.disconnect,
            quarantine=result.quarantine,
            headers=editor.headers,
            body=editor.body,
            sender=editor.sender,
            sender_params=editor.sender_params,
            recipients=tuple(editor.recipients),
            added_recipients=tuple(editor.added_recipients),
            deleted_recipients=tuple(editor.deleted_recipients),
            headers_changed=editor.headers_changed,
            body_replaced=editor.body_replaced,
            sender_changed=editor.sender_changed,
        )

    async def _message_to(
        self, member: _Member, editor: MessageEditor, info: SessionInfo, cache: _MacroCache
    ) -> StageResult | None:
        eoh = self._macros(member, "eoh", info, cache)
        eom = self._macros(member, "eom", info, cache)
        member.dirty = True
        try:
            outcome = await member.conn.message(
                editor.headers, editor.body, eoh_macros=eoh, eom_macros=eom
            )
        except MilterFailure as exc:
            return await self._fail(member, exc)
        if outcome.complete:
            member.dirty = False
        if outcome.quarantine is not None:
            self._note_hold(member, outcome.quarantine)
        if outcome.modifications:
            editor.apply(outcome.modifications, leading_space=member.conn.leading_space)
            log.info(
                "%smilter %s: %d modification(s) at end of message",
                self._prefix,
                member.name,
                len(outcome.modifications),
            )
        return await self._judge(member, "eom", outcome.decision, session_level=False)

    async def abort(self) -> None:
        """End the current transaction without a message (RSET, a refused MAIL or DATA,
        a lost client). Harmless when none is open."""
        if self._txn is None:
            return
        self._txn = None
        for member in self._members:
            if member.state is _State.ACCEPT_MSG:
                member.state = _State.ENVELOPE
            if member.dirty and member.state is _State.ENVELOPE:
                try:
                    await member.conn.abort()
                except MilterFailure as exc:
                    await self._fail(member, exc)
            member.dirty = False

    async def close(self) -> None:
        """End the session: QUIT to every milter still connected. Never raises."""
        if self._closed:
            return
        self._closed = True
        self._txn = None
        for member in self._members:
            await member.conn.close()

    # -- the stage loop -------------------------------------------------------------------------

    async def _stage(
        self,
        stage: str,
        send: Send,
        *,
        session_level: bool = False,
        states: tuple[_State, ...] = (_State.ENVELOPE,),
    ) -> StageResult:
        for member in self._members:
            if member.state not in states:
                sticky = self._bypass(member)
                if sticky is not None:
                    return self._with_hold(sticky)
                continue
            try:
                outcome = await send(member)
            except MilterFailure as exc:
                failed = await self._fail(member, exc)
                if failed is not None:
                    return self._with_hold(failed)
                continue
            if outcome.quarantine is not None:
                self._note_hold(member, outcome.quarantine)
            verdict = await self._judge(
                member, stage, outcome.decision, session_level=session_level
            )
            if verdict is not None:
                return self._with_hold(verdict)
        return self._with_hold(self._pass_result())

    def _bypass(self, member: _Member) -> StageResult | None:
        """A milter not asked at this stage: its sticky answer if any, else nothing."""
        if member.hold is not None:
            self._note_hold(member, member.hold)
        return member.sticky

    async def _judge(
        self, member: _Member, stage: str, decision: ev.Decision | None, *, session_level: bool
    ) -> StageResult | None:
        """What one milter's decision means; None lets the next milter speak."""
        match decision:
            case None | ev.Continue() | ev.Skip():
                return None
            case ev.Accept():
                log.info("%smilter %s: %s: accept", self._prefix, member.name, stage)
                if session_level:
                    # Done for the session; libmilter hangs up after this anyway.
                    member.state = _State.ACCEPT_CON
                    await member.conn.close()
                else:
                    member.state = _State.ACCEPT_MSG
                return None
            case ev.Discard():
                if session_level:
                    log.warning(
                        "%smilter %s: DISCARD is not allowed at %s; ignored",
                        self._prefix,
                        member.name,
                        stage,
                    )
                    return None
                log.info("%smilter %s: %s: discard", self._prefix, member.name, stage)
                member.state = _State.ACCEPT_MSG
                if self._txn is not None:
                    self._txn.discarded = True
                return StageResult("discard", milter=member.name)
            case ev.Reject():
                return await self._refuse(member, stage, REJECTED, session_level)
            case ev.Tempfail():
                return await self._refuse(member, stage, TEMPFAILED, session_level)
            case ev.Shutdown() | ev.ConnectionFailure():
                return await self._refuse(member, stage, SHUTTING_DOWN, True)
            case ev.ReplyCode(text):
                reply = parse_reply_text(text)
                if reply is None:
                    failure = MilterFailure(member.name, "config", f"malformed reply {text!r}")
                    return await self._fail(member, failure)
                return await self._refuse(member, stage, reply, session_level or reply.code == 421)
        raise AssertionError(f"unhandled decision {decision!r}")

    async def _refuse(
        self, member: _Member, stage: str, reply: Reply, session_level: bool
    ) -> StageResult:
        action: Action = "tempfail" if reply.code < 500 else "reject"
        result = StageResult(action, reply, member.name, disconnect=reply.code == 421)
        log.info("%smilter %s: %s: %s: %s", self._prefix, member.name, stage, action, reply)
        if session_level:
            # libmilter closes its side after such an answer at CONNECT/HELO, and the
            # answer stands for the rest of the session.
            member.state = _State.REJECT_CON
            member.sticky = result
            member.dirty = False
            await member.conn.close()
        return result

    async def _fail(self, member: _Member, exc: MilterFailure) -> StageResult | None:
        """Put a failed milter into its default action; its sticky answer, if any."""
        action = member.spec.default_action
        log.warning(
            "%smilter %s: %s; default action %s", self._prefix, member.name, exc.reason, action
        )
        await member.conn.close()
        member.state = _State.FAILED
        member.dirty = False
        if action == "accept":
            return None
        if action == "quarantine":
            member.hold = f"milter {member.name} unavailable"
            self._note_hold(member, member.hold)
            return None
        if exc.kind == "config":
            reply = CONFIGURATION_PROBLEM
        else:
            reply = UNAVAILABLE if action == "reject" else TEMPFAILED
        member.sticky = StageResult(
            "reject" if reply.code >= 500 else "tempfail", reply, member.name
        )
        return member.sticky

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _names(member: _Member, stage: MacroStage) -> Sequence[str]:
        """The milter's macro list for ``stage``; it cannot change after negotiation."""
        names = member.names.get(stage)
        if names is None:
            names = stage_names(stage, member.conn.macro_lists, member.spec.macros)
            if member.conn.version:
                member.names[stage] = names
        return names

    def _macros(
        self, member: _Member, stage: MacroStage, info: SessionInfo, cache: _MacroCache
    ) -> tuple[tuple[str, str], ...]:
        """Macro values for one stage call; milters with the same list share the values
        (``cache`` lives for one stage of one SMTP command)."""
        names = self._names(member, stage)
        key = (stage, id(names))
        values = cache.get(key)
        if values is None:
            txn = self._txn
            context = MacroContext(txn.sender if txn else None, txn.last_recipient if txn else None)
            values = cache[key] = expand(names, info, context)
        return values

    def _note_hold(self, member: _Member, reason: str) -> None:
        # Outside a transaction (CONNECT, HELO) a hold applies to every message to come.
        if self._txn is None:
            if self._session_hold is None:
                self._session_hold = reason
        elif self._txn.quarantine is None:
            log.info("%smilter %s: quarantine: %s", self._prefix, member.name, reason)
            self._txn.quarantine = reason

    def _with_hold(self, result: StageResult) -> StageResult:
        hold = self._txn.quarantine if self._txn is not None else self._session_hold
        if hold is None:
            return result
        if result.action in ("continue", "accept"):
            return dataclasses.replace(result, action="quarantine", quarantine=hold)
        return dataclasses.replace(result, quarantine=hold)

    def _pass_result(self) -> StageResult:
        """Everyone let the stage pass: "accept" if no milter wants more, else "continue"."""
        if self._members and not any(m.state is _State.ENVELOPE for m in self._members):
            return StageResult("accept")
        return StageResult("continue")

    def _require_connected(self) -> None:
        if not self._connected or self._closed:
            raise RuntimeError("the chain is not connected (call connect() first)")

    def _require_transaction(self) -> _Transaction:
        self._require_connected()
        if self._txn is None:
            raise RuntimeError("no transaction in progress (call mail() first)")
        return self._txn
