"""The WebSocket protocol: frames, payload models, validation and close codes.

Pure data and validation, no I/O: the gateway parses a frame with
:func:`parse_frame`, validates its payload with :func:`parse_payload`, and
renders replies with :func:`ack_ok` / :func:`ack_error` / :func:`event`.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from imhub.runtime import errors

__all__ = [
    "CLIENT_EVENTS",
    "AuthorizePayload",
    "CloseCode",
    "Frame",
    "MarkReadPayload",
    "PingPayload",
    "RtcSignalPayload",
    "SendMessagePayload",
    "ack_error",
    "ack_ok",
    "content_size",
    "encode",
    "event",
    "parse_frame",
    "parse_payload",
    "validate_content",
]


class CloseCode(enum.IntEnum):
    """WebSocket close codes the gateway uses (documented in the README)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    TOO_BIG = 1009  # a frame over max_frame_bytes
    IDLE_TIMEOUT = 4000  # nothing received for idle_timeout_seconds
    AUTH_FAILED = 4001  # authorize refused, or the token expired during the session
    AUTH_TIMEOUT = 4002  # no authorize within auth_timeout_seconds
    TOO_MANY_CONNECTIONS = 4003  # the user has max_connections_per_user open already
    ABUSE = 4008  # kept exceeding the rate limit after being told
    SLOW_CONSUMER = 4009  # the client does not read; its send queue overflowed


Id = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]


class _Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class AuthorizePayload(_Payload):
    token: Annotated[StrictStr, Field(min_length=1, max_length=8192)]


MessageType = Literal["text", "image", "file", "audio", "video", "system"]


class SendMessagePayload(_Payload):
    conv_id: Id
    client_msg_id: Id
    type: MessageType
    content: dict[str, Any]


class MarkReadPayload(_Payload):
    conv_id: Id
    last_read_seq: Annotated[StrictInt, Field(ge=0, le=2**62)]


class RtcSignalPayload(_Payload):
    """A WebRTC signal; SDP and candidates pass through to the callee untouched.

    ``call_id`` names the call: an ``offer`` without one starts a new call and
    its ack carries the id; later signals of that call may omit it (the
    pair's current call is used)."""

    conv_id: Id
    to_user_id: Id
    type: Literal["offer", "answer", "ice-candidate", "hangup"]
    call_id: Id | None = None
    sdp: Annotated[StrictStr, Field(max_length=64 * 1024)] | None = None
    candidate: (
        Annotated[StrictStr, Field(max_length=4096)]
        | Annotated[dict[str, str | int | None], Field(max_length=16)]
        | None
    ) = None
    reason: Annotated[StrictStr, Field(max_length=200)] | None = None
    media: Annotated[list[Literal["audio", "video", "screen"]], Field(max_length=3)] | None = None

    def body(self) -> dict[str, Any]:
        """The signal fields forwarded to the callee."""
        return self.model_dump(include={"sdp", "candidate", "reason", "media"}, exclude_none=True)


class PingPayload(_Payload):
    pass


CLIENT_EVENTS: dict[str, type[BaseModel]] = {
    "authorize": AuthorizePayload,
    "send_message": SendMessagePayload,
    "mark_read": MarkReadPayload,
    "rtc_signal": RtcSignalPayload,
    "ping": PingPayload,
}


