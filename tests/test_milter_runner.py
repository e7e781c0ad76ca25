"""The shared daemon runner: sockets, logging, rule loading and reload, signals, the CLI.

Daemons run as real processes and are spoken to over the real milter protocol (the test
driver in daemon_milter_client.py). The adapter's error handling is also checked in
process, against a stand-in for libmilter's connection context.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import Milter
import pytest

from mailgate.milters.adapter import DaemonContext, PolicyMilter
from mailgate.milters.runner import DaemonError, parse_socket
from mailgate.policies.facts import MessageFacts
from mailgate.policies.verdict import Verdict

from conftest import free_port
from daemon_milter_client import (
    SMFIF_ADDHDRS,
    SMFIF_ADDRCPT,
    SMFIF_CHGHDRS,
    SMFIF_DELRCPT,
    SMFIF_QUARANTINE,
    SMFIP_NODATA,
    SMFIP_NOUNKNOWN,
    SMFIP_NR_BODY,
    SMFIP_NR_CONN,
    SMFIP_NR_EOH,
    SMFIP_NR_HDR,
    SMFIP_NR_HELO,
    SMFIP_NR_MAIL,
    SMFIP_NR_RCPT,
    MilterSession,
    run_message,
)
from daemon_process import Daemon, clean_env, run_cli

REJECT_SUBJECT = """\
daemon: content
rules:
  - name: no-{word}
    if: {{header: {{name: Subject, contains: {word}}}}}
    then: {{reject: {{code: 550, enhanced: 5.7.1, text: "no {word} here"}}}}
"""

BAD_RULES = """\
daemon: content
rules:
  - name: first
    if: {header: {name: Subject, contains: a}}
    then: {rejectt: "no"}
  - name: second
    if: {size: {over: lots}}
    then: accept
"""

LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} mailgate-milter/content\[(\d+)\]: "
    r"(DEBUG|INFO|WARNING|ERROR) (.*)$"
)


def subject(word: str) -> bytes:
    return f"Subject: {word}\r\nFrom: a@remote.example\r\n\r\nHi.\r\n".encode()


def rules_file(path: Path, word: str) -> Path:
    path.write_text(REJECT_SUBJECT.format(word=word))
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A content daemon on a unix socket whose rules reject the subject 'spam'."""
    proc = Daemon(
        "content",
        f"unix:{tmp_path / 'sock' / 'content.sock'}",
        tmp_path / "daemon.log",
        rules=rules_file(tmp_path / "rules.yaml", "spam"),
    )
    proc.start()
    yield proc
    if proc.process is not None and proc.process.poll() is None:
        proc.stop()


# -- the command line -------------------------------------------------------------------


def test_list_names_every_daemon_with_its_description() -> None:
    result = run_cli("--list")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^content\s+header, envelope and body rules", result.stdout, re.M)


def test_unknown_daemon_names_the_known_ones() -> None:
    result = run_cli("nosuch", "--socket", "inet:1@127.0.0.1")
    assert result.returncode == 2
    from mailgate.milters import registry

    known = ", ".join(entry.name for entry in registry.daemons())
    assert "content" in known
    assert f"unknown daemon 'nosuch'; known daemons: {known}" in result.stderr


def test_socket_is_required() -> None:
    result = run_cli("content")
    assert result.returncode == 2
    assert "--socket SPEC is required" in result.stderr


def test_bad_socket_spec_is_reported(tmp_path: Path) -> None:
    result = run_cli("content", "--socket", "tcp:25", "--rules", str(tmp_path / "x.yaml"))
    assert result.returncode == 1
    assert "'tcp:25': expected inet:PORT@HOST, inet6:PORT@HOST or unix:/path" in result.stderr


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("inet:10026@127.0.0.1", "inet:10026@127.0.0.1"),
        ("inet:127.0.0.1:10026", "inet:10026@127.0.0.1"),
        ("inet:10026", "inet:10026"),
        ("inet6:10026@::1", "inet6:10026@::1"),
        ("inet:[::1]:10026", "inet6:10026@::1"),
        ("unix:/run/mailgate/content.sock", "unix:/run/mailgate/content.sock"),
        ("local:/run/x.sock", "unix:/run/x.sock"),
    ],
)
def test_socket_spellings(spec: str, expected: str) -> None:
    assert parse_socket(spec).libmilter == expected


