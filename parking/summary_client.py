"""Posts stays and review records to the summary API over kept-alive connections."""

from __future__ import annotations

import http.client
import json
import logging
import select
import threading
import time
from typing import Any, Protocol
from urllib.parse import urlsplit

from parking.errors import SummaryRejected, SummaryUnavailable
from parking.metrics import ParkingMetrics
from parking.review import OrphanedVisit, UnmatchedExit
from parking.stays import Stay

logger = logging.getLogger(__name__)

#: What a server's close of an idle kept-alive connection looks like to the
#: next request on it, before any answer was read.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class SummarySink(Protocol):
    """Where finished stays and review records go.

    Must be idempotent: on ``stay_id`` for stays, on the event id for the rest.
    """

    def record(self, stay: Stay) -> None: ...
    def record_unmatched(self, item: UnmatchedExit) -> None: ...
    def record_orphan(self, item: OrphanedVisit) -> None: ...


class HttpSummarySink:
    """The summary API's client: one kept-alive connection per concurrent post.

    ``http.client`` rather than ``requests``: a post through a requests
    session cost a worker three times the CPU (docs/benchmarks.md), and all
    this client needs is a POST to one host. Retries are the broker's job
    (a task retry frees the worker); only a post on a connection the server
    closed while idle is sent again at once, on a fresh one: posts are
    idempotent by stay id and event id.
    """

    def __init__(
        self,
        base_url: str,
        metrics: ParkingMetrics,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("summary API URL must be http:// or https://")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._metrics = metrics
        self._connect_timeout = min(timeout, 2.0)
        self._timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        # Idle connections, newest last; a thread pool may post concurrently.
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def record(self, stay: Stay) -> None:
        self._post("/summaries", stay.to_json(), f"stay={stay.stay_id}")

    def record_unmatched(self, item: UnmatchedExit) -> None:
        self._post("/unmatched", item.to_json(), f"unmatched={item.exit.event_id}")

    def record_orphan(self, item: OrphanedVisit) -> None:
        self._post("/orphans", item.to_json(), f"orphan={item.entry.event_id}")

    def _post(self, path: str, body: dict[str, Any], what: str) -> None:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        started = time.perf_counter()
        try:
            status, text = self._exchange(self._prefix + path, data)
        except (OSError, http.client.HTTPException) as exc:
            self._metrics.summary_failures.labels("unreachable").inc()
            raise SummaryUnavailable(
                f"summary API unreachable: {type(exc).__name__}"
            ) from exc
        self._metrics.summary_post.observe(time.perf_counter() - started)
        if status in (200, 201):
            return
        if status >= 500 or status in (408, 429):
            self._metrics.summary_failures.labels("server").inc()
            raise SummaryUnavailable(f"summary API answered {status}")
        self._metrics.summary_failures.labels("rejected").inc()
        raise SummaryRejected(
            f"summary API refused {what} status={status} body={text[:200]!r}"
        )

    def _exchange(self, path: str, data: bytes) -> tuple[int, str]:
        conn, reused = self._checkout()
        try:
            try:
                return self._send(conn, path, data)
            except _STALE:
                if not reused:
                    raise
                # Closed by the server between our check and the post.
                conn.close()
                conn, reused = self._connect(), False
                return self._send(conn, path, data)
        except BaseException:
            conn.close()
            raise

    def _send(
        self, conn: http.client.HTTPConnection, path: str, data: bytes
    ) -> tuple[int, str]:
        conn.request("POST", path, data, self._headers)
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        return response.status, text

    def _checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if _still_open(conn):
                return conn, True
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        factory = (
            http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        )
        conn = factory(self._host, self._port, timeout=self._connect_timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self._timeout)
        return conn

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle connection has nothing to read; if it has, the server closed it."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
