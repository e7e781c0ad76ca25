"""The embedded user-store backend: one SQLite file, ``users.sqlite3`` in the data directory.

The file holds password hashes, so it and its directory are created private (0600/0700);
SQLite gives its -wal and -shm files the database's permissions. The journal is WAL so the
server's lookups never wait for the command line's writes, and ``synchronous=FULL`` because
writes are rare and an operator's ``user add`` must survive a power cut.

Each thread gets its own connection (sqlite3 connections must not be shared between
threads while in use); the server reaches the store from asyncio.to_thread workers. Every
write runs in one ``BEGIN IMMEDIATE`` transaction, which takes the write lock up front so
that two writers queue on the busy timeout instead of failing halfway.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from argon2 import PasswordHasher

from mailgate.core.errors import UserStoreError
from mailgate.core.users.store import (
    LIMIT_FIELDS,
    Limits,
    UserStore,
    catchall_key,
    domain_of,
    is_catchall,
    normalize_address,
    normalize_alias,
    normalize_domain,
)

__all__ = ["SCHEMA_VERSION", "SQLiteUserStore"]

_BUSY_TIMEOUT = 30.0
# Lookup answers kept per thread between changes to the database; past this many the
# cache starts again, so probing random addresses cannot grow it without bound.
_MAX_ANSWERS = 10_000
_MISS = object()

# _MIGRATIONS[n] brings a database from version n to n + 1; never edit a shipped entry.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE domains (
        domain TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE users (
        address TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        password_changed_at INTEGER NOT NULL
    );
    CREATE INDEX users_domain ON users (domain);
    CREATE TABLE aliases (
        id INTEGER PRIMARY KEY,
        alias TEXT NOT NULL,
        alias_domain TEXT NOT NULL,
        target TEXT NOT NULL,
        target_domain TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (alias, target)
    );
    CREATE INDEX aliases_target ON aliases (target);
    CREATE INDEX aliases_alias_domain ON aliases (alias_domain);
    CREATE INDEX aliases_target_domain ON aliases (target_domain);
    """,
    # 1 -> 2: limits (the quota daemon's): per user, and per domain as its users' defaults.
    # NULL means "not set"; -1 (store.UNLIMITED) means "no limit".
    """
    ALTER TABLE users ADD COLUMN quota_storage INTEGER;
    ALTER TABLE users ADD COLUMN max_attachment_size INTEGER;
    ALTER TABLE users ADD COLUMN max_attachments INTEGER;
    CREATE TABLE domain_limits (
        domain TEXT PRIMARY KEY,
        quota_storage INTEGER,
        max_attachment_size INTEGER,
        max_attachments INTEGER
    ) WITHOUT ROWID;
    """,
)
# The column of each Limits field, in both tables.
_LIMIT_COLUMNS = {
    "storage": "quota_storage",
    "max_attachment": "max_attachment_size",
    "max_attachments": "max_attachments",
}
_LIMIT_SELECT = ", ".join(_LIMIT_COLUMNS[name] for name in LIMIT_FIELDS)
SCHEMA_VERSION = len(_MIGRATIONS)