@pytest.mark.parametrize("spec", ["inet:0@127.0.0.1", "inet:99999@x", "inet:port@x", "unix:"])
def test_bad_socket_spellings(spec: str) -> None:
    with pytest.raises(DaemonError):
        parse_socket(spec)


def test_invalid_rules_stop_the_start_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RULES)
    result = run_cli("content", "--socket", f"unix:{tmp_path / 's.sock'}", "--rules", str(bad))
    assert result.returncode == 1
    assert f"{bad}:5: rules[0].then.rejectt: unknown key 'rejectt'" in result.stderr
    assert f"{bad}:7: rules[1].if.size.over: expected a number" in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_rules_of_another_daemon_are_refused(tmp_path: Path) -> None:
    rules = tmp_path / "spf.yaml"
    rules.write_text("daemon: spf\nrules: []\n")
    result = run_cli("content", "--socket", f"unix:{tmp_path / 's.sock'}", "--rules", str(rules))
    assert result.returncode == 1
    assert "these rules are for daemon 'spf', not 'content'" in result.stderr


def test_missing_rules_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("content", "--socket", f"unix:{tmp_path / 's.sock'}", "--rules", str(missing))
    assert result.returncode == 1
    assert f"{missing}: cannot read" in result.stderr


# -- sockets ------------------------------------------------------------------------------


def test_unix_socket_directory_permissions_and_cleanup(daemon: Daemon, tmp_path: Path) -> None:
    path = Path(str(daemon.address))
    assert path.parent.is_dir()
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert run_message(daemon.address, message=subject("spam")).action == "reject"
    assert daemon.stop() == 0
    assert not path.exists()


def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a crashed daemon leaves behind
    proc = Daemon(
        "content", f"unix:{path}", tmp_path / "d.log", rules=rules_file(tmp_path / "r.yaml", "spam")
    )
    proc.start()
    try:
        assert f"removed a stale socket {path}" in proc.log()
        assert run_message(str(path), message=subject("ok")).action == "accept"
    finally:
        assert proc.stop() == 0


def test_live_unix_socket_is_not_stolen(daemon: Daemon, tmp_path: Path) -> None:
    second = Daemon("content", daemon.socket, tmp_path / "second.log", rules=daemon.rules)
    second.start(wait_ready=False)
    assert second.wait_exit() == 1
    assert "another process is listening there" in second.log()
    assert run_message(daemon.address, message=subject("spam")).action == "reject"


def test_non_socket_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    rules = rules_file(tmp_path / "r.yaml", "spam")
    result = run_cli("content", "--socket", f"unix:{path}", "--rules", str(rules))
    assert result.returncode == 1
    assert "exists and is not a socket" in result.stderr
    assert path.read_text() == "data"


def test_inet_socket(tmp_path: Path) -> None:
    port = free_port()
    proc = Daemon(
        "content",
        f"inet:{port}@127.0.0.1",
        tmp_path / "d.log",
        rules=rules_file(tmp_path / "r.yaml", "spam"),
    )
    proc.start()
    try:
        assert f"ready on inet:{port}@127.0.0.1" in proc.log()
        assert run_message(("127.0.0.1", port), message=subject("spam")).action == "reject"
        busy = Daemon("content", f"inet:127.0.0.1:{port}", tmp_path / "busy.log", rules=proc.rules)
        busy.start(wait_ready=False)
        assert busy.wait_exit() == 1
        assert f"cannot listen on inet:{port}@127.0.0.1: the address is in use" in busy.log()
    finally:
        assert proc.stop() == 0


def test_inet6_socket(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = free_port()
    proc = Daemon(
        "content",
        f"inet6:{port}@::1",
        tmp_path / "d.log",
        rules=rules_file(tmp_path / "r.yaml", "spam"),
    )
    proc.start()
    try:
        result = run_message(
            ("::1", port),
            family=socket.AF_INET6,
            message=subject("spam"),
            client=("v6.example", "2001:db8::25"),
        )
        assert result.action == "reject"
    finally:
        assert proc.stop() == 0


def test_probe_connections_are_harmless(daemon: Daemon) -> None:
    """`mailgate serve` probes the socket before the first message; nothing else follows."""
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(daemon.address))
    assert run_message(daemon.address, message=subject("spam")).action == "reject"


# -- negotiation ---------------------------------------------------------------------------


