"""The Celery side of ``parking bench``: the no-op baseline task and publishing.

Workers register the no-op task only when started with
``--include workers.bench``, as the bench starts its own: a production worker
never loads this module. This module stays light because the bench's workers
import it and their memory is measured; the run lives in ``workers.bench_run``
and the report in ``parking.benchmark``.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from parking.events import EventKind, format_time
from parking.settings import Settings
from workers import runtime, topology
from workers.app import app

logger = logging.getLogger(__name__)

NOOP_TASK = "parking.bench_noop"
TASKS = {"entry": "parking.process_entry", "exit": "parking.process_exit"}
#: Entries a lane sends before the exit of its first car: exits follow entries.
EXIT_LAG = 20

_clients: dict[int, redis.Redis] = {}


def _noop_client() -> redis.Redis:
    # One client per process: a forked pool child must not share the socket.
    pid = os.getpid()
    if pid not in _clients:
        _clients.clear()
        conf = runtime.settings()
        url = conf.redis_connection_url(conf.redis_db_store)
        _clients[pid] = redis.Redis.from_url(url, socket_timeout=5)
    return _clients[pid]


def noop_counter_key(settings: Settings) -> str:
    return f"{settings.queue_prefix}:bench:noop"


@app.task(name=NOOP_TASK)
def bench_noop() -> None:
    """One pipelined Redis write and nothing else: Celery's own ceiling."""
    pipe = _noop_client().pipeline(transaction=False)
    pipe.incr(noop_counter_key(runtime.settings()))
    pipe.execute()


# -- What to publish --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    """One message to send; a camera event gets its time when it is sent."""

    queue: str
    task: str
    kind: EventKind | None = None
    event_id: str = ""
    plate: str = ""

    def args(self, now: datetime) -> tuple[Any, ...]:
        if self.kind is None:
            return ()
        event = {"id": self.event_id, "vehicle_plate": self.plate}
        event[self.kind.time_field] = format_time(now)
        return (event,)


@dataclass
class Plan:
    lanes: list[list[Planned]]
    #: Plates whose exit has an entry: each must give exactly one row.
    matched: set[str] = field(default_factory=set)

    @property
    def size(self) -> int:
        return sum(len(lane) for lane in self.lanes)


def _matched(index: int, ratio: float) -> bool:
    # Spreads round(count * ratio) matches evenly, in integer arithmetic.
    per_mille = round(ratio * 1000)
    return (index + 1) * per_mille // 1000 > index * per_mille // 1000


def plan_pipeline(count: int, ratio: float, lanes: int, token: str) -> Plan:
    """``count`` entries and ``count`` exits; ``ratio`` of the exits matched.

    Each car's entry and exit go through the same lane, the exit
    ``EXIT_LAG`` entries later, so the exit is stamped after its entry. An
    unmatched exit carries a plate that never entered, and its lane's entry
    stays open: both are the expected, unpaired halves.
    """
    plan = Plan([[] for _ in range(lanes)])
    waiting: list[deque[Planned]] = [deque() for _ in range(lanes)]
    for index in range(count):
        number = index % lanes
        plate = f"P{token}{index:07d}"
        plan.lanes[number].append(
            Planned(
                "entry", TASKS["entry"], EventKind.ENTRY, f"b{token}e{index}", plate
            )
        )
        if _matched(index, ratio):
            plan.matched.add(plate)
        else:
            plate = f"U{token}{index:07d}"
        waiting[number].append(
            Planned("exit", TASKS["exit"], EventKind.EXIT, f"b{token}x{index}", plate)
        )
        if len(waiting[number]) > EXIT_LAG:
            plan.lanes[number].append(waiting[number].popleft())
    for lane, rest in zip(plan.lanes, waiting, strict=True):
        lane.extend(rest)
    return plan


def plan_noop(count: int, lanes: int) -> Plan:
    """No-op tasks over the same two queues the pipeline uses."""
    plan = Plan([[] for _ in range(lanes)])
    for index in range(count):
        queue = "entry" if index % 2 == 0 else "exit"
        plan.lanes[index % lanes].append(Planned(queue, NOOP_TASK))
    return plan


# -- Publishing -------------------------------------------------------------


class Publisher:
    """Sends planned messages from several threads, one connection each.

    Messages are Celery's own protocol (``create_task_message``) sent straight
    to the exchange: without publish signals or ``task-sent`` events the
    producer takes as little of the shared CPU as it can. The same path
    serves the baseline and the pipeline.
    """

    def __init__(self, settings: Settings, confirm: bool) -> None:
        self._settings = settings
        self._confirm = confirm
        self._exchange = topology.task_exchange(settings).name
        self._sent: list[int] = []
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    @property
    def sent(self) -> int:
        return sum(self._sent)

    def start(self, lanes: list[list[Planned]]) -> None:
        self._sent = [0] * len(lanes)
        self._threads = [
            threading.Thread(target=self._lane, args=(n, items), daemon=True)
            for n, items in enumerate(lanes)
        ]
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def connection(self) -> Any:
        options = {"confirm_publish": self._confirm}
        return app.connection_for_write(transport_options=options)

    def _lane(self, number: int, items: list[Planned]) -> None:
        try:
            with self.connection() as conn:
                producer = app.amqp.Producer(conn)
                for item in items:
                    self.publish(producer, item)
                    self._sent[number] += 1
        except Exception as exc:  # reported by the phase, which stops waiting
            logger.exception("bench publisher failed lane=%d", number)
            self.errors.append(exc)

    def publish(self, producer: Any, item: Planned) -> None:
        message = app.amqp.create_task_message(
            str(uuid.uuid4()), item.task, item.args(datetime.now(UTC)), {}
        )
        producer.publish(
            message.body,
            exchange=self._exchange,
            routing_key=self._settings.queue(item.queue),
            headers=message.headers,
            serializer="json",
            delivery_mode=2,
            retry=True,
            **message.properties,
        )