class SQLiteUserStore(UserStore):
    """The user store in one SQLite file, created with its schema on first use."""

    def __init__(
        self, path: Path, *, hasher: PasswordHasher | None = None, create: bool = True
    ) -> None:
        """Open (and with ``create``, make if missing) the database at ``path``.

        ``create=False`` is for readers such as the quota daemon: a missing database is
        then an error rather than a new, empty store.
        """
        super().__init__(hasher)
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._create = create
        if create:
            self._create_file()
        elif not self.path.is_file():
            raise UserStoreError(f"{self.path}: the user database does not exist")
        try:
            conn = self._conn()
            # Outside any transaction, as SQLite requires; the mode persists in the file.
            conn.execute("PRAGMA journal_mode=WAL")
            self._migrate()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteUserStore({str(self.path)!r})"

    # -- connections and transactions --------------------------------------------------

    def _create_file(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created here rather than by SQLite so it never exists with umask permissions.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            raise UserStoreError(
                f"{self.path}: cannot create the user database: {exc.strerror}"
            ) from exc

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise UserStoreError(f"{self.path}: the user store is closed")
            try:
                # Without create, "mode=rw": a file removed meanwhile is an error, not
                # silently made anew.
                target = self.path if self._create else f"file:{quote(str(self.path))}?mode=rw"
                conn = sqlite3.connect(
                    target,
                    uri=not self._create,
                    timeout=_BUSY_TIMEOUT,
                    isolation_level=None,
                    # Each connection serves one thread; close() is the one exception.
                    check_same_thread=False,
                )
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise UserStoreError(f"{self.path}: cannot open the user database: {exc}") from exc
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise UserStoreError(f"{self.path}: {exc}") from exc
        finally:
            # data_version does not move for a connection's own commits.
            self._local.answers = None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._conn()
        except sqlite3.Error as exc:
            raise UserStoreError(f"{self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        conn = self._conn()
        if conn.in_transaction:
            yield
            return
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise UserStoreError(f"{self.path}: {exc}") from exc
        try:
            yield
        finally:
            # A read-only transaction: ending it only releases the snapshot.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("COMMIT")

    # -- cached lookups ----------------------------------------------------------------
    #
    # The server asks the same questions for every message (is the domain ours, who is
    # behind this recipient), at RCPT and again at delivery. The answers are kept until
    # the database changes: ``PRAGMA data_version`` moves when another connection (the
    # CLI, another thread) commits, and a commit of our own clears the cache, so a user
    # added or removed is seen by the next lookup.

    def _answers(self) -> dict[tuple[str, str], Any] | None:
        local = self._local
        try:
            conn = self._conn()
            if conn.in_transaction:
                return None
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        except (sqlite3.Error, UserStoreError):
            return None
        answers: dict[tuple[str, str], Any] | None = getattr(local, "answers", None)
        if answers is None or local.version != version or len(answers) >= _MAX_ANSWERS:
            answers = local.answers = {}
            local.version = version
        return answers

    def _cached(self, kind: str, key: str, lookup: Callable[[str], Any]) -> Any:
        answers = self._answers()
        if answers is None:
            return lookup(key)
        found = answers.get((kind, key), _MISS)
        if found is _MISS:
            # An error (an alias loop) is not kept: it is raised again on every lookup.
            found = answers[kind, key] = lookup(key)
        return found

    def is_local_domain(self, domain: str) -> bool:
        return bool(self._cached("domain", domain, super().is_local_domain))

    def user_exists(self, address: str) -> bool:
        return bool(self._cached("user", address, super().user_exists))

    def resolve(self, recipient: str) -> list[str] | None:
        found = self._cached("resolve", recipient, self._resolved)
        return None if found is None else list(found)

    def _resolved(self, recipient: str) -> tuple[str, ...] | None:
        resolved = super().resolve(recipient)
        return None if resolved is None else tuple(resolved)

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise UserStoreError(
                    f"{self.path}: schema version {version} is newer than this mailgate "
                    f"understands ({SCHEMA_VERSION}); upgrade mailgate"
                )
            for script in _MIGRATIONS[version:]:
                # executescript() would commit the open transaction; run statement by statement.
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, domain: str) -> None:
        name = normalize_domain(domain)
        with self._write() as db:
            if db.execute("SELECT 1 FROM domains WHERE domain = ?", (name,)).fetchone():
                raise UserStoreError(f"domain {name} already exists")
            db.execute("INSERT INTO domains (domain, created_at) VALUES (?, ?)", (name, _now()))

    def delete_domain(self, domain: str) -> None:
        name = normalize_domain(domain)
        with self._write() as db:
            if not db.execute("SELECT 1 FROM domains WHERE domain = ?", (name,)).fetchone():
                raise UserStoreError(f"no such domain: {name}")
            (users,) = db.execute("SELECT count(*) FROM users WHERE domain = ?", (name,)).fetchone()
            (aliases,) = db.execute(
                "SELECT count(*) FROM aliases WHERE alias_domain = ? OR target_domain = ?",
                (name, name),
            ).fetchone()
            if users or aliases:
                raise UserStoreError(
                    f"domain {name} is still used by {_count(users, 'user')} and "
                    f"{_count(aliases, 'alias', 'aliases')}; delete them first"
                )
            db.execute("DELETE FROM domains WHERE domain = ?", (name,))
            db.execute("DELETE FROM domain_limits WHERE domain = ?", (name,))

    def list_domains(self) -> list[str]:
        with self._read() as db:
            return [row[0] for row in db.execute("SELECT domain FROM domains ORDER BY domain")]

    def _is_store_domain(self, domain: str) -> bool:
        with self._read() as db:
            row = db.execute("SELECT 1 FROM domains WHERE domain = ?", (domain,)).fetchone()
        return row is not None

    # -- users -------------------------------------------------------------------------

    def _insert_user(self, address: str, password_hash: str) -> None:
        now = _now()
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE address = ?", (address,)).fetchone():
                raise UserStoreError(f"user {address} already exists")
            db.execute(
                "INSERT INTO users (address, domain, password_hash, created_at,"
                " password_changed_at) VALUES (?, ?, ?, ?, ?)",
                (address, domain_of(address), password_hash, now, now),
            )

    def _update_password_hash(self, address: str, password_hash: str) -> None:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE users SET password_hash = ?, password_changed_at = ? WHERE address = ?",
                (password_hash, _now(), address),
            )
            if cursor.rowcount == 0:
                raise UserStoreError(f"no such user: {address}")

    def _replace_password_hash(self, address: str, old: str, new: str) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE users SET password_hash = ? WHERE address = ? AND password_hash = ?",
                (new, address, old),
            )
            return cursor.rowcount == 1

    def _password_hash(self, address: str) -> str | None:
        with self._read() as db:
            row = db.execute(
                "SELECT password_hash FROM users WHERE address = ?", (address,)
            ).fetchone()
        return None if row is None else str(row[0])

    def _is_user(self, address: str) -> bool:
        with self._read() as db:
            row = db.execute("SELECT 1 FROM users WHERE address = ?", (address,)).fetchone()
        return row is not None

    def delete_user(self, address: str) -> list[tuple[str, str]]:
        canonical = normalize_address(address)
        with self._write() as db:
            if not db.execute("SELECT 1 FROM users WHERE address = ?", (canonical,)).fetchone():
                raise UserStoreError(f"no such user: {canonical}")
            removed = [
                (str(alias), str(target))
                for alias, target in db.execute(
                    "SELECT alias, target FROM aliases WHERE target = ? OR alias = ? ORDER BY id",
                    (canonical, canonical),
                )
            ]
            db.execute("DELETE FROM aliases WHERE target = ? OR alias = ?", (canonical, canonical))
            db.execute("DELETE FROM users WHERE address = ?", (canonical,))
        return removed

    def list_users(self) -> list[str]:
        with self._read() as db:
            return [
                row[0] for row in db.execute("SELECT address FROM users ORDER BY domain, address")
            ]

    # -- limits ------------------------------------------------------------------------

    def _get_limits(self, key: str) -> Limits | None:
        with self._read() as db:
            if is_catchall(key):
                row = db.execute(
                    f"SELECT {_LIMIT_SELECT} FROM domain_limits WHERE domain = ?", (key[1:],)
                ).fetchone()
                return Limits() if row is None else _limits(row)
            row = db.execute(
                f"SELECT {_LIMIT_SELECT} FROM users WHERE address = ?", (key,)
            ).fetchone()
        return None if row is None else _limits(row)

    def _update_limits(self, key: str, changes: dict[str, int | None]) -> Limits:
        assignments = ", ".join(f"{_LIMIT_COLUMNS[name]} = ?" for name in changes)
        values = list(changes.values())
        with self._write() as db:
            if is_catchall(key):
                domain = key[1:]
                db.execute(
                    "INSERT INTO domain_limits (domain) VALUES (?) ON CONFLICT DO NOTHING",
                    (domain,),
                )
                if changes:
                    db.execute(
                        f"UPDATE domain_limits SET {assignments} WHERE domain = ?",
                        (*values, domain),
                    )
                row = db.execute(
                    f"SELECT {_LIMIT_SELECT} FROM domain_limits WHERE domain = ?", (domain,)
                ).fetchone()
                limits = _limits(row)
                if limits.is_empty():
                    # Nothing left to say about the domain: no row, as before any setting.
                    db.execute("DELETE FROM domain_limits WHERE domain = ?", (domain,))
                return limits
            if changes:
                cursor = db.execute(
                    f"UPDATE users SET {assignments} WHERE address = ?", (*values, key)
                )
                if cursor.rowcount == 0:
                    raise UserStoreError(f"no such user: {key}")
            row = db.execute(
                f"SELECT {_LIMIT_SELECT} FROM users WHERE address = ?", (key,)
            ).fetchone()
            if row is None:
                raise UserStoreError(f"no such user: {key}")
            return _limits(row)

    def _all_limits(self) -> list[tuple[str, Limits]]:
        where = " OR ".join(f"{column} IS NOT NULL" for column in _LIMIT_COLUMNS.values())
        with self._read() as db:
            domains = db.execute(f"SELECT domain, {_LIMIT_SELECT} FROM domain_limits").fetchall()
            users = db.execute(
                f"SELECT address, {_LIMIT_SELECT} FROM users WHERE {where}"
            ).fetchall()
        found = [(catchall_key(str(row[0])), _limits(row[1:])) for row in domains]
        found += [(str(row[0]), _limits(row[1:])) for row in users]
        # The domain's own row ("@d" has no local part) first, then its users by address.
        found.sort(key=lambda item: (domain_of(item[0]), not is_catchall(item[0]), item[0]))
        return found

    # -- aliases -----------------------------------------------------------------------

    def add_alias(self, alias: str, target: str) -> None:
        key = normalize_alias(alias)
        if target.strip().startswith("@"):
            raise UserStoreError(
                f"invalid target {target.strip()!r}: a target is a full address, not a domain"
            )
        destination = normalize_address(target)
        with self._write() as db:
            if db.execute(
                "SELECT 1 FROM aliases WHERE alias = ? AND target = ?", (key, destination)
            ).fetchone():
                raise UserStoreError(f"alias {key} -> {destination} already exists")
            db.execute(
                "INSERT INTO aliases (alias, alias_domain, target, target_domain, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, domain_of(key), destination, domain_of(destination), _now()),
            )

    def delete_alias(self, alias: str, target: str | None = None) -> int:
        key = normalize_alias(alias)
        with self._write() as db:
            if target is None:
                cursor = db.execute("DELETE FROM aliases WHERE alias = ?", (key,))
                if cursor.rowcount == 0:
                    raise UserStoreError(f"no such alias: {key}")
            else:
                destination = normalize_address(target)
                cursor = db.execute(
                    "DELETE FROM aliases WHERE alias = ? AND target = ?", (key, destination)
                )
                if cursor.rowcount == 0:
                    raise UserStoreError(f"no such alias: {key} -> {destination}")
            return cursor.rowcount

    def list_aliases(self) -> list[tuple[str, str]]:
        with self._read() as db:
            rows = db.execute("SELECT alias, target FROM aliases ORDER BY alias_domain, alias, id")
            return [(str(alias), str(target)) for alias, target in rows]

    def _alias_targets(self, key: str) -> list[str]:
        with self._read() as db:
            rows = db.execute("SELECT target FROM aliases WHERE alias = ? ORDER BY id", (key,))
            return [str(row[0]) for row in rows]

    def _alias_sources(self, target: str) -> list[str]:
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT alias FROM aliases WHERE target = ? ORDER BY alias", (target,)
            )
            return [str(row[0]) for row in rows]

    def _alias_sources_uncovered(self, domain: str) -> list[str]:
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT a.alias FROM aliases AS a"
                " WHERE a.target_domain = ?"
                " AND NOT EXISTS (SELECT 1 FROM users AS u WHERE u.address = a.target)"
                " AND NOT EXISTS (SELECT 1 FROM aliases AS b WHERE b.alias = a.target)"
                " ORDER BY a.alias",
                (domain,),
            )
            return [str(row[0]) for row in rows]


def _limits(row: Sequence[Any]) -> Limits:
    values = [None if value is None else int(value) for value in row]
    return Limits(**dict(zip(LIMIT_FIELDS, values, strict=True)))


def _now() -> int:
    return int(time.time())


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"
