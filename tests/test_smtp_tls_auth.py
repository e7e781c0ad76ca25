"""STARTTLS, implicit TLS, AUTH and relay control, with smtplib, openssl s_client and swaks."""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess

import pytest

from conftest import DOMAIN, PASSWORD, Gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def tls_wire(port: int) -> Wire:
    wire = Wire(port)
    wire.reply()
    wire.cmd("EHLO client.example")
    assert wire.cmd("STARTTLS")[0] == 220
    wire.sock = client_context().wrap_socket(wire.sock)
    return wire


def test_starttls_on_mx_then_auth_offered(gateway: Gateway) -> None:
    with gateway.smtp() as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, _ = client.starttls(context=client_context())
        assert code == 220
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        code, text = client.docmd("STARTTLS")
        assert code == 503 and text.startswith(b"5.5.1")


def test_starttls_discards_pipelined_plaintext(gateway: Gateway) -> None:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        # Command injection attempt: plaintext pipelined after STARTTLS must be ignored.
        wire.send(b"STARTTLS\r\nRSET\r\n")
        assert wire.reply()[0] == 220
        wire.sock = client_context().wrap_socket(wire.sock)
        code, text = wire.cmd("NOOP")
        assert (code, text) == (250, "2.0.0 Ok")


def test_received_header_records_tls_and_auth(gateway: Gateway) -> None:
    before = len(gateway.delivered(BOB))
    with gateway.smtp(port=gateway.submission_port) as client:
        client.starttls(context=client_context())
        client.login(ALICE, PASSWORD)
        client.sendmail(ALICE, [BOB], b"Subject: tls trace\r\n\r\nx\r\n")
    message = next(m for m in gateway.wait_delivered(BOB, before + 1) if b"tls trace" in m)
    assert b"with ESMTPSA id" in message
    assert b"(using TLSv1." in message


@pytest.mark.parametrize("port_name", ["smtp_port", "submission_port"])
def test_openssl_s_client_starttls(gateway: Gateway, port_name: str) -> None:
    port = getattr(gateway, port_name)
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-starttls",
            "smtp",
            "-connect",
            f"127.0.0.1:{port}",
            "-brief",
            "-ign_eof",
        ],
        input=b"EHLO s-client.example\r\nQUIT\r\n",
        capture_output=True,
        timeout=20,
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert "Protocol version: TLSv1.3" in output, output
    assert "AUTH PLAIN LOGIN" in output
    assert "221 2.0.0" in output


def test_openssl_s_client_implicit_tls(gateway: Gateway) -> None:
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{gateway.smtps_port}",
            "-brief",
            "-ign_eof",
        ],
        input=b"EHLO s-client.example\r\nQUIT\r\n",
        capture_output=True,
        timeout=20,
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert "Protocol version: TLSv1.3" in output, output
    assert "220 mx.example.test ESMTP" in output
    assert "AUTH PLAIN LOGIN" in output


def test_tls_below_1_2_is_refused(gateway: Gateway) -> None:
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{gateway.smtps_port}",
            "-tls1_1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-brief",
            "-ign_eof",
        ],
        input=b"QUIT\r\n",
        capture_output=True,
        timeout=20,
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode != 0
    assert "220 mx.example.test" not in output
    # The same client with TLS 1.2 gets through, so the refusal is the server's doing.
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{gateway.smtps_port}",
            "-tls1_2",
            "-brief",
            "-ign_eof",
        ],
        input=b"QUIT\r\n",
        capture_output=True,
        timeout=20,
    )
    assert "220 mx.example.test" in result.stdout.decode()


def test_smtps_implicit_tls_with_auth(gateway: Gateway) -> None:
    before = len(gateway.delivered(BOB))
    with smtplib.SMTP_SSL(
        "127.0.0.1", gateway.smtps_port, context=client_context(), timeout=10
    ) as client:
        client.ehlo("client.example")
        assert "auth" in client.esmtp_features and not client.has_extn("starttls")
        client.login(ALICE, PASSWORD)
        assert client.sendmail(ALICE, [BOB], b"Subject: via smtps\r\n\r\nhi\r\n") == {}
    assert any(b"via smtps" in m for m in gateway.wait_delivered(BOB, before + 1))


