"""Adversarial: bare JSON from cameras with odd message properties.

Cameras are not Celery: they label (or do not label) their messages as they
please. A valid event is applied whatever the label says; what cannot be
read is dead-lettered, counted and leaves the consumer running.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import amqp
import pytest
from kombu.connection import Connection
from prometheus_client import REGISTRY

from parking.events import EventKind
from parking.settings import get_settings
from tests.brokers import dead_letter_count, drain_dead_letters
from tests.services import ApiServer, wait_until
from tests.traffic import read_rows
from workers import runtime, topology
from workers.ingest import PlainEventConsumer

pytestmark = pytest.mark.integration


@pytest.fixture
def ingest(api_server: ApiServer) -> Iterator[list[tuple[EventKind, Any, int]]]:
    settings = get_settings()
    with Connection(settings.broker_connection_url) as connection:
        for kind in EventKind:
            queue = topology.raw_queue(settings, kind).bind(connection.default_channel)
            queue.declare()
            queue.purge()
    handlers = {
        EventKind.ENTRY: runtime.entry_processor(),
        EventKind.EXIT: runtime.exit_processor(),
    }
    handed: list[tuple[EventKind, Any, int]] = []
    with Connection(settings.broker_connection_url) as connection:
        consumer = PlainEventConsumer(
            connection, settings, handlers, lambda *a: handed.append(a)
        )
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        try:
            yield handed
        finally:
            consumer.should_stop = True
            thread.join(timeout=10)
    assert not thread.is_alive()


def _publish(kind: EventKind, body: bytes, **properties: Any) -> None:
    """Exactly these properties, as a plain AMQP client sends them (kombu's
    producer would fill in a content type and encoding of its own)."""
    settings = get_settings()
    with Connection(settings.broker_connection_url) as connection:
        channel = connection.default_channel
        channel.basic_publish(
            amqp.Message(body, delivery_mode=2, **properties),
            exchange="",
            routing_key=topology.raw_queue_name(settings, kind),
        )


def _event(kind: EventKind, tag: str, plate: str, at: str) -> dict[str, str]:
    return {"id": f"{tag}-{kind.value}", "vehicle_plate": plate,
            kind.time_field: at}  # fmt: skip


#: How the body is encoded and which properties label it.
LABELS: list[tuple[str, str, dict[str, Any]]] = [
    ("no-properties", "utf-8", {}),
    ("text-plain", "utf-8", {"content_type": "text/plain"}),
    ("octet-stream", "utf-8", {"content_type": "application/octet-stream"}),
    (
        "json-charset",
        "utf-8",
        {"content_type": "application/json; charset=utf-8"},
    ),
    (
        "utf-16-labelled",
        "utf-16",
        {"content_type": "application/json", "content_encoding": "utf-16"},
    ),
    ("utf-16-unlabelled", "utf-16", {}),
    ("bom-unlabelled", "utf-8-sig", {}),
    (
        "latin-1-labelled",
        "latin-1",
        {"content_type": "application/json", "content_encoding": "latin-1"},
    ),
    ("encoding-only", "utf-8", {"content_encoding": "utf-8"}),
]


def _rejected(reason: str) -> float:
    return sum(
        REGISTRY.get_sample_value(
            "parking_events_rejected_total", {"kind": kind, "reason": reason}
        )
        or 0.0
        for kind in ("entry", "exit")
    )


def test_valid_events_apply_whatever_their_labels_say(
    api_server: ApiServer, ingest: list[tuple[EventKind, Any, int]]
) -> None:
    plates = {}
    for n, (tag, encoding, properties) in enumerate(LABELS):
        plate = f"MÜN{n:03d}"
        plates[tag] = plate
        for kind, at in (
            (EventKind.EXIT, "2024-05-01T09:00:00Z"),
            (EventKind.ENTRY, "2024-05-01T08:00:00Z"),
        ):
            text = json.dumps(_event(kind, tag, plate, at), ensure_ascii=False)
            _publish(kind, text.encode(encoding), **properties)

    wait_until(lambda: len(read_rows(api_server.csv)) == len(LABELS), timeout=30)
    written = {row["vehicle_plate"] for row in read_rows(api_server.csv)}
    assert written == set(plates.values())


def test_a_byte_order_mark_is_accepted_however_the_body_is_labelled(
    api_server: ApiServer, ingest: list[tuple[EventKind, Any, int]]
) -> None:
    for kind, at in (
        (EventKind.ENTRY, "2024-05-01T08:00:00Z"),
        (EventKind.EXIT, "2024-05-01T09:00:00Z"),
    ):
        body = json.dumps(_event(kind, "bom", "BOM1", at)).encode("utf-8-sig")
        _publish(kind, body, content_type="application/json",
                 content_encoding="utf-8")  # fmt: skip
    wait_until(lambda: len(read_rows(api_server.csv)) == 1, timeout=10)


def test_huge_and_mislabelled_bodies_are_dead_lettered_and_ingest_goes_on(
    api_server: ApiServer, ingest: list[tuple[EventKind, Any, int]]
) -> None:
    drain_dead_letters(get_settings())
    too_large = _rejected("too_large")
    huge = _event(EventKind.ENTRY, "huge", "HUGE1", "2024-05-01T08:00:00Z")
    bad = [
        # Eight megabytes of a valid-looking event.
        (json.dumps(huge | {"pad": "x" * 8_000_000}).encode(), {}),
        (b"\x1f\x8b\x08\x00gzip?", {"content_encoding": "gzip"}),
        (b"", {}),
        (b"null", {"content_type": "application/json"}),
    ]
    for body, properties in bad:
        _publish(EventKind.ENTRY, body, **properties)
    good = [
        (EventKind.ENTRY, _event(EventKind.ENTRY, "after", "AFT1",
                                 "2024-05-01T08:00:00Z")),
        (EventKind.EXIT, _event(EventKind.EXIT, "after", "AFT1",
                                "2024-05-01T09:00:00Z")),
    ]  # fmt: skip
    for kind, event in good:
        _publish(kind, json.dumps(event).encode())

    wait_until(lambda: len(read_rows(api_server.csv)) == 1, timeout=30)
    assert _rejected("too_large") == too_large + 1
    # Every one of them is kept for review, and none is left for other tests.
    settings = get_settings()
    wait_until(lambda: dead_letter_count(settings) >= len(bad), timeout=30)
    assert len(drain_dead_letters(settings)) == len(bad)
