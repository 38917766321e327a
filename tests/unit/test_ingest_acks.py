"""The plain consumer's batched acks, on fake messages: which message is
acked with ``multiple``, and when."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from parking.settings import Settings
from workers import ingest
from workers.ingest import PlainEventConsumer


@dataclass
class FakeMessage:
    channel: object
    tag: int
    acks: list[tuple[int, bool]] = field(default_factory=list)

    def ack(self, multiple: bool = False) -> None:
        self.acks.append((self.tag, multiple))


@pytest.fixture
def consumer() -> PlainEventConsumer:
    return PlainEventConsumer(None, Settings(), {}, lambda *a: None)  # type: ignore[arg-type]


def _done(consumer: PlainEventConsumer, message: FakeMessage) -> None:
    consumer._done(message)  # type: ignore[arg-type]


def test_a_full_batch_is_acked_by_its_last_message_with_multiple(
    consumer: PlainEventConsumer,
) -> None:
    channel = object()
    messages = [FakeMessage(channel, tag) for tag in range(1, ingest.ACK_BATCH + 1)]
    for message in messages[:-1]:
        _done(consumer, message)
    assert consumer.acks_waiting == ingest.ACK_BATCH - 1
    assert not any(m.acks for m in messages)

    _done(consumer, messages[-1])

    assert messages[-1].acks == [(ingest.ACK_BATCH, True)]
    assert consumer.acks_waiting == 0


def test_messages_processed_while_the_consumers_are_cancelled_are_acked_at_the_end(
    consumer: PlainEventConsumer,
) -> None:
    channel = object()
    late = [FakeMessage(channel, tag) for tag in (7, 8, 9)]
    for message in late:
        _done(consumer, message)

    consumer.on_consume_end(None, channel)

    assert late[-1].acks == [(9, True)]
    assert consumer.acks_waiting == 0


def test_a_lost_channel_s_pending_acks_are_dropped_not_sent_on_the_new_one(
    consumer: PlainEventConsumer,
) -> None:
    old, new = FakeMessage(object(), 5), FakeMessage(object(), 1)
    _done(consumer, old)
    _done(consumer, new)

    consumer.flush_acks()

    assert old.acks == []  # redelivered by the broker, found a duplicate
    assert new.acks == [(1, True)]
