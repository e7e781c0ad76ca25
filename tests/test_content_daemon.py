"""The content daemon as a real process, spoken to over the real milter protocol.

Each verdict action of the rule language is checked as the MTA sees it: the reply frame,
the SMTP reply text, and the modification frames at end of message. The MTA side is the
test driver in daemon_milter_client.py, the core's own milter client, and Postfix.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from daemon_milter_client import (
    ALL_ACTIONS,
    SMFIF_QUARANTINE,
    MilterSession,
    run_message,
)
from daemon_process import REPO, Daemon, clean_env

RULES = """\
daemon: content
rules:
  - name: spam-tag
    if: {header: {name: Subject, contains: "cheap pills"}}
    then:
      - tag_subject: "[SPAM]"
      - add_header: {name: X-Spam-Flag, value: "YES"}
  - name: mark-first
    if: {header: {name: X-Test, is: insert}}
    then:
      - add_header: {name: X-Mailgate-First, value: "1", index: 0}
  - name: scrub-internal
    if: {exists: X-Internal}
    then:
      - change_header: {name: X-Internal, value: ""}
      - change_header: {name: X-Priority, value: "3", index: 2}
  - name: archive-authenticated
    if: {auth: true}
    then:
      - add_recipient: archive@example.test
  - name: redirect-abuse
    if: {envelope: {to: {is: abuse@example.test}}}
    then: [{redirect: [security@example.test]}, accept]
  - name: blocked-domain
    if: {envelope: {part: domain, from: {is: blocked.example}}}
    then: {reject: {code: 554, enhanced: 5.7.0, text: "Sender domain blocked (100% sure)"}}
  - name: slow-down
    if: {header: {name: Subject, contains: "try later"}}
    then: {tempfail: {code: 452, enhanced: 4.3.1, text: "Come back later"}}
  - name: blackhole
    if: {envelope: {to: {is: devnull@example.test}}}
    then: discard
  - name: macro-documents
    if: {attachment: {filename: {matches: "*.docm"}}}
    then: {quarantine: "macro document"}
  - name: too-big
    if: {size: {over: 300K}}
    then: {reject: {code: 552, enhanced: 5.3.4, text: "Message too big for this gateway"}}
  - name: fraud
    if: {body: {contains: "wire the money"}}
    then: reject
"""

PLAIN = b"Subject: hello\r\nFrom: a@remote.example\r\nTo: r@example.test\r\n\r\nHello there.\r\n"


def message(subject: str = "hello", body: str = "Hello there.\n", **headers: str) -> bytes:
    lines = [f"Subject: {subject}", "From: a@remote.example", "To: r@example.test"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One content daemon for the module, on a unix socket, with a 64K body limit."""
    tmp = tmp_path_factory.mktemp("content")
    rules = tmp / "content.yaml"
    rules.write_text(RULES)
    daemon = Daemon(
        "content",
        f"unix:{tmp / 'run' / 'content.sock'}",
        tmp / "daemon.log",
        rules=rules,
        extra_args=["--body-limit", "64K"],
    )
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def test_clean_message_is_accepted_untouched(content: Daemon) -> None:
    result = run_message(content.address, message=PLAIN)
    assert result.stage == "eom"
    assert result.action == "accept"
    assert result.modifications == []


def test_subject_tag_and_added_header(content: Daemon) -> None:
    result = run_message(content.address, message=message("cheap pills today"))
    assert result.action == "accept"
    assert result.headers_changed() == [(1, "Subject", "[SPAM] cheap pills today")]
    assert result.headers_added() == [("X-Spam-Flag", "YES")]


def test_inserted_header_goes_to_its_index(content: Daemon) -> None:
    result = run_message(content.address, message=message(X_Test="insert"))
    assert result.headers_inserted() == [(0, "X-Mailgate-First", "1")]


def test_changed_and_deleted_headers_name_their_occurrence(content: Daemon) -> None:
    raw = message(X_Internal="secret", X_Priority="1").replace(
        b"\r\n\r\n", b"\r\nX-Priority: 2\r\n\r\n", 1
    )
    result = run_message(content.address, message=raw)
    assert result.headers_changed() == [(1, "X-Internal", ""), (2, "X-Priority", "3")]


def test_recipient_added_for_authenticated_sender(content: Daemon) -> None:
    result = run_message(content.address, message=PLAIN, auth_user="alice")
    assert result.action == "accept"
    assert result.recipients_added() == ["<archive@example.test>"]
    assert result.recipients_deleted() == []
    # Without the {auth_authen} macro the rule does not apply.
    assert run_message(content.address, message=PLAIN).recipients_added() == []


