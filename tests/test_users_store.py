"""The user store on a real SQLite file: addresses, logins, aliases, domains, persistence."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from argon2 import PasswordHasher, Type, extract_parameters

from mailgate.core.errors import UserStoreError
from mailgate.core.users import passwords
from mailgate.core.users.passwords import make_hasher
from mailgate.core.users.sqlite import SCHEMA_VERSION, SQLiteUserStore
from mailgate.core.users.store import (
    MAX_ALIAS_DEPTH,
    normalize_address,
    normalize_alias,
    normalize_domain,
)

# Cheap parameters keep the suite fast; one test below checks the real defaults.
FAST = make_hasher(time_cost=1, memory_cost=1024, parallelism=1)
SLOWER = make_hasher(time_cost=2, memory_cost=2048, parallelism=1)


class CountingHasher(PasswordHasher):
    """Counts verifications, to see that unknown logins pay for one too."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1, type=Type.ID)
        self.verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verifications += 1
        return super().verify(hash, password)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "users.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteUserStore]:
    with SQLiteUserStore(db_path, hasher=FAST) as opened:
        opened.add_domain("example.com")
        yield opened


def stored_hash(path: Path, address: str) -> str:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT password_hash FROM users WHERE address = ?", (address,))
        return str(row.fetchone()[0])


# -- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("alice@example.com", "alice@example.com"),
        ("  Alice.Smith@EXAMPLE.Com \n", "alice.smith@example.com"),
        ("a+tag@example.com.", "a+tag@example.com"),
        ("o'neil@sub.example.org", "o'neil@sub.example.org"),
        ("jörg@bücher.de", "jörg@xn--bcher-kva.de"),
    ],
)
def test_normalize_address(raw: str, canonical: str) -> None:
    assert normalize_address(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("alice", "expected local@domain"),
        ("@example.com", "expected local@domain"),
        ("alice@", "expected local@domain"),
        ("al ice@example.com", "local part"),
        ("alice..x@example.com", "local part"),
        (".alice@example.com", "local part"),
        ('"a b"@example.com', "quoted"),
        ("alice@exa mple.com", "invalid domain"),
        ("alice@-example.com", "invalid domain"),
        ("a" * 65 + "@example.com", "64 octets"),
        ("alice@" + "a" * 64 + ".com", "invalid domain"),
    ],
)
def test_normalize_address_rejects(raw: str, message: str) -> None:
    with pytest.raises(UserStoreError, match=message):
        normalize_address(raw)


def test_normalize_alias_and_domain() -> None:
    assert normalize_alias(" @Example.COM ") == "@example.com"
    assert normalize_alias("Sales@Example.com") == "sales@example.com"
    assert normalize_domain("Bücher.DE.") == "xn--bcher-kva.de"
    with pytest.raises(UserStoreError):
        normalize_alias("@")
    with pytest.raises(UserStoreError):
        normalize_domain("")


# -- users and logins --------------------------------------------------------------------


def test_add_and_authenticate(store: SQLiteUserStore) -> None:
    store.add_user("Alice@Example.com", "correct horse")
    assert store.user_exists("alice@example.com")
    assert store.list_users() == ["alice@example.com"]
    assert store.authenticate("alice@example.com", "correct horse") == "alice@example.com"
    assert store.authenticate("  ALICE@example.COM", "correct horse") == "alice@example.com"
    assert store.authenticate("alice@example.com", "Correct horse") is None
    assert store.authenticate("alice@example.com", "") is None
    assert store.authenticate("bob@example.com", "correct horse") is None
    assert store.authenticate("not an address", "correct horse") is None


def test_hashes_are_argon2id_with_default_parameters(db_path: Path) -> None:
    with SQLiteUserStore(db_path) as store:
        store.add_user("alice@example.com", "s3cret")
        assert store.authenticate("alice@example.com", "s3cret") == "alice@example.com"
    stored = stored_hash(db_path, "alice@example.com")
    assert stored.startswith("$argon2id$")
    assert "s3cret" not in stored
    params = extract_parameters(stored)
    assert (params.time_cost, params.memory_cost, params.parallelism) == (3, 65536, 4)


