"""The summary API in process: validation, one row per stay, paging, auth.

Requests go through httpx's ASGI transport, and the app's own lifespan starts
and stops its ledger, as uvicorn would.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from parking.api.app import create_app
from parking.api.ledger import CsvLedger, LedgerLayoutError
from parking.errors import ConfigurationError
from parking.settings import Settings

pytestmark = pytest.mark.anyio

TOKEN = "not-a-real-token-4d1f"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _stay(stay_id: str = "stay-1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "stay_id": stay_id,
        "lot_id": "main",
        "vehicle_plate": "ab-123",
        "entry_date_time": "2024-09-11T21:24:56.123456789Z",
        "exit_date_time": "2024-09-11T22:24:57+01:00",
        "duration_seconds": "0.876544",
        "fee": "0.00",
        "currency": "AUD",
        "match": "exact",
        "clock_skew": False,
    }
    body.update(fields)
    return body


def _settings(folder: Path, **fields: Any) -> Settings:
    return Settings(summary_csv=folder / "stays.csv", **fields)


def _records(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api"
        ) as http:
            yield http


def _app(settings: Settings) -> FastAPI:
    return create_app(settings, CsvLedger(settings.summary_csv))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return _settings(tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(_app(settings)) as http:
        yield http


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = _settings(tmp_path, summary_api_token=SecretStr(TOKEN))
    async with serving(_app(settings)) as http:
        yield http


async def test_a_stay_is_written_once_and_a_repost_is_acknowledged(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    first = await client.post("/summaries", json=_stay())
    again = await client.post("/summaries", json=_stay())

    assert (first.status_code, first.json()) == (
        201,
        {"stay_id": "stay-1", "written": True},
    )
    assert (again.status_code, again.json()) == (
        200,
        {"stay_id": "stay-1", "written": False},
    )
    assert _records(settings.summary_csv) == [
        {
            "stay_id": "stay-1",
            "lot_id": "main",
            "vehicle_plate": "ab-123",
            "entry_date_time": "2024-09-11T21:24:56.123456Z",
            "exit_date_time": "2024-09-11T21:24:57Z",
            "duration_seconds": "0.876544",
            "fee": "0.00",
            "currency": "AUD",
            "match": "exact",
            "clock_skew": "false",
        }
    ]


@pytest.mark.parametrize(
    "duration",
    [
        pytest.param("0.876544", id="string"),
        pytest.param(0.876544, id="json-number"),
        pytest.param("0.8765440", id="trailing-zero"),
    ],
)
async def test_equal_durations_in_any_notation_are_accepted(
    client: httpx.AsyncClient, settings: Settings, duration: object
) -> None:
    response = await client.post("/summaries", json=_stay(duration_seconds=duration))

    assert response.status_code == 201
    assert _records(settings.summary_csv)[0]["duration_seconds"] == "0.876544"


async def test_a_clamped_stay_keeps_its_clock_skew_flag(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    same = "2024-09-11T21:00:00Z"
    body = _stay(
        entry_date_time=same, exit_date_time=same, duration_seconds="0", clock_skew=True
    )

    assert (await client.post("/summaries", json=body)).status_code == 201
    assert _records(settings.summary_csv)[0]["clock_skew"] == "true"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        pytest.param(
            {
                "entry_date_time": "2024-09-11T22:00:00Z",
                "exit_date_time": "2024-09-11T21:00:00Z",
                "duration_seconds": "-3600",
            },
            "exit_date_time is before entry_date_time",
            id="exit-before-entry",
        ),
        pytest.param(
            {"duration_seconds": "1"},
            "duration_seconds does not equal",
            id="inconsistent",
        ),
        pytest.param(
            {"duration_seconds": "0.876545"},
            "duration_seconds does not equal",
            id="off-by-one-microsecond",
        ),
        pytest.param(
            {"duration_seconds": "soon"}, "duration_seconds", id="duration-not-number"
        ),
        pytest.param(
            {"entry_date_time": "2024-09-11T21:24:56.123456"},
            "entry_date_time has no UTC offset",
            id="naive-entry",
        ),
        pytest.param(
            {"exit_date_time": "2024-09-11T21:24:57"},
            "exit_date_time has no UTC offset",
            id="naive-exit",
        ),
        pytest.param(
            {"exit_date_time": "yesterday"}, "exit_date_time", id="exit-not-a-time"
        ),
        pytest.param(
            {"entry_date_time": 1726089896}, "entry_date_time", id="entry-unix-number"
        ),
        pytest.param({"vehicle_plate": "=1+1"}, "vehicle_plate", id="formula-plate"),
        pytest.param({"vehicle_plate": ""}, "vehicle_plate", id="empty-plate"),
        pytest.param({"vehicle_plate": "X" * 17}, "vehicle_plate", id="long-plate"),
        pytest.param({"vehicle_plate": 123}, "vehicle_plate", id="numeric-plate"),
        pytest.param({"stay_id": ""}, "stay_id", id="empty-stay-id"),
        pytest.param({"stay_id": "a b"}, "stay_id", id="stay-id-space"),
        pytest.param({"stay_id": "x" * 65}, "stay_id", id="stay-id-too-long"),
        pytest.param({"stay_id": "-1"}, "stay_id", id="stay-id-formula-lead"),
        pytest.param({"fee": "-0.01"}, "fee", id="negative-fee"),
        pytest.param({"fee": "1.005"}, "fee", id="fee-below-a-cent"),
        pytest.param({"fee": "NaN"}, "fee", id="fee-not-a-number"),
        pytest.param({"fee": None}, "fee", id="fee-missing"),
        pytest.param({"currency": "aud"}, "currency", id="currency-lower-case"),
        pytest.param({"currency": "AUDD"}, "currency", id="currency-too-long"),
        pytest.param({"lot_id": "=cmd"}, "lot_id", id="lot-formula"),
        pytest.param({"lot_id": "a:b"}, "lot_id", id="lot-colon"),
        pytest.param({"match": "close"}, "match", id="match-unknown"),
    ],
)
async def test_invalid_summaries_are_refused_with_422(
    client: httpx.AsyncClient, settings: Settings, fields: dict[str, Any], named: str
) -> None:
    response = await client.post("/summaries", json=_stay(**fields))

    assert response.status_code == 422
    assert named in response.text
    assert _records(settings.summary_csv) == []


async def test_a_missing_field_is_refused(client: httpx.AsyncClient) -> None:
    body = _stay()
    del body["exit_date_time"]

    response = await client.post("/summaries", json=body)

    assert response.status_code == 422
    assert "exit_date_time" in response.text


async def test_a_body_that_is_not_json_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/summaries", content=b"{", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422


@pytest.mark.parametrize(
    "plate",
    [pytest.param("ÄÖ-123", id="german"), pytest.param("京A12345", id="chinese")],
)
async def test_non_ascii_plates_round_trip(
    client: httpx.AsyncClient, settings: Settings, plate: str
) -> None:
    posted = await client.post("/summaries", json=_stay(vehicle_plate=plate))
    listed = (await client.get("/summaries")).json()

    assert posted.status_code == 201
    assert listed["items"][0]["vehicle_plate"] == plate
    assert _records(settings.summary_csv)[0]["vehicle_plate"] == plate
    assert plate.encode("utf-8") in settings.summary_csv.read_bytes()


async def test_summaries_are_listed_newest_first_a_page_at_a_time(
    client: httpx.AsyncClient,
) -> None:
    for n in range(1, 6):
        assert (await client.post("/summaries", json=_stay(f"s{n}"))).status_code == 201

    async def page(**params: int) -> tuple[int, list[str]]:
        body = (await client.get("/summaries", params=params)).json()
        return body["total"], [item["stay_id"] for item in body["items"]]

    assert await page() == (5, ["s5", "s4", "s3", "s2", "s1"])
    assert await page(limit=2) == (5, ["s5", "s4"])
    assert await page(limit=2, offset=2) == (5, ["s3", "s2"])
    assert await page(limit=2, offset=4) == (5, ["s1"])
    assert await page(offset=5) == (5, [])


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": 0}, id="limit-zero"),
        pytest.param({"limit": 1001}, id="limit-too-big"),
        pytest.param({"offset": -1}, id="negative-offset"),
        pytest.param({"limit": "many"}, id="limit-not-int"),
    ],
)
async def test_bad_paging_is_refused(
    client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    assert (await client.get("/summaries", params=params)).status_code == 422


async def test_health_reports_a_writable_ledger(client: httpx.AsyncClient) -> None:
    await client.post("/summaries", json=_stay())

    response = await client.get("/healthz")

    assert (response.status_code, response.json()) == (
        200,
        {"status": "ok", "rows": 1, "unmatched": 0, "orphans": 0},
    )


async def test_health_fails_when_the_writer_is_not_running(settings: Settings) -> None:
    # Without the lifespan the ledger never starts: the check must notice.
    transport = httpx.ASGITransport(app=_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        response = await http.get("/healthz")

    assert response.status_code == 503
    assert response.json()["status"] == "failing"


async def test_a_restarted_api_keeps_one_row_per_stay(settings: Settings) -> None:
    async with serving(_app(settings)) as before:
        assert (await before.post("/summaries", json=_stay())).status_code == 201

    async with serving(_app(settings)) as after:
        assert (await after.post("/summaries", json=_stay())).status_code == 200
        assert (await after.get("/healthz")).json()["rows"] == 1

    assert len(_records(settings.summary_csv)) == 1


async def test_concurrent_posts_write_every_row_whole(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    fresh = [client.post("/summaries", json=_stay(f"s{n:03d}")) for n in range(200)]
    again = [client.post("/summaries", json=_stay("s000")) for _ in range(20)]

    responses = await asyncio.gather(*fresh, *again)

    statuses = [response.status_code for response in responses]
    assert statuses.count(201) == 200
    assert statuses.count(200) == 20
    lines = settings.summary_csv.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 201
    assert all(line.count(",") == 9 for line in lines)
    ids = [record["stay_id"] for record in _records(settings.summary_csv)]
    assert sorted(ids) == [f"s{n:03d}" for n in range(200)]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param({"Authorization": TOKEN}, id="no-scheme"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, id="other-scheme"),
        pytest.param({"Authorization": f"Bearer {TOKEN}x"}, id="token-prefix"),
    ],
)
async def test_a_post_without_the_token_is_401(
    secured: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await secured.post("/summaries", json=_stay(), headers=headers)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert TOKEN not in response.text
    assert (await secured.get("/summaries")).json()["total"] == 0


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_outside_development_the_api_refuses_to_run_without_a_token(
    tmp_path: Path, environment: str
) -> None:
    # A broker password of its own: the default one is refused there too.
    broker = "amqp://parking:a-password-of-its-own@127.0.0.1:5672//"
    bare = _settings(tmp_path, environment=environment, broker_url=broker)
    with pytest.raises(ConfigurationError, match="PARKING_SUMMARY_API_TOKEN") as error:
        _app(bare)
    assert repr(environment) in str(error.value)
    assert _app(bare.model_copy(update={"environment": "development"}))
    assert _app(bare.model_copy(update={"summary_api_token": SecretStr(TOKEN)}))


async def test_a_post_with_the_token_is_written(secured: httpx.AsyncClient) -> None:
    response = await secured.post("/summaries", json=_stay(), headers=BEARER)

    assert response.status_code == 201


async def test_refused_tokens_are_counted(secured: httpx.AsyncClient) -> None:
    await secured.post("/summaries", json=_stay())
    await secured.post(
        "/summaries", json=_stay(), headers={"Authorization": "Bearer x"}
    )

    metrics = (await secured.get("/metrics")).text

    assert "parking_api_unauthorized_total 2.0" in metrics


async def test_reads_and_health_stay_open_unless_reads_are_protected(
    secured: httpx.AsyncClient, tmp_path: Path
) -> None:
    assert (await secured.get("/summaries")).status_code == 200
    assert (await secured.get("/healthz")).status_code == 200

    settings = _settings(
        tmp_path / "locked",
        summary_api_token=SecretStr(TOKEN),
        api_require_token_for_reads=True,
    )
    async with serving(_app(settings)) as locked:
        assert (await locked.get("/summaries")).status_code == 401
        assert (await locked.get("/summaries", headers=BEARER)).status_code == 200
        assert (await locked.get("/healthz")).status_code == 200


async def test_requests_are_timed_by_route(client: httpx.AsyncClient) -> None:
    await client.post("/summaries", json=_stay())
    await client.post("/summaries", json=_stay(stay_id=""))

    metrics = (await client.get("/metrics")).text

    timed = 'parking_api_request_seconds_count{route="/summaries",status="%s"} 1.0'
    assert timed % "2xx" in metrics
    assert timed % "4xx" in metrics
    assert "parking_api_rows_written_total 1.0" in metrics


async def test_a_streamed_body_over_the_limit_is_timed_as_a_summaries_post(
    client: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        # No length up front: the limit is found while the body is read.
        for _ in range(80):
            yield b" " * 1024

    answer = await client.post(
        "/summaries", content=chunks(), headers={"content-type": "application/json"}
    )

    assert answer.status_code == 413
    metrics = (await client.get("/metrics")).text
    assert (
        'parking_api_request_seconds_count{route="/summaries",status="4xx"} 1.0'
        in metrics
    )


@pytest.mark.parametrize(
    ("fee", "stored"),
    [
        pytest.param("6", "6.00", id="whole"),
        pytest.param(6.5, "6.50", id="json-number"),
        pytest.param("24.00", "24.00", id="cents"),
        pytest.param("0", "0.00", id="free"),
    ],
)
async def test_a_fee_is_written_in_cents(
    client: httpx.AsyncClient, settings: Settings, fee: object, stored: str
) -> None:
    body = _stay(fee=fee, lot_id="north-2", match="fuzzy")

    assert (await client.post("/summaries", json=body)).status_code == 201
    [row] = _records(settings.summary_csv)
    assert (row["fee"], row["lot_id"], row["match"]) == (stored, "north-2", "fuzzy")


def _unmatched(event_id: str = "x1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": event_id,
        "lot_id": "main",
        "vehicle_plate": "ab-123",
        "exit_date_time": "2024-09-11T22:24:57+01:00",
        "why": "grace_expired",
    }
    body.update(fields)
    return body


def _orphan(event_id: str = "e1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": event_id,
        "lot_id": "main",
        "vehicle_plate": "ab-123",
        "entry_date_time": "2024-09-11T21:00:00Z",
        "cause": "reentry",
    }
    body.update(fields)
    return body


async def test_unmatched_exits_are_kept_once_per_event_and_listed_newest_first(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    posted = [
        await client.post("/unmatched", json=_unmatched("x1")),
        await client.post("/unmatched", json=_unmatched("x1", why="ambiguous")),
        await client.post("/unmatched", json=_unmatched("=x2", why="ambiguous")),
    ]
    listed = (await client.get("/unmatched", params={"limit": 1})).json()

    assert [r.status_code for r in posted] == [201, 200, 201]
    assert posted[1].json() == {"event_id": "x1", "written": False}
    assert listed["total"] == 2
    assert listed["items"] == [
        {
            "event_id": "'=x2",
            "lot_id": "main",
            "vehicle_plate": "ab-123",
            "exit_date_time": "2024-09-11T21:24:57Z",
            "why": "ambiguous",
        }
    ]
    written = settings.summary_csv.with_name("unmatched.csv")
    assert [r["event_id"] for r in _records(written)] == ["x1", "'=x2"]
    assert _records(settings.summary_csv) == []


async def test_unmatched_rows_of_a_reason_no_longer_given_are_still_listed(
    settings: Settings,
) -> None:
    # Before a plate could keep several pending exits, a later exit
    # "superseded" an earlier one; files written then still hold such rows.
    written = settings.summary_csv.with_name("unmatched.csv")
    written.write_text(
        "event_id,lot_id,vehicle_plate,exit_date_time,why\n"
        "x0,main,AB-123,2024-09-11T21:24:57Z,superseded\n"
    )

    async with serving(_app(settings)) as client:
        posted = await client.post("/unmatched", json=_unmatched("x0"))
        listed = (await client.get("/unmatched")).json()

    assert posted.status_code == 200
    assert [(i["event_id"], i["why"]) for i in listed["items"]] == [
        ("x0", "superseded")
    ]


async def test_orphaned_visits_are_kept_once_per_event_and_listed(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    for n, cause in enumerate(("reentry", "late_entry", "max_stay")):
        response = await client.post("/orphans", json=_orphan(f"e{n}", cause=cause))
        assert response.status_code == 201
    again = await client.post("/orphans", json=_orphan("e0"))

    listed = (await client.get("/orphans")).json()

    assert again.status_code == 200
    assert listed["total"] == 3
    assert [(i["event_id"], i["cause"]) for i in listed["items"]] == [
        ("e2", "max_stay"),
        ("e1", "late_entry"),
        ("e0", "reentry"),
    ]
    assert listed["items"][0]["entry_date_time"] == "2024-09-11T21:00:00Z"
    health = (await client.get("/healthz")).json()
    assert (health["orphans"], health["unmatched"], health["rows"]) == (3, 0, 0)


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        pytest.param("/unmatched", _unmatched(why="lost"), "why", id="unknown-why"),
        pytest.param("/orphans", _orphan(cause="gone"), "cause", id="unknown-cause"),
        pytest.param("/orphans", _orphan(event_id=" "), "event_id", id="blank-id"),
        pytest.param(
            "/unmatched", _unmatched(event_id="x" * 129), "event_id", id="long-id"
        ),
        pytest.param(
            "/unmatched",
            _unmatched(exit_date_time="2024-09-11T21:00:00"),
            "exit_date_time has no UTC offset",
            id="naive-time",
        ),
        pytest.param(
            "/orphans", _orphan(vehicle_plate="=1+1"), "vehicle_plate", id="formula"
        ),
        pytest.param("/orphans", _orphan(lot_id=""), "lot_id", id="empty-lot"),
    ],
)
async def test_invalid_review_records_are_refused(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], named: str
) -> None:
    response = await client.post(path, json=body)

    assert response.status_code == 422
    assert named in response.text
    assert (await client.get(path)).json()["total"] == 0


@pytest.mark.parametrize("path", ["/unmatched", "/orphans"])
async def test_review_posts_need_the_token_like_stays(
    secured: httpx.AsyncClient, path: str
) -> None:
    body = _unmatched() if path == "/unmatched" else _orphan()

    refused = await secured.post(path, json=body)
    accepted = await secured.post(path, json=body, headers=BEARER)

    assert (refused.status_code, accepted.status_code) == (401, 201)


async def test_an_api_whose_csv_has_another_layout_refuses_to_start(
    settings: Settings,
) -> None:
    settings.summary_csv.write_text("stay_id,vehicle_plate\ns1,AB-1\n")

    with pytest.raises(LedgerLayoutError, match=r"stays\.csv has the columns"):
        async with serving(_app(settings)):
            pass
