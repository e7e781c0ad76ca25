"""Greylisting: the pure decisions, the daemon as a real process over the milter protocol,
the daemon behind real Postfix and in our core's chain, and a store that is down.

Delays are settings of one or a few seconds here, so a test waits for a retry the way a
real MTA would, only shorter; nothing asserts how long anything took.
"""

from __future__ import annotations

import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnsserver import dns_server

from mailgate.policies.greylist import (
    Record,
    Settings,
    client_network,
    format_wait,
    normal_sender,
    step,
)
from mailgate.policies.rules import RuleError, load_rules

from daemon_milter_client import run_message
from daemon_process import REPO, Daemon

# -- the pure logic --------------------------------------------------------------------------


def test_ipv4_clients_count_as_their_24_by_default() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("[192.0.2.77]") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("192.0.2.77", ipv4_mask=32) == "192.0.2.77/32"
    assert client_network("192.0.2.77", ipv4_mask=16) == "192.0.0.0/16"


def test_ipv6_clients_count_as_their_64_by_default() -> None:
    assert client_network("2001:db8:1:2::10") == "2001:db8:1:2::/64"
    assert client_network("IPv6:2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_network("2001:db8:1:3::10") == "2001:db8:1:3::/64"
    assert client_network("2001:db8:1:2::10", ipv6_mask=48) == "2001:db8:1::/48"
    assert client_network("2001:db8:1:2::10", ipv6_mask=128) == "2001:db8:1:2::10/128"


def test_a_client_without_an_address_is_local() -> None:
    assert client_network("") == "local"
    assert client_network("unknown") == "local"


@pytest.mark.parametrize(
    ("sender", "normal"),
    [
        ("Alice@Example.COM", "alice@example.com"),
        ("alice+lists@example.com", "alice@example.com"),
        ("bounce-12345-678@lists.example", "bounce-#-#@lists.example"),
        ("prvs=1234abcdef=alice@example.com", "alice@example.com"),
        ("SRS0=HHH=TT=orig.example=bob@forwarder.example", "bob@orig.example"),
        ("SRS1=XXX=fwd1.example==HHH=TT=orig.example=bob@fwd2.example", "bob@orig.example"),
        ("", ""),
        ("<>", ""),
        ("postmaster", "postmaster"),
    ],
)
def test_sender_normalisation(sender: str, normal: str) -> None:
    assert normal_sender(sender) == normal


SETTINGS = Settings(delay=300, retry_window=3600, expiry=86400)


def test_state_machine_with_an_injected_clock() -> None:
    t0 = 1_000_000.0
    first = step(None, t0, SETTINGS)
    assert (first.state, first.wait, first.ttl) == ("new", 300, 300 + 3600)
    assert first.record == Record(t0, t0, False)
    early = step(first.record, t0 + 100.5, SETTINGS)
    # The clock runs from the first attempt: retrying often does not shorten the wait.
    assert (early.state, early.wait) == ("early", 200)
    assert early.record.first_seen == t0
    assert early.ttl == pytest.approx(300 + 3600 - 100.5)
    passed = step(early.record, t0 + 300, SETTINGS)
    assert (passed.state, passed.wait, passed.first_pass) == ("passed", 0, True)
    assert passed.ttl == 86400 and passed.record.passed
    again = step(passed.record, t0 + 5000, SETTINGS)
    assert (again.state, again.first_pass) == ("passed", False)
    assert again.record.last_seen == t0 + 5000


def test_a_retry_after_the_window_starts_over() -> None:
    t0 = 5_000.0
    first = step(None, t0, SETTINGS)
    late = step(first.record, t0 + 300 + 3600 + 1, SETTINGS)
    assert (late.state, late.wait) == ("new", 300)
    assert late.record.first_seen == t0 + 300 + 3600 + 1


def test_a_passed_triplet_expires() -> None:
    t0 = 5_000.0
    passed = step(step(None, t0, SETTINGS).record, t0 + 400, SETTINGS)
    assert step(passed.record, t0 + 400 + 86400, SETTINGS).state == "passed"
    assert step(passed.record, t0 + 400 + 86401, SETTINGS).state == "new"


def test_no_delay_passes_at_once() -> None:
    result = step(None, 10.0, Settings(delay=0))
    assert (result.state, result.first_pass) == ("passed", True)


def test_damaged_records_count_as_never_seen() -> None:
    assert Record.loads("not json") is None
    assert Record.loads('[1, 2, "yes"]') == Record(1.0, 2.0, False)
    assert Record.loads("[1]") is None
    assert Record.loads(Record(1.5, 2.5, True).dumps()) == Record(1.5, 2.5, True)


def test_wait_texts() -> None:
    assert format_wait(1) == "1 second"
    assert format_wait(75) == "75 seconds"
    assert format_wait(300) == "5 minutes"
    assert format_wait(301) == "6 minutes"


def test_settings_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "daemon: greylist\nsettings:\n  delay: -1\n  ipv6_mask: 200\n"
        "  store: {backend: redis, url: http://x}\n  dnswl_zones: [not a zone]\n"
    )
    with pytest.raises(RuleError) as failed:
        load_rules(bad)
    text = "\n".join(failed.value.problems)
    assert "bad.yaml:3: settings.delay" in text
    assert "bad.yaml:4: settings.ipv6_mask" in text
    assert "settings.store.url" in text
    assert "settings.dnswl_zones" in text


