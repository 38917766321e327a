"""Open visits and pending exits in Redis, one Lua script per atomic step.

Plates are spread over a fixed number of buckets by the hash of their
confusion form (``parking.misreads``), so a plate and every plate one misread
away share a bucket. Every key a step touches carries its bucket as a hash tag
(``parking:{b7}:visit:main:ABC123``), including the bucket's per car park
indexes of open visits, pending exits and plates of one confusion form, so
each script stays on one Redis Cluster slot while the indexes (occupancy,
sweeps, misread lookups) stay exact and atomic.

A plate may have several exits waiting for their entries (a repeat visitor
whose entries are held up): they wait side by side in one hash per plate, and
an entry completes the one that fits its time, so each visit is billed for
its own stay.

Exits declared unmatched and visits closed as orphans by a sweep move, in the
same step that takes them, into the bucket's review outbox; they leave it only
once the summary API has them, so a crash or an API outage loses none.

What is kept only for a while (the record of every event applied, and the
camera reads of every completed stay, for telling second reads) lives in
time slices: one hash per bucket, car park and slice of processing time, with
a field per event or plate, not one key per item. A step writes into the
current slice and reads the slices a record's lifetime can reach, newest
first. The number of keys so stays flat however many events pass, Redis has
no per-item expiry to track, and a slice goes as a whole once its last record
is old enough.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Protocol, cast

import redis

from parking.errors import StoreUnavailable
from parking.events import CameraEvent, EventKind
from parking.misreads import confusion_form
from parking.plates import normalise_plate
from parking.review import (
    OrphanCause,
    OrphanedVisit,
    Review,
    UnmatchedExit,
    UnmatchedWhy,
)
from parking.settings import DEFAULT_LOT
from parking.stays import Match, Visit

#: Fixed forever for a given database: changing it moves every key.
BUCKETS = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Times travel as integer microseconds in strings: Lua numbers are doubles,
# exact to 2**53, and cjson would print them with 14 digits, so they are
# compared with tonumber() but never re-encoded.
#
# A plate's pending exits are one hash, exit id -> {plate, at, due[, why]}
# (``due``: when the grace period ends, in processing time). The bucket's
# pending index scores the plate with the earliest due among them, so a sweep
# finds it as soon as the first one is due; every step that adds or takes an
# exit scores it again from what is left.
_PENDING = """
local function rescore(exits_key, pending_key, member)
  local earliest
  for _, raw in ipairs(redis.call('HVALS', exits_key)) do
    local due = cjson.decode(raw).due
    if not earliest or tonumber(due) < tonumber(earliest) then earliest = due end
  end
  if earliest then
    redis.call('ZADD', pending_key, earliest, member)
  else
    redis.call('ZREM', pending_key, member)
  end
end
"""

# What a step keeps for a while, in slices of processing time (module
# docstring and ``TimeSlices``). A lookup reads the slices from the newest to
# the oldest its caller names, which reach past a record's lifetime on both
# sides by the clocks' margin; then the record's one-key form of the version
# before slices, which a message that version applied and never acked brings
# back until those keys expire. That version never reads slices: stop its
# workers before starting these, and do not go back to it within an event
# lifetime. The GET can go once no store holds keys of that version.
_SLICES = """
local tag, lot = ARGV[11], ARGV[12]

-- Built here under this bucket's hash tag, so in this step's slot.
local function slice_key(name, s)
  return tag .. name .. ':' .. lot .. ':' .. s
end
local function recall(name, newest, oldest, field, legacy)
  for s = newest, oldest, -1 do
    local value = redis.call('HGET', slice_key(name, s), field)
    if value then return value end
  end
  return redis.call('GET', tag .. legacy .. ':' .. lot .. ':' .. field) or nil
end
local function remember(name, slice, ttl, field, value)
  local key = slice_key(name, slice)
  redis.call('HSET', key, field, value)
  redis.call('EXPIRE', key, ttl)
end
"""

_ENTER = (
    _SLICES
    + _PENDING
    + """
local visit_key, exits_key, open_key, pending_key, similar_key = unpack(KEYS)
local id, plate, at_s, member = ARGV[1], ARGV[2], ARGV[3], ARGV[8]
local at, dup, skew = tonumber(at_s), tonumber(ARGV[4]), tonumber(ARGV[5])
local events = 'events:' .. ARGV[14]
local event_slice = tonumber(ARGV[15])
local event_newest, event_oldest = tonumber(ARGV[16]), tonumber(ARGV[17])
local read_slice = tonumber(ARGV[18])
local read_newest, read_oldest = tonumber(ARGV[19]), tonumber(ARGV[20])
local first = recall(events, event_newest, event_oldest, id, 'event:' .. ARGV[14])
if first then return '{"o":"duplicate","first":' .. first .. '}' end
local this = {id=id, plate=plate, at=at_s}