def test_negotiates_only_what_it_uses(daemon: Daemon) -> None:
    with MilterSession(daemon.address) as session:
        assert session.version == 6
        assert session.actions == (
            SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_QUARANTINE
        )
        no_reply = (
            SMFIP_NR_CONN
            | SMFIP_NR_HELO
            | SMFIP_NR_MAIL
            | SMFIP_NR_RCPT
            | SMFIP_NR_HDR
            | SMFIP_NR_EOH
            | SMFIP_NR_BODY
        )
        assert session.protocol == no_reply | SMFIP_NODATA | SMFIP_NOUNKNOWN


def test_mta_without_no_reply_support_gets_replies(daemon: Daemon) -> None:
    with MilterSession(daemon.address, protocol=0) as session:
        assert session.protocol == 0
        assert session.connect() is not None
        assert session.helo("client.example") is not None
        result = session.send_message("a@remote.example", ["r@example.test"], subject("spam"))
    assert {reply.action for stage, reply in result.replies.items() if stage != "eom"} == {
        "continue"
    }
    assert result.action == "reject"


# -- logging ---------------------------------------------------------------------------------


def test_log_format_and_readiness_line(daemon: Daemon) -> None:
    lines = daemon.log().splitlines()
    match = LOG_LINE.match(lines[0])
    assert match, lines[0]
    assert int(match.group(1)) == daemon.process.pid  # type: ignore[union-attr]
    assert match.group(3).startswith(f"ready on {daemon.socket}: daemon content, rules ")
    assert match.group(3).endswith("rules.yaml (1 rule)")


# -- reload ------------------------------------------------------------------------------------


def test_sighup_with_good_rules_takes_effect(daemon: Daemon) -> None:
    assert run_message(daemon.address, message=subject("spam")).action == "reject"
    assert daemon.rules is not None
    rules_file(daemon.rules, "ham")
    part = daemon.reload()
    assert f"reloaded rules: {daemon.rules} (1 rule)" in part
    assert run_message(daemon.address, message=subject("spam")).action == "accept"
    result = run_message(daemon.address, message=subject("ham"))
    assert result.reply.text == "550 5.7.1 no ham here"


def test_sighup_with_bad_rules_keeps_the_old(daemon: Daemon) -> None:
    assert daemon.rules is not None
    daemon.rules.write_text(BAD_RULES)
    part = daemon.reload()
    assert f"ERROR {daemon.rules}:5: rules[0].then.rejectt: unknown key 'rejectt'" in part
    assert f"ERROR {daemon.rules}:7: rules[1].if.size.over: expected a number" in part
    assert "reload failed; the previous rules stay in force (1 rule, loaded " in part
    assert run_message(daemon.address, message=subject("spam")).action == "reject"
    # A later good file is picked up again.
    rules_file(daemon.rules, "ham")
    assert "reloaded rules" in daemon.reload()
    assert run_message(daemon.address, message=subject("ham")).action == "reject"


def test_sighup_with_a_vanished_file_keeps_the_old(daemon: Daemon) -> None:
    assert daemon.rules is not None
    daemon.rules.unlink()
    part = daemon.reload()
    assert f"{daemon.rules}: cannot read" in part
    assert "the previous rules stay in force" in part
    assert run_message(daemon.address, message=subject("spam")).action == "reject"


# -- stopping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown(daemon: Daemon, signum: int) -> None:
    run_message(daemon.address, message=subject("spam"))
    run_message(daemon.address, message=subject("ok"))
    started = time.monotonic()
    assert daemon.stop(signum) == 0
    assert time.monotonic() - started < 3
    log = daemon.log()
    assert f"{signal.Signals(signum).name}: stopping" in log
    assert log.rstrip().endswith("stopped: 2 messages: accept=1 reject=1")
    assert "Traceback" not in log


def _start_message(session: MilterSession) -> None:
    """Everything up to the end of the body (the daemon asked for no replies to these)."""
    session.connect()
    session.helo("client.example")
    session._send(b"M", b"<a@remote.example>\0")
    session._send(b"R", b"<r@example.test>\0")
    session._send(b"L", b"Subject\0spam\0")
    session._send(b"N")
    session._send(b"B", b"Hi.\r\n")


