"""Bare JSON from cameras on the raw queues, through the same handlers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.connection import Connection

from parking.events import EventKind
from parking.settings import get_settings
from tests.services import ApiServer, wait_until
from workers import runtime, topology
from workers.ingest import ACK_BATCH, PlainEventConsumer, publish_plain
from workers.tasks import PROCESSORS, publish_events

STAYS = [
    ("PLN-001", "2024-09-11T21:24:56.123456789Z", "2024-09-11T23:00:00.987654321Z"),
    ("pln 002", "2024-09-11T21:00:00+02:00", "2024-09-11T21:30:00+02:00"),
    ("京A12345", "2019-04-07T02:00:09+11:00", "2019-04-07T04:52:07+10:00"),
]


def _events(tag: str) -> list[tuple[EventKind, dict[str, Any]]]:
    events: list[tuple[EventKind, dict[str, Any]]] = []
    for n, (plate, entry, exit_) in enumerate(STAYS):
        extra = {"camera": "gate-3", "confidence": 0.93}
        events.append(
            (EventKind.ENTRY, {"id": f"{tag}-{n}-in", "vehicle_plate": plate,
                               "entry_date_time": entry, **extra})
        )  # fmt: skip
        events.append(
            (EventKind.EXIT, {"id": f"{tag}-{n}-out", "vehicle_plate": plate,
                              "exit_date_time": exit_, **extra})
        )  # fmt: skip
    return events


def _stays(rows: list[dict[str, str]]) -> set[tuple[str, ...]]:
    columns = (
        "vehicle_plate",
        "entry_date_time",
        "exit_date_time",
        "duration_seconds",
        "lot_id",
        "fee",
        "currency",
        "match",
        "clock_skew",
    )
    return {tuple(row[c] for c in columns) for row in rows}


INGEST_THREAD = "test-plain-ingest"


@pytest.fixture
def ingest(api_server: ApiServer) -> Iterator[PlainEventConsumer]:
    settings = get_settings()
    handlers = {
        EventKind.ENTRY: runtime.entry_processor(),
        EventKind.EXIT: runtime.exit_processor(),
    }
    handed: list[tuple[EventKind, Any, int]] = []
    with Connection(settings.broker_connection_url) as connection:
        consumer = PlainEventConsumer(
            connection, settings, handlers, lambda *a: handed.append(a)
        )
        thread = threading.Thread(target=consumer.run, daemon=True, name=INGEST_THREAD)
        thread.start()
        try:
            yield consumer
        finally:
            consumer.should_stop = True
            thread.join(timeout=10)
    assert not handed, "no dependency was down, so nothing should be handed off"


def _purge_raw() -> None:
    settings = get_settings()
    with Connection(settings.broker_connection_url) as connection:
        for kind in EventKind:
            queue = topology.raw_queue(settings, kind).bind(connection.default_channel)
            queue.declare()
            queue.purge()


def _dead_letters() -> list[bytes]:
    settings = get_settings()
    found = []
    with Connection(settings.broker_connection_url) as connection:
        queue = topology.dead_letter_queue(settings).bind(connection.default_channel)
        queue.declare()
        while (message := queue.get(no_ack=True)) is not None:
            body = message.body  # py-amqp hands UTF-8 bodies over as text
            found.append(body.encode() if isinstance(body, str) else body)
    return found


def test_plain_json_gives_the_same_stays_as_the_celery_path(
    api_server: ApiServer,
    celery_worker: Any,
    ingest: PlainEventConsumer,
    store_redis: redis.Redis,
) -> None:
    _purge_raw()
    publish_events(_events("celery"))
    wait_until(lambda: len(api_server.rows()) == len(STAYS))
    via_celery = _stays(api_server.rows())
    # The same cars again: the ledger must not take them for repeated reads.
    store_redis.flushdb()

    plain = [(kind, json.dumps(event).encode()) for kind, event in _events("plain")]
    publish_plain(get_settings(), plain)
    wait_until(lambda: len(api_server.rows()) == 2 * len(STAYS))
    rows = api_server.rows()
    assert _stays(rows) == via_celery
    assert len({row["stay_id"] for row in rows}) == 2 * len(STAYS)
    # The stay across the 2019 daylight-saving change: true elapsed time.
    assert (
        "京A12345",
        "2019-04-06T15:00:09Z",
        "2019-04-06T18:52:07Z",
        "13918",
        "main",
        "12.00",
        "AUD",
        "exact",
        "false",
    ) in via_celery


def test_bad_plain_messages_are_dead_lettered_and_the_rest_processed(
    api_server: ApiServer, ingest: PlainEventConsumer
) -> None:
    _purge_raw()
    _dead_letters()
    bad = [
        (EventKind.ENTRY, b"{not json"),
        (EventKind.ENTRY, b"\xff\xfe\x00garbage"),
        (EventKind.EXIT, json.dumps({"id": "x", "vehicle_plate": "=HYPERLINK(1)",
                                     "exit_date_time": "2024-01-01T00:00:00Z"}).encode()),
        (EventKind.EXIT, json.dumps({"id": "y", "vehicle_plate": "AB1",
                                     "exit_date_time": "2024-01-01T00:00:00"}).encode()),
    ]  # fmt: skip
    good = [(kind, json.dumps(event).encode()) for kind, event in _events("good")]
    publish_plain(get_settings(), bad[:2] + good[:3] + bad[2:] + good[3:])
    wait_until(lambda: len(api_server.rows()) == len(STAYS))
    dead: list[bytes] = []

    def all_dead() -> bool:
        dead.extend(_dead_letters())
        return len(dead) >= len(bad)

    wait_until(all_dead)
    assert sorted(dead) == sorted(body for _, body in bad)


def _stopped(consumer: PlainEventConsumer) -> bool:
    consumer.should_stop = True
    return not any(t.name == INGEST_THREAD for t in threading.enumerate())


def _left_in_raw_queues() -> int:
    """Messages the broker still holds for the raw queues (taken, not counted
    from statistics: a consumer that went away gave its unacked ones back)."""
    settings = get_settings()
    found = 0
    with Connection(settings.broker_connection_url) as connection:
        for kind in EventKind:
            queue = topology.raw_queue(settings, kind).bind(connection.default_channel)
            while queue.get(no_ack=True) is not None:
                found += 1
    return found


def test_processed_messages_are_acked_once_the_feed_goes_quiet(
    api_server: ApiServer, ingest: PlainEventConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _purge_raw()
    plain = [(kind, json.dumps(event).encode()) for kind, event in _events("quiet")]
    publish_plain(get_settings(), plain)
    wait_until(lambda: len(api_server.rows()) == len(STAYS))

    # Fewer than a batch: only the consumer's idle tick can ack them.
    assert len(plain) < ACK_BATCH
    wait_until(lambda: ingest.acks_waiting == 0, timeout=10)
    # Leave as a crash would, acking nothing more: nothing comes back.
    monkeypatch.setattr(ingest, "flush_acks", lambda: None)
    wait_until(lambda: _stopped(ingest), timeout=10)
    assert _left_in_raw_queues() == 0


def test_a_consumer_that_stops_acks_what_it_processed_first(
    api_server: ApiServer, ingest: PlainEventConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No idle tick acks anything now: only the ack on leaving the channel.
    monkeypatch.setattr("workers.ingest.ACK_DELAY_SECONDS", 3600.0)
    _purge_raw()
    plain = [(kind, json.dumps(event).encode()) for kind, event in _events("stop")]
    publish_plain(get_settings(), plain)
    wait_until(lambda: len(api_server.rows()) == len(STAYS))
    assert ingest.acks_waiting == len(plain)

    wait_until(lambda: _stopped(ingest), timeout=10)
    # Nothing went back to the queues to be delivered again.
    assert _left_in_raw_queues() == 0


def test_a_consumer_stopped_mid_stream_hands_back_only_what_it_did_not_process(
    api_server: ApiServer, ingest: PlainEventConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopping cancels the consumers, and messages that arrive while the
    # broker confirms that are still processed: they must be acked too.
    _purge_raw()
    processed = []
    process = ingest.process

    def counted(kind: EventKind, message: Any) -> None:
        process(kind, message)
        processed.append(kind)
        if len(processed) == 200:
            ingest.should_stop = True  # mid-stream, with messages in flight

    monkeypatch.setattr(ingest, "process", counted)
    entries = [
        (EventKind.ENTRY, json.dumps(event).encode())
        for event in (
            {"id": f"mid-{n}", "vehicle_plate": f"MID{n:05d}",
             "entry_date_time": "2024-09-11T21:00:00Z"}
            for n in range(1500)
        )
    ]  # fmt: skip
    publish_plain(get_settings(), entries)

    wait_until(lambda: _stopped(ingest), timeout=20)
    assert 200 <= len(processed) < len(entries)
    assert _left_in_raw_queues() == len(entries) - len(processed)


def test_ingest_hands_off_through_delayed_delivery_without_a_worker(
    ingest: PlainEventConsumer,
) -> None:
    # What a worker declares at start, gone: the consumer's own declaration
    # must make a countdown handoff reach its task queue.
    settings = get_settings()
    with Connection(settings.broker_connection_url) as connection:
        channel = connection.default_channel
        channel.exchange_delete("celery_delayed_delivery")
        for level in range(28):
            channel.exchange_delete(f"celery_delayed_{level}")
    ingest.should_stop = True
    wait_until(lambda: _stopped(ingest), timeout=10)

    consumer = PlainEventConsumer(
        Connection(settings.broker_connection_url), settings, {}, lambda *a: None
    )
    consumer.should_stop = False
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: _exchange_exists("celery_delayed_delivery"), timeout=10)
        entry = {"id": "handed", "vehicle_plate": "HND1",
                 "entry_date_time": "2024-09-11T21:00:00Z"}  # fmt: skip
        with Connection(settings.broker_connection_url) as connection:
            queue = topology.task_queues(settings)[0].bind(connection.default_channel)
            queue.purge()
            PROCESSORS[EventKind.ENTRY].apply_async((entry,), countdown=1)
            found: list[Any] = []

            def delivered() -> bool:
                found.append(queue.get(no_ack=True))
                return found[-1] is not None

            wait_until(delivered)
        assert found[-1].payload[0] == [entry]
    finally:
        consumer.should_stop = True
        thread.join(timeout=10)


def _exchange_exists(name: str) -> bool:
    with Connection(get_settings().broker_connection_url) as connection:
        channel = connection.channel()
        try:
            channel.exchange_declare(name, "topic", passive=True)
        except connection.channel_errors:  # 404: not there
            return False
        channel.close()
        return True
