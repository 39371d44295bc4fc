"""The message service on the embedded adapters (real SQLite): seq, dedupe, recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from imhub import migrations
from imhub.runtime import envelopes, tenants
from imhub.runtime.adapters import memory, store
from imhub.runtime.services import messages

TENANT = tenants.Tenant(tenant_id="unit", keys=(tenants.SigningKey(kid="k", secret="s" * 40),))


@pytest.fixture
async def env(tmp_path: Path) -> dict[str, object]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await migrations.upgrade_async(url)
    db = store.SqlStore(store.make_engine(url))
    conv, _ = await db.create_conversation(
        "unit", conv_type="group", member_ids=["a", "b"], created_by="a", name="g", direct_key=None
    )
    bus = memory.MemoryBus(partitions=4)
    cache = memory.MemoryCache()
    svc = messages.MessageService(
        registry=tenants.TenantRegistry([TENANT]), store=db, cache=cache, bus=bus
    )
    yield {"db": db, "bus": bus, "cache": cache, "svc": svc, "conv": conv.conv_id}
    await db.close()


async def _send(env: dict[str, object], client_msg_id: str, sender: str = "a") -> None:
    bus = env["bus"]
    assert isinstance(bus, memory.MemoryBus)
    await bus.produce(
        TENANT.names.topic_messages,
        str(env["conv"]),
        envelopes.encode(
            {
                "op": "send",
                "tenant_id": "unit",
                "conv_id": env["conv"],
                "sender_id": sender,
                "client_msg_id": client_msg_id,
                "type": "text",
                "content": {"text": client_msg_id},
            }
        ),
    )


async def _drain(env: dict[str, object]) -> list[dict[str, object]]:
    bus, svc = env["bus"], env["svc"]
    assert isinstance(bus, memory.MemoryBus) and isinstance(svc, messages.MessageService)
    consumer = bus.consumer([TENANT.names.topic_messages], "svc")
    records = await consumer.poll(1000, 0.1)
    await svc.handle(records)
    await consumer.commit(records)
    events = bus.consumer([TENANT.names.topic_events], "probe")
    return [envelopes.decode(r.value) for r in await events.poll(1000, 0.1)]


async def test_seq_survives_a_cache_flush(env: dict[str, object]) -> None:
    for n in range(3):
        await _send(env, f"m{n}")
    await _drain(env)
    cache = env["cache"]
    assert isinstance(cache, memory.MemoryCache)
    cache.flush()  # what a Redis FLUSHALL does to the counters
    await _send(env, "after-flush")
    db = env["db"]
    assert isinstance(db, store.SqlStore)
    await _drain(env)
    rows = await db.history("unit", str(env["conv"]), before_seq=None, after_seq=0, limit=50)
    assert [r.seq for r in rows] == [1, 2, 3, 4]


async def test_stale_counter_is_repaired_not_duplicated(env: dict[str, object]) -> None:
    await _send(env, "x1")
    await _drain(env)
    cache = env["cache"]
    assert isinstance(cache, memory.MemoryCache)
    cache._seq[("unit", str(env["conv"]))] = 0  # a counter behind the table
    await _send(env, "x2")
    await _drain(env)
    db = env["db"]
    assert isinstance(db, store.SqlStore)
    rows = await db.history("unit", str(env["conv"]), before_seq=None, after_seq=0, limit=50)
    assert [(r.seq, r.client_msg_id) for r in rows] == [(1, "x1"), (2, "x2")]


async def test_redelivered_batch_creates_nothing_twice(env: dict[str, object]) -> None:
    bus, svc = env["bus"], env["svc"]
    assert isinstance(bus, memory.MemoryBus) and isinstance(svc, messages.MessageService)
    for n in range(5):
        await _send(env, f"r{n}")
    consumer = bus.consumer([TENANT.names.topic_messages], "svc")
    records = await consumer.poll(1000, 0.1)
    await svc.handle(records)
    await consumer.close()  # crashed before committing
    again = bus.consumer([TENANT.names.topic_messages], "svc")
    redelivered = await again.poll(1000, 0.1)
    assert [r.offset for r in redelivered] == [r.offset for r in records]
    await svc.handle(redelivered)
    db = env["db"]
    assert isinstance(db, store.SqlStore)
    rows = await db.history("unit", str(env["conv"]), before_seq=None, after_seq=0, limit=50)
    assert [r.client_msg_id for r in rows] == [f"r{n}" for n in range(5)]


async def test_memory_bus_keeps_per_key_order() -> None:
    bus = memory.MemoryBus(partitions=3)
    for n in range(30):
        await bus.produce("t", f"k{n % 4}", str(n).encode())
    consumer = bus.consumer(["t"], "g")
    got = await consumer.poll(100, 0.1)
    by_key: dict[str, list[int]] = {}
    for rec in got:
        by_key.setdefault(rec.key, []).append(int(rec.value))
    assert all(v == sorted(v) for v in by_key.values()) and len(got) == 30
    late = bus.consumer(["t"], "late", from_latest=True)
    assert await late.poll(100, 0.05) == []
    await asyncio.sleep(0)
