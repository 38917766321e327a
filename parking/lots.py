"""The car parks the service meters: names, capacities and tariffs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from parking.errors import InvalidEvent
from parking.settings import DEFAULT_LOT, Settings, TariffOverride
from parking.tariff import Tariff

__all__ = ["DEFAULT_LOT", "Lot", "Lots", "lots_from_settings", "tariff_for"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Lot:
    name: str
    capacity: int
    tariff: Tariff


class Lots:
    """The configured car parks; an event may only name one of these."""

    def __init__(self, lots: Iterable[Lot], default: str = DEFAULT_LOT) -> None:
        self._lots = {lot.name: lot for lot in lots}
        if default not in self._lots:
            raise ValueError(f"default lot {default!r} is not configured")
        self.default = default

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._lots)

    def __iter__(self) -> Iterator[Lot]:
        return iter(self._lots.values())

    def __getitem__(self, name: str) -> Lot:
        """The car park of an event; an unknown one is bad input."""
        try:
            return self._lots[name]
        except KeyError:
            raise InvalidEvent(
                "unknown_lot", f"lot_id {name!r} is not a configured car park"
            ) from None


def lots_from_settings(settings: Settings) -> Lots:
    return Lots(
        (
            Lot(name, capacity, tariff_for(settings, name))
            for name, capacity in settings.lots.items()
        ),
        default=settings.default_lot,
    )


def tariff_for(settings: Settings, lot: str) -> Tariff:
    """The default tariff with the car park's own changes, if it has any."""
    change = settings.lot_tariffs.get(lot, TariffOverride())
    return Tariff(
        free=timedelta(
            minutes=_first(change.free_minutes, settings.tariff_free_minutes)
        ),
        period=timedelta(
            minutes=_first(change.period_minutes, settings.tariff_period_minutes)
        ),
        price_per_period=_first(
            change.price_per_period, settings.tariff_price_per_period
        ),
        daily_cap=_first(change.daily_cap, settings.tariff_daily_cap),
        currency=change.currency or settings.tariff_currency,
    )


def _first(mine: T | None, default: T) -> T:
    return default if mine is None else mine
