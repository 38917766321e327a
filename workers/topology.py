"""The one definition of exchanges and queues, shared by every producer and worker.

RabbitMQ refuses a second declaration with other arguments
(``PRECONDITION_FAILED inequivalent arg``), so nothing else declares queues.
"""

from __future__ import annotations

import logging
from typing import Any

from amqp.exceptions import AccessRefused
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from parking.events import EventKind
from parking.settings import Settings

logger = logging.getLogger(__name__)

KINDS = ("entry", "exit", "generate", "default")


def task_exchange(settings: Settings) -> Exchange:
    # A topic exchange: Celery's native delayed delivery (retries with a
    # countdown on quorum queues) routes through topic bindings.
    return Exchange(settings.queue_prefix, type="topic", durable=True)


def dead_letter_exchange(settings: Settings) -> Exchange:
    return Exchange(f"{settings.queue_prefix}.dlx", type="fanout", durable=True)


def queue_arguments(settings: Settings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": f"{settings.queue_prefix}.dlx",
        # A message that kills its worker every time is requeued each time;
        # past this many deliveries RabbitMQ dead-letters it instead.
        "x-delivery-limit": settings.delivery_limit,
    }


def task_queues(settings: Settings) -> list[Queue]:
    exchange = task_exchange(settings)
    return [
        Queue(
            settings.queue(kind),
            exchange,
            routing_key=settings.queue(kind),
            durable=True,
            queue_arguments=queue_arguments(settings),
        )
        for kind in KINDS
    ]


def dead_letter_queue(settings: Settings) -> Queue:
    return Queue(
        settings.queue("dead"),
        dead_letter_exchange(settings),
        routing_key="#",
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def declare_dead_letters(connection: Connection, settings: Settings) -> None:
    """Declare the dead-letter exchange and queue; without them RabbitMQ drops."""
    dead_letter_queue(settings).bind(connection.default_channel).declare()


def declare_topology(connection: Connection, settings: Settings) -> None:
    """Dead letters first, then every task queue, whatever a worker consumes.

    Native delayed delivery binds all task queues at worker start; one that
    does not exist yet (a worker started with ``-Q`` a subset on a fresh
    broker) makes Celery give up delayed delivery, and so countdown retries.
    """
    declare_dead_letters(connection, settings)
    channel = connection.default_channel
    for queue in task_queues(settings):
        queue.bind(channel).declare()


def declare_delayed_delivery(
    connection: Connection, settings: Settings, queue_type: str = "quorum"
) -> None:
    """Celery's native delayed delivery, as a worker declares it at start.

    A countdown retry is published to the ``celery_delayed_*`` exchanges and
    reaches its task queue through the delivery exchange's bindings; a
    process that hands events to the tasks with a countdown (``parking
    ingest``) must not depend on a worker having started first, or its
    handoffs fail with a missing exchange.
    """
    declare_topology(connection, settings)
    declare_native_delayed_delivery_exchanges_and_queues(connection, queue_type)
    for queue in task_queues(settings):
        bind_queue_to_native_delayed_delivery_exchange(connection, queue)


def raw_queue_name(settings: Settings, kind: EventKind) -> str:
    return (
        settings.raw_entry_queue if kind is EventKind.ENTRY else settings.raw_exit_queue
    )


def raw_queue(settings: Settings, kind: EventKind) -> Queue:
    """A queue of bare wire-format JSON from cameras (no Celery envelope).

    Bound to the default exchange under its own name, as plain AMQP
    producers expect; quorum with the same dead letters as the task queues.
    """
    return Queue(
        raw_queue_name(settings, kind),
        routing_key=raw_queue_name(settings, kind),
        durable=True,
        queue_arguments=queue_arguments(settings),
    )


def entry_backlog(settings: Settings) -> int:
    """Entry events waiting for the ledger, as far as the broker can tell.

    Counts ready messages in the entry queues (Celery and raw) and in the
    native delayed-delivery queues, where a retrying entry waits out its
    countdown. Those are shared with every retrying task, so the count is
    conservative: an exit may wait a little longer, but is never declared
    unmatched while its entry is parked there. When the broker cannot say,
    the answer is "a backlog" for the same reason.
    """
    from kombu.transport.native_delayed_delivery import MAX_LEVEL, level_name

    from workers.app import app

    names = [settings.queue("entry"), raw_queue_name(settings, EventKind.ENTRY)]
    names += [level_name(level) for level in range(MAX_LEVEL + 1)]
    try:
        with app.connection_for_read() as connection:
            channel = connection.channel()
            total = 0
            for name in names:
                try:
                    declared = channel.queue_declare(name, passive=True)
                except connection.channel_errors:
                    # A queue nobody declared yet holds nothing; the failed
                    # passive declare closed the channel, so open another.
                    channel = connection.channel()
                    continue
                total += declared.message_count
            return total
    except Exception:
        logger.warning("entry backlog unknown; sweep holds exits", exc_info=True)
        return 1


def login_refused(settings: Settings) -> bool:
    """Whether the broker answers and refuses the settings' credentials (a
    broker that cannot be reached is no refusal: clients wait for it)."""
    url = settings.broker_connection_url
    try:
        with Connection(url, connect_timeout=5) as connection:
            connection.connect()
    except AccessRefused:
        return True
    except OSError:
        return False
    return False