def test_redirect_replaces_every_recipient(content: Daemon) -> None:
    result = run_message(
        content.address, rcpts=["abuse@example.test", "Other@Example.test"], message=PLAIN
    )
    assert result.action == "accept"
    assert sorted(result.recipients_deleted()) == ["<Other@Example.test>", "<abuse@example.test>"]
    assert result.recipients_added() == ["<security@example.test>"]


def test_reject_carries_the_rules_code_and_text(content: Daemon) -> None:
    result = run_message(content.address, mail_from="x@blocked.example", message=PLAIN)
    assert result.action == "reject"
    # libmilter's text is a format string: '%' travels doubled, the MTA undoubles it.
    assert result.reply.text == "554 5.7.0 Sender domain blocked (100%% sure)"
    assert result.modifications == []


def test_reject_without_text_uses_the_default_reply(content: Daemon) -> None:
    result = run_message(content.address, message=message(body="please wire the money\n"))
    assert result.reply.text == "550 5.7.1 Command rejected"


def test_tempfail_carries_the_rules_code(content: Daemon) -> None:
    result = run_message(content.address, message=message("please try later"))
    assert result.action == "tempfail"
    assert result.reply.action == "replycode"
    assert result.reply.text == "452 4.3.1 Come back later"


def test_discard(content: Daemon) -> None:
    result = run_message(content.address, rcpts=["devnull@example.test"], message=PLAIN)
    assert result.reply.action == "discard"


def _with_attachment(filename: str) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = "the report"
    msg["From"] = "a@remote.example"
    msg.set_content("See attached.")
    msg.add_attachment(
        b"PK\x03\x04 fake", maintype="application", subtype="octet-stream", filename=filename
    )
    return msg.as_bytes()


def test_quarantine_reason_and_accept(content: Daemon) -> None:
    result = run_message(content.address, message=_with_attachment("report.docm"))
    assert result.reply.action == "accept"
    assert result.quarantine_reason() == "macro document"


def test_quarantine_not_granted_by_the_mta_tempfails(content: Daemon) -> None:
    # Delivering a message a rule wanted held would be worse than asking to retry.
    result = run_message(
        content.address,
        message=_with_attachment("report.docm"),
        actions=ALL_ACTIONS & ~SMFIF_QUARANTINE,
        queue_id="4NOQUAR",
    )
    assert result.reply.action == "tempfail"
    assert "4NOQUAR: tempfail: the verdict needs milter actions 0x20" in content.log()


def test_size_counts_the_whole_body_beyond_the_body_limit(content: Daemon) -> None:
    big = message(body=("x" * 76 + "\n") * 5000)  # ~390 KB; only 64 KB are kept
    result = run_message(content.address, message=big, queue_id="4BIG")
    assert result.reply.text == "552 5.3.4 Message too big for this gateway"
    assert re.search(r"4BIG: reject 552 .* size=39\d{4} rules=too-big", content.log())


def test_body_rules_see_the_decoded_text(content: Daemon) -> None:
    msg = EmailMessage()
    msg["Subject"] = "invoice"
    msg.set_content("Please wire the money today.", cte="base64")
    result = run_message(content.address, message=msg.as_bytes())
    assert result.action == "reject"


def test_several_messages_on_one_connection_do_not_share_state(content: Daemon) -> None:
    with MilterSession(content.address) as session:
        session.connect()
        session.helo("client.example")
        first = session.send_message(
            "a@remote.example", ["abuse@example.test"], message("cheap pills")
        )
        second = session.send_message("a@remote.example", ["r@example.test"], PLAIN)
        session.abort()
        third = session.send_message("x@blocked.example", ["r@example.test"], PLAIN)
    assert first.recipients_added() == ["<security@example.test>"]
    assert first.headers_changed() == [(1, "Subject", "[SPAM] cheap pills")]
    assert second.action == "accept" and second.modifications == []
    assert third.action == "reject"


def test_every_message_line_carries_the_queue_id(content: Daemon) -> None:
    run_message(content.address, message=message("cheap pills"), queue_id="4QID7")
    line = next(line for line in content.log().splitlines() if "INFO 4QID7" in line)
    assert re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} mailgate-milter/content\[\d+\]: INFO 4QID7: accept "
        r"\(change Subject\[1\], add X-Spam-Flag\); from=<sender@remote.example> "
        r"to=<rcpt@example.test> size=\d+ rules=spam-tag$",
        line,
    ), line


