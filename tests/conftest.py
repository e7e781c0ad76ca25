"""Shared fixtures: a real `mailgate serve` process on free loopback ports, and SMTP helpers."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailgate.core.users.sqlite import SQLiteUserStore

BIN = Path(sys.executable).parent
MAILGATE = str(BIN / "mailgate")
DOMAIN = "example.test"
PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gateway:
    """A running gateway process and what tests need to talk to it."""

    data_dir: Path
    env: dict[str, str]
    smtp_port: int
    submission_port: int
    smtps_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    def start(self, timeout: float = 20.0) -> None:
        # Readiness is judged on what this start writes, not on an earlier run's lines.
        offset = len(self.log())
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [MAILGATE, "serve", *self.extra_args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            if "mailgate ready" in self.log()[offset:]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not become ready:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def users(self) -> SQLiteUserStore:
        return SQLiteUserStore(self.data_dir / "users.sqlite3")

    def maildir(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.data_dir / "mail" / domain / local

    def delivered(self, address: str) -> list[bytes]:
        new = self.maildir(address) / "new"
        if not new.is_dir():
            return []
        return [path.read_bytes() for path in sorted(new.iterdir())]

    def wait_delivered(self, address: str, count: int, timeout: float = 15.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.delivered(address)
            if len(messages) >= count:
                return messages
            time.sleep(0.05)
        return self.delivered(address)

    def smtp(self, port: int | None = None, **kwargs: object) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", port or self.smtp_port, timeout=10, **kwargs)  # type: ignore[arg-type]


def make_gateway(tmp_path: Path, **settings: object) -> Gateway:
    data_dir = tmp_path / "var"
    data_dir.mkdir(exist_ok=True)
    ports = {"smtp": free_port(), "submission": free_port(), "smtps": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    env.update(
        {
            "MAILGATE_DATA_DIR": str(data_dir),
            "MAILGATE_HOSTNAME": "mx.example.test",
            "MAILGATE_SMTP_LISTEN": f"127.0.0.1:{ports['smtp']}",
            "MAILGATE_SUBMISSION_LISTEN": f"127.0.0.1:{ports['submission']}",
            "MAILGATE_SMTPS_LISTEN": f"127.0.0.1:{ports['smtps']}",
            "MAILGATE_LOCAL_DOMAINS": DOMAIN,
            "MAILGATE_LOG_LEVEL": "INFO",
            "MAILGATE_EVENT_LOOP": os.environ.get("MG_TEST_EVENT_LOOP", "uvloop"),
        }
    )
    for key, value in settings.items():
        env[f"MAILGATE_{key.upper()}"] = str(value)
    return Gateway(
        data_dir=data_dir,
        env=env,
        smtp_port=ports["smtp"],
        submission_port=ports["submission"],
        smtps_port=ports["smtps"],
        log_path=tmp_path / "gateway.log",
    )


def add_default_users(gateway: Gateway) -> None:
    store = gateway.users()
    try:
        store.add_user(f"alice@{DOMAIN}", PASSWORD)
        store.add_user(f"bob@{DOMAIN}", PASSWORD)
        store.add_alias(f"info@{DOMAIN}", f"alice@{DOMAIN}")
        store.add_alias(f"team@{DOMAIN}", f"alice@{DOMAIN}")
        store.add_alias(f"team@{DOMAIN}", f"bob@{DOMAIN}")
        store.add_alias(f"postmaster@{DOMAIN}", f"alice@{DOMAIN}")
    finally:
        store.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway per test module, with alice, bob and a few aliases, on default limits."""
    gw = make_gateway(
        tmp_path_factory.mktemp("gw"), auth_failure_delay=0, rate_limit_connections=10000
    )
    add_default_users(gw)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def fresh_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway the test configures and starts itself (it is stopped afterwards)."""
    gw = make_gateway(tmp_path)
    add_default_users(gw)
    yield gw
    if gw.process is not None and gw.process.poll() is None:
        gw.stop()
