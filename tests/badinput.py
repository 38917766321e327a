"""The table of malformed messages, and how each one reaches the broker.

Shared by the in-process integration test and the end-to-end test against a
real worker process: the same cases, the same expected reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kombu.messaging import Producer

from parking.events import EventKind
from parking.settings import get_settings
from tests.traffic import T0, PlannedStay
from workers.tasks import PROCESSORS

JSON = "application/json"
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
    content_type: str = JSON
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


TABLE = [
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
TABLE_BY_ID = {case.message_id: case for case in TABLE}


def send(case: Bad, producer: Producer, exchange: Any) -> None:
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
        content_encoding="utf-8" if case.content_type == JSON else "binary",
        headers=headers,
        message_id=case.message_id,
        serializer=None,
    )


def good_stays(count: int) -> list[PlannedStay]:
    return [
        PlannedStay(
            f"GOOD{n:03d}",
            T0 + timedelta(hours=n),
            T0 + timedelta(hours=n, minutes=n + 1, microseconds=n),
        )
        for n in range(count)
    ]
