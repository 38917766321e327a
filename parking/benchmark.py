"""``parking bench``: the pipeline's speed beside Celery's own, and a soak.

The command sets the environment of the run (its own queue prefix and Redis
database) before anything reads the Celery configuration, then hands over to
``workers.bench``. Docs: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from parking import measure
from parking.settings import get_settings

console = Console(stderr=True)

#: The issue's targets on the 2-core reference machine.
TARGETS = {
    "events_per_second": 1000.0,
    "ratio_to_baseline": 0.5,
    "entry_p99_ms": 3.0,
    "exit_p99_ms": 10.0,
    "api_rows_per_second": 3000.0,
}


@dataclass
class BenchOptions:
    count: int = 20_000
    as_json: bool = False
    workers: int = 1
    concurrency: int = 0
    pool: str = "prefork"
    use_running: bool = False
    redis_db: int = 0
    flush: bool = False
    queue_prefix: str = "bench"
    publishers: int = 4
    confirm: bool = True
    baseline: int = 0
    api_rows: int = 0
    api_connections: int = 16
    api_only: bool = False
    match_ratio: float = 0.8
    order: str = "phased"
    path: str = "celery"
    worker_log_level: str = "INFO"
    metrics_url: str | None = None
    worker_pids: list[int] = field(default_factory=list)
    api_pids: list[int] = field(default_factory=list)
    csv: Path | None = None
    timeout: float = 0.0
    soak: float = 0.0
    rate: float = 50.0
    dwell: float = 20.0
    sample_every: float = 30.0
    event_ttl: int | None = None
    keep: bool = False
    profile: Path | None = None
    work_dir: Path = Path()


def _options(params: dict[str, Any]) -> BenchOptions:
    options = BenchOptions(**params)
    options.worker_pids = list(params["worker_pids"])
    options.api_pids = list(params["api_pids"])
    if not options.baseline:
        options.baseline = min(2 * options.count, 20_000)
    if options.api_rows < 0:
        options.api_rows = options.count // 2
    if not options.timeout:
        options.timeout = 120 + 2 * options.count / 50
    return options


def _isolate(options: BenchOptions) -> None:
    """Point this process, and the processes it starts, at the bench's own
    queues and Redis database. Must run before ``celeryconfig`` is imported."""
    if options.use_running:
        return
    os.environ["PARKING_QUEUE_PREFIX"] = options.queue_prefix
    # The bench owns one database; the generators are not run, so their
    # database is the same one and nothing else is touched.
    os.environ["PARKING_REDIS_DB_STORE"] = str(options.redis_db)
    os.environ["PARKING_REDIS_DB_GENERATOR"] = str(options.redis_db)
    # The raw queues of cameras that publish plain JSON, the bench's own too.
    os.environ["PARKING_RAW_ENTRY_QUEUE"] = f"{options.queue_prefix}.vehicle_entry"
    os.environ["PARKING_RAW_EXIT_QUEUE"] = f"{options.queue_prefix}.vehicle_exit"
    get_settings.cache_clear()
    if not options.concurrency:
        options.concurrency = get_settings().worker_concurrency
    os.environ["PARKING_WORKER_CONCURRENCY"] = str(options.concurrency)
    get_settings.cache_clear()


def _claim_database(options: BenchOptions) -> redis.Redis | None:
    """The bench's own database, checked empty; None for a running system's."""
    if options.use_running:
        if options.flush:
            raise click.ClickException("--flush never applies to --use-running")
        return None
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_connection_url(options.redis_db))
    keys = client.dbsize()
    if keys and not options.flush:
        raise click.ClickException(
            f"Redis database {options.redis_db} holds {keys} keys; the bench "
            "empties the database it runs on. Choose an empty one with "
            "--redis-db, or allow it with --flush."
        )
    client.flushdb()
    return client


@click.command(
    "bench",
    context_settings={"auto_envvar_prefix": "PARKING_BENCH", "show_default": True},
)
@click.option("-n", "--count", default=20_000, help="Entry events, and as many exits.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--workers", default=1, help="Worker processes (celery worker).")
@click.option(
    "--concurrency",
    default=0,
    help="Pool size of each worker (0: PARKING_WORKER_CONCURRENCY).",
)
@click.option(
    "--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork"
)
@click.option(
    "--use-running",
    is_flag=True,
    help="Measure the running system (its workers, API and CSV) instead.",
)
@click.option("--redis-db", default=0, help="The Redis database the bench owns.")
@click.option("--flush", is_flag=True, help="Empty --redis-db even if it holds keys.")
@click.option("--queue-prefix", default="bench", help="Queue names of the bench.")
@click.option("--publishers", default=4, help="Publisher threads.")
@click.option("--confirm/--no-confirm", default=True, help="Publisher confirms.")
@click.option(
    "--baseline", default=0, help="No-op tasks (0: 2 x count, at most 20,000)."
)
@click.option(
    "--api-rows", default=-1, help="Rows posted to the API alone (-1: count/2)."
)
@click.option("--api-connections", default=16)
@click.option(
    "--api-only",
    is_flag=True,
    help="Measure the API alone: no baseline, no pipeline.",
)
@click.option("--match-ratio", default=0.8, help="Share of exits that have an entry.")
@click.option(
    "--path",
    type=click.Choice(["celery", "plain"]),
    default="celery",
    show_default=True,
    help="celery: events as the processing tasks; plain: bare JSON on the raw"
    " queues, consumed by one `parking ingest` process per pool slot (the"
    " baseline stays the Celery no-op).",
)
@click.option(
    "--order",
    type=click.Choice(["phased", "interleaved"]),
    default="phased",
    show_default=True,
    help="phased: every entry is processed before the exits are sent, as in a"
    " car park, where a stay lasts minutes; interleaved: each exit is sent 20"
    " entries after its own, and many overtake their entries in the backlog.",
)
@click.option("--worker-log-level", default="INFO", help="As `parking run` uses.")
@click.option("--metrics-url", default=None, help="Worker metrics (--use-running).")
@click.option("--worker-pid", "worker_pids", multiple=True, type=int)
@click.option("--api-pid", "api_pids", multiple=True, type=int)
@click.option("--csv", type=click.Path(path_type=Path), default=None)
@click.option("--timeout", default=0.0, help="Seconds per phase (0: from count).")
@click.option("--soak", default=0.0, help="Soak for this many seconds instead.")
@click.option("--rate", default=50.0, help="Soak: events per second.")
@click.option("--dwell", default=20.0, help="Soak: seconds a car stays.")
@click.option("--sample-every", default=30.0, help="Soak: seconds between samples.")
@click.option("--event-ttl", type=int, default=None, help="Workers' event-id TTL.")
@click.option("--keep", is_flag=True, help="Keep the work directory and the data.")
@click.option(
    "--profile",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Record py-spy profiles of the workers and the API during the pipeline"
    " (of the API during the API alone).",
)
def bench(**params: Any) -> None:
    """Measure the pipeline beside a no-op Celery baseline, or soak it."""
    options = _options(params)
    if options.profile is not None and py_spy() is None:
        raise click.ClickException(
            "--profile records with py-spy, which is not installed: "
            "`.venv/bin/pip install py-spy`"
        )
    # SIGTERM unwinds like Ctrl-C: the services stop and the database is emptied.
    signal.signal(signal.SIGTERM, _terminated)
    _isolate(options)
    client = _claim_database(options)
    work_dir = Path(tempfile.mkdtemp(prefix="parking-bench-"))
    options.work_dir = work_dir
    failed = True
    try:
        report = _run(options)
        failed = not _correct(report)
    finally:
        if client is not None and not options.keep:
            client.flushdb()
        if options.keep or failed:
            console.print(f"work directory kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    # The table is the answer unless JSON is asked for: then stdout is the
    # JSON alone and the table goes beside the progress, on stderr.
    render(report, console if options.as_json else Console())
    if options.as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    sys.exit(1 if failed else 0)


def py_spy() -> str | None:
    """py-spy on the PATH or beside this Python (a virtualenv's bin)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _terminated(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


def _run(options: BenchOptions) -> dict[str, Any]:
    # Imported here: the Celery configuration reads the environment set above.
    from workers.bench_run import Bench
    from workers.bench_services import broker_version
    from workers.bench_soak import Soak

    report: dict[str, Any] = {
        "machine": measure.machine() | {"versions": _versions(broker_version())},
        "options": _public(options),
    }
    progress = Progress(console=console)
    # The services start (Bench) before the progress bar's refresh thread.
    with Bench(options, progress) as bench, progress:
        if options.soak:
            report["soak"] = Soak(bench).run()
        elif options.api_only:
            report["api"] = bench.api_only()
        else:
            report["baseline"] = bench.baseline()
            report["pipeline"] = bench.pipeline()
            report["api"] = bench.api_only()
    report["machine"]["load_average_after"] = measure.machine()["load_average"]
    pipeline, baseline = report.get("pipeline"), report.get("baseline", {})
    if pipeline and baseline.get("tasks_per_second"):
        pipeline["ratio_to_baseline"] = round(
            pipeline["events_per_second"] / baseline["tasks_per_second"], 3
        )
    report["targets"] = targets(report)
    return report


def _public(options: BenchOptions) -> dict[str, Any]:
    public = asdict(options)
    public.pop("work_dir")
    public["csv"] = str(options.csv) if options.csv else None
    public["profile"] = str(options.profile) if options.profile else None
    return public


def _versions(broker: str | None) -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    packages = ("celery", "kombu", "redis", "fastapi", "uvicorn", "uvloop", "httptools")
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["rabbitmq"] = broker
    try:
        settings = get_settings()
        url = settings.redis_connection_url(settings.redis_db_store)
        found["redis_server"] = str(redis.Redis.from_url(url).info()["redis_version"])
    except redis.RedisError:
        found["redis_server"] = None
    return found


def _correct(report: dict[str, Any]) -> bool:
    """No row lost, doubled or invented, and nothing timed out."""
    for phase in ("pipeline", "soak"):
        part = report.get(phase)
        if part is None:
            continue
        rows = part["rows"]
        if rows["lost"] or rows["duplicated"] or rows.get("unexpected"):
            return False
        if part.get("timed_out") or part.get("drained") is False:
            return False
    return True


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with the figure measured and whether it is met."""
    pipeline = report.get("pipeline") or {}
    processing = pipeline.get("processing") or {}
    figures = {
        "events_per_second": pipeline.get("events_per_second"),
        "ratio_to_baseline": pipeline.get("ratio_to_baseline"),
        "entry_p99_ms": (processing.get("entry") or {}).get("p99_ms"),
        "exit_p99_ms": (processing.get("exit") or {}).get("p99_ms"),
        "api_rows_per_second": (report.get("api") or {}).get("rows_per_second"),
    }
    found = []
    for name, goal in TARGETS.items():
        value = figures[name]
        at_most = name.endswith("_ms")
        met = None if value is None else (value <= goal if at_most else value >= goal)
        found.append({"name": name, "target": goal, "value": value, "met": met})
    return found


# -- Rendering ----------------------------------------------------------------


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MB"


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}{unit}" if abs(value) >= 100 else f"{value:,.2f}{unit}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render(report: dict[str, Any], out: Console) -> None:
    machine = report["machine"]
    versions = machine["versions"]
    out.print(
        f"[bold]machine[/]: {machine['cpus']} CPUs, {_mb(machine['memory_bytes'])} RAM,"
        f" load {machine['load_average']} -> {machine.get('load_average_after')};"
        f" celery {versions['celery']}, RabbitMQ {versions['rabbitmq']},"
        f" Redis {versions['redis_server']}, Python {versions['python']}"
    )
    if "soak" in report:
        render_soak(report["soak"], out)
    elif "pipeline" not in report:
        render_api(report, out)
    else:
        render_run(report, out)


def render_run(report: dict[str, Any], out: Console) -> None:
    pipeline, baseline = report["pipeline"], report["baseline"]
    options = report["options"]
    table = Table(
        title=f"parking bench: {options['count']:,} entries + {options['count']:,} exits,"
        f" {options['workers']} x {options['pool']} -c {options['concurrency']},"
        f" {options.get('order', 'interleaved')}, {options.get('path', 'celery')} path"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    goals = {t["name"]: t for t in report["targets"]}

    def goal(name: str) -> str:
        target = goals[name]
        mark = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[
            target["met"]
        ]
        sign = "<=" if name.endswith("_ms") else ">="
        return f"{sign} {target['target']:,g} {mark}"

    table.add_row(
        "no-op baseline", _num(baseline.get("tasks_per_second"), " tasks/s"), ""
    )
    table.add_row(
        "pipeline", _num(pipeline["events_per_second"], " events/s"),
        goal("events_per_second"),
    )  # fmt: skip
    table.add_row(
        "ratio to baseline", _num(pipeline.get("ratio_to_baseline")),
        goal("ratio_to_baseline"),
    )  # fmt: skip
    table.add_row("publish rate", _num(pipeline["publish_per_second"], " msg/s"), "")
    for kind in ("entry", "exit"):
        figures = (pipeline["processing"] or {}).get(kind) or {}
        spread = " / ".join(_num(figures.get(f"p{p}_ms")) for p in (50, 95, 99))
        table.add_row(
            f"{kind} processing p50/p95/p99", spread + " ms", goal(f"{kind}_p99_ms")
        )
        if kind == "entry":
            for part, label in (
                ("entry_opening", "that open a visit"),
                ("entry_completing", "that complete a stay (and post it)"),
            ):
                found = (pipeline["processing"] or {}).get(part) or {}
                table.add_row(
                    f"  entries {label}: {_count(found.get('count'))}",
                    " / ".join(_num(found.get(f"p{p}_ms")) for p in (50, 95, 99))
                    + " ms",
                    "",
                )
    post = (pipeline["processing"] or {}).get("summary_post") or {}
    table.add_row(
        "  of which summary POST p50/p95/p99",
        " / ".join(_num(post.get(f"p{p}_ms")) for p in (50, 95, 99)) + " ms", "",
    )  # fmt: skip
    e2e = pipeline["end_to_end_ms"]
    table.add_row(
        "end-to-end p50/p99 (event time to CSV row)",
        f"{_num(e2e['p50'])} / {_num(e2e['p99'])} ms", "",
    )  # fmt: skip
    cpu = pipeline.get("cpu_ms_per_event") or {}
    noop_cpu = baseline.get("cpu_ms_per_task") or {}
    table.add_row(
        "CPU ms per event: worker / API / publisher",
        " / ".join(_num(cpu.get(k)) for k in ("worker", "api", "bench")),
        "no-op: " + " / ".join(_num(noop_cpu.get(k)) for k in ("worker", "api", "bench")),
    )  # fmt: skip
    servers = ("broker", "redis", "machine")
    table.add_row(
        "CPU ms per event: RabbitMQ / Redis / whole machine",
        " / ".join(_num(cpu.get(k)) for k in servers),
        "no-op: " + " / ".join(_num(noop_cpu.get(k)) for k in servers),
    )  # fmt: skip
    table.add_row(
        "cores busy (machine)",
        _num(pipeline.get("cores_busy")),
        f"no-op: {_num(baseline.get('cores_busy'))}",
    )
    memory = pipeline["memory_peak_bytes"]
    table.add_row("worker peak RSS (tree)", _mb(memory.get("worker")), "")
    table.add_row("API peak RSS", _mb(memory.get("api")), "")
    before, after = pipeline["redis_before"], pipeline["redis_after"]
    table.add_row(
        "Redis keys before -> after", f"{before['keys']:,} -> {after['keys']:,}", ""
    )
    table.add_row(
        "Redis db memory (estimate) before -> after",
        f"{_mb(before['db_bytes_estimate'])} -> {_mb(after['db_bytes_estimate'])}", "",
    )  # fmt: skip
    table.add_row(
        "Redis used_memory (instance) before -> after",
        f"{_mb(before['used_memory'])} -> {_mb(after['used_memory'])}", "",
    )  # fmt: skip
    rows = pipeline["rows"]
    table.add_row(
        "rows expected / written",
        f"{rows['expected']:,} / {rows['written']:,}", "",
    )  # fmt: skip
    table.add_row(
        "rows lost / duplicated / unexpected",
        f"{rows['lost']} / {rows['duplicated']} / {rows['unexpected']}", "0 / 0 / 0",
    )  # fmt: skip
    api = report.get("api") or {}
    table.add_row(
        "API alone" + _served_by(api), _num(api.get("rows_per_second"), " rows/s"),
        goal("api_rows_per_second"),
    )  # fmt: skip
    table.add_row("  CPU ms per row: API / client", _api_cpu(api), "")
    out.print(table)
    if pipeline.get("outcomes"):
        out.print(
            "outcomes: "
            + ", ".join(f"{k}={v}" for k, v in pipeline["outcomes"].items())
        )


def _served_by(api: dict[str, Any]) -> str:
    server = api.get("server")
    return f" ({server['loop']}, {server['http']})" if server else ""


def _api_cpu(api: dict[str, Any]) -> str:
    cpu = api.get("cpu_ms_per_row") or {}
    return " / ".join(_num(cpu.get(k)) for k in ("api", "bench"))


def render_api(report: dict[str, Any], out: Console) -> None:
    api = report.get("api") or {}
    if "rows_per_second" not in api:
        out.print(f"API alone: skipped ({api.get('skipped')})")
        return
    goals = {t["name"]: t for t in report["targets"]}
    target = goals["api_rows_per_second"]
    verdict = {True: "met", False: "missed", None: "-"}[target["met"]]
    out.print(
        f"API alone{_served_by(api)}: {api['written']:,} of {api['rows']:,} rows"
        f" over {api['connections']} connections in {api['seconds']:,.2f} s:"
        f" {_num(api['rows_per_second'])} rows/s (>= {target['target']:,g}:"
        f" {verdict}); CPU ms per row, API / client: {_api_cpu(api)};"
        f" load {api.get('load_average')}"
    )


def render_soak(soak: dict[str, Any], out: Console) -> None:
    table = Table(
        title=f"parking bench --soak {soak['seconds']:g} --rate {soak['rate']:g}"
    )
    for column in (
        "t (s)", "keys", "keys without TTL", "worker RSS", "API RSS",
        "published", "processed", "rows",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for point in soak["series"]:
        table.add_row(
            f"{point['t']:,.0f}" + (" drained" if point.get("drained") else ""),
            f"{point['keys']:,}", f"{point['keys_without_ttl']:,}",
            _mb(point["worker_rss"]), _mb(point["api_rss"]), f"{point['published']:,}",
            _count(point["processed"]), f"{point['rows']:,}",
        )  # fmt: skip
    out.print(table)
    trend = soak["trends"]
    window = trend.get("window_seconds") or 0
    lines = [
        f"trends after {trend['warmup_seconds']:g} s of warm-up"
        f" ({trend['samples']} samples at the steady rate); means of the first"
        f" and the last {window:g} s of it, first and last sample, least-squares"
        " slope:"
    ]
    for name, label in (
        ("keys", "keys"),
        ("keys_with_ttl", "keys with a TTL (expire; grow until their TTL)"),
        ("keys_without_ttl", "keys without a TTL (would leak)"),
        ("worker_rss", "worker RSS"),
        ("api_rss", "API RSS"),
    ):
        found = trend.get(name)
        if found is None:
            continue
        show = _mb if name.endswith("rss") else _count
        lines.append(
            f"  {label}: first {window:g} s {show(found.get('first_window_mean'))},"
            f" last {window:g} s {show(found.get('last_window_mean'))};"
            f" {show(found['first'])} -> {show(found['last'])};"
            f" slope {show(found['per_hour'])} per hour; flat: {found['flat']}"
        )
    rows, e2e = soak["rows"], soak["end_to_end_ms"]
    lines.append(
        f"rows expected {rows['expected']:,}, written {rows['written']:,}, lost"
        f" {rows['lost']}, duplicated {rows['duplicated']}; end-to-end p50"
        f" {_num(e2e['p50'])} ms, p99 {_num(e2e['p99'])} ms"
    )
    for kind, found in (soak.get("processing") or {}).items():
        lines.append(
            f"{kind.replace('_', ' ')} processing p50/p95/p99: "
            + " / ".join(_num(found.get(f"p{p}_ms")) for p in (50, 95, 99))
            + " ms"
        )
    out.print("\n".join(lines))
