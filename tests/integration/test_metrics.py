"""Celery and parking metrics from a real prefork worker and the embedded one."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from parking.events import EventKind
from parking.ports import free_port
from parking.settings import Settings, get_settings
from parking.status import quantile
from tests.observability import prefork_worker, scrape, value
from tests.services import wait_until
from workers import metrics as celery_metrics
from workers import runtime
from workers.app import app
from workers.tasks import publish_events

N = 200
ENTRY = "parking.process_entry"
EXIT = "parking.process_exit"


def _entries(count: int) -> list[tuple[EventKind, Any]]:
    return [
        (
            EventKind.ENTRY,
            {
                "id": uuid.uuid4().hex,
                "vehicle_plate": f"MET{number:04d}",
                "entry_date_time": "2026-12-01T08:00:00Z",
            },
        )
        for number in range(count)
    ]


def _queues() -> list[str]:
    settings = get_settings()
    return [settings.queue(k) for k in ("entry", "exit", "generate", "default")]


def test_prefork_worker_with_two_children_counts_every_task(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    settings = get_settings()
    with prefork_worker(tmp_path, env, _queues(), concurrency=2) as worker:
        publish_events(_entries(N))
        publish_events([(EventKind.EXIT, {"id": "no-plate-no-time"})])
        store = runtime.store()
        wait_until(lambda: store.counts()["open"] == N, timeout=120)
        # The store is written before the task's success is signalled.
        wait_until(
            lambda: (
                value(scrape(worker.metrics_url), "celery_task_succeeded_total") >= N
            ),
            timeout=30,
        )
        samples = scrape(worker.metrics_url)

    entry = {"name": ENTRY, "queue_name": settings.queue("entry")}
    assert value(samples, "celery_task_succeeded_total", **entry) == N
    assert value(samples, "celery_task_received_total", **entry) == N
    assert value(samples, "celery_task_started_total", **entry) == N
    assert value(samples, "celery_task_runtime_count", **entry) == N
    assert value(samples, "celery_task_runtime_bucket", le="+Inf", **entry) == N
    assert value(samples, "celery_task_queue_wait_time_count", **entry) == N
    assert value(samples, "celery_task_failed_total") == 0
    assert (
        value(samples, "celery_task_rejected_total", name="parking.process_exit") == 1
    )
    assert value(samples, "celery_worker_up") == 1
    assert value(samples, "celery_worker_tasks_active") == 0
    hostnames = {
        dict(labels)["hostname"]
        for (_, labels) in samples
        if "hostname" in dict(labels)
    }
    assert all("@" not in host for host in hostnames), hostnames
    # The domain metrics of the children show up on the same endpoint.
    assert value(samples, "parking_events_total", kind="entry", outcome="opened") == N
    assert value(samples, "parking_event_processing_seconds_count", kind="entry") == N
    assert value(samples, "parking_events_rejected_total", kind="exit") == 1
    assert value(samples, "parking_generator_match_ratio") == settings.match_ratio
    # Queue lengths come from the broker at scrape time.
    assert (
        value(samples, "celery_queue_length", queue_name=settings.queue("entry")) == 0
    )
    assert value(samples, "celery_queue_length", queue_name=settings.queue("dead")) == 1
    # Both children did work: a value file per process (parent and children).
    writers = {
        path.name.rsplit("_", 1)[-1] for path in worker.metrics_dir.glob("counter_*.db")
    }
    assert len(writers) >= 3, writers


def _local(metric: str, /, **labels: str) -> float:
    """This process's own value, summed over the labels not given."""
    wanted = set(labels.items())
    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == metric and wanted <= set(sample.labels.items())
    )


def test_embedded_worker_keeps_metrics_in_process(celery_worker: Any) -> None:
    assert celery_metrics.multiprocess_dir() is None
    settings = get_settings()
    host = celery_metrics.short_hostname(celery_worker.hostname)
    labels = {"name": ENTRY, "hostname": host, "queue_name": settings.queue("entry")}
    before = _local("celery_task_succeeded_total", **labels)
    waits = _local("celery_task_queue_wait_time_count", **labels)
    sent = _local("celery_task_sent_total", name=ENTRY, queue_name=labels["queue_name"])

    publish_events(_entries(5))
    wait_until(lambda: _local("celery_task_succeeded_total", **labels) == before + 5)

    assert _local("celery_task_queue_wait_time_count", **labels) == waits + 5
    assert (
        _local("celery_task_sent_total", name=ENTRY, queue_name=labels["queue_name"])
        == sent + 5
    )
    served = celery_metrics.serving_registry().get_sample_value(
        "celery_task_succeeded_total", labels
    )
    assert served == before + 5


