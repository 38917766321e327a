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
from parking.lots import Lots
from parking.metrics import ParkingMetrics
from parking.review import OrphanCause, OrphanedVisit, UnmatchedExit
from parking.stays import Match, Stay
from parking.store import Outcome, Transition, VisitStore
from parking.summary_client import SummarySink
from parking.tariff import Tariff

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
        lots: Lots,
    ) -> None:
        self._store = store
        self._sink = sink
        self._clock = clock
        self._metrics = metrics
        self._lots = lots

    def process_message(self, message: Any) -> Transition:
        """Apply one event; raises ``InvalidEvent`` or ``TemporaryFailure``."""
        started = time.perf_counter()
        try:
            event = parse_event(message, self.kind, self._lots.default)
            tariff = self._lots[event.lot_id].tariff
        except InvalidEvent as exc:
            self._metrics.rejected.labels(self.kind, exc.reason).inc()
            raise
        transition = self._apply(event)
        self._settle(transition, tariff)
        self._metrics.events.labels(self.kind, transition.outcome).inc()
        self._metrics.processing.labels(self.kind, transition.outcome).observe(
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

    def _settle(self, transition: Transition, tariff: Tariff) -> None:
        if transition.outcome is Outcome.DUPLICATE:
            # A redelivery may follow a crash between the store step and the
            # posts, so what the first delivery found is posted again; the
            # API keeps one row per stay id and per event id. Counting was
            # done the first time.
            if transition.first is not None:
                self._post(transition.first, tariff)
            return
        # Counted at the store step, which happens once, before any post: a
        # failed post comes back as a duplicate, which counts nothing.
        self._count(transition, tariff)
        self._post(transition, tariff)

    def _count(self, transition: Transition, tariff: Tariff) -> None:
        stay = _stay(transition, tariff)
        if stay is not None:
            self._metrics.stays.inc()
            if stay.clock_skew:
                self._metrics.clock_skew.inc()
                logger.info(
                    "exit before entry clamped plate=%s stay=%s",
                    stay.plate, stay.stay_id,
                )  # fmt: skip
            if stay.match is Match.FUZZY:
                assert transition.exit is not None
                self._metrics.misreads.labels("fuzzy").inc()
                logger.info(
                    "exit matched a misread plate read=%s entry_plate=%s stay=%s",
                    transition.exit.plate, stay.plate, stay.stay_id,
                )  # fmt: skip
        if transition.ambiguous:
            assert transition.exit is not None
            self._metrics.misreads.labels("ambiguous").inc()
            logger.info(
                "exit misread ambiguous plate=%s event=%s candidates=%d",
                transition.exit.plate, transition.exit.event_id,
                transition.ambiguous,
            )  # fmt: skip
        orphan = _orphan(transition)
        if orphan is not None:
            report_orphaned(orphan, self._metrics)

    def _post(self, transition: Transition, tariff: Tariff) -> None:
        stay = _stay(transition, tariff)
        if stay is not None:
            self._sink.record(stay)
        orphan = _orphan(transition)
        if orphan is not None:
            self._sink.record_orphan(orphan)


class EntryEventProcessor(_EventProcessor):
    kind = EventKind.ENTRY

    def _apply(self, event: CameraEvent) -> Transition:
        return self._store.enter(event, self._clock.now())


class ExitEventProcessor(_EventProcessor):
    kind = EventKind.EXIT

    def _apply(self, event: CameraEvent) -> Transition:
        return self._store.leave(event, self._clock.now())


def _stay(transition: Transition, tariff: Tariff) -> Stay | None:
    if transition.outcome is not Outcome.MATCHED:
        return None
    assert transition.entry is not None
    assert transition.exit is not None
    return Stay.between(transition.entry, transition.exit, tariff, transition.match)


def _orphan(transition: Transition) -> OrphanedVisit | None:
    if transition.orphan is None:
        return None
    late = transition.outcome is Outcome.ORPHANED
    cause = OrphanCause.LATE_ENTRY if late else OrphanCause.REENTRY
    return OrphanedVisit(transition.orphan, cause)


def report_unmatched(item: UnmatchedExit, metrics: ParkingMetrics) -> None:
    """An exit that never found its entry: the expected dirty-plate case."""
    metrics.unmatched.inc()
    logger.info(
        "exit unmatched plate=%s event=%s why=%s",
        item.exit.plate, item.exit.event_id, item.why,
    )  # fmt: skip


def report_orphaned(item: OrphanedVisit, metrics: ParkingMetrics) -> None:
    """A visit closed without an exit: kept for review, not an error."""
    metrics.orphaned.labels(item.cause).inc()
    logger.info(
        "visit orphaned cause=%s plate=%s event=%s",
        item.cause, item.entry.plate, item.entry.event_id,
    )  # fmt: skip
