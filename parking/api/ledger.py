"""CSV ledgers: one row per key, appended in durable batches.

One writer task owns each file. Requests queue their rows and wait; the writer
takes everything queued, appends it, fsyncs once and then answers them all
(group commit), so rows never interleave and an answered row is on disk.

The stays CSV is keyed by stay id; the review files beside it (unmatched
exits, orphaned visits) by the event id of the read they are about.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STAY_COLUMNS = (
    "stay_id",
    "lot_id",
    "vehicle_plate",
    "entry_date_time",
    "exit_date_time",
    "duration_seconds",
    "fee",
    "currency",
    "match",
    "clock_skew",
)
#: The stays CSV's columns (the default ledger).
COLUMNS = STAY_COLUMNS
UNMATCHED_COLUMNS = (
    "event_id",
    "lot_id",
    "vehicle_plate",
    "exit_date_time",
    "why",
)
ORPHAN_COLUMNS = (
    "event_id",
    "lot_id",
    "vehicle_plate",
    "entry_date_time",
    "cause",
)
#: Cells a spreadsheet would run as a formula start with one of these.
_FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")
MAX_BATCH = 2000
RECENT_ROWS = 10_000


def neutralise(cell: str) -> str:
    """Make a cell inert in spreadsheets (OWASP's advice: a leading quote).

    A cell that already starts with a quote gets one more, so that two
    different values never become the same cell (keys must stay distinct).
    """
    return "'" + cell if cell.startswith((*_FORMULA_LEADS, "'")) else cell


class LedgerLayoutError(Exception):
    """The file has other columns than this ledger writes."""


@dataclass(slots=True)
class _Pending:
    row: dict[str, str]
    done: asyncio.Future[bool]


class CsvLedger:
    def __init__(
        self,
        path: Path,
        fsync: bool = True,
        columns: tuple[str, ...] = STAY_COLUMNS,
        key: str = "stay_id",
        name: str = "stays",
    ) -> None:
        if key not in columns:
            raise ValueError(f"key column {key!r} is not one of {columns}")
        self.path = path
        self.columns = columns
        self.key = key
        self.name = name
        self._fsync = fsync
        self._ids: set[str] = set()
        self._rows = 0
        #: The newest rows as the file holds them, so that the usual "latest
        #: stays" pages are served without reading the whole file.
        self._recent: deque[dict[str, str]] = deque(maxlen=RECENT_ROWS)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._file: io.TextIOWrapper | None = None

    @property
    def rows(self) -> int:
        return self._rows

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        # Made here, not in __init__: a queue belongs to the loop that runs it.
        self._queue = asyncio.Queue()
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if self._file.tell() == 0:
            self._file.write(_encode([list(self.columns)]))
            self._sync()
        self._task = asyncio.create_task(
            self._write_forever(), name=f"csv-writer-{self.name}"
        )
        logger.info(
            "ledger open name=%s path=%s rows=%d", self.name, self.path, self._rows
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._file is not None:
            self._file.close()

    def healthy(self) -> bool:
        writer_alive = self._task is not None and not self._task.done()
        return writer_alive and os.access(self.path, os.W_OK)

    async def append(self, row: dict[str, str]) -> bool:
        """Write one row; ``False`` when its key is already in the file."""
        if self._key_of(row) in self._ids:
            return False
        assert self._queue is not None, "ledger not started"
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(row, done))
        return await done

    async def _write_forever(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._write(batch)
            except Exception as exc:  # the writer must survive a full disk
                logger.exception("ledger write failed name=%s", self.name)
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)

    async def _write(self, batch: list[_Pending]) -> None:
        fresh: list[_Pending] = []
        seen: set[str] = set()
        for item in batch:
            key = self._key_of(item.row)
            if key in self._ids or key in seen:
                item.done.set_result(False)
            else:
                seen.add(key)
                fresh.append(item)
        if not fresh:
            return
        assert self._file is not None
        columns = self.columns
        # Neutralised once, for the file and for the recent rows alike.
        cells = [[neutralise(item.row[column]) for column in columns] for item in fresh]
        self._file.write(_encode(cells))
        await asyncio.to_thread(self._sync)
        self._ids.update(seen)
        self._rows += len(fresh)
        self._recent.extend(dict(zip(columns, each, strict=True)) for each in cells)
        for item in fresh:
            item.done.set_result(True)

    def _sync(self) -> None:
        assert self._file is not None
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def _key_of(self, row: dict[str, str]) -> str:
        # Compared as written: a key the file neutralised (a leading "=" or
        # "-") must still be found after a restart.
        return neutralise(row[self.key])

    def _recover(self) -> None:
        """Load the keys already written; drop a torn last line from a crash.

        A torn line was never acknowledged, so its sender retries it. A file
        of another layout is refused: rows of two layouts under one header
        would be misread by everything that reads the file.
        """
        self._ids = set()
        self._rows = 0
        self._recent.clear()
        if not self.path.exists():
            return
        with open(self.path, "rb+") as raw:
            data = raw.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                logger.warning(
                    "ledger dropping torn tail name=%s bytes=%d",
                    self.name, len(data) - keep,
                )  # fmt: skip
                raw.truncate(keep)
        self._check_header()
        for row in self.read_all():
            self._ids.add(row[self.key])
            self._rows += 1
            self._recent.append(row)

    def _check_header(self) -> None:
        with open(self.path, encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle), None)
        if header is not None and tuple(header) != self.columns:
            raise LedgerLayoutError(
                f"{self.path} has the columns {','.join(header)} but the "
                f"{self.name} ledger writes {','.join(self.columns)}; move the "
                "file aside (or convert it) and start again"
            )

    def latest(self, limit: int, offset: int) -> list[dict[str, str]] | None:
        """Newest first, from memory; ``None`` when the page reaches older rows."""
        held = len(self._recent)
        if offset + limit > held and held < self._rows:
            return None
        if offset >= held:
            return []
        newest = list(itertools.islice(reversed(self._recent), offset + limit))
        return newest[offset:]

    def read_all(self) -> Iterator[dict[str, str]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)


def _encode(rows: list[list[str]]) -> str:
    """CSV lines of cells already neutralised, in the ledger's column order."""
    buffer = io.StringIO()
    plain = csv.writer(buffer, lineterminator="\n")
    # The writer quotes only characters of its own line terminator, but every
    # reader ends a row at a bare carriage return too: such rows get quoted.
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for cells in rows:
        risky = any("\r" in cell for cell in cells)
        (quoted if risky else plain).writerow(cells)
    return buffer.getvalue()
