"""CHUNKING/BDAT and BINARYMIME (RFC 3030): the sans-I/O chunk reader, and a real gateway.

The unit tests feed ``mailgate.core.smtp.chunking`` arbitrary pieces. The integration tests
talk raw SMTP to `mailgate serve` over real sockets: chunk sizes from one octet to over a
megabyte, chunks split over TCP writes and pipelined in one write, binary content that
must come out byte for byte in the spool and in the Maildir, every RFC 3030 error case,
the size limit over the sum of chunks, the chunk timeout, and a milter chain.
"""

from __future__ import annotations

import itertools
import json
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.core.smtp.chunking import (
    BdatCommand,
    BdatSyntaxError,
    ChunkedBody,
    ChunkReader,
    parse_bdat,
)
from mailgate.core.smtp.session import READ_CHUNK
from mailgate.core.spool.spool import Spool

from conftest import DOMAIN, Gateway, add_default_users, make_gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"
REMOTE = "someone@elsewhere.example"
SENDER = "sender@remote.example"
PEERS = Path(__file__).parent / "milter_peers.py"
QUEUED = re.compile(r"^2\.0\.0 Ok: queued as ([0-9A-Z]{16})$")

# -- the sans-I/O pieces --------------------------------------------------------------------


def test_parse_bdat() -> None:
    assert parse_bdat("0") == BdatCommand(0, last=False)
    assert parse_bdat("1048576") == BdatCommand(1048576, last=False)
    assert parse_bdat("0 LAST") == BdatCommand(0, last=True)
    assert parse_bdat("17 last") == BdatCommand(17, last=True)
    for bad, size in [
        ("", None),
        ("x", None),
        ("-1", None),
        ("+5", None),
        ("5.0", None),
        ("LAST", None),
        ("1" * 21, None),
        ("5 FOO", 5),
        ("5 LAST X", 5),
        ("5  LAST", 5),
        ("7 8", 7),
    ]:
        with pytest.raises(BdatSyntaxError) as info:
            parse_bdat(bad)
        assert info.value.size == size, bad
        assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


def test_chunk_reader_takes_exactly_its_octets() -> None:
    sink: list[bytes] = []
    reader = ChunkReader(5, sink)
    assert reader.feed(b"ab") == b""
    assert (reader.done, reader.remaining, reader.received) == (False, 3, 2)
    assert reader.feed(b"c\r\nBDAT 1\r\n") == b"BDAT 1\r\n"
    assert reader.done and b"".join(sink) == b"abc\r\n"
    assert reader.feed(b"more") == b"more"
    empty = ChunkReader(0, sink)
    assert empty.done and empty.feed(b"x") == b"x"
    discard = ChunkReader(3)
    assert discard.feed(b"\x00\r\n.\r\nNOOP\r\n") == b".\r\nNOOP\r\n" and discard.done
    with pytest.raises(ValueError):
        ChunkReader(-1)


def test_chunk_reader_keeps_whole_pieces_without_copying() -> None:
    sink: list[bytes] = []
    piece = b"x" * 1000
    ChunkReader(2000, sink).feed(piece)
    assert sink[0] is piece


def test_chunked_body_counts_the_sum_of_chunks_against_the_limit() -> None:
    body = ChunkedBody(10)
    body.begin(4).feed(b"abcd")
    body.begin(6).feed(b"ef\x00\r\xff\n")
    assert not body.size_exceeded and body.size == 10
    result = body.result()
    assert result.content == b"abcdef\x00\r\xff\n"
    assert result.has_8bit and result.has_nul and not result.line_too_long
    over = ChunkedBody(10)
    over.begin(6).feed(b"123456")
    reader = over.begin(5)
    assert over.size_exceeded
    assert reader.feed(b"78901REST") == b"REST"
    over.begin(3).feed(b"abc")  # read on and discarded
    result = over.result()
    assert (result.size_exceeded, result.size, result.content) == (True, 14, b"")


