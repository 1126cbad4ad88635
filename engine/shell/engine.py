"""Wiring: config + store + listeners + metrics into one service tree.

Start order: store (writer thread) -> HTTP (metrics, health) -> listeners.
Stop order is the reverse and sequential: stop accepting, let every connection
write the ACKs of what it already received, commit what is queued, close the store.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from dataclasses import replace

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString

from engine.config import ChannelConfig, EngineConfig
from engine.core.errors import ErrorCode, Rejection
from engine.core.header import read_header
from engine.core.intake import STORE_FAILED, AcceptRules, Assessment, as_refused
from engine.core.routing import parsed_once, routes_taking
from engine.log import get_logger, safe_error
from engine.metrics import Metrics
from engine.shell.committer import Checkpointer, GroupCommitter, Pruner
from engine.shell.listener import (
    MLLPListenerFactory,
    ReceiveSettings,
    Routing,
    default_control_ids,
)
from engine.shell.processor import Outcome, Processor, Work
from engine.shell.roles import (
    ALL,
    DELIVER,
    RECEIVE,
    ROLES,
    RemoteQueue,
    StoreWatcher,
    delivers,
    receives,
)
from engine.shell.sender import QueueSender
from engine.store import (
    PENDING,
    UNANSWERED,
    Enqueue,
    Heartbeat,
    QueueTarget,
    SetProcessing,
)

HEARTBEAT_INTERVAL = 5.0
# How often a running engine looks for hand-offs that did not commit (a store error), and how
# old such a message must be: younger ones may still be on their way through the committer.
RESUME_INTERVAL = 60.0
# The periodic resume hands on this many messages at a time, the next page once those are mapped:
# after `koppel reprocess --channel` thousands may wait, and their bodies (letters of MBs) were
# read and queued in one reactor turn.
RESUME_PAGE = 100
RESUME_PAGE_BYTES = 16 * 1024 * 1024  # and about this many bytes of bodies per page read
ORPHAN_INTERVAL = 30.0  # how often the deliverer looks for queues no destination uses


FILTERED = Rejection(
    ack_code="AR",
    error_code=ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
    text="no route on this channel takes this message",
)


def receive_settings(
    channel: ChannelConfig, config: EngineConfig, senders=None, processor=None, *, committer=None, metrics=None,
    log=None, handing: set[int] | None = None,
) -> ReceiveSettings:
    """``handing``: ids of messages whose on-map forward or refusal is on its way through the
    committer (the processor knows its own), so the engine's periodic resume leaves them be."""
    source = channel.source
    handing = set() if handing is None else handing
    targets_of = {  # by route (the channel's routes live as long as this closure)
        id(route): tuple(QueueTarget(queue=config.destination(name).queue_key, destination=name) for name in route.to)
        for route in channel.routes
    }

    def routing(assessment, raw: bytes) -> Routing:
        """Where a message goes: its raw forwards and the route that maps it, decided once per
        message (at receive, or at a resume) and kept with it, so a reload between the insert
        and the hand-off cannot mix two decisions; the message parsed at most once for it."""
        header = assessment.header
        taken = routes_taking(channel.routes, header.message_type, header.trigger, parsed_once(raw, header.codec))
        chosen: list[QueueTarget] = []
        for route in taken:
            chosen.extend(t for t in targets_of[id(route)] if t not in chosen)
        mapped = next((route for route in taken if route.map), None) if processor is not None else None
        return Routing(tuple(chosen), mapped)

    senders = senders or {}

    def queue_full(targets) -> bool:
        return any(
            (sender := senders.get(t.queue)) is not None and sender.depth >= sender.max_queue for t in targets
        )

    def on_queued(targets) -> None:
        for t in targets:
            sender = senders.get(t.queue)
            if sender is not None:
                sender.enqueued()

    filtered = as_refused(FILTERED, channel.ack.rejected)
    filtered_count = metrics.filtered_total.labels(channel.name) if metrics is not None else None
    if metrics is not None and any(route.map for route in channel.routes):  # shown as 0 from the start, so a dashboard's rate() has a series
        metrics.agenda_fallback_total.labels(channel.name)
    on_map = channel.ack.mode == "on-map"
    log = log or get_logger(channel=channel.name)

    def to_processor(message_id, header, raw, route, forward, nak, late=False):
        # A resumed message waits without its body (the processor reads it when it maps it): after a
        # crash, thousands of letters queued for mapping at start must not all be in memory at once.
        return processor.submit(Work(
            message_id=message_id, channel=channel.name, mapping=route.map, raw=None if late else raw,
            size=len(raw), codec=header.codec, forward=forward, nak=nak, late=late,
        ))

    def handed(d, message_id):
        handing.add(message_id)

        def done(result):
            handing.discard(message_id)
            return result

        return d.addBoth(done)

    def forward_raw(message_id, forward, at):
        """on-map, nothing to map: queue the raw forwards now (and clear 'unanswered' with them)."""
        d = committer.submit_many([Enqueue(message_id=message_id, targets=forward, at=at, audit=False),
                                   SetProcessing(message_id=message_id, outcome="forwarded")])
        d = handed(d, message_id)
        return d.addCallback(lambda _: (on_queued(forward), Outcome(status="forwarded", detail=""))[1])

    def filter_on_map(message_id, header, nak):
        """on-map, nothing takes it: it is answered AR after all, and stored so."""
        detail = _filtered_detail(header)
        code, ack = nak(filtered)
        d = committer.submit(SetProcessing(message_id=message_id, outcome="filtered", detail=detail,
                                           ack_code=code, ack=ack))
        d = handed(d, message_id)
        return d.addCallback(lambda _: Outcome(status="filtered", detail=detail, rejection=filtered,
                                               ack_code=code, ack=ack))

    def hand_on(message_id, header, forward, raw, received_at, nak, answered, route, late=False):
        """The one hand-off, after the insert committed or when resumed (``late``): to the mapping,
        the raw forwards of an unanswered (on-map) message, or its refusal. None when there is
        nothing left to do (an answered message no route maps)."""
        if route is not None:
            return to_processor(message_id, header, raw, route, forward, None if answered else nak, late)
        if forward:
            return forward_raw(message_id, forward, received_at)
        if not answered:
            return filter_on_map(message_id, header, nak)
        return None

    def on_stored(message_id, assessment, message, nak, routed: Routing):
        """Hand a committed message on: to its mapping, or count it as filtered; ``routed``, as
        decided when it was received.

        Returns a Deferred of the Outcome when an on-map channel must wait for it."""
        header = assessment.header
        # as it was stored (a reload may have changed the ack mode since): an UNANSWERED
        # message's forwards were not queued in the insert and its answer is not sent yet
        answered = message.processing != UNANSWERED
        forward = () if answered else routed.targets
        route = routed.route
        if route is None and not forward and not message.targets:
            if filtered_count is not None:
                filtered_count.inc()
            log.info("message.filtered", message_id=message_id, type=message.message_type)
        if route is None and answered:  # raw forwards queued, or filtered, in the insert already
            return None
        return hand_on(message_id, header, forward, message.raw, message.received_at, nak, answered, route)

    def resume(message_id, assessment, raw, received_at, nak, answered):
        """A message stored PENDING/UNANSWERED whose hand-off never committed (the engine
        stopped in between, or the commit failed): do it now. ``answered`` is how it was
        stored, whatever the channel's ack mode is today: an UNANSWERED (on-map) message's
        raw forwards were not queued and its answer was never sent, so its outcome (and a
        NAK) is stored for the sender's resend. If the config no longer maps it: filtered."""
        header = assessment.header
        routed = routing(assessment, raw)
        forward = () if answered else routed.targets
        d = hand_on(message_id, header, forward, raw, received_at, nak, answered, routed.route, late=True)
        if d is None:
            d = committer.submit(SetProcessing(message_id=message_id, outcome="filtered",
                                               detail=_filtered_detail(header)))
        return d

    def receive_marks(assessment, chosen_targets, routed: Routing) -> dict:
        if not assessment.accepted:
            return {}
        header = assessment.header
        # handed on after the commit (mapped; on-map: answered only then): resumed at start
        # if the engine stops before that hand-off commits
        if on_map:
            return {"processing": UNANSWERED}
        if routed.route is not None:
            return {"processing": PENDING}
        if chosen_targets:
            return {}
        return {"processing": "filtered", "processing_detail": _filtered_detail(header)}

    failure = STORE_FAILED
    if channel.ack.store_failure != failure.ack_code:
        failure = replace(STORE_FAILED, ack_code=channel.ack.store_failure)
    return ReceiveSettings(
        channel=channel.name,
        rules=AcceptRules(
            types=channel.accept.types,
            versions=channel.accept.versions,
            processing_ids=channel.accept.processing_ids,
            rejected_code=channel.ack.rejected,
        ),
        default_charset=source.charset,
        max_message_bytes=source.max_message_bytes,
        lenient_framing=source.lenient_framing,
        keepalive=source.keepalive,
        idle_timeout=source.idle_timeout,
        frame_timeout=source.frame_timeout,
        allow=source.allow,
        max_connections=source.max_connections,
        duplicate_window=channel.duplicate_window,
        store_failure=failure,
        routing=routing,
        queue_full=queue_full,
        on_queued=on_queued,
        on_stored=on_stored,
        ack_mode=channel.ack.mode,
        always_answer=channel.ack.accept_ack == "always",
        receive_marks=receive_marks,
        resume=resume,
    )


