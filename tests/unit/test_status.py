"""``parking status`` per car park, from a scrape of the worker's metrics."""

from __future__ import annotations

from rich.console import Console

from parking.status import Scrape, build_view, render


def _scrape(samples: dict[str, list[tuple[dict[str, str], float]]]) -> Scrape:
    return Scrape("http://worker/metrics", at=10.0, samples=samples)


WORKER = _scrape(
    {
        "parking_open_visits": [({"lot": "main"}, 412.0), ({"lot": "north"}, 40.0)],
        "parking_lot_capacity": [({"lot": "main"}, 1000.0), ({"lot": "north"}, 40.0)],
        "parking_lot_full": [({"lot": "main"}, 0.0), ({"lot": "north"}, 1.0)],
        "parking_misread_exits_total": [
            ({"result": "fuzzy"}, 7.0),
            ({"result": "ambiguous"}, 1.0),
        ],
        "parking_review_waiting": [({}, 3.0)],
    }
)
API = Scrape("http://api/metrics", at=10.0, samples={})


def test_the_view_shows_occupancy_capacity_and_full_per_car_park() -> None:
    view = build_view((None, WORKER), (None, API))

    assert view["lots"] == {
        "main": {"open": 412.0, "capacity": 1000.0, "full": False},
        "north": {"open": 40.0, "capacity": 40.0, "full": True},
    }
    assert view["occupancy"] == 452.0
    assert view["misreads"] == {"fuzzy": 7.0, "ambiguous": 1.0}
    assert view["review_waiting"] == 3.0


def test_the_table_names_a_full_car_park() -> None:
    console = Console(width=120, record=True)

    console.print(render(build_view((None, WORKER), (None, API))))

    text = console.export_text()
    assert "car parks" in text
    [north] = [line for line in text.splitlines() if "north" in line]
    assert "FULL" in north
    [main] = [line for line in text.splitlines() if " main " in line]
    assert "FULL" not in main
    assert "7 matched" in text
