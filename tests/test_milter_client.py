"""The milter client and chain against real milters in subprocesses (tests/milter_peers.py).

pymilter (libmilter) peers check interoperability: negotiation, every modification, reply
codes, no-reply and no-callback flags, SETSYMLIST, PROGRESS, header leading space. Raw
peers written with mailgate's codec misbehave on purpose: each failure must end in the
milter's default action within its timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.core.milter import events as ev
from mailgate.core.milter import protocol as p
from mailgate.core.milter.chain import MilterChain, MilterSpec
from mailgate.core.milter.client import MilterConnection
from mailgate.core.milter.errors import MilterFailure
from mailgate.core.milter.macros import SessionInfo
from mailgate.core.milter.results import DefaultAction, EomResult
from mailgate.core.smtp.replies import Reply

PEERS = Path(__file__).with_name("milter_peers.py")
SUBJECT = ("Subject", " hello")
UNAVAILABLE = Reply(451, "4.7.1", "Service unavailable - try again later")
CONFIG_PROBLEM = Reply(451, "4.3.5", "Server configuration problem - try again later")


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _probe(spec: str) -> bool:
    kind, _, rest = spec.partition(":")
    try:
        if kind == "unix":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(rest)
        else:
            port, _, host = rest.partition("@")
            socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


class PeerSet:
    """Peer processes started on first use and stopped at the end of the module."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []
        self.specs: dict[str, str] = {}

    def start(self, kind: str, name: str, spec: str | None = None) -> str:
        spec = spec or f"inet:{free_port()}@127.0.0.1"
        log = (self.directory / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, str(PEERS), kind, spec, name], stdout=log, stderr=log
        )
        log.close()
        self.processes.append(process)
        deadline = time.monotonic() + 15
        while not _probe(spec):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"peer {name} did not start: {self.log(name)}")
            time.sleep(0.05)
        return spec

    def get(self, kind: str, name: str | None = None) -> str:
        name = name or kind
        if name not in self.specs:
            self.specs[name] = self.start(kind, name)
        return self.specs[name]

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        # libmilter notices SIGTERM only every few seconds; the peers keep no state.
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerSet]:
    peer_set = PeerSet(tmp_path_factory.mktemp("milters"))
    yield peer_set
    peer_set.stop()


def make_info(**changes: object) -> SessionInfo:
    info = SessionInfo(
        hostname="mx.example.test",
        client_addr="192.0.2.10",
        client_port=40000,
        client_name="client.example.net",
        client_ptr="client.example.net",
        helo="client.example.net",
        queue_id="QID1",
        local_domains=frozenset({"example.test"}),
    )
    for key, value in changes.items():
        setattr(info, key, value)
    return info


def spec(
    name: str, socket_spec: str, default: DefaultAction = "tempfail", timeout: float = 5.0
) -> MilterSpec:
    return MilterSpec(
        name,
        socket_spec,
        connect_timeout=timeout,
        command_timeout=timeout,
        content_timeout=timeout,
        default_action=default,
    )


async def send_message(
    chain: MilterChain,
    info: SessionInfo,
    do: str = "",
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"Hello\r\n",
    sender: str = "sender@example.net",
    recipients: tuple[str, ...] = ("rcpt@example.test",),
) -> EomResult:
    mail = await chain.mail(info, sender, ["BODY=8BITMIME"])
    assert not mail.refused, mail
    for recipient in recipients:
        assert not (await chain.rcpt(info, recipient)).refused
    assert not (await chain.data(info)).refused
    all_headers = [SUBJECT, ("X-Do", " " + do), *(headers or [])]
    return await chain.end_of_message(info, all_headers, body)


async def session(specs: list[MilterSpec], info: SessionInfo | None = None) -> MilterChain:
    chain = MilterChain(specs, session_id="test")
    info = info or make_info()
    assert (await chain.connect(info)).action == "continue"
    assert (await chain.helo(info)).action == "continue"
    return chain


