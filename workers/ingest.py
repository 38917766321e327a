"""Cameras that publish bare wire-format JSON, with no Celery envelope.

``parking ingest`` consumes the raw queues and runs each event through the
same handlers as the Celery tasks. A message is acked only after its event is
applied, in batches (``ACK_BATCH``, or once the feed pauses): a message
processed and not yet acked when the consumer dies is delivered again and
found a duplicate. Bad input is rejected to the dead letters; when a
dependency is down the event is handed to the Celery task with a countdown,
whose retries take it from there, and only then acked (publisher confirms
make that hand-over safe).

Unlike a Celery worker, this consumer does not note the entries it holds in
``parking.inflight``: it handles each message as it reads it, in order, so a
prefetched entry waits behind at most ``prefetch`` others of a millisecond
each. Only a Redis stall makes that wait long, and the sweep, which needs
Redis as well, stalls with it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from kombu.connection import Connection
from kombu.message import Message
from kombu.mixins import ConsumerMixin

from parking.errors import InvalidEvent, SummaryRejected, TemporaryFailure
from parking.events import EventKind, decode_json
from parking.handlers import MessageHandler
from parking.settings import Settings
from workers import topology

logger = logging.getLogger(__name__)

#: Hands an event that met an outage to the Celery path, delayed by seconds.
Handoff = Callable[[EventKind, Any, int], None]

#: Processed messages acknowledged together, by one ack with ``multiple``:
#: a quorum queue settles them in one step instead of one each, which was a
#: third of RabbitMQ's CPU per event. Far below the prefetch, so the broker
#: never waits for an ack to deliver more.
ACK_BATCH = 16
#: Longest a processed message waits for its ack while messages keep coming;
#: when none come, the consumer's one-second idle tick acks it.
ACK_DELAY_SECONDS = 0.05


class PlainEventConsumer(ConsumerMixin):
    def __init__(
        self,
        connection: Connection,
        settings: Settings,
        handlers: Mapping[EventKind, MessageHandler],
        handoff: Handoff,
        prefetch: int = 64,
        delayed_queue_type: str = "quorum",
    ) -> None:
        self.connection = connection
        self._delayed_queue_type = delayed_queue_type
        self._settings = settings
        self._handlers = handlers
        self._handoff = handoff
        self._prefetch = prefetch
        # The newest processed message not acked yet, how many wait with it,
        # and since when. Messages are handled one at a time in delivery
        # order on one channel, so acking it with ``multiple`` acks exactly
        # the messages processed before it.
        self._unacked: Message | None = None
        self._waiting = 0
        self._since = 0.0

    def get_consumers(self, consumer: Any, channel: Any) -> list[Any]:
        # Dead letters for bad input; the task queues and Celery's delayed
        # delivery for handoffs, whether or not a worker has started yet.
        topology.declare_delayed_delivery(
            self.connection, self._settings, self._delayed_queue_type
        )
        return [
            consumer(
                queues=[topology.raw_queue(self._settings, kind)],
                on_message=self._on_message(kind),
                prefetch_count=self._prefetch,
            )
            for kind in EventKind
        ]

    def on_consume_ready(
        self, connection: Any, channel: Any, consumers: Any, **kwargs: Any
    ) -> None:
        names = [topology.raw_queue_name(self._settings, k) for k in EventKind]
        logger.info("plain ingest consuming queues=%s", ",".join(names))

    def on_consume_end(self, connection: Any, channel: Any) -> None:
        # A clean stop, after the consumers are cancelled (messages that came
        # in while the broker confirmed that were still processed) and before
        # the channel closes and would hand them out again. A lost connection
        # never gets here: its messages come back and are found duplicates.
        with contextlib.suppress(Exception):
            self.flush_acks()

    @property
    def acks_waiting(self) -> int:
        """Processed messages not acked yet."""
        return self._waiting

    def on_iteration(self) -> None:
        if self._unacked is not None and (
            time.monotonic() - self._since >= ACK_DELAY_SECONDS
        ):
            self.flush_acks()

    def flush_acks(self) -> None:
        """Ack every message processed so far."""
        message, self._unacked, self._waiting = self._unacked, None, 0
        if message is not None:
            message.ack(multiple=True)

    def _done(self, message: Message) -> None:
        if self._unacked is not None and self._unacked.channel is not message.channel:
            # A channel since lost: the broker hands those messages out again,
            # and their delivery tags mean nothing on this one.
            self._unacked, self._waiting = None, 0
        if self._unacked is None:
            self._since = time.monotonic()
        self._unacked = message
        self._waiting += 1
        if self._waiting >= ACK_BATCH:
            self.flush_acks()

    def _refuse(self, message: Message) -> None:
        # The acks of the messages before it go first: one rejected message
        # never holds up, nor takes with it, the acks of the others.
        self.flush_acks()
        message.reject(requeue=False)

    def _on_message(self, kind: EventKind) -> Callable[[Message], None]:
        def receive(message: Message) -> None:
            self.process(kind, message)

        return receive

    def process(self, kind: EventKind, message: Message) -> None:
        body = message.body
        try:
            self._handlers[kind].process_message(body)
        except InvalidEvent as exc:
            logger.warning(
                "plain event rejected kind=%s reason=%s detail=%s",
                kind, exc.reason, exc.detail,
            )  # fmt: skip
            self._refuse(message)
        except SummaryRejected as exc:
            logger.error("summary refused kind=%s error=%s", kind, exc)
            self._refuse(message)
        except TemporaryFailure as exc:
            logger.warning("plain event handed to retries kind=%s error=%s", kind, exc)
            self._handoff(kind, decode_json(body), 1)
            self._done(message)
        except Exception:
            # A bug must not end the consumer (and with it every camera's
            # feed): the message goes to the dead letters, like a failed task.
            logger.exception("plain event failed kind=%s; dead-lettered", kind)
            self._refuse(message)
        else:
            self._done(message)


def run(settings: Settings) -> None:
    """Consume until interrupted (ConsumerMixin reconnects by itself)."""
    from workers import runtime
    from workers.app import app
    from workers.tasks import PROCESSORS

    def handoff(kind: EventKind, event: Any, countdown: int) -> None:
        PROCESSORS[kind].apply_async((event,), countdown=countdown)

    handlers: dict[EventKind, MessageHandler] = {
        EventKind.ENTRY: runtime.entry_processor(),
        EventKind.EXIT: runtime.exit_processor(),
    }
    with Connection(
        settings.broker_connection_url,
        transport_options={"confirm_publish": True},
        heartbeat=30,
    ) as connection:
        consumer = PlainEventConsumer(
            connection,
            settings,
            handlers,
            handoff,
            delayed_queue_type=app.conf.broker_native_delayed_delivery_queue_type,
        )

        def stop(signum: int, _: object) -> None:
            # Leave once the messages already delivered are processed and
            # acked; the broker hands the rest to the next consumer.
            logger.info("plain ingest stopping signal=%d", signum)
            consumer.should_stop = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        consumer.run()
        logger.info("plain ingest stopped")


def publish_plain(settings: Settings, events: list[tuple[EventKind, bytes]]) -> None:
    """Publish bare JSON events to the raw queues, as a camera would."""
    from kombu.messaging import Producer

    with Connection(
        settings.broker_connection_url, transport_options={"confirm_publish": True}
    ) as connection:
        channel = connection.default_channel
        queues = {kind: topology.raw_queue(settings, kind) for kind in EventKind}
        for queue in queues.values():
            queue.bind(channel).declare()
        topology.declare_dead_letters(connection, settings)
        producer = Producer(channel)
        for kind, body in events:
            producer.publish(
                body,
                routing_key=queues[kind].name,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
            )
