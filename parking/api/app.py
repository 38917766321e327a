"""The summary API: receives finished stays and appends them to the CSV."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app
from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from parking.api.ledger import CsvLedger
from parking.errors import InvalidEvent
from parking.events import format_time, parse_time
from parking.plates import clean_plate
from parking.settings import Settings
from parking.stays import format_seconds

logger = logging.getLogger(__name__)


class StaySummary(BaseModel):
    """One stay as the workers post it."""

    #: Starts with a letter or digit: the CSV would neutralise a leading dash,
    #: and the stored id would then no longer dedupe after a restart.
    stay_id: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
    )
    vehicle_plate: str
    entry_date_time: datetime
    exit_date_time: datetime
    duration_seconds: Decimal
    clock_skew: bool = False

    @field_validator("vehicle_plate")
    @classmethod
    def _plate(cls, value: str) -> str:
        return clean_plate(value)

    @field_validator("entry_date_time", "exit_date_time", mode="before")
    @classmethod
    def _time(cls, value: Any, info: ValidationInfo) -> datetime:
        try:
            return parse_time(value, info.field_name or "time")
        except InvalidEvent as exc:
            raise ValueError(exc.detail) from None

    @model_validator(mode="after")
    def _consistent(self) -> StaySummary:
        span = self.exit_date_time - self.entry_date_time
        if span.total_seconds() < 0:
            raise ValueError("exit_date_time is before entry_date_time")
        if Decimal(format_seconds(span)) != self.duration_seconds:
            raise ValueError("duration_seconds does not equal exit - entry")
        return self

    def row(self) -> dict[str, str]:
        return {
            "stay_id": self.stay_id,
            "vehicle_plate": self.vehicle_plate,
            "entry_date_time": format_time(self.entry_date_time),
            "exit_date_time": format_time(self.exit_date_time),
            "duration_seconds": format_seconds(
                self.exit_date_time - self.entry_date_time
            ),
            "clock_skew": "true" if self.clock_skew else "false",
        }


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter(
            "parking_api_rows_written_total", "Stay rows appended", registry=registry
        )
        self.duplicates = Counter(
            "parking_api_duplicate_stays_total",
            "Stays posted again and not written twice",
            registry=registry,
        )
        self.requests = Histogram(
            "parking_api_request_seconds",
            "Time to answer a request, by route and status class",
            ["route", "status"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
            registry=registry,
        )
        self.unauthorized = Counter(
            "parking_api_unauthorized_total",
            "Requests refused for a missing or wrong token",
            registry=registry,
        )


def create_app(settings: Settings, ledger: CsvLedger | None = None) -> FastAPI:
    """Build the API from its parts; tests pass their own settings and ledger."""
    ledger = ledger or CsvLedger(settings.summary_csv)
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    token = settings.summary_api_token

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ledger.start()
        try:
            yield
        finally:
            await ledger.stop()

    app = FastAPI(title="Parking stay summaries", lifespan=lifespan)
    app.state.ledger = ledger
    app.mount("/metrics", make_asgi_app(registry=registry))

    def authorised(
        authorization: Annotated[str | None, Header()] = None,
    ) -> None:
        if token is None:
            return
        expected = f"Bearer {token.get_secret_value()}"
        if authorization is None or not secrets.compare_digest(
            authorization.encode(), expected.encode()
        ):
            metrics.unauthorized.inc()
            logger.info("request refused reason=bad_token")
            raise HTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    reads = [Depends(authorised)] if settings.api_require_token_for_reads else []

    @app.middleware("http")
    async def timing(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        metrics.requests.labels(path, f"{response.status_code // 100}xx").observe(
            time.perf_counter() - started
        )
        return response

    @app.post("/summaries", status_code=201, dependencies=[Depends(authorised)])
    async def post_summary(summary: StaySummary) -> JSONResponse:
        """Record one stay; posting the same stay id again changes nothing."""
        written = await ledger.append(summary.row())
        logger.debug("stay posted stay=%s written=%s", summary.stay_id, written)
        if written:
            metrics.rows.inc()
            return JSONResponse({"stay_id": summary.stay_id, "written": True}, 201)
        metrics.duplicates.inc()
        return JSONResponse({"stay_id": summary.stay_id, "written": False}, 200)

    @app.get("/summaries", dependencies=reads)
    async def list_summaries(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """The latest stays first, ``limit`` at a time."""
        rows = await asyncio.to_thread(lambda: list(ledger.read_all()))
        rows.reverse()
        return {
            "total": len(rows),
            "offset": offset,
            "items": rows[offset : offset + limit],
        }

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Ready when the CSV can be written."""
        ok = ledger.healthy()
        body = {"status": "ok" if ok else "failing", "rows": ledger.rows}
        return JSONResponse(body, 200 if ok else 503)

    return app
