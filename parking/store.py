"""Open visits and pending exits in Redis, one Lua script per atomic step.

Plates are spread over a fixed number of buckets. Every key a step touches
carries its bucket as a hash tag (``parking:{b7}:visit:ABC123``), including the
bucket's indexes of open visits and pending exits, so each script stays on one
Redis Cluster slot while the indexes (occupancy, sweeps) stay exact and atomic.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, cast

import redis

from parking.errors import StoreUnavailable
from parking.events import CameraEvent
from parking.stays import Visit

#: Fixed forever for a given database: changing it moves every key.
BUCKETS = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Times travel as integer microseconds in strings: Lua numbers are doubles,
# exact to 2**53, and cjson would print them with 14 digits, so they are
# compared with tonumber() but never re-encoded.
_ENTER = """
local visit_key, exit_key, seen_key, open_key, pending_key = unpack(KEYS)
local entered_key = KEYS[7]
local id, plate, at_s, member = ARGV[1], ARGV[2], ARGV[3], ARGV[8]
local at, dup, skew = tonumber(at_s), tonumber(ARGV[4]), tonumber(ARGV[5])
local first = redis.call('GET', seen_key)
if first then return '{"o":"duplicate","first":' .. first .. '}' end
local this = {id=id, plate=plate, at=at_s}
local pending = redis.call('HMGET', exit_key, 'id', 'plate', 'at')
local visit = redis.call('HMGET', visit_key, 'id', 'plate', 'at')
local entered = tonumber(redis.call('GET', entered_key))
local result
if pending[1] and tonumber(pending[3]) >= at - skew then
  redis.call('DEL', exit_key)
  redis.call('ZREM', pending_key, member)
  if dup > 0 then redis.call('SET', entered_key, at_s, 'EX', ARGV[10]) end
  result = cjson.encode({o='matched', entry=this,
    exit={id=pending[1], plate=pending[2], at=pending[3]}})
elseif visit[1] and math.abs(at - tonumber(visit[3])) <= dup then
  result = cjson.encode({o='duplicate_read'})
elseif entered and math.abs(at - entered) <= dup then
  -- A second read of an entry whose stay is already complete: its queue
  -- delivered it after the match, which must not open a phantom visit.
  result = cjson.encode({o='duplicate_read'})
elseif visit[1] and at < tonumber(visit[3]) then
  result = cjson.encode({o='orphaned', orphan=this})
else
  redis.call('HSET', visit_key, 'id', id, 'plate', plate, 'at', at_s)
  redis.call('ZADD', open_key, ARGV[7], member)
  if visit[1] then
    result = cjson.encode({o='opened',
      orphan={id=visit[1], plate=visit[2], at=visit[3]}})
  else
    result = '{"o":"opened"}'
  end
end
redis.call('SET', seen_key, result, 'EX', ARGV[6])
return result
"""

_LEAVE = """
local visit_key, exit_key, seen_key, open_key, pending_key, last_key = unpack(KEYS)
local entered_key = KEYS[7]
local id, plate, at_s, member = ARGV[1], ARGV[2], ARGV[3], ARGV[8]
local at, dup, skew = tonumber(at_s), tonumber(ARGV[4]), tonumber(ARGV[5])
local first = redis.call('GET', seen_key)
if first then return '{"o":"duplicate","first":' .. first .. '}' end
local this = {id=id, plate=plate, at=at_s}
local visit = redis.call('HMGET', visit_key, 'id', 'plate', 'at')
local result
if visit[1] and at >= tonumber(visit[3]) - skew then
  redis.call('DEL', visit_key)
  redis.call('ZREM', open_key, member)
  if dup > 0 then
    -- Compared in event time, so kept as long as a pending exit: a second
    -- read that waited in a backlog for seconds is still the same exit.
    redis.call('SET', last_key, at_s, 'EX', ARGV[10])
    redis.call('SET', entered_key, visit[3], 'EX', ARGV[10])
  end
  result = cjson.encode({o='matched',
    entry={id=visit[1], plate=visit[2], at=visit[3]}, exit=this})
else
  local last = redis.call('GET', last_key)
  local pending = redis.call('HMGET', exit_key, 'id', 'plate', 'at')
  if (last and math.abs(at - tonumber(last)) <= dup)
     or (pending[1] and math.abs(at - tonumber(pending[3])) <= dup) then
    result = cjson.encode({o='duplicate_read'})
  else
    redis.call('HSET', exit_key, 'id', id, 'plate', plate, 'at', at_s)
    redis.call('EXPIRE', exit_key, ARGV[10])
    redis.call('ZADD', pending_key, ARGV[9], member)
    if pending[1] then
      result = cjson.encode({o='pending',
        superseded={id=pending[1], plate=pending[2], at=pending[3]}})
    else
      result = '{"o":"pending"}'
    end
  end