def test_auth_plain_and_login_success_and_failure(gateway: Gateway) -> None:
    with tls_wire(gateway.smtp_port) as wire:
        wire.cmd("EHLO client.example")
        code, text = wire.cmd(f"AUTH PLAIN {plain(ALICE, 'wrong password')}")
        assert (code, text[:5]) == (535, "5.7.8")
        code, text = wire.cmd(f"auth plain {plain(ALICE.upper(), PASSWORD)}")
        assert (code, text[:5]) == (235, "2.7.0")
        code, text = wire.cmd("AUTH PLAIN")
        assert (code, text[:5]) == (503, "5.5.1")
    with tls_wire(gateway.smtp_port) as wire:
        wire.cmd("EHLO client.example")
        code, text = wire.cmd("AUTH LOGIN")
        assert code == 334 and base64.b64decode(text) == b"Username:"
        code, text = wire.cmd(base64.b64encode(BOB.encode()))
        assert code == 334 and base64.b64decode(text) == b"Password:"
        code, _ = wire.cmd(base64.b64encode(PASSWORD.encode()))
        assert code == 235
    with tls_wire(gateway.smtp_port) as wire:
        wire.cmd("EHLO client.example")
        assert wire.cmd("AUTH LOGIN")[0] == 334
        code, text = wire.cmd("*")
        assert (code, text[:5]) == (501, "5.7.0")
        assert wire.cmd("AUTH PLAIN")[0] == 334
        code, text = wire.cmd("!!!notbase64")
        assert (code, text[:5]) == (501, "5.5.2")
        code, text = wire.cmd("AUTH CRAM-MD5")
        assert (code, text[:5]) == (504, "5.5.4")


