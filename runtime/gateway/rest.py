"""REST routes under ``/v1``: conversations, history, media, ICE servers, tokens.

Every route that takes a user token derives tenant and user from the verified
token only. A conversation the caller is not a member of answers 404 just
like one that does not exist, so ids of other tenants or other people's
conversations reveal nothing.
"""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from imhub.runtime import auth, errors, mediatypes, models, observability, turn
from imhub.runtime.gateway import limits
from imhub.runtime.wiring import Runtime

__all__ = ["router"]

router = APIRouter()

_ID = r"^[A-Za-z0-9_.:@-]+$"
IdStr = Annotated[str, Field(min_length=1, max_length=64, pattern=_ID)]


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_principal(
    request: Request,
    runtime: RuntimeDep,
    authorization: Annotated[str | None, Header()] = None,
) -> auth.Principal:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise errors.Unauthorized("missing 'Authorization: Bearer <token>'")
    principal = runtime.verifier.verify(authorization[7:].strip())
    # Read back by the access-log middleware, so its line names the tenant.
    request.state.tenant_id = principal.tenant_id
    observability.bind(tenant_id=principal.tenant_id)
    return principal


PrincipalDep = Annotated[auth.Principal, Depends(get_principal)]


# -- rendering --------------------------------------------------------------------


def _member(m: models.Member) -> dict[str, Any]:
    return {
        "user_id": m.user_id,
        "role": m.role,
        "last_read_seq": m.last_read_seq,
        "joined_at": m.joined_at.isoformat(),
    }


def _conversation(conv: models.Conversation, me: str, unread: int | None = None) -> dict[str, Any]:
    mine = conv.member(me)
    return {
        "conv_id": conv.conv_id,
        "type": conv.type,
        "name": conv.name,
        "created_by": conv.created_by,
        "created_at": conv.created_at.isoformat(),
        "last_seq": conv.last_seq,
        "members": [_member(m) for m in conv.members],
        "last_read_seq": mine.last_read_seq if mine else 0,
        "unread_count": unread,
        "last_message": conv.last_message.to_wire() if conv.last_message else None,
    }


async def _visible(
    runtime: Runtime, principal: auth.Principal, conv_id: str
) -> models.Conversation:
    conv = await runtime.store.get_conversation(principal.tenant_id, conv_id)
    if conv is None or conv.member(principal.user_id) is None:
        raise errors.NotFound("conversation not found")
    return conv


# -- conversations ----------------------------------------------------------------


class CreateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["direct", "group"]
    member_ids: list[IdStr] = Field(min_length=1, max_length=100_000)
    name: (
        Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")] | None
    ) = None


@router.post("/v1/im/conversations", status_code=200, tags=["conversations"])
async def create_conversation(
    body: CreateConversation, runtime: RuntimeDep, principal: PrincipalDep
) -> dict[str, Any]:
    me = principal.user_id
    tenant = runtime.tenant(principal.tenant_id)
    others = [u for u in dict.fromkeys(body.member_ids) if u != me]
    direct_key = None
    if body.type == "direct":
        if len(others) != 1:
            raise errors.InvalidPayload("a direct conversation has exactly one other member")
        if body.name is not None:
            raise errors.InvalidPayload("direct conversations have no name")
        direct_key = "\n".join(sorted((me, others[0])))
    elif len(others) + 1 > tenant.limits.max_group_members:
        raise errors.TooLarge(f"a group has at most {tenant.limits.max_group_members} members")
    conv, created = await runtime.store.create_conversation(
        principal.tenant_id,
        conv_type=body.type,
        member_ids=[me, *others],
        created_by=me,
        name=body.name,
        direct_key=direct_key,
    )
    return {**_conversation(conv, me, 0), "created": created}


def _encode_cursor(conv: models.Conversation) -> str:
    raw = f"{conv.last_activity_at.isoformat()}|{conv.conv_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, conv_id = raw.split("|", 1)
        return datetime.fromisoformat(stamp), conv_id
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidPayload("bad cursor") from None


