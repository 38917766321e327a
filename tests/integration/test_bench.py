"""``parking bench`` as a user runs it: real worker, API, broker and Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.messaging import Producer

from parking import measure
from parking.settings import get_settings
from tests.services import wait_until
from workers import topology
from workers.bench_services import queue_state

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ptest-bench"


@pytest.fixture(autouse=True)
def _work_dirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bench that fails, or is killed, keeps its work directory: here it
    # lands in the test's own temporary directory, not in /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def _run_bench(
    *args: str, timeout: float = 280, **env: str
) -> subprocess.CompletedProcess[bytes]:
    db = str(get_settings().redis_db_store)
    command = [
        sys.executable, "-m", "parking", "bench",
        "--redis-db", db, "--queue-prefix", PREFIX, *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=ROOT, env=os.environ | env, capture_output=True, timeout=timeout
    )


def _bench(
    *args: str, timeout: float = 280, **env: str
) -> tuple[int, dict[str, Any], str]:
    done = _run_bench("--json", *args, timeout=timeout, **env)
    stderr = done.stderr.decode(errors="replace")
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, stderr


def test_the_table_is_the_output_unless_json_is_asked_for() -> None:
    table = _run_bench("--api-only", "--api-rows", "300")
    as_json = _run_bench("--api-only", "--api-rows", "300", "--json")

    assert table.returncode == 0, table.stderr.decode()[-3000:]
    assert b"rows/s" in table.stdout
    assert b"rows/s" not in table.stderr
    # With --json, stdout is the JSON alone; the table goes to stderr.
    assert json.loads(as_json.stdout)["api"]["written"] == 300
    assert b"rows/s" in as_json.stderr


def _ordered(figures: dict[str, Any]) -> bool:
    return bool(figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"])


def test_small_run_loses_and_doubles_no_row_and_reports_sane_figures() -> None:
    code, report, stderr = _bench(
        "-n", "300", "--baseline", "400", "--api-rows", "200",
        "--order", "interleaved",
    )  # fmt: skip

    assert code == 0, stderr[-3000:]
    pipeline = report["pipeline"]
    assert pipeline["rows"] == {
        "expected": 240, "written": 240, "lost": 0, "duplicated": 0, "unexpected": 0,
    }  # fmt: skip
    # An exit may overtake its entry (two queues): it waits as pending and
    # the entry completes the stay.
    outcomes = pipeline["outcomes"]
    overtaken = outcomes.get("entry/matched", 0)
    assert set(outcomes) <= {
        "entry/opened", "entry/matched", "exit/matched", "exit/pending",
    }  # fmt: skip
    assert outcomes["entry/opened"] + overtaken == 300
    assert outcomes["exit/matched"] + overtaken == 240
    assert outcomes["exit/pending"] - overtaken == 60
    assert report["baseline"]["completed"] == 400
    assert report["baseline"]["tasks_per_second"] > 0
    assert pipeline["events_per_second"] > 0
    assert pipeline["ratio_to_baseline"] > 0
    for kind in ("entry", "exit"):
        figures = pipeline["processing"][kind]
        assert figures["count"] == 300
        assert _ordered(figures), figures
    e2e = pipeline["end_to_end_ms"]
    assert e2e["count"] == 240
    assert 0 < e2e["p50"] <= e2e["p99"] <= e2e["max"]
    assert (
        pipeline["memory_peak_bytes"]["worker"]
        > pipeline["memory_peak_bytes"]["api"]
        > 0
    )
    assert pipeline["redis_before"]["keys"] == 0
    assert pipeline["redis_after"]["keys"] > 0
    assert report["api"]["written"] == 200
    assert {t["name"] for t in report["targets"]} >= {
        "events_per_second",
        "exit_p99_ms",
    }


def test_plain_path_in_phases_opens_every_visit_before_any_exit() -> None:
    # Bare JSON on the raw queues, consumed by `parking ingest` processes;
    # the exits are sent only once every entry has been processed.
    code, report, stderr = _bench(
        "-n", "300", "--baseline", "50", "--api-rows", "0", "--path", "plain",
    )  # fmt: skip

    assert code == 0, stderr[-3000:]
    pipeline = report["pipeline"]
    assert pipeline["order"] == "phased"
    assert pipeline["rows"] == {
        "expected": 240, "written": 240, "lost": 0, "duplicated": 0, "unexpected": 0,
    }  # fmt: skip
    assert pipeline["outcomes"] == {
        "entry/opened": 300, "exit/matched": 240, "exit/pending": 60,
    }  # fmt: skip
    processing = pipeline["processing"]
    assert processing["entry_opening"]["count"] == 300
    assert processing["entry_completing"]["count"] == 0
    # The RabbitMQ and Redis of this machine are local: their CPU is counted,
    # and the whole machine's is more than the parts measured.
    cpu = pipeline["cpu_ms_per_event"]
    assert cpu["broker"] > 0
    assert cpu["redis"] > 0
    assert cpu["machine"] > cpu["worker"] + cpu["api"]
    assert 0 < pipeline["cores_busy"] <= (os.cpu_count() or 1)


def test_bench_leaves_its_database_empty_and_its_queues_gone() -> None:
    code, _, stderr = _bench(
        "-n", "20", "--baseline", "20", "--api-rows", "0", "--path", "plain"
    )  # fmt: skip

    assert code == 0, stderr[-3000:]
    settings = get_settings()
    client = redis.Redis.from_url(
        settings.redis_connection_url(settings.redis_db_store)
    )
    assert client.dbsize() == 0
    assert queue_state(f"{PREFIX}.entry") is None
    assert queue_state(f"{PREFIX}.exit") is None
    assert queue_state(f"{PREFIX}.vehicle_entry") is None
    assert queue_state(f"{PREFIX}.vehicle_exit") is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_bench_leaves_no_worker_or_api_behind() -> None:
    db = str(get_settings().redis_db_store)
    command = [
        sys.executable, "-m", "parking", "bench", "-n", "100000",
        "--redis-db", db, "--queue-prefix", PREFIX,
    ]  # fmt: skip
    bench = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    started: dict[str, int] = {}
    try:
        assert bench.stderr is not None
        for line in bench.stderr:
            match = re.search(r"bench started name=(\w+) pid=(\d+)", line)
            if match:
                started[match[1]] = int(match[2])
            if "worker1" in started:
                break
        assert set(started) == {"api", "worker1"}
    finally:
        bench.kill()
        bench.wait()

    wait_until(lambda: not any(_alive(pid) for pid in started.values()), timeout=60)


def test_bench_refuses_a_database_that_holds_keys() -> None:
    settings = get_settings()
    client = redis.Redis.from_url(
        settings.redis_connection_url(settings.redis_db_store)
    )
    client.set("someone-else", "1")

    code, report, stderr = _bench("-n", "10")

    assert code != 0
    assert report == {}
    assert "--flush" in stderr
    assert client.get("someone-else") == b"1"


def test_short_soak_keeps_every_stay_and_samples_the_series() -> None:
    # A short grace and frequent sweeps make the warm-up fit in the soak.
    code, report, stderr = _bench(
        "--soak", "12", "--rate", "30", "--dwell", "2", "--sample-every", "3",
        PARKING_GRACE_SECONDS="2", PARKING_SWEEP_INTERVAL_SECONDS="1",
    )  # fmt: skip

    assert code == 0, stderr[-3000:]
    soak = report["soak"]
    assert soak["drained"] is True
    assert soak["rows"]["expected"] > 100
    assert soak["rows"]["lost"] == soak["rows"]["duplicated"] == 0
    assert len(soak["series"]) >= 4
    assert all(point["worker_rss"] > 0 for point in soak["series"])
    assert soak["series"][-1]["rows"] == soak["rows"]["expected"]
    assert soak["trends"]["worker_rss"]["per_hour"] is not None


def test_a_bench_that_finds_another_refuses_before_touching_its_queues() -> None:
    settings = get_settings().model_copy(update={"queue_prefix": PREFIX})
    queues = {queue.name: queue for queue in topology.task_queues(settings)}
    with Connection(settings.broker_connection_url) as connection:
        channel = connection.channel()
        entry = queues[f"{PREFIX}.entry"].bind(channel)
        exit_ = queues[f"{PREFIX}.exit"].bind(connection.default_channel)
        entry.declare()
        exit_.declare()
        exit_.purge()
        producer = Producer(connection.default_channel)
        for n in range(5):
            producer.publish({"n": n}, routing_key=exit_.name, delivery_mode=2)
        entry.consume(callback=lambda *a: None)  # the other bench's worker
        try:
            code, _, stderr = _bench("-n", "20", "--baseline", "20", "--api-rows", "0")
        finally:
            channel.close()
        try:
            assert code == 1
            assert "already has consumers" in stderr
            assert "Traceback" not in stderr
            assert exit_.queue_declare(passive=True).message_count == 5
        finally:
            for queue in queues.values():
                queue.bind(connection.default_channel).delete()


def test_redis_memory_counts_every_key_when_a_few_dwarf_the_rest(
    store_redis: redis.Redis,
) -> None:
    # One big hash (a store's time slice) among many one-field keys.
    store_redis.hset("big", mapping={f"event{n}": "x" * 100 for n in range(5000)})
    for n in range(99):
        store_redis.set(f"small{n}", "x")
    usages = [store_redis.memory_usage(key) or 0 for key in store_redis.scan_iter()]

    whole = measure.redis_stats(store_redis)
    sampled = measure.redis_stats(store_redis, sample_keys=10)

    assert whole["keys"] == 100
    assert whole["db_bytes_estimate"] == sum(usages)
    # A sample scales its mean: the big key is in it or not, a wide miss
    # either way, which is why the bench reads every key it can.
    assert sampled["db_bytes_estimate"] != sum(usages)
