"""Bad input and doubled deliveries against the real worker and API processes.

The integration tests show the same with a worker inside the test process;
here ``celery -A workers worker`` (prefork, two children) and ``python -m
parking api`` run as an operator runs them, and everything is read from the
outside: the CSV, the dead-letter queue, the worker's log and its /metrics.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kombu.messaging import Producer

from parking.events import EventKind
from parking.settings import Settings, get_settings
from tests.badinput import TABLE, TABLE_BY_ID, good_stays, send
from tests.brokers import dead_letter_count, drain_dead_letters
from tests.processes import Api, Worker, elapsed, fault_env
from tests.services import isolated_vhost, wait_until
from tests.traffic import PlannedStay, check_ledger, read_rows
from workers import topology
from workers.app import app as celery_app
from workers.tasks import PROCESSORS

pytestmark = pytest.mark.e2e


def _flush(settings: Settings) -> None:
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[Api, Worker]]:
    settings = get_settings()
    with isolated_vhost():
        _flush(settings)
        env = fault_env(tmp_path)
        api, worker = Api(env), Worker(env, name="input")
        try:
            api.start()
            worker.start()
            yield api, worker
        finally:
            worker.stop()
            api.stop()
            _flush(settings)


def _twice(stay: PlannedStay, number: int) -> None:
    """Entry and exit each published twice under one task id."""
    for kind, event in ((EventKind.ENTRY, stay.entry), (EventKind.EXIT, stay.exit)):
        for _ in range(2):
            PROCESSORS[kind].apply_async((event,), task_id=f"{kind}-{number}")


def test_bad_input_and_doubled_messages_leave_exact_rows_and_a_live_worker(
    services: tuple[Api, Worker], report: Callable[[str], None]
) -> None:
    api, worker = services
    settings = get_settings()
    drain_dead_letters(settings)
    children = set(worker.children())
    # Good stays before, between and after the bad messages.
    good = good_stays(len(TABLE) + 10)
    started = time.monotonic()
    with celery_app.connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        exchange = topology.task_exchange(settings)
        for number, stay in enumerate(good):
            _twice(stay, number)
            if number < len(TABLE):
                send(TABLE[number], producer, exchange)

    wait_until(lambda: dead_letter_count(settings) >= len(TABLE), timeout=120)
    csv = Path(api.env["PARKING_SUMMARY_CSV"])
    wait_until(lambda: len(read_rows(csv)) >= len(good), timeout=120, interval=0.5)
    # Every copy processed: the duplicates are counted as they arrive.
    wait_until(
        lambda: (
            worker.metric("parking_events_total", outcome="duplicate") >= 2 * len(good)
        ),
        timeout=60,
    )

    # One row per stay, though each of its events came twice.
    check = check_ledger(read_rows(csv), good)
    assert check.exact, str(check)
    assert worker.metric("parking_events_total", outcome="duplicate") == 2 * len(good)
    assert worker.metric("parking_stays_total") == len(good)

    # Each bad message once in the dead letters, counted under its reason by
    # the process that refused it.
    dead = drain_dead_letters(settings)
    dead_ids = Counter(
        (m.headers or {}).get("id") or m.properties.get("message_id") for m in dead
    )
    assert dead_ids == Counter(TABLE_BY_ID.keys())
    expected = Counter((case.kind, case.reason) for case in TABLE)
    counted = {
        key: worker.metric("parking_events_rejected_total", kind=key[0], reason=key[1])
        for key in expected
    }
    assert counted == {key: float(n) for key, n in expected.items()}

    # One log line per case that names it and its reason, none a megabyte.
    lines = worker.log().splitlines()
    silent = [
        case.name
        for case in TABLE
        if not any(
            re.search(rf"\bid={re.escape(case.message_id)}\b", line)
            and f"reason={case.reason} " in line + " "
            for line in lines
        )
    ]
    assert not silent, f"no log line names the problem for: {silent}"
    assert max(len(line) for line in lines) < 2_000

    # The same worker and the same children: nothing crashed, nothing was lost.
    assert worker.alive()
    assert set(worker.children()) == children
    assert worker.lost_jobs() == 0
    report(
        f"bad-input (real worker): {len(TABLE)} bad messages dead-lettered and "
        f"counted, {len(good)} stays from doubled events written once each, "
        f"seconds={elapsed(started)}"
    )
