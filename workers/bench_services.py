"""The processes a bench run starts, and the broker state it checks."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parking.benchmark import BenchOptions
from parking.events import EventKind
from parking.ports import free_port
from parking.settings import Settings
from workers import topology
from workers.app import app

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# -- The processes under test -----------------------------------------------


class Services:
    """The worker(s) and the summary API the bench starts, in its work directory."""

    def __init__(self, options: BenchOptions, settings: Settings, work_dir: Path):
        self.options = options
        self.settings = settings
        self.work_dir = work_dir
        self.csv = work_dir / "stays.csv"
        self.metrics_dir = work_dir / "prometheus"
        self.api_url = ""
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        #: ``parking ingest`` processes, on the plain path only.
        self.ingest: list[subprocess.Popen[bytes]] = []

    def worker_command(self, number: int) -> list[str]:
        queues = ",".join(self.settings.queue(k) for k in ("entry", "exit", "generate"))
        name = f"{self.settings.queue_prefix}{number}@%h"
        return [
            sys.executable, "-m", "celery", "-A", "workers", "worker",
            "-Q", queues, "--include", "workers.bench",
            "-P", self.options.pool, "-c", str(self.options.concurrency),
            "-n", name, "-l", self.options.worker_log_level, "-E",
        ]  # fmt: skip

    def start(self) -> None:
        self.metrics_dir.mkdir(parents=True)
        base = dict(os.environ)
        base.pop("PROMETHEUS_MULTIPROC_DIR", None)
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        api_env = base | {
            "PARKING_SUMMARY_CSV": str(self.csv),
            "PARKING_API_HOST": "127.0.0.1",
            "PARKING_API_PORT": str(port),
        }
        self.api = self._spawn("api", [sys.executable, "-m", "parking", "api"], api_env)
        _wait(lambda: _http_ok(f"{self.api_url}/healthz"), 60, "summary API")
        worker_env = base | {
            # Set before Python starts: prefork children write their
            # metrics to files that this process reads (multiprocess mode).
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "PARKING_SUMMARY_API_URL": self.api_url,
        }
        if self.options.event_ttl is not None:
            worker_env["PARKING_EVENT_TTL_SECONDS"] = str(self.options.event_ttl)
        for number in range(1, self.options.workers + 1):
            # A port of its own: never the running system's, nor a sibling's.
            env = worker_env | {"PARKING_WORKER_METRICS_PORT": str(free_port())}
            command = self.worker_command(number)
            self.workers.append(self._spawn(f"worker{number}", command, env))
        if self.options.path == "plain":
            # As many processes handle events as on the Celery path: one per
            # pool slot of every worker.
            ingest = [sys.executable, "-m", "parking", "ingest"]
            slots = self.options.workers * self.options.concurrency
            for number in range(1, slots + 1):
                env = worker_env | {"PARKING_INGEST_METRICS_PORT": str(free_port())}
                self.ingest.append(self._spawn(f"ingest{number}", ingest, env))
        _wait(self._consuming, 120, "workers consuming")

    def _spawn(
        self, name: str, command: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        log = open(self.work_dir / f"{name}.log", "wb")  # noqa: SIM115
        # A session of its own: stopping it can never reach other processes.
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=os.getcwd(), preexec_fn=_die_with_parent(),
        )  # fmt: skip
        log.close()
        logger.info("bench started name=%s pid=%d", name, process.pid)
        return process

    def _consuming(self) -> bool:
        for process in self._processes():
            if process.poll() is not None:
                raise RuntimeError(
                    f"a bench process exited early; see the logs in {self.work_dir}"
                )
        names = [self.settings.queue(k) for k in ("entry", "exit")]
        if self.options.path == "plain":
            names += [topology.raw_queue_name(self.settings, k) for k in EventKind]
        states = [queue_state(name) for name in names]
        return all(s is not None and s[1] >= self.options.workers for s in states)

    def _processes(self) -> list[subprocess.Popen[bytes]]:
        api = [self.api] if self.api is not None else []
        return [*self.workers, *self.ingest, *api]

    def stop(self) -> None:
        for process in self._processes():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # warm shutdown
        for process in self._processes():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def pids(self) -> dict[str, list[int]]:
        return {
            # The processes that consume the events, whichever path.
            "worker": [p.pid for p in self.workers + self.ingest],
            "api": [self.api.pid] if self.api else [],
        }


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a child that gets SIGTERM when the bench ends, even by SIGKILL,
    so an interrupted run leaves no worker or API behind.

    Runs between fork and exec, which is safe only while the bench has no
    other thread: the services start before any of its threads.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return arm


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def queue_state(name: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of a queue, or None when it does not exist."""
    with app.connection_for_write() as conn:
        channel = conn.channel()
        try:
            _, messages, consumers = channel.queue_declare(queue=name, passive=True)
        except conn.channel_errors:  # 404: no such queue
            return None
        finally:
            if channel.is_open:
                channel.close()
    return int(messages), int(consumers)


def prepare_queues(settings: Settings, purge: bool) -> None:
    with app.connection_for_write() as conn:
        raw = [topology.raw_queue(settings, kind) for kind in EventKind]
        for queue in [*topology.task_queues(settings), *raw]:
            bound = queue.bind(conn.default_channel)
            bound.declare()
            if purge:
                bound.purge()


def delete_topology(settings: Settings) -> None:
    """Remove the queues and exchanges of the bench's own prefix."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for kind in (*topology.KINDS, "dead"):
            channel.queue_delete(settings.queue(kind))
        for event_kind in EventKind:
            channel.queue_delete(topology.raw_queue_name(settings, event_kind))
        for exchange in (
            topology.task_exchange(settings),
            topology.dead_letter_exchange(settings),
        ):
            channel.exchange_delete(exchange.name)


def broker_version() -> str | None:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        properties = getattr(conn.connection, "server_properties", {}) or {}
    version = properties.get("version")
    return version.decode() if isinstance(version, bytes) else version
