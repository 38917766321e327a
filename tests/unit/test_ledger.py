"""The stays CSV: one row per stay id, whole rows only, safe in a spreadsheet."""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from parking.api.ledger import (
    COLUMNS,
    UNMATCHED_COLUMNS,
    CsvLedger,
    LedgerLayoutError,
    neutralise,
)

T = TypeVar("T")
HEADER = ",".join(COLUMNS)


def _row(stay_id: str, plate: str = "AB-123") -> dict[str, str]:
    return {
        "stay_id": stay_id,
        "lot_id": "main",
        "vehicle_plate": plate,
        "entry_date_time": "2024-09-11T21:00:00Z",
        "exit_date_time": "2024-09-11T21:30:00.5Z",
        "duration_seconds": "1800.5",
        "fee": "6.00",
        "currency": "AUD",
        "match": "exact",
        "clock_skew": "false",
    }


def _with_ledger(
    path: Path, work: Callable[[CsvLedger], Awaitable[T]], fsync: bool = True
) -> T:
    """Run ``work`` against a started ledger on its own event loop."""

    async def run() -> T:
        ledger = CsvLedger(path, fsync=fsync)
        await ledger.start()
        try:
            return await work(ledger)
        finally:
            await ledger.stop()

    return asyncio.run(run())


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _records(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "stays.csv"


def test_a_new_file_gets_one_header_and_the_row(path: Path) -> None:
    written = _with_ledger(path, lambda ledger: ledger.append(_row("s1")))

    assert written is True
    assert _lines(path) == [
        HEADER,
        "s1,main,AB-123,2024-09-11T21:00:00Z,2024-09-11T21:30:00.5Z,1800.5,"
        "6.00,AUD,exact,false",
    ]


def test_the_same_stay_id_is_written_once(path: Path) -> None:
    async def twice(ledger: CsvLedger) -> tuple[bool, bool, int]:
        first = await ledger.append(_row("s1"))
        again = await ledger.append(_row("s1", plate="OTHER"))
        return first, again, ledger.rows

    assert _with_ledger(path, twice) == (True, False, 1)
    assert [r["vehicle_plate"] for r in _records(path)] == ["AB-123"]


def test_a_restart_keeps_the_header_single_and_the_dedupe(path: Path) -> None:
    _with_ledger(path, lambda ledger: ledger.append(_row("s1")))

    async def after_restart(ledger: CsvLedger) -> tuple[int, bool, bool]:
        rows_at_start = ledger.rows
        old = await ledger.append(_row("s1"))
        new = await ledger.append(_row("s2"))
        return rows_at_start, old, new

    assert _with_ledger(path, after_restart) == (1, False, True)
    assert _lines(path).count(HEADER) == 1
    assert [r["stay_id"] for r in _records(path)] == ["s1", "s2"]


def test_concurrent_appends_give_whole_rows_and_lose_none(path: Path) -> None:
    async def many(ledger: CsvLedger) -> list[bool]:
        rows = [_row(f"s{n:03d}", plate=f"京A{n:05d}") for n in range(200)]
        return await asyncio.gather(*(ledger.append(row) for row in rows))

    results = _with_ledger(path, many)

    assert results == [True] * 200
    lines = _lines(path)
    assert len(lines) == 201
    assert all(line.count(",") == len(COLUMNS) - 1 for line in lines)
    records = _records(path)
    assert sorted(r["stay_id"] for r in records) == [f"s{n:03d}" for n in range(200)]
    assert all(r["vehicle_plate"] == f"京A{r['stay_id'][1:].zfill(5)}" for r in records)


def test_concurrent_appends_of_one_stay_write_one_row(path: Path) -> None:
    async def same(ledger: CsvLedger) -> list[bool]:
        return await asyncio.gather(*(ledger.append(_row("s1")) for _ in range(50)))

    results = _with_ledger(path, same)

    assert results.count(True) == 1
    assert len(_records(path)) == 1


@pytest.mark.parametrize(
    ("cell", "stored"),
    [
        pytest.param(
            '=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")', id="equals"
        ),
        pytest.param("+1+1", "'+1+1", id="plus"),
        pytest.param("-1+1", "'-1+1", id="minus"),
        pytest.param("@SUM(A1)", "'@SUM(A1)", id="at"),
        pytest.param("\tcmd", "'\tcmd", id="tab"),
        pytest.param("\rcmd", "'\rcmd", id="carriage-return"),
        pytest.param("AB=1", "AB=1", id="equals-inside-untouched"),
        pytest.param("1800.5", "1800.5", id="number-untouched"),
        pytest.param("", "", id="empty"),
    ],
)
def test_formula_cells_are_neutralised(path: Path, cell: str, stored: str) -> None:
    assert neutralise(cell) == stored

    _with_ledger(path, lambda ledger: ledger.append(_row("s1", plate=cell)))

    [record] = _records(path)
    assert record["vehicle_plate"] == stored


@pytest.mark.parametrize(
    "plate",
    [
        pytest.param("ÄÖ-123", id="german"),
        pytest.param("京A12345", id="chinese"),
        pytest.param("Ω 77", id="greek"),
        pytest.param("ŁÓDŹ 1", id="polish"),
    ],
)
def test_non_ascii_plates_round_trip_as_utf8(path: Path, plate: str) -> None:
    _with_ledger(path, lambda ledger: ledger.append(_row("s1", plate=plate)))

    raw = path.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")
    assert plate.encode("utf-8") in raw
    assert _records(path)[0]["vehicle_plate"] == plate


def test_a_torn_last_line_is_dropped_on_recovery(path: Path) -> None:
    _with_ledger(path, lambda ledger: ledger.append(_row("s1")))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("s2,main,AB-9,2024-09-11T21:00:00Z,2024-09")

    async def recover(ledger: CsvLedger) -> tuple[int, bool]:
        return ledger.rows, await ledger.append(_row("s2"))

    # The torn row was never acknowledged, so its sender sends it again.
    assert _with_ledger(path, recover) == (1, True)
    assert path.read_text(encoding="utf-8").endswith("\n")
    records = _records(path)
    assert [r["stay_id"] for r in records] == ["s1", "s2"]
    assert records[1]["exit_date_time"] == "2024-09-11T21:30:00.5Z"


def test_a_file_torn_inside_the_header_is_recovered(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("stay_id,vehicle_pl", encoding="utf-8")

    _with_ledger(path, lambda ledger: ledger.append(_row("s1")))

    assert _lines(path)[0] == HEADER
    assert [r["stay_id"] for r in _records(path)] == ["s1"]


def test_health_follows_the_writer(path: Path) -> None:
    ledger = CsvLedger(path, fsync=False)
    states: list[bool] = [ledger.healthy()]

    async def lifecycle() -> None:
        await ledger.start()
        states.append(ledger.healthy())
        await ledger.stop()
        states.append(ledger.healthy())

    asyncio.run(lifecycle())

    assert states == [False, True, False]


def test_read_all_of_a_missing_file_is_empty(path: Path) -> None:
    assert list(CsvLedger(path).read_all()) == []


@pytest.mark.parametrize(
    "cell",
    [
        pytest.param("AB\r12", id="carriage-return-inside"),
        pytest.param("AB\n12", id="newline-inside"),
        pytest.param('A,"B"', id="comma-and-quotes"),
    ],
)
def test_cells_that_would_split_a_row_are_quoted(path: Path, cell: str) -> None:
    async def two(ledger: CsvLedger) -> None:
        await ledger.append(_row("s1", plate=cell))
        await ledger.append(_row("s2"))

    _with_ledger(path, two)

    records = _records(path)
    assert [(r["stay_id"], r["vehicle_plate"]) for r in records] == [
        ("s1", cell),
        ("s2", "AB-123"),
    ]
    assert _with_ledger(path, lambda ledger: asyncio.sleep(0, ledger.rows)) == 2


def test_a_file_of_another_layout_is_refused_by_name(path: Path) -> None:
    path.parent.mkdir(parents=True)
    old = "stay_id,vehicle_plate,entry_date_time,exit_date_time,duration_seconds\n"
    path.write_text(old + "s0,AB-1,2024-01-01T00:00:00Z,2024-01-01T01:00:00Z,3600\n")

    with pytest.raises(LedgerLayoutError) as refused:
        _with_ledger(path, lambda ledger: ledger.append(_row("s1")))

    assert str(path) in str(refused.value)
    assert "stay_id,vehicle_plate,entry_date_time" in str(refused.value)
    # Nothing was appended under the old header.
    assert path.read_text(encoding="utf-8").count("\n") == 2


def _unmatched(event_id: str, plate: str = "AB-123") -> dict[str, str]:
    return {
        "event_id": event_id,
        "lot_id": "main",
        "vehicle_plate": plate,
        "exit_date_time": "2024-09-11T21:30:00Z",
        "why": "grace_expired",
    }


def _review_ledger(path: Path) -> Callable[[], CsvLedger]:
    return lambda: CsvLedger(
        path, fsync=False, columns=UNMATCHED_COLUMNS, key="event_id", name="unmatched"
    )


def test_a_review_ledger_writes_its_own_columns_once_per_event_id(
    path: Path,
) -> None:
    make = _review_ledger(path.with_name("unmatched.csv"))

    async def run(work: Callable[[CsvLedger], Awaitable[T]]) -> T:
        ledger = make()
        await ledger.start()
        try:
            return await work(ledger)
        finally:
            await ledger.stop()

    async def first(ledger: CsvLedger) -> list[bool]:
        # An event id is any printable text: this one starts like a formula.
        return [
            await ledger.append(_unmatched("-x1")),
            await ledger.append(_unmatched("-x1", plate="OTHER")),
            await ledger.append(_unmatched("x2")),
        ]

    async def restarted(ledger: CsvLedger) -> list[bool]:
        return [await ledger.append(_unmatched("-x1")), ledger.rows == 2]

    assert asyncio.run(run(first)) == [True, False, True]
    assert asyncio.run(run(restarted)) == [False, True]
    written = path.with_name("unmatched.csv")
    assert _lines(written)[0] == ",".join(UNMATCHED_COLUMNS)
    assert [r["event_id"] for r in _records(written)] == ["'-x1", "x2"]


def test_a_ledger_key_must_be_one_of_its_columns(path: Path) -> None:
    with pytest.raises(ValueError, match="key column"):
        CsvLedger(path, columns=UNMATCHED_COLUMNS, key="stay_id")


def test_neutralising_keeps_distinct_cells_distinct() -> None:
    cells = ["=X1", "'=X1", "''=X1", "X1", "'X1"]
    assert len({neutralise(cell) for cell in cells}) == len(cells)


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
def test_pages_from_memory_match_pages_from_the_file(
    path: Path, monkeypatch: pytest.MonkeyPatch, restart: bool
) -> None:
    # A small memory of recent rows, so that deep pages fall back to the file.
    monkeypatch.setattr("parking.api.ledger.RECENT_ROWS", 5)

    async def fill(ledger: CsvLedger) -> None:
        for n in range(12):
            await ledger.append(_row(f"s{n}", plate="=SUM1" if n == 3 else "AB1"))

    _with_ledger(path, fill)
    if not restart:
        _with_ledger(path, lambda ledger: ledger.append(_row("s12")))
    else:
        _with_ledger(path, lambda ledger: asyncio.sleep(0))
    expected = list(reversed(_records(path)))

    async def pages(ledger: CsvLedger) -> list[list[dict[str, str]] | None]:
        cases = [(3, 0), (5, 0), (2, 3), (4, 4), (3, 11), (10, 20)]
        return [ledger.latest(limit, offset) for limit, offset in cases]

    got = _with_ledger(path, pages)
    cases = [(3, 0), (5, 0), (2, 3), (4, 4), (3, 11), (10, 20)]
    for (limit, offset), page in zip(cases, got, strict=True):
        if offset + limit <= 5:
            assert page == expected[offset : offset + limit]
        else:
            assert page is None


def test_rows_just_written_are_the_first_page(path: Path) -> None:
    async def write_then_page(ledger: CsvLedger) -> list[dict[str, str]] | None:
        for n in range(4):
            await ledger.append(_row(f"w{n}", plate="-AB1" if n == 2 else "AB1"))
        return ledger.latest(3, 0)

    page = _with_ledger(path, write_then_page)
    assert page == list(reversed(_records(path)))[:3]
