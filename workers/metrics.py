"""Celery metrics under celery-exporter's names, fed by our signal handlers.

Publishers count what they send; workers count the rest. A prefork worker runs
its tasks in children, so with ``PROMETHEUS_MULTIPROC_DIR`` set (before Python
starts) every process writes its values to files there and the parent serves
their merge. Without it (the embedded test worker, beat) a process serves its
own default registry. The queue lengths are read from the broker at scrape
time by a collector that lives only in the serving process.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from celery.signals import (
    after_task_publish,
    beat_init,
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_received,
    task_rejected,
    task_retry,
    task_revoked,
    task_success,
    worker_init,
    worker_ready,
    worker_shutdown,
)
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from parking.metrics import default_metrics
from workers import runtime
from workers.app import app
from workers.topology import dead_letter_queue

logger = logging.getLogger(__name__)

#: Wall-clock publish time, stamped by the publisher and read by the worker.
PUBLISHED_AT = "parking_published_at"
#: Waiting in a queue takes from milliseconds to a long outage.
QUEUE_WAIT_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 900.0, 1800.0,
)  # fmt: skip
#: Native delayed delivery prefixes the routing key with 28 binary digits.
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")
_TASK = ("name", "hostname", "queue_name")


class CeleryMetrics:
    """The celery-exporter metric set, on a registry that tests can replace."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def counter(event: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(
                f"celery_task_{event}_total",
                f"Tasks {event}, by task name, host and queue",
                [*_TASK[:2], *extra, _TASK[2]],
                registry=registry,
            )

        self.sent = counter("sent")
        self.received = counter("received")
        self.started = counter("started")
        self.succeeded = counter("succeeded")
        self.failed = counter("failed", ("exception",))
        self.retried = counter("retried")
        self.rejected = counter("rejected")
        self.revoked = counter("revoked")
        self.runtime = Histogram(
            "celery_task_runtime",
            "Seconds a task ran in the worker",
            _TASK,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "celery_task_queue_wait_time",
            "Seconds from publish (or ETA) to the start of the task",
            _TASK,
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        # The parent alone sets it; "max" keeps its 1 over children's zeros.
        self.worker_up = Gauge(
            "celery_worker_up",
            "1 while the worker node consumes, 0 once it shuts down",
            ["hostname"],
            multiprocess_mode="max",
            registry=registry,
        )
        # Children add and remove themselves; a dead child's part is dropped.
        self.tasks_active = Gauge(
            "celery_worker_tasks_active",
            "Tasks executing now",
            ["hostname"],
            multiprocess_mode="livesum",
            registry=registry,
        )


_metrics: CeleryMetrics | None = None
_metrics_lock = threading.Lock()


def celery_metrics() -> CeleryMetrics:
    """The process-wide set on the default registry, made on first use."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = CeleryMetrics()
        return _metrics


def short_hostname(nodename: str | None) -> str:
    """celery-exporter's ``hostname``: the part of the node name after ``@``."""
    if not nodename:
        return socket.gethostname()
    return nodename.rpartition("@")[2] or nodename


def queue_name(routing_key: str | None) -> str:
    """Our routing keys are the queue names; strip a delayed-delivery prefix."""
    if not routing_key:
        return "unknown"
    return _DELAY_PREFIX.sub("", routing_key, count=1)


def _delivered_queue(delivery_info: Mapping[str, Any] | None) -> str:
    return queue_name((delivery_info or {}).get("routing_key"))


#: This process's host for the publisher side: its node name once known.
_host = socket.gethostname()


# -- publisher side (any process that sends tasks: beat, workers, the CLI) --


@before_task_publish.connect
def _stamp_publish_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        # Overwritten, not kept: a retry is a new publish and a new wait.
        headers[PUBLISHED_AT] = time.time()


@after_task_publish.connect
def _count_sent(
    sender: str | None = None,
    headers: Mapping[str, Any] | None = None,
    routing_key: str | None = None,
    **_: Any,
) -> None:
    name = (headers or {}).get("task") or sender or "unknown"
    celery_metrics().sent.labels(name, _host, queue_name(routing_key)).inc()


# -- worker parent: messages as they arrive ----------------------------------


@task_received.connect
def _count_received(request: Any = None, **_: Any) -> None:
    celery_metrics().received.labels(
        request.name,
        short_hostname(request.hostname),
        _delivered_queue(request.delivery_info),
    ).inc()


@task_revoked.connect
def _count_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    celery_metrics().revoked.labels(*_labels(sender, request)).inc()


@task_rejected.connect
def _count_unknown_rejected(message: Any = None, **_: Any) -> None:
    # A message no registered task can take (unknown name or type, or a body
    # that does not decode). Its name is whatever the sender wrote: only ours
    # become label values, so that the label stays bounded.
    headers = getattr(message, "headers", None) or {}
    name = headers.get("task")
    known = isinstance(name, str) and name in app.tasks
    info = getattr(message, "delivery_info", None)
    celery_metrics().rejected.labels(
        name if known else "unknown", _host, _delivered_queue(info)
    ).inc()


# -- worker child: the task runs ---------------------------------------------

_started_at: dict[str, float] = {}


def _labels(task: Any, request: Any = None) -> tuple[str, str, str]:
    request = request if request is not None else task.request
    return (
        task.name,
        short_hostname(getattr(request, "hostname", None)),
        _delivered_queue(getattr(request, "delivery_info", None)),
    )


@task_prerun.connect
def _task_started(task_id: str = "", task: Any = None, **_: Any) -> None:
    metrics = celery_metrics()
    labels = _labels(task)
    _started_at[task_id] = time.perf_counter()
    metrics.started.labels(*labels).inc()
    metrics.tasks_active.labels(labels[1]).inc()
    waited = queue_wait(task.request)
    if waited is not None:
        metrics.queue_wait.labels(*labels).observe(waited)


def queue_wait(request: Any) -> float | None:
    """Seconds since publish, or since the ETA of a delayed task; never < 0."""
    published = getattr(request, PUBLISHED_AT, None)
    if not isinstance(published, (int, float)):
        return None
    ready = float(published)
    eta = getattr(request, "eta", None)
    if isinstance(eta, str):
        try:
            due = datetime.fromisoformat(eta)
        except ValueError:
            due = None
        if due is not None:
            due = due if due.tzinfo else due.replace(tzinfo=UTC)
            ready = max(ready, due.timestamp())
    return max(time.time() - ready, 0.0)


@task_success.connect
def _task_succeeded(sender: Any = None, **_: Any) -> None:
    celery_metrics().succeeded.labels(*_labels(sender)).inc()


@task_failure.connect
def _task_failed(sender: Any = None, exception: Any = None, **_: Any) -> None:
    if isinstance(exception, Reject):
        # Celery reports a dead-lettered task as failed too; bad input is an
        # expected outcome here, counted once, as rejected (in postrun).
        return
    name, host, queue = _labels(sender)
    exc = type(exception).__name__ if exception is not None else "unknown"
    celery_metrics().failed.labels(name, host, exc, queue).inc()


@task_retry.connect
def _task_retried(sender: Any = None, request: Any = None, **_: Any) -> None:
    celery_metrics().retried.labels(*_labels(sender, request)).inc()


@task_postrun.connect
def _task_finished(
    task_id: str = "", task: Any = None, state: str | None = None, **_: Any
) -> None:
    metrics = celery_metrics()
    labels = _labels(task)
    started = _started_at.pop(task_id, None)
    if started is not None:
        metrics.runtime.labels(*labels).observe(time.perf_counter() - started)
    metrics.tasks_active.labels(labels[1]).dec()
    if state == "REJECTED":
        # celery-exporter's "rejected": the task raised Reject (our dead
        # letters); Celery has no signal of its own for it.
        metrics.rejected.labels(*labels).inc()


# -- serving -----------------------------------------------------------------


class QueueLengthCollector:
    """``celery_queue_length`` from the broker, read at each scrape."""

    def __init__(self, app: Celery, queues: Iterable[str]) -> None:
        self._app = app
        self._queues = tuple(queues)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "celery_queue_length",
            "Messages ready in the queue (not counting those being processed)",
            labels=["queue_name"],
        )
        try:
            with self._app.connection_for_read(connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
                for name in self._queues:
                    length = _queue_length(conn, name)
                    if length is not None:
                        family.add_metric([name], length)
        except Exception as exc:  # a scrape must answer during a broker outage
            logger.warning("queue length unavailable error=%s", type(exc).__name__)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _queue_length(conn: Any, name: str) -> int | None:
    # A passive declare of a missing queue closes its channel: one each.
    channel = conn.channel()
    try:
        _, count, _ = channel.queue_declare(queue=name, passive=True)
        return int(count)
    except conn.channel_errors:
        return None
    finally:
        try:
            channel.close()
        except conn.connection_errors + conn.channel_errors:
            pass


class _DefaultRegistry:
    """Everything on the process's default registry, for a serving registry."""

    def collect(self) -> Iterator[Metric]:
        return iter(REGISTRY.collect())

    def describe(self) -> Iterator[Metric]:
        return iter(())


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def serving_registry(app: Celery | None = None) -> CollectorRegistry:
    """What a worker serves: every process's values, and the queue lengths.

    A fresh registry: the multiprocess merge must not sit beside the default
    registry's own (per-process) view of the same metrics. Without ``app``
    (beat) only this process's own values are served, even in a shared
    multiprocess directory.
    """
    registry = CollectorRegistry()
    if app is not None and multiprocess_dir():
        MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    if app is not None:
        registry.register(QueueLengthCollector(app, _queue_names(app)))
    return registry


def _queue_names(app: Celery) -> list[str]:
    names = [queue.name for queue in app.conf.task_queues or ()]
    names.append(dead_letter_queue(runtime.settings()).name)
    return names


class MetricsServer:
    """A ``/metrics`` HTTP endpoint in a thread of this process."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        self.server, self._thread = start_http_server(
            port, addr=address, registry=registry
        )
        self.port = int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


_server: MetricsServer | None = None


def _serve(registry: CollectorRegistry, port: int, role: str) -> None:
    global _server
    if _server is not None:
        return
    address = runtime.settings().metrics_address
    try:
        _server = MetricsServer(registry, address, port)
    except OSError as exc:
        # Metrics must not stop the work: the node runs on, unobserved.
        logger.error(
            "metrics endpoint not started role=%s address=%s port=%d error=%s",
            role, address, port, exc,
        )  # fmt: skip
        return
    logger.info(
        "metrics endpoint up role=%s address=%s port=%d multiprocess=%s",
        role, address, _server.port, bool(multiprocess_dir()),
    )  # fmt: skip


def _stop_serving() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


# -- lifecycle ---------------------------------------------------------------


@worker_init.connect
def _worker_starting(sender: Any = None, **_: Any) -> None:
    global _host
    _host = short_hostname(getattr(sender, "hostname", None))
    celery_metrics()
    metrics = default_metrics()
    metrics.match_ratio.set(runtime.settings().match_ratio)


@worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    # Sent by a real ``celery worker`` only, never by the embedded test worker,
    # so tests running beside each other do not fight over the port.
    host = short_hostname(getattr(sender, "hostname", None))
    celery_metrics().worker_up.labels(host).set(1)
    app = getattr(sender, "app", None)
    _serve(serving_registry(app), runtime.settings().worker_metrics_port, "worker")


@worker_shutdown.connect
def _worker_stopping(sender: Any = None, **_: Any) -> None:
    host = short_hostname(getattr(sender, "hostname", None))
    celery_metrics().worker_up.labels(host).set(0)
    _stop_serving()


@beat_init.connect
def _beat_starting(sender: Any = None, **_: Any) -> None:
    celery_metrics()
    _serve(serving_registry(), runtime.settings().beat_metrics_port, "beat")