def test_shipped_rules_check_and_test() -> None:
    shipped = REPO / "rules" / "greylist.yaml"
    for command in ("check", "test"):
        result = subprocess.run(
            [sys.executable, "-m", "mailgate.core.cli", "rules", command, str(shipped)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
    settings = load_rules(shipped).settings
    assert settings == Settings()  # the file writes the defaults out


# -- the daemon as a real process ------------------------------------------------------------

ZONE = """
$ORIGIN test.
$TTL 300
77.2.0.192.dnswl.test.     IN A 127.0.10.2
78.2.0.192.dnswl.test.     IN A 127.0.0.255
25.2.0.192.in-addr.arpa.   IN PTR mx1.friendly.example.
mx1.friendly.example.      IN A 192.0.2.25
26.2.0.192.in-addr.arpa.   IN PTR mx2.friendly.example.
mx2.friendly.example.      IN A 192.0.2.99
"""

RULES: list[dict[str, Any]] = [
    {"name": "authenticated", "if": {"auth": True}, "then": "accept"},
    {"name": "trusted-networks", "if": {"client_ip": ["203.0.113.0/24"]}, "then": "accept"},
    {
        "name": "role-recipients",
        "if": {"envelope": {"part": "localpart", "to": {"is": ["postmaster", "abuse"]}}},
        "then": "accept",
    },
    {
        "name": "allowed-sender-domains",
        "if": {"envelope": {"part": "domain", "from": {"is": ["partner.example"]}}},
        "then": "accept",
    },
    {"name": "dnswl", "if": {"fact": {"name": "dnswl"}}, "then": "accept"},
    {
        "name": "known-senders",
        "if": {"fact": {"name": "client_hostname", "matches": "*.friendly.example"}},
        "then": "accept",
    },
    {
        "name": "store-unavailable",
        "if": {"fact": {"name": "greylist", "is": "unavailable"}},
        "then": "accept",
    },
    {
        "name": "greylisted",
        "if": {"fact": {"name": "greylist", "is": ["new", "early"]}},
        "then": {
            "tempfail": {
                "code": 451,
                "enhanced": "4.7.1",
                "text": "Greylisted: try again in ${greylist_wait}s (${greylist_network})",
            }
        },
    },
]


def write_rules(
    path: Path, store: dict[str, Any], dns: str = "127.0.0.1:9", **settings: Any
) -> Path:
    values: dict[str, Any] = {
        "delay": 1,
        "retry_window": 2,
        "expiry": 3,
        "auto_allow_clients": 2,
        "dnswl_zones": ["dnswl.test"],
        "store": store,
        "dns": {"nameservers": [dns], "timeout": 1},
    }
    values.update(settings)
    path.write_text(yaml.safe_dump({"daemon": "greylist", "settings": values, "rules": RULES}))
    return path


@pytest.fixture(scope="module")
def dns() -> Iterator[Any]:
    with dns_server(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def greylist(tmp_path_factory: pytest.TempPathFactory, dns: Any) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("greylist")
    rules = write_rules(
        tmp / "greylist.yaml", {"path": str(tmp / "greylist.sqlite")}, dns=dns.address
    )
    daemon = Daemon("greylist", f"unix:{tmp / 'greylist.sock'}", tmp / "daemon.log", rules=rules)
    daemon.start()
    daemon.db = tmp / "greylist.sqlite"  # type: ignore[attr-defined]
    yield daemon
    assert daemon.stop() == 0


def attempt(
    daemon: Daemon, ip: str, sender: str, rcpts: list[str], **kwargs: Any
) -> dict[str, str]:
    """One delivery attempt; each recipient's RCPT reply (``continue`` or the reply text)."""
    result = run_message(
        daemon.address,
        client=(kwargs.pop("hostname", "client.example"), ip),
        mail_from=sender,
        rcpts=rcpts,
        **kwargs,
    )
    out = {}
    for rcpt in rcpts:
        reply = result.replies[f"rcpt {rcpt}"]
        out[rcpt] = reply.text if reply.action == "replycode" else reply.action
    return out


def once(daemon: Daemon, ip: str, sender: str, rcpt: str, **kwargs: Any) -> str:
    return attempt(daemon, ip, sender, [rcpt], **kwargs)[rcpt]


def triplets(daemon: Daemon) -> list[str]:
    with sqlite3.connect(daemon.db) as conn:  # type: ignore[attr-defined]
        # The daemon makes its table with its first record: none yet is no triplet yet.
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'kv'").fetchone():
            return []
        return [row[0] for row in conn.execute("SELECT key FROM kv WHERE key LIKE '%triplet:%'")]


def test_first_attempt_early_retry_and_pass(greylist: Daemon) -> None:
    rcpt = f"first-{uuid.uuid4().hex[:6]}@example.test"
    assert once(greylist, "198.51.100.7", "news@remote.example", rcpt) == (
        "451 4.7.1 Greylisted: try again in 1s (198.51.100.0/24)"
    )
    assert once(greylist, "198.51.100.7", "news@remote.example", rcpt).startswith("451 4.7.1")
    time.sleep(1.2)
    assert once(greylist, "198.51.100.7", "news@remote.example", rcpt) == "continue"
    # Passed triplets stay passed.
    assert once(greylist, "198.51.100.9", "news@remote.example", rcpt) == "continue"
    log = greylist.log()
    assert (
        "greylist new: client=client.example[198.51.100.7] "
        f"triplet=198.51.100.0/24/news@remote.example/{rcpt} wait=1s" in log
    )
    assert f"triplet=198.51.100.0/24/news@remote.example/{rcpt} wait=1s" in log
    assert "greylist early" in log and "greylist passed" in log


def test_auto_allow_after_n_passes(greylist: Daemon) -> None:
    ip = "10.20.30.40"
    first = [f"aa{i}-{uuid.uuid4().hex[:6]}@example.test" for i in range(2)]
    replies = attempt(greylist, ip, "shop@store.example", first)
    assert all(reply.startswith("451 ") for reply in replies.values())
    time.sleep(1.2)
    assert set(attempt(greylist, ip, "shop@store.example", first).values()) == {"continue"}
    # Two passes (auto_allow_clients: 2): new triplets of that network are not greylisted.
    other = f"new-{uuid.uuid4().hex[:6]}@example.test"
    assert once(greylist, "10.20.30.99", "other@elsewhere.example", other) == "continue"
    assert "greylist allowed-client: client=client.example[10.20.30.99]" in greylist.log()
    # Another network is still greylisted.
    assert once(greylist, "10.20.31.1", "other@elsewhere.example", other).startswith("451 ")


def test_retry_too_late_and_expiry(greylist: Daemon) -> None:
    ip = "10.1.1.1"
    late, kept = (f"{n}-{uuid.uuid4().hex[:6]}@example.test" for n in ("late", "kept"))
    assert once(greylist, ip, "a@remote.example", late).startswith("451 ")
    assert once(greylist, ip, "a@remote.example", kept).startswith("451 ")
    time.sleep(1.2)
    assert once(greylist, ip, "a@remote.example", kept) == "continue"
    # delay 1 + retry_window 2 for `late`; expiry 3 after the pass for `kept`.
    time.sleep(3.3)
    assert once(greylist, ip, "a@remote.example", late).startswith(
        "451 4.7.1 Greylisted: try again in 1s"
    )
    assert once(greylist, ip, "a@remote.example", kept).startswith(
        "451 4.7.1 Greylisted: try again in 1s"
    )


def test_ipv6_clients_are_grouped_by_64(greylist: Daemon) -> None:
    rcpt = f"v6-{uuid.uuid4().hex[:6]}@example.test"
    assert once(greylist, "2001:db8:1:2::10", "a@remote.example", rcpt) == (
        "451 4.7.1 Greylisted: try again in 1s (2001:db8:1:2::/64)"
    )
    time.sleep(1.2)
    # The retry comes from another address of the same /64: it passes.
    assert once(greylist, "2001:db8:1:2:ffff::99", "a@remote.example", rcpt) == "continue"
    # Another /64 is another client.
    assert once(greylist, "2001:db8:1:3::10", "a@remote.example", rcpt).startswith("451 ")


def test_sender_variants_make_one_triplet(greylist: Daemon) -> None:
    rcpt = f"list-{uuid.uuid4().hex[:6]}@example.test"
    assert once(greylist, "10.9.9.9", "bounce-1234@lists.example", rcpt).startswith("451 ")
    time.sleep(1.2)
    assert once(greylist, "10.9.9.9", "Bounce-98765@Lists.Example", rcpt) == "continue"


def test_authenticated_users_skip_without_a_trace(greylist: Daemon) -> None:
    rcpt = f"auth-{uuid.uuid4().hex[:6]}@example.test"
    assert once(greylist, "10.2.2.2", "alice@example.test", rcpt, auth_user="alice") == "continue"
    assert not [key for key in triplets(greylist) if rcpt in key]
    # Without AUTH the same triplet is greylisted.
    assert once(greylist, "10.2.2.2", "alice@example.test", rcpt).startswith("451 ")
    assert [key for key in triplets(greylist) if rcpt in key]


def test_allow_lists_skip_the_check(greylist: Daemon, dns: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    cases = [
        ("network", "203.0.113.5", "a@remote.example", "client.example"),
        ("domain", "10.3.3.3", "billing@partner.example", "client.example"),
        ("mta-name", "10.4.4.4", "a@remote.example", "out7.friendly.example"),
        ("ptr", "192.0.2.25", "a@remote.example", "[192.0.2.25]"),
        ("dnswl", "192.0.2.77", "a@remote.example", "[192.0.2.77]"),
    ]
    for what, ip, sender, hostname in cases:
        rcpt = f"{what}-{tag}@example.test"
        assert once(greylist, ip, sender, rcpt, hostname=hostname) == "continue", what
    assert not [key for key in triplets(greylist) if tag in key]
    # A PTR that does not resolve back, and dnswl.org's "refused" answer, are no listing.
    for what, ip in (("unverified", "192.0.2.26"), ("refused", "192.0.2.78")):
        rcpt = f"{what}-{tag}@example.test"
        assert once(greylist, ip, "a@remote.example", rcpt, hostname=f"[{ip}]").startswith(
            "451 "
        ), what


def test_each_recipient_is_decided_alone(greylist: Daemon) -> None:
    tag = uuid.uuid4().hex[:6]
    first, second = f"postmaster@{tag}.example.test", f"bob-{tag}@example.test"
    replies = attempt(greylist, "10.5.5.5", "a@remote.example", [first, second])
    assert replies[first] == "continue"
    assert replies[second].startswith("451 4.7.1")


def test_shared_redis_state_between_two_daemons(tmp_path: Path, dns: Any) -> None:
    """Two gateways' daemons on one Redis: the retry may reach the other one."""
    prefix = f"mgtest:greylist:{uuid.uuid4().hex}:"
    store = {"backend": "redis", "url": "redis://127.0.0.1:6379/0", "prefix": prefix}
    daemons = []
    try:
        for name in ("a", "b"):
            rules = write_rules(tmp_path / f"{name}.yaml", store, dns=dns.address)
            daemons.append(
                Daemon(
                    "greylist",
                    f"unix:{tmp_path / f'{name}.sock'}",
                    tmp_path / f"{name}.log",
                    rules=rules,
                ).start()
            )
        a, b = daemons
        assert once(a, "198.51.100.50", "x@remote.example", "r@example.test").startswith("451 ")
        assert once(b, "198.51.100.51", "x@remote.example", "r@example.test").startswith("451 ")
        time.sleep(1.2)
        assert once(b, "198.51.100.52", "x@remote.example", "r@example.test") == "continue"
        assert once(a, "198.51.100.53", "x@remote.example", "r@example.test") == "continue"
        assert "greylist early" in b.log()
    finally:
        for daemon in daemons:
            assert daemon.stop() == 0
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, db=0)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)


# -- a store that is down ----------------------------------------------------------------------


class Blackhole:
    """A TCP server that accepts connections and never answers (a hung Redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(50)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(60)
def test_store_down_gives_the_default_action(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not an SQLite database at all" * 100)
    hole = Blackhole()
    stores = {
        "redis-closed": {"backend": "redis", "url": f"redis://127.0.0.1:{closed_port()}/0"},
        "redis-hung": {"backend": "redis", "url": f"redis://127.0.0.1:{hole.port}/0"},
        "sqlite-unreachable": {"path": str(blocker / "sub" / "greylist.sqlite")},
        "sqlite-garbage": {"path": str(garbage)},
    }
    try:
        for name, store in stores.items():
            rules = write_rules(tmp_path / f"{name}.yaml", {**store, "timeout": 1})
            daemon = Daemon(
                "greylist",
                f"unix:{tmp_path / f'{name}.sock'}",
                tmp_path / f"{name}.log",
                rules=rules,
            ).start()
            try:
                # The MTA side waits at most 10 s for any reply: a hang fails the test.
                assert once(daemon, "198.51.100.1", "a@remote.example", "r@example.test") == (
                    "continue"
                ), name
                assert "greylist unavailable after" in daemon.log(), name
                assert "rule store-unavailable" in daemon.log(), name
            finally:
                assert daemon.stop() == 0
    finally:
        hole.close()


def test_store_down_with_a_fail_closed_rule(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path / "closed.yaml",
        {"backend": "redis", "url": f"redis://127.0.0.1:{closed_port()}/0", "timeout": 1},
    )
    data = yaml.safe_load(rules.read_text())
    for rule in data["rules"]:
        if rule["name"] == "store-unavailable":
            rule["then"] = {"tempfail": {"text": "Greylist store unavailable"}}
    rules.write_text(yaml.safe_dump(data))
    daemon = Daemon("greylist", f"unix:{tmp_path / 'g.sock'}", tmp_path / "g.log", rules=rules)
    daemon.start()
    try:
        reply = once(daemon, "198.51.100.1", "a@remote.example", "r@example.test")
        assert reply == "451 4.7.1 Greylist store unavailable"
    finally:
        assert daemon.stop() == 0


def test_the_store_recovers_without_a_restart(tmp_path: Path) -> None:
    blocker = tmp_path / "later"
    blocker.write_text("in the way")
    rules = write_rules(tmp_path / "g.yaml", {"path": str(blocker / "greylist.sqlite")})
    daemon = Daemon("greylist", f"unix:{tmp_path / 'g.sock'}", tmp_path / "g.log", rules=rules)
    daemon.start()
    try:
        assert once(daemon, "198.51.100.1", "a@remote.example", "r@example.test") == "continue"
        blocker.unlink()
        assert once(daemon, "198.51.100.1", "a@remote.example", "r@example.test").startswith("451 ")
        assert (blocker / "greylist.sqlite").exists()
    finally:
        assert daemon.stop() == 0


# -- with real MTAs ---------------------------------------------------------------------------


def _mta_rules(tmp_path: Path) -> Path:
    # Postfix and our core connect from loopback, which no rule here allows.
    return write_rules(
        tmp_path / "greylist.yaml",
        {"path": str(tmp_path / "greylist.sqlite")},
        delay=2,
        retry_window=60,
        expiry=600,
    )


@pytest.mark.slow
def test_postfix_as_the_mta(tmp_path: Path) -> None:
    import peers

    port = peers.free_port()
    daemon = Daemon(
        "greylist", f"inet:{port}@127.0.0.1", tmp_path / "daemon.log", rules=_mta_rules(tmp_path)
    )
    daemon.start()
    message = b"Subject: greylisted\r\nFrom: a@remote.example\r\n\r\nHello.\r\n"
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            with mta.smtp() as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("a@remote.example", ["r@test.example"], message)
            code, text = refused.value.recipients["r@test.example"]
            assert code == 451
            assert text.startswith(b"4.7.1 Greylisted: try again in ")
            time.sleep(2.2)
            with mta.smtp() as client:
                client.sendmail("a@remote.example", ["r@test.example"], message)
            delivered = mta.wait_delivered(1, timeout=90)  # a loaded machine delays qmgr
            assert b"Subject: greylisted" in delivered[0]
    finally:
        assert daemon.stop() == 0
    assert "greylist passed" in daemon.log()


@pytest.mark.slow
def test_in_the_core_chain(tmp_path: Path) -> None:
    from conftest import DOMAIN, add_default_users, make_gateway
    from smtpwire import Wire

    rules = _mta_rules(tmp_path)
    gateway = make_gateway(tmp_path, rate_limit_connections=10000)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(f"milters:\n  - name: greylist\n    daemon: greylist\n    rules: {rules}\n")
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    alice = f"alice@{DOMAIN}"

    def deliver() -> tuple[int, str]:
        with Wire(gateway.smtp_port) as wire:
            wire.reply()
            wire.cmd("EHLO client.example")
            assert wire.cmd("MAIL FROM:<someone@remote.example>")[0] == 250
            code, text = wire.cmd(f"RCPT TO:<{alice}>")
            if code != 250:
                return code, text
            assert wire.cmd("DATA")[0] == 354
            wire.send(b"Subject: greylist chain\r\n\r\nHello.\r\n.\r\n")
            return wire.reply()

    try:
        code, text = deliver()
        assert code == 451 and text.startswith("4.7.1 Greylisted: try again in"), (code, text)
        time.sleep(2.2)
        code, text = deliver()
        assert code == 250, (code, text)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(b"greylist chain" in m for m in gateway.delivered(alice)):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the message was not delivered")
    finally:
        gateway.stop()
