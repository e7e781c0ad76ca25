"""The spamassassin daemon as a real process, with a real spamd, over the milter protocol.

One spamd (Debian's, stock rules, TELL allowed) serves the module. The daemon runs the
shipped rules (only the settings pointed at that spamd, or one rule switched) and is
driven by the test milter client, by Postfix and by the core's chain. spamd down, stalled
or answering garbage gives the rules' outcome in time; `mailgate spam learn` is run as
an operator runs it.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import yaml

import peers
from conftest import DOMAIN, add_default_users, make_gateway
from daemon_milter_client import run_message
from daemon_process import REPO, Daemon, clean_env

SHIPPED = REPO / "rules" / "spamassassin.yaml"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def mail(subject: str, body: str, msgid: str, to: str = "bob@example.test") -> bytes:
    return (
        f"From: Alice <alice@remote.example>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: {formatdate(localtime=True)}\r\nMessage-ID: <{msgid}@remote.example>\r\n"
        "\r\n" + body.replace("\n", "\r\n")
    ).encode()


def spam(to: str = "bob@example.test") -> bytes:
    return mail("test", GTUBE + "\n", "gtube-1", to)


def ham(to: str = "bob@example.test") -> bytes:
    return mail(
        "Minutes of Tuesday's meeting",
        "Hello Bob,\n\nattached are the minutes of Tuesday's meeting. The next one is on\n"
        "Thursday at ten, in the small room.\n\nRegards,\nAlice\n",
        "minutes-1",
        to,
    )


def rules_file(
    path: Path,
    address: str,
    *,
    enable: tuple[str, ...] = (),
    disable: tuple[str, ...] = (),
    extra_rules: list[dict[str, Any]] | None = None,
    **settings: object,
) -> Path:
    """The shipped rules with spamd's address, other settings and rules switched on/off."""
    data = yaml.safe_load(SHIPPED.read_text())
    data["settings"].update(address=address, **settings)
    for rule in data["rules"]:
        if rule["name"] in enable:
            rule["enabled"] = True
        if rule["name"] in disable:
            rule["enabled"] = False
    data["rules"][2:2] = extra_rules or []
    data.pop("tests")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def running(tmp: Path, rules: Path, name: str = "sa") -> Iterator[Daemon]:
    daemon = Daemon(
        "spamassassin", f"unix:{tmp / 'run' / f'{name}.sock'}", tmp / f"{name}.log", rules=rules
    )
    daemon.start()
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0


@contextlib.contextmanager
def fake_spamd(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback server that hands each connection to ``answer``; yields HOST:PORT."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
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
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        for conn in held:
            conn.close()
        thread.join(5)


def garbage(conn: socket.socket) -> None:
    conn.settimeout(5)
    conn.recv(65536)
    conn.sendall(b"220 smtp.example ESMTP ready\r\n")
    conn.close()


def silent(conn: socket.socket) -> None:
    pass  # accepts, then never says a word


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Spamd]:
    with peers.spamd_server(tmp_path_factory.mktemp("spamd"), allow_tell=True) as server:
        yield server


@pytest.fixture(scope="module")
def address(spamd: peers.Spamd) -> str:
    return f"{spamd.host}:{spamd.port}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, address: str) -> Iterator[Daemon]:
    """The shipped rules, pointed at the module's spamd."""
    tmp = tmp_path_factory.mktemp("sa")
    with running(tmp, rules_file(tmp / "spamassassin.yaml", address)) as daemon:
        yield daemon


# -- the shipped rules with a real spamd ---------------------------------------------------


@pytest.mark.slow
def test_gtube_is_rejected(daemon: Daemon) -> None:
    result = run_message(daemon.address, message=spam(), queue_id="4GTUBE")
    assert result.action == "reject"
    assert result.reply.text == "550 5.7.1 Message rejected as spam"
    assert result.modifications == []
    assert re.search(
        r"4GTUBE: spamd: spam score=10\d\d\.\d required=5\.0 tests=\S*GTUBE", daemon.log()
    )
    assert "4GTUBE: reject 550 5.7.1" in daemon.log()


@pytest.mark.slow
def test_ham_gets_the_status_headers(daemon: Daemon) -> None:
    result = run_message(daemon.address, message=ham(), queue_id="4HAM")
    assert result.action == "accept"
    changed = result.headers_changed()
    assert [(i, name) for i, name, _ in changed] == [
        (1, "X-Spam-Flag"),
        (1, "X-Spam-Status"),
        (1, "X-Spam-Score"),
    ]
    assert changed[0][2] == ""  # a sender's own X-Spam-Flag would be removed
    status, score = changed[1][2], changed[2][2]
    match = re.fullmatch(r"No, score=(-?\d+\.\d) required=5\.0 tests=(\S+)", status)
    assert match, status
    assert float(match.group(1)) < 5 and match.group(1) == score
    assert "GTUBE" not in match.group(2)
    # spamd saw the client through the daemon's Received field: a relay, and a DNS-less one.
    assert "NO_RELAYS" not in match.group(2) and "NO_RECEIVED" not in match.group(2)
    assert "4HAM: spamd: ham score=" in daemon.log()


