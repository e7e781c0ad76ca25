"""A small scriptable SMTP server for relay tests: failing, picky or recording next hops.

Real peers (a second mailgate, Postfix) serve the success paths; this one plays the next
hop that answers 451 first, 550 always, lacks SMTPUTF8, and records every command and
message it receives, with the number of connections it saw.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HOST = "127.0.0.1"
DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 10485760", "8BITMIME", "SMTPUTF8", "DSN")


@dataclass
class Transaction:
    mail: str
    rcpts: list[str]
    data: bytes


# (command line, server, transactions so far) -> reply line, or None for the default.
Script = Callable[[str, "FakeSmtp"], str | None]


@dataclass
class FakeSmtp:
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    script: Script | None = None
    connections: int = 0
    commands: list[str] = field(default_factory=list)
    messages: list[Transaction] = field(default_factory=list)
    rcpt_count: int = 0
    data_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def reply_for(self, line: str) -> str | None:
        return self.script(line, self) if self.script is not None else None

    def wait_messages(self, count: int, timeout: float = 30.0) -> list[Transaction]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        fake = self.server.fake
        with fake.lock:
            fake.connections += 1
        self.send("220 fake.test ESMTP")
        mail = ""
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with fake.lock:
                fake.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            scripted = fake.reply_for(line)
            if verb == "EHLO":
                lines = ["fake.test", *fake.extensions]
                self.send("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")
            elif verb == "HELO":
                self.send("250 fake.test")
            elif verb == "MAIL":
                mail, rcpts = line, []
                self.send(scripted or "250 2.1.0 Ok")
            elif verb == "RCPT":
                with fake.lock:
                    fake.rcpt_count += 1
                reply = scripted or "250 2.1.5 Ok"
                if reply.startswith("2"):
                    rcpts.append(line)
                self.send(reply)
            elif verb == "DATA":
                if not rcpts:
                    self.send("554 5.5.1 No valid recipients")
                    continue
                self.send("354 go ahead")
                data = bytearray()
                while True:
                    chunk = self.rfile.readline()
                    if not chunk or chunk == b".\r\n":
                        break
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                with fake.lock:
                    fake.data_count += 1
                reply = fake.reply_for("DATA-END") or "250 2.0.0 Ok: queued"
                if reply.startswith("2"):
                    with fake.lock:
                        fake.messages.append(Transaction(mail, list(rcpts), bytes(data)))
                self.send(reply)
            elif verb == "RSET":
                mail, rcpts = "", []
                self.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.send("221 2.0.0 Bye")
                return
            else:
                self.send("502 5.5.1 not implemented")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeSmtp


class _Server6(_Server):
    address_family = socket.AF_INET6


class running:
    """``with running(FakeSmtp(...)) as fake:`` serves on 127.0.0.1:fake.port (or ::1)."""

    def __init__(self, fake: FakeSmtp, host: str = HOST) -> None:
        self.fake = fake
        server_class = _Server6 if ":" in host else _Server
        self.server = server_class((host, 0), _Handler)
        self.server.fake = fake
        fake.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeSmtp:
        self.thread.start()
        return self.fake

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
