"""``parking status``: the system's figures, read from its /metrics endpoints.

Two scrapes some seconds apart give the rates and the percentiles of that
window (as Prometheus' ``rate`` and ``histogram_quantile`` would); totals and
gauges come from the latest scrape. Nothing here talks to the broker or Redis:
what the view shows is what the metrics say.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table

logger = logging.getLogger(__name__)

Labels = dict[str, str]
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One read of an endpoint: samples by name, or why there are none."""

    url: str
    at: float
    samples: dict[str, list[tuple[Labels, float]]] = field(default_factory=dict)
    error: str | None = None

    def total(self, metric: str, /, **match: str) -> float | None:
        values = [
            v for labels, v in self.samples.get(metric, ()) if _has(labels, match)
        ]
        return sum(values) if values else None

    def by(self, metric: str, label: str, /, **match: str) -> dict[str, float]:
        grouped: dict[str, float] = defaultdict(float)
        for labels, value in self.samples.get(metric, ()):
            if _has(labels, match):
                grouped[labels.get(label, "")] += value
        return dict(grouped)


def _has(labels: Labels, match: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in match.items())


def scrape(url: str, timeout: float = 3.0) -> Scrape:
    """Read one endpoint; an unreachable one is a result, not an exception."""
    at = time.monotonic()
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as exc:
        logger.debug("scrape failed url=%s error=%s", url, exc)
        return Scrape(url, at, error=type(exc).__name__)
    samples: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), sample.value))
    return Scrape(url, at, dict(samples))


