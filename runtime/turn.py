"""ICE server lists with TURN REST API credentials (pure computation).

coturn in ``use-auth-secret`` mode accepts a username ``<expiry>:<anything>``
with password ``base64(HMAC-SHA1(secret, username))`` until ``expiry`` (unix
seconds). The username carries ``expiry:tenant:user``; coturn checks the
password against every secret listed for its realm, so each tenant's secret
can be rotated or revoked on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

from imhub.runtime import tenancy

__all__ = ["ice_servers", "turn_credentials"]


def turn_credentials(
    secret: str, tenant_id: str, user_id: str, *, ttl: int, now: float | None = None
) -> tuple[str, str, int]:
    expiry = int((time.time() if now is None else now) + ttl)
    username = tenancy.names_for(tenant_id).turn_username(user_id, expiry)
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode(), expiry


def ice_servers(
    *,
    tenant_id: str,
    user_id: str,
    stun_urls: Sequence[str],
    turn_urls: Sequence[str],
    turn_secret: str | None,
    ttl: int,
) -> dict[str, Any]:
    servers: list[dict[str, Any]] = []
    if stun_urls:
        servers.append({"urls": list(stun_urls)})
    expires_at = None
    if turn_secret and turn_urls:
        username, credential, expires_at = turn_credentials(
            turn_secret, tenant_id, user_id, ttl=ttl
        )
        servers.append({"urls": list(turn_urls), "username": username, "credential": credential})
    return {"ice_servers": servers, "ttl": ttl if expires_at else None, "expires_at": expires_at}
