"""Proof that each real-peer fixture in peers.py works end to end.

Each test starts real Debian programs (Postfix, Sendmail, opendkim, clamd + clamav-milter,
spamd + spamass-milter) on loopback ports, passes mail through them with a small pymilter
milter or the third-party milter, and checks what came out. After every test no process
that peers.py started may be left running.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

import peers

SENDER = f"alice@{peers.DOMAIN}"
RECIPIENT = f"bob@{peers.DOMAIN}"


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every daemon a test started is stopped, with its whole process group, by the end."""
    before = peers.started_groups()
    yield
    running = peers.running_daemons(exclude=before)
    leftovers = peers.leftover_processes(exclude=before)
    peers.stop_all(exclude=before)
    assert not running, f"daemons still running: {[d.name for d in running]}"
    assert not leftovers, "processes left behind:\n" + "\n".join(leftovers)


@pytest.fixture
def header_milter(tmp_path: Path) -> Iterator[peers.PyMilter]:
    with peers.header_milter(tmp_path) as milter:
        yield milter


def refusal(client: smtplib.SMTP, data: bytes) -> tuple[int, str]:
    """Send one message that must be refused; the (code, text) of the refusal."""
    try:
        client.sendmail(SENDER, [RECIPIENT], data)
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = exc.recipients[RECIPIENT]
        return code, text.decode()
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        return exc.smtp_code, error.decode() if isinstance(error, bytes) else error
    pytest.fail("the message was accepted")


def unused_milter_socket() -> str:
    """A Postfix-form milter socket on which nothing listens."""
    return f"inet:127.0.0.1:{peers.free_port()}"


# --- the SMTP sink and small helpers ---------------------------------------------------


def test_smtp_sink_records_envelope_and_data(tmp_path: Path) -> None:
    with peers.smtp_sink(tmp_path) as sink, smtplib.SMTP(sink.host, sink.port, timeout=10) as c:
        c.ehlo("client.test.example")
        data = peers.message(body="line one\r\n.leading dot\r\n")
        c.sendmail(SENDER, [RECIPIENT, f"carol@{peers.DOMAIN}"], data)
        [received] = sink.wait_for(1)
    assert received.mail_from == SENDER
    assert received.rcpt_tos == (RECIPIENT, f"carol@{peers.DOMAIN}")
    assert received.helo == "client.test.example"
    assert received.data == data  # dot-stuffing undone, CRLF kept
    assert (tmp_path / "sink" / "0001.eml").read_bytes() == data


def test_smtp_sink_can_refuse_data(tmp_path: Path) -> None:
    with peers.smtp_sink() as sink, smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        sink.data_reply = "451 4.3.0 try again later"
        assert refusal(client, peers.message()) == (451, "4.3.0 try again later")
    assert sink.messages == []


def test_socket_spec_spellings() -> None:
    assert peers.postfix_spec("inet:10026@127.0.0.1") == "inet:127.0.0.1:10026"
    assert peers.postfix_spec("inet:127.0.0.1:10026") == "inet:127.0.0.1:10026"
    assert peers.pymilter_spec("inet:127.0.0.1:10026") == "inet:10026@127.0.0.1"
    assert peers.pymilter_spec("unix:/run/m.sock") == "unix:/run/m.sock"


def test_missing_program_names_the_package() -> None:
    with pytest.raises(peers.PeerUnavailable, match="'no-such-package'"):
        peers.require("/usr/sbin/no-such-program", "no-such-package")


# --- Postfix ----------------------------------------------------------------------------


@pytest.mark.slow
def test_postfix_delivers_with_the_milters_header(
    tmp_path: Path, header_milter: peers.PyMilter
) -> None:
    with peers.postfix_with_milter(tmp_path, header_milter.postfix_socket) as mta:
        with mta.smtp() as client:
            client.sendmail(SENDER, [RECIPIENT], peers.message(subject="through postfix"))
        [delivered] = mta.wait_delivered(1)
    assert peers.header_values(delivered, "X-Peer-Test") == ["yes"]
    assert peers.header_values(delivered, "Subject") == ["through postfix"]
    assert peers.header_values(delivered, "Delivered-To") == [RECIPIENT]
    assert "eom accept" in header_milter.log()
    assert "status=sent (delivered to maildir)" in mta.log()


