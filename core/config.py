"""The typed configuration of mailgate: one validated object from YAML, environment and flags.

Precedence, lowest first: built-in defaults, the YAML file (``--config``), ``MAILGATE_*``
environment variables, command-line flags. Every problem is reported at once, each naming
where the bad value came from: ``file:line: field: message`` for the YAML file,
``$MAILGATE_FIELD: message`` for the environment and ``--flag: message`` for flags.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailgate.core.errors import ConfigError
from mailgate.policies.yamllines import YamlSyntaxError, load_with_lines

ENV_PREFIX = "MAILGATE_"
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdwSMHDW]?)\s*$")
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listening socket: ``host:port``, ``[v6]:port`` or ``unix:/path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(value: str) -> ListenAddress:
    """Parse one listen value; raise ValueError with a message an operator understands."""
    text = value.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {path!r}")
        return ListenAddress(path=path)
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"expected [v6-address]:port, got {text!r}")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, [v6]:port or unix:/path, got {text!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses must be bracketed: [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
    return ListenAddress(host=host, port=int(port_text))


def parse_size(value: Any) -> int:
    """Accept 1048576, "1048576", "10M", "512k", "1G"."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10485760 or 10M")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"expected a size such as 10485760 or 10M, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _to_listen(value: Any) -> ListenAddress:
    return value if isinstance(value, ListenAddress) else parse_listen(str(value))


def _to_domain(value: Any) -> str:
    domain = str(value).strip().rstrip(".").lower()
    if not domain.isascii():
        # Internationalized names are kept in their A-label form, as the user store does.
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{value!r} is not a valid domain name") from None
    if not _DOMAIN_RE.match(domain):
        raise ValueError(f"{value!r} is not a valid domain name")
    return domain


def _to_network(value: Any) -> str:
    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network (e.g. 192.0.2.0/24)") from None
    return str(value)


# Item-level validation, so an error in a list names the item's index (and its YAML line).
Listen = Annotated[ListenAddress, BeforeValidator(_to_listen)]
Domain = Annotated[str, BeforeValidator(_to_domain)]
Network = Annotated[str, BeforeValidator(_to_network)]


