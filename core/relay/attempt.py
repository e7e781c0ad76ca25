"""One delivery attempt: one message to the targets of one destination (a domain or route).

Finds the next hops (MX or route), takes a parked connection or opens one per address in
order until a server takes the transaction, and turns the replies into one ``Outcome``
per target: sent, temporary or permanent. The caller (``mailgate.core.relay.queue``)
records the outcomes; ``on_sent`` is awaited right after a 250 to the data, before this
module does anything else with the connection, so that the record of the delivery is
durable as early as the protocol allows (the duplicate window is the fsync itself).

What the message needs from the next hop is checked here before it is sent: SMTPUTF8
(RFC 6531: a message that needs it cannot go to a server without it, 5.6.7), BINARYMIME
(RFC 3030: needs BINARYMIME and CHUNKING, else 5.6.3), and SIZE (5.3.4). An 8-bit body
goes with BODY=8BITMIME where offered, and as is otherwise (as Postfix does by default).
DELIVERBY (RFC 2852) goes along, with the time left, where offered. LMTP routes
(``lmtp``) take the same path; their per-recipient replies after the data become
per-target outcomes. ``deliver_over`` runs a transaction on a connection the caller owns
(ATRN's turned-around session).

For MX delivery, the receiving domain's TLS policy (DANE, MTA-STS: ``tlspolicy``) decides
per host whether TLS is opportunistic or required and checked; a host that fails a
required check is skipped like one that refuses the connection, never used in clear text.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mailgate.core.dns import Resolver
from mailgate.core.errors import RelayError
from mailgate.core.relay.client import Recipient, SmtpClient, SmtpReply, TransactionResult
from mailgate.core.relay.lmtp import LmtpClient, LmtpResult
from mailgate.core.relay.mx import Hop, host_hops, literal_address, mx_hops
from mailgate.core.relay.pool import ConnectionPool
from mailgate.core.relay.routes import Destination
from mailgate.core.relay.tlspolicy import HopTls, TlsPolicies
from mailgate.core.smtp.deliverby import by_of, pass_on_param
from mailgate.core.smtp.dsnparams import options_dict, xtext_encode
from mailgate.core.spool.envelope import SpoolEnvelope

log = logging.getLogger("mailgate.relay")

_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of an attempt for one target."""

    kind: str  # "sent", "temporary", "permanent"
    status: str  # RFC 3463
    reply: str
    remote_mta: str = ""
    dsn_relayed: bool = False


@dataclass(frozen=True, slots=True)
class AttemptSettings:
    helo: str
    connect_timeout: float
    command_timeout: float


def header_block(content: bytes) -> bytes:
    match = _HEADER_END.search(content)
    return content[: match.start()] if match else content


def needs_smtputf8(envelope: SpoolEnvelope, targets: Sequence[str], content: bytes) -> bool:
    """Whether the message cannot be sent without SMTPUTF8: non-ASCII addresses or headers."""
    if not envelope.mail_from.isascii() or not all(t.isascii() for t in targets):
        return True
    return envelope.smtputf8 and not header_block(content).isascii()


def _mail_params(client: SmtpClient, envelope: SpoolEnvelope, size: int, utf8: bool) -> list[str]:
    params = []
    if client.offers("DELIVERBY"):
        # RFC 2852 section 4: the next hop gets the time that is left, not the original.
        by = pass_on_param(envelope.mail_options, envelope.received_at, time.time())
        if by is not None:
            params.append(by)
    if client.offers("SIZE"):
        params.append(f"SIZE={size}")
    if envelope.body_type == "BINARYMIME":
        params.append("BODY=BINARYMIME")
    elif envelope.body_type == "8BITMIME" and client.offers("8BITMIME"):
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    if client.offers("DSN"):
        options = options_dict(envelope.mail_options)
        for key in ("RET", "ENVID"):
            if options.get(key):
                params.append(f"{key}={options[key]}")
    return params


def _recipient(client: SmtpClient, envelope: SpoolEnvelope, target: str, orig: str) -> Recipient:
    if not client.offers("DSN"):
        return Recipient(target)
    options = options_dict(envelope.options_of(orig))
    params = []
    if options.get("NOTIFY"):
        params.append(f"NOTIFY={options['NOTIFY']}")
    if options.get("ORCPT"):
        params.append(f"ORCPT={options['ORCPT']}")
    elif orig.isascii():
        # RFC 3461 section 4.2: pass the original recipient on when the client gave none.
        params.append(f"ORCPT=rfc822;{xtext_encode(orig)}")
    return Recipient(target, tuple(params))


