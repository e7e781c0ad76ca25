"""Compiled conditions: the tests of the rule language, evaluated against MessageFacts.

``compile_condition`` turns a validated condition (schema) into a tree of small objects.
Each answers ``evaluate(ctx)`` with the reason it holds (``header Subject contains
'viagra'``) or None, and ``describe()`` with what it tests (used to explain ``not``).
The Context caches what several tests share (decoded headers, content facts), and computes
the costly content facts only when a rule asks for them.
"""

from __future__ import annotations

import email.header
import email.utils
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mailgate.policies.content import Attachment, ContentFacts, content_facts
from mailgate.policies.facts import MessageFacts
from mailgate.policies.rules.matching import Matcher, NumberMatcher, quote
from mailgate.policies.rules.schema import (
    AttachmentSpec,
    AuthUserSpec,
    ConditionSpec,
    FactSpec,
    MatchSpec,
    NumberSpec,
)
from mailgate.policies.rules.values import AddressPart

# Facts the content analysis derives; a rule may name them like facts of other daemons.
CONTENT_FACTS = frozenset({"mime_error", "attachment_count", "attachment_names"})

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Context:
    """One evaluation's view of the facts, with lazily computed, shared derived data."""

    __slots__ = ("_content", "_headers", "facts")

    def __init__(self, facts: MessageFacts, content: ContentFacts | None = None) -> None:
        self.facts = facts
        self._content = content
        self._headers: dict[str, list[str]] = {}

    @property
    def content(self) -> ContentFacts:
        if self._content is None:
            self._content = content_facts(self.facts)
        return self._content

    def header(self, name: str) -> list[str]:
        """The values of header ``name``, RFC 2047 encoded-words decoded (Sieve does)."""
        key = name.lower()
        values = self._headers.get(key)
        if values is None:
            values = [decode_words(v) for v in self.facts.header_values(name)]
            self._headers[key] = values
        return values

    def fact(self, name: str) -> Any:
        if name in self.facts.extra:
            return self.facts.fact(name)
        if name in CONTENT_FACTS:
            return self.content.as_extra()[name]
        return None


def decode_words(value: str) -> str:
    """A header value with RFC 2047 encoded-words decoded (as written if they are broken)."""
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        # A broken encoded-word is matched as written rather than not at all.
        return value


class Condition(Protocol):
    def evaluate(self, ctx: Context) -> str | None: ...

    def describe(self) -> str: ...


# -- combinators ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Constant:
    value: bool

    def evaluate(self, ctx: Context) -> str | None:
        return "always" if self.value else None

    def describe(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True, slots=True)
class AllOf:
    tests: tuple[Condition, ...]

    def evaluate(self, ctx: Context) -> str | None:
        reasons = []
        for test in self.tests:
            reason = test.evaluate(ctx)
            if reason is None:
                return None
            reasons.append(reason)
        return " and ".join(reasons)

    def describe(self) -> str:
        return "all of (" + "; ".join(test.describe() for test in self.tests) + ")"


@dataclass(frozen=True, slots=True)
class AnyOf:
    tests: tuple[Condition, ...]

    def evaluate(self, ctx: Context) -> str | None:
        for test in self.tests:
            reason = test.evaluate(ctx)
            if reason is not None:
                return reason
        return None

    def describe(self) -> str:
        return "any of (" + "; ".join(test.describe() for test in self.tests) + ")"


@dataclass(frozen=True, slots=True)
class Not:
    test: Condition

    def evaluate(self, ctx: Context) -> str | None:
        return None if self.test.evaluate(ctx) is not None else f"not ({self.test.describe()})"

    def describe(self) -> str:
        return f"not ({self.test.describe()})"


# -- header, address, envelope, size, exists ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    names: tuple[str, ...]
    matcher: Matcher

    def evaluate(self, ctx: Context) -> str | None:
        for name in self.names:
            found = self.matcher.match_any(ctx.header(name))
            if found is not None:
                return f"header {name} {found[1]}"
        return None

    def describe(self) -> str:
        return f"header {'/'.join(self.names)} {self.matcher.describe()}"


