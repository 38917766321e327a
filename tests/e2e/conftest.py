"""The whole system as an operator runs it: ``parking run`` in a subprocess.

Each system gets a fresh RabbitMQ vhost and empty Redis databases (the test
ones from the root ``conftest.py``), free ports, and a CSV and var directory
of its own; it is stopped with a signal, as Ctrl-C or an init system would.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from parking.settings import get_settings
from tests.e2e.system import RunningSystem
from tests.services import isolated_vhost

logger = logging.getLogger(__name__)

#: The measured figures, shown at the end of the run (pass or fail).
_FIGURES: list[str] = []
_TASK_CUT_OFF = re.compile(r"WorkerLostError|exited with 'signal")

#: The burst measurement wants unmatched exits declared quickly, a car park
#: large enough for the whole burst, and no simulated traffic of beat's own
#: mixed in (beat still runs the sweep), so that every count is exact.
BURST_SETTINGS = {
    "PARKING_GRACE_SECONDS": "2",
    "PARKING_GENERATOR_CAPACITY": "5000",
    "PARKING_ENTRY_INTERVAL_SECONDS": "86400",
    "PARKING_EXIT_INTERVAL_SECONDS": "86400",
}


def _flush_test_redis() -> None:
    settings = get_settings()
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()


@contextmanager
def _running(
    workdir: Path, stop_with: signal.Signals, overrides: Mapping[str, str]
) -> Iterator[RunningSystem]:
    with isolated_vhost():
        _flush_test_redis()
        system = RunningSystem(workdir, overrides)
        try:
            system.start()
            yield system
        finally:
            survivors = system.stop(stop_with)
            _flush_test_redis()
        assert not survivors, (
            f"process groups outlived {stop_with.name} and were killed: {survivors}"
        )
        log = system.log()
        forced = re.findall(r"sending SIGKILL to (\w+)", log)
        _FIGURES.append(
            f"{workdir.name}: stopped by {stop_with.name} in {system.stop_seconds:.1f} s"
            + (f", honcho had to SIGKILL {', '.join(forced)}" if forced else "")
        )
        # A warm shutdown lets running tasks finish: none is cut off mid-run.
        cut = [line for line in log.splitlines() if _TASK_CUT_OFF.search(line)]
        assert not cut, f"tasks cut off by {stop_with.name}:\n" + "\n".join(cut)


@pytest.fixture(scope="class")
def default_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    """``parking run`` with default settings.

    Only isolation differs (vhost, Redis databases, ports, paths), plus a
    Flower password: Flower's HTTP API answers only behind authentication.
    """
    workdir = tmp_path_factory.mktemp("default-system")
    with _running(workdir, signal.SIGINT, {}) as system:
        yield system


@pytest.fixture(scope="class")
def burst_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    workdir = tmp_path_factory.mktemp("burst-system")
    with _running(workdir, signal.SIGTERM, BURST_SETTINGS) as system:
        yield system


@pytest.fixture
def report() -> Callable[[str], None]:
    """Record a measured figure for the summary at the end of the run."""

    def add(line: str) -> None:
        logger.info("figure %s", line)
        _FIGURES.append(line)

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("end-to-end figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
