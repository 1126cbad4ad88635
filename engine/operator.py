"""Operator tools: look at and steer delivery queues, dead letters and resends.

``koppel queue ...``, ``koppel dead-letters ...``, ``koppel audit`` and ``koppel resend``
work on the store only (through its write ops and reads), so they are safe with the engine
running or stopped: the running engine polls the store for pause and retry flags.

A queue is identified by "host:port"; several destination names may share one. Every
DEST argument is a destination name (resolved through ``--channels``) or a queue key
given directly, so the tools also work without any config at hand.

Output is for people: aligned plain text, ids, types and control ids only. Message
bodies and patient fields are never printed. Exit codes: 0 ok, 1 not found or nothing
done, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

OK, NOTHING, USAGE = 0, 1, 2
MAX_ID = 2**63 - 1  # SQLite's largest INTEGER: ids and limits beyond it overflow the driver

_now: Callable[[], float] = time.time  # replaced in tests


class _Fail(Exception):
    """Stop the command: print `message` on stderr and exit with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- formatting


def human_age(seconds: float | None) -> str:
    """A duration the way an operator reads it: 45s, 3m12s, 2h05m, 3d04h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _when(at: float | None, now: float) -> str:
    """An absolute UTC time with its age, e.g. "2024-01-01 12:00:00Z (3m12s ago)"."""
    if at is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))
    return f"{stamp} ({human_age(now - at)} ago)"


def _next_attempt(at: float, now: float) -> str:
    return "due" if at <= now else f"in {human_age(at - now)}"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print left-aligned columns; the last column is not padded (it holds free text)."""
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _ack_summary(ack: bytes | None) -> dict[str, Any] | None:
    """MSA-1, MSA-2 and text of a stored ACK (never the ACK's other segments)."""
    if ack is None:
        return None
    from engine.core.response import read_ack

    reply = read_ack(ack)
    if not reply.readable:
        return {"readable": False, "code": None, "control_id": None, "text": reply.text}
    return {"readable": True, "code": reply.code, "control_id": reply.control_id, "text": reply.text}


def _ack_line(ack: bytes | None) -> str:
    summary = _ack_summary(ack)
    if summary is None:
        return "none received"
    if not summary["readable"]:
        return "unreadable"
    line = f"MSA-1 {summary['code']}  MSA-2 {summary['control_id'] or '-'}"
    return line + (f"  text {summary['text']!r}" if summary["text"] else "")


# --------------------------------------------------------------------------- arguments


def _whole(text: str) -> int | None:
    """A plain decimal number ("12"), or None (no signs, spaces, underscores or other digits)."""
    if text.isascii() and text.isdigit() and len(text) <= 4000:  # int() refuses longer text
        return int(text)
    return None


def id_arg(text: str) -> int:
    """argparse type for a stored id (message, queue entry): 1 to 2**63-1, SQLite's range."""
    value = _whole(text)
    if value is None or not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"must be an id from 1 to {MAX_ID}, not {text!r}")
    return value


def limit_arg(text: str) -> int:
    """argparse type for --limit: a whole number from 1 up (0 would show nothing, and SQLite
    takes -1 for no limit at all); past SQLite's range it means the same as its largest."""
    value = _whole(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 up, not {text!r}")
    return min(value, MAX_ID)


# --------------------------------------------------------------------------- destinations


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolved:
    """What a DEST argument names: a queue and the configured destination names on it."""

    queue: str
    names: tuple[str, ...]  # configured names sharing the queue; () without config
    given_name: str | None  # the name the operator typed, if a name was typed

    def label(self) -> str:
        return f"{self.queue} ({', '.join(self.names)})" if self.names else self.queue


class _Destinations:
    """Destination names and queue keys from ``--channels``, loaded once and only if needed."""

    def __init__(self, channels: str, mappings: str | None = None) -> None:
        self._dir = Path(channels)
        self._mappings_dir = Path(mappings) if mappings else None
        self._mappings: Any = False  # engine.mapping.MappingSet once read; None if unreadable
        self._loaded = False
        self._error: str | None = None
        self._queue_of: dict[str, str] = {}
        self._channels: dict[str, Any] = {}  # name -> engine.config.ChannelConfig

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self._dir.is_dir():
            self._error = f"{self._dir}: not a directory (give --channels DIR or a queue key HOST:PORT)"
            return
        from engine.config import ConfigError, load_config

        try:
            # Mappings do not matter here; the channels dir stands in so a missing
            # ./mappings is no reason to refuse.
            config = load_config(self._dir, self._dir)
        except ConfigError as error:
            self._error = f"cannot read {self._dir}:\n{error}"
            return
        self._queue_of = {d.name: d.queue_key for d in config.destinations}
        self._channels = {c.name: c for c in config.channels}

    @property
    def error(self) -> str | None:
        self._load()
        return self._error

    def names_on(self, queue: str) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(n for n, q in self._queue_of.items() if q == queue))

    def queues(self) -> set[str]:
        self._load()
        return set(self._queue_of.values())

    def queue_of(self, name: str) -> str | None:
        """The queue a configured destination name delivers to (None: not configured)."""
        self._load()
        return self._queue_of.get(name)

    def channel(self, name: str):
        """The channel's config (engine.config.ChannelConfig), or None without config or channel."""
        self._load()
        return self._channels.get(name)

    def outbound(self, mapping: str) -> frozenset[str] | None:
        """The destinations mapping `mapping` builds messages for; None if the mappings
        directory is not given, cannot be read, or has no such mapping (never a reason to fail)."""
        if self._mappings is False:
            self._mappings = None
            if self._mappings_dir is not None and self._mappings_dir.is_dir():
                from engine.config import ConfigError
                from engine.mapping import load_mappings

                try:
                    self._mappings = load_mappings(self._mappings_dir)
                except ConfigError:
                    pass
        if self._mappings is None:
            return None
        try:
            return frozenset(o.to for o in self._mappings.mapping(mapping).outbound)
        except KeyError:
            return None

    def resolve(self, dest: str) -> Resolved:
        """A name from config, else a "host:port" key; _Fail(1) for an unknown name."""
        if ":" in dest:  # names cannot hold ':' (config checks), so this is a queue key
            queue = _queue_key(dest)
            return Resolved(queue=queue, names=self.names_on(queue), given_name=None)
        self._load()
        if self._error is not None:
            raise _Fail(USAGE, f"cannot resolve destination {dest!r}: {self._error}")
        queue = self._queue_of.get(dest)
        if queue is None:
            known = ", ".join(sorted(self._queue_of)) or "none are configured"
            raise _Fail(NOTHING, f"unknown destination {dest!r} in {self._dir} (destinations: {known})")
        return Resolved(queue=queue, names=self.names_on(queue), given_name=dest)


def _queue_key(text: str) -> str:
    """Normalise "host:port" / "[v6]:port" the way config derives queue keys."""
    from engine.config import queue_key_of

    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise _Fail(USAGE, f"{text!r} is neither a destination name nor a queue key HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        escaped = host.replace(":", "\\:")  # IPv6 colons, escaped as Twisted endpoint syntax wants
        return queue_key_of(f"tcp:host={escaped}:port={port}")
    except ValueError:
        raise _Fail(USAGE, f"{text!r} is not a valid queue key HOST:PORT") from None


# --------------------------------------------------------------------------- plumbing


def _open_store(url: str):
    """Open an existing store; never create one by accident in the wrong directory."""
    from engine.store import StoreError, open_store

    try:
        if url.startswith("sqlite:"):
            from engine.store.sqlite import parse_sqlite_url

            path = parse_sqlite_url(url).path
            if not path.is_file():
                raise _Fail(NOTHING, f"no store at {path} (give --store URL)")
        return open_store(url, migrate_schema=False)  # never migrates a store under a running engine
    except ValueError as error:
        raise _Fail(USAGE, str(error)) from None
    except StoreError as error:
        raise _Fail(NOTHING, str(error)) from None


def open_existing_store(url: str):
    """(store, None), or (None, why not): for commands that read a store the engine wrote."""
    try:
        return _open_store(url), None
    except _Fail as fail:
        return None, fail.message


def _command(body: Callable[..., int]) -> Callable[[Any], int]:
    """Wrap a handler: open the store and destinations, close the store, turn failures into exit codes."""

    def run(args: Any) -> int:
        from engine.store import StoreError

        store = None
        try:
            store = _open_store(args.store)
            dests = _Destinations(getattr(args, "channels", "channels"), getattr(args, "mappings", None))
            return body(args, store, dests)
        except _Fail as fail:
            sys.stderr.write(f"error: {fail.message}\n")
            return fail.code
        except StoreError as error:
            sys.stderr.write(f"error: {error}\n")
            return NOTHING
        finally:
            if store is not None:
                store.close()

    run.__name__ = body.__name__
    run.__doc__ = body.__doc__
    return run


def _write(store, op):
    from engine.store import write_one

    return write_one(store, op)


def _optional_reason(args) -> str | None:
    """--reason on one line, or None if not given; _Fail(2) if given but blank."""
    given = getattr(args, "reason", None)
    if given is None:
        return None
    reason = " ".join(given.split())
    if not any(char.isalnum() for char in reason):  # (as the admin API: "." says nothing)
        raise _Fail(USAGE, "--reason must say why (or leave it out)")
    return reason


def _required_reason(args) -> str:
    """--reason on one line; _Fail(2) if blank (drops keep it in the audit log)."""
    reason = " ".join(args.reason.split())
    if not any(char.isalnum() for char in reason):  # (as the admin API: "." says nothing)
        raise _Fail(USAGE, "--reason must say why (it is kept in the audit log)")
    return reason


def _messages_by_id(store, ids: Sequence[int]) -> dict[int, Any]:
    """The stored messages' summaries (no bodies) for ``ids``, by id, STEP per read."""
    return {m.id: m for start in range(0, len(ids), STEP)
            for m in store.list_messages(message_ids=ids[start:start + STEP], limit=STEP)}


def _os_user() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no LOGNAME/USER and no passwd entry (a bare container)
        return None


def audit_data_read(store, what: str, *, action: str = "read-agenda-data", message_id: int | None = None) -> None:
    """An audit record (read-agenda-data, read-body) for a CLI read of patient data, with the OS user."""
    from engine.store import RecordAudit

    _write(store, RecordAudit(at=_now(), action=action, message_id=message_id,
                              reason=f"{what}; koppel CLI, user {_os_user() or '-'}"))


def _log_action(event: str, **fields: Any) -> None:
    """One structured log line on stderr for an operator action (JSON unless stderr is a
    terminal), with the operating-system user who ran it. Ids and names only, as everywhere
    in Koppel's logs: a free-text --reason may name a patient, so only whether one was given."""
    import structlog

    user = _os_user()
    stream = sys.stderr
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if hasattr(stream, "isatty") and stream.isatty()
                else structlog.processors.JSONRenderer())
    logger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    renderer],
        wrapper_class=structlog.BoundLogger,  # not the engine's level filter: an audit line always shows
    )
    logger.info(event, user=user, **fields)


