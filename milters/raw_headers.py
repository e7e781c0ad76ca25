"""A daemon that needs each header field exactly as received (DKIM, ARC, DMARC).

DKIM's "simple" header canonicalization hashes the bytes after the colon, space or no
space, so these daemons ask the MTA for ``SMFIP_HDR_LEADSPC`` when it offers it: values
then come as they were received, and values sent back are taken as given. This base keeps
the raw fields beside the usual facts (which still get values without the leading space)
and puts the space after the colon back into the header changes of a verdict.
"""

from __future__ import annotations

import dataclasses

import Milter

from mailgate.milters.adapter import DaemonContext, PolicyMilter
from mailgate.policies.verdict import Verdict


def wire_value(value: bytes, leading_space: bool) -> bytes:
    """A header value as it stands in the message: CRLF line breaks, the space after the
    colon included (added when the MTA stripped it)."""
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return value if leading_space else b" " + value


class RawHeaderMilter(PolicyMilter):
    """PolicyMilter with the header fields of the message as received."""

    def __init__(self, context: DaemonContext) -> None:
        super().__init__(context)
        self._leading_space = False

    def negotiate(self, opts: list[int]) -> int:
        offered = opts[1]
        answer = super().negotiate(opts)
        if answer == Milter.CONTINUE and offered & Milter.P_HDR_LEADSPC:
            self._protocol |= Milter.P_HDR_LEADSPC
            opts[1] = self._protocol
            self._leading_space = True
        return int(answer)

    def _reset_message(self) -> None:
        super()._reset_message()
        self._raw_headers: list[tuple[bytes, bytes]] = []

    def header_bytes(self, name: str, value: bytes) -> int:
        try:
            self._raw_headers.append((name.encode("ascii", "replace"), value))
        except Exception:
            self._failed("header")
        # The facts get the value without its leading space, whatever was negotiated.
        return super().header_bytes(name, value.lstrip(b" \t") if self._leading_space else value)

    def received_headers(self) -> list[tuple[bytes, bytes]]:
        """The header fields exactly as received, in wire form."""
        return [(name, wire_value(value, self._leading_space)) for name, value in self._raw_headers]

    def spaced(self, verdict: Verdict) -> Verdict:
        """``verdict`` with the space after the colon in front of every header value it adds
        or changes, where the MTA takes values as given."""
        if self._leading_space:
            verdict.header_changes = [
                dataclasses.replace(change, value=" " + change.value) if change.value else change
                for change in verdict.header_changes
            ]
        return verdict
