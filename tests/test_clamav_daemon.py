"""The clamav daemon against a real clamd: each outcome, each failure of clamd, each MTA.

One clamd per module (tests/peers.py, a two-signature EICAR database) listens on TCP and on
a Unix socket. The daemons run as real processes (`mailgate milter clamav`) and are driven
over the milter protocol by tests/daemon_milter_client.py, by real Postfix through
smtpd_milters, and by mailgate's core (`mailgate serve` with a `milters:` chain). clamd's
failures (down, stalled, garbage) come from small fake servers on loopback sockets.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.milters.clamd import ClamdError, ClamdTimeout, instream, parse_reply
from mailgate.policies.clamav import Settings, parse_clamd_address

import peers
from conftest import DOMAIN, MAILGATE, Gateway, add_default_users, make_gateway
from daemon_milter_client import run_message
from daemon_process import REPO, Daemon

SHIPPED = REPO / "rules" / "clamav.yaml"
CLEAN = peers.message(subject="clean one")
EICAR = peers.eicar_message(subject="infected one")
EICAR_NAME = "Test.EICAR.NDB.UNOFFICIAL"


def rules_file(
    path: Path,
    clamd: str,
    *,
    timeout: float = 5,
    max_size: str = "25M",
    enable: tuple[str, ...] = (),
    disable: tuple[str, ...] = (),
    trusted: str | None = None,
) -> Path:
    """The shipped rules with other settings, some rules switched on or off."""
    text = SHIPPED.read_text()
    text = text.replace("clamd: unix:/var/run/clamav/clamd.ctl", f"clamd: {clamd}")
    text = text.replace("timeout: 60 ", f"timeout: {timeout} ")
    text = text.replace("max_size: 25M ", f"max_size: {max_size} ")
    for name in enable + disable:
        marker = f"  - name: {name}\n"
        head, sep, tail = text.partition(marker)
        assert sep, name
        if name in enable:
            tail = tail.replace("    enabled: false\n", "", 1)
        else:
            tail = "    enabled: false\n" + tail
        text = head + sep + tail
    if trusted:
        text = text.replace('{client_ip: [127.0.0.0/8, "::1"]}', f"{{client_ip: [{trusted}]}}")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Clamd]:
    with peers.clamd_server(tmp_path_factory.mktemp("clamd"), local_socket=True) as server:
        yield server


@contextlib.contextmanager
def daemon(tmp: Path, rules: Path, socket_name: str = "clamav.sock") -> Iterator[Daemon]:
    process = Daemon("clamav", f"unix:{tmp / socket_name}", tmp / f"{socket_name}.log", rules=rules)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def tcp_daemon(clamd: peers.Clamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The shipped rules, clamd over TCP, max_size 100K."""
    tmp = tmp_path_factory.mktemp("tcp")
    rules = rules_file(tmp / "clamav.yaml", f"tcp:127.0.0.1:{clamd.port}", max_size="100K")
    with daemon(tmp, rules) as process:
        yield process


