"""The ``mailgate user``, ``mailgate alias`` and ``mailgate domain`` commands.

They edit the user store named by the configuration (``<data_dir>/users.sqlite3``). A
password never travels on the command line, where ``ps`` and shell history would show it:
it is prompted for twice on a terminal, or read as the first line of standard input.
Refusals raise UserStoreError; the dispatcher prints ``mailgate: message`` and exits 1.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from mailgate.core.config import Config
from mailgate.core.config_cli import add_config_option, config_from_args
from mailgate.core.errors import UserStoreError
from mailgate.core.users.sqlite import SQLiteUserStore
from mailgate.core.users.store import (
    UserStore,
    domain_of,
    normalize_address,
    normalize_alias,
    normalize_domain,
)

__all__ = ["read_password", "register"]

Handler = Callable[[argparse.Namespace], int]


def read_password() -> str:
    """The new password: prompted twice on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        password = getpass.getpass("New password: ")
        if password and getpass.getpass("Retype new password: ") != password:
            raise UserStoreError("the passwords do not match")
    else:
        # Only the line ending goes: spaces may be part of the password.
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UserStoreError("empty password refused")
    return password


def _open(args: argparse.Namespace) -> tuple[Config, UserStore]:
    config = config_from_args(args)
    return config, SQLiteUserStore(config.user_db)


def _require_local(config: Config, store: UserStore, domain: str) -> None:
    if domain not in config.local_domains and not store.is_local_domain(domain):
        raise UserStoreError(
            f"domain {domain} is not local; run `mailgate domain add {domain}` first"
        )


# -- user --------------------------------------------------------------------------------


def _user_add(args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    config, store = _open(args)
    with store:
        _require_local(config, store, domain_of(address))
        # Before the prompt, so the operator does not type a password for nothing.
        if store.user_exists(address):
            raise UserStoreError(f"user {address} already exists")
        store.add_user(address, read_password())
    print(f"added user {address}")
    return 0


def _user_del(args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    _, store = _open(args)
    with store:
        removed = store.delete_user(address)
    print(f"deleted user {address}")
    for alias, target in removed:
        print(f"deleted alias {alias} -> {target}")
    return 0


def _user_list(args: argparse.Namespace) -> int:
    _, store = _open(args)
    with store:
        for address in store.list_users():
            print(address)
    return 0


def _user_passwd(args: argparse.Namespace) -> int:
    address = normalize_address(args.address)
    _, store = _open(args)
    with store:
        if not store.user_exists(address):
            raise UserStoreError(f"no such user: {address}")
        store.set_password(address, read_password())
    print(f"changed the password of {address}")
    return 0


# -- alias -------------------------------------------------------------------------------


def _alias_add(args: argparse.Namespace) -> int:
    alias = normalize_alias(args.alias)
    config, store = _open(args)
    with store:
        _require_local(config, store, domain_of(alias))
        store.add_alias(alias, args.target)
    print(f"added alias {alias} -> {normalize_address(args.target)}")
    return 0


def _alias_del(args: argparse.Namespace) -> int:
    alias = normalize_alias(args.alias)
    _, store = _open(args)
    with store:
        count = store.delete_alias(alias, args.target)
    if args.target is None:
        print(f"deleted alias {alias} ({count} target{'s' if count != 1 else ''})")
    else:
        print(f"deleted alias {alias} -> {normalize_address(args.target)}")
    return 0


def _alias_list(args: argparse.Namespace) -> int:
    _, store = _open(args)
    with store:
        for alias, target in store.list_aliases():
            print(f"{alias} -> {target}")
    return 0


# -- domain ------------------------------------------------------------------------------


def _domain_add(args: argparse.Namespace) -> int:
    domain = normalize_domain(args.domain)
    _, store = _open(args)
    with store:
        store.add_domain(domain)
    print(f"added domain {domain}")
    return 0


def _domain_del(args: argparse.Namespace) -> int:
    domain = normalize_domain(args.domain)
    config, store = _open(args)
    with store:
        if not store.is_local_domain(domain) and domain in config.local_domains:
            raise UserStoreError(
                f"domain {domain} comes from the configuration (local_domains), "
                "not the user store; remove it there"
            )
        store.delete_domain(domain)
    print(f"deleted domain {domain}")
    return 0


def _domain_list(args: argparse.Namespace) -> int:
    config, store = _open(args)
    with store:
        stored = store.list_domains()
    for domain in sorted(set(stored) | set(config.local_domains)):
        if domain not in stored:
            print(f"{domain} (config)")
        elif domain in config.local_domains:
            print(f"{domain} (also in config)")
        else:
            print(domain)
    return 0


# -- the argparse tree -------------------------------------------------------------------


def _family(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    parser = sub.add_parser(name, help=help_text)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def _leaf(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    handler: Handler,
    description: str | None = None,
) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=help_text, description=description or help_text)
    add_config_option(parser)
    parser.set_defaults(handler=handler)
    return parser


_PASSWORD_NOTE = (
    "The password is prompted for twice on a terminal, else read from stdin's first line."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = _family(sub, "user", "manage mail users (login and mailbox addresses)")
    leaf = _leaf(users, "add", "add a user", _user_add, "Add a user. " + _PASSWORD_NOTE)
    leaf.add_argument("address", metavar="ADDRESS", help="the full address, user@domain")
    leaf = _leaf(
        users, "del", "delete a user and the aliases that point at or forward it", _user_del
    )
    leaf.add_argument("address", metavar="ADDRESS")
    _leaf(users, "list", "list the users", _user_list)
    leaf = _leaf(
        users,
        "passwd",
        "change a user's password",
        _user_passwd,
        "Change a user's password. " + _PASSWORD_NOTE,
    )
    leaf.add_argument("address", metavar="ADDRESS")

    aliases = _family(sub, "alias", "manage aliases (forwarding, lists, catch-all)")
    leaf = _leaf(aliases, "add", "add one target to an alias", _alias_add)
    leaf.add_argument(
        "alias", metavar="ALIAS", help="an address in a local domain, or @domain for a catch-all"
    )
    leaf.add_argument(
        "target", metavar="TARGET", help="a local user, another alias or a remote address"
    )
    leaf = _leaf(aliases, "del", "delete an alias, or one of its targets", _alias_del)
    leaf.add_argument("alias", metavar="ALIAS")
    leaf.add_argument("target", metavar="TARGET", nargs="?", default=None)
    _leaf(aliases, "list", "list the aliases, one 'alias -> target' per line", _alias_list)

    domains = _family(sub, "domain", "manage the local domains kept in the user store")
    leaf = _leaf(domains, "add", "add a local domain", _domain_add)
    leaf.add_argument("domain", metavar="DOMAIN")
    leaf = _leaf(domains, "del", "delete a local domain no user or alias uses", _domain_del)
    leaf.add_argument("domain", metavar="DOMAIN")
    _leaf(
        domains,
        "list",
        "list the local domains: the store's, and those set in the configuration",
        _domain_list,
    )
