"""The ``parking`` command: run the system, the API alone, or replay recordings.

This is the composition root, so it is the one place in ``parking`` that
reaches into ``workers`` (lazily, inside the commands that publish).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from parking.api.serving import LOOPS, PARSERS, choose
from parking.benchmark import bench
from parking.errors import ConfigurationError
from parking.events import EventKind
from parking.secrets import secrets_cli
from parking.settings import Settings, get_settings, mask_url, secrets_dirs

console = Console(stderr=True)


class _Commands(click.Group):
    """Commands whose broker refuses their login say so in one line, naming
    where the password came from, rather than in a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from amqp.exceptions import AccessRefused

        try:
            return super().invoke(ctx)
        except AccessRefused:
            raise click.ClickException(_refused_login(get_settings())) from None


@click.group(cls=_Commands)
@click.option(
    "--log-level",
    envvar="PARKING_LOG_LEVEL",
    default="INFO",
    show_default=True,
    help="Log level of this command (env PARKING_LOG_LEVEL).",
)
def main(log_level: str) -> None:
    """Car-park metering: camera events in, one stay summary per visit out."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


#: The processes of ``parking run`` whose metrics the worker endpoint merges;
#: every other one serves its own /metrics.
MULTIPROCESS_METRICS = frozenset({"worker"})


def _processes(settings: Settings) -> dict[str, str]:
    python = sys.executable
    queues = ",".join(
        settings.queue(k) for k in ("entry", "exit", "generate", "default")
    )
    return {
        "worker": (
            f"{python} -m celery -A workers worker -Q {queues}"
            f" -c {settings.worker_concurrency} -n worker@%h -l INFO -E"
        ),
        "beat": (
            f"{python} -m celery -A workers beat -l INFO"
            f" -s {settings.var_dir / 'celerybeat-schedule'}"
        ),
        "api": f"{python} -m parking api",
        "ingest": f"{python} -m parking ingest",
        "flower": (
            f"{python} -m celery -A workers flower --address=127.0.0.1"
            f" --port={settings.flower_port}"
        ),
    }


class _StopLeaderKillGroup:
    """Stops each process of ``parking run`` politely, kills its group.

    honcho sends SIGTERM to every process group, which stops the Celery
    worker's pool children together with their parent: tasks die mid-run
    (``WorkerLostError``) instead of finishing in a warm shutdown. So SIGTERM
    goes to the program alone (each command is exec'd: honcho's pid is the
    program, not a shell), and only honcho's SIGKILL, after its grace time,
    reaches the whole group.
    """

    def terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _refused_login(settings: Settings) -> str:
    """The broker's refusal of the settings' login, said without the secret."""
    return (
        f"RabbitMQ refused the login of {mask_url(settings.broker_url)}; "
        f"the password came from {_password_source('broker_password')}"
    )


def _password_source(name: str) -> str:
    """Where the settings found a password, to name in an error."""
    variable = f"PARKING_{name.upper()}"
    if variable in os.environ:
        return variable
    for directory in secrets_dirs():
        path = directory / f"parking_{name}"
        if path.is_file():
            return (
                f"{path} (a secret file, such as `parking secrets init` writes "
                "for compose: remove it, or give the broker's user that password)"
            )
    return "the URL"


@main.command()
def run() -> None:
    """Start worker, beat, ingest, the summary API and Flower; Ctrl-C stops all."""
    from honcho.manager import Manager
    from honcho.printer import Printer

    from workers.topology import login_refused

    settings = get_settings()
    if login_refused(settings):
        # Otherwise every process fails its login on its own, in a flood of
        # tracebacks that never say where the password came from.
        raise click.ClickException(_refused_login(settings))
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    metrics_dir = settings.var_dir / "prometheus"
    # Multiprocess metrics files of a previous run would be counted again.
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    # Only the worker writes there: the other processes serve their own
    # /metrics, and their files in the directory would be counted twice.
    merged_env = dict(env, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir.resolve()))
    flower_env = dict(env)
    if settings.flower_password is not None:
        # Flower reads its option from this variable by itself: a
        # --basic-auth=$FLOWER_BASIC_AUTH argument would be expanded by the
        # shell and put the password on a command line anyone can list.
        # Only Flower's environment holds it.
        password = settings.flower_password.get_secret_value()
        flower_env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{password}"

    console.print("[bold]parking run[/]: worker, beat, ingest, summary API, Flower")
    console.print(f"  broker       {mask_url(settings.broker_url)}")
    console.print(f"  redis        {mask_url(settings.redis_url)}")
    console.print(f"  summary API  http://{settings.api_host}:{settings.api_port}")
    console.print(f"  Flower       http://127.0.0.1:{settings.flower_port}")
    worker_metrics = f"{settings.metrics_address}:{settings.worker_metrics_port}"
    console.print(f"  metrics      http://{worker_metrics}/metrics (worker)")
    for role, port in [
        ("beat", settings.beat_metrics_port),
        ("ingest", settings.ingest_metrics_port),
    ]:
        address = f"{settings.metrics_address}:{port}"
        console.print(f"               http://{address}/metrics ({role})")
    console.print(f"  stays CSV    {settings.summary_csv.resolve()}")

    manager = Manager(Printer(sys.stdout))
    # honcho offers no public way to choose how it signals its processes.
    manager._procmgr = _StopLeaderKillGroup()
    for name, command in _processes(settings).items():
        merged = name in MULTIPROCESS_METRICS
        chosen = merged_env if merged else flower_env if name == "flower" else env
        manager.add_process(name, f"exec {command}", env=chosen)
    manager.loop()
    sys.exit(manager.returncode)


@main.command()
@click.option("--host", envvar="PARKING_API_HOST", default=None)
@click.option("--port", envvar="PARKING_API_PORT", type=int, default=None)
@click.option(
    "--loop",
    envvar="PARKING_API_LOOP",
    type=click.Choice(LOOPS),
    default="auto",
    show_default=True,
    help="Event loop (auto: uvloop when installed).",
)
@click.option(
    "--http",
    envvar="PARKING_API_HTTP",
    type=click.Choice(PARSERS),
    default="auto",
    show_default=True,
    help="HTTP parser (auto: httptools when installed).",
)
def api(host: str | None, port: int | None, loop: str, http: str) -> None:
    """Run the summary API alone (uvicorn)."""
    import uvicorn

    from parking.api.app import create_app

    settings = get_settings()
    loop, http = choose(loop, http)
    try:
        app = create_app(settings)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    logging.getLogger(__name__).info("api serving loop=%s http=%s", loop, http)
    # uvicorn shuts down on SIGTERM or SIGINT, then raises the signal again
    # with the handler it found: the default one would end the process by
    # the signal, which process managers report as a crash (rc=-15).
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _stopped)
    uvicorn.run(
        app,
        host=host or settings.api_host,
        port=port or settings.api_port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
    )


def _stopped(signum: int, _: object) -> None:
    raise SystemExit(0)


def classify(event: Any) -> EventKind | None:
    """Which queue a recorded event belongs to, from the time field it has."""
    if not isinstance(event, dict):
        return None
    for kind in EventKind:
        if kind.time_field in event:
            return kind
    return None


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch", default=500, show_default=True, help="Events per publish.")
@click.option(
    "--plain",
    is_flag=True,
    help="Publish bare JSON to the raw camera queues instead of Celery tasks.",
)
def replay(path: Path, batch: int, plain: bool) -> None:
    """Publish recorded wire-format events (JSON lines) for processing."""
    from rich.progress import Progress

    publish = _plain_publisher() if plain else _task_publisher()
    lines = path.read_bytes().splitlines()
    pending: list[tuple[EventKind, Any]] = []
    sent = skipped = 0
    with Progress(console=console) as progress:
        task = progress.add_task(f"replaying {path.name}", total=len(lines))
        for number, line in enumerate(lines, start=1):
            progress.advance(task)
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            kind = classify(event)
            if kind is None:
                skipped += 1
                console.print(f"line {number}: not an entry or exit event, skipped")
                continue
            pending.append((kind, line if plain else event))
            if len(pending) >= batch:
                publish(pending)
                sent += len(pending)
                pending.clear()
        publish(pending)
        sent += len(pending)
    console.print(f"published {sent} events, skipped {skipped}")


def _task_publisher() -> Callable[[list[tuple[EventKind, Any]]], None]:
    from workers.tasks import publish_events

    return publish_events


def _plain_publisher() -> Callable[[list[tuple[EventKind, Any]]], None]:
    from workers.ingest import publish_plain

    settings = get_settings()
    return lambda events: publish_plain(settings, events)


@main.command()
def ingest() -> None:
    """Consume bare JSON camera events from the raw queues (no Celery envelope)."""
    from prometheus_client import start_http_server

    from workers.ingest import run as run_ingest

    settings = get_settings()
    start_http_server(settings.ingest_metrics_port, addr=settings.metrics_address)
    run_ingest(settings)


@main.command()
@click.option("--entries", default=0, show_default=True)
@click.option("--exits", default=0, show_default=True)
def generate(entries: int, exits: int) -> None:
    """Queue one burst of simulated entries and/or exits."""
    from workers.tasks import generate_entry, generate_exit

    if entries:
        generate_entry.delay(count=entries)
    if exits:
        generate_exit.delay(count=exits)
    console.print(f"queued bursts: entries={entries} exits={exits}")


main.add_command(secrets_cli)
main.add_command(bench)


@main.command()
@click.option(
    "--worker-url",
    envvar="PARKING_WORKER_METRICS_URL",
    default=None,
    help="Worker /metrics (env PARKING_WORKER_METRICS_URL; default: local port).",
)
@click.option(
    "--api-url",
    envvar="PARKING_STATUS_API_URL",
    default=None,
    help="Summary API /metrics (env PARKING_STATUS_API_URL; default from the API URL).",
)
@click.option(
    "--interval",
    envvar="PARKING_STATUS_INTERVAL",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between scrapes: the window of rates and percentiles.",
)
@click.option("--once", is_flag=True, help="Print one view and exit (1: worker down).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print JSON.")
def status(
    worker_url: str | None,
    api_url: str | None,
    interval: float,
    once: bool,
    as_json: bool,
) -> None:
    """Live view of rates, latency, occupancy, matched share and queues."""
    from parking import status as view

    settings = get_settings()
    worker = worker_url or settings.worker_metrics_url
    worker = worker or f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
    api = api_url or settings.summary_api_url.rstrip("/") + "/metrics"
    emit = None
    if as_json:

        def emit(data: dict[str, Any]) -> None:
            click.echo(json.dumps(data, indent=2, sort_keys=True))

    out = Console()
    sys.exit(view.run(worker, api, interval, once or as_json, out, emit))
