"""What the bench publishes, and how it judges a soak's trends."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from parking.events import EventKind, parse_event
from workers.bench import NOOP_TASK, plan_noop, plan_pipeline, waves
from workers.bench_soak import trends


@pytest.mark.parametrize(
    ("count", "ratio", "matched"),
    [
        pytest.param(300, 0.8, 240, id="eighty-percent"),
        pytest.param(7, 0.8, 5, id="rounded-down"),
        pytest.param(50, 1.0, 50, id="all"),
        pytest.param(50, 0.0, 0, id="none"),
    ],
)
def test_plan_has_count_entries_and_exits_and_the_ratio_matched(
    count: int, ratio: float, matched: int
) -> None:
    plan = plan_pipeline(count, ratio, lanes=3, token="AB12")
    items = [item for lane in plan.lanes for item in lane]

    assert sum(item.kind is EventKind.ENTRY for item in items) == count
    assert sum(item.kind is EventKind.EXIT for item in items) == count
    assert len(plan.matched) == matched
    assert len({item.event_id for item in items}) == 2 * count


def test_every_exit_follows_its_entry_in_the_same_lane() -> None:
    plan = plan_pipeline(200, 0.8, lanes=4, token="CD34")

    for lane in plan.lanes:
        seen: set[str] = set()
        for item in lane:
            if item.kind is EventKind.ENTRY:
                seen.add(item.plate)
            elif item.plate in plan.matched:
                assert item.plate in seen


def test_unmatched_exits_carry_plates_that_never_entered() -> None:
    plan = plan_pipeline(100, 0.8, lanes=2, token="EF56")
    items = [item for lane in plan.lanes for item in lane]
    entered = {item.plate for item in items if item.kind is EventKind.ENTRY}
    strangers = {
        item.plate
        for item in items
        if item.kind is EventKind.EXIT and item.plate not in plan.matched
    }

    assert len(strangers) == 20
    assert not strangers & entered


def test_planned_events_are_valid_wire_format() -> None:
    plan = plan_pipeline(10, 0.8, lanes=1, token="GH78")
    now = datetime.now(UTC)
    for item in plan.lanes[0]:
        assert item.kind is not None
        (event,) = item.args(now)
        parsed = parse_event(event, item.kind)
        assert parsed.plate == item.plate
        assert parsed.at == now


def test_phased_waves_send_every_entry_before_any_exit_in_lane_order() -> None:
    plan = plan_pipeline(300, 0.8, 4, "t")

    entries, exits = waves(plan, "phased")

    assert [len(lane) for lane in entries] == [75] * 4
    assert all(i.kind is EventKind.ENTRY for lane in entries for i in lane)
    assert all(i.kind is EventKind.EXIT for lane in exits for i in lane)
    for lane, first, then in zip(plan.lanes, entries, exits, strict=True):
        assert [i for i in lane if i.kind is EventKind.ENTRY] == first
        assert [i for i in lane if i.kind is EventKind.EXIT] == then
    assert waves(plan, "interleaved") == [plan.lanes]


def test_noop_plan_splits_over_the_entry_and_exit_queues() -> None:
    plan = plan_noop(101, lanes=4)
    items = [item for lane in plan.lanes for item in lane]

    assert len(items) == 101
    assert {item.task for item in items} == {NOOP_TASK}
    assert sum(item.queue == "entry" for item in items) == 51
    assert sum(item.queue == "exit" for item in items) == 50
    assert all(item.args(datetime.now(UTC)) == () for item in items)


def _point(t: float, keys: int, rss: float) -> dict[str, float]:
    return {"t": t, "keys": keys, "keys_without_ttl": 400, "worker_rss": rss}


def test_trends_skip_the_warm_up_and_tell_flat_from_growing() -> None:
    mb = 2**20
    series = [_point(0, 0, 50 * mb)]  # warm-up: left out
    series += [_point(t, 1000 + 10 * t, 200 * mb + t * 100) for t in range(60, 600, 30)]

    found = trends(series, warmup=60)

    assert found["samples"] == 18
    assert found["keys"]["per_hour"] == pytest.approx(36_000)
    assert found["keys"]["flat"] is False
    assert found["keys_without_ttl"]["flat"] is True
    assert found["worker_rss"]["flat"] is True
    assert found["api_rss"]["flat"] is None


def test_trends_compare_the_first_and_last_stretch_and_split_keys_by_ttl() -> None:
    mb = 2**20
    # 30 minutes after a 60 s warm-up: keys with a TTL grow 10 a second,
    # the 400 without stay, and the worker's memory levels off at 210 MB.
    series = [
        {
            "t": t,
            "keys": 400 + 10 * t,
            "keys_without_ttl": 400,
            "worker_rss": min(200 * mb + t * 10_000, 210 * mb),
        }
        for t in range(60, 1861, 30)
    ]

    found = trends(series, warmup=60)

    assert found["window_seconds"] == 300
    with_ttl = found["keys_with_ttl"]
    # Means of t = 60..360 and t = 1560..1860, eleven samples each.
    assert with_ttl["first_window_mean"] == pytest.approx(2100)
    assert with_ttl["last_window_mean"] == pytest.approx(17_100)
    assert with_ttl["per_hour"] == pytest.approx(36_000)
    assert with_ttl["flat"] is False
    assert found["keys_without_ttl"]["first_window_mean"] == 400
    assert found["keys_without_ttl"]["last_window_mean"] == 400
    assert found["keys_without_ttl"]["flat"] is True
    rss = found["worker_rss"]
    assert rss["last_window_mean"] == 210 * mb
    assert rss["first_window_mean"] < rss["last_window_mean"]
    assert rss["flat"] is True


def test_trends_of_a_short_soak_compare_thirds() -> None:
    series = [
        {"t": t, "keys": 100, "keys_without_ttl": 10, "worker_rss": 1.0}
        for t in range(0, 91, 10)
    ]

    found = trends(series, warmup=0)

    assert found["window_seconds"] == 30
    assert found["keys_with_ttl"]["first_window_mean"] == 90
