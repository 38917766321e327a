"""Adversarial: Redis answers, but with an error that says "not now".

A Redis at ``maxmemory`` answers ``OOM``, a replica promoted away from
during a failover answers ``READONLY``, a Redis whose snapshots fail answers
``MISCONF``, one running a long script answers ``BUSY``. Each is an outage
in another guise: the event is fine and will apply once Redis recovers, so
it must be retried (``TemporaryFailure``), not dead-lettered as if it were
bad input, and the plain-JSON consumer must not die of it.

The shared Redis cannot be put into those states without disturbing
everyone, so a tiny RESP server answers every script call with the error.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from parking.clock import SystemClock
from parking.errors import TemporaryFailure
from parking.events import EventKind
from parking.handlers import EntryEventProcessor
from parking.lots import Lot, Lots
from parking.metrics import ParkingMetrics
from parking.review import OrphanedVisit, UnmatchedExit
from parking.settings import Settings
from parking.stays import Stay
from parking.store import LedgerPolicy, RedisVisitStore
from parking.tariff import Tariff
from workers.ingest import PlainEventConsumer

pytestmark = pytest.mark.integration

ENTRY = {
    "id": "busy-in",
    "vehicle_plate": "BUSY1",
    "entry_date_time": "2024-05-01T08:00:00Z",
}
REFUSALS = [
    pytest.param("OOM command not allowed when used memory > 'maxmemory'.", id="oom"),
    pytest.param("READONLY You can't write against a read only replica.", id="ro"),
    pytest.param(
        "MISCONF Redis is configured to save RDB snapshots, but it's currently "
        "unable to persist to disk.",
        id="misconf",
    ),
    pytest.param(
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL "
        "or SHUTDOWN NOSCRIPT.",
        id="busy",
    ),
]


def _read_command(stream: Any) -> list[bytes] | None:
    """One RESP array of bulk strings, as redis-py sends every command."""
    line = stream.readline()
    if not line:
        return None
    count = int(line[1:])
    parts = []
    for _ in range(count):
        size = int(stream.readline()[1:])
        parts.append(stream.read(size + 2)[:-2])
    return parts


class _RefusingRedis(socketserver.ThreadingTCPServer):
    """Answers PING and connection set-up (RESP3 ``HELLO``, as redis-py 8
    sends it), refuses every script call."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, refusal: str) -> None:
        self.refusal = refusal
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: _RefusingRedis

    def handle(self) -> None:
        while (command := _read_command(self.rfile)) is not None:
            name = command[0].upper()
            if name == b"PING":
                self.wfile.write(b"+PONG\r\n")
            elif name == b"HELLO":
                self.wfile.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
            elif name in (b"EVALSHA", b"EVAL", b"SCRIPT"):
                self.wfile.write(f"-{self.server.refusal}\r\n".encode())
            else:
                self.wfile.write(b"+OK\r\n")
            self.wfile.flush()


@pytest.fixture(params=REFUSALS)
def refusing_redis(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    server = _RefusingRedis(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    client = redis.Redis(host=str(host), port=int(port), socket_timeout=2)
    try:
        assert client.ping()
        yield client
    finally:
        client.close()
        server.shutdown()
        server.server_close()


@dataclass
class _NoSink:
    posted: list[Any] = field(default_factory=list)

    def record(self, stay: Stay) -> None:
        self.posted.append(stay)

    def record_unmatched(self, item: UnmatchedExit) -> None:
        self.posted.append(item)

    def record_orphan(self, item: OrphanedVisit) -> None:
        self.posted.append(item)


def _processor(client: redis.Redis) -> EntryEventProcessor:
    lots = Lots([Lot("main", 1000, Tariff())])
    metrics = ParkingMetrics(CollectorRegistry())
    store = RedisVisitStore(client, LedgerPolicy())
    return EntryEventProcessor(store, _NoSink(), SystemClock(), metrics, lots)


def test_a_redis_that_refuses_for_now_means_retry_later(
    refusing_redis: redis.Redis,
) -> None:
    with pytest.raises(TemporaryFailure):
        _processor(refusing_redis).process_message(ENTRY)


@dataclass
class _Message:
    body: bytes
    state: str = "unacked"
    channel: object = None

    def ack(self, multiple: bool = False) -> None:
        self.state = "acked"

    def reject(self, requeue: bool = False) -> None:
        self.state = "requeued" if requeue else "dead-lettered"


def test_the_plain_consumer_hands_a_refused_event_to_the_retries(
    refusing_redis: redis.Redis,
) -> None:
    handed: list[tuple[EventKind, Any, int]] = []
    processor = _processor(refusing_redis)
    consumer = PlainEventConsumer(
        connection=None,  # type: ignore[arg-type]  # never used by process()
        settings=Settings(),
        handlers={EventKind.ENTRY: processor, EventKind.EXIT: processor},
        handoff=lambda kind, event, countdown: handed.append((kind, event, countdown)),
    )
    message = _Message(b'{"id": "busy-in", "vehicle_plate": "BUSY1", '
                       b'"entry_date_time": "2024-05-01T08:00:00Z"}')  # fmt: skip

    consumer.process(EventKind.ENTRY, message)  # type: ignore[arg-type]
    # Handed over, so done: acked with the next batch, not dead-lettered.
    assert message.state == "unacked"
    assert consumer.acks_waiting == 1
    consumer.flush_acks()

    assert message.state == "acked"
    assert [(kind, event["id"]) for kind, event, _ in handed] == [
        (EventKind.ENTRY, "busy-in")
    ]


def test_the_fake_redis_speaks_enough_resp_for_the_store() -> None:
    """The harness itself: the client connects, and a script call gets the
    refusal as a Redis error (not a broken connection)."""
    server = _RefusingRedis("ERR unknown command")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        with socket.create_connection((str(host), int(port)), timeout=2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(16) == b"+PONG\r\n"
        client = redis.Redis(host=str(host), port=int(port), socket_timeout=2)
        assert RedisVisitStore(client, LedgerPolicy()).ping()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.evalsha("0" * 40, 0)
        client.close()
    finally:
        server.shutdown()
        server.server_close()
