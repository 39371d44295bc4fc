"""The ``ImTenant`` spec as a typed model.

The API server already validates and defaults the spec against the CRD
schema; this model repeats the defaults so the operator never depends on a
field being present, and gives the rest of the operator typed access.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from imhub.runtime import tenancy, tenants

__all__ = [
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "InvalidSpec",
    "TenantSpec",
    "parse_spec",
]

GROUP = "imhub.io"
VERSION = "v1alpha1"
PLURAL = "imtenants"
KIND = "ImTenant"

_DEFAULT_CONTENT_TYPES = tenants.DEFAULT_CONTENT_TYPES  # one list for runtime and operator


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore"
    )


class KafkaSpec(_Model):
    partitions: int = Field(default=8, ge=1, le=256)
    retention_hours: int = Field(default=168, ge=1, le=8760)
    replication_factor: int = Field(default=1, ge=1, le=7)

    @property
    def retention_ms(self) -> int:
        return self.retention_hours * 3_600_000


class StorageSpec(_Model):
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    allowed_content_types: tuple[str, ...] = _DEFAULT_CONTENT_TYPES
    cors_allowed_origins: tuple[str, ...] = ("*",)


class LimitsSpec(_Model):
    max_content_bytes: int = Field(default=16 * 1024, ge=256, le=1024 * 1024)
    rate_per_second: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=40, ge=1)
    max_group_members: int = Field(default=500, ge=2, le=100_000)
    max_connections_per_user: int = Field(default=10, ge=1)


class TurnSpec(_Model):
    enabled: bool = True
    ttl_seconds: int = Field(default=3600, ge=60, le=86400)


class ReplicasSpec(_Model):
    gateway: int = Field(default=2, ge=0, le=100)
    message_service: int = Field(default=1, ge=0, le=100)
    rtc_service: int = Field(default=1, ge=0, le=100)


class ResourcesSpec(_Model):
    gateway: dict[str, dict[str, str | int]] | None = None
    message_service: dict[str, dict[str, str | int]] | None = None
    rtc_service: dict[str, dict[str, str | int]] | None = None


class RuntimeSpec(_Model):
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    replicas: ReplicasSpec = ReplicasSpec()
    resources: ResourcesSpec = ResourcesSpec()


class TenantSpec(_Model):
    tenant_id: str
    display_name: str | None = None
    webhook_url: str | None = None
    deletion_policy: Literal["Retain", "Delete"] = "Retain"
    kafka: KafkaSpec = KafkaSpec()
    storage: StorageSpec = StorageSpec()
    limits: LimitsSpec = LimitsSpec()
    turn: TurnSpec = TurnSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @field_validator("tenant_id")
    @classmethod
    def _valid_tenant_id(cls, value: str) -> str:
        return tenancy.validate_tenant_id(value)

    @property
    def names(self) -> tenancy.TenantNames:
        return tenancy.TenantNames(self.tenant_id)


class InvalidSpec(ValueError):
    """The spec cannot be reconciled; retrying will not help until it changes."""


def parse_spec(spec: Mapping[str, Any]) -> TenantSpec:
    """Validate ``spec`` (the ``ImTenant.spec`` mapping) into a :class:`TenantSpec`."""
    try:
        return TenantSpec.model_validate(dict(spec))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise InvalidSpec(f"spec.{where}: {first['msg']}") from None
