"""One SMTP session: aiosmtpd's protocol machine, extended where mailgate needs more.

aiosmtpd provides the connection plumbing, the STARTTLS upgrade, the command dispatch by
``smtp_*`` methods, the AUTH exchange and its handler-hook calling convention. This class
replaces what falls short there: the read loop (our sans-I/O framing with per-state
RFC 5321 timeouts, the 1000-octet line limit, a hard error limit, graceful shutdown),
EHLO/HELO, MAIL/RCPT (our parser, SIZE/BODY/SMTPUTF8), a bulk DATA reader, BDAT
(RFC 3030 CHUNKING and BINARYMIME, which aiosmtpd lacks) and asynchronous, throttled AUTH
PLAIN/LOGIN, ETRN and ATRN (decided in ``turn``; ATRN turns this connection around and
hands it to the relay). DATA and BDAT share one end-of-message path (``_finish_message``).
Decisions about addresses and the spool live in the handler
(``mailgate.core.smtp.handler``); every reply comes from ``replies``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import re
import ssl
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException, syntax

from mailgate.core.milter import MilterChain, SessionInfo, StageResult
from mailgate.core.relay.client import SmtpClient
from mailgate.core.smtp import deliverby, dsnparams, replies, turn
from mailgate.core.smtp.chunking import BdatSyntaxError, ChunkedBody, ChunkReader, parse_bdat
from mailgate.core.smtp.framing import DataReader, DataResult, LineBuffer, TooLong
from mailgate.core.smtp.parser import (
    CommandSyntaxError,
    MailPath,
    parse_mail_from,
    parse_rcpt_to,
    split_command,
)
from mailgate.core.smtp.replies import Reply

if TYPE_CHECKING:
    from mailgate.core.relay.queue import RelayAgent
    from mailgate.core.smtp.handler import DeliveryHandler
    from mailgate.core.smtp.server import ServerContext

log = logging.getLogger("mailgate.smtp")

READ_CHUNK = 65536


class SessionClosed(Exception):
    """The session ended (timeout, error limit, shutdown): stop the read loop."""


class MailgateSMTP(SMTP):
    """The SMTP protocol for one connection on one listener role (smtp, submission, smtps)."""

    # aiosmtpd sizes its StreamReader with this; our framing enforces the real line limit.
    line_length_limit = READ_CHUNK * 4

    def __init__(self, context: ServerContext, handler: DeliveryHandler, role: str) -> None:
        config = context.config
        self.context = context
        self.role = role
        self.implicit_tls = role == "smtps"
        super().__init__(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident="mailgate",
            tls_context=None if self.implicit_tls else context.tls_context,
            timeout=config.command_timeout,
            auth_required=role in ("submission", "smtps"),
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        self.handler = handler
        self.lines = LineBuffer(config.max_line_length)
        self.client_ip = ""
        self.session_id = context.next_session_id()
        self.errors = 0
        self.admitted = False
        self.busy = False
        self.closing = False
        self.auth_user: str | None = None
        self.queue_id: str | None = None
        self.body_type = "7BIT"
        self.in_transaction = False
        self.rcpt_params: list[dict[str, str | None]] = []
        # The BDAT message of the transaction (None until its first chunk), and the reply
        # every further chunk gets once one failed (RFC 3030: the transaction has failed).
        self.chunked: ChunkedBody | None = None
        self.chunk_failure: Reply | None = None
        self.milters: MilterChain | None = None
        self.milter_info: SessionInfo | None = None
        # A refusal from the chain at connect time answers every later command but QUIT.
        self.milter_refusal: Reply | None = None
        self._out: list[bytes] = []
        self._hold_output = True

    # -- connection life ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername")
            self.client_ip = _peer_ip(peer)
        else:
            # STARTTLS finished: RFC 3207 says forget everything learnt in plaintext.
            self.lines.clear()
            self._reset_transaction()
            self.auth_user = None
        self._configure_auth_tls()

    def connection_lost(self, error: Exception | None) -> None:
        if self.admitted:
            self.admitted = False
            self.context.limits.release(self.client_ip)
            self.context.sessions.discard(self)
            log.info("%s: disconnect from [%s]", self.session_id, self.client_ip)
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Our read loop applies the per-state timeouts itself; aiosmtpd only needs a handle.
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_later(86400 * 365, lambda: None)

    @property
    def sess(self) -> Session:
        """The aiosmtpd session (set from the moment the connection is made)."""
        # No assert: aiosmtpd inspects every attribute of the protocol while constructing it.
        return cast(Session, self.session)

    @property
    def env(self) -> Envelope:
        """The current transaction's envelope."""
        return cast(Envelope, self.envelope)

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    @property
    def is_loopback(self) -> bool:
        if not self.client_ip:
            return False
        try:
            return ipaddress.ip_address(self.client_ip).is_loopback
        except ValueError:
            return self.client_ip == "unix"

    def _configure_auth_tls(self) -> None:
        loopback_ok = self.context.config.auth_on_loopback_without_tls and self.is_loopback
        self._auth_require_tls = not (self.tls_active or loopback_ok)

    def auth_offered(self) -> bool:
        """AUTH is offered on submission and smtps, and on the MX port if smtp_auth is on."""
        if self.role == "smtp" and not self.context.config.smtp_auth:
            return False
        return not self._auth_require_tls

    def tls_info(self) -> tuple[str, str, int] | None:
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            return None
        cipher = ssl_object.cipher()
        if cipher is None:
            return None
        return cipher[1], cipher[0], cipher[2]

    # -- output ------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        text = status.render() if isinstance(status, Reply) else status
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        text = replies.normalize(text)
        await self._write_line(text)
        if text[:1] in ("4", "5") and not text.startswith("421"):
            self.errors += 1
            if self.errors >= self.context.config.max_errors:
                log.warning("%s: too many errors from [%s]", self.session_id, self.client_ip)
                await self._close_with(replies.TOO_MANY_ERRORS)

    async def reply(self, reply: Reply) -> None:
        await self.push(reply)

    async def _write_line(self, text: str) -> None:
        """Queue a reply; it goes out when the session next waits for the client.

        Replies to pipelined commands (RFC 2920) thus leave in one segment instead of one
        write each. Before any wait for input everything queued is flushed, so a client
        that waits for a reply always gets it.
        """
        if self.transport is None or self.transport.is_closing():
            raise SessionClosed
        self._out.append(text.encode("utf-8") + b"\r\n")
        if not self._hold_output:
            await self._flush()

    async def _flush(self) -> None:
        if self._out:
            if self.transport is None or self.transport.is_closing():
                raise SessionClosed
            self._writer.write(b"".join(self._out))
            self._out.clear()
            await self._writer.drain()

    def _write_now(self, reply: Reply) -> None:
        """Queued replies, then ``reply``, without waiting: for the last words before a close."""
        self._out.append(reply.render().encode() + b"\r\n")
        with contextlib.suppress(Exception):
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(b"".join(self._out))
        self._out.clear()

    async def _close_with(self, reply: Reply) -> None:
        self.closing = True
        self._write_now(reply)
        if self.transport is not None:
            self.transport.close()
        raise SessionClosed

    def abort_for_shutdown(self) -> None:
        """Called at the end of the shutdown grace period: 421 4.3.2 and close."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self._write_now(replies.SHUTTING_DOWN)
            self.transport.close()

    # -- input -------------------------------------------------------------------------

    async def _fill(self, timeout: float) -> bytes:
        await self._flush()
        try:
            # asyncio.timeout rather than wait_for: wait_for wraps every read in a new
            # task, a cost paid per command and per 64 KiB of message.
            async with asyncio.timeout(timeout):
                data: bytes = await self._reader.read(READ_CHUNK)
        except TimeoutError:
            log.info("%s: timeout from [%s]", self.session_id, self.client_ip)
            await self._close_with(replies.TIMEOUT)
        if not data:
            raise SessionClosed
        return data

    async def read_line(self) -> bytes | TooLong:
        """The next command line (or an AUTH response), waiting at most command_timeout."""
        while True:
            line = self.lines.next_line()
            if line is not None:
                return line
            self.lines.feed(await self._fill(self.context.config.command_timeout))

    async def _handle_client(self) -> None:
        config = self.context.config
        refusal = self.context.limits.admit(self.client_ip)
        if refusal is not None:
            reply = {
                "rate": replies.RATE_LIMITED,
                "total": replies.TOO_MANY_CONNECTIONS,
                "per_ip": replies.TOO_MANY_FROM_IP,
            }[refusal]
            log.warning(
                "%s: refused connection from [%s]: %s limit",
                self.session_id,
                self.client_ip,
                refusal,
            )
            with contextlib.suppress(SessionClosed):
                await self._close_with(reply)
            return
        self.admitted = True
        self.context.sessions.add(self)
        log.info(
            "%s: connect from [%s] on %s%s",
            self.session_id,
            self.client_ip,
            self.role,
            " (TLS)" if self.implicit_tls else "",
        )
        try:
            if self.context.shutting_down:
                await self._close_with(replies.SHUTTING_DOWN)
            if self.context.milter_specs:
                await self._milter_connect()
            await self._write_line(replies.greeting(config.hostname))
            while not self.closing:
                line = await self.read_line()
                await self._dispatch(line)
        except SessionClosed:
            pass
        except TLSSetupException:
            log.info("%s: TLS handshake failed with [%s]", self.session_id, self.client_ip)
        except (ConnectionError, ssl.SSLError) as exc:
            log.info("%s: connection error from [%s]: %s", self.session_id, self.client_ip, exc)
        finally:
            if self.transport is not None:
                self.transport.close()
            if self.milters is not None:
                # Closing talks to the milters; it must not be cut short by our own end.
                self.context.track(asyncio.ensure_future(self.milters.close()))

    # -- the milter chain --------------------------------------------------------------

    def _session_info(self) -> SessionInfo:
        assert self.transport is not None
        local = self.transport.get_extra_info("sockname")
        peer = self.transport.get_extra_info("peername")
        config = self.context.config
        return SessionInfo(
            hostname=config.hostname,
            daemon_name=f"mailgate-{self.role}",
            daemon_addr=str(local[0]) if isinstance(local, tuple) else None,
            daemon_port=int(local[1]) if isinstance(local, tuple) else None,
            client_addr=self.client_ip if self.client_ip != "unix" else "",
            client_port=int(peer[1]) if isinstance(peer, tuple) else 0,
            local_domains=frozenset(config.local_domains),
        )

    def _update_tls_info(self) -> None:
        info = self.milter_info
        tls = self.tls_info()
        if info is not None and tls is not None:
            info.tls_version, info.cipher, info.cipher_bits = tls

    async def _milter_connect(self) -> None:
        self.milters = MilterChain(self.context.milter_specs, session_id=self.session_id)
        self.milter_info = self._session_info()
        self._update_tls_info()
        result = await self.milters.connect(self.milter_info)
        if result.disconnect:
            await self._close_with(result.reply or replies.SHUTTING_DOWN)
        if result.refused:
            self.milter_refusal = result.reply
            log.info(
                "%s: milter-reject: CONNECT from [%s]: %s",
                self.session_id,
                self.client_ip,
                result.reply,
            )

    async def _milter_refused(self, stage: str, result: StageResult) -> bool:
        """Answer the command with the chain's refusal, if it refused; True when it did."""
        refusal = await self._milter_refusal_of(stage, result)
        if refusal is None:
            return False
        await self.reply(refusal)
        return True

    async def _milter_refusal_of(self, stage: str, result: StageResult) -> Reply | None:
        """The chain's refusal (logged) without answering yet; closes on a disconnect."""
        if result.disconnect:
            await self._close_with(result.reply or replies.SHUTTING_DOWN)
        if not result.refused or result.reply is None:
            return None
        log.info(
            "%s: %s: milter-reject: %s from [%s]: %s (milter %s)",
            self.session_id,
            self.queue_id or "NOQUEUE",
            stage,
            self.client_ip,
            result.reply,
            result.milter,
        )
        return result.reply

    async def _milter_abort(self) -> None:
        if self.milters is not None and self.in_transaction:
            await self.milters.abort()

    async def _dispatch(self, raw: bytes | TooLong) -> None:
        if isinstance(raw, TooLong):
            log.info("%s: line too long (%d octets)", self.session_id, raw.length)
            await self.reply(replies.LINE_TOO_LONG)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            await self.reply(replies.BAD_CHARACTERS)
            return
        if _CONTROL.search(line):
            await self.reply(replies.BAD_CHARACTERS)
            return
        try:
            command = split_command(line)
        except CommandSyntaxError as exc:
            await self.reply(exc.reply)
            return
        # BDAT answers a refusal itself: it must first consume its chunk's octets.
        if self.milter_refusal is not None and command.verb not in ("QUIT", "NOOP", "RSET", "BDAT"):
            await self.reply(self.milter_refusal)
            return
        method = self._smtp_methods.get(command.verb)
        if method is None:
            log.info("%s: unrecognized command %s", self.session_id, command.verb[:16])
            if self.milters is not None and self.milter_info is not None:
                result = await self.milters.unknown(self.milter_info, line)
                if await self._milter_refused("UNKNOWN", result):
                    return
            await self.reply(replies.UNRECOGNIZED)
            return
        if command.verb != "AUTH":
            log.debug("%s: >> %s", self.session_id, line[:200])
        try:
            await method(command.arg or None)
        except (SessionClosed, TLSSetupException, asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("%s: internal error handling %s", self.session_id, command.verb)
            await self.reply(replies.LOCAL_ERROR)

    # -- transaction state -------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.envelope = self._create_envelope()
        self.in_transaction = False
        self.queue_id = None
        self.body_type = "7BIT"
        self.rcpt_params = []
        self.chunked = None
        self.chunk_failure = None

    # -- commands ----------------------------------------------------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, arg: str | None) -> None:
        if not arg or " " in arg:
            await self.reply(replies.SYNTAX_HELO)
            return
        if not await self._milter_helo(arg):
            return
        self._reset_transaction()
        self.sess.extended_smtp = False
        self.sess.host_name = arg
        await self._write_line(f"250 {self.hostname}")

    async def _milter_helo(self, helo: str) -> bool:
        """Run the HELO stage of the chain; False when it refused (already answered)."""
        await self._milter_abort()
        if self.milters is None or self.milter_info is None:
            return True
        self.milter_info.helo = helo
        return not await self._milter_refused("HELO", await self.milters.helo(self.milter_info))

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, arg: str | None) -> None:
        if not arg or " " in arg:
            await self.reply(replies.SYNTAX_EHLO)
            return
        if not await self._milter_helo(arg):
            return
        self._reset_transaction()
        self.sess.extended_smtp = True
        self.sess.host_name = arg
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.context.config.max_message_size}",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            # RFC 2852: the minimum BY time in seconds (none advertised when it is 0).
            f"DELIVERBY {self.context.config.deliverby_min or ''}".rstrip(),
        ]
        relay = self.context.relay
        if relay is not None:
            lines.append("ETRN")
            if self.role in ("submission", "smtps") and relay.router.hold_routes():
                lines.append("ATRN")
        if self.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        if self.context.config.vrfy:
            lines.append("VRFY")
        lines.append("HELP")
        text = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
        await self._write_line(text)

    @syntax("ETRN domain | @domain | #queue")
    async def smtp_ETRN(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.in_transaction:
            await self.reply(replies.BAD_SEQUENCE)
            return
        request = turn.parse_etrn(arg)
        if request is None:
            await self.reply(turn.ETRN_SYNTAX)
            return
        allowed = turn.etrn_client_allowed(
            self.client_ip, self.auth_user is not None, self.context.etrn_networks
        )
        reply = await turn.etrn(
            request,
            relay=self.context.relay,
            client_allowed=allowed,
            allowed_domains=self.context.config.etrn_domains,
        )
        log.info("%s: ETRN %s from [%s]: %s", self.session_id, request.node, self.client_ip, reply)
        await self.reply(reply)

    @syntax("ATRN [domain[,domain...]]")
    async def smtp_ATRN(self, arg: str | None) -> None:
        """RFC 2645: after 250 this session becomes the SMTP client of its own peer."""
        if await self.check_helo_needed():
            return
        if self.in_transaction:
            await self.reply(replies.BAD_SEQUENCE)
            return
        relay = self.context.relay
        reply, domains = await turn.atrn(arg, role=self.role, user=self.auth_user, relay=relay)
        if reply.code != 250 or relay is None:
            await self.reply(reply)
            return
        try:
            await self._turn_around(relay, domains)
        finally:
            relay.release(domains)
        raise SessionClosed

    async def _turn_around(self, relay: RelayAgent, domains: list[str]) -> None:
        """Become the SMTP client of our peer and deliver its domains' held mail."""
        await self.reply(turn.ATRN_OK)
        log.info(
            "%s: ATRN by %s from [%s]: turning %s",
            self.session_id, self.auth_user, self.client_ip, ", ".join(domains),
        )  # fmt: skip
        await self._flush()
        # The peer must wait for the 250 before it greets (RFC 2645 section 4.2); anything
        # it sent early is not a reply to us and is dropped.
        self.lines.take_all()
        self.closing = True
        peer = self.transport.get_extra_info("peername") if self.transport else None
        client = SmtpClient(
            self._reader,
            self._writer,
            host=self.sess.host_name or "atrn-client",
            address=self.client_ip,
            port=int(peer[1]) if isinstance(peer, tuple) else 0,
            command_timeout=self.context.config.relay_command_timeout,
        )
        delivered = 0
        try:
            await client._greet(self.context.config.hostname)
            delivered = await relay.turn(client, domains)
        except Exception as exc:
            log.info("%s: ATRN session with [%s] failed: %s", self.session_id, self.client_ip, exc)
        finally:
            await client.quit()
        log.info("%s: ATRN: %d recipient(s) delivered", self.session_id, delivered)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str | None) -> None:
        commands = sorted(
            name for name, method in self._smtp_methods.items() if self._syntax_available(method)
        )
        await self.reply(Reply(214, "2.0.0", "Commands: " + " ".join(commands)))

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(replies.ok())

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.reply(replies.SYNTAX_NO_ARGS)
            return
        await self._milter_abort()
        await self._close_with(replies.BYE)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.reply(replies.SYNTAX_NO_ARGS)
            return
        await self._milter_abort()
        self._reset_transaction()
        await self.reply(replies.ok())

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            await self.reply(replies.syntax_error("VRFY <address>"))
            return
        if not self.context.config.vrfy:
            await self.reply(replies.VRFY_DISABLED)
            return
        await self.reply(await self.handler.verify(self, arg))

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(replies.EXPN_DISABLED)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.reply(replies.SYNTAX_NO_ARGS)
            return
        if self.tls_active:
            await self.reply(replies.TLS_ALREADY)
            return
        if self.tls_context is None:
            await self.reply(replies.TLS_NOT_AVAILABLE)
            return
        # Anything the client pipelined after STARTTLS must not be acted upon (RFC 3207 §5).
        self.lines.clear()
        # aiosmtpd writes "220" and swaps the transport at once: it must not wait in a queue.
        self._hold_output = False
        try:
            await asyncio.wait_for(super().smtp_STARTTLS(None), self.context.config.command_timeout)
        except TimeoutError:
            raise TLSSetupException() from None
        finally:
            self._hold_output = True
        self.lines.clear()
        self._update_tls_info()
        log.info("%s: STARTTLS established with [%s]", self.session_id, self.client_ip)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        if not self.sess.extended_smtp:
            await self.reply(Reply(503, "5.5.1", "Send EHLO first"))
            return
        if self.role == "smtp" and not self.context.config.smtp_auth:
            await self.reply(replies.AUTH_NOT_AVAILABLE)
            return
        if self._auth_require_tls:
            await self.reply(replies.AUTH_NEEDS_TLS)
            return
        if self.in_transaction:
            await self.reply(replies.AUTH_DURING_MAIL)
            return
        if self.sess.authenticated:
            await self.reply(replies.AUTH_ALREADY)
            return
        if self.context.auth_failures.exceeded(self.client_ip):
            log.warning("%s: AUTH throttled for [%s]", self.session_id, self.client_ip)
            await self.reply(replies.AUTH_THROTTLED)
            return
        if arg:
            # Mechanism names are case-insensitive (RFC 4954); aiosmtpd matches them exactly.
            mechanism, _, rest = arg.partition(" ")
            arg = f"{mechanism.upper()} {rest}".strip()
        await super().smtp_AUTH(arg)
        if self.sess.authenticated and self.sess.auth_data:
            self.auth_user = str(self.sess.auth_data)
            if self.milter_info is not None:
                self.milter_info.auth_type = arg.split(" ", 1)[0] if arg else None
                self.milter_info.auth_user = self.auth_user

    async def _challenge(self, prompt: bytes) -> bytes | None:
        """Send a 334 challenge and read the base64 answer; None after an abort or bad data."""
        await self._write_line("334 " + base64.b64encode(prompt).decode())
        line = await self.read_line()
        if isinstance(line, TooLong):
            await self.reply(replies.LINE_TOO_LONG)
            return None
        if line.strip() == b"*":
            await self.reply(replies.AUTH_ABORTED)
            return None
        try:
            return base64.b64decode(line.strip(), validate=True)
        except binascii.Error:
            await self.reply(replies.AUTH_BAD_BASE64)
            return None

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self._challenge(b"")
            if blob is None:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = base64.b64decode(args[1], validate=True) if args[1] != "=" else b""
            except binascii.Error:
                await self.reply(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.reply(replies.syntax_error("malformed PLAIN response"))
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting as another user is not supported: refuse rather than silently ignore.
            return await self._auth_failed(login)
        return await self._check_credentials(login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 2:
            try:
                login: bytes | None = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.reply(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        else:
            login = await self._challenge(b"Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._challenge(b"Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check_credentials(login, password)

    async def _check_credentials(self, login: bytes, password: bytes) -> AuthResult:
        try:
            login_text, password_text = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return await self._auth_failed(login)
        try:
            user = await asyncio.to_thread(
                self.context.users.authenticate, login_text, password_text
            )
        except Exception:
            log.exception("%s: user store failure during AUTH", self.session_id)
            await self.reply(replies.AUTH_TEMP)
            return AuthResult(success=False, handled=True)
        if user is None:
            return await self._auth_failed(login)
        self.context.auth_failures.reset(self.client_ip)
        log.info("%s: [%s] authenticated as %s", self.session_id, self.client_ip, user)
        return AuthResult(success=True, auth_data=user, message=replies.AUTH_OK.render())

    async def _auth_failed(self, login: bytes) -> AuthResult:
        count = self.context.auth_failures.hit(self.client_ip)
        log.warning(
            "%s: AUTH failed for %r from [%s] (%d recent failures)",
            self.session_id,
            login.decode("utf-8", "replace")[:100],
            self.client_ip,
            count,
        )
        # A fixed delay per failure slows guessing without holding any shared resource.
        await asyncio.sleep(self.context.auth_failure_delay)
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED.render())

    @syntax("MAIL FROM:<address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("MAIL"):
            return
        if self.in_transaction:
            await self.reply(replies.NESTED_MAIL)
            return
        try:
            path = parse_mail_from(arg or "")
        except CommandSyntaxError as exc:
            await self.reply(exc.reply)
            return
        problem = self._check_mail_params(path)
        if problem is not None:
            await self.reply(problem)
            return
        reply = await self.handler.check_sender(self, path)
        if reply.code == 250 and self.milters is not None and self.milter_info is not None:
            self.milter_info.queue_id = self.queue_id
            result = await self.milters.mail(
                self.milter_info, path.address, _render_params(path.params)
            )
            if await self._milter_refused("MAIL", result):
                self.queue_id = None
                return
        if reply.code == 250:
            self.in_transaction = True
            self.env.mail_from = path.address
            self.env.mail_options = _render_params(path.params)
            self.env.smtp_utf8 = "SMTPUTF8" in path.params
            self.body_type = (path.params.get("BODY") or "7BIT").upper()
        await self.reply(reply)

    def _check_mail_params(self, path: MailPath) -> Reply | None:
        params = path.params
        if params and not self.sess.extended_smtp:
            return replies.syntax_error("parameters require EHLO")
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return replies.PARAM_BAD.with_text("SIZE requires a number")
                if int(value) > self.context.config.max_message_size:
                    return replies.SIZE_EXCEEDED
            elif key == "BODY":
                # BINARYMIME needs CHUNKING (RFC 3030 section 3), offered after every EHLO.
                if value is None or value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                    return replies.PARAM_BAD.with_text("BODY must be 7BIT, 8BITMIME or BINARYMIME")
            elif key == "SMTPUTF8":
                if value is not None:
                    return replies.PARAM_BAD.with_text("SMTPUTF8 takes no value")
            elif key in ("RET", "ENVID"):
                problem = dsnparams.check_mail_param(key, value)
                if problem is not None:
                    return problem
            elif key == "BY":
                problem = deliverby.check_mail_param(value, self.context.config.deliverby_min)
                if problem is not None:
                    return problem
            elif key == "AUTH":
                # RFC 4954 AUTH= identity: accepted and not trusted; nothing depends on it.
                if value is None:
                    return replies.PARAM_BAD.with_text("AUTH requires a value")
            else:
                return replies.PARAM_UNKNOWN.with_text(f"Unsupported MAIL parameter {key}")
        if not path.is_ascii and "SMTPUTF8" not in params:
            return replies.NON_ASCII_NEEDS_SMTPUTF8
        return None

    @syntax("RCPT TO:<address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("RCPT"):
            return
        if not self.in_transaction:
            await self.reply(replies.NEED_MAIL)
            return
        try:
            path = parse_rcpt_to(arg or "")
        except CommandSyntaxError as exc:
            await self.reply(exc.reply)
            return
        if path.params and not self.sess.extended_smtp:
            await self.reply(replies.syntax_error("parameters require EHLO"))
            return
        for key, value in path.params.items():
            # NOTIFY and ORCPT (the DSN extension) are the only RCPT parameters.
            problem = dsnparams.check_rcpt_param(key, value)
            if problem is not None:
                await self.reply(problem)
                return
        if not path.is_ascii and not self.env.smtp_utf8:
            await self.reply(replies.NON_ASCII_NEEDS_SMTPUTF8)
            return
        if len(self.env.rcpt_tos) >= self.context.config.max_recipients:
            log.info("%s: too many recipients from [%s]", self.session_id, self.client_ip)
            await self.reply(replies.TOO_MANY_RECIPIENTS)
            return
        reply, address = await self.handler.check_recipient(self, path)
        if self.milters is not None and self.milter_info is not None:
            params = _render_params(path.params)
            if reply.code != 250:
                await self.milters.rcpt_rejected(self.milter_info, address, params, reply)
            elif await self._milter_refused(
                "RCPT", await self.milters.rcpt(self.milter_info, address, params)
            ):
                return
        if reply.code == 250:
            self.env.rcpt_tos.append(address)
            self.rcpt_params.append(dict(path.params))
        await self.reply(reply)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.in_transaction:
            await self.reply(replies.NEED_MAIL)
            return
        if not self.env.rcpt_tos:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.SYNTAX_NO_ARGS)
            return
        if self.bdat_started:
            await self.reply(replies.DATA_AFTER_BDAT)
            return
        if self.body_type == "BINARYMIME":
            # RFC 3030 section 3: binary content cannot be sent with DATA.
            await self.reply(replies.BINARYMIME_NEEDS_BDAT)
            return
        if (
            self.milters is not None
            and self.milter_info is not None
            and await self._milter_refused("DATA", await self.milters.data(self.milter_info))
        ):
            return
        config = self.context.config
        await self._write_line(replies.START_DATA)
        reader = DataReader(config.max_message_size, config.max_line_length)
        rest = reader.feed(self.lines.take_all())
        timeout = config.data_init_timeout
        while not reader.done:
            rest = reader.feed(await self._fill(timeout))
            timeout = config.data_block_timeout
            if not reader.done:
                # A read returns at once while the connection's buffer holds data, so a
                # big message would keep the loop for as long as its client keeps it
                # full: yield after each chunk, and every other session gets a turn.
                await asyncio.sleep(0)
        self.lines.feed(rest)
        await self._finish_message(reader.result())

    @property
    def bdat_started(self) -> bool:
        """Whether the transaction has seen a BDAT chunk (accepted or failed)."""
        return self.chunked is not None or self.chunk_failure is not None

    @syntax("BDAT chunk-size [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """One chunk of a message (RFC 3030), answered after all its octets are read.

        Every BDAT that announces a size is followed by that many octets, whatever the
        reply: they are always consumed (kept or discarded), so a refused chunk never
        leaves its octets to be read as commands.
        """
        try:
            command = parse_bdat(arg or "")
        except BdatSyntaxError as exc:
            if exc.size is not None:
                await self._read_chunk(ChunkReader(exc.size))
            await self.reply(exc.reply)
            return
        refusal = await self._bdat_refusal()
        if refusal is not None:
            await self._read_chunk(ChunkReader(command.size))
            if command.last and self.chunk_failure is not None:
                # The failed transaction ends with its last chunk, as the message would have.
                await self._milter_abort()
                self._reset_transaction()
            await self.reply(refusal)
            return
        assert self.chunked is not None
        await self._read_chunk(self.chunked.begin(command.size))
        if command.last:
            await self._finish_message(self.chunked.result())
        elif self.chunked.size_exceeded:
            # Reported on the chunk that crossed the limit; later chunks get the same reply
            # and are discarded until BDAT LAST or RSET ends the transaction.
            log.info("%s: message too large from [%s]", self.session_id, self.client_ip)
            self.chunk_failure = replies.SIZE_EXCEEDED
            await self.reply(replies.SIZE_EXCEEDED)
        else:
            await self.reply(replies.chunk_received(command.size))

    async def _bdat_refusal(self) -> Reply | None:
        """Why this BDAT chunk cannot be taken, or None; the first one starts the message.

        Nothing is answered here: the reply must wait until the chunk has been read.
        """
        if self.milter_refusal is not None:
            return self.milter_refusal
        if not self.sess.host_name:
            return replies.NEED_HELO
        if self._auth_required and not self.sess.authenticated:
            return replies.AUTH_REQUIRED
        if not self.in_transaction:
            return replies.NEED_MAIL
        if not self.env.rcpt_tos:
            return replies.NEED_RCPT
        if self.chunk_failure is not None:
            return self.chunk_failure
        if self.chunked is None:
            # The first chunk is where DATA would be: the chain's DATA stage runs here.
            if self.milters is not None and self.milter_info is not None:
                result = await self.milters.data(self.milter_info)
                refusal = await self._milter_refusal_of("BDAT", result)
                if refusal is not None:
                    self.chunk_failure = refusal
                    return refusal
            self.chunked = ChunkedBody(self.context.config.max_message_size)
        return None

    async def _read_chunk(self, reader: ChunkReader) -> None:
        """Feed ``reader`` its octets: first those already buffered, then from the socket.

        The DATA timeouts apply: ``data_init_timeout`` until the chunk's first octet,
        ``data_block_timeout`` for each later wait. Octets after the chunk (pipelined
        commands) stay buffered for the command loop.
        """
        config = self.context.config
        if not reader.done and len(self.lines):
            reader.feed(self.lines.take(reader.remaining))
        while not reader.done:
            timeout = config.data_block_timeout if reader.received else config.data_init_timeout
            rest = reader.feed(await self._fill(timeout))
            if rest:
                self.lines.feed(rest)
            if not reader.done:
                await asyncio.sleep(0)  # each chunk gives the other sessions a turn, as in DATA

    async def _finish_message(self, result: DataResult) -> None:
        """The end of a message, from DATA's final dot or BDAT LAST: check, accept, answer."""
        reply = self._check_body(result.size_exceeded, result.line_too_long, result.has_8bit)
        if reply is None:
            reply = self._check_hops(result.content)
        if reply is None:
            reply = await self._accept(result.content)
        else:
            await self._milter_abort()
        self._reset_transaction()
        await self.reply(reply)

    def _check_body(self, size_exceeded: bool, line_too_long: bool, has_8bit: bool) -> Reply | None:
        if size_exceeded:
            log.info("%s: message too large from [%s]", self.session_id, self.client_ip)
            return replies.SIZE_EXCEEDED
        if line_too_long:
            log.info("%s: message line too long from [%s]", self.session_id, self.client_ip)
            return replies.DATA_LINE_TOO_LONG
        if (
            has_8bit
            and self.body_type == "7BIT"
            and self.context.config.reject_8bit_without_8bitmime
        ):
            return replies.EIGHT_BIT_UNANNOUNCED
        return None

    def _check_hops(self, content: bytes | bytearray) -> Reply | None:
        # Refusing now costs the looping sender a bounce from its own MTA; accepting would
        # only send the message round the loop once more before the relay bounces it.
        end = _HEADER_END.search(content)
        hops = len(_RECEIVED.findall(content, 0, end.start() if end else len(content)))
        if hops >= self.context.config.max_hops:
            log.info(
                "%s: refused from [%s]: %d Received headers (max_hops %d)",
                self.session_id,
                self.client_ip,
                hops,
                self.context.config.max_hops,
            )
            return replies.too_many_hops(hops)
        return None

    async def _accept(self, content: bytes | bytearray) -> Reply:
        """Hand the message to the handler; shielded so a vanished client cannot cut a commit."""
        self.busy = True
        task = asyncio.ensure_future(self.handler.accept_message(self, content))
        try:
            async with asyncio.timeout(self.context.config.data_term_timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            log.error("%s: message processing timed out", self.session_id)
            return replies.PROCESSING_TIMEOUT
        finally:
            self.busy = False


_HEADER_END = re.compile(rb"\r?\n\r?\n")
# Control characters a command line may not hold (TAB is allowed).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_RECEIVED = re.compile(rb"^Received:", re.IGNORECASE | re.MULTILINE)


def _peer_ip(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unix"


def _render_params(params: dict[str, str | None]) -> list[str]:
    return [key if value is None else f"{key}={value}" for key, value in params.items()]
