"""Events through the real broker, the embedded worker, Redis and the API."""

from __future__ import annotations

from typing import Any

from tests.services import ApiServer, wait_until
from workers.tasks import process_entry, process_exit


def test_entry_then_exit_writes_one_stay(
    api_server: ApiServer, celery_worker: Any
) -> None:
    process_entry.delay(
        {
            "id": "e1",
            "vehicle_plate": "ab-123",
            "entry_date_time": "2024-09-11T21:24:56.123456789Z",
        }
    )
    process_exit.delay(
        {
            "id": "x1",
            "vehicle_plate": "AB 123",
            "exit_date_time": "2024-09-11T22:24:57+01:00",
        }
    )
    wait_until(lambda: len(api_server.rows()) == 1)
    row = api_server.rows()[0]
    assert row["vehicle_plate"] == "ab-123"
    assert row["entry_date_time"] == "2024-09-11T21:24:56.123456Z"
    assert row["exit_date_time"] == "2024-09-11T21:24:57Z"
    assert row["duration_seconds"] == "0.876544"
