"""Car parks from the settings: names, capacities, tariffs, and unknown lots."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from parking.errors import InvalidEvent
from parking.lots import lots_from_settings
from parking.settings import Settings
from parking.tariff import Tariff


def test_by_default_there_is_one_car_park_with_the_default_tariff() -> None:
    lots = lots_from_settings(Settings())

    assert lots.names == ("main",)
    assert lots.default == "main"
    assert lots["main"].capacity == 1000
    assert lots["main"].tariff == Tariff()


def test_lots_and_their_tariffs_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PARKING_LOTS", '{"main": 500, "north": 40}')
    monkeypatch.setenv("PARKING_TARIFF_PRICE_PER_PERIOD", "2.50")
    monkeypatch.setenv(
        "PARKING_LOT_TARIFFS",
        '{"north": {"free_minutes": 0, "daily_cap": "12.00", "currency": "NZD"}}',
    )

    lots = lots_from_settings(Settings())

    assert lots.names == ("main", "north")
    assert lots["north"].capacity == 40
    assert lots["main"].tariff.price_per_period == Decimal("2.50")
    assert lots["north"].tariff == Tariff(
        free=timedelta(0),
        period=timedelta(hours=1),
        price_per_period=Decimal("2.50"),
        daily_cap=Decimal("12.00"),
        currency="NZD",
    )


def test_an_event_naming_a_car_park_not_configured_is_bad_input() -> None:
    lots = lots_from_settings(Settings())

    with pytest.raises(InvalidEvent) as caught:
        lots["south"]

    assert caught.value.reason == "unknown_lot"
    assert "south" in caught.value.detail


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        pytest.param({"lots": {}}, "at least one", id="no-lots"),
        pytest.param({"lots": {"a:b": 5}}, "lot name", id="colon-in-name"),
        pytest.param({"lots": {"{b1}": 5}}, "lot name", id="hash-tag-in-name"),
        pytest.param({"lots": {"main": 0}}, "at least one vehicle", id="no-room"),
        pytest.param({"default_lot": "north"}, "default_lot", id="default-unknown"),
        pytest.param(
            {"lot_tariffs": {"north": {"daily_cap": "1"}}},
            "not in lots",
            id="tariff-for-unknown-lot",
        ),
        pytest.param(
            {"lot_tariffs": {"main": {"price": "1"}}},
            "price",
            id="tariff-unknown-field",
        ),
        pytest.param({"tariff_currency": "aud"}, "tariff_currency", id="currency"),
        pytest.param(
            {"tariff_price_per_period": "-1"}, "tariff_price_per_period", id="negative"
        ),
    ],
)
def test_settings_refuse_car_parks_that_cannot_work(
    fields: dict[str, object], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings(**fields)  # type: ignore[arg-type]