def report(result: EomResult, name: str) -> dict[str, Any]:
    values = [value for key, value in result.headers if key == f"X-Report-{name}"]
    assert len(values) == 1, result.headers
    data: dict[str, Any] = json.loads(values[0])
    return data


# -- against libmilter ------------------------------------------------------------------------


async def test_connection_negotiates_and_exchanges_events(peers: PeerSet) -> None:
    conn = MilterConnection("alpha", peers.get("full", "alpha"), command_timeout=5)
    await conn.open()
    assert conn.version == 6 and conn.actions == p.SMFI_V6_ACTS
    # pymilter switches off what it does not implement and takes SKIP.
    assert conn.protocol == p.SMFIP_NOUNKNOWN | p.SMFIP_SKIP
    connect = await conn.connect("client.example.net", p.SMFIA_INET, 4000, "192.0.2.10")
    assert connect.decision == ev.Continue()
    assert (await conn.helo("client.example.net")).decision == ev.Continue()
    assert (await conn.mail(["<a@example.net>"], [("i", "Q9")])).decision == ev.Continue()
    assert (await conn.rcpt(["<b@example.test>"])).decision == ev.Continue()
    assert (await conn.data()).decision == ev.Continue()
    assert (await conn.unknown("XYZZY")).decision is None  # SMFIP_NOUNKNOWN: not sent
    outcome = await conn.message([SUBJECT, ("X-Do", " add,insert")], b"body\r\n")
    assert outcome.decision == ev.Continue() and outcome.complete
    assert outcome.modifications == (
        ev.AddHeader("X-Added-By", "alpha"),
        ev.InsertHeader(0, "X-Inserted-By", "alpha"),
    )
    await conn.close()
    assert not conn.is_open
    with pytest.raises(MilterFailure, match="not connected"):
        await conn.data()


async def test_every_modification_is_applied(peers: PeerSet) -> None:
    chain = await session([spec("alpha", peers.get("full", "alpha"))])
    info = make_info()
    ops = "add,insert,change,delete,replbody,addrcpt,addrcptpar,delrcpt,chgfrom,quarantine,report"
    result = await send_message(
        chain,
        info,
        ops,
        headers=[("X-Remove", " gone"), ("X-Keep", " folded\r\n\tvalue")],
        body=b"line 1\r\nline 2\r\n",
        recipients=("rcpt@example.test", "drop@example.test"),
    )
    await chain.close()
    assert result.action == "quarantine" and result.quarantine == "held by alpha"
    assert [name for name, _ in result.headers] == [
        "X-Inserted-By",
        "Subject",
        "X-Do",
        "X-Keep",
        "X-Added-By",
        "X-Report-alpha",
    ]
    assert dict(result.headers)["Subject"] == " [alpha] hello"
    assert dict(result.headers)["X-Added-By"] == " alpha"
    assert result.body == b"Replaced by alpha\r\nsecond line\r\n" and result.body_replaced
    assert (result.sender, result.sender_params) == ("changed@example.test", ("BODY=8BITMIME",))
    assert result.recipients == ("rcpt@example.test", "added@example.test", "param@example.test")
    assert result.added_recipients == (
        ("added@example.test", ()),
        ("param@example.test", ("NOTIFY=NEVER",)),
    )
    assert result.deleted_recipients == ("drop@example.test",)
    seen = report(result, "alpha")
    # Sendmail conventions: one leading space stripped, folded lines joined by LF.
    assert seen["headers"] == [
        ["Subject", "hello"],
        ["X-Do", ops],
        ["X-Remove", "gone"],
        ["X-Keep", "folded\n\tvalue"],
    ]
    assert seen["body"] == 16 and seen["chunks"] == 1
    assert seen["connect"] == ["client.example.net", socket.AF_INET, ["192.0.2.10", 40000]]
    assert seen["helo"] == "client.example.net"
    assert seen["from"] == ["<sender@example.net>", "BODY=8BITMIME"]
    assert seen["rcpt"] == [["<rcpt@example.test>"], ["<drop@example.test>"]]
    assert seen["macros"] == {
        "connect": {
            "j": "mx.example.test",
            "{daemon_name}": "mailgate",
            "v": "mailgate",
            "_": "client.example.net [192.0.2.10]",
        },
        "helo": {},
        "mail": {
            "i": "QID1",
            "{mail_addr}": "sender@example.net",
            "{mail_host}": "example.net",
            "{mail_mailer}": "smtp",
        },
        "rcpt": {
            "i": "QID1",
            "{rcpt_addr}": "drop@example.test",
            "{rcpt_host}": "example.test",
            "{rcpt_mailer}": "local",
        },
        "data": {"i": "QID1"},
        "eoh": {"i": "QID1"},
        "eom": {"i": "QID1"},
    }


