"""What an operator reviews: exits that found no entry, visits with no exit.

Both are expected business outcomes, not errors; each is kept once, keyed by
the event id of the read it is about, so posting one again changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from parking.events import format_time
from parking.stays import Visit


class UnmatchedWhy(StrEnum):
    #: No entry arrived within the grace period.
    GRACE_EXPIRED = "grace_expired"
    #: Several open visits were one misread away: none was chosen.
    AMBIGUOUS = "ambiguous"


class OrphanCause(StrEnum):
    #: The plate entered again without leaving.
    REENTRY = "reentry"
    #: An entry earlier than the plate's open visit arrived late.
    LATE_ENTRY = "late_entry"
    #: Open longer than the maximum stay.
    MAX_STAY = "max_stay"


@dataclass(frozen=True, slots=True)
class UnmatchedExit:
    exit: Visit
    why: UnmatchedWhy

    @property
    def key(self) -> str:
        return f"unmatched:{self.exit.event_id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.exit.event_id,
            "lot_id": self.exit.lot_id,
            "vehicle_plate": self.exit.plate,
            "exit_date_time": format_time(self.exit.at),
            "why": self.why.value,
        }


@dataclass(frozen=True, slots=True)
class OrphanedVisit:
    entry: Visit
    cause: OrphanCause

    @property
    def key(self) -> str:
        return f"orphan:{self.entry.event_id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.entry.event_id,
            "lot_id": self.entry.lot_id,
            "vehicle_plate": self.entry.plate,
            "entry_date_time": format_time(self.entry.at),
            "cause": self.cause.value,
        }


Review = UnmatchedExit | OrphanedVisit
