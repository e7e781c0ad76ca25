"""The quota daemon: its policy, and the daemon as a real process against a real SQLite
user store and real Maildirs, spoken to over the milter protocol, behind Postfix and in
the core's own chain."""

from __future__ import annotations

import smtplib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgate.core.spool.maildir import mailbox_path, maildir_usage
from mailgate.core.users.sqlite import SQLiteUserStore
from mailgate.policies.quota import (
    AttachmentInfo,
    Mailbox,
    attachment_problem,
    exceeded,
    format_size,
    full,
)

import peers
from conftest import DOMAIN, MAILGATE, add_default_users, make_gateway
from daemon_milter_client import MilterSession, _cstr, run_message
from daemon_process import REPO, Daemon
from smtpwire import Wire

SHIPPED = REPO / "rules" / "quota.yaml"
D = "example.test"


def rules_file(
    tmp: Path, *, user_db: Path, mail_dir: Path, cache_ttl: float = 60, timeout: float = 5
) -> Path:
    """The shipped rules with the given settings (the rules themselves unchanged)."""
    text = SHIPPED.read_text()
    head, _, rest = text.partition("settings:\n")
    _, _, rules = rest.partition("\nrules:\n")
    path = tmp / "quota.yaml"
    path.write_text(
        f"{head}settings:\n  user_db: {user_db}\n  mail_dir: {mail_dir}\n"
        f"  cache_ttl: {cache_ttl}\n  timeout: {timeout}\n\nrules:\n{rules}"
    )
    return path


def fill(mail_dir: Path, address: str, size: int, name: str = "") -> None:
    """Put one message file of ``size`` bytes into ``address``'s Maildir (new/)."""
    new = mailbox_path(mail_dir, address) / "new"
    new.mkdir(parents=True, exist_ok=True)
    name = name or f"{time.time_ns()}.M1P1.test"
    (new / name).write_bytes(b"x" * size)


