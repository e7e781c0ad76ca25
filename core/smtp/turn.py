"""ETRN (RFC 1985) and ATRN (RFC 2645): a client asks the server to start its queue.

ETRN asks the server to attempt delivery now of the mail queued for a domain
(``ETRN example.org``), for a domain and its subdomains (``ETRN @example.org``), or for
a named queue (``ETRN #example.org``: everything that goes through the route configured
for ``example.org``, ``#*`` the smarthost's). Who may ask: clients in ``etrn_networks``
or ``relay_networks``, and authenticated users; which domains: those in
``etrn_domains`` (any domain when the list is empty). Domains whose route is ``hold``
wait for ATRN and cannot be started with ETRN. Replies (RFC 1985 section 5):

    250  OK, queuing for node started          (a named queue was started)
    251  OK, no messages waiting for node
    253  OK, <n> pending messages for node started
    458  Unable to queue messages for node     (no outbound delivery here)
    459  Node not allowed: <reason>            (client, domain or hold route)
    501  Syntax Error in Parameters            (no or a malformed argument)

ATRN (On-Demand Mail Relay) turns the connection around: the authenticated customer
becomes the SMTP server and receives the mail held for its domains on the same
connection. Only on submission (and smtps), only after AUTH. Replies (RFC 2645
section 4.2): 250 (now reversing the connection), 450 (ATRN request refused: not a
domain the user may turn), 451 (unable to process ATRN request now: a domain is being
turned by another session), 453 (no mail), 502 (not on this port), 530 (authentication
required), 501 (syntax).

The decisions are here, as functions of the request; the session sends the replies and
performs the turn-around (``MailgateSMTP.smtp_ATRN``), the relay delivers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailgate.core.smtp.replies import Reply

if TYPE_CHECKING:
    from mailgate.core.relay.queue import RelayAgent

_DOMAIN = re.compile(
    r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$", re.IGNORECASE
)

ETRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ETRN domain | @domain | #queue")
ATRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ATRN [domain[,domain...]]")
ATRN_NOT_HERE = Reply(502, "5.5.1", "ATRN is available on the submission port only")
ATRN_AUTH = Reply(530, "5.7.0", "Authentication required")
ATRN_NO_MAIL = Reply(453, "4.2.0", "You have no mail")
ATRN_OK = Reply(250, "2.0.0", "OK now reversing the connection")


@dataclass(frozen=True, slots=True)
class EtrnRequest:
    kind: str  # "domain", "subdomains" (@domain) or "queue" (#name)
    name: str

    @property
    def node(self) -> str:
        return {"domain": "", "subdomains": "@", "queue": "#"}[self.kind] + self.name


def parse_etrn(arg: str | None) -> EtrnRequest | None:
    """``domain``, ``@domain`` or ``#queue``; None when it is not one of them."""
    text = (arg or "").strip()
    if not text or " " in text:
        return None
    if text.startswith("#"):
        name = text[1:].lower()
        return EtrnRequest("queue", name) if name == "*" or _DOMAIN.match(name) else None
    kind = "subdomains" if text.startswith("@") else "domain"
    name = text.lstrip("@").lower().rstrip(".")
    return EtrnRequest(kind, name) if _DOMAIN.match(name) else None


def etrn_client_allowed(
    client_ip: str,
    authenticated: bool,
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    if authenticated:
        return True
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _in(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def etrn_matcher(request: EtrnRequest, relay: RelayAgent) -> Callable[[str], bool]:
    """Which target domains the request names (hold routes never: they wait for ATRN)."""

    def not_held(domain: str) -> bool:
        route = relay.router.find(domain)
        return route is None or route.transport != "hold"

    if request.kind == "queue":
        route = relay.router.route_for(request.name)
        return lambda domain: route is not None and relay.router.find(domain) is route
    if request.kind == "subdomains":
        return lambda domain: _in(domain, request.name) and not_held(domain)
    return lambda domain: domain == request.name and not_held(domain)


async def etrn(
    request: EtrnRequest,
    *,
    relay: RelayAgent | None,
    client_allowed: bool,
    allowed_domains: list[str],
) -> Reply:
    """Start the queue for ``request`` and say what happened (RFC 1985 section 5)."""
    node = request.node
    if relay is None:
        return Reply(458, "4.3.0", f"Unable to queue messages for node {node}")
    if not client_allowed:
        return Reply(459, "5.7.1", f"Node {node} not allowed: client not authorized")
    if request.kind == "queue":
        route = relay.router.route_for(request.name)
        if route is None:
            return Reply(459, "5.1.2", f"Node {node} not allowed: no such queue")
        if route.transport == "hold":
            return Reply(459, "5.7.1", f"Node {node} not allowed: mail waits for ATRN")
        count = await relay.flush_matching(etrn_matcher(request, relay))
        if count == 0:
            return Reply(251, "2.0.0", f"OK, no messages waiting for node {node}")
        return Reply(250, "2.0.0", f"OK, queuing for node {node} started")
    if allowed_domains and not any(_in(request.name, d) for d in allowed_domains):
        return Reply(459, "5.7.1", f"Node {node} not allowed: domain not served")
    route = relay.router.find(request.name)
    if route is not None and route.transport == "hold":
        return Reply(459, "5.7.1", f"Node {node} not allowed: mail waits for ATRN")
    count = await relay.flush_matching(etrn_matcher(request, relay))
    if count == 0:
        return Reply(251, "2.0.0", f"OK, no messages waiting for node {node}")
    return Reply(253, "2.0.0", f"OK, {count} pending messages for node {node} started")


def parse_atrn(arg: str | None) -> list[str] | None:
    """The domains named (empty: every domain of the user); None on a syntax error."""
    text = (arg or "").strip()
    if not text:
        return []
    domains = [part.strip().lower().rstrip(".") for part in text.split(",")]
    if any(not _DOMAIN.match(domain) for domain in domains):
        return None
    return domains


async def atrn(
    arg: str | None, *, role: str, user: str | None, relay: RelayAgent | None
) -> tuple[Reply, list[str]]:
    """The reply to ATRN and, with 250, the domains to turn (RFC 2645 section 4.2)."""
    if role not in ("submission", "smtps") or relay is None:
        return ATRN_NOT_HERE, []
    if user is None:
        return ATRN_AUTH, []
    requested = parse_atrn(arg)
    if requested is None:
        return ATRN_SYNTAX, []
    permitted = relay.atrn_domains(user)
    domains = requested or permitted
    refused = [domain for domain in domains if domain not in permitted]
    if refused or not domains:
        what = ", ".join(refused) or "no domain"
        return Reply(450, "4.7.1", f"ATRN request refused: {what} not permitted for {user}"), []
    busy = relay.claim(domains)
    if busy:
        return Reply(
            451, "4.3.0", f"Unable to process ATRN request now: {', '.join(busy)} busy"
        ), []
    try:
        pending = await relay.held_messages(domains)
    except BaseException:
        relay.release(domains)
        raise
    if not pending:
        relay.release(domains)
        return ATRN_NO_MAIL, []
    # Still claimed: the session turns the connection around and ``relay.turn`` releases.
    return ATRN_OK, domains
