"""Applying a milter's end-of-message modifications to a message and its envelope.

Pure data work, no protocol: ``MessageEditor`` holds the headers, body, sender and
recipients as they stand and applies each modification in the order the milter sent it,
with Postfix's rules (cleanup_milter.c):

- ADDHEADER appends; INSHEADER at index i puts the header before the i-th header counted
  from 0, or at the end when there are fewer;
- CHGHEADER changes the index-th header of that name (1-based, 0 counts as 1; names
  compare case-insensitively); an empty value deletes it; changing a header that does
  not exist appends it (Sendmail compatibility), deleting one that does not exist is a
  no-op;
- a value added or changed by a milter without SMFIP_HDR_LEADSPC gets one space in front,
  and LF line breaks become CRLF, so values stay in wire form;
- all REPLBODY chunks of one milter form the new body, with every line ended by CRLF;
- DELRCPT removes every recipient equal to the address (angle brackets stripped,
  compared case-insensitively); ADDRCPT/ADDRCPT_PAR add one unless already present;
- CHGFROM replaces the sender and its ESMTP parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mailgate.core.milter import events as ev
from mailgate.core.milter.macros import bare_address


def wire_value(value: str, leading_space: bool) -> str:
    """A header value from a milter, in the wire form the message keeps."""
    value = value.replace("\r\n", "\n").replace("\n", "\r\n")
    return value if leading_space else " " + value


def normalize_body(data: bytes) -> bytes:
    """Every line ended by CRLF, as Postfix stores a replaced body line by line."""
    if not data:
        return b""
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()
    return b"".join(line.removesuffix(b"\r") + b"\r\n" for line in lines)


def _params(args: str | None) -> tuple[str, ...]:
    return tuple(args.split()) if args else ()


@dataclass
class MessageEditor:
    """The message and envelope under edit; see the module doc for the rules."""

    headers: list[tuple[str, str]]
    body: bytes
    sender: str
    recipients: list[str]
    sender_params: tuple[str, ...] | None = None
    added_recipients: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    deleted_recipients: list[str] = field(default_factory=list)
    headers_changed: bool = False
    body_replaced: bool = False
    sender_changed: bool = False

    def apply(self, modifications: Sequence[ev.Modification], *, leading_space: bool) -> None:
        new_body: list[bytes] | None = None
        for mod in modifications:
            match mod:
                case ev.AddHeader(name, value):
                    self.headers.append((name, wire_value(value, leading_space)))
                    self.headers_changed = True
                case ev.InsertHeader(index, name, value):
                    position = min(index, len(self.headers))
                    self.headers.insert(position, (name, wire_value(value, leading_space)))
                    self.headers_changed = True
                case ev.ChangeHeader(index, name, value):
                    self._change_header(max(index, 1), name, value, leading_space)
                case ev.ReplaceBody(data):
                    if new_body is None:
                        new_body = []
                    new_body.append(data)
                case ev.AddRecipient(address):
                    self._add_recipient(address, ())
                case ev.AddRecipientPar(address, args):
                    self._add_recipient(address, _params(args))
                case ev.DeleteRecipient(address):
                    self._delete_recipient(address)
                case ev.ChangeFrom(address, args):
                    self.sender = bare_address(address)
                    self.sender_params = _params(args)
                    self.sender_changed = True
        if new_body is not None:
            self.body = normalize_body(b"".join(new_body))
            self.body_replaced = True

    def _change_header(self, index: int, name: str, value: str, leading_space: bool) -> None:
        wanted = name.lower()
        seen = 0
        for position, (current, _) in enumerate(self.headers):
            if current.lower() == wanted:
                seen += 1
                if seen == index:
                    if value:
                        self.headers[position] = (name, wire_value(value, leading_space))
                    else:
                        del self.headers[position]
                    self.headers_changed = True
                    return
        if value:
            self.headers.append((name, wire_value(value, leading_space)))
            self.headers_changed = True

    def _add_recipient(self, address: str, params: tuple[str, ...]) -> None:
        address = bare_address(address)
        if not address or any(r.lower() == address.lower() for r in self.recipients):
            return
        self.recipients.append(address)
        self.added_recipients.append((address, params))

    def _delete_recipient(self, address: str) -> None:
        wanted = bare_address(address).lower()
        kept = [r for r in self.recipients if r.lower() != wanted]
        if len(kept) != len(self.recipients):
            self.deleted_recipients.extend(r for r in self.recipients if r.lower() == wanted)
            self.recipients = kept