def test_unknown_login_costs_one_verification(db_path: Path) -> None:
    hasher = CountingHasher()
    with SQLiteUserStore(db_path, hasher=hasher) as store:
        store.add_user("alice@example.com", "pw")
        hasher.verifications = 0
        assert store.authenticate("alice@example.com", "wrong") is None
        assert hasher.verifications == 1
        assert store.authenticate("nobody@example.com", "wrong") is None
        assert hasher.verifications == 2
        assert store.authenticate("garbage", "wrong") is None
        assert hasher.verifications == 3


def test_dummy_hash_matches_the_hasher_parameters() -> None:
    for hasher in (passwords.DEFAULT_HASHER, FAST, SLOWER):
        dummy = passwords._dummy_hash(hasher)
        assert dummy.startswith("$argon2id$")
        assert not passwords.needs_rehash(dummy, hasher)


def test_password_helpers() -> None:
    stored = passwords.hash_password("pw", FAST)
    assert passwords.verify_password(stored, "pw", FAST)
    assert not passwords.verify_password(stored, "pW", FAST)
    assert not passwords.verify_password("not a hash", "pw", FAST)
    assert not passwords.needs_rehash(stored, FAST)
    assert passwords.needs_rehash(stored, SLOWER)
    assert passwords.needs_rehash("not a hash", FAST)


def test_rehash_on_login_when_parameters_change(db_path: Path) -> None:
    with SQLiteUserStore(db_path, hasher=FAST) as store:
        store.add_user("alice@example.com", "pw")
    old = stored_hash(db_path, "alice@example.com")
    with SQLiteUserStore(db_path, hasher=SLOWER) as store:
        assert store.authenticate("alice@example.com", "wrong") is None
        assert stored_hash(db_path, "alice@example.com") == old
        assert store.authenticate("alice@example.com", "pw") == "alice@example.com"
        new = stored_hash(db_path, "alice@example.com")
        assert new != old
        assert extract_parameters(new).time_cost == 2
        assert store.authenticate("alice@example.com", "pw") == "alice@example.com"


def test_rehash_does_not_undo_a_password_change(store: SQLiteUserStore, db_path: Path) -> None:
    store.add_user("alice@example.com", "old")
    before = stored_hash(db_path, "alice@example.com")
    store.set_password("alice@example.com", "new")
    assert not store._replace_password_hash("alice@example.com", before, "$argon2id$stale")
    assert store.authenticate("alice@example.com", "new") == "alice@example.com"


