"""Media on an S3-compatible server: one bucket per tenant, presigned URLs.

The production :class:`~imhub.runtime.ports.ObjectStore`; ``wiring`` builds it
when ``IMHUB_S3_ENDPOINT`` is set. Clients upload and download straight to
and from the S3 server with URLs this module signs (SigV4), so media bytes
never pass through the gateway. The server enforces every limit written into
a signature: that is why the server must be one that checks presigned
requests (see docs/media-and-turn.md).

Upload tickets come in two forms:

- ``POST`` (default): a presigned form upload whose policy pins the bucket,
  the key and the exact ``Content-Type`` and allows 1 to ``size`` bytes
  (``content-length-range``). Works from a browser form or ``fetch`` with
  ``FormData``; the file must be the last form field.
- ``PUT``: a presigned URL with ``Content-Type``, ``Content-Length`` and
  ``If-None-Match: *`` signed, so the body must be exactly ``size`` bytes and
  the URL stores at most one object (a second use gets 412).

A POST ticket can be used again until it expires and then replaces the object
(S3 form uploads have no create-only condition); choose ``PUT`` where an
uploaded object must never change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, TypeVar

import botocore.exceptions

from imhub.runtime import errors, mediatypes, ports, tenancy
from imhub.runtime.adapters import s3_admin

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["MAX_PRESIGN_SECONDS", "S3MediaStore"]

# SigV4 query signatures are valid for at most seven days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600

T = TypeVar("T")


class S3MediaStore:
    """:class:`~imhub.runtime.ports.ObjectStore` on an S3 API (AWS, versitygw, ...).

    Args:
        endpoint: where this process reaches S3 (``http://127.0.0.1:7070``);
            None means AWS.
        public_endpoint: the S3 address clients use, when it differs
            (a public hostname in front of an in-cluster service). URLs are
            signed for this host, since the host is part of the signature.
        access_key, secret_key: the tenant runtime's S3 credentials.
        region: the signing region; it must match the server's.
        upload_method: ``"POST"`` or ``"PUT"`` tickets (module docstring).
    """

    def __init__(
        self,
        *,
        endpoint: str | None,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        public_endpoint: str | None = None,
        upload_method: Literal["POST", "PUT"] = "POST",
        connect_timeout: float = 3.0,
        read_timeout: float = 20.0,
    ) -> None:
        if upload_method not in ("POST", "PUT"):
            raise ValueError(f"upload_method must be 'POST' or 'PUT', got {upload_method!r}")
        self.upload_method = upload_method
        self._client: S3Client = s3_admin.make_client(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        # Presigning is local computation; this client never sends a request.
        self._signer: S3Client = self._client
        if public_endpoint and public_endpoint.rstrip("/") != (endpoint or "").rstrip("/"):
            self._signer = s3_admin.make_client(
                endpoint=public_endpoint,
                access_key=access_key,
                secret_key=secret_key,
                region=region,
            )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._client.close()
        if self._signer is not self._client:
            self._signer.close()

    async def _call(self, action: str, bucket: str, fn: Callable[[], T]) -> T:
        """Run a blocking S3 call in a thread; any S3 failure becomes Unavailable."""
        try:
            return await asyncio.to_thread(fn)
        except (errors.TemporaryError, errors.PermanentError) as exc:
            raise errors.Unavailable(
                "object storage is not available", details={"reason": str(exc)}
            ) from exc
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise errors.Unavailable(
                "object storage is not available",
                details={"reason": f"S3 {action} on {bucket!r}: {exc}"},
            ) from exc

    @staticmethod
    def _bucket_for(tenant_id: str, key: str) -> str:
        names = tenancy.names_for(tenant_id)
        if not key.startswith(names.object_prefix) or len(key) == len(names.object_prefix):
            raise ValueError(f"key {key!r} is not under tenant prefix {names.object_prefix!r}")
        return names.bucket

    async def ensure_tenant(self, tenant_id: str) -> None:
        """Create the tenant's bucket if it is missing (the operator normally has)."""
        bucket = tenancy.names_for(tenant_id).bucket
        await self._call(
            "CreateBucket", bucket, lambda: s3_admin.ensure_bucket(self._client, bucket)
        )

    async def presign_upload(
        self, tenant_id: str, key: str, *, content_type: str, size: int, expires_in: int
    ) -> ports.UploadTicket:
        """A ticket for one upload of 1..``size`` bytes of ``content_type`` at ``key``.

        The server checks the signature, the expiry, the key, the content type
        and the size; a changed field or an expired ticket is refused.
        """
        bucket = self._bucket_for(tenant_id, key)
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_in must be 1..{MAX_PRESIGN_SECONDS}, got {expires_in}")
        # Taken before signing, so the promised expiry is never later than the real one.
        expires_at = datetime.fromtimestamp(int(time.time()) + expires_in, UTC)

        if self.upload_method == "POST":
            post = self._signer.generate_presigned_post(
                Bucket=bucket,
                Key=key,
                Fields={"Content-Type": content_type},
                Conditions=[
                    {"Content-Type": content_type},
                    ["content-length-range", 1, size],
                ],
                ExpiresIn=expires_in,
            )
            return ports.UploadTicket(
                method="POST",
                url=str(post["url"]),
                fields={str(k): str(v) for k, v in post["fields"].items()},
                headers={},
                expires_at=expires_at,
            )

        url = self._signer.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": bucket,
                "Key": key,
                "ContentType": content_type,
                "ContentLength": size,
                "IfNoneMatch": "*",
            },
            ExpiresIn=expires_in,
        )
        return ports.UploadTicket(
            method="PUT",
            url=url,
            fields={},
            headers={
                "Content-Type": content_type,
                "Content-Length": str(size),
                "If-None-Match": "*",
            },
            expires_at=expires_at,
        )

    async def presign_download(
        self, tenant_id: str, key: str, *, expires_in: int, content_type: str | None = None
    ) -> str:
        """A GET URL for ``key`` valid for ``expires_in`` seconds; any change to it gets
        403. Types a browser could run as a page are served as attachments."""
        bucket = self._bucket_for(tenant_id, key)
        if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_in must be 1..{MAX_PRESIGN_SECONDS}, got {expires_in}")
        params = {"Bucket": bucket, "Key": key}
        if content_type is not None:
            params["ResponseContentDisposition"] = mediatypes.disposition(content_type)
        return self._signer.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=expires_in
        )
