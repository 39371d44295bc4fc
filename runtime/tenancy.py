"""Tenant naming: the one place that derives every per-tenant name.

The operator provisions resources under these names and the runtime finds
them under the same names, so both import this module and nothing else
invents a tenant-scoped name.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["TENANT_ID_PATTERN", "TenantNames", "names_for", "validate_tenant_id"]

# DNS-label friendly, so the id can appear in Kubernetes object names, bucket
# names, Postgres identifiers (after '-' -> '_') and Kafka topic names as is.
TENANT_ID_PATTERN = r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$"
_TENANT_ID_RE = re.compile(TENANT_ID_PATTERN)


def validate_tenant_id(tenant_id: str) -> str:
    """Return ``tenant_id`` if it is a valid tenant id, else raise ``ValueError``."""
    if not isinstance(tenant_id, str) or not _TENANT_ID_RE.match(tenant_id):
        raise ValueError(
            f"invalid tenant id {tenant_id!r}: expected 3-32 chars of a-z, 0-9 and '-', "
            "starting with a letter and not ending with '-'"
        )
    return tenant_id


@dataclasses.dataclass(frozen=True, slots=True)
class TenantNames:
    tenant_id: str

    @property
    def _ident(self) -> str:
        return self.tenant_id.replace("-", "_")

    # -- PostgreSQL -----------------------------------------------------------
    @property
    def db_schema(self) -> str:
        return f"t_{self._ident}"

    @property
    def db_role(self) -> str:
        return f"imhub_t_{self._ident}"

    # -- Kafka ----------------------------------------------------------------
    @property
    def topic_prefix(self) -> str:
        return f"imhub.{self.tenant_id}"

    @property
    def topic_messages(self) -> str:
        return f"{self.topic_prefix}.im-messages"

    @property
    def topic_signaling(self) -> str:
        return f"{self.topic_prefix}.im-signaling"

    @property
    def topic_events(self) -> str:
        return f"{self.topic_prefix}.im-events"

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.topic_messages, self.topic_signaling, self.topic_events)

    # -- Redis ----------------------------------------------------------------
    @property
    def cache_prefix(self) -> str:
        return f"imhub:{self.tenant_id}:"

    # -- object storage -------------------------------------------------------
    @property
    def bucket(self) -> str:
        return f"imhub-{self.tenant_id}"

    @property
    def object_prefix(self) -> str:
        return f"{self.tenant_id}/"

    # -- TURN -----------------------------------------------------------------
    def turn_username(self, user_id: str, expiry: int) -> str:
        """TURN REST API username: ``expiry:tenant:user`` (coturn reads the expiry)."""
        return f"{expiry}:{self.tenant_id}:{user_id}"

    # -- Kubernetes -----------------------------------------------------------
    @property
    def k8s_base(self) -> str:
        return f"imhub-{self.tenant_id}"

    @property
    def k8s_secret(self) -> str:
        return f"{self.k8s_base}-credentials"

    @property
    def k8s_gateway(self) -> str:
        return f"{self.k8s_base}-gateway"

    @property
    def k8s_message_service(self) -> str:
        return f"{self.k8s_base}-message"

    @property
    def k8s_rtc_service(self) -> str:
        return f"{self.k8s_base}-rtc"


def names_for(tenant_id: str) -> TenantNames:
    return TenantNames(validate_tenant_id(tenant_id))
