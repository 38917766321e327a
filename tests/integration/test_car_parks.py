"""Fees, car parks, misread plates and review records through the real pipeline.

Events go through RabbitMQ to the embedded worker, the store is the test's
Redis database, and stays and review records land in the CSVs of a real API
server, so each behaviour is checked in what an operator would read.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests
from celery import Celery
from celery.contrib.testing.worker import start_worker
from prometheus_client import REGISTRY, start_http_server

from parking import status
from parking.events import EventKind
from parking.ports import free_port
from parking.review import UnmatchedExit
from parking.settings import Settings, TariffOverride
from tests.services import ApiServer, wait_until
from tests.traffic import T0, entry_event, exit_event, read_rows
from workers import runtime
from workers.tasks import PROCESSORS, sweep

pytestmark = pytest.mark.integration

#: "east" is small on purpose, and prices differently from the default.
LOTS = {"main": 1000, "east": 3}
EAST = TariffOverride(
    free_minutes=0,
    period_minutes=30,
    price_per_period=Decimal("4.50"),
    daily_cap=Decimal("20.00"),
    currency="NZD",
)


@pytest.fixture(scope="module")
def embedded_worker(
    celery_app: Celery, celery_worker_parameters: dict[str, Any]
) -> Iterator[Any]:
    """One embedded worker for the whole module: each stop costs seconds."""
    with start_worker(celery_app, pool="solo", **celery_worker_parameters) as worker:
        yield worker


@pytest.fixture
def parks(api_server: ApiServer, embedded_worker: Any) -> Settings:
    """The test's settings with two car parks; the API fixture undoes it."""
    settings = runtime.settings().model_copy(
        update={"lots": LOTS, "lot_tariffs": {"east": EAST}}
    )
    runtime.configure(settings)
    return settings


def _send(kind: str, event: dict[str, Any]) -> None:
    PROCESSORS[EventKind(kind)].apply_async((event,))


def _stay(plate: str, seconds: float, n: int, lot: str | None = None) -> None:
    extra = {"lot_id": lot} if lot else {}
    exit_at = T0 + timedelta(seconds=seconds)
    _send("entry", entry_event(f"in-{plate}-{n}", plate, T0, **extra))
    _send("exit", exit_event(f"out-{plate}-{n}", plate, exit_at, **extra))


def _sweep() -> dict[str, int]:
    """The beat-scheduled task, run here so the test sees its result."""
    result: dict[str, int] = sweep.apply().get()
    return result


def _sweep_until_unmatched(count: int, timeout: float = 15) -> None:
    """Sweep until ``count`` exits were declared unmatched (over any sweeps)."""
    taken = 0

    def all_taken() -> bool:
        nonlocal taken
        taken += _sweep()["unmatched"]
        return taken >= count

    wait_until(all_taken, timeout=timeout, interval=0.2)
    assert taken == count


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _listed(server: ApiServer, path: str) -> list[dict[str, str]]:
    response = requests.get(f"{server.url}{path}", params={"limit": 1000}, timeout=5)
    response.raise_for_status()
    items: list[dict[str, str]] = response.json()["items"]
    return items


# Each fee is worked out by hand from the default tariff (15 free minutes,
# then 3.00 AUD per started hour, at most 24.00 a day) or east's (4.50 NZD
# per started half hour from the first minute, at most 20.00 a day).
FEES = [
    ("ZERO-1", 0, None, "0.00", "AUD"),
    ("FREE-1", 15 * 60, None, "0.00", "AUD"),
    ("FREE-2", 15 * 60 + 1, None, "3.00", "AUD"),
    ("HOUR-1", 3600, None, "3.00", "AUD"),
    ("HOUR-2", 3600 + 1, None, "6.00", "AUD"),
    ("CAP-1", 9 * 3600, None, "24.00", "AUD"),
    ("DAY-1", 86400, None, "24.00", "AUD"),
    ("DAY-2", 86400 + 3600 + 1, None, "30.00", "AUD"),
    ("DAYS-3", 3 * 86400 + 600, None, "75.00", "AUD"),
    ("SKEW-1", -30, None, "0.00", "AUD"),
    ("EAST-1", 1, "east", "4.50", "NZD"),
    ("EAST-2", 31 * 60, "east", "9.00", "NZD"),
    ("EAST-3", 86400 + 3600, "east", "29.00", "NZD"),
]


