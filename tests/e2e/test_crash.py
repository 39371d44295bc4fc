"""Crash and outage tests on the production shape (``scripts/stack``).

Each test keeps a steady stream of sends going in several conversations from
users spread over both gateways, breaks one part (``kill -9`` or a restart of
a backend), brings it back and then checks the outcome against PostgreSQL:
every acknowledged message stored exactly once with the seq it was acked
with, seq strictly increasing, and every member holding every message (live
or through gap sync). See ``tests/e2e/load.py``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.e2e.load import Load, Member, verify
from tests.harness import Client
from tests.harness_stack import StackTarget
from tests.protocol.conftest import create_conversation

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]


async def _cast(
    stack: StackTarget, tenant_id: str, *, users: int = 6, convs: int = 4
) -> tuple[list[Member], list[tuple[Member, str]]]:
    """Users alternate between the gateways; each conversation has three members,
    two of whom keep sending."""
    tag = secrets.token_hex(3)
    members = [Member(stack, tenant_id, f"u{i}-{tag}", gateway=i % 2) for i in range(users)]
    streams: list[tuple[Member, str]] = []
    for k in range(convs):
        group = [members[(k + j) % users] for j in range(3)]
        conv = await create_conversation(
            stack, tenant_id, group[0].user_id, [m.user_id for m in group]
        )
        for m in group:
            m.convs.add(conv["conv_id"])
        streams += [(group[0], conv["conv_id"]), (group[1], conv["conv_id"])]
    await asyncio.gather(*(m.start() for m in members))
    return members, streams


async def _finish(
    stack: StackTarget, tenant_id: str, load: Load, members: list[Member]
) -> dict[str, Any]:
    try:
        await load.stop()
        return await verify(stack, stack.database_url, tenant_id, load)
    finally:
        await asyncio.gather(*(m.close() for m in members))


async def _message(client: Client, msg_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        frame = await client.next_event("message_created", max(0.05, deadline - time.monotonic()))
        if frame["payload"]["msg_id"] == msg_id:
            return dict(frame["payload"])


async def test_live_delivery_across_gateways(stack: StackTarget, tenant_id: str) -> None:
    tag = secrets.token_hex(3)
    alice, bob = f"alice-{tag}", f"bob-{tag}"
    conv = await create_conversation(stack, tenant_id, alice, [bob], kind="direct")
    a = await Client.connect(stack.ws(0), stack.token(tenant_id, alice))
    b = await Client.connect(stack.ws(1), stack.token(tenant_id, bob))
    try:
        started = time.monotonic()
        ack = await b.send_text(conv["conv_id"], "through gateway 2")
        assert ack["success"], ack
        got = await _message(a, ack["data"]["msg_id"])
        assert got["seq"] == ack["data"]["seq"] and got["sender_id"] == bob
        assert got["content"] == {"text": "through gateway 2"}
        assert time.monotonic() - started < 5

        ack = await a.send_text(conv["conv_id"], "and back")
        assert ack["success"], ack
        got = await _message(b, ack["data"]["msg_id"])
        assert got["sender_id"] == alice and got["seq"] == ack["data"]["seq"]
    finally:
        await a.close()
        await b.close()


async def test_message_service_kill9(stack: StackTarget, tenant_id: str) -> None:
    members, streams = await _cast(stack, tenant_id)
    load = Load(members, streams)
    load.start()
    await load.wait_for(40, 30)

    assert load.unfinished, "nothing in flight at the crash"
    await asyncio.to_thread(stack.kill, "message-service")
    await asyncio.sleep(1.0)
    await stack.start_part_async("message-service")
    await load.wait_for(80, 60)

    stats = await _finish(stack, tenant_id, load, members)
    print("message-service kill -9:", stats)


async def test_redis_flush_then_restart(stack: StackTarget, tenant_id: str) -> None:
    members, streams = await _cast(stack, tenant_id)
    # A call-routing probe outside the load's conversations.
    caller, callee = members[0], members[1]
    probe = await create_conversation(stack, tenant_id, caller.user_id, [callee.user_id])
    load = Load(members, streams)
    load.start()
    redis = aioredis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        await load.wait_for(40, 30)
        await redis.flushall()
        await load.wait_for(40, 30)
        # The counters came back above what is stored.
        for conv_id in {c for _, c in streams}:
            counter = await redis.get(f"imhub:{tenant_id}:seq:{conv_id}")
            top = max(int(s.data["seq"]) for s in load.sent if s.conv_id == conv_id)
            assert counter is not None and int(counter) >= top

        await asyncio.to_thread(stack.stop_part, "redis")
        await asyncio.sleep(1.0)
        await stack.start_part_async("redis")
        await load.wait_for(60, 60)

        # Routing recovers: presence is back with the gateways' next heartbeat.
        deadline = time.monotonic() + 25
        while True:
            assert caller.client is not None
            ack = await caller.client.request(
                "rtc_signal",
                {
                    "conv_id": probe["conv_id"],
                    "to_user_id": callee.user_id,
                    "type": "offer",
                    "sdp": "v=0",
                },
            )
            if ack["success"]:
                break
            assert ack["error"]["code"] == "unavailable", ack
            assert time.monotonic() < deadline, f"callee still unreachable: {ack}"
            await asyncio.sleep(1.0)
    finally:
        await redis.aclose()

    stats = await _finish(stack, tenant_id, load, members)
    print("redis flush + restart:", stats)


async def test_gateway_kill9_clients_move_to_the_other(stack: StackTarget, tenant_id: str) -> None:
    members, streams = await _cast(stack, tenant_id)
    load = Load(members, streams)
    load.start()
    await load.wait_for(40, 30)

    moved = [m for m in members if m.gateway == 0]
    await asyncio.to_thread(stack.kill, "gateway-1")
    await load.wait_for(60, 60)
    assert all(m.gateway == 1 for m in moved)
    assert all(m.reconnects >= 1 for m in moved)
    await stack.start_part_async("gateway-1")
    await load.wait_for(20, 30)

    stats = await _finish(stack, tenant_id, load, members)
    print("gateway kill -9:", stats)


async def test_kafka_restart(stack: StackTarget, tenant_id: str) -> None:
    members, streams = await _cast(stack, tenant_id)
    load = Load(members, streams)
    load.start()
    await load.wait_for(40, 30)

    await asyncio.to_thread(stack.stop_part, "kafka")
    before = load.count()
    await asyncio.sleep(3.0)
    during = load.count() - before
    assert during == 0, "acknowledged without a bus"  # acks ride on im-events
    await stack.start_part_async("kafka")
    await load.wait_for(60, 120)

    refused = sum(
        1
        for s in load.sent
        for ack in s.acks
        if not ack["success"] and ack["error"]["code"] == "unavailable"
    )
    stats = await _finish(stack, tenant_id, load, members)
    print(f"kafka restart: acked while down {during}, unavailable acks {refused}:", stats)


async def test_postgres_restart(stack: StackTarget, tenant_id: str) -> None:
    members, streams = await _cast(stack, tenant_id)
    load = Load(members, streams)
    load.start()
    await load.wait_for(40, 30)

    await asyncio.to_thread(stack.stop_part, "postgres")
    await asyncio.sleep(1.0)
    await stack.start_part_async("postgres")
    await load.wait_for(60, 90)

    stats = await _finish(stack, tenant_id, load, members)
    print("postgres restart:", stats)
