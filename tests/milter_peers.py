"""Milter peers for the milter client tests, each run in its own process.

    python tests/milter_peers.py KIND SOCKET [NAME]

KIND "full" and "lean" are real pymilter (libmilter) milters. They obey instructions in
the message, so one process serves many tests: the header ``X-Do`` lists end-of-message
actions (add, insert, change, delete, replbody, bigbody, addrcpt, addrcptpar, delrcpt,
chgfrom, quarantine, reject, tempfail, discard, progress, sleep, die, report), envelope
addresses trigger envelope decisions (a sender containing "tempfail" or "discard", a
recipient containing "blocked", "multiline", "soft" or "plainreject"), a client name
containing "trusted" is accepted at CONNECT, and a body containing "DIE-IN-BODY" kills a
milter whose name starts with "dying" mid-message. "report" adds ``X-Report-NAME``: JSON
of what the milter saw (headers, body size, macros per stage, envelope). "lean" asks for
everything a milter can switch off: no replies to CONNECT/HELO/RCPT/headers/EOH, no body,
header values with their leading space, its own macro list for MAIL (only {mail_addr}),
and the recipients the MTA refused (SMFIP_RCPT_REJ).

KIND "raw-MODE" is a misbehaving or minimal milter written with mailgate's own codec:
silent (never answers), garbage (answers OPTNEG with HTTP), stall (negotiates, then never
answers), badreply (a malformed REPLYCODE at CONNECT), earlymod (a modification at
CONNECT), oversize (announces a 16 MiB frame), shutdown (SMFIR_SHUTDOWN at HELO), v2
(negotiates protocol version 2 and reports the commands it received), skip (answers the
first body chunk with SKIP and reports how many chunks came), eomstall (answers every
stage but never the end of the message).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

MACROS_BY_STAGE = {
    "connect": ["j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}"],
    "helo": ["{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"],
    "mail": ["i", "{auth_type}", "{auth_authen}", "{mail_addr}", "{mail_host}", "{mail_mailer}"],
    "rcpt": ["i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"],
    "data": ["i"],
    "eoh": ["i"],
    "eom": ["i"],
}


def run_pymilter(kind: str, sockspec: str, name: str) -> None:
    import Milter

    class Full(Milter.Base):
        """Implements every callback, so it switches nothing off."""

        def __init__(self) -> None:
            self.seen: dict[str, Any] = {"macros": {}, "headers": [], "body": 0, "chunks": 0}
            self.instructions: list[str] = []

        def _macros(self, stage: str) -> None:
            values = {m: self.getsymval(m) for m in MACROS_BY_STAGE[stage]}
            self.seen["macros"][stage] = {k: v for k, v in values.items() if v is not None}

        def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
            self._macros("connect")
            self.seen["connect"] = [hostname, family, list(hostaddr) if hostaddr else None]
            if "trusted" in hostname:
                return Milter.ACCEPT
            return Milter.CONTINUE

        def hello(self, hostname: str) -> int:
            self._macros("helo")
            self.seen["helo"] = hostname
            return Milter.CONTINUE

        def envfrom(self, sender: str, *params: str) -> int:
            self._macros("mail")
            self.seen.update(
                {"from": [sender, *params], "rcpt": [], "headers": [], "body": 0, "chunks": 0}
            )
            if "tempfail" in sender:
                return Milter.TEMPFAIL
            if "discard" in sender:
                return Milter.DISCARD
            return Milter.CONTINUE

        def envrcpt(self, to: str, *params: str) -> int:
            self._macros("rcpt")
            self.seen["rcpt"].append([to, *params])
            if "multiline" in to:
                self.setreply("550", "5.7.1", "first line", "second line")
                return Milter.REJECT
            if "blocked" in to:
                self.setreply("550", "5.7.1", f"Recipient blocked by {name}")
                return Milter.REJECT
            if "soft" in to:
                self.setreply("452", "4.2.2", "Mailbox full, 100%% used")
                return Milter.TEMPFAIL
            if "plainreject" in to:
                return Milter.REJECT
            return Milter.CONTINUE

        def data(self) -> int:
            self._macros("data")
            return Milter.CONTINUE

        def header(self, field: str, value: str) -> int:
            self.seen["headers"].append([field, value])
            if field.lower() == "x-do":
                self.instructions = [part.strip() for part in value.split(",")]
            return Milter.CONTINUE

        def eoh(self) -> int:
            self._macros("eoh")
            return Milter.CONTINUE

        def body(self, chunk: bytes) -> int:
            self.seen["body"] += len(chunk)
            self.seen["chunks"] += 1
            if b"DIE-IN-BODY" in chunk and name.startswith("dying"):
                os._exit(3)
            return Milter.CONTINUE

        def eom(self) -> int:
            self._macros("eom")
            ops = self.instructions
            subject = next((v for k, v in self.seen["headers"] if k.lower() == "subject"), "")
            if "add" in ops:
                self.addheader("X-Added-By", name)
            if "insert" in ops:
                self.addheader("X-Inserted-By", name, 0)
            if "change" in ops:
                self.chgheader("Subject", 1, f"[{name}] {subject.strip()}")
            if "delete" in ops:
                self.chgheader("X-Remove", 1, "")
            if "replbody" in ops:
                self.replacebody(b"Replaced by " + name.encode() + b"\nsecond line")
            if "bigbody" in ops:
                self.replacebody(b"y" * 150_000 + b"\r\n")
            if "addrcpt" in ops:
                self.addrcpt("<added@example.test>")
            if "addrcptpar" in ops:
                self.addrcpt("<param@example.test>", "NOTIFY=NEVER")
            if "delrcpt" in ops:
                self.delrcpt("<drop@example.test>")
            if "chgfrom" in ops:
                self.chgfrom("<changed@example.test>", "BODY=8BITMIME")
            if "quarantine" in ops:
                self.quarantine(f"held by {name}")
            if "progress" in ops:
                for _ in range(6):
                    time.sleep(0.4)
                    self.progress()
            if "sleep" in ops:
                time.sleep(3)
            if "die" in ops:
                os._exit(3)
            if "report" in ops:
                self.addheader(f"X-Report-{name}", json.dumps(self.seen))
            if "reject" in ops:
                self.setreply("554", "5.7.0", f"Content rejected by {name}")
                return Milter.REJECT
            if "tempfail" in ops:
                return Milter.TEMPFAIL
            if "discard" in ops:
                return Milter.DISCARD
            return Milter.CONTINUE

        def abort(self) -> int:
            return Milter.CONTINUE

        def close(self) -> int:
            return Milter.CONTINUE

    @Milter.rejected_recipients
    @Milter.header_leading_space
    class Lean(Full):
        """Switches off every reply and event it can, narrows its MAIL macros, and asks
        for the recipients the MTA refused."""

        @Milter.noreply
        def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
            super().connect(hostname, family, hostaddr)
            return Milter.CONTINUE

        @Milter.noreply
        def hello(self, hostname: str) -> int:
            return super().hello(hostname)

        def negotiate(self, opts: list[int]) -> int:
            # What Base.negotiate does with @Milter.symlist, which pymilter 1.0.5 breaks
            # (it hands bytes to a C function that takes str).
            self._actions, offered, _, _ = opts
            self._ctx.setsymlist(Milter.M_ENVFROM, "{mail_addr}")
            opts[1] = self._protocol = offered & ~self.protocol_mask()
            opts[2] = opts[3] = 0
            return Milter.CONTINUE

        @Milter.noreply
        def envrcpt(self, to: str, *params: str) -> int:
            super().envrcpt(to, *params)
            return Milter.CONTINUE

        @Milter.noreply
        def header(self, field: str, value: str) -> int:
            return super().header(field, value)

        @Milter.noreply
        def eoh(self) -> int:
            return super().eoh()

        @Milter.nocallback
        def body(self, chunk: bytes) -> int:
            return Milter.CONTINUE

    Milter.factory = Lean if kind == "lean" else Full
    Milter.runmilter(name, sockspec, timeout=60)


# -- raw peers, written with mailgate's codec -----------------------------------------------


def _listen(sockspec: str) -> socket.socket:
    kind, _, rest = sockspec.partition(":")
    if kind == "unix":
        if os.path.exists(rest):
            os.unlink(rest)
        server = socket.socket(socket.AF_UNIX)
        server.bind(rest)
    else:
        port, _, host = rest.partition("@")
        server = socket.socket(socket.AF_INET6 if kind == "inet6" else socket.AF_INET)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, int(port)))
    server.listen(16)
    return server


def _serve_raw(conn: socket.socket, mode: str) -> None:
    from mailgate.core.milter import events as ev
    from mailgate.core.milter import protocol as p
    from mailgate.core.milter.codec import RequestDecoder, encode

    decoder = RequestDecoder()
    received: list[str] = []
    chunks = 0
    skipped = False

    def send(*frames: Any) -> None:
        conn.sendall(b"".join(encode(frame) for frame in frames))

    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            if mode == "silent":
                continue
            if mode == "garbage":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                continue
            for request in decoder.feed(data):
                received.append(type(request).__name__)
                match request:
                    case ev.OptionNegotiation():
                        version = 2 if mode == "v2" else 6
                        flags = p.SMFIP_SKIP if mode == "skip" else 0
                        send(ev.NegotiationReply(version, p.SMFIF_ADDHDRS, flags))
                        continue
                    case ev.DefineMacros() | ev.Abort() | ev.Quit():
                        continue
                if mode == "stall":
                    continue
                match request:
                    case ev.Connect() if mode == "badreply":
                        send(ev.ReplyCode("hello there"))
                    case ev.Connect() if mode == "earlymod":
                        send(ev.AddHeader("X-Early", "no"))
                    case ev.Connect() if mode == "oversize":
                        conn.sendall((16 << 20).to_bytes(4, "big") + b"h")
                    case ev.Helo() if mode == "shutdown":
                        send(ev.Shutdown())
                    case ev.BodyChunk():
                        chunks += 1
                        if mode == "skip" and not skipped:
                            skipped = True
                            send(ev.Skip())
                        else:
                            send(ev.Continue())
                    case ev.EndOfMessage() if mode == "eomstall":
                        continue
                    case ev.EndOfMessage():
                        report = json.dumps({"received": received, "chunks": chunks})
                        send(ev.AddHeader("X-Raw-Report", report), ev.Continue())
                    case _:
                        send(ev.Continue())


def run_raw(mode: str, sockspec: str) -> None:
    server = _listen(sockspec)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_raw, args=(conn, mode), daemon=True).start()


def main() -> None:
    kind, sockspec = sys.argv[1], sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else kind
    if kind.startswith("raw-"):
        run_raw(kind[4:], sockspec)
    else:
        run_pymilter(kind, sockspec, name)


if __name__ == "__main__":
    main()