def test_message_in_flight_finishes_on_sigterm(daemon: Daemon) -> None:
    with MilterSession(daemon.address) as session:
        _start_message(session)
        daemon.wait_for("mail from=<a@remote.example>")  # the message is in flight
        daemon.send(signal.SIGTERM)
        daemon.wait_for("waiting up to 5s for 1 message in progress")
        # The socket still serves while the daemon waits.
        assert run_message(daemon.address, message=subject("ok")).action == "accept"
        session._send(b"E")
        reply = session._reply(collect=True)
    assert reply.text.startswith("550 5.7.1 no spam here")
    assert daemon.wait_exit() == 0
    assert "stopped: 2 messages: accept=1 reject=1" in daemon.log()


def test_second_signal_ends_the_wait(daemon: Daemon) -> None:
    with MilterSession(daemon.address) as session:
        _start_message(session)
        daemon.wait_for("mail from=<a@remote.example>")
        daemon.send(signal.SIGTERM)
        daemon.wait_for("waiting up to 5s")
        started = time.monotonic()
        daemon.send(signal.SIGINT)
        assert daemon.wait_exit() == 0
        assert time.monotonic() - started < 2
    assert "SIGINT again: stopping now" in daemon.log()


def test_grace_period_bounds_the_wait(tmp_path: Path) -> None:
    proc = Daemon(
        "content",
        f"unix:{tmp_path / 'c.sock'}",
        tmp_path / "d.log",
        rules=rules_file(tmp_path / "r.yaml", "spam"),
        extra_args=["--shutdown-grace", "0.5"],
    )
    proc.start()
    with MilterSession(proc.address) as session:
        _start_message(session)
        proc.wait_for("mail from=<a@remote.example>")
        started = time.monotonic()
        proc.send(signal.SIGTERM)
        assert proc.wait_exit() == 0
        assert 0.4 < time.monotonic() - started < 3
    assert "1 message still in progress after 0.5s; the MTA applies its default action" in (
        proc.log()
    )


# -- signals and libmilter's own signal thread ------------------------------------------------
#
# libmilter starts a sigwait() thread that stops the milter on SIGHUP, SIGTERM or SIGINT.
# The runner parks it, so the kernel can give those signals only to the runner, whichever
# thread it would have picked. Before that, a SIGHUP that reached libmilter's thread
# stopped the daemon, and a SIGTERM that did dropped the messages in progress.

# The three signals libmilter's thread waits for, as bits of a /proc signal mask.
LIBMILTER_MASK = sum(1 << (signum - 1) for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT))


def _sigwaiting(proc: Daemon) -> list[int]:
    """Threads other than the main one that have all three unblocked (in sigwait())."""
    assert proc.process is not None
    return [
        tid
        for tid, fields in proc.threads().items()
        if tid != proc.process.pid and int(fields["SigBlk"], 16) & LIBMILTER_MASK == 0
    ]


def test_no_libmilter_thread_is_left_waiting_for_the_signals(daemon: Daemon) -> None:
    assert "libmilter's signal thread" in daemon.log()
    assert "is parked" in daemon.log()
    assert _sigwaiting(daemon) == [], daemon.thread_report()


def test_sighup_to_every_thread_reloads_and_never_stops(daemon: Daemon) -> None:
    """Whichever thread the kernel picks for a SIGHUP, it is a reload, never a stop."""
    assert daemon.rules is not None
    rules_file(daemon.rules, "ham")
    start = len(daemon.log())
    daemon.signal_every_thread(signal.SIGHUP)
    daemon.wait_for("reloaded rules", after=start)
    # libmilter still serves, with the new rules, and the daemon is still there.
    assert run_message(daemon.address, message=subject("ham")).action == "reject"
    assert run_message(daemon.address, message=subject("spam")).action == "accept"
    assert daemon.process is not None and daemon.process.poll() is None
    assert daemon.stop() == 0
    assert "without being asked" not in daemon.log()


def test_sigterm_to_every_thread_lets_the_message_in_flight_finish(daemon: Daemon) -> None:
    with MilterSession(daemon.address) as session:
        _start_message(session)
        daemon.wait_for("mail from=<a@remote.example>")
        daemon.signal_every_thread(signal.SIGTERM)
        daemon.wait_for("waiting up to 5s for 1 message in progress")
        session._send(b"E")
        reply = session._reply(collect=True)
    assert reply.text.startswith("550 5.7.1 no spam here")
    assert daemon.wait_exit() == 0
    log = daemon.log()
    assert "SIGTERM: stopping" in log
    assert "stopped: 1 message: reject=1" in log


