"""The test broker from the outside: dead letters, queue depths, app restarts."""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

from kombu.connection import Connection
from kombu.message import Message

from parking.settings import Settings
from tests.services import rabbitmqctl, wait_until
from workers import topology


def dead_letter_count(settings: Settings) -> int:
    """Messages waiting in ``<prefix>.dead`` (declared if it is not there yet)."""
    with Connection(settings.broker_connection_url) as conn:
        queue = topology.dead_letter_queue(settings).bind(conn.default_channel)
        _, count, _ = queue.queue_declare()
        return int(count)


def drain_dead_letters(settings: Settings) -> list[Message]:
    """Take every dead letter off its queue and return them, oldest first."""
    taken: list[Message] = []
    with Connection(settings.broker_connection_url) as conn:
        queue = topology.dead_letter_queue(settings).bind(conn.default_channel)
        queue.declare()
        while (message := queue.get(no_ack=False)) is not None:
            message.ack()
            taken.append(message)
    return taken


def vhost_of(settings: Settings) -> str:
    return urlsplit(settings.broker_url).path.lstrip("/") or "/"


def messages_in_queues(settings: Settings) -> dict[str, int]:
    """Ready plus unacknowledged messages per task queue, from the broker."""
    names = {settings.queue(kind) for kind in topology.KINDS}
    command = ["rabbitmqctl", "-q", "list_queues", "-p", vhost_of(settings)]
    command += ["--no-table-headers", "name", "messages"]
    listed = subprocess.run(
        command, check=True, capture_output=True, text=True, timeout=60
    ).stdout
    depths = {}
    for line in listed.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in names:
            depths[parts[0]] = int(parts[1])
    return depths


def broker_answers(settings: Settings) -> bool:
    try:
        with Connection(settings.broker_connection_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
            return True
    except Exception:  # any failure to connect means "not yet"
        return False


def stop_broker_app() -> None:
    """Stop the RabbitMQ application (the node keeps running)."""
    rabbitmqctl("stop_app")


def start_broker_app(settings: Settings, timeout: float = 120) -> None:
    """Start the RabbitMQ application again and wait until AMQP answers."""
    subprocess.run(
        ["rabbitmqctl", "-q", "start_app"],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    subprocess.run(
        ["rabbitmqctl", "-q", "await_startup"],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    wait_until(lambda: broker_answers(settings), timeout=timeout, interval=0.5)
