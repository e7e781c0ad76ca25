"""The mailgate core without delivery: the real SMTP server, a spool that discards.

    python -m bench.core_runner --data-dir DIR --listen 127.0.0.1:PORT [--loop uvloop]

Builds what ``mailgate serve`` builds (config from ``load_config`` with overrides, the
SQLite user store, ``ServerContext``, ``SmtpServer``) except that the spool and the
delivery queue are in-memory sinks: every message goes through the whole protocol
machine, the recipient lookup in the user store and the Received header, and is then
dropped. No TLS context (stock aiosmtpd and smtp-sink offer none either). Settings come
from ``MAILGATE_*`` variables like the real server's, so milters and limits can be set
the same way. Runs until SIGTERM/SIGINT; logs "core runner ready" when it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from mailgate.core.config import load_config
from mailgate.core.serve import setup_logging
from mailgate.core.smtp.server import ServerContext, SmtpServer
from mailgate.core.spool.envelope import SpoolEnvelope
from mailgate.core.users.sqlite import SQLiteUserStore

log = logging.getLogger("mailgate.bench")


class DiscardSpool:
    """Takes every message and keeps nothing (the "no delivery" of scenario A)."""

    def __init__(self) -> None:
        self.messages = 0
        self.octets = 0

    async def store(
        self, envelope: SpoolEnvelope, content: bytes | bytearray, *, prefix: bytes = b""
    ) -> None:
        self.messages += 1
        self.octets += len(prefix) + len(content)

    async def hold(
        self,
        envelope: SpoolEnvelope,
        content: bytes | bytearray,
        reason: str,
        *,
        prefix: bytes = b"",
    ) -> None:
        await self.store(envelope, content, prefix=prefix)


class NoDelivery:
    def submit(self, queue_id: str, stored: tuple[SpoolEnvelope, bytes] | None = None) -> None:
        pass


async def run(args: argparse.Namespace) -> int:
    config = load_config(
        overrides={
            "data_dir": args.data_dir,
            "hostname": args.hostname,
            "smtp_listen": [args.listen],
            "submission_listen": [],
            "smtps_listen": [],
            "local_domains": [args.domain],
            "max_connections": 5000,
            "max_connections_per_ip": 5000,
            "rate_limit_connections": 0,
            "event_loop": args.loop,
        }
    )
    setup_logging(config.log_level)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    users = SQLiteUserStore(config.user_db)
    spool = DiscardSpool()
    context = ServerContext(
        config=config,
        users=users,
        spool=spool,
        delivery=NoDelivery(),
        tls_context=None,
        auth_failure_delay=config.auth_failure_delay,
    )
    server = SmtpServer(context)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("core runner ready on %s (%s loop)", args.listen, config.event_loop)
    await stop.wait()
    await server.shutdown(2.0)
    users.close()
    log.info("core runner stopped: %d messages, %d octets", spool.messages, spool.octets)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.core_runner")
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--hostname", default="mx.test.example")
    ap.add_argument("--domain", default="test.example")
    args = ap.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(run(args))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