async def test_large_body_goes_in_chunks_and_comes_back_whole(peers: PeerSet) -> None:
    chain = await session([spec("alpha", peers.get("full", "alpha"))])
    body = (b"x" * 998 + b"\r\n") * 200  # 200 kB: four SMFIC_BODY chunks
    result = await send_message(chain, make_info(), "bigbody,report", body=body)
    await chain.close()
    seen = report(result, "alpha")
    assert seen["body"] == len(body) and seen["chunks"] == 4
    # libmilter splits the 150 kB replacement into 65535-byte SMFIR_REPLBODY frames.
    assert result.body == b"y" * 150_000 + b"\r\n"


async def test_envelope_refusals_and_replies(peers: PeerSet) -> None:
    chain = await session([spec("alpha", peers.get("full", "alpha"))])
    info = make_info()
    tempfail = await chain.mail(info, "tempfail@example.net")
    assert tempfail.action == "tempfail" and tempfail.milter == "alpha"
    assert tempfail.reply == UNAVAILABLE

    assert (await chain.mail(info, "sender@example.net")).action == "continue"
    blocked = await chain.rcpt(info, "blocked@example.test")
    assert blocked.reply == Reply(550, "5.7.1", "Recipient blocked by alpha")
    multi = await chain.rcpt(info, "multiline@example.test")
    assert multi.reply == Reply(550, "5.7.1", "first line\nsecond line")
    soft = await chain.rcpt(info, "soft@example.test")
    assert soft.action == "tempfail"
    assert soft.reply == Reply(452, "4.2.2", "Mailbox full, 100% used")
    plain = await chain.rcpt(info, "plainreject@example.test")
    assert plain.reply == Reply(550, "5.7.1", "Command rejected")
    # A refused recipient does not end the transaction.
    assert (await chain.rcpt(info, "ok@example.test")).action == "continue"
    assert (await chain.data(info)).action == "continue"
    result = await chain.end_of_message(info, [SUBJECT, ("X-Do", " report")], b"hi\r\n")
    assert result.action == "continue" and result.recipients == ("ok@example.test",)
    assert report(result, "alpha")["rcpt"] == [
        ["<blocked@example.test>"],
        ["<multiline@example.test>"],
        ["<soft@example.test>"],
        ["<plainreject@example.test>"],
        ["<ok@example.test>"],
    ]

    discard = await chain.mail(info, "discard@example.net")
    assert discard.action == "discard"
    assert (await chain.rcpt(info, "x@example.test")).action == "discard"
    assert (await chain.end_of_message(info, [SUBJECT], b"")).action == "discard"
    await chain.close()


@pytest.mark.parametrize(
    ("do", "action", "reply"),
    [
        ("reject", "reject", Reply(554, "5.7.0", "Content rejected by alpha")),
        ("tempfail", "tempfail", UNAVAILABLE),
        ("discard", "discard", None),
    ],
)
async def test_end_of_message_decisions_then_next_message(
    peers: PeerSet, do: str, action: str, reply: Reply | None
) -> None:
    chain = await session([spec("alpha", peers.get("full", "alpha"))])
    info = make_info()
    result = await send_message(chain, info, f"add,{do}")
    assert (result.action, result.reply) == (action, reply)
    # The same session goes on with the next message, milter in step.
    again = await send_message(chain, info, "add", recipients=("second@example.test",))
    assert again.action == "continue" and ("X-Added-By", " alpha") in again.headers
    await chain.close()


