"""The six policy daemons behind a real Sendmail 8.17, attached with INPUT_MAIL_FILTER.

Each daemon runs as a real process (`mailgate milter NAME`, tests/daemon_process.py) on a
loopback TCP socket, and a private Sendmail (tests/peers.py: unpacked from Debian's
packages, relaying everything to an SMTP sink) uses it as its only milter, as
docs/daemon-NAME.md tells an operator to. The tests speak SMTP to Sendmail with smtplib and
judge Sendmail's own replies: each daemon's characteristic refusal, passed through (or, for
a 421 at connect, answered in Sendmail's own words), and a message that passes, delivered
to the sink with the daemon's headers. The setups copy those of the daemons' Postfix tests
(test_dnsbl.py, test_greylist.py, test_ratelimit.py, test_clamav_daemon.py,
test_spamassassin_daemon.py, test_quota.py). The loopback DNS server, clamd and spamd are
shared by the module; each test has its own daemon and its own Sendmail.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnsserver import TestDnsServer, dns_server

from mailgate.core.spool.maildir import mailbox_path
from mailgate.core.users.sqlite import SQLiteUserStore

import peers
from daemon_process import REPO, Daemon

SENDER = "a@remote.example"
RCPT = f"r@{peers.DOMAIN}"

# 127.0.0.1, where both smtplib and Sendmail connect from, is listed in bl.test.example.
ZONE = """
$ORIGIN test.example.
$TTL 300
@                 IN SOA ns.test.example. hostmaster.test.example. 1 3600 600 86400 60
1.0.0.127.bl      IN A 127.0.0.2
"""


def shipped_rules(name: str) -> dict[str, Any]:
    """The shipped rule file of a daemon, without its `tests:`."""
    data: dict[str, Any] = yaml.safe_load((REPO / "rules" / f"{name}.yaml").read_text())
    data.pop("tests", None)
    return data


def write_rules(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


#: The `F=` of each daemon's INPUT_MAIL_FILTER line in docs/daemon-NAME.md, as the
#: fixture's default_action: no `F=` (Sendmail goes on without the filter) or `F=T`.
DOCUMENTED_FLAGS = {
    "dnsbl": "accept",
    "greylist": "accept",
    "ratelimit": "accept",
    "clamav": "tempfail",
    "spamassassin": "accept",
    "quota": "tempfail",
}


@contextlib.contextmanager
def behind_sendmail(tmp: Path, name: str, rules: Path) -> Iterator[tuple[Daemon, peers.Sendmail]]:
    """The daemon `name` on a loopback port, and a Sendmail with it as INPUT_MAIL_FILTER."""
    daemon = Daemon(
        name, f"inet:{peers.free_port()}@{peers.HOST}", tmp / f"{name}.log", rules=rules
    )
    daemon.start()
    try:
        with peers.sendmail_with_milter(
            tmp, daemon.socket, default_action=DOCUMENTED_FLAGS[name]
        ) as mta:
            yield daemon, mta
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log()


@pytest.fixture(autouse=True)
def no_processes_left() -> Iterator[None]:
    """Every Sendmail (and its children) a test started is gone when it ends."""
    before = peers.started_groups()  # the module's clamd and spamd are started by now
    yield
    assert peers.leftover_processes(before) == []


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDnsServer]:
    with dns_server(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Clamd]:
    with peers.clamd_server(tmp_path_factory.mktemp("clamd")) as server:
        yield server


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Spamd]:
    with peers.spamd_server(tmp_path_factory.mktemp("spamd")) as server:
        yield server


# -- dnsbl ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dnsbl(dns: TestDnsServer, tmp_path: Path) -> None:
    settings = {
        "dns": {"nameservers": [dns.address], "timeout": 2.0},
        "deadline": 3.0,
        "decide_at": "rcpt",
        "skip_networks": [],  # loopback is looked up like any client
        "zones": [{"zone": "bl.test.example", "weight": 3, "codes": ["127.0.0.2"]}],
    }
    rules = [
        {
            "name": "stamp",
            "if": True,
            "then": [
                {"add_header": {"name": "X-Test-Score", "value": "${dnsbl_score}"}},
                "continue",
            ],
        },
        {
            "name": "postmaster",
            "if": {"envelope": {"part": "localpart", "to": {"is": "postmaster"}}},
            "then": "accept",
        },
        {
            "name": "listed",
            "if": {"fact": {"name": "dnsbl_score", "over": 2}},
            "then": {
                "reject": {
                    "code": 554,
                    "enhanced": "5.7.1",
                    "text": "Client [${client_ip}] blocked using ${dnsbl}",
                }
            },
        },
    ]
    path = write_rules(
        tmp_path / "dnsbl.yaml", {"daemon": "dnsbl", "settings": settings, "rules": rules}
    )
    postmaster = f"postmaster@{peers.DOMAIN}"
    message = peers.message(sender=SENDER, recipient=RCPT, subject="dnsbl via sendmail")
    with behind_sendmail(tmp_path, "dnsbl", path) as (daemon, mta):
        with mta.smtp() as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail(SENDER, [RCPT], message)
            assert client.sendmail(SENDER, [postmaster], message) == {}
        code, text = refused.value.recipients[RCPT]
        assert (code, text) == (554, b"5.7.1 Client [127.0.0.1] blocked using bl.test.example")
        delivered = mta.sink.wait_for(1)
        assert [m.rcpt_tos for m in delivered] == [(postmaster,)], mta.log()
        assert peers.header_values(delivered[0].data, "X-Test-Score") == ["3"]
    assert "listed on bl.test.example (127.0.0.2) weight 3" in daemon.log()
    assert dns.resolver.count("1.0.0.127.bl.test.example", "A") >= 1


# -- greylist ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_greylist(dns: TestDnsServer, tmp_path: Path) -> None:
    settings = {
        "delay": 1,
        "retry_window": 60,
        "expiry": 600,
        "dnswl_zones": ["dnswl.test.example"],  # NXDOMAIN for 127.0.0.1: not allowed
        "store": {"path": str(tmp_path / "greylist.sqlite")},
        "dns": {"nameservers": [dns.address], "timeout": 1},
    }
    rules = [
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
    path = write_rules(
        tmp_path / "greylist.yaml", {"daemon": "greylist", "settings": settings, "rules": rules}
    )
    message = peers.message(sender=SENDER, recipient=RCPT, subject="greylisted")
    with behind_sendmail(tmp_path, "greylist", path) as (daemon, mta):
        with mta.smtp() as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SENDER, [RCPT], message)
        code, text = refused.value.recipients[RCPT]
        assert code == 451
        found = re.fullmatch(rb"4\.7\.1 Greylisted: try again in (\d+)s \(127\.0\.0\.0/24\)", text)
        assert found, text
        # Retry the way a sending MTA does: once the wait the reply named is over.
        time.sleep(int(found[1]) + 0.5)
        with mta.smtp() as client:
            assert client.sendmail(SENDER, [RCPT], message) == {}
        delivered = mta.wait_delivered(1)
        assert len(delivered) == 1 and b"Subject: greylisted" in delivered[0], mta.log()
    assert "greylist passed" in daemon.log()


# -- ratelimit --------------------------------------------------------------------------------


def open_session(mta: peers.Sendmail) -> tuple[str, bytes | None]:
    """Connect and read Sendmail's greeting. After a 220, QUIT (None is returned with it);
    after anything else, everything Sendmail sends until it closes the connection."""
    with socket.create_connection((mta.host, mta.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline().decode().rstrip("\r\n")
        if greeting.startswith("220 "):
            sock.sendall(b"QUIT\r\n")
            reader.readline()
            return greeting, None
        return greeting, reader.read()  # a timeout here: Sendmail kept the session open


@pytest.mark.slow
def test_ratelimit(tmp_path: Path) -> None:
    data = shipped_rules("ratelimit")
    # Sendmail connects from loopback, which the shipped first rule exempts.
    assert data["rules"][0]["name"] == "trusted-networks"
    del data["rules"][0]
    connections = 5
    data["settings"] = {
        "client_ip": {
            "connections": {"count": connections, "window": 600},
            "messages": {"count": 2, "window": 600},
            "recipients": {"count": 1000, "window": 600},
        },
        "store": {"path": str(tmp_path / "ratelimit.sqlite"), "timeout": 1},
    }
    path = write_rules(tmp_path / "ratelimit.yaml", data)
    message = peers.message(sender=SENDER, recipient=RCPT, subject="counted")
    with behind_sendmail(tmp_path, "ratelimit", path) as (daemon, mta):
        # Messages: a 451 from the daemon at MAIL is Sendmail's reply, word for word.
        with mta.smtp() as client:
            for _ in range(2):
                assert client.sendmail(SENDER, [RCPT], message) == {}
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail(SENDER, [RCPT], message)
            assert client.noop()[0] == 250  # the session goes on
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error.startswith(
            b"4.7.1 Rate limit exceeded (client 127.0.0.1/32: 2 messages in 600 s (limit 2)); "
            b"try again in "
        )
        assert len(mta.wait_delivered(2)) == 2, mta.log()

        # Connections: Sendmail's readiness probe and the session above counted already.
        # Over the limit the daemon answers 421 at connect; Sendmail does not pass that
        # reply on but greets with its own 421 and closes the connection.
        sessions = [open_session(mta) for _ in range(connections)]
        greeted = [greeting.startswith("220 ") for greeting, _ in sessions].count(True)
        refused_sessions = sessions[greeted:]
        # The first ones greeted, then every one refused.
        assert 1 <= greeted < connections and refused_sessions, sessions
        assert all(greeting.startswith("220 ") for greeting, _ in sessions[:greeted])
        for greeting, rest in refused_sessions:
            assert greeting == f"421 4.7.0 {peers.SENDMAIL_HOSTNAME} closing connection"
            assert rest == b""  # closed right after the greeting
    log = daemon.log()
    assert "tempfail at connect: 421 4.7.0 Too many connections (client 127.0.0.1/32: " in log
    assert log.count("tempfail at connect: 421") == len(refused_sessions)


# -- clamav -----------------------------------------------------------------------------------

EICAR_NAME = "Test.EICAR.NDB.UNOFFICIAL"


@pytest.mark.slow
def test_clamav(clamd: peers.Clamd, tmp_path: Path) -> None:
    data = shipped_rules("clamav")
    data["settings"]["clamd"] = f"tcp:{clamd.host}:{clamd.port}"
    path = write_rules(tmp_path / "clamav.yaml", data)
    clean = peers.message(sender=SENDER, recipient=RCPT, subject="clean one")
    infected = peers.eicar_message(sender=SENDER, recipient=RCPT, subject="infected one")
    with behind_sendmail(tmp_path, "clamav", path) as (daemon, mta):
        with mta.smtp() as client:
            with pytest.raises(smtplib.SMTPDataError) as rejected:
                client.sendmail(SENDER, [RCPT], infected)
            assert client.sendmail(SENDER, [RCPT], clean) == {}
        assert rejected.value.smtp_code == 554
        assert rejected.value.smtp_error == f"5.7.1 Virus found: {EICAR_NAME}".encode()
        delivered = mta.wait_delivered(1)
        assert len(delivered) == 1 and b"Subject: clean one" in delivered[0], mta.log()
        # Sendmail adds a header the daemon "changes" but the message does not have.
        assert peers.header_values(delivered[0], "X-Virus-Status") == ["Clean"]
        assert peers.header_values(delivered[0], "X-Virus-Scanned") == ["ClamAV using mailgate"]
    assert f"reject 554 5.7.1 Virus found: {EICAR_NAME}" in daemon.log()


# -- spamassassin -----------------------------------------------------------------------------


@pytest.mark.slow
def test_spamassassin(spamd: peers.Spamd, tmp_path: Path) -> None:
    data = shipped_rules("spamassassin")
    data["settings"]["address"] = f"{spamd.host}:{spamd.port}"
    path = write_rules(tmp_path / "spamassassin.yaml", data)
    gtube = peers.message(
        sender=SENDER, recipient=RCPT, subject="gtube", body=peers.GTUBE + b"\r\n"
    )
    ham = peers.message(
        sender=SENDER,
        recipient=RCPT,
        subject="Minutes of Tuesday's meeting",
        body="Hello Bob,\n\nattached are the minutes of Tuesday's meeting. The next one is\n"
        "on Thursday at ten, in the small room.\n\nRegards,\nAlice\n",
    )
    with behind_sendmail(tmp_path, "spamassassin", path) as (daemon, mta):
        with mta.smtp() as client:
            with pytest.raises(smtplib.SMTPDataError) as rejected:
                client.sendmail(SENDER, [RCPT], gtube)
            assert client.mail(SENDER)[0] == 250 and client.rcpt(RCPT)[0] == 250
            code, accepted = client.data(ham)
        assert rejected.value.smtp_code == 550
        assert rejected.value.smtp_error == b"5.7.1 Message rejected as spam"
        assert code == 250, accepted
        delivered = mta.wait_delivered(1)
        assert len(delivered) == 1 and b"Tuesday's meeting" in delivered[0], mta.log()
        status = peers.header_values(delivered[0], "X-Spam-Status")
        assert len(status) == 1 and status[0].startswith("No, score="), status
        assert peers.header_values(delivered[0], "X-Spam-Score")
        assert peers.header_values(delivered[0], "X-Spam-Flag") == []
    log = daemon.log()
    score = re.search(r"spamd: spam score=(\d+\.\d) required=5\.0 tests=\S*GTUBE", log)
    assert score and float(score[1]) >= 15, log
    # The daemon logs under Sendmail's queue id (macro i), the one Sendmail gave the client.
    queue_id = accepted.decode().split()[1]  # "2.0.0 QUEUEID Message accepted for delivery"
    assert f"{queue_id}: accept (" in log


# -- quota ------------------------------------------------------------------------------------


def fill(mail_dir: Path, address: str, size: int) -> None:
    """One message file of `size` bytes in `address`'s Maildir."""
    new = mailbox_path(mail_dir, address) / "new"
    new.mkdir(parents=True, exist_ok=True)
    (new / f"{time.time_ns()}.M1P1.test").write_bytes(b"x" * size)


