"""The core and its milter chain end to end: SMTP in, milters over the real protocol, Maildir out.

`mailgate serve` runs the content daemon as a supervised child; each rule action is seen in
the SMTP reply or in the delivered message. Failing milters (absent, silent, garbage,
dying) give the configured default action in time, and nothing that got 250 is lost.
"""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DOMAIN, MAILGATE, Gateway, add_default_users, free_port, make_gateway
from smtpwire import Wire

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
PEERS = Path(__file__).parent / "milter_peers.py"

RULES = """\
daemon: content
rules:
  - name: reject-subject
    if: {header: {name: Subject, contains: "reject me"}}
    then: {reject: {code: 554, enhanced: 5.7.1, text: "Content rejected by policy"}}
  - name: tempfail-subject
    if: {header: {name: Subject, contains: "tempfail me"}}
    then: {tempfail: {code: 451, enhanced: 4.7.1, text: "Try again later"}}
  - name: discard-subject
    if: {header: {name: Subject, contains: "discard me"}}
    then: discard
  - name: quarantine-subject
    if: {header: {name: Subject, contains: "quarantine me"}}
    then: {quarantine: "suspicious subject"}
  - name: copy-bob
    if: {header: {name: Subject, contains: "copy bob"}}
    then: [{add_recipient: "bob@example.test"}, continue]
  - name: redirect-bob
    if: {header: {name: Subject, contains: "redirect"}}
    then: [{redirect: "bob@example.test"}, continue]
  - name: external
    if: {not: {envelope: {part: domain, from: {is: example.test}}}}
    then: [{tag_subject: "[EXTERNAL]"}, continue]
  - name: stamp
    if: true
    then: [{add_header: {name: X-Content-Checked, value: "yes"}}, continue]
"""


def config_file(tmp_path: Path, milters: str, extra: str = "") -> Path:
    path = tmp_path / "mailgate.yaml"
    path.write_text(f"milters:\n{milters}{extra}")
    return path


@pytest.fixture(scope="module")
def content_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("content")
    rules = tmp / "content.yaml"
    rules.write_text(RULES)
    gateway = make_gateway(tmp, rate_limit_connections=10000)
    add_default_users(gateway)
    config = config_file(
        tmp,
        f"  - name: content\n    daemon: content\n    rules: {rules}\n",
    )
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    yield gateway
    gateway.stop()


def send(gateway: Gateway, subject: str, sender: str = "someone@remote.example") -> tuple[int, str]:
    with Wire(gateway.smtp_port) as wire:
        wire.reply()
        wire.cmd("EHLO client.example")
        assert wire.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        wire.send(f"Subject: {subject}\r\nFrom: {sender}\r\n\r\nHello.\r\n.\r\n".encode())
        return wire.reply()


def find(gateway: Gateway, address: str, marker: bytes, timeout: float = 10.0) -> bytes | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in gateway.delivered(address):
            if marker in message:
                return message
        time.sleep(0.05)
    return None


def test_daemon_is_supervised_and_modifies_the_message(content_gateway: Gateway) -> None:
    assert "milter content: started daemon content" in content_gateway.log()
    code, text = send(content_gateway, "plain hello 1")
    assert code == 250, text
    message = find(content_gateway, ALICE, b"plain hello 1")
    assert message is not None
    assert b"X-Content-Checked: yes" in message
    assert b"Subject: [EXTERNAL] plain hello 1" in message
    # Our Received header is added after the milters, above their changes.
    assert message.index(b"Received: from client.example") < message.index(b"Subject:")


def test_local_sender_is_not_tagged(content_gateway: Gateway) -> None:
    assert send(content_gateway, "inside note 2", sender=BOB)[0] == 250
    message = find(content_gateway, ALICE, b"inside note 2")
    assert message is not None and b"Subject: inside note 2" in message


def test_reject_and_tempfail_use_the_rule_reply(content_gateway: Gateway) -> None:
    assert send(content_gateway, "please reject me") == (554, "5.7.1 Content rejected by policy")
    assert send(content_gateway, "please tempfail me") == (451, "4.7.1 Try again later")
    assert find(content_gateway, ALICE, b"reject me", timeout=0.5) is None
    assert "milter-reject: END-OF-MESSAGE" in content_gateway.log()


