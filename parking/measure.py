"""Measuring tools for ``parking bench``: percentiles, trends, memory, the CSV.

Nothing here knows about Celery; the benchmark's Celery side feeds these.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import math
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

#: One Prometheus sample: its name and its sorted labels.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[SampleKey, float]


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of sorted values, interpolated between ranks."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def histogram_quantile(
    buckets: Sequence[tuple[float, float]], q: float
) -> float | None:
    """The q-quantile of a cumulative histogram, as Prometheus estimates it.

    ``buckets`` are (upper bound, cumulative count) in ascending order. The
    value is interpolated linearly inside the bucket holding the rank, so it
    is only as fine as the bucket bounds; a rank in the ``+Inf`` bucket gives
    the highest finite bound.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            if cumulative == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def share_within(buckets: Sequence[tuple[float, float]], bound: float) -> float | None:
    """The exact share of observations at or under a bucket bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    for upper, cumulative in buckets:
        if math.isclose(upper, bound):
            return cumulative / buckets[-1][1]
    return None


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than two x values."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


# -- Prometheus samples ------------------------------------------------------


def _key(name: str, labels: dict[str, str]) -> SampleKey:
    return name, tuple(sorted(labels.items()))


def samples_from_dir(path: Path) -> Samples:
    """What a multiprocess ``/metrics`` endpoint on this directory would serve."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return _flatten(registry.collect())


def counters_from_dir(path: Path) -> Samples:
    """The counters alone of a multiprocess directory: a tenth of the cost of
    every sample (the histograms' buckets are most of the files), for a
    progress check several times a second beside what it measures."""
    files = sorted(str(found) for found in path.glob("counter_*.db"))
    merge = MultiProcessCollector.merge
    return _flatten(merge(files, accumulate=True))  # type: ignore[no-untyped-call]