@pytest.fixture(scope="module")
def unix_daemon(clamd: peers.Clamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """clamd over its Unix socket, and infected mail quarantined instead of refused."""
    tmp = tmp_path_factory.mktemp("unix")
    rules = rules_file(
        tmp / "clamav.yaml",
        f"unix:{clamd.socket_path}",
        enable=("infected-quarantine",),
        disable=("infected",),
    )
    with daemon(tmp, rules) as process:
        yield process


class FakeClamd:
    """A loopback TCP server that misbehaves: "stall" (accepts, never answers) or "garbage"."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(conn)
            if self.mode == "garbage":
                with contextlib.suppress(OSError):
                    conn.settimeout(2)
                    conn.recv(65536)
                    conn.sendall(b"220 hello, I am not clamd\r\n")
                    conn.close()

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.close()


@contextlib.contextmanager
def fake_clamd(mode: str) -> Iterator[FakeClamd]:
    server = FakeClamd(mode)
    try:
        yield server
    finally:
        server.close()


def closed_port() -> int:
    return peers.free_port()  # bound once, then released: nothing listens there


# -- the rule file and the settings ----------------------------------------------------------


def test_shipped_rules_check_and_pass_their_tests() -> None:
    for command in ("check", "test"):
        done = subprocess.run(
            [MAILGATE, "rules", command, str(SHIPPED)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed, 0 failed" in done.stdout


def test_settings_defaults_and_address_syntax() -> None:
    settings = Settings()
    assert settings.clamd == "unix:/var/run/clamav/clamd.ctl"
    assert settings.address.path == "/var/run/clamav/clamd.ctl"
    assert settings.max_size == 25 * 1024 * 1024
    assert Settings(max_size="1.5M").max_size == 1572864  # type: ignore[arg-type]
    tcp = parse_clamd_address("tcp:127.0.0.1:3310")
    assert (tcp.host, tcp.port, str(tcp)) == ("127.0.0.1", 3310, "tcp:127.0.0.1:3310")
    v6 = parse_clamd_address("tcp:[::1]:3310")
    assert (v6.host, v6.port, str(v6)) == ("::1", 3310, "tcp:[::1]:3310")
    for bad in ("inet:3310@127.0.0.1", "tcp:3310", "tcp:host:0", "unix:relative", "tcp:::1:3"):
        with pytest.raises(ValueError):
            parse_clamd_address(bad)


def test_bad_settings_are_reported_with_their_line(tmp_path: Path) -> None:
    rules = rules_file(tmp_path / "clamav.yaml", "inet:3310@127.0.0.1")
    done = subprocess.run([MAILGATE, "rules", "check", str(rules)], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{rules}:18: settings.clamd:" in done.stdout + done.stderr


def test_clamd_replies_are_parsed_strictly() -> None:
    assert parse_reply("stream: OK").virus is None
    assert parse_reply("stream: Win.Test.EICAR_HDB-1 FOUND").virus == "Win.Test.EICAR_HDB-1"
    for bad in ("", "PONG", "stream: FOUND", "stream: maybe", "220 hello"):
        with pytest.raises(ClamdError):
            parse_reply(bad)
    with pytest.raises(ClamdError, match="size limit exceeded"):
        parse_reply("INSTREAM size limit exceeded. ERROR")


# -- the clamd client on its own ---------------------------------------------------------------


@pytest.mark.slow
def test_client_scans_over_tcp_and_unix(clamd: peers.Clamd) -> None:
    for spec in (f"tcp:127.0.0.1:{clamd.port}", f"unix:{clamd.socket_path}"):
        address = parse_clamd_address(spec)
        assert instream(address, EICAR, timeout=10).virus == EICAR_NAME
        assert instream(address, CLEAN, timeout=10).virus is None


def test_client_gives_up_on_a_stalled_clamd_while_sending() -> None:
    # 8 MB fill every socket buffer: sendall() itself must give up, not only recv().
    with fake_clamd("stall") as server:
        address = parse_clamd_address(f"tcp:127.0.0.1:{server.port}")
        with pytest.raises(ClamdTimeout, match=r"within 0\.5s"):
            instream(address, b"x" * (8 * 1024 * 1024), timeout=0.5)


def test_client_reports_a_missing_unix_socket(tmp_path: Path) -> None:
    address = parse_clamd_address(f"unix:{tmp_path / 'no-clamd.ctl'}")
    with pytest.raises(ClamdError, match=r"cannot connect to clamd at unix:.*No such file"):
        instream(address, CLEAN, timeout=2)


@pytest.mark.slow
def test_clamd_stream_limit_is_an_error(tmp_path: Path) -> None:
    with peers.clamd_server(tmp_path, extra_config="StreamMaxLength 1M\n") as small:
        address = parse_clamd_address(f"tcp:127.0.0.1:{small.port}")
        with pytest.raises(ClamdError, match="size limit exceeded"):
            instream(address, b"x" * (3 * 1024 * 1024), timeout=10)


# -- the daemon and clamd ----------------------------------------------------------------------


@pytest.mark.slow
def test_clean_message_is_accepted_with_the_headers(tcp_daemon: Daemon) -> None:
    result = run_message(tcp_daemon.address, message=CLEAN, queue_id="4CLEAN")
    assert result.action == "accept"
    assert result.headers_changed() == [
        (1, "X-Virus-Scanned", "ClamAV using mailgate"),
        (1, "X-Virus-Status", "Clean"),
    ]
    assert "4CLEAN: clamav clean; clamd=tcp:127.0.0.1:" in tcp_daemon.log()


@pytest.mark.slow
def test_eicar_is_rejected_with_the_signature_name(tcp_daemon: Daemon) -> None:
    result = run_message(tcp_daemon.address, message=EICAR, queue_id="4VIRUS")
    assert result.action == "reject"
    assert result.reply.text == f"554 5.7.1 Virus found: {EICAR_NAME}"
    assert f"4VIRUS: clamav infected ({EICAR_NAME})" in tcp_daemon.log()


@pytest.mark.slow
def test_a_forged_status_header_is_replaced(tcp_daemon: Daemon) -> None:
    forged = peers.message(headers={"X-Virus-Status": "Clean (trust me)"})
    result = run_message(tcp_daemon.address, message=forged)
    assert (1, "X-Virus-Status", "Clean") in result.headers_changed()


@pytest.mark.slow
def test_oversized_message_is_skipped_and_marked(tcp_daemon: Daemon) -> None:
    # EICAR inside, but over max_size (100K): not scanned, as clamav-milter's MaxFileSize.
    padding = b"See the attachment.\r\n" + (b"p" * 76 + b"\r\n") * 2000
    big = EICAR.replace(b"See the attachment.\r\n", padding, 1)
    result = run_message(tcp_daemon.address, message=big, queue_id="4BIG")
    assert result.action == "accept"
    assert result.headers_changed() == [(1, "X-Virus-Status", "Not scanned (message too big)")]
    assert "4BIG: clamav skipped (message size" in tcp_daemon.log()


@pytest.mark.slow
def test_quarantine_configuration_over_the_unix_socket(
    clamd: peers.Clamd, unix_daemon: Daemon
) -> None:
    result = run_message(unix_daemon.address, message=EICAR, queue_id="4QUAR")
    assert result.reply.action == "accept"
    assert result.quarantine_reason() == f"virus {EICAR_NAME}"
    assert result.headers_changed() == [(1, "X-Virus-Status", f"Infected ({EICAR_NAME})")]
    assert f"4QUAR: clamav infected ({EICAR_NAME}); clamd=unix:{clamd.socket_path}" in (
        unix_daemon.log()
    )
    clean = run_message(unix_daemon.address, message=CLEAN)
    assert clean.action == "accept" and clean.quarantine_reason() is None
    assert (1, "X-Virus-Status", "Clean") in clean.headers_changed()


# -- clamd's failures ----------------------------------------------------------------------


def test_clamd_down_tempfails_and_trusted_networks_are_not_scanned(tmp_path: Path) -> None:
    rules = rules_file(
        tmp_path / "clamav.yaml",
        f"tcp:127.0.0.1:{closed_port()}",
        timeout=2,
        enable=("trusted-networks",),
        trusted="198.51.100.0/24",
    )
    with daemon(tmp_path, rules) as process:
        refused = run_message(process.address, message=CLEAN, queue_id="4DOWN")
        assert refused.action == "tempfail"
        assert refused.reply.text == "451 4.3.0 Virus scan failed, try again later"
        assert "4DOWN: clamav error (cannot connect to clamd at tcp:127.0.0.1:" in process.log()
        # clamd is down, so this message passes only because it is never scanned.
        trusted = run_message(
            process.address, message=EICAR, client=("lan", "198.51.100.7"), queue_id="4LAN"
        )
        assert trusted.action == "accept" and trusted.modifications == []
        assert "4LAN: clamav" not in process.log()
        assert "4LAN: accept; " in process.log()


@pytest.mark.parametrize("mode", ["stall", "garbage"])
def test_stalled_or_garbage_clamd_gives_the_error_action(tmp_path: Path, mode: str) -> None:
    with fake_clamd(mode) as server:
        rules = rules_file(tmp_path / "clamav.yaml", f"tcp:127.0.0.1:{server.port}", timeout=1)
        with daemon(tmp_path, rules) as process:
            # The milter client gives up after 10 s: an answer at all means no hang.
            result = run_message(process.address, message=EICAR, queue_id="4BAD")
            assert result.action == "tempfail"
            assert result.reply.text == "451 4.3.0 Virus scan failed, try again later"
            expected = {
                "stall": "no answer from clamd within 1s (waiting for the answer)",
                "garbage": "unexpected answer from clamd: '220 hello, I am not clamd'",
            }[mode]
            assert f"4BAD: clamav error ({expected})" in process.log()


@pytest.mark.slow
def test_reload_points_the_daemon_at_another_clamd(clamd: peers.Clamd, tmp_path: Path) -> None:
    rules = rules_file(tmp_path / "clamav.yaml", f"tcp:127.0.0.1:{closed_port()}", timeout=2)
    with daemon(tmp_path, rules) as process:
        assert run_message(process.address, message=CLEAN).action == "tempfail"
        rules_file(rules, f"unix:{clamd.socket_path}")
        assert "reloaded rules" in process.reload()
        result = run_message(process.address, message=EICAR)
        assert result.reply.text == f"554 5.7.1 Virus found: {EICAR_NAME}"


def test_body_limit_below_max_size_is_an_error_not_clean(tmp_path: Path) -> None:
    rules = rules_file(tmp_path / "clamav.yaml", f"tcp:127.0.0.1:{closed_port()}")
    process = Daemon(
        "clamav",
        f"unix:{tmp_path / 'c.sock'}",
        tmp_path / "daemon.log",
        rules=rules,
        extra_args=["--body-limit", "1K"],
    )
    process.start()
    try:
        result = run_message(process.address, message=peers.message(body="x" * 5000 + "\r\n"))
        assert result.action == "tempfail"
        assert "were kept (--body-limit is below max_size)" in process.log()
    finally:
        assert process.stop() == 0


# -- with real MTAs ------------------------------------------------------------------------


@pytest.mark.slow
def test_postfix_as_the_mta(clamd: peers.Clamd, tmp_path: Path) -> None:
    rules = rules_file(tmp_path / "clamav.yaml", f"tcp:127.0.0.1:{clamd.port}")
    port = peers.free_port()
    process = Daemon("clamav", f"inet:{port}@127.0.0.1", tmp_path / "daemon.log", rules=rules)
    process.start()
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            with mta.smtp() as client:
                client.sendmail("a@remote.example", ["r@test.example"], CLEAN)
                with pytest.raises(smtplib.SMTPDataError) as rejected:
                    client.sendmail("a@remote.example", ["r@test.example"], EICAR)
            assert rejected.value.smtp_code == 554
            assert f"5.7.1 Virus found: {EICAR_NAME}".encode() in rejected.value.smtp_error
            delivered = mta.wait_delivered(1)
            assert len(delivered) == 1 and b"Subject: clean one" in delivered[0]
            assert peers.header_values(delivered[0], "X-Virus-Status") == ["Clean"]
            assert peers.header_values(delivered[0], "X-Virus-Scanned") == ["ClamAV using mailgate"]
    finally:
        assert process.stop() == 0


def _smtp_send(gateway: Gateway, message: bytes) -> tuple[int, bytes]:
    with gateway.smtp() as client:
        client.ehlo("client.example")
        client.mail("someone@remote.example")
        code, text = client.rcpt(f"alice@{DOMAIN}")
        assert code == 250, text
        return client.data(message)


@pytest.mark.slow
def test_core_chain_quarantines_into_the_hold_queue(clamd: peers.Clamd, tmp_path: Path) -> None:
    rules = rules_file(
        tmp_path / "clamav.yaml",
        f"unix:{clamd.socket_path}",
        enable=("infected-quarantine",),
        disable=("infected",),
    )
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n  - name: clamav\n    daemon: clamav\n    rules: {rules}\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    try:
        code, text = _smtp_send(gateway, CLEAN)
        assert code == 250, text
        code, text = _smtp_send(gateway, EICAR)
        assert code == 250, text
        queue_id = text.decode().rsplit(" ", 1)[1]
        delivered = gateway.wait_delivered(f"alice@{DOMAIN}", 1)
        assert len(delivered) == 1 and b"Subject: clean one" in delivered[0]
        assert peers.header_values(delivered[0], "X-Virus-Status") == ["Clean"]
        listing = subprocess.run(
            [MAILGATE, "queue", "quarantine", "list"],
            env=gateway.env,
            capture_output=True,
            text=True,
        )
        assert queue_id in listing.stdout, listing.stdout + listing.stderr
        assert f"virus {EICAR_NAME}" in listing.stdout
        released = subprocess.run(
            [MAILGATE, "queue", "quarantine", "release", queue_id],
            env=gateway.env,
            capture_output=True,
            text=True,
        )
        assert released.returncode == 0, released.stderr
        delivered = gateway.wait_delivered(f"alice@{DOMAIN}", 2)
        infected = [m for m in delivered if b"Subject: infected one" in m]
        assert len(infected) == 1
        assert peers.header_values(infected[0], "X-Virus-Status") == [f"Infected ({EICAR_NAME})"]
    finally:
        gateway.stop()
