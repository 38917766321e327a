"""The shipped monitoring against the running system, through a real Prometheus.

``parking run`` runs with the simulated cameras at a brisk pace and a short
grace period, so that every kind of figure (matched and unmatched exits, API
writes, beat's publishes) exists within seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from parking.ports import free_port
from parking.settings import get_settings
from tests.e2e.system import RunningSystem
from tests.observability import (
    ALERTS,
    SCRAPE_CONFIG,
    Prometheus,
    dashboard_queries,
    prometheus,
    prometheus_binary,
    scrape,
    value,
)
from tests.services import isolated_vhost, wait_until

pytestmark = pytest.mark.e2e

#: Job names as in deploy/prometheus/prometheus.yml (the queries select some).
JOBS = ("celery-worker", "celery-beat", "parking-api", "parking-ingest", "flower")


def _flush_test_redis() -> None:
    settings = get_settings()
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    workdir = tmp_path_factory.mktemp("observed-system")
    overrides = {
        "PARKING_BEAT_METRICS_PORT": str(free_port()),
        "PARKING_ENTRY_INTERVAL_SECONDS": "0.2",
        "PARKING_EXIT_INTERVAL_SECONDS": "0.25",
        "PARKING_GRACE_SECONDS": "2",
        "PARKING_SWEEP_INTERVAL_SECONDS": "1",
    }
    with isolated_vhost():
        _flush_test_redis()
        running = RunningSystem(workdir, overrides)
        try:
            running.start()
            yield running
        finally:
            running.stop(signal.SIGINT)
            _flush_test_redis()


def _targets(system: RunningSystem) -> dict[str, str]:
    def local(url_or_port: str) -> str:
        return re.sub(r"^https?://", "", url_or_port).rstrip("/")

    env = system.env
    return {
        "celery-worker": f"127.0.0.1:{env['PARKING_WORKER_METRICS_PORT']}",
        "celery-beat": f"127.0.0.1:{env['PARKING_BEAT_METRICS_PORT']}",
        "parking-api": local(system.api_url),
        "parking-ingest": f"127.0.0.1:{env['PARKING_INGEST_METRICS_PORT']}",
        "flower": local(system.flower_url),
    }


def _metrics_url(system: RunningSystem, job: str) -> str:
    return f"http://{_targets(system)[job]}/metrics"


def _promtool(*args: str) -> str:
    promtool = Path(prometheus_binary()).with_name("promtool")
    result = subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool {args}:\n{result.stdout}{result.stderr}"
    return result.stdout


def _has_data(prom: Prometheus, expr: str) -> bool:
    body = prom.query(expr)
    return body["status"] == "success" and bool(body["data"]["result"])


def _wait_for_traffic(system: RunningSystem) -> None:
    """Stays written, exits declared unmatched and beat's sends counted."""
    worker = _metrics_url(system, "celery-worker")
    beat = _metrics_url(system, "celery-beat")

    def flowing() -> bool:
        samples = scrape(worker)
        return (
            value(samples, "parking_stays_total") > 0
            and value(samples, "parking_exits_unmatched_total") > 0
            and value(scrape(beat), "celery_task_sent_total") > 0
        )

    wait_until(flowing, timeout=90, interval=0.5)


def test_every_shipped_query_evaluates_on_live_data(
    system: RunningSystem, tmp_path: Path, report: Callable[[str], None]
) -> None:
    shipped_rules = _promtool("check", "rules", str(ALERTS))
    found = re.search(r"SUCCESS: (\d+) rules found", shipped_rules)
    assert found, shipped_rules
    rule_count = int(found[1])
    _promtool("check", "config", str(SCRAPE_CONFIG))
    queries = dashboard_queries()
    assert len(queries) >= 20, queries

    _wait_for_traffic(system)
    with prometheus(tmp_path, _targets(system)) as prom:
        wait_until(
            lambda: (
                {t["labels"]["job"] for t in prom.targets() if t["health"] == "up"}
                == set(JOBS)
            ),
            timeout=60,
        )
        # Rates need two scrapes inside their window; give every query time.
        # The precise list of what is missing follows the wait.
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: all(_has_data(prom, expr) for _, expr in queries),
                timeout=90,
                interval=1,
            )
        empty = [where for where, expr in queries if not _has_data(prom, expr)]
        assert not empty, f"dashboard queries without data: {empty}"

        wait_until(
            lambda: all(r["health"] != "unknown" for r in prom.rules()), timeout=30
        )
        rules = prom.rules()
        assert len(rules) == rule_count
        broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not broken, broken
        for rule in rules:
            assert prom.query(rule["query"])["status"] == "success", rule["name"]

        p95 = prom.query(
            "histogram_quantile(0.95, sum by (le) "
            "(rate(parking_event_processing_seconds_bucket[1m])))"
        )["data"]["result"]
        # irate: the series are younger than any window, which rate() scales.
        rate = prom.query("sum(irate(parking_events_total[1m]))")["data"]["result"]
    report(
        f"observability: {len(queries)} dashboard queries and {rule_count} alert "
        f"rules evaluated on live data; events {float(rate[0]['value'][1]):.1f}/s, "
        f"processing p95 {float(p95[0]['value'][1]) * 1000:.2f} ms (first minute)"
    )


def _status(system: RunningSystem, *args: str) -> str:
    return system.cli("status", "--once", "--interval", "1", *args, timeout=60).stdout


def test_status_once_shows_live_figures(
    system: RunningSystem, report: Callable[[str], None]
) -> None:
    _wait_for_traffic(system)
    view: dict[str, Any] = json.loads(_status(system, "--json"))

    assert view["worker"]["up"] is True
    assert view["worker"]["error"] is None
    assert view["api"]["error"] is None
    assert view["window_seconds"] >= 1
    live = [e for e in view["events"] if e["per_second"]]
    assert {e["kind"] for e in live} == {"entry", "exit"}, view["events"]
    assert view["occupancy"] is not None
    assert view["occupancy"] > 0
    entry = view["latency_seconds"]["entry"]
    assert entry["count"] > 0
    assert 0 < entry["p50"] <= entry["p95"] <= entry["p99"]
    assert view["queue_wait_seconds"], view["queue_wait_seconds"]
    share = view["matched_share"]
    assert 0 < share["total"] < 1
    assert share["configured"] == pytest.approx(0.8)
    settings = get_settings()
    assert settings.queue("entry") in view["queues"]
    assert view["api"]["rows_written"] > 0
    assert not math.isnan(view["api"]["write_latency_seconds"]["p95"])
    assert any(t["succeeded_per_second"] for t in view["tasks"])

    table = _status(system)
    for label in ("occupancy", "matched share", "latency", "queues"):
        assert label in table
    report(
        f"parking status: {sum(e['per_second'] for e in live):.1f} events/s, "
        f"entry p50 {entry['p50'] * 1000:.2f} ms p99 {entry['p99'] * 1000:.2f} ms, "
        f"occupancy {view['occupancy']:.0f}, matched share {share['total']:.2f}"
    )
