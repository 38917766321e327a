"""The periodic sweep: grace periods that ran out and visits that never end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from parking.clock import Clock
from parking.handlers import report_unmatched
from parking.metrics import ParkingMetrics
from parking.store import RedisVisitStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SweepResult:
    unmatched: int
    orphaned: int
    open_visits: int
    pending_exits: int


class Sweeper:
    def __init__(
        self,
        store: RedisVisitStore,
        clock: Clock,
        metrics: ParkingMetrics,
        max_stay: timedelta,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._max_stay = max_stay

    def sweep(self) -> SweepResult:
        now = self._clock.now()
        expired = self._store.take_expired_exits(now)
        for exit_ in expired:
            report_unmatched(exit_, self._metrics, "grace_expired")
        # Measured in processing time, not event time: a replay of old events
        # must not close every visit it opens.
        stale = self._store.take_stale_visits(now - self._max_stay)
        for visit in stale:
            self._metrics.orphaned.labels("max_stay").inc()
            logger.info(
                "visit orphaned cause=max_stay plate=%s event=%s",
                visit.plate, visit.event_id,
            )  # fmt: skip
        counts = self._store.counts()
        self._metrics.occupancy.set(counts["open"])
        self._metrics.pending_exits.set(counts["pending"])
        return SweepResult(len(expired), len(stale), counts["open"], counts["pending"])
