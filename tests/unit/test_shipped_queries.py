"""Every metric the shipped dashboards and alerts name is one somebody exports.

The live test in ``tests/e2e/test_observability.py`` finds that each query
returns data; a query padded with ``or ... * 0`` (so that a panel shows zero
instead of "no data" while nothing failed) returns data whatever metric name
it spells. This test reads the names out of the queries and looks each one up
in what our code declares and what Flower exports.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from parking.api.app import ApiMetrics
from parking.metrics import ParkingMetrics
from tests.observability import ALERTS, SCRAPE_CONFIG, dashboard_queries
from workers.metrics import CeleryMetrics, QueueLengthCollector

FLOWER_EVENTS = Path(__import__("flower.events").events.__file__)
#: Names we ask Prometheus for: ours, Celery's under celery-exporter's names,
#: Flower's. Functions, labels and keywords never start this way.
METRIC = re.compile(r"(?<![\w:\"'])((?:celery|parking|flower)_[A-Za-z0-9_:]+)")
#: Suffixes of the series a metric family writes, by its type.
SERIES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def _series(registry: CollectorRegistry) -> Iterator[str]:
    for family in registry.collect():
        for suffix in SERIES.get(family.type, ("",)):
            yield family.name + suffix


class _NoBroker:
    """An app whose broker is down: the queue lengths come out empty."""

    def connection_for_read(self, **_: object) -> None:
        raise ConnectionRefusedError("no broker in a unit test")


def _ours() -> set[str]:
    registry = CollectorRegistry()
    CeleryMetrics(registry)
    ParkingMetrics(registry)
    ApiMetrics(registry)
    registry.register(QueueLengthCollector(_NoBroker(), ["entry"]))
    return set(_series(registry))


def _flowers() -> set[str]:
    # Flower declares its metrics on the default registry when its event
    # state starts; their names are read from its source rather than by
    # starting one.
    declared = re.findall(r"['\"](flower_[a-z_]+)['\"]", FLOWER_EVENTS.read_text())
    assert declared, FLOWER_EVENTS
    return {name + s for name in declared for s in ("", "_bucket", "_count", "_sum")}


def _alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (f"alert {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def _referenced(expr: str) -> set[str]:
    # Label values in quotes (job="celery-beat") are not metric names.
    return set(METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))


QUERIES = dashboard_queries() + _alert_queries()


@pytest.mark.parametrize(("where", "expr"), QUERIES, ids=[w for w, _ in QUERIES])
def test_every_metric_a_shipped_query_names_is_exported(where: str, expr: str) -> None:
    names = _referenced(expr)
    assert names or "up{" in expr, f"{where} names no metric of ours: {expr}"
    unknown = names - _ours() - _flowers()
    assert not unknown, f"{where} asks for metrics nobody exports: {sorted(unknown)}"


def test_a_misspelt_metric_is_caught() -> None:
    padded = "sum(rate(celery_task_faild_total[5m])) or sum(celery_worker_up) * 0"
    assert _referenced(padded) - _ours() == {"celery_task_faild_total"}


def test_dashboards_and_alerts_select_only_shipped_scrape_jobs() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    for where, expr in QUERIES:
        for selected in re.findall(r'job="([^"]+)"', expr):
            assert selected in jobs, f"{where} selects job {selected!r}: {jobs}"
        for pattern in re.findall(r'job=~"([^"]+)"', expr):
            assert any(re.fullmatch(pattern, job) for job in jobs), where
