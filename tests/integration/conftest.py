"""Real RabbitMQ (own vhost) and Redis (own databases), cleaned for each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from parking.settings import Settings, get_settings
from tests.services import ApiServer, isolated_vhost
from workers import app as celery_application
from workers import runtime

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A ``pytestmark`` in a conftest marks nothing: every test of this folder
    # gets the marker here, so that ``-m integration`` selects all of them.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _vhost() -> Iterator[None]:
    with isolated_vhost():
        yield


@pytest.fixture(autouse=True)
def _clean_redis() -> Iterator[None]:
    settings = get_settings()
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()
    yield
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()


@pytest.fixture
def store_redis() -> redis.Redis:
    settings = get_settings()
    return redis.Redis.from_url(settings.redis_connection_url(settings.redis_db_store))


@pytest.fixture
def test_settings(tmp_path: Path) -> Settings:
    """The environment's test settings with a CSV of this test's own."""
    return get_settings().model_copy(
        update={"summary_csv": tmp_path / "stays.csv", "grace_seconds": 2}
    )


@pytest.fixture
def api_server(test_settings: Settings) -> Iterator[ApiServer]:
    server = ApiServer(test_settings)
    server.start()
    runtime.configure(test_settings.model_copy(update={"summary_api_url": server.url}))
    yield server
    server.stop()
    runtime.configure(None)


@pytest.fixture(scope="session")
def celery_app() -> Celery:
    # The embedded worker's heartbeat timer wakes it only every ten seconds,
    # so with heartbeats on each worker took ten seconds to stop; under load
    # that overran the stop timeout and left a worker thread behind.
    celery_application.conf.broker_heartbeat = 0
    return celery_application


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    settings = get_settings()
    return {
        "queues": [settings.queue(k) for k in ("entry", "exit", "generate", "default")],
        # The ping check needs a result backend; the service runs without one.
        # The embedded worker still waits until its consumer is started.
        "perform_ping_check": False,
        # A worker that cannot stop in time would hang every later test.
        "shutdown_timeout": 60.0,
    }


@pytest.fixture(autouse=True)
def _purge_queues(celery_app: Celery) -> None:
    """Nothing a previous test left in a queue may reach this one."""
    settings = get_settings()
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in celery_app.conf.task_queues:
            queue.bind(channel).declare()
            queue.bind(channel).purge()
        del settings
