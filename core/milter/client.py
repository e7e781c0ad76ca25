"""One asyncio connection to one milter, for one SMTP session: the MTA side of the wire.

``MilterConnection`` opens the socket, negotiates options (version 6, every action and
protocol flag we support; the milter's choice is honoured: events it switched off with
SMFIP_NO* are not sent, replies it switched off with SMFIP_NR_* are not awaited, SMFIR_SKIP
skips the rest of the body), and sends one event at a time with the macros given for it.
What a reply *means* for the SMTP session is the chain's business: each call returns an
``Outcome`` holding the milter's decision frame, the modifications it asked for at end of
message, and a quarantine reason if it sent one.

Timeouts follow Postfix: ``connect_timeout`` for the connection, ``command_timeout`` for
every wait during negotiation and the envelope stages, ``content_timeout`` for every wait
while the message goes out. Each timeout covers one write or one reply, so SMFIR_PROGRESS
starts the clock again. A write waits only while the socket's buffer is above its
high-water mark; frames of message events the milter wants no reply to (SMFIP_NR_HDR,
NR_EOH, NR_BODY) are held back and written together with the next frame that expects one.

A timeout, a closed socket, a malformed frame or a reply out of place raises
``MilterFailure``; the connection is then dropped and every later call raises again, so
the chain can apply the milter's default action.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from mailgate.core.milter import events as ev
from mailgate.core.milter import protocol as p
from mailgate.core.milter.codec import DEFAULT_MAX_FRAME, ReplyDecoder, encode
from mailgate.core.milter.errors import FailureKind, MilterFailure, MilterProtocolError
from mailgate.core.milter.macros import SYMLIST_STAGES, MacroStage, parse_macro_list

log = logging.getLogger("mailgate.milter")

Macros = Sequence[tuple[str, str]]

_CLOSE_WAIT = 1.0
#: Frames of events that need no reply are held back and go out with the next frame that
#: does, up to this many bytes (then they are written at once).
_COALESCE_LIMIT = 256 * 1024


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """Where a milter listens: ``inet:PORT@HOST``, ``inet6:PORT@HOST``, Postfix's
    ``inet:HOST:PORT`` (``inet:[::1]:PORT`` for IPv6), or ``unix:/path`` (also ``local:``).
    """

    family: Literal["inet", "inet6", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, spec: str) -> SocketSpec:
        kind, sep, rest = spec.strip().partition(":")
        kind = kind.lower()
        if not sep or not rest:
            raise ValueError(f"{spec!r}: expected TYPE:ADDRESS")
        if kind in ("unix", "local"):
            if not rest.startswith("/"):
                raise ValueError(f"{spec!r}: a unix socket needs an absolute path")
            return cls("unix", path=rest)
        if kind not in ("inet", "inet6"):
            raise ValueError(f"{spec!r}: unknown socket type {kind!r}")
        if "@" in rest:
            port_text, _, host = rest.partition("@")
        else:
            host, _, port_text = rest.rpartition(":")
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not re.fullmatch(r"\d{1,5}", port_text) or not 0 < int(port_text) < 65536:
            raise ValueError(f"{spec!r}: expected {kind}:PORT@HOST or {kind}:HOST:PORT")
        family: Literal["inet", "inet6"] = "inet6" if kind == "inet6" or ":" in host else "inet"
        return cls(family, host=host, port=int(port_text))

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"{self.family}:{self.port}@{self.host}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one event brought back from the milter.

    ``decision`` is None when nothing was awaited: the event was switched off (SMFIP_NO*,
    an older protocol version, an earlier SMFIR_SKIP) or its reply was (SMFIP_NR_*).
    ``complete`` is set by ``message`` once end-of-message was answered, i.e. the milter
    has finished with the message and needs no SMFIC_ABORT.
    """

    decision: ev.Decision | None = None
    modifications: tuple[ev.Modification, ...] = ()
    quarantine: str | None = None
    complete: bool = False


_NOTHING = Outcome()
_CONTINUED = Outcome(ev.Continue())


def _version_events(version: int) -> int:
    """The SMFIP_NO* events a milter of ``version`` knows (others must not be sent)."""
    if version >= 4:
        return p.MILTER_V4_EVENTS
    if version == 3:
        return p.MILTER_V3_EVENTS
    return p.MILTER_V2_EVENTS


def _is_final(decision: ev.Decision | None) -> bool:
    return decision is not None and not isinstance(decision, ev.Continue | ev.Skip)


