"""The value types of the rule format: sizes and scores, text keys, names, addresses, networks.

Each is an annotated type with its own validator and message, so that a bad value is
reported at its own place in the file (``client_ip[1]: ...``) rather than for the whole
mapping around it. Where the format accepts "one or a list", the validator turns the single
value into a one-item list and the JSON Schema still shows both forms.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator

# RFC 5228 2.4.2.3: size units are powers of two.
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_QUANTITY_RE = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*([kKmMgG]?)\s*$")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
_FACT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_ADDRESS_RE = re.compile(r"^[^\s<>@]+@[^\s<>@]+$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Quantity:
    """A number as written in the rule file (``100K``, ``7.5``), kept for explanations."""

    value: float
    text: str


def parse_quantity(value: Any) -> Quantity:
    """Accept 5, 7.5, "100K", "1.5M", "2G" (units are 1024-based, as in Sieve)."""
    if isinstance(value, Quantity):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a number such as 5, 7.5, 100K or 1M")
    if isinstance(value, int | float):
        return Quantity(float(value), str(value))
    if isinstance(value, str):
        match = _QUANTITY_RE.match(value)
        if match:
            number = float(match.group(1)) * _UNITS[match.group(2).lower()]
            return Quantity(number, value.strip())
    raise ValueError(f"expected a number such as 5, 7.5, 100K or 1M, got {value!r}")


def _scalar_text(value: Any) -> Any:
    # YAML turns `is: 5` into an int and `is: yes` into a bool; compare them as written.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def one_or_many(value: Any) -> Any:
    if isinstance(value, list):
        return [_scalar_text(item) for item in value]
    if isinstance(value, str | int | float | bool):
        return [_scalar_text(value)]
    raise ValueError("expected a string or a list of strings")


def listify(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regex {value!r}: {exc}") from None
    return value


def _check_header_name(value: str) -> str:
    if not _HEADER_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a header field name (printable ASCII, no ':')")
    return value


def _check_single_line(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise ValueError("must be a single line without control characters")
    return value


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network (e.g. 192.0.2.0/24)") from None
    return value


def check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


def _check_address(value: str) -> str:
    address = value.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not _ADDRESS_RE.match(address):
        raise ValueError(f"{value!r} is not a mail address (local@domain)")
    return address


def check_fact_name(value: str) -> str:
    if not _FACT_NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a fact name (letters, digits, '_', '.', '-')")
    return value


def _check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return _check_single_line(value)


QuantityValue = Annotated[
    Quantity,
    PlainValidator(
        parse_quantity,
        json_schema_input_type=float | Annotated[str, Field(pattern=_QUANTITY_RE.pattern)],
    ),
]
# What YAML may give where the format compares text: `is: 5` and `is: yes` are fine too.
_Scalar = str | int | float | bool
Strings = Annotated[
    list[str],
    BeforeValidator(one_or_many, json_schema_input_type=_Scalar | list[_Scalar]),
    Field(min_length=1),
]
Regexes = Annotated[
    list[Annotated[str, AfterValidator(_check_regex)]],
    BeforeValidator(one_or_many, json_schema_input_type=str | list[str]),
    Field(min_length=1),
]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
HeaderNames = Annotated[
    list[HeaderName],
    BeforeValidator(one_or_many, json_schema_input_type=str | list[str]),
    Field(min_length=1),
]
HeaderValue = Annotated[str, AfterValidator(_check_single_line)]
Name = Annotated[str, AfterValidator(_check_name)]
Networks = Annotated[
    list[Annotated[str, AfterValidator(_check_network)]],
    BeforeValidator(one_or_many, json_schema_input_type=str | list[str]),
    Field(min_length=1),
]
Address = Annotated[str, AfterValidator(_check_address)]
Addresses = Annotated[
    list[Address],
    BeforeValidator(one_or_many, json_schema_input_type=str | list[str]),
    Field(min_length=1),
]
AddressPart = Literal["all", "localpart", "domain"]


IpAddress = Annotated[str, AfterValidator(check_ip)]
FactName = Annotated[str, AfterValidator(check_fact_name)]
