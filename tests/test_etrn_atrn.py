"""ETRN (RFC 1985) and ATRN (RFC 2645): starting and turning the queue for a domain.

ETRN: mail for a domain whose route points at a test SMTP server that is down waits in
the queue; the server comes up, a client says ETRN, and the mail goes at once (the retry
time is an hour away). ATRN: mail for a customer's domain is held (a ``hold`` route);
the customer authenticates on submission, says ATRN, and then plays the SMTP *server* on
the same TCP connection (written here with a raw socket) and receives its mail.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import fake_smtp
import pytest
from fake_smtp import FakeSmtp
from relay_helpers import ALICE, message, send, spool_empty, wait_for

from mailgate.core.smtp.turn import parse_atrn, parse_etrn

from conftest import PASSWORD, Gateway, add_default_users, free_port, make_gateway
from smtpwire import Wire


@pytest.fixture
def stop_after() -> Iterator[list[Gateway]]:
    gateways: list[Gateway] = []
    yield gateways
    for gateway in gateways:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def start_gateway(tmp_path: Path, stop_after: list[Gateway], **settings: object) -> Gateway:
    values: dict[str, object] = {
        "relay_networks": "127.0.0.1/32",
        "relay_retry_base": 3600,  # nothing is retried by itself during a test
        "relay_retry_max": 3600,
        "rate_limit_connections": 10000,
        "auth_failure_delay": 0,
        "auth_on_loopback_without_tls": "true",
    }
    values.update(settings)
    tmp_path.mkdir(parents=True, exist_ok=True)
    gateway = make_gateway(tmp_path, **values)
    add_default_users(gateway)
    gateway.start()
    stop_after.append(gateway)
    return gateway


class SmtpServerOnPort:
    """tests/fake_smtp.py's server, on a port chosen beforehand (it is "down" until started)."""

    def __init__(self, port: int) -> None:
        self.fake = FakeSmtp(port=port)
        self.port = port
        self.server: fake_smtp._Server | None = None

    def __enter__(self) -> FakeSmtp:
        import threading

        self.server = fake_smtp._Server(("127.0.0.1", self.port), fake_smtp._Handler)
        self.server.fake = self.fake
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.fake

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


# -- parsing -------------------------------------------------------------------------------


def test_etrn_and_atrn_arguments() -> None:
    assert parse_etrn("example.org") is not None
    request = parse_etrn("@Example.ORG")
    assert request is not None and (request.kind, request.name) == ("subdomains", "example.org")
    request = parse_etrn("#relay.test")
    assert request is not None and (request.kind, request.node) == ("queue", "#relay.test")
    for bad in (None, "", "a b", "@", "#", "exa_mple..org"):
        assert parse_etrn(bad) is None, bad
    assert parse_atrn(None) == []
    assert parse_atrn("a.test, B.test") == ["a.test", "b.test"]
    assert parse_atrn("a.test,,b") is None


# -- ETRN ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_etrn_delivers_queued_mail_once_the_next_hop_is_up(
    tmp_path: Path, stop_after: list[Gateway]
) -> None:
    port = free_port()
    gateway = start_gateway(
        tmp_path,
        stop_after,
        relay_routes=f"remote.test=127.0.0.1:{port},held.test=hold",
        etrn_domains="remote.test,held.test",
    )
    send(gateway.smtp_port, ALICE, ["bob@remote.test"], message("etrn"))
    assert wait_for(lambda: "status=deferred (4.4.1" in gateway.log())
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        code, text = wire.cmd("EHLO client.test")
        assert "ETRN" in text.split("\n")
        assert wire.cmd("ETRN")[0] == 501
        assert wire.cmd("ETRN a.test b.test")[0] == 501
        code, text = wire.cmd("ETRN other.test")
        assert (code, text) == (459, "5.7.1 Node other.test not allowed: domain not served")
        code, text = wire.cmd("ETRN held.test")
        assert code == 459 and "waits for ATRN" in text
        with SmtpServerOnPort(port) as fake:
            code, text = wire.cmd("ETRN remote.test")
            assert code == 253, text
            assert text == "2.0.0 OK, 1 pending messages for node remote.test started"
            [delivered] = fake.wait_messages(1)
            assert b"Subject: etrn" in delivered.data
            assert wait_for(lambda: spool_empty(gateway))
            code, text = wire.cmd("ETRN @remote.test")
            assert code == 251 and "no messages waiting for node @remote.test" in text
            code, text = wire.cmd("ETRN #remote.test")
            assert code == 251
            code, text = wire.cmd("ETRN #nosuch.test")
            assert code == 459


@pytest.mark.slow
def test_etrn_named_queue_and_subdomains(tmp_path: Path, stop_after: list[Gateway]) -> None:
    port = free_port()
    gateway = start_gateway(tmp_path, stop_after, relay_routes=f"remote.test=127.0.0.1:{port}")
    send(gateway.smtp_port, ALICE, ["bob@mx.remote.test"], message("sub"))
    send(gateway.smtp_port, ALICE, ["bob@remote.test"], message("queue"))
    assert wait_for(lambda: gateway.log().count("status=deferred (4.4.1") == 2)
    with SmtpServerOnPort(port) as fake, Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.test")
        code, text = wire.cmd("ETRN @remote.test")
        assert code == 253 and "OK, 2 pending messages for node @remote.test" in text
        assert len(fake.wait_messages(2)) == 2
        assert wait_for(lambda: spool_empty(gateway))


