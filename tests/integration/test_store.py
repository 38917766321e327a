"""The visit ledger's Lua steps against the real Redis (a test database)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from redis.commands.core import Script
from redis.crc import key_slot

from parking.events import CameraEvent, EventKind
from parking.misreads import confusion_form
from parking.plates import normalise_plate
from parking.review import (
    OrphanCause,
    OrphanedVisit,
    Review,
    UnmatchedExit,
    UnmatchedWhy,
)
from parking.stays import Match, Stay, Visit
from parking.store import (
    BUCKETS,
    LedgerPolicy,
    Outcome,
    RedisVisitStore,
    TimeSlices,
    Transition,
)

POLICY = LedgerPolicy(
    duplicate_window=timedelta(seconds=5),
    clock_skew=timedelta(minutes=2),
    grace=timedelta(seconds=30),
    event_ttl=timedelta(days=7),
)
#: Processing time; event times below are camera times, set apart on purpose.
NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
T = datetime(2024, 9, 11, 21, 24, 56, 123456, tzinfo=UTC)
US = timedelta(microseconds=1)


LOTS = ("main", "north")


@pytest.fixture
def store(store_redis: redis.Redis) -> RedisVisitStore:
    return RedisVisitStore(store_redis, POLICY, prefix="ptest", lots=LOTS)


def _event(
    kind: EventKind, event_id: str, at: datetime, plate: str, lot: str = "main"
) -> CameraEvent:
    return CameraEvent(kind, event_id, plate, normalise_plate(plate), at, lot)


def _entry(
    event_id: str, at: datetime, plate: str = "AB-123", lot: str = "main"
) -> CameraEvent:
    return _event(EventKind.ENTRY, event_id, at, plate, lot)


def _exit(
    event_id: str, at: datetime, plate: str = "ab 123", lot: str = "main"
) -> CameraEvent:
    return _event(EventKind.EXIT, event_id, at, plate, lot)


def _micros(at: datetime) -> int:
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // US


def _visit(event: CameraEvent) -> Visit:
    return Visit(event.id, event.plate, event.at, event.lot_id)


def _unmatched(
    event: CameraEvent, why: UnmatchedWhy = UnmatchedWhy.GRACE_EXPIRED
) -> UnmatchedExit:
    return UnmatchedExit(_visit(event), why)


def test_an_entry_then_its_exit_match(store: RedisVisitStore) -> None:
    entry, exit_ = _entry("e1", T), _exit("x1", T + timedelta(minutes=26))

    opened = store.enter(entry, NOW)
    assert store.counts() == {"open": 1, "pending": 0}
    matched = store.leave(exit_, NOW)

    assert opened == Transition(Outcome.OPENED)
    assert matched == Transition(
        Outcome.MATCHED, entry=_visit(entry), exit=_visit(exit_)
    )
    assert store.counts() == {"open": 0, "pending": 0}


def test_times_keep_their_microseconds_through_the_store(
    store: RedisVisitStore,
) -> None:
    far = datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    store.enter(_entry("e1", far - timedelta(days=1, microseconds=1)), NOW)

    matched = store.leave(_exit("x1", far), NOW)

    assert matched.entry is not None
    assert matched.exit is not None
    assert matched.exit.at - matched.entry.at == timedelta(days=1, microseconds=1)


def test_an_exit_before_its_entry_waits_and_the_entry_completes_it(
    store: RedisVisitStore,
) -> None:
    exit_, entry = _exit("x1", T + timedelta(hours=1)), _entry("e1", T)

    pending = store.leave(exit_, NOW)
    assert store.counts() == {"open": 0, "pending": 1}
    matched = store.enter(entry, NOW + timedelta(seconds=3))

    assert pending == Transition(Outcome.PENDING)
    assert matched == Transition(
        Outcome.MATCHED, entry=_visit(entry), exit=_visit(exit_)
    )
    assert store.counts() == {"open": 0, "pending": 0}
    assert store.take_expired_exits(NOW + timedelta(days=1)) == []


def test_a_pending_exit_is_given_up_once_after_the_grace_period(
    store: RedisVisitStore,
) -> None:
    exit_ = _exit("x1", T)
    store.leave(exit_, NOW)
    due = NOW + POLICY.grace

    too_early = store.take_expired_exits(due - US)
    expired = store.take_expired_exits(due)
    again = store.take_expired_exits(due + timedelta(hours=1))

    assert too_early == []
    assert expired == [_unmatched(exit_)]
    assert again == []
    assert store.counts() == {"open": 0, "pending": 0}


def test_an_entry_after_the_grace_period_opens_a_visit_of_its_own(
    store: RedisVisitStore,
) -> None:
    store.leave(_exit("x1", T + timedelta(minutes=5)), NOW)
    store.take_expired_exits(NOW + POLICY.grace)

    late = store.enter(_entry("e1", T), NOW + POLICY.grace)

    assert late == Transition(Outcome.OPENED)
    assert store.counts() == {"open": 1, "pending": 0}


@pytest.mark.parametrize(
    ("steps", "first_outcome"),
    [
        pytest.param(["enter"], Outcome.OPENED, id="entry-opened"),
        pytest.param(["leave"], Outcome.PENDING, id="exit-pending"),
        pytest.param(["enter", "leave"], Outcome.MATCHED, id="exit-matched"),
    ],
)
def test_a_redelivered_event_is_a_duplicate_carrying_the_first_transition(
    store: RedisVisitStore, steps: list[str], first_outcome: Outcome
) -> None:
    entry, exit_ = _entry("e1", T), _exit("x1", T + timedelta(hours=1))
    first: Transition | None = None
    for step in steps:
        first = store.enter(entry, NOW) if step == "enter" else store.leave(exit_, NOW)
    counts = store.counts()

    last = steps[-1]
    again = store.enter(entry, NOW) if last == "enter" else store.leave(exit_, NOW)

    assert first is not None
    assert first.outcome is first_outcome
    assert again == Transition(Outcome.DUPLICATE, first=first)
    assert store.counts() == counts


@pytest.mark.parametrize("kind", ["entry", "exit"])
def test_an_event_stays_on_record_for_its_whole_lifetime_across_slices(
    store: RedisVisitStore, kind: str
) -> None:
    event = _entry("e1", T) if kind == "entry" else _exit("x1", T)
    step = store.enter if kind == "entry" else store.leave
    first = step(event, NOW)
    lifetime = POLICY.event_ttl

    # Redelivered at every quarter of its lifetime and just before its end:
    # each lookup crosses into another slice of processing time.
    for later in [lifetime * n / 4 for n in range(1, 4)] + [lifetime - US]:
        assert step(event, NOW + later) == Transition(Outcome.DUPLICATE, first=first)


def test_a_second_read_is_known_across_a_slice_boundary(
    store: RedisVisitStore,
) -> None:
    store.enter(_entry("e1", T), NOW)
    store.leave(_exit("x1", T + timedelta(hours=1)), NOW)

    # Processed most of an hour later (a backlog), in a later slice.
    late = NOW + timedelta(minutes=50)
    again = store.leave(_exit("x1b", T + timedelta(hours=1, seconds=1)), late)
    entry_again = store.enter(_entry("e1b", T + timedelta(seconds=1)), late)

    assert again.outcome is Outcome.DUPLICATE_READ
    assert entry_again.outcome is Outcome.DUPLICATE_READ
    assert store.counts() == {"open": 0, "pending": 0}


def _slice_starts(store: RedisVisitStore, now: datetime) -> datetime:
    """The next moment both of the store's slicings start a slice."""
    both = math.lcm(store.event_slices.length, store.read_slices.length)
    seconds = (now - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
    return datetime.fromtimestamp((seconds // both + 1) * both, UTC)


def test_a_worker_whose_clock_lags_finds_what_another_wrote_a_slice_ahead(
    store: RedisVisitStore,
) -> None:
    boundary = _slice_starts(store, NOW)
    behind = boundary - timedelta(milliseconds=1)
    entry, exit_ = _entry("e1", T), _exit("x1", T + timedelta(hours=1))
    # Applied by a worker whose clock has just crossed into the next slices,
    # then redelivered to one a millisecond behind it.
    store.enter(entry, boundary)
    first = store.leave(exit_, boundary)

    again = store.leave(exit_, behind)
    entry_again = store.enter(entry, behind)
    second_read = store.leave(_exit("x1b", T + timedelta(hours=1, seconds=1)), behind)

    assert first.outcome is Outcome.MATCHED
    assert again == Transition(Outcome.DUPLICATE, first=first)
    assert entry_again.outcome is Outcome.DUPLICATE
    assert second_read.outcome is Outcome.DUPLICATE_READ
    assert store.counts() == {"open": 0, "pending": 0}


@pytest.mark.parametrize(
    "lifetime",
    [timedelta(seconds=60), timedelta(days=1)],
    ids=["slices-shorter-than-the-margin", "slices-of-hours"],
)
def test_an_event_is_known_to_workers_whose_clocks_differ_by_the_margin(
    store_redis: redis.Redis, lifetime: timedelta
) -> None:
    policy = replace(POLICY, event_ttl=lifetime)
    store = RedisVisitStore(store_redis, policy, prefix="ptest", lots=LOTS)
    margin = timedelta(seconds=TimeSlices.CLOCK_MARGIN_SECONDS)
    boundary = _slice_starts(store, NOW)

    # Applied just before and just after a slice starts, then redelivered
    # to a worker whose clock lags by the margin, and, at the end of the
    # lifetime, to one whose clock leads by it.
    for n, applied in enumerate([boundary - timedelta(milliseconds=1), boundary]):
        entry, exit_ = _entry(f"e{n}", T), _exit(f"x{n}", T + timedelta(hours=1))
        opened = store.enter(entry, applied)
        matched = store.leave(exit_, applied)
        for redelivered in [applied - margin, applied + lifetime + margin]:
            again = store.enter(entry, redelivered)
            assert again == Transition(Outcome.DUPLICATE, first=opened)
            again = store.leave(exit_, redelivered)
            assert again == Transition(Outcome.DUPLICATE, first=matched)


def test_records_of_the_version_before_slices_are_still_honoured(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    # What that version left for a matched stay: one key per record.
    tag = store._tag(confusion_form("AB123"))
    matched = {
        "o": "matched",
        "entry": {"id": "e1", "plate": "AB-123", "at": str(_micros(T))},
        "exit": {
            "id": "x1",
            "plate": "ab 123",
            "at": str(_micros(T + timedelta(hours=1))),
        },
    }
    store_redis.set(f"{tag}:event:exit:main:x1", json.dumps(matched), ex=3600)
    store_redis.set(f"{tag}:last:main:AB123", _micros(T + timedelta(hours=1)), ex=3600)
    store_redis.set(f"{tag}:entered:main:AB123", _micros(T), ex=3600)

    redelivered = store.leave(_exit("x1", T + timedelta(hours=1)), NOW)
    second_exit_read = store.leave(_exit("x1b", T + timedelta(hours=1, seconds=2)), NOW)
    second_entry_read = store.enter(_entry("e1b", T + timedelta(seconds=2)), NOW)

    assert redelivered.outcome is Outcome.DUPLICATE
    assert redelivered.first == Transition.from_json(matched)
    assert second_exit_read.outcome is Outcome.DUPLICATE_READ
    assert second_entry_read.outcome is Outcome.DUPLICATE_READ
    assert store.counts() == {"open": 0, "pending": 0}


def test_the_key_count_does_not_grow_with_the_events(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    def stays(first: int, last: int) -> int:
        for n in range(first, last):
            plate = f"CAR{n:04d}"
            store.enter(_entry(f"e{n}", T, plate=plate), NOW)
            store.leave(_exit(f"x{n}", T + timedelta(hours=1), plate=plate), NOW)
        return store_redis.dbsize()

    after_a_few, after_many = stays(0, 200), stays(200, 700)

    # Per bucket: the entries and exits on record, and each side's reads.
    assert after_many <= 4 * BUCKETS
    assert after_many == after_a_few
    assert store.remembered_events(NOW) == 1400


def test_a_redelivered_matched_exit_still_names_both_sides(
    store: RedisVisitStore,
) -> None:
    entry, exit_ = _entry("e1", T), _exit("x1", T + timedelta(hours=1))
    store.enter(entry, NOW)
    store.leave(exit_, NOW)

    again = store.leave(exit_, NOW + timedelta(minutes=5))

    assert again.first is not None
    assert again.first.entry == _visit(entry)
    assert again.first.exit == _visit(exit_)
    stay = Stay.between(again.first.entry, again.first.exit)
    assert stay == Stay.between(_visit(entry), _visit(exit_))


def test_a_second_read_of_an_entry_within_the_window_is_one_event(
    store: RedisVisitStore,
) -> None:
    store.enter(_entry("e1", T), NOW)

    twice = store.enter(_entry("e2", T + timedelta(seconds=3)), NOW)
    before = store.enter(_entry("e3", T - timedelta(seconds=5)), NOW)

    assert twice.outcome is Outcome.DUPLICATE_READ
    assert before.outcome is Outcome.DUPLICATE_READ
    matched = store.leave(_exit("x1", T + timedelta(hours=1)), NOW)
    assert matched.entry is not None
    assert matched.entry.event_id == "e1"


def test_a_second_read_of_a_pending_exit_within_the_window_is_one_event(
    store: RedisVisitStore,
) -> None:
    store.leave(_exit("x1", T), NOW)

    twice = store.leave(_exit("x2", T + timedelta(seconds=2)), NOW)

    assert twice.outcome is Outcome.DUPLICATE_READ
    assert store.take_expired_exits(NOW + POLICY.grace) == [_unmatched(_exit("x1", T))]


def test_a_second_read_of_a_matched_exit_within_the_window_is_one_event(
    store: RedisVisitStore,
) -> None:
    store.enter(_entry("e1", T), NOW)
    store.leave(_exit("x1", T + timedelta(hours=1)), NOW)

    twice = store.leave(_exit("x2", T + timedelta(hours=1, seconds=2)), NOW)

    assert twice.outcome is Outcome.DUPLICATE_READ
    assert store.counts() == {"open": 0, "pending": 0}


def test_a_second_read_of_an_exit_an_entry_completed_is_one_event(
    store: RedisVisitStore,
) -> None:
    store.leave(_exit("x1", T + timedelta(hours=1)), NOW)
    store.enter(_entry("e1", T), NOW)

    twice = store.leave(_exit("x2", T + timedelta(hours=1, seconds=2)), NOW)

    assert twice.outcome is Outcome.DUPLICATE_READ
    assert store.counts() == {"open": 0, "pending": 0}


def test_reads_further_apart_than_the_window_are_separate_events(
    store: RedisVisitStore,
) -> None:
    first, later = _exit("x1", T), _exit("x2", T + timedelta(seconds=6))
    store.leave(first, NOW)

    second = store.leave(later, NOW)

    assert second == Transition(Outcome.PENDING)
    expired = store.take_expired_exits(NOW + POLICY.grace)
    assert sorted(expired, key=lambda u: u.exit.event_id) == [
        _unmatched(first),
        _unmatched(later),
    ]


# -- several pending exits of one plate --------------------------------------

#: A repeat visitor: in at 08:00, out at 09:00, in at 10:00, out at 11:00.
VISITS = [
    (_entry("e1", T), _exit("x1", T + timedelta(hours=1))),
    (_entry("e2", T + timedelta(hours=2)), _exit("x2", T + timedelta(hours=3))),
]


def test_two_exits_of_one_plate_both_wait_for_their_entries(
    store: RedisVisitStore,
) -> None:
    left = [store.leave(exit_, NOW) for _, exit_ in VISITS]

    assert left == [Transition(Outcome.PENDING), Transition(Outcome.PENDING)]
    # The pending figure counts plates: one plate, two exits.
    assert store.counts() == {"open": 0, "pending": 1}
    assert store.take_expired_exits(NOW + POLICY.grace - US) == []


@pytest.mark.parametrize(
    "order",
    [
        pytest.param([0, 1], id="entries-in-order"),
        pytest.param([1, 0], id="later-entry-first"),
    ],
)
def test_entries_after_both_exits_each_complete_their_own_exit(
    store: RedisVisitStore, order: list[int]
) -> None:
    for _, exit_ in VISITS:
        store.leave(exit_, NOW)

    matched = {n: store.enter(VISITS[n][0], NOW) for n in order}

    for n, (entry, exit_) in enumerate(VISITS):
        assert matched[n] == Transition(
            Outcome.MATCHED, entry=_visit(entry), exit=_visit(exit_)
        )
    assert store.counts() == {"open": 0, "pending": 0}
    assert store.take_expired_exits(NOW + timedelta(days=1)) == []


def test_an_entry_earlier_than_both_exits_takes_the_earlier_one(
    store: RedisVisitStore,
) -> None:
    # Exits at 09:00 and 11:00 (stored in the other order), an entry at 07:00.
    for _, exit_ in reversed(VISITS):
        store.leave(exit_, NOW)
    early = _entry("e0", T - timedelta(hours=1))

    matched = store.enter(early, NOW)

    assert matched.exit == _visit(VISITS[0][1])
    # The later exit still waits for the entry at 10:00.
    assert store.counts() == {"open": 0, "pending": 1}
    assert store.enter(VISITS[1][0], NOW).exit == _visit(VISITS[1][1])


def test_an_entry_after_every_exit_takes_the_latest_one_within_the_skew(
    store: RedisVisitStore,
) -> None:
    early = _exit("x1", T - POLICY.clock_skew)
    late = _exit("x2", T - timedelta(seconds=30))
    store.leave(early, NOW)
    store.leave(late, NOW)

    skewed = store.enter(_entry("e1", T), NOW)
    beyond = store.enter(_entry("e2", T + timedelta(seconds=10)), NOW)

    assert skewed.outcome is Outcome.MATCHED
    assert skewed.exit == _visit(late)
    # The one left is now more than the skew before the next entry.
    assert beyond == Transition(Outcome.OPENED)
    assert store.take_expired_exits(NOW + POLICY.grace) == [_unmatched(early)]


@pytest.mark.parametrize("of", [0, 1], ids=["first-exit", "second-exit"])
def test_a_second_read_of_either_pending_exit_is_one_event(
    store: RedisVisitStore, of: int
) -> None:
    for _, exit_ in VISITS:
        store.leave(exit_, NOW)
    read = VISITS[of][1]

    again = store.leave(_exit("x9", read.at + timedelta(seconds=2)), NOW)

    assert again.outcome is Outcome.DUPLICATE_READ
    expired = store.take_expired_exits(NOW + POLICY.grace)
    assert sorted(u.exit.event_id for u in expired) == ["x1", "x2"]


def test_a_sweep_takes_only_the_exits_whose_own_grace_is_over(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    (_, first), (entry, second) = VISITS
    store.leave(first, NOW)
    store.leave(second, NOW + timedelta(seconds=20))
    [index] = store_redis.scan_iter(match="*:pending:*")

    expired = store.take_expired_exits(NOW + POLICY.grace)

    assert expired == [_unmatched(first)]
    # The plate is due again when the exit left behind is.
    later_due = NOW + timedelta(seconds=20) + POLICY.grace
    assert store_redis.zscore(index, "AB123") == _micros(later_due)
    assert store.take_expired_exits(later_due - US) == []
    assert store.enter(entry, NOW).exit == _visit(second)
    assert store_redis.zcard(index) == 0


def test_a_match_scores_the_plate_by_the_exit_left_behind(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    (entry, first), (_, second) = VISITS
    store.leave(first, NOW)
    store.leave(second, NOW + timedelta(seconds=20))
    [index] = store_redis.scan_iter(match="*:pending:*")

    store.enter(entry, NOW)

    later_due = NOW + timedelta(seconds=20) + POLICY.grace
    assert store_redis.zscore(index, "AB123") == _micros(later_due)
    assert store.take_expired_exits(later_due - US) == []
    assert store.take_expired_exits(later_due) == [_unmatched(second)]
    assert store.counts() == {"open": 0, "pending": 0}


def test_a_reentry_without_an_exit_orphans_the_old_visit(
    store: RedisVisitStore,
) -> None:
    first, second = _entry("e1", T), _entry("e2", T + timedelta(hours=2))
    store.enter(first, NOW)

    reentry = store.enter(second, NOW)
    matched = store.leave(_exit("x1", T + timedelta(hours=3)), NOW)

    assert reentry == Transition(Outcome.OPENED, orphan=_visit(first))
    assert matched.entry == _visit(second)
    assert store.counts() == {"open": 0, "pending": 0}


def test_a_late_entry_earlier_than_the_open_visit_is_orphaned(
    store: RedisVisitStore,
) -> None:
    current, stale = _entry("e1", T), _entry("e0", T - timedelta(hours=1))
    store.enter(current, NOW)

    late = store.enter(stale, NOW)
    matched = store.leave(_exit("x1", T + timedelta(hours=1)), NOW)

    assert late == Transition(Outcome.ORPHANED, orphan=_visit(stale))
    assert matched.entry == _visit(current)


@pytest.mark.parametrize(
    "skew",
    [
        pytest.param(timedelta(seconds=1), id="one-second"),
        pytest.param(POLICY.clock_skew, id="at-the-tolerance"),
    ],
)
def test_an_exit_stamped_before_its_entry_within_the_skew_matches(
    store: RedisVisitStore, skew: timedelta
) -> None:
    entry, exit_ = _entry("e1", T), _exit("x1", T - skew)
    store.enter(entry, NOW)

    matched = store.leave(exit_, NOW)

    assert matched.outcome is Outcome.MATCHED
    assert matched.exit == _visit(exit_)
    assert matched.entry is not None
    stay = Stay.between(matched.entry, matched.exit)
    assert stay.duration == timedelta(0)
    assert stay.clock_skew is True


def test_an_exit_stamped_before_its_entry_beyond_the_skew_waits(
    store: RedisVisitStore,
) -> None:
    store.enter(_entry("e1", T), NOW)

    far_earlier = store.leave(_exit("x1", T - POLICY.clock_skew - US), NOW)

    assert far_earlier == Transition(Outcome.PENDING)
    assert store.counts() == {"open": 1, "pending": 1}


@pytest.mark.parametrize(
    ("after", "outcome", "counts"),
    [
        pytest.param(
            timedelta(seconds=90),
            Outcome.MATCHED,
            {"open": 0, "pending": 0},
            id="within-skew",
        ),
        pytest.param(
            POLICY.clock_skew + US,
            Outcome.OPENED,
            {"open": 1, "pending": 1},
            id="beyond-skew",
        ),
    ],
)
def test_an_entry_later_than_its_pending_exit_uses_the_same_skew(
    store: RedisVisitStore, after: timedelta, outcome: Outcome, counts: dict[str, int]
) -> None:
    store.leave(_exit("x1", T), NOW)

    entered = store.enter(_entry("e1", T + after), NOW)

    assert entered.outcome is outcome
    assert store.counts() == counts


def test_visits_open_too_long_are_taken_once(store: RedisVisitStore) -> None:
    old, young = _entry("e1", T), _entry("e2", T, plate="ZZ-999")
    store.enter(old, NOW)
    store.enter(young, NOW + timedelta(hours=1))

    none = store.take_stale_visits(NOW - US)
    stale = store.take_stale_visits(NOW)
    again = store.take_stale_visits(NOW)

    assert none == []
    assert stale == [OrphanedVisit(_visit(old), OrphanCause.MAX_STAY)]
    assert again == []
    assert store.counts() == {"open": 1, "pending": 0}
    # The orphaned visit is gone: its late exit now waits for an entry.
    assert store.leave(_exit("x1", T + timedelta(hours=80)), NOW).outcome is (
        Outcome.PENDING
    )


def test_counts_add_up_over_every_bucket(store: RedisVisitStore) -> None:
    plates = [f"P{n:03d}" for n in range(40)]
    for n, plate in enumerate(plates):
        store.enter(_entry(f"e{n}", T, plate=plate), NOW)
    for n, plate in enumerate(plates[:10]):
        store.leave(_exit(f"x{n}", T + timedelta(hours=1), plate=plate), NOW)
    for n in range(7):
        store.leave(_exit(f"u{n}", T, plate=f"UNKNOWN{n}"), NOW)

    assert store.counts() == {"open": 30, "pending": 7}
    assert len(store.take_stale_visits(NOW)) == 30
    assert len(store.take_expired_exits(NOW + POLICY.grace)) == 7
    assert store.counts() == {"open": 0, "pending": 0}


def _busy_day(store: RedisVisitStore) -> None:
    """Every kind of step once or more, for tests about the keys they leave."""
    store.enter(_entry("e1", T), NOW)
    store.enter(_entry("e1", T), NOW)
    store.enter(_entry("e1b", T + timedelta(seconds=2)), NOW)
    store.leave(_exit("x1", T + timedelta(hours=1)), NOW)
    store.leave(_exit("x1b", T + timedelta(hours=1, seconds=1)), NOW)
    store.leave(_exit("x2", T, plate="NEVER-IN"), NOW)
    store.leave(_exit("x3", T + timedelta(minutes=1), plate="NEVER-IN"), NOW)
    store.leave(_exit("x4", T, plate="LATE-1"), NOW)
    store.enter(_entry("e4", T - timedelta(hours=1), plate="LATE-1"), NOW)
    store.enter(_entry("e5", T, plate="STAYS-1"), NOW)
    store.enter(_entry("e6", T + timedelta(hours=1), plate="STAYS-1"), NOW)
    store.enter(_entry("e7", T, plate="STAYS-1"), NOW)
    store.enter(_entry("e8", T, plate="GONE-1"), NOW)
    store.leave(_exit("x9", T, plate="GIVEN-UP"), NOW)
    store.enter(_entry("e11", T, plate="SO-1"), NOW)
    store.leave(_exit("x12", T + timedelta(hours=1), plate="S0-1"), NOW)
    store.take_expired_exits(NOW + POLICY.grace)
    store.take_stale_visits(NOW)
    store.enter(_entry("e10", T, plate="STILL-IN"), NOW + timedelta(seconds=1))


def test_every_key_but_open_visits_and_indexes_expires(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    _busy_day(store)
    store.leave(_exit("x11", T, plate="WAITING"), NOW + timedelta(seconds=1))

    kinds: dict[str, int] = {}
    for raw in store_redis.scan_iter(count=1000):
        key = raw.decode()
        kind = key.split(":")[2]
        kinds[kind] = kinds.get(kind, 0) + 1
        ttl = store_redis.ttl(key)
        if kind in ("visit", "open", "pending", "similar", "outbox"):
            assert ttl == -1, key
        else:
            assert ttl > 0, f"{key} has no TTL"

    # Open visits and pending exits that the sweep has not taken are all
    # that is left of them, with their indexes; the review outbox empties
    # as the API takes its records; everything else is bounded by its TTL.
    assert kinds.get("visit") == 1
    assert kinds.get("exits") == 1
    # What is kept for a while lives in time slices, not a key per item:
    # every event of the day is on record in one slice per bucket and kind.
    assert store.remembered_events(NOW) >= 15
    assert kinds.get("events", 0) <= 2 * BUCKETS
    # The exact exit's plate, the misread exit's plate and its visit's, and
    # the plate whose waiting exit a late entry completed.
    exit_reads = store_redis.scan_iter(match="*:exit-reads:*")
    assert sum(store_redis.hlen(key) for key in exit_reads) == 4
    assert not {"event", "last", "entered"} & kinds.keys()
    assert kinds.get("similar") == 1
    [similar] = store_redis.scan_iter(match="*:similar:*")
    assert store_redis.smembers(similar) == {b"STILLIN"}
    assert store.counts() == {"open": 1, "pending": 1}
    store.reviewed(store.waiting_reviews())
    assert list(store_redis.scan_iter(match="*:outbox")) == []


def test_bookkeeping_keys_live_as_long_as_the_policy_says(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    store.leave(_exit("x1", T), NOW)

    ttls = {
        raw.decode().split(":")[2]: store_redis.ttl(raw)
        for raw in store_redis.scan_iter()
    }

    # An event is on record for at least the policy's TTL and twice the
    # clocks' margin (a reader's and Redis's), at most the slices a lookup
    # reads ahead, and its own, more.
    week = int(POLICY.event_ttl.total_seconds())
    margin = TimeSlices.CLOCK_MARGIN_SECONDS
    slices = store.event_slices
    most = week + (slices.ahead + 1) * slices.length + margin
    assert week + 2 * margin <= ttls["events"] <= most + 1
    # A pending exit outlives its grace period until a sweep can take it.
    assert ttls["exits"] > POLICY.grace.total_seconds()


@pytest.fixture
def script_keys(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The keys of every Lua call the store makes, however it is sent."""
    calls: list[list[str]] = []
    original = Script.__call__

    def recording(
        self: Script, keys: list[Any] | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        calls.append([str(key) for key in keys or []])
        return original(self, keys, *args, **kwargs)

    monkeypatch.setattr(Script, "__call__", recording)
    return calls


def _hash_tag(key: str) -> str:
    found = re.search(r"\{([^}]+)\}", key)
    assert found is not None, f"{key} has no hash tag"
    return found.group(1)


def test_the_keys_of_one_step_share_one_hash_tag(
    store: RedisVisitStore, script_keys: list[list[str]]
) -> None:
    _busy_day(store)

    assert len(script_keys) >= 17
    tags = set()
    for keys in script_keys:
        step_tags = {_hash_tag(key) for key in keys}
        assert len(step_tags) == 1, keys
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
        tags |= step_tags
    # The plates of the day spread over more than one bucket.
    assert len(tags) > 1


def test_a_matched_exit_is_remembered_while_a_second_read_may_lag(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    store.enter(_entry("e1", T), NOW)
    store.leave(_exit("x1", T + timedelta(hours=1)), NOW)

    [reads] = store_redis.scan_iter(match="*:exit-reads:*")

    # The window is in event time; a second read stuck behind a backlog for
    # longer than the window must still be merged, not become a pending exit.
    assert store_redis.ttl(reads) >= POLICY.grace.total_seconds()
    assert store_redis.hkeys(reads) == [b"AB123"]


# -- misread plates ----------------------------------------------------------


def test_a_misread_exit_completes_the_one_visit_a_misread_away(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    entry = _entry("e1", T, plate="ABC-1234")
    exit_ = _exit("x1", T + timedelta(hours=1), plate="A8C 1234")
    store.enter(entry, NOW)

    matched = store.leave(exit_, NOW)

    assert matched == Transition(
        Outcome.MATCHED, entry=_visit(entry), exit=_visit(exit_), match=Match.FUZZY
    )
    assert store.counts() == {"open": 0, "pending": 0}
    assert list(store_redis.scan_iter(match="*:similar:*")) == []
    # A redelivery still says how it matched.
    again = store.leave(exit_, NOW)
    assert again.first == matched


@pytest.mark.parametrize(
    ("second_read", "outcome"),
    [
        pytest.param("A8C1234", Outcome.DUPLICATE_READ, id="same-misread"),
        pytest.param("ABC1234", Outcome.DUPLICATE_READ, id="read-right"),
    ],
)
def test_a_second_read_of_a_misread_exit_is_one_event(
    store: RedisVisitStore, second_read: str, outcome: Outcome
) -> None:
    store.enter(_entry("e1", T, plate="ABC1234"), NOW)
    store.leave(_exit("x1", T + timedelta(hours=1), plate="A8C1234"), NOW)

    again = store.leave(
        _exit("x2", T + timedelta(hours=1, seconds=2), plate=second_read), NOW
    )

    assert again.outcome is outcome
    assert store.counts() == {"open": 0, "pending": 0}


def test_a_second_read_of_the_entry_after_a_fuzzy_match_opens_nothing(
    store: RedisVisitStore,
) -> None:
    store.enter(_entry("e1", T, plate="ABC1234"), NOW)
    store.leave(_exit("x1", T + timedelta(hours=1), plate="A8C1234"), NOW)

    late_read = store.enter(_entry("e2", T + timedelta(seconds=1), "ABC1234"), NOW)

    assert late_read.outcome is Outcome.DUPLICATE_READ
    assert store.counts() == {"open": 0, "pending": 0}


def test_several_visits_a_misread_away_leave_the_exit_unmatched(
    store: RedisVisitStore,
) -> None:
    for n, plate in enumerate(("AB0123", "ABD123", "XB0123")):
        store.enter(_entry(f"e{n}", T, plate=plate), NOW)
    exit_ = _exit("x1", T + timedelta(hours=1), plate="ABO123")

    pending = store.leave(exit_, NOW)

    assert pending == Transition(Outcome.PENDING, exit=_visit(exit_), ambiguous=2)
    assert store.counts() == {"open": 3, "pending": 1}
    expired = store.take_expired_exits(NOW + POLICY.grace)
    assert expired == [_unmatched(exit_, UnmatchedWhy.AMBIGUOUS)]


@pytest.mark.parametrize(
    ("max_positions", "outcome"),
    [
        pytest.param(1, Outcome.PENDING, id="one-allowed"),
        pytest.param(2, Outcome.MATCHED, id="two-allowed"),
        pytest.param(0, Outcome.PENDING, id="exact-only"),
    ],
)
def test_the_number_of_misread_positions_is_bounded_by_the_policy(
    store_redis: redis.Redis, max_positions: int, outcome: Outcome
) -> None:
    policy = LedgerPolicy(misread_max_positions=max_positions)
    store = RedisVisitStore(store_redis, policy, prefix="ptest")
    store.enter(_entry("e1", T, plate="SOB-100"), NOW)

    exit_plate = "S0B-10O" if max_positions != 0 else "S0B-100"
    left = store.leave(_exit("x1", T + timedelta(hours=1), plate=exit_plate), NOW)

    assert left.outcome is outcome


@pytest.mark.parametrize(
    "exit_plate",
    [
        pytest.param("ABC1235", id="not-confusable"),
        pytest.param("ABC12344", id="longer"),
        pytest.param("ABC123", id="shorter"),
    ],
)
def test_plates_that_are_no_misread_do_not_match(
    store: RedisVisitStore, exit_plate: str
) -> None:
    store.enter(_entry("e1", T, plate="ABC1234"), NOW)

    left = store.leave(_exit("x1", T + timedelta(hours=1), plate=exit_plate), NOW)

    assert left.outcome is Outcome.PENDING
    assert store.counts() == {"open": 1, "pending": 1}


def test_a_misread_candidate_must_have_entered_before_the_exit(
    store: RedisVisitStore,
) -> None:
    store.enter(_entry("e1", T + timedelta(hours=2), plate="ABC1234"), NOW)

    left = store.leave(_exit("x1", T, plate="A8C1234"), NOW)

    assert left.outcome is Outcome.PENDING
    assert store.counts() == {"open": 1, "pending": 1}


def test_an_open_visit_of_the_exact_plate_rules_out_a_misread(
    store: RedisVisitStore,
) -> None:
    # The exit is long before the visit of its own plate: an earlier visit
    # whose entry was never seen, not a misread of the look-alike's.
    store.enter(_entry("e1", T, plate="ABC1234"), NOW)
    store.enter(_entry("e2", T, plate="A8C1234"), NOW)

    left = store.leave(_exit("x1", T - timedelta(hours=1), plate="A8C1234"), NOW)

    assert left.outcome is Outcome.PENDING
    assert store.counts() == {"open": 2, "pending": 1}


def test_a_stale_visit_is_no_misread_candidate_any_more(
    store: RedisVisitStore, store_redis: redis.Redis
) -> None:
    store.enter(_entry("e1", T, plate="ABC1234"), NOW)
    store.take_stale_visits(NOW)

    left = store.leave(_exit("x1", T + timedelta(hours=1), plate="A8C1234"), NOW)

    assert left.outcome is Outcome.PENDING
    assert list(store_redis.scan_iter(match="*:similar:*")) == []


def test_plates_one_misread_apart_share_one_hash_tag(
    store: RedisVisitStore, script_keys: list[list[str]]
) -> None:
    plates = ["OIL-1", "0IL-1", "DLI-1", "Q1L-I"]
    for n, plate in enumerate(plates):
        store.enter(_entry(f"e{n}", T, plate=plate), NOW)

    tags = {_hash_tag(key) for keys in script_keys for key in keys}
    assert len(tags) == 1


# -- car parks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "exit_plate",
    [pytest.param("ABC1234", id="exact"), pytest.param("A8C1234", id="misread")],
)
def test_an_exit_matches_only_within_its_car_park(
    store: RedisVisitStore, exit_plate: str
) -> None:
    store.enter(_entry("e1", T, plate="ABC1234", lot="north"), NOW)

    left = store.leave(_exit("x1", T + timedelta(hours=1), exit_plate), NOW)

    assert left.outcome is Outcome.PENDING
    assert store.counts_by_lot() == {
        "main": {"open": 0, "pending": 1},
        "north": {"open": 1, "pending": 0},
    }


def test_visits_and_sweeps_carry_their_car_park(store: RedisVisitStore) -> None:
    entry = _entry("e1", T, plate="N-1", lot="north")
    exit_ = _exit("x1", T + timedelta(hours=1), plate="N-1", lot="north")
    store.enter(entry, NOW)
    matched = store.leave(exit_, NOW)
    lost = _exit("x2", T, plate="N-2", lot="north")
    store.leave(lost, NOW)
    stale = _entry("e3", T, plate="N-3", lot="north")
    store.enter(stale, NOW)

    assert matched.entry is not None
    assert matched.entry.lot_id == "north"
    assert store.take_expired_exits(NOW + POLICY.grace) == [_unmatched(lost)]
    assert store.take_stale_visits(NOW) == [
        OrphanedVisit(_visit(stale), OrphanCause.MAX_STAY)
    ]


# -- the review outbox -------------------------------------------------------


def test_what_a_sweep_takes_waits_in_the_outbox_until_reviewed(
    store: RedisVisitStore,
) -> None:
    lost = _exit("x1", T, plate="LOST-1")
    stale = _entry("e1", T, plate="OLD-1", lot="north")
    store.leave(lost, NOW)
    store.enter(stale, NOW)
    expired = store.take_expired_exits(NOW + POLICY.grace)
    orphaned = store.take_stale_visits(NOW)

    waiting = store.waiting_reviews()
    # Taking again finds nothing new: the records are out of the indexes.
    assert store.take_expired_exits(NOW + POLICY.grace) == []
    assert store.take_stale_visits(NOW) == []
    taken: list[Review] = [*expired, *orphaned]
    assert {item.key: item for item in waiting} == {item.key: item for item in taken}
    assert len(waiting) == 2
    store.reviewed(waiting[:1])
    assert store.waiting_reviews() == waiting[1:]
    store.reviewed(waiting)
    assert store.waiting_reviews() == []