STRESS_DAEMONS = 6


def test_signals_back_to_back_under_load_reach_the_runner(tmp_path: Path) -> None:
    """Stress: a SIGHUP and a SIGTERM sent together, to daemons each with a message in flight.

    The second signal finds the main thread with one already pending, so the kernel offers
    it to another thread that can take it; libmilter's sigwait() thread could, and stopped
    the milter. Before the fix most of these messages were dropped; now every one gets its
    verdict and every daemon stops cleanly.
    """
    daemons = [
        Daemon(
            "content",
            f"unix:{tmp_path / f'd{n}' / 'c.sock'}",
            tmp_path / f"d{n}.log",
            rules=rules_file(tmp_path / f"r{n}.yaml", "spam"),
        )
        for n in range(STRESS_DAEMONS)
    ]
    sessions: list[MilterSession] = []
    try:
        for proc in daemons:
            proc.start(wait_ready=False)
        for proc in daemons:
            proc.wait_for("ready on", 20)
            session = MilterSession(proc.address)
            sessions.append(session)
            _start_message(session)
        for proc in daemons:
            proc.wait_for("mail from=<a@remote.example>")
        for proc in daemons:
            assert proc.process is not None
            # SIGSTOP/SIGCONT around the pair for half of them: both signals then wait
            # for whichever thread runs first (as after a stall on a loaded machine).
            stall = daemons.index(proc) % 2 == 1
            if stall:
                proc.process.send_signal(signal.SIGSTOP)
            proc.process.send_signal(signal.SIGHUP)
            proc.process.send_signal(signal.SIGTERM)
            if stall:
                proc.process.send_signal(signal.SIGCONT)
        outcomes = []
        for proc, session in zip(daemons, sessions, strict=True):
            with contextlib.suppress(AssertionError):
                proc.wait_for("waiting up to 5s for 1 message in progress", 3)
            try:
                session._send(b"E")
                text = session._reply(collect=True).text
            except OSError as exc:
                text = f"no verdict: {exc!r}"
            outcomes.append((text[:3], proc.wait_exit()))
        logs = "\n".join(proc.log() for proc in daemons)
        assert outcomes == [("550", 0)] * STRESS_DAEMONS, logs
        assert logs.count("SIGTERM: stopping") == STRESS_DAEMONS, logs
        assert "without being asked" not in logs
    finally:
        for session in sessions:
            session.sock.close()
        for proc in daemons:
            if proc.process is not None and proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait()