def message(size: int = 0, attachments: list[tuple[str, int]] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@remote.example"
    msg["To"] = f"someone@{D}"
    msg["Subject"] = "hello"
    msg.set_content("Hello.\n" + "y" * size)
    for name, length in attachments or []:
        msg.add_attachment(
            b"z" * length, maintype="application", subtype="octet-stream", filename=name
        )
    return msg.as_bytes().replace(b"\n", b"\r\n")


# -- the policy ----------------------------------------------------------------------------


def test_policy_decisions() -> None:
    box = Mailbox("a@x", usage=900, storage=1000)
    assert full([box], None) is None
    assert full([box], 101) == box  # the declared size would not fit
    assert full([box], 100) is None
    assert full([Mailbox("a@x", usage=1000, storage=1000)], None) is not None  # at quota
    assert full([Mailbox("a@x", usage=10**9)], None) is None  # unlimited
    assert full([], 10) is None  # nothing local
    # A list is full only when none of its mailboxes can take the message.
    assert full([Mailbox("a@x", 1000, 1000), Mailbox("b@x")], None) is None
    assert exceeded([box], 101) == box and exceeded([box], 100) is None
    big = [AttachmentInfo("a.zip", 2048), AttachmentInfo("", 10)]
    kind, text = attachment_problem("<a@x>", [Mailbox("a@x", max_attachment=1024)], big) or ("", "")
    assert kind == "too_big"
    assert text == "attachment 'a.zip' of 2K exceeds the 1K limit of <a@x>"
    kind, text = attachment_problem("<a@x>", [Mailbox("a@x", max_attachments=1)], big) or ("", "")
    assert (kind, text) == ("too_many", "2 attachments exceed the limit of 1 per message of <a@x>")
    assert attachment_problem("<a@x>", [Mailbox("a@x", max_attachment=4096)], big) is None
    assert attachment_problem("<a@x>", [Mailbox("a@x", max_attachment=1)], []) is None
    assert [format_size(n) for n in (300, 1024, 1536, 10 * 1024**2, 2 * 1024**3)] == [
        "300",
        "1K",
        "1.5K",
        "10M",
        "2G",
    ]


def test_maildir_usage(tmp_path: Path) -> None:
    box = tmp_path / "box"
    assert maildir_usage(box).bytes == 0  # no mailbox yet: empty
    for sub in ("new", "cur", "tmp", ".Sent/cur"):
        (box / sub).mkdir(parents=True)
    (box / "new" / "1.M1P1.host,S=5000").write_bytes(b"x")  # the name's size counts
    (box / "cur" / "2.M1P1.host,S=700:2,S").write_bytes(b"x")
    (box / "cur" / "3.M1P1.host:2,").write_bytes(b"x" * 300)  # no size in the name: stat
    (box / "tmp" / "4.M1P1.host").write_bytes(b"x" * 999)  # tmp/ is not mail yet
    (box / ".Sent" / "cur" / "5.M1P1.host,S=11:2,S").write_bytes(b"x")  # Maildir++ folder
    usage = maildir_usage(box)
    assert (usage.bytes, usage.messages) == (5000 + 700 + 300 + 11, 4)


def test_shipped_rules_check_and_test() -> None:
    for command in ("check", "test"):
        result = subprocess.run(
            [MAILGATE, "rules", command, str(SHIPPED)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed, 0 failed" in result.stdout


# -- the daemon over the milter protocol ------------------------------------------------------


class Site:
    def __init__(self, tmp: Path) -> None:
        self.user_db = tmp / "users.sqlite3"
        self.mail_dir = tmp / "mail"
        self.store = SQLiteUserStore(self.user_db)
        self.store.add_domain(D)

    def user(self, local: str, **limits: int) -> str:
        address = f"{local}@{D}"
        self.store.add_user(address, "secret password")
        if limits:
            self.store.set_limits(address, **limits)
        return address


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("quota-site"))
    yield site
    site.store.close()


@pytest.fixture(scope="module")
def daemon(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("quota-daemon")
    rules = rules_file(tmp, user_db=site.user_db, mail_dir=site.mail_dir, cache_ttl=1)
    port = peers.free_port()
    proc = Daemon("quota", f"inet:{port}@127.0.0.1", tmp / "daemon.log", rules=rules)
    proc.start()
    yield proc
    assert proc.stop() == 0


def rcpt_reply(result: object, rcpt: str) -> str:
    reply = result.replies[f"rcpt {rcpt}"]  # type: ignore[attr-defined]
    return f"{reply.action} {reply.text}".strip()


@pytest.mark.slow
def test_full_mailbox_refused_at_rcpt_other_recipient_accepted(site: Site, daemon: Daemon) -> None:
    full_box = site.user("full1", storage=10_000)
    roomy = site.user("roomy1", storage=10**9)
    fill(site.mail_dir, full_box, 6_000)
    fill(site.mail_dir, full_box, 4_000)  # exactly at quota
    result = run_message(daemon.address, rcpts=[full_box, roomy, "x@remote.example"])
    assert rcpt_reply(result, full_box).startswith("replycode 452 4.2.2 Mailbox full: " + full_box)
    assert rcpt_reply(result, roomy) == "continue"
    assert rcpt_reply(result, "x@remote.example") == "continue"  # not local: not ours
    assert result.action == "accept"
    assert f"mailbox {full_box} full: 10000 of 10000 bytes used" in daemon.log()


@pytest.mark.slow
def test_alias_refused_only_when_every_mailbox_is_full(site: Site, daemon: Daemon) -> None:
    a = site.user("lista", storage=1000)
    b = site.user("listb", storage=1000)
    site.store.add_alias(f"list@{D}", a)
    site.store.add_alias(f"list@{D}", b)
    site.store.add_alias(f"fwd@{D}", a)
    fill(site.mail_dir, a, 1000)
    result = run_message(daemon.address, rcpts=[f"list@{D}", f"fwd@{D}"])
    assert rcpt_reply(result, f"list@{D}") == "continue"
    assert rcpt_reply(result, f"fwd@{D}").startswith("replycode 452 4.2.2")


def mail_with_size(address: str | tuple[str, int], rcpts: list[str], size: int) -> dict[str, str]:
    """MAIL FROM with SIZE=size, then the RCPTs; the reply to each RCPT."""
    with MilterSession(address) as session:
        session.connect()
        session.helo("client.example")
        session.macros(b"M", {"i": "4SIZE1"})
        reply = session._stage(
            b"M", _cstr("<a@remote.example>") + _cstr(f"SIZE={size}"), 0x4, 0x4000
        )
        assert reply is None or reply.action == "continue"
        answers = {}
        for rcpt in rcpts:
            got = session._stage(b"R", _cstr(f"<{rcpt}>"), 0x8, 0x8000)
            assert got is not None
            answers[rcpt] = f"{got.action} {got.text}".strip()
        session.abort()
        return answers


@pytest.mark.slow
def test_declared_size_is_checked_at_rcpt(site: Site, daemon: Daemon) -> None:
    box = site.user("sized", storage=10_000)
    fill(site.mail_dir, box, 5_000)
    assert mail_with_size(daemon.address, [box], 6_000)[box].startswith("replycode 452 4.2.2")
    assert mail_with_size(daemon.address, [box], 4_000)[box] == "continue"


@pytest.mark.slow
def test_real_size_over_quota_refused_at_end_of_data(site: Site, daemon: Daemon) -> None:
    box = site.user("almost", storage=10_000)
    other = site.user("other1")
    fill(site.mail_dir, box, 9_000)
    result = run_message(daemon.address, rcpts=[box, other], message=message(2_000))
    assert rcpt_reply(result, box) == "continue"  # no SIZE declared: 9000 < 10000
    assert result.stage == "eom"
    assert result.reply.text.startswith(f"552 5.2.2 Mailbox full, message too big for {box}")
    small = run_message(daemon.address, rcpts=[box], message=message(10))
    assert small.action == "accept"


@pytest.mark.slow
def test_attachment_limits(site: Site, daemon: Daemon) -> None:
    picky = site.user("picky", max_attachment=1024, max_attachments=2)
    result = run_message(
        daemon.address, rcpts=[picky], message=message(attachments=[("big.bin", 2048)])
    )
    assert result.reply.text == (
        f"552 5.3.4 Message refused: attachment 'big.bin' of 2K exceeds the 1K limit of <{picky}>"
    )
    result = run_message(
        daemon.address,
        rcpts=[picky],
        message=message(attachments=[("a.txt", 10), ("b.txt", 10), ("c.txt", 10)]),
    )
    assert result.reply.text == (
        f"552 5.3.4 Message refused: 3 attachments exceed the limit of 2 per message of <{picky}>"
    )
    ok = run_message(daemon.address, rcpts=[picky], message=message(attachments=[("a.txt", 500)]))
    assert ok.action == "accept"
    # The authenticated sender's own limits apply to what it sends, to anyone.
    out = run_message(
        daemon.address,
        mail_from=picky,
        auth_user=picky,
        rcpts=["friend@remote.example"],
        message=message(attachments=[("big.bin", 4096)]),
    )
    assert out.reply.text.startswith("552 5.3.4 Message refused: attachment 'big.bin' of 4K")
    assert f"limit of the sender {picky}" in out.reply.text
    # A domain default applies to users without their own setting.
    plain = site.user("plain")
    site.store.set_limits(f"@{D}", max_attachments=0)
    try:
        res = run_message(daemon.address, rcpts=[plain], message=message(attachments=[("a", 1)]))
        assert res.reply.text.startswith("552 5.3.4")
    finally:
        site.store.set_limits(f"@{D}", max_attachments=None)


@pytest.mark.slow
def test_usage_cache_sees_changes_after_the_ttl(site: Site, daemon: Daemon) -> None:
    box = site.user("cached", storage=10_000)
    assert rcpt_reply(run_message(daemon.address, rcpts=[box]), box) == "continue"
    fill(site.mail_dir, box, 20_000)  # the mailbox fills behind the daemon's back
    # Within the TTL (1 s) the measured usage may still be the cached one; after it, the
    # new usage is seen. Retry for a while rather than assert a timing.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = rcpt_reply(run_message(daemon.address, rcpts=[box]), box)
        if answer != "continue":
            break
        time.sleep(0.2)
    assert answer.startswith("replycode 452 4.2.2")
    # And back: making room lets mail in again once the TTL has passed.
    for path in (mailbox_path(site.mail_dir, box) / "new").iterdir():
        path.unlink()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = rcpt_reply(run_message(daemon.address, rcpts=[box]), box)
        if answer == "continue":
            break
        time.sleep(0.2)
    assert answer == "continue"


# -- failures: the store missing, garbage, locked; a mailbox that is no directory ----------


def start_daemon(tmp: Path, *, user_db: Path, mail_dir: Path, timeout: float = 5) -> Daemon:
    rules = rules_file(tmp, user_db=user_db, mail_dir=mail_dir, timeout=timeout)
    proc = Daemon("quota", f"inet:{peers.free_port()}@127.0.0.1", tmp / "daemon.log", rules=rules)
    return proc.start()


@pytest.mark.slow
def test_missing_and_garbage_store_defer_the_recipient(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite3"
    proc = start_daemon(tmp_path, user_db=missing, mail_dir=tmp_path / "mail")
    try:
        result = run_message(proc.address, rcpts=[f"a@{D}"])
        assert rcpt_reply(result, f"a@{D}").startswith(
            "replycode 451 4.3.0 Mailbox quota cannot be checked now, try again later"
        )
        assert not missing.exists()  # never created by the daemon
        missing.write_bytes(b"this is not a database, just garbage\n" * 100)
        result = run_message(proc.address, rcpts=[f"a@{D}"])
        assert "451 4.3.0" in rcpt_reply(result, f"a@{D}")
        assert "quota of <a@example.test> unknown" in proc.log()
    finally:
        assert proc.stop() == 0


@pytest.mark.slow
def test_unreadable_mailbox_defers(tmp_path: Path) -> None:
    site = Site(tmp_path)
    box = site.user("odd", storage=1000)
    path = mailbox_path(site.mail_dir, box)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a file where the Maildir should be")
    proc = start_daemon(tmp_path, user_db=site.user_db, mail_dir=site.mail_dir)
    try:
        result = run_message(proc.address, rcpts=[box])
        assert "451 4.3.0" in rcpt_reply(result, box)
    finally:
        site.store.close()
        assert proc.stop() == 0


@pytest.mark.slow
def test_locked_store_answers_within_the_timeout(tmp_path: Path) -> None:
    site = Site(tmp_path)
    box = site.user("locked", storage=1000)
    site.store.close()
    # A rollback-journal database held under an exclusive lock: the daemon's open waits.
    lock = sqlite3.connect(site.user_db, isolation_level=None)
    lock.execute("PRAGMA journal_mode=DELETE")
    lock.execute("BEGIN EXCLUSIVE")
    proc = start_daemon(tmp_path, user_db=site.user_db, mail_dir=site.mail_dir, timeout=1)
    try:
        result = run_message(proc.address, rcpts=[box])
        assert "451 4.3.0" in rcpt_reply(result, box)
        assert "no answer within 1s" in proc.log()
        lock.execute("ROLLBACK")
        lock.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = rcpt_reply(run_message(proc.address, rcpts=[box]), box)
            if answer == "continue":
                break
            time.sleep(0.5)
        assert answer == "continue"  # back to normal once the lock is gone
    finally:
        assert proc.stop() == 0


# -- behind Postfix, and in the core's chain -------------------------------------------------


@pytest.mark.slow
def test_behind_postfix(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.store.add_domain(peers.DOMAIN)
    full_box = f"full@{peers.DOMAIN}"
    roomy = f"roomy@{peers.DOMAIN}"
    site.store.add_user(full_box, "secret password")
    site.store.add_user(roomy, "secret password")
    site.store.set_limits(full_box, storage=5000)
    site.store.set_limits(roomy, storage=20_000)
    fill(site.mail_dir, full_box, 5000)
    fill(site.mail_dir, roomy, 15_000)
    proc = start_daemon(tmp_path, user_db=site.user_db, mail_dir=site.mail_dir)
    port = proc.address[1]  # type: ignore[index]
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            with mta.smtp() as client:
                refused = client.sendmail("a@remote.example", [full_box, roomy], message(10))
                assert refused[full_box][0] == 452
                assert b"4.2.2 Mailbox full" in refused[full_box][1]
                # Postfix passes the client's SIZE= to the milter: 6000 bytes do not fit.
                with pytest.raises(smtplib.SMTPRecipientsRefused) as too_big:
                    client.sendmail("a@remote.example", [roomy], message(6000))
                assert too_big.value.recipients[roomy][0] == 452
            assert len(mta.wait_delivered(1)) == 1
    finally:
        site.store.close()
        assert proc.stop() == 0


@pytest.mark.slow
def test_in_the_core_chain_deliver_until_full(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, milters="quota=daemon", rate_limit_connections=10000)
    add_default_users(gateway)
    alice = f"alice@{DOMAIN}"
    store = gateway.users()
    store.set_limits(alice, storage=4000)
    store.close()
    gateway.start()
    try:
        refused_after = None
        body = b"Subject: fill\r\nFrom: someone@remote.example\r\n\r\n" + b"z" * 900
        for attempt in range(12):
            with Wire(gateway.smtp_port) as wire:
                wire.reply()
                wire.cmd("EHLO client.example")
                # The client declares the size, as MTAs do: a message that would not fit
                # is refused at RCPT, before it is sent.
                mail = f"MAIL FROM:<someone@remote.example> SIZE={len(body) + 100}"
                assert wire.cmd(mail)[0] == 250
                code, text = wire.cmd(f"RCPT TO:<{alice}>")
                if code != 250:
                    assert code == 452 and "4.2.2 Mailbox full" in text, (code, text)
                    refused_after = attempt
                    break
                assert wire.cmd("DATA")[0] == 354
                wire.send(body + b"\r\n.\r\n")
                assert wire.reply()[0] == 250
            gateway.wait_delivered(alice, attempt + 1)
        assert refused_after is not None, gateway.log()
        used = maildir_usage(gateway.maildir(alice)).bytes
        assert len(gateway.delivered(alice)) == refused_after
        assert refused_after >= 2
        assert used + len(body) > 4000  # the next message would not have fitted
    finally:
        gateway.stop()