def _config_changes(old: EngineConfig, new: EngineConfig) -> dict[str, list[str]]:
    """Names of the channels and destinations a reload adds, removes and changes (for its log line)."""
    def diff(kind: str, before: dict, after: dict) -> dict[str, list[str]]:
        return {
            f"{kind}_added": sorted(after.keys() - before.keys()),
            f"{kind}_removed": sorted(before.keys() - after.keys()),
            f"{kind}_changed": sorted(n for n in before.keys() & after.keys() if before[n] != after[n]),
        }

    def channels(config: EngineConfig) -> dict:
        return {c.name: replace(c, marks=(), file=None) for c in config.channels}  # (not where it is written)

    return {**diff("channels", channels(old), channels(new)),
            **diff("destinations", {d.name: d for d in old.destinations}, {d.name: d for d in new.destinations})}


def _filtered_detail(header) -> str:
    return f"no route takes {header.type_and_trigger or 'this message'}"


class ListenerService(service.Service):
    """One channel's MLLP listener (an endpoint string, so TLS is configuration)."""

    def __init__(self, reactor, endpoint: str, factory: MLLPListenerFactory, metrics: Metrics,
                 grace: float | None = None) -> None:
        self.setName(f"listener:{factory.settings.channel}")
        self.reactor = reactor
        self.endpoint = endpoint
        self.factory = factory
        self.metrics = metrics
        self.grace = grace  # how long a stop waits for a connection's last ACKs before aborting it
        self.port = None
        self.retired = False  # replaced or removed by a reload: koppel_listener_up is no longer ours
        # Fires with the port, or fails once the failure is logged. Whoever started the
        # service waits on it (start-up fails, a reload carries on): MultiService ignores
        # what startService returns, so the failure would otherwise go unhandled.
        self.started: defer.Deferred = defer.succeed(None)
        self.unbound: defer.Deferred = defer.succeed(None)  # fires once a stop has closed the port

    def startService(self) -> defer.Deferred:
        service.Service.startService(self)
        d = defer.maybeDeferred(lambda: serverFromString(self.reactor, self.endpoint).listen(self.factory))
        channel = self.factory.settings.channel

        def bound(port):
            self.port = port
            self.metrics.listener_up.labels(channel).set(1)
            address = port.getHost()
            self.factory.log.info("listener.started", host=address.host, port=address.port)
            return port

        def failed(failure):
            self.metrics.listener_up.labels(channel).set(0)
            # (a bind or TLS error names the address or the file, never a message)
            self.factory.log.error("listener.start_failed", listen=self.endpoint, error=failure.getErrorMessage()[:200])
            return failure

        self.started = d.addCallbacks(bound, failed)
        return self.started

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self.port is not None:
            stopped = defer.maybeDeferred(self.port.stopListening)
            self.unbound = unbound = defer.Deferred()
            stopped.addBoth(lambda result: (unbound.callback(None), result)[1])
            yield stopped
            if not self.retired:  # else the new listener's 1, or no series at all, stands
                self.metrics.listener_up.labels(self.factory.settings.channel).set(0)
        yield self.factory.drain(self.grace)