def test_libmilter_stopping_by_itself_exits_for_a_restart(tmp_path: Path) -> None:
    """Left alone (MAILGATE_MILTER_SIGNAL_THREAD=keep), libmilter's thread can take a
    SIGHUP and stop the milter: the runner notices, says so and exits with status 75, for
    the supervisor to start the daemon again."""
    proc = Daemon(
        "content",
        f"unix:{tmp_path / 'c.sock'}",
        tmp_path / "d.log",
        rules=rules_file(tmp_path / "r.yaml", "spam"),
        env=clean_env(MAILGATE_MILTER_SIGNAL_THREAD="keep"),
    )
    proc.start()
    try:
        assert "signal thread is not parked (MAILGATE_MILTER_SIGNAL_THREAD=keep)" in proc.log()
        deadline = time.monotonic() + 5
        while not (waiting := _sigwaiting(proc)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(waiting) == 1, proc.thread_report()
        proc.signal_thread(waiting[0], signal.SIGHUP)
        # A connection wakes libmilter's accept loop, which then sees it must stop.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as poke:
            poke.connect(str(proc.address))
        assert proc.wait_exit(10) == 75
    finally:
        if proc.process is not None and proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()
    log = proc.log()
    assert "libmilter stopped without being asked to" in log
    assert "exiting with status 75" in log
    assert "Traceback" not in log


# -- the adapter's error handling, in process ------------------------------------------------


class FakeContext:
    """What libmilter's connection context offers a Milter.Base, recorded."""

    def __init__(self, macros: dict[str, str] | None = None) -> None:
        self.macros = macros or {}
        self.priv: Any = None
        self.calls: list[tuple[Any, ...]] = []

    def getpriv(self) -> Any:
        return self.priv

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.calls.append((name, *args))

        return record


class Policy:
    def __init__(self, verdict: Verdict | Exception) -> None:
        self.verdict = verdict
        self.seen: list[MessageFacts] = []

    @property
    def current(self) -> Policy:
        return self

    def evaluate(self, facts: MessageFacts) -> Verdict:
        self.seen.append(facts)
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


def adapter(policy: Policy, body_limit: int = 1024) -> tuple[PolicyMilter, FakeContext]:
    context = DaemonContext(
        "test", policy, body_limit=body_limit, logger=logging.getLogger("test.adapter")
    )
    milter = PolicyMilter(context)
    ctx = FakeContext({"i": "4UNIT", "{auth_authen}": "alice"})
    milter._setctx(ctx)
    opts = [0x1FF, 0x1FFFFF, 0, 0]
    assert milter.negotiate(opts) == Milter.CONTINUE
    return milter, ctx


def feed(milter: PolicyMilter, body: bytes = b"Hi.\r\n") -> int:
    milter.connect("client.example", socket.AF_INET, ("192.0.2.10", 4000))
    milter.hello("helo.example")
    milter.envfrom_bytes(b"<a@remote.example>", b"SIZE=100")
    milter.envrcpt_bytes(b"<R@Example.test>")
    milter.header_bytes("Subject", b"two\r\n\tlines")
    milter.header_bytes("X-Bytes", b"caf\xe9")
    milter.eoh()
    for start in range(0, len(body), 500):
        milter.body(body[start : start + 500])
    return int(milter.eom())


def test_facts_gathered_from_the_callbacks() -> None:
    policy = Policy(Verdict("accept"))
    milter, _ = adapter(policy, body_limit=1000)
    body = b"x" * 2500
    assert feed(milter, body) == Milter.ACCEPT
    facts = policy.seen[0]
    assert (facts.client_ip, facts.client_name, facts.helo) == (
        "192.0.2.10",
        "client.example",
        "helo.example",
    )
    assert (facts.mail_from, facts.rcpt_tos, facts.auth_user) == (
        "a@remote.example",
        ["R@Example.test"],
        "alice",
    )
    assert facts.headers == [("Subject", "two lines"), ("X-Bytes", "caf\ufffd")]
    assert facts.body == b"x" * 1000
    assert facts.extra["body_truncated"] is True
    assert facts.size > 2500


def test_policy_exception_is_logged_and_tempfails(caplog: pytest.LogCaptureFixture) -> None:
    milter, ctx = adapter(Policy(RuntimeError("rules exploded")))
    with caplog.at_level(logging.ERROR, "test.adapter"):
        assert feed(milter) == Milter.TEMPFAIL
    assert "4UNIT: internal error at end of message; tempfail" in caplog.text
    assert "RuntimeError: rules exploded" in caplog.text  # the traceback
    assert ctx.calls == []


class Exploding(list[tuple[str, str]]):
    def append(self, item: tuple[str, str]) -> None:
        raise RuntimeError("header store broke")


def test_exception_in_a_no_reply_stage_tempfails_at_end_of_message(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = Policy(Verdict("accept"))
    milter, _ = adapter(policy)
    original = milter.header_bytes

    def broken(name: str, value: bytes) -> int:
        if name == "X-Bytes":
            milter.headers = Exploding()
        return int(original(name, value))

    monkeypatch.setattr(milter, "header_bytes", broken)
    with caplog.at_level(logging.ERROR, "test.adapter"):
        assert feed(milter) == Milter.TEMPFAIL
    assert "internal error in the header stage" in caplog.text
    assert "an earlier stage failed" in caplog.text
    assert policy.seen == []
    # The next message on the connection starts clean.
    milter.envfrom_bytes(b"<b@remote.example>")
    assert milter.eom() == Milter.ACCEPT


def test_reply_code_of_the_wrong_class_falls_back_to_the_default() -> None:
    milter, ctx = adapter(Policy(Verdict("tempfail", code=550, enhanced="5.1.1", text="x")))
    assert feed(milter) == Milter.TEMPFAIL
    assert ctx.calls == [("setreply", "451", "4.1.1", "x")]


def test_multi_line_reply_text() -> None:
    milter, ctx = adapter(Policy(Verdict("reject", text="first\nsecond")))
    assert feed(milter) == Milter.REJECT
    assert ctx.calls == [("setreply", "550", "5.7.1", "first", "second")]
