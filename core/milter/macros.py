"""Sendmail macros for milters: Postfix's default list per stage, and their values.

``SessionInfo`` describes one SMTP session as far as macros need it; the SMTP side fills it
in as the session goes on (HELO, STARTTLS, AUTH, queue id). ``expand`` computes the
``(name, value)`` pairs for a list of macro names, leaving out every macro that has no
value yet, exactly as Postfix's smtpd_milter_eval does: a milter sees no macro rather than
an empty one. The values follow Postfix's smtpd: ``{client_addr}`` of an IPv6 client is
``IPv6:…``, ``_`` is "ptr [addr]" with "(may be forged)" when the verified name differs,
and a rejected recipient (SMFIP_RCPT_REJ) gets ``{rcpt_mailer}=error`` with the enhanced
status code in ``{rcpt_host}`` and the reply text in ``{rcpt_addr}``.

Which list a milter gets for a stage: the list it asked for with SETSYMLIST, else the
list configured for that milter, else ``DEFAULT_MACROS``. As in Postfix, a milter's own
list replaces the configured one for that stage (it may ask for any macro known here).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from mailgate.core.milter import protocol as p
from mailgate.core.smtp.replies import Reply

MacroStage = Literal["connect", "helo", "mail", "rcpt", "data", "eoh", "eom"]
MACRO_STAGES: tuple[MacroStage, ...] = ("connect", "helo", "mail", "rcpt", "data", "eoh", "eom")

#: Postfix 3.x defaults: milter_connect_macros, milter_helo_macros, milter_mail_macros,
#: milter_rcpt_macros, milter_data_macros, milter_end_of_header_macros and
#: milter_end_of_data_macros.
DEFAULT_MACROS: Mapping[MacroStage, tuple[str, ...]] = MappingProxyType(
    {
        "connect": ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
        "helo": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
        "mail": (
            "i",
            "{auth_type}",
            "{auth_authen}",
            "{auth_author}",
            "{mail_addr}",
            "{mail_host}",
            "{mail_mailer}",
        ),
        "rcpt": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
        "data": ("i",),
        "eoh": ("i",),
        "eom": ("i",),
    }
)

#: The command code a stage's SMFIC_MACRO frame names (end of message is SMFIC_BODYEOB).
STAGE_COMMANDS: Mapping[MacroStage, bytes] = MappingProxyType(
    {
        "connect": p.SMFIC_CONNECT,
        "helo": p.SMFIC_HELO,
        "mail": p.SMFIC_MAIL,
        "rcpt": p.SMFIC_RCPT,
        "data": p.SMFIC_DATA,
        "eoh": p.SMFIC_EOH,
        "eom": p.SMFIC_BODYEOB,
    }
)

#: SETSYMLIST stage numbers (note SMFIM_EOM = 5 comes before SMFIM_EOH = 6).
SYMLIST_STAGES: Mapping[int, MacroStage] = MappingProxyType(
    {
        p.SMFIM_CONNECT: "connect",
        p.SMFIM_HELO: "helo",
        p.SMFIM_ENVFROM: "mail",
        p.SMFIM_ENVRCPT: "rcpt",
        p.SMFIM_DATA: "data",
        p.SMFIM_EOM: "eom",
        p.SMFIM_EOH: "eoh",
    }
)

ClientFamily = Literal["inet", "inet6", "unix", "unknown"]

_SEPARATORS = re.compile(r"[\s,]+")


def parse_macro_list(text: str) -> tuple[str, ...]:
    """Macro names from a list separated by spaces and/or commas, as Postfix splits them."""
    return tuple(name for name in _SEPARATORS.split(text) if name)


def bare_address(address: str) -> str:
    """``user@example.com`` from ``<user@example.com>``; the null sender stays empty."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


@dataclass(slots=True)
class SessionInfo:
    """What the macros of one SMTP session are made of; None means "not known (yet)".

    ``client_name`` is the verified host name and ``client_ptr`` the name found in the
    reverse zone ("unknown" for none, as Postfix writes it). ``cert_subject`` and
    ``cert_issuer`` should be set only for a verified client certificate, and the auth
    fields only after a successful AUTH. ``local_domains`` decides the ``{mail_mailer}``
    and ``{rcpt_mailer}`` values ("local" or "smtp") and ``{mail_host}``/``{rcpt_host}``.
    """

    hostname: str
    daemon_name: str = "mailgate"
    daemon_addr: str | None = None
    daemon_port: int | None = None
    mta_version: str = "mailgate"
    client_addr: str = ""
    client_port: int = 0
    client_name: str = "unknown"
    client_ptr: str = "unknown"
    client_family: ClientFamily | None = None
    client_resolve: str | None = None
    client_connections: int | None = None
    helo: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    cipher_bits: int | None = None
    cert_subject: str | None = None
    cert_issuer: str | None = None
    auth_type: str | None = None
    auth_user: str | None = None
    auth_author: str | None = None
    queue_id: str | None = None
    local_domains: frozenset[str] = field(default_factory=frozenset)

    @property
    def family(self) -> ClientFamily:
        """The client's address family, taken from ``client_addr`` unless given."""
        if self.client_family is not None:
            return self.client_family
        if not self.client_addr or self.client_addr == "unknown":
            return "unknown"
        try:
            version = ipaddress.ip_address(self.client_addr).version
        except ValueError:
            return "unix" if self.client_addr.startswith("/") else "unknown"
        return "inet6" if version == 6 else "inet"

    def mailer_for(self, address: str) -> str:
        """The ``{mail_mailer}``/``{rcpt_mailer}`` value: "local" or "smtp"."""
        domain = _domain(address)
        return "local" if not domain or domain in self.local_domains else "smtp"


