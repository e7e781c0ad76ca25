"""The SMTP client of the outbound relay: one connection to one next-hop address.

It speaks what RFC 5321 and its extensions ask of a client, and nothing about queues:
greeting, EHLO with HELO fallback, STARTTLS (opportunistic unless a route requires it) or
implicit TLS, AUTH PLAIN/LOGIN, then any number of transactions on the same connection
(the relay reuses it for the next message to the same destination). A transaction uses
PIPELINING when the server offers it (MAIL, every RCPT and DATA in one write, RFC 2920),
passes SIZE, BODY, SMTPUTF8 and the DSN parameters when offered, and sends BINARYMIME
bodies with BDAT. The caller gets every reply; deciding what a reply means for each
recipient is the relay's business (``mailgate.core.relay.attempt``).

Failures of the connection itself (refused, timeout, TLS, a 4xx/5xx greeting or EHLO)
raise ``RelayError``, so the caller can try the next address.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mailgate.core.errors import RelayError

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_MAX_REPLY_LINES = 100
_MAX_LINE = 4096
TlsMode = str  # "opportunistic" | "starttls" | "implicit" | "none"


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One reply: its code and its lines' texts (without the code)."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        return match.group(0).strip() if match else None

    @property
    def status(self) -> str:
        """The RFC 3463 status: the server's enhanced code if it gave a fitting one."""
        enhanced = self.enhanced
        if enhanced and enhanced[0] == str(self.code)[0]:
            return enhanced
        return f"{str(self.code)[0]}.0.0"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return " ".join(f"{self.code} {line}".strip() for line in self.lines[:3])


@dataclass(frozen=True, slots=True)
class Recipient:
    """One RCPT TO of a transaction: the address and its ESMTP parameters."""

    address: str
    params: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """Replies of one transaction: to MAIL, to each RCPT (in order), and to the data.

    ``data`` is None when nothing was sent (MAIL refused, or no recipient accepted).
    """

    mail: SmtpReply
    rcpts: tuple[SmtpReply, ...]
    data: SmtpReply | None


def client_context(verify: bool) -> ssl.SSLContext:
    """TLS for a next hop: verified for routes that ask for it, else encryption only.

    Opportunistic TLS to MX hosts cannot verify (RFC 7435): an MX's name comes from
    unauthenticated DNS, and refusing on a bad certificate would only fall back to clear text.
    """
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsPolicyHook(Protocol):
    """A receiving domain's TLS policy for one connection (MTA-STS, DANE: ``tlspolicy``).

    With a hook, STARTTLS is required, the hook's context and SNI name are used, and
    ``check`` sees the session after the handshake: a reason means a 4.7.5 failure.
    """

    context: ssl.SSLContext
    server_name: str

    def check(self, ssl_object: ssl.SSLObject | None) -> str | None: ...


