"""The JSON admin API: look at channels, queues, dead letters, messages and agendas, and steer
queues, on its own endpoint (``koppel run --admin``, default tcp:8465:interface=127.0.0.1).

Every request needs ``Authorization: Bearer <token>`` when a token is configured
(``--admin-token-file`` or ``KOPPEL_ADMIN_TOKEN``). Without a token the API only starts on
a loopback interface (127.0.0.0/8, ::1), and says so in a warning. The contract is
``deploy/openapi/koppel-admin.yaml``.

Listings show headers, ids, states and keys, never message bodies or patient fields. A
message's raw body (``?include=body``) and an agenda entry's data (``?include=data``) are
returned only when asked for, and each such read is logged (``admin.body_read``,
``admin.agenda_data_read``) with the id and the token's fingerprint, never the content.

Changes go through the store's write ops on the engine's group committer, the same ops the
``koppel`` operator commands use, and then the queue's sender looks again at once.
Reads run in the reactor's thread pool by default, so a slow search never delays an ACK.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import ipaddress
import json
import os
from typing import Any, Callable, Mapping

from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.web import resource, server

from engine.log import get_logger, safe_error
from engine.store import PROCESSING_OUTCOMES

TOKEN_ENV = "KOPPEL_ADMIN_TOKEN"
MAX_BODY = 64 * 1024  # request bodies (a drop reason) are small
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


# --------------------------------------------------------------------------- start-up checks


def load_token(path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token from `path` (first line, stripped) or KOPPEL_ADMIN_TOKEN; None if neither.

    ValueError when the file cannot be read or holds no token (a typo must not silently
    switch authentication off).
    """
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the admin token from {path}: {safe_error(error)}") from None
        if not token:
            raise ValueError(f"{path} holds no admin token (the first line is empty)")
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            raise ValueError(f"cannot read the admin token from {path}: {safe_error(error)}") from None
        if mode & 0o007:  # any local user could read (or set) the token and use the API
            raise ValueError(f"{path} is readable or writable by other users: chmod o-rwx {path} "
                             "(e.g. mode 0640, group koppel)")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    return token or None


def _split_endpoint(endpoint: str) -> tuple[str, list[str], dict[str, str]]:
    """A Twisted server endpoint string as (type, positional args, keyword args); `\\:` escapes."""
    parts, current, chars = [], [], iter(endpoint)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    kind, args, kwargs = parts[0].lower(), [], {}
    for part in parts[1:]:
        name, sep, value = part.partition("=")
        if sep:
            kwargs[name] = value
        else:
            args.append(part)
    return kind, args, kwargs


def is_loopback(endpoint: str) -> bool:
    """True if the endpoint only accepts connections from this host.

    tcp/tcp6/ssl with `interface` in 127.0.0.0/8 or ::1, or a unix socket. No interface
    means every interface; host names and other endpoint types count as not loopback.
    """
    kind, _, kwargs = _split_endpoint(endpoint)
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    try:
        return ipaddress.ip_address(kwargs.get("interface", "")).is_loopback
    except ValueError:
        return False


def check_exposure(endpoint: str, token: str | None) -> None:
    """Refuse (ValueError) to serve the admin API beyond loopback without a token."""
    if token is None and not is_loopback(endpoint):
        raise ValueError(
            f"admin API endpoint {endpoint!r} is not on a loopback interface and no admin token is "
            f"configured: give --admin-token-file PATH or set {TOKEN_ENV}, bind it to "
            "interface=127.0.0.1, or switch it off with --admin off"
        )


def fingerprint(token: str | None) -> str:
    """Who called, for audit logs: a short hash of the token (never the token); "none" without one."""
    if token is None:
        return "none"
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An answer other than 2xx: HTTP status, a short machine code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def _not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


# --------------------------------------------------------------------------- parameters