def test_no_line_processing() -> None:
    body = ChunkedBody(10**6)
    long_line = b"y" * 5000
    body.begin(len(long_line) + 5).feed(long_line + b"\r\n.\r\n")
    result = body.result()
    assert result.content == long_line + b"\r\n.\r\n" and not result.line_too_long
    assert not result.has_8bit


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=200), max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=97), max_size=60),
    limit=st.integers(min_value=0, max_value=1500),
)
def test_chunked_body_is_independent_of_how_the_stream_is_cut(
    chunks: list[bytes], cuts: list[int], limit: int
) -> None:
    """Like the session: leftovers of one chunk's piece go to the next chunk's reader."""
    stream = b"".join(chunks) + b"QUIT\r\n"
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(stream[position : position + cut])
        position += cut
    pieces.append(stream[position:])
    pieces = [piece for piece in pieces if piece]
    body, buffered = ChunkedBody(limit), b""
    for chunk in chunks:
        reader = body.begin(len(chunk))
        buffered = reader.feed(buffered)
        while not reader.done:
            buffered = reader.feed(pieces.pop(0))
    rest = buffered + b"".join(pieces)
    assert rest == b"QUIT\r\n"
    result = body.result()
    total = sum(map(len, chunks))
    assert result.size == total
    assert result.size_exceeded == (total > limit)
    assert result.content == (b"" if total > limit else b"".join(chunks))


