"""Posts stays and review records to the summary API over one HTTP session."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from parking.errors import SummaryRejected, SummaryUnavailable
from parking.metrics import ParkingMetrics
from parking.review import OrphanedVisit, UnmatchedExit
from parking.stays import Stay

logger = logging.getLogger(__name__)


class SummarySink(Protocol):
    """Where finished stays and review records go.

    Must be idempotent: on ``stay_id`` for stays, on the event id for the rest.
    """

    def record(self, stay: Stay) -> None: ...
    def record_unmatched(self, item: UnmatchedExit) -> None: ...
    def record_orphan(self, item: OrphanedVisit) -> None: ...


class HttpSummarySink:
    def __init__(
        self,
        base_url: str,
        metrics: ParkingMetrics,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._metrics = metrics
        self._timeout = (min(timeout, 2.0), timeout)
        self._session = requests.Session()
        # Proxies and .netrc come from settings here, not from the
        # environment: reading it again on every post cost a sixth of a post.
        self._session.trust_env = False
        # Retries are the broker's job (a task retry frees the worker); the
        # adapter only keeps connections alive.
        self._session.mount("http://", HTTPAdapter(pool_maxsize=4, max_retries=0))
        self._session.mount("https://", HTTPAdapter(pool_maxsize=4, max_retries=0))
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        # Every post has the same URL per path and the same headers, so they
        # are prepared once: merging session settings into a fresh request on
        # each post was a third of the client's CPU per stay.
        self._headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(
            {name: str(value) for name, value in self._session.headers.items()}
        )
        self._headers["Content-Type"] = "application/json"
        self._urls: dict[str, str] = {}

    def record(self, stay: Stay) -> None:
        self._post("/summaries", stay.to_json(), f"stay={stay.stay_id}")

    def record_unmatched(self, item: UnmatchedExit) -> None:
        self._post("/unmatched", item.to_json(), f"unmatched={item.exit.event_id}")

    def record_orphan(self, item: OrphanedVisit) -> None:
        self._post("/orphans", item.to_json(), f"orphan={item.entry.event_id}")

    def _request(self, path: str, body: dict[str, Any]) -> requests.PreparedRequest:
        url = self._urls.get(path)
        if url is None:
            # Normalised by requests once (scheme, host, encoding), then reused.
            url = requests.Request("POST", self._base + path).prepare().url
            assert url is not None
            self._urls[path] = url
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        request = requests.PreparedRequest()
        request.method = "POST"
        request.url = url
        request.headers = self._headers.copy()
        request.headers["Content-Length"] = str(len(data))
        request.body = data
        return request

    def _post(self, path: str, body: dict[str, Any], what: str) -> None:
        started = time.perf_counter()
        try:
            response = self._session.send(
                self._request(path, body), timeout=self._timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            self._metrics.summary_failures.labels("unreachable").inc()
            raise SummaryUnavailable(
                f"summary API unreachable: {type(exc).__name__}"
            ) from exc
        self._metrics.summary_post.observe(time.perf_counter() - started)
        if response.status_code in (200, 201):
            return
        if response.status_code >= 500 or response.status_code in (408, 429):
            self._metrics.summary_failures.labels("server").inc()
            raise SummaryUnavailable(f"summary API answered {response.status_code}")
        self._metrics.summary_failures.labels("rejected").inc()
        raise SummaryRejected(
            f"summary API refused {what} "
            f"status={response.status_code} body={response.text[:200]!r}"
        )

    def close(self) -> None:
        self._session.close()
