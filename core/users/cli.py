"""The ``mailgate user``, ``mailgate alias`` and ``mailgate domain`` commands.

They edit the user store named by the configuration (``<data_dir>/users.sqlite3``). A
password never travels on the command line, where ``ps`` and shell history would show it:
it is prompted for twice on a terminal, or read as the first line of standard input.
Refusals raise UserStoreError; the dispatcher prints ``mailgate: message`` and exits 1.

``mailgate user quota`` sets the limits the quota daemon enforces (storage quota, largest
attachment, number of attachments) for a user or, as its users' defaults, a domain
(``@domain``), and shows them with the usage measured from the user's Maildir.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from mailgate.core.config import Config, parse_size
from mailgate.core.config_cli import add_config_option, config_from_args
from mailgate.core.errors import DeliveryError, UserStoreError
from mailgate.core.spool.maildir import MaildirUsage, mailbox_path, maildir_usage
from mailgate.core.users.sqlite import SQLiteUserStore
from mailgate.core.users.store import (
    UNLIMITED,
    Limits,
    UserStore,
    catchall_key,
    domain_of,
    is_catchall,
    normalize_address,
    normalize_alias,
    normalize_domain,
)
from mailgate.policies.quota import format_size

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


# -- user quota --------------------------------------------------------------------------

_LIMIT_LABELS = {
    "storage": "storage quota",
    "max_attachment": "largest attachment",
    "max_attachments": "attachments per message",
}


def _limit_value(text: str, *, count: bool) -> int | None:
    """A limit from the command line: a size (or a number), ``none`` or ``unlimited``."""
    word = text.strip().lower()
    if word == "none":
        return None
    if word == "unlimited":
        return UNLIMITED
    if count:
        if not word.isdigit():
            raise argparse.ArgumentTypeError(
                f"expected a number, 'none' or 'unlimited', got {text!r}"
            )
        return int(word)
    try:
        return parse_size(word)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 100M or 2G, 'none' or 'unlimited', got {text!r}"
        ) from None


def _size_arg(text: str) -> int | None:
    return _limit_value(text, count=False)


def _count_arg(text: str) -> int | None:
    return _limit_value(text, count=True)


def _show_limit(name: str, value: int | None) -> str:
    if value is None:
        return "unlimited"
    return str(value) if name == "max_attachments" else format_size(value)


def _stored(name: str, value: int | None) -> str:
    if value is None:
        return "-"
    if value == UNLIMITED:
        return "unlimited"
    return _show_limit(name, value)


def _usage(config: Config, address: str) -> MaildirUsage:
    try:
        return maildir_usage(mailbox_path(config.mail_dir, address))
    except (OSError, DeliveryError) as exc:
        raise UserStoreError(f"cannot measure the mailbox of {address}: {exc}") from exc


def _quota_key(config: Config, store: UserStore, target: str) -> str:
    key = normalize_alias(target)
    if is_catchall(key):
        _require_local(config, store, domain_of(key))
    elif not store.user_exists(key):
        raise UserStoreError(f"no such user: {key}")
    return key


def _quota_set(args: argparse.Namespace) -> int:
    changes = {
        name: getattr(args, name) for name in _LIMIT_LABELS if getattr(args, name) is not _UNSET
    }
    if not changes:
        raise UserStoreError(
            "nothing to set: give --storage, --max-attachment or --max-attachments"
        )
    config, store = _open(args)
    with store:
        key = _quota_key(config, store, args.target)
        limits = store.set_limits(key, **changes)
    print(f"limits of {key}: {_describe(limits)}")
    return 0


def _quota_clear(args: argparse.Namespace) -> int:
    config, store = _open(args)
    with store:
        key = _quota_key(config, store, args.target)
        store.set_limits(key, **dict.fromkeys(_LIMIT_LABELS))
    default = " (the domain's defaults apply)" if not is_catchall(key) else ""
    print(f"cleared the limits of {key}{default}")
    return 0


def _describe(limits: Limits) -> str:
    return ", ".join(
        f"{label} {_stored(name, getattr(limits, name))}" for name, label in _LIMIT_LABELS.items()
    )


def _quota_show(args: argparse.Namespace) -> int:
    config, store = _open(args)
    with store:
        key = _quota_key(config, store, args.target)
        own = store.limits(key)
        if is_catchall(key):
            print(f"{key} (defaults for the users of {key[1:]})")
            for name, label in _LIMIT_LABELS.items():
                print(f"  {label + ':':<25} {_stored(name, getattr(own, name))}")
            return 0
        domain = store.limits(catchall_key(domain_of(key)))
        effective = store.effective_limits(key)
    usage = _usage(config, key)
    print(key)
    for name, label in _LIMIT_LABELS.items():
        value = getattr(effective, name)
        source = "user" if getattr(own, name) is not None else "domain default"
        if getattr(own, name) is None and getattr(domain, name) is None:
            source = "not set"
        print(f"  {label + ':':<25} {_show_limit(name, value)} ({source})")
    print(f"  {'used:':<25} {_usage_text(usage, effective.storage)}")
    return 0


def _usage_text(usage: MaildirUsage, storage: int | None) -> str:
    messages = f"{usage.messages} message{'s' if usage.messages != 1 else ''}"
    text = f"{format_size(usage.bytes)} ({usage.bytes} bytes) in {messages}"
    if storage is not None:
        percent = 100.0 if storage == 0 else 100.0 * usage.bytes / storage
        text += f", {percent:.1f}% of the quota"
    return text


def _quota_list(args: argparse.Namespace) -> int:
    config, store = _open(args)
    rows: list[tuple[str, ...]] = []
    with store:
        for address in store.list_users():
            limits = store.effective_limits(address)
            usage = _usage(config, address)
            over = limits.storage is not None and usage.bytes >= limits.storage
            if args.over and not over:
                continue
            percent = "-"
            if limits.storage is not None:
                share = 100.0 if limits.storage == 0 else 100.0 * usage.bytes / limits.storage
                percent = f"{share:.0f}%"
            rows.append(
                (
                    address,
                    format_size(usage.bytes),
                    _show_limit("storage", limits.storage),
                    percent,
                    _show_limit("max_attachment", limits.max_attachment),
                    _show_limit("max_attachments", limits.max_attachments),
                    "OVER" if over else "",
                )
            )
    if rows:
        header = ("USER", "USED", "QUOTA", "USE%", "MAX-ATTACHMENT", "MAX-ATTACHMENTS", "")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            print("  ".join(cells).rstrip())
    return 0


_UNSET = object()


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


_QUOTA_NOTE = (
    "TARGET is a user, or @domain for the defaults of the domain's users (a user's own "
    "setting wins). Sizes are bytes or take K, M, G (powers of 1024): 500M, 2G. 'none' "
    "clears a setting (the domain's default applies, else no limit); 'unlimited' means no "
    "limit whatever the domain's default."
)


def _register_quota(users: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    quota = _family(users, "quota", "storage quotas and attachment limits (the quota daemon's)")
    leaf = _leaf(quota, "set", "set limits of a user or a domain", _quota_set, _QUOTA_NOTE)
    leaf.add_argument("target", metavar="TARGET", help="user@domain, or @domain")
    leaf.add_argument(
        "--storage", type=_size_arg, default=_UNSET, metavar="SIZE", help="the storage quota"
    )
    leaf.add_argument(
        "--max-attachment",
        dest="max_attachment",
        type=_size_arg,
        default=_UNSET,
        metavar="SIZE",
        help="the largest attachment accepted (decoded size)",
    )
    leaf.add_argument(
        "--max-attachments",
        dest="max_attachments",
        type=_count_arg,
        default=_UNSET,
        metavar="N",
        help="how many attachments one message may carry",
    )
    leaf = _leaf(quota, "clear", "clear every limit of a user or a domain", _quota_clear)
    leaf.add_argument("target", metavar="TARGET", help="user@domain, or @domain")
    leaf = _leaf(
        quota,
        "show",
        "show the limits in force and the mailbox usage",
        _quota_show,
        "Show the limits of a user (in force, and where each comes from) and the usage "
        "measured from its Maildir; or a domain's defaults (@domain).",
    )
    leaf.add_argument("target", metavar="TARGET", help="user@domain, or @domain")
    leaf = _leaf(quota, "list", "list every user's usage and limits", _quota_list)
    leaf.add_argument(
        "--over", action="store_true", help="only the users at or over their storage quota"
    )


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
    _register_quota(users)

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
