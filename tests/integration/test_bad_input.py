"""Bad input through the real broker: every message dead-lettered and counted.

Each malformed message goes to the real queues, either as a Celery task
argument (what another producer of our tasks could send) or as a raw AMQP
body (broken JSON, invalid UTF-8, foreign content types, envelopes Celery
cannot read). Good stays travel around them; the worker must write all of
those and keep running.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.messaging import Producer
from prometheus_client import REGISTRY

from parking.events import EventKind
from parking.settings import get_settings
from tests.badinput import JSON, TABLE, TABLE_BY_ID, good_stays, send
from tests.brokers import dead_letter_count, drain_dead_letters
from tests.services import ApiServer, wait_until
from tests.traffic import check_ledger, read_rows
from workers import topology
from workers.tasks import PROCESSORS


@pytest.fixture(scope="module")
def embedded_worker(
    celery_app: Celery, celery_worker_parameters: dict[str, Any]
) -> Iterator[Any]:
    """One embedded worker for the whole module: each stop costs seconds."""
    with start_worker(celery_app, pool="solo", **celery_worker_parameters) as worker:
        yield worker


def _rejected(kind: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "parking_events_rejected_total", {"kind": kind, "reason": reason}
    )
    return value or 0.0


def test_the_table_has_enough_cases() -> None:
    assert len(TABLE) >= 30
    assert len(TABLE_BY_ID) == len(TABLE), "case names must be unique"


def test_every_malformed_message_is_dead_lettered_counted_and_logged(
    api_server: ApiServer,
    embedded_worker: Any,
    celery_app: Celery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    settings = get_settings()
    drain_dead_letters(settings)
    expected = Counter((case.kind, case.reason) for case in TABLE)
    before = {key: _rejected(*key) for key in expected}
    good = good_stays(len(TABLE) // 2 + 1)

    with celery_app.connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        exchange = topology.task_exchange(settings)
        # Good stays before, between and after the bad messages; every other
        # one carries fields the wire format does not name.
        for n, stay in enumerate(good):
            extra = {"camera": "gate-3", "confidence": 0.93} if n % 2 else {}
            PROCESSORS[EventKind.ENTRY].delay({**stay.entry, **extra})
            PROCESSORS[EventKind.EXIT].delay({**stay.exit, **extra, "lane": [1, 2]})
            for case in TABLE[2 * n : 2 * n + 2]:
                send(case, producer, exchange)

    wait_until(lambda: dead_letter_count(settings) >= len(TABLE), timeout=60)
    wait_until(lambda: len(read_rows(api_server.csv)) >= len(good), timeout=30)

    dead = drain_dead_letters(settings)
    dead_ids = Counter(
        (message.headers or {}).get("id") or message.properties.get("message_id")
        for message in dead
    )
    assert dead_ids == Counter(TABLE_BY_ID.keys()), (
        "each case dead-lettered exactly once"
    )
    reasons = {
        ((m.headers or {}).get("x-death") or [{}])[0].get("reason") for m in dead
    }
    assert reasons == {"rejected"}

    counted = {key: _rejected(*key) - before[key] for key in expected}
    assert counted == {key: float(n) for key, n in expected.items()}

    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    silent = [
        case.name
        for case in TABLE
        if not any(
            f"id={case.message_id} " in line and f"reason={case.reason}" in line
            for line in logged
        )
    ]
    assert not silent, f"no log line names the problem for: {silent}"
    # A line is for a person: never the megabyte plate itself.
    assert max(len(line) for line in logged) < 2_000

    check = check_ledger(read_rows(api_server.csv), good)
    assert check.exact, str(check)


def test_a_task_that_fails_unexpectedly_is_dead_lettered_not_acked(
    api_server: ApiServer, embedded_worker: Any, celery_app: Celery
) -> None:
    """A body Celery can read but the task cannot take (no event argument)."""
    settings = get_settings()
    drain_dead_letters(settings)
    with celery_app.connection_for_write() as conn:
        Producer(conn.default_channel).publish(
            b"[[], {}, {}]",
            exchange=topology.task_exchange(settings),
            routing_key=settings.queue("exit"),
            content_type=JSON,
            content_encoding="utf-8",
            headers={"task": "parking.process_exit", "id": "no-arguments"},
            serializer=None,
        )
    stay = good_stays(1)[0]
    PROCESSORS[EventKind.ENTRY].delay(stay.entry)
    PROCESSORS[EventKind.EXIT].delay(stay.exit)

    wait_until(lambda: dead_letter_count(settings) >= 1, timeout=30)
    wait_until(lambda: len(read_rows(api_server.csv)) >= 1, timeout=30)
    dead = drain_dead_letters(settings)
    assert [(m.headers or {}).get("id") for m in dead] == ["no-arguments"]
    assert check_ledger(read_rows(api_server.csv), [stay]).exact
