"""Process lifecycle: per-child collaborators, dead-letter topology, metrics."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import bootsteps
from celery.signals import (
    after_setup_logger,
    task_received,
    worker_process_init,
    worker_process_shutdown,
)
from prometheus_client import multiprocess

from parking.errors import StoreUnavailable
from parking.settings import get_settings
from workers import metrics as _celery_metrics  # noqa: F401 (signal handlers)
from workers import runtime
from workers.app import app
from workers.topology import declare_dead_letters

logger = logging.getLogger(__name__)


@worker_process_init.connect
def _fresh_collaborators(**_: Any) -> None:
    runtime.reset()


@task_received.connect
def _note_entry_held(request: Any = None, **_: Any) -> None:
    # Sent by the consumer as soon as a message reaches the worker, prefetched
    # ahead of a free pool slot or not; the task forgets the note when done.
    if request is None or request.name != "parking.process_entry":
        return
    try:
        runtime.inflight().received(request.id)
    except StoreUnavailable as exc:
        # The entry itself waits for Redis too; so does every sweep.
        logger.warning("entry not noted as held id=%s error=%s", request.id, exc)


@worker_process_shutdown.connect
def _mark_process_dead(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


#: Celery's loggers that write a line per task, and the level they keep:
#: "received" and "succeeded" go; failures (ERROR) stay. Retries and rejects
#: are logged by our tasks as one line each, without Celery's traceback.
PER_TASK_LOGGERS = {
    "celery.app.trace": logging.ERROR,
    "celery.worker.strategy": logging.WARNING,
}


class _NoBeatTicks(logging.Filter):
    """Beat logs every publish at INFO ("Sending due task"): twice a second."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Scheduler: Sending due task")


@after_setup_logger.connect
def _per_task_lines_at_debug(loglevel: int | str | None = None, **_: Any) -> None:
    # One line per event belongs at DEBUG, where the handlers write it; at
    # INFO the worker and beat keep lifecycle lines and business outcomes.
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    if isinstance(level, int) and level > logging.DEBUG:
        for name, kept in PER_TASK_LOGGERS.items():
            logging.getLogger(name).setLevel(kept)
        logging.getLogger("celery.beat").addFilter(_NoBeatTicks())


class DeadLetterTopology(bootsteps.StartStopStep):
    """Declares the dead-letter exchange and queue on every (re)connection."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, parent: Any) -> None:
        declare_dead_letters(parent.connection, get_settings())
        logger.debug("dead-letter topology declared")


app.steps["consumer"].add(DeadLetterTopology)