class _Params:
    """Query parameters as text, with typed readers that answer 400 on a bad value."""

    def __init__(self, args: Mapping[bytes, list[bytes]]) -> None:
        self._args = args

    def text(self, name: str) -> str | None:
        values = self._args.get(name.encode("ascii"))
        if not values:
            return None
        try:
            value = values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"parameter {name!r} is not UTF-8") from None
        return value  # "" is a value: an empty filter matches nothing, an empty limit is an error

    def limit(self) -> int:
        text = self.text("limit")
        if text is None:
            return DEFAULT_LIMIT
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise _bad(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        return int(text)

    def time(self, name: str) -> float | None:
        """Epoch seconds, or ISO 8601 (a date or a time without offset is Europe/Amsterdam)."""
        text = self.text(name)
        if text is None:
            return None
        import datetime as dt
        import math
        from zoneinfo import ZoneInfo

        try:
            value = float(text)
        except ValueError:
            pass
        else:
            if not math.isfinite(value):
                raise _bad(f"{name} must be a finite number of epoch seconds or an ISO 8601 time")
            return value
        try:
            stamp = dt.datetime.fromisoformat(text.upper())  # RFC 3339 allows a lower-case t and z
        except ValueError:
            raise _bad(f"{name} must be epoch seconds or an ISO 8601 date/time, e.g. 2024-05-01T08:00:00Z") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=ZoneInfo("Europe/Amsterdam"))
        return stamp.timestamp()

    def include(self, allowed: str) -> bool:
        value = self.text("include")
        if value is None:
            return False
        if value != allowed:
            raise _bad(f"include may only be {allowed!r}")
        return True


