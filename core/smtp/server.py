"""The SMTP listeners: one asyncio server per configured address and role, and their shutdown.

Roles: ``smtp`` (the port-25 MX role), ``submission`` (587, AUTH required) and ``smtps``
(465, implicit TLS). Shutdown stops accepting at once, lets sessions finish within the
grace period, then closes the rest with 421 4.3.2; a session that is committing a message
to the spool is always allowed to finish that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mailgate.core.config import Config, ListenAddress
from mailgate.core.errors import ConfigError
from mailgate.core.milter import MilterSpec
from mailgate.core.smtp.filtering import build_specs
from mailgate.core.smtp.handler import DeliveryHandler
from mailgate.core.smtp.limits import ConnectionLimits, SlidingWindow
from mailgate.core.smtp.session import MailgateSMTP
from mailgate.core.spool.envelope import SpoolEnvelope

if TYPE_CHECKING:
    from mailgate.core.relay.queue import RelayAgent

log = logging.getLogger("mailgate.smtp")

ROLES = ("smtp", "submission", "smtps")


class UserDirectory(Protocol):
    """What the SMTP server needs of the user store (called from worker threads)."""

    def authenticate(self, login: str, password: str) -> str | None: ...
    def resolve(self, recipient: str) -> list[str] | None: ...
    def is_local_domain(self, domain: str) -> bool: ...
    def list_domains(self) -> list[str]: ...
    def may_send_as(self, login: str, sender: str) -> bool: ...


class MessageSpool(Protocol):
    async def store(
        self, envelope: SpoolEnvelope, content: bytes | bytearray, *, prefix: bytes = b""
    ) -> None: ...
    async def hold(
        self,
        envelope: SpoolEnvelope,
        content: bytes | bytearray,
        reason: str,
        *,
        prefix: bytes = b"",
    ) -> None: ...


class DeliveryQueue(Protocol):
    def submit(self, queue_id: str, stored: tuple[SpoolEnvelope, bytes] | None = None) -> None: ...


@dataclass
class ServerContext:
    """Everything sessions share: settings, stores, limits and the set of live sessions."""

    config: Config
    users: UserDirectory
    spool: MessageSpool
    delivery: DeliveryQueue
    tls_context: ssl.SSLContext | None
    auth_failure_delay: float = 1.0
    # The outbound queue, for ETRN and ATRN (None without outbound delivery).
    relay: RelayAgent | None = None
    sessions: set[MailgateSMTP] = field(default_factory=set)
    shutting_down: bool = False
    limits: ConnectionLimits = field(init=False)
    auth_failures: SlidingWindow = field(init=False)
    relay_networks: list[Any] = field(init=False)
    etrn_networks: list[Any] = field(init=False)
    milter_specs: list[MilterSpec] = field(init=False)
    _ids: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _background: set[asyncio.Future[Any]] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.limits = ConnectionLimits(
            config.max_connections,
            config.max_connections_per_ip,
            config.rate_limit_connections,
            config.rate_limit_window,
        )
        self.auth_failures = SlidingWindow(config.auth_max_failures, config.auth_failure_window)
        self.relay_networks = config.relay_network_objects
        self.etrn_networks = [
            *self.relay_networks,
            *(ipaddress.ip_network(net, strict=False) for net in config.etrn_networks),
        ]
        self.milter_specs = build_specs(config)
        self._prefix = f"{os.getpid():x}"

    def track(self, future: asyncio.Future[Any]) -> None:
        """Keep a background task alive until it is done (asyncio holds only weak refs)."""
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def next_session_id(self) -> str:
        return f"s{self._prefix}.{next(self._ids)}"


class SmtpServer:
    """Binds every configured listener and runs sessions until ``shutdown``."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.handler = DeliveryHandler(context)
        self.servers: list[asyncio.Server] = []
        self.bound: dict[str, list[str]] = {role: [] for role in ROLES}

    def _factory(self, role: str) -> Callable[[], MailgateSMTP]:
        return lambda: MailgateSMTP(self.context, self.handler, role)

    async def start(self) -> None:
        config = self.context.config
        listeners: list[tuple[str, ListenAddress]] = []
        for role, addresses in (
            ("smtp", config.smtp_listen),
            ("submission", config.submission_listen),
            ("smtps", config.smtps_listen),
        ):
            listeners += [(role, address) for address in addresses]
        if any(role == "smtps" for role, _ in listeners) and self.context.tls_context is None:
            raise ConfigError(["smtps_listen: implicit TLS needs a certificate"])
        try:
            for role, address in listeners:
                await self._bind(role, address)
        except BaseException:
            await self.close_listeners()
            raise

    async def _bind(self, role: str, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        tls = self.context.tls_context if role == "smtps" else None
        timeout = self.context.config.command_timeout
        try:
            if address.is_unix:
                _remove_stale_socket(Path(address.path))
                server = await loop.create_unix_server(
                    self._factory(role),
                    address.path,
                    ssl=tls,
                    ssl_handshake_timeout=timeout if tls else None,
                )
                os.chmod(address.path, 0o666)
            else:
                server = await loop.create_server(
                    self._factory(role),
                    address.host,
                    address.port,
                    ssl=tls,
                    ssl_handshake_timeout=timeout if tls else None,
                    reuse_address=True,
                    backlog=1024,
                )
        except OSError as exc:
            raise ConfigError(
                [f"{role}_listen: cannot listen on {address}: {exc.strerror}"]
            ) from None
        self.servers.append(server)
        names = [_sockname(sock.getsockname()) for sock in server.sockets]
        self.bound[role] += names
        log.info("listening for %s on %s", role, ", ".join(names))

    async def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers.clear()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; wait up to ``grace`` seconds for sessions; 421 4.3.2 to the rest."""
        self.context.shutting_down = True
        for server in self.servers:
            server.close()
        sessions = self.context.sessions
        if sessions:
            log.info("shutdown: waiting up to %.0fs for %d session(s)", grace, len(sessions))
        deadline = asyncio.get_running_loop().time() + grace
        while sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        # A session committing a message to the spool finishes that commit first.
        while any(session.busy for session in sessions):
            await asyncio.sleep(0.05)
        for session in list(sessions):
            session.abort_for_shutdown()
        for _ in range(40):
            if not sessions:
                break
            await asyncio.sleep(0.05)
        self.servers.clear()


def _sockname(name: Any) -> str:
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{name}"


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a previous run, but only if nobody listens on it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError([f"unix:{path}: exists and is not a socket"])
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise ConfigError([f"unix:{path}: another server is listening there"])
    finally:
        probe.close()
