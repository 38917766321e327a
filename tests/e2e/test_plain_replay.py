"""Cameras that speak plain JSON: the Melbourne recording through ``parking ingest``.

One ``parking run`` receives the recording twice at once: as bare JSON on the
raw camera queues (``parking replay --plain``, car park ``main``), and as
Celery tasks (``parking replay``) of a copy whose events name another car park
and carry other ids, so that both paths write their own 7,500 rows into the
one stays CSV. Row for row, the two must agree on everything but the car park
and the stay id, and the plain rows must be the very rows (stay ids included)
that the Celery path writes for the recording itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from parking.settings import get_settings
from parking.stays import Stay, Visit
from parking.tariff import Tariff
from tests.e2e.system import (
    REPO,
    RunningSystem,
    exact_seconds,
    inconsistent_rows,
    instant,
    parking_command,
)
from tests.observability import scrape, value
from tests.services import isolated_vhost, wait_until

pytestmark = pytest.mark.e2e

MELBOURNE = REPO.parent / "shared" / "data" / "melbourne-2019" / "events.jsonl"
STAYS = 7500
#: The columns a stay's row shares between the two paths.
SAME = (
    "vehicle_plate",
    "entry_date_time",
    "exit_date_time",
    "duration_seconds",
    "fee",
    "currency",
    "match",
    "clock_skew",
)


def _flush_test_redis() -> None:
    settings = get_settings()
    for db in (settings.redis_db_store, settings.redis_db_generator):
        redis.Redis.from_url(settings.redis_connection_url(db)).flushdb()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    """Two car parks, and no simulated cameras: every row is the recording's."""
    workdir = tmp_path_factory.mktemp("plain-replay")
    overrides = {
        "PARKING_LOTS": json.dumps({"main": 10000, "celery": 10000}),
        "PARKING_ENTRY_INTERVAL_SECONDS": "86400",
        "PARKING_EXIT_INTERVAL_SECONDS": "86400",
    }
    with isolated_vhost():
        _flush_test_redis()
        running = RunningSystem(workdir, overrides)
        try:
            running.start()
            yield running
        finally:
            running.stop(signal.SIGINT)
            _flush_test_redis()


def _recording() -> list[dict[str, str]]:
    if not MELBOURNE.is_file():
        pytest.fail(
            f"recorded events not found at {MELBOURNE}: the shared folder (with "
            "data/melbourne-2019/events.jsonl) must lie beside the checkout"
        )
    lines = MELBOURNE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _expected(events: list[dict[str, str]]) -> dict[str, tuple[str, str]]:
    """Plate -> (entry event id, exit event id)."""
    entries = {e["vehicle_plate"]: e["id"] for e in events if "entry_date_time" in e}
    exits = {e["vehicle_plate"]: e["id"] for e in events if "exit_date_time" in e}
    assert entries.keys() == exits.keys()
    return {plate: (entries[plate], exits[plate]) for plate in entries}


def _times(events: list[dict[str, str]]) -> dict[str, tuple[datetime, datetime]]:
    entries, exits = {}, {}
    for event in events:
        if "entry_date_time" in event:
            entries[event["vehicle_plate"]] = instant(event["entry_date_time"])
        else:
            exits[event["vehicle_plate"]] = instant(event["exit_date_time"])
    return {plate: (entries[plate], exits[plate]) for plate in entries}


@pytest.mark.timeout(900)
def test_replay_plain_gives_the_same_7500_rows_as_the_celery_path(
    system: RunningSystem, tmp_path: Path, report: Callable[[str], None]
) -> None:
    events = _recording()
    ids = _expected(events)
    times = _times(events)
    assert len(ids) == STAYS
    copy = tmp_path / "melbourne-celery.jsonl"
    copy.write_text(
        "".join(
            json.dumps({**event, "id": f"c-{event['id']}", "lot_id": "celery"}) + "\n"
            for event in events
        ),
        encoding="utf-8",
    )

    started = time.monotonic()
    replays = {
        "plain": _start(system, "replay", "--plain", str(MELBOURNE)),
        "celery": _start(system, "replay", str(copy)),
    }
    outputs = {name: _finish(name, process) for name, process in replays.items()}
    published = time.monotonic() - started
    for output in outputs.values():
        assert "published 15000 events, skipped 0" in output

    def by_lot() -> dict[str, list[dict[str, str]]]:
        found: dict[str, list[dict[str, str]]] = {"main": [], "celery": []}
        for row in system.rows():
            found.setdefault(row["lot_id"], []).append(row)
        return found

    wait_until(
        lambda: all(len(rows) >= STAYS for rows in by_lot().values()),
        timeout=780 - published,
        interval=1,
    )
    done = time.monotonic() - started
    rows = by_lot()
    plain = {row["vehicle_plate"]: row for row in rows["main"]}
    celery = {row["vehicle_plate"]: row for row in rows["celery"]}
    ingest = scrape(
        f"http://127.0.0.1:{system.env['PARKING_INGEST_METRICS_PORT']}/metrics"
    )
    report(
        f"replay --plain and replay side by side: 2 x 15000 events published in "
        f"{published:.1f} s, 2 x {STAYS} rows after {done:.1f} s "
        f"({2 * STAYS / done:.0f} stays/s); ingest matched "
        f"{value(ingest, 'parking_events_total', outcome='matched'):.0f}"
    )

    assert set(rows) == {"main", "celery"}, "no row of another car park"
    assert len(rows["main"]) == len(plain) == STAYS
    assert len(rows["celery"]) == len(celery) == STAYS
    assert plain.keys() == celery.keys() == ids.keys()
    differ = [
        plate
        for plate in plain
        if tuple(plain[plate][c] for c in SAME) != tuple(celery[plate][c] for c in SAME)
    ]
    assert differ == [], f"{len(differ)} plates differ between the paths: {differ[:3]}"
    # The plain rows are the Celery path's rows of the recording itself:
    # same stay ids (derived from the event ids), times and durations.
    tariff = Tariff()
    wrong = []
    for plate, row in plain.items():
        entry_id, exit_id = ids[plate]
        entry_at, exit_at = times[plate]
        stay = Stay.between(
            Visit(entry_id, plate, entry_at), Visit(exit_id, plate, exit_at), tariff
        )
        if (
            row["stay_id"] != stay.stay_id
            or instant(row["entry_date_time"]) != entry_at
            or instant(row["exit_date_time"]) != exit_at
            or Decimal(row["duration_seconds"]) != exact_seconds(exit_at - entry_at)
            or Decimal(row["fee"]) != stay.fee
            or (row["match"], row["currency"]) != ("exact", "AUD")
        ):
            wrong.append(row)
    assert wrong == [], f"{len(wrong)} rows differ from the recording: {wrong[:3]}"
    assert inconsistent_rows(system.rows()) == []
    assert value(ingest, "parking_events_total", outcome="matched") == STAYS
    assert value(ingest, "parking_events_rejected_total") == 0


def _start(system: RunningSystem, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        parking_command(*args),
        cwd=REPO,
        env=system.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(name: str, process: subprocess.Popen[str]) -> str:
    try:
        _, stderr = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"{name} replay did not finish:\n{stderr[-2000:]}")
    assert process.returncode == 0, f"{name} replay failed:\n{stderr[-2000:]}"
    return stderr
