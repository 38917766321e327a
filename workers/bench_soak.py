"""A soak: a steady rate for a long time; the store and workers must stay flat."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from parking import measure
from parking.events import EventKind
from workers.bench import (
    TASKS,
    Planned,
)
from workers.bench_run import Bench

logger = logging.getLogger(__name__)

ENTRY = ("entry", TASKS["entry"], EventKind.ENTRY)
EXIT = ("exit", TASKS["exit"], EventKind.EXIT)


class Soak:
    """A steady rate for a long time: the store and the workers must stay flat."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.options = bench.options
        self.matched: set[str] = set()
        self.count_rows: Callable[[], int] = lambda: 0
        self.events = 0

    def schedule(self) -> Iterator[tuple[float, Planned]]:
        """(seconds from start, message): cars that stay ``dwell`` seconds,
        unmatched exits at the rate the match ratio leaves, and the sweeps
        beat would send."""
        options, token = self.options, self.bench.token
        ratio = options.match_ratio
        exits_per_second = options.rate / (1 + ratio)
        entries_per_second = exits_per_second * ratio
        unmatched_per_second = exits_per_second - entries_per_second

        def cars() -> Iterator[tuple[float, int, str]]:
            if entries_per_second <= 0:
                return
            for index in itertools.count():
                at = index / entries_per_second
                if at >= options.soak:
                    return
                plate = f"S{token}{index:07d}"
                self.matched.add(plate)
                yield at, index, plate

        def entering() -> Iterator[tuple[float, Planned]]:
            for at, index, plate in cars():
                event_id = f"s{token}e{index}"
                yield at, Planned(*ENTRY, event_id, plate)

        def leaving() -> Iterator[tuple[float, Planned]]:
            for at, index, plate in cars():
                event_id = f"s{token}x{index}"
                yield at + options.dwell, Planned(*EXIT, event_id, plate)

        def strangers() -> Iterator[tuple[float, Planned]]:
            if unmatched_per_second <= 0:
                return
            for index in itertools.count():
                at = index / unmatched_per_second
                if at >= options.soak:
                    return
                event_id, plate = f"s{token}u{index}", f"V{token}{index:07d}"
                yield at, Planned(*EXIT, event_id, plate)

        def sweeps() -> Iterator[tuple[float, Planned]]:
            interval = self.bench.settings.sweep_interval_seconds
            for index in itertools.count():
                at = index * interval
                if at >= options.soak + options.dwell:
                    return
                yield at, Planned("generate", "parking.sweep")

        merged = heapq.merge(
            entering(), leaving(), strangers(), sweeps(), key=lambda pair: pair[0]
        )
        yield from merged

    def _publish(self, started: float, stop: threading.Event) -> None:
        publisher = self.bench.publisher
        try:
            # Confirmed one at a time (the connection's confirm_publish): at
            # the soak's rate a round trip per message costs nothing.
            with publisher.connection() as conn:
                channel = conn.default_channel
                for at, item in self.schedule():
                    delay = started + at - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        return
                    publisher.publish(channel, item)
                    if item.kind is not None:
                        self.events += 1
        except Exception as exc:
            logger.exception("soak publisher failed")
            publisher.errors.append(exc)

    def run(self) -> dict[str, Any]:
        bench, options = self.bench, self.options
        assert bench.tail is not None
        tail_start = len(bench.tail.snapshot())
        self.count_rows = bench.tail.counter(self.matched, tail_start)
        before = bench.metrics()
        total = options.soak + options.dwell
        bar = bench.progress.add_task("soak", total=total)
        stop = threading.Event()
        started = time.monotonic()
        thread = threading.Thread(
            target=self._publish, args=(started, stop), daemon=True
        )
        thread.start()
        series: list[dict[str, Any]] = []
        next_sample = started
        try:
            while thread.is_alive() and not bench.publisher.errors:
                now = time.monotonic()
                bench.progress.update(bar, completed=min(now - started, total))
                if now >= next_sample:
                    series.append(self._sample(now - started, before, tail_start))
                    next_sample += options.sample_every
                time.sleep(0.2)
        finally:
            stop.set()
            thread.join()
        drained = self._drain(before, tail_start)
        # At a rate the machine keeps up with, unlike the pipeline's flood.
        processing = bench.processing(before, bench.metrics())["processing"]
        # After the drain, not at the steady rate: shown, left out of the trends.
        final = self._sample(time.monotonic() - started, before, tail_start)
        final["drained"] = True
        rows = bench.rows_of(self.matched, tail_start)
        plate, stay = bench.tail.column("vehicle_plate"), bench.tail.column("stay_id")
        return {
            "seconds": options.soak,
            "rate": options.rate,
            "events": self.events,
            "drained": drained,
            "series": [*series, final],
            "trends": trends(series, warmup=self._warmup()),
            "rows": {
                "expected": len(self.matched),
                "written": len(rows),
                "lost": len(self.matched - {row[plate] for _, row in rows}),
                "duplicated": len(rows) - len({row[stay] for _, row in rows}),
            },
            "end_to_end_ms": bench.latency(rows),
            "processing": processing,
        }

    def _warmup(self) -> float:
        # Until then open visits, pending exits and their sweeps fill up.
        settings = self.bench.settings
        return (
            self.options.dwell
            + settings.grace_seconds
            + 2 * settings.sweep_interval_seconds
        )

    def _drain(self, before: measure.Samples | None, tail_start: int) -> bool:
        bench = self.bench
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            processed = bench.processed_since(before)
            if self.count_rows() >= len(self.matched) and (
                processed is None or processed >= self.events
            ):
                return True
            time.sleep(0.2)
        return False

    def _sample(
        self, at: float, before: measure.Samples | None, tail_start: int
    ) -> dict[str, Any]:
        bench = self.bench
        stats = measure.redis_stats(bench.redis, sample_keys=0)
        bench.memory.sample()
        return {
            "t": round(at, 1),
            "keys": stats["keys"],
            "keys_without_ttl": stats["keys_without_ttl"],
            "used_memory": stats["used_memory"],
            "worker_rss": bench.memory.latest.get("worker"),
            "api_rss": bench.memory.latest.get("api"),
            "published": self.events,
            "processed": bench.processed_since(before),
            "rows": self.count_rows(),
        }


