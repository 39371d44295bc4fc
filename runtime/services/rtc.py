"""The RTC service: routes WebRTC signals between members and records calls.

Consumes ``im-signaling``. A signal is forwarded only when both caller and
callee are members of the conversation and the callee is online somewhere;
otherwise the caller's gateway acks an error. The call lifecycle (offer ->
answer -> hangup) is tracked in the cache and recorded in the conversation as
``system`` messages, ``call_started`` and ``call_ended`` with its duration,
sent through ``im-messages`` like any message (deduped by call id).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from imhub.runtime import envelopes, errors, observability, ports, tenants
from imhub.runtime.services import messages, worker

__all__ = ["RtcService"]

logger = logging.getLogger(__name__)

_CALL_TTL_SECONDS = 6 * 3600
_MEMBERS_TTL_SECONDS = 2.0


def _call_key(conv_id: str, call_id: str) -> str:
    return f"rtc:call:{conv_id}:{call_id}"


def _pair_key(conv_id: str, user_a: str, user_b: str) -> str:
    """The current call between two members of a conversation."""
    low, high = sorted((user_a, user_b))
    digest = hashlib.sha256(f"{low}\n{high}".encode()).hexdigest()[:24]
    return f"rtc:pair:{conv_id}:{digest}"


class RtcService:
    def __init__(
        self,
        *,
        registry: tenants.TenantRegistry,
        store: ports.Store,
        cache: ports.Cache,
        bus: ports.Bus,
        batch: int = 200,
    ) -> None:
        self._registry = registry
        self._store = store
        self._cache = cache
        self._bus = bus
        self._batch = batch
        # Short-lived member cache: signals are chatty (ICE candidates).
        self._members: dict[tuple[str, str], tuple[set[str], float]] = {}

    async def run(self, stop: asyncio.Event, *, group: str = "imhub-rtc-service") -> None:
        topics = [t.names.topic_signaling for t in self._registry]
        await self._bus.ensure_topics(
            topics
            + [t.names.topic_events for t in self._registry]
            + [t.names.topic_messages for t in self._registry]
        )
        consumer = self._bus.consumer(topics, group)
        await worker.run_consumer(
            consumer, self.handle, name="rtc-service", stop=stop, batch=self._batch
        )

    async def handle(self, records: Sequence[ports.Record]) -> None:
        for rec in records:
            try:
                cmd = envelopes.decode(rec.value)
                tenant = self._registry.get(cmd.get("tenant_id", ""))
                if tenant is None or rec.topic != tenant.names.topic_signaling:
                    raise ValueError("tenant does not match topic")
            except (ValueError, TypeError) as exc:
                logger.error("dropping malformed signal %s@%d: %s", rec.topic, rec.offset, exc)
                continue
            with observability.log_context(tenant_id=tenant.tenant_id, conv_id=cmd.get("conv_id")):
                try:
                    events = await self._signal(tenant, cmd)
                except errors.Unavailable:
                    raise  # a backend is down: the batch is retried
                except errors.ImhubError as err:
                    events = [
                        envelopes.reply_error(tenant.tenant_id, cmd.get("reply"), err.to_dict())
                    ]
            for event in events:
                topic = event.pop("_topic", tenant.names.topic_events)
                await self._bus.produce(topic, str(cmd.get("conv_id", "")), envelopes.encode(event))

    async def _member_ids(self, tenant_id: str, conv_id: str) -> set[str]:
        key = (tenant_id, conv_id)
        hit = self._members.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        ids = {m.user_id for m in await self._store.members(tenant_id, conv_id)}
        if len(self._members) > 10_000:
            self._members.clear()
        self._members[key] = (ids, now + _MEMBERS_TTL_SECONDS)
        return ids

    async def _signal(self, tenant: tenants.Tenant, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        tenant_id = tenant.tenant_id
        conv_id, sender, callee = cmd["conv_id"], cmd["from_user_id"], cmd["to_user_id"]
        kind = cmd["type"]
        if sender == callee:
            raise errors.InvalidPayload("cannot signal yourself")
        members = await self._member_ids(tenant_id, conv_id)
        if sender not in members:
            raise errors.NotFound("conversation not found")
        if callee not in members:
            raise errors.NotFound("callee is not a member of the conversation")

        call_id, state = await self._call(
            tenant_id, conv_id, cmd.get("call_id"), kind, sender, callee
        )
        online = bool(await self._cache.online_instances(tenant_id, callee))
        if not online and kind != "hangup":
            offline = errors.Unavailable("callee is offline", details={"reason": "offline"})
            return [envelopes.reply_error(tenant_id, cmd.get("reply"), offline.to_dict())]
        events = await self._lifecycle(tenant_id, conv_id, call_id, state, kind, sender, callee)
        if not online:
            events.append(
                envelopes.reply_ok(
                    tenant_id, cmd.get("reply"), {"delivered": False, "call_id": call_id}
                )
            )
            return events
        signal = dict(cmd.get("body") or {})
        signal.update(conv_id=conv_id, from_user_id=sender, type=kind, call_id=call_id)
        events.append(
            {
                "op": "rtc_signal",
                "tenant_id": tenant_id,
                "conv_id": conv_id,
                "to_user_id": callee,
                "signal": signal,
                "reply": cmd.get("reply"),
                "ack": {"delivered": True, "call_id": call_id},
            }
        )
        return events

    async def _call(
        self,
        tenant_id: str,
        conv_id: str,
        call_id: str | None,
        kind: str,
        sender: str,
        callee: str,
    ) -> tuple[str, dict[str, Any] | None]:
        """Find (or, for an offer, start) the call this signal belongs to.

        Only the two parties of a call can signal within it: a third member
        cannot answer, hang up or reuse another pair's call id.
        """
        pair_key = _pair_key(conv_id, sender, callee)
        if call_id is None and kind != "offer":
            call_id = await self._cache.get_json(tenant_id, pair_key)
            if call_id is None:
                if kind == "ice-candidate":
                    raise errors.InvalidPayload("no call in progress; send an offer first")
                raise errors.InvalidPayload("no call in progress between you two")
        if call_id is None:
            call_id = uuid.uuid4().hex[:24]
        state = await self._cache.get_json(tenant_id, _call_key(conv_id, call_id))
        if state is not None and {state["caller"], state["callee"]} != {sender, callee}:
            raise errors.Forbidden("that call is between other members")
        if state is None and kind == "answer":
            raise errors.InvalidPayload("no such call to answer")
        return call_id, state

    async def _lifecycle(
        self,
        tenant_id: str,
        conv_id: str,
        call_id: str,
        state: dict[str, Any] | None,
        kind: str,
        sender: str,
        callee: str,
    ) -> list[dict[str, Any]]:
        """Track the call and return the system messages it produces."""
        key = _call_key(conv_id, call_id)
        pair_key = _pair_key(conv_id, sender, callee)
        now = time.time()
        if kind == "offer" and state is None:
            state = {"caller": sender, "callee": callee, "offered_at": now, "answered_at": None}
            await self._cache.set_json(tenant_id, key, state, _CALL_TTL_SECONDS)
            await self._cache.set_json(tenant_id, pair_key, call_id, _CALL_TTL_SECONDS)
            return []
        if kind == "answer" and state is not None and state.get("answered_at") is None:
            if sender != state["callee"]:
                raise errors.Forbidden("only the callee answers a call")
            state["answered_at"] = now
            await self._cache.set_json(tenant_id, key, state, _CALL_TTL_SECONDS)
            return [
                self._system(
                    tenant_id,
                    conv_id,
                    f"call-{call_id}-started",
                    {
                        "event": "call_started",
                        "call_id": call_id,
                        "caller": state["caller"],
                        "callee": state["callee"],
                    },
                )
            ]
        if kind == "hangup" and state is not None:
            await self._cache.delete(tenant_id, key)
            await self._cache.delete(tenant_id, pair_key)
            answered = state.get("answered_at")
            duration = round(now - answered, 3) if answered else 0
            return [
                self._system(
                    tenant_id,
                    conv_id,
                    f"call-{call_id}-ended",
                    {
                        "event": "call_ended",
                        "call_id": call_id,
                        "caller": state["caller"],
                        "callee": state["callee"],
                        "duration": duration,
                        "reason": "hangup" if answered else "missed",
                        "ended_by": sender,
                    },
                )
            ]
        return []

    def _system(
        self, tenant_id: str, conv_id: str, client_msg_id: str, content: dict[str, Any]
    ) -> dict[str, Any]:
        tenant = self._registry.get(tenant_id)
        assert tenant is not None
        return {
            "_topic": tenant.names.topic_messages,
            "op": "send",
            "tenant_id": tenant_id,
            "conv_id": conv_id,
            "sender_id": messages.SYSTEM_SENDER,
            "client_msg_id": client_msg_id,
            "type": "system",
            "content": content,
            "server_made": True,
            "reply": None,
            "sent_at": time.time(),
        }
