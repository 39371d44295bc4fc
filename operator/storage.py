"""Object storage provisioning: the tenant bucket, its policy and its CORS rules.

A thin async layer over :mod:`imhub.runtime.adapters.s3_admin`, the runtime's
own S3 provisioning helpers (the runtime creates a missing bucket with the same
code). The bucket policy grants the runtime's access key the object operations
the media API needs on this bucket only; CORS lets browsers upload to presigned
URLs from the tenant's origins. Each helper compares with what the server holds
and writes only on a difference, so the drift timer repairs hand edits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from imhub.runtime import errors
from imhub.runtime.adapters import s3_admin

__all__ = ["StorageProvisioner", "StorageResult", "StorageUnavailable"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StorageUnavailable(Exception):
    """The S3 endpoint did not answer (or answered 5xx)."""


@dataclasses.dataclass(slots=True)
class StorageResult:
    bucket: str
    created: bool = False
    policy_updated: bool = False
    cors_updated: bool = False

    def summary(self) -> str:
        done = [
            label
            for label, flag in (
                ("created", self.created),
                ("policy written", self.policy_updated),
                ("CORS written", self.cors_updated),
            )
            if flag
        ]
        return f"bucket {self.bucket}" + (f" ({', '.join(done)})" if done else " in place")


class StorageProvisioner:
    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        timeout: float = 5.0,
    ) -> None:
        self._endpoint = endpoint
        self._access_key = access_key
        self._client: Any = s3_admin.make_client(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            connect_timeout=timeout,
            read_timeout=timeout * 2,
            max_attempts=1,
        )

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except errors.TemporaryError as exc:
            raise StorageUnavailable(f"S3 at {self._endpoint}: {exc}") from exc

    async def ensure(self, bucket: str, *, cors_origins: Sequence[str]) -> StorageResult:
        def run() -> StorageResult:
            result = StorageResult(bucket=bucket)
            result.created = s3_admin.ensure_bucket(self._client, bucket)
            policy = s3_admin.tenant_bucket_policy(bucket, [self._access_key])
            result.policy_updated = s3_admin.apply_bucket_policy(self._client, bucket, policy)
            result.cors_updated = s3_admin.apply_cors(self._client, bucket, list(cors_origins))
            return result

        return await self._call(run)

    async def delete(self, bucket: str) -> bool:
        """Empty and delete the bucket; ``False`` if it did not exist."""
        return await self._call(lambda: s3_admin.delete_bucket(self._client, bucket, force=True))
