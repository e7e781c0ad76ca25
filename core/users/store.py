"""The user-store interface and the address rules every backend shares.

``UserStore`` is what the SMTP server and the command line talk to. A backend (SQLite
here, PostgreSQL for clusters) implements storage: the domain, user and alias tables and a
handful of lookups. The policy lives here, once, so that every backend answers alike:
how addresses are normalised, how a login is checked in constant time and rehashed, how a
recipient expands through aliases, and which sender addresses a user may use.

Addresses are canonical once normalised: surrounding whitespace stripped, local part and
domain lower-cased, the domain in its ASCII (IDNA A-label) form without a trailing dot.
Quoted local parts are refused; nobody needs them for a mailbox name and they make
matching ambiguous.

Alias semantics, close to Postfix's virtual_alias_maps:

* an alias key is a full address (``sales@example.com``) or a catch-all (``@example.com``);
  one key may have several targets, kept in the order they were added;
* for an address, exact alias rows win over a user of the same address (so a user's mail
  can be forwarded; listing the user among the targets keeps a copy), a user wins over the
  catch-all, and the catch-all applies to what is left in its domain;
* expansion is recursive up to ``MAX_ALIAS_DEPTH`` levels; an address already being
  expanded is not expanded again, so lists that include each other resolve to the union of
  their members; an address that is neither a user nor an alias is a final destination
  (a remote address, or a local one that delivery will bounce).

Limits (what the quota daemon enforces) are kept per user and, as defaults for their
users, per domain (key ``@domain``): the storage quota in bytes, the largest attachment in
bytes and the number of attachments. A stored value is a number, ``UNLIMITED`` (no limit,
whatever the domain's default says) or None (not set: the domain's default applies, and
without one there is no limit). ``effective_limits`` folds the two levels into the limits
in force, None meaning unlimited.
"""

from __future__ import annotations

import contextlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Self

from argon2 import PasswordHasher, Type

from mailgate.core.errors import UserStoreError
from mailgate.core.users.passwords import (
    DEFAULT_HASHER,
    hash_password,
    needs_rehash,
    verify_dummy,
    verify_password,
)

__all__ = [
    "LIMIT_FIELDS",
    "MAX_ALIAS_DEPTH",
    "MAX_EXPANSION",
    "UNLIMITED",
    "Limits",
    "UserStore",
    "catchall_key",
    "domain_of",
    "is_catchall",
    "normalize_address",
    "normalize_alias",
    "normalize_domain",
]

log = logging.getLogger("mailgate.core.users")

MAX_ALIAS_DEPTH = 20
# Like Postfix's virtual_alias_expansion_limit: one recipient must not become a mail bomb.
MAX_EXPANSION = 1000

_MAX_ADDRESS = 254
_MAX_LOCAL = 64
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5321 dot-atom: atext plus, for SMTPUTF8 (RFC 6531), any non-ASCII character.
_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_LOCAL_RE = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")


def normalize_domain(domain: str) -> str:
    """The canonical form of a domain name, or UserStoreError saying what is wrong."""
    text = domain.strip().rstrip(".").lower()
    if not text:
        raise UserStoreError("empty domain name")
    try:
        ascii_form = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UserStoreError(f"invalid domain name {domain.strip()!r}") from None
    labels = ascii_form.split(".")
    if len(ascii_form) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise UserStoreError(f"invalid domain name {domain.strip()!r}")
    return ascii_form


def normalize_address(address: str) -> str:
    """The canonical ``local@domain`` form of ``address``, or UserStoreError."""
    text = address.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise UserStoreError(f"invalid address {text!r}: expected local@domain")
    local = local.lower()
    if local.startswith('"'):
        raise UserStoreError(f"invalid address {text!r}: quoted local parts are not supported")
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise UserStoreError(f"invalid address {text!r}: local part longer than 64 octets")
    if not _LOCAL_RE.match(local):
        raise UserStoreError(
            f"invalid address {text!r}: the local part may hold letters, digits, "
            "!#$%&'*+/=?^_`{|}~- and single dots between them"
        )
    try:
        canonical = f"{local}@{normalize_domain(domain)}"
    except UserStoreError as exc:
        raise UserStoreError(f"invalid address {text!r}: {exc}") from None
    if len(canonical.encode("utf-8")) > _MAX_ADDRESS:
        raise UserStoreError(f"invalid address {text!r}: longer than 254 octets")
    return canonical