-- The exit this entry completes: the first one at or after it; failing
-- that, the last one stamped at most the clock skew before it. Of two
-- exits of a repeat visitor, the earlier entry so takes the earlier exit.
local exits = redis.call('HGETALL', exits_key)
local after_id, after, after_at, skewed_id, skewed, skewed_at
for i = 1, #exits, 2 do
  local exit_id, record = exits[i], cjson.decode(exits[i + 1])
  local exit_at = tonumber(record.at)
  if exit_at >= at then
    if not after or exit_at < after_at
       or (exit_at == after_at and exit_id < after_id) then
      after_id, after, after_at = exit_id, record, exit_at
    end
  elseif exit_at >= at - skew then
    if not skewed or exit_at > skewed_at
       or (exit_at == skewed_at and exit_id < skewed_id) then
      skewed_id, skewed, skewed_at = exit_id, record, exit_at
    end
  end
end
local pending_id, pending = after_id, after
if not pending then pending_id, pending = skewed_id, skewed end

local visit = redis.call('HMGET', visit_key, 'id', 'plate', 'at')
local entered = tonumber(
  recall('entry-reads', read_newest, read_oldest, member, 'entered'))
local result
if pending then
  redis.call('HDEL', exits_key, pending_id)
  rescore(exits_key, pending_key, member)
  if dup > 0 then
    remember('entry-reads', read_slice, ARGV[21], member, at_s)
    -- The exit camera's second read may still be on its way: it is the
    -- same exit, not one more waiting for an entry.
    remember('exit-reads', read_slice, ARGV[21], member, pending.at)
  end
  result = cjson.encode({o='matched', entry=this,
    exit={id=pending_id, plate=pending.plate, at=pending.at}})
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
  redis.call('SADD', similar_key, member)
  if visit[1] then
    result = cjson.encode({o='opened',
      orphan={id=visit[1], plate=visit[2], at=visit[3]}})
  else
    result = '{"o":"opened"}'
  end
end
remember(events, event_slice, ARGV[6], id, result)
return result
"""
)

_LEAVE = (
    _SLICES
    + _PENDING
    + """
local visit_key, exits_key, open_key, pending_key, similar_key = unpack(KEYS)
local id, plate, at_s, member = ARGV[1], ARGV[2], ARGV[3], ARGV[8]
local at, dup, skew = tonumber(at_s), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_misread = tonumber(ARGV[13])
local events = 'events:' .. ARGV[14]
local event_slice = tonumber(ARGV[15])
local event_newest, event_oldest = tonumber(ARGV[16]), tonumber(ARGV[17])
local read_slice = tonumber(ARGV[18])
local read_newest, read_oldest = tonumber(ARGV[19]), tonumber(ARGV[20])
local first = recall(events, event_newest, event_oldest, id, 'event:' .. ARGV[14])
if first then return '{"o":"duplicate","first":' .. first .. '}' end
local this = {id=id, plate=plate, at=at_s}

-- Keys of another plate of the same confusion form: the same hash tag, so
-- the same slot, though no caller can name them before the lookup.
local function key_of(kind, other)
  return tag .. kind .. ':' .. lot .. ':' .. other
end

local function close(other, visit_at)
  redis.call('DEL', key_of('visit', other))
  redis.call('ZREM', open_key, other)
  redis.call('SREM', similar_key, other)
  if dup > 0 then
    -- Compared in event time, so kept as long as a pending exit: a second
    -- read that waited in a backlog for seconds is still the same exit.
    remember('exit-reads', read_slice, ARGV[21], other, at_s)
    remember('entry-reads', read_slice, ARGV[21], other, visit_at)
  end
end

