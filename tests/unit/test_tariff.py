from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from parking.tariff import Tariff

TARIFF = Tariff(
    free=timedelta(minutes=15),
    period=timedelta(hours=1),
    price_per_period=Decimal("3.00"),
    daily_cap=Decimal("20.00"),
)


@pytest.mark.parametrize(
    ("duration", "fee"),
    [
        pytest.param(timedelta(0), "0.00", id="zero-length"),
        pytest.param(timedelta(minutes=15), "0.00", id="exactly-free"),
        pytest.param(
            timedelta(minutes=15, seconds=1), "3.00", id="one-second-over-free"
        ),
        pytest.param(timedelta(hours=1), "3.00", id="exactly-one-period"),
        pytest.param(
            timedelta(hours=1, seconds=1), "6.00", id="one-second-over-period"
        ),
        pytest.param(timedelta(hours=6), "18.00", id="just-under-cap"),
        pytest.param(timedelta(hours=6, seconds=1), "20.00", id="cap-reached"),
        pytest.param(timedelta(hours=23, minutes=59), "20.00", id="capped-all-day"),
        pytest.param(timedelta(days=1), "20.00", id="exactly-one-day"),
        pytest.param(
            timedelta(days=1, seconds=1), "23.00", id="one-second-into-day-two"
        ),
        pytest.param(timedelta(days=3, hours=2), "66.00", id="multi-day"),
        pytest.param(timedelta(days=2, hours=10), "60.00", id="multi-day-capped-rest"),
        pytest.param(timedelta(microseconds=1), "0.00", id="one-microsecond"),
    ],
)
def test_fee_at_the_edges(duration: timedelta, fee: str) -> None:
    assert TARIFF.fee(duration) == Decimal(fee)


def test_fee_is_exact_decimal_money() -> None:
    odd = Tariff(price_per_period=Decimal("0.10"), daily_cap=Decimal("100"))
    fee = odd.fee(timedelta(hours=3, minutes=1))
    assert fee == Decimal("0.40")
    assert str(fee) == "0.40"


def test_no_free_time_charges_the_first_started_period() -> None:
    strict = Tariff(free=timedelta(0))
    assert strict.fee(timedelta(seconds=1)) == Decimal("3.00")
    assert strict.fee(timedelta(0)) == Decimal("0.00")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"period": timedelta(0)}, id="zero-period"),
        pytest.param({"free": timedelta(seconds=-1)}, id="negative-free"),
        pytest.param({"price_per_period": Decimal("-1")}, id="negative-price"),
        pytest.param({"daily_cap": Decimal("-1")}, id="negative-cap"),
    ],
)
def test_nonsense_tariffs_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="tariff"):
        Tariff(**bad)  # type: ignore[arg-type]
