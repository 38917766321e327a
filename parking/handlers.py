"""The decisions of the pipeline: one handler per event kind.

Handlers receive every collaborator in the constructor, so the same classes
run inside a Celery task, a plain AMQP consumer or a unit test with fakes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from parking.clock import Clock
from parking.errors import InvalidEvent
from parking.events import CameraEvent, EventKind, parse_event
from parking.metrics import ParkingMetrics
from parking.stays import Stay, Visit
from parking.store import Outcome, Transition, VisitStore
from parking.summary_client import SummarySink

logger = logging.getLogger(__name__)


class MessageHandler(Protocol):
    def process_message(self, message: Any) -> Transition: ...


class _EventProcessor:
    kind: EventKind

    def __init__(
        self,
        store: VisitStore,
        sink: SummarySink,
        clock: Clock,
        metrics: ParkingMetrics,
    ) -> None:
        self._store = store
        self._sink = sink
        self._clock = clock
        self._metrics = metrics

    def process_message(self, message: Any) -> Transition:
        """Apply one event; raises ``InvalidEvent`` or ``TemporaryFailure``."""
        started = time.perf_counter()
        try:
            event = parse_event(message, self.kind)
        except InvalidEvent as exc:
            self._metrics.rejected.labels(self.kind, exc.reason).inc()
            raise
        transition = self._apply(event)
        self._settle(transition)
        self._metrics.events.labels(self.kind, transition.outcome).inc()
        self._metrics.processing.labels(self.kind).observe(
            time.perf_counter() - started
        )
        lag = (self._clock.now() - event.at).total_seconds()
        self._metrics.event_lag.labels(self.kind).observe(max(lag, 0.0))
        logger.debug(
            "event processed kind=%s event=%s outcome=%s",
            self.kind, event.id, transition.outcome,
        )  # fmt: skip
        return transition

    def _apply(self, event: CameraEvent) -> Transition:
        raise NotImplementedError

    def _settle(self, transition: Transition) -> None:
        outcome = transition.outcome
        if outcome is Outcome.DUPLICATE and transition.first is not None:
            # A redelivery may follow a crash between the store step and the
            # post, so a finished stay is posted again; the API keeps one row
            # per stay id. Everything else was already done the first time.
            if transition.first.outcome is Outcome.MATCHED:
                self._deliver(transition.first, first_time=False)
            return
        if outcome is Outcome.MATCHED:
            self._deliver(transition, first_time=True)
        if transition.orphan is not None:
            late = outcome is Outcome.ORPHANED
            cause = "late_entry" if late else "reentry"
            self._metrics.orphaned.labels(cause).inc()
            logger.info(
                "visit orphaned cause=%s plate=%s event=%s",
                cause, transition.orphan.plate, transition.orphan.event_id,
            )  # fmt: skip
        if transition.superseded is not None:
            report_unmatched(transition.superseded, self._metrics, "superseded")

    def _deliver(self, transition: Transition, first_time: bool) -> None:
        assert transition.entry is not None
        assert transition.exit is not None
        stay = Stay.between(transition.entry, transition.exit)
        if first_time:
            # Counted at the match, which the store makes once, not after the
            # post: a failed post comes back as a duplicate, which counts nothing.
            self._metrics.stays.inc()
            if stay.clock_skew:
                self._metrics.clock_skew.inc()
                logger.info(
                    "exit before entry clamped plate=%s stay=%s",
                    stay.plate, stay.stay_id,
                )  # fmt: skip
        self._sink.record(stay)
        logger.debug("stay recorded plate=%s stay=%s", stay.plate, stay.stay_id)


class EntryEventProcessor(_EventProcessor):
    kind = EventKind.ENTRY

    def _apply(self, event: CameraEvent) -> Transition:
        return self._store.enter(event, self._clock.now())


class ExitEventProcessor(_EventProcessor):
    kind = EventKind.EXIT

    def _apply(self, event: CameraEvent) -> Transition:
        return self._store.leave(event, self._clock.now())


def report_unmatched(exit_: Visit, metrics: ParkingMetrics, why: str) -> None:
    """An exit that never found its entry: the expected dirty-plate case."""
    metrics.unmatched.inc()
    logger.info(
        "exit unmatched plate=%s event=%s why=%s", exit_.plate, exit_.event_id, why
    )
