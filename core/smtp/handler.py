"""What the gateway does with each envelope step: sender ownership, relay control, acceptance.

The session asks three questions here: may this sender be used (MAIL), may this recipient
be accepted (RCPT: local user, alias, or relay for trusted clients only), and what becomes
of the message (DATA: Received header, durable spool, hand-off to delivery). No open relay
is possible unless ``open_relay`` is set explicitly.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import re
import time
from typing import TYPE_CHECKING

from mailgate.core.errors import SpoolError, UserStoreError
from mailgate.core.smtp import replies
from mailgate.core.smtp.filtering import join_message, split_message
from mailgate.core.smtp.parser import MailPath
from mailgate.core.smtp.replies import Reply
from mailgate.core.spool.envelope import BodyType, SpoolEnvelope
from mailgate.core.spool.queue_id import new_queue_id

if TYPE_CHECKING:
    from mailgate.core.smtp.server import ServerContext
    from mailgate.core.smtp.session import MailgateSMTP

log = logging.getLogger("mailgate.smtp")

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)
_HELO_UNSAFE = re.compile(r"[^\x21-\x7e]")


_stamp: tuple[int, str] = (-1, "")
# Messages up to this size are handed to delivery in memory; bigger ones are read back.
_HAND_OVER = 256 * 1024


def _date_stamp() -> str:
    """The RFC 5322 date for trace headers, formatted once per second (not per message)."""
    global _stamp
    now = int(time.time())
    if _stamp[0] != now:
        _stamp = (now, email.utils.format_datetime(email.utils.localtime()))
    return _stamp[1]


class DeliveryHandler:
    """The core's own decisions for MAIL, RCPT and DATA; the milter chain adds its own.

    User-store lookups run on the event loop: they are indexed reads of a small SQLite
    database in WAL mode (readers never wait for writers), far cheaper than a hop to a
    worker thread. Only password checks, which are slow on purpose, go to a thread.
    """

    def __init__(self, context: ServerContext) -> None:
        self.context = context

    # -- MAIL --------------------------------------------------------------------------

    async def check_sender(self, session: MailgateSMTP, path: MailPath) -> Reply:
        if session.auth_user is not None:
            allowed = self.context.users.may_send_as(session.auth_user, path.address)
            if not allowed:
                log.warning(
                    "%s: reject: sender <%s> not owned by %s",
                    session.session_id,
                    path.address,
                    session.auth_user,
                )
                return replies.SENDER_NOT_OWNED
        session.queue_id = new_queue_id()
        log.info(
            "%s: %s: client=[%s]%s, from=<%s>",
            session.session_id,
            session.queue_id,
            session.client_ip,
            f", sasl_username={session.auth_user}" if session.auth_user else "",
            path.address,
        )
        return replies.ok("Sender ok")

    # -- RCPT --------------------------------------------------------------------------

    async def is_local_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if not domain.isascii():
            try:
                domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                return False
        if domain in self.context.config.local_domains:
            return True
        return self.context.users.is_local_domain(domain)

    def may_relay(self, session: MailgateSMTP) -> bool:
        if session.auth_user is not None or self.context.config.open_relay:
            return True
        if session.client_ip in ("", "unix"):
            return False
        try:
            address = ipaddress.ip_address(session.client_ip)
        except ValueError:
            return False
        return any(address in network for network in self.context.relay_networks)

    async def check_recipient(self, session: MailgateSMTP, path: MailPath) -> tuple[Reply, str]:
        """The reply to RCPT and the address to record for it (``<Postmaster>`` gets a domain)."""
        queue_id = session.queue_id or "NOQUEUE"
        if path.address == "Postmaster":
            return await self._postmaster(session)
        if await self.is_local_domain(path.domain):
            try:
                targets = self.context.users.resolve(path.address)
            except UserStoreError as exc:
                # An alias loop or runaway expansion is the operator's to fix: ask to retry.
                log.error(
                    "%s: %s: cannot resolve <%s>: %s",
                    session.session_id,
                    queue_id,
                    path.address,
                    exc,
                )
                return replies.LOOKUP_FAILED, path.address
            if targets is None:
                log.info(
                    "%s: %s: reject: RCPT from [%s]: <%s>: user unknown",
                    session.session_id,
                    queue_id,
                    session.client_ip,
                    path.address,
                )
                return replies.UNKNOWN_USER, path.address
            return Reply(250, "2.1.5", "Recipient ok"), path.address
        if self.may_relay(session):
            return Reply(250, "2.1.5", "Recipient ok (relay)"), path.address
        log.warning(
            "%s: %s: reject: RCPT from [%s]: <%s>: relay access denied",
            session.session_id,
            queue_id,
            session.client_ip,
            path.address,
        )
        return replies.RELAY_DENIED, path.address

    async def _known(self, address: str) -> bool:
        try:
            return self.context.users.resolve(address) is not None
        except UserStoreError:
            return False

    async def _postmaster(self, session: MailgateSMTP) -> tuple[Reply, str]:
        # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted; it lands on the
        # postmaster of the first local domain that has one.
        domains = list(self.context.config.local_domains)
        domains += self.context.users.list_domains()
        for domain in [self.context.config.hostname, *domains]:
            address = f"postmaster@{domain}"
            if await self._known(address):
                return Reply(250, "2.1.5", f"Recipient ok ({address})"), address
        return replies.UNKNOWN_USER, "Postmaster"

    async def verify(self, session: MailgateSMTP, argument: str) -> Reply:
        address = argument.strip().strip("<>")
        if "@" not in address:
            return Reply(553, "5.1.3", "VRFY needs a full address")
        domain = address.rsplit("@", 1)[1]
        if not await self.is_local_domain(domain):
            return Reply(252, "2.1.5", "Not a local address; will attempt delivery")
        if not await self._known(address):
            return replies.UNKNOWN_USER
        return Reply(250, "2.1.5", f"<{address}>")

    # -- DATA --------------------------------------------------------------------------

    def received_header(self, session: MailgateSMTP, queue_id: str) -> bytes:
        config = self.context.config
        helo = _HELO_UNSAFE.sub("?", session.sess.host_name or "unknown")[:255]
        smtputf8 = session.env.smtp_utf8
        protocol = ("UTF8SMTP" if smtputf8 else "ESMTP") if session.sess.extended_smtp else "SMTP"
        tls = session.tls_info()
        if tls is not None:
            protocol += "S"
        if session.auth_user is not None:
            protocol += "A"
        lines = [f"Received: from {helo} ([{session.client_ip}])"]
        if tls is not None:
            version, cipher, bits = tls
            lines.append(f"\t(using {version} with cipher {cipher} ({bits} bits))")
        lines.append(f"\tby {config.hostname} (mailgate) with {protocol} id {queue_id}")
        recipients = session.env.rcpt_tos
        stamp = _date_stamp()
        if len(recipients) == 1:
            lines.append(f"\tfor <{recipients[0]}>; {stamp}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{stamp}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    async def accept_message(self, session: MailgateSMTP, content: bytes | bytearray) -> Reply:
        queue_id = session.queue_id or new_queue_id()
        envelope = session.env
        spool_envelope = SpoolEnvelope(
            queue_id=queue_id,
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            client_address=session.client_ip,
            client_name="",
            helo=session.sess.host_name or "",
            auth_user=session.auth_user,
            mail_options=list(envelope.mail_options),
            rcpt_options=[_param_list(params) for params in session.rcpt_params],
            body_type=_body_type(session.body_type),
            smtputf8=bool(envelope.smtp_utf8),
        )
        hold_reason: str | None = None
        if session.milters is not None and session.milter_info is not None:
            # The chain parses and may rewrite the message: it gets immutable bytes.
            outcome = await self._filter(session, spool_envelope, bytes(content))
            if isinstance(outcome, Reply):
                return outcome
            content, hold_reason = outcome
            if not spool_envelope.rcpt_tos:
                log.info("%s: all recipients removed by milters: discarded", queue_id)
                return replies.queued(queue_id)
        received = self.received_header(session, queue_id)
        try:
            if hold_reason is not None:
                await self.context.spool.hold(spool_envelope, content, hold_reason, prefix=received)
            else:
                await self.context.spool.store(spool_envelope, content, prefix=received)
        except (SpoolError, OSError) as exc:
            log.error("%s: %s: cannot queue message: %s", session.session_id, queue_id, exc)
            return replies.SPOOL_FAILED
        match = _MESSAGE_ID.search(content, 0, 65536)
        if match:
            message_id = match.group(1).decode("utf-8", "replace")[:200]
            log.info("%s: message-id=%s", queue_id, message_id)
        log.info(
            "%s: from=<%s>, size=%d, nrcpt=%d (%s)",
            queue_id,
            spool_envelope.mail_from,
            len(received) + len(content),
            len(spool_envelope.rcpt_tos),
            f"held: {hold_reason}" if hold_reason is not None else "queue active",
        )
        if hold_reason is None:
            # A small message goes to delivery as it was stored, sparing it the read back.
            size = len(received) + len(content)
            stored = (spool_envelope, received + content) if size <= _HAND_OVER else None
            self.context.delivery.submit(queue_id, stored)
        return replies.queued(queue_id)

    async def _filter(
        self, session: MailgateSMTP, envelope: SpoolEnvelope, content: bytes
    ) -> Reply | tuple[bytes, str | None]:
        """End of message through the milter chain: a refusal, or the message to queue.

        Applies what the milters changed (headers, body, sender, recipients) to ``envelope``
        and returns the new content with the quarantine reason, if any. A discarded
        message empties the recipient list.
        """
        assert session.milters is not None and session.milter_info is not None
        framed = split_message(content)
        headers, body = framed if framed is not None else ([], content)
        result = await session.milters.end_of_message(session.milter_info, headers, body)
        queue_id = envelope.queue_id
        if result.disconnect or result.refused:
            log.info(
                "%s: milter-reject: END-OF-MESSAGE from [%s]: %s (milter %s); from=<%s>",
                queue_id,
                session.client_ip,
                result.reply,
                result.milter,
                envelope.mail_from,
            )
            return result.reply or replies.LOCAL_ERROR
        if result.action == "discard":
            log.info("%s: milter-discard: END-OF-MESSAGE (milter %s)", queue_id, result.milter)
            envelope.rcpt_tos = []
            envelope.rcpt_options = []
            return content, None
        if result.headers_changed or result.body_replaced:
            content = join_message(result.headers, result.body)
        if result.sender_changed:
            log.info("%s: milter changed sender to <%s>", queue_id, result.sender)
            envelope.mail_from = result.sender
            if result.sender_params is not None:
                envelope.mail_options = list(result.sender_params)
        if result.added_recipients or result.deleted_recipients:
            options = {
                rcpt.lower(): params
                for rcpt, params in zip(envelope.rcpt_tos, envelope.rcpt_options, strict=False)
            }
            options.update({rcpt.lower(): list(params) for rcpt, params in result.added_recipients})
            envelope.rcpt_tos = list(result.recipients)
            envelope.rcpt_options = [options.get(rcpt.lower(), []) for rcpt in envelope.rcpt_tos]
            log.info(
                "%s: milters changed recipients: added %s, removed %s",
                queue_id,
                ", ".join(f"<{r}>" for r, _ in result.added_recipients) or "none",
                ", ".join(f"<{r}>" for r in result.deleted_recipients) or "none",
            )
        return content, result.quarantine


def _body_type(declared: str) -> BodyType:
    """The envelope's body type: BINARYMIME makes delivery keep the octets unconverted."""
    if declared == "8BITMIME":
        return "8BITMIME"
    if declared == "BINARYMIME":
        return "BINARYMIME"
    return "7BIT"


def _param_list(params: dict[str, str | None]) -> list[str]:
    return [key if value is None else f"{key}={value}" for key, value in params.items()]
