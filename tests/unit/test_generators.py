"""The simulated cameras, with a seeded random source and an in-memory set."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import pytest
import redis
from prometheus_client import CollectorRegistry

from parking.events import EventKind, parse_event
from parking.generators import INSIDE_KEY, EventGenerator, random_plate
from parking.metrics import ParkingMetrics
from parking.misreads import misread_distance

NOW = datetime(2024, 9, 11, 21, 24, 56, 123456, tzinfo=UTC)


@dataclass
class FakeSets:
    """The three set commands the generator uses, answering like redis-py."""

    sets: dict[str, set[bytes]] = field(default_factory=dict)
    spop_calls: int = 0

    def scard(self, key: str) -> int:
        return len(self.sets.get(key, set()))

    def sadd(self, key: str, *values: str) -> int:
        members = self.sets.setdefault(key, set())
        fresh = {value.encode() for value in values} - members
        members |= fresh
        return len(fresh)

    def spop(self, key: str, count: int | None = None) -> list[bytes] | bytes | None:
        self.spop_calls += 1
        members = self.sets.get(key, set())
        if count is None:
            return members.pop() if members else None
        # Sorted before drawing so that a seeded test run is repeatable.
        taken = random.Random(count).sample(sorted(members), min(count, len(members)))
        members.difference_update(taken)
        return taken

    def inside(self) -> set[str]:
        return {member.decode() for member in self.sets.get(INSIDE_KEY, set())}


class FixedClock:
    def now(self) -> datetime:
        return NOW


@dataclass
class Rig:
    sets: FakeSets
    registry: CollectorRegistry
    published: list[tuple[EventKind, dict[str, str]]]

    def generator(
        self,
        match_ratio: float = 0.8,
        capacity: int = 5000,
        seed: int = 7,
        misread_ratio: float = 0.0,
        lot: str = "main",
    ) -> EventGenerator:
        return EventGenerator(
            cast(redis.Redis, self.sets),
            lambda kind, event: self.published.append((kind, event)),
            FixedClock(),
            ParkingMetrics(self.registry),
            match_ratio=match_ratio,
            capacity=capacity,
            rng=random.Random(seed),
            misread_ratio=misread_ratio,
            lot=lot,
        )

    def plates(self, kind: EventKind) -> list[str]:
        return [event["vehicle_plate"] for k, event in self.published if k is kind]

    def generated(self, kind: str) -> float:
        value = self.registry.get_sample_value(
            "parking_generated_events_total", {"kind": kind}
        )
        return value or 0.0


@pytest.fixture
def rig() -> Rig:
    return Rig(FakeSets(), CollectorRegistry(), [])


def test_the_match_ratio_is_honoured_over_2000_exits(rig: Rig) -> None:
    generator = rig.generator(match_ratio=0.8)
    generator.entries(2500)
    entered = set(rig.plates(EventKind.ENTRY))

    produced = sum(generator.exits(20) for _ in range(100))

    exits = rig.plates(EventKind.EXIT)
    matched = sum(plate in entered for plate in exits)
    assert produced == len(exits) == 2000
    assert 0.77 <= matched / len(exits) <= 0.83
    assert rig.generated("exit_none_inside") == 0


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_other_ratios_are_honoured_too(rig: Rig, ratio: float) -> None:
    generator = rig.generator(match_ratio=ratio)
    generator.entries(1200)
    entered = set(rig.plates(EventKind.ENTRY))

    generator.exits(1000)

    exits = rig.plates(EventKind.EXIT)
    share = sum(plate in entered for plate in exits) / len(exits)
    assert share == pytest.approx(ratio, abs=0.04)


def test_each_car_inside_leaves_at_most_once(rig: Rig) -> None:
    generator = rig.generator(match_ratio=1.0)
    generator.entries(300)
    entered = set(rig.plates(EventKind.ENTRY))

    for _ in range(40):
        generator.exits(10)

    left = Counter(rig.plates(EventKind.EXIT))
    assert max(left.values()) == 1
    assert set(left) <= entered
    assert rig.sets.inside() == entered - set(left)
    assert len(left) == 300
    assert rig.generated("exit_none_inside") == 100


def test_a_full_car_park_turns_entries_away(rig: Rig) -> None:
    generator = rig.generator(match_ratio=1.0, capacity=10)

    assert generator.entries(25) == 10
    assert generator.entries(1) == 0
    assert rig.sets.scard(INSIDE_KEY) == 10

    assert generator.exits(3) == 3
    assert generator.entries(5) == 3
    assert rig.sets.scard(INSIDE_KEY) == 10
    assert len(rig.plates(EventKind.ENTRY)) == 13
    assert rig.generated("entry") == 13


def test_entries_are_recorded_inside_before_they_are_published(rig: Rig) -> None:
    inside_when_published: list[bool] = []
    generator = EventGenerator(
        cast(redis.Redis, rig.sets),
        lambda kind, event: inside_when_published.append(
            event["vehicle_plate"] in rig.sets.inside()
        ),
        FixedClock(),
        ParkingMetrics(rig.registry),
        rng=random.Random(1),
    )

    generator.entries(5)

    assert inside_when_published == [True] * 5


def test_unknown_exits_touch_nothing_inside(rig: Rig) -> None:
    generator = rig.generator(match_ratio=0.0)
    generator.entries(50)
    before = rig.sets.inside()

    generator.exits(100)

    assert rig.sets.inside() == before
    assert rig.sets.spop_calls == 0
    assert not set(rig.plates(EventKind.EXIT)) & before


def test_generated_events_are_valid_wire_events(rig: Rig) -> None:
    generator = rig.generator()
    generator.entries(40)
    generator.exits(40)

    ids = set()
    for kind, wire in rig.published:
        event = parse_event(wire, kind)
        assert event.at == NOW
        assert event.plate == wire["vehicle_plate"]
        assert set(wire) == {"id", "vehicle_plate", kind.time_field, "lot_id"}
        assert event.lot_id == "main"
        ids.add(event.id)
    assert len(ids) == len(rig.published) == 80
    assert len(rig.plates(EventKind.EXIT)) == 40


def test_random_plates_are_repeatable_for_a_seed() -> None:
    first = [random_plate(random.Random(42)) for _ in range(3)]
    again = [random_plate(random.Random(42)) for _ in range(3)]

    assert first == again
    assert all(len(plate) == 7 and plate[:3].isalpha() for plate in first)


def test_a_share_of_cars_inside_leave_under_a_misread_plate(rig: Rig) -> None:
    generator = rig.generator(match_ratio=1.0, misread_ratio=0.1)
    generator.entries(2000)
    entered = set(rig.plates(EventKind.ENTRY))

    generator.exits(2000)

    exits = rig.plates(EventKind.EXIT)
    misread = [plate for plate in exits if plate not in entered]
    # Every misread is one confusable character away from a car inside.
    assert all(
        any(misread_distance(plate, car) == 1 for car in entered) for plate in misread
    )
    assert 0.08 <= len(misread) / len(exits) <= 0.12
    assert rig.generated("exit_misread") == len(misread)


def test_without_a_misread_ratio_every_car_leaves_under_its_plate(rig: Rig) -> None:
    generator = rig.generator(match_ratio=1.0)
    generator.entries(500)

    generator.exits(500)

    assert set(rig.plates(EventKind.EXIT)) == set(rig.plates(EventKind.ENTRY))
    assert rig.generated("exit_misread") == 0


def test_events_are_generated_for_the_configured_lot(rig: Rig) -> None:
    generator = rig.generator(lot="north")

    generator.entries(3)
    generator.exits(3)

    assert {event["lot_id"] for _, event in rig.published} == {"north"}
