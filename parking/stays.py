"""A stay: one visit from entry to exit, the unit that gets invoiced."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from parking.events import format_time
from parking.settings import DEFAULT_LOT
from parking.tariff import Tariff

#: Namespace for stay ids: the same pair of events always gives the same id.
_STAY_NAMESPACE = uuid.UUID("5b0f3a52-93a4-4d8e-a0f1-3c7e0a54f1d2")
_ONE_MICROSECOND = timedelta(microseconds=1)
#: The settings' default tariff, for callers that price nothing themselves.
STANDARD_TARIFF = Tariff()


class Match(StrEnum):
    """How the exit found its entry."""

    EXACT = "exact"
    #: The plates differ in characters that readers confuse (O/0, B/8, ...).
    FUZZY = "fuzzy"


@dataclass(frozen=True, slots=True)
class Visit:
    """One side of a stay as the store remembers it."""

    event_id: str
    plate: str
    at: datetime
    lot_id: str = DEFAULT_LOT


@dataclass(frozen=True, slots=True)
class Stay:
    stay_id: str
    plate: str
    entry_at: datetime
    exit_at: datetime
    fee: Decimal
    currency: str
    lot_id: str = DEFAULT_LOT
    match: Match = Match.EXACT
    #: True when the exit camera's time was before the entry's and was clamped.
    clock_skew: bool = False

    @classmethod
    def between(
        cls,
        entry: Visit,
        exit_: Visit,
        tariff: Tariff = STANDARD_TARIFF,
        match: Match = Match.EXACT,
    ) -> Stay:
        """The stay from two matched reads, under the clock-skew rule, priced.

        The entry and exit cameras keep their own clocks, so an exit can be
        stamped a little before its entry. The store pairs the two only when
        the exit is at most the skew tolerance (``PARKING_CLOCK_SKEW_SECONDS``,
        120 s by default) before the entry. Such a stay is recorded as leaving
        at the moment of entry: the entry time is kept (it is the one the
        visit and the tariff start from), the duration is zero and never
        negative, and the row is flagged ``clock_skew`` for review (counted in
        ``parking_clock_skew_total``). An exit further before the entry is
        not this visit's: it waits as a pending exit and is declared
        unmatched after the grace period, and the visit stays open.

        The fee is the car park's tariff applied to the recorded duration.
        The plate is the entry's: a fuzzy match means the exit camera
        misread it, and the invoice goes to the plate read at the entry.
        """
        skewed = exit_.at < entry.at
        stay_id = uuid.uuid5(_STAY_NAMESPACE, f"{entry.event_id}\x00{exit_.event_id}")
        exit_at = entry.at if skewed else exit_.at
        return cls(
            stay_id=str(stay_id),
            plate=entry.plate,
            entry_at=entry.at,
            exit_at=exit_at,
            fee=tariff.fee(exit_at - entry.at),
            currency=tariff.currency,
            lot_id=entry.lot_id,
            match=match,
            clock_skew=skewed,
        )

    @property
    def duration(self) -> timedelta:
        return self.exit_at - self.entry_at

    def to_json(self) -> dict[str, Any]:
        return {
            "stay_id": self.stay_id,
            "vehicle_plate": self.plate,
            "entry_date_time": format_time(self.entry_at),
            "exit_date_time": format_time(self.exit_at),
            "duration_seconds": format_seconds(self.duration),
            "lot_id": self.lot_id,
            "fee": str(self.fee),
            "currency": self.currency,
            "match": self.match.value,
            "clock_skew": self.clock_skew,
        }


def format_seconds(span: timedelta) -> str:
    """Exact seconds as decimal text: ``1602`` or ``1602.25``, never a float."""
    micros = span // _ONE_MICROSECOND
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    if not fraction:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:06d}".rstrip("0")
