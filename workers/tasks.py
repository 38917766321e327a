"""Thin tasks: decode, hand to a handler, map errors to retry or dead letter."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject
from kombu.messaging import Producer

from parking.errors import (
    InvalidEvent,
    StoreUnavailable,
    SummaryRejected,
    TemporaryFailure,
)
from parking.events import EventKind
from parking.handlers import MessageHandler
from workers import metrics as _celery_metrics  # noqa: F401 (publish signals)
from workers import runtime
from workers.app import app

logger = logging.getLogger(__name__)


def _run(task: Task, handler: MessageHandler, event: Any) -> str:
    try:
        return handler.process_message(event).outcome.value
    except InvalidEvent as exc:
        # The id finds the message again in the dead-letter queue.
        logger.warning(
            "event rejected task=%s id=%s reason=%s detail=%s",
            task.name, task.request.id, exc.reason, exc.detail,
        )  # fmt: skip
        raise Reject(str(exc), requeue=False) from None
    except SummaryRejected as exc:
        logger.error("summary refused task=%s error=%s", task.name, exc)
        raise Reject(str(exc), requeue=False) from None
    except TemporaryFailure as exc:
        retries = task.request.retries
        settings = runtime.settings()
        if retries >= settings.retry_max:
            logger.error(
                "giving up after retries=%d task=%s error=%s", retries, task.name, exc
            )
            raise Reject(str(exc), requeue=False) from None
        # Whole seconds: native delayed delivery on quorum queues has a
        # resolution of one second and refuses fractions.
        countdown = min(2**retries, settings.retry_backoff_cap_seconds)
        logger.warning(
            "retrying in=%ds attempt=%d task=%s error=%s",
            countdown, retries + 1, task.name, exc,
        )  # fmt: skip
        raise task.retry(exc=exc, countdown=countdown) from None


# Retries are bounded by settings.retry_max above, not by Celery's default
# of three: ``retry(max_retries=None)`` would fall back to that default.
@app.task(name="parking.process_entry", bind=True, max_retries=None)
def process_entry(self: Task, event: Any) -> str:
    try:
        return _run(self, runtime.entry_processor(), event)
    finally:
        # Processed, retried (a new message, counted in its delay queue) or
        # dead-lettered: either way no consumer holds this entry any more.
        _forget_held_entry(self.request.id)


def _forget_held_entry(message_id: str | None) -> None:
    if message_id is None:  # called directly, not through a message
        return
    try:
        runtime.inflight().finished(message_id)
    except StoreUnavailable:
        # Left behind, the note only makes sweeps wait until its horizon.
        logger.warning("held entry not forgotten id=%s", message_id)


@app.task(name="parking.process_exit", bind=True, max_retries=None)
def process_exit(self: Task, event: Any) -> str:
    return _run(self, runtime.exit_processor(), event)


PROCESSORS = {EventKind.ENTRY: process_entry, EventKind.EXIT: process_exit}


def publish_events(
    events: list[tuple[EventKind, Any]], producer: Producer | None = None
) -> None:
    """Send events to their processing tasks over one producer."""
    with app.producer_or_acquire(producer) as chosen:
        for kind, event in events:
            PROCESSORS[kind].apply_async((event,), producer=chosen)


def _generate(kind: EventKind, count: int) -> int:
    batch: list[tuple[EventKind, Any]] = []
    gen = runtime.generator(lambda k, event: batch.append((k, event)))
    made = gen.entries(count) if kind is EventKind.ENTRY else gen.exits(count)
    publish_events(batch)
    return made


@app.task(name="parking.generate_entry")
def generate_entry(count: int = 1) -> int:
    return _generate(EventKind.ENTRY, count)


@app.task(name="parking.generate_exit")
def generate_exit(count: int = 1) -> int:
    return _generate(EventKind.EXIT, count)


@app.task(name="parking.sweep")
def sweep() -> dict[str, int]:
    result = runtime.sweeper().sweep()
    return {
        "unmatched": result.unmatched,
        "orphaned": result.orphaned,
        "posted": result.posted,
        "waiting": result.waiting,
    }
