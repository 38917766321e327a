"""The wire format: what is accepted, what is refused, and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from parking.errors import InvalidEvent
from parking.events import (
    MAX_MESSAGE_BYTES,
    CameraEvent,
    EventKind,
    format_time,
    parse_event,
    parse_time,
)


def _entry(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "e-1",
        "vehicle_plate": "AB-123",
        "entry_date_time": "2024-09-11T21:24:56Z",
    }
    event.update(fields)
    return event


def _rejected(payload: object, kind: EventKind = EventKind.ENTRY) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(payload, kind)
    return caught.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "2024-09-11T21:24:56Z",
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            id="zulu",
        ),
        pytest.param(
            "2024-09-11t21:24:56z",
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            id="lower-case-t-and-z",
        ),
        pytest.param(
            "2024-09-11 21:24:56Z",
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            id="space-separator",
        ),
        pytest.param(
            "2024-09-11T23:24:56+02:00",
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            id="positive-offset",
        ),
        pytest.param(
            "2024-09-11T16:54:56-04:30",
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            id="negative-half-hour-offset",
        ),
        pytest.param(
            "2024-09-12T00:24:56+03:00",
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            id="offset-crosses-midnight",
        ),
        pytest.param(
            "2024-09-11T21:24:56-00:00",
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            id="minus-zero-offset",
        ),
        pytest.param(
            "2024-09-11T21:24:56.123456789Z",
            datetime(2024, 9, 11, 21, 24, 56, 123456, tzinfo=UTC),
            id="nanoseconds-kept-to-microseconds",
        ),
        pytest.param(
            "2024-09-11T21:24:56.999999999Z",
            datetime(2024, 9, 11, 21, 24, 56, 999999, tzinfo=UTC),
            id="nanoseconds-truncated-not-rounded",
        ),
        pytest.param(
            "2024-09-11T21:24:56.5Z",
            datetime(2024, 9, 11, 21, 24, 56, 500000, tzinfo=UTC),
            id="one-digit-fraction",
        ),
        pytest.param(
            "2019-04-07T02:00:09+11:00",
            datetime(2019, 4, 6, 15, 0, 9, tzinfo=UTC),
            id="historical-daylight-saving-offset",
        ),
        pytest.param(
            "1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC), id="epoch"
        ),
    ],
)
def test_times_with_an_offset_become_utc(text: str, expected: datetime) -> None:
    parsed = parse_time(text, "entry_date_time")

    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param("2024-09-11T21:24:56", "naive_time", id="naive"),
        pytest.param("2024-09-11T21:24:56.123456789", "naive_time", id="naive-nanos"),
        pytest.param("2024-09-11", "bad_time", id="date-only"),
        pytest.param("21:24:56Z", "bad_time", id="time-only"),
        pytest.param("2024-09-11T21:24Z", "bad_time", id="no-seconds"),
        pytest.param("2024-02-30T00:00:00Z", "bad_time", id="february-30"),
        pytest.param("2024-09-11T24:00:00Z", "bad_time", id="hour-24"),
        pytest.param("2024-09-11T23:59:60Z", "bad_time", id="leap-second"),
        pytest.param("2024-09-11T21:24:56+24:00", "bad_time", id="offset-24h"),
        pytest.param("2024-09-11T21:24:56+01:60", "bad_time", id="offset-minute-60"),
        pytest.param("2024-09-11T21:24:56+0100", "bad_time", id="offset-no-colon"),
        pytest.param("2024-09-11T21:24:56.Z", "bad_time", id="empty-fraction"),
        pytest.param(
            "2024-09-11T21:24:56.1234567891Z", "bad_time", id="fraction-over-nanos"
        ),
        pytest.param(
            "\uff12\uff10\uff12\uff14-09-11T21:24:56Z",
            "bad_time",
            id="full-width-digits",
        ),
        pytest.param("2024-09-11T21:24:56Z\n", "bad_time", id="trailing-newline"),
        pytest.param(" 2024-09-11T21:24:56Z", "bad_time", id="leading-space"),
        pytest.param("", "bad_time", id="empty"),
        pytest.param(1726089896, "bad_time", id="unix-number"),
        pytest.param(None, "bad_time", id="null"),
        pytest.param("0001-01-01T00:00:00Z", "time_out_of_range", id="year-1"),
        pytest.param("1969-12-31T23:59:59Z", "time_out_of_range", id="before-1970"),
        pytest.param("9999-12-31T23:59:59Z", "time_out_of_range", id="year-9999"),
        pytest.param("9999-12-31T23:59:59-01:00", "bad_time", id="beyond-datetime"),
        pytest.param("0000-01-01T00:00:00Z", "bad_time", id="year-0"),
    ],
)
def test_bad_times_are_refused_naming_the_field(value: object, reason: str) -> None:
    rejected = _rejected(_entry(entry_date_time=value))

    assert rejected.reason == reason
    assert "entry_date_time" in str(rejected)


def test_a_valid_entry_is_parsed_with_display_and_matching_plates() -> None:
    event = parse_event(_entry(vehicle_plate=" ab-123 "), EventKind.ENTRY)

    assert event == CameraEvent(
        kind=EventKind.ENTRY,
        id="e-1",
        plate="ab-123",
        plate_key="AB123",
        at=datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
    )


def test_an_exit_reads_its_own_time_field() -> None:
    payload = {
        "id": "x",
        "vehicle_plate": "AB1",
        "exit_date_time": "2024-09-11T21:24:56Z",
    }

    event = parse_event(payload, EventKind.EXIT)

    assert event.kind is EventKind.EXIT
    assert event.at == datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC)


def test_an_exit_with_only_an_entry_time_is_missing_its_field() -> None:
    rejected = _rejected(_entry(), EventKind.EXIT)

    assert rejected.reason == "missing_field"
    assert "exit_date_time" in str(rejected)


def test_extra_unknown_fields_are_accepted() -> None:
    payload = _entry(bay="4366", camera={"gate": 3}, confidence=0.93, tags=[1, 2])

    event = parse_event(payload, EventKind.ENTRY)

    assert event.id == "e-1"
    assert event.plate == "AB-123"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(json.dumps(_entry()), id="str"),
        pytest.param(json.dumps(_entry()).encode(), id="bytes"),
        pytest.param(bytearray(json.dumps(_entry()).encode()), id="bytearray"),
    ],
)
def test_raw_json_is_decoded_before_validation(raw: str | bytes) -> None:
    assert parse_event(raw, EventKind.ENTRY) == parse_event(_entry(), EventKind.ENTRY)


def test_non_ascii_plate_survives_a_json_round_trip() -> None:
    raw = json.dumps(_entry(vehicle_plate="京A12345"), ensure_ascii=False).encode()

    assert parse_event(raw, EventKind.ENTRY).plate == "京A12345"


@pytest.mark.parametrize(
    ("fields", "reason", "field"),
    [
        pytest.param({"id": 17}, "bad_id", "id", id="id-int"),
        pytest.param({"id": None}, "bad_id", "id", id="id-null"),
        pytest.param({"id": ["e-1"]}, "bad_id", "id", id="id-list"),
        pytest.param({"id": True}, "bad_id", "id", id="id-bool"),
        pytest.param({"id": ""}, "bad_id", "id", id="id-empty"),
        pytest.param({"id": "   "}, "bad_id", "id", id="id-blank"),
        pytest.param({"id": "x" * 129}, "bad_id", "id", id="id-over-long"),
        pytest.param({"id": "e\x001"}, "bad_id", "id", id="id-nul"),
        pytest.param({"id": "e\n1"}, "bad_id", "id", id="id-newline"),
        pytest.param({"id": "e\x1b[31m"}, "bad_id", "id", id="id-ansi-escape"),
        pytest.param(
            {"vehicle_plate": ""}, "bad_plate", "vehicle_plate", id="plate-empty"
        ),
        pytest.param(
            {"vehicle_plate": " - "},
            "bad_plate",
            "vehicle_plate",
            id="plate-separators",
        ),
        pytest.param(
            {"vehicle_plate": "A" * 17},
            "bad_plate",
            "vehicle_plate",
            id="plate-17-chars",
        ),
        pytest.param(
            {"vehicle_plate": "A" * 1_000_000},
            "bad_plate",
            "vehicle_plate",
            id="plate-1mb-already-decoded",
        ),
        pytest.param(
            {"vehicle_plate": 123456}, "bad_plate", "vehicle_plate", id="plate-number"
        ),
        pytest.param(
            {"vehicle_plate": None}, "bad_plate", "vehicle_plate", id="plate-null"
        ),
        pytest.param(
            {"vehicle_plate": "AB\x00123"}, "bad_plate", "vehicle_plate", id="plate-nul"
        ),
        pytest.param(
            {"vehicle_plate": "AB\t123"}, "bad_plate", "vehicle_plate", id="plate-tab"
        ),
        pytest.param(
            {"vehicle_plate": "AB\r\n123"},
            "bad_plate",
            "vehicle_plate",
            id="plate-crlf",
        ),
        pytest.param(
            {"vehicle_plate": "AB\u200b123"},
            "bad_plate",
            "vehicle_plate",
            id="plate-zero-width-space",
        ),
        pytest.param(
            {"vehicle_plate": '=HYPERLINK("http://x","y")'},
            "bad_plate",
            "vehicle_plate",
            id="plate-formula",
        ),
    ],
)
def test_bad_fields_are_refused_with_a_reason_naming_the_field(
    fields: dict[str, Any], reason: str, field: str
) -> None:
    rejected = _rejected(_entry(**fields))

    assert rejected.reason == reason
    assert field in rejected.detail
    assert str(rejected).startswith(f"{reason}: ")


@pytest.mark.parametrize("field", ["id", "vehicle_plate", "entry_date_time"])
def test_a_missing_field_is_named(field: str) -> None:
    payload = _entry()
    del payload[field]

    rejected = _rejected(payload)

    assert rejected.reason == "missing_field"
    assert rejected.detail == f"{field} is missing"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param("{", "bad_json", id="truncated-json"),
        pytest.param("", "bad_json", id="empty-string"),
        pytest.param(b"\xff\xfe{}", "bad_json", id="utf16-bom-garbage"),
        pytest.param(b'{"id": "\xc3\x28"}', "bad_encoding", id="invalid-utf8"),
        pytest.param("[1, 2]", "not_an_object", id="json-array"),
        pytest.param('"text"', "not_an_object", id="json-string"),
        pytest.param("null", "not_an_object", id="json-null"),
        pytest.param(42, "not_an_object", id="python-int"),
        pytest.param(None, "not_an_object", id="python-none"),
        pytest.param(["id"], "not_an_object", id="python-list"),
        pytest.param(b" " * (MAX_MESSAGE_BYTES + 1), "too_large", id="over-size-bytes"),
        pytest.param(
            json.dumps(_entry(vehicle_plate="A" * MAX_MESSAGE_BYTES)),
            "too_large",
            id="over-size-str",
        ),
        pytest.param("9" * 5000, "bad_json", id="huge-integer"),
    ],
)
def test_undecodable_messages_are_refused(payload: object, reason: str) -> None:
    assert _rejected(payload).reason == reason


@pytest.mark.parametrize(
    ("at", "text"),
    [
        pytest.param(
            datetime(2024, 9, 11, 21, 24, 56, tzinfo=UTC),
            "2024-09-11T21:24:56Z",
            id="whole-second",
        ),
        pytest.param(
            datetime(2024, 9, 11, 21, 24, 56, 123456, tzinfo=UTC),
            "2024-09-11T21:24:56.123456Z",
            id="microseconds",
        ),
    ],
)
def test_format_time_round_trips(at: datetime, text: str) -> None:
    assert format_time(at) == text
    assert parse_time(text, "t") == at


def test_to_wire_is_accepted_by_parse_event() -> None:
    event = parse_event(
        _entry(entry_date_time="2024-09-11T23:24:56.5+02:00"), EventKind.ENTRY
    )

    wire = event.to_wire()

    assert wire == {
        "id": "e-1",
        "vehicle_plate": "AB-123",
        "entry_date_time": "2024-09-11T21:24:56.500000Z",
        "lot_id": "main",
    }
    assert parse_event(wire, EventKind.ENTRY) == event


@pytest.mark.parametrize(
    ("payload", "default", "lot"),
    [
        pytest.param({}, "main", "main", id="absent-default"),
        pytest.param({"lot_id": None}, "north", "north", id="null-configured-default"),
        pytest.param({"lot_id": "airport"}, "main", "airport", id="given"),
    ],
)
def test_the_lot_is_optional_and_defaults_to_the_given_one(
    payload: dict[str, Any], default: str, lot: str
) -> None:
    event = parse_event({**_entry(), **payload}, EventKind.ENTRY, default_lot=default)

    assert event.lot_id == lot


@pytest.mark.parametrize(
    "lot",
    [
        pytest.param("", id="empty"),
        pytest.param("  ", id="blank"),
        pytest.param(12, id="number"),
        pytest.param("a\nb", id="not-printable"),
        pytest.param("L" * 129, id="too-long"),
    ],
)
def test_a_malformed_lot_is_bad_lot(lot: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event({**_entry(), "lot_id": lot}, EventKind.ENTRY)

    assert caught.value.reason == "bad_lot"
