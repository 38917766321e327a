"""Simulated cameras: entries of random plates, exits of cars inside or not."""

from __future__ import annotations

import logging
import random
import string
import uuid
from collections.abc import Callable
from typing import Any

import redis

from parking.clock import Clock
from parking.events import CameraEvent, EventKind, format_time
from parking.metrics import ParkingMetrics
from parking.misreads import misread
from parking.plates import normalise_plate
from parking.settings import DEFAULT_LOT

logger = logging.getLogger(__name__)

#: Publishes one wire-format event for processing.
Publish = Callable[[EventKind, dict[str, str]], None]

INSIDE_KEY = "parking:generator:inside"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def random_plate(rng: random.Random) -> str:
    letters = "".join(rng.choices(string.ascii_uppercase, k=3))
    digits = "".join(rng.choices(string.digits, k=4))
    return f"{letters}{digits}"


class EventGenerator:
    """Keeps its own record of simulated cars inside, in its own database."""

    def __init__(
        self,
        client: redis.Redis,
        publish: Publish,
        clock: Clock,
        metrics: ParkingMetrics,
        match_ratio: float = 0.8,
        capacity: int = 500,
        rng: random.Random | None = None,
        misread_ratio: float = 0.0,
        lot: str = DEFAULT_LOT,
    ) -> None:
        self._redis = client
        self._publish = publish
        self._clock = clock
        self._metrics = metrics
        self._match_ratio = match_ratio
        self._capacity = capacity
        self._rng = rng or random.Random()
        self._misread_ratio = misread_ratio
        self._lot = lot

    def entries(self, count: int = 1) -> int:
        """Cars arrive; a full car park turns the rest away. Returns how many."""
        room = max(self._capacity - self._redis.scard(INSIDE_KEY), 0)
        plates = [random_plate(self._rng) for _ in range(min(count, room))]
        if not plates:
            return 0
        # Recorded before publishing: an exit drawn for a car must never
        # overtake the record that it is inside.
        self._redis.sadd(INSIDE_KEY, *plates)
        for plate in plates:
            self._emit(EventKind.ENTRY, plate)
        return len(plates)

    def exits(self, count: int = 1) -> int:
        """Cars leave: a share of known cars, the rest unreadable plates."""
        known = sum(self._rng.random() < self._match_ratio for _ in range(count))
        # SPOP takes each plate once, atomically: no car leaves twice even with
        # several generators running.
        popped: Any = self._redis.spop(INSIDE_KEY, known) if known else []
        leaving = [_text(plate) for plate in popped or []]
        if len(leaving) < known:
            # No car inside to leave: nothing happens at the gate.
            self._metrics.generated.labels("exit_none_inside").inc(known - len(leaving))
        leaving = [self._as_read(plate) for plate in leaving]
        leaving += [self._unknown_plate() for _ in range(count - known)]
        self._rng.shuffle(leaving)
        for plate in leaving:
            self._emit(EventKind.EXIT, plate)
        return len(leaving)

    def _as_read(self, plate: str) -> str:
        """The plate of a car inside as the exit camera reads it."""
        if self._misread_ratio and self._rng.random() < self._misread_ratio:
            read = misread(plate, self._rng)
            if read != plate:
                self._metrics.generated.labels("exit_misread").inc()
            return read
        return plate

    def _unknown_plate(self) -> str:
        # A plate that never entered: the camera misread a dirty plate.
        return random_plate(self._rng)

    def _emit(self, kind: EventKind, plate: str) -> None:
        event = CameraEvent(
            kind,
            uuid.uuid4().hex,
            plate,
            normalise_plate(plate),
            self._clock.now(),
            self._lot,
        )
        self._publish(kind, event.to_wire())
        self._metrics.generated.labels(kind.value).inc()
        logger.debug("event generated kind=%s plate=%s", kind.value, plate)


__all__ = ["INSIDE_KEY", "EventGenerator", "format_time", "random_plate"]
