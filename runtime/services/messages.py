"""The message service: dedupe, seq, persistence, read points, events.

Consumes ``im-messages`` (keyed by conv_id, so one conversation's commands
arrive in order on one partition) and, per batch and conversation:

1. loads the members once and rejects commands from non-members;
2. answers retries of an already stored ``client_msg_id`` with the stored
   message (nothing new is written);
3. reserves a block of seqs from the cache and stores the new messages in one
   transaction, which also moves each sender's read point;
4. only then emits ``message_created`` / ``receipt_updated`` to ``im-events``,
   which is how the sender's gateway learns the message is durable.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from imhub.runtime import envelopes, errors, models, observability, ports, protocol, tenants
from imhub.runtime.services import worker

__all__ = ["SYSTEM_SENDER", "MessageService"]

logger = logging.getLogger(__name__)

SYSTEM_SENDER = "system"
_CONFLICT_RETRIES = 3


class MessageService:
    def __init__(
        self,
        *,
        registry: tenants.TenantRegistry,
        store: ports.Store,
        cache: ports.Cache,
        bus: ports.Bus,
        notifier: Any | None = None,
        batch: int = 500,
    ) -> None:
        self._registry = registry
        self._store = store
        self._cache = cache
        self._bus = bus
        self._notifier = notifier
        self._batch = batch

    async def run(self, stop: asyncio.Event, *, group: str = "imhub-message-service") -> None:
        topics = [t.names.topic_messages for t in self._registry]
        await self._bus.ensure_topics(topics + [t.names.topic_events for t in self._registry])
        consumer = self._bus.consumer(topics, group)
        await worker.run_consumer(
            consumer, self.handle, name="message-service", stop=stop, batch=self._batch
        )

    # -- batch handling -----------------------------------------------------------

    async def handle(self, records: Sequence[ports.Record]) -> None:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rec in records:
            cmd = self._decode(rec)
            if cmd is not None:
                groups.setdefault((cmd["tenant_id"], cmd["conv_id"]), []).append(cmd)

        # Conversations are independent: process them concurrently, each in order.
        results = await asyncio.gather(
            *(self._conversation(tid, cid, cmds) for (tid, cid), cmds in groups.items())
        )
        events = [ev for group_events in results for ev in group_events]
        await asyncio.gather(*(self._emit(ev) for ev in events))

    def _decode(self, rec: ports.Record) -> dict[str, Any] | None:
        try:
            cmd = envelopes.decode(rec.value)
            tenant = self._registry.get(cmd.get("tenant_id", ""))
            # A record only speaks for the tenant whose topic it is on.
            if tenant is None or rec.topic != tenant.names.topic_messages:
                raise ValueError("tenant does not match topic")
            if cmd.get("op") not in ("send", "read") or not isinstance(cmd.get("conv_id"), str):
                raise ValueError(f"unknown op {cmd.get('op')!r}")
        except (ValueError, TypeError) as exc:
            logger.error(
                "dropping malformed record %s/%d@%d: %s", rec.topic, rec.partition, rec.offset, exc
            )
            return None
        return cmd

    async def _emit(self, event: dict[str, Any]) -> None:
        tenant = self._registry.get(event["tenant_id"])
        assert tenant is not None
        await self._bus.produce(
            tenant.names.topic_events, event.get("conv_id", ""), envelopes.encode(event)
        )

    async def _conversation(
        self, tenant_id: str, conv_id: str, cmds: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        with observability.log_context(tenant_id=tenant_id, conv_id=conv_id):
            members = {m.user_id for m in await self._store.members(tenant_id, conv_id)}
            events: list[dict[str, Any]] = []
            sends: list[dict[str, Any]] = []
            # Keep commands in order: a read after a send must see the send stored.
            for cmd in cmds:
                if cmd["op"] == "send":
                    sends.append(cmd)
                    continue
                if sends:
                    events += await self._sends(tenant_id, conv_id, members, sends)
                    sends = []
                events += await self._read(tenant_id, conv_id, members, cmd)
            if sends:
                events += await self._sends(tenant_id, conv_id, members, sends)
            return events

    # -- send ---------------------------------------------------------------------

    async def _sends(
        self, tenant_id: str, conv_id: str, members: set[str], cmds: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        tenant = self._registry.get(tenant_id)
        assert tenant is not None
        events: list[dict[str, Any]] = []
        accepted: list[dict[str, Any]] = []
        for cmd in cmds:
            try:
                self._check_send(tenant, members, cmd)
            except errors.ImhubError as err:
                events.append(envelopes.reply_error(tenant_id, cmd.get("reply"), err.to_dict()))
                continue
            accepted.append(cmd)
        if not accepted:
            return events

        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                stored, fresh = await self._store_new(tenant_id, conv_id, accepted)
                break
            except errors.Conflict:
                # The counter was behind the table (a cache flush raced a write,
                # or another consumer held this partition): move it past the
                # stored maximum and try again; dedupe runs again too.
                if attempt == _CONFLICT_RETRIES:
                    raise errors.TemporaryError("seq conflict persisted") from None
                top = await self._store.max_seq(tenant_id, conv_id)
                await self._cache.reset_seq(tenant_id, conv_id, top)
                logger.warning("seq conflict, counter moved to %d", top)

        member_list = sorted(members)
        fresh_ids = {id(cmd) for cmd in fresh}
        for cmd in accepted:
            msg = stored[(cmd["sender_id"], cmd["client_msg_id"])]
            is_new = id(cmd) in fresh_ids
            data = {"msg_id": msg.msg_id, "seq": msg.seq, "created_at": msg.created_at.isoformat()}
            if is_new:
                observability.MESSAGES.labels(tenant_id).inc()
                events.append(
                    {
                        "op": "message_created",
                        "tenant_id": tenant_id,
                        "conv_id": conv_id,
                        "members": member_list,
                        "message": msg.to_wire(),
                        "reply": cmd.get("reply"),
                        "ack": data,
                        "sent_at": cmd.get("sent_at"),
                    }
                )
            else:
                events.append(envelopes.reply_ok(tenant_id, cmd.get("reply"), data))
        if self._notifier is not None and fresh:
            await self._notifier.offline(
                tenant_id,
                conv_id,
                member_list,
                [stored[(c["sender_id"], c["client_msg_id"])] for c in fresh],
            )
        return events

    @staticmethod
    def _check_send(tenant: tenants.Tenant, members: set[str], cmd: dict[str, Any]) -> None:
        server_made = bool(cmd.get("server_made"))
        if not server_made and cmd.get("sender_id") not in members:
            raise errors.NotFound("conversation not found")
        content = cmd.get("content")
        protocol.validate_content(
            str(cmd.get("type")),
            content if isinstance(content, dict) else {},
            max_bytes=tenant.limits.max_content_bytes,
            server_made=server_made,
        )

    async def _store_new(
        self, tenant_id: str, conv_id: str, cmds: list[dict[str, Any]]
    ) -> tuple[dict[tuple[str, str], models.Message], list[dict[str, Any]]]:
        """Store what is new; return every command's message and the new commands."""
        keys = [(c["sender_id"], c["client_msg_id"]) for c in cmds]
        stored = await self._store.find_by_client_ids(tenant_id, conv_id, keys)
        fresh: list[dict[str, Any]] = []
        seen = set(stored)
        for cmd, key in zip(cmds, keys, strict=True):
            if key not in seen:  # also dedupes a retry inside the same batch
                seen.add(key)
                fresh.append(cmd)
        if not fresh:
            return stored, []

        first = await self._cache.allocate_seq(
            tenant_id, conv_id, len(fresh), lambda: self._store.max_seq(tenant_id, conv_id)
        )
        now = datetime.now(UTC)
        rows = [
            models.NewMessage(
                msg_id=uuid.uuid4().hex,
                seq=first + i,
                sender_id=cmd["sender_id"],
                type=cmd["type"],
                content=cmd["content"],
                client_msg_id=cmd["client_msg_id"],
                created_at=now,
            )
            for i, cmd in enumerate(fresh)
        ]
        try:
            await self._store.insert_messages(tenant_id, conv_id, rows)
        except errors.Unavailable:
            # Hand the block back so an outage leaves no hole in the seq order.
            await self._cache.release_seq(tenant_id, conv_id, first, len(rows))
            raise
        for row in rows:
            stored[(row.sender_id, row.client_msg_id)] = models.Message(
                msg_id=row.msg_id,
                conv_id=conv_id,
                seq=row.seq,
                sender_id=row.sender_id,
                type=row.type,
                content=row.content,
                client_msg_id=row.client_msg_id,
                created_at=row.created_at,
            )
        return stored, fresh

    # -- read ---------------------------------------------------------------------

    async def _read(
        self, tenant_id: str, conv_id: str, members: set[str], cmd: dict[str, Any]
    ) -> list[dict[str, Any]]:
        user_id, reply = cmd.get("user_id"), cmd.get("reply")
        if user_id not in members:
            return [
                envelopes.reply_error(
                    tenant_id, reply, errors.NotFound("conversation not found").to_dict()
                )
            ]
        value, moved = await self._store.mark_read(
            tenant_id, conv_id, str(user_id), int(cmd.get("seq", 0))
        )
        data = {"conv_id": conv_id, "last_read_seq": value}
        if not moved:
            return [envelopes.reply_ok(tenant_id, reply, data)]
        return [
            {
                "op": "receipt_updated",
                "tenant_id": tenant_id,
                "conv_id": conv_id,
                "members": sorted(members),
                "receipt": {"conv_id": conv_id, "user_id": user_id, "last_read_seq": value},
                "reply": reply,
                "ack": data,
            }
        ]
