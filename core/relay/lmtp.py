"""The LMTP client (RFC 2033): delivery to a mailbox server such as Dovecot or Cyrus.

LMTP is SMTP with two differences that matter here: the greeting is answered with LHLO
instead of EHLO, and after the message the server answers once *per accepted recipient*,
in RCPT order, so that a full mailbox or an over-quota user fails alone while the other
recipients are delivered. ``LmtpClient`` reuses the SMTP client's wire handling and
overrides exactly these two steps; ``LmtpResult.data_replies`` carries the per-recipient
replies to the relay (``mailgate.core.relay.attempt``), which records each recipient's
outcome on its own, so a 4xx for one recipient retries only that one.

The server may listen on TCP (port 24 by convention) or on a Unix socket. STARTTLS is
used only when the route asks for it (LMTP servers are local or on a trusted LAN).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from mailgate.core.errors import RelayError
from mailgate.core.relay.client import (
    Recipient,
    SmtpClient,
    SmtpReply,
    TransactionResult,
    client_context,
    dot_stuff,
)


@dataclass(frozen=True, slots=True)
class LmtpResult(TransactionResult):
    """A transaction's replies plus, after the data, one reply per RCPT (None if refused)."""

    data_replies: tuple[SmtpReply | None, ...] = ()


class LmtpClient(SmtpClient):
    """An open, greeted LMTP connection (TCP or Unix socket)."""

    @classmethod
    async def open(
        cls,
        *,
        host: str,
        address: str,
        port: int,
        path: str | None,
        helo: str,
        tls: str = "none",
        tls_verify: bool = False,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
    ) -> LmtpClient:
        """Connect to ``path`` (a Unix socket) or ``address``:``port``; greet; STARTTLS."""
        where = f"unix:{path}" if path else f"{host}[{address}]:{port}"
        try:
            if path:
                opened = asyncio.open_unix_connection(path)
            else:
                opened = asyncio.open_connection(address, port)
            reader, writer = await asyncio.wait_for(opened, connect_timeout)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise RelayError(f"connect to LMTP {where}: {reason}", status="4.4.1") from None
        client = cls(
            reader,
            writer,
            host=host or "localhost",
            address=path or address,
            port=0 if path else port,
            command_timeout=command_timeout,
        )
        try:
            await client._greet(helo)
            if tls in ("starttls", "opportunistic") and "STARTTLS" in client.extensions:
                await client._starttls(
                    client_context(tls_verify), host if tls_verify else None, helo
                )
            elif tls == "starttls":
                raise RelayError(
                    f"{client.peer}: TLS is required, but the server does not offer STARTTLS",
                    status="4.7.4",
                )
        except BaseException:
            client.close()
            raise
        return client

    @property
    def peer(self) -> str:
        if self.port == 0:
            return f"{self.host}[unix:{self.address}]"
        return super().peer

    async def _hello(self, helo: str) -> None:
        # RFC 2033 section 4.1: LHLO, with EHLO's reply format; there is no HELO fallback.
        reply = await self.command(f"LHLO {helo}")
        if reply.code != 250:
            raise self._refused("LHLO", reply)
        self.esmtp = True
        self.extensions = _extensions(reply)

    async def send(
        self,
        mail_from: str,
        mail_params: Sequence[str],
        recipients: Sequence[Recipient],
        content: bytes,
        *,
        binary: bool = False,
    ) -> TransactionResult:
        """One transaction; after the data, read one reply per accepted recipient."""
        if binary:
            # The relay checks BINARYMIME support first; LMTP without it cannot carry binary.
            raise RelayError(f"{self.peer}: BINARYMIME over LMTP is not supported", status="5.6.3")
        self.transactions += 1
        mail = " ".join([f"MAIL FROM:<{mail_from}>", *mail_params])
        rcpts = [" ".join([f"RCPT TO:<{r.address}>", *r.params]) for r in recipients]
        if self.offers("PIPELINING"):
            lines = [mail, *rcpts, "DATA"]
            await self._write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
            mail_reply = await self.read_reply()
            rcpt_replies = [await self.read_reply() for _ in rcpts]
            data_start: SmtpReply | None = await self.read_reply()
        else:
            mail_reply = await self.command(mail)
            if not mail_reply.ok:
                return LmtpResult(mail_reply, tuple(mail_reply for _ in rcpts), None)
            rcpt_replies = [await self.command(line) for line in rcpts]
            data_start = None
            if any(r.ok for r in rcpt_replies):
                data_start = await self.command("DATA")
        accepted = [reply.ok for reply in rcpt_replies]
        if not mail_reply.ok or not any(accepted):
            if data_start is not None and data_start.code == 354:
                # A pipelined DATA the server took anyway: end it empty. LMTP answers it
                # once per accepted recipient, and there are none.
                await self._write(b".\r\n")
            await self.rset()
            return LmtpResult(mail_reply, tuple(rcpt_replies), None)
        assert data_start is not None
        if data_start.code != 354:
            return LmtpResult(mail_reply, tuple(rcpt_replies), data_start)
        await self._write(dot_stuff(content) + b".\r\n")
        replies: list[SmtpReply | None] = []
        for ok in accepted:
            replies.append(await self.read_reply() if ok else None)
        first = next(reply for reply in replies if reply is not None)
        return LmtpResult(mail_reply, tuple(rcpt_replies), first, tuple(replies))


def _extensions(reply: SmtpReply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = value
    return extensions
