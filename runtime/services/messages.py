"""The message service: dedupe, seq, persistence, read points, events.

Consumes ``im-messages`` (keyed by conv_id, so one conversation's commands
arrive in order on one partition). For each batch and tenant it:

1. loads the members of every conversation in the batch at once and rejects
   commands from non-members;
2. answers retries of an already stored ``client_msg_id`` with the stored
   message (nothing new is written);
3. reserves a block of seqs per conversation from the cache and stores all new
   messages in one transaction, which also moves each sender's read point;
4. only then emits ``message_created`` / ``receipt_updated`` to ``im-events``,
   which is how the sender's gateway learns the message is durable.

Read marks in the same batch are applied after its sends: they name their
seq explicitly and are clamped to the stored maximum, so the order between a
conversation's sends and reads inside one batch does not change the result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from imhub.runtime import envelopes, errors, models, observability, ports, protocol, tenants
from imhub.runtime.services import push, worker

__all__ = ["SYSTEM_SENDER", "MessageService"]

logger = logging.getLogger(__name__)

SYSTEM_SENDER = "system"
_CONFLICT_RETRIES = 3

Key = tuple[str, str, str]  # (conv_id, sender_id, client_msg_id)


def _new_msg_id() -> str:
    """A random 128-bit id. Ids are not secrets, so the process PRNG serves, and
    saves the system call uuid4 makes per message on the hot path."""
    return f"{random.getrandbits(128):032x}"


def _key(cmd: dict[str, Any]) -> Key:
    return (cmd["conv_id"], cmd["sender_id"], cmd["client_msg_id"])


class MessageService:
    def __init__(
        self,
        *,
        registry: tenants.TenantRegistry,
        store: ports.Store,
        cache: ports.Cache,
        bus: ports.Bus,
        notifier: push.OfflinePush | None = None,
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
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for rec in records:
            cmd = self._decode(rec)
            if cmd is not None:
                by_tenant.setdefault(cmd["tenant_id"], []).append(cmd)
        events: list[dict[str, Any]] = []
        for tenant_id, cmds in by_tenant.items():
            with observability.log_context(tenant_id=tenant_id):
                events += await self._tenant_batch(tenant_id, cmds)
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
            if cmd["op"] == "send" and not all(
                isinstance(cmd.get(f), str) for f in ("sender_id", "client_msg_id", "type")
            ):
                raise ValueError("send without sender, client_msg_id or type")
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

    async def _tenant_batch(
        self, tenant_id: str, cmds: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        tenant = self._registry.get(tenant_id)
        assert tenant is not None
        conv_ids = sorted({c["conv_id"] for c in cmds})
        keys = [_key(c) for c in cmds if c["op"] == "send"]
        by_conv, known = await self._store.load_batch(tenant_id, conv_ids, keys)
        members = {conv_id: {m.user_id for m in rows} for conv_id, rows in by_conv.items()}
        events: list[dict[str, Any]] = []
        sends: list[dict[str, Any]] = []
        for cmd in cmds:
            if cmd["op"] != "send":
                continue
            try:
                self._check_send(tenant, members.get(cmd["conv_id"], set()), cmd)
            except errors.ImhubError as err:
                events.append(envelopes.reply_error(tenant_id, cmd.get("reply"), err.to_dict()))
                continue
            sends.append(cmd)
        if sends:
            events += await self._sends(tenant_id, members, sends, known)
        for cmd in cmds:
            if cmd["op"] == "read":
                with observability.log_context(conv_id=cmd["conv_id"]):
                    events += await self._read(tenant_id, members.get(cmd["conv_id"], set()), cmd)
        return events

    # -- send ---------------------------------------------------------------------

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
        # A media key must be one uploaded to this conversation: its members are
        # the ones allowed to download it.
        key = content.get("key") if isinstance(content, dict) else None
        if key is not None and not str(key).startswith(
            f"{tenant.names.object_prefix}{cmd['conv_id']}/"
        ):
            raise errors.InvalidPayload("media key does not belong to this conversation")

    async def _sends(
        self,
        tenant_id: str,
        members: dict[str, set[str]],
        cmds: list[dict[str, Any]],
        known: dict[Key, models.Message],
    ) -> list[dict[str, Any]]:
        try:
            stored, fresh = await self._store_new(tenant_id, cmds, known)
        except errors.Conflict:
            # A counter was behind its table (a cache flush raced a write, or
            # another consumer held a partition). Redo conversation by
            # conversation, moving each counter past its stored maximum.
            stored, fresh = {}, []
            for conv_id in dict.fromkeys(c["conv_id"] for c in cmds):
                part = [c for c in cmds if c["conv_id"] == conv_id]
                got, new = await self._store_one_conversation(tenant_id, conv_id, part)
                stored.update(got)
                fresh += new

        events: list[dict[str, Any]] = []
        fresh_ids = {id(cmd) for cmd in fresh}
        for cmd in cmds:
            msg = stored[_key(cmd)]
            data = {"msg_id": msg.msg_id, "seq": msg.seq, "created_at": msg.created_at.isoformat()}
            if id(cmd) not in fresh_ids:
                events.append(envelopes.reply_ok(tenant_id, cmd.get("reply"), data))
                continue
            observability.MESSAGES.labels(tenant_id).inc()
            events.append(
                {
                    "op": "message_created",
                    "tenant_id": tenant_id,
                    "conv_id": msg.conv_id,
                    "members": sorted(members.get(msg.conv_id, ())),
                    "message": msg.to_wire(),
                    "reply": cmd.get("reply"),
                    "ack": data,
                    "sent_at": cmd.get("sent_at"),
                }
            )
        if self._notifier is not None and fresh:
            await self._notifier.offline(tenant_id, [stored[_key(c)] for c in fresh], members)
        return events

    async def _store_one_conversation(
        self, tenant_id: str, conv_id: str, cmds: list[dict[str, Any]]
    ) -> tuple[dict[Key, models.Message], list[dict[str, Any]]]:
        with observability.log_context(conv_id=conv_id):
            for attempt in range(_CONFLICT_RETRIES + 1):
                top = await self._store.max_seq(tenant_id, conv_id)
                await self._cache.reset_seq(tenant_id, conv_id, top)
                try:
                    return await self._store_new(tenant_id, cmds)
                except errors.Conflict:
                    logger.warning("seq conflict (attempt %d), counter moved to %d", attempt, top)
        raise errors.TemporaryError("seq conflict persisted")

    async def _store_new(
        self,
        tenant_id: str,
        cmds: list[dict[str, Any]],
        known: dict[Key, models.Message] | None = None,
    ) -> tuple[dict[Key, models.Message], list[dict[str, Any]]]:
        """Store what is new; return every command's message and the new commands.
        ``known`` is what the batch already looked up; without it, look again."""
        if known is None:
            stored = await self._store.find_by_client_ids(tenant_id, [_key(c) for c in cmds])
        else:
            stored = {k: known[k] for k in map(_key, cmds) if k in known}
        fresh_by_conv: dict[str, list[dict[str, Any]]] = {}
        seen = set(stored)
        for cmd in cmds:
            key = _key(cmd)
            if key not in seen:  # also dedupes a retry inside the same batch
                seen.add(key)
                fresh_by_conv.setdefault(cmd["conv_id"], []).append(cmd)
        if not fresh_by_conv:
            return stored, []

        now = datetime.now(UTC)
        rows: dict[str, list[models.NewMessage]] = {}
        blocks: list[tuple[str, int, int]] = []
        firsts = await self._cache.allocate_seqs(
            tenant_id,
            {conv_id: len(fresh) for conv_id, fresh in fresh_by_conv.items()},
            functools.partial(self._store.max_seq, tenant_id),
        )
        for conv_id, fresh in fresh_by_conv.items():
            first = firsts[conv_id]
            blocks.append((conv_id, first, len(fresh)))
            rows[conv_id] = [
                models.NewMessage(
                    msg_id=_new_msg_id(),
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
            await self._store.insert_messages(tenant_id, rows)
        except errors.Unavailable:
            # Hand the blocks back so an outage leaves no hole in the seq order.
            for conv_id, first, count in blocks:
                await self._cache.release_seq(tenant_id, conv_id, first, count)
            raise
        for conv_id, new_rows in rows.items():
            for row in new_rows:
                stored[(conv_id, row.sender_id, row.client_msg_id)] = models.Message(
                    msg_id=row.msg_id,
                    conv_id=conv_id,
                    seq=row.seq,
                    sender_id=row.sender_id,
                    type=row.type,
                    content=row.content,
                    client_msg_id=row.client_msg_id,
                    created_at=row.created_at,
                )
        return stored, [cmd for fresh in fresh_by_conv.values() for cmd in fresh]

    # -- read ---------------------------------------------------------------------

    async def _read(
        self, tenant_id: str, members: set[str], cmd: dict[str, Any]
    ) -> list[dict[str, Any]]:
        conv_id, user_id, reply = cmd["conv_id"], cmd.get("user_id"), cmd.get("reply")
        if user_id not in members:
            err = errors.NotFound("conversation not found")
            return [envelopes.reply_error(tenant_id, reply, err.to_dict())]
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