def test_retries_failures_and_refused_posts_are_counted(
    celery_worker: Any, test_settings: Settings
) -> None:
    # A summary API nobody serves: the exit's post fails, it is retried once
    # through the broker and then dead-lettered (retry_max=1).
    down = f"http://127.0.0.1:{free_port()}"
    runtime.configure(
        test_settings.model_copy(update={"summary_api_url": down, "retry_max": 1})
    )
    host = celery_metrics.short_hostname(celery_worker.hostname)
    exit_labels = {"name": EXIT, "hostname": host}
    failed_labels = {"name": ENTRY, "hostname": host, "exception": "TypeError"}
    retried = _local("celery_task_retried_total", **exit_labels)
    rejected = _local("celery_task_rejected_total", **exit_labels)
    failed = _local("celery_task_failed_total", **failed_labels)
    exit_failed = _local("celery_task_failed_total", name=EXIT)
    unreachable = _local("parking_summary_post_failures_total", cause="unreachable")
    try:
        plate = f"RTY{uuid.uuid4().hex[:6]}"
        entry = _event("entry", plate, "2026-12-01T08:00:00Z")
        publish_events([(EventKind.ENTRY, entry)])
        # The exit must find its visit open, so that it has a stay to post.
        wait_until(lambda: runtime.store().counts()["open"] == 1)
        exit_ = _event("exit", plate, "2026-12-01T09:00:00Z")
        publish_events([(EventKind.EXIT, exit_)])
        # A body of the wrong shape (send_task checks no signature): the task
        # itself raises, a real failure.
        app.send_task(ENTRY, args=({}, "an argument too many"))
        wait_until(
            lambda: _local("celery_task_rejected_total", **exit_labels) == rejected + 1,
            timeout=60,
        )
        wait_until(
            lambda: _local("celery_task_failed_total", **failed_labels) == failed + 1
        )
    finally:
        runtime.configure(None)
    assert _local("celery_task_retried_total", **exit_labels) == retried + 1
    assert (
        _local("parking_summary_post_failures_total", cause="unreachable")
        == unreachable + 2
    )
    # Dead-lettered after its retries: rejected, not failed.
    assert _local("celery_task_failed_total", name=EXIT) == exit_failed


def _event(kind: str, plate: str, at: str) -> dict[str, str]:
    return {"id": uuid.uuid4().hex, "vehicle_plate": plate, f"{kind}_date_time": at}


@pytest.mark.parametrize(
    ("routing_key", "queue"),
    [
        pytest.param("ptest.exit", "ptest.exit", id="plain"),
        pytest.param("0." * 27 + "1.ptest.exit", "ptest.exit", id="delayed-retry"),
        pytest.param(None, "unknown", id="missing"),
    ],
)
def test_queue_name_from_routing_key(routing_key: str | None, queue: str) -> None:
    assert celery_metrics.queue_name(routing_key) == queue


def test_hostname_label_is_the_part_after_the_at_sign() -> None:
    assert celery_metrics.short_hostname("worker@box-1") == "box-1"
    assert celery_metrics.short_hostname("celery@a@b") == "b"


_BUCKETS = [(0.001, 0.0), (0.002, 10.0), (0.005, 20.0), (math.inf, 20.0)]


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        pytest.param(0.5, _BUCKETS, 0.002, id="median-at-a-bound"),
        pytest.param(0.95, _BUCKETS, 0.0047, id="interpolated"),
        pytest.param(0.99, [(0.1, 1.0), (math.inf, 10.0)], 0.1, id="beyond-the-top"),
        pytest.param(0.5, [(0.1, 0.0), (math.inf, 0.0)], None, id="no-observations"),
    ],
)
def test_status_quantile_follows_histogram_quantile(
    q: float, buckets: list[tuple[float, float]], expected: float | None
) -> None:
    assert quantile(q, buckets) == (
        None if expected is None else pytest.approx(expected)
    )
