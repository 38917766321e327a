"""The issue's "done when", checked on the real processes of ``parking run``."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tests.e2e.system import (
    REPO,
    RunningSystem,
    exact_seconds,
    inconsistent_rows,
    instant,
)
from tests.services import wait_until

pytestmark = pytest.mark.e2e

#: Beside the checkout, as on a developer's machine and in CI.
MELBOURNE = REPO.parent / "shared" / "data" / "melbourne-2019" / "events.jsonl"
MELBOURNE_STAYS = 7500
#: What the simulated cameras read (parking.generators.random_plate).
GENERATED_PLATE = re.compile(r"[A-Z]{3}[0-9]{4}")
TASKS = {
    "parking.process_entry",
    "parking.process_exit",
    "parking.generate_entry",
    "parking.generate_exit",
}
# A share measured over 1,000 exits has a standard error of 1.3 points, so
# the 5-point tolerance is about four of them: a failure means a real bias.
BURST_ENTRIES = 1200
BURST_EXITS = 1000


def _generated(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if GENERATED_PLATE.fullmatch(r["vehicle_plate"])]


def _recorded_stays(path: Path) -> dict[str, tuple[datetime, datetime]]:
    """Plate -> (entry, exit) instants, straight from the events file."""
    if not path.is_file():
        pytest.fail(
            f"recorded events not found at {path}: the shared folder (with "
            "data/melbourne-2019/events.jsonl) must lie beside the checkout"
        )
    entries: dict[str, datetime] = {}
    exits: dict[str, datetime] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        plate = event["vehicle_plate"]
        if "entry_date_time" in event:
            entries[plate] = instant(event["entry_date_time"])
        else:
            exits[plate] = instant(event["exit_date_time"])
    assert entries.keys() == exits.keys(), "every recorded stay has both events"
    return {plate: (entries[plate], exits[plate]) for plate in entries}


class TestDefaultSystem:
    """One ``parking run`` with default settings serves these tests."""

    def test_flower_lists_the_worker_and_the_four_tasks(
        self, default_system: RunningSystem
    ) -> None:
        def flower_shows_all() -> bool:
            alive = default_system.flower("/api/workers?status=1")
            seen = set(default_system.flower("/api/task/types")["task-types"])
            return any(n.startswith("worker@") and up for n, up in alive.items()) and (
                seen >= TASKS
            )

        wait_until(flower_shows_all, timeout=60, interval=0.5)
        workers = default_system.flower("/api/workers?refresh=1")
        (name,) = [n for n in workers if n.startswith("worker@")]
        assert set(workers[name]["registered"]) >= TASKS

    def test_sixty_seconds_of_generators_write_forty_consistent_stays(
        self, default_system: RunningSystem, report: Callable[[str], None]
    ) -> None:
        deadline = default_system.started_at + 60

        def within_a_minute() -> list[dict[str, str]]:
            return [
                row
                for row in _generated(default_system.rows())
                if instant(row["exit_date_time"]).timestamp() <= deadline
            ]

        # Rows only accumulate, so forty before the minute is up settles it;
        # one second of slack lets the last posts of the minute land.
        wait_until(
            lambda: len(within_a_minute()) >= 40,
            timeout=max(deadline - time.time(), 0) + 1,
            interval=0.5,
        )
        elapsed = time.time() - default_system.started_at
        rows = default_system.rows()
        report(
            f"generators: {len(within_a_minute())} stays after {elapsed:.0f} s "
            "of parking run (at least 40 within 60 s required)"
        )
        assert rows
        assert inconsistent_rows(rows) == []

    @pytest.mark.timeout(600)
    def test_replay_of_melbourne_gives_every_stay_its_true_duration(
        self, default_system: RunningSystem, report: Callable[[str], None]
    ) -> None:
        expected = _recorded_stays(MELBOURNE)
        assert len(expected) == MELBOURNE_STAYS
        dst = [p for p, (a, b) in expected.items() if a.utcoffset() != b.utcoffset()]
        assert dst, "the recording crosses a daylight-saving change"

        def replayed() -> list[dict[str, str]]:
            return [r for r in default_system.rows() if r["vehicle_plate"] in expected]

        started = time.monotonic()
        result = default_system.cli("replay", str(MELBOURNE), timeout=500)
        published = time.monotonic() - started
        assert "published 15000 events, skipped 0" in result.stderr
        wait_until(lambda: len(replayed()) >= MELBOURNE_STAYS, timeout=500, interval=1)
        done = time.monotonic() - started
        report(
            f"replay: 15000 events published in {published:.1f} s, "
            f"{MELBOURNE_STAYS} rows after {done:.1f} s "
            f"({MELBOURNE_STAYS / done:.0f} stays/s)"
        )

        rows = replayed()
        assert len(rows) == MELBOURNE_STAYS
        assert {r["vehicle_plate"] for r in rows} == expected.keys()
        wrong = []
        for row in rows:
            entry, exit_ = expected[row["vehicle_plate"]]
            if (
                instant(row["entry_date_time"]) != entry
                or instant(row["exit_date_time"]) != exit_
                or Decimal(row["duration_seconds"]) != exact_seconds(exit_ - entry)
            ):
                wrong.append(row)
        assert wrong == [], f"{len(wrong)} rows differ from the recording: {wrong[:3]}"
        for plate in dst:
            # The wall clocks' difference is off by the change of offset.
            entry, exit_ = expected[plate]
            naive = exit_.replace(tzinfo=None) - entry.replace(tzinfo=None)
            entry_offset, exit_offset = entry.utcoffset(), exit_.utcoffset()
            assert entry_offset is not None
            assert exit_offset is not None
            shift = exit_offset - entry_offset
            (row,) = [r for r in rows if r["vehicle_plate"] == plate]
            true = Decimal(row["duration_seconds"])
            assert true == exact_seconds(naive - shift) != exact_seconds(naive)


class TestGeneratorBurst:
    """A burst of simulated cars on a system whose beat only sweeps."""

    def test_four_in_five_generated_exits_produce_a_stay(
        self, burst_system: RunningSystem, report: Callable[[str], None]
    ) -> None:
        system = burst_system
        assert system.metric("parking_generated_events_total") == 0

        system.cli("generate", "--entries", str(BURST_ENTRIES))
        # The cars must be inside before they leave: an exit that overtakes
        # its entry by more than the grace period would count as unmatched.
        wait_until(
            lambda: (
                system.metric("parking_events_total", kind="entry") >= BURST_ENTRIES
            ),
            timeout=240,
            interval=0.5,
        )
        assert (
            system.metric("parking_generated_events_total", kind="entry")
            == BURST_ENTRIES
        )

        system.cli("generate", "--exits", str(BURST_EXITS))

        def settled() -> bool:
            exits = system.metric("parking_generated_events_total", kind="exit")
            unmatched = system.metric("parking_exits_unmatched_total")
            return exits == BURST_EXITS and len(system.rows()) + unmatched == exits

        wait_until(settled, timeout=240, interval=0.5)
        rows = system.rows()
        share = len(rows) / BURST_EXITS
        report(
            f"burst: {len(rows)} stays of {BURST_EXITS} generated exits = "
            f"{share:.1%} (parking generate --entries {BURST_ENTRIES}, then "
            f"--exits {BURST_EXITS}; grace 2 s)"
        )
        assert (
            system.metric("parking_generated_events_total", kind="exit_none_inside")
            == 0
        )
        assert 0.75 <= share <= 0.85
        assert inconsistent_rows(rows) == []

    def test_sigterm_stops_every_process(self, burst_system: RunningSystem) -> None:
        groups = burst_system.child_groups()
        assert len(groups) >= 4, "worker, beat, API and Flower were started"
        assert burst_system.stop(signal.SIGTERM) == []
        assert burst_system.returncode is not None
