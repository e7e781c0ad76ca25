"""Bytes to frames and frames to bytes for both directions of the milter protocol: no I/O.

``encode`` turns any request or response of ``events`` into one wire frame.
``ReplyDecoder`` (what an MTA reads) and ``RequestDecoder`` (what a milter reads) are
incremental: ``feed`` them whatever arrived and get back the complete frames. They refuse a
frame longer than ``max_frame`` as soon as its length prefix is in, so between calls they
hold at most one incomplete frame; any malformed input raises ``MilterProtocolError`` and
leaves the decoder unusable (a byte stream cannot be resynchronised after a bad frame).
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

from mailgate.core.milter import events as ev
from mailgate.core.milter import protocol as p
from mailgate.core.milter.errors import MilterProtocolError

#: Largest accepted value of a frame's length prefix (code byte plus payload): a full
#: 65535-byte body chunk plus room for the largest header edits libmilter will send.
DEFAULT_MAX_FRAME = 64 * 1024 + 1024

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_UINT32_MAX = 0xFFFFFFFF


# -- encoding -----------------------------------------------------------------------------


def _cstr(text: str) -> bytes:
    """One NUL-terminated string; a NUL inside cannot be represented on the wire."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ValueError(f"string cannot be encoded: {exc}") from None
    if b"\0" in raw:
        raise ValueError("milter strings cannot contain NUL")
    return raw + b"\0"


def _u32(value: int) -> bytes:
    if not 0 <= value <= _UINT32_MAX:
        raise ValueError(f"{value} does not fit in 32 bits")
    return _U32.pack(value)


def _frame(code: bytes, payload: bytes = b"") -> bytes:
    return _U32.pack(len(payload) + 1) + code + payload


def _optional(args: str | None) -> bytes:
    return b"" if args is None else _cstr(args)


