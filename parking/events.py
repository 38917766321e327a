"""Camera events on the wire and their validation.

Validation is written out by hand rather than with a model library because each
failure must map to one bounded ``reason`` for metrics and a message that names
the field, and because it runs for every event on the hot path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from parking.errors import InvalidEvent
from parking.plates import clean_plate, normalise_plate
from parking.settings import DEFAULT_LOT

MAX_ID_LENGTH = 128
#: Far larger than any real event; bigger payloads are refused before parsing.
MAX_MESSAGE_BYTES = 16 * 1024
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})"
    r"(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))?",
    # ASCII digits only: \d alone also matches full-width and other scripts'
    # digits, which int() would quietly accept.
    re.ASCII,
)


class EventKind(StrEnum):
    ENTRY = "entry"
    EXIT = "exit"

    @property
    def time_field(self) -> str:
        return f"{self.value}_date_time"


@dataclass(frozen=True, slots=True)
class CameraEvent:
    """One validated read of a plate at a gate."""

    kind: EventKind
    id: str
    plate: str  # as read, for display
    plate_key: str  # normalised, for matching
    at: datetime  # aware, UTC
    #: The car park whose gate read it (checked against the configured ones
    #: by the handler, which knows them).
    lot_id: str = DEFAULT_LOT

    def to_wire(self) -> dict[str, str]:
        return {
            "id": self.id,
            "vehicle_plate": self.plate,
            self.kind.time_field: format_time(self.at),
            "lot_id": self.lot_id,
        }


def parse_time(value: object, field: str) -> datetime:
    """An RFC 3339 time with an offset, as UTC; nanoseconds kept to microseconds."""
    if not isinstance(value, str):
        raise InvalidEvent("bad_time", f"{field} must be a string")
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidEvent("bad_time", f"{field} is not an RFC 3339 date-time")
    year, month, day, hour, minute, second, fraction, zulu, sign, oh, om = (
        match.groups()
    )
    if not zulu and not sign:
        raise InvalidEvent("naive_time", f"{field} has no UTC offset")
    offset = timedelta(0)
    if sign:
        if int(oh) > 23 or int(om) > 59:
            raise InvalidEvent("bad_time", f"{field} has an impossible UTC offset")
        offset = timedelta(hours=int(oh), minutes=int(om))
        if sign == "-":
            offset = -offset
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            micro, tzinfo=timezone(offset),
        )  # fmt: skip
        at = local.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidEvent("bad_time", f"{field} is impossible: {exc}") from None
    if not EARLIEST <= at < LATEST:
        raise InvalidEvent(
            "time_out_of_range", f"{field} is outside {EARLIEST.year}..{LATEST.year}"
        )
    return at


def format_time(at: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``; the fraction only when there is one."""
    text = at.astimezone(UTC).replace(tzinfo=None).isoformat()
    return text + "Z"


def parse_event(
    payload: object, kind: EventKind, default_lot: str = DEFAULT_LOT
) -> CameraEvent:
    """Validate one wire-format event; unknown extra fields are ignored.

    ``lot_id`` is optional: without it the event belongs to ``default_lot``.
    """
    if isinstance(payload, (str, bytes, bytearray)):
        payload = decode_json(payload)
    if not isinstance(payload, Mapping):
        raise InvalidEvent("not_an_object", "event must be a JSON object")
    event_id = _identifier(_field(payload, "id"), "id", "bad_id")
    lot_id = payload.get("lot_id")
    lot_id = default_lot if lot_id is None else _identifier(lot_id, "lot_id", "bad_lot")
    raw_plate = _field(payload, "vehicle_plate")
    if not isinstance(raw_plate, str):
        raise InvalidEvent("bad_plate", "vehicle_plate must be a string")
    try:
        plate = clean_plate(raw_plate)
    except ValueError as exc:
        raise InvalidEvent("bad_plate", f"vehicle_plate: {exc}") from None
    at = parse_time(_field(payload, kind.time_field), kind.time_field)
    return CameraEvent(kind, event_id, plate, normalise_plate(plate), at, lot_id)


def _identifier(value: object, name: str, reason: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent(reason, f"{name} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidEvent(
            reason, f"{name} must be printable and at most {MAX_ID_LENGTH} characters"
        )
    return value


def decode_json(raw: str | bytes | bytearray) -> Any:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent("too_large", f"message over {MAX_MESSAGE_BYTES} bytes")
    if isinstance(raw, str):
        # Bytes with a byte-order mark parse; the same body already decoded
        # as UTF-8 text (AMQP content_encoding) keeps the mark as a character.
        raw = raw.removeprefix("\ufeff")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidEvent("bad_encoding", "message is not UTF-8") from None
    except ValueError as exc:
        raise InvalidEvent("bad_json", f"message is not JSON: {exc}") from None
    except RecursionError:
        # 16 KiB of "[" is small enough to pass the size check.
        raise InvalidEvent("bad_json", "message nests too deeply") from None


def _field(payload: Mapping[str, Any], name: str) -> Any:
    try:
        return payload[name]
    except KeyError:
        raise InvalidEvent("missing_field", f"{name} is missing") from None