async def test_rset_between_transactions_keeps_milter_in_step(peers: PeerSet) -> None:
    chain = await session([spec("alpha", peers.get("full", "alpha"))])
    info = make_info()
    assert (await chain.mail(info, "first@example.net")).action == "continue"
    assert (await chain.rcpt(info, "one@example.test")).action == "continue"
    await chain.abort()
    await chain.abort()  # redundant RSET is harmless
    result = await send_message(chain, info, "report", sender="second@example.net")
    seen = report(result, "alpha")
    assert seen["from"] == ["<second@example.net>", "BODY=8BITMIME"]
    assert seen["rcpt"] == [["<rcpt@example.test>"]]
    await chain.close()


async def test_chain_order_later_milter_sees_earlier_changes(peers: PeerSet) -> None:
    alpha = spec("alpha", peers.get("full", "alpha"))
    beta_socket = f"unix:{peers.directory / 'beta.sock'}"
    if "beta" not in peers.specs:
        peers.specs["beta"] = peers.start("full", "beta", beta_socket)
    beta = spec("beta", peers.specs["beta"])
    chain = await session([alpha, beta])
    result = await send_message(chain, make_info(), "add,change,report")
    await chain.close()
    assert dict(result.headers)["Subject"] == " [beta] [alpha] hello"
    added = [value for name, value in result.headers if name == "X-Added-By"]
    assert added == [" alpha", " beta"]
    seen_by_beta = report(result, "beta")["headers"]
    assert ["Subject", "[alpha] hello"] in seen_by_beta
    assert ["X-Added-By", "alpha"] in seen_by_beta
    assert "X-Report-beta" not in str(report(result, "alpha")["headers"])


async def test_accept_at_connect_skips_that_milter_only(peers: PeerSet) -> None:
    alpha = spec("alpha", peers.get("full", "alpha"))
    lean = spec("lean", peers.get("lean"))
    info = make_info(client_name="trusted.example.net", client_ptr="trusted.example.net")
    chain = await session([alpha, lean], info)
    result = await send_message(chain, info, "add")
    await chain.close()
    assert [v for n, v in result.headers if n == "X-Added-By"] == ["lean"]
    # When every milter has accepted the session, the chain says so.
    chain = MilterChain([alpha, spec("gamma", peers.get("full", "gamma"))])
    assert (await chain.connect(info)).action == "accept"
    assert (await chain.mail(info, "a@example.net")).action == "accept"
    await chain.close()