def encode(frame: ev.Request | ev.Response) -> bytes:
    """The wire form of one request or response; ValueError if a field cannot be sent."""
    match frame:
        # requests
        case ev.OptionNegotiation(version, actions, protocol):
            return _frame(p.SMFIC_OPTNEG, _u32(version) + _u32(actions) + _u32(protocol))
        case ev.DefineMacros(command, macros):
            if len(command) != 1:
                raise ValueError("a macro definition names exactly one command code")
            body = b"".join(_cstr(name) + _cstr(value) for name, value in macros)
            return _frame(p.SMFIC_MACRO, command + body)
        case ev.Connect(hostname, family, port, address):
            if family not in p.ADDRESS_FAMILIES:
                raise ValueError(f"unknown address family {family!r}")
            if family == p.SMFIA_UNKNOWN:
                return _frame(p.SMFIC_CONNECT, _cstr(hostname) + family)
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {port} out of range")
            payload = _cstr(hostname) + family + _U16.pack(port) + _cstr(address)
            return _frame(p.SMFIC_CONNECT, payload)
        case ev.Helo(name):
            return _frame(p.SMFIC_HELO, _cstr(name))
        case ev.Mail(args):
            if not args:
                raise ValueError("MAIL needs at least the sender")
            return _frame(p.SMFIC_MAIL, b"".join(_cstr(arg) for arg in args))
        case ev.Rcpt(args):
            if not args:
                raise ValueError("RCPT needs at least the recipient")
            return _frame(p.SMFIC_RCPT, b"".join(_cstr(arg) for arg in args))
        case ev.Data():
            return _frame(p.SMFIC_DATA)
        case ev.Header(name, value):
            return _frame(p.SMFIC_HEADER, _cstr(name) + _cstr(value))
        case ev.EndOfHeaders():
            return _frame(p.SMFIC_EOH)
        case ev.BodyChunk(data):
            return _frame(p.SMFIC_BODY, data)
        case ev.EndOfMessage(data):
            return _frame(p.SMFIC_BODYEOB, data)
        case ev.Abort():
            return _frame(p.SMFIC_ABORT)
        case ev.Quit():
            return _frame(p.SMFIC_QUIT)
        case ev.QuitNewConnection():
            return _frame(p.SMFIC_QUIT_NC)
        case ev.Unknown(command):
            return _frame(p.SMFIC_UNKNOWN, _cstr(command))
        # responses
        case ev.NegotiationReply(version, actions, protocol, macros):
            lists = b"".join(_u32(stage) + _cstr(names) for stage, names in macros)
            return _frame(p.SMFIC_OPTNEG, _u32(version) + _u32(actions) + _u32(protocol) + lists)
        case ev.ReplyCode(text):
            return _frame(p.SMFIR_REPLYCODE, _cstr(text))
        case ev.AddHeader(name, value):
            return _frame(p.SMFIR_ADDHEADER, _cstr(name) + _cstr(value))
        case ev.InsertHeader(index, name, value):
            return _frame(p.SMFIR_INSHEADER, _u32(index) + _cstr(name) + _cstr(value))
        case ev.ChangeHeader(index, name, value):
            return _frame(p.SMFIR_CHGHEADER, _u32(index) + _cstr(name) + _cstr(value))
        case ev.AddRecipient(address):
            return _frame(p.SMFIR_ADDRCPT, _cstr(address))
        case ev.AddRecipientPar(address, args):
            return _frame(p.SMFIR_ADDRCPT_PAR, _cstr(address) + _optional(args))
        case ev.DeleteRecipient(address):
            return _frame(p.SMFIR_DELRCPT, _cstr(address))
        case ev.ChangeFrom(address, args):
            return _frame(p.SMFIR_CHGFROM, _cstr(address) + _optional(args))
        case ev.ReplaceBody(data):
            return _frame(p.SMFIR_REPLBODY, data)
        case ev.Quarantine(reason):
            return _frame(p.SMFIR_QUARANTINE, _cstr(reason))
        case ev.SetSymbolList(stage, macros):
            return _frame(p.SMFIR_SETSYMLIST, _u32(stage) + _cstr(macros))
    code = _EMPTY_RESPONSES.get(type(frame))
    if code is not None:
        return _frame(code)
    raise TypeError(f"not a milter frame: {frame!r}")


# -- decoding -----------------------------------------------------------------------------


class _Payload:
    """A cursor over one frame's payload; every short read is a protocol error."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, size: int, what: str) -> bytes:
        if self.remaining < size:
            raise MilterProtocolError(f"payload too short for {what}")
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def uint32(self) -> int:
        value: int = _U32.unpack(self._take(4, "a 32-bit number"))[0]
        return value

    def uint16(self) -> int:
        value: int = _U16.unpack(self._take(2, "a 16-bit number"))[0]
        return value

    def byte(self) -> bytes:
        return self._take(1, "a code byte")

    def string(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise MilterProtocolError("string without NUL terminator")
        text = self._data[self._pos : end].decode("utf-8", "surrogateescape")
        self._pos = end + 1
        return text

    def strings(self) -> tuple[str, ...]:
        out = []
        while self.remaining:
            out.append(self.string())
        return tuple(out)

    def text(self) -> str:
        """The rest as one string, NUL-terminated or not (Postfix reads both)."""
        raw = self._data[self._pos :]
        self._pos = len(self._data)
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        if b"\0" in raw:
            raise MilterProtocolError("NUL inside a text payload")
        return raw.decode("utf-8", "surrogateescape")

    def rest(self) -> bytes:
        raw = self._data[self._pos :]
        self._pos = len(self._data)
        return raw

    def end(self) -> None:
        if self.remaining:
            raise MilterProtocolError(f"{self.remaining} unexpected bytes at end of payload")


_Frame = TypeVar("_Frame")


class _FrameDecoder(ABC, Generic[_Frame]):
    """Splits a byte stream into frames and hands each payload to ``_parse``."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held back as the start of an incomplete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[_Frame]:
        """Every frame completed by ``data``, in order."""
        if self._broken is not None:
            raise MilterProtocolError(f"stream already broken: {self._broken}")
        buffer = self._buffer
        buffer += data
        frames: list[_Frame] = []
        pos = 0
        size = len(buffer)
        try:
            while size - pos >= p.MILTER_LEN_BYTES:
                length = int.from_bytes(buffer[pos : pos + 4], "big")
                if length < 1:
                    raise MilterProtocolError("frame of length 0")
                if length > self.max_frame:
                    raise MilterProtocolError(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame}"
                    )
                if size - pos - 4 < length:
                    break
                code = bytes(buffer[pos + 4 : pos + 5])
                payload = bytes(buffer[pos + 5 : pos + 4 + length])
                frames.append(self._parse(code, payload))
                pos += 4 + length
        except MilterProtocolError as exc:
            self._broken = str(exc)
            buffer.clear()
            raise
        del buffer[:pos]
        return frames

    @abstractmethod
    def _parse(self, code: bytes, payload: bytes) -> _Frame:
        """Turn one frame's code and payload into its event (each direction has its own)."""


