"""A minimal MTA side of the milter protocol (version 6), for testing the policy daemons.

Independent of mailgate.core on purpose: the daemons are checked against a second,
small implementation of the wire protocol. It speaks one message per call to
:meth:`MilterSession.send_message` over a real unix or inet socket, honours the
negotiated no-reply (NR) and skip-stage (NO) flags, and collects the replies and the
modification actions of end-of-message.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

# Actions the MTA offers (SMFIF_*).
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# Protocol steps (SMFIP_*).
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
ALL_PROTOCOL = 0x1FFFFF

FINAL_REPLIES = {
    b"c": "continue",
    b"a": "accept",
    b"r": "reject",
    b"t": "tempfail",
    b"d": "discard",
    b"y": "replycode",
    b"s": "skip",
}


class ProtocolError(Exception):
    pass


@dataclass
class Reply:
    """A stage's answer: the final reply, and for end-of-message the modifications."""

    action: str
    text: str = ""
    modifications: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def code(self) -> str:
        return self.text.split(" ", 1)[0] if self.text else ""


@dataclass
class MessageResult:
    """What the milter did with one message (the answer of the stage that decided)."""

    stage: str
    reply: Reply
    replies: dict[str, Reply] = field(default_factory=dict)

    @property
    def action(self) -> str:
        """accept/continue/reject/tempfail/discard; a reply code maps to reject/tempfail."""
        if self.reply.action == "replycode":
            return "tempfail" if self.reply.text.startswith("4") else "reject"
        return self.reply.action

    @property
    def modifications(self) -> list[tuple[str, ...]]:
        return self.reply.modifications

    def headers_added(self) -> list[tuple[str, str]]:
        return [(m[1], m[2]) for m in self.modifications if m[0] == "addheader"]

    def headers_inserted(self) -> list[tuple[int, str, str]]:
        return [(int(m[1]), m[2], m[3]) for m in self.modifications if m[0] == "insheader"]

    def headers_changed(self) -> list[tuple[int, str, str]]:
        return [(int(m[1]), m[2], m[3]) for m in self.modifications if m[0] == "chgheader"]

    def recipients_added(self) -> list[str]:
        return [m[1] for m in self.modifications if m[0] == "addrcpt"]

    def recipients_deleted(self) -> list[str]:
        return [m[1] for m in self.modifications if m[0] == "delrcpt"]

    def quarantine_reason(self) -> str | None:
        reasons = [m[1] for m in self.modifications if m[0] == "quarantine"]
        return reasons[-1] if reasons else None