class SmtpClient:
    """An open, greeted (and maybe TLS-protected, authenticated) SMTP connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        host: str,
        address: str,
        port: int,
        command_timeout: float,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.host = host
        self.address = address
        self.port = port
        self.command_timeout = command_timeout
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = False
        self.transactions = 0
        self.broken = False

    @property
    def local_address(self) -> str:
        """Our end's address (TLS-RPT's sending-mta-ip)."""
        sockname = self._writer.get_extra_info("sockname")
        return str(sockname[0]) if isinstance(sockname, tuple) and sockname else ""

    @property
    def peer(self) -> str:
        """The next hop as a DSN's Remote-MTA and the log show it: ``name[address]:port``."""
        return f"{self.host}[{self.address}]:{self.port}"

    # -- connection set-up ----------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        address: str,
        port: int,
        *,
        helo: str,
        tls: TlsMode = "opportunistic",
        tls_verify: bool = False,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        username: str | None = None,
        password: str | None = None,
        tls_policy: TlsPolicyHook | None = None,
    ) -> SmtpClient:
        """Connect, read the greeting, EHLO (or HELO), STARTTLS and AUTH as configured."""
        context = client_context(tls_verify) if tls != "none" else None
        server_name = host if tls_verify else None
        if tls_policy is not None:
            tls, context, server_name = "starttls", tls_policy.context, tls_policy.server_name
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    address,
                    port,
                    ssl=context if tls == "implicit" else None,
                    server_hostname=server_name if tls == "implicit" else None,
                ),
                connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise RelayError(
                f"connect to {host}[{address}]:{port}: {_why(exc)}", status="4.4.1"
            ) from None
        client = cls(
            reader, writer, host=host, address=address, port=port, command_timeout=command_timeout
        )
        client.tls = tls == "implicit"
        try:
            await client._greet(helo)
            if tls in ("opportunistic", "starttls") and context is not None:
                if "STARTTLS" in client.extensions:
                    await client._starttls(context, server_name, helo)
                    if tls_policy is not None:
                        ssl_object = client._writer.get_extra_info("ssl_object")
                        problem = tls_policy.check(ssl_object)
                        if problem is not None:
                            client.broken = True
                            raise RelayError(f"{client.peer}: {problem}", status="4.7.5")
                elif tls == "starttls":
                    raise RelayError(
                        f"{client.peer}: TLS is required, but the server does not offer STARTTLS",
                        status="4.7.4",
                    )
            if username is not None and password is not None:
                await client._auth(username, password)
        except BaseException:
            client.close()
            raise
        return client

    async def _greet(self, helo: str) -> None:
        greeting = await self.read_reply()
        if greeting.code != 220:
            raise self._refused("greeting", greeting)
        await self._hello(helo)

    async def _hello(self, helo: str) -> None:
        reply = await self.command(f"EHLO {helo}")
        if reply.code == 250:
            self.esmtp = True
            self.extensions = _extensions(reply)
            return
        if reply.code == 421 or reply.temporary:
            raise self._refused("EHLO", reply)
        # RFC 5321 section 3.2: a server that does not know EHLO still knows HELO.
        reply = await self.command(f"HELO {helo}")
        if reply.code != 250:
            raise self._refused("HELO", reply)
        self.esmtp = False
        self.extensions = {}

    async def _starttls(self, context: ssl.SSLContext, server_name: str | None, helo: str) -> None:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise self._refused("STARTTLS", reply, status="4.7.5")
        try:
            await asyncio.wait_for(
                self._writer.start_tls(context, server_hostname=server_name),
                self.command_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.broken = True
            raise RelayError(
                f"{self.peer}: TLS handshake failed: {_why(exc)}", status="4.7.5"
            ) from None
        self.tls = True
        # RFC 3207 section 4.2: forget what was learnt before TLS and ask again.
        await self._hello(helo)

    async def _auth(self, username: str, password: str) -> None:
        offered = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in offered:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
            reply = await self.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in offered:
            reply = await self.command("AUTH LOGIN")
            for secret in (username, password):
                if reply.code != 334:
                    break
                reply = await self.command(base64.b64encode(secret.encode()).decode())
        else:
            raise RelayError(
                f"{self.peer}: the route needs AUTH, but the server offers neither PLAIN nor LOGIN",
                status="4.7.0",
            )
        if reply.code != 235:
            # Wrong credentials are the operator's to fix; keep the mail meanwhile.
            raise self._refused("AUTH", reply, status="4.7.0")

    def _refused(self, stage: str, reply: SmtpReply, status: str | None = None) -> RelayError:
        return RelayError(
            f"{self.peer} refused {stage}: {reply}",
            status=status or ("4.4.2" if reply.code == 421 else reply.status),
            reply=str(reply),
        )

    # -- transactions ---------------------------------------------------------------------

    def offers(self, extension: str) -> bool:
        return extension in self.extensions

    @property
    def max_size(self) -> int | None:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    async def send(
        self,
        mail_from: str,
        mail_params: Sequence[str],
        recipients: Sequence[Recipient],
        content: bytes,
        *,
        binary: bool = False,
    ) -> TransactionResult:
        """One transaction; the connection stays usable for the next unless ``broken``."""
        self.transactions += 1
        mail = " ".join([f"MAIL FROM:<{mail_from}>", *mail_params])
        rcpts = [" ".join([f"RCPT TO:<{r.address}>", *r.params]) for r in recipients]
        pipelined = self.offers("PIPELINING")
        if pipelined:
            lines = [mail, *rcpts] + ([] if binary else ["DATA"])
            await self._write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
            mail_reply = await self.read_reply()
            rcpt_replies = [await self.read_reply() for _ in rcpts]
            data_start = None if binary else await self.read_reply()
        else:
            mail_reply = await self.command(mail)
            if not mail_reply.ok:
                return TransactionResult(mail_reply, tuple(mail_reply for _ in rcpts), None)
            rcpt_replies = [await self.command(line) for line in rcpts]
            data_start = None
            if not binary and any(r.ok for r in rcpt_replies):
                data_start = await self.command("DATA")
        if not mail_reply.ok:
            if data_start is not None and data_start.code == 354:
                await self._abandon_data()
            return TransactionResult(mail_reply, tuple(mail_reply for _ in rcpts), None)
        if not any(r.ok for r in rcpt_replies):
            if data_start is not None and data_start.code == 354:
                # A pipelined DATA the server took although no RCPT succeeded: end it empty.
                await self._abandon_data()
            await self.rset()
            return TransactionResult(mail_reply, tuple(rcpt_replies), None)
        if binary:
            await self._write(f"BDAT {len(content)} LAST\r\n".encode("ascii") + content)
            data_reply = await self.read_reply()
        else:
            assert data_start is not None
            if data_start.code != 354:
                return TransactionResult(mail_reply, tuple(rcpt_replies), data_start)
            await self._write(dot_stuff(content) + b".\r\n")
            data_reply = await self.read_reply()
        return TransactionResult(mail_reply, tuple(rcpt_replies), data_reply)

    async def _abandon_data(self) -> None:
        await self._write(b".\r\n")
        await self.read_reply()

    async def rset(self) -> bool:
        """RSET between transactions; False when the connection is no longer usable."""
        try:
            reply = await self.command("RSET")
        except RelayError:
            return False
        return reply.code == 250

    async def quit(self) -> None:
        try:
            if not self.broken:
                await asyncio.wait_for(self.command("QUIT"), 5.0)
        except (RelayError, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.broken = True
        self._writer.close()

    # -- the wire -------------------------------------------------------------------------

    async def command(self, line: str) -> SmtpReply:
        await self._write(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def _write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), self.command_timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.broken = True
            raise RelayError(f"{self.peer}: lost connection: {_why(exc)}", status="4.4.2") from None

    async def read_reply(self) -> SmtpReply:
        lines: list[str] = []
        code = 0
        while len(lines) < _MAX_REPLY_LINES:
            try:
                raw = await asyncio.wait_for(self._reader.readline(), self.command_timeout)
            except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
                self.broken = True
                raise RelayError(f"{self.peer}: no reply: {_why(exc)}", status="4.4.2") from None
            if not raw.endswith(b"\n"):
                self.broken = True
                raise RelayError(f"{self.peer}: connection closed by the server", status="4.4.2")
            text = raw[:_MAX_LINE].decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
                self.broken = True
                raise RelayError(f"{self.peer}: malformed reply {text[:80]!r}", status="4.5.0")
            code = int(text[:3])
            lines.append(text[4:])
            if text[3:4] != "-":
                break
        if code == 421:
            self.broken = True
        return SmtpReply(code, tuple(lines))


def _extensions(reply: SmtpReply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = value
    return extensions


def dot_stuff(content: bytes) -> bytes:
    """The DATA form of a message: leading dots doubled, CRLF line ends, a final CRLF."""
    # Bare LF line ends (a message written by a local program) become CRLF on the wire.
    if b"\n" in content and content.count(b"\n") != content.count(b"\r\n"):
        content = re.sub(rb"(?<!\r)\n", b"\r\n", content)
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
