"""What a stay costs: free minutes, a price per started period, a daily cap."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

_CENT = Decimal("0.01")
_DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Tariff:
    """A car park's prices, in decimal money of one currency.

    - A stay no longer than ``free`` costs nothing; a longer one is charged
      from its first minute (the free time is a grace, not a discount).
    - Every started ``period`` costs ``price_per_period``.
    - Each whole day of a stay costs at most ``daily_cap``; what is left after
      the whole days is charged like a short stay, again capped.
    """

    free: timedelta = timedelta(minutes=15)
    period: timedelta = timedelta(hours=1)
    price_per_period: Decimal = Decimal("3.00")
    daily_cap: Decimal = Decimal("24.00")
    currency: str = "AUD"

    def __post_init__(self) -> None:
        if self.period <= timedelta(0):
            raise ValueError("tariff period must be positive")
        if self.free < timedelta(0):
            raise ValueError("tariff free time must not be negative")
        if self.price_per_period < 0 or self.daily_cap < 0:
            raise ValueError("tariff prices must not be negative")

    def fee(self, duration: timedelta) -> Decimal:
        if duration <= self.free:
            return Decimal("0.00")
        days, rest = divmod(duration, _DAY)
        fee = self.daily_cap * days + self._part_of_day(rest)
        return fee.quantize(_CENT, rounding=ROUND_HALF_UP)

    def _part_of_day(self, rest: timedelta) -> Decimal:
        if rest <= timedelta(0):
            return Decimal(0)
        started = -(-rest // self.period)  # ceiling: a started period is paid
        return min(self.price_per_period * started, self.daily_cap)