def normalize_alias(alias: str) -> str:
    """An alias key: a full address, or ``@domain`` for the domain's catch-all."""
    text = alias.strip()
    if text.startswith("@"):
        return catchall_key(normalize_domain(text[1:]))
    return normalize_address(text)


def catchall_key(domain: str) -> str:
    return "@" + domain


def is_catchall(alias: str) -> bool:
    return alias.startswith("@")


def domain_of(address: str) -> str:
    """The domain of a normalised address or alias key."""
    return address.rpartition("@")[2]


# A stored limit meaning "no limit", which overrides a domain's default (None inherits it).
UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of a user or a domain; see the module docstring for None and UNLIMITED.

    ``storage`` is the mailbox quota in bytes, ``max_attachment`` the size in bytes of the
    largest attachment accepted (decoded), ``max_attachments`` how many attachments one
    message may carry.
    """

    storage: int | None = None
    max_attachment: int | None = None
    max_attachments: int | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in LIMIT_FIELDS)

    def over(self, fallback: Limits) -> Limits:
        """These limits with ``fallback``'s for the fields not set here, UNLIMITED as None."""
        values = {}
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if value is None:
                value = getattr(fallback, name)
            values[name] = None if value is None or value == UNLIMITED else value
        return Limits(**values)


LIMIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Limits))


def _check_limit(name: str, value: int | None) -> None:
    if name not in LIMIT_FIELDS:
        raise UserStoreError(f"unknown limit {name!r} (known: {', '.join(LIMIT_FIELDS)})")
    if value is not None and (isinstance(value, bool) or value < UNLIMITED):
        raise UserStoreError(f"{name}: a limit is a number of 0 or more, got {value!r}")


def _check_password(password: str) -> None:
    if not password:
        raise UserStoreError("empty password refused")
    # SMTP AUTH PLAIN separates its fields with NUL, so such a password could never log in.
    if "\0" in password:
        raise UserStoreError("a password must not contain NUL characters")