def _known_queue(store, dests: _Destinations, resolved: Resolved, now: float):
    """The queue's stats, or None if it is configured but has no row yet; _Fail(1) if unknown."""
    for stats in store.queue_stats(now):
        if stats.queue == resolved.queue:
            return stats
    if resolved.names or resolved.queue in dests.queues():
        return None
    raise _Fail(NOTHING, f"no queue {resolved.queue} in the store or in the channels config")


def _shared_note(resolved: Resolved) -> None:
    if resolved.given_name is not None and len(resolved.names) > 1:
        others = ", ".join(n for n in resolved.names if n != resolved.given_name)
        print(f"note: queue {resolved.queue} is shared with {others}; this acts on the whole queue")


def _entry_ids(store, ids: Sequence[int]) -> list:
    """The dead entries for `ids`; _Fail(1) naming every id that is unknown or not dead."""
    entries, problems = [], []
    for entry_id in dict.fromkeys(ids):
        entry = store.get_entry(entry_id)
        if entry is None:
            problems.append(f"no queue entry {entry_id}")
        elif entry.state != "dead":
            problems.append(f"entry {entry_id} is {entry.state}, not a dead letter")
        else:
            entries.append(entry)
    if problems:
        raise _Fail(NOTHING, "; ".join(problems) + " (nothing changed)")
    return entries


# --------------------------------------------------------------------------- queue