def address_part(address: str, part: AddressPart) -> str:
    """The localpart, domain or whole of an address (angle brackets removed)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if part == "all":
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        return address if part == "localpart" else ""
    return local if part == "localpart" else domain


def _part_text(part: AddressPart) -> str:
    return "" if part == "all" else f" {part}"


@dataclass(frozen=True, slots=True)
class Address:
    names: tuple[str, ...]
    part: AddressPart
    matcher: Matcher

    def evaluate(self, ctx: Context) -> str | None:
        for name in self.names:
            values = ctx.header(name)
            if not values:
                continue
            parts = [address_part(addr, self.part) for addr in _addresses(values) if addr]
            found = self.matcher.match_any(parts)
            if found is not None:
                return f"address {name}{_part_text(self.part)} {found[1]}"
        return None

    def describe(self) -> str:
        names = "/".join(self.names)
        return f"address {names}{_part_text(self.part)} {self.matcher.describe()}"


def _addresses(values: Sequence[str]) -> list[str]:
    try:
        return [address for _, address in email.utils.getaddresses(list(values))]
    except Exception:
        return []


@dataclass(frozen=True, slots=True)
class Envelope:
    part: AddressPart
    sender: Matcher | None
    recipient: Matcher | None

    def evaluate(self, ctx: Context) -> str | None:
        reasons = []
        if self.sender is not None:
            value = address_part(ctx.facts.mail_from, self.part)
            reason = self.sender.match(value)
            if reason is None:
                return None
            reasons.append(f"envelope from{_part_text(self.part)} {reason}")
        if self.recipient is not None:
            parts = [address_part(rcpt, self.part) for rcpt in ctx.facts.rcpt_tos]
            found = self.recipient.match_any(parts)
            if found is None:
                return None
            reasons.append(f"envelope to{_part_text(self.part)} {found[1]}")
        return " and ".join(reasons)

    def describe(self) -> str:
        parts = []
        if self.sender is not None:
            parts.append(f"envelope from{_part_text(self.part)} {self.sender.describe()}")
        if self.recipient is not None:
            parts.append(f"envelope to{_part_text(self.part)} {self.recipient.describe()}")
        return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class Size:
    matcher: NumberMatcher

    def evaluate(self, ctx: Context) -> str | None:
        size = ctx.facts.size
        reason = self.matcher.match(size)
        return None if reason is None else f"size {size} {reason}"

    def describe(self) -> str:
        return f"size {self.matcher.describe()}"


@dataclass(frozen=True, slots=True)
class Exists:
    names: tuple[str, ...]

    def evaluate(self, ctx: Context) -> str | None:
        if all(ctx.facts.header_values(name) for name in self.names):
            return self.describe()
        return None

    def describe(self) -> str:
        if len(self.names) == 1:
            return f"header {self.names[0]} exists"
        return f"headers {', '.join(self.names)} exist"


# -- facts: body, attachments, auth, client, other daemons ---------------------------------


@dataclass(frozen=True, slots=True)
class Body:
    matcher: Matcher

    def evaluate(self, ctx: Context) -> str | None:
        found = self.matcher.match_any(ctx.content.texts)
        return None if found is None else f"body {found[1]}"

    def describe(self) -> str:
        return f"body {self.matcher.describe()}"


AttachmentCheck = Callable[[Attachment], str | None]


def _text_check(label: str, matcher: Matcher, get: Callable[[Attachment], str]) -> AttachmentCheck:
    def check(attachment: Attachment) -> str | None:
        reason = matcher.match(get(attachment))
        return None if reason is None else f"{label} {reason}"

    return check


def _member_check(matcher: Matcher) -> AttachmentCheck:
    def check(attachment: Attachment) -> str | None:
        found = matcher.match_any(attachment.members)
        return None if found is None else f"member {quote(found[0])} {found[1]}"

    return check


def _size_check(matcher: NumberMatcher) -> AttachmentCheck:
    def check(attachment: Attachment) -> str | None:
        reason = matcher.match(attachment.size)
        return None if reason is None else f"size {attachment.size} {reason}"

    return check


def _encrypted_check(wanted: bool) -> AttachmentCheck:
    def check(attachment: Attachment) -> str | None:
        if attachment.encrypted != wanted:
            return None
        return "encrypted" if wanted else "not encrypted"

    return check


@dataclass(frozen=True, slots=True)
class AttachmentTest:
    checks: tuple[AttachmentCheck, ...]
    labels: tuple[str, ...]
    count: NumberMatcher | None

    def evaluate(self, ctx: Context) -> str | None:
        first: tuple[Attachment, list[str]] | None = None
        matching = 0
        for attachment in ctx.content.attachments:
            reasons = []
            for check in self.checks:
                reason = check(attachment)
                if reason is None:
                    break
                reasons.append(reason)
            else:
                matching += 1
                if first is None:
                    first = (attachment, reasons)
                    if self.count is None:
                        break
        if self.count is not None:
            verdict = self.count.match(matching)
            if verdict is None:
                return None
            what = f" ({', '.join(self.labels)})" if self.labels else ""
            return f"{matching} attachment{'s' if matching != 1 else ''}{what}, count {verdict}"
        if first is None:
            return None
        attachment, reasons = first
        name = quote(attachment.filename) if attachment.filename else "(unnamed)"
        return " ".join([f"attachment {name}", *reasons]) if reasons else f"attachment {name}"

    def describe(self) -> str:
        what = " with " + " and ".join(self.labels) if self.labels else ""
        count = f", count {self.count.describe()}" if self.count is not None else ""
        return f"attachment{what}{count}"


@dataclass(frozen=True, slots=True)
class Auth:
    authenticated: bool | None
    user: Matcher | None

    def evaluate(self, ctx: Context) -> str | None:
        user = ctx.facts.auth_user
        if self.user is not None:
            if not user:
                return None
            reason = self.user.match(user)
            return None if reason is None else f"auth user {reason}"
        if bool(user) == self.authenticated:
            return f"authenticated as {quote(user)}" if user else "not authenticated"
        return None

    def describe(self) -> str:
        if self.user is not None:
            return f"auth user {self.user.describe()}"
        return "authenticated" if self.authenticated else "not authenticated"


def client_address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's IP from what an MTA reports ("[192.0.2.1]", "IPv6:2001:db8::1" ...)."""
    text = value.strip().strip("[]")
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class ClientIp:
    networks: tuple[IPNetwork, ...]

    def evaluate(self, ctx: Context) -> str | None:
        address = client_address(ctx.facts.client_ip)
        if address is None:
            return None
        for network in self.networks:
            if address.version == network.version and address in network:
                return f"client IP {address} in {network}"
        return None

    def describe(self) -> str:
        return f"client IP in {', '.join(str(n) for n in self.networks)}"


