"""Process lifecycle: per-child collaborators, dead-letter topology, metrics."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import bootsteps
from celery.signals import worker_process_init, worker_process_shutdown
from prometheus_client import multiprocess

from parking.settings import get_settings
from workers import runtime
from workers.app import app
from workers.topology import declare_dead_letters

logger = logging.getLogger(__name__)


@worker_process_init.connect
def _fresh_collaborators(**_: Any) -> None:
    runtime.reset()


@worker_process_shutdown.connect
def _mark_process_dead(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


class DeadLetterTopology(bootsteps.StartStopStep):
    """Declares the dead-letter exchange and queue on every (re)connection."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, parent: Any) -> None:
        declare_dead_letters(parent.connection, get_settings())
        logger.debug("dead-letter topology declared")


app.steps["consumer"].add(DeadLetterTopology)
