"""The summary API: receives finished stays and appends them to the CSV.

Beside the stays, it keeps what an operator reviews: exits that found no
entry (``/unmatched``) and visits closed without an exit (``/orphans``), each
in a CSV of its own next to the stays CSV, one row per event id.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from parking.api.fastlane import PostFastLane, RawHeaders, header
from parking.api.ledger import (
    ORPHAN_COLUMNS,
    UNMATCHED_COLUMNS,
    CsvLedger,
)
from parking.api.limits import BodyLimit
from parking.api.timing import RequestTimer
from parking.errors import ConfigurationError, InvalidEvent
from parking.events import MAX_ID_LENGTH, format_time, parse_time
from parking.plates import clean_plate
from parking.review import OrphanCause, UnmatchedWhy
from parking.settings import LOT_NAME, Settings
from parking.stays import format_seconds

_CENT = Decimal("0.01")
#: A car park name as the settings allow it (a CSV cell and a metric label).
LotId = Annotated[str, Field(pattern=f"^{LOT_NAME.pattern}$")]
#: Paging of the listings.
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]


def _time(value: Any, info: ValidationInfo) -> datetime:
    try:
        return parse_time(value, info.field_name or "time")
    except InvalidEvent as exc:
        raise ValueError(exc.detail) from None


logger = logging.getLogger(__name__)


class StaySummary(BaseModel):
    """One stay as the workers post it."""

    #: Starts with a letter or digit: the CSV would neutralise a leading dash,
    #: and the stored id would then no longer dedupe after a restart.
    stay_id: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
    )
    lot_id: LotId
    vehicle_plate: str
    entry_date_time: datetime
    exit_date_time: datetime
    duration_seconds: Decimal
    #: Money in the tariff's currency: whole cents, never negative.
    fee: Decimal = Field(ge=0, max_digits=14, decimal_places=2)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    match: Literal["exact", "fuzzy"] = "exact"
    clock_skew: bool = False

    @field_validator("vehicle_plate")
    @classmethod
    def _plate(cls, value: str) -> str:
        return clean_plate(value)

    @field_validator("entry_date_time", "exit_date_time", mode="before")
    @classmethod
    def _time(cls, value: Any, info: ValidationInfo) -> datetime:
        return _time(value, info)

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
            "lot_id": self.lot_id,
            "vehicle_plate": self.vehicle_plate,
            "entry_date_time": format_time(self.entry_date_time),
            "exit_date_time": format_time(self.exit_date_time),
            "duration_seconds": format_seconds(
                self.exit_date_time - self.entry_date_time
            ),
            # copy_abs: a fee of "-0" is zero, not a negative-looking cell.
            "fee": str(self.fee.quantize(_CENT).copy_abs()),
            "currency": self.currency,
            "match": self.match,
            "clock_skew": "true" if self.clock_skew else "false",
        }


class _ReviewRecord(BaseModel):
    """A read an operator looks at, keyed by its event id."""

    event_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    lot_id: LotId
    vehicle_plate: str

    @field_validator("event_id")
    @classmethod
    def _event_id(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("event_id must be printable and not blank")
        return value

    @field_validator("vehicle_plate")
    @classmethod
    def _plate(cls, value: str) -> str:
        return clean_plate(value)


class UnmatchedRecord(_ReviewRecord):
    exit_date_time: datetime
    why: UnmatchedWhy

    @field_validator("exit_date_time", mode="before")
    @classmethod
    def _time(cls, value: Any, info: ValidationInfo) -> datetime:
        return _time(value, info)

    def row(self) -> dict[str, str]:
        return {
            "event_id": self.event_id,
            "lot_id": self.lot_id,
            "vehicle_plate": self.vehicle_plate,
            "exit_date_time": format_time(self.exit_date_time),
            "why": self.why.value,
        }


class OrphanRecord(_ReviewRecord):
    entry_date_time: datetime
    cause: OrphanCause

    @field_validator("entry_date_time", mode="before")
    @classmethod
    def _time(cls, value: Any, info: ValidationInfo) -> datetime:
        return _time(value, info)

    def row(self) -> dict[str, str]:
        return {
            "event_id": self.event_id,
            "lot_id": self.lot_id,
            "vehicle_plate": self.vehicle_plate,
            "entry_date_time": format_time(self.entry_date_time),
            "cause": self.cause.value,
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
        self.review_rows = Counter(
            "parking_api_review_rows_written_total",
            "Unmatched exits and orphaned visits appended for review, by file",
            ["file"],
            registry=registry,
        )
        for name in ("unmatched", "orphans"):
            self.review_rows.labels(name)


def create_app(
    settings: Settings,
    ledger: CsvLedger | None = None,
    unmatched: CsvLedger | None = None,
    orphans: CsvLedger | None = None,
) -> FastAPI:
    """Build the API from its parts; tests pass their own settings and ledgers."""
    ledger = ledger or CsvLedger(settings.summary_csv)
    unmatched = unmatched or CsvLedger(
        settings.unmatched_csv_path,
        columns=UNMATCHED_COLUMNS,
        key="event_id",
        name="unmatched",
    )
    orphans = orphans or CsvLedger(
        settings.orphans_csv_path,
        columns=ORPHAN_COLUMNS,
        key="event_id",
        name="orphans",
    )
    ledgers = (ledger, unmatched, orphans)
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    token = settings.summary_api_token
    if token is None and settings.environment != "development":
        # Anyone who reaches the port could write billable rows.
        raise ConfigurationError(
            "the summary API needs PARKING_SUMMARY_API_TOKEN (or the secret file "
            f"parking_summary_api_token) in environment {settings.environment!r}"
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        started: list[CsvLedger] = []
        try:
            for each in ledgers:
                await each.start()
                started.append(each)
            yield
        finally:
            for each in started:
                await each.stop()

    # No OpenTelemetry here: without this FastAPI looks up the global tracer,
    # meter and logger providers on every request.
    off: TelemetryConfig = {
        "tracing": False,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
    }
    app = FastAPI(title="Parking stay summaries", lifespan=lifespan, telemetry=off)
    app.state.ledger = ledger

    # Mounted apps answer /metrics with a redirect to /metrics/; a route
    # answers both the way scrapers and people type it.
    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Async on purpose: a plain function dependency is run in a worker
    # thread on every request, which costs more than the check itself.
    async def authorised(request: Request) -> None:
        if token is None:
            return
        authorization = request.headers.get("authorization")
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

    async def accepted(request: Request, model: type[_Posted]) -> _Posted:
        """The body of a post as ``model``, once the token is checked.

        By hand rather than a declared body and a token dependency: FastAPI's
        per-request work for those two costs more than the stay itself, and
        pydantic parses and validates the JSON in one pass
        (docs/benchmarks.md). The body is read first (413 when too large),
        then the token checked (401), then the body parsed and validated (422):
        nothing about a body is told to a caller without the token.
        """
        body = await request.body()
        await authorised(request)
        return _validated(model, body, request.headers.get("content-type"))

    async def record_stay(summary: StaySummary) -> tuple[int, bytes]:
        written = await ledger.append(summary.row())
        logger.debug("stay posted stay=%s written=%s", summary.stay_id, written)
        if written:
            metrics.rows.inc()
        else:
            metrics.duplicates.inc()
        # Written out: the stay id's pattern holds nothing JSON escapes, and
        # this costs a fraction of a JSONResponse.
        answer = f'{{"stay_id":"{summary.stay_id}","written":{str(written).lower()}}}'
        return (201 if written else 200), answer.encode()

    @app.post("/summaries", status_code=201, openapi_extra=_json_body(StaySummary))
    async def post_summary(request: Request) -> Response:
        """Record one stay; posting the same stay id again changes nothing."""
        status, answer = await record_stay(await accepted(request, StaySummary))
        return Response(answer, status, media_type=_JSON)

    bearer = None if token is None else f"Bearer {token.get_secret_value()}".encode()

    async def plain_stay_post(
        body: bytes, headers: RawHeaders
    ) -> tuple[int, bytes] | None:
        """The post in its plain case; None leaves it to ``post_summary``."""
        if bearer is not None:
            sent = header(headers, b"authorization")
            if sent is None or not secrets.compare_digest(sent, bearer):
                return None
        raw_type = header(headers, b"content-type")
        content_type = None if raw_type is None else raw_type.decode("latin-1")
        try:
            summary = _validated(StaySummary, body, content_type)
        except RequestValidationError:
            return None
        return await record_stay(summary)

    @app.get("/summaries", dependencies=reads)
    async def list_summaries(limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
        """The latest stays first, ``limit`` at a time."""
        return await _page(ledger, limit, offset)

    async def review(
        into: CsvLedger, record: UnmatchedRecord | OrphanRecord
    ) -> JSONResponse:
        written = await into.append(record.row())
        logger.debug(
            "review posted file=%s event=%s written=%s",
            into.name, record.event_id, written,
        )  # fmt: skip
        if written:
            metrics.review_rows.labels(into.name).inc()
        body = {"event_id": record.event_id, "written": written}
        return JSONResponse(body, 201 if written else 200)

    @app.post("/unmatched", status_code=201, openapi_extra=_json_body(UnmatchedRecord))
    async def post_unmatched(request: Request) -> JSONResponse:
        """Keep an exit that found no entry; its event id is written once."""
        return await review(unmatched, await accepted(request, UnmatchedRecord))

    @app.post("/orphans", status_code=201, openapi_extra=_json_body(OrphanRecord))
    async def post_orphan(request: Request) -> JSONResponse:
        """Keep a visit closed without an exit; its event id is written once."""
        return await review(orphans, await accepted(request, OrphanRecord))

    @app.get("/unmatched", dependencies=reads)
    async def list_unmatched(limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
        """Exits that found no entry, the latest first, for review."""
        return await _page(unmatched, limit, offset)

    @app.get("/orphans", dependencies=reads)
    async def list_orphans(limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
        """Visits closed without an exit, the latest first, for review."""
        return await _page(orphans, limit, offset)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Ready when every CSV can be written."""
        ok = all(each.healthy() for each in ledgers)
        body = {
            "status": "ok" if ok else "failing",
            "rows": ledger.rows,
            "unmatched": unmatched.rows,
            "orphans": orphans.rows,
        }
        return JSONResponse(body, 200 if ok else 503)

    # Added innermost first: the timer sees every request, the body limit
    # applies to the fast lane too, and only then the stay posts' fast lane.
    posted = next(
        route
        for route in app.routes
        if getattr(route, "path", None) == "/summaries"
        and "POST" in getattr(route, "methods", ())
    )
    app.add_middleware(
        PostFastLane, path="/summaries", serve=plain_stay_post, route=posted
    )
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestTimer, histogram=metrics.requests)
    return app


