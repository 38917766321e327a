"""One bench run: the baseline, the pipeline and the API alone, measured."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import redis

from parking import measure
from parking.api.serving import choose
from parking.benchmark import BenchOptions, py_spy
from parking.settings import get_settings
from parking.stays import Stay, Visit
from workers.app import app
from workers.bench import (
    NOOP_TASK,
    Plan,
    Publisher,
    noop_counter_key,
    plan_noop,
    plan_pipeline,
    waves,
)
from workers.bench_services import (
    Services,
    delete_topology,
    prepare_queues,
    queue_state,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

logger = logging.getLogger(__name__)

EVENTS_TOTAL = "parking_events_total"
REJECTED_TOTAL = "parking_events_rejected_total"
PROCESSING = "parking_event_processing_seconds"
SUMMARY_POST = "parking_summary_post_seconds"


class Bench:
    """One run: the services, the store, the CSV tail and the samplers."""

    def __init__(self, options: BenchOptions, progress: Progress) -> None:
        self.options = options
        self.progress = progress
        self.settings = get_settings()
        self.token = secrets.token_hex(2).upper()
        db = self.settings.redis_db_store
        self.redis = redis.Redis.from_url(self.settings.redis_connection_url(db))
        self.services: Services | None = None
        self.publisher = Publisher(
            self.settings, options.confirm, plain=options.path == "plain"
        )
        self.tail: measure.CsvTail | None = None
        self.memory = measure.MemoryPeaks({})
        self._pollers: list[measure.Poller] = []
        self._metrics_dir: Path | None = None
        self.metrics_url = options.metrics_url

    # life cycle

    def __enter__(self) -> Bench:
        options = self.options
        if options.use_running:
            csv = options.csv or self.settings.summary_csv
            self.tail = measure.CsvTail(csv, from_end=True)
            self.metrics_url = self.metrics_url or (
                f"http://127.0.0.1:{self.settings.worker_metrics_port}/metrics"
            )
            trees = {"worker": options.worker_pids, "api": options.api_pids}
        else:
            # Checked before the purge: a bench that refuses to run must not
            # have emptied the queues of the one it found.
            state = queue_state(self.settings.queue("entry"))
            if state is not None and state[1] > 0:
                raise click.ClickException(
                    f"queue {self.settings.queue('entry')} already has consumers: "
                    "is another bench running on this broker? Give this one a "
                    "--queue-prefix and --redis-db of its own."
                )
            prepare_queues(self.settings, purge=True)
            self.services = Services(options, self.settings, options.work_dir)
            try:
                self.services.start()
            except BaseException:
                # __exit__ does not run when __enter__ fails.
                self.services.stop()
                raise
            self.tail = measure.CsvTail(self.services.csv)
            self._metrics_dir = self.services.metrics_dir
            trees = self.services.pids()
        self.memory = measure.MemoryPeaks(trees | self._servers())
        self._pollers = [
            measure.Poller(self.tail.poll, 0.01, "bench-csv-tail"),
            measure.Poller(self.memory.sample, 0.5, "bench-memory"),
        ]
        for poller in self._pollers:
            poller.start()
        return self

    def __exit__(self, *_: object) -> None:
        for poller in self._pollers:
            poller.stop()
        if self.services is not None:
            self.services.stop()
            if not self.options.keep:
                delete_topology(self.settings)

    # readings

    def _counters(self) -> measure.Samples | None:
        assert self._metrics_dir is not None
        try:
            return measure.counters_from_dir(self._metrics_dir)
        except (OSError, ValueError) as exc:
            logger.warning("worker metrics unreadable error=%s", exc)
            return None

    def metrics(self) -> measure.Samples | None:
        try:
            if self._metrics_dir is not None:
                return measure.samples_from_dir(self._metrics_dir)
            if self.metrics_url:
                return measure.samples_from_url(self.metrics_url)
        except (OSError, ValueError) as exc:
            logger.warning("worker metrics unreadable error=%s", exc)
        return None

    def processed_since(self, before: measure.Samples | None) -> int | None:
        now = self._counters() if self._metrics_dir is not None else self.metrics()
        if now is None or before is None:
            return None
        delta = measure.difference(now, before)
        done = measure.total(delta, EVENTS_TOTAL)
        return int(done + measure.total(delta, REJECTED_TOTAL))

    def rows_of(
        self, plates: set[str], start: int = 0
    ) -> list[tuple[float, list[str]]]:
        assert self.tail is not None
        rows = self.tail.snapshot(start)
        if not rows:
            return []
        column = self.tail.column("vehicle_plate")
        return [(seen, row) for seen, row in rows if row[column] in plates]

    def noop_available(self) -> str | None:
        """Why the baseline cannot run here, or None when it can."""
        if not self.options.use_running:
            return None
        replies = app.control.inspect(timeout=2.0).registered() or {}
        if any(NOOP_TASK in tasks for tasks in replies.values()):
            return None
        return "no running worker has parking.bench_noop (--include workers.bench)"

    def _servers(self) -> dict[str, list[int]]:
        """RabbitMQ's and Redis's processes when they run on this machine: their
        CPU per event belongs in the budget as much as the workers'."""
        found = {}
        for name, url, default in (
            ("broker", self.settings.broker_url, 5672),
            ("redis", self.settings.redis_url, 6379),
        ):
            parts = urllib.parse.urlsplit(url)
            if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                continue
            pid = measure.listener_pid(parts.port or default)
            if pid is not None:
                found[name] = [pid]
        return found

    # phases

    def baseline(self) -> dict[str, Any]:
        count = self.options.baseline
        reason = self.noop_available()
        if count <= 0 or reason is not None:
            return {"skipped": reason or "--baseline 0"}
        key = noop_counter_key(self.settings)
        self.redis.delete(key)
        plan = plan_noop(count, self.options.publishers)
        bar = self.progress.add_task("baseline: no-op tasks", total=count)
        cpu_before = self.memory.cpu()
        started = time.monotonic()
        self.publisher.start(plan.lanes)
        done = 0
        deadline = started + self.options.timeout
        while (
            done < count and time.monotonic() < deadline and not self.publisher.errors
        ):
            time.sleep(0.02)
            done = int(self.redis.get(key) or 0)
            self.progress.update(bar, completed=done)
        elapsed = time.monotonic() - started
        self.publisher.join()
        self.redis.delete(key)
        return {
            "tasks": count,
            "completed": done,
            "seconds": round(elapsed, 3),
            "tasks_per_second": round(done / elapsed, 1),
            "cpu_ms_per_task": (cpu := _per(self.memory.cpu(), cpu_before, done)),
            "cores_busy": _cores(cpu, done, elapsed),
            "timed_out": done < count,
        }

    def pipeline(self) -> dict[str, Any]:
        options = self.options
        plan = plan_pipeline(
            options.count, options.match_ratio, options.publishers, self.token
        )
        ours = plan.matched | {
            item.plate for lane in plan.lanes for item in lane if item.kind
        }
        assert self.tail is not None
        tail_start = len(self.tail.snapshot())
        before = self.metrics()
        redis_before = measure.redis_stats(self.redis)
        self.memory.peaks.clear()
        bars = {
            "published": self.progress.add_task("pipeline: published", total=plan.size),
            "processed": self.progress.add_task("pipeline: processed", total=plan.size),
            "rows": self.progress.add_task(
                "pipeline: CSV rows", total=len(plan.matched)
            ),
        }
        count_rows = self.tail.counter(plan.matched, tail_start)
        profilers = self._profile()
        cpu_before = self.memory.cpu()
        started = time.monotonic()
        pending = waves(plan, options.order)
        wave = pending.pop(0)
        wave_size = sum(map(len, wave))
        self.publisher.start(wave)
        sent_before = 0  # by the waves already sent
        wave_started, publishing = started, 0.0  # seconds spent sending
        wave_done = False
        finished_at = None
        deadline = started + options.timeout
        while time.monotonic() < deadline and not self.publisher.errors:
            time.sleep(0.1)
            sent = sent_before + self.publisher.sent
            processed = self.processed_since(before)
            if not wave_done and sent == sent_before + wave_size:
                wave_done = True
                publishing += time.monotonic() - wave_started
            if pending and wave_done and (processed is None or processed >= sent):
                # The next wave goes once the workers have done this one.
                self.publisher.join()
                sent_before, wave = sent, pending.pop(0)
                wave_size = sum(map(len, wave))
                wave_started, wave_done = time.monotonic(), False
                self.publisher.start(wave)
            rows = count_rows()
            self._show(bars, sent, processed, rows)
            complete = processed is None or processed >= plan.size
            if rows >= len(plan.matched) and complete and sent >= plan.size:
                finished_at = time.monotonic()
                break
        self.publisher.join()
        elapsed = (finished_at or time.monotonic()) - started
        cpu_per_event = _per(self.memory.cpu(), cpu_before, plan.size)
        _stop_profilers(profilers)
        after = self.metrics()
        report = {
            "events": plan.size,
            "expected_rows": len(plan.matched),
            "seconds": round(elapsed, 3),
            "events_per_second": round(plan.size / elapsed, 1),
            "order": options.order,
            "publish_per_second": (
                round(plan.size / publishing, 1) if publishing > 0 else None
            ),
            "timed_out": finished_at is None,
            "redis_before": redis_before,
            "redis_after": measure.redis_stats(self.redis),
            "memory_peak_bytes": dict(self.memory.peaks),
            "cpu_ms_per_event": cpu_per_event,
            "cores_busy": _cores(cpu_per_event, plan.size, elapsed),
        }
        report |= self.processing(before, after)
        report |= self._rows(plan, ours, tail_start)
        return report

    def _profile(self, api_alone: bool = False) -> list[subprocess.Popen[bytes]]:
        """py-spy on every worker process and the API (only the API for the API
        alone): samples of threads that hold the GIL (CPU in Python), taken
        without pausing the process."""
        target = self.options.profile
        if target is None or self.services is None:
            return []
        spy = py_spy()
        assert spy is not None  # checked before the run starts
        target.mkdir(parents=True, exist_ok=True)
        pids = self.services.pids()
        named = {f"api-alone-{pid}": pid for pid in pids["api"]}
        if not api_alone:
            named = {f"worker-{pid}": pid for pid in measure.tree(pids["worker"])}
            named |= {f"api-{pid}": pid for pid in pids["api"]}
        profilers = []
        for name, pid in named.items():
            command = [
                spy, "record", "--pid", str(pid), "--nonblocking", "--gil",
                "--format", "raw", "--output", str(target / f"{name}.txt"),
            ]  # fmt: skip
            profilers.append(
                subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        return profilers

    def _show(
        self, bars: dict[str, TaskID], sent: int, processed: int | None, rows: int
    ) -> None:
        self.progress.update(bars["published"], completed=sent)
        if processed is not None:
            self.progress.update(bars["processed"], completed=processed)
        self.progress.update(bars["rows"], completed=rows)

    def processing(
        self, before: measure.Samples | None, after: measure.Samples | None
    ) -> dict[str, Any]:
        if before is None or after is None:
            return {"processing": None, "outcomes": None}
        delta = measure.difference(after, before)
        processing: dict[str, Any] = {}
        for kind, target in (("entry", 0.003), ("exit", 0.01)):
            buckets = measure.buckets(delta, PROCESSING, kind=kind)
            processing[kind] = _spread(buckets) | {
                "share_within_target": measure.share_within(buckets, target)
            }
        # Entries that open a visit touch Redis only; an entry that completes
        # a stay whose exit came first also posts it, as an exit does.
        for name, outcome in (
            ("entry_opening", "opened"),
            ("entry_completing", "matched"),
        ):
            processing[name] = _spread(
                measure.buckets(delta, PROCESSING, kind="entry", outcome=outcome)
            )
        # The exit's share spent posting the stay to the API.
        processing["summary_post"] = _spread(measure.buckets(delta, SUMMARY_POST))
        outcomes: dict[str, int] = {}
        for (name, labels), value in sorted(delta.items()):
            if name == EVENTS_TOTAL and value:
                found = dict(labels)
                key = f"{found.get('kind')}/{found.get('outcome')}"
                outcomes[key] = outcomes.get(key, 0) + int(value)
        rejected = int(measure.total(delta, REJECTED_TOTAL))
        return {"processing": processing, "outcomes": outcomes, "rejected": rejected}

    def _rows(self, plan: Plan, ours: set[str], tail_start: int) -> dict[str, Any]:
        assert self.tail is not None
        self.tail.poll()
        rows = self.rows_of(ours, tail_start)
        if not rows:
            written_plates: set[str] = set()
            stay_ids: set[str] = set()
        else:
            plate = self.tail.column("vehicle_plate")
            stay = self.tail.column("stay_id")
            written_plates = {row[plate] for _, row in rows}
            stay_ids = {row[stay] for _, row in rows}
        return {
            "rows": {
                "expected": len(plan.matched),
                "written": len(rows),
                "lost": len(plan.matched - written_plates),
                "duplicated": len(rows) - len(stay_ids),
                "unexpected": len(written_plates - plan.matched),
            },
            "end_to_end_ms": self.latency(rows),
        }

    def latency(self, rows: list[tuple[float, list[str]]]) -> dict[str, Any]:
        if not rows:
            return {"count": 0, "p50": None, "p99": None}
        assert self.tail is not None
        column = self.tail.column("exit_date_time")
        latencies = sorted(
            seen - datetime.fromisoformat(row[column]).timestamp() for seen, row in rows
        )
        return {
            "count": len(latencies),
            "p50": _ms(measure.percentile(latencies, 0.5)),
            "p99": _ms(measure.percentile(latencies, 0.99)),
            "max": _ms(latencies[-1]),
        }

    def api_only(self) -> dict[str, Any]:
        """The summary API alone: rows per second with durable writes."""
        count = self.options.api_rows
        if count <= 0 or self.services is None:
            return {"skipped": "--api-rows 0" if count <= 0 else "--use-running"}
        bodies = [_summary_body(self.token, index) for index in range(count)]
        token = self.settings.summary_api_token
        bar = self.progress.add_task("API alone: rows", total=count)
        load_before = measure.machine()["load_average"]
        profilers = self._profile(api_alone=True)
        cpu_before = self.memory.cpu()
        seconds, statuses = measure.post_json_many(
            f"{self.services.api_url}/summaries",
            bodies,
            connections=self.options.api_connections,
            token=token.get_secret_value() if token else None,
        )
        cpu = _per(self.memory.cpu(), cpu_before, count)
        _stop_profilers(profilers)
        self.progress.update(bar, completed=count)
        written = sum(1 for status in statuses if status == 201)
        loop, http = choose(
            os.environ.get("PARKING_API_LOOP", "auto"),
            os.environ.get("PARKING_API_HTTP", "auto"),
        )
        return {
            "rows": count,
            "written": written,
            "seconds": round(seconds, 3),
            "rows_per_second": round(written / seconds, 1),
            "connections": self.options.api_connections,
            # The bench's share is the client's, plus its CSV tail and samplers.
            "cpu_ms_per_row": {k: cpu[k] for k in ("api", "bench") if k in cpu},
            "server": {"loop": loop, "http": http},
            "load_average": [load_before, measure.machine()["load_average"]],
        }


def _stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file and ends
    for profiler in profilers:
        profiler.wait(timeout=60)


def _summary_body(token: str, index: int) -> bytes:
    entry_at = datetime(2024, 1, 1, tzinfo=UTC).replace(microsecond=index % 1000)
    exit_at = datetime.now(UTC)
    stay = Stay.between(
        Visit(f"a{token}e{index}", f"A{token}{index:07d}", entry_at),
        Visit(f"a{token}x{index}", f"A{token}{index:07d}", exit_at),
    )
    return json.dumps(stay.to_json()).encode()


def _per(
    after: dict[str, float], before: dict[str, float], count: int
) -> dict[str, float]:
    """CPU milliseconds per unit of work, by process tree."""
    return {
        name: round((after[name] - before.get(name, 0.0)) * 1000 / max(count, 1), 3)
        for name in after
    }


def _spread(buckets: list[tuple[float, float]]) -> dict[str, Any]:
    """Count and p50/p95/p99 in milliseconds of a histogram's buckets."""
    return {
        "count": int(buckets[-1][1]) if buckets else 0,
        **{
            f"p{round(q * 100)}_ms": _ms(measure.histogram_quantile(buckets, q))
            for q in (0.5, 0.95, 0.99)
        },
    }


def _cores(per: dict[str, float], count: int, seconds: float) -> float | None:
    """How many cores the whole machine kept busy over a phase."""
    if "machine" not in per or seconds <= 0:
        return None
    return round(per["machine"] * count / 1000 / seconds, 2)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