#: Growth over the steady window that still counts as flat: a share of the
#: level, or an absolute floor for small levels (keys, bytes).
FLAT_SHARE = 0.05
FLAT_FLOOR = {
    "keys": 100.0,
    "keys_with_ttl": 100.0,
    "keys_without_ttl": 100.0,
    "worker_rss": 4 * 2**20,
}
#: The stretches compared at the start and the end of the steady part (at
#: most a third of it each, so that they never overlap).
COMPARE_SECONDS = 300.0
TREND_SERIES = ("keys", "keys_with_ttl", "keys_without_ttl", "worker_rss", "api_rss")


def trends(
    series: list[dict[str, Any]], warmup: float, compare: float = COMPARE_SECONDS
) -> dict[str, Any]:
    """Slopes per hour after the warm-up, the means of its first and last
    ``compare`` seconds, and whether each series stays flat.

    Keys with a TTL are told apart from keys without: the first expire by
    design and grow only until their TTL, the second are what would leak.
    """
    steady = [point for point in series if point["t"] >= warmup]
    span = steady[-1]["t"] - steady[0]["t"] if steady else 0.0
    window = min(compare, span / 3)
    found: dict[str, Any] = {
        "warmup_seconds": warmup,
        "samples": len(steady),
        "window_seconds": round(window, 1),
    }
    for name in TREND_SERIES:
        points = [
            (p["t"], value) for p in steady if (value := _value(p, name)) is not None
        ]
        rate = measure.slope(points)
        flat = None
        if rate is not None:
            level = sum(y for _, y in points) / len(points)
            allowed = max(FLAT_SHARE * level, FLAT_FLOOR.get(name, 4 * 2**20))
            flat = abs(rate * (points[-1][0] - points[0][0])) <= allowed
        found[name] = {
            "per_hour": None if rate is None else round(rate * 3600, 1),
            "first": points[0][1] if points else None,
            "last": points[-1][1] if points else None,
            "first_window_mean": _mean(points, points[0][0] if points else 0, window),
            "last_window_mean": _mean(
                points, points[-1][0] - window if points else 0, window
            ),
            "flat": flat,
        }
    return found


def _value(point: dict[str, Any], name: str) -> float | None:
    if name == "keys_with_ttl":
        keys, untimed = point.get("keys"), point.get("keys_without_ttl")
        return None if keys is None or untimed is None else float(keys - untimed)
    value = point.get(name)
    return None if value is None else float(value)


def _mean(
    points: list[tuple[float, float]], start: float, window: float
) -> float | None:
    inside = [y for t, y in points if start <= t <= start + window]
    return round(sum(inside) / len(inside), 1) if inside else None
