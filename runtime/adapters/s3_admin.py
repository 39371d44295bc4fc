"""S3 provisioning: one bucket per tenant, its policy and its CORS rules.

The operator calls these to reconcile a tenant's object storage, and the
runtime's :class:`~imhub.runtime.adapters.s3.S3MediaStore` uses
:func:`make_client` and :func:`ensure_bucket` from here. Every function is
synchronous (boto3 is) and idempotent; callers on an event loop run them in a
thread (``asyncio.to_thread``).

Each ``apply_*``/``ensure_*``/``delete_*`` function returns whether it changed
anything, so a reconcile loop can report drift it repaired. Failures are
raised as :class:`~imhub.runtime.errors.TemporaryError` (the server is down,
slow or answered 5xx: retry later) or
:class:`~imhub.runtime.errors.PermanentError` (access denied, a malformed
document, a bucket owned by someone else: retrying will not help until the
configuration changes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import boto3
import botocore.exceptions
from botocore.config import Config

from imhub.runtime import errors

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

__all__ = [
    "apply_bucket_policy",
    "apply_cors",
    "block_public_access",
    "bucket_exists",
    "delete_bucket",
    "ensure_bucket",
    "get_bucket_policy",
    "get_cors",
    "make_client",
    "tenant_bucket_policy",
]

logger = logging.getLogger(__name__)

# What the tenant's runtime needs, and nothing that changes the bucket's own
# configuration: a runtime credential that leaks cannot make the bucket
# public or delete it.
BUCKET_ACTIONS = ("s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads")
OBJECT_ACTIONS = (
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
)

_RETRYABLE_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})


def make_client(
    *,
    endpoint: str | None,
    access_key: str,
    secret_key: str,
    region: str = "us-east-1",
    connect_timeout: float = 3.0,
    read_timeout: float = 20.0,
    max_attempts: int = 3,
) -> S3Client:
    """An S3 client that signs with SigV4 and addresses buckets by path.

    Path-style addressing (``http://host:port/bucket/key``) works for a
    loopback or in-cluster endpoint without wildcard DNS. ``endpoint=None``
    means AWS itself. The client is thread-safe for calls; build it once.
    """
    if not access_key or not secret_key:
        raise ValueError("S3 access key and secret key are required")
    config = Config(
        signature_version="s3v4",
        region_name=region,
        s3={"addressing_style": "path"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    # A private session: boto3's default session is shared global state.
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


# -- errors ---------------------------------------------------------------------


def error_code(exc: botocore.exceptions.ClientError) -> str:
    """The S3 error code of a ClientError (``"NoSuchBucket"``, ``"403"``...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_transient(exc: Exception) -> bool:
    """Whether retrying the same call later may succeed."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return _status(exc) >= 500 or error_code(exc) in _RETRYABLE_CODES
    return isinstance(
        exc, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError
    )


def _raise(action: str, bucket: str, exc: Exception) -> NoReturn:
    if isinstance(exc, botocore.exceptions.ClientError):
        detail = f"{error_code(exc)}: {exc.response.get('Error', {}).get('Message', '')}"
    else:
        detail = str(exc)
    message = f"S3 {action} on bucket {bucket!r} failed ({detail})"
    if is_transient(exc):
        raise errors.TemporaryError(message, delay=5.0) from exc
    raise errors.PermanentError(message) from exc


_S3_ERRORS = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)


# -- buckets --------------------------------------------------------------------


def bucket_exists(client: S3Client, bucket: str) -> bool:
    """True if ``bucket`` exists and this client may use it, False if it does not exist."""
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in _MISSING_CODES:
            return False
        _raise("HeadBucket", bucket, exc)
    except botocore.exceptions.BotoCoreError as exc:
        _raise("HeadBucket", bucket, exc)
    return True


def ensure_bucket(client: S3Client, bucket: str) -> bool:
    """Create ``bucket`` unless it exists; return whether it was created.

    A bucket that exists but belongs to another account raises
    :class:`~imhub.runtime.errors.PermanentError`.
    """
    if bucket_exists(client, bucket):
        return False
    region = client.meta.region_name
    try:
        if region and region != "us-east-1":
            client.create_bucket(
                Bucket=bucket,
                CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
            )
        else:
            client.create_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) == "BucketAlreadyOwnedByYou":  # created concurrently
            return False
        _raise("CreateBucket", bucket, exc)
    except botocore.exceptions.BotoCoreError as exc:
        _raise("CreateBucket", bucket, exc)
    logger.info("created bucket %s", bucket)
    return True


def _delete_batch(client: S3Client, bucket: str, batch: list[ObjectIdentifierTypeDef]) -> int:
    if not batch:
        return 0
    result = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    failed = result.get("Errors", [])
    if failed:
        first = failed[0]
        raise errors.PermanentError(
            f"could not delete {len(failed)} objects from {bucket!r}, e.g. "
            f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
        )
    return len(batch)


def _empty_bucket(client: S3Client, bucket: str) -> int:
    """Abort unfinished uploads, then delete every version and object, page by page."""
    for uploads in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in uploads.get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
    deleted = 0
    try:
        for listing in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            entries: list[Any] = [*listing.get("Versions", []), *listing.get("DeleteMarkers", [])]
            # "null" versions are plain objects; the listing below deletes them.
            versions: list[ObjectIdentifierTypeDef] = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in entries
                if v.get("VersionId") not in (None, "", "null")
            ]
            deleted += _delete_batch(client, bucket, versions)
    except botocore.exceptions.ClientError as exc:
        # A server without versioning may not implement the version listing.
        if error_code(exc) != "NotImplemented":
            raise
    for objects in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys: list[ObjectIdentifierTypeDef] = [
            {"Key": o["Key"]} for o in objects.get("Contents", [])
        ]
        deleted += _delete_batch(client, bucket, keys)
    return deleted


def delete_bucket(client: S3Client, bucket: str, *, force: bool = True) -> bool:
    """Delete ``bucket``; return False if it did not exist.

    With ``force`` the objects, object versions and unfinished multipart
    uploads are deleted first; without it a non-empty bucket raises
    :class:`~imhub.runtime.errors.PermanentError` and nothing is deleted.
    """
    if not bucket_exists(client, bucket):
        return False
    try:
        if force:
            count = _empty_bucket(client, bucket)
            logger.info("emptied bucket %s (%d objects)", bucket, count)
        client.delete_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in _MISSING_CODES:
            return False
        _raise("DeleteBucket", bucket, exc)
    except botocore.exceptions.BotoCoreError as exc:
        _raise("DeleteBucket", bucket, exc)
    logger.info("deleted bucket %s", bucket)
    return True


# -- bucket policy --------------------------------------------------------------


def tenant_bucket_policy(bucket: str, principals: Sequence[str]) -> dict[str, Any]:
    """The default policy of a tenant bucket.

    It allows the tenant's runtime principals (access key ids on versitygw,
    IAM ARNs on AWS) to list the bucket and to read, write and delete objects
    in it, and grants nothing to anyone else, so anonymous requests are
    refused; only presigned URLs, which carry the runtime's signature, reach
    objects from outside. It deliberately leaves out bucket configuration
    (policy, CORS, ACL, deletion): those stay with the operator's admin
    credentials. A TLS-only condition (``aws:SecureTransport``) is not added
    because loopback and in-cluster endpoints speak plain HTTP.
    """
    if not principals or any(not p or p == "*" for p in principals):
        raise ValueError(f"tenant principals must be named accounts, got {list(principals)!r}")
    bucket_arn = f"arn:aws:s3:::{bucket}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ImhubTenantRuntimeBucket",
                "Effect": "Allow",
                "Principal": {"AWS": sorted(principals)},
                "Action": list(BUCKET_ACTIONS),
                "Resource": [bucket_arn],
            },
            {
                "Sid": "ImhubTenantRuntimeObjects",
                "Effect": "Allow",
                "Principal": {"AWS": sorted(principals)},
                "Action": list(OBJECT_ACTIONS),
                "Resource": [f"{bucket_arn}/*"],
            },
        ],
    }


def _grants_public(policy_doc: Mapping[str, Any]) -> bool:
    statements = policy_doc.get("Statement", [])
    if isinstance(statements, Mapping):
        statements = [statements]
    for statement in statements:
        if statement.get("Effect") != "Allow":
            continue
        principal = statement.get("Principal")
        if isinstance(principal, Mapping):
            principal = principal.get("AWS")
        names = [principal] if isinstance(principal, str) else list(principal or [])
        if "*" in names:
            return True
    return False


def get_bucket_policy(client: S3Client, bucket: str) -> dict[str, Any] | None:
    """The bucket's policy document, or None when it has none."""
    try:
        raw = client.get_bucket_policy(Bucket=bucket)["Policy"]
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) == "NoSuchBucketPolicy":
            return None
        _raise("GetBucketPolicy", bucket, exc)
    except botocore.exceptions.BotoCoreError as exc:
        _raise("GetBucketPolicy", bucket, exc)
    doc: dict[str, Any] = json.loads(raw)
    return doc