_JSON = "application/json"
_Posted = TypeVar("_Posted", StaySummary, UnmatchedRecord, OrphanRecord)


def _validated(model: type[_Posted], body: bytes, content_type: str | None) -> _Posted:
    """``body`` as ``model``, or the error FastAPI gives for a declared body."""
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    if not _is_json(content_type):
        # As FastAPI: a body that is not declared JSON is not parsed as JSON.
        raise RequestValidationError(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be a JSON object (Content-Type: "
                    "application/json)",
                }
            ],
            body=body,
        )
    try:
        # A UTF-8 byte order mark is allowed, as FastAPI's JSON reading allows it.
        return model.model_validate_json(body.removeprefix(codecs.BOM_UTF8))
    except ValidationError as exc:
        raise RequestValidationError(_in_body(exc), body=body) from None


def _in_body(exc: ValidationError) -> list[dict[str, Any]]:
    """The errors located in the body, as FastAPI reports a declared body's."""
    return [
        dict(detail) | {"loc": ("body", *detail["loc"]), "input": _shown(detail)}
        for detail in exc.errors(include_url=False)
    ]


def _shown(detail: ErrorDetails) -> Any:
    """The input as the 422 can show it: sent back as it is, NaN, infinity
    (JSON literals pydantic reads) and a body that is not UTF-8 would turn the
    answer into a 500."""
    value = detail.get("input")
    if isinstance(value, bytes):
        return {}  # the whole body, unparsed: FastAPI shows {} too
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    return kind == _JSON or (kind.startswith("application/") and kind.endswith("+json"))


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The request body in the OpenAPI schema, as a declared body would show it
    (the model's own definitions, its enums, written in place)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(each) for each in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return inline(definitions[ref.removeprefix("#/$defs/")])
        return {key: inline(value) for key, value in node.items()}

    content = {_JSON: {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}


async def _page(ledger: CsvLedger, limit: int, offset: int) -> dict[str, Any]:
    items = ledger.latest(limit, offset)
    if items is None:
        # Only pages deep into history read the file.
        rows = await asyncio.to_thread(lambda: list(ledger.read_all()))
        rows.reverse()
        items = rows[offset : offset + limit]
    return {"total": ledger.rows, "offset": offset, "items": items}
