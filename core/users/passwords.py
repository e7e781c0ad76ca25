"""Password hashing for the user store: Argon2id through argon2-cffi, and nothing else.

Every stored hash is a PHC string (``$argon2id$v=19$m=...,t=...,p=...$salt$hash``) that
carries its own parameters, so raising the cost later only needs a new hasher: old hashes
still verify and are replaced at the next successful login (``needs_rehash``).

Unknown logins must cost as much as known ones, or the response time tells an attacker
which addresses exist; ``verify_dummy`` burns one verification against a hash with the
same parameters as the real ones.
"""

from __future__ import annotations

import secrets
import threading

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "DEFAULT_HASHER",
    "hash_password",
    "make_hasher",
    "needs_rehash",
    "verify_dummy",
    "verify_password",
]


def make_hasher(
    *, time_cost: int = 3, memory_cost: int = 65536, parallelism: int = 4
) -> PasswordHasher:
    """An Argon2id hasher; the defaults are RFC 9106's second recommended profile (64 MiB)."""
    return PasswordHasher(
        time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID
    )


DEFAULT_HASHER = make_hasher()

# A hash of a random secret nobody knows, made with DEFAULT_HASHER's parameters. Being a
# constant, the first unknown login of a process costs no extra hashing.
_DEFAULT_DUMMY = (
    "$argon2id$v=19$m=65536,t=3,p=4$xUZr5PO2uhf38OurAiOraQ"
    "$6TIJB4hdcjgN6z+ygfJFIQZo6OACNF7nh8+cqF47GWo"
)
_dummies: dict[tuple[int, ...], str] = {}
_dummies_lock = threading.Lock()


def hash_password(password: str, hasher: PasswordHasher = DEFAULT_HASHER) -> str:
    """The PHC string to store for ``password``."""
    return hasher.hash(password)


def verify_password(stored: str, password: str, hasher: PasswordHasher = DEFAULT_HASHER) -> bool:
    """True when ``password`` matches ``stored``; a malformed stored hash never matches."""
    try:
        return hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str, hasher: PasswordHasher = DEFAULT_HASHER) -> bool:
    """True when ``stored`` was made with other parameters (or another variant) than ``hasher``."""
    try:
        return hasher.check_needs_rehash(stored)
    except InvalidHashError:
        return True


def verify_dummy(password: str, hasher: PasswordHasher = DEFAULT_HASHER) -> None:
    """Spend the time of one real verification, for a login that has no stored hash."""
    verify_password(_dummy_hash(hasher), password, hasher)


def _dummy_hash(hasher: PasswordHasher) -> str:
    if not needs_rehash(_DEFAULT_DUMMY, hasher):
        return _DEFAULT_DUMMY
    key = (
        hasher.type.value,
        hasher.time_cost,
        hasher.memory_cost,
        hasher.parallelism,
        hasher.hash_len,
        hasher.salt_len,
    )
    with _dummies_lock:
        dummy = _dummies.get(key)
        if dummy is None:
            dummy = _dummies[key] = hasher.hash(secrets.token_urlsafe(32))
    return dummy