# Responses without payload: one shared instance each, and the code of each class.
_EMPTY_BY_CODE: dict[bytes, ev.Response] = {
    p.SMFIR_CONTINUE: ev.Continue(),
    p.SMFIR_ACCEPT: ev.Accept(),
    p.SMFIR_REJECT: ev.Reject(),
    p.SMFIR_TEMPFAIL: ev.Tempfail(),
    p.SMFIR_DISCARD: ev.Discard(),
    p.SMFIR_SKIP: ev.Skip(),
    p.SMFIR_PROGRESS: ev.Progress(),
    p.SMFIR_SHUTDOWN: ev.Shutdown(),
    p.SMFIR_CONNFAIL: ev.ConnectionFailure(),
}
_EMPTY_RESPONSES: dict[type, bytes] = {type(frame): code for code, frame in _EMPTY_BY_CODE.items()}


def _negotiation_reply(data: _Payload) -> ev.Response:
    version, actions, protocol = data.uint32(), data.uint32(), data.uint32()
    lists = []
    while data.remaining:
        stage = data.uint32()
        lists.append((stage, data.string()))
    return ev.NegotiationReply(version, actions, protocol, tuple(lists))


def _header_pair(data: _Payload) -> tuple[str, str]:
    name = data.string()
    value = data.string()
    data.end()
    return name, value


def _indexed_header(data: _Payload) -> tuple[int, str, str]:
    index = data.uint32()
    return (index, *_header_pair(data))


def _address(data: _Payload) -> str:
    address = data.string()
    data.end()
    return address


def _address_args(data: _Payload) -> tuple[str, str | None]:
    address = data.string()
    args = data.string() if data.remaining else None
    data.end()
    return address, args


def _set_symbol_list(data: _Payload) -> ev.Response:
    stage = data.uint32()
    return ev.SetSymbolList(stage, _address(data))


_RESPONSE_PARSERS: dict[bytes, Callable[[_Payload], ev.Response]] = {
    p.SMFIC_OPTNEG: _negotiation_reply,
    p.SMFIR_REPLYCODE: lambda d: ev.ReplyCode(d.text()),
    p.SMFIR_ADDHEADER: lambda d: ev.AddHeader(*_header_pair(d)),
    p.SMFIR_INSHEADER: lambda d: ev.InsertHeader(*_indexed_header(d)),
    p.SMFIR_CHGHEADER: lambda d: ev.ChangeHeader(*_indexed_header(d)),
    p.SMFIR_ADDRCPT: lambda d: ev.AddRecipient(_address(d)),
    p.SMFIR_ADDRCPT_PAR: lambda d: ev.AddRecipientPar(*_address_args(d)),
    p.SMFIR_DELRCPT: lambda d: ev.DeleteRecipient(_address(d)),
    p.SMFIR_CHGFROM: lambda d: ev.ChangeFrom(*_address_args(d)),
    p.SMFIR_REPLBODY: lambda d: ev.ReplaceBody(d.rest()),
    p.SMFIR_QUARANTINE: lambda d: ev.Quarantine(d.text()),
    p.SMFIR_SETSYMLIST: _set_symbol_list,
}


