"""User tokens: verification and minting (PyJWT).

A token is trusted only after its signature checks out against a key of the
tenant it names. The tenant claim is read unverified just to pick the key
set; a token signed with tenant B's key that claims tenant A fails, because
A's keys do not verify it. Each key allows exactly its own algorithm, which
closes the door on ``alg: none`` and on algorithm confusion (an HS256 token
"signed" with an RS256 public key).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jwt

from imhub.runtime import errors, tenants

__all__ = ["Principal", "TokenVerifier", "mint_token"]

_LEEWAY_SECONDS = 10
_MAX_TTL_SECONDS = 30 * 86400


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    user_id: str
    expires_at: float


class TokenVerifier:
    def __init__(self, registry: tenants.TenantRegistry) -> None:
        self._registry = registry

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise errors.Unauthorized("token is not a valid JWT") from None
        tenant_id = unverified.get("tenant_id")
        tenant = self._registry.get(tenant_id) if isinstance(tenant_id, str) else None
        if tenant is None:
            raise errors.Unauthorized("unknown tenant")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise errors.Unauthorized("bad key id")
        key = tenant.key(kid)
        if key is None:
            raise errors.Unauthorized("unknown key id")
        if header.get("alg") != key.alg:
            raise errors.Unauthorized(
                f"algorithm {header.get('alg')!r} is not allowed for this key"
            )
        material = (key.secret if key.alg == "HS256" else key.public_key) or ""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                material,
                algorithms=[key.alg],
                options={"require": ["exp", "sub", "tenant_id"]},
                leeway=_LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise errors.Unauthorized("token not yet valid") from None
        except jwt.PyJWTError:
            raise errors.Unauthorized("token signature or claims are invalid") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= 64 or not _valid_user_id(sub):
            raise errors.Unauthorized("token subject is not a valid user id")
        if claims["tenant_id"] != tenant.tenant_id:  # pragma: no cover - decode checked it
            raise errors.Unauthorized("tenant mismatch")
        iat = claims.get("iat")
        if isinstance(iat, int | float) and iat > time.time() + _LEEWAY_SECONDS:
            raise errors.Unauthorized("token issued in the future")
        return Principal(tenant.tenant_id, sub, float(claims["exp"]))


def _valid_user_id(user_id: str) -> bool:
    return all(c.isalnum() or c in "_.:@-" for c in user_id) and user_id.isascii()


def mint_token(tenant: tenants.Tenant, user_id: str, *, ttl: int = 3600) -> tuple[str, int]:
    """Sign a user token with the tenant's HS256 key; return it and its expiry."""
    if not 0 < len(user_id) <= 64 or not _valid_user_id(user_id):
        raise errors.InvalidPayload("user_id must be 1-64 chars of letters, digits and _.:@-")
    if not 0 < ttl <= _MAX_TTL_SECONDS:
        raise errors.InvalidPayload(f"ttl must be between 1 and {_MAX_TTL_SECONDS} seconds")
    key = tenant.signing_secret()
    now = int(time.time())
    exp = now + ttl
    token = jwt.encode(
        {"sub": user_id, "tenant_id": tenant.tenant_id, "iat": now, "exp": exp},
        key.secret or "",
        algorithm="HS256",
        headers={"kid": key.kid},
    )
    return token, exp
