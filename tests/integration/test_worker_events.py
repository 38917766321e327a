"""Task events go out without publisher confirms; tasks keep theirs."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery

from workers.tasks import process_entry

pytestmark = pytest.mark.integration


def test_task_events_flow_without_confirms_while_task_publishes_keep_them(
    celery_app: Celery, celery_worker: Any
) -> None:
    dispatcher = celery_worker.consumer.event_dispatcher
    assert dispatcher.enabled
    assert dispatcher.connection.transport_options["confirm_publish"] is False
    with celery_app.connection_for_write() as connection:
        assert connection.transport_options["confirm_publish"] is True

    succeeded: list[dict[str, Any]] = []
    with celery_app.connection_for_read() as connection:
        receiver = celery_app.events.Receiver(
            connection, handlers={"task-succeeded": succeeded.append}
        )
        with receiver.consumer_context(wakeup=False) as (events, _, _):
            sent = process_entry.delay(
                {
                    "id": "events-1",
                    "vehicle_plate": "EV 1",
                    "entry_date_time": "2024-05-01T08:00:00Z",
                }
            )
            deadline = time.monotonic() + 30
            while not any(e["uuid"] == sent.id for e in succeeded):
                assert time.monotonic() < deadline, "no task-succeeded event seen"
                try:
                    events.drain_events(timeout=1)
                except TimeoutError:
                    continue
