"""The handlers fed straight with events, over a scripted store and a fake sink."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from parking.errors import InvalidEvent, StoreUnavailable, SummaryUnavailable
from parking.events import CameraEvent, EventKind
from parking.handlers import (
    EntryEventProcessor,
    ExitEventProcessor,
    MessageHandler,
    report_unmatched,
)
from parking.lots import Lot, Lots
from parking.metrics import ParkingMetrics
from parking.review import (
    OrphanCause,
    OrphanedVisit,
    UnmatchedExit,
    UnmatchedWhy,
)
from parking.stays import Match, Stay, Visit
from parking.store import Outcome, Transition
from parking.tariff import Tariff

NOW = datetime(2024, 9, 11, 22, 0, 0, tzinfo=UTC)
ENTERED = datetime(2024, 9, 11, 21, 0, 0, tzinfo=UTC)
EXITED = datetime(2024, 9, 11, 21, 30, 0, tzinfo=UTC)

ENTRY = Visit("e1", "ab-123", ENTERED)
EXIT = Visit("x1", "AB 123", EXITED)
MATCHED = Transition(Outcome.MATCHED, entry=ENTRY, exit=EXIT)
TARIFF = Tariff()
NORTH = Tariff(
    free=timedelta(0),
    period=timedelta(minutes=20),
    price_per_period=Decimal("1.10"),
    daily_cap=Decimal("9.00"),
    currency="NZD",
)
LOTS = Lots([Lot("main", 500, TARIFF), Lot("north", 20, NORTH)])


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at


@dataclass
class ScriptedStore:
    """Answers each step with the next scripted transition, and remembers calls."""

    script: list[Transition | Exception]
    calls: list[tuple[str, CameraEvent, datetime]] = field(default_factory=list)

    def enter(self, event: CameraEvent, now: datetime) -> Transition:
        return self._next("enter", event, now)

    def leave(self, event: CameraEvent, now: datetime) -> Transition:
        return self._next("leave", event, now)

    def _next(self, step: str, event: CameraEvent, now: datetime) -> Transition:
        self.calls.append((step, event, now))
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@dataclass
class FakeSink:
    failures: list[Exception] = field(default_factory=list)
    recorded: list[Stay] = field(default_factory=list)
    unmatched: list[UnmatchedExit] = field(default_factory=list)
    orphans: list[OrphanedVisit] = field(default_factory=list)

    def record(self, stay: Stay) -> None:
        self._fail()
        self.recorded.append(stay)

    def record_unmatched(self, item: UnmatchedExit) -> None:
        self._fail()
        self.unmatched.append(item)

    def record_orphan(self, item: OrphanedVisit) -> None:
        self._fail()
        self.orphans.append(item)

    def _fail(self) -> None:
        if self.failures:
            raise self.failures.pop(0)


@dataclass
class Rig:
    store: ScriptedStore
    sink: FakeSink
    clock: FixedClock
    registry: CollectorRegistry
    metrics: ParkingMetrics

    def handler(self, kind: EventKind) -> MessageHandler:
        cls = EntryEventProcessor if kind is EventKind.ENTRY else ExitEventProcessor
        return cls(self.store, self.sink, self.clock, self.metrics, LOTS)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def rig() -> Rig:
    registry = CollectorRegistry()
    return Rig(
        ScriptedStore([]),
        FakeSink(),
        FixedClock(NOW),
        registry,
        ParkingMetrics(registry),
    )


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="parking")
    yield caplog
    # Every case here is an expected business outcome: nothing for a person to act on.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []


def _entry(event_id: str = "e1", at: str = "2024-09-11T21:00:00Z") -> dict[str, Any]:
    return {"id": event_id, "vehicle_plate": "ab-123", "entry_date_time": at}


def _exit(event_id: str = "x1", at: str = "2024-09-11T21:30:00Z") -> dict[str, Any]:
    return {"id": event_id, "vehicle_plate": "AB 123", "exit_date_time": at}


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_an_entry_is_validated_and_handed_to_the_store_with_the_clock(rig: Rig) -> None:
    rig.store.script = [Transition(Outcome.OPENED)]

    transition = rig.handler(EventKind.ENTRY).process_message(_entry())

    assert transition.outcome is Outcome.OPENED
    [(step, event, now)] = rig.store.calls
    assert (step, event.id, event.plate_key, event.at, now) == (
        "enter",
        "e1",
        "AB123",
        ENTERED,
        NOW,
    )
    assert rig.sink.recorded == []
    assert rig.sample("parking_events_total", kind="entry", outcome="opened") == 1


def test_an_exit_goes_to_the_store_as_a_leave(rig: Rig) -> None:
    rig.store.script = [Transition(Outcome.PENDING)]

    rig.handler(EventKind.EXIT).process_message(_exit())

    assert [call[0] for call in rig.store.calls] == ["leave"]
    assert rig.sample("parking_events_total", kind="exit", outcome="pending") == 1
    assert rig.sample("parking_exits_unmatched_total") == 0


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        pytest.param(EventKind.EXIT, _exit(), id="exit-closes-visit"),
        pytest.param(EventKind.ENTRY, _entry(), id="entry-completes-pending-exit"),
    ],
)
def test_a_match_records_one_stay(
    rig: Rig, kind: EventKind, message: dict[str, Any]
) -> None:
    rig.store.script = [MATCHED]

    rig.handler(kind).process_message(message)

    assert rig.sink.recorded == [Stay.between(ENTRY, EXIT, TARIFF)]
    assert rig.sample("parking_stays_total") == 1
    assert rig.sample("parking_events_total", kind=kind.value, outcome="matched") == 1


@pytest.mark.parametrize("kind", list(EventKind), ids=lambda k: k.value)
def test_each_event_is_one_line_at_debug_and_none_at_info(
    rig: Rig, kind: EventKind, info_logs: pytest.LogCaptureFixture
) -> None:
    rig.store.script = [MATCHED]
    message = _entry() if kind is EventKind.ENTRY else _exit()

    rig.handler(kind).process_message(message)

    assert _messages(info_logs, logging.DEBUG) == [
        f"event processed kind={kind.value} event={message['id']} outcome=matched"
    ]
    assert _messages(info_logs, logging.INFO) == []


def test_a_redelivered_match_posts_the_same_stay_again_but_counts_it_once(
    rig: Rig,
) -> None:
    rig.store.script = [MATCHED, Transition(Outcome.DUPLICATE, first=MATCHED)]
    handler = rig.handler(EventKind.EXIT)

    handler.process_message(_exit())
    handler.process_message(_exit())

    first, again = rig.sink.recorded
    assert first == again
    assert first.stay_id == again.stay_id
    assert rig.sample("parking_stays_total") == 1
    assert rig.sample("parking_events_total", kind="exit", outcome="duplicate") == 1


def test_a_stay_whose_first_post_failed_is_counted_once_when_redelivered(
    rig: Rig,
) -> None:
    rig.store.script = [MATCHED, Transition(Outcome.DUPLICATE, first=MATCHED)]
    rig.sink.failures = [SummaryUnavailable("api down")]
    handler = rig.handler(EventKind.EXIT)

    with pytest.raises(SummaryUnavailable):
        handler.process_message(_exit())
    handler.process_message(_exit())

    assert rig.sink.recorded == [Stay.between(ENTRY, EXIT, TARIFF)]
    assert rig.sample("parking_stays_total") == 1


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(Transition(Outcome.OPENED), id="opened"),
        pytest.param(Transition(Outcome.PENDING), id="pending"),
        pytest.param(Transition(Outcome.DUPLICATE_READ), id="duplicate-read"),
        pytest.param(Transition(Outcome.PENDING, ambiguous=2), id="ambiguous"),
    ],
)
def test_a_redelivery_of_what_posts_nothing_does_nothing_again(
    rig: Rig, first: Transition
) -> None:
    rig.store.script = [Transition(Outcome.DUPLICATE, first=first)]

    rig.handler(EventKind.EXIT).process_message(_exit())

    assert (rig.sink.recorded, rig.sink.unmatched, rig.sink.orphans) == ([], [], [])
    assert rig.sample("parking_stays_total") == 0
    assert rig.sample("parking_exits_unmatched_total") == 0
    assert rig.sample("parking_misread_exits_total", result="ambiguous") == 0


@pytest.mark.parametrize(
    ("first", "orphans"),
    [
        pytest.param(
            Transition(Outcome.OPENED, orphan=ENTRY),
            [OrphanedVisit(ENTRY, OrphanCause.REENTRY)],
            id="reentry",
        ),
        pytest.param(
            Transition(Outcome.ORPHANED, orphan=ENTRY),
            [OrphanedVisit(ENTRY, OrphanCause.LATE_ENTRY)],
            id="late-entry",
        ),
    ],
)
def test_a_redelivery_posts_the_review_records_again_but_counts_nothing(
    rig: Rig, first: Transition, orphans: list[OrphanedVisit]
) -> None:
    rig.store.script = [Transition(Outcome.DUPLICATE, first=first)]

    rig.handler(EventKind.ENTRY).process_message(_entry())

    assert rig.sink.unmatched == []
    assert rig.sink.orphans == orphans
    assert rig.sample("parking_exits_unmatched_total") == 0
    assert rig.sample("parking_visits_orphaned_total", cause="reentry") == 0
    assert rig.sample("parking_visits_orphaned_total", cause="late_entry") == 0


def test_a_review_post_that_failed_is_counted_once_and_posted_on_redelivery(
    rig: Rig,
) -> None:
    first = Transition(Outcome.OPENED, orphan=ENTRY)
    rig.store.script = [first, Transition(Outcome.DUPLICATE, first=first)]
    rig.sink.failures = [SummaryUnavailable("api down")]
    handler = rig.handler(EventKind.ENTRY)

    with pytest.raises(SummaryUnavailable):
        handler.process_message(_entry("e2"))
    handler.process_message(_entry("e2"))

    assert rig.sink.orphans == [OrphanedVisit(ENTRY, OrphanCause.REENTRY)]
    assert rig.sample("parking_visits_orphaned_total", cause="reentry") == 1


@pytest.mark.parametrize(
    ("kind", "message", "reason"),
    [
        pytest.param(EventKind.ENTRY, b"{", "bad_json", id="broken-json"),
        pytest.param(
            EventKind.ENTRY,
            _entry(at="2024-09-11T21:00:00"),
            "naive_time",
            id="naive-time",
        ),
        pytest.param(EventKind.EXIT, _entry(), "missing_field", id="exit-without-time"),
        pytest.param(
            EventKind.EXIT,
            {**_exit(), "vehicle_plate": "=1+1"},
            "bad_plate",
            id="formula-plate",
        ),
        pytest.param(EventKind.EXIT, {**_exit(), "id": 7}, "bad_id", id="numeric-id"),
    ],
)
def test_invalid_input_is_raised_and_counted_by_reason(
    rig: Rig, kind: EventKind, message: object, reason: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        rig.handler(kind).process_message(message)

    assert caught.value.reason == reason
    assert rig.store.calls == []
    assert (
        rig.sample("parking_events_rejected_total", kind=kind.value, reason=reason) == 1
    )


def test_a_reentry_counts_the_old_visit_as_orphaned_at_info(
    rig: Rig, info_logs: pytest.LogCaptureFixture
) -> None:
    rig.store.script = [Transition(Outcome.OPENED, orphan=ENTRY)]

    rig.handler(EventKind.ENTRY).process_message(_entry("e2"))

    assert rig.sample("parking_visits_orphaned_total", cause="reentry") == 1
    assert rig.sink.orphans == [OrphanedVisit(ENTRY, OrphanCause.REENTRY)]
    assert _messages(info_logs, logging.INFO) == [
        "visit orphaned cause=reentry plate=ab-123 event=e1"
    ]


def test_a_late_earlier_entry_is_orphaned_at_info(
    rig: Rig, info_logs: pytest.LogCaptureFixture
) -> None:
    late = Visit("e0", "ab-123", ENTERED - timedelta(hours=1))
    rig.store.script = [Transition(Outcome.ORPHANED, orphan=late)]

    rig.handler(EventKind.ENTRY).process_message(_entry("e0"))

    assert rig.sample("parking_visits_orphaned_total", cause="late_entry") == 1
    assert rig.sink.recorded == []
    assert rig.sink.orphans == [OrphanedVisit(late, OrphanCause.LATE_ENTRY)]
    assert _messages(info_logs, logging.INFO) == [
        "visit orphaned cause=late_entry plate=ab-123 event=e0"
    ]


def test_an_unmatched_exit_after_grace_is_info_and_counted(
    rig: Rig, info_logs: pytest.LogCaptureFixture
) -> None:
    report_unmatched(UnmatchedExit(EXIT, UnmatchedWhy.GRACE_EXPIRED), rig.metrics)

    assert rig.sample("parking_exits_unmatched_total") == 1
    [record] = info_logs.records
    assert record.levelno == logging.INFO
    assert (
        record.getMessage() == "exit unmatched plate=AB 123 event=x1 why=grace_expired"
    )


def test_a_clamped_exit_is_counted_as_clock_skew_at_info(
    rig: Rig, info_logs: pytest.LogCaptureFixture
) -> None:
    early_exit = Visit("x1", "AB 123", ENTERED - timedelta(seconds=30))
    rig.store.script = [Transition(Outcome.MATCHED, entry=ENTRY, exit=early_exit)]

    rig.handler(EventKind.EXIT).process_message(_exit(at="2024-09-11T20:59:30Z"))

    [stay] = rig.sink.recorded
    assert stay.duration == timedelta(0)
    assert stay.clock_skew is True
    assert rig.sample("parking_clock_skew_total") == 1
    assert any(
        m.startswith("exit before entry clamped")
        for m in _messages(info_logs, logging.INFO)
    )


def test_processing_time_and_event_lag_are_observed(rig: Rig) -> None:
    rig.store.script = [Transition(Outcome.OPENED), Transition(Outcome.OPENED)]
    handler = rig.handler(EventKind.ENTRY)

    handler.process_message(_entry())
    # A camera clock ahead of ours must not give a negative lag.
    handler.process_message(_entry("e2", at="2024-09-11T23:00:00Z"))

    labels = {"kind": "entry"}
    processed = {"kind": "entry", "outcome": "opened"}
    assert (
        rig.registry.get_sample_value(
            "parking_event_processing_seconds_count", processed
        )
        == 2
    )
    assert rig.registry.get_sample_value("parking_event_lag_seconds_count", labels) == 2
    assert (
        rig.registry.get_sample_value("parking_event_lag_seconds_sum", labels)
        == (NOW - ENTERED).total_seconds()
    )


def test_an_entry_that_completes_a_stay_is_timed_apart_from_opening_ones(
    rig: Rig,
) -> None:
    # It posts the stay as an exit does: its time is not an opening entry's.
    rig.store.script = [Transition(Outcome.OPENED), MATCHED]
    handler = rig.handler(EventKind.ENTRY)

    handler.process_message(_entry())
    handler.process_message(_entry("e2"))

    def timed(outcome: str) -> float | None:
        return rig.registry.get_sample_value(
            "parking_event_processing_seconds_count",
            {"kind": "entry", "outcome": outcome},
        )

    assert (timed("opened"), timed("matched")) == (1, 1)
    assert len(rig.sink.recorded) == 1


def test_a_store_outage_propagates_and_counts_nothing(rig: Rig) -> None:
    rig.store.script = [StoreUnavailable("redis unavailable: ConnectionError")]

    with pytest.raises(StoreUnavailable):
        rig.handler(EventKind.EXIT).process_message(_exit())

    assert rig.sink.recorded == []
    assert rig.sample("parking_events_total", kind="exit", outcome="matched") == 0
    assert (
        rig.sample("parking_events_rejected_total", kind="exit", reason="bad_json") == 0
    )


def test_a_stay_carries_the_fee_of_its_car_parks_tariff(rig: Rig) -> None:
    entry = Visit("e1", "ab-123", ENTERED, lot_id="north")
    exit_ = Visit("x1", "AB 123", ENTERED + timedelta(minutes=41), lot_id="north")
    rig.store.script = [Transition(Outcome.MATCHED, entry=entry, exit=exit_)]

    rig.handler(EventKind.EXIT).process_message({**_exit(), "lot_id": "north"})

    [stay] = rig.sink.recorded
    # Three started 20-minute periods at 1.10, no free time.
    assert (stay.fee, stay.currency, stay.lot_id) == (Decimal("3.30"), "NZD", "north")
    [(_, event, _)] = rig.store.calls
    assert event.lot_id == "north"


def test_an_event_without_a_lot_belongs_to_the_default_one(rig: Rig) -> None:
    rig.store.script = [Transition(Outcome.OPENED)]

    rig.handler(EventKind.ENTRY).process_message(_entry())

    [(_, event, _)] = rig.store.calls
    assert event.lot_id == "main"


@pytest.mark.parametrize(
    ("lot", "reason"),
    [
        pytest.param("south", "unknown_lot", id="not-configured"),
        pytest.param("", "bad_lot", id="empty"),
        pytest.param(7, "bad_lot", id="number"),
        pytest.param("x" * 129, "bad_lot", id="too-long"),
    ],
)
def test_an_event_of_a_car_park_not_configured_is_refused(
    rig: Rig, lot: object, reason: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        rig.handler(EventKind.ENTRY).process_message({**_entry(), "lot_id": lot})

    assert caught.value.reason == reason
    assert rig.store.calls == []
    assert rig.sample("parking_events_rejected_total", kind="entry", reason=reason) == 1


def test_a_fuzzy_match_records_the_stay_flagged_and_counts_it_at_info(
    rig: Rig, info_logs: pytest.LogCaptureFixture
) -> None:
    misread = Visit("x1", "A8-123", EXITED)
    rig.store.script = [
        Transition(Outcome.MATCHED, entry=ENTRY, exit=misread, match=Match.FUZZY)
    ]

    rig.handler(EventKind.EXIT).process_message({**_exit(), "vehicle_plate": "A8-123"})

    [stay] = rig.sink.recorded
    assert (stay.plate, stay.match) == ("ab-123", Match.FUZZY)
    assert rig.sample("parking_misread_exits_total", result="fuzzy") == 1
    assert rig.sample("parking_stays_total") == 1
    [message] = _messages(info_logs, logging.INFO)
    assert message.startswith(
        "exit matched a misread plate read=A8-123 entry_plate=ab-123"
    )


def test_an_ambiguous_misread_waits_as_pending_and_is_counted(
    rig: Rig, info_logs: pytest.LogCaptureFixture
) -> None:
    rig.store.script = [Transition(Outcome.PENDING, exit=EXIT, ambiguous=2)]

    rig.handler(EventKind.EXIT).process_message(_exit())

    assert rig.sink.recorded == []
    assert rig.sample("parking_misread_exits_total", result="ambiguous") == 1
    assert _messages(info_logs, logging.INFO) == [
        "exit misread ambiguous plate=AB 123 event=x1 candidates=2"
    ]
