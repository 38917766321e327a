"""The Celery application, configured from ``celeryconfig``."""

from __future__ import annotations

from celery import Celery

app = Celery("parking")
app.config_from_object("celeryconfig")
# Imported for their side effects: task registration and signal handlers.
app.conf.imports = ("workers.tasks", "workers.signals")
