"""Collaborators built once per process, and rebuilt in each forked child."""

from __future__ import annotations

from datetime import timedelta
from functools import cache

import redis

from parking.clock import SystemClock
from parking.generators import EventGenerator, Publish
from parking.handlers import EntryEventProcessor, ExitEventProcessor
from parking.inflight import InFlightEntries
from parking.lots import Lots, lots_from_settings
from parking.metrics import ParkingMetrics, default_metrics
from parking.settings import Settings, get_settings
from parking.store import LedgerPolicy, RedisVisitStore
from parking.summary_client import HttpSummarySink
from parking.sweeper import Sweeper

_configured: Settings | None = None


def configure(settings: Settings | None) -> None:
    """Use these settings from now on (tests); ``None`` goes back to the env."""
    global _configured
    _configured = settings
    reset()


def settings() -> Settings:
    return _configured or get_settings()


def _metrics() -> ParkingMetrics:
    return default_metrics()


@cache
def lots() -> Lots:
    return lots_from_settings(settings())


@cache
def store_redis() -> redis.Redis:
    conf = settings()
    return redis.Redis.from_url(
        conf.redis_connection_url(conf.redis_db_store),
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=30,
    )


def ledger_policy(conf: Settings) -> LedgerPolicy:
    return LedgerPolicy(
        duplicate_window=timedelta(seconds=conf.duplicate_window_seconds),
        clock_skew=timedelta(seconds=conf.clock_skew_seconds),
        grace=timedelta(seconds=conf.grace_seconds),
        event_ttl=timedelta(seconds=conf.event_ttl_seconds),
        misread_max_positions=conf.misread_max_positions,
    )


@cache
def store() -> RedisVisitStore:
    conf = settings()
    return RedisVisitStore(
        store_redis(), ledger_policy(conf), prefix=conf.queue_prefix, lots=lots().names
    )


@cache
def inflight() -> InFlightEntries:
    conf = settings()
    horizon = timedelta(seconds=conf.inflight_horizon_seconds)
    return InFlightEntries(store_redis(), prefix=conf.queue_prefix, horizon=horizon)


@cache
def sink() -> HttpSummarySink:
    conf = settings()
    token = conf.summary_api_token
    return HttpSummarySink(
        conf.summary_api_url,
        _metrics(),
        token=token.get_secret_value() if token else None,
        timeout=conf.summary_timeout_seconds,
    )


@cache
def entry_processor() -> EntryEventProcessor:
    return EntryEventProcessor(store(), sink(), SystemClock(), _metrics(), lots())


@cache
def exit_processor() -> ExitEventProcessor:
    return ExitEventProcessor(store(), sink(), SystemClock(), _metrics(), lots())


def entries_on_their_way() -> int:
    """Entries still queued (ready or delayed), and entries a worker holds."""
    from workers.topology import entry_backlog

    return entry_backlog(settings()) + inflight().count()


@cache
def sweeper() -> Sweeper:
    max_stay = timedelta(hours=settings().max_stay_hours)
    return Sweeper(
        store(),
        sink(),
        SystemClock(),
        _metrics(),
        lots(),
        max_stay,
        entry_backlog=entries_on_their_way,
    )


@cache
def generator_redis() -> redis.Redis:
    conf = settings()
    url = conf.redis_connection_url(conf.redis_db_generator)
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def generator(publish: Publish) -> EventGenerator:
    conf = settings()
    return EventGenerator(
        generator_redis(),
        publish,
        SystemClock(),
        _metrics(),
        match_ratio=conf.match_ratio,
        capacity=conf.generator_capacity,
        misread_ratio=conf.generator_misread_ratio,
        lot=conf.default_lot,
    )


def reset() -> None:
    """Forget every collaborator: a forked child must open its own sockets."""
    for factory in (
        lots,
        store_redis,
        store,
        inflight,
        sink,
        entry_processor,
        exit_processor,
        sweeper,
        generator_redis,
    ):
        factory.cache_clear()
