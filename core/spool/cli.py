"""``mailgate queue``: look into the spool and act on messages, like Postfix's mailq/postsuper.

``list`` shows the active queue (incoming/ and deferred/), with filters and counts per
state; ``show`` and ``delete`` take a message from any queue. ``hold`` moves messages to
the hold queue and ``release`` back. ``flush`` (retry now) and ``bounce`` (give up and
notify the sender) are requests to the running relay: a file in ``spool/requests/`` and
SIGUSR1, so that only the server ever rewrites a message it may be delivering.
``quarantine list|show|release|delete`` work on the hold queue: a released message moves
to incoming/, and a running ``mailgate serve`` (found through the pid file in the data
directory) gets SIGUSR1 so that it delivers it at once.

These commands open the spool without recovery (``recover=False``), so running them next
to a live server never disturbs a message being written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from mailgate.core.config import Config
from mailgate.core.config_cli import add_config_option, config_from_args
from mailgate.core.errors import SpoolError
from mailgate.core.relay.queue import REQUESTS_DIR, request_path
from mailgate.core.spool.delivery import RELAY_NOT_CONFIGURED
from mailgate.core.spool.envelope import RemoteState, SpoolEnvelope
from mailgate.core.spool.spool import ACTIVE_QUEUES, QueueName, Spool, SpoolEntry

# Recipients line up under the sender: id, size and arrival columns plus their gaps.
_INDENT = " " * (17 + 1 + 8 + 1 + 20 + 2)
# The quarantine listing has one more column, the time the message was held.
_HELD_INDENT = " " * (17 + 1 + 8 + 1 + 20 + 1 + 20 + 2)
# Where `mailgate serve` writes its process id (see mailgate.core.supervisor).
PID_FILE_NAME = "mailgate.pid"


def _open_spool(args: argparse.Namespace) -> Spool:
    return Spool(config_from_args(args).spool_dir, recover=False)


def _short_time(stamp: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(stamp))


def _printable(text: str) -> str:
    # Reasons come from milters and rule files: keep a stray newline or escape sequence
    # from breaking the listing or the operator's terminal.
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _sender(envelope: SpoolEnvelope) -> str:
    return envelope.mail_from or "MAILER-DAEMON"


def _remote_status(state: RemoteState) -> str:
    if state.status == "sent":
        return f"sent ({state.last_reply})" if state.last_reply else "sent"
    if state.status == "bounced":
        return f"bounced: {state.last_status} {state.last_reply}".rstrip()
    if state.status == "queued":
        return "queued for relay"
    when = _short_time(state.next_attempt)
    return f"deferred: {state.last_reply} (attempt {state.attempts}, next {when})"


def recipient_status(envelope: SpoolEnvelope, rcpt: str) -> str:
    """One recipient's state in words, as ``queue list`` and ``queue show`` print it."""
    state = envelope.done.get(rcpt)
    if state == "sent":
        return "sent"
    if state == "bounced":
        return f"bounced: {envelope.bounced.get(rcpt, 'see targets')}"
    if state == "relay":
        targets = [target for target, orig in envelope.relay.items() if orig == rcpt]
        states = [envelope.remote[t] for t in targets if t in envelope.remote]
        if len(states) == len(targets) and states:
            return "; ".join(
                f"{target}: {_remote_status(remote)}"
                for target, remote in zip(targets, states, strict=True)
            )
        return f"deferred: {RELAY_NOT_CONFIGURED} ({', '.join(targets)})"
    if rcpt in envelope.errors:
        return f"deferred: {envelope.errors[rcpt]}"
    return "queued"


def recipient_states(envelope: SpoolEnvelope) -> list[str]:
    """The state of every recipient and remote target, as one word each (for counts)."""
    states: list[str] = []
    for rcpt in dict.fromkeys(envelope.rcpt_tos):
        done = envelope.done.get(rcpt)
        if done == "relay":
            for target, orig in envelope.relay.items():
                if orig == rcpt:
                    remote = envelope.remote.get(target)
                    states.append(remote.status if remote is not None else "queued")
        elif done is not None:
            states.append(done)
        else:
            states.append("deferred" if rcpt in envelope.errors else "queued")
    return states


