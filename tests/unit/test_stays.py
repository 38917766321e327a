"""Stays: the matched pair of reads, its stable id and its exact duration."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from parking.events import EventKind, parse_event
from parking.stays import Match, Stay, Visit, format_seconds
from parking.tariff import Tariff

ENTERED = datetime(2024, 9, 11, 21, 24, 56, 123456, tzinfo=UTC)


def _visit(event_id: str, at: datetime, plate: str = "ab-123") -> Visit:
    return Visit(event_id=event_id, plate=plate, at=at)


def test_a_stay_runs_from_entry_to_exit() -> None:
    stay = Stay.between(
        _visit("e1", ENTERED), _visit("x1", ENTERED + timedelta(minutes=26, seconds=42))
    )

    assert stay.entry_at == ENTERED
    assert stay.exit_at == ENTERED + timedelta(minutes=26, seconds=42)
    assert stay.duration == timedelta(seconds=1602)
    assert stay.clock_skew is False


def test_the_plate_is_shown_as_the_entry_camera_read_it() -> None:
    stay = Stay.between(
        _visit("e1", ENTERED, plate="ab-123"),
        _visit("x1", ENTERED + timedelta(hours=1), plate="AB 123"),
    )

    assert stay.plate == "ab-123"


def test_the_stay_id_is_stable_for_the_same_pair_of_events() -> None:
    exited = ENTERED + timedelta(hours=1)

    first = Stay.between(_visit("e1", ENTERED), _visit("x1", exited))
    again = Stay.between(_visit("e1", ENTERED), _visit("x1", exited))

    assert first.stay_id == again.stay_id
    assert uuid.UUID(first.stay_id).version == 5


@pytest.mark.parametrize(
    ("entry_id", "exit_id"),
    [
        pytest.param("e2", "x1", id="other-entry"),
        pytest.param("e1", "x2", id="other-exit"),
        pytest.param("x1", "e1", id="swapped"),
        pytest.param("e", "1x1", id="concatenation-ambiguous"),
    ],
)
def test_a_different_pair_of_events_gets_a_different_stay_id(
    entry_id: str, exit_id: str
) -> None:
    exited = ENTERED + timedelta(hours=1)
    reference = Stay.between(_visit("e1", ENTERED), _visit("x1", exited))

    other = Stay.between(_visit(entry_id, ENTERED), _visit(exit_id, exited))

    assert other.stay_id != reference.stay_id


def test_the_stay_id_does_not_depend_on_times_or_plate_text() -> None:
    # A redelivered exit may carry the same ids with a re-rendered time.
    one = Stay.between(_visit("e1", ENTERED), _visit("x1", ENTERED + timedelta(1)))
    two = Stay.between(
        _visit("e1", ENTERED, plate="AB 123"), _visit("x1", ENTERED + timedelta(2))
    )

    assert one.stay_id == two.stay_id


@pytest.mark.parametrize(
    "skew",
    [
        pytest.param(timedelta(microseconds=1), id="one-microsecond"),
        pytest.param(timedelta(seconds=1), id="one-second"),
        pytest.param(timedelta(minutes=2), id="two-minutes"),
    ],
)
def test_an_exit_stamped_before_its_entry_is_clamped_to_zero(skew: timedelta) -> None:
    stay = Stay.between(_visit("e1", ENTERED), _visit("x1", ENTERED - skew))

    assert stay.exit_at == ENTERED
    assert stay.duration == timedelta(0)
    assert stay.clock_skew is True
    assert stay.to_json()["duration_seconds"] == "0"


def test_an_exit_at_the_same_instant_is_not_skew() -> None:
    stay = Stay.between(_visit("e1", ENTERED), _visit("x1", ENTERED))

    assert stay.duration == timedelta(0)
    assert stay.clock_skew is False


def test_the_summary_json_is_exact_and_valid_wire_times() -> None:
    exited = datetime(2024, 9, 11, 21, 24, 57, tzinfo=UTC)
    stay = Stay.between(_visit("e1", ENTERED), _visit("x1", exited))

    body = stay.to_json()

    assert body == {
        "stay_id": stay.stay_id,
        "lot_id": "main",
        "vehicle_plate": "ab-123",
        "entry_date_time": "2024-09-11T21:24:56.123456Z",
        "exit_date_time": "2024-09-11T21:24:57Z",
        "duration_seconds": "0.876544",
        "fee": "0.00",
        "currency": "AUD",
        "match": "exact",
        "clock_skew": False,
    }
    entry = {
        "id": "e1",
        "vehicle_plate": "P1",
        "entry_date_time": body["entry_date_time"],
    }
    assert parse_event(entry, EventKind.ENTRY).at == ENTERED


AIRPORT = Tariff(
    free=timedelta(minutes=10),
    period=timedelta(minutes=30),
    price_per_period=Decimal("2.50"),
    daily_cap=Decimal("40.00"),
    currency="EUR",
)


def test_a_stay_is_priced_by_its_car_parks_tariff() -> None:
    entry = Visit("e1", "ab-123", ENTERED, lot_id="airport")
    exit_ = Visit("x1", "AB 123", ENTERED + timedelta(minutes=61))

    stay = Stay.between(entry, exit_, AIRPORT)

    assert (stay.fee, stay.currency, stay.lot_id) == (Decimal("7.50"), "EUR", "airport")
    assert stay.to_json()["fee"] == "7.50"
    assert stay.to_json()["lot_id"] == "airport"


def test_a_clamped_stay_costs_what_a_zero_length_stay_costs() -> None:
    no_free_time = Tariff(free=timedelta(0), price_per_period=Decimal("3.00"))

    stay = Stay.between(
        _visit("e1", ENTERED),
        _visit("x1", ENTERED - timedelta(seconds=30)),
        no_free_time,
    )

    assert stay.clock_skew is True
    assert stay.fee == Decimal("0.00")


def test_a_fuzzy_match_is_flagged_and_keeps_the_entry_plate() -> None:
    stay = Stay.between(
        _visit("e1", ENTERED, plate="ABC1234"),
        _visit("x1", ENTERED + timedelta(hours=1), plate="A8C1234"),
        match=Match.FUZZY,
    )

    assert stay.plate == "ABC1234"
    assert stay.to_json()["match"] == "fuzzy"


def test_a_stay_across_a_daylight_saving_change_counts_true_elapsed_time() -> None:
    # Melbourne, 2019-04-07: clocks went back from 03:00 AEDT to 02:00 AEST.
    entry = parse_event(
        {
            "id": "e",
            "vehicle_plate": "P",
            "entry_date_time": "2019-04-07T02:00:09+11:00",
        },
        EventKind.ENTRY,
    )
    exit_ = parse_event(
        {
            "id": "x",
            "vehicle_plate": "P",
            "exit_date_time": "2019-04-07T04:52:07+10:00",
        },
        EventKind.EXIT,
    )

    stay = Stay.between(_visit("e", entry.at), _visit("x", exit_.at))

    assert stay.duration == timedelta(hours=3, minutes=51, seconds=58)
    assert stay.to_json()["duration_seconds"] == "13918"


@pytest.mark.parametrize(
    ("span", "text"),
    [
        pytest.param(timedelta(0), "0", id="zero"),
        pytest.param(timedelta(seconds=1602), "1602", id="whole"),
        pytest.param(
            timedelta(seconds=1602, microseconds=250000), "1602.25", id="quarter"
        ),
        pytest.param(timedelta(microseconds=1), "0.000001", id="one-microsecond"),
        pytest.param(
            timedelta(microseconds=10), "0.00001", id="trailing-zeros-dropped"
        ),
        pytest.param(timedelta(microseconds=999999), "0.999999", id="just-under-one"),
        pytest.param(timedelta(days=3, seconds=7), "259207", id="days"),
        pytest.param(
            timedelta(days=36500, microseconds=1),
            "3153600000.000001",
            id="century-exact",
        ),
        pytest.param(timedelta(seconds=-1, microseconds=500000), "-0.5", id="negative"),
        pytest.param(timedelta(seconds=-90), "-90", id="negative-whole"),
    ],
)
def test_format_seconds_is_exact_decimal_text(span: timedelta, text: str) -> None:
    assert format_seconds(span) == text
    assert Decimal(text) * 1_000_000 == span // timedelta(microseconds=1)