@pytest.mark.slow
def test_authenticated_sender_is_not_checked(daemon: Daemon) -> None:
    result = run_message(daemon.address, message=spam(), auth_user="alice", queue_id="4AUTH")
    assert result.action == "accept"
    assert result.modifications == []
    assert "4AUTH: accept" in daemon.log()
    assert "4AUTH: spamd" not in daemon.log()  # the check was never made


@pytest.mark.slow
def test_several_messages_on_one_connection(daemon: Daemon) -> None:
    from daemon_milter_client import MilterSession

    with MilterSession(daemon.address) as session:
        session.connect("client.example", "192.0.2.10")
        session.helo("client.example")
        first = session.send_message("a@remote.example", ["bob@example.test"], spam())
        second = session.send_message("a@remote.example", ["bob@example.test"], ham())
    assert first.action == "reject"
    assert second.action == "accept"
    assert second.headers_changed()[1][2].startswith("No, score=")


# -- other rules and settings (one daemon, its rule file rewritten and reloaded) ----------


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory, address: str) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("variant")
    with running(tmp, rules_file(tmp / "variant.yaml", address), "variant") as daemon:
        yield daemon


def switch(daemon: Daemon, address: str, **kwargs: Any) -> None:
    assert daemon.rules is not None
    rules_file(daemon.rules, address, **kwargs)
    assert "reloaded rules" in daemon.reload()


@pytest.mark.slow
def test_gtube_is_tagged_when_rejecting_is_off(variant: Daemon, address: str) -> None:
    switch(variant, address, disable=("reject-high-score",))
    result = run_message(variant.address, message=spam(), queue_id="4TAG")
    assert result.action == "accept"
    changed = result.headers_changed()
    assert changed[0] == (1, "Subject", "[SPAM] test")
    assert changed[1] == (1, "X-Spam-Flag", "YES")
    assert changed[2][1] == "X-Spam-Status"
    assert re.fullmatch(r"Yes, score=10\d\d\.\d required=5\.0 tests=\S*GTUBE\S*", changed[2][2])
    assert changed[3][1] == "X-Spam-Score"


@pytest.mark.slow
def test_gtube_is_quarantined_by_the_alternative_rule(variant: Daemon, address: str) -> None:
    switch(variant, address, disable=("reject-high-score",), enable=("quarantine-high-score",))
    result = run_message(variant.address, message=spam(), queue_id="4QUAR")
    assert result.action == "accept"
    reason = result.quarantine_reason()
    assert reason is not None and re.fullmatch(r"spam, score 10\d\d\.\d", reason)


@pytest.mark.slow
def test_report_request_gives_the_report(variant: Daemon, address: str) -> None:
    has_report = {
        "name": "report-names-gtube",
        "if": {"fact": {"name": "spam_report", "contains": "Generic Test for Unsolicited"}},
        "then": [{"add_header": {"name": "X-Report-Seen", "value": "${spam_tests}"}}, "continue"],
    }
    switch(
        variant,
        address,
        request="report",
        extra_rules=[has_report],
        disable=("reject-high-score",),
    )
    result = run_message(variant.address, message=spam(), queue_id="4REPORT")
    added = dict(result.headers_added())
    assert "GTUBE" in added["X-Report-Seen"].split(",")
    assert result.headers_changed()[0] == (1, "Subject", "[SPAM] test")


@pytest.mark.slow
def test_messages_over_max_size_are_not_checked(variant: Daemon, address: str) -> None:
    switch(variant, address, max_size="1K")
    big = spam().replace(b"\r\n\r\n", b"\r\n\r\n" + b"filler line\r\n" * 200, 1)
    result = run_message(variant.address, message=big, queue_id="4BIG")
    assert result.action == "accept"
    assert result.headers_changed() == [(1, "X-Spam-Status", "No, not checked (message too big)")]
    assert "4BIG: spamd: not checked: " in variant.log()


@pytest.mark.timeout(60)
def test_spamd_down_fails_open_and_marks(variant: Daemon) -> None:
    closed = f"127.0.0.1:{peers.free_port()}"
    switch(variant, closed)
    result = run_message(variant.address, message=spam(), queue_id="4DOWN")
    assert result.action == "accept"
    assert result.headers_changed() == [
        (1, "X-Spam-Status", "Unknown, not checked (spamd unavailable)")
    ]
    assert re.search(r"WARNING 4DOWN: spamd: not checked: .*cannot connect", variant.log())


