"""The stay ledger's guarantees through the real broker, Redis and summary API.

Events go through RabbitMQ to the embedded worker, the store is the test's
Redis database and the stays land in the CSV of a real API server, so every
guarantee is checked where it must hold: in the rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from prometheus_client import REGISTRY

from beat_schedule import build_schedule
from parking.events import EventKind
from parking.settings import Settings, get_settings
from parking.store import RedisVisitStore
from tests.services import ApiServer, wait_until
from tests.traffic import (
    T0,
    PlannedStay,
    check_ledger,
    entry_event,
    exit_event,
    plan_stays,
    read_rows,
    shuffled_events,
)
from workers import runtime
from workers.runtime import ledger_policy
from workers.tasks import PROCESSORS, sweep

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded_worker(
    celery_app: Celery, celery_worker_parameters: dict[str, Any]
) -> Iterator[Any]:
    """One embedded worker for the whole module: each stop costs seconds."""
    with start_worker(celery_app, pool="solo", **celery_worker_parameters) as worker:
        yield worker


def _send(kind: str, event: dict[str, Any], task_id: str | None = None) -> None:
    PROCESSORS[EventKind(kind)].apply_async((event,), task_id=task_id)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _outcomes(outcome: str) -> float:
    return sum(
        _sample("parking_events_total", kind=kind, outcome=outcome)
        for kind in ("entry", "exit")
    )


def _counts() -> dict[str, int]:
    return runtime.store().counts()


def _sweep() -> dict[str, int]:
    """The beat-scheduled task, run here so the test sees its result."""
    result: dict[str, int] = sweep.apply().get()
    return result


def test_every_message_delivered_twice_writes_one_row_per_stay(
    api_server: ApiServer, embedded_worker: Any, test_settings: Settings
) -> None:
    stays = [
        *plan_stays(40, "TWICE"),
        PlannedStay("ÄÖ-123", T0, T0 + timedelta(hours=2, microseconds=5)),
        PlannedStay("京A12345", T0, T0 + timedelta(minutes=3)),
    ]
    events = shuffled_events(stays)
    duplicates = _outcomes("duplicate")

    # A redelivery is the same message again (same task id); a producer that
    # repeats a publish after a lost confirm sends a new message of the same
    # event. Half the events get each.
    for n, (kind, event) in enumerate(events):
        task_id = f"twice-{n}" if n % 2 else None
        _send(kind, event, task_id)
        _send(kind, event, task_id)

    wait_until(lambda: _outcomes("duplicate") - duplicates == len(events), timeout=60)
    check = check_ledger(read_rows(api_server.csv), stays)
    assert check.exact, str(check)

    # The API restarted, as a new process would: it knows the written stays
    # from the file alone, so a third delivery of everything adds no row.
    api_server.stop()
    restarted = ApiServer(test_settings)
    restarted.start()
    try:
        runtime.configure(
            test_settings.model_copy(update={"summary_api_url": restarted.url})
        )
        for kind, event in events:
            _send(kind, event)
        wait_until(
            lambda: _outcomes("duplicate") - duplicates == 2 * len(events), timeout=60
        )
    finally:
        restarted.stop()
    check = check_ledger(read_rows(api_server.csv), stays)
    assert check.exact, str(check)


def test_exit_before_entry_writes_one_row_with_the_right_duration(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    stay = PlannedStay(
        "EARLY-1", T0, T0 + timedelta(hours=1, minutes=23, seconds=4, microseconds=5)
    )

    _send("exit", stay.exit)
    wait_until(lambda: _counts()["pending"] == 1)
    _send("entry", stay.entry)
    wait_until(lambda: len(read_rows(api_server.csv)) == 1)

    [row] = read_rows(api_server.csv)
    assert row["duration_seconds"] == "4984.000005"
    assert row["clock_skew"] == "false"
    assert check_ledger([row], [stay]).exact
    assert _counts() == {"open": 0, "pending": 0}


def test_an_exit_without_entry_is_unmatched_only_after_the_grace_period(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    grace = runtime.settings().grace_seconds
    unmatched = _sample("parking_exits_unmatched_total")
    sent = time.monotonic()
    _send("exit", exit_event("lost-x", "NEVER-IN", T0))
    wait_until(lambda: _counts()["pending"] == 1)

    assert _sweep()["unmatched"] == 0, "declared unmatched within the grace period"
    wait_until(lambda: _sweep()["unmatched"] == 1, timeout=grace + 10)

    assert time.monotonic() - sent >= grace
    assert _sample("parking_exits_unmatched_total") - unmatched == 1
    assert _counts() == {"open": 0, "pending": 0}
    # Its entry, arriving after the grace period, is a visit of its own.
    _send("entry", entry_event("lost-e", "NEVER-IN", T0 - timedelta(hours=1)))
    wait_until(lambda: _counts()["open"] == 1)
    assert read_rows(api_server.csv) == []


def test_a_reentry_without_exit_orphans_the_older_visit(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    orphaned = _sample("parking_visits_orphaned_total", cause="reentry")
    stay = PlannedStay("BACK-1", T0 + timedelta(hours=2), T0 + timedelta(hours=3))

    _send("entry", entry_event("first-in", "BACK-1", T0))
    wait_until(lambda: _counts()["open"] == 1)
    _send("entry", stay.entry)
    wait_until(
        lambda: _sample("parking_visits_orphaned_total", cause="reentry") > orphaned
    )
    _send("exit", stay.exit)
    wait_until(lambda: len(read_rows(api_server.csv)) == 1)

    assert check_ledger(read_rows(api_server.csv), [stay]).exact
    assert _sample("parking_visits_orphaned_total", cause="reentry") - orphaned == 1
    assert _counts() == {"open": 0, "pending": 0}


def test_visits_open_longer_than_the_maximum_stay_are_closed_by_the_sweep(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    settings = runtime.settings()
    assert build_schedule(settings)["sweep-ledger"]["task"] == sweep.name
    max_stay = timedelta(seconds=2)
    runtime.configure(
        settings.model_copy(update={"max_stay_hours": max_stay.total_seconds() / 3600})
    )
    orphaned = _sample("parking_visits_orphaned_total", cause="max_stay")
    opened = time.monotonic()
    _send("entry", entry_event("long-in", "FOREVER-1", T0))
    wait_until(lambda: _counts()["open"] == 1)

    assert _sweep()["orphaned"] == 0, "closed before the maximum stay"
    wait_until(lambda: _sweep()["orphaned"] == 1, timeout=15)

    assert time.monotonic() - opened >= max_stay.total_seconds()
    assert _sample("parking_visits_orphaned_total", cause="max_stay") - orphaned == 1
    # The visit is really gone: its exit now finds nothing to close.
    _send("exit", exit_event("long-out", "FOREVER-1", T0 + timedelta(days=4)))
    wait_until(lambda: _counts() == {"open": 0, "pending": 1})
    assert read_rows(api_server.csv) == []


def test_duplicate_reads_within_the_window_are_one_event(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    reads = _outcomes("duplicate_read")
    first = PlannedStay("TWO-READS", T0, T0 + timedelta(hours=1))
    second = PlannedStay("LATE-READ", T0, T0 + timedelta(hours=2))
    seconds = timedelta(seconds=2)

    # Entry read twice while the visit is open, exit read twice after it.
    _send("entry", first.entry)
    wait_until(lambda: _counts()["open"] == 1)
    _send("entry", entry_event("in-2", first.plate, first.entry_at + seconds))
    _send("exit", first.exit)
    wait_until(lambda: len(read_rows(api_server.csv)) == 1)
    _send("exit", exit_event("out-2", first.plate, first.exit_at + seconds))
    # The second entry read reaches the worker only after the stay matched
    # (the queues drain independently): it must not open a phantom visit.
    _send("exit", second.exit)
    wait_until(lambda: _counts()["pending"] == 1)
    _send("entry", second.entry)
    wait_until(lambda: len(read_rows(api_server.csv)) == 2)
    _send("entry", entry_event("in-3", second.plate, second.entry_at + seconds))

    wait_until(lambda: _outcomes("duplicate_read") - reads == 3)
    assert _counts() == {"open": 0, "pending": 0}
    assert check_ledger(read_rows(api_server.csv), [first, second]).exact


def test_an_exit_stamped_just_before_its_entry_is_clamped_to_zero(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    skewed = _sample("parking_clock_skew_total")
    _send("entry", entry_event("skew-in", "SKEW-1", T0))
    wait_until(lambda: _counts()["open"] == 1)
    _send("exit", exit_event("skew-out", "SKEW-1", T0 - timedelta(seconds=30)))
    wait_until(lambda: len(read_rows(api_server.csv)) == 1)

    [row] = read_rows(api_server.csv)
    assert row["entry_date_time"] == row["exit_date_time"] == "2024-03-01T08:00:00Z"
    assert row["duration_seconds"] == "0"
    assert row["clock_skew"] == "true"
    assert _sample("parking_clock_skew_total") - skewed == 1


def test_an_exit_long_before_the_entry_is_not_a_stay_of_it(
    api_server: ApiServer, embedded_worker: Any
) -> None:
    _send("entry", entry_event("far-in", "SKEW-2", T0))
    wait_until(lambda: _counts()["open"] == 1)
    skew = runtime.settings().clock_skew_seconds
    too_early = T0 - timedelta(seconds=skew + 60)
    _send("exit", exit_event("far-out", "SKEW-2", too_early))

    wait_until(lambda: _counts() == {"open": 1, "pending": 1})
    wait_until(lambda: _sweep()["unmatched"] == 1, timeout=15)
    assert read_rows(api_server.csv) == []
    assert _counts() == {"open": 1, "pending": 0}


def test_summary_api_down_exits_retry_through_the_broker_and_all_arrive(
    api_server: ApiServer,
    embedded_worker: Any,
    store_redis: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="workers.tasks")
    stays = plan_stays(10, "DOWN")
    api_server.stop()

    for kind, event in shuffled_events(stays):
        _send(kind, event)
    # The embedded worker has one thread: had a task slept or held on, the
    # other events would not all be through the store while the API is down.
    wait_until(lambda: _events_recorded(store_redis) >= 2 * len(stays), timeout=30)
    wait_until(lambda: _retries(caplog) >= 1)
    assert read_rows(api_server.csv) == []

    api_server.start()
    wait_until(lambda: len(read_rows(api_server.csv)) == len(stays), timeout=60)
    check = check_ledger(read_rows(api_server.csv), stays)
    assert check.exact, str(check)


def _events_recorded(client: redis.Redis) -> int:
    """Events the store has applied (it remembers each id once)."""
    conf = get_settings()
    store = RedisVisitStore(client, ledger_policy(conf), prefix=conf.queue_prefix)
    return store.remembered_events(datetime.now(UTC))


def _retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith("retrying in="))
