"""One `Settings` object, read from `SSTMERGE_*` environment variables, shared by the API, the worker and the CLI."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TenantKey(BaseModel):
    """An API key given in the environment (never stored; compared by hash)."""

    tenant: str
    key: SecretStr


def _split(value: object, sep: str) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(sep) if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the service. Paths left unset derive from `data_dir`."""

    model_config = SettingsConfigDict(env_prefix="SSTMERGE_", extra="ignore")

    data_dir: Path = Field(
        default=Path.home() / ".sstmerge", description="root of local state (database, artifacts, scratch)"
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/sstmerge.db"
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker; default sqla+sqlite:///<data_dir>/broker.db (embedded), redis://… in production",
    )
    queue: str = Field(default="sstmerge", description="Celery queue the jobs go to")
    broker_visibility_timeout: int = Field(
        default=3600, ge=1, description="Redis: seconds before an unacknowledged job is re-delivered"
    )

    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = Field(default=None, description="local backend root; default <data_dir>/artifacts")
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, …); AWS when unset")
    s3_region: str | None = None

    work_dir: Path | None = Field(default=None, description="worker/API scratch space; default <data_dir>/work")
    cache_dir: Path | None = Field(default=None, description="Fisher factor cache; default <data_dir>/cache")
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="colon-separated folders whose sub-folders are usable base models"
    )
    hub_enabled: bool = Field(default=False, description="allow Hugging Face Hub ids for base models and adapters")
    hub_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated Hub ids offered by GET /models; when set, the only ones accepted",
    )

    api_keys: Annotated[list[TenantKey], NoDecode] = Field(
        default_factory=list,
        description='"tenant:key,tenant2:key2"; more keys can be created with `sstmerge keys create`',
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="an API process trusts a key it checked for this long (0: check every request); a key revoked "
        "elsewhere stops working within this time",
    )

    max_upload_bytes: int = Field(default=2 << 30, ge=1, description="largest accepted upload (413 beyond)")
    max_extracted_bytes: int = Field(default=4 << 30, ge=1, description="largest total uncompressed size of an archive")
    max_archive_members: int = Field(default=256, ge=1, description="most entries an uploaded archive may hold")
    max_archive_header_bytes: int = Field(
        default=1 << 16, ge=512, description="largest tar extended header (pax record, GNU long name) of an archive"
    )
    max_row_bytes: int = Field(default=1 << 20, ge=1024, description="longest line (row) of an uploaded dataset")
    max_json_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="largest request body that is not a multipart upload (413 beyond)"
    )

    device: str = Field(default="auto", description="torch device for jobs (auto, cpu, cuda, cuda:1)")
    dtype: str = Field(default="auto", description="model dtype for jobs (auto, float32, bfloat16, float16)")
    worker_concurrency: int = Field(default=1, ge=1, description="jobs per worker process; keep 1 per GPU")
    job_lease_seconds: float = Field(
        default=60.0, gt=0, description="a running job whose heartbeat is older is taken over"
    )
    heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="how often a worker refreshes a running job's heartbeat"
    )
    max_attempts: int = Field(default=3, ge=1, description="deliveries of one job before it fails as worker_lost")
    job_time_limit_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="running time of a job, from its first start, after which it fails with time_limit_exceeded",
    )
    republish_max_seconds: float = Field(
        default=900.0,
        gt=0,
        description="longest wait between two sends of a job still queued (the first re-send comes after a lease, "
        "then the wait doubles up to this)",
    )
    task_max_retries: int = Field(
        default=5, ge=0, description="in-task retries of a delivery whose database or storage is briefly unreachable"
    )
    job_retention_seconds: float | None = Field(
        default=None, gt=0, description="finished jobs older than this are deleted with their artifacts (unset: kept)"
    )

    min_free_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="free space the storage and work folders must keep: uploads get 507 and jobs fail with "
        "insufficient_storage below it, and /readyz reports it",
    )
    input_cache_max_bytes: int = Field(
        default=20 << 30, ge=0, description="size cap of a worker's cache of fetched adapters and datasets (LRU)"
    )
    fisher_cache_max_bytes: int = Field(
        default=10 << 30, ge=0, description="size cap of a worker's Fisher factor cache (LRU)"
    )
    leftover_grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="age after which unowned scratch files and stored objects without a database row are removed "
        "at start-up (files a live process holds are never removed)",
    )

    ops_token: SecretStr | None = Field(
        default=None,
        description="bearer token for GET /metrics and the details of GET /readyz (unset: /metrics is refused and "
        "/readyz tells only which check fails)",
    )
    rate_limit_failed_auth: str = Field(
        default="30/minute",
        description="failed authentications allowed per client address (`limits` notation; empty: no limit)",
    )
    rate_limit_tenant: str = Field(
        default="6000/minute", description="requests allowed per tenant (`limits` notation; empty: no limit)"
    )
    rate_limit_storage_url: str | None = Field(
        default=None,
        description="where rate-limit counters live: default the Redis broker when there is one (shared by every "
        "API process), else memory://",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For is "
        "believed; default none: the client is the peer of the connection",
    )
    http_header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="a connection must deliver a request's headers within this (408 beyond)"
    )
    http_body_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description="a request body must deliver http_min_body_bytes_per_second over each such period (408 beyond)",
    )
    http_min_body_bytes_per_second: int = Field(
        default=1024, ge=0, description="slowest accepted request body, averaged over http_body_timeout_seconds"
    )
    http_max_header_bytes: int = Field(
        default=64 << 10, ge=1024, description="largest request line and headers of a request (431 beyond)"
    )
    http_max_connections_per_client: int = Field(
        default=32, ge=1, description="open connections one client address may hold per API process (429 beyond)"
    )
    leftover_sweep_seconds: float = Field(
        default=600.0, gt=0, description="how often a running API sweeps leftovers (as at start-up)"
    )
    tenant_max_inputs: int = Field(
        default=1000, ge=0, description="adapters and datasets one tenant may store (507 quota_exceeded beyond)"
    )
    tenant_max_input_bytes: int = Field(
        default=100 << 30, ge=0, description="bytes of adapters and datasets one tenant may store (507 beyond)"
    )

    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated hosts a job's webhook_url may name (`host` any port, `host:port`, "
        "`*.example.com`); empty: no webhooks",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="whole time one webhook attempt may take (connect to response)"
    )
    webhook_retry_base_seconds: float = Field(
        default=10.0, gt=0, description="wait after a webhook's first failed attempt; doubles with each attempt"
    )
    webhook_retry_max_seconds: float = Field(default=3600.0, gt=0, description="longest wait between two attempts")
    webhook_max_attempts: int = Field(default=12, ge=1, description="attempts of one webhook before it is given up")
    webhook_poll_seconds: float = Field(
        default=1.0, gt=0, description="how often a worker looks for webhooks due to be sent"
    )

    log_level: str = "INFO"
    log_json: bool = Field(default=True, description="one JSON object per log line")

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _colon_list(cls, value: object) -> object:
        return _split(value, ":")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_list(cls, value: object) -> object:
        return _split(value, ",")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError: not an address or network
        return value

    @field_validator("hub_models", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value, ",")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _tenant_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = []
        for item in (part.strip() for part in value.split(",") if part.strip()):
            tenant, sep, key = item.partition(":")
            if not sep or not key or not TENANT_PATTERN.match(tenant):
                raise ValueError("SSTMERGE_API_KEYS must look like 'tenant:key,tenant2:key2'")
            pairs.append({"tenant": tenant, "key": key})
        return pairs

    @field_validator("rate_limit_failed_auth", "rate_limit_tenant")
    @classmethod
    def _rate(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many

            parse_many(value)
        return value.strip()

    @property
    def resolved_rate_limit_storage_url(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        broker = self.resolved_broker_url
        return broker if broker.startswith(("redis://", "rediss://")) else "memory://"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'sstmerge.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "artifacts"

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.data_dir / "work"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def embedded_broker(self) -> bool:
        """True for kombu's SQLAlchemy transport (no fanout: remote control and gossip are off)."""
        return self.resolved_broker_url.startswith("sqla+")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
