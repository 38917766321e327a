"""Adversarial: the summary API under hostile and unlucky clients.

The real API (uvicorn on a free port) with a token; every attack checks what
the stays and review CSVs hold afterwards, since those are what invoices and
reviewers read.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry
from pydantic import SecretStr, ValidationError

from parking.metrics import ParkingMetrics
from parking.settings import Settings
from parking.stays import Stay, Visit
from parking.summary_client import HttpSummarySink
from tests.services import ApiServer

pytestmark = pytest.mark.integration

TOKEN = "adversarial-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Cells a spreadsheet runs as formulas start with one of these.
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def _stay(stay_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "stay_id": stay_id,
        "lot_id": "main",
        "vehicle_plate": "AB123",
        "entry_date_time": "2024-01-01T00:00:00Z",
        "exit_date_time": "2024-01-01T01:00:00Z",
        "duration_seconds": "3600",
        "fee": "3.00",
        "currency": "AUD",
        **changes,
    }


def _unmatched(event_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "lot_id": "main",
        "vehicle_plate": "AB123",
        "exit_date_time": "2024-01-01T01:00:00Z",
        "why": "grace_expired",
        **changes,
    }


def _orphan(event_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "lot_id": "main",
        "vehicle_plate": "AB123",
        "entry_date_time": "2024-01-01T00:00:00Z",
        "cause": "reentry",
        **changes,
    }


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        summary_csv=tmp_path / "stays.csv",
        summary_api_token=SecretStr(TOKEN),
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[ApiServer]:
    server = ApiServer(settings)
    server.start()
    yield server
    server.stop()


def _post(api: ApiServer, path: str, body: Any) -> requests.Response:
    return requests.post(f"{api.url}{path}", json=body, headers=AUTH, timeout=30)


def test_one_stay_posted_from_many_clients_at_once_is_one_row(
    api: ApiServer,
) -> None:
    ids = [f"race-{n}" for n in range(5)]
    posts = [(stay_id, attempt) for attempt in range(30) for stay_id in ids]

    def send(item: tuple[str, int]) -> tuple[str, int]:
        stay_id, _ = item
        return stay_id, _post(api, "/summaries", _stay(stay_id)).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(send, posts))

    assert {status for _, status in answers} <= {200, 201}
    created = Counter(stay_id for stay_id, status in answers if status == 201)
    assert created == Counter(ids), "each stay is created by exactly one post"
    written = Counter(row["stay_id"] for row in _rows(api.csv))
    assert written == Counter(ids)


def test_torn_last_row_is_dropped_and_its_stay_written_once_when_posted_again(
    api: ApiServer, settings: Settings
) -> None:
    # The second stay's plate has a character of three bytes: the crash
    # tears the row in the middle of it.
    first, torn = _stay("kept-1"), _stay("torn-2", vehicle_plate="京A12345")
    assert _post(api, "/summaries", first).status_code == 201
    assert _post(api, "/summaries", torn).status_code == 201
    api.stop()
    data = api.csv.read_bytes()
    cut = data.index("京".encode()) + 1
    api.csv.write_bytes(data[:cut])

    restarted = ApiServer(settings)
    restarted.start()
    try:
        listed = requests.get(f"{restarted.url}/summaries", timeout=10).json()
        assert [item["stay_id"] for item in listed["items"]] == ["kept-1"]
        # The sender never had its answer for the torn row, so it retries.
        again = _post(restarted, "/summaries", torn)
        assert again.status_code == 201, again.text
        assert _post(restarted, "/summaries", torn).status_code == 200
        assert _post(restarted, "/summaries", first).status_code == 200
    finally:
        restarted.stop()
    rows = _rows(settings.summary_csv)
    assert [row["stay_id"] for row in rows] == ["kept-1", "torn-2"]
    assert rows[1]["vehicle_plate"] == "京A12345"
    assert settings.summary_csv.read_bytes().endswith(b"\n")


@pytest.mark.parametrize("lead", FORMULA_LEADS, ids=repr)
def test_no_cell_reaches_a_csv_as_a_formula(api: ApiServer, lead: str) -> None:
    """Every string field of every endpoint, led by a formula character:
    refused, or written inert."""
    payload = f'{lead}HYPERLINK("http://x")'
    attempts = [
        ("/summaries", _stay(payload)),
        ("/summaries", _stay("s-lot", lot_id=payload)),
        ("/summaries", _stay("s-plate", vehicle_plate=payload)),
        ("/summaries", _stay("s-currency", currency=payload)),
        ("/summaries", _stay("s-match", match=payload)),
        ("/summaries", _stay("s-fee", fee=payload)),
        ("/summaries", _stay("s-duration", duration_seconds=payload)),
        ("/summaries", _stay("s-time", entry_date_time=payload)),
        ("/unmatched", _unmatched(payload)),
        ("/unmatched", _unmatched("u-plate", vehicle_plate=payload)),
        ("/unmatched", _unmatched("u-lot", lot_id=payload)),
        ("/unmatched", _unmatched("u-why", why=payload)),
        ("/orphans", _orphan(payload)),
        ("/orphans", _orphan("o-plate", vehicle_plate=payload)),
        ("/orphans", _orphan("o-cause", cause=payload)),
    ]
    for path, body in attempts:
        status = _post(api, path, body).status_code
        assert status in (201, 422), (path, body, status)
    settings = api.settings
    for written in (
        settings.summary_csv,
        settings.unmatched_csv_path,
        settings.orphans_csv_path,
    ):
        for row in _rows(written):
            risky = {k: v for k, v in row.items() if v.startswith(FORMULA_LEADS)}
            assert not risky, f"{written.name}: {risky}"


def test_paging_far_past_the_end_is_empty_not_an_error(api: ApiServer) -> None:
    assert _post(api, "/summaries", _stay("only-1")).status_code == 201
    huge = 10**30
    answer = requests.get(f"{api.url}/summaries?offset={huge}", timeout=10)
    assert answer.status_code == 200
    assert answer.json()["items"] == []
    for query in ("limit=0", "limit=1001", "offset=-1", "limit=1e3", "limit=x"):
        refused = requests.get(f"{api.url}/summaries?{query}", timeout=10)
        assert refused.status_code == 422, query


def test_an_oversized_body_is_refused_before_it_is_read(api: ApiServer) -> None:
    # A stay is a few hundred bytes; 2 MiB is far beyond any honest one.
    junk = b"{" + b" " * (2 * 1024 * 1024)
    anonymous = requests.post(
        f"{api.url}/summaries",
        data=junk,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert anonymous.status_code in (401, 413), anonymous.text[:200]
    huge_plate = _stay("big-1", vehicle_plate="A" * (2 * 1024 * 1024))
    assert _post(api, "/summaries", huge_plate).status_code == 413


def test_an_oversized_chunked_body_is_refused_as_too_large(api: ApiServer) -> None:
    """No Content-Length to judge by: the body is counted as it streams in,
    and the client is told why it was refused (413, not a parse error)."""

    def chunks() -> Iterator[bytes]:
        yield b'{"stay_id": "chunked-1", "vehicle_plate": "'
        for _ in range(64):
            yield b"A" * 4096
        yield b'"}'

    for headers in (AUTH, {}):
        answer = requests.post(
            f"{api.url}/summaries",
            data=chunks(),
            headers={**headers, "Content-Type": "application/json"},
            timeout=30,
        )
        assert answer.status_code == 413, (headers, answer.text[:200])
    assert _rows(api.csv) == []


def test_a_negative_zero_fee_is_written_as_zero(api: ApiServer) -> None:
    assert _post(api, "/summaries", _stay("zero-fee", fee="-0")).status_code in (
        201,
        422,
    )
    fees = [row["fee"] for row in _rows(api.csv)]
    assert fees in ([], ["0.00"])


def test_two_distinct_event_ids_are_two_review_rows(api: ApiServer) -> None:
    first = _post(api, "/unmatched", _unmatched("=X1"))
    second = _post(api, "/unmatched", _unmatched("'=X1"))
    assert (first.status_code, second.status_code) == (201, 201)
    assert len(_rows(api.settings.unmatched_csv_path)) == 2


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("pässwörd", id="latin-1"),
        pytest.param(" leading", id="leading-space"),
        pytest.param("t€k", id="beyond-latin-1"),
        pytest.param("trailing ", id="trailing-space"),
        # PARKING_SUMMARY_API_TOKEN= (set, but empty): the API then wants
        # "Bearer " and the worker sends no header at all.
        pytest.param("", id="empty"),
    ],
)
def test_a_token_is_refused_at_start_or_works(tmp_path: Path, token: str) -> None:
    """An operator's token: either the settings refuse it when read, or the
    worker's posts with it are accepted by the API holding it."""
    try:
        settings = Settings(
            summary_csv=tmp_path / "stays.csv", summary_api_token=SecretStr(token)
        )
    except ValidationError:
        return
    entry_at = datetime(2024, 1, 1, tzinfo=UTC)
    stay = Stay.between(
        Visit("tok-in", "TOK1", entry_at),
        Visit("tok-out", "TOK1", entry_at + timedelta(hours=1)),
    )
    server = ApiServer(settings)
    server.start()
    try:
        sink = HttpSummarySink(
            server.url, ParkingMetrics(CollectorRegistry()), token=token
        )
        sink.record(stay)
    finally:
        server.stop()
    assert [row["stay_id"] for row in _rows(settings.summary_csv)] == [stay.stay_id]