def _entry_id(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise _not_found(f"no queue entry {text!r}")
    return int(text)


# --------------------------------------------------------------------------- the resource


# (method, path under /api/ with None for a captured segment, handler, query parameters it takes)
_ROUTES: list[tuple[str, tuple[str | None, ...], str, frozenset[str]]] = [
    ("GET", ("channels",), "channels", frozenset()),
    ("GET", ("queues",), "queues", frozenset()),
    ("GET", ("queues", None), "queue", frozenset({"limit"})),
    ("POST", ("queues", None, "pause"), "pause", frozenset()),
    ("POST", ("queues", None, "resume"), "resume", frozenset()),
    ("POST", ("queues", None, "retry-now"), "retry_now", frozenset()),
    ("GET", ("dead-letters",), "dead_letters", frozenset({"queue", "limit"})),
    ("GET", ("dead-letters", None), "dead_letter", frozenset()),
    ("POST", ("dead-letters", None, "replay"), "replay", frozenset()),
    ("POST", ("dead-letters", None, "drop"), "drop", frozenset()),
    ("GET", ("messages",), "messages",
     frozenset({"channel", "type", "control_id", "zd", "status", "processing", "since", "until", "limit"})),
    ("GET", ("messages", None), "message", frozenset({"include"})),
    ("POST", ("messages", None, "reprocess"), "reprocess", frozenset()),
    ("GET", ("agenda",), "agenda", frozenset({"agenda", "state", "since", "until", "limit"})),
    ("GET", ("agenda", None), "agenda_entry", frozenset({"include"})),
]


def _match(segments: list[str]) -> tuple[list[tuple[str, str, list[str], frozenset[str]]], bool]:
    """Routes whose path fits `segments` as (method, handler, captured, parameters); and whether any did."""
    found = []
    for method, pattern, handler, known in _ROUTES:
        if len(pattern) != len(segments):
            continue
        captured = []
        for want, got in zip(pattern, segments):
            if want is None:
                if not got:
                    break
                captured.append(got)
            elif want != got:
                break
        else:
            found.append((method, handler, captured, known))
    return found, bool(found)


class AdminAPI(resource.Resource):
    """The whole API as one leaf resource: authenticate, route, answer JSON."""

    isLeaf = True

    def __init__(self, engine, *, token: str | None, read: Callable[..., defer.Deferred] | None = None,
                 clock=None, log=None) -> None:
        super().__init__()
        self.engine = engine
        self.token = token
        self._token_bytes = token.encode("utf-8") if token is not None else None
        self._fingerprint = fingerprint(token)
        self.clock = clock or engine.reactor
        self._read = read or self._read_in_thread
        self.log = log or get_logger(component="admin")

    # -- plumbing ------------------------------------------------------------------
    def _read_in_thread(self, fn, *args, **kwargs) -> defer.Deferred:
        reactor = self.engine.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)

    def render(self, request):
        done: list[bool] = []
        request.notifyFinish().addBoth(lambda _: done.append(True))
        d = defer.maybeDeferred(self._handle, request)
        d.addCallbacks(lambda result: self._answer(request, done, *result),
                       lambda failure: self._failed(request, done, failure))
        return server.NOT_DONE_YET

    def _failed(self, request, done, failure) -> None:
        error = failure.value
        if not isinstance(error, ApiError):
            from engine.store import StoreError

            if isinstance(error, StoreError):
                self.log.error("admin.store_failed", error=safe_error(error))
                error = ApiError(503, "store_unavailable", "the store could not answer; try again")
            else:
                self.log.error("admin.failed", error=safe_error(error))
                error = ApiError(500, "internal_error", "the admin API failed; see the engine log")
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        self._answer(request, done, error.status, {"error": error.code, "message": error.message})

    def _answer(self, request, done, status: int, body: Any) -> None:
        if done:  # the client went away
            return
        data = json.dumps(body, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", str(len(data)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(data)
        request.finish()

    def _authorize(self, request) -> None:
        # Not for browsers: a web page could otherwise make a browser on this host send a
        # cross-site POST (a "simple request", no preflight) to pause a queue or drop a dead
        # letter, and without a token a page whose name rebinds to 127.0.0.1 could read bodies.
        if request.getHeader(b"origin") is not None:
            raise ApiError(403, "forbidden", "the admin API does not answer browser (cross-origin) requests")
        if self._token_bytes is None:
            if not _local_host_header(request):
                raise ApiError(403, "forbidden", "without a token the admin API answers only requests "
                                                 "for localhost or a loopback address")
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token_bytes):
            raise ApiError(401, "unauthorized", "a valid bearer token is required",
                           {"WWW-Authenticate": 'Bearer realm="koppel-admin"'})

    def _handle(self, request):
        self._authorize(request)
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            raise _not_found("no such path") from None
        if segments and segments[-1] == "":
            segments.pop()  # a trailing slash
        if segments[:1] != ["api"]:
            raise _not_found("no such path; the API lives under /api/")
        routes, any_path = _match(segments[1:])
        method = request.method.decode("ascii", "replace")
        lookup = "GET" if method == "HEAD" else method
        for route_method, handler, captured, known in routes:
            if route_method == lookup:
                # A misspelt filter must not quietly widen a search to everything.
                unknown = sorted(name.decode("utf-8", "replace") for name in request.args
                                 if name.decode("utf-8", "replace") not in known)
                if unknown:
                    raise _bad(f"unknown parameter {unknown[0]!r}; this path takes "
                               f"{', '.join(sorted(known)) or 'no parameters'}")
                return getattr(self, "_" + handler)(request, _Params(request.args), *captured)
        if any_path:
            allowed = ", ".join(sorted({route[0] for route in routes}))
            raise ApiError(405, "method_not_allowed", f"use {allowed} here", {"Allow": allowed})
        raise _not_found("no such path")

    def _now(self) -> float:
        return self.clock.seconds()

    def _audit_read(self, request, action: str, *, message_id: int | None = None, detail: str | None = None):
        from engine.store import RecordAudit

        caller = self._caller(request)
        reason = f"{detail}; " if detail else ""
        reason += f"admin API, token {caller['token']}, peer {caller['peer']}"
        return self.engine.committer.submit(RecordAudit(at=self._now(), action=action, reason=reason,
                                                        message_id=message_id))

    def _by_api(self) -> str:
        """The audit record's reason for an action taken through this API (no free text)."""
        return f"admin API, token {self._fingerprint}"

    def _caller(self, request) -> dict[str, str]:
        peer = request.getClientAddress() if hasattr(request, "getClientAddress") else None
        return {"token": self._fingerprint, "peer": getattr(peer, "host", None) or "-"}

    # -- channels ----------------------------------------------------------------
    def _channels(self, request, params):
        out = []
        for listener in self.engine.listeners:
            settings = listener.factory.settings
            host = port = None
            if listener.port is not None:
                address = listener.port.getHost()
                host, port = getattr(address, "host", None), getattr(address, "port", None)
            out.append({
                "name": settings.channel,
                "listen": listener.endpoint,
                "bound": listener.port is not None,
                "host": host,
                "port": port,
                "connections": len(listener.factory.receivers),
                "max_connections": settings.max_connections,
            })
        return 200, {"channels": out}

    # -- queues ------------------------------------------------------------------
    def _resolve_queue(self, text: str) -> str:
        """A queue key ("host:port", "[v6]:port") or a configured destination name -> queue key."""
        if ":" in text:
            from engine import operator

            try:
                return operator._queue_key(text)
            except operator._Fail as fail:  # no queue can have that key
                raise _not_found(fail.message) from None
        try:
            return self.engine.config.destination(text).queue_key
        except KeyError:
            raise _not_found(f"no destination or queue {text!r}") from None

    def _queue_row(self, queue: str, stats) -> dict[str, Any]:
        sender = self.engine.senders.get(queue)
        names = sorted(sender.destinations) if sender is not None else []
        return {
            "queue": queue,
            "destinations": names,
            "depth": stats.depth if stats else 0,
            "oldest_enqueued_at": stats.oldest_enqueued_at if stats else None,
            "oldest_age_seconds": stats.oldest_age if stats else None,
            "state": sender.state if sender is not None else "unconfigured",
            "paused": bool(stats and stats.paused),
            "last_error": stats.last_error if stats else None,
            "dead": stats.dead_count if stats else 0,
            "delivered": stats.delivered_count if stats else 0,
        }

    @defer.inlineCallbacks
    def _known_queue(self, text: str):
        """(queue key, stats or None); 404 if neither the store nor the config knows the queue."""
        queue = self._resolve_queue(text)
        all_stats = yield self._read(self.engine.store.queue_stats, self._now())
        stats = next((s for s in all_stats if s.queue == queue), None)
        if stats is None and queue not in self.engine.senders:
            raise _not_found(f"no queue {queue} in the store or in the config")
        return queue, stats

    @defer.inlineCallbacks
    def _queues(self, request, params):
        all_stats = yield self._read(self.engine.store.queue_stats, self._now())
        stats = {s.queue: s for s in all_stats}
        rows = [self._queue_row(q, stats.get(q)) for q in sorted(set(stats) | set(self.engine.senders))]
        return 200, {"queues": rows}

    @defer.inlineCallbacks
    def _queue(self, request, params, text):
        from engine.operator import _entry_json

        limit = params.limit()
        queue, stats = yield self._known_queue(text)
        head = yield self._read(self.engine.store.queue_head, queue, limit, bodies=False)
        row = self._queue_row(queue, stats)
        row["head"] = [_entry_json(e) for e in head]
        return 200, row

    @defer.inlineCallbacks
    def _set_paused(self, request, text, paused: bool):
        from engine.store import SetPaused

        queue, stats = yield self._known_queue(text)
        was = bool(stats and stats.paused)
        if was != paused:
            yield self.engine.committer.submit(SetPaused(queue=queue, paused=paused, at=self._now(),
                                                         reason=self._by_api()))
            self.log.info("admin.queue_paused" if paused else "admin.queue_resumed", queue=queue,
                          **self._caller(request))
        self._poke(queue)
        return 200, {"queue": queue, "paused": paused, "changed": was != paused}

    def _pause(self, request, params, text):
        return self._set_paused(request, text, True)

    def _resume(self, request, params, text):
        return self._set_paused(request, text, False)

    @defer.inlineCallbacks
    def _retry_now(self, request, params, text):
        from engine.store import RetryNow

        queue, stats = yield self._known_queue(text)
        count = yield self.engine.committer.submit(RetryNow(queue=queue, at=self._now(), reason=self._by_api()))
        self.log.info("admin.queue_retry_now", queue=queue, entries=int(count or 0), **self._caller(request))
        self._poke(queue)
        return 200, {"queue": queue, "due_now": int(count or 0), "paused": bool(stats and stats.paused)}

    def _poke(self, queue: str) -> None:
        """Let the queue's sender see the change now rather than on its next poll."""
        sender = self.engine.senders.get(queue)
        if sender is not None:
            sender.poll()

    # -- dead letters --------------------------------------------------------------
    @defer.inlineCallbacks
    def _dead_letters(self, request, params):
        from engine.operator import _entry_json

        limit = params.limit()
        text = params.text("queue")
        queue = None
        if text is not None:  # a mistyped queue key is 404, as a mistyped name is, not an empty list
            queue, _ = yield self._known_queue(text)
        entries = yield self._read(self.engine.store.list_dead_letters, queue, limit)
        return 200, {"dead_letters": [_entry_json(e) for e in entries]}

    @defer.inlineCallbacks
    def _dead_entry(self, text: str):
        entry_id = _entry_id(text)
        entry = yield self._read(self.engine.store.get_entry, entry_id)
        if entry is None:
            raise _not_found(f"no queue entry {entry_id}")
        return entry

    @defer.inlineCallbacks
    def _dead_letter(self, request, params, text):
        from engine.operator import _entry_json

        entry = yield self._dead_entry(text)
        message = yield self._read(self.engine.store.get_message, entry.message_id)
        out = _entry_json(entry)
        out["message_channel"] = message.channel if message is not None else None
        out["message_received_at"] = message.received_at if message is not None else None
        return 200, out

    @defer.inlineCallbacks
    def _replay(self, request, params, text):
        from engine.store import ReplayDeadLetters

        entry = yield self._dead_entry(text)
        if entry.state != "dead":
            raise ApiError(409, "not_dead", f"entry {entry.id} is {entry.state}, not a dead letter")
        if entry.queue not in self.engine.senders:  # as `koppel dead-letters replay` refuses
            raise ApiError(409, "not_delivered", f"no destination delivers queue {entry.queue} any more: a replay "
                                                 "there would never be sent; resend its message to a destination")
        new = yield self.engine.committer.submit(ReplayDeadLetters(entry_ids=(entry.id,), at=self._now()))
        if not new:
            raise ApiError(409, "not_dead", f"entry {entry.id} stopped being a dead letter meanwhile")
        self.log.info("admin.dead_letter_replayed", entry=entry.id, new_entry=new[0], queue=entry.queue,
                      **self._caller(request))
        self._poke(entry.queue)
        return 200, {"entry": entry.id, "queue": entry.queue, "replayed_as": new[0]}

    @defer.inlineCallbacks
    def _drop(self, request, params, text):
        from engine.store import DropDeadLetters

        reason = self._reason(request)
        entry = yield self._dead_entry(text)
        if entry.state != "dead":
            raise ApiError(409, "not_dead", f"entry {entry.id} is {entry.state}, not a dead letter")
        dropped = yield self.engine.committer.submit(
            DropDeadLetters(entry_ids=(entry.id,), reason=reason, at=self._now()))
        if not dropped:
            raise ApiError(409, "not_dead", f"entry {entry.id} stopped being a dead letter meanwhile")
        self.log.info("admin.dead_letter_dropped", entry=entry.id, queue=entry.queue, **self._caller(request))
        return 200, {"entry": entry.id, "queue": entry.queue, "dropped": True, "reason": reason}

    @staticmethod
    def _reason(request, *, required: bool = True) -> str | None:
        content = getattr(request, "content", None)
        raw = content.read(MAX_BODY + 1) if content is not None else b""
        if len(raw) > MAX_BODY:
            raise ApiError(413, "too_large", f"the request body is over {MAX_BODY} bytes")
        try:
            body = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, ValueError):
            raise _bad('the body must be JSON: {"reason": "why"}') from None
        reason = body.get("reason") if isinstance(body, dict) else None
        if reason is None and not required:
            return None
        if not isinstance(reason, str) or not any(char.isalnum() for char in reason):
            raise _bad('give a reason in the JSON body: {"reason": "why"} (it is kept in the audit log)')
        return " ".join(reason.split())[:500]

    # -- messages ------------------------------------------------------------------
    @defer.inlineCallbacks
    def _messages(self, request, params):
        from engine.operator import _agenda_json, message_summary_json

        control_id, zd = params.text("control_id"), params.text("zd")
        status = params.text("status")
        if status not in (None, "accepted", "rejected"):
            raise _bad("status must be accepted or rejected")
        processing = params.text("processing")
        if processing not in (None, *PROCESSING_OUTCOMES):
            raise _bad(f"processing must be one of {', '.join(PROCESSING_OUTCOMES)}")
        query = dict(
            channel=params.text("channel"), message_type=params.text("type"), control_id=control_id or zd,
            since=params.time("since"), until=params.time("until"), status=status, processing=processing,
            limit=params.limit(),
        )
        if control_id is not None and zd is not None and control_id != zd:
            rows = []  # filters combine with AND: one MSH-10 cannot be two values
        else:
            rows = yield self._read(self.engine.store.list_messages, **query)
        entries = []
        if zd is not None:
            entry = yield self._read(self.engine.store.find_agenda_entry, [f"zd:{zd}"])
            if entry is not None:
                entries.append(_agenda_json(entry, with_data=False))
                if control_id is None:  # the messages that made the entry: an SRM has its ZD-number
                    # in ARQ-1, not in MSH-10 as the ORU has
                    history = yield self._read(self.engine.store.agenda_history, entry.id)
                    query.update(control_id=None, message_ids=[h.message_id for h in history])
                    more = yield self._read(self.engine.store.list_messages, **query)
                    seen = {m.id for m in rows}
                    rows = sorted([*rows, *(m for m in more if m.id not in seen)], key=lambda m: -m.id)
                    rows = rows[: query["limit"]]
        out: dict[str, Any] = {"messages": [message_summary_json(m) for m in rows]}
        if zd is not None:
            out["agenda_entries"] = entries
        return 200, out

    @defer.inlineCallbacks
    def _message(self, request, params, text):
        from engine.operator import _ack_summary, message_trace

        with_body = params.include("body")
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise _not_found(f"no message {text!r}")
        m = yield self._read(self.engine.store.get_message, int(text))
        if m is None:
            raise _not_found(f"no message {text} (never stored, or pruned)")
        summaries = yield self._read(self.engine.store.list_messages, message_ids=[m.id], limit=1)
        trace = (yield self._read(message_trace, self.engine.store, summaries[0])) if summaries else None
        out = {
            "id": m.id, "channel": m.channel, "peer": m.peer, "received_at": m.received_at,
            "control_id": m.control_id, "sender": m.sender, "type": m.message_type,
            "structure": m.structure, "version": m.version, "processing_id": m.processing_id,
            "charset": m.charset, "size": m.size, "status": m.status, "ack_code": m.ack_code,
            "ack": _ack_summary(m.ack), "error": m.error, "duplicates": m.duplicate_count,
            "last_duplicate_at": m.last_duplicate_at,
        }
        if trace is not None:  # where it went, as `koppel trace` shows it
            if trace["message"]["origin_id"] is not None:  # built by a mapping: never received nor answered
                out.update(status="built", ack_code=None, ack=None)
            out.update(processing=trace["message"]["processing"],
                       processing_detail=trace["message"]["processing_detail"],
                       origin_id=trace["message"]["origin_id"], agenda_entries=trace["agenda_entries"],
                       built=trace["built"], built_search_complete=trace["built_search_complete"],
                       deliveries=trace["deliveries"])
        if with_body:
            # Patient data: in the store's audit trail first (koppel audit), whatever the log
            # level; no record, no body (a store error answers 503).
            yield self._audit_read(request, "read-body", message_id=m.id)
            self.log.warning("admin.body_read", message_id=m.id, size=m.size, **self._caller(request))
            out["body"] = base64.b64encode(m.raw).decode("ascii")
            out["body_encoding"] = "base64"
        return 200, out

    @defer.inlineCallbacks
    def _reprocess(self, request, params, text):
        """As `koppel reprocess ID` (either outcome: the operator names the one message), and
        mapped at once when this process maps, not at the next resume."""
        from engine.operator import _why_not_reprocessable
        from engine.store import REPROCESSABLE, Reprocess

        reason = self._reason(request, required=False)
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise _not_found(f"no message {text!r}")
        rows = yield self._read(self.engine.store.list_messages, message_ids=[int(text)], limit=1)
        if not rows:
            raise _not_found(f"no message {text} (never stored, or pruned)")
        message = rows[0]
        why = _why_not_reprocessable(message, REPROCESSABLE)
        if why is None and message.channel not in {c.name for c in self.engine.config.channels}:
            why = f"message {message.id}'s channel {message.channel} is not configured: it would be an error again"
        if why is not None:
            raise ApiError(409, "not_reprocessable", why)
        done = yield self.engine.committer.submit(
            Reprocess(message_ids=(message.id,), outcomes=REPROCESSABLE, at=self._now(), reason=reason))
        if not done:
            raise ApiError(409, "not_reprocessable", f"message {message.id} changed meanwhile; look again")
        now = self.engine.map_again(message.id)
        self.log.info("admin.message_reprocessed", message_id=message.id, was=message.processing,
                      channel=message.channel, **self._caller(request))
        return 200, {"message": message.id, "was": message.processing, "processing": "pending",
                     "mapping": "started" if now else "by the receiving process, within a minute"}

    # -- agendas -------------------------------------------------------------------
    @defer.inlineCallbacks
    def _agenda(self, request, params):
        from engine.operator import _agenda_json

        rows = yield self._read(
            self.engine.store.list_agenda_entries, agenda_id=params.text("agenda"), state=params.text("state"),
            since=params.time("since"), until=params.time("until"), limit=params.limit(),
        )
        return 200, {"agenda_entries": [_agenda_json(r, with_data=False) for r in rows]}

    @defer.inlineCallbacks
    def _agenda_entry(self, request, params, key):
        from engine.operator import _agenda_json

        with_data = params.include("data")
        store = self.engine.store
        record = None
        if (key.isascii() and key.isdigit()) and len(key) <= 18:
            record = yield self._read(store.get_agenda_entry, int(key))
        if record is None:
            record = yield self._read(store.find_agenda_entry, [f"zd:{key}", f"placer:{key}", f"filler:{key}"])
        if record is None:
            raise _not_found(f"no agenda entry {key!r}")
        history = yield self._read(store.agenda_history, record.id)
        infos = yield self._read(store.attachment_infos, record.attachments)  # not their bytes
        attachments = [{"sha256": a.sha256, "media_type": a.media_type, "filename": a.filename, "size": a.size}
                       for a in infos]
        out = _agenda_json(record, with_data=with_data)
        out["history"] = [
            {"at": h.at, "message_id": h.message_id, "action": h.action, "from": h.from_state,
             "to": h.to_state, "changed": list(h.changed)}
            for h in history
        ]
        out["attachments"] = attachments
        if with_data:
            yield self._audit_read(request, "read-agenda-data", detail=f"agenda entry {record.id}")
            self.log.warning("admin.agenda_data_read", entry=record.id, **self._caller(request))
        return 200, out


