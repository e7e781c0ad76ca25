"""``mailgate queue``: look into the spool and remove messages, like Postfix's mailq/postsuper.

These commands open the spool without recovery (``recover=False``), so running them next
to a live server never disturbs a message being written.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime

from mailgate.core.config_cli import add_config_option, config_from_args
from mailgate.core.errors import SpoolError
from mailgate.core.spool.delivery import RELAY_NOT_CONFIGURED
from mailgate.core.spool.envelope import SpoolEnvelope
from mailgate.core.spool.spool import Spool, SpoolEntry

# Recipients line up under the sender: id, size and arrival columns plus their gaps.
_INDENT = " " * (17 + 1 + 8 + 1 + 20 + 2)


def _open_spool(args: argparse.Namespace) -> Spool:
    return Spool(config_from_args(args).spool_dir, recover=False)


def _sender(envelope: SpoolEnvelope) -> str:
    return envelope.mail_from or "MAILER-DAEMON"


def recipient_status(envelope: SpoolEnvelope, rcpt: str) -> str:
    """One recipient's state in words, as ``queue list`` and ``queue show`` print it."""
    state = envelope.done.get(rcpt)
    if state == "sent":
        return "sent"
    if state == "bounced":
        return f"bounced: {envelope.bounced.get(rcpt, 'see targets')}"
    if state == "relay":
        targets = [target for target, orig in envelope.relay.items() if orig == rcpt]
        return f"deferred: {RELAY_NOT_CONFIGURED} ({', '.join(targets)})"
    if rcpt in envelope.errors:
        return f"deferred: {envelope.errors[rcpt]}"
    return "queued"


def _list(args: argparse.Namespace) -> int:
    spool = _open_spool(args)
    ids = spool.list_ids()
    if not ids:
        print("Mail queue is empty")
        return 0
    print(f"{'-Queue ID-':<17} {'--Size--':>8} {'----Arrival Time----':<20}  -Sender/Recipient-")
    total = 0
    shown = 0
    for queue_id in ids:
        try:
            entry = spool.info(queue_id)
        except SpoolError as exc:
            print(f"{queue_id:<17} {'?':>8} {'(unreadable)':<20}  {exc}")
            continue
        envelope = entry.envelope
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(envelope.received_at))
        print(f"{queue_id:<17} {entry.size:>8} {arrival:<20}  {_sender(envelope)}")
        for rcpt in dict.fromkeys(envelope.rcpt_tos):
            print(f"{_INDENT}{rcpt}  ({recipient_status(envelope, rcpt)})")
        print()
        total += entry.size
        shown += 1
    kbytes = (total + 1023) // 1024
    print(f"-- {kbytes} Kbytes in {shown} Request{'s' if shown != 1 else ''}.")
    return 0


def _show(args: argparse.Namespace) -> int:
    spool = _open_spool(args)
    if args.body:
        _, content = spool.load(args.queue_id)
        sys.stdout.flush()
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
        return 0
    entry = spool.info(args.queue_id)
    _, content = spool.load(args.queue_id)
    print(_describe(entry))
    print()
    print(_headers(content))
    return 0


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


def _describe(entry: SpoolEntry) -> str:
    env = entry.envelope
    client = env.client_name or "unknown"
    lines = [
        f"queue id:     {entry.queue_id} ({entry.queue})",
        f"file:         {entry.path}",
        f"size:         {entry.size}",
        f"arrival:      {_when(env.received_at)}",
        f"sender:       <{env.mail_from}>",
        f"client:       {client}[{env.client_address}], helo={env.helo or '-'}",
        f"auth user:    {env.auth_user or '-'}",
        f"body type:    {env.body_type}{', SMTPUTF8' if env.smtputf8 else ''}",
        f"mail options: {' '.join(env.mail_options) or '-'}",
        f"attempts:     {env.attempts}",
    ]
    if env.next_attempt:
        lines.append(f"next attempt: {_when(env.next_attempt)}")
    lines.append("recipients:")
    for index, rcpt in enumerate(env.rcpt_tos):
        options = env.rcpt_options[index] if index < len(env.rcpt_options) else []
        extra = f" [{' '.join(options)}]" if options else ""
        lines.append(f"  <{rcpt}>{extra}: {recipient_status(env, rcpt)}")
    if env.delivered:
        lines.append("delivered to: " + ", ".join(env.delivered))
    for target, reason in env.bounced.items():
        lines.append(f"bounced:      <{target}>: {reason}")
    return "\n".join(lines)


def _headers(content: bytes) -> str:
    end = len(content)
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = content.find(separator)
        if found >= 0:
            end = min(end, found)
    block = content[:end].decode("utf-8", "replace")
    return block.replace("\r\n", "\n")


def _delete(args: argparse.Namespace) -> int:
    spool = _open_spool(args)
    failed = 0

    async def remove_all() -> None:
        nonlocal failed
        for queue_id in args.queue_ids:
            try:
                await spool.remove(queue_id)
            except SpoolError as exc:
                print(f"mailgate: {exc}", file=sys.stderr)
                failed += 1
            else:
                print(f"{queue_id}: removed")

    try:
        asyncio.run(remove_all())
    finally:
        spool.close()
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = sub.add_parser("queue", help="inspect the mail queue and delete messages")
    queue_sub = queue.add_subparsers(dest="queue_command", metavar="ACTION")
    queue_sub.required = True

    listing = queue_sub.add_parser(
        "list", help="every spooled message with its recipients' states (like mailq)"
    )
    add_config_option(listing)
    listing.set_defaults(handler=_list)

    show = queue_sub.add_parser("show", help="one message's envelope, progress and headers")
    show.add_argument("queue_id", metavar="ID")
    show.add_argument("--body", action="store_true", help="print the whole message instead")
    add_config_option(show)
    show.set_defaults(handler=_show)

    delete = queue_sub.add_parser("delete", help="remove messages from the queue for good")
    delete.add_argument("queue_ids", metavar="ID", nargs="+")
    add_config_option(delete)
    delete.set_defaults(handler=_delete)