def test_discard_answers_250_and_delivers_nothing(content_gateway: Gateway) -> None:
    code, text = send(content_gateway, "discard me 3")
    assert code == 250 and "queued as" in text
    assert find(content_gateway, ALICE, b"discard me 3", timeout=1.0) is None


def test_add_recipient_and_redirect(content_gateway: Gateway) -> None:
    assert send(content_gateway, "copy bob 4")[0] == 250
    assert find(content_gateway, ALICE, b"copy bob 4") is not None
    assert find(content_gateway, BOB, b"copy bob 4") is not None
    assert send(content_gateway, "redirect 5")[0] == 250
    assert find(content_gateway, BOB, b"redirect 5") is not None
    assert find(content_gateway, ALICE, b"redirect 5", timeout=0.5) is None


def test_quarantine_holds_until_released(content_gateway: Gateway) -> None:
    code, text = send(content_gateway, "quarantine me 6")
    assert code == 250
    queue_id = text.rsplit(" ", 1)[1]
    env = content_gateway.env
    listing = subprocess.run(
        [MAILGATE, "queue", "quarantine", "list"], env=env, capture_output=True, text=True
    )
    assert queue_id in listing.stdout and "suspicious subject" in listing.stdout
    assert find(content_gateway, ALICE, b"quarantine me 6", timeout=1.0) is None
    released = subprocess.run(
        [MAILGATE, "queue", "quarantine", "release", queue_id],
        env=env,
        capture_output=True,
        text=True,
    )
    assert released.returncode == 0, released.stderr
    assert find(content_gateway, ALICE, b"quarantine me 6") is not None


def test_sighup_reloads_the_daemon_rules(content_gateway: Gateway, tmp_path: Path) -> None:
    assert content_gateway.process is not None
    content_gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload" not in content_gateway.log().lower() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload" in content_gateway.log().lower()
    assert send(content_gateway, "after reload 7")[0] == 250


# -- failures -------------------------------------------------------------------------------


class Peer:
    """A misbehaving milter from milter_peers.py in its own process."""

    def __init__(self, kind: str, spec: str, log: Path, name: str | None = None) -> None:
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(PEERS), kind, spec, name or kind],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(0.8)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


def failing_gateway(
    tmp_path: Path,
    socket: str,
    default_action: str,
    *,
    name: str = "broken",
    timeouts: tuple[int, int, int] = (1, 1, 2),
    **settings: object,
) -> Gateway:
    """A started gateway whose chain is one milter at ``socket``; ``timeouts`` are its
    connect, command and content timeouts, ``settings`` the gateway's own."""
    gateway = make_gateway(tmp_path, **settings)
    add_default_users(gateway)
    connect, command, content = timeouts
    config = config_file(
        tmp_path,
        f"  - name: {name}\n    socket: {socket}\n    default_action: {default_action}\n"
        f"    connect_timeout: {connect}\n    command_timeout: {command}\n"
        f"    content_timeout: {content}\n",
    )
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    return gateway


@pytest.mark.parametrize("kind", ["absent", "raw-silent", "raw-garbage", "raw-stall"])
def test_failing_milter_tempfails_by_default(tmp_path: Path, kind: str) -> None:
    port = free_port()
    socket = f"inet:{port}@127.0.0.1"
    peer = None if kind == "absent" else Peer(kind, socket, tmp_path / "peer.log")
    gateway = failing_gateway(tmp_path, socket, "tempfail")
    try:
        started = time.monotonic()
        with Wire(gateway.smtp_port) as wire:
            assert wire.reply()[0] == 220
            wire.cmd("EHLO client.example")
            code, text = wire.cmd("MAIL FROM:<a@remote.example>")
            assert (code, text) == (451, "4.7.1 Service unavailable - try again later")
        assert time.monotonic() - started < 8
        assert gateway.wait_delivered(ALICE, 1, timeout=0.3) == []
    finally:
        gateway.stop()
        if peer is not None:
            peer.kill()


def test_failing_milter_with_default_accept_lets_mail_through(tmp_path: Path) -> None:
    socket = f"inet:{free_port()}@127.0.0.1"
    gateway = failing_gateway(tmp_path, socket, "accept")
    try:
        with gateway.smtp() as client:
            assert (
                client.sendmail("a@remote.example", [ALICE], b"Subject: through\r\n\r\nx\r\n") == {}
            )
        assert any(b"through" in m for m in gateway.wait_delivered(ALICE, 1))
    finally:
        gateway.stop()


