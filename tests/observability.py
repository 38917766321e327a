"""Real processes for the observability tests: a prefork worker, Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from parking.ports import free_port
from tests.services import wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = requests.get(url, timeout=5)
    response.raise_for_status()
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """Sum of the samples of ``name`` that carry these labels (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= ls)


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def stop_process(process: subprocess.Popen[Any], timeout: float = 20) -> None:
    """Warm shutdown first (SIGTERM to its own session), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    metrics_url: str
    metrics_dir: Path
    log: Path


@contextmanager
def prefork_worker(
    tmp: Path, env: dict[str, str], queues: list[str], concurrency: int = 2
) -> Iterator[Worker]:
    """``celery worker -P prefork`` as a process of its own, multiprocess mode."""
    metrics_dir = tmp / "prometheus-multiproc"
    metrics_dir.mkdir()
    port = free_port()
    child_env = dict(
        env,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        PARKING_WORKER_METRICS_PORT=str(port),
    )
    log = tmp / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "-P", "prefork", "-c", str(concurrency), "-Q", ",".join(queues),
        "-n", f"metrics-test-{port}@%h", "-l", "INFO", "--without-mingle",
        "--without-gossip",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=child_env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    worker = Worker(process, f"http://127.0.0.1:{port}/metrics", metrics_dir, log)
    try:
        wait_until(
            lambda: process.poll() is not None or answers(worker.metrics_url),
            timeout=60,
        )
        assert process.poll() is None, f"worker exited: {log.read_text()[-3000:]}"
        yield worker
    finally:
        stop_process(process)


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise AssertionError(
            "the prometheus binary is not installed: apt-get install prometheus "
            "(.ci/run installs it when missing)"
        )
    return found


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> dict[str, Any]:
        response = requests.get(
            f"{self.url}/api/v1/query", params={"query": expr}, timeout=10
        )
        body: dict[str, Any] = response.json()
        return body

    def rules(self) -> list[dict[str, Any]]:
        body = requests.get(f"{self.url}/api/v1/rules", timeout=10).json()
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        body = requests.get(f"{self.url}/api/v1/targets", timeout=10).json()
        targets: list[dict[str, Any]] = body["data"]["activeTargets"]
        return targets


@contextmanager
def prometheus(tmp: Path, jobs: dict[str, str]) -> Iterator[Prometheus]:
    """A real Prometheus scraping ``jobs`` (name: host:port) every second,
    with the shipped alert rules loaded."""
    binary = prometheus_binary()
    port = free_port()
    config = tmp / "prometheus.yml"
    rules = tmp / "alerts.yml"
    shutil.copy(ALERTS, rules)
    scrape = [
        {"job_name": job, "static_configs": [{"targets": [target]}]}
        for job, target in jobs.items()
    ]
    # JSON is YAML: no YAML writer needed.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": scrape,
            }
        )
    )
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                binary, f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is not None or answers(f"{url}/-/ready"),
            timeout=60,
        )
        assert process.poll() is None, f"prometheus exited: {log.read_text()[-3000:]}"
        yield Prometheus(url)
    finally:
        stop_process(process)


def dashboard_queries() -> list[tuple[str, str]]:
    """Every PromQL expression of the shipped dashboards, with where it is."""
    found: list[tuple[str, str]] = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"{path.name}: {panel.get('title')} {target.get('refId')}"
                    found.append((where, target["expr"]))
    return found


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows hold panels
