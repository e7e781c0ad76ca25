"""The SPAMD protocol client (mailgate.milters.spamd) against a real spamd and broken peers.

One real spamd (Debian's, stock rules, TELL allowed, Bayes on) serves the whole module:
PING, CHECK, SYMBOLS, REPORT on GTUBE and on an ordinary message, TELL learning and
forgetting checked in the Bayes database itself. Fake servers on loopback stand in for a
spamd that is gone, silent, answering garbage or cutting its reply short.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from mailgate.milters.spamd import (
    Address,
    SpamdClient,
    SpamdError,
    parse_address,
    parse_reply,
    parse_spam_header,
    report_symbols,
)

import peers

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def mail(subject: str, body: bytes, msgid: str) -> bytes:
    return (
        f"From: Alice <alice@remote.example>\r\nTo: bob@test.example\r\n"
        f"Subject: {subject}\r\nDate: {formatdate(localtime=True)}\r\n"
        f"Message-ID: <{msgid}@remote.example>\r\n\r\n"
    ).encode() + body.replace(b"\n", b"\r\n")


SPAM = mail("test", GTUBE + b"\n", "gtube-1")
HAM = mail(
    "Minutes of Tuesday's meeting",
    b"Hello Bob,\n\nattached are the minutes of Tuesday's meeting. The next one is on\n"
    b"Thursday at ten, in the small room.\n\nRegards,\nAlice\n",
    "minutes-1",
)


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Spamd]:
    with peers.spamd_server(tmp_path_factory.mktemp("spamd"), allow_tell=True) as server:
        yield server


@pytest.fixture
def client(spamd: peers.Spamd) -> SpamdClient:
    return SpamdClient(f"{spamd.host}:{spamd.port}", timeout=60)


def bayes_counts(spamd: peers.Spamd) -> dict[str, int]:
    """nspam and nham from `sa-learn --dump magic` on spamd's Bayes database."""
    out = subprocess.run(
        ["sa-learn", "--dump", "magic", "--dbpath", str(spamd.bayes_dir),
         "--siteconfigpath", str(spamd.base / "site")],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    # Before anything is learned there is no database: sa-learn fails and says nothing.
    counts = {}
    for line in out.splitlines():
        fields = line.split()
        if line.endswith("non-token data: nspam") or line.endswith("non-token data: nham"):
            counts[fields[-1]] = int(fields[2])
    return counts


# -- a real spamd ----------------------------------------------------------------------


@pytest.mark.slow
def test_ping(client: SpamdClient) -> None:
    assert client.ping() is True


@pytest.mark.slow
@pytest.mark.parametrize("request_kind", ["check", "symbols", "report"])
def test_gtube_is_spam(client: SpamdClient, request_kind: str) -> None:
    result = client.check(SPAM, request_kind)  # type: ignore[arg-type]
    assert result.spam is True
    assert result.score >= 900  # GTUBE alone is worth 1000
    assert result.required == 5.0
    if request_kind == "check":
        assert result.symbols == () and result.report is None
    else:
        assert "GTUBE" in result.symbols
    if request_kind == "report":
        assert result.report is not None and "Content analysis details" in result.report
    else:
        assert result.report is None


@pytest.mark.slow
def test_ordinary_message_is_ham(client: SpamdClient) -> None:
    result = client.check(HAM, "symbols")
    assert result.spam is False
    assert result.score < 5
    assert "GTUBE" not in result.symbols
    assert result.required == 5.0


@pytest.mark.slow
def test_user_header_is_accepted(spamd: peers.Spamd) -> None:
    client = SpamdClient(Address(spamd.host, spamd.port), timeout=60, user="nobody")
    assert client.check(SPAM).spam is True


@pytest.mark.slow
def test_tell_learns_and_forgets(client: SpamdClient, spamd: peers.Spamd) -> None:
    before = bayes_counts(spamd)
    spam = mail("cheap watches", b"Buy cheap watches now, best price.\n", "tell-spam-1")
    ham = mail("lunch", b"Shall we have lunch on Friday?\n", "tell-ham-1")

    learned = client.tell(spam, "spam")
    assert learned.did_set == ("local",) and learned.changed
    # Learning the same message again changes nothing, and spamd says so.
    assert client.tell(spam, "spam").changed is False
    assert client.tell(ham, "ham").did_set == ("local",)
    after = bayes_counts(spamd)
    assert after["nspam"] == before.get("nspam", 0) + 1
    assert after["nham"] == before.get("nham", 0) + 1

    forgotten = client.tell(spam, None, forget=True)
    assert forgotten.did_remove == ("local",) and forgotten.changed
    assert bayes_counts(spamd)["nspam"] == before.get("nspam", 0)


@pytest.mark.slow
def test_spamd_refusal_is_a_spamd_error(client: SpamdClient) -> None:
    with pytest.raises(SpamdError, match=r"refused NOSUCH: 76 EX_PROTOCOL Bad header line"):
        client.request("NOSUCH", b"Subject: x\r\n\r\nx\r\n")


def test_tell_needs_a_class_or_forget(client: SpamdClient) -> None:
    with pytest.raises(ValueError):
        client.tell(HAM, None)


# -- broken peers -------------------------------------------------------------------------


@contextlib.contextmanager
def fake_spamd(
    answer: Callable[[socket.socket], None], unix_path: Path | None = None
) -> Iterator[Address]:
    """A one-thread server that hands each connection to ``answer``."""
    if unix_path is not None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(unix_path))
        address = Address(path=str(unix_path))
    else:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        address = Address("127.0.0.1", server.getsockname()[1])
    server.listen(8)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            with contextlib.suppress(OSError):
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield address
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        for conn in held:
            conn.close()
        thread.join(5)