MilterAction = Literal["tempfail", "accept", "reject", "quarantine"]
MacroStage = Literal["connect", "helo", "mail", "rcpt", "data", "eoh", "eom"]
_MILTER_SOCKET = re.compile(r"^(inet6?:\d{1,5}@[^\s@]+|inet6?:[^\s@]+:\d{1,5}|unix:/\S+)$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class MilterConfig(BaseModel):
    """One milter in the chain: a socket to reach it, and optionally a daemon to run there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    socket: str | None = None
    daemon: str | None = None
    rules: Path | None = None
    default_action: MilterAction | None = None
    connect_timeout: float | None = Field(default=None, gt=0)
    command_timeout: float | None = Field(default=None, gt=0)
    content_timeout: float | None = Field(default=None, gt=0)
    macros: dict[MacroStage, list[str]] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r}: use lower-case letters, digits, '-' and '_'")
        return value

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: str | None) -> str | None:
        if value is not None and not _MILTER_SOCKET.match(value):
            raise ValueError(
                f"{value!r}: expected inet:PORT@HOST, inet6:PORT@HOST, inet:HOST:PORT or unix:/path"
            )
        return value

    @field_validator("daemon")
    @classmethod
    def _known_daemon(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from mailgate.milters import registry

        names = [entry.name for entry in registry.daemons()]
        if value not in names:
            raise ValueError(f"{value!r} is not a mailgate daemon (known: {', '.join(names)})")
        return value

    @model_validator(mode="after")
    def _reachable(self) -> MilterConfig:
        if self.socket is None and self.daemon is None:
            raise ValueError(f"milter {self.name!r} needs a socket, a daemon, or both")
        if self.rules is not None and self.daemon is None:
            raise ValueError(f"milter {self.name!r}: rules apply only to a daemon mailgate runs")
        return self


TlsMode = Literal["opportunistic", "starttls", "implicit", "none"]
# How a route delivers: SMTP to a fixed next hop, LMTP to a mailbox server (RFC 2033), or
# not at all: "hold" keeps the mail queued until the domain's customer turns the queue
# around with ATRN (RFC 2645); "atrn" is accepted as another name for it.
RouteTransport = Literal["smtp", "lmtp", "hold"]
_ROUTE_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)$")
LMTP_PORT = 24


class RouteConfig(BaseModel):
    """One outbound route: mail for ``domain`` (``*`` = every remote domain) goes to a fixed
    next hop instead of the domain's MX hosts, over SMTP or LMTP, or waits for ATRN.
    See docs/relay.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    transport: RouteTransport = "smtp"
    host: str = ""
    port: int = Field(default=25, ge=1, le=65535)
    path: str | None = None  # LMTP over a Unix socket
    tls: TlsMode = "opportunistic"
    tls_verify: bool = False
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    atrn_users: tuple[str, ...] = ()  # hold routes: who may take the mail with ATRN

    @model_validator(mode="before")
    @classmethod
    def _transport_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if str(data.get("transport", "")).lower() == "atrn":
                data["transport"] = "hold"
            if data.get("transport") == "lmtp" and "port" not in data:
                data["port"] = LMTP_PORT
            if data.get("transport") == "lmtp" and "tls" not in data:
                # A mailbox server on the same host or LAN: no STARTTLS unless asked for.
                data["tls"] = "none"
            if isinstance(data.get("atrn_users"), str):
                data["atrn_users"] = _split_list(data["atrn_users"])
        return data

    @field_validator("domain")
    @classmethod
    def _route_domain(cls, value: str) -> str:
        if value == "*":
            return value
        return _to_domain(value)

    @field_validator("host")
    @classmethod
    def _route_host(cls, value: str) -> str:
        if value and not _ROUTE_HOST.match(value):
            raise ValueError(f"{value!r}: expected a host name, an IPv4 address or [IPv6]")
        return value.strip("[]")

    @field_validator("path")
    @classmethod
    def _route_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {value!r}")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> RouteConfig:
        if self.transport == "smtp" and not self.host:
            raise ValueError(f"route {self.domain!r}: an SMTP route needs a host")
        if self.transport == "lmtp" and not (self.host or self.path):
            raise ValueError(f"route {self.domain!r}: an LMTP route needs a host or a path")
        if self.path is not None and self.transport != "lmtp":
            raise ValueError(f"route {self.domain!r}: a socket path is only for LMTP routes")
        if self.atrn_users and self.transport != "hold":
            raise ValueError(f"route {self.domain!r}: atrn_users belong to a hold route")
        if self.transport == "hold" and self.domain == "*":
            raise ValueError("route '*': every remote domain cannot wait for ATRN")
        if (self.username is None) != (self.password is None):
            raise ValueError(f"route {self.domain!r}: username and password go together")
        if self.username is not None and self.tls in ("opportunistic", "none"):
            # Credentials never cross the network in clear text.
            raise ValueError(f"route {self.domain!r}: AUTH needs tls: starttls or implicit")
        return self


def _host_port(target: str, default_port: str) -> tuple[str, str]:
    host, port = target, default_port
    if target.startswith("["):
        close = target.find("]")
        host, rest = target[: close + 1], target[close + 1 :]
        port = rest[1:] if rest.startswith(":") else port
    elif target.count(":") == 1:
        host, _, port = target.partition(":")
    return host, port


def _to_route(value: Any) -> Any:
    """``DOMAIN=HOST[:PORT]`` (``*=HOST:PORT`` for a smarthost), ``DOMAIN=lmtp:HOST[:PORT]``,
    ``DOMAIN=lmtp:unix:/path``, ``DOMAIN=hold``, ``DOMAIN=atrn:USER``, or a mapping."""
    if not isinstance(value, str):
        return value
    domain, sep, target = value.partition("=")
    if not sep:
        raise ValueError(f"{value!r}: expected DOMAIN=HOST[:PORT] or a mapping")
    domain, target = domain.strip(), target.strip()
    scheme, colon, rest = target.partition(":")
    if target.lower() in ("hold", "atrn"):
        return {"domain": domain, "transport": "hold"}
    if colon and scheme.lower() == "atrn":
        return {"domain": domain, "transport": "hold", "atrn_users": [rest.strip()]}
    if colon and scheme.lower() == "lmtp":
        if rest.startswith("unix:"):
            return {"domain": domain, "transport": "lmtp", "path": rest[5:]}
        host, port = _host_port(rest, str(LMTP_PORT))
        return {"domain": domain, "transport": "lmtp", "host": host, "port": port}
    host, port = _host_port(target, "25")
    return {"domain": domain, "host": host, "port": port}


def _routes_list(value: Any) -> Any:
    # A JSON list in a variable or flag carries the full mappings (tls, credentials).
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f"relay_routes: invalid JSON: {exc}") from None
    return _split_list(value)


