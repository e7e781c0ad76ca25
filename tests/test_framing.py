"""The sans-I/O framing: command lines and the bulk DATA reader, fed in arbitrary pieces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.core.smtp.framing import (
    DataReader,
    LineBuffer,
    TooLong,
    first_lf_dot,
    has_long_line,
)

lines = st.lists(
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30
)


def stuff(body_lines: list[bytes]) -> bytes:
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body_lines
    )


@settings(max_examples=300)
@given(body=lines, cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40))
def test_data_reader_unstuffs_and_returns_pipelined_rest(
    body: list[bytes], cuts: list[int]
) -> None:
    wire = stuff(body) + b".\r\nQUIT\r\n"
    reader = DataReader(10**6, 1000)
    position, rest = 0, b""
    for cut in cuts:
        if reader.done:
            break
        rest = reader.feed(wire[position : position + cut])
        position += cut
    if not reader.done:
        rest = reader.feed(wire[position:])
        position = len(wire)
    rest += wire[position:]
    assert reader.done
    assert rest == b"QUIT\r\n"
    assert reader.result().content == b"".join(line + b"\r\n" for line in body)


def test_empty_message() -> None:
    reader = DataReader(100, 1000)
    assert reader.feed(b".\r\n") == b""
    assert reader.done and reader.result().content == b""


def test_limits_and_flags() -> None:
    reader = DataReader(50, 1000)
    reader.feed(b"x" * 40 + b"\r\n" + b"y" * 40 + b"\r\n.\r\n")
    assert reader.result().size_exceeded and reader.result().content == b""

    reader = DataReader(10**6, 1000)
    reader.feed(b"a" * 999 + b"\r\n.\r\n")
    assert reader.result().line_too_long
    reader = DataReader(10**6, 1000)
    reader.feed(b"a" * 998 + b"\r\n.\r\n")
    result = reader.result()
    assert not result.line_too_long and not result.has_8bit

    reader = DataReader(10**6, 1000)
    reader.feed("Subject: grüße\r\n\r\nbody\x00\r\n.\r\n".encode())
    result = reader.result()
    assert result.has_8bit and result.has_nul


def test_endless_line_keeps_memory_bounded() -> None:
    reader = DataReader(10**9, 1000)
    for _ in range(200):
        reader.feed(b"z" * 65536)
    assert len(reader._pending) < 70000
    reader.feed(b"\r\n.\r\n")
    assert reader.done and reader.result().line_too_long


def test_line_buffer() -> None:
    buffer = LineBuffer(20)
    buffer.feed(b"NOOP\r\nRSET\nQU")
    assert buffer.next_line() == b"NOOP"
    assert buffer.next_line() == b"RSET"
    assert buffer.next_line() is None
    buffer.feed(b"IT\r\n" + b"x" * 30)
    assert buffer.next_line() == b"QUIT"
    assert buffer.next_line() is None
    buffer.feed(b"yyy\r\nNOOP\r\n")
    too_long = buffer.next_line()
    assert isinstance(too_long, TooLong) and too_long.length == 35
    assert buffer.next_line() == b"NOOP"


@given(
    data=st.binary(max_size=300).map(lambda raw: raw.replace(b"\x00", b"\n")),
    limit=st.integers(min_value=1, max_value=40),
)
def test_long_line_check_matches_splitting(data: bytes, limit: int) -> None:
    expected = max(map(len, data.split(b"\n"))) >= limit
    assert has_long_line(data, limit) is expected
    assert has_long_line(bytearray(data), limit) is expected


@given(st.binary(max_size=200).map(lambda raw: raw.translate(bytes.maketrans(b"\x00\x01", b".\n"))))
def testfirst_lf_dot_matches_find(data: bytes) -> None:
    assert first_lf_dot(data) == data.find(b"\n.")