def test_etrn_refusals(gateway: Gateway, tmp_path: Path, stop_after: list[Gateway]) -> None:
    # The shared gateway trusts no network: an anonymous client may not start queues.
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        assert wire.cmd("ETRN example.org")[0] == 503  # EHLO first
        wire.cmd("EHLO client.test")
        code, text = wire.cmd("ETRN example.org")
        assert (code, text) == (459, "5.7.1 Node example.org not allowed: client not authorized")
    idle = start_gateway(tmp_path, stop_after, outbound_delivery="false")
    with Wire(idle.smtp_port) as wire:
        wire.reply()
        code, text = wire.cmd("EHLO client.test")
        assert "ETRN" not in text.split("\n")
        code, text = wire.cmd("ETRN example.org")
        assert code == 458 and "Unable to queue messages for node example.org" in text


# -- ATRN ------------------------------------------------------------------------------------


class Customer:
    """The ATRN client: an SMTP client until the 250, then an SMTP server on the same socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.buffer = b""

    def line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode()

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.line()
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def say(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def serve(self, rcpt_reply: dict[str, str] | None = None) -> list[tuple[str, list[str], bytes]]:
        """Play the SMTP server until QUIT; the transactions received."""
        received: list[tuple[str, list[str], bytes]] = []
        self.say("220 customer.test ESMTP ready")
        mail, rcpts = "", []
        while True:
            command = self.line()
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self.say("250-customer.test\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
            elif verb == "MAIL":
                mail, rcpts = command, []
                self.say("250 2.1.0 Ok")
            elif verb == "RCPT":
                address = command.split("<", 1)[1].split(">", 1)[0]
                reply = (rcpt_reply or {}).get(address, "250 2.1.5 Ok")
                if reply.startswith("2"):
                    rcpts.append(address)
                self.say(reply)
            elif verb == "DATA":
                self.say("354 go ahead")
                data = b""
                while True:
                    chunk = self.line()
                    if chunk == ".":
                        break
                    data += chunk.encode() + b"\r\n"
                received.append((mail, rcpts, data))
                self.say("250 2.0.0 Ok: delivered")
            elif verb == "RSET":
                self.say("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.say("221 2.0.0 Bye")
                return received
            else:
                self.say("502 5.5.1 not implemented")

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def login(customer: Customer) -> None:
    token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    assert customer.cmd(f"AUTH PLAIN {token}")[0] == 235


@pytest.mark.slow
def test_atrn_turns_the_connection_and_delivers_the_held_mail(
    tmp_path: Path, stop_after: list[Gateway]
) -> None:
    routes = [
        {"domain": "customer.test", "transport": "hold", "atrn_users": [ALICE]},
        {"domain": "other.test", "transport": "hold"},
    ]
    gateway = start_gateway(tmp_path, stop_after, relay_routes=json.dumps(routes))
    send(gateway.smtp_port, ALICE, ["joe@customer.test", "ann@customer.test"], message("odmr"))
    assert wait_for(lambda: gateway.log().count("status=held (waiting for ATRN)") == 2)

    # Not on the MX port; not without AUTH; not for someone else's domain.
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        code, text = wire.cmd("EHLO customer.test")
        assert "ATRN" not in text.split("\n")
        assert wire.cmd("ATRN")[0] == 502
    customer = Customer(gateway.submission_port)
    try:
        assert customer.reply()[0] == 220
        code, text = customer.cmd("EHLO customer.test")
        assert "ATRN" in text.split("\n")
        assert customer.cmd("ATRN")[0] == 530
        login(customer)
        code, text = customer.cmd("ATRN other.test")
        assert code == 450 and text.startswith("4.7.1 ATRN request refused: other.test"), text
        assert customer.cmd("ATRN customer.test,")[0] == 501
        # Ann's mailbox is busy this time: she stays held, Joe gets the message.
        code, text = customer.cmd("ATRN customer.test")
        assert (code, text) == (250, "2.0.0 OK now reversing the connection")
        received = customer.serve({"ann@customer.test": "450 4.2.1 mailbox busy"})
        assert customer.closed()
    finally:
        customer.close()
    [(mail, rcpts, data)] = received
    assert mail.startswith(f"MAIL FROM:<{ALICE}>")
    assert rcpts == ["joe@customer.test"]
    assert b"Subject: odmr" in data
    assert "status=deferred (4.2.1 450 4.2.1 mailbox busy)" in gateway.log()

    # The next ATRN (no domain named: every domain of the user) brings Ann's copy.
    customer = Customer(gateway.submission_port)
    try:
        customer.reply()
        customer.cmd("EHLO customer.test")
        login(customer)
        assert customer.cmd("ATRN")[0] == 250
        [(_, rcpts, data)] = customer.serve()
        assert rcpts == ["ann@customer.test"] and b"Subject: odmr" in data
    finally:
        customer.close()
    assert wait_for(lambda: spool_empty(gateway))

    # Nothing left: 453.
    customer = Customer(gateway.submission_port)
    try:
        customer.reply()
        customer.cmd("EHLO customer.test")
        login(customer)
        assert customer.cmd("ATRN") == (453, "4.2.0 You have no mail")
        assert customer.cmd("QUIT")[0] == 221
    finally:
        customer.close()
