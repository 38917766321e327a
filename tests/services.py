"""Helpers for tests that use the machine's RabbitMQ and Redis."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from parking.api.app import create_app
from parking.ports import free_port
from parking.settings import Settings


def test_vhost() -> str | None:
    """The vhost to create, or None when the caller brought its own broker."""
    if os.environ.get("PARKING_TEST_BROKER_URL"):
        return None
    return urlsplit(os.environ["PARKING_BROKER_URL"]).path.lstrip("/") or None


def rabbitmqctl(*args: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError(
            "integration tests create a RabbitMQ vhost with rabbitmqctl; install it "
            "or set PARKING_TEST_BROKER_URL to a broker (vhost) the tests may use"
        )
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)


@contextmanager
def isolated_vhost() -> Iterator[None]:
    vhost = test_vhost()
    if vhost is None:
        yield
        return
    # A leftover from an interrupted run would keep old queues and messages.
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield
    finally:
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True
        )


def wait_until(
    condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Poll a condition; fail with a clear message when it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


class ApiServer:
    """The real summary API on a free port, served by uvicorn in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server.should_exit = False
        self._server.started = False
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started, timeout=10)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def csv(self) -> Path:
        return self.settings.summary_csv

    def rows(self) -> list[dict[str, str]]:
        """The stay rows written so far (none before the file exists)."""
        if not self.csv.exists():
            return []
        with open(self.csv, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
