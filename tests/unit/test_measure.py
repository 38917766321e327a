"""The benchmark's arithmetic and samplers, without any service."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parking import measure

INF = math.inf


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        pytest.param([], 0.5, None, id="empty"),
        pytest.param([7.0], 0.99, 7.0, id="one-value"),
        pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], 0.5, 3.0, id="median"),
        pytest.param([0.0, 10.0], 0.25, 2.5, id="interpolated"),
        pytest.param([1.0, 2.0, 3.0], 1.0, 3.0, id="maximum"),
    ],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert measure.percentile(values, q) == expected


def test_histogram_quantile_interpolates_inside_the_bucket_of_the_rank() -> None:
    # 10 under 1 ms, 80 between 1 and 2 ms, 10 between 2 and 5 ms.
    buckets = [(0.001, 10.0), (0.002, 90.0), (0.005, 100.0), (INF, 100.0)]

    assert measure.histogram_quantile(buckets, 0.5) == pytest.approx(0.0015)
    assert measure.histogram_quantile(buckets, 0.95) == pytest.approx(0.0035)
    assert measure.histogram_quantile(buckets, 0.05) == pytest.approx(0.0005)


def test_histogram_quantile_in_the_inf_bucket_is_the_highest_bound() -> None:
    buckets = [(0.001, 1.0), (0.01, 2.0), (INF, 100.0)]

    assert measure.histogram_quantile(buckets, 0.99) == 0.01


def test_histogram_quantile_of_nothing_is_none() -> None:
    assert measure.histogram_quantile([(0.1, 0.0), (INF, 0.0)], 0.5) is None
    assert measure.histogram_quantile([], 0.5) is None


def test_share_within_reads_the_exact_bucket() -> None:
    buckets = [(0.001, 10.0), (0.003, 99.0), (INF, 100.0)]

    assert measure.share_within(buckets, 0.003) == pytest.approx(0.99)
    assert measure.share_within(buckets, 0.004) is None


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        pytest.param([(0.0, 5.0), (10.0, 5.0), (20.0, 5.0)], 0.0, id="flat"),
        pytest.param([(0.0, 0.0), (1.0, 2.0), (2.0, 4.0)], 2.0, id="rising"),
        pytest.param([(0.0, 1.0)], None, id="one-point"),
        pytest.param([(3.0, 1.0), (3.0, 9.0)], None, id="no-spread"),
    ],
)
def test_slope(points: list[tuple[float, float]], expected: float | None) -> None:
    assert measure.slope(points) == expected


def test_samples_are_differenced_matched_and_bucketed() -> None:
    before: measure.Samples = {
        ("jobs_total", (("kind", "a"),)): 5.0,
        ("t_bucket", (("kind", "a"), ("le", "0.1"))): 1.0,
    }
    after: measure.Samples = {
        ("jobs_total", (("kind", "a"),)): 8.0,
        ("jobs_total", (("kind", "b"),)): 4.0,
        ("t_bucket", (("kind", "a"), ("le", "0.1"))): 3.0,
        ("t_bucket", (("kind", "a"), ("le", "+Inf"))): 6.0,
        ("t_bucket", (("kind", "b"), ("le", "+Inf"))): 9.0,
    }
    delta = measure.difference(after, before)

    assert measure.total(delta, "jobs_total") == 7.0
    assert measure.total(delta, "jobs_total", kind="a") == 3.0
    assert measure.buckets(delta, "t", kind="a") == [(0.1, 2.0), (INF, 6.0)]


def test_csv_tail_takes_whole_lines_only_and_stamps_them(tmp_path: Path) -> None:
    path = tmp_path / "stays.csv"
    tail = measure.CsvTail(path)
    assert tail.poll() == 0  # no file yet

    path.write_text("stay_id,vehicle_plate\ns1,AB1\ns2,A")
    assert tail.poll() == 1
    with open(path, "a") as handle:
        handle.write("B2\n")
    assert tail.poll() == 1

    rows = tail.snapshot()
    assert [row for _, row in rows] == [["s1", "AB1"], ["s2", "AB2"]]
    assert rows[0][0] <= rows[1][0]
    assert tail.column("vehicle_plate") == 1


def test_csv_tail_from_the_end_skips_rows_already_there(tmp_path: Path) -> None:
    path = tmp_path / "stays.csv"
    path.write_text("stay_id,vehicle_plate\nold,X1\n")
    tail = measure.CsvTail(path, from_end=True)
    with open(path, "a") as handle:
        handle.write("new,Y2\n")

    assert tail.poll() == 1
    assert [row for _, row in tail.snapshot()] == [["new", "Y2"]]


def test_tree_rss_counts_this_process() -> None:
    rss = measure.tree_rss([os.getpid()])

    assert rss is not None
    assert rss > 10 * 2**20


def test_memory_peaks_keep_the_highest_sample() -> None:
    peaks = measure.MemoryPeaks({"me": [os.getpid()], "nobody": []})
    peaks.sample()
    first = peaks.peaks["me"]
    ballast = b"x" * (64 * 2**20)  # written, so resident
    peaks.sample()
    del ballast
    peaks.sample()

    assert peaks.peaks["me"] >= first + 60 * 2**20
    assert peaks.latest["me"] < peaks.peaks["me"]
    assert "nobody" not in peaks.peaks


def test_row_counter_counts_only_new_rows_of_the_plates(tmp_path: Path) -> None:
    path = tmp_path / "stays.csv"
    path.write_text("stay_id,vehicle_plate\ns0,OLD\n")
    tail = measure.CsvTail(path)
    tail.poll()
    count = tail.counter({"A1", "B2"}, start=1)
    assert count() == 0

    with open(path, "a") as handle:
        handle.write("s1,A1\ns2,ZZ\ns3,B2\n")
    tail.poll()
    assert count() == 2
    assert count() == 2  # nothing new


def test_listener_pid_finds_the_process_that_listens_on_a_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        # Bound but not listening is not a server yet.
        assert measure.listener_pid(port) is None
        server.listen()
        assert measure.listener_pid(port) == os.getpid()
    assert measure.listener_pid(port) is None


def test_machine_cpu_grows_while_this_process_works() -> None:
    before = measure.machine_cpu()
    assert before is not None
    assert before > 0
    spent = time.process_time()
    while time.process_time() - spent < 0.2:
        pass
    after = measure.machine_cpu()
    assert after is not None
    # Every core's busy time counts, this process's 0.2 s among it
    # (in ticks of 10 ms, hence the margin).
    assert after - before >= 0.15


def test_counters_from_dir_read_the_counters_of_every_process(tmp_path: Path) -> None:
    # Multiprocess mode is chosen when prometheus_client is imported, so
    # the writers are processes of their own, as a worker's children are.
    writer = (
        "from prometheus_client import Counter, Histogram\n"
        "Counter('done', 'd', ['kind']).labels('entry').inc(3)\n"
        "Histogram('took_seconds', 't').observe(0.1)\n"
    )
    for _ in range(2):
        subprocess.run(
            [sys.executable, "-c", writer],
            env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
            check=True,
        )

    counters = measure.counters_from_dir(tmp_path)
    everything = measure.samples_from_dir(tmp_path)

    assert measure.total(counters, "done_total", kind="entry") == 6
    assert measure.total(everything, "done_total", kind="entry") == 6
    assert not any(name.startswith("took_seconds") for name, _ in counters)
    assert measure.total(everything, "took_seconds_count") == 2
