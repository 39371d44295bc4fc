"""What travels on the bus between gateways and services (internal, JSON).

Commands flow gateway -> service on ``im-messages`` and ``im-signaling``,
keyed by ``conv_id``. Events flow service -> gateways on ``im-events``. A
command that wants an answer carries ``reply = {instance, request_id}``: the
event that answers it names the same pair, and only that gateway acks.
"""

from __future__ import annotations

from typing import Any, TypedDict

import orjson

__all__ = ["Reply", "decode", "encode", "reply_error", "reply_ok"]


class Reply(TypedDict):
    instance: str
    request_id: str


def encode(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def decode(raw: bytes) -> dict[str, Any]:
    doc = orjson.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("envelope is not an object")
    return doc


def reply_ok(tenant_id: str, reply: Reply | None, data: dict[str, Any]) -> dict[str, Any]:
    return {"op": "reply", "tenant_id": tenant_id, "reply": reply, "ok": True, "data": data}


def reply_error(tenant_id: str, reply: Reply | None, error: dict[str, Any]) -> dict[str, Any]:
    return {"op": "reply", "tenant_id": tenant_id, "reply": reply, "ok": False, "error": error}