@pytest.mark.slow
def test_quota(tmp_path: Path) -> None:
    user_db, mail_dir = tmp_path / "users.sqlite3", tmp_path / "mail"
    full_box, roomy = f"full@{peers.DOMAIN}", f"roomy@{peers.DOMAIN}"
    store = SQLiteUserStore(user_db)
    try:
        store.add_domain(peers.DOMAIN)
        for address, storage, used in ((full_box, 5000, 5000), (roomy, 20_000, 15_000)):
            store.add_user(address, "secret password")
            store.set_limits(address, storage=storage)
            fill(mail_dir, address, used)
    finally:
        store.close()
    data = shipped_rules("quota")
    data["settings"].update(user_db=str(user_db), mail_dir=str(mail_dir))
    path = write_rules(tmp_path / "quota.yaml", data)
    small = peers.message(sender=SENDER, recipient=roomy, subject="fits")
    big = peers.message(sender=SENDER, recipient=roomy, subject="too big", body="y" * 6000)
    with behind_sendmail(tmp_path, "quota", path) as (daemon, mta):
        with mta.smtp() as client:
            refused = client.sendmail(SENDER, [full_box, roomy], small)
            assert list(refused) == [full_box]
            code, text = refused[full_box]
            assert code == 452
            assert text.startswith(f"4.2.2 Mailbox full: {full_box}".encode()), text
            # Sendmail hands the client's SIZE= to the milter with MAIL: 6000 bytes and more
            # do not fit into roomy's 5000 bytes left, refused before the data is sent.
            assert client.has_extn("size")
            with pytest.raises(smtplib.SMTPRecipientsRefused) as too_big:
                client.sendmail(SENDER, [roomy], big)
            code, text = too_big.value.recipients[roomy]
            assert code == 452 and text.startswith(b"4.2.2 Mailbox full: "), text
        delivered = mta.sink.wait_for(1)
        assert [m.rcpt_tos for m in delivered] == [(roomy,)], mta.log()
        assert b"Subject: fits" in delivered[0].data
    assert f"mailbox {full_box} full: 5000 of 5000 bytes used" in daemon.log()
