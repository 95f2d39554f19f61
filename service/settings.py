"""The one settings object, read from the environment of DESIGN §9 when a process starts (never at import)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.domain.catalog import EXAMPLE_CATALOG
from service.domain.errors import ConfigurationError


def comma_list(value: str | None) -> tuple[str, ...]:
    """`a, b,,c` -> ("a", "b", "c"): the one parser of every comma-separated setting."""
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    database_url: str = Field("", alias="DATABASE_URL")
    dodo_payments_webhook_key: str = Field("", alias="DODO_PAYMENTS_WEBHOOK_KEY")
    dodo_payments_api_key: str | None = Field(None, alias="DODO_PAYMENTS_API_KEY")
    dodo_payments_base_url: str | None = Field(None, alias="DODO_PAYMENTS_BASE_URL")
    grpc_addr: str = Field("127.0.0.1:50051", alias="ENTITLEMENTS_GRPC_ADDR")
    http_addr: str = Field("127.0.0.1:8080", alias="ENTITLEMENTS_HTTP_ADDR")
    catalog_path: Path = Field(EXAMPLE_CATALOG, alias="ENTITLEMENTS_CATALOG")
    api_tokens_raw: str = Field("", alias="ENTITLEMENTS_API_TOKENS")
    # `name:token:scope+scope,…` (DESIGN §14); parsed into callers, and checked, when the server starts.
    callers_raw: str = Field("", alias="ENTITLEMENTS_CALLERS")
    # PEM file paths; empty = plaintext gRPC. A client CA makes client certificates required (mutual TLS).
    tls_cert: str = Field("", alias="ENTITLEMENTS_TLS_CERT")
    tls_key: str = Field("", alias="ENTITLEMENTS_TLS_KEY")
    tls_client_ca: str = Field("", alias="ENTITLEMENTS_TLS_CLIENT_CA")
    db_pool_size: int = Field(10, alias="ENTITLEMENTS_DB_POOL_SIZE", ge=4)
    lock_timeout_ms: int = Field(1000, alias="ENTITLEMENTS_LOCK_TIMEOUT_MS", ge=1)
    consume_queue_max: int = Field(1024, alias="ENTITLEMENTS_CONSUME_QUEUE_MAX", ge=1)
    cache_max_unknown: int = Field(50_000, alias="ENTITLEMENTS_CACHE_MAX_UNKNOWN", ge=0)
    stale_grace_seconds: float = Field(300.0, alias="ENTITLEMENTS_STALE_GRACE_SECONDS", ge=0)
    credit_writers: int = Field(1, alias="ENTITLEMENTS_CREDIT_WRITERS", ge=1)
    cache_max_customers: int = Field(200_000, alias="ENTITLEMENTS_CACHE_MAX_CUSTOMERS", ge=0)
    # WatchEntitlements (DESIGN §13): how long events are kept (an older cursor is CURSOR_EXPIRED), the idle
    # heartbeat, how far one stream may fall behind before it is cut off (events), and streams per process.
    watch_retention_hours: float = Field(168.0, alias="ENTITLEMENTS_WATCH_RETENTION_HOURS", gt=0)
    watch_heartbeat_seconds: float = Field(15.0, alias="ENTITLEMENTS_WATCH_HEARTBEAT_SECONDS", gt=0)
    watch_buffer_events: int = Field(10_000, alias="ENTITLEMENTS_WATCH_BUFFER_EVENTS", ge=1)
    watch_max_streams: int = Field(1000, alias="ENTITLEMENTS_WATCH_MAX_STREAMS", ge=1)
    shutdown_grace_seconds: float = Field(10.0, alias="ENTITLEMENTS_SHUTDOWN_GRACE_SECONDS", ge=0)
    dodo_timeout_seconds: float = Field(15.0, alias="ENTITLEMENTS_DODO_TIMEOUT_SECONDS", gt=0)
    reconcile_interval_seconds: float = Field(0.0, alias="ENTITLEMENTS_RECONCILE_INTERVAL_SECONDS", ge=0)
    reconcile_rate_per_minute: int = Field(90, alias="ENTITLEMENTS_RECONCILE_RATE_PER_MINUTE", ge=1)
    reconcile_renewal_margin_hours: float = Field(6.0, alias="ENTITLEMENTS_RECONCILE_RENEWAL_MARGIN_HOURS", ge=0)
    reconcile_refresh_days: float = Field(7.0, alias="ENTITLEMENTS_RECONCILE_REFRESH_DAYS", gt=0)
    reconcile_recheck_minutes: float = Field(60.0, alias="ENTITLEMENTS_RECONCILE_RECHECK_MINUTES", ge=0)
    customer_ref_key: str = Field("customer_ref", alias="ENTITLEMENTS_CUSTOMER_REF_KEY", min_length=1, max_length=40)
    plan_prices_refresh_seconds: float = Field(300.0, alias="ENTITLEMENTS_PLAN_PRICES_REFRESH_SECONDS", gt=0)
    # The usage sender's share of Dodo's account-wide 240 requests/min (per process), and its idle poll.
    usage_rate_per_minute: int = Field(120, alias="ENTITLEMENTS_USAGE_RATE_PER_MINUTE", ge=1)
    usage_poll_seconds: float = Field(1.0, alias="ENTITLEMENTS_USAGE_POLL_SECONDS", gt=0)
    # The credit mirror (service/app/credit_mirror.py): how old an open batch gets before it is sent, how often the
    # sender looks (0 = no sender in this process), and its share of Dodo's account-wide rate limit.
    credit_mirror_close_seconds: float = Field(5.0, alias="ENTITLEMENTS_CREDIT_MIRROR_CLOSE_SECONDS", ge=0)
    credit_mirror_poll_seconds: float = Field(1.0, alias="ENTITLEMENTS_CREDIT_MIRROR_POLL_SECONDS", ge=0)
    credit_mirror_rate_per_minute: int = Field(60, alias="ENTITLEMENTS_CREDIT_MIRROR_RATE_PER_MINUTE", ge=1)
    # CreateCharge: how long a sent charge may still land at Dodo (above the Dodo timeout), and how often the
    # background resolver looks at charges whose answer was lost (0 = only when the caller retries).
    charge_lease_seconds: float = Field(60.0, alias="ENTITLEMENTS_CHARGE_LEASE_SECONDS", gt=0)
    charge_resolve_interval_seconds: float = Field(30.0, alias="ENTITLEMENTS_CHARGE_RESOLVE_INTERVAL_SECONDS", ge=0)
    log_format: Literal["text", "json"] = Field("text", alias="ENTITLEMENTS_LOG_FORMAT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="ENTITLEMENTS_LOG_LEVEL")
    # Traces go out over OTLP/gRPC when this is set (OpenTelemetry's own variables configure the rest).
    otel_exporter_otlp_endpoint: str = Field("", alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_service_name: str = Field("entitlements", alias="OTEL_SERVICE_NAME")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @property
    def webhook_keys(self) -> tuple[str, ...]:
        return comma_list(self.dodo_payments_webhook_key)

    @property
    def api_tokens(self) -> frozenset[str]:
        return frozenset(comma_list(self.api_tokens_raw))

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigurationError("DATABASE_URL is not set (make run starts a local Postgres when it is unset)")
        return self.database_url
