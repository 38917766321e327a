"""Adversarial: the summary API SIGKILLed mid-batch, again and again.

A kill gives the API no chance to finish a batch: rows may be on disk that
were never acknowledged (their senders post them again), and a row may be
torn. Whatever the kill leaves, the restarted API must keep exactly one row
per stay, and the worker's retries must bring every stay in.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from parking.settings import get_settings
from tests.brokers import messages_in_queues
from tests.processes import Api, Worker, fault_env
from tests.services import isolated_vhost, wait_until
from tests.traffic import Feeder, check_ledger, plan_stays, read_rows, shuffled_events
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


def _rows_at_least(path: Path, count: int) -> Callable[[], bool]:
    return lambda: len(read_rows(path)) >= count


def test_api_sigkilled_mid_batch_keeps_one_row_per_stay(workdir: Path) -> None:
    stays = plan_stays(600, "KILLED", seed=41)
    env = fault_env(workdir, PARKING_RETRY_BACKOFF_CAP_SECONDS="2")
    csv_path = workdir / "stays.csv"
    api = Api(env)
    worker = Worker(env, concurrency=2, name="killapi")
    feeder = Feeder(celery_app, shuffled_events(stays), per_second=400)
    api.start()
    try:
        worker.start()
        feeder.start()
        for rows_before_kill in (100, 250, 400):
            wait_until(_rows_at_least(csv_path, rows_before_kill), timeout=60,
                       interval=0.02)  # fmt: skip
            api.stop(signal.SIGKILL)
            api.start()
        feeder.finish(timeout=60)
        wait_until(lambda: len(read_rows(csv_path)) >= len(stays), timeout=90)
        settings = get_settings()
        wait_until(
            lambda: not any(messages_in_queues(settings).values()),
            timeout=60,
            interval=0.5,
        )
    finally:
        worker.stop()
        api.stop()

    check = check_ledger(read_rows(csv_path), stays)
    assert check.exact, str(check)
    assert csv_path.read_bytes().endswith(b"\n")
    assert worker.count(r"summary refused") == 0