@pytest.mark.slow
def test_postfix_tempfails_while_the_milter_is_down(tmp_path: Path) -> None:
    with peers.postfix_with_milter(tmp_path, unused_milter_socket()) as mta:
        assert mta.milters[0].startswith("inet:127.0.0.1:")
        with mta.smtp() as client:
            code, text = refusal(client, peers.message())
        assert mta.delivered() == []
    assert code == 451
    assert text.startswith("4.7.1")


@pytest.mark.slow
def test_postfix_default_action_accept_lets_mail_through(tmp_path: Path) -> None:
    with peers.postfix_with_milter(
        tmp_path, unused_milter_socket(), default_action="accept"
    ) as mta:
        with mta.smtp() as client:
            client.sendmail(SENDER, [RECIPIENT], peers.message())
        [delivered] = mta.wait_delivered(1)
    assert peers.header_values(delivered, "X-Peer-Test") == []


@pytest.mark.slow
def test_postfix_holds_what_the_milter_quarantines(tmp_path: Path) -> None:
    with (
        peers.header_milter(tmp_path, action="quarantine") as milter,
        peers.postfix_with_milter(tmp_path, milter.pymilter_socket) as mta,
    ):
        with mta.smtp() as client:
            client.sendmail(SENDER, [RECIPIENT], peers.message())
        [queue_id] = mta.wait_held(1)
        assert mta.delivered() == []
        assert "X-Peer-Test: yes" in mta.postcat(queue_id)
        [entry] = mta.queue()
        assert entry["queue_name"] == "hold"
        assert entry["sender"] == SENDER
        mta.release(queue_id)
        [delivered] = mta.wait_delivered(1)
        assert mta.held() == []
    assert peers.header_values(delivered, "X-Peer-Test") == ["yes"]


@pytest.mark.slow
def test_postfix_relays_other_domains_to_a_sink(
    tmp_path: Path, header_milter: peers.PyMilter
) -> None:
    with (
        peers.smtp_sink() as sink,
        peers.postfix_with_milter(tmp_path, header_milter.postfix_socket, relay_to=sink) as mta,
    ):
        with mta.smtp() as client:
            client.sendmail(SENDER, ["dave@elsewhere.example"], peers.message())
        [relayed] = sink.wait_for(1)
    assert relayed.rcpt_tos == ("dave@elsewhere.example",)
    assert peers.header_values(relayed.data, "X-Peer-Test") == ["yes"]


# --- Sendmail ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sendmail_relays_with_the_milters_header(
    tmp_path: Path, header_milter: peers.PyMilter
) -> None:
    with peers.sendmail_with_milter(tmp_path, header_milter.pymilter_socket) as mta:
        with mta.smtp() as client:
            client.sendmail(SENDER, [RECIPIENT], peers.message(subject="through sendmail"))
        [delivered] = mta.wait_delivered(1)
        [envelope] = mta.sink.messages
    assert peers.header_values(delivered, "X-Peer-Test") == ["yes"]
    [received] = peers.header_values(delivered, "Received")
    assert f"by {peers.SENDMAIL_HOSTNAME} (8.17" in received
    assert envelope.mail_from == SENDER
    assert envelope.rcpt_tos == (RECIPIENT,)
    assert "eom accept" in header_milter.log()


@pytest.mark.slow
def test_sendmail_tempfails_while_the_milter_is_down(tmp_path: Path) -> None:
    with peers.sendmail_with_milter(tmp_path, unused_milter_socket()) as mta:
        with mta.smtp() as client:
            code, text = refusal(client, peers.message())
        assert mta.delivered() == []
    assert (code, text) == (451, "4.3.2 Please try again later")


@pytest.mark.slow
def test_sendmail_quarantines_and_chains_two_milters(tmp_path: Path) -> None:
    with (
        peers.header_milter(tmp_path, action="quarantine") as milter,
        peers.opendkim_signer(tmp_path) as signer,
        peers.sendmail_with_milter(
            tmp_path, [milter.pymilter_socket, signer.postfix_socket]
        ) as mta,
    ):
        assert mta.milters == [milter.pymilter_socket, signer.pymilter_socket]
        with mta.smtp() as client:
            client.sendmail(SENDER, [RECIPIENT], peers.message())
        quarantined = mta.queue(quarantined=True)
        assert "QUARANTINE: held by the peer test milter" in quarantined
        assert mta.delivered() == []


