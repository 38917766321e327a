"""Entry messages that a consumer holds and has not finished yet.

A worker takes messages ahead of its capacity (prefetch): an entry it holds
is no longer *ready* in its queue, and RabbitMQ tells the *unacknowledged*
count only through its management API. The sweep must still see such an
entry, or a busy worker makes the sweep declare the entry's exit unmatched
while the entry sits in that worker's hands. So each consumer notes an entry
here when the message reaches it and forgets it once the entry is processed
(or retried, or dead-lettered: from then on the broker counts it again).

A consumer that dies keeps its notes; its messages go back to the queue and
are counted there, or reach another consumer, which notes them afresh. Notes
older than a horizon are therefore leftovers and are ignored.
"""

from __future__ import annotations

import time
from datetime import timedelta

import redis

from parking.store import redis_errors


class InFlightEntries:
    """A sorted set of message ids, scored by when a consumer received them."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "parking",
        horizon: timedelta = timedelta(minutes=15),
    ) -> None:
        self._redis = client
        # One key outside the buckets: the sweep reads it whole, consumers
        # touch it by message id only.
        self._key = f"{prefix}:inflight:entry"
        self._horizon = horizon.total_seconds()

    def received(self, message_id: str) -> None:
        with redis_errors():
            self._redis.zadd(self._key, {message_id: time.time()})

    def finished(self, message_id: str) -> None:
        with redis_errors():
            self._redis.zrem(self._key, message_id)

    def count(self) -> int:
        """Entries held right now; leftovers of dead consumers are dropped."""
        with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.zremrangebyscore(self._key, "-inf", time.time() - self._horizon)
            pipe.zcard(self._key)
            return int(pipe.execute()[1])
