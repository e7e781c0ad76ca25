"""The suite's own SMTP load generator: asyncio over raw sockets, with per-message latency.

    python -m bench.load --port 2525 --sessions 100 --duration 2 --size 1024 [--no-reuse]
    python -m bench.load --port 2525 --sessions 10 --count 20 --size 20M
    python -m bench.load --port 2525 --probe 0.1 --max-time 120   # until SIGTERM

Each session sends EHLO, then messages: MAIL, RCPT and DATA in one write when the server
offers PIPELINING (one command per round trip otherwise), then the message and its
terminating dot. A message's latency runs from writing MAIL to reading the 250 after the
dot. With connection reuse a session sends message after message on one connection;
without it, every message gets its own connection (connect, banner, EHLO, the message,
QUIT). The run ends after ``--count`` messages (shared by all sessions) or when
``--duration`` has passed (each session finishes the message it is sending); either way
never later than ``--max-time``. ``--message FILE`` sends that file as every message in
place of the generated one (scenario G: a message DKIM-signed in advance; ``--size`` is
then ignored). ``--probe INTERVAL`` is one session that sends a small
message every INTERVAL seconds (on a fixed schedule: a late probe never causes a burst)
until SIGTERM/SIGINT. The result is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.stats import percentile

SENDER = "load@client.example"
RECIPIENT = "bench@test.example"
HELO = "client.example"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    factor = 1
    if text.endswith("K"):
        factor, text = 1024, text[:-1]
    elif text.endswith("M"):
        factor, text = 1024 * 1024, text[:-1]
    return int(float(text) * factor)


def build_message(size: int, *, sender: str = SENDER, recipient: str = RECIPIENT) -> bytes:
    """A message of ``size`` octets (headers included, CRLF lines of at most 78 octets).

    The bytes are the DATA payload as sent, with the terminating ``.`` line appended; no
    line starts with a dot, so no dot-stuffing is needed.
    """
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: mailgate benchmark\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <bench.{time.time_ns()}@client.example>\r\n\r\n"
    ).encode()
    remaining = max(size - len(head), 2)
    line = b"The quick brown fox jumps over the lazy dog; mailgate benchmark payload 0123"
    unit = line[:76] + b"\r\n"
    full, rest = divmod(remaining, len(unit))
    body = unit * full
    if rest >= 3:
        body += b"x" * (rest - 2) + b"\r\n"
    return head + (body or b"\r\n") + b".\r\n"


def file_message(path: str) -> bytes:
    """The DATA payload of the message in ``path``: CRLF line ends, dot-stuffed, with the dot.

    The file is sent as it is otherwise (a DKIM signature over it stays valid).
    """
    data = Path(path).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    lines = data.split(b"\r\n")
    data = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return data + b".\r\n"


def payload(args: argparse.Namespace) -> bytes:
    if args.message is not None:
        return file_message(args.message)
    return build_message(args.size, sender=args.sender, recipient=args.recipient)


class SmtpError(Exception):
    pass


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    connections: int = 0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:200])


class Budget:
    """Who may send the next message: a shared count, a deadline, and the hard limit."""

    def __init__(self, count: int | None, duration: float | None, max_time: float) -> None:
        start = time.perf_counter()
        self.remaining = count
        self.deadline = start + duration if duration is not None else None
        self.hard_deadline = start + max_time
        self.stopped = False

    def take(self) -> bool:
        now = time.perf_counter()
        if self.stopped or now >= self.hard_deadline:
            return False
        if self.deadline is not None and now >= self.deadline:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True

    def give_back(self) -> None:
        if self.remaining is not None:
            self.remaining += 1


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One (possibly multi-line) reply: its code and the text of its last line."""
    while True:
        line = await reader.readuntil(b"\n")
        if len(line) < 4:
            raise SmtpError(f"short reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line.decode("utf-8", "replace").rstrip()


async def read_ehlo(reader: asyncio.StreamReader) -> tuple[int, set[str]]:
    keywords: set[str] = set()
    while True:
        line = await reader.readuntil(b"\n")
        keywords.add(line[4:].split(b" ", 1)[0].strip().upper().decode("ascii", "replace"))
        if line[3:4] != b"-":
            return int(line[:3]), keywords


class Session:
    """One SMTP connection."""

    def __init__(self, host: str, port: int, timeout: float, pipelining: bool) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.allow_pipelining = pipelining
        self.pipelining = False
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 20), self.timeout
        )
        code, text = await asyncio.wait_for(read_reply(self.reader), self.timeout)
        if code != 220:
            raise SmtpError(f"banner: {text}")
        self.writer.write(f"EHLO {HELO}\r\n".encode())
        code, keywords = await asyncio.wait_for(read_ehlo(self.reader), self.timeout)
        if code != 250:
            raise SmtpError(f"EHLO: {code}")
        self.pipelining = self.allow_pipelining and "PIPELINING" in keywords

    async def _reply(self) -> tuple[int, str]:
        assert self.reader is not None
        return await asyncio.wait_for(read_reply(self.reader), self.timeout)

    async def send(self, message: bytes, envelope: bytes, data_timeout: float) -> float:
        """One transaction; its latency in seconds, or SmtpError."""
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        start = time.perf_counter()
        if self.pipelining:
            writer.write(envelope)
            replies = [await self._reply() for _ in range(3)]
        else:
            replies = []
            for line in envelope.split(b"\r\n")[:-1]:
                writer.write(line + b"\r\n")
                replies.append(await self._reply())
                if replies[-1][0] >= 400:
                    break
        if len(replies) < 3 or replies[2][0] != 354:
            # Refused before the content: end the transaction, keep the session.
            writer.write(b"RSET\r\n")
            await self._reply()
            raise SmtpError("; ".join(text for _, text in replies))
        writer.write(message)
        await writer.drain()
        code, text = await asyncio.wait_for(read_reply(reader), data_timeout)
        if code != 250:
            raise SmtpError(f"end of data: {text}")
        return time.perf_counter() - start

    async def close(self) -> None:
        writer = self.writer
        if writer is None:
            return
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self._reply(), 5)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)
        self.writer = None