-- Open visits whose plate differs from this one only in at most
-- max_misread characters readers confuse (one confusion form, so the same
-- length in bytes, and only confusable ASCII bytes can differ).
local function misread_candidates()
  local found = {}
  if max_misread < 1 then return found end
  for _, other in ipairs(redis.call('SMEMBERS', similar_key)) do
    if other ~= member and #other == #member then
      local differ = 0
      for i = 1, #member do
        if string.byte(member, i) ~= string.byte(other, i) then
          differ = differ + 1
          if differ > max_misread then break end
        end
      end
      if differ <= max_misread then
        local v = redis.call('HMGET', key_of('visit', other), 'id', 'plate', 'at')
        if v[1] and at >= tonumber(v[3]) - skew then
          found[#found + 1] = {other, v}
        end
      end
    end
  end
  return found
end

-- A second read of any exit of this plate still waiting for its entry.
local function repeats_a_pending_exit()
  for _, raw in ipairs(redis.call('HVALS', exits_key)) do
    if math.abs(at - tonumber(cjson.decode(raw).at)) <= dup then return true end
  end
  return false
end

local visit = redis.call('HMGET', visit_key, 'id', 'plate', 'at')
local result
if visit[1] and at >= tonumber(visit[3]) - skew then
  close(member, visit[3])
  result = cjson.encode({o='matched',
    entry={id=visit[1], plate=visit[2], at=visit[3]}, exit=this})
else
  local last = recall('exit-reads', read_newest, read_oldest, member, 'last')
  local found = {}
  local repeated = (last and math.abs(at - tonumber(last)) <= dup)
     or repeats_a_pending_exit()
  -- An open visit of this very plate that the exit cannot close (stamped
  -- long before it) says the plate was read right: no misread to look for.
  if not repeated and not visit[1] then found = misread_candidates() end
  if repeated then
    result = cjson.encode({o='duplicate_read'})
  elseif #found == 1 then
    local other, v = found[1][1], found[1][2]
    close(other, v[3])
    -- A second read with the same misread is the same exit too.
    if dup > 0 then remember('exit-reads', read_slice, ARGV[21], member, at_s) end
    result = cjson.encode({o='matched', m='fuzzy',
      entry={id=v[1], plate=v[2], at=v[3]}, exit=this})
  else
    -- Beside the plate's other pending exits, if any: each waits for the
    -- entry that fits its own time.
    local record = {plate=plate, at=at_s, due=ARGV[9]}
    if #found > 1 then record.why = 'ambiguous' end
    redis.call('HSET', exits_key, id, cjson.encode(record))
    redis.call('EXPIRE', exits_key, ARGV[10])
    rescore(exits_key, pending_key, member)
    local out = {o='pending'}
    if #found > 1 then out.ambiguous = #found; out.exit = this end
    result = cjson.encode(out)
  end
end
remember(events, event_slice, ARGV[6], id, result)
return result
"""
)

# Moves one stale visit into the review outbox if its index score is still
# due; the score check makes a concurrent sweep, or an exit that came in
# between, harmless. The outbox entry is keyed by kind and event id: taking
# it again would overwrite it with itself. Replies with the items taken.
_TAKE_DUE = """
local record_key, index_key, outbox_key, similar_key = unpack(KEYS)
local member, due, kind, lot, why = unpack(ARGV)
local score = redis.call('ZSCORE', index_key, member)
if not score or tonumber(score) > tonumber(due) then return {} end
local fields = redis.call('HMGET', record_key, 'id', 'plate', 'at', 'why')
redis.call('DEL', record_key)
redis.call('ZREM', index_key, member)
if similar_key then redis.call('SREM', similar_key, member) end
if not fields[1] then return {} end
local item = cjson.encode({k=kind, lot=lot, id=fields[1], plate=fields[2],
  at=fields[3], why=fields[4] or why})
redis.call('HSET', outbox_key, kind .. ':' .. fields[1], item)
return {item}
"""

# The same for a plate's pending exits: each whose own grace period is over
# goes to the outbox, the others keep waiting and score the plate again.
# An exit matched in between is no longer in the hash, so it is not taken.
_TAKE_DUE_EXITS = (
    _PENDING
    + """
local exits_key, pending_key, outbox_key = unpack(KEYS)
local member, due, kind, lot, why = unpack(ARGV)
local score = redis.call('ZSCORE', pending_key, member)
if not score or tonumber(score) > tonumber(due) then return {} end
local exits = redis.call('HGETALL', exits_key)
local taken = {}
for i = 1, #exits, 2 do
  local id, record = exits[i], cjson.decode(exits[i + 1])
  if tonumber(record.due) <= tonumber(due) then
    redis.call('HDEL', exits_key, id)
    local item = cjson.encode({k=kind, lot=lot, id=id, plate=record.plate,
      at=record.at, why=record.why or why})
    redis.call('HSET', outbox_key, kind .. ':' .. id, item)
    taken[#taken + 1] = item
  end
end
rescore(exits_key, pending_key, member)
return taken
"""
)


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
    #: For a duplicate delivery: what the first delivery did.
    first: Transition | None = None
    #: How a matched exit found its entry.
    match: Match = Match.EXACT
    #: Open visits a pending exit could have been a misread of (0 or 2+).
    ambiguous: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any], lot: str = DEFAULT_LOT) -> Transition:
        first = data.get("first")
        return cls(
            outcome=Outcome(data["o"]),
            entry=_visit(data.get("entry"), lot),
            exit=_visit(data.get("exit"), lot),
            orphan=_visit(data.get("orphan"), lot),
            first=cls.from_json(first, lot) if first else None,
            match=Match(data.get("m", Match.EXACT)),
            ambiguous=int(data.get("ambiguous", 0)),
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
    #: Confusable characters a misread exit may differ in (0: exact only).
    misread_max_positions: int = 1


@dataclass(frozen=True, slots=True)
class TimeSlices:
    """Slices of processing time for records that must last ``lifetime``.

    Workers pick the slice by their own clocks, which may disagree by up to
    ``CLOCK_MARGIN_SECONDS``. A lookup so reads the ``ahead`` slices after
    its current one (a writer whose clock leads wrote there) and the ``back``
    slices before it (the lifetime, plus a writer whose clock lags): a record
    written at ``w`` by one clock is found by a lookup at any ``t`` of
    another with ``w - margin <= t <= w + lifetime + margin``. A slice's hash
    expires once the last such lookup is past, plus the margin again for the
    clocks of Redis and of the writer: a record is kept at most ``ahead + 1``
    slices and the margin longer than its lifetime and margin require.
    """

    length: int
    ahead: int
    back: int

    #: Slices per lifetime: a slice holds about this share of the records.
    PER_LIFETIME: ClassVar[int] = 4
    #: How far the clocks of workers (which pick the slice) may disagree
    #: without a record being missed or a slice expiring too early.
    CLOCK_MARGIN_SECONDS: ClassVar[int] = 60

    @classmethod
    def lasting(cls, lifetime: timedelta) -> TimeSlices:
        seconds = max(1, math.ceil(lifetime.total_seconds()))
        length = math.ceil(seconds / cls.PER_LIFETIME)
        reach = math.ceil(cls.CLOCK_MARGIN_SECONDS / length)
        return cls(length=length, ahead=reach, back=cls.PER_LIFETIME + reach)

    def window(self, now: datetime) -> tuple[int, int, int, int]:
        """What a step at ``now`` needs, worked out once: the slice it writes,
        the newest and oldest slices it reads, and the seconds the written
        slice's hash must live: until the last lookup that reaches it, plus
        the margin. The TTL counts from the writer's clock, which picked the
        slice; Redis counts it down by its own, which the margin also covers."""
        micros = _micros(now)
        current = micros // (self.length * 1_000_000)
        last_lookup = (current + 1 + self.back) * self.length
        ttl = math.ceil(last_lookup - micros / 1_000_000) + self.CLOCK_MARGIN_SECONDS
        return current, current + self.ahead, current - self.back, ttl

    def lookup(self, now: datetime) -> range:
        """The slices a lookup at ``now`` reads, oldest first."""
        _, newest, oldest, _ = self.window(now)
        return range(oldest, newest + 1)


class RedisVisitStore:
    """The ledger of open visits; every public step is one round trip."""

    def __init__(
        self,
        client: redis.Redis,
        policy: LedgerPolicy,
        prefix: str = "parking",
        lots: Sequence[str] = (DEFAULT_LOT,),
    ) -> None:
        self._redis = client
        self._policy = policy
        self._prefix = prefix
        #: Indexes are per car park: sweeps and counts visit each of these.
        self._lots = tuple(lots)
        # A pending exit outlives its grace period until a sweep can take
        # it; a completed stay's camera reads are kept as long, since a
        # second read may wait in a backlog as long as an exit may wait.
        self._pending_ttl = int(policy.grace.total_seconds() * 4) + 3600
        self.event_slices = TimeSlices.lasting(policy.event_ttl)
        self.read_slices = TimeSlices.lasting(timedelta(seconds=self._pending_ttl))
        self._enter = client.register_script(_ENTER)
        self._leave = client.register_script(_LEAVE)
        self._take_due = client.register_script(_TAKE_DUE)
        self._take_due_exits = client.register_script(_TAKE_DUE_EXITS)

    def enter(self, event: CameraEvent, now: datetime) -> Transition:
        return self._step(self._enter, event, now)

    def leave(self, event: CameraEvent, now: datetime) -> Transition:
        return self._step(self._leave, event, now)

    def _step(self, script: Any, event: CameraEvent, now: datetime) -> Transition:
        policy = self._policy
        form = confusion_form(event.plate_key)
        tag = self._tag(form)
        lot = event.lot_id
        member = event.plate_key
        # The script builds the keys of its time slices itself, under the
        # same hash tag: "events:entry:main:<slice>" and the like, named
        # apart from the one-key-per-item records of the version before
        # ("event:", "last:", "entered:"), which it still reads, and never
        # writes, until they expire.
        keys = [
            f"{tag}:visit:{lot}:{member}",
            # "exits", not the "exit" of the one-exit-per-plate records
            # before it: those are never read again and expire.
            f"{tag}:exits:{lot}:{member}",
            f"{tag}:open:{lot}",
            f"{tag}:pending:{lot}",
            f"{tag}:similar:{lot}:{form}",
        ]
        event_slice, event_newest, event_oldest, event_ttl = self.event_slices.window(
            now
        )
        read_slice, read_newest, read_oldest, read_ttl = self.read_slices.window(now)
        args = [
            event.id,
            event.plate,
            _micros(event.at),
            policy.duplicate_window // _US,
            policy.clock_skew // _US,
            event_ttl,
            _micros(now),
            member,
            _micros(now + policy.grace),
            self._pending_ttl,
            f"{tag}:",
            lot,
            policy.misread_max_positions,
            # Entry and exit cameras (and car parks) may number their events
            # independently: an id is unique within its kind and car park.
            event.kind,
            # Slices as numbers: where to write, then the newest and oldest
            # a lookup reads.
            event_slice,
            event_newest,
            event_oldest,
            read_slice,
            read_newest,
            read_oldest,
            read_ttl,
        ]
        with redis_errors():
            raw = script(keys=keys, args=args)
        return Transition.from_json(json.loads(raw), lot)

    def take_expired_exits(
        self, now: datetime, limit: int = 1000
    ) -> list[UnmatchedExit]:
        """Pending exits whose grace period is over, each taken once into the
        review outbox (and returned); a plate's other exits keep waiting."""
        taken = self._take(
            "pending", "exits", "unmatched", UnmatchedWhy.GRACE_EXPIRED,
            _micros(now), limit,
        )  # fmt: skip
        return [item for item in taken if isinstance(item, UnmatchedExit)]

    def take_stale_visits(
        self, opened_before: datetime, limit: int = 1000
    ) -> list[OrphanedVisit]:
        """Visits opened before the cut-off, closed as orphans into the outbox."""
        taken = self._take(
            "open", "visit", "orphan", OrphanCause.MAX_STAY,
            _micros(opened_before), limit,
        )  # fmt: skip
        return [item for item in taken if isinstance(item, OrphanedVisit)]

    def _take(
        self, index: str, record: str, kind: str, why: str, due: int, limit: int
    ) -> list[Review]:
        places = [(self._bucket(b), lot) for b in range(BUCKETS) for lot in self._lots]
        with redis_errors():
            scan = self._redis.pipeline(transaction=False)
            for tag, lot in places:
                scan.zrangebyscore(f"{tag}:{index}:{lot}", "-inf", due, 0, limit)
            # Without scores, each reply is a plain list of members.
            found = cast("list[list[bytes | str]]", scan.execute())
            take = self._redis.pipeline(transaction=False)
            for (tag, lot), members in zip(places, found, strict=True):
                for raw in members:
                    member = raw.decode() if isinstance(raw, bytes) else raw
                    keys = [
                        f"{tag}:{record}:{lot}:{member}",
                        f"{tag}:{index}:{lot}",
                        f"{tag}:outbox",
                    ]
                    script = self._take_due
                    if record == "visit":
                        form = confusion_form(member)
                        keys.append(f"{tag}:similar:{lot}:{form}")
                    else:
                        script = self._take_due_exits
                    script(keys=keys, args=[member, due, kind, lot, why], client=take)
            # Each reply lists what one record (or one plate's exits) gave up.
            replies = cast("list[list[bytes]]", take.execute() if len(take) else [])
        return [_review(json.loads(raw)) for items in replies for raw in items]

    def waiting_reviews(self, limit: int = 1000) -> list[Review]:
        """Review records taken by a sweep and not yet handed to the API."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for bucket in range(BUCKETS):
                pipe.hvals(f"{self._bucket(bucket)}:outbox")
            buckets = cast("list[list[bytes]]", pipe.execute())
        items = [_review(json.loads(raw)) for values in buckets for raw in values]
        return items[:limit]

    def reviewed(self, items: Iterable[Review]) -> None:
        """Forget review records the API has written."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for item in items:
                visit = item.exit if isinstance(item, UnmatchedExit) else item.entry
                tag = self._tag(confusion_form(normalise_plate(visit.plate)))
                pipe.hdel(f"{tag}:outbox", item.key)
            if len(pipe):
                pipe.execute()

    def counts(self) -> dict[str, int]:
        """Open visits (occupancy) and plates with exits waiting for their
        entry, in all lots."""
        by_lot = self.counts_by_lot()
        return {
            "open": sum(lot["open"] for lot in by_lot.values()),
            "pending": sum(lot["pending"] for lot in by_lot.values()),
        }

    def counts_by_lot(self) -> dict[str, dict[str, int]]:
        """Open visits and plates with pending exits of each car park.

        The pending figure counts plates, one index member each: a plate with
        two exits waiting (a repeat visitor whose entries are late) counts
        once. Counting exits would read every plate's hash, or keep a counter
        that an exit hash expiring unswept would leave wrong; plates with more
        than one pending exit are rare enough for the gauge.
        """
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for lot in self._lots:
                for bucket in range(BUCKETS):
                    tag = self._bucket(bucket)
                    pipe.zcard(f"{tag}:open:{lot}")
                    pipe.zcard(f"{tag}:pending:{lot}")
            sizes = pipe.execute()
        per_lot = 2 * BUCKETS
        counts = {}
        for n, lot in enumerate(self._lots):
            mine = sizes[n * per_lot : (n + 1) * per_lot]
            counts[lot] = {"open": sum(mine[0::2]), "pending": sum(mine[1::2])}
        return counts

    def remembered_events(self, now: datetime) -> int:
        """Records of applied events that a step at ``now`` would find (an id
        applied again after its lifetime may count twice, once per record)."""
        slices = self.event_slices.lookup(now)
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for bucket in range(BUCKETS):
                for lot in self._lots:
                    for kind in EventKind:
                        for n in slices:
                            pipe.hlen(f"{self._bucket(bucket)}:events:{kind}:{lot}:{n}")
            return sum(pipe.execute())

    def ping(self) -> bool:
        with redis_errors():
            return bool(self._redis.ping())

    def _tag(self, form: str) -> str:
        return self._bucket(zlib.crc32(form.encode()) % BUCKETS)

    def _bucket(self, bucket: int) -> str:
        return f"{self._prefix}:{{b{bucket}}}"


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // _US


def _at(micros: str) -> datetime:
    return _EPOCH + timedelta(microseconds=int(micros))


def _visit(data: dict[str, str] | None, lot: str) -> Visit | None:
    if not data:
        return None
    return Visit(
        event_id=data["id"], plate=data["plate"], at=_at(data["at"]), lot_id=lot
    )


def _review(data: dict[str, str]) -> Review:
    visit = Visit(data["id"], data["plate"], _at(data["at"]), data["lot"])
    if data["k"] == "unmatched":
        return UnmatchedExit(visit, UnmatchedWhy(data["why"]))
    return OrphanedVisit(visit, OrphanCause(data["why"]))


@contextmanager
def redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}") from exc
    except redis.ResponseError as exc:
        # Refusals that pass by themselves (out of memory, a failed snapshot,
        # a busy script, a replica that became read-only in a failover) mean
        # "later", like a lost connection; any other reply is a bug to see.
        transient = (
            redis.ReadOnlyError,
            redis.exceptions.OutOfMemoryError,
            redis.exceptions.TryAgainError,
            redis.exceptions.ClusterDownError,
            redis.exceptions.MasterDownError,
        )
        if isinstance(exc, transient) or str(exc).startswith(_TRANSIENT_REPLIES):
            raise StoreUnavailable(
                f"redis refused for now: {type(exc).__name__}"
            ) from exc
        raise


_TRANSIENT_REPLIES = (
    "OOM", "MISCONF", "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN",
    "CLUSTERDOWN", "NOREPLICAS", "READONLY",
)  # fmt: skip
