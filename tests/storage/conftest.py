"""Fixtures for the storage adapters against the real servers of the session.

Each test gets fresh tenant ids (so schemas, key prefixes and topics never
collide with other tests or earlier sessions on the same servers).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from imhub import migrations
from imhub.runtime.adapters import kafka, store
from imhub.runtime.adapters import redis as redis_adapter
from tests.realservices import ServiceSet


def new_tenant_id(prefix: str = "st") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


@pytest.fixture
def tenant_ids() -> Callable[..., str]:
    return new_tenant_id


@pytest.fixture(scope="session")
def pg_url(services: ServiceSet) -> str:
    """The SQLAlchemy (asyncpg) URL of the session's PostgreSQL."""
    return store.normalize_url(services.get("postgres")["DATABASE_URL"])


@pytest.fixture(scope="session")
def redis_url(services: ServiceSet) -> str:
    return services.get("redis")["REDIS_URL"]


@pytest.fixture(scope="session")
def kafka_bootstrap(services: ServiceSet) -> str:
    return services.get("kafka")["KAFKA_BOOTSTRAP"]


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[store.SqlStore]:
    db = store.SqlStore(store.make_engine(pg_url))
    await db.start()
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def migrated(pg_url: str) -> Callable[..., Any]:
    """``await migrated("tenant-id")`` creates and migrates the tenant's schema."""

    async def migrate(*tenant_ids: str) -> None:
        from imhub.runtime import tenancy

        for tid in tenant_ids:
            await migrations.upgrade_async(pg_url, schema=tenancy.names_for(tid).db_schema)

    return migrate


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[redis_adapter.RedisCache]:
    c = redis_adapter.RedisCache(redis_url)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def bus(kafka_bootstrap: str) -> AsyncIterator[kafka.KafkaBus]:
    b = kafka.KafkaBus(
        kafka_bootstrap,
        client_id=f"test-{secrets.token_hex(3)}",
        partitions=4,
        static_membership=False,
    )
    await b.start()
    try:
        yield b
    finally:
        await b.close()
