"""Camera events for the ledger tests, and what the stays CSV says about them."""

from __future__ import annotations

import csv
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.messaging import Producer

from parking.events import EventKind, format_time
from parking.stays import format_seconds

#: Camera time of the first planned stay; far from now on purpose, so that
#: processing time and event time are never confused.
T0 = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)


def entry_event(
    event_id: str, plate: str, at: datetime, **extra: Any
) -> dict[str, Any]:
    return {
        "id": event_id,
        "vehicle_plate": plate,
        "entry_date_time": format_time(at),
        **extra,
    }


def exit_event(event_id: str, plate: str, at: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "vehicle_plate": plate,
        "exit_date_time": format_time(at),
        **extra,
    }


@dataclass(frozen=True, slots=True)
class PlannedStay:
    """One visit the test sends, with the row the ledger must write for it."""

    plate: str
    entry_at: datetime
    exit_at: datetime
    entry_id: str = field(default_factory=lambda: f"in-{uuid.uuid4()}")
    exit_id: str = field(default_factory=lambda: f"out-{uuid.uuid4()}")

    @property
    def entry(self) -> dict[str, Any]:
        return entry_event(self.entry_id, self.plate, self.entry_at)

    @property
    def exit(self) -> dict[str, Any]:
        return exit_event(self.exit_id, self.plate, self.exit_at)

    @property
    def duration(self) -> str:
        return format_seconds(self.exit_at - self.entry_at)


def plan_stays(count: int, prefix: str, seed: int = 7) -> list[PlannedStay]:
    """``count`` stays of distinct plates, durations from a minute to a day.

    Times carry microseconds so that a rounding anywhere shows as a wrong
    duration.
    """
    rng = random.Random(seed)
    stays = []
    for n in range(count):
        entry_at = T0 + timedelta(seconds=7 * n, microseconds=rng.randrange(10**6))
        length = timedelta(seconds=rng.randrange(60, 86_400), microseconds=n)
        stays.append(PlannedStay(f"{prefix}{n:05d}", entry_at, entry_at + length))
    return stays


def shuffled_events(
    stays: list[PlannedStay], seed: int = 11
) -> list[tuple[str, dict[str, Any]]]:
    """Every entry and exit as ``(kind, event)``, in a seeded random order.

    About half of the exits come before their entries, as they may when the
    two queues drain at their own pace.
    """
    events = [("entry", s.entry) for s in stays] + [("exit", s.exit) for s in stays]
    random.Random(seed).shuffle(events)
    return events


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    """The CSV compared with the planned stays."""

    expected: int
    written: int
    duplicates: int
    missing: list[str]
    unexpected: list[str]
    wrong: list[str]

    @property
    def exact(self) -> bool:
        return self.written == self.expected and not (
            self.duplicates or self.missing or self.unexpected or self.wrong
        )

    def __str__(self) -> str:
        return (
            f"rows expected={self.expected} written={self.written} "
            f"duplicates={self.duplicates} missing={len(self.missing)} "
            f"unexpected={len(self.unexpected)} wrong={len(self.wrong)}"
        )


def check_ledger(rows: list[dict[str, str]], stays: list[PlannedStay]) -> LedgerCheck:
    planned = {stay.plate: stay for stay in stays}
    # Every planned stay has a plate of its own: a second row of a plate is
    # a stay written twice, whether or not its stay id differs.
    per_plate = Counter(row["vehicle_plate"] for row in rows)
    duplicates = sum(n - 1 for n in per_plate.values())
    wrong = []
    for row in rows:
        stay = planned.get(row["vehicle_plate"])
        if stay is None:
            continue
        if (
            row["entry_date_time"] != format_time(stay.entry_at)
            or row["exit_date_time"] != format_time(stay.exit_at)
            or Decimal(row["duration_seconds"]) != Decimal(stay.duration)
        ):
            wrong.append(row["vehicle_plate"])
    return LedgerCheck(
        expected=len(stays),
        written=len(rows),
        duplicates=duplicates,
        missing=sorted(planned.keys() - per_plate.keys()),
        unexpected=sorted(per_plate.keys() - planned.keys()),
        wrong=wrong,
    )


class Feeder(threading.Thread):
    """Publishes events at a steady pace, republishing through broker outages.

    A publish that fails (the broker went away before confirming it) is sent
    again once the broker answers: the event may then arrive twice, which is
    exactly the at-least-once delivery the ledger must absorb.
    """

    def __init__(
        self,
        app: Celery,
        events: list[tuple[str, dict[str, Any]]],
        per_second: float | None = None,
    ) -> None:
        super().__init__(name="feeder", daemon=True)
        self._app = app
        self._events = events
        self._interval = 1 / per_second if per_second else 0.0
        self.published = 0
        self.republished = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        from workers.tasks import PROCESSORS

        connection = self._app.connection_for_write()
        started = time.monotonic()
        try:
            for n, (kind, event) in enumerate(self._events):
                while True:
                    try:
                        PROCESSORS[EventKind(kind)].apply_async(
                            (event,), producer=Producer(connection), retry=False
                        )
                        break
                    except Exception:  # any publish failure: broker gone
                        self.republished += 1
                        connection.close()
                        time.sleep(0.5)
                        connection = self._app.connection_for_write()
                self.published += 1
                pause = started + (n + 1) * self._interval - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        except BaseException as exc:  # reported to the test, not lost in a thread
            self.failure = exc
        finally:
            connection.close()

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"feeder still publishing after {timeout} s"
        if self.failure is not None:
            raise self.failure