async def find_hops(resolver: Resolver, destination: Destination, rng: random.Random) -> list[Hop]:
    route = destination.route
    if route is not None and route.path:
        # LMTP over a Unix socket: one "hop", the socket itself.
        return [Hop(route.host or "localhost", route.path, 0)]
    if route is not None:
        return await host_hops(resolver, route.host, route.port)
    return await mx_hops(resolver, destination.domain, destination.port, rng)


async def _connect_with_policy(
    hop: Hop,
    destination: Destination,
    settings: AttemptSettings,
    hop_tls: HopTls | None,
    policies: TlsPolicies | None,
) -> SmtpClient:
    if hop_tls is None or policies is None:
        return await _connect(hop, destination, settings)
    if hop_tls.check is not None:
        try:
            client = await SmtpClient.connect(
                hop.host,
                hop.address,
                hop.port,
                helo=settings.helo,
                connect_timeout=settings.connect_timeout,
                command_timeout=settings.command_timeout,
                tls_policy=hop_tls.check,
            )
        except RelayError as exc:
            policies.failed(hop_tls, hop, exc)
            if hop_tls.kind != "sts-testing" or exc.status not in ("4.7.4", "4.7.5"):
                raise
            # MTA-STS testing mode (RFC 8461 section 5): report the failure, deliver anyway.
            log.info("%s (MTA-STS testing mode: delivering without the policy)", exc)
        else:
            policies.connected(hop_tls, hop, client)
            return client
    client = await _connect(hop, destination, settings)
    if hop_tls.kind != "sts-testing":
        policies.connected(hop_tls, hop, client)
    return client


async def _connect(hop: Hop, destination: Destination, settings: AttemptSettings) -> SmtpClient:
    route = destination.route
    if route is not None and route.transport == "lmtp":
        return await LmtpClient.open(
            host=hop.host,
            address=hop.address,
            port=hop.port,
            path=route.path,
            helo=settings.helo,
            tls=route.tls,
            tls_verify=route.tls_verify,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
        )
    try:
        return await SmtpClient.connect(
            hop.host,
            hop.address,
            hop.port,
            helo=settings.helo,
            tls=destination.tls,
            tls_verify=route.tls_verify if route else False,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            username=route.username if route else None,
            password=route.password if route else None,
        )
    except RelayError as exc:
        if destination.tls != "opportunistic" or exc.status != "4.7.5":
            raise
        # Opportunistic TLS that fails is retried in clear text (RFC 3207 leaves this to
        # the client; Postfix does the same), so a broken TLS stack does not stop the mail.
        log.info("%s; retrying without TLS", exc)
        return await SmtpClient.connect(
            hop.host,
            hop.address,
            hop.port,
            helo=settings.helo,
            tls="none",
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
        )


def _all(targets: Sequence[str], outcome: Outcome) -> dict[str, Outcome]:
    return {target: outcome for target in targets}


def _from_error(exc: RelayError, remote_mta: str = "") -> Outcome:
    kind = "permanent" if exc.permanent else "temporary"
    return Outcome(kind, exc.status, exc.reply or str(exc), remote_mta)


def _outcome(reply: SmtpReply, peer: str, dsn: bool) -> Outcome:
    if reply.ok:
        return Outcome("sent", reply.status, str(reply), peer, dsn)
    kind = "temporary" if reply.temporary else "permanent"
    return Outcome(kind, reply.status, str(reply), peer)


async def attempt(
    envelope: SpoolEnvelope,
    content: bytes,
    targets: dict[str, str],
    destination: Destination,
    *,
    resolver: Resolver,
    pool: ConnectionPool,
    settings: AttemptSettings,
    on_sent: Callable[[dict[str, Outcome]], Awaitable[None]],
    rng: random.Random,
    policies: TlsPolicies | None = None,
) -> dict[str, Outcome]:
    """Deliver to ``targets`` (target → original recipient); an Outcome for every target.

    Outcomes of targets that were sent are passed to ``on_sent`` (and awaited) first.
    """
    names = list(targets)
    try:
        hops = await find_hops(resolver, destination, rng)
    except RelayError as exc:
        return _all(names, _from_error(exc))
    domain_tls = None
    mx_delivery = destination.route is None and destination.tls != "none"
    if policies is not None and mx_delivery and literal_address(destination.domain) is None:
        domain_tls = await policies.domain(destination.domain)
    last: Outcome | None = None
    reused = pool.take(destination.key)
    candidates: list[Hop | SmtpClient] = [reused] if reused is not None else []
    candidates.extend(hops)
    for candidate in candidates:
        if isinstance(candidate, SmtpClient):
            client = candidate
        else:
            try:
                hop_tls = None
                if domain_tls is not None and policies is not None:
                    hop_tls = await policies.hop(domain_tls, candidate)
                client = await _connect_with_policy(
                    candidate, destination, settings, hop_tls, policies
                )
            except RelayError as exc:
                log.info("%s: %s", envelope.queue_id, exc)
                # Even a server that refuses the session for good (a 554 greeting) speaks
                # for the whole destination only if it is the last one: try the others.
                last = _from_error(exc, f"{candidate.host}[{candidate.address}]")
                continue
        try:
            outcomes = await _transaction(client, envelope, content, targets, on_sent)
        except RelayError as exc:
            # The connection broke; a parked one may simply have been closed by the server.
            client.close()
            log.info("%s: %s", envelope.queue_id, exc)
            last = _from_error(exc, client.peer)
            if exc.permanent:
                last = Outcome("temporary", "4.4.2", last.reply, last.remote_mta)
            continue
        if outcomes is None:
            # The server refused the transaction as a whole (4xx to MAIL): try the next one.
            pool.put(destination.key, client)
            last = Outcome("temporary", "4.4.2", "MAIL FROM refused temporarily", client.peer)
            continue
        pool.put(destination.key, client)
        return outcomes
    assert last is not None or not candidates
    if last is None:
        last = Outcome("temporary", "4.4.1", f"no next hop for {destination.domain}")
    return _all(names, last)


