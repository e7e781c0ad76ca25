"""Per-domain routes: which next hop a remote domain's mail goes to, and how.

A route (setting ``relay_routes``) names a domain, or ``*`` for every remote domain (a
smarthost), and a transport:

- ``smtp``: a fixed next hop, host and port, the TLS mode (``opportunistic``,
  ``starttls`` = required, ``implicit``, ``none``), certificate verification and optional
  AUTH credentials;
- ``lmtp``: a mailbox server (Dovecot, Cyrus) over TCP or a Unix socket (RFC 2033);
- ``hold``: no delivery at all; the mail waits in the queue until the domain's customer
  connects and turns the connection around with ATRN (RFC 2645).

A domain without a route goes to its MX hosts on ``relay_port`` with ``relay_tls``.
Lookup order: the exact domain, then each parent domain, then ``*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailgate.core.config import RouteConfig


@dataclass(frozen=True, slots=True)
class Destination:
    """How to reach one domain: by MX (``route`` None) or through a fixed route.

    ``key`` names the destination for concurrency limits and connection reuse: the domain
    for MX delivery, the next hop for a route, so that every domain sent through one
    smarthost shares its limit and its connections.
    """

    domain: str
    key: str
    port: int
    tls: str
    route: RouteConfig | None = None

    @property
    def transport(self) -> str:
        return self.route.transport if self.route is not None else "smtp"


class Router:
    def __init__(
        self, routes: Sequence[RouteConfig], *, port: int = 25, tls: str = "opportunistic"
    ) -> None:
        self._routes = {route.domain: route for route in routes}
        self._port = port
        self._tls = tls

    def destination(self, domain: str) -> Destination:
        domain = domain.lower().rstrip(".")
        route = self.find(domain)
        if route is None:
            return Destination(domain, f"mx:{domain}", self._port, self._tls)
        return Destination(domain, _key(route), route.port, route.tls, route)

    def find(self, domain: str) -> RouteConfig | None:
        """The route for ``domain``: its own, a parent domain's, or ``*``; None for MX."""
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels)):
            route = self._routes.get(".".join(labels[start:]))
            if route is not None:
                return route
        return self._routes.get("*")

    def route_for(self, domain: str) -> RouteConfig | None:
        """The route configured for exactly ``domain`` (or ``*``), without parent lookup."""
        return self._routes.get(domain.lower().rstrip("."))

    def hold_routes(self) -> list[RouteConfig]:
        return [route for route in self._routes.values() if route.transport == "hold"]


def _key(route: RouteConfig) -> str:
    if route.transport == "hold":
        return f"hold:{route.domain}"
    if route.transport == "lmtp":
        where = f"unix:{route.path}" if route.path else f"{route.host}:{route.port}"
        return f"lmtp:{where}"
    return f"route:{route.host}:{route.port}"
