"""A raw SMTP client for tests that need to send exact bytes (pipelining, bad input)."""

from __future__ import annotations

import re
import socket
import ssl

REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")
ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


class Wire:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, text with lines joined by newline)."""
        texts = []
        while True:
            line = self._line()
            match = REPLY_LINE.match(line)
            if not match:
                raise AssertionError(f"malformed reply line {line!r}")
            texts.append(match.group(3).decode("utf-8"))
            if match.group(2) == b" ":
                return int(match.group(1)), "\n".join(texts)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed the connection (after any pending reply)."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return True
        self.buffer += data
        return data == b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def has_enhanced(code: int, text: str) -> bool:
    return all(ENHANCED.match(line) for line in text.split("\n"))
