"""Local connections, pending acks and the fan-out of ``im-events``.

The :class:`Hub` is the gateway's view of the bus: it submits commands with a
reply address, and it consumes every event of its tenants, pushing each one to
the local connections of the users it names and resolving the acks that wait
for it. Fan-out never awaits a socket: frames go to a per-connection queue,
drained by a writer task that exists only while there is something to send,
so idle connections cost no task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from imhub.runtime import envelopes, errors, observability, ports, protocol, tenants
from imhub.runtime.auth import Principal

__all__ = ["Connection", "Hub"]

logger = logging.getLogger(__name__)

_PRESENCE_TTL = 30.0


class Connection:
    __slots__ = (
        "_closer",
        "_closing",
        "_queue",
        "_queue_bytes_limit",
        "_queue_limit",
        "_queued_bytes",
        "_writer",
        "close_reason",
        "conn_id",
        "principal",
        "ws",
    )

    def __init__(
        self, ws: WebSocket, principal: Principal, *, queue_limit: int, queue_bytes: int = 1 << 22
    ) -> None:
        self.ws = ws
        self.principal = principal
        self.conn_id = uuid.uuid4().hex[:12]
        self._queue: collections.deque[str] = collections.deque()
        self._queue_limit = queue_limit
        self._queue_bytes_limit = queue_bytes
        self._queued_bytes = 0
        self.close_reason: str | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.principal.tenant_id, self.principal.user_id)

    def push(self, text: str) -> None:
        """Queue a frame; a client that stops reading is disconnected."""
        if self._closing:
            return
        if (
            len(self._queue) >= self._queue_limit
            or self._queued_bytes + len(text) > self._queue_bytes_limit
        ):
            self._discard()
            self.close_soon(protocol.CloseCode.SLOW_CONSUMER, "send queue overflow")
            return
        self._queue.append(text)
        self._queued_bytes += len(text)
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                text = self._queue.popleft()
                self._queued_bytes -= len(text)
                if self.ws.application_state != WebSocketState.CONNECTED:
                    self._discard()
                    break
                await self.ws.send_text(text)
        except Exception:  # noqa: BLE001 - any send failure: the reader sees the close
            self._discard()
        finally:
            self._writer = None

    def _discard(self) -> None:
        self._queue.clear()
        self._queued_bytes = 0

    def close_soon(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        self._closer = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.flush(1.0)
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    async def flush(self, timeout: float = 1.0) -> None:
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), timeout)


class _Pending:
    __slots__ = ("ack_id", "conn", "event", "started")

    def __init__(self, conn: Connection, ack_id: str | None, event: str) -> None:
        self.conn = conn
        self.ack_id = ack_id
        self.event = event
        self.started = time.monotonic()


class Hub:
    def __init__(
        self,
        *,
        instance_id: str,
        registry: tenants.TenantRegistry,
        bus: ports.Bus,
        cache: ports.Cache,
        ack_timeout: float = 10.0,
    ) -> None:
        self.instance_id = instance_id
        self._registry = registry
        self._bus = bus
        self._cache = cache
        self._ack_timeout = ack_timeout
        self._conns: dict[tuple[str, str], set[Connection]] = {}
        self._pending: dict[str, _Pending] = {}
        # Reply ids only need to be unique per gateway instance; a counter is
        # cheaper than uuid4 on the hot path, the prefix survives restarts.
        self._request_prefix = f"{uuid.uuid4().hex[:8]}-"
        self._request_ids = itertools.count(1)
        self.ready = asyncio.Event()

    # -- connections --------------------------------------------------------------

    def count(self, tenant_id: str, user_id: str) -> int:
        return len(self._conns.get((tenant_id, user_id), ()))

    def total(self) -> int:
        return sum(len(c) for c in self._conns.values())

    async def register(self, conn: Connection) -> None:
        self._conns.setdefault(conn.key, set()).add(conn)
        observability.CONNECTIONS.labels(conn.principal.tenant_id).inc()
        try:
            await self._cache.set_online(*conn.key, self.instance_id, _PRESENCE_TTL)
        except errors.ImhubError:
            logger.warning("presence update failed; heartbeat will retry")

    async def unregister(self, conn: Connection) -> None:
        conns = self._conns.get(conn.key)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        observability.CONNECTIONS.labels(conn.principal.tenant_id).dec()
        for rid in [rid for rid, p in self._pending.items() if p.conn is conn]:
            del self._pending[rid]
        if not conns:
            del self._conns[conn.key]
            try:
                await self._cache.set_offline(*conn.key, self.instance_id)
            except errors.ImhubError:
                logger.warning("presence removal failed; it expires on its own")

    # -- commands -----------------------------------------------------------------

    async def submit(
        self,
        conn: Connection,
        *,
        topic: str,
        key: str,
        command: dict[str, Any],
        ack_id: str | None,
        event: str,
    ) -> None:
        """Put a command on the bus; its ack is sent when the answering event arrives."""
        request_id = f"{self._request_prefix}{next(self._request_ids)}"
        command["reply"] = {"instance": self.instance_id, "request_id": request_id}
        self._pending[request_id] = _Pending(conn, ack_id, event)
        try:
            await self._bus.produce(topic, key, envelopes.encode(command))
        except errors.ImhubError as err:
            # Housekeeping may have timed the request out meanwhile: ack only once.
            if self._pending.pop(request_id, None) is not None:
                self.ack_error(conn, ack_id, event, err)

    def ack_ok(
        self, conn: Connection, ack_id: str | None, event: str, data: dict[str, Any]
    ) -> None:
        observability.ACKS.labels(event, "ok").inc()
        if ack_id is not None:
            conn.push(protocol.encode(protocol.ack_ok(ack_id, data)))

    def ack_error(
        self, conn: Connection, ack_id: str | None, event: str, err: errors.ImhubError
    ) -> None:
        observability.ACKS.labels(event, "error").inc()
        observability.ERRORS.labels(err.code.value).inc()
        conn.push(protocol.encode(protocol.ack_error(ack_id, err)))

    # -- events -------------------------------------------------------------------

    async def run_events(self, stop: asyncio.Event) -> None:
        topics = [t.names.topic_events for t in self._registry]
        await self._bus.ensure_topics(topics)
        consumer = self._bus.consumer(topics, f"imhub-gateway-{self.instance_id}", from_latest=True)
        self.ready.set()
        try:
            while not stop.is_set():
                try:
                    records = await consumer.poll(1000, 0.5)
                except errors.ImhubError as err:
                    logger.warning("event poll failed: %s", err)
                    await asyncio.sleep(0.5)
                    continue
                for rec in records:
                    try:
                        self.dispatch(envelopes.decode(rec.value))
                    except Exception:
                        logger.exception("failed to dispatch event at %s@%d", rec.topic, rec.offset)
        finally:
            await consumer.close()

    def dispatch(self, ev: dict[str, Any]) -> None:
        op = ev.get("op")
        tenant_id = ev.get("tenant_id")
        reply = ev.get("reply")
        pending = None
        if reply and reply.get("instance") == self.instance_id:
            pending = self._pending.pop(reply.get("request_id", ""), None)

        if op == "reply":
            if pending is not None:
                if ev.get("ok"):
                    self.ack_ok(pending.conn, pending.ack_id, pending.event, ev.get("data", {}))
                else:
                    err = errors.ImhubError.from_dict(ev.get("error", {}))
                    self.ack_error(pending.conn, pending.ack_id, pending.event, err)
            return

        if pending is not None:
            if op == "message_created":
                observability.SEND_ACK_SECONDS.observe(time.monotonic() - pending.started)
            self.ack_ok(pending.conn, pending.ack_id, pending.event, ev.get("ack", {}))

        if op == "message_created":
            frame = protocol.encode(protocol.event("message_created", ev["message"]))
            delivered = self._fan_out(tenant_id, ev.get("members", ()), frame, "message_created")
            sent_at = ev.get("sent_at")
            if delivered and isinstance(sent_at, int | float):
                observability.SEND_DELIVER_SECONDS.observe(max(0.0, time.time() - sent_at))
        elif op == "receipt_updated":
            frame = protocol.encode(protocol.event("receipt_updated", ev["receipt"]))
            self._fan_out(tenant_id, ev.get("members", ()), frame, "receipt_updated")
        elif op == "rtc_signal":
            frame = protocol.encode(protocol.event("rtc_signal", ev["signal"]))
            self._fan_out(tenant_id, (ev.get("to_user_id"),), frame, "rtc_signal")

    def _fan_out(self, tenant_id: Any, user_ids: Any, frame: str, event: str) -> int:
        sent = 0
        for uid in user_ids:
            for conn in self._conns.get((tenant_id, uid), ()):
                conn.push(frame)
                sent += 1
        if sent:
            observability.DELIVERIES.labels(event).inc(sent)
        return sent

    # -- housekeeping -------------------------------------------------------------

    async def run_housekeeping(
        self, stop: asyncio.Event, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Expire acks that never got an answer, and refresh presence."""
        last_presence = clock()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            now = clock()
            expired = [
                rid for rid, p in self._pending.items() if now - p.started > self._ack_timeout
            ]
            for rid in expired:
                p = self._pending.pop(rid)
                self.ack_error(
                    p.conn,
                    p.ack_id,
                    p.event,
                    errors.Unavailable(
                        "no answer from the service in time; retry with the same client_msg_id"
                    ),
                )
            if now - last_presence > _PRESENCE_TTL / 3:
                last_presence = now
                for tenant_id, user_id in list(self._conns):
                    try:
                        await self._cache.set_online(
                            tenant_id, user_id, self.instance_id, _PRESENCE_TTL
                        )
                    except errors.ImhubError:
                        logger.warning("presence heartbeat failed")
                        break

    async def close_all(self, code: int, reason: str) -> None:
        conns = [c for group in self._conns.values() for c in group]
        for conn in conns:
            await conn.flush(0.5)
            conn.close_soon(code, reason)
        await asyncio.sleep(0)