async def test_lean_milter_switches_off_events_replies_and_macros(peers: PeerSet) -> None:
    lean_socket = peers.get("lean")
    conn = MilterConnection("lean", lean_socket, command_timeout=5)
    await conn.open()
    wanted = (
        p.SMFIP_NR_CONN
        | p.SMFIP_NR_HELO
        | p.SMFIP_NR_RCPT
        | p.SMFIP_NR_HDR
        | p.SMFIP_NR_EOH
        | p.SMFIP_NOBODY
        | p.SMFIP_HDR_LEADSPC
        | p.SMFIP_RCPT_REJ
    )
    assert conn.protocol & wanted == wanted and conn.leading_space
    assert conn.wants_rejected_recipients
    assert conn.macro_lists == {"mail": ("{mail_addr}",)}
    await conn.close()

    # Only milters that asked hear of a refused recipient; their answer does not count.
    chain = await session([spec("alpha", peers.get("full", "alpha")), spec("lean", lean_socket)])
    info = make_info()
    assert (await chain.mail(info, "sender@example.net")).action == "continue"
    assert (await chain.rcpt(info, "rcpt@example.test")).action == "continue"
    refused = Reply(550, "5.1.1", "User unknown")
    await chain.rcpt_rejected(info, "nobody@example.test", [], refused)
    assert (await chain.data(info)).action == "continue"
    headers = [SUBJECT, ("X-Do", " add,report")]
    result = await chain.end_of_message(info, headers, b"x" * 100_000)
    await chain.close()
    assert result.action == "continue"
    assert result.recipients == ("rcpt@example.test",)
    assert report(result, "alpha")["rcpt"] == [["<rcpt@example.test>"]]
    seen = report(result, "lean")
    assert seen["rcpt"] == [["<rcpt@example.test>"], ["<nobody@example.test>"]]
    macros = seen["macros"]
    # The refused recipient's macros carry the refusal, as Postfix sends them.
    assert macros["rcpt"] == {
        "i": "QID1",
        "{rcpt_addr}": "User unknown",
        "{rcpt_host}": "5.1.1",
        "{rcpt_mailer}": "error",
    }
    # Its own list for MAIL replaces the default one: no "i" there.
    assert macros["mail"] == {"{mail_addr}": "sender@example.net"}
    # HDR_LEADSPC both ways: the milter sees " hello" and its header gets no extra space.
    assert ["Subject", " hello"] in seen["headers"]
    assert ("X-Added-By", "lean") in result.headers and ("X-Added-By", " alpha") in result.headers
    assert seen["chunks"] == 0  # SMFIP_NOBODY


async def test_shutdown_reply_closes_the_session(peers: PeerSet) -> None:
    chain = MilterChain([spec("down", peers.get("raw-shutdown"))])
    info = make_info()
    assert (await chain.connect(info)).action == "continue"
    helo = await chain.helo(info)
    assert (helo.action, helo.disconnect) == ("tempfail", True)
    assert helo.reply == Reply(421, "4.7.0", "Server closing connection")
    assert (await chain.mail(info, "a@example.net")).reply == helo.reply
    await chain.close()


async def test_progress_restarts_the_content_timeout(peers: PeerSet) -> None:
    chain = await session([spec("alpha", peers.get("full", "alpha"), timeout=1.0)])
    started = time.monotonic()
    result = await send_message(chain, make_info(), "add,progress")
    assert time.monotonic() - started > 2.0  # six PROGRESS 0.4 s apart, timeout 1 s
    assert result.action == "continue" and ("X-Added-By", " alpha") in result.headers
    await chain.close()


async def test_slow_milter_times_out_to_default_action(
    peers: PeerSet, caplog: pytest.LogCaptureFixture
) -> None:
    chain = await session([spec("slow", peers.get("full", "slow"), timeout=1.0)])
    info = make_info()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mailgate.milter"):
        result = await send_message(chain, info, "sleep")
    assert time.monotonic() - started < 2.5
    assert (result.action, result.reply) == ("tempfail", UNAVAILABLE)
    assert "milter slow: timeout" in caplog.text
    # The default action holds for the rest of the session.
    assert (await chain.mail(info, "next@example.net")).action == "tempfail"
    await chain.close()


async def test_milter_dying_mid_message(peers: PeerSet) -> None:
    dying = peers.start("full", "dying")
    alpha = spec("alpha", peers.get("full", "alpha"))
    chain = await session([spec("dying", dying, default="accept"), alpha])
    result = await send_message(chain, make_info(), "add", body=b"DIE-IN-BODY\r\n")
    await chain.close()
    assert result.action == "continue"
    assert [v for n, v in result.headers if n == "X-Added-By"] == [" alpha"]

    dying = peers.start("full", "dying-again")
    chain = await session([spec("dying-again", dying)])
    result = await send_message(chain, make_info(), "add", body=b"DIE-IN-BODY\r\n")
    await chain.close()
    assert result.action == "tempfail" and result.milter == "dying-again"


