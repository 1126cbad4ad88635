"""Prometheus metrics, one registry per engine (tests make their own).

Labels are low-cardinality on purpose: channel, destination, message type (only
for accepted messages, which a channel's accept list bounds), ACK code, reason.
Never patient data, never message ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from engine import __version__

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("koppel_build", "Koppel version", registry=r)
        self.build_info.info({"version": __version__})
        self.config_reloads = Counter(
            "koppel_config_reloads_total", "Config reloads (SIGHUP / koppel reload) by result", ["result"], registry=r
        )
        self.config_last_reload_successful = Gauge(
            "koppel_config_last_reload_successful", "1 if the last config (re)load succeeded", registry=r
        )
        self.config_last_reload_success_timestamp = Gauge(
            "koppel_config_last_reload_success_timestamp_seconds", "When the running config was loaded", registry=r
        )
        # receive path
        self.received = Counter(
            "koppel_received_messages_total",
            "Frames received and read, by channel, message type and outcome",
            ["channel", "type", "outcome"],
            registry=r,
        )
        self.received_bytes = Counter(
            "koppel_received_bytes_total", "Payload bytes of received frames", ["channel"], registry=r
        )
        self.acks_sent = Counter(
            "koppel_acks_sent_total", "Acknowledgements written, by ACK code", ["channel", "code"], registry=r
        )
        self.acks_withheld = Counter(
            "koppel_acks_withheld_total",
            "Accept ACKs not sent because MSH-15 (NE/ER/SU) said so",
            ["channel", "code"],
            registry=r,
        )
        self.duplicates = Counter(
            "koppel_duplicates_total", "Re-sent messages answered from the first copy", ["channel"], registry=r
        )
        self.frames_discarded = Counter(
            "koppel_frames_discarded_total",
            "Frames dropped without storing (oversize, aborted, timeout, eof)",
            ["channel", "reason"],
            registry=r,
        )
        self.junk_bytes = Counter(
            "koppel_junk_bytes_total", "Bytes outside MLLP frames, discarded", ["channel"], registry=r
        )
        self.connections_open = Gauge(
            "koppel_connections_open", "Open inbound connections", ["channel"], registry=r
        )
        self.connections = Counter(
            "koppel_connections_total", "Inbound connections accepted", ["channel"], registry=r
        )
        self.connections_refused = Counter(
            "koppel_connections_refused_total",
            "Inbound connections refused, by reason",
            ["channel", "reason"],
            registry=r,
        )
        self.connections_closed = Counter(
            "koppel_connections_closed_total",
            "Inbound connections closed by Koppel, by reason",
            ["channel", "reason"],
            registry=r,
        )
        self.listener_up = Gauge(
            "koppel_listener_up", "1 while the channel's listener is bound", ["channel"], registry=r
        )
        self.ack_latency = Histogram(
            "koppel_ack_latency_seconds",
            "Frame complete to ACK written (includes the store commit)",
            ["channel"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # store
        self.store_commit = Histogram(
            "koppel_store_commit_seconds", "Store transaction time (group commit)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.store_batch = Histogram(
            "koppel_store_commit_batch_size", "Operations per store transaction", buckets=BATCH_BUCKETS, registry=r
        )
        self.store_busy = Counter(
            "koppel_store_busy_total",
            "Batches put off (then retried every 0.5 ms) because another process held the store's write lock",
            registry=r,
        )
        self.store_errors = Counter("koppel_store_errors_total", "Failed store transactions", registry=r)
        # delivery: queue-level gauges by queue (host:port), entry-level counts by destination name
        self.queue_depth = Gauge("koppel_queue_depth", "Entries waiting in the queue", ["queue"], registry=r)
        self.queue_oldest_age_seconds = Gauge(
            "koppel_queue_oldest_age_seconds", "Age of the oldest waiting entry", ["queue"], registry=r
        )
        self.queue_paused = Gauge("koppel_queue_paused", "1 while an operator has paused the queue", ["queue"], registry=r)
        self.destination_connected = Gauge(
            "koppel_destination_connected", "1 while the queue's connection is up", ["queue"], registry=r
        )
        self.delivery_sent_total = Counter(
            "koppel_delivery_sent_total", "Messages written to a destination (attempts)", ["destination"], registry=r
        )
        self.delivery_redeliveries_total = Counter(
            "koppel_delivery_redeliveries_total",
            "Attempts on an entry that was tried before (retries and resends after restart)",
            ["destination"],
            registry=r,
        )
        self.delivery_acks_total = Counter(
            "koppel_delivery_acks_total", "Acknowledgements received from destinations", ["destination", "code"], registry=r
        )
        self.delivery_retries_total = Counter(
            "koppel_delivery_retries_total", "Failed attempts that will be retried", ["destination"], registry=r
        )
        self.dead_letters_total = Counter(
            "koppel_dead_letters_total", "Entries moved to the dead letters", ["destination"], registry=r
        )
        self.delivery_latency_seconds = Histogram(
            "koppel_delivery_latency_seconds",
            "Received (queued) to acknowledged by the destination",
            ["destination"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600, 21600, 86400),
            registry=r,
        )
        # mapping and agendas
        self.filtered_total = Counter(
            "koppel_filtered_total", "Accepted messages no route took (stored, not mapped or sent)",
            ["channel"], registry=r,
        )
        self.mapping_outcomes_total = Counter(
            "koppel_mapping_outcomes_total",
            "Mapped messages by outcome: ok, error, held (waiting for its entry), rejected, filtered",
            ["channel", "mapping", "outcome"],
            registry=r,
        )
        self.agenda_fallback_total = Counter(
            "koppel_agenda_fallback_total", "Entries no agenda rule selected (put in the fallback agenda)",
            ["channel"], registry=r,
        )
        self.mapping_pending = Gauge(
            "koppel_mapping_pending", "Stored messages whose mapping (or on-map answer) is not done yet", registry=r
        )
        self.mapping_pending_oldest_age_seconds = Gauge(
            "koppel_mapping_pending_oldest_age_seconds", "Age of the oldest of those (0: none)", registry=r
        )
        self.agenda_held = Gauge(
            "koppel_agenda_held", "Messages held for an agenda entry that has not come (a letter before its "
            "request, a booking before its referral, a reschedule before its booking)", registry=r
        )
        self.agenda_held_oldest_age_seconds = Gauge(
            "koppel_agenda_held_oldest_age_seconds", "How long the oldest of those has waited (0: none)", registry=r
        )
        self.agenda_entries = Gauge(
            "koppel_agenda_entries", "Agenda entries by agenda and state", ["agenda", "state"], registry=r
        )