def test_end_of_data_processing_past_data_term_timeout_gets_451(tmp_path: Path) -> None:
    # The milter never answers the end of the message; data_term_timeout (1 s) runs out
    # long before its content_timeout (4 s), and then its default action refuses to store.
    socket = f"inet:{free_port()}@127.0.0.1"
    peer = Peer("raw-eomstall", socket, tmp_path / "peer.log")
    gateway = failing_gateway(
        tmp_path, socket, "tempfail", name="slow", timeouts=(2, 2, 4), data_term_timeout=1
    )
    try:
        with Wire(gateway.smtp_port) as wire:
            assert wire.reply()[0] == 220
            wire.cmd("EHLO client.example")
            assert wire.cmd("MAIL FROM:<a@remote.example>")[0] == 250
            assert wire.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
            assert wire.cmd("DATA")[0] == 354
            # 4.4.2 is data_term_timeout's reply; the milter's own timeout would give its
            # default action's 451 4.7.1.
            code, text = wire.cmd("Subject: slow\r\n\r\nbody\r\n.")
            assert (code, text) == (451, "4.4.2 Message processing timed out, try again later")
            # The session goes on: the next transaction is answered normally.
            assert wire.cmd("RSET")[0] == 250
        assert gateway.wait_delivered(ALICE, 1, timeout=5) == []
    finally:
        gateway.stop()
        peer.kill()


def test_milter_dying_mid_message_loses_nothing_acknowledged(tmp_path: Path) -> None:
    socket = f"unix:{tmp_path / 'dying.sock'}"
    # This peer kills itself when a body contains DIE-IN-BODY (its name starts "dying").
    peer = Peer("full", socket, tmp_path / "peer.log", name="dying-milter")
    gateway = failing_gateway(tmp_path, socket, "tempfail")
    try:
        with gateway.smtp() as client:
            assert (
                client.sendmail("a@remote.example", [ALICE], b"Subject: first\r\n\r\nok\r\n") == {}
            )
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail(
                    "a@remote.example", [ALICE], b"Subject: second\r\n\r\nDIE-IN-BODY\r\n"
                )
            assert info.value.smtp_code == 451
        assert any(b"Subject: first" in m for m in gateway.wait_delivered(ALICE, 1))
        assert not any(b"DIE-IN-BODY" in m for m in gateway.delivered(ALICE))
    finally:
        gateway.stop()
        peer.kill()


def test_supervisor_restarts_a_dead_daemon(content_gateway: Gateway) -> None:
    import os
    import re

    pids = re.findall(r"started daemon content \(pid (\d+)\)", content_gateway.log())
    assert pids
    os.kill(int(pids[-1]), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        restarted = re.findall(r"started daemon content \(pid (\d+)\)", content_gateway.log())
        if len(restarted) > len(pids):
            break
        time.sleep(0.1)
    assert len(restarted) == len(pids) + 1
    assert "daemon exited with status -9; restarting in 1s" in content_gateway.log()
    # Until it listens again the default action (tempfail) applies; then mail flows.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with Wire(content_gateway.smtp_port) as wire:
            wire.reply()
            wire.cmd("EHLO client.example")
            code, text = wire.cmd("MAIL FROM:<a@remote.example>")
        if code == 250:
            break
        assert (code, text) == (451, "4.7.1 Service unavailable - try again later")
        time.sleep(0.2)
    assert send(content_gateway, "after restart 8")[0] == 250
    assert find(content_gateway, ALICE, b"after restart 8") is not None


def test_daemons_die_with_a_killed_serve(tmp_path: Path) -> None:
    import os
    import re

    gateway = make_gateway(tmp_path)
    add_default_users(gateway)
    config = config_file(tmp_path, "  - name: content\n    daemon: content\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    try:
        pid = int(re.findall(r"started daemon content \(pid (\d+)\)", gateway.log())[-1])
        os.kill(pid, 0)
        gateway.kill9()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), "the daemon outlived its supervisor"
        # A new serve takes the same socket over at once.
        gateway.start()
        assert send(gateway, "after a crash 9")[0] == 250
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()