class ReplyDecoder(_FrameDecoder[ev.Response]):
    """Milter -> MTA: decodes responses (what the client reads)."""

    def _parse(self, code: bytes, payload: bytes) -> ev.Response:
        empty = _EMPTY_BY_CODE.get(code)
        if empty is not None:
            if payload:
                raise MilterProtocolError(f"reply {code!r} carries {len(payload)} data bytes")
            return empty
        parser = _RESPONSE_PARSERS.get(code)
        if parser is None:
            raise MilterProtocolError(f"unknown reply code {code!r}")
        return parser(_Payload(payload))


def _connect(data: _Payload) -> ev.Request:
    hostname = data.string()
    family = data.byte()
    if family not in p.ADDRESS_FAMILIES:
        raise MilterProtocolError(f"unknown address family {family!r}")
    if family == p.SMFIA_UNKNOWN:
        data.end()
        return ev.Connect(hostname, family)
    port = data.uint16()
    address = data.string()
    data.end()
    return ev.Connect(hostname, family, port, address)


def _define_macros(data: _Payload) -> ev.Request:
    command = data.byte()
    values = data.strings()
    if len(values) % 2:
        raise MilterProtocolError("macro name without a value")
    pairs = tuple(zip(values[::2], values[1::2], strict=True))
    return ev.DefineMacros(command, pairs)


def _arguments(data: _Payload) -> tuple[str, ...]:
    args = data.strings()
    if not args:
        raise MilterProtocolError("envelope command without an address")
    return args


def _negotiation(data: _Payload) -> ev.Request:
    version, actions, protocol = data.uint32(), data.uint32(), data.uint32()
    data.end()
    return ev.OptionNegotiation(version, actions, protocol)


def _single(data: _Payload) -> str:
    text = data.string()
    data.end()
    return text


def _empty(factory: Callable[[], ev.Request]) -> Callable[[_Payload], ev.Request]:
    def parse(data: _Payload) -> ev.Request:
        data.end()
        return factory()

    return parse


_REQUEST_PARSERS: dict[bytes, Callable[[_Payload], ev.Request]] = {
    p.SMFIC_OPTNEG: _negotiation,
    p.SMFIC_MACRO: _define_macros,
    p.SMFIC_CONNECT: _connect,
    p.SMFIC_HELO: lambda d: ev.Helo(_single(d)),
    p.SMFIC_MAIL: lambda d: ev.Mail(_arguments(d)),
    p.SMFIC_RCPT: lambda d: ev.Rcpt(_arguments(d)),
    p.SMFIC_DATA: _empty(ev.Data),
    p.SMFIC_HEADER: lambda d: ev.Header(*_header_pair(d)),
    p.SMFIC_EOH: _empty(ev.EndOfHeaders),
    p.SMFIC_BODY: lambda d: ev.BodyChunk(d.rest()),
    p.SMFIC_BODYEOB: lambda d: ev.EndOfMessage(d.rest()),
    p.SMFIC_ABORT: _empty(ev.Abort),
    p.SMFIC_QUIT: _empty(ev.Quit),
    p.SMFIC_QUIT_NC: _empty(ev.QuitNewConnection),
    p.SMFIC_UNKNOWN: lambda d: ev.Unknown(_single(d)),
}


class RequestDecoder(_FrameDecoder[ev.Request]):
    """MTA -> milter: decodes requests (what a milter, or a test peer, reads)."""

    def _parse(self, code: bytes, payload: bytes) -> ev.Request:
        parser = _REQUEST_PARSERS.get(code)
        if parser is None:
            raise MilterProtocolError(f"unknown command code {code!r}")
        return parser(_Payload(payload))
