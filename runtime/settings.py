"""Runtime settings: flags, then ``IMHUB_*`` environment variables, then a config file.

The config file is YAML, named by ``IMHUB_CONFIG`` (or ``--config``); its keys
are the field names below. Flags are passed as init arguments by the CLI, so
they win over everything else.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMHUB_", extra="ignore")

    # -- where and who --------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path(".imhub")
    tenants_file: Path | None = None
    public_url: str | None = None
    instance_id: str = Field(default_factory=lambda: f"gw-{uuid.uuid4().hex[:8]}")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Browser apps on other origins call the API with a bearer token (no
    # cookies), so allowing any origin exposes nothing a token does not.
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])

    # -- backends: empty means the embedded default ----------------------------
    database_url: str | None = None
    redis_url: str | None = None
    kafka_bootstrap: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    s3_public_endpoint: str | None = None
    stun_urls: list[str] = Field(default_factory=lambda: ["stun:stun.l.google.com:19302"])
    turn_urls: list[str] = Field(default_factory=list)
    turn_ttl_seconds: int = Field(default=3600, ge=60, le=86400)

    # -- bus ------------------------------------------------------------------
    bus_partitions: int = Field(default=8, ge=1, le=256)
    kafka_replication_factor: int = Field(default=1, ge=1, le=7)
    # Consumer groups are "<prefix>.message-service" / "<prefix>.rtc-service";
    # the default prefix is the tenant's topic prefix when the process serves
    # one tenant, so tenants never share a group (and a rebalance).
    consumer_group_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,100}$")
    consumer_batch: int = Field(default=500, ge=1, le=10000)

    # -- WebSocket limits and timeouts ----------------------------------------
    auth_timeout_seconds: float = Field(default=5.0, gt=0)
    idle_timeout_seconds: float = Field(default=120.0, gt=0)
    ack_timeout_seconds: float = Field(default=10.0, gt=0)
    max_frame_bytes: int = Field(default=256 * 1024, ge=1024)
    send_queue_limit: int = Field(default=1000, ge=10)
    send_queue_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)

    # -- media (embedded) -----------------------------------------------------
    media_url_ttl_seconds: int = Field(default=900, ge=10, le=7 * 86400)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("IMHUB_CONFIG")
        if config_file:
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"no such config file: {config_file}")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def embedded(self) -> bool:
        return not (self.database_url or self.kafka_bootstrap or self.redis_url)

    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'imhub.db').resolve()}"

    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def redacted(self) -> dict[str, Any]:
        """Settings safe to log: secrets and credentials in URLs are masked."""
        out = self.model_dump(mode="json")
        for key in ("s3_secret_key", "s3_access_key"):
            if out.get(key):
                out[key] = "***"
        for key in ("database_url", "redis_url"):
            if out.get(key) and "@" in out[key]:
                scheme, rest = out[key].split("://", 1)
                out[key] = f"{scheme}://***@{rest.split('@', 1)[1]}"
        return out