class UserStore(ABC):
    """Domains, users and aliases, behind one synchronous interface.

    Every method may block (disk, network, Argon2), so the async server calls them through
    ``asyncio.to_thread``; implementations must be safe to call from several threads.
    Methods taking addresses accept any spelling and normalise it; they raise
    UserStoreError for a malformed address and for every refused operation.

    Which domains are local is only partly known here: the store keeps its own list, and
    ``Config.local_domains`` adds more. Callers that create users or aliases check the
    domain against both (see the command line); the store does not refuse other domains.
    """

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = DEFAULT_HASHER if hasher is None else hasher
        if self.hasher.type is not Type.ID:
            raise ValueError("the user store hashes passwords with Argon2id only")

    # -- storage: what a backend implements ---------------------------------------------

    @abstractmethod
    def add_domain(self, domain: str) -> None:
        """Add a local domain; UserStoreError if it is already there."""

    @abstractmethod
    def delete_domain(self, domain: str) -> None:
        """Remove a domain; UserStoreError if unknown or still used by users or aliases."""

    @abstractmethod
    def list_domains(self) -> list[str]:
        """The store's domains, sorted."""

    @abstractmethod
    def delete_user(self, address: str) -> list[tuple[str, str]]:
        """Delete a user and the alias rows that only make sense with it.

        Those are the rows whose target is the user (they would now lead nowhere) and the
        rows keyed by the user's own address (its forwarding). Returns the removed
        ``(alias, target)`` rows so the caller can say what went with the user.
        """

    @abstractmethod
    def list_users(self) -> list[str]:
        """Every user address, sorted by domain, then address."""

    @abstractmethod
    def add_alias(self, alias: str, target: str) -> None:
        """Add one ``alias -> target`` row; UserStoreError if that row already exists."""

    @abstractmethod
    def delete_alias(self, alias: str, target: str | None = None) -> int:
        """Delete one row, or every row of ``alias``; returns how many; UserStoreError if none."""

    @abstractmethod
    def list_aliases(self) -> list[tuple[str, str]]:
        """Every ``(alias, target)`` row, sorted by alias, targets in the order added."""

    @abstractmethod
    def _get_limits(self, key: str) -> Limits | None:
        """The stored limits of a normalised user address, or of ``@domain`` (an empty
        Limits if none were set); None if ``key`` is an address that is no user."""

    @abstractmethod
    def _update_limits(self, key: str, changes: dict[str, int | None]) -> Limits:
        """Change the given limits of a user (UserStoreError if there is no such user) or
        of ``@domain``, in one transaction; return the limits now stored."""

    @abstractmethod
    def _all_limits(self) -> list[tuple[str, Limits]]:
        """Every user and ``@domain`` with at least one limit set, sorted by domain, then
        with the domain's own row first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    @abstractmethod
    def _insert_user(self, address: str, password_hash: str) -> None:
        """Insert a normalised user; UserStoreError if it exists."""

    @abstractmethod
    def _update_password_hash(self, address: str, password_hash: str) -> None:
        """Replace a user's hash; UserStoreError if there is no such user."""

    @abstractmethod
    def _replace_password_hash(self, address: str, old: str, new: str) -> bool:
        """Replace the hash only if it is still ``old``: a rehash must not undo a password
        change made meanwhile. Returns whether it replaced it."""

    @abstractmethod
    def _password_hash(self, address: str) -> str | None:
        """The stored hash of a normalised address, None if it is not a user."""

    @abstractmethod
    def _is_user(self, address: str) -> bool:
        """Whether a normalised address is a user."""

    @abstractmethod
    def _is_store_domain(self, domain: str) -> bool:
        """Whether a normalised domain is in the store's list."""

    @abstractmethod
    def _alias_targets(self, key: str) -> list[str]:
        """The targets of a normalised alias key (address or ``@domain``), in order added."""

    @abstractmethod
    def _alias_sources(self, target: str) -> list[str]:
        """The alias keys that have a row with exactly this target."""

    @abstractmethod
    def _alias_sources_uncovered(self, domain: str) -> list[str]:
        """The alias keys with a row whose target is in ``domain`` but is neither a user nor
        an exact alias key: the targets that the domain's catch-all picks up."""

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Make the lookups inside see one consistent state, where the backend can."""
        yield

    # -- policy: the same for every backend --------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def is_local_domain(self, domain: str) -> bool:
        """Whether the store lists ``domain``; the caller also consults config.local_domains."""
        try:
            return self._is_store_domain(normalize_domain(domain))
        except UserStoreError:
            return False

    def user_exists(self, address: str) -> bool:
        try:
            return self._is_user(normalize_address(address))
        except UserStoreError:
            return False

    def add_user(self, address: str, password: str) -> None:
        """Create a user; UserStoreError if the address is taken or the password refused."""
        canonical = normalize_address(address)
        _check_password(password)
        if self._is_user(canonical):
            # Checked first only to spare the Argon2 work; _insert_user decides for real.
            raise UserStoreError(f"user {canonical} already exists")
        self._insert_user(canonical, hash_password(password, self.hasher))

    def set_password(self, address: str, password: str) -> None:
        canonical = normalize_address(address)
        _check_password(password)
        if not self._is_user(canonical):
            raise UserStoreError(f"no such user: {canonical}")
        self._update_password_hash(canonical, hash_password(password, self.hasher))

    def authenticate(self, login: str, password: str) -> str | None:
        """The canonical address if ``password`` is right for ``login``, else None.

        An unknown or malformed login costs one Argon2 verification like a known one, so
        timing does not reveal which addresses exist. A hash made with other parameters
        than the current hasher's is replaced after a successful check.
        """
        try:
            address: str | None = normalize_address(login)
        except UserStoreError:
            address = None
        stored = self._password_hash(address) if address is not None else None
        if address is None or stored is None:
            verify_dummy(password, self.hasher)
            return None
        if not verify_password(stored, password, self.hasher):
            return None
        if needs_rehash(stored, self.hasher):
            self._rehash(address, stored, password)
        return address

    def _rehash(self, address: str, stored: str, password: str) -> None:
        try:
            if self._replace_password_hash(address, stored, hash_password(password, self.hasher)):
                log.info("rehashed the password of %s with the current parameters", address)
        except UserStoreError as exc:
            # The login itself was right; a read-only or busy store must not refuse it.
            log.warning("could not rehash the password of %s: %s", address, exc)

    def resolve(self, recipient: str) -> list[str] | None:
        """The final addresses for ``recipient``, or None if no user or alias answers for it.

        A user resolves to itself; an alias to the users and remote addresses it expands
        to, without duplicates, in the order met. UserStoreError when the aliases nest
        deeper than MAX_ALIAS_DEPTH, expand to more than MAX_EXPANSION addresses, or only
        loop back on themselves: a configuration error the server should answer with a
        temporary failure rather than lose or bounce the mail.
        """
        try:
            address = normalize_address(recipient)
        except UserStoreError:
            return None
        with self._snapshot():
            if not (
                self._alias_targets(address)
                or self._is_user(address)
                or self._alias_targets(catchall_key(domain_of(address)))
            ):
                return None
            found: dict[str, None] = {}
            self._expand(address, 0, set(), found, address)
        if not found:
            raise UserStoreError(f"the aliases of {address} loop and reach no mailbox")
        return list(found)

    def _expand(
        self, address: str, depth: int, seen: set[str], found: dict[str, None], origin: str
    ) -> None:
        targets = self._alias_targets(address)
        if not targets:
            if self._is_user(address):
                found[address] = None
                return
            targets = self._alias_targets(catchall_key(domain_of(address)))
            if not targets:
                found[address] = None
                return
        if depth >= MAX_ALIAS_DEPTH:
            raise UserStoreError(
                f"the aliases of {origin} nest deeper than {MAX_ALIAS_DEPTH} levels (at {address})"
            )
        seen.add(address)
        for target in targets:
            if target == address:
                # "alice -> alice, elsewhere" keeps a copy; for a non-user it leads nowhere.
                if self._is_user(target):
                    found[target] = None
            elif target not in seen:
                self._expand(target, depth + 1, seen, found, origin)
            if len(found) > MAX_EXPANSION:
                raise UserStoreError(
                    f"the aliases of {origin} expand to more than {MAX_EXPANSION} addresses"
                )

    def senders_for(self, address: str) -> set[str]:
        """Every address the user ``address`` may use as envelope sender or From.

        That is its own address and every alias key whose expansion delivers to it. A
        catch-all appears as ``@domain``, meaning any address of that domain that is
        neither a user nor an exact alias; ``may_send_as`` applies that rule.
        """
        own = normalize_address(address)
        senders = {own}
        with self._snapshot():
            targets = self._alias_targets(own)
            if not self._is_user(own) or (targets and own not in targets):
                # Mail for it lands elsewhere, so aliases that lead to it do not reach it.
                return senders
            frontier = [own]
            for _ in range(MAX_ALIAS_DEPTH):
                if not frontier:
                    break
                following: list[str] = []
                for node in frontier:
                    if is_catchall(node):
                        sources = self._alias_sources_uncovered(domain_of(node))
                    else:
                        sources = self._alias_sources(node)
                    for source in sources:
                        if source not in senders:
                            senders.add(source)
                            following.append(source)
                frontier = following
        return senders

    # -- limits ---------------------------------------------------------------------------

    def limits(self, key: str) -> Limits:
        """The limits stored for a user or ``@domain`` (not folded; see effective_limits)."""
        canonical = normalize_alias(key)
        stored = self._get_limits(canonical)
        if stored is None:
            raise UserStoreError(f"no such user: {canonical}")
        return stored

    def set_limits(self, key: str, **changes: int | None) -> Limits:
        """Change some limits of a user or ``@domain``; return the limits now stored.

        Each change is a byte count or number (0 or more), UNLIMITED, or None to clear it.
        """
        canonical = normalize_alias(key)
        for name, value in changes.items():
            _check_limit(name, value)
        return self._update_limits(canonical, changes)

    def effective_limits(self, address: str) -> Limits:
        """The limits in force for the user ``address`` (None: unlimited)."""
        canonical = normalize_address(address)
        with self._snapshot():
            own = self._get_limits(canonical)
            if own is None:
                raise UserStoreError(f"no such user: {canonical}")
            domain = self._get_limits(catchall_key(domain_of(canonical))) or Limits()
        return own.over(domain)

    def list_limits(self) -> list[tuple[str, Limits]]:
        """Every user and ``@domain`` with limits of its own, as stored."""
        return self._all_limits()

    def may_send_as(self, login: str, sender: str) -> bool:
        """Whether the authenticated user ``login`` may use ``sender``."""
        try:
            wanted = normalize_address(sender)
        except UserStoreError:
            return False
        senders = self.senders_for(login)
        if wanted in senders:
            return True
        if catchall_key(domain_of(wanted)) not in senders:
            return False
        with self._snapshot():
            return not self._is_user(wanted) and not self._alias_targets(wanted)
