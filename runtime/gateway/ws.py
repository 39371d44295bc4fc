"""The WebSocket endpoint ``GET /v1/im/ws``: authorize, then serve frames.

Every client frame with an ``ack_id`` gets exactly one ``ack``: either right
here (validation, rate limit, ping) or when the service's answer comes back
through the :class:`~imhub.runtime.gateway.connections.Hub`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from imhub.runtime import auth, errors, observability, protocol, settings, tenants
from imhub.runtime.gateway import connections, limits

__all__ = ["serve_websocket"]

logger = logging.getLogger(__name__)

_STRIKES_BEFORE_CLOSE = 100


class _Closed(Exception):
    """The socket is gone; leave quietly."""


async def _receive(ws: WebSocket, timeout: float) -> str | bytes | None:
    """The next data frame, ``None`` on timeout; raise ``_Closed`` on disconnect."""
    try:
        # asyncio.timeout arms one timer; wait_for would also wrap a task per frame.
        async with asyncio.timeout(timeout):
            message = await ws.receive()
    except TimeoutError:
        return None
    except (WebSocketDisconnect, RuntimeError):
        raise _Closed() from None
    if message["type"] == "websocket.disconnect":
        raise _Closed()
    text = message.get("text")
    if text is not None:
        return str(text)
    return bytes(message.get("bytes") or b"")


async def _send_now(ws: WebSocket, frame: dict[str, Any]) -> None:
    text = protocol.encode(frame)  # outside the try: a bad frame is a bug, not a closed socket
    try:
        await ws.send_text(text)
    except Exception:  # noqa: BLE001 - any send failure means the socket is gone
        raise _Closed() from None


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    if ws.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await ws.close(code, reason)


async def serve_websocket(
    ws: WebSocket,
    *,
    hub: connections.Hub,
    verifier: auth.TokenVerifier,
    registry: tenants.TenantRegistry,
    config: settings.Settings,
) -> None:
    await ws.accept()
    try:
        authorized = await _authorize(ws, hub, verifier, registry, config)
        if authorized is None:
            return
        principal, tenant = authorized
        conn = connections.Connection(
            ws,
            principal,
            queue_limit=config.send_queue_limit,
            queue_bytes=config.send_queue_bytes,
        )
        observability.bind(tenant_id=principal.tenant_id, conn_id=conn.conn_id)
        await hub.register(conn)
        logger.info("ws connected", extra={"user_id": principal.user_id})
        reason = "client closed"
        try:
            reason = await _Session(conn, hub, tenant, config).run()
        finally:
            await hub.unregister(conn)
            logger.info("ws closed", extra={"reason": conn.close_reason or reason})
    except _Closed:
        return


# Before authorize a socket gets a small budget: enough for a client that
# retries, too little to make the server do work for free.
_UNAUTHORIZED_RATE = 5.0
_UNAUTHORIZED_BURST = 10


async def _authorize(
    ws: WebSocket,
    hub: connections.Hub,
    verifier: auth.TokenVerifier,
    registry: tenants.TenantRegistry,
    config: settings.Settings,
) -> tuple[auth.Principal, tenants.Tenant] | None:
    """Wait for a valid ``authorize``; anything else before it is answered, not served."""
    deadline = time.monotonic() + config.auth_timeout_seconds
    bucket = limits.TokenBucket(_UNAUTHORIZED_RATE, _UNAUTHORIZED_BURST)
    while True:
        remaining = deadline - time.monotonic()
        raw = await _receive(ws, max(remaining, 0.0)) if remaining > 0 else None
        if raw is None:
            await _close(ws, protocol.CloseCode.AUTH_TIMEOUT, "authorize timeout")
            return None
        if not bucket.take():
            await _close(ws, protocol.CloseCode.ABUSE, "too many frames before authorize")
            return None
        if isinstance(raw, bytes):
            await _send_now(
                ws,
                protocol.ack_error(
                    None,
                    errors.InvalidPayload("binary frames are not supported; send JSON text frames"),
                ),
            )
            continue
        frame, ack_id, err = protocol.parse_frame(raw)
        if frame is None:
            assert err is not None
            await _send_now(ws, protocol.ack_error(ack_id, err))
            continue
        if frame.event != "authorize":
            await _send_now(ws, protocol.ack_error(ack_id, errors.Unauthorized("authorize first")))
            continue
        try:
            payload = protocol.parse_payload(frame)
            assert isinstance(payload, protocol.AuthorizePayload)
            principal = verifier.verify(payload.token)
        except errors.InvalidPayload as exc:
            await _send_now(ws, protocol.ack_error(ack_id, exc))
            continue
        except errors.Unauthorized as exc:
            observability.ERRORS.labels(exc.code.value).inc()
            await _send_now(ws, protocol.ack_error(ack_id, exc))
            await _close(ws, protocol.CloseCode.AUTH_FAILED, exc.message[:100])
            return None
        tenant = registry.get(principal.tenant_id)
        assert tenant is not None  # the verifier only accepts configured tenants
        limit = tenant.limits.max_connections_per_user
        if hub.count(principal.tenant_id, principal.user_id) >= limit:
            err = errors.RateLimited(f"this user already has {limit} connections")
            observability.ERRORS.labels(err.code.value).inc()
            await _send_now(ws, protocol.ack_error(ack_id, err))
            await _close(ws, protocol.CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
            return None
        await _send_now(
            ws,
            protocol.ack_ok(
                ack_id,
                {
                    "tenant_id": principal.tenant_id,
                    "user_id": principal.user_id,
                    # Clamped so any accepted token renders as a JSON number.
                    "expires_at": min(int(principal.expires_at), 2**53),
                    "idle_timeout": config.idle_timeout_seconds,
                },
            ),
        )
        return principal, tenant


class _Session:
    def __init__(
        self,
        conn: connections.Connection,
        hub: connections.Hub,
        tenant: tenants.Tenant,
        config: settings.Settings,
    ) -> None:
        self.conn = conn
        self.hub = hub
        self.tenant = tenant
        self.config = config
        self.bucket = limits.TokenBucket(tenant.limits.rate_per_second, tenant.limits.rate_burst)
        self.names = tenant.names

    async def run(self) -> str:
        """Serve frames until the socket closes; return why the server closed it."""
        conn = self.conn
        while True:
            raw = await _receive(conn.ws, self.config.idle_timeout_seconds)
            if raw is None:
                await conn.flush()
                await _close(conn.ws, protocol.CloseCode.IDLE_TIMEOUT, "idle timeout")
                return "idle timeout"
            if time.time() > conn.principal.expires_at:
                self.hub.ack_error(conn, None, "session", errors.Unauthorized("token expired"))
                await conn.flush()
                await _close(conn.ws, protocol.CloseCode.AUTH_FAILED, "token expired")
                return "token expired"
            if not self.bucket.take():
                self.hub.ack_error(
                    conn,
                    _salvage_ack_id(raw),
                    "frame",
                    errors.RateLimited(
                        f"over {self.tenant.limits.rate_per_second:g} frames/s; slow down"
                    ),
                )
                if self.bucket.strikes > _STRIKES_BEFORE_CLOSE:
                    await conn.flush()
                    await _close(conn.ws, protocol.CloseCode.ABUSE, "rate limit abuse")
                    return "rate limit abuse"
                continue
            if isinstance(raw, bytes):
                self.hub.ack_error(
                    conn,
                    None,
                    "frame",
                    errors.InvalidPayload("binary frames are not supported; send JSON text frames"),
                )
                continue
            try:
                await self._frame(raw)
            except _Closed:
                raise
            except Exception:
                logger.exception("unexpected error handling a frame")
                self.hub.ack_error(
                    conn, _salvage_ack_id(raw), "frame", errors.Internal("internal error")
                )

    async def _frame(self, raw: str) -> None:
        conn, hub = self.conn, self.hub
        received_at = time.time()
        frame, ack_id, err = protocol.parse_frame(raw)
        if frame is None:
            assert err is not None
            hub.ack_error(conn, ack_id, "frame", err)
            return
        try:
            payload = protocol.parse_payload(frame)
        except errors.ImhubError as exc:
            hub.ack_error(conn, ack_id, frame.event, exc)
            return
        user = conn.principal.user_id
        tenant_id = conn.principal.tenant_id

        if isinstance(payload, protocol.PingPayload):
            conn.push(protocol.encode(protocol.event("pong", {})))
            hub.ack_ok(conn, ack_id, "ping", {})
        elif isinstance(payload, protocol.AuthorizePayload):
            hub.ack_error(conn, ack_id, "authorize", errors.Conflict("already authorized"))
        elif isinstance(payload, protocol.SendMessagePayload):
            try:
                protocol.validate_content(
                    payload.type, payload.content, max_bytes=self.tenant.limits.max_content_bytes
                )
            except errors.ImhubError as exc:
                hub.ack_error(conn, ack_id, "send_message", exc)
                return
            await hub.submit(
                conn,
                topic=self.names.topic_messages,
                key=payload.conv_id,
                ack_id=ack_id,
                event="send_message",
                command={
                    "op": "send",
                    "tenant_id": tenant_id,
                    "conv_id": payload.conv_id,
                    "sender_id": user,
                    "client_msg_id": payload.client_msg_id,
                    "type": payload.type,
                    "content": payload.content,
                    "sent_at": received_at,
                },
            )
        elif isinstance(payload, protocol.MarkReadPayload):
            await hub.submit(
                conn,
                topic=self.names.topic_messages,
                key=payload.conv_id,
                ack_id=ack_id,
                event="mark_read",
                command={
                    "op": "read",
                    "tenant_id": tenant_id,
                    "conv_id": payload.conv_id,
                    "user_id": user,
                    "seq": payload.last_read_seq,
                },
            )
        elif isinstance(payload, protocol.RtcSignalPayload):
            body = payload.body()
            await hub.submit(
                conn,
                topic=self.names.topic_signaling,
                key=payload.conv_id,
                ack_id=ack_id,
                event="rtc_signal",
                command={
                    "op": "signal",
                    "tenant_id": tenant_id,
                    "conv_id": payload.conv_id,
                    "from_user_id": user,
                    "to_user_id": payload.to_user_id,
                    "type": payload.type,
                    "call_id": payload.call_id,
                    "body": body,
                },
            )


def _salvage_ack_id(raw: str | bytes) -> str | None:
    if isinstance(raw, bytes):
        return None
    _, ack_id, _ = protocol.parse_frame(raw) if len(raw) < 65536 else (None, None, None)
    return ack_id