async def deliver_over(
    client: SmtpClient,
    envelope: SpoolEnvelope,
    content: bytes,
    targets: dict[str, str],
    on_sent: Callable[[dict[str, Outcome]], Awaitable[None]],
) -> dict[str, Outcome]:
    """Deliver over a connection the caller already has (ATRN's turned-around session).

    Every failure is an outcome: a refused MAIL or a broken connection is temporary for
    every target.
    """
    names = list(targets)
    try:
        outcomes = await _transaction(client, envelope, content, targets, on_sent)
    except RelayError as exc:
        failed = _from_error(exc, client.peer)
        return _all(names, Outcome("temporary", "4.4.2", failed.reply, failed.remote_mta))
    if outcomes is None:
        return _all(names, Outcome("temporary", "4.4.2", "MAIL FROM refused", client.peer))
    return outcomes


async def _transaction(
    client: SmtpClient,
    envelope: SpoolEnvelope,
    content: bytes,
    targets: dict[str, str],
    on_sent: Callable[[dict[str, Outcome]], Awaitable[None]],
) -> dict[str, Outcome] | None:
    names = list(targets)
    peer = client.peer
    utf8 = needs_smtputf8(envelope, names, content)
    if utf8 and not client.offers("SMTPUTF8"):
        message = f"{peer} does not support SMTPUTF8, which this message needs"
        return _all(names, Outcome("permanent", "5.6.7", message, peer))
    binary = envelope.body_type == "BINARYMIME"
    # LMTP here sends with DATA only: a binary body cannot go over it.
    lmtp = isinstance(client, LmtpClient)
    if binary and (lmtp or not (client.offers("BINARYMIME") and client.offers("CHUNKING"))):
        message = f"{peer} does not support BINARYMIME; the message cannot be converted"
        return _all(names, Outcome("permanent", "5.6.3", message, peer))
    limit = client.max_size
    if limit is not None and len(content) > limit:
        message = f"message size {len(content)} exceeds the limit of {peer} ({limit})"
        return _all(names, Outcome("permanent", "5.3.4", message, peer))
    recipients = [_recipient(client, envelope, t, targets[t]) for t in names]
    # A next hop without DELIVERBY cannot honour BY: success is then still ours to report
    # (RFC 2852 section 4: a "relayed" notice when asked for).
    dsn = client.offers("DSN") and (
        client.offers("DELIVERBY") or by_of(envelope.mail_options) is None
    )
    result: TransactionResult = await client.send(
        envelope.mail_from,
        _mail_params(client, envelope, len(content), utf8),
        recipients,
        content,
        binary=binary,
    )
    if not result.mail.ok:
        if result.mail.temporary:
            await client.rset()
            return None
        return _all(names, _outcome(result.mail, peer, dsn))
    # LMTP (RFC 2033) answers the data once per accepted recipient; SMTP once for all.
    per_rcpt = result.data_replies if isinstance(result, LmtpResult) else ()
    outcomes: dict[str, Outcome] = {}
    for index, (target, reply) in enumerate(zip(names, result.rcpts, strict=True)):
        data = per_rcpt[index] if per_rcpt else result.data
        if not reply.ok:
            outcomes[target] = _outcome(reply, peer, dsn)
        elif data is None:
            outcomes[target] = Outcome("temporary", "4.0.0", "no reply to the data", peer)
        else:
            outcomes[target] = _outcome(data, peer, dsn)
    sent = {target: o for target, o in outcomes.items() if o.kind == "sent"}
    if sent:
        # Durable before anything else happens on this connection (see the docstring).
        await on_sent(sent)
    return outcomes