class Frame(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    event: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    payload: dict[str, Any] = Field(default_factory=dict)
    ack_id: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "frame"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_frame(raw: str | bytes) -> tuple[Frame | None, str | None, errors.ImhubError | None]:
    """Parse one text frame.

    Returns ``(frame, ack_id, error)``. When the frame is broken, ``frame`` is
    ``None`` and ``ack_id`` is whatever could be salvaged, so the error can
    still be acknowledged to the right request.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits; the stdlib parser takes them,
        # which at least lets the error reach the right ack_id.
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            return None, None, errors.InvalidPayload("frame is not valid JSON")
        salvaged = doc.get("ack_id") if isinstance(doc, dict) else None
        ack_id = salvaged if isinstance(salvaged, str) and 0 < len(salvaged) <= 128 else None
        return None, ack_id, errors.InvalidPayload("numbers must fit in 64 bits")
    salvaged = doc.get("ack_id") if isinstance(doc, dict) else None
    ack_id = salvaged if isinstance(salvaged, str) and 0 < len(salvaged) <= 128 else None
    if not isinstance(doc, dict):
        return None, None, errors.InvalidPayload("frame must be a JSON object")
    try:
        frame = Frame.model_validate(doc)
    except ValidationError as exc:
        return None, ack_id, errors.InvalidPayload(f"bad frame: {_describe(exc)}")
    return frame, frame.ack_id, None


def parse_payload(frame: Frame) -> BaseModel:
    """Validate the payload of a known event, or raise :class:`InvalidPayload`."""
    model = CLIENT_EVENTS.get(frame.event)
    if model is None:
        raise errors.InvalidPayload(f"unknown event {frame.event!r}")
    try:
        return model.model_validate(frame.payload)
    except ValidationError as exc:
        raise errors.InvalidPayload(f"bad {frame.event} payload: {_describe(exc)}") from None


# -- message content ----------------------------------------------------------

_NonNeg = Annotated[StrictInt, Field(ge=0, le=2**53)]


class _Content(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Media(_Content):
    url: Annotated[StrictStr, Field(max_length=2048, pattern=r"^https?://")] | None = None
    key: Annotated[StrictStr, Field(min_length=1, max_length=512)] | None = None
    size: _NonNeg | None = None
    mime_type: Annotated[StrictStr, Field(max_length=128)] | None = None

    @model_validator(mode="after")
    def _one_location(self) -> _Media:
        if (self.url is None) == (self.key is None):
            raise ValueError("exactly one of 'url' or 'key' is required")
        return self


class TextContent(_Content):
    text: Annotated[StrictStr, Field(min_length=1)]


class ImageContent(_Media):
    width: _NonNeg | None = None
    height: _NonNeg | None = None


class FileContent(_Media):
    fileName: Annotated[StrictStr, Field(min_length=1, max_length=255)]
    size: _NonNeg  # required for files


class AvContent(_Media):
    duration: Annotated[float, Field(ge=0, le=86400)] | None = None
    width: _NonNeg | None = None
    height: _NonNeg | None = None


class SystemContent(BaseModel):
    model_config = ConfigDict(extra="allow")

    event: StrictStr


_CONTENT_MODELS: dict[str, type[BaseModel]] = {
    "text": TextContent,
    "image": ImageContent,
    "file": FileContent,
    "audio": AvContent,
    "video": AvContent,
    "system": SystemContent,
}


def content_size(content: dict[str, Any]) -> int:
    return len(orjson.dumps(content))


def validate_content(
    msg_type: str, content: dict[str, Any], *, max_bytes: int, server_made: bool = False
) -> dict[str, Any]:
    """Check a message's content against its type and the tenant's size limit."""
    if msg_type == "system" and not server_made:
        raise errors.Forbidden("system messages are made by the server only")
    size = content_size(content)
    if size > max_bytes:
        raise errors.TooLarge(
            f"content is {size} bytes, the limit is {max_bytes}",
            details={"size": size, "limit": max_bytes},
        )
    model = _CONTENT_MODELS.get(msg_type)
    if model is None:
        raise errors.InvalidPayload(f"unknown message type {msg_type!r}")
    try:
        model.model_validate(content)
    except ValidationError as exc:
        raise errors.InvalidPayload(f"bad {msg_type} content: {_describe(exc)}") from None
    return content


# -- server frames ------------------------------------------------------------


def encode(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def event(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"event": name, "payload": payload}


def ack_ok(ack_id: str | None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return event("ack", {"for_ack_id": ack_id, "success": True, "data": data or {}})


def ack_error(ack_id: str | None, error: errors.ImhubError) -> dict[str, Any]:
    return event("ack", {"for_ack_id": ack_id, "success": False, "error": error.to_dict()})