def reply_with(data: bytes) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(65536)
            if not chunk:
                break
            request += chunk
        conn.sendall(data)
        conn.close()

    return answer


def never_answer(conn: socket.socket) -> None:
    pass  # keep the connection open and say nothing


@pytest.mark.timeout(30)
def test_stalled_server_raises_within_the_timeout() -> None:
    with fake_spamd(never_answer) as address:
        client = SpamdClient(address, timeout=1)
        with pytest.raises(SpamdError, match=r"no answer to SYMBOLS within 1s"):
            client.check(SPAM)


@pytest.mark.timeout(30)
def test_closed_port_raises() -> None:
    client = SpamdClient(f"127.0.0.1:{peers.free_port()}", timeout=2)
    with pytest.raises(SpamdError, match="cannot connect"):
        client.check(SPAM)
    with pytest.raises(SpamdError, match="cannot connect"):
        client.ping()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n<html>", "not a spamd reply"),
        (b"", "closed the connection without a reply"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 2\r\n\r\n\r\n", "no Spam header"),
        (b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe ; lots\r\n\r\n", "bad Spam header"),
        (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 9.0 / 5.0\r\n\r\nGTUBE",
            "cut short",
        ),
        (b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"SPAMD/1.0 69 Service unavailable\r\n", "69 EX_UNAVAILABLE"),
        (b"\x00\xff" * 100, "not a spamd reply"),
    ],
)
@pytest.mark.timeout(30)
def test_garbage_replies_raise(data: bytes, error: str) -> None:
    with fake_spamd(reply_with(data)) as address, pytest.raises(SpamdError, match=error):
        SpamdClient(address, timeout=5).check(SPAM)


@pytest.mark.timeout(30)
def test_unix_socket_and_the_request_on_the_wire(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def answer(conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        while chunk := conn.recv(65536):  # the client half-closes after its request
            data += chunk
        seen.append(data)
        conn.sendall(
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 15\r\nSpam: False ; 2.5 / 5.0\r\n\r\n"
            b"HTML_MESSAGE,X_"
        )
        conn.close()

    with fake_spamd(answer, tmp_path / "spamd.sock") as address:
        result = SpamdClient(f"unix:{address.path}", timeout=5, user="mail").check(HAM)
    assert (result.spam, result.score, result.required) == (False, 2.5, 5.0)
    assert result.symbols == ("HTML_MESSAGE", "X_")
    assert seen == [
        b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\nUser: mail\r\n\r\n" % len(HAM) + HAM
    ]


# -- pure parsing ------------------------------------------------------------------------


def test_parse_spam_header() -> None:
    assert parse_spam_header("True ; 1000.0 / 5.0") == (True, 1000.0, 5.0)
    assert parse_spam_header("False ; -0.1 / 5.0") == (False, -0.1, 5.0)
    assert parse_spam_header("Yes ; 7 / 6.5") == (True, 7.0, 6.5)
    for bad in ("", "True", "True ; x / 5", "True ; 5.0"):
        with pytest.raises(SpamdError):
            parse_spam_header(bad)


def test_parse_reply_forms() -> None:
    pong = parse_reply(b"SPAMD/1.5 0 PONG\r\n")
    assert (pong.version, pong.code, pong.message) == ("1.5", 0, "PONG")
    tell = parse_reply(b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n\r\n")
    assert tell.header("didset") == "local"


def test_parse_address() -> None:
    assert parse_address("127.0.0.1") == Address("127.0.0.1", 783)
    assert parse_address("spamd.example:10783") == Address("spamd.example", 10783)
    assert parse_address("[::1]:783") == Address("::1", 783)
    assert parse_address("::1") == Address("::1", 783)
    assert parse_address("unix:/run/spamd.sock") == Address(path="/run/spamd.sock")
    assert parse_address("/run/spamd.sock") == Address(path="/run/spamd.sock")
    for bad in ("", "host:0", "host:x", "unix:relative", "[::1", "a b:1"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_report_symbols() -> None:
    report = (
        "Content analysis details:   (1002.7 points, 5.0 required)\n\n"
        " pts rule name              description\n"
        "---- ---------------------- --------------------------------------------------\n"
        "-0.0 NO_RECEIVED            Informational: message has no Received headers\n"
        "1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email\n"
        "                            continued description\n"
        " 2.7 MISSING_DATE           Missing Date: header\n"
    )
    assert report_symbols(report) == ("NO_RECEIVED", "GTUBE", "MISSING_DATE")