def envelope_bytes(sender: str, recipient: str) -> bytes:
    return f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()


async def run_load(args: argparse.Namespace) -> dict[str, object]:
    message = payload(args)
    envelope = envelope_bytes(args.sender, args.recipient)
    budget = Budget(args.count, args.duration, args.max_time)
    results = Results()
    data_timeout = max(args.timeout, 60.0)

    async def reuse_worker() -> None:
        session = Session(args.host, args.port, args.timeout, args.pipelining)
        try:
            await session.open()
            results.connections += 1
            while budget.take():
                try:
                    results.latencies.append(await session.send(message, envelope, data_timeout))
                except SmtpError as exc:
                    results.error(str(exc))
        except (OSError, SmtpError, TimeoutError, asyncio.IncompleteReadError) as exc:
            results.error(f"{type(exc).__name__}: {exc}")
        finally:
            await session.close()

    async def fresh_worker() -> None:
        while budget.take():
            session = Session(args.host, args.port, args.timeout, args.pipelining)
            try:
                await session.open()
                results.connections += 1
                results.latencies.append(await session.send(message, envelope, data_timeout))
            except (OSError, SmtpError, TimeoutError, asyncio.IncompleteReadError) as exc:
                results.error(f"{type(exc).__name__}: {exc}")
            finally:
                await session.close()

    worker = reuse_worker if args.reuse else fresh_worker
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.sessions)))
    elapsed = time.perf_counter() - start
    return summary(results, elapsed, len(message) - 3, args)


async def run_probe(args: argparse.Namespace) -> dict[str, object]:
    """One session, one small message every ``args.probe`` seconds, until a signal."""
    message = build_message(args.size, sender=args.sender, recipient=args.recipient)
    envelope = envelope_bytes(args.sender, args.recipient)
    results = Results()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    start = time.perf_counter()
    hard_deadline = start + args.max_time
    session: Session | None = None
    tick = 0
    print("probe ready", file=sys.stderr, flush=True)
    while not stop.is_set() and time.perf_counter() < hard_deadline:
        try:
            if session is None:
                session = Session(args.host, args.port, args.timeout, args.pipelining)
                await session.open()
                results.connections += 1
            results.latencies.append(await session.send(message, envelope, args.timeout))
        except (OSError, SmtpError, TimeoutError, asyncio.IncompleteReadError) as exc:
            results.error(f"{type(exc).__name__}: {exc}")
            if session is not None:
                await session.close()
            session = None
        # The next slot on the fixed schedule that is still ahead of us.
        now = time.perf_counter()
        tick = max(tick + 1, int((now - start) / args.probe) + 1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(start + tick * args.probe - now, 0))
    elapsed = time.perf_counter() - start
    if session is not None:
        await session.close()
    return summary(results, elapsed, len(message) - 3, args)


def summary(
    results: Results, elapsed: float, size: int, args: argparse.Namespace
) -> dict[str, object]:
    lat = sorted(results.latencies)
    ms = [value * 1000 for value in lat]
    return {
        "generator": "pyload",
        "messages": len(lat),
        "errors": results.errors,
        "error_samples": results.error_samples,
        "connections": results.connections,
        "elapsed": elapsed,
        "rate": len(lat) / elapsed if elapsed > 0 else 0.0,
        "message_size": size,
        "sessions": args.sessions,
        "reuse": args.reuse,
        "latency_ms": {
            "p50": percentile(ms, 50),
            "p90": percentile(ms, 90),
            "p99": percentile(ms, 99),
            "max": ms[-1] if ms else None,
            "mean": sum(ms) / len(ms) if ms else None,
        },
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--count", type=int, default=None, help="messages in all (shared)")
    ap.add_argument("--duration", type=float, default=None, help="seconds to send for")
    ap.add_argument("--size", type=parse_size, default=1024, help="message size, e.g. 1K, 20M")
    ap.add_argument("--no-reuse", dest="reuse", action="store_false", help="one message per TCP")
    ap.add_argument("--no-pipelining", dest="pipelining", action="store_false")
    ap.add_argument("--probe", type=float, default=None, metavar="INTERVAL")
    ap.add_argument("--timeout", type=float, default=60.0, help="per reply")
    ap.add_argument("--max-time", type=float, default=300.0, help="hard limit of the run")
    ap.add_argument("--sender", default=SENDER)
    ap.add_argument("--recipient", default=RECIPIENT)
    ap.add_argument("--message", default=None, metavar="FILE", help="send this file each time")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.probe is None and args.count is None and args.duration is None:
        args.count = 100
    coro = run_probe(args) if args.probe is not None else run_load(args)
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            result = asyncio.run(coro)
        else:
            result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    result["loop"] = args.loop
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
