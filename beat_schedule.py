"""What beat runs and how often: the simulated cameras and the ledger sweep."""

from __future__ import annotations

from typing import Any

from parking.settings import Settings


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    burst = settings.generator_burst
    # Each entry expires after its own period: a beat that ran while no worker
    # listened must not unleash a backlog of simulated cars at once.
    return {
        "generate-entries": {
            "task": "parking.generate_entry",
            "schedule": settings.entry_interval_seconds,
            "kwargs": {"count": burst},
            "options": {"expires": settings.entry_interval_seconds * 10},
        },
        "generate-exits": {
            "task": "parking.generate_exit",
            "schedule": settings.exit_interval_seconds,
            "kwargs": {"count": burst},
            "options": {"expires": settings.exit_interval_seconds * 10},
        },
        "sweep-ledger": {
            "task": "parking.sweep",
            "schedule": settings.sweep_interval_seconds,
            "options": {"expires": settings.sweep_interval_seconds * 2},
        },
    }
