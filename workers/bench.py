"""The Celery side of ``parking bench``: the no-op baseline task and publishing.

Workers register the no-op task only when started with
``--include workers.bench``, as the bench starts its own: a production worker
never loads this module. This module stays light because the bench's workers
import it and their memory is measured; the run lives in ``workers.bench_run``
and the report in ``parking.benchmark``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import amqp
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


def waves(plan: Plan, order: str) -> list[list[list[Planned]]]:
    """The lanes to send one after the other: all at once when interleaved,
    else the entries first and then the exits, each lane in its own order."""
    if order == "interleaved":
        return [plan.lanes]
    return [
        [[item for item in lane if item.kind is kind] for lane in plan.lanes]
        for kind in (EventKind.ENTRY, EventKind.EXIT)
    ]


def plan_noop(count: int, lanes: int) -> Plan:
    """No-op tasks over the same two queues the pipeline uses."""
    plan = Plan([[] for _ in range(lanes)])
    for index in range(count):
        queue = "entry" if index % 2 == 0 else "exit"
        plan.lanes[index % lanes].append(Planned(queue, NOOP_TASK))
    return plan


# -- Publishing -------------------------------------------------------------


#: Scheduling priority of the publisher threads (0 normal, 19 lowest).
PUBLISHER_NICE = 10

#: Messages a lane may have sent and not yet seen confirmed.
CONFIRM_WINDOW = 256


class _ConfirmWindow:
    """Publisher confirms of one channel, collected as they come back."""

    def __init__(self, conn: Any, channel: Any) -> None:
        self._conn = conn
        self._sent = 0
        self._unconfirmed: deque[int] = deque()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)

    def published(self, window: int) -> int:
        """Note one more message sent; wait while more than ``window`` are
        unconfirmed. Returns how many the broker has confirmed."""
        if window:
            self._sent += 1
            self._unconfirmed.append(self._sent)
        while len(self._unconfirmed) > window:
            self._conn.drain_events(timeout=30)
        return self._sent - len(self._unconfirmed)

    def _ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            while self._unconfirmed and self._unconfirmed[0] <= tag:
                self._unconfirmed.popleft()
        elif self._unconfirmed and self._unconfirmed[0] == tag:
            self._unconfirmed.popleft()
        else:
            self._unconfirmed.remove(tag)

    def _nack(self, tag: int, multiple: bool) -> None:
        raise RuntimeError(f"the broker refused message {tag} (nack)")


class Publisher:
    """Sends planned messages from several threads, one connection each.

    Messages are Celery's own protocol (``create_task_message``) sent straight
    to the exchange: without publish signals or ``task-sent`` events the
    producer takes as little of the shared CPU as it can. The same path
    serves the baseline and the pipeline.
    """

    def __init__(self, settings: Settings, confirm: bool, plain: bool = False) -> None:
        self._settings = settings
        self._confirm = confirm
        #: Camera events as bare JSON on the raw queues, as cameras send them.
        self._plain = plain
        self._exchange = topology.task_exchange(settings).name
        self._sent: list[int] = []
        self._threads: list[threading.Thread] = []
        self._templates: dict[str, tuple[dict[str, Any], Any]] = {}
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
        # The cameras are other machines on a real site: here the publisher
        # shares two cores with what it measures, so it yields to them. Nice
        # is per thread on Linux; the bench's other threads keep theirs.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUBLISHER_NICE)
        try:
            # Confirms, when asked for, are taken by the window below, not by
            # py-amqp's wait for each one: a broker round trip per message
            # cost the publisher more CPU than the broker's own work.
            options = {"confirm_publish": False}
            with app.connection_for_write(transport_options=options) as conn:
                channel = conn.channel()
                window = _ConfirmWindow(conn, channel) if self._confirm else None
                for published, item in enumerate(items, 1):
                    self.publish(channel, item)
                    if window is None:
                        self._sent[number] = published
                    else:
                        self._sent[number] = window.published(CONFIRM_WINDOW)
                if window is not None:
                    self._sent[number] = window.published(0)
        except Exception as exc:  # reported by the phase, which stops waiting
            logger.exception("bench publisher failed lane=%d", number)
            self.errors.append(exc)

    def _plain_message(self, item: Planned) -> amqp.Message:
        (event,) = item.args(datetime.now(UTC))
        return amqp.Message(
            json.dumps(event, separators=(",", ":")),
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
        )

    def _message(self, item: Planned) -> amqp.Message:
        args = item.args(datetime.now(UTC))
        task_id = str(uuid.uuid4())
        # Celery's own headers for this task, made once and copied: building
        # them for every message (config lookups, a safe repr of the
        # arguments) was a third of the publisher's CPU.
        template = self._templates.get(item.task)
        if template is None:
            made = app.amqp.create_task_message(task_id, item.task, (), {})
            template = self._templates[item.task] = (made.headers, made.body)
        headers, (_, kwargs, embed) = template
        headers = {**headers, "id": task_id, "root_id": task_id}
        headers["argsrepr"] = repr(args)
        return amqp.Message(
            json.dumps([args, kwargs, embed], separators=(",", ":")),
            content_type="application/json",
            content_encoding="utf-8",
            application_headers=headers,
            delivery_mode=2,
            correlation_id=task_id,
        )

    def publish(self, channel: Any, item: Planned) -> None:
        """One message on this channel: camera events as bare JSON to the raw
        queues on the plain path, everything else as a Celery task message."""
        if self._plain and item.kind is not None:
            channel.basic_publish(
                self._plain_message(item),
                exchange="",  # the raw queues' own names route
                routing_key=topology.raw_queue_name(self._settings, item.kind),
            )
        else:
            channel.basic_publish(
                self._message(item),
                exchange=self._exchange,
                routing_key=self._settings.queue(item.queue),
            )
