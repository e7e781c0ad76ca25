"""The DSN extension's ESMTP parameters (RFC 3461): checking, xtext, and reading them back.

MAIL takes ``RET=FULL|HDRS`` and ``ENVID=<xtext>``; RCPT takes ``NOTIFY=NEVER`` or a
comma list of ``SUCCESS``, ``FAILURE``, ``DELAY``, and ``ORCPT=<addr-type>;<xtext>``.
The session checks them here (the reply to send on error comes back, never a string
made up elsewhere); the spool keeps them as given, in the envelope's ``mail_options`` and
``rcpt_options``; delivery and the relay read them back with the helpers at the end.
Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mailgate.core.smtp import replies
from mailgate.core.smtp.replies import Reply

NOTIFY_KINDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # RFC 3461 section 4.4
MAX_ORCPT = 500  # RFC 3461 section 4.2 (the decoded address)
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")


def xtext_decode(text: str) -> str:
    """Decode xtext (RFC 3461 section 4); ValueError if it is not xtext."""
    for index, char in enumerate(text):
        code = ord(char)
        if code < 0x21 or code > 0x7E or char == "=":
            raise ValueError(f"invalid character in xtext at {index}")
        if char == "+" and not _XTEXT_HEX.match(text, index):
            raise ValueError(f"bad hexchar in xtext at {index}")
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """Encode as xtext: '+', '=', controls, space and non-ASCII become +XX (UTF-8 octets)."""
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def check_mail_param(key: str, value: str | None) -> Reply | None:
    """The error reply for a bad RET or ENVID, or None when it is fine."""
    if key == "RET":
        if value is None or value.upper() not in ("FULL", "HDRS"):
            return replies.PARAM_BAD.with_text("RET must be FULL or HDRS")
    elif key == "ENVID":
        if value is None:
            return replies.PARAM_BAD.with_text("ENVID requires a value")
        try:
            decoded = xtext_decode(value)
        except ValueError:
            return replies.PARAM_BAD.with_text("ENVID must be xtext")
        if len(decoded) > MAX_ENVID:
            return replies.PARAM_BAD.with_text(f"ENVID longer than {MAX_ENVID} characters")
    return None


def check_rcpt_param(key: str, value: str | None) -> Reply | None:
    """The error reply for a bad NOTIFY or ORCPT, an unknown parameter, or None."""
    if key == "NOTIFY":
        if value is None:
            return replies.PARAM_BAD.with_text("NOTIFY requires a value")
        kinds = [kind.upper() for kind in value.split(",")]
        if kinds == ["NEVER"]:
            return None
        if not kinds or any(kind not in NOTIFY_KINDS for kind in kinds):
            return replies.PARAM_BAD.with_text(
                "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
            )
        if len(set(kinds)) != len(kinds):
            return replies.PARAM_BAD.with_text("NOTIFY names a condition twice")
        return None
    if key == "ORCPT":
        if value is None or ";" not in value:
            return replies.PARAM_BAD.with_text("ORCPT must be addr-type;xtext")
        addr_type, _, address = value.partition(";")
        if not _ADDR_TYPE.match(addr_type) or not address:
            return replies.PARAM_BAD.with_text("ORCPT must be addr-type;xtext")
        try:
            decoded = xtext_decode(address)
        except ValueError:
            return replies.PARAM_BAD.with_text("ORCPT address must be xtext")
        if len(decoded) > MAX_ORCPT:
            return replies.PARAM_BAD.with_text("ORCPT address too long")
        return None
    return replies.PARAM_UNKNOWN.with_text(f"Unsupported RCPT parameter {key}")


# -- reading stored parameters back --------------------------------------------------------


def options_dict(options: Iterable[str]) -> dict[str, str]:
    """``["NOTIFY=SUCCESS", "SMTPUTF8"]`` → ``{"NOTIFY": "SUCCESS", "SMTPUTF8": ""}``."""
    result: dict[str, str] = {}
    for option in options:
        key, _, value = option.partition("=")
        result[key.upper()] = value
    return result


def notify_of(options: Iterable[str]) -> frozenset[str] | None:
    """The NOTIFY conditions given (empty set for NEVER), or None when NOTIFY was absent."""
    value = options_dict(options).get("NOTIFY")
    if value is None:
        return None
    kinds = frozenset(kind.upper() for kind in value.split(","))
    return frozenset() if "NEVER" in kinds else kinds


def wants(notify: frozenset[str] | None, kind: str) -> bool:
    """Whether a notification of ``kind`` is due to the sender under ``notify``.

    Without NOTIFY, failures are reported (RFC 3461 section 4.1: "FAILURE" or
    "FAILURE,DELAY" is the default); delay and success notices only when asked for.
    """
    if notify is None:
        return kind == "FAILURE"
    return kind in notify


def orcpt_of(options: Iterable[str]) -> tuple[str, str] | None:
    """ORCPT as (addr-type, decoded address), or None."""
    value = options_dict(options).get("ORCPT")
    if not value or ";" not in value:
        return None
    addr_type, _, address = value.partition(";")
    try:
        return addr_type, xtext_decode(address)
    except ValueError:
        return None


def ret_of(options: Iterable[str]) -> str | None:
    value = options_dict(options).get("RET")
    return value.upper() if value else None


def envid_of(options: Iterable[str]) -> str | None:
    value = options_dict(options).get("ENVID")
    if not value:
        return None
    try:
        return xtext_decode(value)
    except ValueError:
        return None