def fact_values(value: Any) -> list[str]:
    """A fact as the strings a comparison sees: lists give their items, mappings their keys."""
    if value is None:
        return []
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [str(key) for key in value]
    if isinstance(value, list | tuple | set | frozenset):
        out: list[str] = []
        for item in value:
            out.extend(fact_values(item))
        return out
    return [str(value)]


def _present(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, str | list | tuple | dict | set | frozenset):
        return len(value) > 0
    return True


@dataclass(frozen=True, slots=True)
class Fact:
    name: str
    matcher: Matcher

    def evaluate(self, ctx: Context) -> str | None:
        value = ctx.fact(self.name)
        if self.matcher.kind == "present":
            if not _present(value):
                return None
            shown = ", ".join(quote(v) for v in fact_values(value)[:3])
            return f"{self.name} present ({shown})"
        found = self.matcher.match_any(fact_values(value))
        return None if found is None else f"{self.name} {found[1]}"

    def describe(self) -> str:
        return f"{self.name} {self.matcher.describe()}"


# -- compilation ------------------------------------------------------------------------


def compile_condition(spec: bool | ConditionSpec) -> Condition:
    """The runnable form of a validated condition."""
    if isinstance(spec, bool):
        return Constant(spec)
    if spec.allof is not None:
        return AllOf(tuple(compile_condition(item) for item in spec.allof))
    if spec.anyof is not None:
        return AnyOf(tuple(compile_condition(item) for item in spec.anyof))
    if spec.not_ is not None:
        return Not(compile_condition(spec.not_))
    if spec.header is not None:
        return Header(tuple(spec.header.name), Matcher.compile(spec.header))
    if spec.address is not None:
        address = spec.address
        return Address(tuple(address.name), address.part, Matcher.compile(address))
    if spec.envelope is not None:
        envelope = spec.envelope
        return Envelope(envelope.part, _matcher(envelope.from_), _matcher(envelope.to))
    if spec.size is not None:
        return Size(NumberMatcher.compile(spec.size))
    if spec.exists is not None:
        return Exists(tuple(spec.exists))
    if spec.body is not None:
        return Body(Matcher.compile(spec.body))
    if spec.attachment is not None:
        return _compile_attachment(spec.attachment)
    if spec.auth is not None:
        return _compile_auth(spec.auth)
    if spec.client_ip is not None:
        return ClientIp(tuple(ipaddress.ip_network(n, strict=False) for n in spec.client_ip))
    if spec.fact is not None:
        return _compile_fact(spec.fact)
    raise ValueError("empty condition")  # the schema rejects these; kept for type checkers


def _matcher(spec: MatchSpec | None) -> Matcher | None:
    return None if spec is None else Matcher.compile(spec)


def _number(spec: NumberSpec | None) -> NumberMatcher | None:
    return None if spec is None else NumberMatcher.compile(spec)


def _compile_attachment(spec: AttachmentSpec) -> AttachmentTest:
    checks: list[AttachmentCheck] = []
    labels: list[str] = []
    text_fields: tuple[tuple[str, MatchSpec | None, Callable[[Attachment], str]], ...] = (
        ("filename", spec.filename, lambda a: a.filename),
        ("type", spec.type, lambda a: a.content_type),
        ("sniffed", spec.sniffed, lambda a: a.sniffed_type),
    )
    for label, field, get in text_fields:
        if field is not None:
            matcher = Matcher.compile(field)
            checks.append(_text_check(label, matcher, get))
            labels.append(f"{label} {matcher.describe()}")
    size = _number(spec.size)
    if size is not None:
        checks.append(_size_check(size))
        labels.append(f"size {size.describe()}")
    if spec.encrypted is not None:
        checks.append(_encrypted_check(spec.encrypted))
        labels.append("encrypted" if spec.encrypted else "not encrypted")
    member = _matcher(spec.member)
    if member is not None:
        checks.append(_member_check(member))
        labels.append(f"member {member.describe()}")
    return AttachmentTest(tuple(checks), tuple(labels), _number(spec.count))


def _compile_auth(spec: bool | AuthUserSpec) -> Auth:
    if isinstance(spec, bool):
        return Auth(spec, None)
    return Auth(None, Matcher.compile(spec.user))


def _compile_fact(spec: FactSpec) -> Fact:
    return Fact(spec.name, Matcher.compile(spec))
