"""Object storage provisioning: the tenant bucket, its policy and its CORS rules.

boto3 against any S3 API (versitygw in tests). The bucket policy grants the
runtime's access key the object operations the media API needs on this
bucket only; CORS lets browsers PUT to presigned upload URLs from the
tenant's origins. Policy and CORS are compared with what the server holds
and written only when they differ, so the drift timer repairs hand edits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, ConnectTimeoutError

__all__ = [
    "StorageProvisioner",
    "StorageResult",
    "StorageUnavailable",
    "bucket_policy",
    "cors_rules",
]

logger = logging.getLogger(__name__)

_OBJECT_ACTIONS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]
_BUCKET_ACTIONS = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
# Bounded cleanup: at most this many delete batches (1000 keys each) per pass.
_MAX_DELETE_BATCHES = 1000


class StorageUnavailable(Exception):
    """The S3 endpoint did not answer."""


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


def bucket_policy(bucket: str, principals: Sequence[str]) -> dict[str, Any]:
    """Only the runtime's key may touch the bucket (besides its owner)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ImhubRuntimeObjects",
                "Effect": "Allow",
                "Principal": {"AWS": list(principals)},
                "Action": list(_OBJECT_ACTIONS),
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
            },
            {
                "Sid": "ImhubRuntimeBucket",
                "Effect": "Allow",
                "Principal": {"AWS": list(principals)},
                "Action": list(_BUCKET_ACTIONS),
                "Resource": [f"arn:aws:s3:::{bucket}"],
            },
        ],
    }


def cors_rules(origins: Sequence[str]) -> list[dict[str, Any]]:
    """Browsers upload with PUT/POST to presigned URLs and read with GET."""
    return [
        {
            "ID": "imhub-browser-media",
            "AllowedOrigins": list(origins),
            "AllowedMethods": ["GET", "HEAD", "PUT", "POST"],
            "AllowedHeaders": ["*"],
            "ExposeHeaders": ["ETag"],
            "MaxAgeSeconds": 3600,
        }
    ]


def _normalize_cors(rules: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("AllowedOrigins", "AllowedMethods", "AllowedHeaders", "ExposeHeaders")
    return [
        {
            **{k: sorted(r.get(k) or []) for k in keys},
            "MaxAgeSeconds": r.get("MaxAgeSeconds"),
        }
        for r in rules
    ]


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
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout * 2,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (ConnectionError, ConnectTimeoutError) as exc:
            raise StorageUnavailable(f"S3 at {self._endpoint} did not answer: {exc}") from exc
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status in (500, 502, 503, 504):
                raise StorageUnavailable(f"S3 at {self._endpoint}: {exc}") from exc
            raise
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 at {self._endpoint}: {exc}") from exc

    async def ensure(self, bucket: str, *, cors_origins: Sequence[str]) -> StorageResult:
        result: StorageResult = await self._call(self._ensure, bucket, list(cors_origins))
        return result

    def _ensure(self, bucket: str, cors_origins: list[str]) -> StorageResult:
        s3 = self._client
        result = StorageResult(bucket=bucket)
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            try:
                s3.create_bucket(Bucket=bucket)
                result.created = True
            except ClientError as create_exc:
                code = create_exc.response.get("Error", {}).get("Code")
                if code != "BucketAlreadyOwnedByYou":
                    raise

        wanted_policy = bucket_policy(bucket, [self._access_key])
        try:
            current_policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucketPolicy":
                raise
            current_policy = None
        if current_policy != wanted_policy:
            s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(wanted_policy))
            result.policy_updated = True

        wanted_cors = cors_rules(cors_origins)
        try:
            current_cors = s3.get_bucket_cors(Bucket=bucket).get("CORSRules", [])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchCORSConfiguration":
                raise
            current_cors = []
        if _normalize_cors(current_cors) != _normalize_cors(wanted_cors):
            s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": wanted_cors})
            result.cors_updated = True
        return result

    async def delete(self, bucket: str) -> bool:
        """Empty and delete the bucket; ``False`` if it did not exist."""
        return bool(await self._call(self._delete, bucket))

    def _delete(self, bucket: str) -> bool:
        s3 = self._client
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise
        for _ in range(_MAX_DELETE_BATCHES):
            listing = s3.list_objects_v2(Bucket=bucket, MaxKeys=1000)
            keys = [{"Key": o["Key"]} for o in listing.get("Contents", [])]
            if not keys:
                break
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for upload in uploads:
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        s3.delete_bucket(Bucket=bucket)
        return True
