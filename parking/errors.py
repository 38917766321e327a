"""The one exception tree: bad input is never retried, outages always are."""

from __future__ import annotations


class ParkingError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigurationError(ParkingError):
    """The settings cannot run this service safely; it refuses to start."""


class InvalidEvent(ParkingError):
    """The message can never be processed; it goes to the dead letters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        #: A short, bounded label for metrics (never a plate or an id).
        self.reason = reason
        self.detail = detail


class TemporaryFailure(ParkingError):
    """A dependency is unavailable; the same message should be tried later."""


class StoreUnavailable(TemporaryFailure):
    """Redis did not answer."""


class SummaryUnavailable(TemporaryFailure):
    """The summary API did not take the stay (down, timing out, or 5xx)."""


class SummaryRejected(ParkingError):
    """The summary API refused the stay as invalid; retrying cannot help."""
