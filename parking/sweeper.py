"""The periodic sweep: grace periods that ran out and visits that never end.

What a sweep takes goes into the store's review outbox in the same atomic
step, and is handed to the summary API from there; a record leaves the outbox
only once the API has it. A failed post, or a sweep killed mid-way, leaves it
for the next sweep, and the API writes each one once (keyed by its event id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from parking.clock import Clock
from parking.errors import SummaryRejected, SummaryUnavailable
from parking.handlers import report_orphaned, report_unmatched
from parking.lots import Lots
from parking.metrics import ParkingMetrics
from parking.review import Review, UnmatchedExit
from parking.store import RedisVisitStore
from parking.summary_client import SummarySink

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SweepResult:
    unmatched: int
    orphaned: int
    open_visits: int
    pending_exits: int
    #: Review records the API took in this sweep, and those still waiting.
    posted: int = 0
    waiting: int = 0
    #: Open visits by car park.
    occupancy: dict[str, int] = field(default_factory=dict)
    #: Entry events still queued; while there are any, no exit is declared.
    entry_backlog: int = 0


class Sweeper:
    def __init__(
        self,
        store: RedisVisitStore,
        sink: SummarySink,
        clock: Clock,
        metrics: ParkingMetrics,
        lots: Lots,
        max_stay: timedelta,
        entry_backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        self._store = store
        self._sink = sink
        self._clock = clock
        self._metrics = metrics
        self._lots = lots
        self._max_stay = max_stay
        self._entry_backlog = entry_backlog

    def sweep(self) -> SweepResult:
        now = self._clock.now()
        # The grace period is counted in processing time, so entries held up
        # in their queue (a backlog after an outage, a slow worker) would see
        # their exits declared unmatched before they are read. While entries
        # wait, exits wait too: an exit is unmatched only once every entry
        # that was published before the sweep had its chance.
        backlog = self._entry_backlog()
        expired = [] if backlog else self._store.take_expired_exits(now)
        if backlog:
            logger.info("sweep holds pending exits entry_backlog=%d", backlog)
        for exit_ in expired:
            report_unmatched(exit_, self._metrics)
        # Measured in processing time, not event time: a replay of old events
        # must not close every visit it opens.
        stale = self._store.take_stale_visits(now - self._max_stay)
        for visit in stale:
            report_orphaned(visit, self._metrics)
        posted, waiting = self._hand_over()
        occupancy, pending = self._measure()
        return SweepResult(
            unmatched=len(expired),
            orphaned=len(stale),
            open_visits=sum(occupancy.values()),
            pending_exits=pending,
            posted=posted,
            waiting=waiting,
            occupancy=occupancy,
            entry_backlog=backlog,
        )

    def _hand_over(self) -> tuple[int, int]:
        """Post what waits in the outbox until the API stops taking it."""
        waiting = self._store.waiting_reviews()
        written: list[Review] = []
        try:
            for item in waiting:
                self._post(item)
                written.append(item)
        except SummaryUnavailable as exc:
            logger.warning(
                "review records wait for the summary API waiting=%d error=%s",
                len(waiting) - len(written), exc,
            )  # fmt: skip
        except SummaryRejected as exc:
            # Kept, not dropped: a refusal (a wrong token, say) needs a person,
            # and once fixed the next sweep delivers everything.
            logger.error(
                "review records refused by the summary API waiting=%d error=%s",
                len(waiting) - len(written), exc,
            )  # fmt: skip
        finally:
            self._store.reviewed(written)
        left = len(waiting) - len(written)
        self._metrics.review_waiting.set(left)
        return len(written), left

    def _post(self, item: Review) -> None:
        if isinstance(item, UnmatchedExit):
            self._sink.record_unmatched(item)
        else:
            self._sink.record_orphan(item)

    def _measure(self) -> tuple[dict[str, int], int]:
        """Occupancy and pending exits per car park, into the gauges."""
        counts = self._store.counts_by_lot()
        occupancy: dict[str, int] = {}
        pending_total = 0
        for lot in self._lots:
            mine = counts.get(lot.name, {})
            inside, pending = mine.get("open", 0), mine.get("pending", 0)
            occupancy[lot.name] = inside
            pending_total += pending
            self._metrics.occupancy.labels(lot.name).set(inside)
            self._metrics.pending_exits.labels(lot.name).set(pending)
            self._metrics.capacity.labels(lot.name).set(lot.capacity)
            self._metrics.full.labels(lot.name).set(int(inside >= lot.capacity))
        return occupancy, pending_total
