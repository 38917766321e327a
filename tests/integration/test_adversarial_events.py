"""Adversarial: odd but valid events, redelivery races, reordering, sweeps.

Events go through the real broker to an embedded worker, or straight into
the handlers from many threads at once (the same classes the workers run),
against the test's Redis database and a real summary API. Every check is on
what the CSVs hold.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.messaging import Producer
from prometheus_client import REGISTRY

from parking.events import EventKind
from parking.sweeper import Sweeper
from tests.services import ApiServer, wait_until
from tests.traffic import (
    T0,
    PlannedStay,
    check_ledger,
    entry_event,
    exit_event,
    plan_stays,
    read_rows,
)
from workers import runtime
from workers.tasks import PROCESSORS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded_worker(
    celery_app: Celery, celery_worker_parameters: dict[str, Any]
) -> Iterator[Any]:
    """One embedded worker for the whole module: each stop costs seconds."""
    with start_worker(celery_app, pool="solo", **celery_worker_parameters) as worker:
        yield worker


def _outcomes(outcome: str) -> float:
    return sum(
        REGISTRY.get_sample_value(
            "parking_events_total", {"kind": kind, "outcome": outcome}
        )
        or 0.0
        for kind in ("entry", "exit")
    )


def _rows_of(server: ApiServer) -> Callable[[], list[dict[str, str]]]:
    return lambda: read_rows(server.csv)


def _send(kind: str, event: dict[str, Any], task_id: str | None = None) -> None:
    PROCESSORS[EventKind(kind)].apply_async((event,), task_id=task_id)


# -- odd but valid input through the broker ---------------------------------

#: (entry time, exit time, duration, clock skew) as a camera may write them.
ODD_TIMES = [
    pytest.param(
        # Both sides of the date line: 09:30Z and 10:00Z on the same day.
        "2024-01-01T23:30:00+14:00",
        "2023-12-31T22:00:00-12:00",
        "1800",
        "false",
        id="plus14-minus12",
    ),
    pytest.param(
        "2024-02-29t12:00:00.000000001z",
        "2024-03-01 12:00:00.5Z",
        "86400.5",
        "false",
        id="lowercase-space-nanos",
    ),
    pytest.param(
        "1970-01-01T00:00:00Z",
        "2099-12-31T23:59:59.999999999+00:00",
        "4102444799.999999",
        "false",
        id="first-to-last-instant",
    ),
    pytest.param(
        # The exit camera's clock is a minute behind (-00:00 is UTC too).
        "2024-06-30T23:59:59.999999999-00:00",
        "2024-07-01T00:00:00+00:01",
        "0",
        "true",
        id="skewed-across-midnight",
    ),
]


@pytest.mark.parametrize(("entered", "left", "duration", "skew"), ODD_TIMES)
def test_odd_but_valid_times_give_the_exact_stay(
    api_server: ApiServer,
    embedded_worker: Any,
    entered: str,
    left: str,
    duration: str,
    skew: str,
) -> None:
    _send("exit", {"id": "odd-out", "vehicle_plate": "ODD1", "exit_date_time": left})
    _send(
        "entry", {"id": "odd-in", "vehicle_plate": "ODD1", "entry_date_time": entered}
    )
    wait_until(lambda: len(read_rows(api_server.csv)) == 1)
    (row,) = read_rows(api_server.csv)
    assert Decimal(row["duration_seconds"]) == Decimal(duration)
    assert row["clock_skew"] == skew
    assert row["fee"] != ""
    assert runtime.store().counts() == {"open": 0, "pending": 0}


def test_odd_ids_and_plates_pair_as_the_camera_meant(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    t = "2024-03-01T08:00:00Z"
    later = "2024-03-01T09:00:00Z"
    pairs = [
        # Decomposed at the entry, composed at the exit; ids that differ
        # only by white space are two events.
        (("  a  ", "A\u0308BC1"), ("a", "ÄBC1"), "ÄBC1"),
        # An id of 128 emoji; an id that looks like a Redis key.
        (("😀" * 128, "京a 12345"), ("x:{b1}:event:y", "京A-12345"), "京a 12345"),
        (("tab\u00e9", "ab-12 3"), ("tab\u00e9-out", "AB123"), "ab-12 3"),
    ]
    for (entry_id, entry_plate), (exit_id, exit_plate), _ in pairs:
        _send("exit", {"id": exit_id, "vehicle_plate": exit_plate,
                       "exit_date_time": later, "lot_id": None})  # fmt: skip
        _send("entry", {"id": entry_id, "vehicle_plate": entry_plate,
                        "entry_date_time": t})  # fmt: skip
    wait_until(lambda: len(read_rows(api_server.csv)) == len(pairs))
    plates = sorted(row["vehicle_plate"] for row in read_rows(api_server.csv))
    assert plates == sorted(shown for _, _, shown in pairs)
    assert {row["duration_seconds"] for row in read_rows(api_server.csv)} == {"3600"}
    assert runtime.store().counts() == {"open": 0, "pending": 0}


# -- redelivery and races ------------------------------------------------------


def test_one_message_published_by_two_publishers_at_once_is_one_stay(
    api_server: ApiServer, embedded_worker: Any, celery_app: Celery
) -> None:
    stays = plan_stays(25, "PAIR", seed=3)
    events = [("entry", s.entry) for s in stays] + [("exit", s.exit) for s in stays]
    random.Random(5).shuffle(events)
    duplicates = _outcomes("duplicate")
    start = threading.Barrier(2)

    def publish() -> None:
        with celery_app.connection_for_write() as connection:
            producer = Producer(connection)
            start.wait()
            for n, (kind, event) in enumerate(events):
                PROCESSORS[EventKind(kind)].apply_async(
                    (event,), task_id=f"same-{n}", producer=producer
                )

    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(publish) for _ in range(2)]:
            done.result()

    wait_until(lambda: _outcomes("duplicate") - duplicates == len(events), timeout=60)
    check = check_ledger(read_rows(api_server.csv), stays)
    assert check.exact, str(check)


def test_exits_before_entries_at_scale_with_random_delays(
    api_server: ApiServer, embedded_worker: Any, celery_app: Celery
) -> None:
    stays = plan_stays(200, "LATE", seed=13)
    exits = [("exit", s.exit) for s in stays]
    entries = [("entry", s.entry) for s in stays]
    rng = random.Random(17)
    rng.shuffle(exits)
    rng.shuffle(entries)

    def publish(part: list[tuple[str, dict[str, Any]]], seed: int) -> None:
        pause = random.Random(seed)
        with celery_app.connection_for_write() as connection:
            producer = Producer(connection)
            for kind, event in part:
                PROCESSORS[EventKind(kind)].apply_async((event,), producer=producer)
                time.sleep(pause.random() / 500)

    # Four publishers each: exits first, then the entries.
    for batch in (exits, entries):
        with ThreadPoolExecutor(max_workers=4) as pool:
            for done in [
                pool.submit(publish, batch[n::4], n) for n in range(4)
            ]:  # fmt: skip
                done.result()

    wait_until(lambda: len(read_rows(api_server.csv)) >= len(stays), timeout=90)
    check = check_ledger(read_rows(api_server.csv), stays)
    assert check.exact, str(check)
    assert runtime.store().counts() == {"open": 0, "pending": 0}


def test_entry_and_exit_of_one_plate_raced_from_many_threads(
    api_server: ApiServer,
) -> None:
    """Each read delivered several times and read twice by its camera, all
    at once: one stay, whatever wins."""
    at = T0 + timedelta(hours=3)
    reads = [
        ("entry", entry_event("race-in", "RACE1", at)),
        ("entry", entry_event("race-in-2", "RACE1", at + timedelta(seconds=1))),
        ("exit", exit_event("race-out", "RACE1", at + timedelta(hours=1))),
        ("exit", exit_event("race-out-2", "RACE1", at + timedelta(hours=1, seconds=2))),
    ] * 6  # fmt: skip
    random.Random(23).shuffle(reads)
    handlers = {
        "entry": runtime.entry_processor(),
        "exit": runtime.exit_processor(),
    }
    start = threading.Barrier(len(reads))

    def apply(item: tuple[str, dict[str, Any]]) -> str:
        kind, event = item
        start.wait()
        return handlers[kind].process_message(event).outcome.value

    with ThreadPoolExecutor(max_workers=len(reads)) as pool:
        outcomes = Counter(pool.map(apply, reads))

    assert outcomes["matched"] == 1, outcomes
    (row,) = read_rows(api_server.csv)
    seconds = Decimal(row["duration_seconds"])
    assert Decimal(3600 - 1) <= seconds <= Decimal(3600 + 2)
    assert runtime.store().counts() == {"open": 0, "pending": 0}


class _Sweeping:
    """A sweep clock that walks through the exits' due times, a step a call:
    each sweep takes a few more exits while their entries are being applied."""

    def __init__(self, first: datetime, last: datetime, steps: int) -> None:
        self._at = first
        self._step = (last - first) / steps
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            self._at += self._step
            return self._at


def test_sweeps_racing_matches_give_each_stay_one_fate(api_server: ApiServer) -> None:
    """An exit either completes its stay or is unmatched (and its entry opens
    a visit); never both, never neither."""
    stays = plan_stays(120, "SWEPT", seed=29)
    exits, entries = runtime.exit_processor(), runtime.entry_processor()
    grace = timedelta(seconds=runtime.settings().grace_seconds)
    first_due = datetime.now(UTC) + grace
    for stay in stays:
        exits.process_message(stay.exit)
    last_due = datetime.now(UTC) + grace
    sweeper = Sweeper(
        runtime.store(),
        runtime.sink(),
        _Sweeping(first_due, last_due, steps=40),
        runtime._metrics(),
        runtime.lots(),
        timedelta(hours=72),
        entry_backlog=lambda: 0,
    )
    arriving = [stay.entry for stay in stays]
    random.Random(31).shuffle(arriving)
    done = threading.Event()
    swept: list[int] = []

    def sweep_until_done() -> None:
        while not done.is_set():
            swept.append(sweeper.sweep().unmatched)

    sweeping = threading.Thread(target=sweep_until_done)
    sweeping.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(entries.process_message, arriving))
    finally:
        done.set()
        sweeping.join()
    # Whatever is still pending is due now; what was swept is posted.
    late = Sweeper(
        runtime.store(), runtime.sink(), _Sweeping(last_due, last_due, 1),
        runtime._metrics(), runtime.lots(), timedelta(hours=72),
    )  # fmt: skip
    swept.append(late.sweep().unmatched)

    rows = {row["vehicle_plate"] for row in read_rows(api_server.csv)}
    unmatched_csv = api_server.settings.unmatched_csv_path
    unmatched = {row["vehicle_plate"] for row in read_rows(unmatched_csv)}
    assert not rows & unmatched, "a stay written and its exit unmatched"
    assert rows | unmatched == {stay.plate for stay in stays}
    assert sum(swept) == len(unmatched)
    assert runtime.store().counts() == {"open": len(unmatched), "pending": 0}


def test_a_repeat_visitor_whose_exits_came_first_gets_two_right_stays(
    api_server: ApiServer,
) -> None:
    """A van in at 08:00, out at 09:00, in at 10:00, out at 11:00; the entry
    worker was down, so both exits are processed before either entry."""
    first = PlannedStay("VAN1", T0, T0 + timedelta(hours=1))
    second = PlannedStay("VAN1", T0 + timedelta(hours=2), T0 + timedelta(hours=3))
    exits, entries = runtime.exit_processor(), runtime.entry_processor()
    for stay in (first, second):
        exits.process_message(stay.exit)
    for stay in (first, second):
        entries.process_message(stay.entry)

    durations = sorted(row["duration_seconds"] for row in read_rows(api_server.csv))
    assert durations == ["3600", "3600"], "each visit billed for its own hour"


def test_an_exit_that_reuses_its_entry_number_is_still_an_exit(
    api_server: ApiServer,
) -> None:
    """Each camera numbers its own reads: the entry gate's read 17 and the
    exit gate's read 17 are two events."""
    at = T0 + timedelta(hours=5)
    runtime.entry_processor().process_message(entry_event("17", "NUM1", at))
    runtime.exit_processor().process_message(
        exit_event("17", "NUM1", at + timedelta(minutes=30))
    )
    assert [row["duration_seconds"] for row in read_rows(api_server.csv)] == ["1800"]