def test_every_row_carries_the_fee_of_its_car_parks_tariff(
    api_server: ApiServer, parks: Settings
) -> None:
    for n, (plate, seconds, lot, _, _) in enumerate(FEES):
        _stay(plate, seconds, n, lot)

    wait_until(lambda: len(read_rows(api_server.csv)) == len(FEES), timeout=60)

    rows = {row["vehicle_plate"]: row for row in read_rows(api_server.csv)}
    got = {p: (r["fee"], r["currency"], r["lot_id"]) for p, r in rows.items()}
    expected = {p: (fee, cur, lot or "main") for p, _, lot, fee, cur in FEES}
    assert got == expected
    assert {row["match"] for row in rows.values()} == {"exact"}
    assert rows["SKEW-1"]["clock_skew"] == "true"


def test_a_misread_exit_is_matched_fuzzily_and_an_ambiguous_one_is_not(
    api_server: ApiServer, parks: Settings
) -> None:
    fuzzy = _sample("parking_misread_exits_total", result="fuzzy")
    ambiguous = _sample("parking_misread_exits_total", result="ambiguous")
    # One car whose plate the exit camera reads with a B for an 8 ...
    _send("entry", entry_event("in-m1", "ABC-1234", T0))
    # ... and two cars either of which an O at the exit could be.
    _send("entry", entry_event("in-a1", "XY0123", T0))
    _send("entry", entry_event("in-a2", "XYD123", T0))
    wait_until(lambda: runtime.store().counts()["open"] == 3)

    _send("exit", exit_event("out-m1", "A8C 1234", T0 + timedelta(hours=2)))
    _send("exit", exit_event("out-a1", "XYO123", T0 + timedelta(hours=2)))
    wait_until(lambda: len(read_rows(api_server.csv)) == 1)
    wait_until(lambda: runtime.store().counts()["pending"] == 1)

    [row] = read_rows(api_server.csv)
    assert (row["vehicle_plate"], row["match"], row["fee"]) == (
        "ABC-1234",
        "fuzzy",
        "6.00",
    )
    _sweep_until_unmatched(1)
    assert len(_listed(api_server, "/unmatched")) == 1
    [unmatched] = _listed(api_server, "/unmatched")
    assert (unmatched["vehicle_plate"], unmatched["why"]) == ("XYO123", "ambiguous")
    # Neither look-alike was closed by a guess.
    assert runtime.store().counts() == {"open": 2, "pending": 0}
    assert read_rows(api_server.csv) == [row]
    assert _sample("parking_misread_exits_total", result="fuzzy") - fuzzy == 1
    assert _sample("parking_misread_exits_total", result="ambiguous") - ambiguous == 1


def test_occupancy_per_car_park_is_right_after_a_mixed_run(
    api_server: ApiServer, parks: Settings
) -> None:
    # main: ten cars in, four leave, one re-enters, two unknown exits, one
    # exit of an east car read at main's gate (not main's visit).
    for n in range(10):
        _send("entry", entry_event(f"in-m{n}", f"MIX-{n}", T0))
    for n in range(4):
        _send("exit", exit_event(f"out-m{n}", f"MIX-{n}", T0 + timedelta(hours=1)))
    _send("entry", entry_event("in-m9b", "MIX-9", T0 + timedelta(minutes=30)))
    _send("exit", exit_event("out-u1", "NEVER-1", T0))
    _send("exit", exit_event("out-u2", "NEVER-2", T0))
    # east: three cars in, one leaves, another comes: full at three.
    for n in range(3):
        _send("entry", entry_event(f"in-e{n}", f"EAST-{n}", T0, lot_id="east"))
    _send(
        "exit",
        exit_event("out-e0", "EAST-0", T0 + timedelta(hours=1), lot_id="east"),
    )
    _send("entry", entry_event("in-e3", "EAST-3", T0, lot_id="east"))
    _send("exit", exit_event("out-x", "EAST-1", T0 + timedelta(hours=1)))
    wait_until(lambda: len(read_rows(api_server.csv)) == 5, timeout=60)
    wait_until(lambda: runtime.store().counts() == {"open": 9, "pending": 3})

    _sweep_until_unmatched(3)
    result = runtime.sweeper().sweep()

    assert result.occupancy == {"main": 6, "east": 3}
    assert _sample("parking_open_visits", lot="main") == 6
    assert _sample("parking_open_visits", lot="east") == 3
    assert _sample("parking_lot_capacity", lot="east") == 3
    assert _sample("parking_lot_full", lot="east") == 1
    assert _sample("parking_lot_full", lot="main") == 0
    assert _sample("parking_pending_exits", lot="main") == 0
    # parking status reads the same figures from the metrics endpoint.
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=REGISTRY)
    try:
        worker = status.scrape(f"http://127.0.0.1:{port}/metrics")
        view = status.build_view((None, worker), (None, worker))
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert view["lots"]["east"] == {"open": 3.0, "capacity": 3.0, "full": True}
    assert view["lots"]["main"] == {"open": 6.0, "capacity": 1000.0, "full": False}