def _matches(args: argparse.Namespace, entry: SpoolEntry) -> bool:
    envelope = entry.envelope
    if args.state and entry.queue != args.state and args.state not in recipient_states(envelope):
        return False
    if args.sender and args.sender.lower() not in envelope.mail_from.lower():
        return False
    addresses = [*envelope.rcpt_tos, *envelope.relay]
    if args.recipient and not any(args.recipient.lower() in a.lower() for a in addresses):
        return False
    return not args.domain or any(
        a.rpartition("@")[2].lower() == args.domain.lower() for a in addresses
    )


def _list(args: argparse.Namespace) -> int:
    spool = _open_spool(args)
    queues: tuple[QueueName, ...] = ACTIVE_QUEUES
    if args.state == "hold":
        queues = ("hold",)
    elif args.state in ("incoming", "deferred"):
        queues = (args.state,)
    elif args.counts:
        queues = (*ACTIVE_QUEUES, "hold")  # counts cover the hold queue as well
    ids = spool.list_ids(queues)
    held = len(spool.list_ids("hold"))
    filtering = any((args.state, args.sender, args.recipient, args.domain))
    entries: list[SpoolEntry] = []
    unreadable: list[tuple[str, SpoolError]] = []
    for queue_id in ids:
        try:
            entry = spool.info(queue_id)
        except SpoolError as exc:
            unreadable.append((queue_id, exc))
            continue
        if _matches(args, entry):
            entries.append(entry)
    if args.counts:
        _print_counts(entries)
        return 0
    if not entries and not unreadable:
        print("No matching messages" if filtering else "Mail queue is empty")
        _print_held_note(held)
        return 0
    print(f"{'-Queue ID-':<17} {'--Size--':>8} {'----Arrival Time----':<20}  -Sender/Recipient-")
    total = 0
    shown = 0
    for queue_id, problem in unreadable:
        print(f"{queue_id:<17} {'?':>8} {'(unreadable)':<20}  {problem}")
    for entry in entries:
        queue_id = entry.queue_id
        envelope = entry.envelope
        arrival = _short_time(envelope.received_at)
        print(f"{queue_id:<17} {entry.size:>8} {arrival:<20}  {_sender(envelope)}")
        for rcpt in dict.fromkeys(envelope.rcpt_tos):
            print(f"{_INDENT}{rcpt}  ({recipient_status(envelope, rcpt)})")
        print()
        total += entry.size
        shown += 1
    kbytes = (total + 1023) // 1024
    print(f"-- {kbytes} Kbytes in {shown} Request{'s' if shown != 1 else ''}.")
    _print_held_note(held)
    return 0


def _print_counts(entries: list[SpoolEntry]) -> None:
    """Messages per queue and recipients per state, of the messages the filters kept."""
    queues = Counter(entry.queue for entry in entries)
    states = Counter(state for entry in entries for state in recipient_states(entry.envelope))
    print(
        "messages: "
        + ", ".join(f"{queues.get(name, 0)} {name}" for name in ("incoming", "deferred", "hold"))
    )
    print(
        "recipients: "
        + ", ".join(
            f"{states.get(name, 0)} {name}"
            for name in ("queued", "deferred", "sent", "relay", "bounced")
        )
    )


def _print_held_note(held: int) -> None:
    if held:
        print(
            f"({held} message{'s' if held != 1 else ''} on hold: "
            "see `mailgate queue quarantine list`)"
        )


