"""The real ``parking run`` in a subprocess, and what the tests read from it."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import requests
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from parking.ports import free_port
from tests.services import wait_until

logger = logging.getLogger(__name__)

#: The checkout the tests run from; the shared data lies beside it.
REPO = Path(__file__).resolve().parents[2]

# honcho announces every process it starts; each one leads its own session.
_STARTED = re.compile(r"\|\s+(\w+) started \(pid=(\d+)\)")
_WORKER_READY = re.compile(r"worker@\S+ ready\.")
_ONE_MICROSECOND = timedelta(microseconds=1)


def parking_command(*args: str) -> list[str]:
    """The installed ``parking`` script, as the README runs it."""
    script = Path(sys.executable).with_name("parking")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "parking", *args]


def exact_seconds(span: timedelta) -> Decimal:
    """A time span as exact decimal seconds (microsecond resolution)."""
    return Decimal(span // _ONE_MICROSECOND).scaleb(-6)


def instant(text: str) -> datetime:
    """An RFC 3339 time from the CSV or an event; it must carry its offset."""
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise AssertionError(f"time without offset: {text!r}")
    return at


def inconsistent_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows whose exit is before the entry or whose duration is not exit - entry."""
    bad = []
    for row in rows:
        entry = instant(row["entry_date_time"])
        exit_ = instant(row["exit_date_time"])
        duration = Decimal(row["duration_seconds"])
        if exit_ < entry or duration != exact_seconds(exit_ - entry):
            bad.append(row)
    return bad


class RunningSystem:
    """One ``parking run`` with its own ports, CSV and var directory."""

    def __init__(
        self, workdir: Path, overrides: Mapping[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        api_port = free_port()
        self.flower_auth = ("e2e", secrets.token_urlsafe(16))
        self.env = {
            **os.environ,
            "PARKING_SUMMARY_CSV": str(workdir / "stays.csv"),
            "PARKING_VAR_DIR": str(workdir / "var"),
            "PARKING_API_PORT": str(api_port),
            "PARKING_SUMMARY_API_URL": f"http://127.0.0.1:{api_port}",
            "PARKING_FLOWER_PORT": str(free_port()),
            "PARKING_WORKER_METRICS_PORT": str(free_port()),
            "PARKING_INGEST_METRICS_PORT": str(free_port()),
            # Flower's HTTP API answers only behind authentication.
            "PARKING_FLOWER_USER": self.flower_auth[0],
            "PARKING_FLOWER_PASSWORD": self.flower_auth[1],
            # Log lines must reach the file as they happen, not per 8 KiB.
            "PYTHONUNBUFFERED": "1",
            # The banner is parsed: long paths must not wrap.
            "COLUMNS": "400",
            **(overrides or {}),
        }
        self.log_path = workdir / "parking-run.log"
        self.metrics_dir = workdir / "var" / "prometheus"
        self.started_at = 0.0
        self.returncode: int | None = None
        self.stop_seconds = 0.0
        self.api_url = self.flower_url = ""
        self.csv_path = workdir / "stays.csv"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._groups: set[int] = set()

    # -- lifecycle -------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started_at = time.time()
        self._process = subprocess.Popen(
            parking_command("run"),
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._groups.add(self._process.pid)
        wait_until(self._ready, timeout=timeout, interval=0.2)
        logger.info(
            "parking run ready seconds=%.1f api=%s flower=%s",
            time.time() - self.started_at, self.api_url, self.flower_url,
        )  # fmt: skip

    def stop(
        self, how: signal.Signals = signal.SIGINT, timeout: float = 60
    ) -> list[int]:
        """Stop as an operator would; returns process groups that outlived it.

        Survivors are killed here in any case, so nothing leaks into the
        next test; the caller decides whether surviving is a failure.
        """
        process = self._process
        if process is None:
            return []
        survivors: list[int] = []
        stopping = time.monotonic()
        try:
            self._groups.update(self.child_groups())
            if process.poll() is None:
                process.send_signal(how)
                try:
                    self.returncode = process.wait(timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("parking run ignored signal=%s", how.name)
            try:
                wait_until(lambda: not self._alive_groups(), timeout=15, interval=0.1)
            except AssertionError:
                survivors = self._alive_groups()
        finally:
            for group in self._alive_groups():
                os.killpg(group, signal.SIGKILL)
            if process.poll() is None:
                process.kill()
            self.returncode = process.wait()
            self.stop_seconds = time.monotonic() - stopping
            if self._log is not None:
                self._log.close()
            self._process = None
        logger.info(
            "parking run stopped rc=%s survivors=%s", self.returncode, survivors
        )
        return survivors

    def child_groups(self) -> set[int]:
        """The processes honcho started, each the leader of its own group."""
        return {int(pid) for _, pid in _STARTED.findall(self.log())}

    def _alive_groups(self) -> list[int]:
        alive = []
        for group in sorted(self._groups):
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                continue
            alive.append(group)
        return alive

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(
                f"parking run exited rc={self._process.returncode}:\n{self.tail()}"
            )
        text = self.log()
        banner = {
            name: match.group(1)
            for name in ("summary API", "Flower", "stays CSV")
            if (match := re.search(rf"^\s*{name}\s+(\S+)\s*$", text, re.MULTILINE))
        }
        if len(banner) < 3 or not _WORKER_READY.search(text):
            return False
        self.api_url = banner["summary API"]
        self.flower_url = banner["Flower"]
        self.csv_path = Path(banner["stays CSV"])
        return self._answers(f"{self.api_url}/healthz") and self._answers(
            f"{self.flower_url}/healthcheck"
        )

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    # -- what the tests read ---------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def rows(self) -> list[dict[str, str]]:
        """The stays CSV, up to its last complete line (it may be mid-append)."""
        try:
            data = self.csv_path.read_bytes()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1].decode("utf-8")
        return list(csv.DictReader(io.StringIO(complete, newline="")))

    def metric(self, name: str, **labels: str) -> float:
        """A metric summed over every process of the run and matching labels.

        Read from the prometheus multiprocess files the run's processes write,
        which is what a worker's metrics endpoint serves.
        """
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        return sum(
            sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == name
            and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def flower(self, path: str) -> Any:
        response = requests.get(
            f"{self.flower_url}{path}", auth=self.flower_auth, timeout=10
        )
        response.raise_for_status()
        return response.json()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run another ``parking`` command against this system."""
        result = subprocess.run(
            parking_command(*args),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, (
            f"parking {' '.join(args)} failed rc={result.returncode}:\n{result.stderr}"
        )
        return result