def per_second(
    before: Scrape | None, after: Scrape, metric: str, /, **match: str
) -> float | None:
    """Counter increase per second between two scrapes (a reset counts anew)."""
    now = after.total(metric, **match)
    if before is None or now is None or before.error or after.at <= before.at:
        return None
    then = before.total(metric, **match) or 0.0
    increase = now - then if now >= then else now
    return increase / (after.at - before.at)


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` over cumulative (upper bound, count) pairs."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the top bucket: its lower edge, like PromQL
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def histogram(
    before: Scrape | None, after: Scrape, name: str, group: str, /, **match: str
) -> dict[str, tuple[str, list[tuple[float, float]]]]:
    """Buckets of ``name`` per value of ``group``: of the window when anything
    happened in it, else since the start (the basis is returned with them)."""
    now = _buckets(after, name, group, match)
    then = _buckets(before, name, group, match) if before and not before.error else {}
    result: dict[str, tuple[str, list[tuple[float, float]]]] = {}
    for key, cumulative in now.items():
        old = then.get(key, {})
        window = [(le, count - old.get(le, 0.0)) for le, count in cumulative.items()]
        if old and window and max(c for _, c in window) > 0:
            result[key] = ("window", window)
        else:
            result[key] = ("total", list(cumulative.items()))
    return result


def _buckets(
    scrape: Scrape | None, name: str, group: str, match: dict[str, str]
) -> dict[str, dict[float, float]]:
    found: dict[str, dict[float, float]] = defaultdict(dict)
    for labels, value in scrape.samples.get(f"{name}_bucket", ()) if scrape else ():
        if _has(labels, match):
            le = float(labels["le"])
            key = labels.get(group, "")
            found[key][le] = found[key].get(le, 0.0) + value
    return dict(found)


def percentiles(
    buckets: dict[str, tuple[str, list[tuple[float, float]]]],
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, (basis, pairs) in sorted(buckets.items()):
        count = max((c for _, c in pairs), default=0.0)
        figures: dict[str, Any] = {
            f"p{round(q * 100)}": quantile(q, pairs) for q in QUANTILES
        }
        out[key] = {**figures, "count": count, "basis": basis}
    return out


def build_view(
    worker: tuple[Scrape | None, Scrape], api: tuple[Scrape | None, Scrape]
) -> dict[str, Any]:
    """Every figure of the view as plain data (what ``--json`` prints)."""
    w_before, w = worker
    a_before, a = api
    return {
        "window_seconds": _window(w_before, w),
        "worker": {
            "url": w.url,
            "error": w.error,
            "up": bool(w.total("celery_worker_up")),
            "tasks_active": w.total("celery_worker_tasks_active"),
        },
        "events": _events(w_before, w),
        "tasks": _tasks(w_before, w),
        "latency_seconds": percentiles(
            histogram(w_before, w, "parking_event_processing_seconds", "kind")
        ),
        "queue_wait_seconds": percentiles(
            histogram(w_before, w, "celery_task_queue_wait_time", "queue_name")
        ),
        "occupancy": w.total("parking_open_visits"),
        "pending_exits": w.total("parking_pending_exits"),
        "lots": _lots(w),
        "misreads": w.by("parking_misread_exits_total", "result"),
        "review_waiting": w.total("parking_review_waiting"),
        "matched_share": _matched_share(w_before, w),
        "queues": w.by("celery_queue_length", "queue_name"),
        "api": {
            "url": a.url,
            "error": a.error,
            "rows_written": a.total("parking_api_rows_written_total"),
            "rows_per_second": per_second(
                a_before, a, "parking_api_rows_written_total"
            ),
            "write_latency_seconds": percentiles(
                histogram(
                    a_before,
                    a,
                    "parking_api_request_seconds",
                    "route",
                    route="/summaries",
                )
            ).get("/summaries"),
        },
    }


def _lots(scrape: Scrape) -> dict[str, dict[str, Any]]:
    """Occupancy, capacity and the full signal of each car park."""
    inside = scrape.by("parking_open_visits", "lot")
    capacity = scrape.by("parking_lot_capacity", "lot")
    full = scrape.by("parking_lot_full", "lot")
    return {
        lot: {
            "open": inside.get(lot),
            "capacity": capacity.get(lot),
            "full": bool(full.get(lot)),
        }
        for lot in sorted(set(inside) | set(capacity))
    }


def _window(before: Scrape | None, after: Scrape) -> float | None:
    return round(after.at - before.at, 3) if before else None


def _events(before: Scrape | None, after: Scrape) -> list[dict[str, Any]]:
    rows: list[tuple[str, str, str, dict[str, str]]] = []
    for labels, _ in after.samples.get("parking_events_total", ()):
        rows.append((labels["kind"], labels["outcome"], "parking_events_total", labels))
    for labels, _ in after.samples.get("parking_events_rejected_total", ()):
        rows.append(
            (labels["kind"], "rejected", "parking_events_rejected_total", labels)
        )
    if after.total("parking_exits_unmatched_total") is not None:
        rows.append(("exit", "unmatched", "parking_exits_unmatched_total", {}))
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, outcome, name, labels in rows:
        entry = merged.setdefault(
            (kind, outcome),
            {"kind": kind, "outcome": outcome, "total": 0.0, "per_second": None},
        )
        entry["total"] += after.total(name, **labels) or 0.0
        rate = per_second(before, after, name, **labels)
        if rate is not None:
            entry["per_second"] = (entry["per_second"] or 0.0) + rate
    return [merged[key] for key in sorted(merged) if merged[key]["total"] > 0]


def _tasks(before: Scrape | None, after: Scrape) -> list[dict[str, Any]]:
    names = after.by("celery_task_received_total", "name")
    out = []
    for name in sorted(names):
        row: dict[str, Any] = {"name": name}
        for state in ("received", "succeeded", "failed", "retried", "rejected"):
            metric = f"celery_task_{state}_total"
            row[state] = after.total(metric, name=name) or 0.0
            row[f"{state}_per_second"] = per_second(before, after, metric, name=name)
        out.append(row)
    return out


def _matched_share(before: Scrape | None, after: Scrape) -> dict[str, float | None]:
    def share(value: Callable[[str], float | None]) -> float | None:
        matched = value("parking_stays_total")
        unmatched = value("parking_exits_unmatched_total")
        if matched is None or unmatched is None or matched + unmatched <= 0:
            return None
        return matched / (matched + unmatched)

    return {
        "window": share(lambda name: per_second(before, after, name)),
        "total": share(after.total),
        "configured": after.total("parking_generator_match_ratio"),
    }


# -- rendering -----------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def render(view: dict[str, Any]) -> Group:
    return Group(
        _header(view),
        _lots_table(view),
        _events_table(view),
        _latency_table(view),
        _tasks_table(view),
        _queues_table(view),
    )


def _header(view: dict[str, Any]) -> Table:
    worker, api, share = view["worker"], view["api"], view["matched_share"]
    up = "[green]up[/]"
    head = Table.grid(padding=(0, 2))
    head.add_row("worker", up if worker["up"] else "[red]down[/]", worker["url"])
    head.add_row("api", f"[red]{api['error']}[/]" if api["error"] else up, api["url"])
    head.add_row(
        "occupancy",
        _num(view["occupancy"], 0),
        f"pending exits {_num(view['pending_exits'], 0)}",
    )
    misreads = view["misreads"]
    head.add_row(
        "misread exits",
        f"{_num(misreads.get('fuzzy'), 0)} matched",
        f"{_num(misreads.get('ambiguous'), 0)} ambiguous, review waiting "
        f"{_num(view['review_waiting'], 0)}",
    )
    head.add_row(
        "matched share",
        f"{_pct(share['window'])} now",
        f"{_pct(share['total'])} overall, configured {_pct(share['configured'])}",
    )
    head.add_row(
        "stays CSV",
        f"{_num(api['rows_written'], 0)} rows",
        f"{_num(api['rows_per_second'])} per s",
    )
    head.add_row(
        "active tasks",
        _num(worker["tasks_active"], 0),
        f"window {_num(view['window_seconds'])} s",
    )
    return head


def _lots_table(view: dict[str, Any]) -> Table:
    table = Table("car park", "inside", "capacity", "full", title="car parks")
    for lot, figures in view["lots"].items():
        full = "[red]FULL[/]" if figures["full"] else "no"
        inside, capacity = _num(figures["open"], 0), _num(figures["capacity"], 0)
        table.add_row(lot, inside, capacity, full)
    return table


def _events_table(view: dict[str, Any]) -> Table:
    table = Table("kind", "outcome", "per s", "total", title="events")
    for row in view["events"]:
        rate, total = _num(row["per_second"]), _num(row["total"], 0)
        table.add_row(row["kind"], row["outcome"], rate, total)
    return table


def _latency_table(view: dict[str, Any]) -> Table:
    table = Table("of", "p50 ms", "p95 ms", "p99 ms", "count", "basis", title="latency")
    rows = [(f"processing {k}", f) for k, f in view["latency_seconds"].items()]
    rows += [(f"queue wait {k}", f) for k, f in view["queue_wait_seconds"].items()]
    if view["api"]["write_latency_seconds"]:
        rows.append(("api write", view["api"]["write_latency_seconds"]))
    for label, fig in rows:
        quantiles = [_ms(fig[f"p{round(q * 100)}"]) for q in QUANTILES]
        table.add_row(label, *quantiles, _num(fig["count"], 0), fig["basis"])
    return table


def _tasks_table(view: dict[str, Any]) -> Table:
    table = Table("task", "ok per s", "failed", "retried", "rejected", title="tasks")
    for row in view["tasks"]:
        counts = [_num(row[state], 0) for state in ("failed", "retried", "rejected")]
        table.add_row(row["name"], _num(row["succeeded_per_second"]), *counts)
    return table


def _queues_table(view: dict[str, Any]) -> Table:
    table = Table("queue", "ready", title="queues")
    for name, length in sorted(view["queues"].items()):
        table.add_row(name, _num(length, 0))
    return table


@dataclass
class StatusReader:
    """Keeps the previous scrape of each endpoint to compute the next view."""

    worker_url: str
    api_url: str
    _last: dict[str, Scrape] = field(default_factory=dict)

    def read(self) -> dict[str, Any]:
        pairs = []
        for url in (self.worker_url, self.api_url):
            current = scrape(url)
            pairs.append((self._last.get(url), current))
            self._last[url] = current
        return build_view(pairs[0], pairs[1])


def run(
    worker_url: str,
    api_url: str,
    interval: float,
    once: bool,
    console: Console,
    emit_json: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """The view once (two scrapes ``interval`` apart) or live until Ctrl-C."""
    from rich.live import Live

    reader = StatusReader(worker_url, api_url)
    reader.read()
    time.sleep(interval)  # the window the rates are measured over
    view = reader.read()
    if once:
        if emit_json is not None:
            emit_json(view)
        else:
            console.print(render(view))
        return 0 if view["worker"]["error"] is None else 1
    try:
        with Live(render(view), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(reader.read()), refresh=True)
    except KeyboardInterrupt:
        return 0
