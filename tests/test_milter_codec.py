"""The sans-I/O milter codec, and the pure helpers around it (replies, edits, macros).

Every frame type round-trips through encode and the matching decoder, whole and cut in
arbitrary pieces; random and mutated bytes make the decoders raise MilterProtocolError and
nothing else, and they never hold more than one frame's worth of bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.core.milter import events as ev
from mailgate.core.milter import protocol as p
from mailgate.core.milter.client import SocketSpec
from mailgate.core.milter.codec import (
    DEFAULT_MAX_FRAME,
    ReplyDecoder,
    RequestDecoder,
    encode,
)
from mailgate.core.milter.edits import MessageEditor, normalize_body
from mailgate.core.milter.errors import MilterProtocolError
from mailgate.core.milter.macros import (
    DEFAULT_MACROS,
    MacroContext,
    SessionInfo,
    expand,
    parse_macro_list,
    stage_names,
)
from mailgate.core.milter.results import parse_reply_text
from mailgate.core.smtp.replies import Reply

# -- strategies -----------------------------------------------------------------------------

text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=40
)
blob = st.binary(max_size=300)
u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
u16 = st.integers(min_value=0, max_value=0xFFFF)
family = st.sampled_from([p.SMFIA_INET, p.SMFIA_INET6, p.SMFIA_UNIX])
command_code = st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"N", b"E", b"L", b"B"])

requests = st.one_of(
    st.builds(ev.OptionNegotiation, u32, u32, u32),
    st.builds(ev.DefineMacros, command_code, st.lists(st.tuples(text, text)).map(tuple)),
    st.builds(ev.Connect, text, family, u16, text),
    st.builds(ev.Connect, text),
    st.builds(ev.Helo, text),
    st.builds(ev.Mail, st.lists(text, min_size=1, max_size=4).map(tuple)),
    st.builds(ev.Rcpt, st.lists(text, min_size=1, max_size=4).map(tuple)),
    st.just(ev.Data()),
    st.builds(ev.Header, text, text),
    st.just(ev.EndOfHeaders()),
    st.builds(ev.BodyChunk, blob),
    st.builds(ev.EndOfMessage, blob),
    st.just(ev.Abort()),
    st.just(ev.Quit()),
    st.just(ev.QuitNewConnection()),
    st.builds(ev.Unknown, text),
)

responses = st.one_of(
    st.builds(
        ev.NegotiationReply,
        u32,
        u32,
        u32,
        st.lists(st.tuples(u32, text), max_size=3).map(tuple),
    ),
    st.sampled_from(
        [
            ev.Continue(),
            ev.Accept(),
            ev.Reject(),
            ev.Tempfail(),
            ev.Discard(),
            ev.Skip(),
            ev.Progress(),
            ev.Shutdown(),
            ev.ConnectionFailure(),
        ]
    ),
    st.builds(ev.ReplyCode, text),
    st.builds(ev.AddHeader, text, text),
    st.builds(ev.InsertHeader, u32, text, text),
    st.builds(ev.ChangeHeader, u32, text, text),
    st.builds(ev.AddRecipient, text),
    st.builds(ev.AddRecipientPar, text, st.none() | text),
    st.builds(ev.DeleteRecipient, text),
    st.builds(ev.ChangeFrom, text, st.none() | text),
    st.builds(ev.ReplaceBody, blob),
    st.builds(ev.Quarantine, text),
    st.builds(ev.SetSymbolList, u32, text),
)


def feed_in_pieces(
    decoder: ReplyDecoder | RequestDecoder, wire: bytes, cuts: list[int]
) -> list[ev.Request | ev.Response]:
    frames: list[ev.Request | ev.Response] = []
    position = 0
    for cut in cuts:
        frames += decoder.feed(wire[position : position + cut])
        position += cut
    frames += decoder.feed(wire[position:])
    return frames


# -- round trips --------------------------------------------------------------------------------


@settings(max_examples=400)
@given(request=requests)
def test_every_request_round_trips(request: ev.Request) -> None:
    wire = encode(request)
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4
    assert RequestDecoder().feed(wire) == [request]


@settings(max_examples=400)
@given(response=responses)
def test_every_response_round_trips(response: ev.Response) -> None:
    assert ReplyDecoder().feed(encode(response)) == [response]


@settings(max_examples=200)
@given(
    frames=st.lists(requests, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=30),
)
def test_request_stream_cut_anywhere(frames: list[ev.Request], cuts: list[int]) -> None:
    wire = b"".join(encode(frame) for frame in frames)
    assert feed_in_pieces(RequestDecoder(), wire, cuts) == frames


@settings(max_examples=200)
@given(
    frames=st.lists(responses, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=30),
)
def test_response_stream_cut_anywhere(frames: list[ev.Response], cuts: list[int]) -> None:
    wire = b"".join(encode(frame) for frame in frames)
    decoder = ReplyDecoder()
    assert feed_in_pieces(decoder, wire, cuts) == frames
    assert decoder.pending == 0


def test_wire_format_matches_libmilter() -> None:
    offer = ev.OptionNegotiation(6, p.SMFI_V6_ACTS, p.MILTER_V6_PROTOCOL)
    assert p.MILTER_V6_PROTOCOL == 0x1FFFFF  # Postfix's MILTER8_V6_PROTO_MASK
    assert encode(offer) == bytes.fromhex("0000000d4f00000006000001ff001fffff")
    connect = ev.Connect("mx.example", p.SMFIA_INET, 25, "192.0.2.1")
    assert encode(connect) == b"\x00\x00\x00\x19Cmx.example\x004\x00\x19192.0.2.1\x00"
    assert encode(ev.Connect("unknown")) == b"\x00\x00\x00\x0aCunknown\x00U"
    macros = ev.DefineMacros(b"M", (("i", "Q1"), ("{mail_addr}", "a@b")))
    assert encode(macros) == b"\x00\x00\x00\x17DMi\x00Q1\x00{mail_addr}\x00a@b\x00"
    assert encode(ev.Continue()) == b"\x00\x00\x00\x01c"
    assert encode(ev.InsertHeader(0, "X", "y")) == b"\x00\x00\x00\x09i\x00\x00\x00\x00X\x00y\x00"
    reply = ev.NegotiationReply(6, 1, 2, ((p.SMFIM_ENVFROM, "{mail_addr}"),))
    assert ReplyDecoder().feed(encode(reply)) == [reply]


def test_optional_args_and_text_without_nul() -> None:
    decoder = ReplyDecoder()
    assert decoder.feed(b"\x00\x00\x00\x04e<>\x00") == [ev.ChangeFrom("<>")]
    # Postfix reads REPLYCODE and QUARANTINE as buffers: accept them without the NUL too.
    assert decoder.feed(b"\x00\x00\x00\x0ay550 5.7.1") == [ev.ReplyCode("550 5.7.1")]
    assert decoder.feed(b"\x00\x00\x00\x03qab") == [ev.Quarantine("ab")]


def test_largest_body_chunk_fits_the_default_limit() -> None:
    chunk = ev.ReplaceBody(b"x" * p.MILTER_CHUNK_SIZE)
    assert ReplyDecoder().feed(encode(chunk)) == [chunk]
    body = ev.BodyChunk(b"y" * p.MILTER_CHUNK_SIZE)
    assert RequestDecoder().feed(encode(body)) == [body]


# -- malformed input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x00\x00\x00\x00", "length 0"),
        (b"\x00\x00\x00\x01Z", "unknown reply"),
        (b"\x00\x00\x00\x02cX", "carries 1 data"),
        (b"\x00\x00\x00\x03hab", "NUL"),
        (b"\x00\x00\x00\x06hA\x00b\x00X", "unexpected bytes"),
        (b"\x00\x00\x00\x04i\x00\x00\x00", "too short"),
        (b"\x00\x00\x00\x0bO\x00\x00\x00\x06\x00\x00\x00\x01\x00\x00", "too short"),
    ],
)
def test_reply_decoder_rejects(wire: bytes, message: str) -> None:
    decoder = ReplyDecoder()
    with pytest.raises(MilterProtocolError, match=message):
        decoder.feed(wire)
    with pytest.raises(MilterProtocolError, match="already broken"):
        decoder.feed(encode(ev.Continue()))


@pytest.mark.parametrize(
    "wire",
    [
        b"\x00\x00\x00\x01z",  # unknown command
        b"\x00\x00\x00\x01M",  # MAIL without address
        b"\x00\x00\x00\x04Dx\x00y",  # macro without NUL
        b"\x00\x00\x00\x04DMi\x00",  # macro name without value
        b"\x00\x00\x00\x04Ch\x00X",  # unknown family
        b"\x00\x00\x00\x05Ch\x004\x00",  # port cut short
        b"\x00\x00\x00\x05Ch\x00Uz",  # data after family U
        b"\x00\x00\x00\x02Tz",  # DATA with payload
    ],
)
def test_request_decoder_rejects(wire: bytes) -> None:
    with pytest.raises(MilterProtocolError):
        RequestDecoder().feed(wire)


def test_oversized_frame_refused_from_its_length_alone() -> None:
    decoder = ReplyDecoder(max_frame=1000)
    with pytest.raises(MilterProtocolError, match="exceeds"):
        decoder.feed((1001).to_bytes(4, "big"))
    default = ReplyDecoder()
    with pytest.raises(MilterProtocolError, match="exceeds"):
        default.feed((DEFAULT_MAX_FRAME + 1).to_bytes(4, "big") + b"b")


def test_encode_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError, match="NUL"):
        encode(ev.Helo("a\0b"))
    with pytest.raises(ValueError, match="port"):
        encode(ev.Connect("h", p.SMFIA_INET, 70000, "x"))
    with pytest.raises(ValueError, match="32 bits"):
        encode(ev.InsertHeader(-1, "a", "b"))
    with pytest.raises(ValueError):
        encode(ev.Mail(()))
    with pytest.raises(TypeError):
        encode("not a frame")  # type: ignore[arg-type]


FUZZ_LIMIT = 2048


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 300), max_size=20))
def test_random_bytes_only_ever_raise_protocol_errors(data: bytes, cuts: list[int]) -> None:
    for decoder in (ReplyDecoder(FUZZ_LIMIT), RequestDecoder(FUZZ_LIMIT)):
        position = 0
        try:
            for cut in [*cuts, len(data)]:
                decoder.feed(data[position : position + cut])
                position += cut
                assert decoder.pending <= FUZZ_LIMIT + 4
        except MilterProtocolError:
            pass


@settings(max_examples=500, deadline=None)
@given(
    frames=st.lists(st.one_of(requests, responses), min_size=1, max_size=6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_frames_only_ever_raise_protocol_errors(
    frames: list[ev.Request | ev.Response], flips: list[tuple[int, int]]
) -> None:
    wire = bytearray(b"".join(encode(frame) for frame in frames))
    for offset, value in flips:
        wire[offset % len(wire)] = value
    for decoder in (ReplyDecoder(FUZZ_LIMIT), RequestDecoder(FUZZ_LIMIT)):
        try:
            decoder.feed(bytes(wire))
        except MilterProtocolError:
            continue
        assert decoder.pending <= FUZZ_LIMIT + 4


# -- replies, edits, macros, socket specs ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("550 5.7.1 No thanks", Reply(550, "5.7.1", "No thanks")),
        ("451 4.3.0 100%% busy", Reply(451, "4.3.0", "100% busy")),
        ("554 Go away", Reply(554, "5.7.1", "Go away")),
        ("550-5.7.1 one\r\n550 5.7.1 two\r\n", Reply(550, "5.7.1", "one\ntwo")),
        ("421 4.7.0 Bye", Reply(421, "4.7.0", "Bye")),
        ("250 2.0.0 ok", None),
        ("550", None),
        ("55x 5.7.1 x", None),
        ("550 4.7.1 class mismatch", None),
        ("hello there", None),
    ],
)
def test_reply_text_parsing(text: str, expected: Reply | None) -> None:
    assert parse_reply_text(text) == expected


def make_editor() -> MessageEditor:
    headers = [
        ("Received", " from a"),
        ("Subject", " one"),
        ("X-Tag", " first"),
        ("x-tag", " second"),
    ]
    return MessageEditor(headers, b"body\r\n", "s@example.test", ["a@example.test"])


def test_header_edits_follow_postfix_indexing() -> None:
    editor = make_editor()
    editor.apply(
        [
            ev.ChangeHeader(2, "X-Tag", "changed"),  # second X-Tag, names case-insensitive
            ev.ChangeHeader(0, "Subject", "new\r\n\tfolded"),  # index 0 means 1
            ev.ChangeHeader(1, "X-Missing", "appended"),  # absent: appended (Sendmail)
            ev.ChangeHeader(1, "X-Absent", ""),  # deleting nothing: no-op
            ev.InsertHeader(0, "X-Top", "top"),
            ev.InsertHeader(99, "X-Bottom", "bottom"),
            ev.AddHeader("X-Added", "added"),
            ev.ChangeHeader(1, "x-tag", ""),  # delete the first X-Tag
        ],
        leading_space=False,
    )
    assert editor.headers == [
        ("X-Top", " top"),
        ("Received", " from a"),
        ("Subject", " new\r\n\tfolded"),
        ("X-Tag", " changed"),
        ("X-Missing", " appended"),
        ("X-Bottom", " bottom"),
        ("X-Added", " added"),
    ]
    assert editor.headers_changed and not editor.body_replaced
    spaced = make_editor()
    spaced.apply([ev.AddHeader("X-Raw", "\tkept")], leading_space=True)
    assert spaced.headers[-1] == ("X-Raw", "\tkept")


def test_body_and_envelope_edits() -> None:
    editor = make_editor()
    editor.apply(
        [
            ev.ReplaceBody(b"new\nbo"),
            ev.AddRecipient("<b@example.test>"),
            ev.ReplaceBody(b"dy\r\nlast"),
            ev.AddRecipientPar("<c@example.test>", "NOTIFY=NEVER ORCPT=rfc822;c@x"),
            ev.AddRecipient("<A@example.test>"),  # already there
            ev.DeleteRecipient("<A@EXAMPLE.test>"),
            ev.ChangeFrom("<>", None),
        ],
        leading_space=False,
    )
    assert editor.body == b"new\r\nbody\r\nlast\r\n"
    assert editor.recipients == ["b@example.test", "c@example.test"]
    assert editor.added_recipients == [
        ("b@example.test", ()),
        ("c@example.test", ("NOTIFY=NEVER", "ORCPT=rfc822;c@x")),
    ]
    assert editor.deleted_recipients == ["a@example.test"]
    assert (editor.sender, editor.sender_params, editor.sender_changed) == ("", (), True)
    assert normalize_body(b"") == b"" and normalize_body(b"a\r\n") == b"a\r\n"


def test_macro_values_follow_postfix() -> None:
    info = SessionInfo(
        hostname="mx.example.test",
        client_addr="2001:db8::1",
        client_port=4000,
        client_name="unknown",
        client_ptr="host.example.net",
        queue_id="Q1",
        tls_version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        cipher_bits=256,
        auth_type="PLAIN",
        auth_user="alice",
        local_domains=frozenset({"example.test"}),
    )
    connect = dict(expand(DEFAULT_MACROS["connect"], info))
    assert connect == {
        "j": "mx.example.test",
        "{daemon_name}": "mailgate",
        "v": "mailgate",
        "_": "host.example.net [2001:db8::1] (may be forged)",
    }
    assert dict(expand(["{client_addr}", "{client_port}"], info)) == {
        "{client_addr}": "IPv6:2001:db8::1",
        "{client_port}": "4000",
    }
    helo = dict(expand(DEFAULT_MACROS["helo"], info))
    assert helo == {"{tls_version}": "TLSv1.3", "{cipher}": info.cipher, "{cipher_bits}": "256"}
    context = MacroContext("<s@remote.example>", "r@example.test")
    mail = dict(expand(DEFAULT_MACROS["mail"], info, context))
    assert mail == {
        "i": "Q1",
        "{auth_type}": "PLAIN",
        "{auth_authen}": "alice",
        "{mail_addr}": "s@remote.example",
        "{mail_host}": "remote.example",
        "{mail_mailer}": "smtp",
    }
    rcpt = dict(expand(DEFAULT_MACROS["rcpt"], info, context))
    assert rcpt["{rcpt_mailer}"] == "local" and rcpt["{rcpt_addr}"] == "r@example.test"
    rejected = MacroContext(None, "x@y", Reply(550, "5.1.1", "User unknown"))
    assert dict(expand(["{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"], info, rejected)) == {
        "{rcpt_addr}": "User unknown",
        "{rcpt_host}": "5.1.1",
        "{rcpt_mailer}": "error",
    }
    assert parse_macro_list(" i, {mail_addr}  j ") == ("i", "{mail_addr}", "j")
    assert stage_names("mail", {"mail": ("i",)}, {"mail": ["j"]}) == ("i",)
    assert stage_names("mail", {}, {"mail": ["j"]}) == ["j"]
    assert stage_names("rcpt", {}, {"mail": ["j"]}) == DEFAULT_MACROS["rcpt"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("inet:8891@127.0.0.1", SocketSpec("inet", "127.0.0.1", 8891)),
        ("inet:127.0.0.1:8891", SocketSpec("inet", "127.0.0.1", 8891)),
        ("inet6:8891@::1", SocketSpec("inet6", "::1", 8891)),
        ("inet:[::1]:8891", SocketSpec("inet6", "::1", 8891)),
        ("inet:localhost:25", SocketSpec("inet", "localhost", 25)),
        ("unix:/run/milter.sock", SocketSpec("unix", path="/run/milter.sock")),
        ("local:/run/milter.sock", SocketSpec("unix", path="/run/milter.sock")),
    ],
)
def test_socket_specs(spec: str, expected: SocketSpec) -> None:
    assert SocketSpec.parse(spec) == expected


@pytest.mark.parametrize(
    "spec", ["inet:8891", "inet:host:0", "inet:host:99999", "unix:relative", "tcp:1@h", "inet:"]
)
def test_bad_socket_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        SocketSpec.parse(spec)