def test_auth_refused_without_tls(gateway: Gateway) -> None:
    with Wire(gateway.submission_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        code, text = wire.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert (code, text[:6]) == (538, "5.7.11")


def test_auth_failures_are_throttled(fresh_gateway: Gateway) -> None:
    fresh_gateway.env.update(
        {"MAILGATE_AUTH_MAX_FAILURES": "3", "MAILGATE_AUTH_FAILURE_DELAY": "0"}
    )
    fresh_gateway.start()
    with tls_wire(fresh_gateway.submission_port) as wire:
        wire.cmd("EHLO client.example")
        for _ in range(3):
            assert wire.cmd(f"AUTH PLAIN {plain(ALICE, 'nope')}")[0] == 535
        code, text = wire.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")
        assert (code, text[:5]) == (454, "4.7.0")
    # The throttle is per client address, across connections.
    with tls_wire(fresh_gateway.submission_port) as wire:
        wire.cmd("EHLO client.example")
        assert wire.cmd(f"AUTH PLAIN {plain(ALICE, PASSWORD)}")[0] == 454
    assert "AUTH throttled for [127.0.0.1]" in fresh_gateway.log()


def test_auth_on_loopback_without_tls_when_configured(fresh_gateway: Gateway) -> None:
    fresh_gateway.env["MAILGATE_AUTH_ON_LOOPBACK_WITHOUT_TLS"] = "true"
    fresh_gateway.start()
    with fresh_gateway.smtp(port=fresh_gateway.submission_port) as client:
        client.ehlo("client.example")
        assert "auth" in client.esmtp_features
        client.login(ALICE, PASSWORD)


def test_submission_requires_auth(gateway: Gateway) -> None:
    with tls_wire(gateway.submission_port) as wire:
        wire.cmd("EHLO client.example")
        code, text = wire.cmd(f"MAIL FROM:<{ALICE}>")
        assert (code, text[:5]) == (530, "5.7.0")
        code, text = wire.cmd(f"RCPT TO:<{BOB}>")
        assert (code, text[:5]) == (530, "5.7.0")


@pytest.mark.parametrize(
    ("port_name", "login", "sender", "recipient", "mail_code", "rcpt_code"),
    [
        # No AUTH on the MX port: local recipients only.
        ("smtp_port", None, "a@remote.example", f"bob@{DOMAIN}", 250, 250),
        ("smtp_port", None, "a@remote.example", "x@elsewhere.example", 250, 554),
        ("smtp_port", None, f"alice@{DOMAIN}", "x@elsewhere.example", 250, 554),
        ("smtp_port", None, "a@remote.example", f"x@sub.{DOMAIN}", 250, 554),
        ("smtp_port", None, "a@remote.example", f"x@{DOMAIN}.evil.example", 250, 554),
        ("smtp_port", None, "a@remote.example", 'x@elsewhere.example"@example.test', 250, 553),
        ("smtp_port", None, "a@remote.example", "x%elsewhere.example@[127.0.0.1]", 250, 554),
        # Authenticated: relay allowed, but only from owned sender addresses.
        ("submission_port", ALICE, ALICE, "x@elsewhere.example", 250, 250),
        ("submission_port", ALICE, f"info@{DOMAIN}", "x@elsewhere.example", 250, 250),
        ("submission_port", ALICE, BOB, "x@elsewhere.example", 553, None),
        ("submission_port", ALICE, "ceo@elsewhere.example", "x@elsewhere.example", 553, None),
        ("submission_port", ALICE, "", "x@elsewhere.example", 553, None),
        ("smtp_port", BOB, BOB, "x@elsewhere.example", 250, 250),
        ("smtp_port", BOB, f"team@{DOMAIN}", "x@elsewhere.example", 250, 250),
    ],
)
def test_relay_matrix(
    gateway: Gateway,
    port_name: str,
    login: str | None,
    sender: str,
    recipient: str,
    mail_code: int,
    rcpt_code: int | None,
) -> None:
    port = getattr(gateway, port_name)
    with tls_wire(port) as wire:
        wire.cmd("EHLO client.example")
        if login:
            assert wire.cmd(f"AUTH PLAIN {plain(login, PASSWORD)}")[0] == 235
        code, text = wire.cmd(f"MAIL FROM:<{sender}>")
        assert code == mail_code, text
        if mail_code == 553:
            assert text.startswith("5.7.1")
            return
        code, text = wire.cmd(f"RCPT TO:<{recipient}>")
        assert code == rcpt_code, text
        if code == 554:
            assert text.startswith("5.7.1")


def test_no_open_relay_from_loopback_or_unix(gateway: Gateway) -> None:
    # Loopback is not trusted implicitly (Postfix's mynetworks must be set explicitly).
    with gateway.smtp() as client:
        client.ehlo("client.example")
        client.mail("a@remote.example")
        code, text = client.rcpt("victim@elsewhere.example")
        assert code == 554 and text.startswith(b"5.7.1")


def test_relay_networks_and_open_relay_opt_in(fresh_gateway: Gateway) -> None:
    fresh_gateway.env["MAILGATE_RELAY_NETWORKS"] = "127.0.0.0/8"
    fresh_gateway.start()
    with fresh_gateway.smtp() as client:
        client.ehlo("client.example")
        client.mail("a@remote.example")
        assert client.rcpt("x@elsewhere.example")[0] == 250


def test_swaks_submission_with_starttls_and_auth(gateway: Gateway) -> None:
    before = len(gateway.delivered(BOB))
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{gateway.submission_port}",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            ALICE,
            "--auth-password",
            PASSWORD,
            "--from",
            ALICE,
            "--to",
            BOB,
            "--header",
            "Subject: swaks test",
        ],
        capture_output=True,
        timeout=30,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "235 2.7.0 Authentication successful" in output
    assert "250 2.0.0 Ok: queued as" in output
    assert any(b"swaks test" in m for m in gateway.wait_delivered(BOB, before + 1))


def test_swaks_mx_delivery_and_tls_on_connect(gateway: Gateway) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{gateway.smtp_port}",
            "--to",
            ALICE,
            "--from",
            "someone@remote.example",
            "--header",
            "Subject: swaks mx",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode()
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{gateway.smtps_port}",
            "--tls-on-connect",
            "--auth",
            "LOGIN",
            "--auth-user",
            BOB,
            "--auth-password",
            PASSWORD,
            "--from",
            BOB,
            "--to",
            ALICE,
            "--header",
            "Subject: swaks smtps",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode()
    messages = gateway.wait_delivered(ALICE, 2, timeout=15)
    assert any(b"swaks mx" in m for m in messages)
    assert any(b"swaks smtps" in m for m in messages)


def test_smtps_requires_auth_like_submission(gateway: Gateway) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", gateway.smtps_port, context=client_context(), timeout=10
    ) as client:
        client.ehlo("client.example")
        code, text = client.mail(ALICE)
        assert (code, text[:5]) == (530, b"5.7.0")