def apply_bucket_policy(
    client: S3Client,
    bucket: str,
    policy_doc: Mapping[str, Any],
    *,
    allow_public: bool = False,
) -> bool:
    """Make ``policy_doc`` the bucket's policy; return whether it changed.

    A document that allows everyone (``"Principal": "*"``) is refused with
    ``ValueError`` unless ``allow_public`` is set: tenant media is private and
    reached through presigned URLs only.
    """
    if _grants_public(policy_doc) and not allow_public:
        raise ValueError(f"policy for {bucket!r} grants public access")
    if get_bucket_policy(client, bucket) == dict(policy_doc):
        return False
    try:
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy_doc))
    except _S3_ERRORS as exc:
        _raise("PutBucketPolicy", bucket, exc)
    logger.info("applied policy to bucket %s", bucket)
    return True


def block_public_access(client: S3Client, bucket: str) -> bool:
    """Turn on all four S3 Block Public Access settings for the bucket.

    Returns False when the server does not implement the API (versitygw
    answers NotImplemented); the bucket policy from
    :func:`tenant_bucket_policy` keeps the bucket private either way.
    """
    try:
        client.put_public_access_block(
            Bucket=bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) == "NotImplemented":
            return False
        _raise("PutPublicAccessBlock", bucket, exc)
    except botocore.exceptions.BotoCoreError as exc:
        _raise("PutPublicAccessBlock", bucket, exc)
    return True


