"""Bad input through the real broker: every message dead-lettered and counted.

Each malformed message goes to the real queues, either as a Celery task
argument (what another producer of our tasks could send) or as a raw AMQP
body (broken JSON, invalid UTF-8, foreign content types, envelopes Celery
cannot read). Good stays travel around them; the worker must write all of
those and keep running.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.messaging import Producer
from prometheus_client import REGISTRY

from parking.events import EventKind
from parking.settings import get_settings
from tests.brokers import dead_letter_count, drain_dead_letters
from tests.services import ApiServer, wait_until
from tests.traffic import T0, PlannedStay, check_ledger, read_rows
from workers import topology
from workers.tasks import PROCESSORS


@pytest.fixture(scope="module")
def embedded_worker(
    celery_app: Celery, celery_worker_parameters: dict[str, Any]
) -> Iterator[Any]:
    """One embedded worker for the whole module: each stop costs seconds."""
    with start_worker(celery_app, pool="solo", **celery_worker_parameters) as worker:
        yield worker


_JSON = "application/json"
#: Marks a field that the malformed event lacks.
_DROP = object()
_GOOD = {
    "id": "template",
    "vehicle_plate": "AB123",
    "entry_date_time": "2024-03-01T08:00:00Z",
}


def _entry(**changes: Any) -> dict[str, Any]:
    event = dict(_GOOD)
    for name, value in changes.items():
        if value is _DROP:
            del event[name]
        else:
            event[name] = value
    return event


@dataclass(frozen=True)
class Bad:
    """One malformed message and the reason it must be refused with."""

    name: str
    reason: str
    #: A task argument, sent with ``process_<kind>.apply_async``.
    payload: Any = None
    #: Or a raw AMQP body, published to the task queue as it is.
    raw: bytes | None = None
    content_type: str = _JSON
    #: Raw bodies: with Celery's task headers, or bare as a camera sends.
    envelope: bool = True
    #: The envelope's task name, when it is not the kind's own task.
    task: str | None = None
    #: Whether the envelope carries the task id header Celery requires.
    with_id: bool = True
    kind: str = "entry"

    @property
    def message_id(self) -> str:
        return f"bad-{self.name}"


_TABLE = [
    # missing fields
    Bad("missing_id", "missing_field", _entry(id=_DROP)),
    Bad("missing_plate", "missing_field", _entry(vehicle_plate=_DROP)),
    Bad("missing_time", "missing_field", _entry(entry_date_time=_DROP)),
    Bad("exit_with_entry_time", "missing_field", _entry(), kind="exit"),
    # wrong types and bad ids
    Bad("id_number", "bad_id", _entry(id=12345)),
    Bad("id_empty", "bad_id", _entry(id="")),
    Bad("id_blank", "bad_id", _entry(id="   ")),
    Bad("id_too_long", "bad_id", _entry(id="x" * 129)),
    Bad("id_control_characters", "bad_id", _entry(id="ab\ncd\x1b[2J")),
    # plates
    Bad("plate_number", "bad_plate", _entry(vehicle_plate=12345)),
    Bad("plate_null", "bad_plate", _entry(vehicle_plate=None)),
    Bad("plate_list", "bad_plate", _entry(vehicle_plate=["AB", "123"])),
    Bad("plate_object", "bad_plate", _entry(vehicle_plate={"text": "AB123"})),
    Bad("plate_empty", "bad_plate", _entry(vehicle_plate="")),
    Bad("plate_dashes_only", "bad_plate", _entry(vehicle_plate=" -- ")),
    Bad("plate_one_megabyte", "bad_plate", _entry(vehicle_plate="A" * 1_048_576)),
    Bad("plate_control_characters", "bad_plate", _entry(vehicle_plate="AB\x00\x07")),
    Bad(
        "plate_hyperlink_formula",
        "bad_plate",
        _entry(vehicle_plate='=HYPERLINK("http://evil.example","pay")'),
    ),
    Bad("plate_plus_formula", "bad_plate", _entry(vehicle_plate="+SUM(A1:A9)")),
    Bad("plate_at_formula", "bad_plate", _entry(vehicle_plate="@cmd")),
    Bad("plate_leading_tab", "bad_plate", _entry(vehicle_plate="\tAB123")),
    Bad("plate_carriage_return", "bad_plate", _entry(vehicle_plate="AB\r123")),
    # times
    Bad("time_naive", "naive_time", _entry(entry_date_time="2024-03-01T08:00:00")),
    Bad("time_feb_30", "bad_time", _entry(entry_date_time="2024-02-30T08:00:00Z")),
    Bad("time_month_13", "bad_time", _entry(entry_date_time="2024-13-01T08:00:00Z")),
    Bad("time_hour_25", "bad_time", _entry(entry_date_time="2024-03-01T25:00:00Z")),
    Bad("time_leap_second", "bad_time", _entry(entry_date_time="2016-12-31T23:59:60Z")),
    Bad(
        "time_offset_25h",
        "bad_time",
        _entry(entry_date_time="2024-03-01T08:00:00+25:00"),
    ),
    Bad(
        "time_year_1",
        "time_out_of_range",
        _entry(entry_date_time="0001-01-01T00:00:00Z"),
    ),
    Bad(
        "time_year_9999",
        "time_out_of_range",
        _entry(entry_date_time="9999-12-31T23:59:59Z"),
    ),
    Bad("time_epoch_number", "bad_time", _entry(entry_date_time=1709280000)),
    Bad("time_words", "bad_time", _entry(entry_date_time="yesterday at noon")),
    Bad(
        "time_trailing_garbage",
        "bad_time",
        _entry(entry_date_time="2024-03-01T08:00:00Zjunk"),
    ),
    Bad(
        "time_fullwidth_digits",
        "bad_time",
        _entry(entry_date_time="\uff12\uff10\uff12\uff14-03-01T08:00:00Z"),
    ),
    # not an event at all
    Bad("list_payload", "not_an_object", [1, 2, 3]),
    Bad("null_payload", "not_an_object", None),
    Bad("number_payload", "not_an_object", 42),
    Bad("string_broken_json", "bad_json", '{"id": "x", "vehicle_plate": '),
    Bad("string_too_large", "too_large", '{"id": "' + "x" * 20_000 + '"}'),
    Bad("string_nested_too_deep", "bad_json", "[" * 10_000),
    # raw bodies with a Celery envelope
    Bad("raw_broken_json", "bad_json", raw=b'[[{"id": "x", '),
    Bad("raw_invalid_utf8", "bad_encoding", raw=b'[["\xff\xfe"], {}, {}]'),
    Bad(
        "raw_pickle",
        "bad_content_type",
        raw=b"\x80\x04N.",
        content_type="application/x-python-serialize",
    ),
    Bad("raw_unknown_task", "unknown_task", raw=b"[[], {}, {}]", task="parking.nope"),
    Bad("raw_no_task_id", "malformed_task", raw=b"[[{}], {}, {}]", with_id=False),
    Bad("raw_body_not_a_triple", "malformed_task", raw=b'{"a": 1}'),
    Bad("raw_empty_body", "malformed_task", raw=b""),
    # raw bodies as a camera would publish them, without an envelope
    Bad("bare_broken_json", "bad_json", raw=b'{"id": ', envelope=False),
    Bad("bare_invalid_utf8", "bad_encoding", raw=b'{"id": "\xc3\x28"}', envelope=False),
    Bad("bare_nested_too_deep", "bad_json", raw=b"[" * 100_000, envelope=False),
    Bad(
        "bare_octet_stream",
        "bad_content_type",
        raw=b"\x00\x01\x02",
        content_type="application/octet-stream",
        envelope=False,
    ),
    Bad(
        "bare_event_on_task_queue",
        "not_a_task",
        raw=b'{"id": "c1", "vehicle_plate": "AB1", '
        b'"entry_date_time": "2024-03-01T08:00:00Z"}',
        envelope=False,
    ),
]
_TABLE_BY_ID = {case.message_id: case for case in _TABLE}


def _send(case: Bad, producer: Producer, exchange: Any) -> None:
    settings = get_settings()
    kind = EventKind(case.kind)
    if case.raw is None:
        PROCESSORS[kind].apply_async((case.payload,), task_id=case.message_id)
        return
    headers: dict[str, Any] = {}
    if case.envelope:
        headers = {"task": case.task or PROCESSORS[kind].name}
        if case.with_id:
            headers["id"] = case.message_id
    producer.publish(
        case.raw,
        exchange=exchange,
        routing_key=settings.queue(kind.value),
        content_type=case.content_type,
        content_encoding="utf-8" if case.content_type == _JSON else "binary",
        headers=headers,
        message_id=case.message_id,
        serializer=None,
    )


def _rejected(kind: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "parking_events_rejected_total", {"kind": kind, "reason": reason}
    )
    return value or 0.0


def _good_stays(count: int) -> list[PlannedStay]:
    return [
        PlannedStay(
            f"GOOD{n:03d}",
            T0 + timedelta(hours=n),
            T0 + timedelta(hours=n, minutes=n + 1, microseconds=n),
        )
        for n in range(count)
    ]


def test_the_table_has_enough_cases() -> None:
    assert len(_TABLE) >= 30
    assert len(_TABLE_BY_ID) == len(_TABLE), "case names must be unique"


def test_every_malformed_message_is_dead_lettered_counted_and_logged(
    api_server: ApiServer,
    embedded_worker: Any,
    celery_app: Celery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    settings = get_settings()
    drain_dead_letters(settings)
    expected = Counter((case.kind, case.reason) for case in _TABLE)
    before = {key: _rejected(*key) for key in expected}
    good = _good_stays(len(_TABLE) // 2 + 1)

    with celery_app.connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        exchange = topology.task_exchange(settings)
        # Good stays before, between and after the bad messages; every other
        # one carries fields the wire format does not name.
        for n, stay in enumerate(good):
            extra = {"camera": "gate-3", "confidence": 0.93} if n % 2 else {}
            PROCESSORS[EventKind.ENTRY].delay({**stay.entry, **extra})
            PROCESSORS[EventKind.EXIT].delay({**stay.exit, **extra, "lane": [1, 2]})
            for case in _TABLE[2 * n : 2 * n + 2]:
                _send(case, producer, exchange)

    wait_until(lambda: dead_letter_count(settings) >= len(_TABLE), timeout=60)
    wait_until(lambda: len(read_rows(api_server.csv)) >= len(good), timeout=30)

    dead = drain_dead_letters(settings)
    dead_ids = Counter(
        (message.headers or {}).get("id") or message.properties.get("message_id")
        for message in dead
    )
    assert dead_ids == Counter(_TABLE_BY_ID.keys()), (
        "each case dead-lettered exactly once"
    )
    reasons = {
        ((m.headers or {}).get("x-death") or [{}])[0].get("reason") for m in dead
    }
    assert reasons == {"rejected"}

    counted = {key: _rejected(*key) - before[key] for key in expected}
    assert counted == {key: float(n) for key, n in expected.items()}

    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    silent = [
        case.name
        for case in _TABLE
        if not any(
            f"id={case.message_id} " in line and f"reason={case.reason}" in line
            for line in logged
        )
    ]
    assert not silent, f"no log line names the problem for: {silent}"
    # A line is for a person: never the megabyte plate itself.
    assert max(len(line) for line in logged) < 2_000

    check = check_ledger(read_rows(api_server.csv), good)
    assert check.exact, str(check)


def test_a_task_that_fails_unexpectedly_is_dead_lettered_not_acked(
    api_server: ApiServer, embedded_worker: Any, celery_app: Celery
) -> None:
    """A body Celery can read but the task cannot take (no event argument)."""
    settings = get_settings()
    drain_dead_letters(settings)
    with celery_app.connection_for_write() as conn:
        Producer(conn.default_channel).publish(
            b"[[], {}, {}]",
            exchange=topology.task_exchange(settings),
            routing_key=settings.queue("exit"),
            content_type=_JSON,
            content_encoding="utf-8",
            headers={"task": "parking.process_exit", "id": "no-arguments"},
            serializer=None,
        )
    stay = _good_stays(1)[0]
    PROCESSORS[EventKind.ENTRY].delay(stay.entry)
    PROCESSORS[EventKind.EXIT].delay(stay.exit)

    wait_until(lambda: dead_letter_count(settings) >= 1, timeout=30)
    wait_until(lambda: len(read_rows(api_server.csv)) >= 1, timeout=30)
    dead = drain_dead_letters(settings)
    assert [(m.headers or {}).get("id") for m in dead] == ["no-arguments"]
    assert check_ledger(read_rows(api_server.csv), [stay]).exact