@_command
def queue_list(args, store, dests) -> int:
    """One line per queue: depth, oldest age, state, dead letters, last error."""
    now = _now()
    stats = {s.queue: s for s in store.queue_stats(now)}
    if dests.error is not None and Path(args.channels).is_dir():
        sys.stderr.write(f"warning: destination names unavailable: {dests.error}\n")
    rows = []
    configured = dests.queues()
    for queue in sorted(set(stats) | configured):
        s = stats.get(queue)
        names = list(dests.names_on(queue))
        if not names and s is not None and s.depth:
            names = sorted({e.destination for e in store.queue_head(queue, 1, bodies=False)})
        rows.append({
            # (after a `queue move` or a destination taken out of the config: history, not a
            # queue to watch; only when the config was read, so "no destination" is known)
            "retired": bool(configured) and queue not in configured and not (
                s and (s.depth or s.dead_count or s.paused)),  # (a pause is kept in sight: see queue move)
            "queue": queue,
            "destinations": names,
            "depth": s.depth if s else 0,
            "oldest_enqueued_at": s.oldest_enqueued_at if s else None,
            "oldest_age": s.oldest_age if s else None,
            "state": "paused" if s and s.paused else "active",
            "dead": s.dead_count if s else 0,
            "delivered": s.delivered_count if s else 0,
            "last_error": s.last_error if s else None,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return OK
    shown = rows if args.all else [r for r in rows if not r["retired"]]
    if not shown:
        print("no queues")
    else:
        _table(
            ("QUEUE", "DESTINATIONS", "DEPTH", "OLDEST", "STATE", "DEAD", "LAST ERROR"),
            [
                (r["queue"], ",".join(r["destinations"]) or "-", r["depth"], human_age(r["oldest_age"]),
                 "retired" if r["retired"] else r["state"], r["dead"], _short(r["last_error"]))
                for r in shown
            ],
        )
    if len(shown) < len(rows):
        hidden = len(rows) - len(shown)
        print(f"({_plural(hidden, 'retired queue')} not shown: no destination delivers to "
              f"{'it' if hidden == 1 else 'them'} and nothing waits; --all shows {'it' if hidden == 1 else 'them'})")
    return OK


@_command
def queue_show(args, store, dests) -> int:
    """The head of one queue, without message bodies."""
    now = _now()
    resolved = dests.resolve(args.dest)
    stats = _known_queue(store, dests, resolved, now)
    depth = stats.depth if stats else 0
    state = "paused" if stats and stats.paused else "active"
    dead = stats.dead_count if stats else 0
    print(f"queue {resolved.label()}: {state}, {depth} pending, {_plural(dead, 'dead letter')}")
    if stats and stats.last_error:
        print(f"last error: {_short(stats.last_error, 200)}")
    entries = store.queue_head(resolved.queue, args.limit, bodies=False)
    if not entries:
        return OK
    print()
    _table(
        ("ENTRY", "MESSAGE", "CONTROL-ID", "TYPE", "DESTINATION", "ATTEMPTS", "ENQUEUED", "NEXT",
         "LAST ERROR"),
        [
            (e.id, e.message_id, e.control_id, e.message_type, e.destination, e.attempts,
             human_age(now - e.enqueued_at) + " ago", _next_attempt(e.next_attempt_at, now),
             _short(e.last_error))
            for e in entries
        ],
    )
    if depth > len(entries):
        print(f"... and {depth - len(entries)} more")
    return OK


def _set_paused(args, store, dests, paused: bool) -> int:
    from engine.store import SetPaused

    reason = _optional_reason(args)
    resolved = dests.resolve(args.dest)
    stats = _known_queue(store, dests, resolved, _now())
    was = bool(stats and stats.paused)
    word = "paused" if paused else "active"
    _shared_note(resolved)
    if was == paused:
        print(f"queue {resolved.label()}: already {word}, nothing changed")
        return OK
    _write(store, SetPaused(queue=resolved.queue, paused=paused, at=_now(), reason=reason))  # + audit record
    depth = stats.depth if stats else 0
    print(f"queue {resolved.label()}: {'active' if paused else 'paused'} -> {word} ({depth} pending)"
          + (f"; reason: {reason}" if reason else ""))
    _log_action("operator.queue_paused" if paused else "operator.queue_resumed", queue=resolved.queue,
                destinations=list(resolved.names), pending=depth, reason_given=reason is not None)
    return OK


@_command
def queue_pause(args, store, dests) -> int:
    """Stop sending on a queue (the engine notices on its next poll); messages keep queueing."""
    return _set_paused(args, store, dests, True)


@_command
def queue_resume(args, store, dests) -> int:
    """Start sending on a paused queue again."""
    return _set_paused(args, store, dests, False)


@_command
def queue_retry_now(args, store, dests) -> int:
    """Make waiting entries due now instead of after their backoff."""
    from engine.store import RetryNow

    reason = _optional_reason(args)
    resolved = dests.resolve(args.dest)
    stats = _known_queue(store, dests, resolved, _now())
    _shared_note(resolved)
    count = _write(store, RetryNow(queue=resolved.queue, at=_now(), reason=reason))  # + audit record if any
    if not count:
        depth = stats.depth if stats else 0
        waiting = f"{depth} pending, none waiting on a backoff" if depth else "nothing pending"
        print(f"queue {resolved.label()}: {waiting}; nothing changed")
        return NOTHING
    print(f"queue {resolved.label()}: {_plural(int(count), 'entry', 'entries')} due now"
          + (f"; reason: {reason}" if reason else ""))
    _log_action("operator.queue_retry_now", queue=resolved.queue, destinations=list(resolved.names),
                entries=int(count), reason_given=reason is not None)
    if stats and stats.paused:
        print("note: the queue is paused; nothing is sent until `koppel queue resume`")
    return OK


# --------------------------------------------------------------------------- dead letters


def _entry_json(entry) -> dict[str, Any]:
    return {
        "entry": entry.id,
        "queue": entry.queue,
        "destination": entry.destination,
        "message": entry.message_id,
        "control_id": entry.control_id,
        "type": entry.message_type,
        "state": entry.state,
        "attempts": entry.attempts,
        "enqueued_at": entry.enqueued_at,
        "last_attempt_at": entry.last_attempt_at,
        "dead_at": entry.done_at if entry.state == "dead" else None,
        "reason": _failure_of(entry),
        "ack": _ack_summary(entry.last_ack),
        "replay_of": entry.replay_of,
    }


def _failure_of(entry) -> str | None:
    """Why the entry is not delivered; None once it is (an earlier attempt's error is not the
    reason of a delivered message, as `koppel trace` shows it)."""
    return None if entry.state == "delivered" else entry.last_error


@_command
def dead_letters_list(args, store, dests) -> int:
    """Dead letters, oldest first, of all queues or of one."""
    now = _now()
    queue = None
    if args.dest is not None:
        resolved = dests.resolve(args.dest)
        # A mistyped HOST:PORT is "no such queue" (exit 1), as for a mistyped name: never a
        # reassuring "no dead letters" about a queue that does not exist.
        _known_queue(store, dests, resolved, now)
        queue = resolved.queue
    entries = store.list_dead_letters(queue, min(args.limit + 1, MAX_ID))  # (one more: are there more)
    more, entries = len(entries) > args.limit, entries[:args.limit]
    if args.json:
        print(json.dumps([_entry_json(e) for e in entries], indent=2))
        return OK
    if not entries:
        print("no dead letters" + (f" on queue {queue}" if queue else ""))
        return OK
    _table(
        ("ENTRY", "QUEUE", "DESTINATION", "MESSAGE", "CONTROL-ID", "TYPE", "ATTEMPTS", "DEAD FOR",
         "REASON"),
        [
            (e.id, e.queue, e.destination, e.message_id, e.control_id, e.message_type, e.attempts,
             human_age(now - e.done_at) if e.done_at is not None else "-", _short(e.last_error))
            for e in entries
        ],
    )
    if more:
        print(f"(first {args.limit}; use --limit for more)")
    return OK


@_command
def dead_letters_show(args, store, dests) -> int:
    """One entry's headers, the ACK it got and why it died; never the body."""
    now = _now()
    entry = store.get_entry(args.id)
    if entry is None:
        raise _Fail(NOTHING, f"no queue entry {args.id}")
    message = store.get_message(entry.message_id)
    if message is None:
        origin = "(pruned)"
    else:
        origin = f"(channel {message.channel}, received {_when(message.received_at, now)})"
    lines = [
        ("entry", entry.id),
        ("state", entry.state if entry.state == "dead" else f"{entry.state} (not a dead letter)"),
        ("queue", entry.queue),
        ("destination", entry.destination),
        ("message", f"{entry.message_id} {origin}"),
        ("control id", entry.control_id or "-"),
        ("type", entry.message_type or "-"),
        ("attempts", entry.attempts),
        ("enqueued", _when(entry.enqueued_at, now)),
        ("last attempt", _when(entry.last_attempt_at, now)),
    ]
    if entry.state == "dead":
        lines.append(("dead since", _when(entry.done_at, now)))
    elif entry.done_at is not None:
        lines.append((f"{entry.state} at", _when(entry.done_at, now)))
    lines += [("ack received", _ack_line(entry.last_ack)), ("reason", _failure_of(entry) or "-")]
    if entry.replay_of is not None:
        lines.append(("replay of", entry.replay_of))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return OK


@_command
def dead_letters_replay(args, store, dests) -> int:
    """Put dead letters back at the tail of their queue, as new entries."""
    from engine.store import ReplayDeadLetters

    if bool(args.ids) == bool(args.all):
        raise _Fail(USAGE, "give entry ids or --all DEST (not both)")
    if args.all:
        resolved = dests.resolve(args.all)
        _known_queue(store, dests, resolved, _now())
        _delivered_queues(dests, [(resolved.queue, None)])
        _shared_note(resolved)
        new: list[int] = []
        # Entries this command creates have ids above its first one: one that dies again while
        # the command runs (the destination still refuses it) is not replayed again by it.
        new = _in_steps(store, lambda: ReplayDeadLetters(queue=resolved.queue, at=_now(), limit=STEP,
                                                         below_id=min(new) if new else None), done=new,
                        what="were replayed onto the tail of the queue")
        if not new:
            print(f"queue {resolved.label()}: no dead letters, nothing changed")
            return NOTHING
        print(f"replayed {_plural(len(new), 'dead letter')} onto the tail of queue {resolved.label()}: "
              f"new {'entry' if len(new) == 1 else 'entries'} {_id_list(new)}")
        _log_action("operator.dead_letters_replayed", queue=resolved.queue, entries=len(new))
        return OK
    entries = _entry_ids(store, args.ids)
    _delivered_queues(dests, [(e.queue, e) for e in entries])
    new = _by_chunks(store, sorted(e.id for e in entries),
                     lambda chunk: ReplayDeadLetters(entry_ids=chunk, at=_now()),
                     what="were replayed onto the tail of their queues")
    # Paired by the new entries' replay_of: the store skips any that stopped being dead meanwhile.
    by_id = {e.id: e for e in entries}
    for new_id in new:
        replayed = store.get_entry(new_id)
        entry = by_id.get(replayed.replay_of) if replayed is not None else None
        if entry is not None:
            print(f"replayed entry {entry.id} as entry {new_id} at the tail of queue {entry.queue} "
                  f"({entry.destination})")
    if new:
        _log_action("operator.dead_letters_replayed", queues=sorted({e.queue for e in entries}), entries=len(new))
    if len(new) < len(entries):
        print(f"{len(entries) - len(new)} entries were no longer dead letters and were not replayed")
        return NOTHING
    return OK


@_command
def queue_move(args, store, dests) -> int:
    """Re-queue the pending entries of a queue no destination uses any more (a destination's
    host or port changed while they waited; the engine logs queue.orphaned): each at the tail
    of the queue its destination now delivers to, oldest first; those of a destination that
    no longer exists to DEST."""
    from engine.store import MoveQueue

    reason = _optional_reason(args)
    source = _queue_key(args.source) if ":" in args.source else None
    if source is None:
        raise _Fail(USAGE, f"give the old queue as HOST:PORT, not {args.source!r}")
    fallback = dests.resolve(args.dest) if args.dest else None
    if fallback is not None and fallback.given_name is None:
        raise _Fail(USAGE, "give DEST by its name (its queue comes from --channels)")
    engine_running = store.claimed_elsewhere("deliver")
    if dests.names_on(source) and (engine_running or not args.force):
        raise _Fail(NOTHING, f"queue {source} is delivered by {', '.join(dests.names_on(source))}: let it "
                             "deliver, or (with the engine's delivery stopped) give --force")
    if engine_running:  # its sender for this queue is gone if it reloaded the config we read
        if not store.is_paused(source):
            raise _Fail(NOTHING, f"a running engine may still be sending from {source}: pause it first "
                                 f"(koppel queue pause {source}), move, then resume it")
        # Its sender sees a pause within a second and records the entry on the wire, which
        # the move leaves where it is (it may be delivered there).
        time.sleep(PAUSE_SEEN)
    waiting = store.pending_destinations(source)
    if not waiting:
        print(f"queue {source}: nothing pending, nothing changed")
        return NOTHING
    moves, unplaced, staying = [], [], []
    for name in sorted(waiting):
        queue = dests.queue_of(name)
        if queue == source:
            staying.append(name)  # still delivers there: its entries stay (--force moves the others)
        elif queue is not None:
            moves.append((name, queue, name))  # its own destination, at its new address
        elif fallback is not None and fallback.queue != source:
            moves.append((name, fallback.queue, fallback.given_name))  # a destination that is gone
        else:
            unplaced.append(name)
    if unplaced:
        raise _Fail(NOTHING, f"entries on {source} for {', '.join(unplaced)}, which no configured destination "
                             "is; give DEST, the destination that should deliver them")
    if not moves:
        print(f"queue {source}: only {', '.join(staying)} entries wait, and it still delivers there; nothing changed")
        return NOTHING
    moved = _in_steps(store, lambda: MoveQueue(from_queue=source, moves=tuple(moves), at=_now(), reason=reason,
                                               limit=STEP), what="were moved")
    print(f"moved {_plural(len(moved), 'pending entry', 'pending entries')} from {source}: "
          + ", ".join(f"{name} -> {queue} ({new})" for name, queue, new in moves)
          + f"; new {'entry' if len(moved) == 1 else 'entries'} {_id_list(moved)}"
          + (f"; reason: {reason}" if reason else ""))
    _log_action("operator.queue_moved", queue=source, moves=[f"{n}->{q}" for n, q, _ in moves],
                entries=len(moved), reason_given=reason is not None)
    return OK


STEP = 500  # entries per transaction for bulk replays and moves
PAUSE_SEEN = 2.0  # seconds a running engine's sender needs to see a pause (it polls every second)


def _in_steps(store, make_op: Callable[[], Any], *, done: list[int] | None = None,
              what: str = "entries", new_ids: bool = True) -> list[int]:
    """Write ``make_op()`` (an op taking at most STEP entries) until a step takes fewer: short
    transactions, so the engine's commits, and so its ACKs, never wait long behind ours. The
    new ids collect in ``done`` (given: make_op can see the steps so far).

    Each step is committed on its own: when a later one fails (the store locked by another
    process for longer than its busy timeout, a full disk) or the command is interrupted, the
    error says what the earlier steps did, so the operator is not told only "failed" about
    entries that were in fact re-queued (and that the engine may be sending already)."""
    done = [] if done is None else done
    while True:
        step = _committed_step(store, make_op(), done, what, new_ids=new_ids)
        if len(step) < STEP:
            return done


def _by_chunks(store, ids: Sequence[int], make_op: Callable[[tuple[int, ...]], Any], *, what: str,
               new_ids: bool = True) -> list[int]:
    """Write ``make_op(chunk)`` for the ids (in id order) STEP at a time, as ``--all`` does: ids
    piped in from a listing may be tens of thousands, and one transaction for all of them held
    the store's write lock for seconds (past the engine's 5 s, its commits fail and senders get
    AE). Results concatenated; a failure after some steps says what they did (see _in_steps)."""
    done: list[int] = []
    for start in range(0, len(ids), STEP):
        _committed_step(store, make_op(tuple(ids[start:start + STEP])), done, what, new_ids=new_ids)
    return done


def _committed_step(store, op, done: list[int], what: str, *, new_ids: bool = True) -> list[int]:
    """One step of a command that writes in steps: its results (also added to ``done``), or,
    when it fails after earlier steps committed, a failure that says what those did."""
    from engine.store import StoreError

    try:
        step = _write(store, op)
    except (StoreError, KeyboardInterrupt) as error:
        if not done:
            raise
        raise _stopped_half_way(error, done, what, new_ids=new_ids) from None
    done.extend(step)
    return step


def _stopped_half_way(error: BaseException, done: Sequence[int], what: str, *, new_ids: bool = True) -> _Fail:
    """The failure of a command whose earlier steps committed: what they did, then why it stopped."""
    why = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
    which = f"new {'entry' if len(done) == 1 else 'entries'} {_id_list(done)}" if new_ids else _id_list(done)
    return _Fail(NOTHING, f"{why}; before that, {_plural(len(done), 'entry', 'entries')} {what} ({which}) "
                          "in committed steps; run the command again for the rest")


def _delivered_queues(dests: _Destinations, items: Sequence[tuple[str, Any]]) -> None:
    """_Fail(1) unless every queue is one a configured destination delivers (as `resend` checks):
    a dead letter replayed onto a queue nothing sends would wait there for ever. Items are
    (queue, dead entry or None for --all). Without a channels config there is nothing to check."""
    configured = dests.queues()
    if not configured:
        return
    problems = []
    for queue, entry in items:
        if queue in configured:
            continue
        what = f"entry {entry.id} is on queue {queue}" if entry is not None else f"queue {queue}"
        problem = f"{what}, which no destination in the channels config delivers"
        moved = dests.queue_of(entry.destination) if entry is not None else None
        if moved is not None:  # the destination is configured, on another host:port now
            problem += (f" ({entry.destination} now delivers to {moved}: "
                        f"koppel resend {entry.message_id} --to {entry.destination})")
        problems.append(problem)
    if problems:
        raise _Fail(NOTHING, "; ".join(problems) + "; replayed there a dead letter would never be sent "
                                                   "(nothing changed)")


def _id_list(ids: Sequence[int]) -> str:
    if len(ids) <= 10:
        return ", ".join(map(str, ids))
    return f"{ids[0]}..{ids[-1]}"


@_command
def dead_letters_drop(args, store, dests) -> int:
    """Give up on dead letters for good; the reason is kept in the audit log."""
    from engine.store import DropDeadLetters

    reason = _required_reason(args)
    entries = _entry_ids(store, args.ids)
    dropped = _by_chunks(store, sorted(e.id for e in entries),
                         lambda chunk: DropDeadLetters(entry_ids=chunk, reason=reason, at=_now()),
                         what="were dropped", new_ids=False)
    for entry in entries:  # the ones this command dropped: another operator may have got there first
        if entry.id in dropped:
            print(f"dropped entry {entry.id} (queue {entry.queue}, destination {entry.destination}, "
                  f"message {entry.message_id})")
    print(f"{_plural(len(dropped), 'dead letter')} dropped; reason recorded in the audit log")
    if dropped:
        _log_action("operator.dead_letters_dropped", entries=len(dropped), reason_given=True)
    if len(dropped) < len(entries):
        print(f"{len(entries) - len(dropped)} entries were no longer dead letters and were not dropped")
        return NOTHING
    return OK


@_command
def audit(args, store, dests) -> int:
    """Operator actions (resend, replay, drop, move, pause, resume, retry-now, reprocess, drop-held), newest
    first."""
    now = _now()
    records = store.list_audit(args.limit)
    if not records:
        print("no audit records")
        return OK
    _table(
        ("ID", "TIME", "ACTION", "QUEUE", "ENTRY", "MESSAGE", "REASON"),
        [
            (r.id, _when(r.at, now), r.action, r.queue, r.entry_id, r.message_id, r.reason or "-")
            for r in records
        ],
    )
    return OK


# --------------------------------------------------------------------------- resend


@_command
def resend(args, store, dests) -> int:
    """Queue a stored, accepted message again for one destination: as it was received, so
    refused where the destination gets its type only as mapped (unless --as-received)."""
    from engine.store import Enqueue, QueueTarget

    message = store.get_message(args.message_id)
    if message is None:
        raise _Fail(NOTHING, f"no message {args.message_id} in the store")
    if message.status != "accepted":
        raise _Fail(NOTHING, f"message {args.message_id} was rejected ({message.ack_code}); "
                             "only accepted messages can be resent")
    resolved = dests.resolve(args.to)
    if resolved.given_name is not None:
        name = resolved.given_name
    elif len(resolved.names) == 1:
        name = resolved.names[0]
    elif resolved.names:
        raise _Fail(USAGE, f"queue {resolved.queue} is shared by {', '.join(resolved.names)}; "
                           "name the destination with --to NAME")
    else:
        # no destination name: only a queue something will deliver (configured, or known to
        # the store when no channels config was given), never one nothing sends
        if dests.queues():
            raise _Fail(NOTHING, f"no destination in the channels config delivers to queue {resolved.queue}; "
                                 "a message queued there would never be sent")
        _known_queue(store, dests, resolved, _now())
        name = resolved.queue  # no config: the queue key stands in for the name
    if not args.as_received:
        _refuse_if_only_mapped(store, dests, message, name)
    new = _write(store, Enqueue(message_id=message.id,
                                targets=(QueueTarget(queue=resolved.queue, destination=name),),
                                at=_now()))
    print(f"queued message {message.id} ({message.message_type or '-'}, control id "
          f"{message.control_id or '-'}) for {name} on queue {resolved.queue} as entry "
          f"{_id_list(new)}")
    _log_action("operator.resend", message_id=message.id, queue=resolved.queue, destination=name,
                as_received=bool(args.as_received))
    return OK


# --------------------------------------------------------------------------- reprocess


def _why_not_reprocessable(message, outcomes: Sequence[str]) -> str | None:
    if message.status != "accepted":
        return (f"message {message.id} was answered {message.ack_code or 'with a NAK'}: "
                "its sender resends it, corrected")
    if message.origin_id is not None:
        return f"message {message.id} was built by mapping message {message.origin_id}: reprocess that one"
    if message.processing not in outcomes:
        was = message.processing or "not mapped (no mapping route took it when it arrived)"
        return f"message {message.id} is {was}, not {' or '.join(outcomes)}"
    return None


@_command
def reprocess(args, store, dests) -> int:
    """Hand messages whose mapping failed (fixed and reloaded since) to mapping again."""
    from engine.store import Reprocess

    reason = _optional_reason(args)
    outcomes = tuple(args.outcome or ("error",))
    if bool(args.ids) == (args.channel is not None):
        raise _Fail(USAGE, "give message ids or --channel NAME (not both)")
    configured = dests.error is None
    if args.channel is not None:
        if configured and dests.channel(args.channel) is None:
            raise _Fail(NOTHING, f"no channel {args.channel!r} in {args.channels}: its messages would "
                                 "only be marked error again (nothing changed)")
        done: list[int] = []  # messages set pending, not new queue entries: new_ids=False
        _in_steps(store, lambda: Reprocess(channel=args.channel, outcomes=outcomes, at=_now(), limit=STEP,
                                           after_id=done[-1] if done else 0, reason=reason),
                  done=done, what="were handed to mapping again", new_ids=False)
        if not done:
            print(f"channel {args.channel}: no accepted message is {' or '.join(outcomes)}, nothing changed")
            return NOTHING
    else:
        problems, ids = [], []
        wanted = list(dict.fromkeys(args.ids))
        found = _messages_by_id(store, wanted)
        for message_id in wanted:
            message = found.get(message_id)
            why = (f"no message {message_id} (never stored, or pruned)" if message is None
                   else _why_not_reprocessable(message, outcomes))
            if why is None and configured and dests.channel(message.channel) is None:
                why = f"message {message_id}'s channel {message.channel} is not in {args.channels}"
            if why is not None:
                problems.append(why)
            else:
                ids.append(message_id)
        if problems:
            raise _Fail(NOTHING, "; ".join(problems) + " (nothing changed)")
        done = _by_chunks(store, sorted(ids), lambda chunk: Reprocess(message_ids=chunk, outcomes=outcomes,
                                                                      at=_now(), reason=reason),
                          what="were handed to mapping again", new_ids=False)
        if len(done) < len(ids):
            print(f"{len(ids) - len(done)} of the messages changed meanwhile and were not handed on: "
                  f"{_id_list(sorted(set(ids) - set(done)))}")
    print(f"{_plural(len(done), 'message')} handed to mapping again ({_id_list(done)}): a running engine maps "
          "them within a minute (its admin API at once), a stopped one when it starts; "
          "see `koppel messages` and the audit log")
    _log_action("operator.reprocess", messages=len(done), channel=args.channel, reason_given=reason is not None)
    return OK if args.channel is not None or len(done) == len(ids) else NOTHING


# --------------------------------------------------------------------------- held


@_command
def held_list(args, store, dests) -> int:
    """Messages held for an agenda entry that has not come, oldest first, with how long they wait."""
    rows = store.list_messages(processing="held", limit=args.limit, oldest_first=True)
    now = _now()
    if args.json:
        print(json.dumps([{"id": m.id, "channel": m.channel, "type": m.message_type, "control_id": m.control_id,
                           "received_at": m.received_at, "waiting": human_age(now - m.received_at),
                           "for": m.processing_detail} for m in rows], indent=2))
        return OK
    if not rows:
        print("no message is held for its agenda entry")
        return OK
    _table(("ID", "CHANNEL", "TYPE", "CONTROL-ID", "WAITING", "FOR"),
           [(m.id, m.channel, m.message_type, m.control_id, human_age(now - m.received_at), m.processing_detail)
            for m in rows])
    return OK


@_command
def held_drop(args, store, dests) -> int:
    """Give up on held messages whose entry will not come; the reason is kept in the audit log."""
    from engine.store import DropHeld

    reason = _required_reason(args)
    wanted = list(dict.fromkeys(args.ids))
    found = _messages_by_id(store, wanted)
    problems = [f"no message {i} (never stored, or pruned)" if i not in found
                else f"message {i} is {found[i].processing or 'not mapped'}, not held"
                for i in wanted if i not in found or found[i].processing != "held"]
    if problems:
        raise _Fail(NOTHING, "; ".join(problems) + " (nothing changed)")
    dropped = _by_chunks(store, sorted(wanted), lambda chunk: DropHeld(message_ids=chunk, reason=reason, at=_now()),
                         what="were given up", new_ids=False)
    print(f"{_plural(len(dropped), 'held message')} given up ({_id_list(dropped)}): recorded error, the reason "
          "in the audit log; `koppel reprocess` takes them again if what they waited for comes after all, "
          "until pruning deletes them (the engine's --retention, 30 days by default, counted from when "
          "each was received: one held longer than that goes at the next prune)")
    _log_action("operator.held_dropped", messages=len(dropped))
    if len(dropped) < len(wanted):
        print(f"{len(wanted) - len(dropped)} were no longer held (mapped meanwhile) and were not given up")
        return NOTHING
    return OK


# At most this many messages built from one message are listed (a mapping builds a few).
_BUILT_LIMIT = 100


def _refuse_if_only_mapped(store, dests: _Destinations, message, name: str) -> None:
    """_Fail(1) if the message's channel routes its type to a mapping and to no destination
    called `name` as it is: that destination gets the messages the mapping builds, never this
    one (a ZorgDomein SRM^S01 resent raw to the HIS scheduling interface that expects the
    SIU^S12 built from it). Without the channel in config there is nothing to go by."""
    channel = dests.channel(message.channel)
    if channel is None or not message.message_type:
        return
    msg_type, _, trigger = message.message_type.partition("^")
    from engine.core.header import read_header
    from engine.core.routing import parsed_once, routes_taking

    parsed = parsed_once(message.raw, read_header(message.raw, default_charset=channel.source.charset).codec)
    routes = routes_taking(channel.routes, msg_type, trigger.split("^")[0], parsed)
    if any(name in r.to for r in routes):
        return  # a plain route sends it there as received
    maps = sorted({r.map for r in routes if r.map})
    if not maps or _is_built(store, message):
        return  # a message Koppel built is what its destination receives: sent as it is
    what = f"{message.message_type} on channel {message.channel}"
    anyway = f"or give --as-received to queue message {message.id} as it is"
    outbound = [dests.outbound(m) for m in maps]
    if None not in outbound:  # the mappings say where what they build goes
        targets = sorted(set().union(*outbound))
        if name not in targets:
            raise _Fail(NOTHING, (
                f"{name} receives nothing for {what}: its route maps it ({', '.join(maps)}) and what the "
                f"mapping builds goes to {', '.join(targets) or 'no destination'}; {anyway}"))
        built, complete = _built_from(store, message)
        more = "" if complete else " (perhaps more: see `koppel messages`)"
        if built and targets == [name]:
            instead = "resend one of those instead: " + _built_list(built) + more
        elif built:
            instead = f"built from it (for {', '.join(targets)}): " + _built_list(built) + more
        else:
            instead = _none_built(message)
        raise _Fail(NOTHING, (
            f"{name} receives the messages mapping {', '.join(maps)} builds from {what}, never the "
            f"{message.message_type} as received; {instead}; {anyway}"))
    built, complete = _built_from(store, message)
    more = "" if complete else " (perhaps more: see `koppel messages`)"
    found = ("those built from it: " + _built_list(built) + more) if built else _none_built(message)
    raise _Fail(NOTHING, (
        f"no route sends {what} to {name} as received: it is mapped ({', '.join(maps)}), and the "
        f"mapping's destinations receive the messages it builds; {found}; {anyway}"))


def _built_list(built) -> str:
    return ", ".join(f"{b.id} ({b.message_type or '-'})" for b in built)


def _none_built(message) -> str:
    return (f"no message built from it was found (`koppel messages --channel {message.channel}` "
            f"marks them 'built from {message.id}')")


def _is_built(store, message) -> bool:
    """Did Koppel build this message (an outbound mapping's message, origin_id set)?"""
    if message.control_id:
        for row in store.list_messages(channel=message.channel, control_id=message.control_id, limit=100):
            if row.id == message.id:
                return row.origin_id is not None
    return message.peer == "koppel"  # what the mapping stores as the peer of what it builds


def _built_from(store, message) -> tuple[list, bool]:
    """(the stored messages built from `message`, in id order; False if there may be more than
    listed). By origin (indexed), so a letter released days after it came still finds its MDM."""
    found = store.list_messages(origin_id=message.id, oldest_first=True, limit=_BUILT_LIMIT)
    return found, len(found) < _BUILT_LIMIT


# --------------------------------------------------------------------------- trace


def message_summary_json(m) -> dict[str, Any]:
    """A stored message's header facts and outcome (a MessageSummary), never its body."""
    return {
        "id": m.id, "channel": m.channel, "peer": m.peer, "received_at": m.received_at,
        "control_id": m.control_id, "sender": m.sender, "type": m.message_type, "version": m.version,
        "size": m.size, "status": m.status, "ack_code": m.ack_code, "error": m.error,
        "duplicates": m.duplicate_count, "processing": m.processing,
        "processing_detail": m.processing_detail, "origin_id": m.origin_id,
    }


def _delivery_json(entry) -> dict[str, Any]:
    return {
        "entry": entry.id, "message": entry.message_id, "type": entry.message_type,
        "destination": entry.destination, "queue": entry.queue, "state": entry.state,
        "attempts": entry.attempts, "enqueued_at": entry.enqueued_at,
        "last_attempt_at": entry.last_attempt_at, "done_at": entry.done_at,
        "last_error": entry.last_error, "ack": _ack_summary(entry.last_ack), "replay_of": entry.replay_of,
    }


def message_trace(store, summary) -> dict[str, Any]:
    """Where one stored message went, headers only: what mapping made of it, the agenda
    entries it changed, the messages built from it, and every queue entry of it and of
    those (delivered, waiting, dead). What on-call is asked: "did the HIS get ZD123?"."""
    if summary.origin_id is None:
        built, complete = _built_from(store, summary)
        agenda = [record for record in map(store.get_agenda_entry, store.agenda_entries_changed_by(summary.id))
                  if record is not None]
    else:  # a message a mapping built changed no entry and was built from nothing further
        built, complete, agenda = [], True, []
    entries = store.entries_of_messages([summary.id, *(b.id for b in built)])
    return {
        "message": message_summary_json(summary),
        "agenda_entries": [_agenda_json(record, with_data=False) for record in agenda],
        "built": [message_summary_json(b) for b in built],
        "built_search_complete": complete,
        "deliveries": [_delivery_json(e) for e in entries],
    }


def _trace_targets(args, store) -> tuple[list, Any]:
    """(the message summaries to trace, oldest first; the agenda entry with --zd, else None)."""
    given = [name for name, value in (("MESSAGE-ID", args.id), ("--control-id", args.control_id),
                                      ("--zd", args.zd)) if value is not None]
    if len(given) != 1:
        raise _Fail(USAGE, "give one of MESSAGE-ID, --control-id or --zd"
                    + (f", not {' and '.join(given)}" if given else ""))
    if args.channel is not None and args.control_id is None:
        raise _Fail(USAGE, "--channel goes with --control-id")
    if args.control_id is not None:
        rows = store.list_messages(control_id=args.control_id, channel=args.channel, limit=args.limit)
        if not rows:
            raise _Fail(NOTHING, f"no stored message with MSH-10 {args.control_id!r}"
                                 + (f" on channel {args.channel}" if args.channel else "") + " (never received, or pruned)")
        return rows[::-1], None  # oldest first: a resend after the first
    if args.zd is not None:
        return _referral_messages(store, args.zd.strip(), args.limit)
    rows = store.list_messages(message_ids=[args.id], limit=1)
    if not rows:
        raise _Fail(NOTHING, f"no message {args.id} (never stored, or pruned)")
    return rows, None


_REFUSED_SCAN = 200  # how many of the latest refused messages `trace --zd` reads for the ZD-number


def _referral_messages(store, zd: str, limit: int) -> tuple[list, Any]:
    """Every stored message of one referral: those that changed its entry, those held for it,
    those whose MSH-10 is its ZD-number (ZorgDomein's letters), and the latest refused ones
    that name it, oldest first."""
    key = f"zd:{zd}"
    record = store.find_agenda_entry([key])
    ids = {h.message_id for h in store.agenda_history(record.id)} if record is not None else set()
    ids.update(h.message_id for h in store.held_events([key]))
    ids.discard(None)
    rows = {m.id: m for m in store.list_messages(control_id=zd, limit=limit)}
    ids.difference_update(rows)
    rows.update((m.id, m) for m in _messages_by_id(store, sorted(ids)).values())
    # Refused ones changed nothing and wait for nothing (an XO for a cancelled order, a request
    # the mapping could not read): among the latest refused, those whose text names it.
    needle = zd.encode("ascii", "replace")
    refused = {m.id: m for m in (*store.list_messages(processing="error", limit=_REFUSED_SCAN),
                                 *store.list_messages(status="rejected", limit=_REFUSED_SCAN))}
    for message_id, summary in refused.items():  # (one read each, also for one both lists name)
        if message_id not in rows:
            stored = store.get_message(message_id)
            if stored is not None and needle in stored.raw:
                rows[message_id] = summary
    if record is None and not rows:
        raise _Fail(NOTHING, f"nothing stored for ZD-number {zd!r}: no agenda entry, no message held for it, "
                             f"with it as MSH-10 or among the latest {_REFUSED_SCAN} refused ones naming it "
                             "(older refused ones: `koppel messages --processing error`)")
    return sorted(rows.values(), key=lambda m: m.id)[-limit:], record


def _delivery_row(d: dict[str, Any], replaced_by: dict[int, int], now: float) -> tuple:
    """One queue entry: the time and answer of its last attempt (a delivered entry's error of an
    earlier attempt is history, not shown; a replayed dead letter keeps the time its NAK came)."""
    ack = d["ack"]
    answer = (ack["code"] or "unreadable") if ack else None
    state = d["state"]
    if state == "replayed" and d["entry"] in replaced_by:
        state = f"replayed as {replaced_by[d['entry']]}"
    elif d["replay_of"] is not None:
        state = f"{state} (replay of {d['replay_of']})"
    last = d["last_attempt_at"] if d["last_attempt_at"] is not None else d["done_at"]
    said = answer if d["state"] == "delivered" else " ".join(filter(None, (answer, d["last_error"])))
    return (d["message"], d["entry"], d["type"] or "-", d["destination"], d["queue"], state, d["attempts"],
            _when(last, now), _short(said) or "-")


def _print_trace(trace: dict[str, Any], now: float) -> None:
    m = trace["message"]
    what = f"{m['type'] or '-'} ({m['version'] or '-'})"
    print(f"message {m['id']}  {what}  channel {m['channel']}  MSH-10 {m['control_id'] or '-'}")
    if m["origin_id"] is not None:
        print(f"  built by a mapping from message {m['origin_id']} (koppel trace {m['origin_id']})  "
              f"{_when(m['received_at'], now)}")
    else:
        dups = f", {_plural(m['duplicates'], 'resend')} answered from it" if m["duplicates"] else ""
        print(f"  received {_when(m['received_at'], now)} from {m['peer']}, {m['size']} bytes; "
              f"{m['status']}, answered {m['ack_code']}{dups}")
        if m["error"]:
            print(f"  error: {m['error']}")
        outcome = m["processing"] or "-"
        print(f"  mapping: {outcome}" + (f" ({m['processing_detail']})" if m["processing_detail"] else ""))
    if m["processing"] == "mapped" and not trace["agenda_entries"]:
        print("  agenda: it changed no entry (nothing in it was new)")
    for entry in trace["agenda_entries"]:
        print(f"  agenda entry {entry['id']}: {entry['agenda']} {entry['kind']} {entry['state']}  "
              f"(koppel agenda show {entry['id']})")
    if trace["built"]:
        print("  built from it: " + ", ".join(f"{b['id']} ({b['type'] or '-'})" for b in trace["built"]))
    if not trace["built_search_complete"]:
        print(f"  (the first {_BUILT_LIMIT} built from it; `koppel messages --channel {m['channel']}` marks "
              f"the others 'built from {m['id']}')")
    if trace["deliveries"]:
        print("deliveries:")
        replaced_by = {d["replay_of"]: d["entry"] for d in trace["deliveries"] if d["replay_of"] is not None}
        _table(["MESSAGE", "ENTRY", "TYPE", "DESTINATION", "QUEUE", "STATE", "ATTEMPTS", "LAST ATTEMPT", "ACK / ERROR"],
               [_delivery_row(d, replaced_by, now) for d in trace["deliveries"]])
    else:
        print("deliveries: none (no route or mapping queued it, or its entries were pruned)")


@_command
def trace(args, store, dests) -> int:
    """Where stored messages went: outcome, agenda entries, built messages, deliveries."""
    now = _now()
    targets, referral = _trace_targets(args, store)
    traces = [message_trace(store, summary) for summary in targets]
    bodies: dict[int, str | None] = {}
    if args.data:  # the bodies: in the audit trail before they are shown (no record, no bodies)
        for i in (i for found in traces for i in _traced_ids(found)):
            audit_data_read(store, f"message {i}", action="read-body", message_id=i)
            bodies[i] = _body_text(store, i)
    zd = args.zd.strip() if args.zd is not None else None
    if args.json:
        for found in traces:
            if args.data:
                found["bodies"] = {str(i): bodies[i] for i in _traced_ids(found)}
        if zd is not None:
            out: Any = {"zd_number": zd, "messages": traces,
                        "agenda_entry": _agenda_json(referral, with_data=False) if referral is not None else None}
        else:
            out = traces if args.control_id is not None else traces[0]
        print(json.dumps(out, indent=2, default=str))
        return OK
    if zd is not None:
        if referral is None:
            print(f"ZD-number {zd}: no agenda entry yet")
        else:
            print(f"ZD-number {zd}: agenda entry {referral.id}, {referral.agenda_id} {referral.kind} "
                  f"{referral.state}  (koppel agenda show {referral.id})")
        print(f"{_plural(len(traces), 'message')}, oldest first:")
        print()
    for n, found in enumerate(traces):
        if n:
            print()
        _print_trace(found, now)
        if args.data:
            for i in _traced_ids(found):
                print(f"body of message {i}:")
                for line in (bodies[i] or "(pruned)").replace("\n", "\r").split("\r"):
                    if line:
                        print(f"  {line}")
    return OK


def _traced_ids(found: dict[str, Any]) -> tuple[int, ...]:
    """A trace's message and those built from it."""
    return (found["message"]["id"], *(b["id"] for b in found["built"]))


def _body_text(store, message_id: int) -> str | None:
    """A stored message's text, decoded with its charset (patient data: --data only)."""
    from engine.core.charsets import UnknownCharset, codec_for

    message = store.get_message(message_id)
    if message is None:
        return None
    try:
        codec = codec_for(message.charset or "ASCII")
    except UnknownCharset:  # (refused at receive, stored as received)
        codec = "latin-1"
    return message.raw.decode(codec, errors="replace")


# --------------------------------------------------------------------------- argparse


# --------------------------------------------------------------------------- agendas


def _day(text: str | None, *, end: bool = False) -> float | None:
    """YYYY-MM-DD (Europe/Amsterdam) -> epoch seconds; ``end`` gives the next midnight."""
    if text is None:
        return None
    import datetime as dt
    from zoneinfo import ZoneInfo

    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise _Fail(USAGE, f"not a date (YYYY-MM-DD): {text!r}") from None
    if end:
        day += dt.timedelta(days=1)
    return dt.datetime.combine(day, dt.time(), ZoneInfo("Europe/Amsterdam")).timestamp()


def _entry_data(text: str | None) -> dict[str, Any]:
    """An entry's stored data as shown: without the engine's own bookkeeping (which kind of
    message set each field, see engine.core.agenda.SOURCES; which fields hold a date/time sent
    without a time of day, shown as stored: at the precision sent, ``2016-04``)."""
    from engine.core.agenda import AGENDA, SOURCES
    from engine.core.convert import STORED_DAY_TIMES

    data = json.loads(text) if text else {}
    data.pop(SOURCES, None)
    data.pop(AGENDA, None)  # (the entry's agenda is shown as such)
    data.pop(STORED_DAY_TIMES, None)
    return data


def _agenda_json(record, *, with_data: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": record.id,
        "agenda": record.agenda_id,
        "kind": record.kind,
        "state": record.state,
        "zd_number": record.zd_number,
        "placer_id": record.placer_id,
        "filler_id": record.filler_id,
        "attachments": list(record.attachments),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }
    if with_data:
        out["data"] = _entry_data(record.data)
    return out


def _shown(data: dict[str, Any], *, patient: bool) -> dict[str, Any]:
    """Entry data as `agenda show` prints it: the patient's fields only when asked (--data)."""
    if patient:
        return data
    return {name: ("(hidden: --data shows it)" if is_patient_field(name) else value)
            for name, value in data.items()}


def is_patient_field(name: str) -> bool:
    """A field about the patient, hidden unless asked for: `patient.*`, and `patient_remark`,
    the SRM's free-text remark as entries stored before it was renamed patient.remark hold it."""
    return name.startswith("patient.") or name == "patient_remark"


@_command
def agenda_list(args, store, dests) -> int:
    """Entries, most recently changed first; ids, states and keys only (no patient fields)."""
    from engine.core.agenda import STATES

    if args.state is not None and args.state not in STATES:  # (a typo would look like "none there")
        raise _Fail(USAGE, f"no entry is ever in state {args.state!r} (states: {', '.join(STATES)})")
    records = store.list_agenda_entries(
        agenda_id=args.agenda, state=args.state, since=_day(args.date_from), until=_day(args.date_to, end=True),
        limit=args.limit,
    )
    if not records and args.agenda is not None and not store.list_agenda_entries(agenda_id=args.agenda, limit=1):
        _known_agenda(args.agenda, Path(args.mappings))  # (nothing under it at all, whatever the filters)
    if args.json:
        print(json.dumps([_agenda_json(r, with_data=False) for r in records], indent=2))
        return OK
    if not records:
        print("no agenda entries")
        return OK
    now = _now()
    _table(
        ["ID", "AGENDA", "KIND", "STATE", "ZD-NUMBER", "ATTACH", "UPDATED"],
        [(r.id, r.agenda_id, r.kind, r.state, r.zd_number, len(r.attachments), _when(r.updated_at, now))
         for r in records],
    )
    return OK


def _known_agenda(agenda_id: str, mappings: Path) -> None:
    """An agenda id that selects nothing: a typo (not in agendas.yaml) is said so, never a
    reassuring "no agenda entries". An agenda taken out of the file whose entries are still
    stored lists them; with no readable agendas.yaml nothing can be told."""
    from engine.agendas_config import load_agendas
    from engine.bundle import AGENDAS_FILE
    from engine.config import ConfigError

    path = mappings / AGENDAS_FILE
    try:
        book = load_agendas(path)
    except (ConfigError, OSError):
        sys.stderr.write(f"(agenda {agenda_id!r} not checked: {path} could not be read; --mappings names the directory)\n")
        return
    ids = [agenda.id for agenda in book.agendas]
    if agenda_id not in ids:
        raise _Fail(NOTHING, f"no agenda {agenda_id!r} in {path} and no entries stored under it (agendas: {', '.join(ids)})")


@_command
def agenda_show(args, store, dests) -> int:
    """One entry with its data, history (message ids, actions, changed field names) and attachments."""
    key = args.entry
    record = None
    number = _whole(key)
    if number is not None and 1 <= number <= MAX_ID:  # else a ZD number, never an id
        record = store.get_agenda_entry(number)
    if record is None:
        record = store.find_agenda_entry([f"zd:{key}", f"placer:{key}", f"filler:{key}"])
    if record is None:
        raise _Fail(NOTHING, f"no agenda entry {key}")
    history = store.agenda_history(record.id)
    attachments = store.attachment_infos(record.attachments)  # not their bytes: letters are MBs
    if args.data:  # patient fields: in the audit trail before they are shown (no record, no data)
        audit_data_read(store, f"agenda entry {record.id}")
    if args.json:
        out = _agenda_json(record, with_data=True)
        out["data"] = _shown(out["data"], patient=args.data)
        out["history"] = [
            {"at": h.at, "message_id": h.message_id, "action": h.action, "from": h.from_state, "to": h.to_state,
             "changed": list(h.changed)}
            for h in history
        ]
        out["attachments"] = [
            {"sha256": a.sha256, "media_type": a.media_type, "filename": a.filename, "size": a.size}
            for a in attachments
        ]
        print(json.dumps(out, indent=2, default=str))
        return OK
    now = _now()
    print(f"entry {record.id}  agenda {record.agenda_id}  {record.kind}  {record.state}")
    print(f"zd-number {record.zd_number or '-'}  placer {record.placer_id or '-'}  filler {record.filler_id or '-'}")
    data = _shown(_entry_data(record.data), patient=args.data)
    for name in sorted(data):
        if name == "attachments":
            continue
        print(f"  {name}: {data[name]}")
    print("history:")
    _table(["WHEN", "MESSAGE", "ACTION", "FROM", "TO", "CHANGED"],
           [(_when(h.at, now), h.message_id, h.action, h.from_state, h.to_state, " ".join(h.changed) or "-")
            for h in history])
    if record.attachments:
        print("attachments:")
        _table(["SHA256", "TYPE", "SIZE", "FILE"],
               [(a.sha256[:16], a.media_type, a.size, a.filename) for a in attachments])
    return OK


# --------------------------------------------------------------------------- store maintenance


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Whether SIGTERM or SIGHUP came (a timeout, a stopped systemd timer), to ask while a long
    copy runs, so it stops and leaves no partial copy of the patient data behind."""
    import signal

    stop: list[int] = []
    previous: dict = {}
    try:
        for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # (SIGINT: an operator's Ctrl-C)
            previous[number] = signal.signal(number, lambda number, _frame: stop.append(number))
    except ValueError:  # not the main thread: the signals are the main thread's, nothing to ask
        pass
    try:
        yield lambda: bool(stop)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@_command
def store_backup(args, store, dests) -> int:
    """A consistent copy of the store, taken while the engine runs, then opened and checked.

    The copy holds every message body and agenda entry: who made it, and where, goes into
    the audit trail first (no record, no backup), so the backup holds that record too."""
    from engine.store import RecordAudit, StoreError

    target = Path(args.file)
    if target.exists() or target.is_symlink():
        raise _Fail(NOTHING, f"{target} already exists; a backup never overwrites a file")
    # Before the audit record: a record of a backup "to FILE" that could never be written there
    # would tell an auditor that a copy of every patient's data exists where none does.
    parent = target.absolute().parent
    if not parent.is_dir():
        raise _Fail(NOTHING, f"no directory {parent} for the backup (nothing written)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _Fail(NOTHING, f"cannot write in {parent} (nothing written)")
    reason = _optional_reason(args)
    _write(store, RecordAudit(at=_now(), action="store-backup",
                              reason=f"to {target.resolve()}; koppel CLI, user {_os_user() or '-'}"
                                     + (f"; {reason}" if reason else "")))
    started = time.monotonic()
    with _stop_on_signals() as stopped:  # until the copy is checked: a stop leaves no file
        try:
            size = store.backup(str(target), cancelled=stopped)
        except StoreError:
            if stopped():
                raise _Fail(NOTHING, f"stopped by a signal: no backup written to {target}") from None
            raise
        took = time.monotonic() - started
        try:
            # By its path, not through a store URL: a file name with "?" (or anything a URL
            # would read as options) is a fine backup name, and was reported as "does not open".
            from engine.store.sqlite import SQLiteConfig, SQLiteStore

            copy = SQLiteStore(SQLiteConfig(path=target.resolve()), migrate_schema=False)
        except StoreError as error:
            raise _Fail(NOTHING, f"the backup at {target} does not open: {error}") from None
        try:
            problems = copy.check_integrity()
            version = copy.schema_version()
        except StoreError as error:
            problems, version = [str(error)], None
        finally:
            copy.close()
        if stopped():  # the copy is whole but was not checked to the end: not a backup to trust
            target.unlink(missing_ok=True)
            raise _Fail(NOTHING, f"stopped by a signal: no backup written to {target}")
    if problems:
        sys.stderr.write(f"error: the backup at {target} fails its check:\n")
        for problem in problems[:20]:
            sys.stderr.write(f"  {problem}\n")
        return NOTHING
    print(f"backup written to {target}: {_size(size)}, schema version {version}, in {took:.1f}s; "
          "it opens and passes SQLite's quick_check")
    _log_action("store.backup", size=size)
    return OK


@_command
def store_check(args, store, dests) -> int:
    """SQLite's quick_check (or, with --full, integrity_check and the foreign-key check)."""
    started = time.monotonic()
    problems = store.check_integrity(full=args.full)
    what = "integrity_check and foreign_key_check" if args.full else "quick_check"
    if problems:
        print(f"the store FAILS SQLite's {what}: {_plural(len(problems), 'problem')}")
        for problem in problems[:50]:
            print(f"  {problem}")
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more")
        return NOTHING
    print(f"the store passes SQLite's {what} (schema version {store.schema_version()}, "
          f"{time.monotonic() - started:.1f}s)")
    return OK


def register(subparsers) -> None:
    """Add queue, dead-letters, audit, resend, store and agenda to the ``koppel`` parser."""
    from engine.cli import DEFAULT_STORE

    def common(p, *, channels: bool = True):
        p.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})")
        if channels:
            p.add_argument("--channels", default="channels",
                           help="channel YAML directory to resolve destination names (default ./channels)")
        return p

    dest_help = "destination name, or a queue key HOST:PORT"

    queue = subparsers.add_parser("queue", help="inspect, pause, resume delivery queues")
    qsub = queue.add_subparsers(dest="action", required=True)
    p = common(qsub.add_parser("list", help="one line per queue"))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--all", action="store_true",
                   help="also the retired queues (no destination delivers to them, nothing waits)")
    p.set_defaults(func=queue_list)
    p = common(qsub.add_parser("show", help="the head entries of one queue"))
    p.add_argument("dest", metavar="DEST", help=dest_help)
    p.add_argument("--limit", type=limit_arg, default=20, help="entries to show (default 20)")
    p.set_defaults(func=queue_show)
    for name, func, text in (
        ("pause", queue_pause, "stop sending on a queue"),
        ("resume", queue_resume, "start sending on a paused queue"),
        ("retry-now", queue_retry_now, "make waiting entries due now"),
    ):
        p = common(qsub.add_parser(name, help=text))
        p.add_argument("dest", metavar="DEST", help=dest_help)
        p.add_argument("--reason", default=None, help="why (printed with the result, kept in the audit log)")
        p.set_defaults(func=func)
    p = common(qsub.add_parser("move", help="re-queue the pending entries of an old HOST:PORT where their "
                                            "destinations deliver now"))
    p.add_argument("source", metavar="HOST:PORT", help="the queue nothing delivers any more (see queue.orphaned)")
    p.add_argument("dest", metavar="DEST", nargs="?", default=None,
                   help="for entries whose destination no longer exists: the destination (by name) to take them")
    p.add_argument("--reason", default=None, help="why (kept in the audit log)")
    p.add_argument("--force", action="store_true", help="move even though a destination still uses HOST:PORT")
    p.set_defaults(func=queue_move)

    dead = subparsers.add_parser("dead-letters", help="inspect, replay, drop dead letters")
    dsub = dead.add_subparsers(dest="action", required=True)
    p = common(dsub.add_parser("list", help="dead letters, oldest first"))
    p.add_argument("dest", metavar="DEST", nargs="?", default=None, help=dest_help)
    p.add_argument("--limit", type=limit_arg, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=dead_letters_list)
    p = common(dsub.add_parser("show", help="one dead letter's headers, ACK and reason"), channels=False)
    p.add_argument("id", metavar="ID", type=id_arg, help="queue entry id")
    p.set_defaults(func=dead_letters_show)
    p = common(dsub.add_parser("replay", help="put dead letters back at the queue tail"))
    p.add_argument("ids", metavar="ID", type=id_arg, nargs="*", help="queue entry ids")
    p.add_argument("--all", metavar="DEST", default=None, help="every dead letter of this queue")
    p.set_defaults(func=dead_letters_replay)
    p = common(dsub.add_parser("drop", help="drop dead letters for good, with a reason"), channels=False)
    p.add_argument("ids", metavar="ID", type=id_arg, nargs="+", help="queue entry ids")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    p.set_defaults(func=dead_letters_drop)

    p = common(subparsers.add_parser("audit", help="operator actions, newest first"), channels=False)
    p.add_argument("--limit", type=limit_arg, default=50, help="records to show (default 50)")
    p.set_defaults(func=audit)

    p = common(subparsers.add_parser("trace", help="where a stored message went: mapping, agenda entries, "
                                                   "messages built from it, deliveries"), channels=False)
    p.add_argument("id", metavar="MESSAGE-ID", type=id_arg, nargs="?", default=None, help="stored message id")
    p.add_argument("--control-id", default=None, metavar="MSH-10",
                   help="every stored message with this MSH-10 instead (a resend, or a ZD-number of a letter)")
    p.add_argument("--zd", default=None, metavar="ZD-NUMBER",
                   help="every stored message of this referral (its agenda entry's, those held for it, its letters)")
    p.add_argument("--channel", default=None, help="with --control-id: only this channel's")
    p.add_argument("--limit", type=limit_arg, default=20,
                   help="with --control-id or --zd: at most this many, the newest (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--data", action="store_true",
                   help="also print the message bodies (patient data: kept in the audit trail)")
    p.set_defaults(func=trace)

    p = common(subparsers.add_parser("resend", help="queue a stored message again for a destination"))
    p.add_argument("message_id", metavar="MESSAGE-ID", type=id_arg, help="stored message id")
    p.add_argument("--to", required=True, metavar="DEST", help=dest_help)
    p.add_argument("--mappings", default="mappings",
                   help="mappings directory, to tell which destinations a mapping sends to (default ./mappings)")
    p.add_argument("--as-received", action="store_true",
                   help="queue the message as it was received even if DEST gets this type only as "
                        "mapped (by default refused: resend a message built from it instead)")
    p.set_defaults(func=resend)

    p = common(subparsers.add_parser("reprocess", help="hand messages whose mapping failed to mapping again "
                                                       "(after fixing and reloading the mapping)"))
    p.add_argument("ids", metavar="MESSAGE-ID", type=id_arg, nargs="*", help="stored message ids")
    p.add_argument("--channel", default=None, help="every such message of this channel, oldest first")
    p.add_argument("--outcome", action="append", choices=["error", "filtered"], default=None,
                   help="which mapping outcome to take again (default error; repeat for both; filtered: "
                        "those no route mapped, for a route added since)")
    p.add_argument("--reason", default=None, help="why (kept in the audit log)")
    p.set_defaults(func=reprocess)

    held = subparsers.add_parser("held", help="messages held for an agenda entry that has not come")
    hsub = held.add_subparsers(dest="action", required=True)
    p = common(hsub.add_parser("list", help="held messages, oldest first, and what they wait for"), channels=False)
    p.add_argument("--limit", type=limit_arg, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=held_list)
    p = common(hsub.add_parser("drop", help="give up on held messages whose entry will not come, with a reason"),
               channels=False)
    p.add_argument("ids", metavar="MESSAGE-ID", type=id_arg, nargs="+", help="stored message ids")
    p.add_argument("--reason", required=True, help="why (kept in the audit log)")
    p.set_defaults(func=held_drop)

    storep = subparsers.add_parser("store", help="back up or check the store (safe while the engine runs)")
    ssub = storep.add_subparsers(dest="action", required=True)
    p = common(ssub.add_parser("backup", help="write a consistent copy of the store to a new file, then "
                                              "check the copy"), channels=False)
    p.add_argument("file", metavar="FILE", help="the backup file to create (never overwritten)")
    p.add_argument("--reason", default=None, help="why (kept in the audit log with the OS user)")
    p.set_defaults(func=store_backup)
    p = common(ssub.add_parser("check", help="check the store's file for corruption"), channels=False)
    p.add_argument("--full", action="store_true",
                   help="also compare every index with its table and check foreign keys (slower)")
    p.set_defaults(func=store_check)

    agenda = subparsers.add_parser("agenda", help="agenda entries made from referrals, orders and bookings")
    asub = agenda.add_subparsers(dest="action", required=True)
    p = common(asub.add_parser("list", help="entries, most recently changed first"), channels=False)
    p.add_argument("--agenda", help="agenda id")
    p.add_argument("--mappings", default="mappings",
                   help="mappings directory, to tell an agenda id from a typo (default ./mappings)")
    p.add_argument("--state", help="requested, booked, ordered, scheduled, cancelled, ...")
    p.add_argument("--from", dest="date_from", metavar="DATE", help="changed on or after (YYYY-MM-DD)")
    p.add_argument("--to", dest="date_to", metavar="DATE", help="changed on or before (YYYY-MM-DD)")
    p.add_argument("--limit", type=limit_arg, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=agenda_list)
    p = common(asub.add_parser("show", help="one entry: data, history, attachments"), channels=False)
    p.add_argument("entry", metavar="ENTRY-ID|ZD-NUMBER")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--data", action="store_true",
                   help="also print the patient's fields (name, BSN, address...); hidden by default")
    p.set_defaults(func=agenda_show)
