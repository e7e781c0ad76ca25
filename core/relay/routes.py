"""Per-domain routes: which next hop a remote domain's mail goes to, and how.

A route (setting ``relay_routes``) names a domain, or ``*`` for every remote domain (a
smarthost), and a fixed next hop: host and port, the TLS mode (``opportunistic``,
``starttls`` = required, ``implicit``, ``none``), certificate verification and optional
AUTH credentials. A domain without a route goes to its MX hosts on ``relay_port`` with
``relay_tls``. Lookup order: the exact domain, then each parent domain, then ``*``.
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


class Router:
    def __init__(
        self, routes: Sequence[RouteConfig], *, port: int = 25, tls: str = "opportunistic"
    ) -> None:
        self._routes = {route.domain: route for route in routes}
        self._port = port
        self._tls = tls

    def destination(self, domain: str) -> Destination:
        domain = domain.lower().rstrip(".")
        route = self._find(domain)
        if route is None:
            return Destination(domain, f"mx:{domain}", self._port, self._tls)
        return Destination(domain, f"route:{route.host}:{route.port}", route.port, route.tls, route)

    def _find(self, domain: str) -> RouteConfig | None:
        labels = domain.split(".")
        for start in range(len(labels)):
            route = self._routes.get(".".join(labels[start:]))
            if route is not None:
                return route
        return self._routes.get("*")