def _cstr(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return data + b"\0"


def _split_cstrs(data: bytes) -> list[str]:
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [part.decode("utf-8", "replace") for part in parts]


class MilterSession:
    """One MTA-to-milter connection; use as a context manager."""

    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        family: int | None = None,
        actions: int = ALL_ACTIONS,
        protocol: int = ALL_PROTOCOL,
        timeout: float = 10.0,
    ) -> None:
        if family is None:
            family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.actions = 0
        self.protocol = 0
        self.version = 0
        self.negotiate()

    def __enter__(self) -> MilterSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- framing ----------------------------------------------------------------------

    def _send(self, command: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + command + data)

    def _recv_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self.sock.recv(size - len(chunks))
            if not chunk:
                raise ProtocolError("the milter closed the connection")
            chunks += chunk
        return bytes(chunks)

    def _recv(self) -> tuple[bytes, bytes]:
        (length,) = struct.unpack("!I", self._recv_exact(4))
        if not 0 < length < 1 << 24:
            raise ProtocolError(f"bad packet length {length}")
        packet = self._recv_exact(length)
        return packet[:1], packet[1:]

    # -- stages -----------------------------------------------------------------------

    def negotiate(self) -> None:
        self._send(b"O", struct.pack("!III", 6, self.offered_actions, self.offered_protocol))
        command, data = self._recv()
        if command != b"O":
            raise ProtocolError(f"expected an option negotiation reply, got {command!r}")
        self.version, self.actions, self.protocol = struct.unpack("!III", data[:12])
        if self.actions & ~self.offered_actions:
            raise ProtocolError(f"the milter asked for actions not offered: {self.actions:#x}")
        if self.protocol & ~self.offered_protocol:
            raise ProtocolError(f"the milter asked for steps not offered: {self.protocol:#x}")

    def macros(self, stage: bytes, values: dict[str, str]) -> None:
        if values:
            data = b"".join(_cstr(name) + _cstr(value) for name, value in values.items())
            self._send(b"D", stage + data)

    def _stage(
        self, command: bytes, data: bytes, skip_flag: int, noreply_flag: int
    ) -> Reply | None:
        """Send one stage; None if the milter skipped it or does not reply to it."""
        if self.protocol & skip_flag:
            return None
        self._send(command, data)
        if self.protocol & noreply_flag:
            return None
        return self._reply()

    def _reply(self, collect: bool = False) -> Reply:
        modifications: list[tuple[str, ...]] = []
        while True:
            command, data = self._recv()
            if command == b"p":  # progress: keep waiting
                continue
            if command in FINAL_REPLIES:
                text = data.rstrip(b"\0").decode("utf-8", "replace")
                return Reply(FINAL_REPLIES[command], text, modifications)
            if not collect:
                raise ProtocolError(f"modification {command!r} outside end-of-message")
            modifications.append(self._modification(command, data))

    def _modification(self, command: bytes, data: bytes) -> tuple[str, ...]:
        need = {
            b"h": SMFIF_ADDHDRS,
            b"i": SMFIF_ADDHDRS,
            b"m": SMFIF_CHGHDRS,
            b"+": SMFIF_ADDRCPT,
            b"2": SMFIF_ADDRCPT_PAR,
            b"-": SMFIF_DELRCPT,
            b"q": SMFIF_QUARANTINE,
            b"b": SMFIF_CHGBODY,
            b"e": SMFIF_CHGFROM,
        }.get(command)
        if need is None:
            raise ProtocolError(f"unknown reply {command!r}")
        if not self.actions & need:
            raise ProtocolError(f"action {command!r} was not negotiated")
        if command == b"h":
            name, value = _split_cstrs(data)
            return ("addheader", name, value)
        if command in (b"i", b"m"):
            (index,) = struct.unpack("!I", data[:4])
            name, value = [*_split_cstrs(data[4:]), ""][:2]
            return ("insheader" if command == b"i" else "chgheader", str(index), name, value)
        if command in (b"+", b"2"):
            return ("addrcpt", *_split_cstrs(data))
        if command == b"-":
            return ("delrcpt", *_split_cstrs(data))
        if command == b"q":
            return ("quarantine", *_split_cstrs(data))
        if command == b"b":
            return ("replacebody", data.decode("utf-8", "replace"))
        return ("chgfrom", *_split_cstrs(data))

    def connect(
        self, hostname: str = "client.example", ip: str = "192.0.2.10", port: int = 40000
    ) -> Reply | None:
        family = b"6" if ":" in ip else b"4"
        data = _cstr(hostname) + family + struct.pack("!H", port) + _cstr(ip)
        return self._stage(b"C", data, SMFIP_NOCONNECT, SMFIP_NR_CONN)

    def helo(self, name: str) -> Reply | None:
        return self._stage(b"H", _cstr(name), SMFIP_NOHELO, SMFIP_NR_HELO)

    def send_message(
        self,
        mail_from: str,
        rcpts: list[str],
        message: bytes,
        *,
        macros: dict[str, dict[str, str]] | None = None,
        chunk_size: int = 65535,
    ) -> MessageResult:
        """Run MAIL … end-of-message for one message; stop at the first decisive reply."""
        macros = macros or {}
        replies: dict[str, Reply] = {}

        def decided(stage: str, reply: Reply | None) -> MessageResult | None:
            if reply is None:
                return None
            replies[stage] = reply
            if reply.action in ("continue", "skip"):
                return None
            return MessageResult(stage, reply, replies)

        self.macros(b"M", macros.get("mail", {}))
        if result := decided(
            "mail", self._stage(b"M", _cstr(f"<{mail_from}>"), SMFIP_NOMAIL, SMFIP_NR_MAIL)
        ):
            return result
        for rcpt in rcpts:
            self.macros(b"R", macros.get("rcpt", {}))
            # A refused recipient is the MTA's business; the message goes on for the others.
            reply = self._stage(b"R", _cstr(f"<{rcpt}>"), SMFIP_NORCPT, SMFIP_NR_RCPT)
            if reply is not None:
                replies[f"rcpt {rcpt}"] = reply
        self.macros(b"T", macros.get("data", {}))
        if result := decided("data", self._stage(b"T", b"", SMFIP_NODATA, SMFIP_NR_DATA)):
            return result
        head, _, body = message.replace(b"\r\n", b"\n").partition(b"\n\n")
        skip_rest = False
        for name, value in _headers(head):
            self.macros(b"L", macros.get("header", {}))
            reply = self._stage(b"L", _cstr(name) + _cstr(value), SMFIP_NOHDRS, SMFIP_NR_HDR)
            if result := decided("header", reply):
                return result
        self.macros(b"N", macros.get("eoh", {}))
        if result := decided("eoh", self._stage(b"N", b"", SMFIP_NOEOH, SMFIP_NR_EOH)):
            return result
        body = body.replace(b"\n", b"\r\n")
        for start in range(0, len(body), chunk_size):
            if skip_rest:
                break
            reply = self._stage(b"B", body[start : start + chunk_size], SMFIP_NOBODY, SMFIP_NR_BODY)
            if reply is not None and reply.action == "skip":
                skip_rest = True
            if result := decided("body", reply):
                return result
        self.macros(b"E", macros.get("eom", {}))
        self._send(b"E")
        reply = self._reply(collect=True)
        replies["eom"] = reply
        return MessageResult("eom", reply, replies)

    def abort(self) -> None:
        self._send(b"A")

    def close(self) -> None:
        try:
            self._send(b"Q")
        except OSError:
            pass
        finally:
            self.sock.close()