# -- CORS -----------------------------------------------------------------------


def cors_rules(allowed_origins: Sequence[str], *, max_age_seconds: int = 3600) -> list[Any]:
    """CORS rules that let browsers on ``allowed_origins`` upload and fetch media.

    POST (form upload with a presigned policy) and PUT (presigned PUT) are
    both allowed, so either upload ticket works from a browser; ``ETag`` is
    exposed for clients that check what they uploaded.
    """
    origins = [o.strip() for o in allowed_origins]
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"CORS origin must be '*' or start with http(s)://, got {origin!r}")
    if not origins:
        return []
    return [
        {
            "ID": "imhub-media",
            "AllowedOrigins": sorted(set(origins)),
            "AllowedMethods": ["GET", "HEAD", "POST", "PUT"],
            "AllowedHeaders": ["*"],
            "ExposeHeaders": ["ETag"],
            "MaxAgeSeconds": max_age_seconds,
        }
    ]


def _comparable(rules: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for rule in rules:
        out.append(
            {
                key: sorted(value) if isinstance(value, list) else value
                for key, value in rule.items()
                if key != "ID"
            }
        )
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


def get_cors(client: S3Client, bucket: str) -> list[dict[str, Any]]:
    """The bucket's CORS rules ([] when it has none)."""
    try:
        return [dict(rule) for rule in client.get_bucket_cors(Bucket=bucket)["CORSRules"]]
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) == "NoSuchCORSConfiguration":
            return []
        _raise("GetBucketCors", bucket, exc)
    except botocore.exceptions.BotoCoreError as exc:
        _raise("GetBucketCors", bucket, exc)


def apply_cors(
    client: S3Client,
    bucket: str,
    allowed_origins: Sequence[str],
    *,
    max_age_seconds: int = 3600,
) -> bool:
    """Make the bucket's CORS rules allow browser media traffic from ``allowed_origins``.

    An empty list removes the CORS configuration (browsers then cannot
    upload directly). Returns whether anything changed.
    """
    desired = cors_rules(allowed_origins, max_age_seconds=max_age_seconds)
    current = get_cors(client, bucket)
    if _comparable(current) == _comparable(desired):
        return False
    try:
        if desired:
            client.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": desired})
        else:
            client.delete_bucket_cors(Bucket=bucket)
    except _S3_ERRORS as exc:
        _raise("PutBucketCors", bucket, exc)
    logger.info("applied CORS to bucket %s: %s", bucket, allowed_origins)
    return True
