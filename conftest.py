"""Test-wide set-up: isolate every test run from a developer's running system.

The environment is set here, before anything imports ``celeryconfig``: the
tests talk to a RabbitMQ vhost and Redis databases of their own, which the
integration fixtures create, clean and remove again.
"""

from __future__ import annotations

import os

TEST_VHOST = os.environ.get("PARKING_TEST_VHOST", "parking-test")
os.environ["PARKING_BROKER_URL"] = os.environ.get(
    "PARKING_TEST_BROKER_URL", f"amqp://guest:guest@127.0.0.1:5672/{TEST_VHOST}"
)
os.environ["PARKING_REDIS_DB_STORE"] = os.environ.get("PARKING_TEST_REDIS_DB", "14")
os.environ["PARKING_REDIS_DB_GENERATOR"] = os.environ.get(
    "PARKING_TEST_REDIS_DB_GENERATOR", "15"
)
os.environ["PARKING_QUEUE_PREFIX"] = "ptest"
os.environ["PARKING_ENVIRONMENT"] = "development"
# A developer's ./secrets must not leak into the tests.
os.environ["PARKING_SECRETS_DIR"] = os.path.join(os.sep, "nonexistent-parking-secrets")

# pytest-celery 1.x replaces the classic embedded worker with a Docker one;
# there is no Docker engine here, so the classic fixture is taken back by name.
from celery.contrib.pytest import celery_worker  # noqa: E402

__all__ = ["celery_worker"]
