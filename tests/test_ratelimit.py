"""Rate limits: the arithmetic, and the daemon as a real process over the milter protocol
(SQLite and a Redis shared by two daemons), behind real Postfix and in our core's chain.
Windows are settings of a second or a minute here; nothing asserts how long anything took.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailgate.policies.ratelimit import (
    Limit,
    Limits,
    Settings,
    checks,
    describe,
    exceeded,
    retry_after,
    sender_domain,
)
from mailgate.policies.rules import load_rules

from daemon_milter_client import MilterSession, run_message
from daemon_process import REPO, Daemon

# -- the arithmetic ----------------------------------------------------------------------------


def test_which_limits_apply_to_each_counter() -> None:
    settings = Settings()
    names = [c.name for c in checks("connections", settings, client_ip="192.0.2.7")]
    assert names == ["client_ip.connections"]
    found = checks(
        "messages", settings, client_ip="192.0.2.7", auth_user="Alice", sender="a@Example.COM"
    )
    assert [(c.name, c.value) for c in found] == [
        ("client_ip.messages", "192.0.2.7/32"),
        ("auth_user.messages", "alice"),
        ("sender_domain.messages", "example.com"),
    ]
    # The null sender has no domain; a local client no address.
    assert [c.name for c in checks("recipients", settings, client_ip="", sender="")] == []


def test_ipv6_clients_count_as_their_64() -> None:
    first = checks("connections", Settings(), client_ip="2001:db8:1:2::1")[0]
    second = checks("connections", Settings(), client_ip="2001:db8:1:2:ffff::9")[0]
    assert first.key == second.key
    assert first.value == "2001:db8:1:2::/64"


def test_a_zero_or_missing_limit_is_no_limit() -> None:
    settings = Settings(client_ip=Limits(connections=Limit(count=0, window=60)), auth_user=Limits())
    assert checks("connections", settings, client_ip="192.0.2.1") == []
    # client_ip has no message limit, auth_user none at all; the sender domain has one.
    found = checks("messages", settings, client_ip="192.0.2.1", auth_user="u", sender="a@d.example")
    assert [c.name for c in found] == ["sender_domain.messages"]


def test_window_arithmetic() -> None:
    check = checks("connections", Settings(), client_ip="192.0.2.7")[0]  # 100 per 60 s
    assert not exceeded(99, check)
    assert exceeded(100, check)
    assert retry_after(1000.0, 1010.0, check) == 50
    assert retry_after(1000.0, 1010.5, check) == 50  # 49.5 s, rounded up
    assert retry_after(1000.0, 1060.0, check) == 1
    assert retry_after(None, 5.0, check) == 1
    assert describe(check, 100) == "client 192.0.2.7/32: 100 connections in 60 s (limit 100)"
    assert sender_domain("<>") == "" and sender_domain("x@Y.example") == "y.example"


def test_shipped_rules_check_and_test() -> None:
    shipped = REPO / "rules" / "ratelimit.yaml"
    for command in ("check", "test"):
        result = subprocess.run(
            [sys.executable, "-m", "mailgate.core.cli", "rules", command, str(shipped)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert load_rules(shipped).settings == Settings()  # the file writes the defaults out


# -- the daemon --------------------------------------------------------------------------------

SHIPPED_RULES = yaml.safe_load((REPO / "rules" / "ratelimit.yaml").read_text())["rules"]


def write_rules(path: Path, store: dict[str, Any], **limits: Any) -> Path:
    settings: dict[str, Any] = {
        "client_ip": {
            "connections": {"count": 3, "window": 60},
            "messages": {"count": 1000, "window": 60},
            "recipients": {"count": 1000, "window": 60},
        },
        "auth_user": {"messages": {"count": 2, "window": 60}},
        "sender_domain": {"recipients": {"count": 3, "window": 1}},
        "store": {**store, "timeout": 1},
    }
    settings.update(limits)
    rules = [
        {"name": "trusted-networks", "if": {"client_ip": ["203.0.113.0/24"]}, "then": "accept"},
        *SHIPPED_RULES[1:],
    ]
    path.write_text(yaml.safe_dump({"daemon": "ratelimit", "settings": settings, "rules": rules}))
    return path


@pytest.fixture(scope="module")
def ratelimit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ratelimit")
    rules = write_rules(tmp / "ratelimit.yaml", {"path": str(tmp / "ratelimit.sqlite")})
    daemon = Daemon("ratelimit", f"unix:{tmp / 'rl.sock'}", tmp / "daemon.log", rules=rules)
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def connect_reply(daemon: Daemon, ip: str) -> str:
    with MilterSession(daemon.address) as session:
        reply = session.connect("client.example", ip)
    assert reply is not None
    return reply.text if reply.action == "replycode" else reply.action


def test_connections_over_the_limit_get_421(ratelimit: Daemon) -> None:
    replies = [connect_reply(ratelimit, "198.51.100.20") for _ in range(4)]
    assert replies[:3] == ["continue"] * 3
    assert replies[3].startswith(
        "421 4.7.0 Too many connections (client 198.51.100.20/32: 3 connections in 60 s "
        "(limit 3)); try again in "
    )
    # Refused attempts are not counted, and another client has its own count.
    assert connect_reply(ratelimit, "198.51.100.20").startswith("421 ")
    assert connect_reply(ratelimit, "198.51.100.21") == "continue"
    assert "ratelimit exceeded: client 198.51.100.20/32: 3 connections" in ratelimit.log()


def test_ipv6_connections_count_per_64(ratelimit: Daemon) -> None:
    for n in range(3):
        assert connect_reply(ratelimit, f"2001:db8:7:7::{n + 1}") == "continue"
    assert connect_reply(ratelimit, "2001:db8:7:7:ffff::1").startswith("421 4.7.0")
    assert connect_reply(ratelimit, "2001:db8:7:8::1") == "continue"


def test_trusted_networks_are_neither_limited_nor_counted(ratelimit: Daemon) -> None:
    for _ in range(5):
        assert connect_reply(ratelimit, "203.0.113.9") == "continue"


def test_messages_of_a_user_get_451_at_mail(ratelimit: Daemon) -> None:
    user = f"u{uuid.uuid4().hex[:6]}@example.test"
    results = [
        run_message(ratelimit.address, client=("c.example", f"10.0.{n}.1"), auth_user=user)
        for n in range(3)
    ]
    assert [r.stage for r in results] == ["eom", "eom", "mail"]
    assert results[2].reply.text.startswith(
        f"451 4.7.1 Rate limit exceeded (user {user}: 2 messages in 60 s (limit 2)); try again in"
    )
    # Another user is not affected.
    assert run_message(ratelimit.address, auth_user="other-" + user).stage == "eom"


def test_recipients_of_a_sender_domain_in_a_sliding_window(ratelimit: Daemon) -> None:
    domain = f"d{uuid.uuid4().hex[:6]}.example"
    rcpts = [f"r{n}@example.test" for n in range(5)]
    result = run_message(ratelimit.address, mail_from=f"a@{domain}", rcpts=rcpts)
    texts = [result.replies[f"rcpt {r}"].text or result.replies[f"rcpt {r}"].action for r in rcpts]
    assert texts[:3] == ["continue"] * 3
    assert all(
        t.startswith(f"451 4.7.1 Rate limit exceeded (sender domain {domain}") for t in texts[3:]
    )
    # One second later the window (1 s) has moved on.
    time.sleep(1.2)
    again = run_message(ratelimit.address, mail_from=f"a@{domain}", rcpts=rcpts[:1])
    assert again.replies[f"rcpt {rcpts[0]}"].action == "continue"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(60)
def test_store_down_gives_the_default_action(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    stores = {
        "redis": {"backend": "redis", "url": f"redis://127.0.0.1:{closed_port()}/0"},
        "sqlite": {"path": str(blocker / "sub" / "rl.sqlite")},
    }
    for name, store in stores.items():
        rules = write_rules(tmp_path / f"{name}.yaml", store)
        daemon = Daemon(
            "ratelimit", f"unix:{tmp_path / f'{name}.sock'}", tmp_path / f"{name}.log", rules=rules
        ).start()
        try:
            for _ in range(5):
                assert connect_reply(daemon, "198.51.100.1") == "continue"
            assert run_message(daemon.address, auth_user="x", rcpts=["a@x.test"]).stage == "eom"
            assert "ratelimit unavailable after" in daemon.log()
        finally:
            assert daemon.stop() == 0


def test_two_daemons_share_one_redis(tmp_path: Path) -> None:
    prefix = f"mgtest:ratelimit:{uuid.uuid4().hex}:"
    store = {"backend": "redis", "url": "redis://127.0.0.1:6379/0", "prefix": prefix}
    daemons = []
    try:
        for name in ("a", "b"):
            rules = write_rules(tmp_path / f"{name}.yaml", store)
            daemons.append(
                Daemon(
                    "ratelimit",
                    f"unix:{tmp_path / f'{name}.sock'}",
                    tmp_path / f"{name}.log",
                    rules=rules,
                ).start()
            )
        a, b = daemons
        assert [connect_reply(d, "198.51.100.30") for d in (a, b, a)] == ["continue"] * 3
        assert connect_reply(b, "198.51.100.30").startswith("421 4.7.0")
    finally:
        for daemon in daemons:
            assert daemon.stop() == 0
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, db=0)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)


# -- with real MTAs ------------------------------------------------------------------------------


def _mta_rules(tmp_path: Path) -> Path:
    # The MTAs connect from loopback, which no rule here exempts.
    return write_rules(
        tmp_path / "ratelimit.yaml",
        {"path": str(tmp_path / "rl.sqlite")},
        client_ip={"messages": {"count": 2, "window": 600}},
    )


MESSAGE = b"Subject: counted\r\nFrom: a@remote.example\r\n\r\nHello.\r\n"


@pytest.mark.slow
def test_postfix_as_the_mta(tmp_path: Path) -> None:
    import peers

    port = peers.free_port()
    daemon = Daemon(
        "ratelimit", f"inet:{port}@127.0.0.1", tmp_path / "daemon.log", rules=_mta_rules(tmp_path)
    )
    daemon.start()
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            with mta.smtp() as client:
                for _ in range(2):
                    client.sendmail("a@remote.example", ["r@test.example"], MESSAGE)
                with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                    client.sendmail("a@remote.example", ["r@test.example"], MESSAGE)
            assert refused.value.smtp_code == 451
            assert b"4.7.1 Rate limit exceeded (client 127.0.0.1/32: 2 messages" in (
                refused.value.smtp_error
            )
            assert len(mta.wait_delivered(2)) == 2
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_in_the_core_chain(tmp_path: Path) -> None:
    from conftest import DOMAIN, add_default_users, make_gateway
    from smtpwire import Wire

    rules = _mta_rules(tmp_path)
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n  - name: ratelimit\n    daemon: ratelimit\n    rules: {rules}\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    try:
        codes = []
        for n in range(3):
            with Wire(gateway.smtp_port) as wire:
                wire.reply()
                wire.cmd("EHLO client.example")
                code, text = wire.cmd("MAIL FROM:<someone@remote.example>")
                codes.append(code)
                if code == 250:
                    assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")[0] == 250
                    assert wire.cmd("DATA")[0] == 354
                    wire.send(f"Subject: counted {n}\r\n\r\nHello.\r\n.\r\n".encode())
                    assert wire.reply()[0] == 250
                else:
                    assert text.startswith("4.7.1 Rate limit exceeded (client 127.0.0.1/32"), text
        assert codes == [250, 250, 451]
    finally:
        gateway.stop()
