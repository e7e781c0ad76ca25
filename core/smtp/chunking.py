"""Sans-I/O CHUNKING (RFC 3030): the BDAT argument grammar and the chunk octet readers.

``parse_bdat`` turns the argument of a ``BDAT`` command into a ``BdatCommand``.
``ChunkReader`` takes exactly the announced number of octets of one chunk out of the byte
stream and hands back whatever followed (pipelined commands). ``ChunkedBody`` is the
message of one BDAT transaction: it counts every chunk against the size limit, keeps the
octets of a message still within it and discards the rest, so an oversized message never
sits in memory while the session reads on to stay in step with the client.

Unlike ``framing.DataReader`` nothing here looks at lines: no dot-stuffing, no terminator,
no line-length check. Chunk data is opaque octets (BINARYMIME may carry NUL, bare CR and
bare LF) and reaches the spool byte for byte. Bytes in, results out; the session owns the
socket and the timeouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailgate.core.smtp import replies
from mailgate.core.smtp.framing import DataResult
from mailgate.core.smtp.parser import CommandSyntaxError

# chunk-size = 1*DIGIT; end-marker = "LAST" (RFC 3030 section 2, case-insensitive as all
# ESMTP keywords). Twenty digits already exceed any size this server would accept.
_SIZE = re.compile(r"^[0-9]{1,20}\Z")


class BdatSyntaxError(CommandSyntaxError):
    """A BDAT command that cannot be accepted.

    ``size`` is the chunk size when it could still be read from the argument: those octets
    follow the command on the wire whatever else is wrong with it, and the session must
    consume them to stay in step with the client. ``None`` when no size could be read.
    """

    def __init__(self, size: int | None) -> None:
        super().__init__(replies.BDAT_SYNTAX)
        self.size = size


@dataclass(frozen=True, slots=True)
class BdatCommand:
    """``BDAT <size> [LAST]``."""

    size: int
    last: bool


def parse_bdat(arg: str) -> BdatCommand:
    """The BDAT argument (everything after the verb) as a command; BdatSyntaxError if bad."""
    words = arg.split(" ")
    size = int(words[0]) if _SIZE.match(words[0]) else None
    if size is None or len(words) > 2:
        raise BdatSyntaxError(size)
    if len(words) == 2:
        if words[1].upper() != "LAST":
            raise BdatSyntaxError(size)
        return BdatCommand(size, last=True)
    return BdatCommand(size, last=False)


class ChunkReader:
    """Exactly ``size`` octets of one chunk, fed in pieces as they arrive.

    The octets go to ``sink`` (a list of byte strings, appended in order) or, without one,
    are discarded. Pieces that fit entirely are appended as they are, without a copy.
    """

    __slots__ = ("_sink", "received", "remaining")

    def __init__(self, size: int, sink: list[bytes] | None = None) -> None:
        if size < 0:
            raise ValueError("chunk size must not be negative")
        self.remaining = size
        self.received = 0
        self._sink = sink

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: bytes) -> bytes:
        """Consume what belongs to the chunk; returns the octets after its end (if any)."""
        need = self.remaining
        if need == 0 or not data:
            return data
        if len(data) <= need:
            piece, rest = data, b""
        else:
            piece, rest = data[:need], data[need:]
        if self._sink is not None:
            self._sink.append(piece)
        self.remaining -= len(piece)
        self.received += len(piece)
        return rest


class ChunkedBody:
    """The message of one BDAT transaction, assembled from its chunks in order.

    ``begin`` accounts for a chunk when its command arrives: the size limit applies to the
    sum of the announced chunk sizes, so a chunk that would cross it is known to be too
    large before any of its octets are read. From then on every octet is discarded.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self.chunks = 0
        self.size_exceeded = False
        self._parts: list[bytes] = []

    def begin(self, size: int) -> ChunkReader:
        """The reader for the next chunk of ``size`` octets (it discards once over the limit)."""
        self.chunks += 1
        self.size += size
        if self.size > self.max_size:
            self.size_exceeded = True
            self._parts.clear()
        return ChunkReader(size, None if self.size_exceeded else self._parts)

    def result(self) -> DataResult:
        """The message as received (empty if it was too large) and what was noticed in it.

        A chunked message never has a line-length problem: BDAT data is not line-oriented.
        """
        parts = [] if self.size_exceeded else self._parts
        content = b"".join(parts)
        self._parts = []
        return DataResult(
            content=content,
            size=self.size,
            size_exceeded=self.size_exceeded,
            line_too_long=False,
            has_8bit=not content.isascii(),
            has_nul=b"\x00" in content,
        )