def test_shipped_rules_are_the_default(tmp_path: Path) -> None:
    """Without --rules the daemon runs rules/content.yaml as shipped with the package."""
    daemon = Daemon("content", f"unix:{tmp_path / 'c.sock'}", tmp_path / "daemon.log")
    daemon.start()
    try:
        match = re.search(r"rules (\S+content\.yaml) \(", daemon.log())
        assert match, daemon.log()
        # Found through the installed package (a link to the shipped file in development).
        shipped = (REPO / "rules" / "content.yaml").resolve()
        assert Path(match.group(1)).resolve() == shipped
        exe = (REPO / "rules" / "tests" / "exe-attachment.eml").read_bytes()
        result = run_message(daemon.address, message=exe)
        assert result.quarantine_reason() == "executable attachment"
        clean = (REPO / "rules" / "tests" / "clean-pdf.eml").read_bytes()
        assert run_message(daemon.address, message=clean).modifications == []
    finally:
        assert daemon.stop() == 0


def test_rules_dir_override(tmp_path: Path) -> None:
    rules_dir = tmp_path / "myrules"
    rules_dir.mkdir()
    (rules_dir / "content.yaml").write_text(
        "daemon: content\nrules:\n  - name: all\n    then: discard\n"
    )
    daemon = Daemon(
        "content",
        f"unix:{tmp_path / 'c.sock'}",
        tmp_path / "daemon.log",
        env=clean_env(MAILGATE_RULES_DIR=str(rules_dir)),
    )
    daemon.start()
    try:
        assert run_message(daemon.address, message=PLAIN).reply.action == "discard"
    finally:
        assert daemon.stop() == 0


def test_core_milter_client_against_the_daemon(content: Daemon) -> None:
    """The core's own MTA side (mailgate.core.milter) drives the daemon end to end."""
    from mailgate.core.milter import events as ev
    from mailgate.core.milter.client import MilterConnection

    async def exchange() -> tuple[object, ...]:
        conn = MilterConnection("content", f"unix:{content.address}")
        await conn.open()
        try:
            await conn.connect("client.example", b"4", 40000, "192.0.2.10")
            await conn.helo("client.example")
            await conn.mail(["<a@remote.example>"], macros=[("{auth_authen}", "alice")])
            await conn.rcpt(["<abuse@example.test>"])
            await conn.data()
            outcome = await conn.message(
                [("Subject", " cheap pills"), ("From", " a@remote.example")],
                b"Hello.\r\n",
                eom_macros=[("i", "4CORE1")],
            )
        finally:
            await conn.close()
        return outcome.decision, outcome.modifications

    decision, modifications = asyncio.run(exchange())
    assert isinstance(decision, ev.Accept)
    # The redirect replaces every recipient, the archive copy added before it included.
    assert modifications == (
        ev.ChangeHeader(1, "Subject", "[SPAM] cheap pills"),
        ev.AddHeader("X-Spam-Flag", "YES"),
        ev.DeleteRecipient("<abuse@example.test>"),
        ev.AddRecipient("<security@example.test>"),
    )
    assert "4CORE1: accept" in content.log()


@pytest.mark.slow
def test_postfix_as_the_mta(tmp_path: Path) -> None:
    """Postfix (the reference MTA) in front of the daemon: tag, reject, quarantine (hold)."""
    import smtplib

    import peers

    rules = tmp_path / "content.yaml"
    rules.write_text(RULES)
    port = peers.free_port()
    daemon = Daemon("content", f"inet:{port}@127.0.0.1", tmp_path / "daemon.log", rules=rules)
    daemon.start()
    try:
        with peers.postfix_with_milter(tmp_path, f"inet:127.0.0.1:{port}") as mta:
            with mta.smtp() as client:
                client.sendmail(
                    "a@remote.example", ["r@test.example"], message("cheap pills for you")
                )
                with pytest.raises(smtplib.SMTPDataError) as rejected:
                    client.sendmail("x@blocked.example", ["r@test.example"], PLAIN)
                client.sendmail("a@remote.example", ["r@test.example"], _with_attachment("q.docm"))
            assert rejected.value.smtp_code == 554
            assert b"5.7.0 Sender domain blocked (100% sure)" in rejected.value.smtp_error
            delivered = mta.wait_delivered(1)
            assert b"Subject: [SPAM] cheap pills for you" in delivered[0]
            assert b"X-Spam-Flag: YES" in delivered[0]
            held = mta.wait_held(1)
            assert len(held) == 1
            assert f"{held[0]}: milter-hold: END-OF-MESSAGE" in mta.log()
        # Postfix's queue ids reach the daemon's log lines; the reason is logged there.
        assert f"INFO {held[0]}: quarantine (macro document)" in daemon.log()
    finally:
        assert daemon.stop() == 0
