"""The relay's durable TLS state: the MTA-STS policy cache and the TLS-RPT session counts.

One SQLite file under the data directory (``Config.tls_db``, ``tls.sqlite3``), written only
by the running relay and read by ``mailgate tls-report``:

- ``sts_policy``: one row per policy domain, the last policy fetched (RFC 8461 section
  5: it is used until ``max_age`` runs out, and replaced when the TXT record's ``id``
  changes and a new fetch succeeds);
- ``tlsrpt``: TLS sessions counted per UTC day, policy (domain, type, policy string, MX
  host) and outcome (a RFC 8460 result type, or "" for success) with the failure details
  a report carries. Counting into rows that already exist keeps the file small however
  much mail goes out.

Writes are small and rare (one per new TLS session and per policy fetch); WAL with
``synchronous=NORMAL`` keeps them from waiting on fsync: losing the last counts to a
power cut costs a report a few sessions, never mail.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sts_policy (
    domain TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    policy TEXT NOT NULL,
    fetched REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tlsrpt (
    day TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    policy_string TEXT NOT NULL,
    mx_host TEXT NOT NULL,
    result_type TEXT NOT NULL,
    sending_ip TEXT NOT NULL,
    receiving_mx TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_string, mx_host, result_type,
                 sending_ip, receiving_mx, receiving_ip, reason)
);
"""


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A cached MTA-STS policy: the TXT id it came with and its text."""

    domain: str
    id: str
    text: str
    fetched: float
    expires: float


@dataclass(frozen=True, slots=True)
class Session:
    """One TLS session attempt to report (RFC 8460): its policy and its outcome."""

    policy_domain: str
    policy_type: str  # "sts", "tlsa", "no-policy-found"
    policy_string: tuple[str, ...]
    mx_host: str  # the policy's mx pattern(s) joined, or the MX host name
    result_type: str = ""  # "" = success, else an RFC 8460 section 4.3 result type
    sending_ip: str = ""
    receiving_mx: str = ""
    receiving_ip: str = ""
    reason: str = ""


def utc_day(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")


class TlsStore:
    """Thread-safe access to ``tls.sqlite3``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- MTA-STS policy cache -----------------------------------------------------------

    def policy(self, domain: str) -> CachedPolicy | None:
        with self._lock:
            row = self._db.execute(
                "SELECT domain, id, policy, fetched, expires FROM sts_policy WHERE domain = ?",
                (domain,),
            ).fetchone()
        return CachedPolicy(*row) if row else None

    def store_policy(self, policy: CachedPolicy) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO sts_policy VALUES (?, ?, ?, ?, ?)",
                (policy.domain, policy.id, policy.text, policy.fetched, policy.expires),
            )

    def forget_policy(self, domain: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sts_policy WHERE domain = ?", (domain,))

    # -- TLS-RPT ------------------------------------------------------------------------

    def count(self, session: Session, when: float) -> None:
        key = (
            utc_day(when),
            session.policy_domain,
            session.policy_type,
            json.dumps(list(session.policy_string)),
            session.mx_host,
            session.result_type,
            session.sending_ip,
            session.receiving_mx,
            session.receiving_ip,
            session.reason,
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO tlsrpt VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT DO UPDATE SET count = count + 1",
                key,
            )

    def domains(self, day: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT policy_domain FROM tlsrpt WHERE day = ? ORDER BY 1", (day,)
            ).fetchall()
        return [row[0] for row in rows]

    def sessions(self, day: str, domain: str) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT policy_type, policy_string, mx_host, result_type, sending_ip, "
                "receiving_mx, receiving_ip, reason, count FROM tlsrpt "
                "WHERE day = ? AND policy_domain = ? ORDER BY rowid",
                (day, domain),
            )
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
