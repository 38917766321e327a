"""Faults injected for real into the running processes; the CSV must stay exact.

The worker (``celery -A workers worker -P prefork``) and the summary API
(``python -m parking api``) run as their own processes against the test vhost
and Redis databases. Each test breaks something real — SIGKILLs a pool child,
stops the API, stops RabbitMQ's application, kills every child that touches
one message — and then reads the stays CSV: exactly the planned rows, none
twice, every duration exact.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery

from parking.settings import Settings, get_settings
from parking.store import RedisVisitStore
from tests.brokers import (
    drain_dead_letters,
    messages_in_queues,
    start_broker_app,
    stop_broker_app,
)
from tests.processes import (
    Api,
    Beat,
    TcpProxy,
    Worker,
    connected_to,
    elapsed,
    fault_env,
    kill,
)
from tests.services import isolated_vhost, wait_until
from tests.traffic import (
    T0,
    Feeder,
    PlannedStay,
    check_ledger,
    plan_stays,
    read_rows,
    shuffled_events,
)
from workers.app import app as celery_app
from workers.runtime import ledger_policy
from workers.tasks import process_entry, process_exit, sweep

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def _flush_redis(settings: Settings) -> None:
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()


_S = TypeVar("_S", Api, Worker, Beat)


@dataclass
class Rig:
    """The processes of one test, and what it reads back."""

    workdir: Path
    settings: Settings
    app: Celery
    services: list[Api | Worker | Beat] = field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        return fault_env(self.workdir, **overrides)

    def started(self, service: _S) -> _S:
        self.services.append(service)
        service.start()
        return service

    def rows(self) -> list[dict[str, str]]:
        return read_rows(self.workdir / "stays.csv")

    def events_applied(self) -> int:
        """Distinct events the store has applied (it keeps each id once)."""
        client = redis.Redis.from_url(
            self.settings.redis_connection_url(self.settings.redis_db_store)
        )
        conf = self.settings
        store = RedisVisitStore(client, ledger_policy(conf), prefix=conf.queue_prefix)
        return store.remembered_events(datetime.now(UTC))

    def drained(self) -> bool:
        """No task message left in any queue, ready or being worked on."""
        return not any(messages_in_queues(self.settings).values())

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    settings = get_settings()
    with isolated_vhost():
        _flush_redis(settings)
        rig = Rig(tmp_path, settings, celery_app)
        try:
            yield rig
        finally:
            rig.stop_all()
            _flush_redis(settings)


def _feed(rig: Rig, stays: list[PlannedStay]) -> None:
    feeder = Feeder(rig.app, shuffled_events(stays))
    feeder.start()
    feeder.finish(timeout=60)


def _figure(report: Callable[[str], None], test: str, **figures: object) -> None:
    line = " ".join(f"{key}={value}" for key, value in figures.items())
    report(f"{test}: {line}")


def test_a_thousand_stays_survive_killed_children_and_a_restarted_worker(
    rig: Rig, report: Callable[[str], None]
) -> None:
    stays = plan_stays(1000, "KILL")
    env = rig.env()
    api = rig.started(Api(env))
    worker = rig.started(Worker(env))
    started = time.monotonic()
    # Slow enough (about 33 s of events) that the kills below, and the
    # worker's restart after half the rows, happen while events still flow.
    feeder = Feeder(rig.app, shuffled_events(stays), per_second=60)
    feeder.start()

    # SIGKILL a pool child twice a second while the events flow, until half
    # the stays are written; some kills catch a task in the middle of its work
    # (tasks take about a millisecond, so most kills find the child idle).
    chooser = random.Random(3)
    kills = 0
    while len(rig.rows()) < len(stays) // 2:
        assert time.monotonic() - started < 120, "half the stays never arrived"
        children = worker.children()
        if children and kill(chooser.choice(children)):
            kills += 1
        time.sleep(0.5)
    assert kills >= 3, "too few children were killed to mean anything"
    lost_in_children = worker.lost_jobs()

    # Then the whole worker dies (parent and children at once) and a new one
    # takes over what the broker gives back.
    rows_at_restart = len(rig.rows())
    worker.stop(signal.SIGKILL)
    worker = rig.started(Worker(env, name="faults-2"))
    feeder.finish(timeout=60)

    wait_until(lambda: len(rig.rows()) >= len(stays), timeout=180, interval=0.5)
    wait_until(rig.drained, timeout=60, interval=1)
    check = check_ledger(rig.rows(), stays)
    _figure(
        report,
        "sigkill",
        rows=f"{check.written}/{check.expected}",
        duplicates=check.duplicates,
        children_killed=kills,
        tasks_lost_in_kills=lost_in_children,
        rows_before_worker_kill=rows_at_restart,
        reposted_stays=int(api.metric("parking_api_duplicate_stays_total")),
        seconds=elapsed(started),
    )
    assert check.exact, str(check)
    assert rows_at_restart < len(stays), "the worker was restarted after the run"


def test_the_summary_api_down_for_30_seconds_under_load_loses_nothing(
    rig: Rig, report: Callable[[str], None]
) -> None:
    outage = 30.0
    stays = plan_stays(300, "DOWN")
    before, during = stays[:100], stays[100:]
    # Backoff capped low so that recovery after the outage takes seconds.
    env = rig.env(PARKING_RETRY_BACKOFF_CAP_SECONDS="4")
    api = rig.started(Api(env))
    worker = rig.started(Worker(env))
    started = time.monotonic()
    _feed(rig, before)
    wait_until(lambda: len(rig.rows()) == len(before), timeout=60)

    api.stop()
    down = time.monotonic()
    # Under load: the outage's events arrive at a steady pace through most of
    # it, not in one burst at its start.
    pace = 2 * len(during) / (0.8 * outage)
    feeder = Feeder(rig.app, shuffled_events(during), per_second=pace)
    feeder.start()
    wait_until(lambda: worker.count(r"retrying in=\d+s") >= 1, timeout=outage)
    feeder.finish(timeout=outage)
    fed_in = elapsed(down)
    # No task sleeps and no worker is held: every event of the outage gets
    # through the store while exits wait for their retries in the broker.
    wait_until(
        lambda: rig.events_applied() == 2 * len(stays),
        timeout=max(outage - (time.monotonic() - down), 1),
    )
    assert time.monotonic() - down < outage, "the events outlasted the outage"
    assert len(rig.rows()) == len(before)
    # The outage lasts as long as the requirement says, whatever the pace.
    wait_until(lambda: time.monotonic() - down >= outage, timeout=outage + 1)
    retries_during = worker.count(r"retrying in=\d+s")

    api.start()
    back = time.monotonic()
    wait_until(lambda: len(rig.rows()) >= len(stays), timeout=90, interval=0.5)
    recovered = elapsed(back)
    wait_until(rig.drained, timeout=60, interval=1)
    check = check_ledger(rig.rows(), stays)
    _figure(
        report,
        "api-outage",
        rows=f"{check.written}/{check.expected}",
        duplicates=check.duplicates,
        outage_seconds=round(back - down, 1),
        events_fed_during_outage=2 * len(during),
        fed_over_seconds=fed_in,
        retries_during_outage=retries_during,
        retries_total=worker.count(r"retrying in=\d+s"),
        recovered_seconds=recovered,
        seconds=elapsed(started),
    )
    assert check.exact, str(check)


def test_redis_gone_for_seconds_mid_run_loses_nothing(
    rig: Rig, report: Callable[[str], None]
) -> None:
    """The worker reaches Redis through a proxy that the test cuts."""
    stays = plan_stays(300, "REDIS")
    redis_url = urlsplit(rig.settings.redis_url)
    proxy = TcpProxy(redis_url.hostname or "127.0.0.1", redis_url.port or 6379)
    proxy.start()
    env = rig.env(
        PARKING_REDIS_URL=f"redis://127.0.0.1:{proxy.port}",
        PARKING_RETRY_BACKOFF_CAP_SECONDS="4",
    )
    rig.started(Api(env))
    worker = rig.started(Worker(env))
    started = time.monotonic()
    feeder = Feeder(rig.app, shuffled_events(stays), per_second=100)
    feeder.start()
    try:
        wait_until(lambda: len(rig.rows()) >= 30, timeout=60)
        rows_at_cut = len(rig.rows())
        proxy.cut()
        cut = time.monotonic()
        # Tasks meet the outage and go back to the broker to retry later.
        wait_until(lambda: worker.count(r"retrying in=.*redis unavailable") >= 5)
        wait_until(lambda: time.monotonic() - cut >= 5, timeout=6)
        retries_during = worker.count(r"retrying in=.*redis unavailable")
        proxy.start()
        outage = elapsed(cut)
        feeder.finish(timeout=60)
        wait_until(lambda: len(rig.rows()) >= len(stays), timeout=90, interval=0.5)
        wait_until(rig.drained, timeout=60, interval=1)
    finally:
        proxy.cut()
    check = check_ledger(rig.rows(), stays)
    _figure(
        report,
        "redis-outage",
        rows=f"{check.written}/{check.expected}",
        duplicates=check.duplicates,
        rows_when_cut=rows_at_cut,
        redis_down_seconds=outage,
        retries_during_outage=retries_during,
        seconds=elapsed(started),
    )
    assert check.exact, str(check)
    assert worker.alive()


@pytest.mark.broker_restart
def test_rabbitmq_stopped_and_started_mid_run_loses_and_doubles_nothing(
    rig: Rig, report: Callable[[str], None]
) -> None:
    stays = plan_stays(600, "BROKER")
    env = rig.env(
        PARKING_SWEEP_INTERVAL_SECONDS="1",
        # Beat runs only the sweep here: no simulated cars in the CSV.
        PARKING_ENTRY_INTERVAL_SECONDS="86400",
        PARKING_EXIT_INTERVAL_SECONDS="86400",
    )
    rig.started(Api(env))
    worker = rig.started(Worker(env))
    beat = rig.started(Beat(env))
    worker_pid = worker.pid
    started = time.monotonic()
    feeder = Feeder(rig.app, shuffled_events(stays), per_second=100)
    feeder.start()
    wait_until(lambda: len(rig.rows()) >= 100, timeout=60)

    rows_at_stop = len(rig.rows())
    stop_broker_app()
    stopped = time.monotonic()
    try:
        # Down until both sides felt it: the worker lost its connection and
        # the publisher had to send an event again.
        wait_until(
            lambda: (
                worker.count("Connection to broker lost") >= 1
                and feeder.republished >= 1
            ),
            timeout=30,
        )
    finally:
        start_broker_app(rig.settings)
    outage = elapsed(stopped)
    sweeps_at_restart = worker.metric("celery_task_succeeded_total", name=sweep.name)

    feeder.finish(timeout=120)
    wait_until(lambda: len(rig.rows()) >= len(stays), timeout=180, interval=0.5)
    # Beat reconnected by itself too: the sweeps it schedules run again.
    wait_until(
        lambda: (
            worker.metric("celery_task_succeeded_total", name=sweep.name)
            > sweeps_at_restart
        ),
        timeout=30,
    )
    # A publish retried during the outage may wait out a backoff of up to
    # retry_backoff_cap_seconds (60 s) in a delay queue before it drains.
    wait_until(rig.drained, timeout=180, interval=1)
    check = check_ledger(rig.rows(), stays)
    _figure(
        report,
        "broker-restart",
        rows=f"{check.written}/{check.expected}",
        duplicates=check.duplicates,
        rows_when_stopped=rows_at_stop,
        broker_down_seconds=outage,
        publishes_repeated=feeder.republished,
        seconds=elapsed(started),
    )
    assert check.exact, str(check)
    assert worker.pid == worker_pid, "the worker was replaced, not reconnected"
    assert worker.alive()
    assert beat.alive()
    assert worker.count(r"Connected to amqp://") >= 2, "worker did not reconnect"


def test_a_message_that_kills_its_worker_every_time_is_dead_lettered(
    rig: Rig, report: Callable[[str], None]
) -> None:
    """Every child that takes the message dies; the delivery limit ends it.

    The summary API is frozen (SIGSTOP), so the exit task hangs in its POST;
    the test SIGKILLs each child it finds connected to the API, as if the
    message itself crashed the process every time.
    """
    env = rig.env(PARKING_SUMMARY_TIMEOUT_SECONDS="120")
    api = rig.started(Api(env))
    worker = rig.started(Worker(env, concurrency=1))
    poison = PlannedStay("POISON-1", T0, T0 + timedelta(hours=1))
    drain_dead_letters(rig.settings)
    started = time.monotonic()

    api.send(signal.SIGSTOP)
    try:
        process_entry.delay(poison.entry)
        process_exit.delay(poison.exit)
        kills = 0
        while not (dead := drain_dead_letters(rig.settings)):
            assert time.monotonic() - started < 180, f"not dead-lettered, kills={kills}"
            for child in worker.children():
                if connected_to(child, api.port) and kill(child):
                    kills += 1
            time.sleep(0.05)
    finally:
        api.send(signal.SIGCONT)

    [letter] = dead
    death = (letter.headers or {})["x-death"][0]
    assert letter.headers["task"] == "parking.process_exit"
    assert death["reason"] == "delivery_limit"
    assert kills == rig.settings.delivery_limit + 1

    # The worker survived all of it and still writes stays.
    good = PlannedStay("AFTER-1", T0, T0 + timedelta(minutes=5))
    process_entry.delay(good.entry)
    process_exit.delay(good.exit)
    wait_until(lambda: any(r["vehicle_plate"] == "AFTER-1" for r in rig.rows()))
    assert worker.alive()
    plates = [row["vehicle_plate"] for row in rig.rows()]
    _figure(
        report,
        "poison",
        deliveries=kills,
        delivery_limit=rig.settings.delivery_limit,
        dead_letter_reason=death["reason"],
        poison_rows=plates.count("POISON-1"),
        seconds=elapsed(started),
    )
    assert plates.count("AFTER-1") == 1
    assert plates.count("POISON-1") <= 1


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_the_summary_api_asked_to_stop_exits_cleanly(
    tmp_path: Path, stop: signal.Signals
) -> None:
    api = Api(fault_env(tmp_path))
    api.start()
    process = api.process
    assert process is not None
    try:
        process.send_signal(stop)
        code = process.wait(timeout=30)
    finally:
        api.stop()
    # A stop that was asked for is not a crash: `parking run` (honcho) and
    # supervisors report a death by the signal as one.
    assert code == 0, api.log()[-2000:]