def parse_duration(value: Any) -> float:
    """Accept 300, "300", "300s", "5m", "4h", "5d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 300, 5m, 4h or 5d")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"expected a duration such as 300, 5m, 4h or 5d, got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def _to_milter(value: Any) -> Any:
    """``NAME=SOCKET`` or ``NAME=daemon`` (a built-in daemon on its default socket)."""
    if not isinstance(value, str):
        return value
    name, sep, target = value.partition("=")
    if not sep:
        raise ValueError(f"{value!r}: expected NAME=SOCKET or NAME=daemon")
    if target.strip() == "daemon":
        return {"name": name.strip(), "daemon": name.strip()}
    return {"name": name.strip(), "socket": target.strip()}


# sockaddr_un.sun_path holds 108 bytes, the final NUL included.
_MAX_UNIX_PATH = 107


class Config(BaseModel):
    """Every setting of the core. See docs/configuration.md for the meaning of each."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    data_dir: Path = Path("var")
    hostname: str = Field(default_factory=socket.getfqdn)
    smtp_listen: list[Listen] = Field(default_factory=lambda: [ListenAddress("127.0.0.1", 2525)])
    submission_listen: list[Listen] = Field(
        default_factory=lambda: [ListenAddress("127.0.0.1", 2587)]
    )
    smtps_listen: list[Listen] = Field(default_factory=lambda: [ListenAddress("127.0.0.1", 2465)])
    local_domains: list[Domain] = Field(default_factory=list)

    max_message_size: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=100, ge=1)
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_ip: int = Field(default=20, ge=1)
    rate_limit_connections: int = Field(default=120, ge=0)
    rate_limit_window: float = Field(default=60.0, gt=0)
    max_line_length: int = Field(default=1000, ge=80)
    max_errors: int = Field(default=20, ge=1)

    command_timeout: float = Field(default=300.0, gt=0)
    data_init_timeout: float = Field(default=120.0, gt=0)
    data_block_timeout: float = Field(default=180.0, gt=0)
    data_term_timeout: float = Field(default=600.0, gt=0)
    shutdown_grace: float = Field(default=30.0, ge=0)

    delivery_concurrency: int = Field(default=4, ge=1, le=256)
    spool_writer_threads: int = Field(default=4, ge=0, le=256)

    tls_cert: Path | None = None
    tls_key: Path | None = None

    auth_on_loopback_without_tls: bool = False
    auth_max_failures: int = Field(default=5, ge=1)
    auth_failure_window: float = Field(default=300.0, gt=0)
    auth_failure_delay: float = Field(default=1.0, ge=0)
    smtp_auth: bool = True

    vrfy: bool = False
    relay_networks: list[Network] = Field(default_factory=list)
    open_relay: bool = False
    reject_8bit_without_8bitmime: bool = False

    milters: list[Annotated[MilterConfig, BeforeValidator(_to_milter)]] = Field(
        default_factory=list
    )
    milter_default_action: MilterAction = "tempfail"
    milter_connect_timeout: float = Field(default=30.0, gt=0)
    milter_command_timeout: float = Field(default=30.0, gt=0)
    milter_content_timeout: float = Field(default=300.0, gt=0)

    # Outbound delivery (docs/relay.md).
    outbound_delivery: bool = True
    dns_nameservers: list[str] = Field(default_factory=list)
    dns_timeout: float = Field(default=5.0, gt=0)
    relay_port: int = Field(default=25, ge=1, le=65535)
    relay_tls: Literal["opportunistic", "none"] = "opportunistic"
    relay_routes: list[Annotated[RouteConfig, BeforeValidator(_to_route)]] = Field(
        default_factory=list
    )
    relay_concurrency: int = Field(default=20, ge=1, le=1000)
    relay_destination_concurrency: int = Field(default=10, ge=1, le=1000)
    relay_connect_timeout: float = Field(default=30.0, gt=0)
    relay_command_timeout: float = Field(default=300.0, gt=0)
    relay_connection_cache_time: float = Field(default=2.0, ge=0)
    relay_retry_base: float = Field(default=300.0, gt=0)
    relay_retry_max: float = Field(default=4000.0, gt=0)
    relay_max_lifetime: float = Field(default=5 * 86400.0, ge=0)
    relay_delay_warning: float = Field(default=4 * 3600.0, ge=0)
    max_hops: int = Field(default=50, ge=1)
    # DELIVERBY (RFC 2852) and ETRN (RFC 1985); see docs/relay.md.
    deliverby_min: int = Field(default=60, ge=0, le=999999999)
    etrn_networks: list[Network] = Field(default_factory=list)
    etrn_domains: list[Domain] = Field(default_factory=list)
    # TLS policies of the receiving domains (docs/relay.md#mta-sts, #dane, #tls-rpt).
    dns_dnssec_trusted: bool = False
    relay_dane: bool = True
    relay_mta_sts: bool = True
    mta_sts_fetch_timeout: float = Field(default=10.0, gt=0, le=120)
    mta_sts_ca_file: Path | None = None
    mta_sts_https_port: int = Field(default=443, ge=1, le=65535)
    tls_rpt: bool = True
    tls_rpt_organization: str = ""
    # `mailgate dmarc report --send` once a day from serve (docs/daemon-dmarc.md).
    dmarc_reports: bool = False

    event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator(
        "smtp_listen",
        "submission_listen",
        "smtps_listen",
        "local_domains",
        "relay_networks",
        "milters",
        "dns_nameservers",
        "etrn_networks",
        "etrn_domains",
        mode="before",
    )
    @classmethod
    def _comma_lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("max_message_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)

    @field_validator("relay_routes", mode="before")
    @classmethod
    def _routes(cls, value: Any) -> Any:
        return _routes_list(value)

    @field_validator(
        "relay_retry_base",
        "relay_retry_max",
        "relay_max_lifetime",
        "relay_delay_warning",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("dns_nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        from mailgate.policies.settings import parse_nameserver

        for server in value:
            parse_nameserver(server)
        return value

    @model_validator(mode="after")
    def _unique_routes(self) -> Config:
        domains = [route.domain for route in self.relay_routes]
        for domain in domains:
            if domains.count(domain) > 1:
                raise ValueError(f"relay_routes: the domain {domain!r} has two routes")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return str(value).upper()

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not _DOMAIN_RE.match(value.rstrip(".")):
            raise ValueError(f"{value!r} is not a valid host name")
        return value.rstrip(".")

    @model_validator(mode="after")
    def _tls_pair(self) -> Config:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self

    @model_validator(mode="after")
    def _unique_milters(self) -> Config:
        names = [milter.name for milter in self.milters]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"milters: the name {name!r} is used twice")
        for milter in self.milters:
            if milter.daemon is None or milter.socket is not None:
                continue
            path = self.milter_socket(milter).removeprefix("unix:")
            if len(os.fsencode(path)) > _MAX_UNIX_PATH:
                # bind() would fail in the daemon, over and over, far from this file.
                raise ValueError(
                    f"milters: {milter.name}: its socket {path} is longer than a Unix socket "
                    f"path may be ({_MAX_UNIX_PATH} bytes); use a shorter data_dir, or give "
                    "the milter a socket"
                )
        return self

    def milter_socket(self, milter: MilterConfig) -> str:
        """Where the chain reaches ``milter``; a daemon without a socket gets one in run/."""
        if milter.socket is not None:
            return milter.socket
        return f"unix:{(self.run_dir / f'{milter.name}.sock').absolute()}"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @model_validator(mode="after")
    def _no_accidental_open_relay(self) -> Config:
        # Trusting every address is an open relay; only the explicit opt-in may do that.
        for net in self.relay_network_objects:
            if net.prefixlen == 0 and not self.open_relay:
                raise ValueError(
                    f"relay_networks: {net} trusts every client (an open relay); "
                    "set open_relay: true if that is really meant"
                )
        return self

    # Paths derived from data_dir, so every part agrees on the layout.
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def user_db(self) -> Path:
        return self.data_dir / "users.sqlite3"

    @property
    def tls_db(self) -> Path:
        """MTA-STS policy cache and TLS-RPT session counts (docs/relay.md)."""
        return self.data_dir / "tls.sqlite3"

    @property
    def relay_network_objects(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(net, strict=False) for net in self.relay_networks]


FIELDS: tuple[str, ...] = tuple(Config.model_fields)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


# -- reading the sources ---------------------------------------------------------------


def _yaml_with_lines(text: str, filename: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    try:
        data, lines, _ = load_with_lines(text)
    except YamlSyntaxError as exc:
        where = f"{filename}:{exc.line}" if exc.line is not None else filename
        raise ConfigError([f"{where}: invalid YAML: {exc.problem}"]) from None
    return data, lines


def _read_file(path: Path) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    data, lines = _yaml_with_lines(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the top level must be a mapping of setting: value"])
    return data, lines


@dataclass
class _Origin:
    kind: Literal["file", "env", "flag", "default"]
    file: str = ""


def load_config(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from a YAML file, the environment and flags; or raise ConfigError."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origins: dict[str, _Origin] = {}
    lines: dict[tuple[Any, ...], int] = {}
    problems: list[str] = []
    filename = str(path) if path is not None else ""

    if path is not None:
        data, lines = _read_file(Path(path))
        for key, value in data.items():
            values[str(key)] = value
            origins[str(key)] = _Origin("file", filename)

    known_env = {env_name(field): field for field in FIELDS}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_SETTINGS:
            continue
        field = known_env.get(name)
        if field is None:
            problems.append(f"${name}: unknown setting (see docs/configuration.md)")
            continue
        values[field] = value
        origins[field] = _Origin("env")

    for field, value in (overrides or {}).items():
        if value is None:
            continue
        values[field] = value
        origins[field] = _Origin("flag")

    try:
        config = Config(**values)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            field = str(loc[0]) if loc else ""
            problems.append(_describe(error, loc, origins.get(field), lines, filename))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


# Variables with the prefix that configure tooling rather than the gateway itself.
_ENV_NOT_SETTINGS = frozenset(
    {"MAILGATE_CONFIG", "MAILGATE_RULES_DIR", "MAILGATE_MILTER_SIGNAL_THREAD"}
)


def _describe(
    error: Mapping[str, Any],
    loc: tuple[Any, ...],
    origin: _Origin | None,
    lines: Mapping[tuple[Any, ...], int],
    filename: str,
) -> str:
    field_path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    field_path = field_path.lstrip(".") or "(top level)"
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown setting (see docs/configuration.md)"
    if not loc:
        return f"{filename or 'configuration'}: {message}"
    field = str(loc[0])
    if origin is None or origin.kind == "default":
        return f"{field_path}: {message}"
    if origin.kind == "env":
        return f"${env_name(field)}: {message}"
    if origin.kind == "flag":
        return f"{flag_name(field)}: {message}"
    line = None
    for depth in range(len(loc), 0, -1):
        line = lines.get(tuple(loc[:depth]))
        if line is not None:
            break
    where = f"{filename}:{line}" if line is not None else filename
    return f"{where}: {field_path}: {message}"
