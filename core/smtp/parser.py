"""Sans-I/O parsing of SMTP command lines: verbs, MAIL/RCPT paths and ESMTP parameters.

Pure functions from text to values, raising ``CommandSyntaxError`` that carries the exact
reply to send; nothing here touches a socket, so the grammar is fuzzed directly
(RFC 5321 section 4.1.2, RFC 6531 for UTF-8 addresses).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from mailgate.core.smtp import replies
from mailgate.core.smtp.replies import Reply

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8_NON_ASCII = "\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"^[{_ATEXT}{_UTF8_NON_ASCII}]+(?:\.[{_ATEXT}{_UTF8_NON_ASCII}]+)*\Z")
_QUOTED_STRING = re.compile(
    rf'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8_NON_ASCII}]|\\[\x20-\x7e])*"$'
)
_SUB_DOMAIN = re.compile(
    rf"^[A-Za-z0-9{_UTF8_NON_ASCII}](?:[A-Za-z0-9\-{_UTF8_NON_ASCII}]*[A-Za-z0-9{_UTF8_NON_ASCII}])?\Z"
)
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*\Z")
_VALUE = re.compile(rf"^[\x21-\x3c\x3e-\x7e{_UTF8_NON_ASCII}]+\Z")
_VERB = re.compile(r"^[A-Za-z]{1,16}\Z")
_GENERAL_LITERAL = re.compile(r"^[A-Za-z0-9\-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")


class CommandSyntaxError(ValueError):
    """A command line that cannot be accepted; ``reply`` is what to answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Command:
    verb: str
    arg: str


@dataclass(frozen=True, slots=True)
class MailPath:
    """A parsed reverse-path or forward-path with its ESMTP parameters.

    ``address`` is ``local@domain`` as given (the null path is ``""``); ``params`` maps the
    upper-cased keyword to its value (``None`` for a bare keyword), original value case kept.
    """

    address: str
    local: str = ""
    domain: str = ""
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def is_null(self) -> bool:
        return self.address == ""

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()


def split_command(line: str) -> Command:
    """Split a command line (CRLF removed) into an upper-cased verb and its argument."""
    if not line.strip():
        raise CommandSyntaxError(replies.EMPTY_COMMAND)
    verb, _, arg = line.strip(" ").partition(" ")
    if not _VERB.match(verb):
        raise CommandSyntaxError(replies.UNRECOGNIZED)
    return Command(verb.upper(), arg.strip(" "))


def parse_mail_from(arg: str) -> MailPath:
    """Parse the argument of MAIL (``FROM:<path> [params]``); the null path is allowed."""
    return _parse_path_command(arg, "FROM:", allow_null=True)


def parse_rcpt_to(arg: str) -> MailPath:
    """Parse the argument of RCPT (``TO:<path> [params]``), including ``<Postmaster>``."""
    return _parse_path_command(arg, "TO:", allow_null=False)


def _parse_path_command(arg: str, keyword: str, *, allow_null: bool) -> MailPath:
    bad_syntax = replies.BAD_SENDER_SYNTAX if allow_null else replies.BAD_RCPT_SYNTAX
    usage = replies.syntax_error(
        "MAIL FROM:<address> [parameters]" if allow_null else "RCPT TO:<address> [parameters]"
    )
    if arg[: len(keyword)].upper() != keyword:
        raise CommandSyntaxError(usage)
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest:
        raise CommandSyntaxError(usage)
    if rest.startswith("<"):
        close = _find_path_end(rest)
        if close < 0:
            raise CommandSyntaxError(bad_syntax)
        path_text, param_text = rest[1:close], rest[close + 1 :]
        if param_text and not param_text.startswith(" "):
            raise CommandSyntaxError(bad_syntax)
    else:
        # Postfix accepts a bare address by default (strict_rfc821_envelopes = no); so do we.
        path_text, _, param_text = rest.partition(" ")
    params = parse_params(param_text)
    if path_text == "":
        if not allow_null:
            raise CommandSyntaxError(replies.NULL_RCPT)
        return MailPath("", params=params)
    if not allow_null and path_text.lower() == "postmaster":
        return MailPath("Postmaster", local="Postmaster", params=params)
    local, domain = parse_mailbox(path_text, bad_syntax)
    return MailPath(f"{local}@{domain}", local=local, domain=domain, params=params)


def _find_path_end(text: str) -> int:
    """Index of the '>' that closes the path, honouring quoted local parts."""
    in_quotes = False
    escaped = False
    for index, char in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return index
    return -1


def parse_mailbox(text: str, bad: Reply = replies.BAD_RCPT_SYNTAX) -> tuple[str, str]:
    """Validate ``[@a,@b:]local@domain`` and return (local, domain) without source route."""
    if len(text) > MAX_PATH:
        raise CommandSyntaxError(bad.with_text("Address too long"))
    if text.startswith("@"):
        # A source route (A-d-l) is obsolete; RFC 5321 says to accept and ignore it.
        colon = text.find(":")
        if colon < 0:
            raise CommandSyntaxError(bad)
        for hop in text[:colon].split(","):
            if not hop.startswith("@") or not _valid_domain(hop[1:]):
                raise CommandSyntaxError(bad)
        text = text[colon + 1 :]
    at = text.rfind("@")
    if at <= 0:
        raise CommandSyntaxError(bad)
    local, domain = text[:at], text[at + 1 :]
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        raise CommandSyntaxError(bad)
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        raise CommandSyntaxError(bad.with_text("Local part too long"))
    if not (_valid_domain(domain) or _valid_address_literal(domain)):
        raise CommandSyntaxError(bad)
    return local, domain


def _valid_domain(domain: str) -> bool:
    if not domain or len(domain) > MAX_DOMAIN:
        return False
    labels = domain.split(".")
    return all(len(label) <= 63 and _SUB_DOMAIN.match(label) for label in labels)


def _valid_address_literal(literal: str) -> bool:
    if not (literal.startswith("[") and literal.endswith("]")):
        return False
    inner = literal[1:-1]
    if inner[:5].upper() == "IPV6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return bool(_GENERAL_LITERAL.match(inner)) and inner[:5].upper() != "IPV6:"
    return True


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``KEY=value KEY2`` ESMTP parameters; keywords are case-insensitive."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise CommandSyntaxError(replies.PARAM_BAD.with_text(f"Invalid parameter {item!r}"))
        upper = key.upper()
        if upper in params:
            raise CommandSyntaxError(replies.PARAM_BAD.with_text(f"Duplicate parameter {upper}"))
        params[upper] = value if eq else None
    return params