class Engine(service.MultiService):
    """The running engine: store writer, HTTP endpoint and one listener per channel."""

    def __init__(self, reactor, config: EngineConfig, store, *, metrics: Metrics | None = None,
                 http_endpoint: str | None = None, drain_timeout: float = 10.0,
                 retention: float | None = 30 * 86400.0, mappings=None, book=None,
                 admin_endpoint: str | None = None, admin_token: str | None = None, role: str = ALL) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        self.role = role
        if admin_endpoint:
            from engine.shell.admin import check_exposure

            check_exposure(admin_endpoint, admin_token)  # ValueError: no token on a non-loopback interface
        self.reactor = reactor
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        self.log = get_logger()
        self.drain_timeout = drain_timeout
        # as long as the store's own wait for a lock (busy_timeout in the store URL)
        busy_limit = getattr(getattr(store, "config", None), "busy_timeout", 5.0)
        self.committer = GroupCommitter(store, clock=reactor, metrics=self.metrics, log=self.log,
                                        busy_limit=busy_limit)
        self.checkpointer = Checkpointer(store, reactor=reactor, log=self.log, commits=lambda: self.committer.commits)
        self.retention = retention
        self._check_retention(config)
        self.pruner = None
        if retention and delivers(role):  # pruning follows delivery: the deliverer knows what is done
            self.pruner = Pruner(self.committer, reactor=reactor, retention=retention, log=self.log)
        self.control_ids = default_control_ids(time.time(), int.from_bytes(os.urandom(4), "big"))
        self.senders: dict[str, QueueSender | RemoteQueue] = {}
        # receive-only: queue depths from the store, for the queue-full check (RemoteQueue);
        # deliver-only: wake the senders when the receiving process commits (StoreWatcher)
        self._depths = None
        self._orphan_check = None
        self._orphans: set[str] = set()  # queues with pending entries that no destination uses
        self._polled_at = float("-inf")
        self._handing: set[int] = set()  # on-map hand-offs in the committer (see receive_settings)
        self._unbinding: set[defer.Deferred] = set()  # retired listeners' ports not closed yet
        self._retiring: dict[str, defer.Deferred] = {}  # queue -> fires once its dropped sender stopped
        self._watcher = StoreWatcher(store, clock=reactor, on_change=self._wake_all, log=self.log) \
            if role == DELIVER else None
        self.processor = None
        self.listeners: list[ListenerService] = []
        self._apply(config, mappings, book, starting=True)
        self.http_endpoint = http_endpoint
        self.http_port = None
        self.admin_endpoint = admin_endpoint
        self.admin_token = admin_token
        self.admin_port = None
        self.ready = False

    def claim(self) -> None:
        """StoreError if another process already does this role's work on the store (idempotent;
        `koppel run` claims before it writes its pid file, so a refused second engine never
        touches the running one's)."""
        if receives(self.role):
            self.store.claim("receive")
        if delivers(self.role):
            self.store.claim("deliver")

    def startService(self):
        self.claim()  # StoreError (the start fails, exit 1) if another process does this role's work
        service.Service.startService(self)
        self.committer.start()
        self.checkpointer.start()
        if self.pruner is not None:
            self.pruner.start()
        if self._watcher is not None:  # before the senders' first reads: nothing falls in between
            self._watcher.start()
        for sender in self.senders.values():
            sender.start()
        from twisted.internet import task

        self._resume_mapping()
        if receives(self.role):
            rounds = itertools.count()  # the first, now: whatever its age
            self._resumer = task.LoopingCall(lambda: self._resume_late(at_start=next(rounds) == 0))
            self._resumer.clock = self.reactor
            # now: what an operator handed to mapping again while the engine was stopped (left
            # out above: thousands of letters must not all be read at once), a page at a time
            self._resumer.start(RESUME_INTERVAL, now=True)
        if delivers(self.role):
            self._orphan_check = task.LoopingCall(self._check_orphans)
            self._orphan_check.clock = self.reactor
            self._orphan_check.start(ORPHAN_INTERVAL, now=True)
        if self.role == RECEIVE:
            self._depths = task.LoopingCall(self._refresh_depths)
            self._depths.clock = self.reactor
            self._depths.start(1.0, now=True)
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=True)
        if self.processor is not None:
            self._gauges = task.LoopingCall(self.processor.refresh_gauges)
            self._gauges.clock = self.reactor
            self._gauges.start(15.0, now=True)
        waits = []
        if self.http_endpoint:
            from engine.shell.http import start_http

            waits.append(start_http(self.reactor, self.http_endpoint, self).addCallback(self._http_bound))
        if self.admin_endpoint:
            from engine.shell.admin import start_admin

            waits.append(start_admin(self.reactor, self.admin_endpoint, self, token=self.admin_token)
                         .addCallback(lambda port: setattr(self, "admin_port", port)))
        for listener in self.listeners:
            listener.setServiceParent(self)
            waits.append(listener.started)  # a channel that cannot listen fails the start
        d = defer.gatherResults(waits + [defer.maybeDeferred(lambda: None)], consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure if isinstance(failure.value, defer.FirstError)
                     else failure)

        def all_bound(_):
            self.ready = all(listener.port is not None for listener in self.listeners)
            self.log.info("engine.started", channels=len(self.listeners), role=self.role)

        return d.addCallback(all_bound)

    def _apply(self, config: EngineConfig, mappings, book, *, starting: bool) -> list:
        """Build (or, on reload, bring in line) senders, processor and listeners for a config.

        Returns Deferreds of what is being stopped (removed listeners and senders).
        """
        reactor, store = self.reactor, self.store
        stopping = []
        by_queue: dict[str, dict] = {}
        for destination in config.destinations:
            by_queue.setdefault(destination.queue_key, {})[destination.name] = destination
        for queue in list(self.senders):
            if queue not in by_queue:
                if delivers(self.role):  # its series go; entries still waiting make it an orphan
                    stopped = self._retire_sender(queue)
                    stopped.addBoth(self._forget_queue, queue)
                else:  # the receiver's copy of its oldest age (see _refresh_depths) goes too
                    stopped = defer.maybeDeferred(self.senders.pop(queue).stop)
                    self.metrics.queue_oldest_age_seconds.remove(queue)
                stopping.append(stopped)
        for queue, destinations in by_queue.items():
            sender = self.senders.get(queue)
            if sender is not None:
                sender.update(destinations)
                continue
            if not delivers(self.role):
                self.senders[queue] = RemoteQueue(queue, destinations)
                continue
            sender = self.senders[queue] = QueueSender(
                queue, destinations, store=store, committer=self.committer, reactor=reactor,
                metrics=self.metrics, log=get_logger(queue=queue),
            )
            if not starting:
                self._start_sender(queue, sender)
        destinations_by_name = {d.name: d for d in config.destinations}
        if not receives(self.role):
            self.config = config
            return stopping
        if mappings is not None and book is not None:
            if self.processor is None:
                self.processor = Processor(
                    mappings=mappings, book=book, store=store, committer=self.committer, clock=reactor,
                    metrics=self.metrics, destinations=destinations_by_name,
                    control_ids=self.control_ids, on_queued=self._wake_senders, log=get_logger(),
                )
            else:  # messages already queued for mapping are mapped with the new rules
                self.processor.mappings, self.processor.book = mappings, book
                self.processor.destinations = destinations_by_name
        running = {listener.factory.settings.channel: listener for listener in self.listeners}
        wanted = {channel.name: channel for channel in config.channels}
        new = []
        for name, listener in running.items():
            channel = wanted.get(name)
            if channel is None or channel.source.listen != listener.endpoint:
                self.listeners.remove(listener)
                listener.retired = True
                listener.factory.retired = True  # its draining connections leave the gauge to the new one
                # (one a reload just made may still wait to bind: it has no parent yet)
                stopped = defer.maybeDeferred(listener.disownServiceParent) if listener.parent else defer.succeed(None)
                if not listener.unbound.called:
                    self._unbinding.add(listener.unbound)
                    listener.unbound.addBoth(lambda result, d=listener.unbound: (self._unbinding.discard(d), result)[1])
                if channel is None:  # removed on purpose: no listener_up 0 left to page on
                    stopped.addBoth(self._forget_channel, name)
                stopping.append(stopped)
        for channel in config.channels:
            settings = receive_settings(channel, config, self.senders, self.processor, committer=self.committer,
                                        handing=self._handing,
                                        metrics=self.metrics, log=self.log)
            listener = running.get(channel.name)
            if listener is not None and listener in self.listeners:
                listener.factory.update(settings)  # open connections keep going, with the new rules
                continue
            factory = MLLPListenerFactory(settings, committer=self.committer, metrics=self.metrics,
                                          clock=reactor, control_ids=self.control_ids)
            listener = ListenerService(reactor, channel.source.listen, factory, self.metrics, grace=self.drain_timeout)
            self.listeners.append(listener)
            if not starting:
                new.append(listener)
        # New listeners bind once the retired ones have closed their ports: a channel whose listen
        # options changed on the same port (or a port passed to another channel) would else find
        # it still in use, and stay down until a restart. (reload() waits for `stopping` first.)
        def bind(_=None):
            for listener in new:
                if listener in self.listeners:  # not replaced meanwhile by a later reload
                    listener.setServiceParent(self)

        # A port a listener retired by an earlier reload is still closing counts too: a channel
        # removed (or moved) by one reload and given its port back by the next must wait for it.
        unbound = [d for d in self._unbinding if not d.called]
        if unbound:
            defer.DeferredList(unbound).addCallback(bind)
        else:
            bind()
        self.config = config
        return stopping

    def _retire_sender(self, queue: str) -> defer.Deferred:
        """Stop a queue's sender that a reload dropped. Until it has stopped (its message in
        flight answered) and its delivered/dead-letter marks are committed, no new sender may
        read that queue: a reload that takes the queue back (an endpoint moved and put back)
        would else send the entry in flight again, beside the first copy, and the ones after it."""
        sender = self.senders.pop(queue)
        stopped = defer.maybeDeferred(sender.stop)
        earlier = self._retiring.get(queue)  # (an older sender of this queue may still be stopping)
        both = defer.DeferredList([stopped] + ([earlier] if earlier is not None else []), consumeErrors=True)
        gone: defer.Deferred = defer.Deferred()
        self._retiring[queue] = gone

        def settled(_):
            try:
                self.committer.flush()  # its last marks, before anyone reads the queue again
            except Exception as error:  # noqa: BLE001 - the next commit takes them
                self.log.warning("queue.flush_failed", queue=queue, error=safe_error(error))
            if self._retiring.get(queue) is gone:
                del self._retiring[queue]
            gone.callback(None)

        both.addCallback(settled)
        return stopped

    def _start_sender(self, queue: str, sender) -> None:
        """Start a sender a reload added, once an earlier sender of its queue has stopped."""
        retiring = self._retiring.get(queue)
        if retiring is None:
            sender.start()
            return

        def start(result):
            if self.running and self.senders.get(queue) is sender:  # not dropped again meanwhile
                sender.start()
            return result

        retiring.addCallback(start)

    def _check_retention(self, config: EngineConfig) -> None:
        longest_window = max((c.duplicate_window for c in config.channels), default=0.0)
        if self.retention is not None and self.retention < longest_window:
            raise ValueError(
                "retention must be at least the longest duplicate window, or a retried message "
                "would be stored again after its first copy was pruned"
            )

    @defer.inlineCallbacks
    def reload(self, bundle):
        """Apply a config that already loaded and checked; unchanged listeners keep their connections.
        A duplicate window longer than the retention is refused (ValueError), the running config kept.
        So is a reload while the engine stops (or before it started): the stop has already
        collected the listeners and senders it stops, and one a reload started then would run on
        under a closing committer and store."""
        if not self.running:
            raise RuntimeError("the engine is stopping (or not started yet); the config was not reloaded")
        self._check_retention(bundle.config)
        changes = _config_changes(self.config, bundle.config)
        stopping = self._apply(bundle.config, bundle.mappings, bundle.book, starting=False)
        yield defer.DeferredList(stopping)
        if self._orphan_check is not None and self._orphan_check.running:
            self._check_orphans()  # a changed host:port shows at once, not half a minute later
        # (new listeners bind once the ports they wait for are closed: after that, not before)
        yield defer.DeferredList([d for d in self._unbinding if not d.called])
        # A new listener that cannot bind is logged (listener.start_failed) and leaves the
        # engine not ready; everything else of the new config stays applied.
        yield defer.DeferredList([listener.started for listener in self.listeners], consumeErrors=True)
        self.ready = all(listener.port is not None for listener in self.listeners)
        self.log.info("config.reloaded", channels=len(self.listeners), queues=len(self.senders), **changes)

    def _beat(self) -> None:
        """Prove the store still commits, even when no messages arrive (for /readyz)."""
        self.committer.submit(Heartbeat(at=self.reactor.seconds())).addErrback(lambda failure: None)

    def readiness(self) -> tuple[bool, dict]:
        """Ready = running, every listener bound, the store committing, a config loaded."""
        listeners = {listener.factory.settings.channel: listener.port is not None for listener in self.listeners}
        store_ok = self.committer.healthy
        ready = self.running and self.ready and all(listeners.values()) and store_ok
        return ready, {"listeners": listeners, "store": "ok" if store_ok else "failing",
                       "config": "loaded", "channels": len(listeners)}

    def _resume_mapping(self, received_before: float | None = None) -> None:
        """Finish the hand-offs (mapping; on-map: forwards and the answer) of messages stored
        but never handed on, in arrival order: the listener stores them PENDING/UNANSWERED in
        the same insert, so a kill -9 between the ACK and the mapping commit, or a mapping
        commit that failed, cannot leave a referral out of the agendas. At start: all of them,
        before anything new, but those an operator handed to mapping again (`koppel reprocess`:
        any number, late anyway), which the paged resume takes from the start on; then every
        RESUME_INTERVAL, those older than that which the processor is not already working on, a
        page at a time (_resume_late)."""
        if not receives(self.role):
            return
        factories = self._factories()
        after, resumed = 0, 0
        while True:
            page = self.store.pending_processing(after_id=after, limit=500, received_before=received_before,
                                                 reprocessed=False, max_bytes=RESUME_PAGE_BYTES)
            if not page:
                break
            for message in page:
                after = message.id
                resumed += self._resume_one(message, factories)
        if resumed:
            self.log.warning("mapping.resumed", messages=resumed)

    def _factories(self) -> dict:
        return {listener.factory.settings.channel: listener.factory for listener in self.listeners}

    def map_again(self, message_id: int) -> bool:
        """Hand one message an operator set PENDING again (Reprocess) to mapping now, not at the
        next resume; False when this process does not map (--role deliver) or it is not pending."""
        if not receives(self.role):
            return False
        message = self.store.get_message(message_id)
        if message is None or message.processing != PENDING:
            return False
        return bool(self._resume_one(message, self._factories()))

    def _resume_one(self, message, factories: dict, handed: list | None = None) -> int:
        """Resume one stored PENDING/UNANSWERED message; 1 if handed on, 0 if already on its way.
        ``handed`` collects the Deferred of its outcome."""
        if message.id in self._handing or (self.processor is not None and self.processor.handling(message.id)):
            return 0
        factory = factories.get(message.channel)
        if factory is None:  # the channel is gone from the config
            self.committer.submit(SetProcessing(message_id=message.id, outcome="error",
                                                detail="not mapped: its channel is no longer configured"))
            return 0
        header = read_header(message.raw, default_charset=factory.settings.default_charset)
        assessment = Assessment(header=header, rejection=None, payload_hash=message.payload_hash)
        d = factory.settings.resume(message.id, assessment, message.raw, message.received_at,
                                    functools.partial(factory.acknowledge, assessment),
                                    message.processing == PENDING)
        if d is not None:
            d.addErrback(lambda failure, mid=message.id: self.log.error(
                "mapping.resume_failed", message_id=mid, error=safe_error(failure.value)))
            if handed is not None:
                handed.append(d)
        return 1

    def _resume_late(self, *, at_start: bool = False) -> defer.Deferred | None:
        """The periodic resume: RESUME_PAGE messages at a time, each page read once the one
        before is mapped (the LoopingCall waits for the Deferred), so a reprocess of thousands
        never holds every body in memory nor keeps the reactor (and the ACKs) waiting. A page
        not mapped within RESUME_INTERVAL ends the round (a crashed processor never answers;
        the next round hands its messages on again). ``at_start``: right after the start's
        resume, every pending message it left (reprocessed ones), however young."""
        if not receives(self.role):
            return None
        received_before = None if at_start else self.reactor.seconds() - RESUME_INTERVAL
        factories = self._factories()
        done = {"after": 0, "resumed": 0}

        def next_page(go_on: bool = True):
            handed: list = []
            try:
                while go_on and self.running and not handed:  # (a page it skips entirely: read on)
                    page = self.store.pending_processing(after_id=done["after"], limit=RESUME_PAGE,
                                                         received_before=received_before,
                                                         max_bytes=RESUME_PAGE_BYTES)
                    if not page:
                        break
                    for message in page:
                        done["after"] = message.id
                        done["resumed"] += self._resume_one(message, factories, handed)
            except Exception as error:  # noqa: BLE001 - tried again on the next interval
                self.log.warning("mapping.resume_failed", error=safe_error(error))
                handed = []
            if not handed:
                if done["resumed"]:
                    self.log.warning("mapping.resumed", messages=done["resumed"])
                return None
            gate: defer.Deferred = defer.Deferred()
            timer = self.reactor.callLater(RESUME_INTERVAL, lambda: gate.called or gate.callback(False))

            def mapped(_):
                if not gate.called:
                    timer.cancel()
                    gate.callback(True)

            defer.DeferredList(handed, consumeErrors=True).addBoth(mapped)
            return gate.addCallback(next_page)

        return next_page()

    def _wake_all(self) -> None:
        """Deliver-only: another process committed. New entries: wake the senders. An
        operator's pause or retry-now (through the other process's admin API): poll their
        flags too, at most ten times a second."""
        now = self.reactor.seconds()
        polls = now - self._polled_at >= 0.1
        if polls:
            self._polled_at = now
        for sender in self.senders.values():
            if polls:
                sender.poll()
            sender.wake()

    def _forget_queue(self, result, queue: str):
        if queue not in self.senders:
            for gauge in (self.metrics.queue_depth, self.metrics.queue_oldest_age_seconds,
                          self.metrics.queue_paused, self.metrics.destination_connected):
                gauge.remove(queue)
            self._orphans.discard(queue)  # (reload() looks for orphans once its senders stopped)
        return result

    def _check_orphans(self) -> None:
        """Queues with pending entries that no configured destination delivers: a destination's
        host or port was changed (the queue is its host:port) while entries waited. Logged when
        found, and their depth and oldest age exported, so the queue alerts fire for them."""
        try:
            stats = self.store.queue_stats(self.reactor.seconds())
        except Exception as error:  # noqa: BLE001 - the next tick tries again
            self.log.warning("queue.orphan_check_failed", error=safe_error(error))
            return
        found = {s.queue: s for s in stats if s.depth and s.queue not in self.senders}
        for queue, s in found.items():
            if queue not in self._orphans:
                self.log.warning("queue.orphaned", queue=queue, depth=s.depth,
                                 oldest_age=round(s.oldest_age or 0.0),
                                 hint="no destination uses this host:port; koppel queue move it, or point a destination back at it")
            self.metrics.queue_depth.labels(queue).set(s.depth)
            self.metrics.queue_oldest_age_seconds.labels(queue).set(s.oldest_age or 0.0)
        for queue in self._orphans - found.keys():  # emptied, or a destination uses it again
            if queue not in self.senders:
                self.metrics.queue_depth.remove(queue)
                self.metrics.queue_oldest_age_seconds.remove(queue)
            self.log.info("queue.orphan_cleared", queue=queue)
        self._orphans = set(found)

    def orphaned_queues(self) -> frozenset[str]:
        return frozenset(self._orphans)

    def _forget_channel(self, result, channel: str):
        if channel not in {listener.factory.settings.channel for listener in self.listeners}:
            self.metrics.listener_up.remove(channel)
            self.metrics.connections_open.remove(channel)
        return result

    def _refresh_depths(self) -> None:
        """Receive-only: queue depths for the queue-full check, and each queue's oldest age as
        a metric, so the queue-age alerts fire even when the delivering process is down
        (whose own queue metrics then go stale). Depth stays the deliverer's metric: two
        processes exporting it would be counted twice in a sum."""
        try:
            stats = self.store.queue_stats(self.reactor.seconds())
        except Exception as error:  # noqa: BLE001 - the next tick tries again
            self.log.warning("queue.depths_failed", error=safe_error(error))
            return
        depths = {s.queue: s.depth for s in stats}
        ages = {s.queue: s.oldest_age or 0.0 for s in stats}
        for queue, remote in self.senders.items():
            remote.refresh(depths)
            self.metrics.queue_oldest_age_seconds.labels(queue).set(ages.get(queue, 0.0))

    def _wake_senders(self, targets) -> None:
        for target in targets:
            sender = self.senders.get(target.queue)
            if sender is not None:
                sender.enqueued()

    def _http_bound(self, port):
        self.http_port = port

    @defer.inlineCallbacks
    def stopService(self):
        self.ready = False
        self.log.info("engine.stopping")
        service.Service.stopService(self)
        stops = [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        yield self._at_most_drain_timeout(defer.DeferredList(stops), "engine.drain_timeout")
        for listener in self.listeners:
            for receiver in list(listener.factory.receivers):
                receiver.transport.abortConnection()
        if getattr(self, "_heartbeat", None) is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._depths is not None and self._depths.running:
            self._depths.stop()
        if self._orphan_check is not None and self._orphan_check.running:
            self._orphan_check.stop()
        if getattr(self, "_resumer", None) is not None and self._resumer.running:
            self._resumer.stop()
        if self._watcher is not None:
            self._watcher.stop()
        if self.processor is not None:
            if getattr(self, "_gauges", None) is not None and self._gauges.running:
                self._gauges.stop()
            # Not forever: a store that refuses the mapping's commits (disk full) is waited out
            # by the processor; its messages stay 'pending' and are mapped at the next start.
            yield self._at_most_drain_timeout(self.processor.wait_idle(), "engine.mapping_stop_timeout",
                                              hint="messages not mapped yet are mapped at the next start")
        senders = defer.DeferredList([sender.stop() for sender in self.senders.values()])
        yield self._at_most_drain_timeout(senders, "engine.sender_stop_timeout",
                                          hint="messages waiting for their ACK are sent again at the next start")
        if self.pruner is not None:
            self.pruner.stop()
        yield self.committer.stop()
        yield self.checkpointer.stop()
        if self.http_port is not None:
            yield self.http_port.stopListening()
        if self.admin_port is not None:
            yield self.admin_port.stopListening()
        self.store.close()
        self.log.info("engine.stopped")

    @defer.inlineCallbacks
    def _at_most_drain_timeout(self, waited: defer.Deferred, event: str, **fields):
        """Wait for ``waited`` (cancelled, and ``event`` logged, after --drain-timeout): each phase
        of a stop is bounded, so a peer, a destination or the store cannot hold it for ever."""
        timeout = self.reactor.callLater(self.drain_timeout, waited.cancel)
        cancelled = False
        try:
            yield waited
        except defer.CancelledError:
            cancelled = True
        # (a cancelled DeferredList does not fail: it fires with its parts' failures, so the
        # timer's firing is what says the phase was cut short)
        if cancelled or timeout.called:
            self.log.warning(event, seconds=self.drain_timeout, **fields)
        if timeout.active():
            timeout.cancel()

    def listener_ports(self) -> dict[str, int]:
        """Bound port per channel (useful when config says port 0)."""
        return {l.factory.settings.channel: l.port.getHost().port for l in self.listeners if l.port}