def _show(args: argparse.Namespace, *, held_only: bool = False) -> int:
    spool = _open_spool(args)
    entry = spool.info(args.queue_id)
    if held_only:
        _require_held(entry)
    if args.body:
        _, content = spool.load(args.queue_id)
        sys.stdout.flush()
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
        return 0
    _, content = spool.load(args.queue_id)
    print(_describe(entry))
    print()
    print(_headers(content))
    return 0


def _require_held(entry: SpoolEntry) -> None:
    if entry.queue != "hold":
        raise SpoolError(f"{entry.queue_id}: not on hold (it is in {entry.queue}/)")


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
    if env.held_at is not None:
        lines.append(f"held:         {_when(env.held_at)}")
    if env.quarantine_reason is not None:
        lines.append(f"reason:       {_printable(env.quarantine_reason)}")
    if env.released_at is not None:
        lines.append(f"released:     {_when(env.released_at)}")
    if env.next_attempt:
        lines.append(f"next attempt: {_when(env.next_attempt)}")
    lines.append("recipients:")
    for index, rcpt in enumerate(env.rcpt_tos):
        options = env.rcpt_options[index] if index < len(env.rcpt_options) else []
        extra = f" [{' '.join(options)}]" if options else ""
        lines.append(f"  <{rcpt}>{extra}: {recipient_status(env, rcpt)}")
    if env.remote:
        lines.append("outbound:")
        for target, remote in env.remote.items():
            extra = f", {remote.attempts} attempt(s)" if remote.attempts else ""
            via = f", via {remote.remote_mta}" if remote.remote_mta else ""
            lines.append(f"  <{target}>{extra}{via}: {_printable(_remote_status(remote))}")
    for key, kinds in env.notified.items():
        lines.append(f"notified:     <{key}>: {', '.join(kinds)}")
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


def _for_each(
    spool: Spool, queue_ids: list[str], action: Callable[[str], Awaitable[str]]
) -> tuple[int, int]:
    """Run ``action`` on every id, printing its result or error: (done, failed)."""
    done = failed = 0

    async def run_all() -> None:
        nonlocal done, failed
        for queue_id in queue_ids:
            try:
                result = await action(queue_id)
            except SpoolError as exc:
                print(f"mailgate: {exc}", file=sys.stderr)
                failed += 1
            else:
                print(f"{queue_id}: {result}")
                done += 1

    try:
        asyncio.run(run_all())
    finally:
        spool.close()
    return done, failed


def _delete(args: argparse.Namespace, *, held_only: bool = False) -> int:
    spool = _open_spool(args)

    async def delete(queue_id: str) -> str:
        if held_only:
            # Located without parsing: a damaged file must be deletable as well.
            queue = spool.queue_of(queue_id)
            if queue != "hold":
                raise SpoolError(f"{queue_id}: not on hold (it is in {queue}/)")
        await spool.remove(queue_id)
        return "removed"

    _, failed = _for_each(spool, args.queue_ids, delete)
    return 1 if failed else 0


def _hold(args: argparse.Namespace) -> int:
    spool = _open_spool(args)

    async def hold(queue_id: str) -> str:
        await spool.hold_queued(queue_id, args.reason)
        return "moved to hold/"

    _, failed = _for_each(spool, args.queue_ids, hold)
    return 1 if failed else 0


def _request(args: argparse.Namespace, action: str) -> int:
    """Leave a flush or bounce request for the running relay and signal it."""
    config = config_from_args(args)
    spool = Spool(config.spool_dir, recover=False)
    directory = config.spool_dir / REQUESTS_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    failed = 0
    ids = args.queue_ids or (["ALL"] if action == "flush" else [])
    for queue_id in ids:
        if queue_id != "ALL":
            try:
                entry = spool.info(queue_id, include_held=False)
            except SpoolError as exc:
                print(f"mailgate: {exc}", file=sys.stderr)
                failed += 1
                continue
            if entry.queue != "deferred":
                print(f"mailgate: {queue_id}: not in deferred/ (it is in {entry.queue}/)")
                failed += 1
                continue
        request_path(config.spool_dir, queue_id, action).touch()
        print(f"{queue_id}: {action} requested")
    spool.close()
    if len(ids) > failed:
        print(notify_server(config))
    return 1 if failed else 0


