"""Celery settings, built from the ``parking`` settings (environment and files)."""

from __future__ import annotations

from beat_schedule import build_schedule
from parking.settings import get_settings
from workers import topology

_settings = get_settings()

broker_url = _settings.broker_connection_url
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # keep reconnecting through an outage
# Publisher confirms: a publish returns only once RabbitMQ has the message.
broker_transport_options = {"confirm_publish": True}
broker_heartbeat = 30

task_queues = topology.task_queues(_settings)
task_default_queue = _settings.queue("default")
task_default_exchange = topology.task_exchange(_settings).name
task_default_exchange_type = "topic"
task_default_routing_key = _settings.queue("default")
task_default_queue_type = "quorum"
task_create_missing_queues = False
task_routes = {
    "parking.process_entry": {
        "queue": _settings.queue("entry"),
        "routing_key": _settings.queue("entry"),
    },
    "parking.process_exit": {
        "queue": _settings.queue("exit"),
        "routing_key": _settings.queue("exit"),
    },
    "parking.generate_*": {
        "queue": _settings.queue("generate"),
        "routing_key": _settings.queue("generate"),
    },
    "parking.sweep": {
        "queue": _settings.queue("generate"),
        "routing_key": _settings.queue("generate"),
    },
}

# At-least-once: ack after the work, requeue the task of a killed child.
task_acks_late = True
task_reject_on_worker_lost = True
# Messages Celery cannot decode are dead-lettered and counted, not acked.
worker_consumer = "workers.consumer:DeadLetteringConsumer"
# A task that fails unexpectedly (a bug, a body of the wrong shape) is
# rejected without requeue, so its message lands in the dead letters instead
# of being acked and lost; expected outcomes never raise out of a task.
task_acks_on_failure = False
task_acks_on_timeout = True
worker_prefetch_multiplier = 8
worker_concurrency = _settings.worker_concurrency

task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# Flower and the metrics need the events of both sides.
worker_send_task_events = True
task_send_sent_event = True

timezone = "UTC"
enable_utc = True
beat_schedule = build_schedule(_settings)