def test_user_errors(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    with pytest.raises(UserStoreError, match="already exists"):
        store.add_user("ALICE@example.com", "other")
    with pytest.raises(UserStoreError, match="empty password"):
        store.add_user("bob@example.com", "")
    with pytest.raises(UserStoreError, match="NUL"):
        store.add_user("bob@example.com", "a\0b")
    with pytest.raises(UserStoreError, match="invalid address"):
        store.add_user("bob", "pw")
    with pytest.raises(UserStoreError, match="no such user"):
        store.set_password("bob@example.com", "pw")
    with pytest.raises(UserStoreError, match="no such user"):
        store.delete_user("bob@example.com")
    assert not store.user_exists("bob@example.com")
    assert not store.user_exists("not an address")


def test_set_password(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "old")
    store.set_password("Alice@Example.com", "new")
    assert store.authenticate("alice@example.com", "old") is None
    assert store.authenticate("alice@example.com", "new") == "alice@example.com"


def test_delete_user_takes_its_alias_rows(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_user("bob@example.com", "pw")
    store.add_alias("team@example.com", "alice@example.com")
    store.add_alias("team@example.com", "bob@example.com")
    store.add_alias("alice@example.com", "alice@elsewhere.org")
    removed = store.delete_user("alice@example.com")
    assert removed == [
        ("team@example.com", "alice@example.com"),
        ("alice@example.com", "alice@elsewhere.org"),
    ]
    assert store.list_users() == ["bob@example.com"]
    assert store.list_aliases() == [("team@example.com", "bob@example.com")]
    assert store.resolve("alice@example.com") is None
    assert store.authenticate("alice@example.com", "pw") is None


# -- domains -----------------------------------------------------------------------------


def test_domains(store: SQLiteUserStore) -> None:
    store.add_domain("Example.ORG")
    assert store.list_domains() == ["example.com", "example.org"]
    assert store.is_local_domain("EXAMPLE.org.")
    assert not store.is_local_domain("example.net")
    assert not store.is_local_domain("not a domain")
    with pytest.raises(UserStoreError, match="already exists"):
        store.add_domain("example.org")
    store.delete_domain("example.org")
    assert store.list_domains() == ["example.com"]
    with pytest.raises(UserStoreError, match="no such domain"):
        store.delete_domain("example.org")


def test_delete_domain_refused_while_used(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    with pytest.raises(UserStoreError, match="1 user and 0 aliases"):
        store.delete_domain("example.com")
    store.delete_user("alice@example.com")
    store.add_alias("@example.com", "someone@remote.org")
    with pytest.raises(UserStoreError, match="0 users and 1 alias;"):
        store.delete_domain("example.com")
    store.delete_alias("@example.com")
    store.add_domain("example.org")
    store.add_alias("x@example.org", "y@example.com")
    with pytest.raises(UserStoreError, match="1 alias"):
        store.delete_domain("example.com")
    store.delete_alias("x@example.org", "y@example.com")
    store.delete_domain("example.com")
    assert store.list_domains() == ["example.org"]


# -- aliases and resolution --------------------------------------------------------------


def test_alias_rows(store: SQLiteUserStore) -> None:
    store.add_alias("Team@example.com", "zed@remote.org")
    store.add_alias("team@example.com", "alice@example.com")
    store.add_alias("@example.com", "alice@example.com")
    assert store.list_aliases() == [
        ("@example.com", "alice@example.com"),
        ("team@example.com", "zed@remote.org"),
        ("team@example.com", "alice@example.com"),
    ]
    with pytest.raises(UserStoreError, match="already exists"):
        store.add_alias("team@example.com", "ZED@remote.org")
    with pytest.raises(UserStoreError, match="full address"):
        store.add_alias("team@example.com", "@remote.org")
    assert store.delete_alias("team@example.com", "zed@remote.org") == 1
    with pytest.raises(UserStoreError, match="no such alias"):
        store.delete_alias("team@example.com", "zed@remote.org")
    store.add_alias("team@example.com", "bob@example.com")
    assert store.delete_alias("TEAM@example.com") == 2
    with pytest.raises(UserStoreError, match="no such alias"):
        store.delete_alias("team@example.com")


def test_resolve_users_and_unknowns(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    assert store.resolve("Alice@EXAMPLE.com") == ["alice@example.com"]
    assert store.resolve("bob@example.com") is None
    assert store.resolve("alice@remote.org") is None
    assert store.resolve("not an address") is None


def test_resolve_expands_aliases_in_order_without_duplicates(store: SQLiteUserStore) -> None:
    for user in ("alice", "bob", "carol"):
        store.add_user(f"{user}@example.com", "pw")
    store.add_alias("all@example.com", "staff@example.com")
    store.add_alias("all@example.com", "friend@remote.org")
    store.add_alias("all@example.com", "bob@example.com")
    store.add_alias("staff@example.com", "bob@example.com")
    store.add_alias("staff@example.com", "alice@example.com")
    store.add_alias("staff@example.com", "FRIEND@remote.org")
    assert store.resolve("all@example.com") == [
        "bob@example.com",
        "alice@example.com",
        "friend@remote.org",
    ]
    assert store.resolve("staff@example.com") == [
        "bob@example.com",
        "alice@example.com",
        "friend@remote.org",
    ]


def test_catch_all_precedence(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_user("postmaster@example.com", "pw")
    store.add_alias("@example.com", "postmaster@example.com")
    store.add_alias("sales@example.com", "alice@example.com")
    assert store.resolve("anything@example.com") == ["postmaster@example.com"]
    assert store.resolve("alice@example.com") == ["alice@example.com"]
    assert store.resolve("sales@example.com") == ["alice@example.com"]
    assert store.resolve("anything@example.org") is None


def test_user_forwarding_and_keeping_a_copy(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_user("bob@example.com", "pw")
    store.add_alias("alice@example.com", "alice@gmail.example")
    assert store.resolve("alice@example.com") == ["alice@gmail.example"]
    store.add_alias("bob@example.com", "bob@example.com")
    store.add_alias("bob@example.com", "bob@gmail.example")
    assert store.resolve("bob@example.com") == ["bob@example.com", "bob@gmail.example"]


def test_lists_that_include_each_other(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_user("bob@example.com", "pw")
    store.add_alias("team@example.com", "ops@example.com")
    store.add_alias("team@example.com", "alice@example.com")
    store.add_alias("ops@example.com", "team@example.com")
    store.add_alias("ops@example.com", "bob@example.com")
    assert store.resolve("team@example.com") == ["bob@example.com", "alice@example.com"]
    assert store.resolve("ops@example.com") == ["alice@example.com", "bob@example.com"]


def test_pure_loops_are_errors_not_silent_drops(store: SQLiteUserStore) -> None:
    store.add_alias("a@example.com", "b@example.com")
    store.add_alias("b@example.com", "a@example.com")
    with pytest.raises(UserStoreError, match="loop"):
        store.resolve("a@example.com")
    store.add_alias("@example.com", "ghost@example.com")
    with pytest.raises(UserStoreError, match="loop"):
        store.resolve("anyone@example.com")


def test_alias_to_an_address_nobody_answers_for(store: SQLiteUserStore) -> None:
    # Such a target is final: delivery bounces it, as Postfix does for a stale alias.
    store.add_alias("old@example.com", "gone@example.com")
    assert store.resolve("old@example.com") == ["gone@example.com"]


def test_depth_limit(store: SQLiteUserStore) -> None:
    store.add_user("end@example.com", "pw")
    chain = [f"hop{n}@example.com" for n in range(MAX_ALIAS_DEPTH + 1)]
    # hop1 -> ... -> hop20 -> end: twenty levels of aliases, the most allowed.
    for alias, target in zip(chain[1:], [*chain[2:], "end@example.com"], strict=True):
        store.add_alias(alias, target)
    assert store.resolve(chain[1]) == ["end@example.com"]
    store.add_alias(chain[0], chain[1])
    with pytest.raises(UserStoreError, match="deeper than 20"):
        store.resolve(chain[0])


def test_senders_for(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_user("bob@example.com", "pw")
    store.add_alias("sales@example.com", "alice@example.com")
    store.add_alias("info@example.com", "sales@example.com")
    store.add_alias("info@example.com", "bob@example.com")
    store.add_alias("boss@example.com", "bob@example.com")
    assert store.senders_for("Alice@example.com") == {
        "alice@example.com",
        "sales@example.com",
        "info@example.com",
    }
    assert store.senders_for("bob@example.com") == {
        "bob@example.com",
        "info@example.com",
        "boss@example.com",
    }


def test_senders_for_catch_all(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_user("bob@example.com", "pw")
    store.add_alias("@example.com", "alice@example.com")
    store.add_alias("sales@example.com", "bob@example.com")
    store.add_alias("orders@example.com", "unclaimed@example.com")
    assert store.senders_for("alice@example.com") == {
        "alice@example.com",
        "@example.com",
        "orders@example.com",
    }
    assert store.may_send_as("alice@example.com", "random@example.com")
    assert store.may_send_as("alice@example.com", "orders@example.com")
    assert not store.may_send_as("alice@example.com", "bob@example.com")
    assert not store.may_send_as("alice@example.com", "sales@example.com")
    assert not store.may_send_as("alice@example.com", "random@example.org")
    assert store.may_send_as("bob@example.com", "sales@example.com")
    assert not store.may_send_as("bob@example.com", "random@example.com")
    assert not store.may_send_as("bob@example.com", "garbage")


def test_senders_for_a_forwarded_user(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_alias("sales@example.com", "alice@example.com")
    store.add_alias("alice@example.com", "alice@remote.org")
    # Mail for alice leaves the server, so sales@ does not reach her mailbox either.
    assert store.senders_for("alice@example.com") == {"alice@example.com"}
    store.add_alias("alice@example.com", "alice@example.com")
    assert store.senders_for("alice@example.com") == {"alice@example.com", "sales@example.com"}


# -- the file ----------------------------------------------------------------------------


def test_persistence_and_permissions(db_path: Path) -> None:
    with SQLiteUserStore(db_path, hasher=FAST) as store:
        store.add_domain("example.com")
        store.add_user("alice@example.com", "pw")
        store.add_alias("team@example.com", "alice@example.com")
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    with SQLiteUserStore(db_path, hasher=FAST) as store:
        assert store.list_domains() == ["example.com"]
        assert store.authenticate("alice@example.com", "pw") == "alice@example.com"
        assert store.resolve("team@example.com") == ["alice@example.com"]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_newer_schema_is_refused(db_path: Path) -> None:
    SQLiteUserStore(db_path, hasher=FAST).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(UserStoreError, match="newer than this mailgate"):
        SQLiteUserStore(db_path, hasher=FAST)


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserStoreError, match="cannot create"):
        SQLiteUserStore(blocker / "users.sqlite3", hasher=FAST)


def test_closed_store_refuses(db_path: Path) -> None:
    store = SQLiteUserStore(db_path, hasher=FAST)
    store.close()
    with pytest.raises(UserStoreError, match="closed"):
        store.list_users()


def test_argon2i_hasher_is_refused(db_path: Path) -> None:
    with pytest.raises(ValueError, match="Argon2id"):
        SQLiteUserStore(db_path, hasher=PasswordHasher(type=Type.I))


def test_threads_share_one_store(store: SQLiteUserStore) -> None:
    store.add_user("alice@example.com", "pw")
    store.add_alias("team@example.com", "alice@example.com")
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(20):
                assert store.resolve("team@example.com") is not None
                assert store.authenticate("alice@example.com", "pw") == "alice@example.com"
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        try:
            for n in range(40):
                store.add_alias("team@example.com", f"member{n}@remote.org")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    resolved = store.resolve("team@example.com")
    assert resolved is not None and len(resolved) == 41


# -- limits (the quota daemon's) ------------------------------------------------------------


def test_limits_of_users_and_domains(store: SQLiteUserStore) -> None:
    from mailgate.core.users.store import UNLIMITED, Limits

    store.add_user("a@example.com", "pw")
    assert store.limits("a@example.com") == Limits()
    assert store.effective_limits("a@example.com") == Limits()  # nothing set: unlimited
    store.set_limits("A@Example.com", storage=100, max_attachments=3)
    store.set_limits("@example.com", storage=1000, max_attachment=50)
    assert store.effective_limits("a@example.com") == Limits(100, 50, 3)
    # UNLIMITED overrides the domain's default; None falls back to it.
    store.set_limits("a@example.com", storage=UNLIMITED, max_attachments=None)
    assert store.effective_limits("a@example.com") == Limits(None, 50, None)
    assert store.list_limits() == [
        ("@example.com", Limits(1000, 50, None)),
        ("a@example.com", Limits(UNLIMITED, None, None)),
    ]
    store.set_limits("@example.com", storage=None, max_attachment=None)
    assert store.list_limits() == [("a@example.com", Limits(UNLIMITED, None, None))]
    with pytest.raises(UserStoreError, match=r"no such user: b@example\.com"):
        store.set_limits("b@example.com", storage=1)
    with pytest.raises(UserStoreError, match="no such user"):
        store.effective_limits("b@example.com")
    with pytest.raises(UserStoreError, match="0 or more"):
        store.set_limits("a@example.com", storage=-5)
    with pytest.raises(UserStoreError, match="unknown limit"):
        store.set_limits("a@example.com", quota=5)
    # Deleting the domain takes its defaults along.
    store.set_limits("@example.com", storage=7)
    store.delete_user("a@example.com")
    store.delete_domain("example.com")
    assert store.list_limits() == []


def test_migration_from_the_first_schema(db_path: Path) -> None:
    from mailgate.core.users.sqlite import _MIGRATIONS
    from mailgate.core.users.store import Limits

    # A database as the first release of the store made it, with one user in it.
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.executescript(_MIGRATIONS[0])
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    conn.execute(
        "INSERT INTO users (address, domain, password_hash, created_at, password_changed_at)"
        " VALUES ('old@example.com', 'example.com', 'x', 0, 0)"
    )
    conn.close()
    with SQLiteUserStore(db_path) as store:
        assert store.list_users() == ["old@example.com"]
        assert store.limits("old@example.com") == Limits()
        store.set_limits("old@example.com", storage=10)
        assert store.effective_limits("old@example.com").storage == 10
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == 2


def test_reader_never_creates_the_database(tmp_path: Path) -> None:
    with pytest.raises(UserStoreError, match="does not exist"):
        SQLiteUserStore(tmp_path / "missing.sqlite3", create=False)
    assert not (tmp_path / "missing.sqlite3").exists()


def test_lookups_see_changes_made_anywhere_at_once(store: SQLiteUserStore, db_path: Path) -> None:
    """Answers are kept between lookups, but never past a change to the database: one
    made through this store, through another connection (the CLI) or by a raw write."""
    store.add_domain("example.org")
    assert store.resolve("bob@example.org") is None
    assert not store.user_exists("bob@example.org")
    store.add_user("bob@example.org", "correct horse battery")  # this connection
    assert store.resolve("bob@example.org") == ["bob@example.org"]
    assert store.user_exists("bob@example.org")

    other = SQLiteUserStore(db_path)  # another process's view, as `mailgate user` has
    try:
        other.add_alias("team@example.org", "bob@example.org")
        assert store.resolve("team@example.org") == ["bob@example.org"]
        other.add_alias("team@example.org", "carol@example.net")
        assert store.resolve("team@example.org") == ["bob@example.org", "carol@example.net"]
        other.delete_user("bob@example.org")
        assert not store.user_exists("bob@example.org")
        assert store.resolve("bob@example.org") is None
        assert not store.is_local_domain("example.info")
        other.add_domain("example.info")
        assert store.is_local_domain("example.info")
        other.delete_domain("example.info")
        assert not store.is_local_domain("example.info")
    finally:
        other.close()
    assert not store.is_local_domain("example.biz")
    with sqlite3.connect(db_path) as raw:
        raw.execute("INSERT INTO domains (domain, created_at) VALUES ('example.biz', 0)")
    assert store.is_local_domain("example.biz")


def test_a_cached_answer_cannot_be_changed_by_its_caller(store: SQLiteUserStore) -> None:
    store.add_domain("example.org")
    store.add_user("bob@example.org", "correct horse battery")
    first = store.resolve("bob@example.org")
    assert first is not None
    first.append("mallory@example.net")
    assert store.resolve("bob@example.org") == ["bob@example.org"]


def test_alias_loops_are_reported_on_every_lookup(store: SQLiteUserStore) -> None:
    store.add_domain("example.org")
    store.add_alias("a@example.org", "b@example.org")
    store.add_alias("b@example.org", "a@example.org")
    for _ in range(2):
        with pytest.raises(UserStoreError, match="loop"):
            store.resolve("a@example.org")
