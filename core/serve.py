"""`mailgate serve`: start the gateway (listeners, spool, local and outbound delivery).

Everything is checked and bound before the first message is accepted: a bad setting, a
missing certificate or a port in use stops the start with a clear message, never a
half-working server. SIGTERM/SIGINT stop it gracefully (see ``SmtpServer.shutdown``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

from mailgate.core.config import Config
from mailgate.core.config_cli import add_config_option, add_setting_flags, config_from_args
from mailgate.core.dns import Resolver
from mailgate.core.errors import ConfigError
from mailgate.core.relay.queue import RelayAgent
from mailgate.core.smtp.server import ServerContext, SmtpServer
from mailgate.core.spool.delivery import DeliveryAgent
from mailgate.core.spool.maildir import MaildirStore
from mailgate.core.spool.spool import Spool
from mailgate.core.spool.writer import SpoolWriter
from mailgate.core.supervisor import Supervisor, remove_pid_file, write_pid_file
from mailgate.core.tls import ensure_certificate, server_context
from mailgate.core.users.sqlite import SQLiteUserStore

log = logging.getLogger("mailgate")

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d]: %(levelname)s %(message)s"


class _LogFormatter(logging.Formatter):
    """LOG_FORMAT, with the time stamp formatted once per second rather than per line."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The logging HOWTO's optimisations for what LOG_FORMAT does not show: the caller's
    # file and line (a stack walk per line), the thread and the multiprocessing name.
    # Under load the server logs several lines per message.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    # aiosmtpd logs every command line at INFO; our session logs what an operator needs.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


async def run_gateway(config: Config, *, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the process exit status."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    cert, key = ensure_certificate(
        config.tls_cert, config.tls_key, config.data_dir, config.hostname
    )
    tls_context = server_context(cert, key)
    users = SQLiteUserStore(config.user_db)
    spool = Spool(config.spool_dir)
    spool.start_threads()
    maildir = MaildirStore(config.mail_dir, config.hostname)
    writer: SpoolWriter | None = None
    if config.spool_writer_threads:
        writer = SpoolWriter(
            config.spool_dir, config.mail_dir, config.hostname, threads=config.spool_writer_threads
        )
        await writer.start()
        spool.writer = writer
    local_domains = set(config.local_domains)
    relay: RelayAgent | None = None
    if config.outbound_delivery:
        resolver = Resolver(
            config.dns_nameservers,
            timeout=config.dns_timeout,
            trust_ad=config.dns_dnssec_trusted,
        )
        relay = RelayAgent(spool, config, resolver)
    delivery = DeliveryAgent(
        spool,
        maildir,
        users,
        concurrency=config.delivery_concurrency,
        is_local_domain=lambda domain: domain in local_domains or users.is_local_domain(domain),
        outbound=relay.submit if relay is not None else None,
    )
    if relay is not None:
        # Notifications are new messages: local delivery takes them to a local sender's
        # Maildir, or back to the outbound queue for a remote one.
        relay.local_submit = delivery.submit
    context = ServerContext(
        config=config,
        users=users,
        spool=spool,
        delivery=delivery,
        tls_context=tls_context,
        auth_failure_delay=config.auth_failure_delay,
        relay=relay,
    )
    server = SmtpServer(context)
    supervisor = Supervisor(config)
    # Signals are handled from the start: a reload or stop during start-up is queued, never
    # the end of the process. SIGHUP: the daemons reload their rules. SIGUSR1: deliver what
    # is waiting now (sent by `mailgate queue quarantine release`).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _scan_now(delivery, relay))
    await supervisor.start()
    try:
        await server.start()
    except ConfigError:
        await supervisor.stop()
        if writer is not None:
            await writer.stop()
        users.close()
        spool.close()
        raise
    await delivery.start()
    if relay is not None:
        await relay.start()

    # Published once serving: `queue quarantine release` signals this pid.
    write_pid_file(config)
    domains = ", ".join(config.local_domains) or "(none configured; see `mailgate domain add`)"
    log.info(
        "mailgate ready (pid %d): hostname %s, data dir %s, local domains %s, event loop %s",
        os.getpid(),
        config.hostname,
        config.data_dir,
        domains,
        config.event_loop,
    )
    if ready is not None:
        ready.set()
    dmarc_reports = (
        asyncio.create_task(_dmarc_reports_daily(config)) if config.dmarc_reports else None
    )
    await stop.wait()
    if dmarc_reports is not None:
        dmarc_reports.cancel()
    log.info("shutting down: no new connections; grace %.0fs", config.shutdown_grace)
    await server.shutdown(config.shutdown_grace)
    await supervisor.stop()
    if relay is not None:
        await relay.stop()
    await delivery.stop()
    spool.writer = None
    if writer is not None:
        await writer.stop()
    spool.close()
    users.close()
    remove_pid_file(config)
    log.info("stopped")
    return 0


async def _dmarc_reports_daily(config: Config) -> None:
    """`dmarc_reports: true`: `mailgate dmarc report --send` at start, then daily after
    00:10 UTC (docs/daemon-dmarc.md). A day sent already is skipped by the command itself."""
    argv = [sys.executable, "-m", "mailgate.core.cli", "dmarc", "report", "--send"]
    argv += ["--data-dir", str(config.data_dir.resolve())]
    rules = next((m.rules for m in config.milters if m.daemon == "dmarc" and m.rules), None)
    if rules is not None:
        argv += ["--rules", str(rules)]
    env = {**os.environ, "MAILGATE_HOSTNAME": config.hostname}
    while True:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await process.communicate()
            for line in output.decode("utf-8", "replace").splitlines():
                log.info("dmarc report: %s", line)
        except OSError as exc:
            log.error("dmarc report: cannot run: %s", exc)
        now = time.time()
        await asyncio.sleep((now // 86400 + 1) * 86400 + 600 - now)


def _scan_now(delivery: DeliveryAgent, relay: RelayAgent | None) -> None:
    """SIGUSR1: deliver what waits in incoming/ and act on queued operator requests."""
    delivery.scan_now()
    if relay is not None:
        relay.flush()


def _serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mailgate: {problem}", file=sys.stderr)
        return 1
    setup_logging(config.log_level)
    try:
        if config.event_loop == "uvloop":
            import uvloop

            return uvloop.run(run_gateway(config))
        return asyncio.run(run_gateway(config))
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the gateway: SMTP listeners, spool and local delivery",
        description="Run the gateway in the foreground until SIGTERM or SIGINT.",
    )
    add_config_option(serve)
    add_setting_flags(serve)
    serve.set_defaults(handler=_serve)