end
redis.call('SET', seen_key, result, 'EX', ARGV[6])
return result
"""

# Removes one record if its index score is still due; the score check makes a
# concurrent sweep, or a match that came in between, harmless.
_TAKE_DUE = """
local record_key, index_key = KEYS[1], KEYS[2]
local score = redis.call('ZSCORE', index_key, ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
local fields = redis.call('HMGET', record_key, 'id', 'plate', 'at')
redis.call('DEL', record_key)
redis.call('ZREM', index_key, ARGV[1])
if not fields[1] then return false end
return cjson.encode({id=fields[1], plate=fields[2], at=fields[3]})
"""


class Outcome(StrEnum):
    OPENED = "opened"
    MATCHED = "matched"
    PENDING = "pending"
    ORPHANED = "orphaned"
    DUPLICATE = "duplicate"
    DUPLICATE_READ = "duplicate_read"


@dataclass(frozen=True, slots=True)
class Transition:
    """What one event did to the ledger."""

    outcome: Outcome
    entry: Visit | None = None
    exit: Visit | None = None
    #: A visit closed without an exit (re-entry), or a late entry with no home.
    orphan: Visit | None = None
    #: An earlier pending exit of the same plate, replaced by this one.
    superseded: Visit | None = None
    #: For a duplicate delivery: what the first delivery did.
    first: Transition | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transition:
        first = data.get("first")
        return cls(
            outcome=Outcome(data["o"]),
            entry=_visit(data.get("entry")),
            exit=_visit(data.get("exit")),
            orphan=_visit(data.get("orphan")),
            superseded=_visit(data.get("superseded")),
            first=cls.from_json(first) if first else None,
        )


class VisitStore(Protocol):
    def enter(self, event: CameraEvent, now: datetime) -> Transition: ...
    def leave(self, event: CameraEvent, now: datetime) -> Transition: ...


@dataclass(frozen=True, slots=True)
class LedgerPolicy:
    duplicate_window: timedelta = timedelta(seconds=5)
    #: An exit this much before its entry is clock skew, not another visit.
    clock_skew: timedelta = timedelta(minutes=2)
    grace: timedelta = timedelta(seconds=30)
    event_ttl: timedelta = timedelta(days=7)


class RedisVisitStore:
    """The ledger of open visits; every public method is one round trip."""

    def __init__(
        self, client: redis.Redis, policy: LedgerPolicy, prefix: str = "parking"
    ) -> None:
        self._redis = client
        self._policy = policy
        self._prefix = prefix
        self._enter = client.register_script(_ENTER)
        self._leave = client.register_script(_LEAVE)
        self._take_due = client.register_script(_TAKE_DUE)

    def enter(self, event: CameraEvent, now: datetime) -> Transition:
        return self._step(self._enter, event, now)

    def leave(self, event: CameraEvent, now: datetime) -> Transition:
        return self._step(self._leave, event, now)

    def _step(self, script: Any, event: CameraEvent, now: datetime) -> Transition:
        policy = self._policy
        tag = self._tag(event.plate_key)
        member = event.plate_key
        keys = [
            f"{tag}:visit:{member}",
            f"{tag}:exit:{member}",
            f"{tag}:event:{event.id}",
            f"{tag}:open",
            f"{tag}:pending",
            f"{tag}:last:{member}",
            f"{tag}:entered:{member}",
        ]
        pending_ttl = int(policy.grace.total_seconds() * 4) + 3600
        args = [
            event.id,
            event.plate,
            _micros(event.at),
            policy.duplicate_window // _US,
            policy.clock_skew // _US,
            int(policy.event_ttl.total_seconds()),
            _micros(now),
            member,
            _micros(now + policy.grace),
            pending_ttl,
        ]
        with _redis_errors():
            raw = script(keys=keys, args=args)
        return Transition.from_json(json.loads(raw))

    def take_expired_exits(self, now: datetime, limit: int = 1000) -> list[Visit]:
        """Pending exits whose grace period is over; each is returned once."""
        return self._take("pending", "exit", _micros(now), limit)

    def take_stale_visits(
        self, opened_before: datetime, limit: int = 1000
    ) -> list[Visit]:
        """Visits opened before the cut-off, closed here as orphans."""
        return self._take("open", "visit", _micros(opened_before), limit)

    def _take(self, index: str, record: str, due: int, limit: int) -> list[Visit]:
        taken: list[Visit] = []
        with _redis_errors():
            for bucket in range(BUCKETS):
                tag = f"{self._prefix}:{{b{bucket}}}"
                # Without scores, the reply is a plain list of members.
                members = cast(
                    "list[bytes | str]",
                    self._redis.zrangebyscore(
                        f"{tag}:{index}", "-inf", due, start=0, num=limit
                    ),
                )
                if not members:
                    continue
                pipe = self._redis.pipeline(transaction=False)
                for member in members:
                    name = member.decode() if isinstance(member, bytes) else member
                    self._take_due(
                        keys=[f"{tag}:{record}:{name}", f"{tag}:{index}"],
                        args=[name, due],
                        client=pipe,
                    )
                taken.extend(
                    visit
                    for raw in pipe.execute()
                    if raw and (visit := _visit(json.loads(raw)))
                )
        return taken

    def counts(self) -> dict[str, int]:
        """Open visits (occupancy) and exits waiting for their entry."""
        with _redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for bucket in range(BUCKETS):
                tag = f"{self._prefix}:{{b{bucket}}}"
                pipe.zcard(f"{tag}:open")
                pipe.zcard(f"{tag}:pending")
            sizes = pipe.execute()
        return {"open": sum(sizes[0::2]), "pending": sum(sizes[1::2])}

    def ping(self) -> bool:
        with _redis_errors():
            return bool(self._redis.ping())

    def _tag(self, plate_key: str) -> str:
        bucket = zlib.crc32(plate_key.encode()) % BUCKETS
        return f"{self._prefix}:{{b{bucket}}}"


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // _US


def _visit(data: dict[str, str] | None) -> Visit | None:
    if not data:
        return None
    at = _EPOCH + timedelta(microseconds=int(data["at"]))
    return Visit(event_id=data["id"], plate=data["plate"], at=at)


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc
