"""The rule file format as pydantic models: what a rule file may say, checked at load.

This module owns the *shape* of a rule file (keys, types, value syntax, codes, regexes) and
the JSON Schema generated from it for editors (``rules/schema.json``). It knows nothing
about evaluation: ``conditions`` and ``actions`` compile these models into objects that
run, so a loaded rule set never re-validates on the hot path.

Conventions every model follows: unknown keys are errors; ``null`` is never a value (leave
the key out instead); where a list is expected a single item may be written bare.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from mailgate.policies.rules.values import (
    Addresses,
    AddressPart,
    FactName,
    HeaderName,
    HeaderNames,
    HeaderValue,
    IpAddress,
    Name,
    Networks,
    QuantityValue,
    Regexes,
    Strings,
    listify,
    one_or_many,
)
from mailgate.policies.verdict import FINAL_ACTIONS
from mailgate.policies.verdict import Action as VerdictAction

Daemon = Literal[
    "content",
    "spf",
    "dkim",
    "dmarc",
    "arc",
    "dnsbl",
    "greylist",
    "clamav",
    "spamassassin",
    "quota",
    "ratelimit",
]
DAEMONS: tuple[str, ...] = get_args(Daemon)

BareAction = Literal["accept", "reject", "tempfail", "discard", "quarantine", "continue"]
BARE_ACTIONS: tuple[str, ...] = get_args(BareAction)

_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_null(cls, value: Any) -> Any:
        # An empty YAML value is almost always a mistake (`then:` with nothing after it).
        if value is None:
            raise ValueError("must not be empty (null); leave the key out instead")
        return value


# -- comparisons ------------------------------------------------------------------------


_TEXT_COMPARATORS = ("is", "contains", "matches", "regex")


class MatchSpec(_Model):
    """A comparison, as in Sieve: is, contains, matches (wildcards * and ?), regex, or the
    numeric over/under. A list of keys matches if any key does. Case-insensitive unless
    case_sensitive is true."""

    # Subclasses that may test for presence alone (a fact) set this to False.
    comparison_required: ClassVar[bool] = True

    is_: Strings | None = Field(None, alias="is", description="equal to (any of) the keys")
    contains: Strings | None = Field(None, description="contains (any of) the keys")
    matches: Strings | None = Field(
        None, description="Sieve wildcard match: * any run of characters, ? one, \\ escapes"
    )
    regex: Regexes | None = Field(None, description="Python regular expression (search)")
    over: QuantityValue | None = Field(None, description="numeric value greater than")
    under: QuantityValue | None = Field(None, description="numeric value less than")
    case_sensitive: bool = Field(False, description="compare case-sensitively")

    @model_validator(mode="after")
    def _one_comparison(self) -> MatchSpec:
        texts = [key for key in _TEXT_COMPARATORS if self._field(key) is not None]
        numeric = [key for key in ("over", "under") if self._field(key) is not None]
        if len(texts) > 1 or (texts and numeric):
            used = ", ".join(texts + numeric)
            raise ValueError(f"use one comparison, not {used} (combine tests with allof)")
        if not texts and not numeric and self.comparison_required:
            raise ValueError("needs a comparison: is, contains, matches, regex, over or under")
        return self

    def _field(self, key: str) -> Any:
        return getattr(self, "is_" if key == "is" else key)


class NumberSpec(_Model):
    """A numeric comparison: is, over, under (over and under together give a range)."""

    is_: QuantityValue | None = Field(None, alias="is", description="equal to")
    over: QuantityValue | None = Field(None, description="greater than (100K, 1M ...)")
    under: QuantityValue | None = Field(None, description="less than (100K, 1M ...)")

    @model_validator(mode="after")
    def _one_comparison(self) -> NumberSpec:
        if self.is_ is None and self.over is None and self.under is None:
            raise ValueError("needs a comparison: is, over or under")
        if self.is_ is not None and (self.over is not None or self.under is not None):
            raise ValueError("use is, or over/under, not both")
        return self


# -- tests (conditions) ---------------------------------------------------------------


class HeaderSpec(MatchSpec):
    """Sieve `header`: the (RFC 2047 decoded) value of any of the named header fields."""

    name: HeaderNames = Field(description="header field name(s)")


class AddressSpec(MatchSpec):
    """Sieve `address`: the addresses in the named header fields (From, To, Cc ...)."""

    name: HeaderNames = Field(description="header field name(s) holding addresses")
    part: AddressPart = Field("all", description="all, localpart or domain")


class EnvelopeSpec(_Model):
    """Sieve `envelope`: the SMTP MAIL FROM and RCPT TO addresses (to: any recipient)."""

    part: AddressPart = Field("all", description="all, localpart or domain")
    from_: MatchSpec | None = Field(None, alias="from", description="the envelope sender")
    to: MatchSpec | None = Field(None, description="any envelope recipient")

    @model_validator(mode="after")
    def _something(self) -> EnvelopeSpec:
        if self.from_ is None and self.to is None:
            raise ValueError("needs from, to or both")
        return self


class AttachmentSpec(_Model):
    """An attachment with all the given properties; with count, how many have them."""

    filename: MatchSpec | None = Field(None, description="file name (RFC 2231 decoded)")
    type: MatchSpec | None = Field(None, description="declared Content-Type")
    sniffed: MatchSpec | None = Field(None, description="type recognised from magic bytes")
    size: NumberSpec | None = Field(None, description="decoded size in bytes")
    encrypted: bool | None = Field(None, description="a password-protected archive")
    member: MatchSpec | None = Field(None, description="a file name inside an archive")
    count: NumberSpec | None = Field(None, description="number of such attachments")


class AuthUserSpec(_Model):
    """The SMTP AUTH identity."""

    user: MatchSpec = Field(description="the authenticated user name")


class FactSpec(MatchSpec):
    """A fact another daemon added (spf, dkim, dmarc, dnsbl, spam_score, virus ...).
    Without a comparison: the fact is present (not missing, null, false or empty)."""

    comparison_required: ClassVar[bool] = False

    name: FactName = Field(description="fact name")


_BOOL_WORDS = frozenset({"yes", "no", "on", "off", "true", "false"})


def _bool_or_mapping(value: Any) -> str | None:
    # yes/no/on/off arrive as words (rule files use YAML 1.2 booleans); they mean booleans here.
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_WORDS):
        return "<bool>"
    if isinstance(value, dict | BaseModel):
        return "<mapping>"
    return None


AuthValue = Annotated[
    Annotated[bool, Tag("<bool>")] | Annotated[AuthUserSpec, Tag("<mapping>")],
    Discriminator(
        _bool_or_mapping,
        custom_error_type="auth",
        custom_error_message="expected true, false or {user: {...}}",
    ),
]


class ConditionSpec(_Model):
    """One test (exactly one key). Combine tests with allof, anyof and not."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    header: HeaderSpec | None = None
    address: AddressSpec | None = None
    envelope: EnvelopeSpec | None = None
    size: NumberSpec | None = Field(None, description="message size (100K, 1M ...)")
    exists: HeaderNames | None = Field(None, description="all these header fields exist")
    body: MatchSpec | None = Field(None, description="decoded text of the text parts")
    attachment: AttachmentSpec | None = None
    auth: AuthValue | None = Field(None, description="authenticated (true/false) or as whom")
    client_ip: Networks | None = Field(None, description="client address in any network")
    fact: FactSpec | None = None
    allof: list[Condition] | None = Field(None, min_length=1, description="all are true")
    anyof: list[Condition] | None = Field(None, min_length=1, description="any is true")
    not_: Condition | None = Field(None, alias="not", description="the test is false")

    @model_validator(mode="after")
    def _exactly_one(self) -> ConditionSpec:
        if len(self.model_fields_set) > 1:
            keys = ", ".join(sorted(self.keys()))
            raise ValueError(f"one test per condition, got {keys} (combine them with allof)")
        if not self.model_fields_set:
            raise ValueError("empty condition: name a test such as header or size")
        return self

    def keys(self) -> list[str]:
        aliases = {"not_": "not"}
        return [aliases.get(name, name) for name in self.model_fields_set]


Condition = Annotated[
    Annotated[bool, Tag("<bool>")] | Annotated[ConditionSpec, Tag("<mapping>")],
    Discriminator(
        _bool_or_mapping,
        custom_error_type="condition",
        custom_error_message="expected a test such as {header: {...}}, or true or false",
    ),
]


# -- actions ----------------------------------------------------------------------------


class ReplySpec(_Model):
    """An SMTP reply: code, enhanced status code (RFC 3463) and text; each optional."""

    reply_class: ClassVar[str] = "5"
    action_name: ClassVar[str] = "reject"

    code: int | None = Field(None, description="SMTP reply code")
    enhanced: str | None = Field(None, description="enhanced status code, e.g. 5.7.1")
    text: HeaderValue | None = Field(None, description="reply text")

    @field_validator("code")
    @classmethod
    def _code(cls, value: int) -> int:
        digit = cls.reply_class
        if not (100 <= value <= 599 and str(value)[0] == digit and str(value)[1] in "012345"):
            raise ValueError(f"{cls.action_name} needs a {digit}xx reply code, got {value}")
        return value

    @field_validator("enhanced")
    @classmethod
    def _enhanced(cls, value: str) -> str:
        match = _ENHANCED_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not an enhanced status code (class.subject.detail)")
        if match.group(1) != cls.reply_class:
            raise ValueError(
                f"{cls.action_name} needs a {cls.reply_class}.x.x enhanced code, got {value!r}"
            )
        return value