def _flush(args: argparse.Namespace) -> int:
    return _request(args, "flush")


def _bounce(args: argparse.Namespace) -> int:
    return _request(args, "bounce")


# -- the hold queue ----------------------------------------------------------------------


def _quarantine_list(args: argparse.Namespace) -> int:
    spool = _open_spool(args)
    ids = spool.list_ids("hold")
    if not ids:
        print("Quarantine is empty")
        return 0
    print(
        f"{'-Queue ID-':<17} {'--Size--':>8} {'----Arrival Time----':<20} "
        f"{'-----Held Time------':<20}  -Sender/Recipient/Reason-"
    )
    total = 0
    shown = 0
    for queue_id in ids:
        try:
            entry = spool.info(queue_id)
        except SpoolError as exc:
            print(f"{queue_id:<17} {'?':>8} {'(unreadable)':<20} {'':<20}  {exc}")
            continue
        if entry.queue != "hold":
            continue  # released since the listing was taken
        envelope = entry.envelope
        arrival = _short_time(envelope.received_at)
        held = _short_time(envelope.held_at) if envelope.held_at is not None else "?"
        print(f"{queue_id:<17} {entry.size:>8} {arrival:<20} {held:<20}  {_sender(envelope)}")
        for rcpt in dict.fromkeys(envelope.rcpt_tos):
            print(f"{_HELD_INDENT}{rcpt}")
        print(f"{_HELD_INDENT}reason: {_printable(envelope.quarantine_reason or '(none given)')}")
        print()
        total += entry.size
        shown += 1
    kbytes = (total + 1023) // 1024
    print(f"-- {kbytes} Kbytes in {shown} held Request{'s' if shown != 1 else ''}.")
    return 0


def _quarantine_show(args: argparse.Namespace) -> int:
    return _show(args, held_only=True)


def _quarantine_delete(args: argparse.Namespace) -> int:
    return _delete(args, held_only=True)