@pytest.mark.timeout(60)
def test_spamd_down_tempfails_with_the_alternative_rule(variant: Daemon) -> None:
    closed = f"127.0.0.1:{peers.free_port()}"
    switch(variant, closed, disable=("spamd-failed",), enable=("spamd-failed-tempfail",))
    result = run_message(variant.address, message=ham(), queue_id="4TEMP")
    assert result.action == "tempfail"
    assert result.reply.text == "451 4.3.0 Spam check failed, try again later"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", [silent, garbage], ids=["stalled", "garbage"])
def test_broken_spamd_gives_the_rules_outcome_in_time(
    variant: Daemon, behaviour: Callable[[socket.socket], None]
) -> None:
    with fake_spamd(behaviour) as fake:
        switch(variant, fake, timeout=1)
        qid = f"4BROKEN{behaviour.__name__.upper()}"
        result = run_message(variant.address, message=spam(), queue_id=qid)
    assert result.action == "accept"
    assert result.headers_changed() == [
        (1, "X-Spam-Status", "Unknown, not checked (spamd unavailable)")
    ]
    expected = "no answer to SYMBOLS within 1s" if behaviour is silent else "not a spamd reply"
    assert re.search(rf"WARNING {qid}: spamd: not checked: .*{expected}", variant.log())


# -- mailgate spam learn -------------------------------------------------------------------


def spam_learn(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate.core.cli", "spam", "learn", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        check=False,
    )


