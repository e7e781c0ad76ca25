"""Glue between an SMTP session and its milter chain: specs, macro facts, message framing.

The chain (``mailgate.core.milter``) decides; this module only translates: the configured
milters into ``MilterSpec``s, the session's state into ``SessionInfo`` macro facts, and a
received message into the header list and body the milters see, and back.
"""

from __future__ import annotations

from mailgate.core.config import Config
from mailgate.core.milter import MilterSpec

_HEADER_LIMIT = 1000


def build_specs(config: Config) -> list[MilterSpec]:
    """The chain, in configured order, with per-milter settings over the global defaults."""
    specs = []
    for milter in config.milters:
        specs.append(
            MilterSpec(
                name=milter.name,
                socket=config.milter_socket(milter),
                connect_timeout=milter.connect_timeout or config.milter_connect_timeout,
                command_timeout=milter.command_timeout or config.milter_command_timeout,
                content_timeout=milter.content_timeout or config.milter_content_timeout,
                default_action=milter.default_action or config.milter_default_action,
                macros=milter.macros,
            )
        )
    return specs


def split_message(content: bytes) -> tuple[list[tuple[str, str]], bytes] | None:
    """Headers in wire form (value after the colon, folding kept) and the body.

    Returns None when the header section cannot be framed (a line that is neither a field
    nor a continuation before the blank line): the message then goes to the milters as
    body only, as Postfix treats a message without a header section.
    """
    headers: list[tuple[str, str]] = []
    position = 0
    length = len(content)
    while position < length:
        end = content.find(b"\n", position)
        line_end = length if end < 0 else end + 1
        line = content[position:line_end]
        stripped = line.rstrip(b"\r\n")
        if not stripped:
            return headers, content[line_end:]
        if stripped[:1] in (b" ", b"\t"):
            if not headers:
                return None
            name, value = headers[-1]
            headers[-1] = (name, value + "\r\n" + stripped.decode("utf-8", "surrogateescape"))
        else:
            name_bytes, colon, value_bytes = stripped.partition(b":")
            if not colon or not name_bytes or name_bytes != name_bytes.strip():
                return None
            headers.append(
                (
                    name_bytes.decode("ascii", "surrogateescape"),
                    value_bytes.decode("utf-8", "surrogateescape"),
                )
            )
            if len(headers) > _HEADER_LIMIT:
                return None
        position = line_end
    return headers, b""


def join_message(headers: list[tuple[str, str]], body: bytes) -> bytes:
    """The message again, CRLF line endings, from wire-form headers and a body."""
    parts = [
        f"{name}:{value}".replace("\r\n", "\n")
        .replace("\n", "\r\n")
        .encode("utf-8", "surrogateescape")
        + b"\r\n"
        for name, value in headers
    ]
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)
