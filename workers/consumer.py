"""The worker's task consumer: messages that can never run become dead letters.

Celery's own consumer logs a message it cannot decode and acks it, so the
message is gone; a task message without an ``id`` header or with a body of the
wrong shape even raises out of its event loop and stops the whole worker
(every restart meets the same message again). Here every message that cannot
become a task is rejected without requeue, so the quorum queue's dead-letter
exchange keeps it in ``<prefix>.dead`` for review; it is counted in
``parking_events_rejected_total`` like any other bad input and logged once
with the reason.

The consumer also declares the whole topology on every (re)connection, before
any other consumer step runs: native delayed delivery binds every task queue,
and a worker that consumes only some of them would otherwise find the rest
missing on a fresh broker and run without delayed retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from celery import signals
from celery.worker.consumer import Consumer
from kombu.connection import Connection
from kombu.exceptions import ContentDisallowed
from kombu.message import Message

from parking.events import EventKind
from parking.metrics import default_metrics
from parking.settings import Settings, get_settings
from workers.topology import declare_topology

logger = logging.getLogger(__name__)

#: How much of a refused body goes into the log line: enough to recognise it.
BODY_PREVIEW_BYTES = 120


class Reason:
    """The bounded reasons of this module (metric label values)."""

    BAD_JSON = "bad_json"
    BAD_ENCODING = "bad_encoding"
    BAD_CONTENT_TYPE = "bad_content_type"
    NOT_A_TASK = "not_a_task"
    UNKNOWN_TASK = "unknown_task"
    INVALID_TASK = "invalid_task"
    MALFORMED_TASK = "malformed_task"


def decode_reason(exc: BaseException) -> str:
    """Why a body could not be decoded, from the error kombu wrapped."""
    seen: list[BaseException] = [exc]
    for candidate in (*exc.args, exc.__cause__, exc.__context__):
        if isinstance(candidate, BaseException):
            seen.append(candidate)
    if any(isinstance(err, UnicodeDecodeError) for err in seen):
        return Reason.BAD_ENCODING
    if any(isinstance(err, ContentDisallowed) for err in seen):
        return Reason.BAD_CONTENT_TYPE
    return Reason.BAD_JSON


def message_kind(message: Message, settings: Settings) -> str:
    """The event kind a message was sent for, from its routing key.

    Native delayed delivery (retries) prefixes the queue name with the
    binary digits of the delay, so the name is matched at the end.
    """
    routing_key = str((message.delivery_info or {}).get("routing_key") or "")
    for kind in EventKind:
        queue = settings.queue(kind.value)
        if routing_key == queue or routing_key.endswith(f".{queue}"):
            return kind.value
    return "other"


def _preview(message: Message) -> str:
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8", "backslashreplace")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        return type(body).__name__
    raw = bytes(body)
    more = f"...(+{len(raw) - BODY_PREVIEW_BYTES} bytes)"
    tail = more if len(raw) > BODY_PREVIEW_BYTES else ""
    return repr(raw[:BODY_PREVIEW_BYTES]) + tail


class DeadLetteringConsumer(Consumer):
    """Celery's consumer, with every undeliverable message dead-lettered."""

    def connect(self) -> Connection:
        connection: Connection = super().connect()
        declare_topology(connection, get_settings())
        return connection

    def connection_for_write(
        self, url: str | None = None, heartbeat: float | None = None
    ) -> Connection:
        # Only the event dispatcher asks the consumer for this connection.
        # Monitoring events may be lost with a broker crash, so they need no
        # publisher confirm; with one, the worker's main loop waited a broker
        # round trip for each of the three events of every task (no-op tasks
        # ran 5-20 % slower with them in `parking bench`).
        connection = self.app.connection_for_write(
            url=url, heartbeat=heartbeat, transport_options={"confirm_publish": False}
        )
        return cast("Connection", self.ensure_connected(connection))

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self._dead_letter(message, decode_reason(exc), exc)

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._dead_letter(message, Reason.NOT_A_TASK, None)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._dead_letter(message, Reason.UNKNOWN_TASK, exc)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        reason = Reason.INVALID_TASK
        if isinstance(exc, ContentDisallowed):
            reason = Reason.BAD_CONTENT_TYPE
        self._dead_letter(message, reason, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        handle = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors)

        def on_task_received(message: Message) -> Any:
            try:
                return handle(message)
            except connection_errors:
                raise
            except Exception as exc:
                # Raised while turning the message into a request (no id
                # header, a body that is not [args, kwargs, embed]); left to
                # Celery, it would stop the worker's event loop.
                if message.acknowledged:
                    raise
                self._dead_letter(message, Reason.MALFORMED_TASK, exc)
                return None

        return on_task_received

    def _dead_letter(
        self, message: Message, reason: str, exc: BaseException | None
    ) -> None:
        settings = get_settings()
        kind = message_kind(message, settings)
        headers = message.headers or {}
        # The task id, or a plain publisher's message id, finds the message
        # again in the dead-letter queue.
        message_id = headers.get("id") or message.properties.get("message_id")
        logger.warning(
            "message dead-lettered reason=%s kind=%s id=%s task=%s "
            "content_type=%s error=%s body=%s",
            reason, kind, message_id, headers.get("task"), message.content_type,
            _describe(exc), _preview(message),
        )  # fmt: skip
        default_metrics().rejected.labels(kind, reason).inc()
        if not message.acknowledged:
            message.reject_log_error(logger, self.connection_errors, requeue=False)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "-"
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}({text!r})"
