"""One typed settings object, read from ``PARKING_*`` variables and secret files."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Passwords that ship as defaults somewhere; refused outside development.
KNOWN_DEFAULT_PASSWORDS = frozenset(
    {"guest", "admin", "changeme", "password", "secret", "redis", "rabbitmq"}
)
#: Car park names become Redis key parts, metric labels and CSV cells.
LOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_LOT = "main"


class TariffOverride(BaseModel):
    """What one car park charges differently from the default tariff."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    free_minutes: float | None = Field(default=None, ge=0)
    period_minutes: float | None = Field(default=None, gt=0)
    price_per_period: Decimal | None = Field(default=None, ge=0)
    daily_cap: Decimal | None = Field(default=None, ge=0)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")


def secrets_dirs() -> list[Path]:
    # Compose mounts secrets under /run/secrets; the local path uses ./secrets.
    # Missing directories are skipped so that defaults work on a bare machine.
    configured = os.environ.get("PARKING_SECRETS_DIR")
    candidates = [Path(configured)] if configured else [Path("secrets")]
    candidates.append(Path("/run/secrets"))
    return [path for path in candidates if path.is_dir()]


_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class Settings(BaseSettings):
    """Everything the services read from their environment."""

    model_config = SettingsConfigDict(
        env_prefix="PARKING_",
        secrets_dir=secrets_dirs(),
        extra="ignore",
        # A validation error would otherwise quote the input, secrets included.
        hide_input_in_errors=True,
    )

    environment: str = "development"

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    broker_password: SecretStr | None = None
    redis_url: str = "redis://127.0.0.1:6379"
    redis_password: SecretStr | None = None
    #: One Redis database per service (MISSION: one instance, a database each).
    redis_db_store: int = 1
    redis_db_generator: int = 2

    queue_prefix: str = "parking"
    #: Queues of bare JSON events from cameras (``parking ingest``).
    raw_entry_queue: str = "vehicle_entry"
    raw_exit_queue: str = "vehicle_exit"
    ingest_metrics_port: int = 9810
    delivery_limit: int = Field(default=10, ge=1)

    summary_api_url: str = "http://127.0.0.1:8000"
    summary_api_token: SecretStr | None = None
    summary_timeout_seconds: float = Field(default=5.0, gt=0)
    summary_csv: Path = Path("var/stays.csv")
    #: Review files for an operator; empty: beside the stays CSV.
    unmatched_csv: Path | None = None
    orphans_csv: Path | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_require_token_for_reads: bool = False

    match_ratio: float = Field(default=0.8, ge=0.0, le=1.0)
    entry_interval_seconds: float = Field(default=0.5, gt=0)
    exit_interval_seconds: float = Field(default=0.5, gt=0)
    generator_burst: int = Field(default=1, ge=1)
    #: The simulated car park holds this many; entries pause while it is full.
    generator_capacity: int = Field(default=1000, ge=1)

    #: Share of simulated exits of cars inside whose plate is misread.
    generator_misread_ratio: float = Field(default=0.03, ge=0.0, le=1.0)

    #: Car parks and their capacities (JSON, ``{"main": 1000, "north": 200}``).
    #: Events name theirs in ``lot_id``; one naming a car park not listed
    #: here is refused, which keeps the ``lot`` label of metrics bounded.
    lots: dict[str, int] = Field(default_factory=lambda: {DEFAULT_LOT: 1000})
    #: The car park of events without a ``lot_id``.
    default_lot: str = DEFAULT_LOT
    #: The tariff of every car park (money in decimal text, never floats).
    tariff_free_minutes: float = Field(default=15, ge=0)
    tariff_period_minutes: float = Field(default=60, gt=0)
    tariff_price_per_period: Decimal = Field(default=Decimal("3.00"), ge=0)
    tariff_daily_cap: Decimal = Field(default=Decimal("24.00"), ge=0)
    tariff_currency: str = Field(default="AUD", pattern=r"^[A-Z]{3}$")
    #: Per car park changes to it (JSON, ``{"north": {"price_per_period": "4.50"}}``).
    lot_tariffs: dict[str, TariffOverride] = Field(default_factory=dict)
    #: A misread exit matches an open visit whose plate differs in at most
    #: this many confusable characters (0: exact plates only).
    misread_max_positions: int = Field(default=1, ge=0, le=4)

    grace_seconds: int = Field(default=30, ge=1)
    duplicate_window_seconds: float = Field(default=5.0, ge=0)
    #: An exit stamped this much before its entry is camera clock skew.
    clock_skew_seconds: float = Field(default=120.0, ge=0)
    max_stay_hours: float = Field(default=72.0, gt=0)
    sweep_interval_seconds: float = Field(default=5.0, gt=0)
    #: Bookkeeping of processed event ids lives this long (redelivery window).
    event_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    #: A note that a consumer holds an entry (``parking.inflight``) older
    #: than this is a dead consumer's leftover; its message was redelivered.
    inflight_horizon_seconds: int = Field(default=900, ge=60)

    retry_max: int = Field(default=60, ge=0)
    retry_backoff_cap_seconds: int = Field(default=60, ge=1)

    worker_concurrency: int = Field(default=2, ge=1)
    worker_metrics_port: int = 9808
    beat_metrics_port: int = 9809
    #: Where the worker and beat serve /metrics; "0.0.0.0" in containers.
    metrics_address: str = "127.0.0.1"
    #: The worker endpoint ``parking status`` reads; empty: this host's port.
    worker_metrics_url: str = ""
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: SecretStr | None = None
    var_dir: Path = Path("var")

    @field_validator("summary_api_token")
    @classmethod
    def _sendable_token(cls, token: SecretStr | None) -> SecretStr | None:
        # A bearer token travels in an HTTP header: only RFC 6750's token
        # characters survive the trip unchanged. Anything else (spaces,
        # non-ASCII, an empty value) would fail at the first post, so it is
        # refused here, when the settings are read.
        if token is not None and not _BEARER_TOKEN.fullmatch(token.get_secret_value()):
            raise ValueError(
                "summary_api_token must be letters, digits and -._~+/ (RFC 6750)"
            )
        return token

    @model_validator(mode="after")
    def _known_lots(self) -> Settings:
        if not self.lots:
            raise ValueError("lots must name at least one car park")
        for name, capacity in self.lots.items():
            if not LOT_NAME.fullmatch(name):
                raise ValueError(
                    f"lot name {name!r} must be 1-64 letters, digits, '_', '.'"
                    " or '-', starting with a letter or digit"
                )
            if capacity < 1:
                raise ValueError(f"lot {name!r} must hold at least one vehicle")
        if self.default_lot not in self.lots:
            raise ValueError(f"default_lot {self.default_lot!r} is not in lots")
        unknown = sorted(set(self.lot_tariffs) - set(self.lots))
        if unknown:
            raise ValueError(f"lot_tariffs names lots not in lots: {unknown}")
        return self

    @property
    def unmatched_csv_path(self) -> Path:
        return self.unmatched_csv or self.summary_csv.with_name("unmatched.csv")

    @property
    def orphans_csv_path(self) -> Path:
        return self.orphans_csv or self.summary_csv.with_name("orphans.csv")

    @model_validator(mode="after")
    def _refuse_default_passwords(self) -> Settings:
        if self.environment == "development":
            return self
        offenders = [
            name
            for name, password in self.passwords().items()
            if password.lower() in KNOWN_DEFAULT_PASSWORDS
        ]
        if offenders:
            raise ValueError(
                "known default password for "
                + ", ".join(sorted(offenders))
                + f" refused in environment {self.environment!r}"
            )
        return self

    def passwords(self) -> dict[str, str]:
        """Every password in effect, by what it protects (for checks, not logs)."""
        found: dict[str, str] = {}
        for name, url in (("broker", self.broker_url), ("redis", self.redis_url)):
            password = urlsplit(url).password
            if password:
                found[name] = password
        for name, secret in (
            ("broker", self.broker_password),
            ("redis", self.redis_password),
            ("flower", self.flower_password),
            ("summary_api", self.summary_api_token),
        ):
            if secret is not None:
                found[name] = secret.get_secret_value()
        return found

    @property
    def broker_connection_url(self) -> str:
        return _with_password(self.broker_url, self.broker_password)

    def redis_connection_url(self, db: int) -> str:
        url = _with_password(self.redis_url, self.redis_password)
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path=f"/{db}"))

    def queue(self, kind: str) -> str:
        return f"{self.queue_prefix}.{kind}"


def _with_password(url: str, password: SecretStr | None) -> str:
    if password is None:
        return url
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    secret = quote(password.get_secret_value(), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}"))


def mask_url(url: str) -> str:
    """The URL with any password replaced, safe to print or log."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings`` instead."""
    return Settings()
