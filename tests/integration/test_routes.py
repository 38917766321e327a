"""Producers name only the task: configuration routes it to its own queue."""

from __future__ import annotations

import pytest
from celery import Celery

from parking.settings import get_settings
from tests.services import wait_until


def _ready(celery_app: Celery, queue: str) -> int:
    with celery_app.connection_for_read() as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
        return int(count)


@pytest.mark.parametrize(
    ("task", "kind"),
    [
        pytest.param("parking.process_entry", "entry", id="entry"),
        pytest.param("parking.process_exit", "exit", id="exit"),
        pytest.param("parking.generate_entry", "generate", id="generate-entry"),
        pytest.param("parking.generate_exit", "generate", id="generate-exit"),
        pytest.param("parking.sweep", "generate", id="sweep"),
    ],
)
def test_each_task_lands_on_its_queue_by_name_alone(
    celery_app: Celery, task: str, kind: str
) -> None:
    settings = get_settings()
    queues = [settings.queue(k) for k in ("entry", "exit", "generate", "default")]
    # No worker runs in this test: what is sent stays where it was routed.
    celery_app.send_task(task, args=({},) if kind != "generate" else ())

    wait_until(lambda: _ready(celery_app, settings.queue(kind)) == 1, timeout=10)
    assert {q: _ready(celery_app, q) for q in queues if q != settings.queue(kind)} == {
        q: 0 for q in queues if q != settings.queue(kind)
    }