class _Wire(asyncio.Protocol):
    """The socket side of one connection: bytes in go straight into the reply decoder,
    bytes out go straight to the transport.

    One task at a time waits on it (``wait``), for a reply or for the write buffer to
    drain, until a deadline. The deadline is kept by one lazily re-armed timer instead of
    a timer per wait: setting a later deadline costs nothing, and the timer, when it fires
    early, moves itself to the current deadline.
    """

    def __init__(self, decoder: ReplyDecoder) -> None:
        self._loop = asyncio.get_running_loop()
        self._decoder = decoder
        self.transport: asyncio.Transport | None = None
        self.inbox: deque[ev.Response] = deque()
        #: Why no more replies will come: a malformed stream, EOF, a lost connection.
        self.read_error: BaseException | None = None
        #: Set once the connection is gone: writing is pointless.
        self.lost = False
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance here.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.read_error is not None:
            return
        try:
            frames = self._decoder.feed(data)
        except MilterProtocolError as exc:
            self.read_error = exc
            if self.transport is not None:
                self.transport.pause_reading()
            self._wake()
            return
        if frames:
            self.inbox.extend(frames)
            self._wake()

    def eof_received(self) -> bool:
        if self.read_error is None:
            self.read_error = ConnectionError("connection closed by the milter")
        self._wake()
        return True  # keep our side open for writing, as StreamReaderProtocol does

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.paused = False
        if self.read_error is None:
            self.read_error = exc or ConnectionError("connection closed by the milter")
        self._wake()
        self.cancel_timer()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    # -- waiting --------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until something happens on the connection, or TimeoutError after ``timeout``."""
        loop = self._loop
        deadline = self._deadline = loop.time() + timeout
        if self._timer is None:
            self._timer_when = deadline
            self._timer = loop.call_at(deadline, self._on_timer)
        elif self._timer_when > deadline:
            self._timer.cancel()
            self._timer_when = deadline
            self._timer = loop.call_at(deadline, self._on_timer)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms a new timer
        if self._deadline <= self._timer_when:
            waiter.set_exception(TimeoutError())
        else:
            self._timer_when = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class MilterConnection:
    """The MTA's connection to one milter for one SMTP session (see the module doc)."""

    def __init__(
        self,
        name: str,
        socket: str | SocketSpec,
        *,
        connect_timeout: float = 30.0,
        command_timeout: float = 30.0,
        content_timeout: float = 300.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        actions: int = p.SMFI_V6_ACTS,
        protocol: int = p.MILTER_V6_PROTOCOL,
    ) -> None:
        self.name = name
        self.socket = socket if isinstance(socket, SocketSpec) else SocketSpec.parse(socket)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        self.offered_actions = actions
        self.offered_protocol = protocol
        self._wire: _Wire | None = None
        self._transport: asyncio.Transport | None = None
        self._decoder = ReplyDecoder(max_frame)
        #: Frames of no-reply events not written yet (see ``_COALESCE_LIMIT``).
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._failure: MilterFailure | None = None
        self._skip_code: bytes | None = None
        self._not_in_version = 0
        #: What the milter took at negotiation.
        self.version = 0
        self.actions = 0
        self.protocol = 0
        #: Macro lists the milter asked for (SMFIF_SETSYMLIST), by stage.
        self.macro_lists: dict[MacroStage, tuple[str, ...]] = {}

    # -- state ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._failure is None

    @property
    def failure(self) -> MilterFailure | None:
        return self._failure

    @property
    def wants_rejected_recipients(self) -> bool:
        return bool(self.protocol & p.SMFIP_RCPT_REJ)

    @property
    def leading_space(self) -> bool:
        """SMFIP_HDR_LEADSPC: header values travel with their leading space, both ways."""
        return bool(self.protocol & p.SMFIP_HDR_LEADSPC)

    # -- opening and closing ----------------------------------------------------------------

    async def open(self) -> None:
        """Connect and negotiate; MilterFailure if the milter cannot be used."""
        if self._transport is not None or self._failure is not None:
            raise RuntimeError(f"milter {self.name}: connection already used")
        with self._guard("connecting", io_kind="connect"):
            loop = asyncio.get_running_loop()
            decoder = self._decoder

            def factory() -> _Wire:
                return _Wire(decoder)

            async with asyncio.timeout(self.connect_timeout):
                if self.socket.family == "unix":
                    transport, wire = await loop.create_unix_connection(factory, self.socket.path)
                else:
                    transport, wire = await loop.create_connection(
                        factory, self.socket.host, self.socket.port
                    )
            self._transport, self._wire = transport, wire
        with self._guard("negotiating"):
            offer = ev.OptionNegotiation(
                p.SMFI_PROT_VERSION, self.offered_actions, self.offered_protocol
            )
            await self._write(encode(offer), self.command_timeout)
            reply = await self._receive(self.command_timeout)
            if not isinstance(reply, ev.NegotiationReply):
                raise MilterProtocolError(f"expected the negotiation reply, got {reply!r}")
            self._accept_negotiation(reply)
        log.debug(
            "milter %s: version %d, actions %s, protocol %s",
            self.name,
            self.version,
            p.describe_mask(self.actions, p.ACTION_NAMES),
            p.describe_mask(self.protocol, p.PROTOCOL_NAMES),
        )

    def _accept_negotiation(self, reply: ev.NegotiationReply) -> None:
        if not p.SMFI_PROT_VERSION_MIN <= reply.version <= p.SMFI_PROT_VERSION:
            raise MilterProtocolError(f"unsupported protocol version {reply.version}")
        if reply.actions & ~self.offered_actions:
            raise MilterProtocolError(
                f"actions {reply.actions:#x} exceed what was offered ({self.offered_actions:#x})"
            )
        unexpected = reply.protocol & ~self.offered_protocol
        if unexpected:
            log.info(
                "milter %s: ignoring protocol flags not offered: %s",
                self.name,
                p.describe_mask(unexpected, p.PROTOCOL_NAMES),
            )
        self.version = reply.version
        self.actions = reply.actions
        self.protocol = reply.protocol & self.offered_protocol
        self._not_in_version = p.SMFIP_NOSEND_MASK & ~_version_events(reply.version)
        for number, names in reply.macros:
            stage = SYMLIST_STAGES.get(number)
            if stage is None:
                log.warning("milter %s: macro list for unknown stage %d", self.name, number)
                continue
            self.macro_lists[stage] = parse_macro_list(names)

    async def close(self) -> None:
        """Say QUIT if the connection is still sound, then close; never raises."""
        transport, self._transport = self._transport, None
        wire, self._wire = self._wire, None
        if transport is None or wire is None:
            return
        if self._failure is None:
            with contextlib.suppress(Exception):
                self._take_pending()
                transport.write(encode(ev.Quit()))
        transport.close()
        with contextlib.suppress(Exception):
            while not wire.lost:
                await wire.wait(_CLOSE_WAIT)
        wire.cancel_timer()

    # -- envelope events --------------------------------------------------------------------

    async def connect(
        self, hostname: str, family: bytes, port: int, address: str, macros: Macros = ()
    ) -> Outcome:
        if family == p.SMFIA_UNKNOWN:
            request = ev.Connect(_clean(hostname))
        else:
            request = ev.Connect(_clean(hostname), family, port, _clean(address))
        return await self._event(
            request,
            p.SMFIC_CONNECT,
            p.SMFIP_NOCONNECT,
            p.SMFIP_NR_CONN,
            macros,
            self.command_timeout,
        )

    async def helo(self, name: str, macros: Macros = ()) -> Outcome:
        return await self._event(
            ev.Helo(_clean(name)),
            p.SMFIC_HELO,
            p.SMFIP_NOHELO,
            p.SMFIP_NR_HELO,
            macros,
            self.command_timeout,
        )

    async def mail(self, args: Sequence[str], macros: Macros = ()) -> Outcome:
        request = ev.Mail(tuple(_clean(arg) for arg in args))
        return await self._event(
            request, p.SMFIC_MAIL, p.SMFIP_NOMAIL, p.SMFIP_NR_MAIL, macros, self.command_timeout
        )

    async def rcpt(self, args: Sequence[str], macros: Macros = ()) -> Outcome:
        request = ev.Rcpt(tuple(_clean(arg) for arg in args))
        return await self._event(
            request, p.SMFIC_RCPT, p.SMFIP_NORCPT, p.SMFIP_NR_RCPT, macros, self.command_timeout
        )

    async def data(self, macros: Macros = ()) -> Outcome:
        return await self._event(
            ev.Data(), p.SMFIC_DATA, p.SMFIP_NODATA, p.SMFIP_NR_DATA, macros, self.command_timeout
        )

    async def unknown(self, command: str, macros: Macros = ()) -> Outcome:
        return await self._event(
            ev.Unknown(_clean(command)),
            p.SMFIC_UNKNOWN,
            p.SMFIP_NOUNKNOWN,
            p.SMFIP_NR_UNKN,
            macros,
            self.command_timeout,
        )

    async def abort(self) -> None:
        """SMFIC_ABORT: forget the current message. No reply comes back."""
        self._check_usable()
        self._skip_code = None
        with self._guard("sending ABORT"):
            await self._write(encode(ev.Abort()), self.command_timeout)

    # -- the message --------------------------------------------------------------------------

    async def message(
        self,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        eoh_macros: Macros = (),
        eom_macros: Macros = (),
    ) -> Outcome:
        """Headers, end of headers, body chunks and end of message, stopping early when
        the milter decides before the end. ``headers`` hold values in wire form (leading
        space and CRLF folding kept); ``body`` is the body in wire form (CRLF lines,
        not dot-stuffed).

        Frames of events whose reply the milter switched off (SMFIP_NR_HDR, NR_EOH,
        NR_BODY) are not written one by one: they go out together with the next frame
        that expects a reply, at the latest with end of message.
        """
        timeout = self.content_timeout
        quarantine: str | None = None
        event = self._event
        for name, value in headers:
            outcome = await event(
                ev.Header(_clean(name), self._header_value(value)),
                p.SMFIC_HEADER,
                p.SMFIP_NOHDRS,
                p.SMFIP_NR_HDR,
                None,
                timeout,
                hold=True,
            )
            if outcome is not _NOTHING:
                quarantine = quarantine or outcome.quarantine
                if _is_final(outcome.decision):
                    return Outcome(outcome.decision, quarantine=quarantine)
        outcome = await event(
            ev.EndOfHeaders(),
            p.SMFIC_EOH,
            p.SMFIP_NOEOH,
            p.SMFIP_NR_EOH,
            eoh_macros,
            timeout,
            hold=True,
        )
        quarantine = quarantine or outcome.quarantine
        if _is_final(outcome.decision):
            return Outcome(outcome.decision, quarantine=quarantine)
        size = p.MILTER_CHUNK_SIZE
        for start in range(0, len(body), size):
            if self._skip_code == p.SMFIC_BODY:
                break
            chunk = ev.BodyChunk(body[start : start + size])
            outcome = await event(
                chunk, p.SMFIC_BODY, p.SMFIP_NOBODY, p.SMFIP_NR_BODY, None, timeout, hold=True
            )
            if outcome is not _NOTHING:
                quarantine = quarantine or outcome.quarantine
                if _is_final(outcome.decision):
                    return Outcome(outcome.decision, quarantine=quarantine)
        outcome = await event(
            ev.EndOfMessage(), p.SMFIC_BODYEOB, 0, 0, eom_macros, timeout, final=True
        )
        return Outcome(
            outcome.decision,
            outcome.modifications,
            quarantine or outcome.quarantine,
            complete=True,
        )

    def _header_value(self, value: str) -> str:
        # Sendmail (and Postfix) send folded headers with bare LF between the lines and,
        # unless the milter asked for HDR_LEADSPC, without the one space after the colon.
        value = _clean(value)
        if "\r\n" in value:
            value = value.replace("\r\n", "\n")
        if value[:1] == " " and not self.protocol & p.SMFIP_HDR_LEADSPC:
            value = value[1:]
        return value

    # -- one event ----------------------------------------------------------------------------

    async def _event(
        self,
        request: ev.Request,
        code: bytes,
        no_send: int,
        no_reply: int,
        macros: Macros | None,
        timeout: float,
        *,
        final: bool = False,
        hold: bool = False,
    ) -> Outcome:
        """Send one event (``code`` is its command code) with its macros and await the
        reply unless none is due. With ``hold``, a frame that expects no reply is kept
        back for the next write (the caller must end with an event that is awaited)."""
        if self._failure is not None or self._transport is None:
            self._check_usable()
        try:
            frame = encode(request)
            if no_send & self._not_in_version:
                return _NOTHING
            if self._skip_code is not None:
                if code == self._skip_code:
                    return _NOTHING
                self._skip_code = None
            protocol = self.protocol
            # Macros go out even for an event the milter switched off, as Postfix does:
            # a later callback may still ask for them.
            if macros:
                frame = encode(ev.DefineMacros(code, tuple(macros))) + (
                    b"" if no_send & protocol else frame
                )
            elif no_send & protocol:
                return _NOTHING
            if no_send & protocol or no_reply & protocol:
                if hold:
                    self._pending.append(frame)
                    self._pending_size += len(frame)
                    if self._pending_size >= _COALESCE_LIMIT:
                        await self._write(b"", timeout)
                else:
                    await self._write(frame, timeout)
                return _NOTHING
            await self._write(frame, timeout)
            return await self._collect(code, timeout, final)
        except BaseException as exc:
            failure = self._convert(exc, f"at {type(request).__name__}")
            if failure is None:
                raise
            raise failure from None

    async def _collect(self, code: bytes, timeout: float, final: bool) -> Outcome:
        modifications: list[ev.Modification] = []
        quarantine: str | None = None
        while True:
            reply = await self._receive(timeout)
            if reply.__class__ is ev.Continue:
                return (
                    _CONTINUED
                    if not (modifications or quarantine)
                    else Outcome(reply, tuple(modifications), quarantine)
                )
            if isinstance(reply, ev.Progress):
                continue
            if isinstance(reply, ev.Quarantine):
                # Not a decision (Sendmail 8.13 semantics): the final reply still follows.
                quarantine = quarantine or reply.reason or "quarantined by milter"
                continue
            if isinstance(reply, ev.MODIFICATIONS):
                if not final:
                    raise MilterProtocolError(
                        f"modification {type(reply).__name__} outside end of message"
                    )
                modifications.append(reply)
                continue
            if isinstance(reply, ev.DECISIONS):
                if isinstance(reply, ev.Skip):
                    self._skip_code = code
                return Outcome(reply, tuple(modifications), quarantine)
            raise MilterProtocolError(f"unexpected {type(reply).__name__} after {code!r}")

    # -- bytes ------------------------------------------------------------------------------

    def _take_pending(self) -> bytes:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return data

    async def _write(self, data: bytes, timeout: float) -> None:
        """Write ``data`` after any held-back frames. Waits only while the transport's
        buffer is above its high-water mark (``timeout`` applies to that wait)."""
        transport = self._transport
        wire = self._wire
        if transport is None or wire is None:
            raise ConnectionError("not connected")
        if self._pending:
            data = self._take_pending() + data
        if wire.lost:
            raise ConnectionResetError("Connection lost")
        if data:
            transport.write(data)
        while wire.paused:
            await wire.wait(timeout)
        if transport.is_closing() and not wire.lost:
            # A failed send closes the transport; let connection_lost run (as drain does).
            await asyncio.sleep(0)
        if wire.lost:
            raise ConnectionResetError("Connection lost")

    async def _receive(self, timeout: float) -> ev.Response:
        wire = self._wire
        if wire is None:
            raise ConnectionError("not connected")
        inbox = wire.inbox
        while not inbox:
            if wire.read_error is not None:
                raise wire.read_error
            await wire.wait(timeout)
        return inbox.popleft()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise MilterFailure(self.name, self._failure.kind, self._failure.reason)
        if self._transport is None:
            raise MilterFailure(self.name, "io", "not connected")

    @contextlib.contextmanager
    def _guard(self, doing: str, io_kind: FailureKind = "io") -> Iterator[None]:
        """Turn every way a milter can fail into MilterFailure, dropping the connection."""
        try:
            yield
        except BaseException as exc:
            failure = self._convert(exc, doing, io_kind)
            if failure is None:
                raise
            raise failure from None

    def _convert(
        self, exc: BaseException, doing: str, io_kind: FailureKind = "io"
    ) -> MilterFailure | None:
        """Drop the connection after ``exc``; the MilterFailure to raise instead of it, or
        None when ``exc`` itself is to be raised again."""
        if isinstance(exc, MilterFailure):
            self._fail(exc)
            return None
        if isinstance(exc, TimeoutError):
            return self._fail(MilterFailure(self.name, "timeout", f"timeout {doing}"))
        if isinstance(exc, MilterProtocolError):
            return self._fail(MilterFailure(self.name, "protocol", f"{exc} ({doing})"))
        if isinstance(exc, OSError | EOFError | ValueError):
            reason = f"{exc or type(exc).__name__} ({doing})"
            return self._fail(MilterFailure(self.name, io_kind, reason))
        # Cancelled half-way through an exchange: the stream is out of step for good.
        self._fail(MilterFailure(self.name, "io", f"cancelled {doing}"))
        return None

    def _fail(self, failure: MilterFailure) -> MilterFailure:
        if self._failure is None:
            self._failure = failure
        transport, self._transport = self._transport, None
        wire, self._wire = self._wire, None
        self._pending.clear()
        self._pending_size = 0
        if transport is not None:
            transport.abort()
        if wire is not None:
            wire.cancel_timer()
        return failure


def _clean(text: str) -> str:
    # A NUL cannot travel inside a milter string; RFC 5321/5322 forbid it anyway.
    return text.replace("\0", "") if "\0" in text else text
