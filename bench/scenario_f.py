"""Scenario F, relay throughput: accept, queue durably and relay to a next hop.

One ``smtp-sink`` (Postfix's C sink, ``-c``: it counts every message it takes) is the next
hop of both MTAs: ``mailgate serve`` with a ``*`` route to it (``relay_routes``, no TLS,
``relay_destination_concurrency`` 20 like Postfix's default destination concurrency) and
Postfix with ``relayhost = [127.0.0.1]:PORT``. ``bench.load`` sends 10 KB messages for a
remote domain over 20 reused sessions; a run ends when the sink has counted every
accepted message. Per run: accepted messages/s (the load's rate), relayed messages/s
(messages over the time from the first message sent to the last one counted by the
sink), and the MTA's CPU per message over the whole run (acceptance + relay; the sink's
CPU is not counted). The peers alternate; ratios are mailgate over Postfix.
"""

from __future__ import annotations

import json
from typing import Any

from bench import clients, servers
from bench.common import Settings, case_summary, paired_ratios, rotated
from bench.stats import ratio

SESSIONS = 20
SIZE = 10 * 1024
RECIPIENT = "bench@relay.example"
EXTRA = ("relay_rate", "server_cpu_ms_per_msg", "delivered_s")
RELAY_TIMEOUT = 300.0


class _Relaying:
    """Mixin: a peer whose "delivered" count is what the shared sink received."""

    sink: servers.CountingSink

    def delivered(self) -> int:
        return self.sink.received()


class MailgateRelay(_Relaying, servers.MailgateServe):
    pass


class PostfixRelay(_Relaying, servers.Postfix):
    pass


def _per_run(run: dict[str, Any]) -> dict[str, Any]:
    messages = run["messages"] or 0
    seconds = run.get("delivered_s")
    run["relay_rate"] = messages / seconds if seconds else None
    run["server_cpu_ms_per_msg"] = run["server_cpu_s"] * 1000 / messages if messages else None
    return run


def run(settings: Settings) -> dict[str, Any]:
    duration = 0.5 if settings.smoke else 3.0
    work = settings.work / "F"
    sink = servers.CountingSink(work / "sink")
    sink.start()
    route = {"domain": "*", "host": servers.HOST, "port": sink.port, "tls": "none"}
    mailgate = MailgateRelay(
        work,
        env={
            "MAILGATE_RELAY_ROUTES": json.dumps([route]),
            "MAILGATE_RELAY_NETWORKS": "127.0.0.1/32",
            "MAILGATE_RELAY_DESTINATION_CONCURRENCY": "20",
            "MAILGATE_RELAY_CONCURRENCY": "20",
        },
    )
    postfix = PostfixRelay(
        work,  # as short as B's: Postfix's socket paths must stay under 108 bytes
        main_cf={
            "relayhost": f"[{servers.HOST}]:{sink.port}",
            "default_transport": "smtp",
            "smtp_tls_security_level": "none",
        },
    )
    peers: list[servers.Peer] = [mailgate, postfix]
    for peer in (mailgate, postfix):
        peer.sink = sink
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
    try:
        for peer in peers:
            peer.start()
        for repeat in range(settings.repeats):
            for peer in rotated(peers, repeat):
                result = clients.measured(
                    peer,
                    lambda peer=peer: clients.pyload(
                        peer.port,
                        sessions=SESSIONS,
                        size=SIZE,
                        duration=duration,
                        recipient=RECIPIENT,
                    ),
                    wait_delivery=RELAY_TIMEOUT,
                )
                runs[peer.name].append(_per_run(result))
                settings.say(
                    f"F #{repeat + 1} {peer.name}: {result['rate']:.0f} msg/s accepted, "
                    f"{result['relay_rate'] or 0:.0f} relayed, "
                    f"{result['server_cpu_ms_per_msg'] or 0:.2f} CPU ms/msg, "
                    f"{result['errors']} errors"
                )
    finally:
        for peer in peers:
            peer.stop()
        sink.stop()
    medians = case_summary(runs, EXTRA)
    m, p = medians.get("mailgate", {}), medians.get("postfix", {})
    return {
        "title": "F. Relay throughput (10 KB, 20 sessions, to smtp-sink)",
        "peers": [peer.name for peer in peers],
        "duration_per_run_s": duration,
        "size": SIZE,
        "sessions": SESSIONS,
        "median": medians,
        "runs": runs,
        "ratios": {
            "mailgate/postfix accepted": ratio(m.get("rate"), p.get("rate")),
            "mailgate/postfix relayed": ratio(m.get("relay_rate"), p.get("relay_rate")),
            "mailgate/postfix CPU per message": ratio(
                m.get("server_cpu_ms_per_msg"), p.get("server_cpu_ms_per_msg")
            ),
        },
        "paired_ratios": {
            "mailgate/postfix relayed": paired_ratios(runs, "mailgate", "postfix", "relay_rate")
        },
    }