@router.get("/v1/im/conversations", tags=["conversations"])
async def list_conversations(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    before = _decode_cursor(cursor) if cursor else None
    rows = await runtime.store.list_conversations(
        principal.tenant_id, principal.user_id, before=before, limit=limit + 1
    )
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = _encode_cursor(page[-1][0])
    return {
        "items": [_conversation(conv, principal.user_id, unread) for conv, unread in page],
        "next_cursor": next_cursor,
    }


@router.get("/v1/im/conversations/{conv_id}", tags=["conversations"])
async def get_conversation(
    conv_id: str, runtime: RuntimeDep, principal: PrincipalDep
) -> dict[str, Any]:
    conv = await _visible(runtime, principal, conv_id)
    unread = await runtime.store.unread_count(principal.tenant_id, conv_id, principal.user_id)
    return _conversation(conv, principal.user_id, unread)


class AddMembers(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    user_ids: list[IdStr] = Field(min_length=1, max_length=1000)


@router.post("/v1/im/conversations/{conv_id}/members", tags=["conversations"])
async def add_members(
    conv_id: str, body: AddMembers, runtime: RuntimeDep, principal: PrincipalDep
) -> dict[str, Any]:
    conv = await _visible(runtime, principal, conv_id)
    if conv.type != "group":
        raise errors.Forbidden("members of a direct conversation cannot change")
    tenant = runtime.tenant(principal.tenant_id)
    new = [u for u in dict.fromkeys(body.user_ids) if conv.member(u) is None]
    if len(conv.members) + len(new) > tenant.limits.max_group_members:
        raise errors.TooLarge(f"a group has at most {tenant.limits.max_group_members} members")
    added = await runtime.store.add_members(principal.tenant_id, conv_id, new)
    conv = await _visible(runtime, principal, conv_id)
    unread = await runtime.store.unread_count(principal.tenant_id, conv_id, principal.user_id)
    return {**_conversation(conv, principal.user_id, unread), "added": added}


@router.delete("/v1/im/conversations/{conv_id}/members/{user_id}", tags=["conversations"])
async def remove_member(
    conv_id: str, user_id: str, runtime: RuntimeDep, principal: PrincipalDep
) -> dict[str, Any]:
    conv = await _visible(runtime, principal, conv_id)
    if conv.type != "group":
        raise errors.Forbidden("members of a direct conversation cannot change")
    me = conv.member(principal.user_id)
    assert me is not None
    # Anyone may leave; only the owner removes others.
    if user_id != principal.user_id and me.role != "owner":
        raise errors.Forbidden("only the owner can remove other members")
    if conv.member(user_id) is None:
        raise errors.NotFound("no such member")
    await runtime.store.remove_member(principal.tenant_id, conv_id, user_id)
    return {"conv_id": conv_id, "removed": user_id}


# -- messages ---------------------------------------------------------------------


@router.get("/v1/im/messages", tags=["messages"])
async def history(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    conv_id: Annotated[str, Query(min_length=1, max_length=64)],
    before_seq: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    after_seq: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict[str, Any]:
    await _visible(runtime, principal, conv_id)
    items = await runtime.store.history(
        principal.tenant_id, conv_id, before_seq=before_seq, after_seq=after_seq, limit=limit
    )
    return {"items": [m.to_wire() for m in items], "has_more": len(items) == limit}


# -- media ------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(file_name: str) -> str:
    """An ASCII object-key segment that keeps the extension: ``фото 🐱.png`` -> ``file.png``."""
    stem, dot, ext = file_name.rpartition(".")
    if not dot:
        stem, ext = file_name, ""
    stem = _SAFE_NAME.sub("_", stem).strip("._-")[:100] or "file"
    ext = _SAFE_NAME.sub("", ext)[:16].lower()
    return f"{stem}.{ext}" if ext else stem


class UploadTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    conv_id: IdStr
    file_name: Annotated[str, Field(min_length=1, max_length=255)]
    content_type: Annotated[
        str, Field(min_length=3, max_length=128, pattern=r"^[\w.+-]+/[\w.+-]+$")
    ]
    size: Annotated[int, Field(gt=0)]


def _absolute(request: Request, url: str) -> str:
    """Media URLs relative to the gateway become absolute with the address the
    client reached us by (the embedded store without ``public_url``)."""
    if url.startswith("/"):
        return str(request.base_url).rstrip("/") + url
    return url


@router.post("/v1/im/media/upload-token", tags=["media"])
async def upload_token(
    body: UploadTokenRequest, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> dict[str, Any]:
    tenant = runtime.tenant(principal.tenant_id)
    await _visible(runtime, principal, body.conv_id)
    if body.size > tenant.limits.max_upload_bytes:
        raise errors.TooLarge(
            f"file is {body.size} bytes, the limit is {tenant.limits.max_upload_bytes}",
            details={"limit": tenant.limits.max_upload_bytes},
        )
    content_type = mediatypes.normalize(body.content_type)
    if not tenant.limits.content_type_allowed(content_type):
        raise errors.InvalidPayload(f"content type {body.content_type!r} is not allowed")
    name = _safe_name(body.file_name)
    key = f"{tenant.names.object_prefix}{body.conv_id}/{uuid.uuid4().hex}/{name}"
    ttl = runtime.config.media_url_ttl_seconds
    ticket = await runtime.media.presign_upload(
        principal.tenant_id, key, content_type=content_type, size=body.size, expires_in=ttl
    )
    upload_url = _absolute(request, ticket.url)
    await runtime.store.record_media(
        principal.tenant_id,
        models.MediaObject(
            key=key,
            conv_id=body.conv_id,
            uploader_id=principal.user_id,
            content_type=content_type,
            size=body.size,
            created_at=datetime.now(UTC),
        ),
    )
    return {
        "key": key,
        "method": ticket.method,
        "url": upload_url,
        "fields": ticket.fields,
        "headers": ticket.headers,
        "max_size": body.size,
        "expires_at": ticket.expires_at.isoformat(),
    }


@router.get("/v1/im/media/download-url", tags=["media"])
async def download_url(
    request: Request,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    key: Annotated[str, Query(min_length=1, max_length=512)],
) -> dict[str, Any]:
    obj = await runtime.store.get_media(principal.tenant_id, key)
    conv = await runtime.store.get_conversation(principal.tenant_id, obj.conv_id) if obj else None
    # One answer for "no such key" and "not yours": a key's existence is not leaked.
    if obj is None or conv is None or conv.member(principal.user_id) is None:
        raise errors.NotFound("no such media")
    ttl = runtime.config.media_url_ttl_seconds
    url = await runtime.media.presign_download(
        principal.tenant_id, key, expires_in=ttl, content_type=obj.content_type
    )
    return {
        "key": key,
        "url": _absolute(request, url),
        "content_type": obj.content_type,
        "expires_in": ttl,
    }


# -- RTC --------------------------------------------------------------------------


@router.get("/v1/im/rtc/ice-servers", tags=["rtc"])
async def ice_servers(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    tenant = runtime.tenant(principal.tenant_id)
    return turn.ice_servers(
        tenant_id=tenant.tenant_id,
        user_id=principal.user_id,
        stun_urls=runtime.config.stun_urls,
        turn_urls=runtime.config.turn_urls,
        turn_secret=tenant.turn_secret,
        ttl=runtime.config.turn_ttl_seconds,
    )


# -- tokens for tenant backends ---------------------------------------------------


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenant_id: Annotated[str, Field(min_length=1, max_length=64)]
    user_id: IdStr
    ttl: Annotated[int, Field(ge=60, le=30 * 86400)] = 3600


_FAILED_KEYS: dict[str, limits.TokenBucket] = {}


def _failed_key_budget(request: Request) -> limits.TokenBucket:
    """Failed API-key attempts per client address: a burst of 20, then 1 per second."""
    host = request.client.host if request.client else "?"
    bucket = _FAILED_KEYS.get(host)
    if bucket is None:
        if len(_FAILED_KEYS) > 10_000:
            _FAILED_KEYS.clear()
        bucket = _FAILED_KEYS[host] = limits.TokenBucket(1.0, 20)
    return bucket


@router.post("/v1/auth/token", tags=["auth"])
async def issue_token(
    body: TokenRequest,
    request: Request,
    runtime: RuntimeDep,
    x_api_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    tenant = runtime.registry.get(body.tenant_id)
    # One answer for "no such tenant" and "wrong key": the id alone proves nothing.
    if tenant is None or not x_api_key or not tenant.api_key_matches(x_api_key):
        if not _failed_key_budget(request).take():
            raise errors.RateLimited("too many failed API key attempts; slow down")
        raise errors.Unauthorized("invalid tenant or API key")
    token, exp = auth.mint_token(tenant, body.user_id, ttl=body.ttl)
    return {"token": token, "token_type": "Bearer", "expires_at": exp}