def _local_host_header(request) -> bool:
    """Whether the Host header names this host (localhost or a loopback address), or is absent.
    A unix socket cannot be reached by a browser, so any Host is fine there."""
    address = request.getHost() if hasattr(request, "getHost") else None
    if address is not None and not hasattr(address, "host"):
        return True
    header = request.getHeader(b"host")
    if header is None:
        return True
    host = header.decode("latin-1").strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- serving


class _AdminRequest(server.Request):
    """A request whose body is held in memory and refused past MAX_BODY as it arrives.

    twisted.web spools any body over 100 kB to a temporary file, without a limit, before the
    resource (and so the token check) sees the request: one unauthenticated POST could fill
    the disk. Here the connection is answered 413 and closed instead.
    """

    _body_bytes = 0
    _too_large = False

    def gotLength(self, length):
        self.content = io.BytesIO()
        if length is not None and length > MAX_BODY:
            self._refuse_body()

    def handleContentChunk(self, data):
        if self._too_large:
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY:
            self._refuse_body()
            return
        self.content.write(data)

    def process(self):
        if self._too_large:  # already answered; the connection is closing
            return
        super().process()

    def _refuse_body(self) -> None:
        self._too_large = True
        self.content = io.BytesIO()
        body = json.dumps({"error": "too_large", "message": f"the request body is over {MAX_BODY} bytes"}).encode()
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.channel.transport.loseConnection()


def site_for(engine, *, token: str | None, read=None, clock=None, log=None) -> server.Site:
    site = server.Site(AdminAPI(engine, token=token, read=read, clock=clock, log=log), requestFactory=_AdminRequest)
    site.noisy = False
    site.displayTracebacks = False
    return site


def start_admin(reactor, endpoint: str, engine, *, token: str | None) -> defer.Deferred:
    """Listen on `endpoint`; fires with the port. ValueError first if the exposure is unsafe."""
    check_exposure(endpoint, token)
    log = get_logger(component="admin")
    if token is None:
        log.warning("admin.no_token", endpoint=endpoint,
                    hint=f"anyone on this host can use the admin API; set {TOKEN_ENV} or --admin-token-file")
    d = serverFromString(reactor, endpoint).listen(site_for(engine, token=token, log=log))

    def bound(port):
        address = port.getHost()
        log.info("admin.started", host=getattr(address, "host", None), port=getattr(address, "port", None),
                 auth="bearer" if token is not None else "none")
        return port

    return d.addCallback(bound)