class RejectSpec(ReplySpec):
    """Reject permanently (5xx; default 550 5.7.1)."""


class TempfailSpec(ReplySpec):
    """Reject temporarily (4xx; default 451 4.7.1)."""

    reply_class: ClassVar[str] = "4"
    action_name: ClassVar[str] = "tempfail"


class QuarantineSpec(_Model):
    """Accept into the MTA's quarantine (hold queue)."""

    reason: Name = Field(description="why, recorded with the message")


class AddHeaderSpec(_Model):
    """Add a header field: appended, or inserted at index (0 = first)."""

    name: HeaderName
    value: HeaderValue
    index: int | None = Field(None, ge=0, description="insert at this position (0 = first)")


class ChangeHeaderSpec(_Model):
    """Change the index-th (1-based) occurrence of a header field; an empty value deletes it."""

    name: HeaderName
    value: HeaderValue
    index: int = Field(1, ge=1, description="which occurrence, 1 = first")


class TagSubjectSpec(_Model):
    """Prefix the Subject (once: a subject that already starts with the prefix is kept)."""

    prefix: Name


def _shorthand(key: str) -> Any:
    def expand(value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value

    return expand


# The short forms `reject: "text"`, `quarantine: "reason"`, `tag_subject: "[SPAM]"`.
RejectValue = Annotated[
    RejectSpec, BeforeValidator(_shorthand("text"), json_schema_input_type=str | RejectSpec)
]
TempfailValue = Annotated[
    TempfailSpec, BeforeValidator(_shorthand("text"), json_schema_input_type=str | TempfailSpec)
]
QuarantineValue = Annotated[
    QuarantineSpec,
    BeforeValidator(_shorthand("reason"), json_schema_input_type=str | QuarantineSpec),
]
TagSubjectValue = Annotated[
    TagSubjectSpec,
    BeforeValidator(_shorthand("prefix"), json_schema_input_type=str | TagSubjectSpec),
]


class ActionSpec(_Model):
    """An action with parameters (exactly one key)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    reject: RejectValue | None = None
    tempfail: TempfailValue | None = None
    quarantine: QuarantineValue | None = None
    add_header: AddHeaderSpec | None = None
    change_header: ChangeHeaderSpec | None = None
    tag_subject: TagSubjectValue | None = None
    add_recipient: Addresses | None = Field(None, description="add envelope recipient(s)")
    redirect: Addresses | None = Field(None, description="replace all envelope recipients")

    @model_validator(mode="after")
    def _exactly_one(self) -> ActionSpec:
        if len(self.model_fields_set) != 1:
            keys = ", ".join(sorted(self.model_fields_set)) or "nothing"
            raise ValueError(f"one action per list item, got {keys}")
        return self

    @property
    def kind(self) -> str:
        return next(iter(self.model_fields_set))


def _action_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "<name>"
    if isinstance(value, dict | BaseModel):
        return "<mapping>"
    return None


ActionItem = Annotated[
    Annotated[BareAction, Tag("<name>")] | Annotated[ActionSpec, Tag("<mapping>")],
    Discriminator(
        _action_tag,
        custom_error_type="action",
        custom_error_message="expected an action name such as reject or a mapping such as "
        "{reject: {...}}",
    ),
]


def action_kind(item: BareAction | ActionSpec) -> str:
    return item if isinstance(item, str) else item.kind


class RuleSpec(_Model):
    """A rule: if the condition holds, run the actions. A final action (accept, reject,
    tempfail, discard, quarantine) ends evaluation; other actions accumulate."""

    name: Name = Field(description="unique within the file; reported in verdicts")
    description: str = Field("", description="for people; not used in evaluation")
    enabled: bool = Field(True, description="false skips the rule (it is still validated)")
    if_: Condition = Field(True, alias="if", description="the condition; default: always")
    then: Annotated[
        list[ActionItem],
        BeforeValidator(listify, json_schema_input_type=ActionItem | list[ActionItem]),
        Field(min_length=1),
    ] = Field(description="an action or a list of actions")

    @field_validator("then")
    @classmethod
    def _one_final(cls, actions: list[BareAction | ActionSpec]) -> list[BareAction | ActionSpec]:
        kinds = [action_kind(action) for action in actions]
        final = [kind for kind in kinds if kind in FINAL_ACTIONS]
        if len(final) > 1:
            raise ValueError(f"more than one final action: {', '.join(final)}")
        if final and "continue" in kinds:
            raise ValueError(f"continue contradicts the final action {final[0]}")
        return actions


# -- test cases ---------------------------------------------------------------------------


class RuleTestMessage(_Model):
    """The message: a file (relative to the rule file's directory) or inline raw text."""

    file: str | None = Field(None, description="path of an RFC 5322 message (.eml)")
    raw: str | None = Field(None, description="the message itself, headers and body")

    @model_validator(mode="after")
    def _one_source(self) -> RuleTestMessage:
        if (self.file is None) == (self.raw is None):
            raise ValueError("give exactly one of file or raw")
        return self


class RuleTestEnvelope(_Model):
    """The SMTP envelope and connection of a test message."""

    from_: str = Field("", alias="from", description="MAIL FROM (empty: null sender)")
    to: Annotated[
        list[str], BeforeValidator(one_or_many, json_schema_input_type=str | list[str])
    ] = Field(default_factory=list, description="RCPT TO address(es)")
    client_ip: IpAddress | None = None
    client_name: str = ""
    helo: str = ""
    auth_user: str | None = Field(None, description="the SMTP AUTH identity, if any")


class ExpectedHeaderChange(_Model):
    """A header change as in the verdict (op add, insert or change)."""

    op: Literal["add", "insert", "change"]
    name: str
    value: str
    index: int = 1


class ExpectSpec(_Model):
    """What the verdict must be; keys left out are not compared."""

    action: VerdictAction
    rule: str | None = Field(None, description="the last rule that matched (the deciding one)")
    matched: list[str] | None = Field(None, description="every matched rule, in order")
    reason: str | None = Field(None, description="text within the deciding rule's reason")
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    quarantine_reason: str | None = None
    header_changes: list[ExpectedHeaderChange] | None = None
    add_recipients: list[str] | None = None
    remove_recipients: list[str] | None = None


class RuleTestSpec(_Model):
    """A test case: a message, its envelope and facts, and the expected verdict."""

    name: Name
    message: RuleTestMessage | None = Field(None, description="default: an empty message")
    envelope: RuleTestEnvelope = Field(default_factory=lambda: RuleTestEnvelope.model_validate({}))
    facts: dict[str, Any] = Field(
        default_factory=dict, description="facts of other daemons: spf, spam_score ..."
    )
    expect: ExpectSpec


class RuleFileSpec(_Model):
    """A mailgate rule file: the daemon it is for, its rules and their test cases."""

    model_config = ConfigDict(title="mailgate rule file")

    daemon: Daemon = Field(description="the policy daemon that loads this file")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="the daemon's own settings (zones, servers, stores ...); each daemon's "
        "page in the operator's guide lists them",
    )
    rules: list[RuleSpec] = Field(default_factory=list, description="evaluated in order")
    tests: list[RuleTestSpec] = Field(default_factory=list, description="run by rules test")


ConditionSpec.model_rebuild()


# -- vocabulary and JSON Schema ---------------------------------------------------------------


def _all_models() -> list[type[BaseModel]]:
    return [value for value in globals().values() if _is_model(value)]


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, _Model) and value is not _Model


def known_keys() -> frozenset[str]:
    """Every key the format knows, for "did you mean" hints."""
    keys: set[str] = set()
    for model in _all_models():
        for name, info in model.model_fields.items():
            keys.add(info.alias or name)
    return frozenset(keys)


class _Generator(GenerateJsonSchema):
    # null is never valid (see _Model._no_null), so Optional fields are just their type.
    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a rule file, for editors and other tools."""
    generated = RuleFileSpec.model_json_schema(by_alias=True, schema_generator=_Generator)
    _tidy(generated)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://mailgate.invalid/rules/schema.json",
        **generated,
    }


def schema_json() -> str:
    """json_schema() as the text committed in rules/schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _tidy(node: Any) -> None:
    # Editors show titles; pydantic's per-property titles only repeat the key.
    if isinstance(node, dict):
        if node.get("default", 0) is None:
            del node["default"]
        properties = node.get("properties")
        if isinstance(properties, dict):
            for value in properties.values():
                if isinstance(value, dict):
                    value.pop("title", None)
        for value in node.values():
            _tidy(value)
    elif isinstance(node, list):
        for item in node:
            _tidy(item)