def nspam_nham(spamd: peers.Spamd) -> tuple[int, int]:
    out = subprocess.run(
        ["sa-learn", "--dump", "magic", "--dbpath", str(spamd.bayes_dir),
         "--siteconfigpath", str(spamd.base / "site")],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    counts = {line.split()[-1]: int(line.split()[2]) for line in out.splitlines()
              if re.search(r"non-token data: n(spam|ham)$", line)}  # fmt: skip
    return counts.get("nspam", 0), counts.get("nham", 0)


@pytest.mark.slow
def test_spam_learn_end_to_end(tmp_path: Path, spamd: peers.Spamd, address: str) -> None:
    spam_dir = tmp_path / "Junk"
    (spam_dir / "cur").mkdir(parents=True)
    (spam_dir / "new").mkdir()
    for n, words in enumerate(["cheap watches", "casino bonus", "miracle pills"]):
        box = "cur" if n else "new"
        body = f"Best {words} online now, click here.\n"
        (spam_dir / box / f"{n}.eml").write_bytes(mail(words, body, f"learn-spam-{n}"))
    ham_file = tmp_path / "ham.eml"
    ham_file.write_bytes(mail("lunch", "Lunch on Friday at noon?\n", "learn-ham-1"))
    before = nspam_nham(spamd)

    first = spam_learn("--spam", "--spamd", address, str(spam_dir))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("3 messages learned as spam, 0 already known, 0 failed")
    again = spam_learn("--spam", "--spamd", address, "--verbose", str(spam_dir))
    assert again.returncode == 0, again.stderr
    assert "0 messages learned as spam, 3 already known, 0 failed" in again.stdout
    assert "0.eml: already learned as spam" in again.stdout

    # The address may come from a rule file's settings, the message from standard input.
    rules = rules_file(tmp_path / "sa.yaml", address)
    learned_ham = spam_learn("--ham", "--rules", str(rules), "-", stdin=ham_file.read_bytes())
    assert learned_ham.returncode == 0, learned_ham.stderr
    assert learned_ham.stdout.startswith("1 message learned as ham, 0 already known, 0 failed")
    assert nspam_nham(spamd) == (before[0] + 3, before[1] + 1)

    forgot = spam_learn("--forget", "--spamd", address, str(spam_dir / "new" / "0.eml"))
    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout.startswith("1 message forgotten, 0 not known, 0 failed")
    assert nspam_nham(spamd) == (before[0] + 2, before[1] + 1)


@pytest.mark.timeout(120)
def test_spam_learn_failures(tmp_path: Path) -> None:
    message = tmp_path / "m.eml"
    message.write_bytes(mail("x", "x\n", "learn-fail-1"))
    closed = f"127.0.0.1:{peers.free_port()}"

    down = spam_learn("--spam", "--spamd", closed, str(message), str(tmp_path / "missing.eml"))
    assert down.returncode == 1
    assert "m.eml: spamd at 127.0.0.1:" in down.stderr and "cannot connect" in down.stderr
    assert "missing.eml: cannot read" in down.stderr
    assert "0 messages learned as spam, 0 already known, 2 failed" in down.stdout

    def refuse_tell(conn: socket.socket) -> None:
        conn.settimeout(5)
        conn.recv(65536)
        conn.sendall(
            b"SPAMD/1.0 69 Service Unavailable: TELL commands are not enabled, "
            b"set the --allow-tell switch.\r\n"
        )
        conn.close()

    with fake_spamd(refuse_tell) as fake:
        files = [str(message)] * 5
        refused = spam_learn("--ham", "--spamd", fake, *files)
    assert refused.returncode == 1
    assert "69 EX_UNAVAILABLE Service Unavailable: TELL commands are not enabled" in refused.stderr
    assert "3 failed, 2 not tried after 3 failures in a row" in refused.stdout

    usage = spam_learn("--spamd", closed, str(message))
    assert usage.returncode == 2
    assert "say --spam, --ham or --forget" in usage.stderr
    both = spam_learn("--spam", "--ham", str(message))
    assert both.returncode == 2


# -- with real MTAs -------------------------------------------------------------------------


@pytest.mark.slow
def test_postfix_as_the_mta(tmp_path: Path, address: str) -> None:
    rules = rules_file(tmp_path / "spamassassin.yaml", address)
    port = peers.free_port()
    daemon = Daemon("spamassassin", f"inet:{port}@127.0.0.1", tmp_path / "daemon.log", rules=rules)
    daemon.start()
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            to = f"bob@{peers.DOMAIN}"
            with mta.smtp() as client:
                with pytest.raises(smtplib.SMTPDataError) as rejected:
                    client.sendmail("a@remote.example", [to], spam(to))
                client.sendmail("a@remote.example", [to], ham(to))
            assert rejected.value.smtp_code == 550
            assert b"5.7.1 Message rejected as spam" in rejected.value.smtp_error
            delivered = mta.wait_delivered(1)
            assert len(delivered) == 1
            assert peers.header_values(delivered[0], "X-Spam-Status")[0].startswith("No, score=")
            assert peers.header_values(delivered[0], "X-Spam-Score")
            assert peers.header_values(delivered[0], "X-Spam-Flag") == []
        assert re.search(r"INFO \w+: reject 550 5\.7\.1 Message rejected as spam", daemon.log())
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_in_the_core_chain(tmp_path: Path, address: str) -> None:
    rules = rules_file(tmp_path / "spamassassin.yaml", address)
    gateway = make_gateway(tmp_path)
    add_default_users(gateway)
    config = tmp_path / "mailgate.yaml"
    config.write_text(
        f"milters:\n  - name: spamassassin\n    daemon: spamassassin\n    rules: {rules}\n"
    )
    gateway.extra_args = ["--config", str(config)]
    gateway.start()
    alice = f"alice@{DOMAIN}"
    try:
        with gateway.smtp() as client:
            with pytest.raises(smtplib.SMTPDataError) as rejected:
                client.sendmail("a@remote.example", [alice], spam(alice))
            assert client.sendmail("a@remote.example", [alice], ham(alice)) == {}
        assert rejected.value.smtp_code == 550
        assert b"5.7.1 Message rejected as spam" in rejected.value.smtp_error
        delivered = gateway.wait_delivered(alice, 1)
        assert len(delivered) == 1
        assert peers.header_values(delivered[0], "X-Spam-Status")[0].startswith("No, score=")
        assert b"GTUBE" not in delivered[0]
    finally:
        gateway.stop()


# -- the rule file ------------------------------------------------------------------------


def mailgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate.core.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )


def test_shipped_rules_check_and_pass_their_tests() -> None:
    checked = mailgate("rules", "check", str(SHIPPED))
    assert checked.returncode == 0, checked.stderr
    assert "OK (spamassassin," in checked.stdout
    tested = mailgate("rules", "test", str(SHIPPED))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert re.search(r"^\d+ passed, 0 failed$", tested.stdout, re.MULTILINE)


def test_bad_settings_are_reported_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "daemon: spamassassin\nsettings:\n  address: 'spamd.example:0'\n  request: everything\n"
        "  max_size: lots\n  timeout: 0\n"
    )
    result = mailgate("rules", "check", str(path))
    assert result.returncode == 1
    assert re.search(r"bad\.yaml:3: settings\.address: .*port", result.stderr), result.stderr
    assert re.search(r"bad\.yaml:4: settings\.request", result.stderr), result.stderr
    assert re.search(r"bad\.yaml:5: settings\.max_size", result.stderr), result.stderr
    assert re.search(r"bad\.yaml:6: settings\.timeout", result.stderr), result.stderr
