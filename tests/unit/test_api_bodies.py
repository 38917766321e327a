"""Post bodies the API reads itself: odd and hostile ones get a 4xx, never a 500.

The API parses and validates a post's JSON body in one pass, and checks the
token before it says anything about the body. Requests go through httpx's
ASGI transport with the app's own lifespan, as uvicorn would run it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from parking.api.app import create_app
from parking.settings import Settings

pytestmark = pytest.mark.anyio

TOKEN = "not-a-real-token-77c2"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _stay(stay_id: str = "stay-1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "stay_id": stay_id,
        "lot_id": "main",
        "vehicle_plate": "AB-123",
        "entry_date_time": "2024-09-11T21:24:56Z",
        "exit_date_time": "2024-09-11T21:25:56Z",
        "duration_seconds": "60",
        "fee": "1.50",
        "currency": "AUD",
    }
    body.update(fields)
    return body


@pytest.fixture
def stays_csv(tmp_path: Path) -> Path:
    return tmp_path / "stays.csv"


@pytest.fixture
async def client(stays_csv: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(summary_csv=stays_csv, summary_api_token=SecretStr(TOKEN))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=BEARER
        ) as http:
            yield http


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


async def test_the_answer_is_json_naming_the_stay(client: httpx.AsyncClient) -> None:
    first = await client.post("/summaries", json=_stay("s.1:a-b_c"))
    again = await client.post("/summaries", json=_stay("s.1:a-b_c"))

    assert first.status_code == 201
    assert first.headers["content-type"] == "application/json"
    assert first.json() == {"stay_id": "s.1:a-b_c", "written": True}
    assert (again.status_code, again.json()) == (
        200,
        {"stay_id": "s.1:a-b_c", "written": False},
    )


@pytest.mark.parametrize(
    ("body", "named"),
    [
        # JSON literals Python's and pydantic's parsers read, which a 422
        # cannot echo back as JSON.
        pytest.param(b'"fee": NaN', "finite_number", id="nan-literal"),
        pytest.param(b'"fee": 1e400', "finite_number", id="infinite-number"),
        # Not UTF-8 at all, and a lone surrogate that UTF-8 cannot write.
        pytest.param(b'"vehicle_plate": "\xc4B-1"', "json_invalid", id="latin-1"),
        pytest.param(b'"vehicle_plate": "AB\\ud800"', "json_invalid", id="surrogate"),
    ],
)
async def test_bodies_that_cannot_be_echoed_are_refused_with_422(
    client: httpx.AsyncClient, stays_csv: Path, body: bytes, named: str
) -> None:
    stay = json.dumps(_stay(fee="0.00", vehicle_plate="X")).encode()
    content = stay[:-1] + b", " + body + b"}"

    response = await client.post("/summaries", content=content, headers=JSON)

    assert response.status_code == 422, response.text
    assert named in {error["type"] for error in response.json()["detail"]}
    assert _rows(stays_csv) == []


@pytest.mark.parametrize(
    ("content", "headers", "named"),
    [
        pytest.param(b"", JSON, "missing", id="empty"),
        pytest.param(b"{", JSON, "json_invalid", id="not-json"),
        pytest.param(b"[]", JSON, "model_type", id="a-list"),
        pytest.param(
            json.dumps(_stay()).encode(),
            {"Content-Type": "text/plain"},
            "model_attributes_type",
            id="not-declared-json",
        ),
    ],
)
async def test_a_body_that_is_no_stay_is_refused_with_422(
    client: httpx.AsyncClient,
    stays_csv: Path,
    content: bytes,
    headers: dict[str, str],
    named: str,
) -> None:
    response = await client.post("/summaries", content=content, headers=headers)

    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert (error["type"], error["loc"][0]) == (named, "body")
    assert _rows(stays_csv) == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/vnd.parking+json"],
)
async def test_json_content_types_with_parameters_or_suffixes_are_read(
    client: httpx.AsyncClient, stays_csv: Path, content_type: str
) -> None:
    response = await client.post(
        "/summaries",
        content=json.dumps(_stay()).encode(),
        headers={"Content-Type": content_type},
    )

    assert response.status_code == 201, response.text
    assert [row["stay_id"] for row in _rows(stays_csv)] == ["stay-1"]


async def test_a_byte_order_mark_is_allowed(
    client: httpx.AsyncClient, stays_csv: Path
) -> None:
    content = b"\xef\xbb\xbf" + json.dumps(_stay()).encode()

    response = await client.post("/summaries", content=content, headers=JSON)

    assert response.status_code == 201, response.text


@pytest.mark.parametrize("path", ["/summaries", "/unmatched", "/orphans"])
async def test_nothing_about_a_body_is_told_without_the_token(
    client: httpx.AsyncClient, path: str
) -> None:
    for content in (b"{", b"[]", json.dumps(_stay()).encode()):
        response = await client.post(
            path,
            content=content,
            headers={**JSON, "Authorization": "Bearer wrong"},
        )

        assert response.status_code == 401, (content, response.text)
        assert "detail" in response.json()
        assert "body" not in response.text


async def test_errors_point_into_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/unmatched",
        json={"event_id": "e-1", "lot_id": "main", "vehicle_plate": "X"},
    )

    assert response.status_code == 422
    located = {tuple(error["loc"]) for error in response.json()["detail"]}
    assert located == {("body", "exit_date_time"), ("body", "why")}


def test_the_schema_documents_each_post_body(tmp_path: Path) -> None:
    app = create_app(Settings(summary_csv=tmp_path / "stays.csv"))

    paths = app.openapi()["paths"]

    for path, field in (
        ("/summaries", "stay_id"),
        ("/unmatched", "why"),
        ("/orphans", "cause"),
    ):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]
        schema = body["schema"]
        assert field in schema["properties"], path
        assert "$ref" not in json.dumps(schema), path