# --- OpenDKIM ---------------------------------------------------------------------------


@pytest.mark.slow
def test_opendkim_signs_through_postfix_and_the_signature_verifies(tmp_path: Path) -> None:
    with (
        peers.opendkim_signer(tmp_path) as signer,
        peers.opendkim_verifier(tmp_path, signer.dns_records) as verifier,
        # Postfix runs the milters in order; the verifier sees the signer's header.
        peers.postfix_with_milter(
            tmp_path, [signer.postfix_socket, verifier.postfix_socket]
        ) as mta,
    ):
        assert signer.pymilter_socket == f"inet:{signer.port}@127.0.0.1"
        assert signer.postfix_socket == f"inet:127.0.0.1:{signer.port}"
        with mta.smtp() as client:
            client.sendmail(SENDER, [RECIPIENT], peers.message())
            client.sendmail(
                "eve@other.example",
                [RECIPIENT],
                peers.message(sender="eve@other.example", subject="not ours to sign"),
            )
        ours, theirs = mta.wait_delivered(2)
    assert signer.dns_name == "sel1._domainkey.test.example"
    assert signer.public_key_record.startswith("v=DKIM1;")
    assert "p=MII" in signer.public_key_record
    [signature] = peers.header_values(ours, "DKIM-Signature")
    assert "d=test.example;" in signature
    assert "s=sel1;" in signature
    [results] = peers.header_values(ours, "Authentication-Results")
    assert results.startswith(f"{verifier.authserv_id};")
    assert "dkim=pass" in results
    assert peers.header_values(theirs, "DKIM-Signature") == []


# --- clamav-milter and spamass-milter ----------------------------------------------------


@pytest.mark.slow
def test_clamd_finds_eicar(tmp_path: Path) -> None:
    with peers.clamd_server(tmp_path) as clamd:
        assert clamd.ping()
        assert clamd.scan(peers.EICAR) == "stream: Test.EICAR.NDB.UNOFFICIAL FOUND"
        assert clamd.scan(b"harmless") == "stream: OK"


@pytest.mark.slow
def test_clamav_milter_rejects_eicar_through_postfix(tmp_path: Path) -> None:
    with (
        peers.clamav_milter(tmp_path) as milter,
        peers.postfix_with_milter(tmp_path, milter.postfix_socket) as mta,
    ):
        with mta.smtp() as client:
            code, text = refusal(client, peers.eicar_message())
            client.sendmail(SENDER, [RECIPIENT], peers.message())
        [clean] = mta.wait_delivered(1)
        assert "infected by Test.EICAR" in milter.log()
    assert (code, text[:5]) == (550, "5.7.1")
    assert peers.header_values(clean, "X-Virus-Status") == ["Clean"]


@pytest.mark.slow
def test_clamav_milter_quarantine_puts_eicar_on_hold(tmp_path: Path) -> None:
    with (
        peers.clamav_milter(tmp_path, on_infected="Quarantine") as milter,
        peers.postfix_with_milter(tmp_path, milter.postfix_socket) as mta,
    ):
        with mta.smtp() as client:
            client.sendmail(SENDER, [RECIPIENT], peers.eicar_message())
        [queue_id] = mta.wait_held(1)
        assert "X-Virus-Status: Infected (Test.EICAR" in mta.postcat(queue_id)
        assert mta.delivered() == []


@pytest.mark.slow
def test_spamass_milter_rejects_gtube_through_postfix(tmp_path: Path) -> None:
    with (
        peers.spamass_milter(tmp_path, reject_score=15) as milter,
        peers.postfix_with_milter(tmp_path, milter.postfix_socket) as mta,
    ):
        assert milter.spamd is not None
        assert "Spam: True ; 1000.0 / 5.0" in milter.spamd.check(peers.message(body=peers.GTUBE))
        with mta.smtp() as client:
            code, text = refusal(client, peers.message(body=peers.GTUBE + b"\r\n"))
            client.sendmail(SENDER, [RECIPIENT], peers.message())
        [clean] = mta.wait_delivered(1)
    assert code == 550
    assert text.startswith("5.7.1")
    [status] = peers.header_values(clean, "X-Spam-Status")
    assert status.startswith("No, score=")
