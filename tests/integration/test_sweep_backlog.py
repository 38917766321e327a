"""An exit is not declared unmatched while entries still wait in their queue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from celery import Celery
from celery.contrib.testing.worker import start_worker

from parking.settings import get_settings
from parking.sweeper import Sweeper
from tests.services import ApiServer, wait_until
from workers import runtime, topology
from workers.tasks import process_entry

ENTRY = {
    "id": "late-in",
    "vehicle_plate": "LATE1",
    "entry_date_time": "2024-05-01T08:00:00Z",
}
EXIT = {
    "id": "late-out",
    "vehicle_plate": "LATE1",
    "exit_date_time": "2024-05-01T09:30:00Z",
}


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
        entry_backlog=lambda: topology.entry_backlog(settings),
    )


def test_exit_waits_while_its_entry_is_queued(
    api_server: ApiServer, celery_app: Celery
) -> None:
    # The entry is published but no worker reads it yet; the exit is applied.
    process_entry.delay(ENTRY)
    runtime.exit_processor().process_message(EXIT)
    wait_until(lambda: topology.entry_backlog(get_settings()) == 1)

    held = _sweeper().sweep()
    assert held.entry_backlog == 1
    assert held.unmatched == 0
    assert held.pending_exits == 1

    settings = get_settings()
    with start_worker(
        celery_app,
        perform_ping_check=False,
        queues=[settings.queue("entry"), settings.queue("default")],
        shutdown_timeout=60.0,
    ):
        wait_until(lambda: len(api_server.rows()) == 1)
    row = api_server.rows()[0]
    assert row["vehicle_plate"] == "LATE1"
    assert row["duration_seconds"] == "5400"

    after = _sweeper().sweep()
    assert after.entry_backlog == 0
    assert after.unmatched == 0
    assert after.pending_exits == 0


def test_exit_is_unmatched_once_no_entry_waits(api_server: ApiServer) -> None:
    runtime.exit_processor().process_message(EXIT)
    swept = _sweeper().sweep()
    assert swept.entry_backlog == 0
    assert swept.unmatched == 1
    assert swept.pending_exits == 0