# -- failures and default actions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reply"),
    [
        ("nothing", UNAVAILABLE),  # connection refused
        ("raw-silent", UNAVAILABLE),  # no answer to OPTNEG
        ("raw-garbage", UNAVAILABLE),  # HTTP instead of a frame
        ("raw-stall", UNAVAILABLE),  # no answer to CONNECT
        ("raw-oversize", UNAVAILABLE),  # a 16 MiB frame announced
        ("raw-earlymod", UNAVAILABLE),  # a header edit at CONNECT
        ("raw-badreply", CONFIG_PROBLEM),  # REPLYCODE "hello there"
    ],
)
async def test_failures_give_the_default_action_in_time(
    peers: PeerSet, kind: str, reply: Reply
) -> None:
    socket_spec = f"inet:{free_port()}@127.0.0.1" if kind == "nothing" else peers.get(kind)
    chain = MilterChain([spec("broken", socket_spec, timeout=1.0)])
    info = make_info()
    started = time.monotonic()
    result = await chain.connect(info)
    assert time.monotonic() - started < 1.8
    assert (result.action, result.reply, result.milter) == ("tempfail", reply, "broken")
    # Every later command of the session gets the same answer, without waiting.
    started = time.monotonic()
    assert (await chain.helo(info)).reply == reply
    assert (await chain.mail(info, "a@example.net")).reply == reply
    assert time.monotonic() - started < 0.2
    await chain.close()


@pytest.mark.parametrize(
    ("default", "action", "reply", "quarantine"),
    [
        ("accept", "continue", None, None),
        ("reject", "reject", Reply(550, "5.5.0", "Service unavailable"), None),
        ("quarantine", "quarantine", None, "milter broken unavailable"),
    ],
)
async def test_default_actions_of_a_failed_milter(
    peers: PeerSet,
    default: DefaultAction,
    action: str,
    reply: Reply | None,
    quarantine: str | None,
) -> None:
    broken = spec("broken", peers.get("raw-stall"), default=default, timeout=0.5)
    alpha = spec("alpha", peers.get("full", "alpha"))
    chain = MilterChain([broken, alpha])
    info = make_info()
    connect = await chain.connect(info)
    assert (connect.action, connect.reply) == (action, reply)
    if action == "reject":
        assert (await chain.mail(info, "a@example.net")).reply == reply
        await chain.close()
        return
    result = await send_message(chain, info, "add")
    await chain.close()
    assert (result.action, result.quarantine) == (action, quarantine)
    assert [v for n, v in result.headers if n == "X-Added-By"] == [" alpha"]


async def test_old_protocol_version_is_sent_only_what_it_knows(peers: PeerSet) -> None:
    chain = await session([spec("v2", peers.get("raw-v2"))])
    info = make_info()
    assert (await chain.unknown(info, "XYZZY")).action == "continue"
    result = await send_message(chain, info)
    await chain.close()
    received = json.loads(dict(result.headers)["X-Raw-Report"])["received"]
    assert "Data" not in received and "Unknown" not in received
    assert received[:4] == ["OptionNegotiation", "DefineMacros", "Connect", "Helo"]
    assert {"Helo", "Mail", "Rcpt", "Header", "EndOfHeaders", "BodyChunk"} <= set(received)
    assert received[-1] == "EndOfMessage"


async def test_skip_ends_the_body_early(peers: PeerSet) -> None:
    chain = await session([spec("skip", peers.get("raw-skip"))])
    result = await send_message(chain, make_info(), body=b"z" * 200_000)
    await chain.close()
    assert json.loads(dict(result.headers)["X-Raw-Report"])["chunks"] == 1


async def test_socket_forms(peers: PeerSet) -> None:
    port = int(peers.get("full", "alpha").split(":")[1].split("@")[0])
    v6_port = free_port(socket.AF_INET6, "::1")
    inet6 = peers.start("full", "six", f"inet6:{v6_port}@::1")
    for socket_spec in (f"inet:127.0.0.1:{port}", inet6, f"inet:[::1]:{v6_port}"):
        conn = MilterConnection("any", socket_spec, command_timeout=5)
        await conn.open()
        assert conn.version == 6
        await conn.close()


