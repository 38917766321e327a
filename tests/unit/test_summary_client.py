"""The summary client over a real local HTTP server: keep-alive, timeouts, errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from parking.errors import SummaryRejected, SummaryUnavailable
from parking.metrics import ParkingMetrics
from parking.stays import Stay, Visit
from parking.summary_client import HttpSummarySink

ENTERED = datetime(2024, 9, 11, 21, 0, tzinfo=UTC)


class Recorder(ThreadingHTTPServer):
    """Answers posts with ``status`` and remembers what reached it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status = 201
        self.stall = threading.Event()
        #: Close each connection after its answer, without saying so first,
        #: as a server does with a kept-alive connection once it idled.
        self.drop_idle = False
        self.connections = 0
        self.posts: list[tuple[str, dict[str, str], Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps the connection open between posts
    server: Recorder

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.stall.is_set():
            self.server.stall.wait(5)
            return
        self.server.posts.append((self.path, dict(self.headers), json.loads(body)))
        self.send_response(self.server.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
        if self.server.drop_idle:
            self.close_connection = True

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder = Recorder()
    thread = threading.Thread(target=recorder.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield recorder
    recorder.stall.clear()
    recorder.shutdown()
    recorder.server_close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def _sink(
    url: str, registry: CollectorRegistry, timeout: float = 5.0
) -> HttpSummarySink:
    return HttpSummarySink(url, ParkingMetrics(registry), "a-token", timeout)


def _stay(n: int) -> Stay:
    entry = Visit(f"e{n}", f"AB{n}", ENTERED)
    return Stay.between(entry, Visit(f"x{n}", f"AB{n}", ENTERED + timedelta(hours=1)))


def _failures(registry: CollectorRegistry, cause: str) -> float:
    value = registry.get_sample_value(
        "parking_summary_post_failures_total", {"cause": cause}
    )
    return value or 0.0


def test_posts_share_one_kept_alive_connection_and_carry_the_token(
    server: Recorder, registry: CollectorRegistry
) -> None:
    sink = _sink(server.url, registry)
    for n in range(5):
        sink.record(_stay(n))

    assert server.connections == 1
    assert [path for path, _, _ in server.posts] == ["/summaries"] * 5
    assert {h["Authorization"] for _, h, _ in server.posts} == {"Bearer a-token"}
    assert [body["stay_id"] for _, _, body in server.posts] == [
        _stay(n).stay_id for n in range(5)
    ]
    assert registry.get_sample_value("parking_summary_post_seconds_count") == 5


def test_a_connection_the_server_closed_while_idle_is_replaced(
    server: Recorder, registry: CollectorRegistry
) -> None:
    server.drop_idle = True
    sink = _sink(server.url, registry)
    for n in range(3):
        sink.record(_stay(n))

    assert len(server.posts) == 3
    assert server.connections == 3
    assert _failures(registry, "unreachable") == 0


def test_concurrent_posts_each_get_a_connection_and_reuse_it(
    server: Recorder, registry: CollectorRegistry
) -> None:
    sink = _sink(server.url, registry)

    def post_ten(first: int) -> None:
        for n in range(first, first + 10):
            sink.record(_stay(n))

    threads = [threading.Thread(target=post_ten, args=(10 * t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({body["stay_id"] for _, _, body in server.posts}) == 40
    assert server.connections <= 4


def test_an_api_that_does_not_answer_times_out_as_unavailable(
    server: Recorder, registry: CollectorRegistry
) -> None:
    server.stall.set()
    sink = _sink(server.url, registry, timeout=0.3)

    with pytest.raises(SummaryUnavailable, match="unreachable"):
        sink.record(_stay(1))
    assert _failures(registry, "unreachable") == 1


@pytest.mark.parametrize(
    ("status", "error", "cause"),
    [
        pytest.param(503, SummaryUnavailable, "server", id="503-retried"),
        pytest.param(429, SummaryUnavailable, "server", id="429-retried"),
        pytest.param(422, SummaryRejected, "rejected", id="422-dead-lettered"),
        pytest.param(401, SummaryRejected, "rejected", id="401-dead-lettered"),
    ],
)
def test_refusals_are_told_apart_and_counted(
    server: Recorder,
    registry: CollectorRegistry,
    status: int,
    error: type[Exception],
    cause: str,
) -> None:
    server.status = status

    with pytest.raises(error):
        _sink(server.url, registry).record(_stay(1))
    assert _failures(registry, cause) == 1


def test_nobody_listening_is_unavailable(registry: CollectorRegistry) -> None:
    server = Recorder()
    url = server.url
    server.server_close()  # the port is free again: nothing answers there

    with pytest.raises(SummaryUnavailable):
        _sink(url, registry).record(_stay(1))
    assert _failures(registry, "unreachable") == 1
