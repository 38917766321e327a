"""Cameras that publish bare wire-format JSON, with no Celery envelope.

``parking ingest`` consumes the raw queues and runs each event through the
same handlers as the Celery tasks. A message is acked only after its event is
applied; bad input is rejected to the dead letters; when a dependency is down
the event is handed to the Celery task with a countdown, whose retries take it
from there, and only then acked (publisher confirms make that hand-over safe).

Unlike a Celery worker, this consumer does not note the entries it holds in
``parking.inflight``: it handles each message as it reads it, in order, so a
prefetched entry waits behind at most ``prefetch`` others of a millisecond
each. Only a Redis stall makes that wait long, and the sweep, which needs
Redis as well, stalls with it.
"""

from __future__ import annotations

import logging
import signal
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


class PlainEventConsumer(ConsumerMixin):
    def __init__(
        self,
        connection: Connection,
        settings: Settings,
        handlers: Mapping[EventKind, MessageHandler],
        handoff: Handoff,
        prefetch: int = 64,
    ) -> None:
        self.connection = connection
        self._settings = settings
        self._handlers = handlers
        self._handoff = handoff
        self._prefetch = prefetch

    def get_consumers(self, consumer: Any, channel: Any) -> list[Any]:
        topology.declare_dead_letters(self.connection, self._settings)
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
            message.reject(requeue=False)
        except SummaryRejected as exc:
            logger.error("summary refused kind=%s error=%s", kind, exc)
            message.reject(requeue=False)
        except TemporaryFailure as exc:
            logger.warning("plain event handed to retries kind=%s error=%s", kind, exc)
            self._handoff(kind, decode_json(body), 1)
            message.ack()
        except Exception:
            # A bug must not end the consumer (and with it every camera's
            # feed): the message goes to the dead letters, like a failed task.
            logger.exception("plain event failed kind=%s; dead-lettered", kind)
            message.reject(requeue=False)
        else:
            message.ack()


def run(settings: Settings) -> None:
    """Consume until interrupted (ConsumerMixin reconnects by itself)."""
    from workers import runtime
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
        consumer = PlainEventConsumer(connection, settings, handlers, handoff)

        def stop(signum: int, _: object) -> None:
            # Finish the message in hand, then leave; unacked ones are requeued.
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
