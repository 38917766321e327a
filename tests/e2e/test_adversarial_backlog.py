"""Adversarial: a worker restarted onto a backlog, with beat sweeping hard.

The worker was down while cameras kept publishing, and the exit camera's
events happened to be published first. When the worker comes back it drains
both queues while beat sweeps every second with a one-second grace: no exit
may be declared unmatched while its entry is still on its way, and a warm
restart in the middle of the backlog must lose and double nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from parking.settings import get_settings
from tests.brokers import messages_in_queues
from tests.processes import Api, Beat, Worker, fault_env
from tests.services import isolated_vhost, wait_until
from tests.traffic import Feeder, check_ledger, plan_stays, read_rows
from workers.app import app as celery_app

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def _flush_redis() -> None:
    settings = get_settings()
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    with isolated_vhost():
        _flush_redis()
        try:
            yield tmp_path
        finally:
            _flush_redis()


def test_a_backlog_of_exits_first_survives_a_warm_restart_under_hard_sweeps(
    workdir: Path,
) -> None:
    stays = plan_stays(800, "BACKLOG", seed=43)
    env = fault_env(
        workdir,
        PARKING_GRACE_SECONDS="1",
        PARKING_SWEEP_INTERVAL_SECONDS="1",
        # Beat sweeps only: no simulated traffic of its own.
        PARKING_ENTRY_INTERVAL_SECONDS="86400",
        PARKING_EXIT_INTERVAL_SECONDS="86400",
    )
    csv_path = workdir / "stays.csv"
    events = [("exit", s.exit) for s in stays] + [("entry", s.entry) for s in stays]
    feeder = Feeder(celery_app, events)
    feeder.start()
    feeder.finish(timeout=60)

    api, beat = Api(env), Beat(env)
    worker = Worker(env, concurrency=2, name="backlog")
    api.start()
    try:
        beat.start()
        worker.start()
        wait_until(lambda: len(read_rows(csv_path)) >= len(stays) // 3, timeout=60)
        worker.stop(signal.SIGTERM)
        worker.start()
        wait_until(lambda: len(read_rows(csv_path)) >= len(stays), timeout=120)
        settings = get_settings()
        wait_until(
            lambda: not any(messages_in_queues(settings).values()),
            timeout=60,
            interval=0.5,
        )
    finally:
        worker.stop()
        beat.stop()
        api.stop()

    check = check_ledger(read_rows(csv_path), stays)
    assert check.exact, str(check)
    unmatched = read_rows(workdir / "unmatched.csv")
    assert unmatched == [], f"{len(unmatched)} exits declared unmatched"
