"""Tenant configuration: signing keys, API key, limits and TURN secret.

Tenants come from a YAML (or JSON) file, from ``IMHUB_TENANTS`` holding the
same document inline, or, for a runtime deployed by the operator for one
tenant, from ``IMHUB_TENANT_ID`` / ``IMHUB_TENANT_JWT_SECRET`` /
``IMHUB_TENANT_API_KEY`` / ``IMHUB_TENANT_TURN_SECRET``.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imhub.runtime import tenancy

__all__ = [
    "DEFAULT_CONTENT_TYPES",
    "SigningKey",
    "Tenant",
    "TenantLimits",
    "TenantRegistry",
    "demo_tenant",
    "load_tenants",
]


class SigningKey(BaseModel):
    """One key a tenant signs user tokens with; ``kid`` selects it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kid: str = Field(min_length=1, max_length=64)
    alg: Literal["HS256", "RS256", "ES256"] = "HS256"
    secret: str | None = Field(default=None, min_length=32, repr=False)
    public_key: str | None = Field(default=None, repr=False)

    @model_validator(mode="after")
    def _material_matches_alg(self) -> SigningKey:
        if self.alg == "HS256" and not self.secret:
            raise ValueError(f"key {self.kid!r}: HS256 needs 'secret' (32+ chars)")
        if self.alg != "HS256" and not self.public_key:
            raise ValueError(f"key {self.kid!r}: {self.alg} needs 'public_key' (PEM)")
        if self.alg != "HS256" and self.secret:
            raise ValueError(f"key {self.kid!r}: {self.alg} keys take a public key, no secret")
        if self.public_key is not None:
            _check_public_key(self.kid, self.alg, self.public_key)
        return self


def _check_public_key(kid: str, alg: str, pem: str) -> None:
    """Refuse at load time a key that could never verify a token."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        raise ValueError(f"key {kid!r}: public_key is not a PEM public key") from None
    if alg == "RS256" and not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"key {kid!r}: RS256 needs an RSA public key")
    if alg == "ES256" and not (
        isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    ):
        raise ValueError(f"key {kid!r}: ES256 needs a P-256 public key")


DEFAULT_CONTENT_TYPES = (
    "image/*",
    "audio/*",
    "video/*",
    "application/pdf",
    "text/plain",
    "application/zip",
    "application/octet-stream",
)


class TenantLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_content_bytes: int = Field(default=16 * 1024, ge=256, le=1024 * 1024)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    allowed_content_types: tuple[str, ...] = DEFAULT_CONTENT_TYPES
    rate_per_second: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=40, ge=1)
    max_group_members: int = Field(default=500, ge=2, le=100_000)
    max_connections_per_user: int = Field(default=10, ge=1)

    def content_type_allowed(self, content_type: str) -> bool:
        content_type = content_type.split(";", 1)[0].strip().lower()
        for pattern in self.allowed_content_types:
            if pattern.endswith("/*"):
                if content_type.startswith(pattern[:-1]):
                    return True
            elif content_type == pattern:
                return True
        return False


class Tenant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant_id: str
    keys: tuple[SigningKey, ...] = Field(min_length=1)
    api_key: str | None = Field(default=None, min_length=16, repr=False)
    limits: TenantLimits = TenantLimits()
    turn_secret: str | None = Field(default=None, repr=False)
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    webhook_secret: str | None = Field(default=None, min_length=16, repr=False)

    @field_validator("tenant_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return tenancy.validate_tenant_id(value)

    @model_validator(mode="after")
    def _unique_kids(self) -> Tenant:
        kids = [k.kid for k in self.keys]
        if len(kids) != len(set(kids)):
            raise ValueError(f"tenant {self.tenant_id!r}: duplicate key ids")
        return self

    @property
    def names(self) -> tenancy.TenantNames:
        return tenancy.TenantNames(self.tenant_id)

    def key(self, kid: str | None) -> SigningKey | None:
        if kid is None:
            return self.keys[0]
        return next((k for k in self.keys if k.kid == kid), None)

    def api_key_matches(self, candidate: str) -> bool:
        if not self.api_key:
            return False
        return hmac.compare_digest(self.api_key.encode(), candidate.encode())

    def signing_secret(self) -> SigningKey:
        """The key the server itself signs with (``imhub token``, /v1/auth/token)."""
        for key in self.keys:
            if key.alg == "HS256":
                return key
        raise ValueError(f"tenant {self.tenant_id!r} has no HS256 key to sign with")


class TenantRegistry:
    """The tenants this process serves, by id."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._tenants: dict[str, Tenant] = {}
        for tenant in tenants:
            if tenant.tenant_id in self._tenants:
                raise ValueError(f"tenant {tenant.tenant_id!r} is defined twice")
            self._tenants[tenant.tenant_id] = tenant

    def get(self, tenant_id: str) -> Tenant | None:
        return self._tenants.get(tenant_id)

    def __iter__(self) -> Any:
        return iter(self._tenants.values())

    def __len__(self) -> int:
        return len(self._tenants)

    def ids(self) -> list[str]:
        return sorted(self._tenants)


def _parse_document(doc: Any, source: str) -> list[Tenant]:
    if isinstance(doc, Mapping) and "tenants" in doc:
        doc = doc["tenants"]
    if not isinstance(doc, list):
        raise ValueError(f"{source}: expected a list of tenants (or a mapping with 'tenants')")
    return [Tenant.model_validate(item) for item in doc]


def load_tenants(
    tenants_file: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> TenantRegistry:
    """Load tenants from the file, ``IMHUB_TENANTS`` and the single-tenant variables."""
    env = os.environ if environ is None else environ
    found: list[Tenant] = []
    if tenants_file is not None:
        text = Path(tenants_file).read_text(encoding="utf-8")
        found += _parse_document(yaml.safe_load(text), str(tenants_file))
    if env.get("IMHUB_TENANTS"):
        found += _parse_document(yaml.safe_load(env["IMHUB_TENANTS"]), "IMHUB_TENANTS")
    if env.get("IMHUB_TENANT_ID"):
        secret = env.get("IMHUB_TENANT_JWT_SECRET")
        if not secret:
            raise ValueError("IMHUB_TENANT_ID is set but IMHUB_TENANT_JWT_SECRET is not")
        found.append(
            Tenant(
                tenant_id=env["IMHUB_TENANT_ID"],
                keys=(SigningKey(kid=env.get("IMHUB_TENANT_JWT_KID", "k1"), secret=secret),),
                api_key=env.get("IMHUB_TENANT_API_KEY") or None,
                turn_secret=env.get("IMHUB_TENANT_TURN_SECRET") or None,
            )
        )
    return TenantRegistry(found)


def demo_tenant(tenant_id: str = "demo") -> dict[str, Any]:
    """A fresh tenant document with random secrets (written once by ``--demo``)."""
    return {
        "tenant_id": tenant_id,
        "api_key": secrets.token_urlsafe(24),
        "keys": [{"kid": "k1", "alg": "HS256", "secret": secrets.token_urlsafe(32)}],
        "turn_secret": secrets.token_urlsafe(24),
    }