def _headers(head: bytes) -> list[tuple[str, str]]:
    """Header fields as an MTA sends them: the value without the space after the colon."""
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + line.decode("utf-8", "replace"))
            continue
        raw_name, _, raw_value = line.partition(b":")
        fields.append(
            (raw_name.decode("ascii", "replace"), raw_value.decode("utf-8", "replace").lstrip())
        )
    return fields


def run_message(
    address: str | tuple[str, int],
    *,
    mail_from: str = "sender@remote.example",
    rcpts: list[str] | None = None,
    message: bytes = b"Subject: hello\r\nFrom: sender@remote.example\r\n\r\nHello.\r\n",
    client: tuple[str, str] = ("client.example", "192.0.2.10"),
    helo: str = "client.example",
    queue_id: str = "4TEST1",
    auth_user: str | None = None,
    family: int | None = None,
    actions: int = ALL_ACTIONS,
) -> MessageResult:
    """One connection, one message, as Postfix would send it (macro ``i`` at each stage)."""
    mail_macros = {"i": queue_id}
    if auth_user:
        mail_macros["{auth_authen}"] = auth_user
    macros = {
        "mail": mail_macros,
        "rcpt": {"i": queue_id},
        "eoh": {"i": queue_id},
        "eom": {"i": queue_id},
    }
    with MilterSession(address, family=family, actions=actions) as session:
        session.macros(b"C", {"j": "mx.example.test", "_": f"{client[0]} [{client[1]}]"})
        session.connect(*client)
        session.helo(helo)
        return session.send_message(
            mail_from, rcpts or ["rcpt@example.test"], message, macros=macros
        )