async def test_cancelled_exchange_poisons_the_connection(peers: PeerSet) -> None:
    conn = MilterConnection("stall", peers.get("raw-stall"), command_timeout=5)
    await conn.open()
    task = asyncio.create_task(conn.connect("h", p.SMFIA_INET, 1, "192.0.2.1"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not conn.is_open
    with pytest.raises(MilterFailure, match="cancelled"):
        await conn.helo("h")
    await conn.close()


def test_peer_logs_are_quiet_about_protocol_errors(peers: PeerSet) -> None:
    # libmilter logs through syslog; what lands here is only Python's stderr.
    for name in peers.specs:
        assert "Traceback" not in peers.log(name), peers.log(name)


# -- no-reply events are coalesced --------------------------------------------------------


async def test_no_reply_events_go_out_with_the_next_awaited_frame() -> None:
    """With NR_HDR, NR_EOH and NR_BODY the headers, end of headers and body chunks need no
    answer: they reach the milter together with end of message, in order, and the
    client awaits exactly one reply for them (a client that waited would time out)."""
    await _no_reply_exchange()


def test_no_reply_exchange_on_uvloop() -> None:
    """The client's protocol and timer work on uvloop too (its transports are not
    asyncio.Transport subclasses)."""
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(_no_reply_exchange())


async def _no_reply_exchange() -> None:
    from mailgate.core.milter.codec import RequestDecoder, encode

    flags = p.SMFIP_NR_HDR | p.SMFIP_NR_EOH | p.SMFIP_NR_BODY
    seen: list[ev.Request] = []
    reads_before_eom: list[int] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = RequestDecoder()
        reads = 0
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            reads += 1
            for frame in decoder.feed(data):
                seen.append(frame)
                if isinstance(frame, ev.OptionNegotiation):
                    reply: ev.Response = ev.NegotiationReply(6, p.SMFIF_ADDHDRS, flags)
                elif isinstance(frame, ev.EndOfMessage):
                    reads_before_eom.append(reads)
                    writer.write(encode(ev.AddHeader("X-Seen", "yes")))
                    reply = ev.Continue()
                elif isinstance(frame, ev.Mail | ev.Rcpt | ev.Data):
                    reply = ev.Continue()
                else:
                    continue  # no reply due
                writer.write(encode(reply))
                reads = 0
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        conn = MilterConnection("nr", f"inet:{port}@127.0.0.1", content_timeout=2)
        await conn.open()
        assert conn.protocol & flags == flags
        assert (await conn.mail(["<a@example.net>"])).decision == ev.Continue()
        headers = [SUBJECT, ("To", " <b@example.test>"), ("X-Long", " a\r\n b")]
        outcome = await conn.message(headers, b"line\r\n", eoh_macros=[("i", "Q1")])
        assert outcome.complete and outcome.decision == ev.Continue()
        assert outcome.modifications == (ev.AddHeader("X-Seen", "yes"),)
        # A body larger than the coalescing limit goes out in several writes, whole.
        body = b"x" * 70_000 * 10
        outcome = await conn.message([SUBJECT], body)
        assert outcome.complete and outcome.decision == ev.Continue()
        await conn.close()
    kinds = [type(frame).__name__ for frame in seen]
    first = kinds.index("Mail") + 1
    assert kinds[first : first + 8] == [
        "Header",
        "Header",
        "Header",
        "DefineMacros",
        "EndOfHeaders",
        "BodyChunk",
        "EndOfMessage",
        "Header",
    ]
    assert ev.Header("X-Long", "a\n b") in seen
    chunks = [frame.data for frame in seen if isinstance(frame, ev.BodyChunk)]
    assert chunks[0] == b"line\r\n" and b"".join(chunks[1:]) == body
    assert all(len(chunk) <= p.MILTER_CHUNK_SIZE for chunk in chunks)
    assert reads_before_eom[0] == 1  # the first message arrived in one write
