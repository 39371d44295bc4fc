"""Routes that serve the embedded media store's signed URLs.

``PUT`` stores one object if the signature covers this key, content type,
size limit and expiry; ``GET`` serves it back. Anything tampered with or
expired answers 403 with a JSON error.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from imhub.runtime import errors, mediatypes
from imhub.runtime.adapters.media import LocalMediaStore
from imhub.runtime.gateway.rest import RuntimeDep

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


def _local(runtime: Any) -> LocalMediaStore:
    media = runtime.media
    if not isinstance(media, LocalMediaStore):
        raise errors.NotFound("local media is not enabled")
    return media


def _path(media: LocalMediaStore, key: str) -> Any:
    try:
        return media.path_for(key)
    except ValueError:
        raise errors.Forbidden("bad media key") from None


@router.put("/v1/media/local/{key:path}")
async def upload(
    key: str,
    request: Request,
    runtime: RuntimeDep,
    exp: Annotated[int | None, Query()] = None,
    ct: Annotated[str | None, Query()] = None,
    max: Annotated[int | None, Query()] = None,
    sig: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    media = _local(runtime)
    if exp is None or ct is None or max is None or sig is None:
        raise errors.Forbidden("not a signed upload URL")
    if not media.verify("put", key, exp, sig, ct, max):
        raise errors.Forbidden("signature invalid or URL expired")
    sent_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
    if sent_type != ct:
        raise errors.Forbidden(f"this URL accepts Content-Type {ct!r} only")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max:
        raise errors.TooLarge(f"this URL accepts at most {max} bytes")
    path = _path(media, key)
    if path.exists():
        raise errors.Conflict("this URL was used already")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each request writes its own temp file; linking it into place fails if the
    # object exists, so of two concurrent uploads with one URL exactly one wins.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    size = 0
    try:
        with tmp.open("wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max:
                    raise errors.TooLarge(f"this URL accepts at most {max} bytes")
                await asyncio.to_thread(fh.write, chunk)
        if size == 0:
            raise errors.InvalidPayload("empty upload")
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise errors.Conflict("this URL was used already") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"key": key, "size": size}


@router.get("/v1/media/local/{key:path}")
async def download(
    key: str,
    runtime: RuntimeDep,
    exp: Annotated[int | None, Query()] = None,
    sig: Annotated[str | None, Query()] = None,
) -> FileResponse:
    media = _local(runtime)
    if exp is None or sig is None or not media.verify("get", key, exp, sig):
        raise errors.Forbidden("signature invalid or URL expired")
    path = _path(media, key)
    if not path.is_file():
        raise errors.NotFound("no such object")
    tenant_id = key.split("/", 1)[0]
    obj = await runtime.store.get_media(tenant_id, key)
    media_type = obj.content_type if obj else "application/octet-stream"
    headers = {**mediatypes.SAFE_HEADERS, "Content-Disposition": mediatypes.disposition(media_type)}
    return FileResponse(path, media_type=media_type, headers=headers)
