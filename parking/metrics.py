"""Domain metrics, declared once on a registry that tests can replace.

Labels are bounded: event kinds, outcomes and rejection reasons come from fixed
sets in the code, car parks (``lot``) from the configuration (an event naming
another one is refused); no plate, id or free text ever becomes a label value.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from parking.events import EventKind
from parking.store import Outcome

#: Sub-millisecond work must land in distinct buckets, and outages in the top.
FAST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
#: From an event's own time to processed: seconds to hours (replays are old).
LAG_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 3600, 86400)

#: Label values known in advance (the summary client's causes and the ledger's
#: orphan causes); a value missing here still counts, it just starts later.
SUMMARY_FAILURE_CAUSES = ("unreachable", "server", "rejected")
ORPHAN_CAUSES = ("late_entry", "reentry", "max_stay")
MISREAD_RESULTS = ("fuzzy", "ambiguous")


class ParkingMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.events = Counter(
            "parking_events_total",
            "Camera events processed, by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.rejected = Counter(
            "parking_events_rejected_total",
            "Events refused as bad input, by kind and reason",
            ["kind", "reason"],
            registry=registry,
        )
        self.processing = Histogram(
            "parking_event_processing_seconds",
            "Time to process one event, by kind and outcome (an entry that"
            " completes a stay posts it, as an exit does)",
            ["kind", "outcome"],
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.event_lag = Histogram(
            "parking_event_lag_seconds",
            "From the event's own time to the end of its processing",
            ["kind"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.stays = Counter(
            "parking_stays_total",
            "Stays completed and handed to the summary API",
            registry=registry,
        )
        self.unmatched = Counter(
            "parking_exits_unmatched_total",
            "Exits with no entry after the grace period (expected, not errors)",
            registry=registry,
        )
        self.orphaned = Counter(
            "parking_visits_orphaned_total",
            "Visits closed without an exit, by cause",
            ["cause"],
            registry=registry,
        )
        self.clock_skew = Counter(
            "parking_clock_skew_total",
            "Stays whose exit was stamped before the entry and clamped",
            registry=registry,
        )
        self.summary_post = Histogram(
            "parking_summary_post_seconds",
            "Time to post one stay summary to the API",
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.summary_failures = Counter(
            "parking_summary_post_failures_total",
            "Summary posts that failed, by cause",
            ["cause"],
            registry=registry,
        )
        self.generated = Counter(
            "parking_generated_events_total",
            "Simulated events published by the generators, by kind",
            ["kind"],
            registry=registry,
        )
        self.misreads = Counter(
            "parking_misread_exits_total",
            "Exits with no open visit of their plate but one (fuzzy, matched) "
            "or several (ambiguous, left unmatched) a misread away",
            ["result"],
            registry=registry,
        )
        self.occupancy = Gauge(
            "parking_open_visits",
            "Vehicles inside (open visits) by car park, read from the store",
            ["lot"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.capacity = Gauge(
            "parking_lot_capacity",
            "Vehicles a car park holds (configured)",
            ["lot"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.full = Gauge(
            "parking_lot_full",
            "1 while a car park's open visits reach its capacity, else 0",
            ["lot"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.pending_exits = Gauge(
            "parking_pending_exits",
            "Plates with exits waiting for their entry (grace period), by car park",
            ["lot"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.review_waiting = Gauge(
            "parking_review_waiting",
            "Unmatched exits and orphaned visits not yet written by the API",
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.match_ratio = Gauge(
            "parking_generator_match_ratio",
            "Configured share of simulated exits that belong to a car inside",
            multiprocess_mode="max",
            registry=registry,
        )
        self._zero_known_labels()

    def _zero_known_labels(self) -> None:
        # Series that exist at zero from the start: rate() and the dashboard's
        # panels answer before the first event of a kind, and an alert on a
        # failure ratio sees a denominator instead of nothing.
        for kind in EventKind:
            for outcome in Outcome:
                self.events.labels(kind, outcome)
                self.processing.labels(kind, outcome)
            self.event_lag.labels(kind)
        for cause in SUMMARY_FAILURE_CAUSES:
            self.summary_failures.labels(cause)
        for cause in ORPHAN_CAUSES:
            self.orphaned.labels(cause)
        for result in MISREAD_RESULTS:
            self.misreads.labels(result)


_default: ParkingMetrics | None = None


def default_metrics() -> ParkingMetrics:
    """The process-wide metrics on the default registry, made on first use."""
    global _default
    if _default is None:
        _default = ParkingMetrics()
    return _default