def samples_from_url(url: str, timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        text = response.read().decode("utf-8")
    return _flatten(text_string_to_metric_families(text))


def _flatten(families: Iterable[Any]) -> Samples:
    samples: Samples = {}
    for family in families:
        for sample in family.samples:
            key = _key(sample.name, sample.labels)
            samples[key] = samples.get(key, 0.0) + float(sample.value)
    return samples


def difference(after: Samples, before: Samples) -> Samples:
    """Counters and histograms over an interval (both are cumulative)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(samples: Samples, name: str, **match: str) -> float:
    """The sum of one sample name over the series whose labels match."""
    wanted = set(match.items())
    return sum(
        value
        for (sample, labels), value in samples.items()
        if sample == name and wanted <= set(labels)
    )


def buckets(
    samples: Samples, histogram: str, **match: str
) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets, summed over the matching series."""
    wanted = set(match.items())
    found: dict[float, float] = {}
    for (sample, labels), value in samples.items():
        if sample != f"{histogram}_bucket" or not wanted <= set(labels):
            continue
        bound = float(dict(labels)["le"])
        found[bound] = found.get(bound, 0.0) + value
    return sorted(found.items())


# -- Memory -----------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _parents() -> dict[int, int]:
    """Every process's parent, read from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii") as handle:
                stat = handle.read()
        except OSError:  # the process ended while we looked
            continue
        # The command name may hold spaces and brackets: fields follow the last ')'.
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(roots: Sequence[int]) -> int | None:
    """Resident memory of these processes and all their descendants, in bytes.

    A sum of RSS counts pages that forked children still share with their
    parent once per process, so a prefork pool reads a little high.
    ``None`` where there is no /proc to read.
    """
    if not roots or not os.path.isdir("/proc"):
        return None
    return sum(_rss(pid) for pid in tree(roots))


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def tree_cpu(roots: Sequence[int]) -> float | None:
    """CPU seconds used so far by these processes and their live descendants."""
    if not roots or not os.path.isdir("/proc"):
        return None
    return sum(_cpu(pid) for pid in tree(roots))


def tree(roots: Sequence[int]) -> set[int]:
    """These processes and all their descendants (Linux)."""
    parents = _parents()
    members = {pid for pid in roots if pid in parents}
    grew = True
    while grew:
        fresh = {pid for pid, ppid in parents.items() if ppid in members} - members
        members |= fresh
        grew = bool(fresh)
    return members


def listener_pid(port: int) -> int | None:
    """The process listening on this local TCP port, if this machine runs it
    and /proc shows it (Linux; another user's process needs root)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle)  # the header
                for line in handle:
                    fields = line.split()
                    # local address is ADDR:PORT in hex; state 0A is LISTEN
                    if (
                        fields[3] == "0A"
                        and int(fields[1].rpartition(":")[2], 16) == port
                    ):
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) in inodes:
                    return int(entry.name)
        except OSError:  # gone, or not ours to look at
            continue
    return None


def machine_cpu() -> float | None:
    """CPU seconds the whole machine has been busy since boot (all cores):
    over a phase, its difference ÷ the phase's length is the cores in use."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]:
    # guest time is already inside user, so only the first eight count.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / _TICKS


class MemoryPeaks:
    """The highest resident memory seen for each named process tree."""

    def __init__(self, trees: Mapping[str, Sequence[int]]) -> None:
        self._trees = {name: list(pids) for name, pids in trees.items() if pids}
        self.peaks: dict[str, int] = {}
        self.latest: dict[str, int] = {}

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each tree, and of this process."""
        found = {name: tree_cpu(pids) for name, pids in self._trees.items()}
        # This process alone: the trees above are its children.
        found["bench"] = _cpu(os.getpid())
        found["machine"] = machine_cpu()
        return {name: value for name, value in found.items() if value is not None}

    def sample(self) -> None:
        for name, pids in self._trees.items():
            rss = tree_rss(pids)
            if rss is None:
                continue
            self.latest[name] = rss
            self.peaks[name] = max(rss, self.peaks.get(name, 0))


# -- Redis ------------------------------------------------------------------


def redis_stats(client: redis.Redis, sample_keys: int = 20_000) -> dict[str, Any]:
    """Key counts of the client's database and an estimate of its memory.

    ``used_memory`` is the whole instance's, shared with other databases;
    ``db_bytes_estimate`` adds up ``MEMORY USAGE`` of every key when there
    are at most ``sample_keys``, and otherwise scales the mean of that many
    to the key count. (Keys differ in size by orders of magnitude: the
    store's time slices hold thousands of records each, beside one-visit
    hashes, so a small sample would miss or overweight them.)
    """
    db = int(client.connection_pool.connection_kwargs.get("db", 0))
    keyspace = client.info("keyspace").get(f"db{db}", {})
    keys = int(keyspace.get("keys", 0))
    names = list(itertools.islice(client.scan_iter(count=1000), sample_keys))
    usages: list[int] = []
    for start in range(0, len(names), 1000):
        pipe = client.pipeline(transaction=False)
        for name in names[start : start + 1000]:
            pipe.memory_usage(name)
        usages += [int(usage) for usage in pipe.execute() if usage is not None]
    if not usages:
        estimate = 0
    elif len(names) < sample_keys:
        estimate = sum(usages)
    else:
        estimate = round(sum(usages) / len(usages) * keys)
    return {
        "keys": keys,
        "keys_with_ttl": int(keyspace.get("expires", 0)),
        "keys_without_ttl": keys - int(keyspace.get("expires", 0)),
        "used_memory": int(client.info("memory")["used_memory"]),
        "db_bytes_estimate": estimate,
    }


# -- The stays CSV ----------------------------------------------------------


class CsvTail:
    """Rows appended to a CSV, each stamped with the wall time it was first seen.

    Only whole lines are taken, so a row the writer has half written is read
    on a later poll. With ``from_end`` the rows already in the file are skipped.
    """

    def __init__(self, path: Path, from_end: bool = False) -> None:
        self.path = path
        self.header: list[str] | None = None
        self.rows: list[tuple[float, list[str]]] = []
        self._offset = 0
        self._lock = threading.Lock()
        if from_end and path.exists():
            with open(path, "rb") as handle:
                self.header = next(csv.reader([handle.readline().decode()]), None)
            self._offset = path.stat().st_size

    def poll(self) -> int:
        """Read what was appended since the last poll; the number of new rows."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return 0
        whole = data[: data.rfind(b"\n") + 1]
        if not whole:
            return 0
        seen = time.time()
        self._offset += len(whole)
        lines = whole.decode("utf-8").splitlines()
        parsed = list(csv.reader(lines))
        if self.header is None:
            self.header, parsed = parsed[0], parsed[1:]
        with self._lock:
            self.rows.extend((seen, row) for row in parsed)
        return len(parsed)

    def snapshot(self, start: int = 0) -> list[tuple[float, list[str]]]:
        """The rows seen so far, from the ``start``-th on."""
        with self._lock:
            return self.rows[start:]

    def counter(self, plates: set[str], start: int = 0) -> Callable[[], int]:
        """A running count of the rows, from the ``start``-th on, of these plates.

        Each call looks only at the rows that came since the last one: polled
        many times a second, it must not cost the machine it measures.
        """
        cursor, count = start, 0

        def count_rows() -> int:
            nonlocal cursor, count
            if self.header is None:
                return 0
            fresh = self.snapshot(cursor)
            cursor += len(fresh)
            column = self.column("vehicle_plate")
            count += sum(1 for _, row in fresh if row[column] in plates)
            return count

        return count_rows

    def column(self, name: str) -> int:
        if self.header is None:
            raise LookupError(f"{self.path} has no header yet")
        return self.header.index(name)


class Poller(threading.Thread):
    """Calls a function every ``interval`` seconds until stopped."""

    def __init__(
        self, action: Callable[[], object], interval: float, name: str
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._action = action
        self._interval = interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self._interval):
            self._action()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)
        self._action()


# -- HTTP load -------------------------------------------------------------


async def _post_all(
    host: str, port: int, requests: list[bytes], connections: int
) -> list[int]:
    statuses: list[int] = []
    queue = iter(requests)

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for request in queue:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status_line, *headers = head.decode("latin-1").split("\r\n")
                length = 0
                for header in headers:
                    name, _, value = header.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                statuses.append(int(status_line.split()[1]))
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return statuses


def post_json_many(
    url: str,
    bodies: Sequence[bytes],
    connections: int = 16,
    token: str | None = None,
) -> tuple[float, list[int]]:
    """POST each body over kept-alive HTTP/1.1 connections; (seconds, statuses).

    A bare asyncio client rather than a library so that the client costs far
    less CPU than the server it measures on a machine they share.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
        "Content-Type: application/json\r\nContent-Length: "
    ).encode("latin-1")
    requests = [head + b"%d\r\n\r\n" % len(body) + body for body in bodies]
    started = time.perf_counter()
    statuses = asyncio.run(_post_all(host, port, requests, connections))
    return time.perf_counter() - started, statuses


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    memory = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
        "load_average": [round(value, 2) for value in load] if load else None,
    }
