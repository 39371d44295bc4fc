"""Local media storage: a directory and HMAC-signed URLs the gateway serves.

An upload URL names the key, the content type, the maximum size and the
expiry, all covered by the signature; changing any of them, or using it after
the expiry, gets 403. The gateway routes that check these live in
``gateway/media.py``; this module only signs and verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlencode

from imhub.runtime import ports

__all__ = ["LocalMediaStore", "load_or_create_secret"]


def load_or_create_secret(path: Path) -> bytes:
    """A per-installation signing secret, created once with mode 0600."""
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


class LocalMediaStore:
    """:class:`~imhub.runtime.ports.ObjectStore` on a local directory."""

    def __init__(self, root: Path, *, secret: bytes, public_url: str | None = None) -> None:
        """``public_url`` prefixes the URLs; without it they are relative to the
        gateway (``/v1/media/local/...``) and the gateway makes them absolute
        with the address the client used, so they work behind any host name."""
        self.root = root
        self._secret = secret
        self._public_url = (public_url or "").rstrip("/")

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    async def ensure_tenant(self, tenant_id: str) -> None:
        (self.root / tenant_id).mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError("key escapes the media root")
        return path

    def sign(
        self, op: str, key: str, expires: int, content_type: str = "", max_size: int = 0
    ) -> str:
        msg = f"{op}\n{key}\n{expires}\n{content_type}\n{max_size}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def verify(
        self,
        op: str,
        key: str,
        expires: int,
        signature: str,
        content_type: str = "",
        max_size: int = 0,
    ) -> bool:
        expected = self.sign(op, key, expires, content_type, max_size)
        return hmac.compare_digest(expected, signature) and expires >= time.time()

    async def presign_upload(
        self, tenant_id: str, key: str, *, content_type: str, size: int, expires_in: int
    ) -> ports.UploadTicket:
        expires = int(time.time()) + expires_in
        sig = self.sign("put", key, expires, content_type, size)
        query = urlencode({"exp": expires, "ct": content_type, "max": size, "sig": sig})
        return ports.UploadTicket(
            method="PUT",
            url=f"{self._public_url}/v1/media/local/{quote(key)}?{query}",
            fields={},
            headers={"Content-Type": content_type},
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    async def presign_download(
        self, tenant_id: str, key: str, *, expires_in: int, content_type: str | None = None
    ) -> str:
        expires = int(time.time()) + expires_in
        sig = self.sign("get", key, expires)
        query = urlencode({"exp": expires, "sig": sig})
        return f"{self._public_url}/v1/media/local/{quote(key)}?{query}"