def test_unmatched_exits_and_orphans_are_listed_by_the_api(
    api_server: ApiServer, parks: Settings
) -> None:
    runtime.configure(parks.model_copy(update={"max_stay_hours": 2 / 3600}))
    # Re-entry without an exit, and an entry older than the open visit.
    _send("entry", entry_event("in-r1", "BACK-1", T0))
    wait_until(lambda: runtime.store().counts()["open"] == 1)
    _send("entry", entry_event("in-r2", "BACK-1", T0 + timedelta(hours=2)))
    _send("entry", entry_event("in-r0", "BACK-1", T0 - timedelta(hours=1)))
    # Two exits of one plate nobody saw enter, which wait side by side (the
    # later one takes nothing from the earlier), and one of the same plate
    # at the other car park.
    _send("exit", exit_event("out-s1", "TWICE-1", T0, lot_id="east"))
    _send("exit", exit_event("out-s2", "TWICE-1", T0 + timedelta(minutes=5)))
    _send(
        "exit",
        exit_event("out-s3", "TWICE-1", T0 + timedelta(minutes=9), lot_id="east"),
    )
    wait_until(lambda: len(_listed(api_server, "/orphans")) == 2)

    # After the grace period and the maximum stay, sweeps hand over the
    # rest: three exits that waited in vain and the visit that never ended.
    def handed_over() -> bool:
        _sweep()
        unmatched = _listed(api_server, "/unmatched")
        return len(unmatched) == 3 and len(_listed(api_server, "/orphans")) == 3

    wait_until(handed_over, timeout=20, interval=0.2)

    unmatched = {
        (u["event_id"], u["lot_id"], u["why"])
        for u in _listed(api_server, "/unmatched")
    }
    orphans = {(o["event_id"], o["cause"]) for o in _listed(api_server, "/orphans")}
    assert unmatched == {
        ("out-s1", "east", "grace_expired"),
        ("out-s2", "main", "grace_expired"),
        ("out-s3", "east", "grace_expired"),
    }
    assert orphans == {
        ("in-r1", "reentry"),
        ("in-r0", "late_entry"),
        ("in-r2", "max_stay"),
    }
    assert read_rows(api_server.csv) == []
    assert runtime.store().waiting_reviews() == []


def test_review_records_survive_an_api_outage_and_are_written_once(
    api_server: ApiServer, parks: Settings
) -> None:
    for n in range(3):
        _send("exit", exit_event(f"out-l{n}", f"LOST-{n}", T0))
    wait_until(lambda: runtime.store().counts()["pending"] == 3)
    api_server.stop()

    _sweep_until_unmatched(3)
    again = _sweep()

    assert (again["posted"], again["waiting"]) == (0, 3)
    assert _sample("parking_review_waiting") == 3
    # A sweep that posted and died before it could forget what it posted:
    # the records are still waiting, and the API must not write them twice.
    api_server.start()
    sink = runtime.sink()
    for item in runtime.store().waiting_reviews()[:2]:
        assert isinstance(item, UnmatchedExit)
        sink.record_unmatched(item)
    delivered = _sweep()
    assert (delivered["posted"], delivered["waiting"]) == (3, 0)
    assert _sweep()["posted"] == 0

    listed = _listed(api_server, "/unmatched")
    assert sorted(u["event_id"] for u in listed) == ["out-l0", "out-l1", "out-l2"]
    assert len(read_rows(api_server.csv.with_name("unmatched.csv"))) == 3
    assert _sample("parking_review_waiting") == 0
