"""The Redis cache on a real Redis: seq recovery, presence expiry, release, tenancy."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from imhub.runtime import errors, models
from imhub.runtime.adapters import redis as redis_adapter
from imhub.runtime.adapters import store
from tests.realservices import ServiceSet

pytestmark = pytest.mark.services


async def _stored(db: store.SqlStore, tenant: str, conv_id: str, seqs: range) -> None:
    now = datetime.now(UTC)
    await db.insert_messages(
        tenant,
        {
            conv_id: [
                models.NewMessage(
                    msg_id=uuid.uuid4().hex,
                    seq=s,
                    sender_id="alice",
                    type="text",
                    content={"text": str(s)},
                    client_msg_id=f"m{s}",
                    created_at=now,
                )
                for s in seqs
            ]
        },
    )


async def _conversation(db: store.SqlStore, tenant: str) -> str:
    conv, _ = await db.create_conversation(
        tenant,
        conv_type="group",
        member_ids=["alice", "bob"],
        created_by="alice",
        name=None,
        direct_key=None,
    )
    return conv.conv_id


async def test_seq_continues_above_stored_max_after_flushall(
    cache: redis_adapter.RedisCache,
    pg_store: store.SqlStore,
    migrated: Callable[..., Any],
    tenant_ids: Callable[[], str],
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    conv_id = await _conversation(pg_store, tenant)

    def stored_max() -> Any:
        return pg_store.max_seq(tenant, conv_id)

    # A fresh counter starts from the table.
    await _stored(pg_store, tenant, conv_id, range(1, 8))
    assert await cache.allocate_seq(tenant, conv_id, 3, stored_max) == 8
    await _stored(pg_store, tenant, conv_id, range(8, 11))
    key = f"imhub:{tenant}:seq:{conv_id}"
    assert await cache.client.get(key) == b"10"

    # FLUSHALL: the counter is gone; the next block starts above the stored max.
    await cache.client.flushall()
    assert await cache.allocate_seq(tenant, conv_id, 2, stored_max) == 11
    assert await cache.client.get(key) == b"12"

    # Counter behind the table (a flush raced a write): reset_seq raises it,
    # and never lowers it.
    await cache.client.set(key, 5)
    await cache.reset_seq(tenant, conv_id, 12)
    assert await cache.client.get(key) == b"12"
    await cache.reset_seq(tenant, conv_id, 3)
    assert await cache.client.get(key) == b"12"


async def test_concurrent_allocations_after_a_flush_never_overlap(
    cache: redis_adapter.RedisCache, tenant_ids: Callable[[], str]
) -> None:
    tenant, conv_id = tenant_ids(), "c_concurrent"
    calls = 0

    async def stored_max() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)  # let the others race
        return 100

    firsts = await asyncio.gather(
        *(cache.allocate_seq(tenant, conv_id, 2, stored_max) for _ in range(40))
    )
    seqs = sorted(s for f in firsts for s in (f, f + 1))
    assert seqs == list(range(101, 181))
    assert calls >= 1


async def test_seq_after_redis_restart_continues_above_stored_max(
    services: ServiceSet,
    redis_url: str,
    pg_store: store.SqlStore,
    migrated: Callable[..., Any],
    tenant_ids: Callable[[], str],
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    conv_id = await _conversation(pg_store, tenant)
    cache = redis_adapter.RedisCache(redis_url)
    await cache.start()
    try:
        first = await cache.allocate_seq(
            tenant, conv_id, 5, lambda: pg_store.max_seq(tenant, conv_id)
        )
        assert first == 1
        await _stored(pg_store, tenant, conv_id, range(1, 6))

        await asyncio.to_thread(services.stop, "redis")
        started = time.monotonic()
        with pytest.raises(errors.Unavailable):
            await cache.allocate_seq(tenant, conv_id, 1, lambda: pg_store.max_seq(tenant, conv_id))
        with pytest.raises(errors.Unavailable):
            await cache.ping()
        assert time.monotonic() - started < 10  # fails fast, no hang

        env = await asyncio.to_thread(services.start, "redis")
        assert env["REDIS_URL"] == redis_url  # same port after a restart
        # Redis runs without persistence: everything is gone; the same client
        # reconnects on its own and the counter is rebuilt from the table.
        assert await cache.client.dbsize() == 0
        first = await cache.allocate_seq(
            tenant, conv_id, 1, lambda: pg_store.max_seq(tenant, conv_id)
        )
        assert first == 6
    finally:
        await cache.close()


async def test_release_seq_gives_back_only_the_last_block(
    cache: redis_adapter.RedisCache, tenant_ids: Callable[[], str]
) -> None:
    tenant, conv_id = tenant_ids(), "c_release"

    async def zero() -> int:
        return 0

    first = await cache.allocate_seq(tenant, conv_id, 4, zero)
    assert first == 1
    await cache.release_seq(tenant, conv_id, first, 4)  # the write failed
    assert await cache.allocate_seq(tenant, conv_id, 2, zero) == 1  # no hole

    # Something was allocated after the block: releasing it must not reuse 3-4.
    block = await cache.allocate_seq(tenant, conv_id, 2, zero)
    assert block == 3
    later = await cache.allocate_seq(tenant, conv_id, 1, zero)
    assert later == 5
    await cache.release_seq(tenant, conv_id, block, 2)
    assert await cache.allocate_seq(tenant, conv_id, 1, zero) == 6

    # A missing counter is not created by a release.
    await cache.release_seq(tenant, "c_missing", 1, 1)
    assert await cache.client.exists(f"imhub:{tenant}:seq:c_missing") == 0


async def test_counters_and_values_are_scoped_by_tenant(
    cache: redis_adapter.RedisCache, tenant_ids: Callable[[], str]
) -> None:
    a, b = tenant_ids(), tenant_ids()

    async def zero() -> int:
        return 0

    assert await cache.allocate_seq(a, "c_same", 10, zero) == 1
    assert await cache.allocate_seq(b, "c_same", 1, zero) == 1
    await cache.set_json(a, "rtc:call:x", {"caller": "alice"}, 30)
    assert await cache.get_json(b, "rtc:call:x") is None
    assert await cache.get_json(a, "rtc:call:x") == {"caller": "alice"}
    await cache.set_online(a, "alice", "gw-1", 30)
    assert await cache.online_instances(b, "alice") == []

    keys = sorted([k.decode() async for k in cache.client.scan_iter(match=f"imhub:{a}:*")])
    assert keys == [f"imhub:{a}:kv:rtc:call:x", f"imhub:{a}:online:alice", f"imhub:{a}:seq:c_same"]
    await cache.delete(a, "rtc:call:x")
    assert await cache.get_json(a, "rtc:call:x") is None


async def test_values_expire(
    cache: redis_adapter.RedisCache, tenant_ids: Callable[[], str]
) -> None:
    tenant = tenant_ids()
    await cache.set_json(tenant, "k", {"n": 1, "s": "\N{SNOWMAN}"}, 0.3)
    assert await cache.get_json(tenant, "k") == {"n": 1, "s": "\N{SNOWMAN}"}
    ttl = await cache.client.pttl(f"imhub:{tenant}:kv:k")
    assert 0 < ttl <= 300
    await asyncio.sleep(0.5)
    assert await cache.get_json(tenant, "k") is None


async def test_presence_expires_per_instance(
    cache: redis_adapter.RedisCache, tenant_ids: Callable[[], str]
) -> None:
    tenant = tenant_ids()
    key = f"imhub:{tenant}:online:alice"
    await cache.set_online(tenant, "alice", "gw-1", 0.4)
    await cache.set_online(tenant, "alice", "gw-2", 1.5)
    assert await cache.online_instances(tenant, "alice") == ["gw-1", "gw-2"]
    assert 400 < await cache.client.pttl(key) <= 1500  # the key lives as long as its longest entry

    await asyncio.sleep(0.6)
    assert await cache.online_instances(tenant, "alice") == ["gw-2"]  # gw-1 missed its heartbeat
    await cache.set_online(tenant, "alice", "gw-2", 1.5)  # heartbeat
    await cache.set_offline(tenant, "alice", "gw-2")
    assert await cache.online_instances(tenant, "alice") == []

    await cache.set_online(tenant, "bob", "gw-1", 0.3)
    await asyncio.sleep(0.5)
    assert await cache.online_instances(tenant, "bob") == []
    assert await cache.client.exists(f"imhub:{tenant}:online:bob") == 0  # nothing left behind


async def test_allocate_many_after_a_flush_starts_above_each_stored_max(
    cache: redis_adapter.RedisCache,
    pg_store: store.SqlStore,
    migrated: Callable[..., Any],
    tenant_ids: Callable[[], str],
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    warm, cold = await _conversation(pg_store, tenant), await _conversation(pg_store, tenant)
    await _stored(pg_store, tenant, warm, range(1, 4))
    await _stored(pg_store, tenant, cold, range(1, 6))

    def stored_max(conv_id: str) -> Any:
        return pg_store.max_seq(tenant, conv_id)

    assert await cache.allocate_seqs(tenant, {warm: 2}, stored_max) == {warm: 4}
    await cache.client.delete(f"imhub:{tenant}:seq:{cold}")  # only one counter lost
    firsts = await cache.allocate_seqs(tenant, {warm: 1, cold: 3}, stored_max)
    assert firsts == {warm: 6, cold: 6}
    assert await cache.client.get(f"imhub:{tenant}:seq:{cold}") == b"8"


async def test_a_corrupt_counter_is_rebuilt_not_fatal(
    cache: redis_adapter.RedisCache,
    pg_store: store.SqlStore,
    migrated: Callable[..., Any],
    tenant_ids: Callable[[], str],
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    conv_id = await _conversation(pg_store, tenant)
    await _stored(pg_store, tenant, conv_id, range(1, 10))

    def stored_max(conv: str) -> Any:
        return pg_store.max_seq(tenant, conv)

    key = f"imhub:{tenant}:seq:{conv_id}"
    await cache.client.set(key, "garbage")
    assert await cache.allocate_seqs(tenant, {conv_id: 1}, stored_max) == {conv_id: 10}
    await cache.client.delete(key)
    await cache.client.hset(key, "x", "1")  # the wrong type altogether
    assert await cache.allocate_seqs(tenant, {conv_id: 2}, stored_max) == {conv_id: 10}
