"""Operator configuration, read from ``IMHUB_OPERATOR_*`` environment variables.

The operator holds the admin credentials of every backend (it creates schemas,
roles, topics and buckets) and passes the tenant workloads only what they need:
the tenant's own database role, the broker address, the S3 endpoint and keys,
the TURN URLs. An empty backend setting means "not managed": the matching
condition reports ``NotConfigured`` and the rest of the tenant still works.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_IMAGE", "OperatorConfig"]

DEFAULT_IMAGE = "ghcr.io/imhub/imhub:0.1.0"


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMHUB_OPERATOR_", extra="ignore")

    # -- PostgreSQL: an admin DSN (CREATEROLE and CREATE on the database) -------
    database_url: str | None = None
    # Host:port the tenant pods use, when it differs from the operator's view
    # (e.g. the operator reaches a port-forward, pods reach a Service).
    database_host_for_tenants: str | None = None

    # -- Kafka ------------------------------------------------------------------
    kafka_bootstrap: str | None = None
    kafka_bootstrap_for_tenants: str | None = None

    # -- Redis (passed to the workloads only) -----------------------------------
    redis_url: str | None = None

    # -- S3 ---------------------------------------------------------------------
    s3_endpoint: str | None = None
    s3_endpoint_for_tenants: str | None = None
    s3_public_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"

    # -- coturn -----------------------------------------------------------------
    turn_db: str | None = None
    turn_realm: str = "imhub"
    turn_urls: list[str] = Field(default_factory=list)
    stun_urls: list[str] | None = None

    # -- workloads --------------------------------------------------------------
    image: str = DEFAULT_IMAGE
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    gateway_port: int = Field(default=8080, ge=1, le=65535)
    cluster_domain: str = "cluster.local"

    # -- reconcile loop ---------------------------------------------------------
    drift_interval: float = Field(default=60.0, gt=0)
    drift_initial_delay: float = Field(default=10.0, ge=0)
    retry_delay: float = Field(default=10.0, gt=0)
    backend_timeout: float = Field(default=5.0, gt=0)
    delete_attempts: int = Field(default=3, ge=1)
    liveness_endpoint: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    finalizer: str = "imhub.io/finalizer"

    def tenant_kafka_bootstrap(self) -> str | None:
        return self.kafka_bootstrap_for_tenants or self.kafka_bootstrap

    def tenant_s3_endpoint(self) -> str | None:
        return self.s3_endpoint_for_tenants or self.s3_endpoint
