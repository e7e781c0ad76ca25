"""LMTP routes (RFC 2033): delivery to a real Dovecot, and per-recipient replies after DATA.

The real-service test runs Dovecot 2.3's LMTP (tests/peers.py ``dovecot_lmtp``) and checks
what lands in its Maildirs. The per-recipient behaviour that Dovecot cannot easily be made
to show (one recipient failing temporarily *after* the data) is played by a small LMTP
server here, on TCP and on a Unix socket.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from relay_helpers import ALICE, reports, send, spool_empty, status_blocks, wait_for

from mailgate.core.config import Config, RouteConfig

from conftest import Gateway, add_default_users, make_gateway
from peers import dovecot_lmtp


def lmtp_gateway(tmp_path: Path, routes: list[dict[str, object]], **settings: object) -> Gateway:
    values: dict[str, object] = {
        "relay_networks": "127.0.0.1/32",
        "relay_retry_base": 1,
        "relay_retry_max": 2,
        "rate_limit_connections": 10000,
        "relay_routes": json.dumps(routes),
    }
    values.update(settings)
    gateway = make_gateway(tmp_path, **values)
    add_default_users(gateway)
    gateway.start()
    return gateway


@pytest.fixture
def stop_after() -> Iterator[list[Gateway]]:
    gateways: list[Gateway] = []
    yield gateways
    for gateway in gateways:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def message(subject: str) -> bytes:
    return (
        f"From: <{ALICE}>\r\nTo: <bob@lmtp.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@client.test>\r\n\r\nHello over LMTP.\r\n"
    ).encode()


# -- configuration ------------------------------------------------------------------------


def test_route_strings_name_lmtp_and_hold_transports() -> None:
    config = Config(
        relay_routes=[
            "a.test=lmtp:127.0.0.1",
            "b.test=lmtp:mail.b.test:2424",
            "c.test=lmtp:unix:/run/dovecot/lmtp",
            "d.test=hold",
            "e.test=atrn:alice@example.test",
            "f.test=smtp.f.test:2525",
        ]
    )
    routes = {route.domain: route for route in config.relay_routes}
    assert (routes["a.test"].transport, routes["a.test"].port) == ("lmtp", 24)
    assert routes["a.test"].tls == "none"
    assert (routes["b.test"].host, routes["b.test"].port) == ("mail.b.test", 2424)
    assert routes["c.test"].path == "/run/dovecot/lmtp"
    assert routes["d.test"].transport == "hold"
    assert routes["e.test"].atrn_users == ("alice@example.test",)
    assert (routes["f.test"].transport, routes["f.test"].port) == ("smtp", 2525)


def test_route_mappings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a host or a path"):
        RouteConfig(domain="x.test", transport="lmtp")
    with pytest.raises(ValueError, match="only for LMTP"):
        RouteConfig(domain="x.test", host="h", path="/tmp/s")
    with pytest.raises(ValueError, match="belong to a hold route"):
        RouteConfig(domain="x.test", host="h", atrn_users=("a@b.test",))
    assert RouteConfig(domain="x.test", transport="atrn").transport == "hold"  # type: ignore[arg-type]


# -- a scriptable LMTP server --------------------------------------------------------------


# (recipient, index of the delivery attempt) -> the reply after the data for it, or None.
DataScript = Callable[[str, int], str | None]


@dataclass
class FakeLmtp:
    script: DataScript | None = None
    rcpts: list[str] = field(default_factory=list)
    delivered: list[tuple[str, bytes]] = field(default_factory=list)
    transactions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(socketserver.StreamRequestHandler):
    server: _TcpServer | _UnixServer

    def send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        fake = self.server.fake
        self.send("220 fake-lmtp LMTP ready")
        rcpts: list[str] = []
        while raw := self.rfile.readline():
            line = raw.decode().rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb == "LHLO":
                self.send("250-fake-lmtp\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES")
            elif verb == "MAIL":
                rcpts = []
                self.send("250 2.1.0 OK")
            elif verb == "RCPT":
                address = line.split("<", 1)[1].split(">", 1)[0]
                rcpts.append(address)
                with fake.lock:
                    fake.rcpts.append(address)
                self.send("250 2.1.5 OK")
            elif verb == "DATA":
                self.send("354 go ahead")
                data = bytearray()
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk
                with fake.lock:
                    attempt = fake.transactions
                    fake.transactions += 1
                for rcpt in rcpts:
                    reply = fake.script(rcpt, attempt) if fake.script else None
                    if reply is None:
                        with fake.lock:
                            fake.delivered.append((rcpt, bytes(data)))
                        reply = f"250 2.0.0 <{rcpt}> Saved"
                    self.send(reply)
            elif verb == "RSET":
                rcpts = []
                self.send("250 2.0.0 OK")
            elif verb == "QUIT":
                self.send("221 2.0.0 Bye")
                return
            else:
                self.send("500 5.5.2 unknown command")


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeLmtp


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    fake: FakeLmtp


@pytest.fixture
def serve_lmtp() -> Iterator[Callable[..., tuple[FakeLmtp, object]]]:
    servers: list[socketserver.BaseServer] = []

    def start(fake: FakeLmtp, path: Path | None = None) -> tuple[FakeLmtp, object]:
        server: _TcpServer | _UnixServer
        if path is not None:
            server = _UnixServer(str(path), _Handler)
            where: object = str(path)
        else:
            server = _TcpServer(("127.0.0.1", 0), _Handler)
            where = server.server_address[1]
        server.fake = fake
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return fake, where

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_4xx_after_data_retries_only_that_recipient(
    tmp_path: Path, stop_after: list[Gateway], serve_lmtp: Callable[..., tuple[FakeLmtp, object]]
) -> None:
    def carol_later(rcpt: str, attempt: int) -> str | None:
        if rcpt == "carol@lmtp.test" and attempt == 0:
            return "452 4.2.2 <carol@lmtp.test> Quota exceeded, try again later"
        return None

    fake, port = serve_lmtp(FakeLmtp(script=carol_later))
    route = {"domain": "lmtp.test", "transport": "lmtp", "host": "127.0.0.1", "port": port}
    gateway = lmtp_gateway(tmp_path, [route])
    stop_after.append(gateway)
    send(gateway.smtp_port, ALICE, ["bob@lmtp.test", "carol@lmtp.test"], message("quota"))
    assert wait_for(lambda: len(fake.delivered) == 2)
    assert wait_for(lambda: spool_empty(gateway))
    # Bob was taken in the first transaction; only Carol was offered again.
    assert fake.rcpts == ["bob@lmtp.test", "carol@lmtp.test", "carol@lmtp.test"]
    assert [rcpt for rcpt, _ in fake.delivered] == ["bob@lmtp.test", "carol@lmtp.test"]
    log = gateway.log()
    assert "to=<bob@lmtp.test>, relay=127.0.0.1[127.0.0.1]" in log
    assert "to=<carol@lmtp.test>" in log and "status=deferred (4.2.2 452 4.2.2" in log
    assert reports(gateway, ALICE, 1, timeout=0.5) == []


def test_a_5xx_after_data_bounces_only_that_recipient_over_a_unix_socket(
    tmp_path: Path, stop_after: list[Gateway], serve_lmtp: Callable[..., tuple[FakeLmtp, object]]
) -> None:
    def refuse_carol(rcpt: str, attempt: int) -> str | None:
        return "552 5.2.2 <carol@lmtp.test> Mailbox full" if rcpt.startswith("carol") else None

    path = tmp_path / "lmtp.sock"
    fake, _ = serve_lmtp(FakeLmtp(script=refuse_carol), path)
    gateway = lmtp_gateway(
        tmp_path, [{"domain": "lmtp.test", "transport": "lmtp", "path": str(path)}]
    )
    stop_after.append(gateway)
    send(gateway.smtp_port, ALICE, ["bob@lmtp.test", "carol@lmtp.test"], message("full"))
    assert wait_for(lambda: len(fake.delivered) == 1)
    [report] = reports(gateway, ALICE, 1)
    blocks = status_blocks(report)
    assert len(blocks) == 2
    assert blocks[1]["Final-Recipient"] == "rfc822; carol@lmtp.test"
    assert blocks[1]["Status"] == "5.2.2"
    assert f"unix:{path}" in gateway.log()
    assert wait_for(lambda: spool_empty(gateway))


# -- a real Dovecot --------------------------------------------------------------------------


@pytest.mark.slow
def test_delivery_to_dovecot_with_one_unknown_recipient(
    tmp_path: Path, stop_after: list[Gateway]
) -> None:
    with dovecot_lmtp(tmp_path, users=("bob", "carol")) as dovecot:
        route = {"domain": "lmtp.test", "transport": "lmtp", "host": "127.0.0.1"}
        route["port"] = dovecot.port
        gateway = lmtp_gateway(tmp_path, [route])
        stop_after.append(gateway)
        rcpts = ["bob@lmtp.test", "nosuchuser@lmtp.test", "carol@lmtp.test"]
        send(gateway.smtp_port, ALICE, rcpts, message("dovecot"))
        bob = dovecot.wait_delivered("bob", 1)
        carol = dovecot.wait_delivered("carol", 1)
        assert len(bob) == 1 and len(carol) == 1
        for copy in (bob, carol):
            assert b"Subject: dovecot" in copy[0]
            assert b"with LMTP" in copy[0]  # Dovecot's own Received header
        # The unknown user is refused at RCPT (550 5.1.1): bounced, and only that one.
        [report] = reports(gateway, ALICE, 1)
        blocks = status_blocks(report)
        assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; nosuchuser@lmtp.test"]
        assert blocks[1]["Status"] == "5.1.1"
        assert blocks[1]["Action"] == "failed"
        assert "Remote-MTA" in blocks[1]
        assert wait_for(lambda: spool_empty(gateway))
        log = gateway.log()
        assert "to=<bob@lmtp.test>" in log and "status=sent (250 2.0.0 <bob@lmtp.test>" in log
        assert "to=<nosuchuser@lmtp.test>" in log and "status=bounced (5.1.1 550" in log
        assert "saved mail to INBOX" in dovecot.log()
