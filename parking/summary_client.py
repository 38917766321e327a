"""Posts stays to the summary API over one kept-alive HTTP session."""

from __future__ import annotations

import logging
import time
from typing import Protocol

import requests
from requests.adapters import HTTPAdapter

from parking.errors import SummaryRejected, SummaryUnavailable
from parking.metrics import ParkingMetrics
from parking.stays import Stay

logger = logging.getLogger(__name__)


class SummarySink(Protocol):
    """Where finished stays go. Must be idempotent on ``stay_id``."""

    def record(self, stay: Stay) -> None: ...


class HttpSummarySink:
    def __init__(
        self,
        base_url: str,
        metrics: ParkingMetrics,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._url = base_url.rstrip("/") + "/summaries"
        self._metrics = metrics
        self._timeout = (min(timeout, 2.0), timeout)
        self._session = requests.Session()
        # Retries are the broker's job (a task retry frees the worker); the
        # adapter only keeps connections alive.
        self._session.mount("http://", HTTPAdapter(pool_maxsize=4, max_retries=0))
        self._session.mount("https://", HTTPAdapter(pool_maxsize=4, max_retries=0))
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def record(self, stay: Stay) -> None:
        started = time.perf_counter()
        try:
            response = self._session.post(
                self._url, json=stay.to_json(), timeout=self._timeout
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
            f"summary API refused stay={stay.stay_id} "
            f"status={response.status_code} body={response.text[:200]!r}"
        )

    def close(self) -> None:
        self._session.close()