# -- against a real gateway -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Default limits; loopback may relay and nothing goes out, so a remote recipient keeps
    a copy in the spool."""
    gateway = make_gateway(
        tmp_path_factory.mktemp("chunking"),
        auth_failure_delay=0,
        rate_limit_connections=10000,
        relay_networks="127.0.0.0/8",
        outbound_delivery="false",
    )
    add_default_users(gateway)
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """An 8 KiB size limit, one-second data timeouts (commands may wait a minute), and
    undeclared 8-bit data refused."""
    gateway = make_gateway(
        tmp_path_factory.mktemp("limited"),
        rate_limit_connections=10000,
        max_message_size="8k",
        reject_8bit_without_8bitmime="true",
        data_init_timeout=1,
        data_block_timeout=1,
        command_timeout=60,
    )
    add_default_users(gateway)
    gateway.start()
    yield gateway
    gateway.stop()


def open_transaction(wire: Wire, params: str = "", rcpts: tuple[str, ...] = (ALICE,)) -> None:
    assert wire.reply()[0] == 220
    assert wire.cmd("EHLO client.example")[0] == 250
    code, text = wire.cmd(f"MAIL FROM:<{SENDER}>{params}")
    assert code == 250, text
    for rcpt in rcpts:
        code, text = wire.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, text


def bdat(size: int, last: bool = False) -> bytes:
    return f"BDAT {size}{' LAST' if last else ''}\r\n".encode()


def exchange(wire: Wire, data: bytes) -> tuple[int, str]:
    """Send raw octets (a BDAT command and its chunk) and read one reply."""
    wire.send(data)
    return wire.reply()


def queue_id(reply: tuple[int, str]) -> str:
    code, text = reply
    match = QUEUED.match(text)
    assert code == 250 and match, reply
    return match.group(1)


def find(gateway: Gateway, address: str, marker: bytes, timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in gateway.delivered(address):
            if marker in message:
                return message
        time.sleep(0.05)
    raise AssertionError(f"no message with {marker!r} delivered to {address}")


def never(gateway: Gateway, address: str, marker: bytes, wait: float = 0.5) -> bool:
    time.sleep(wait)
    return not any(marker in message for message in gateway.delivered(address))


def test_ehlo_advertises_chunking_and_binarymime_on_every_role(gw: Gateway) -> None:
    with Wire(gw.smtp_port) as wire:
        wire.reply()
        code, text = wire.cmd("EHLO client.example")
        assert {"CHUNKING", "BINARYMIME"} <= set(text.split("\n"))
        code, text = wire.cmd("HELP")
        assert code == 214 and "BDAT" in text.split()
    with gw.smtp(gw.submission_port) as client:
        client.ehlo("client.example")
        assert client.has_extn("chunking") and client.has_extn("binarymime")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", gw.smtps_port, timeout=10, context=context) as client:
        client.ehlo("client.example")
        assert client.has_extn("chunking") and client.has_extn("binarymime")


def test_mixed_chunk_sizes_split_and_pipelined(gw: Gateway) -> None:
    marker = b"mixed-sizes-1"
    body = b"".join(b"line %06d of a long message\r\n" % n for n in range(45000))  # ~1.3 MB
    message = b"Subject: " + marker + b"\r\nFrom: <" + SENDER.encode() + b">\r\n\r\n" + body
    # Chunk boundaries: 1 octet, exactly the server's read size, over a megabyte, and a
    # cut between a CR and its LF; the rest goes in small pipelined chunks.
    first = message[:1]
    second = message[1 : 1 + READ_CHUNK]
    third = message[1 + READ_CHUNK : 1 + READ_CHUNK + 1_100_000]
    offset = 1 + READ_CHUNK + 1_100_000
    cr = message.index(b"\r\n", offset) + 1
    fourth = message[offset:cr]
    tail = message[cr:]
    small = [tail[i : i + 7000] for i in range(0, len(tail), 7000)]
    assert fourth.endswith(b"\r") and small[0].startswith(b"\n")
    assert len(third) > 1024 * 1024
    with Wire(gw.smtp_port) as wire:
        wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        open_transaction(wire)
        # The command and its data in separate writes, the data cut into several writes.
        wire.send(bdat(1))
        time.sleep(0.05)
        wire.send(first)
        assert wire.reply() == (250, "2.0.0 1 octets received")
        wire.send(bdat(len(second)) + second[:100])
        time.sleep(0.05)
        wire.send(second[100:40000])
        time.sleep(0.05)
        wire.send(second[40000:])
        assert wire.reply() == (250, f"2.0.0 {READ_CHUNK} octets received")
        wire.send(bdat(len(third)))
        for start in range(0, len(third), 300_000):
            wire.send(third[start : start + 300_000])
        assert wire.reply() == (250, f"2.0.0 {len(third)} octets received")
        # Several chunks, BDAT 0 LAST and a NOOP pipelined in one write.
        pipelined = bdat(len(fourth)) + fourth
        pipelined += b"".join(bdat(len(chunk)) + chunk for chunk in small)
        wire.send(pipelined + bdat(0, last=True) + b"NOOP\r\n")
        assert wire.reply() == (250, f"2.0.0 {len(fourth)} octets received")
        for chunk in small:
            assert wire.reply() == (250, f"2.0.0 {len(chunk)} octets received")
        qid = queue_id(wire.reply())
        assert wire.reply() == (250, "2.0.0 Ok")
    delivered = find(gw, ALICE, marker)
    # An 8BITMIME/7BIT message gets Unix line ends in the Maildir, as with DATA.
    assert delivered.endswith(message.replace(b"\r\n", b"\n"))
    assert f"with ESMTP id {qid}".encode() in delivered


def test_bdat_0_last_alone_and_long_lines(gw: Gateway) -> None:
    with Wire(gw.smtp_port) as wire:
        open_transaction(wire)
        queue_id(wire.cmd("BDAT 0 LAST"))
        # BDAT data is never line-checked; the same content over DATA still is.
        marker = b"long-line-2"
        message = b"Subject: " + marker + b"\r\n\r\n" + b"z" * 5000 + b"\r\n"
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        wire.send(bdat(len(message), last=True) + message)
        queue_id(wire.reply())
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(message.replace(b"long-line-2", b"long-line-3") + b".\r\n")
        assert wire.reply() == (500, "5.5.2 Message line too long")
    assert b"z" * 5000 in find(gw, ALICE, b"long-line-2")
    assert never(gw, ALICE, b"long-line-3")


def binary_body() -> bytes:
    every_octet = bytes(range(256))
    return (
        b"Subject: binary-4\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        + every_octet
        + b"bare CR\rbare LF\nNUL\x00CRLF\r\n.\r\n..\r\n"
        + b"\r\n.\r\n"
        + every_octet[::-1] * 50
        + b"\xff" * 3000
        + b"\r"
    )


def test_binarymime_is_stored_and_delivered_byte_exact(gw: Gateway) -> None:
    message = binary_body()
    cut = len(message) // 3
    with Wire(gw.smtp_port) as wire:
        open_transaction(wire, " BODY=BINARYMIME", rcpts=(ALICE, REMOTE))
        wire.send(bdat(cut) + message[:cut] + bdat(len(message) - cut, last=True) + message[cut:])
        assert wire.reply() == (250, f"2.0.0 {cut} octets received")
        qid = queue_id(wire.reply())
    delivered = find(gw, ALICE, b"Subject: binary-4")
    # The remote recipient keeps the message in the spool (outbound delivery is off).
    deadline = time.monotonic() + 10
    spool = Spool(gw.data_dir / "spool", recover=False)
    while spool.queue_of(qid) != "deferred" and time.monotonic() < deadline:
        time.sleep(0.05)
    envelope, stored = spool.load(qid)
    assert envelope.body_type == "BINARYMIME"
    assert "BODY=BINARYMIME" in envelope.mail_options
    # As stored: our Received header, then the message byte for byte.
    assert stored.startswith(b"Received: from client.example ([127.0.0.1])\r\n")
    assert stored.endswith(b"\r\n" + message)
    assert stored[: -len(message)].count(b"\r\n") == stored[: -len(message)].count(b"\n")
    # As delivered: Return-Path and Delivered-To (CRLF), then the stored message unchanged.
    trace = f"Return-Path: <{SENDER}>\r\nDelivered-To: {ALICE}\r\n".encode()
    assert delivered == trace + stored


def test_binarymime_needs_ehlo_and_bdat(gw: Gateway) -> None:
    with Wire(gw.smtp_port) as wire:
        open_transaction(wire, " BODY=BINARYMIME")
        code, text = wire.cmd("DATA")
        assert (code, text) == (503, "5.5.1 BODY=BINARYMIME requires BDAT instead of DATA")
        assert wire.cmd("RSET")[0] == 250
        assert wire.cmd("HELO client.example")[0] == 250
        code, text = wire.cmd(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME")
        assert (code, text) == (501, "5.5.4 Syntax error: parameters require EHLO")


def test_error_cases_keep_the_session_in_step(gw: Gateway) -> None:
    """Every refused BDAT still consumes its octets: they are never read as commands."""
    with Wire(gw.smtp_port) as wire:
        assert wire.reply()[0] == 220
        wire.send(bdat(6) + b"QUIT\r\n" + b"NOOP\r\n")
        assert wire.reply() == (503, "5.5.1 Send HELO/EHLO first")
        assert wire.reply() == (250, "2.0.0 Ok")
        assert wire.cmd("EHLO client.example")[0] == 250
        wire.send(bdat(6) + b"QUIT\r\n" + b"NOOP\r\n")
        assert wire.reply() == (503, "5.5.1 Need MAIL command first")
        assert wire.reply() == (250, "2.0.0 Ok")
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        wire.send(bdat(6, last=True) + b"QUIT\r\n" + b"NOOP\r\n")
        assert wire.reply() == (503, "5.5.1 Need RCPT command first")
        assert wire.reply() == (250, "2.0.0 Ok")
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        # With a readable size the chunk's octets are skipped; without one nothing can be.
        for bad, octets in [
            (b"BDAT", b""),
            (b"BDAT x", b""),
            (b"BDAT -1", b""),
            (b"BDAT 2 LAST LAST", b"\r\n"),
            (b"BDAT 4 FOO", b"QUIT"),
        ]:
            code, text = exchange(wire, bad + b"\r\n" + octets)
            assert (code, text) == (501, "5.5.4 Syntax: BDAT chunk-size [LAST]"), bad
        assert wire.cmd("NOOP") == (250, "2.0.0 Ok")
        # DATA after BDAT in the same transaction, then RSET and a clean message.
        assert exchange(wire, b"BDAT 5\r\nhello") == (250, "2.0.0 5 octets received")
        assert wire.cmd("DATA") == (
            503,
            "5.5.1 DATA not allowed after BDAT in the same transaction",
        )
        assert wire.cmd("RSET") == (250, "2.0.0 Ok")
        open_again = [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{ALICE}>"]
        for line in open_again:
            assert wire.cmd(line)[0] == 250
        message = b"Subject: in-step-5\r\n\r\nbody.\r\n"
        queue_id(exchange(wire, bdat(len(message), last=True) + message))
        # BDAT after BDAT LAST: the transaction is over.
        wire.send(bdat(2) + b"xy")
        assert wire.reply() == (503, "5.5.1 Need MAIL command first")
        assert wire.cmd("QUIT")[0] == 221
    assert find(gw, ALICE, b"in-step-5")


def test_bdat_before_auth_on_submission(gw: Gateway) -> None:
    with Wire(gw.submission_port) as wire:
        assert wire.reply()[0] == 220
        assert wire.cmd("EHLO client.example")[0] == 250
        assert exchange(wire, bdat(6) + b"QUIT\r\n") == (530, "5.7.0 Authentication required")
        assert wire.cmd("NOOP") == (250, "2.0.0 Ok")


def test_rset_discards_a_partial_message(gw: Gateway) -> None:
    with Wire(gw.smtp_port) as wire:
        open_transaction(wire)
        first = b"Subject: partial-6\r\n\r\n"
        assert exchange(wire, bdat(len(first)) + first) == (
            250,
            f"2.0.0 {len(first)} octets received",
        )
        assert wire.cmd("RSET") == (250, "2.0.0 Ok")
        assert exchange(wire, bdat(3) + b"abc") == (503, "5.5.1 Need MAIL command first")
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        second = b"Subject: complete-7\r\n\r\nonly this\r\n"
        queue_id(exchange(wire, bdat(len(second), last=True) + second))
    delivered = find(gw, ALICE, b"complete-7")
    assert b"partial-6" not in delivered
    assert never(gw, ALICE, b"partial-6", wait=0.2)


def test_size_limit_counts_the_sum_of_chunks(limited: Gateway) -> None:
    chunk = b"x" * 3000
    with Wire(limited.smtp_port) as wire:
        open_transaction(wire)
        # 3000 + 3000 fit in 8 KiB, the third chunk crosses the limit: 552 on that chunk,
        # the same for every later chunk (read and discarded), and the last ends it.
        wire.send((bdat(3000) + chunk) * 4 + bdat(10, last=True) + b"0123456789" + b"NOOP\r\n")
        assert wire.reply() == (250, "2.0.0 3000 octets received")
        assert wire.reply() == (250, "2.0.0 3000 octets received")
        for _ in range(3):
            assert wire.reply() == (552, "5.3.4 Message size exceeds fixed maximum message size")
        assert wire.reply() == (250, "2.0.0 Ok")
        assert exchange(wire, bdat(1) + b"x") == (503, "5.5.1 Need MAIL command first")
        # Over the limit in the last chunk itself.
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        big = b"Subject: too-big-8\r\n\r\n" + b"y" * 9000
        code, text = exchange(wire, bdat(len(big), last=True) + big)
        assert (code, text[:5]) == (552, "5.3.4")
        # RSET after a failed chunk, then a message that fits.
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert exchange(wire, bdat(9000) + b"y" * 9000)[0] == 552
        assert wire.cmd("RSET") == (250, "2.0.0 Ok")
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        small = b"Subject: fits-9\r\n\r\n" + b"z" * 4000
        queue_id(exchange(wire, bdat(len(small), last=True) + small))
    assert find(limited, ALICE, b"fits-9")
    assert never(limited, ALICE, b"too-big-8", wait=0.2)
    assert not any(b"xxxxxxxx" in message for message in limited.delivered(ALICE))
    assert "message too large" in limited.log()


def test_undeclared_8bit_is_refused_at_last_binarymime_is_not(limited: Gateway) -> None:
    message = b"Subject: eight-bit-13\r\n\r\n\xe4\xf6\xfc\r\n"
    with Wire(limited.smtp_port) as wire:
        open_transaction(wire)
        assert exchange(wire, bdat(len(message)) + message)[0] == 250
        code, text = exchange(wire, bdat(0, last=True))
        assert (code, text[:5]) == (554, "5.6.0")
        assert wire.cmd(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        queue_id(exchange(wire, bdat(len(message), last=True) + message))
    assert find(limited, ALICE, b"eight-bit-13").endswith(message)


def test_stalled_chunk_times_out(limited: Gateway) -> None:
    # The client announces a chunk and never sends it, or stops halfway: the data
    # timeouts apply (command_timeout is a minute, the socket waits ten seconds).
    for partial in (b"", b"Subject: stalled-10\r\n"):
        with Wire(limited.smtp_port) as wire:
            open_transaction(wire)
            wire.send(bdat(100) + partial)
            code, text = wire.reply()
            assert (code, text) == (421, "4.4.2 Timeout exceeded, closing transmission channel")
            assert wire.closed()
    assert never(limited, ALICE, b"stalled-10", wait=0.2)
    assert "timeout from [127.0.0.1]" in limited.log()


# -- with a milter chain --------------------------------------------------------------------


@pytest.fixture(scope="module")
def milter_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose chain is one pymilter milter ("alpha", tests/milter_peers.py)."""
    tmp = tmp_path_factory.mktemp("milter")
    sock = tmp / "alpha.sock"
    with (tmp / "peer.log").open("wb") as log:
        peer = subprocess.Popen(
            [sys.executable, str(PEERS), "full", f"unix:{sock}", "alpha"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        gateway = make_gateway(tmp, rate_limit_connections=10000)
        add_default_users(gateway)
        config = tmp / "mailgate.yaml"
        config.write_text(f"milters:\n  - name: alpha\n    socket: unix:{sock}\n")
        gateway.extra_args = ["--config", str(config)]
        gateway.start()
        try:
            yield gateway
        finally:
            gateway.stop()
    finally:
        peer.kill()
        peer.wait()


def test_pipelined_bdat_through_the_milter_chain(milter_gw: Gateway) -> None:
    headers = b"Subject: milter-11\r\nX-Do: add,report\r\n\r\n"
    body = b"binary\x00body\rwith\nodd\r\nline ends\xff" * 200
    message = headers + body
    cuts = [0, 1, 700, 4000, len(message)]
    chunks = [message[a:b] for a, b in itertools.pairwise(cuts)]
    commands = f"MAIL FROM:<{SENDER}> BODY=BINARYMIME\r\nRCPT TO:<{ALICE}>\r\n".encode()
    commands += b"".join(bdat(len(chunk)) + chunk for chunk in chunks) + bdat(0, last=True)
    with Wire(milter_gw.smtp_port) as wire:
        assert wire.reply()[0] == 220
        assert wire.cmd("EHLO client.example")[0] == 250
        wire.send(commands)
        assert wire.reply()[0] == 250
        assert wire.reply()[0] == 250
        for chunk in chunks:
            assert wire.reply() == (250, f"2.0.0 {len(chunk)} octets received")
        queue_id(wire.reply())
        # A refusal at the end of a chunked message is the milter's reply to BDAT LAST.
        refused = b"Subject: milter-12\r\nX-Do: reject\r\n\r\nno\r\n"
        assert wire.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert exchange(wire, bdat(5) + refused[:5]) == (250, "2.0.0 5 octets received")
        code, text = exchange(wire, bdat(len(refused) - 5, last=True) + refused[5:])
        assert (code, text) == (554, "5.7.0 Content rejected by alpha")
        assert wire.cmd("NOOP") == (250, "2.0.0 Ok")
    delivered = find(milter_gw, ALICE, b"milter-11")
    assert b"X-Added-By: alpha" in delivered
    assert delivered.endswith(b"\r\n\r\n" + body)
    report = re.search(rb"X-Report-alpha: (\{.*?\})\r\n", delivered)
    assert report is not None
    seen = json.loads(report.group(1))
    assert seen["from"] == [f"<{SENDER}>", "BODY=BINARYMIME"]
    assert seen["body"] == len(body)
    assert ["Subject", "milter-11"] in [[k, v.strip()] for k, v in seen["headers"]]
    assert never(milter_gw, ALICE, b"milter-12", wait=0.2)
