"""Adversarial: the sweep must not declare an exit unmatched while its entry
is still on its way through the broker, in any form the broker holds it.

``topology.entry_backlog`` counts the *ready* messages of the entry queues.
An entry can also be on its way as a retry (an outage made its task retry
with a countdown: native delayed delivery parks it in ``celery_delayed_*``)
or held unacknowledged by a busy worker (prefetch). In both cases the exit's
entry has not had its chance yet, and declaring the exit unmatched loses the
stay: the exit goes to review and the entry later opens a visit that is
orphaned after the maximum stay.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
    level_name,
)

from parking.inflight import InFlightEntries
from parking.settings import get_settings
from parking.sweeper import Sweeper
from tests.services import ApiServer, wait_until
from workers import runtime, topology
from workers.app import app
from workers.tasks import process_entry

pytestmark = pytest.mark.integration

ENTRY = {
    "id": "adv-retry-in",
    "vehicle_plate": "RETRY1",
    "entry_date_time": "2024-05-01T08:00:00Z",
}
EXIT = {
    "id": "adv-retry-out",
    "vehicle_plate": "RETRY1",
    "exit_date_time": "2024-05-01T09:30:00Z",
}
#: Native delayed delivery's levels (kombu's MAX_NUMBER_OF_BITS_TO_USE).
_LEVELS = 28


class Later:
    """A clock already past every grace period of this test."""

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)


def _sweeper() -> Sweeper:
    settings = runtime.settings()
    return Sweeper(
        runtime.store(),
        runtime.sink(),
        Later(),
        runtime._metrics(),
        runtime.lots(),
        timedelta(hours=settings.max_stay_hours),
        entry_backlog=runtime.entries_on_their_way,
    )


def _delayed_messages() -> int:
    """Messages parked in native delayed delivery's queues (all levels)."""
    total = 0
    with Connection(get_settings().broker_connection_url) as conn:
        for level in range(_LEVELS):
            queue = Queue(level_name(level)).bind(conn.default_channel)
            try:
                total += queue.queue_declare(passive=True).message_count
            except conn.channel_errors:
                return total
    return total


def _purge_delayed() -> None:
    with Connection(get_settings().broker_connection_url) as conn:
        for level in range(_LEVELS):
            channel = conn.channel()
            try:
                Queue(level_name(level)).bind(channel).purge()
            except conn.channel_errors:
                pass
            finally:
                channel.close()


@pytest.fixture
def delayed_delivery() -> Iterator[None]:
    """Native delayed delivery's exchanges, queues and bindings, as a worker
    declares them at start (no worker runs: nothing reads the entry)."""
    settings = get_settings()
    with Connection(settings.broker_connection_url) as conn:
        declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
        for queue in topology.task_queues(settings):
            bind_queue_to_native_delayed_delivery_exchange(conn, queue)
    yield
    _purge_delayed()


def test_exit_waits_while_its_entry_waits_for_a_retry(
    api_server: ApiServer, delayed_delivery: None
) -> None:
    # After an outage, the exit's retry came first; its entry's retry is
    # still parked for a minute (the backoff cap) in a delay queue.
    runtime.exit_processor().process_message(EXIT)
    process_entry.apply_async((ENTRY,), countdown=60)
    wait_until(lambda: _delayed_messages() == 1)

    held = _sweeper().sweep()

    assert held.unmatched == 0, "exit declared unmatched while its entry waits"
    assert held.pending_exits == 1


#: Set by the test to let the worker's only pool thread go.
_release = threading.Event()
_holding = threading.Event()


@app.task(name="tests.hold_the_worker")
def _hold_the_worker() -> None:
    _holding.set()
    _release.wait(60)


def test_exit_waits_while_a_busy_worker_holds_its_entry(
    api_server: ApiServer,
) -> None:
    settings = get_settings()
    entry_queue = settings.queue("entry")
    runtime.exit_processor().process_message(EXIT)
    _release.clear()
    _holding.clear()
    # Threads, not solo: the consumer keeps taking messages (prefetch) while
    # its one pool thread is busy, as a prefork worker's main process does.
    with start_worker(
        app, pool="threads", concurrency=1, queues=[entry_queue],
        perform_ping_check=False, shutdown_timeout=60.0,
    ):  # fmt: skip
        try:
            _hold_the_worker.apply_async(queue=entry_queue)
            wait_until(_holding.is_set)
            process_entry.delay(ENTRY)
            # Taken by the worker: no longer ready in its queue.
            wait_until(lambda: runtime.inflight().count() == 1)
            assert topology.entry_backlog(settings) == 0
            swept = _sweeper().sweep()
        finally:
            _release.set()
        wait_until(lambda: len(api_server.rows()) == 1)
        wait_until(lambda: runtime.inflight().count() == 0)

    assert swept.unmatched == 0, "exit declared unmatched while its entry waits"
    assert swept.pending_exits == 1
    assert swept.entry_backlog == 1
    (row,) = api_server.rows()
    assert row["vehicle_plate"] == "RETRY1"
    assert row["duration_seconds"] == "5400"


def test_a_note_left_by_a_dead_worker_holds_exits_only_until_its_horizon(
    store_redis: redis.Redis,
) -> None:
    held = InFlightEntries(store_redis, prefix="ptest", horizon=timedelta(minutes=15))
    held.received("lost-with-its-worker")
    assert held.count() == 1
    # A quarter of an hour on, the message went back to its queue long ago.
    store_redis.zadd("ptest:inflight:entry", {"lost-with-its-worker": 1.0})
    assert held.count() == 0
    assert store_redis.zcard("ptest:inflight:entry") == 0