def _quarantine_release(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    spool = Spool(config.spool_dir, recover=False)

    async def release(queue_id: str) -> str:
        await spool.release(queue_id)
        return "released to incoming/"

    released, failed = _for_each(spool, args.queue_ids, release)
    if released:
        print(notify_server(config))
    return 1 if failed else 0


def notify_server(config: Config) -> str:
    """Send SIGUSR1 to a running `mailgate serve`, so it delivers from incoming/ now.

    Returns what happened, in words for the operator. The pid file can be stale and its
    pid reused by an unrelated process, for which SIGUSR1 would be fatal; so where /proc
    shows command lines, only a process whose command line names mailgate is signalled.
    """
    path = config.data_dir / PID_FILE_NAME
    later = "the message is delivered when `mailgate serve` starts"
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return f"no running server ({path} does not exist): {later}"
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read {path} ({exc}): {later}"
    # Zero and negative pids address process groups, never a single server.
    if not text.isdigit() or int(text) <= 0:
        return f"{path} holds no process id ({text[:20]!r}): {later}"
    pid = int(text)
    if not _is_mailgate(pid):
        return f"no running server (stale {path}, pid {pid}): {later}"
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return f"no running server (stale {path}, pid {pid}): {later}"
    except OSError as exc:
        return (
            f"cannot notify the server (pid {pid}): {exc.strerror or exc}; "
            "it delivers the message at its next queue scan"
        )
    return f"notified the running server (pid {pid}): delivery starts now"


def _is_mailgate(pid: int) -> bool:
    proc = Path("/proc")
    if not (proc / "self" / "cmdline").exists():
        return True  # no procfs to ask; os.kill tells whether the process exists
    try:
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # hidden from us (hidepid=): trust the pid file, as without /proc
    return b"mailgate" in cmdline


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = sub.add_parser("queue", help="inspect the mail queue and delete messages")
    queue_sub = queue.add_subparsers(dest="queue_command", metavar="ACTION")
    queue_sub.required = True

    listing = queue_sub.add_parser(
        "list", help="every spooled message with its recipients' states (like mailq)"
    )
    listing.add_argument(
        "--state",
        choices=["incoming", "deferred", "hold", "queued", "sent", "bounced"],
        help="only messages in this queue, or with a recipient in this state",
    )
    listing.add_argument("--sender", help="only messages whose sender contains this text")
    listing.add_argument("--recipient", help="only messages with a recipient containing this")
    listing.add_argument("--domain", help="only messages with a recipient in this domain")
    listing.add_argument(
        "--counts", action="store_true", help="print messages per queue and recipients per state"
    )
    add_config_option(listing)
    listing.set_defaults(handler=_list)

    show = queue_sub.add_parser("show", help="one message's envelope, progress and headers")
    show.add_argument("queue_id", metavar="ID")
    show.add_argument("--body", action="store_true", help="print the whole message instead")
    add_config_option(show)
    show.set_defaults(handler=_show)

    delete = queue_sub.add_parser(
        "delete", help="remove messages from the spool for good, from any queue"
    )
    delete.add_argument("queue_ids", metavar="ID", nargs="+")
    add_config_option(delete)
    delete.set_defaults(handler=_delete)

    flush = queue_sub.add_parser(
        "flush", help="retry deferred messages now (all without IDs), in the running server"
    )
    flush.add_argument("queue_ids", metavar="ID", nargs="*")
    add_config_option(flush)
    flush.set_defaults(handler=_flush)

    bounce = queue_sub.add_parser(
        "bounce", help="give up on messages' remote recipients and notify their senders"
    )
    bounce.add_argument("queue_ids", metavar="ID", nargs="+")
    add_config_option(bounce)
    bounce.set_defaults(handler=_bounce)

    hold = queue_sub.add_parser("hold", help="move messages to the hold queue (no delivery)")
    hold.add_argument("queue_ids", metavar="ID", nargs="+")
    hold.add_argument("--reason", default="held by the operator", help="recorded with it")
    add_config_option(hold)
    hold.set_defaults(handler=_hold)

    release = queue_sub.add_parser(
        "release", help="move held messages back for delivery (as quarantine release)"
    )
    release.add_argument("queue_ids", metavar="ID", nargs="+")
    add_config_option(release)
    release.set_defaults(handler=_quarantine_release)

    quarantine = queue_sub.add_parser(
        "quarantine", help="the hold queue: list, show, release or delete held messages"
    )
    hold_sub = quarantine.add_subparsers(dest="quarantine_command", metavar="ACTION")
    hold_sub.required = True

    hold_list = hold_sub.add_parser(
        "list", help="held messages with arrival and hold times, recipients and reason"
    )
    add_config_option(hold_list)
    hold_list.set_defaults(handler=_quarantine_list)

    hold_show = hold_sub.add_parser("show", help="one held message's envelope and headers")
    hold_show.add_argument("queue_id", metavar="ID")
    hold_show.add_argument("--body", action="store_true", help="print the whole message instead")
    add_config_option(hold_show)
    hold_show.set_defaults(handler=_quarantine_show)

    hold_release = hold_sub.add_parser(
        "release",
        help="move held messages to incoming/ and tell a running server to deliver them now",
    )
    hold_release.add_argument("queue_ids", metavar="ID", nargs="+")
    add_config_option(hold_release)
    hold_release.set_defaults(handler=_quarantine_release)

    hold_delete = hold_sub.add_parser("delete", help="remove held messages for good")
    hold_delete.add_argument("queue_ids", metavar="ID", nargs="+")
    add_config_option(hold_delete)
    hold_delete.set_defaults(handler=_quarantine_delete)