@dataclass(frozen=True, slots=True)
class MacroContext:
    """The envelope part of a macro evaluation: the sender and the recipient at hand."""

    sender: str | None = None
    recipient: str | None = None
    rejection: Reply | None = None


def macro_value(name: str, info: SessionInfo, context: MacroContext) -> str | None:
    """The value of one macro, or None when it is not defined at this point."""
    key = name[1:-1] if name.startswith("{") and name.endswith("}") else name
    simple = _SESSION_MACROS.get(key)
    if simple is not None:
        return simple(info)
    envelope = _ENVELOPE_MACROS.get(key)
    if envelope is not None:
        return envelope(info, context)
    return None


def expand(
    names: Iterable[str], info: SessionInfo, context: MacroContext | None = None
) -> tuple[tuple[str, str], ...]:
    """``(name, value)`` for every macro of ``names`` that has a value, names as given."""
    if context is None:
        context = MacroContext()
    out = []
    for name in names:
        value = macro_value(name, info, context)
        if value is not None:
            out.append((name, value))
    return tuple(out)


def stage_names(
    stage: MacroStage,
    negotiated: Mapping[MacroStage, Sequence[str]],
    configured: Mapping[MacroStage, Sequence[str]] | None,
) -> Sequence[str]:
    """The list for ``stage``: the milter's own, else the configured one, else the default."""
    own = negotiated.get(stage)
    if own:
        return own
    if configured is not None and stage in configured:
        return configured[stage]
    return DEFAULT_MACROS[stage]


def _forged_mark(info: SessionInfo) -> str:
    ptr = info.client_ptr or "unknown"
    line = f"{ptr} [{info.client_addr or 'unknown'}]"
    if (info.client_name or "unknown").lower() != ptr.lower():
        line += " (may be forged)"
    return line


def _client_addr(info: SessionInfo) -> str:
    return f"IPv6:{info.client_addr}" if info.family == "inet6" else info.client_addr


def _if_tls(value: str | None, info: SessionInfo) -> str | None:
    return value if info.tls_version is not None else None


def _optional_int(value: int | None) -> str | None:
    return None if value is None else str(value)


_SESSION_MACROS: dict[str, Callable[[SessionInfo], str | None]] = {
    "j": lambda info: info.hostname,
    "daemon_name": lambda info: info.daemon_name,
    "daemon_addr": lambda info: info.daemon_addr,
    "daemon_port": lambda info: _optional_int(info.daemon_port),
    "v": lambda info: info.mta_version,
    "_": _forged_mark,
    "client_addr": _client_addr,
    "client_port": lambda info: str(info.client_port or 0),
    "client_name": lambda info: info.client_name,
    "client_ptr": lambda info: info.client_ptr,
    "client_resolve": lambda info: info.client_resolve,
    "client_connections": lambda info: _optional_int(info.client_connections),
    "tls_version": lambda info: info.tls_version,
    "cipher": lambda info: _if_tls(info.cipher, info),
    "cipher_bits": lambda info: _if_tls(_optional_int(info.cipher_bits), info),
    "cert_subject": lambda info: _if_tls(info.cert_subject, info),
    "cert_issuer": lambda info: _if_tls(info.cert_issuer, info),
    "i": lambda info: info.queue_id,
    "auth_type": lambda info: info.auth_type,
    "auth_authen": lambda info: info.auth_user,
    "auth_author": lambda info: info.auth_author,
}


def _mail_addr(info: SessionInfo, ctx: MacroContext) -> str | None:
    return None if ctx.sender is None else bare_address(ctx.sender)


def _mail_host(info: SessionInfo, ctx: MacroContext) -> str | None:
    if ctx.sender is None:
        return None
    return _domain(bare_address(ctx.sender)) or info.hostname


def _mail_mailer(info: SessionInfo, ctx: MacroContext) -> str | None:
    return None if ctx.sender is None else info.mailer_for(bare_address(ctx.sender))


def _rcpt_addr(info: SessionInfo, ctx: MacroContext) -> str | None:
    if ctx.recipient is None:
        return None
    if ctx.rejection is not None:
        return ctx.rejection.text
    return bare_address(ctx.recipient)


def _rcpt_host(info: SessionInfo, ctx: MacroContext) -> str | None:
    if ctx.recipient is None:
        return None
    if ctx.rejection is not None:
        return ctx.rejection.enhanced
    return _domain(bare_address(ctx.recipient)) or info.hostname


def _rcpt_mailer(info: SessionInfo, ctx: MacroContext) -> str | None:
    if ctx.recipient is None:
        return None
    if ctx.rejection is not None:
        return "error"
    return info.mailer_for(bare_address(ctx.recipient))


_ENVELOPE_MACROS: dict[str, Callable[[SessionInfo, MacroContext], str | None]] = {
    "mail_addr": _mail_addr,
    "mail_host": _mail_host,
    "mail_mailer": _mail_mailer,
    "rcpt_addr": _rcpt_addr,
    "rcpt_host": _rcpt_host,
    "rcpt_mailer": _rcpt_mailer,
}
