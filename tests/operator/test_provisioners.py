"""Each provisioner against its real backend: idempotence, drift repair, outages."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import asyncpg
import pytest

from imhub.operator import database, storage, topics, turn
from imhub.runtime import tenancy
from tests.harness import free_port
from tests.realservices import ServiceSet

pytestmark = pytest.mark.services


# -- PostgreSQL -------------------------------------------------------------------


async def _fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def _tenant_dsn(admin: str, names: tenancy.TenantNames, password: str) -> str:
    host = admin.split("@", 1)[1]
    return f"postgresql://{names.db_role}:{password}@{host}"


async def test_database_concurrent_tenants_idempotent_and_isolated(services: ServiceSet) -> None:
    admin = services.get("postgres")["DATABASE_URL"]
    prov = database.DatabaseProvisioner(admin)
    ids = ["prov-a", "prov-b", "prov-c"]
    names = {t: tenancy.names_for(t) for t in ids}
    try:
        # Several tenants at once (as the operator's workers do), then again.
        first = await asyncio.gather(
            *(prov.ensure(names[t], password=f"pw-{t}-0123456789", owner_uid=t) for t in ids)
        )
        assert all(r.migrated for r in first)
        again = await prov.ensure(
            names["prov-a"], password="pw-prov-a-0123456789", owner_uid="prov-a"
        )
        assert not again.migrated and again.revision == first[0].revision

        a_dsn = _tenant_dsn(admin, names["prov-a"], "pw-prov-a-0123456789")
        rows = await _fetch(a_dsn, "SELECT current_schemas(false) AS s")
        assert rows[0]["s"] == ["t_prov_a"]
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _fetch(a_dsn, "SELECT * FROM t_prov_b.messages")

        # A password changed by hand is put back by the next pass.
        await _fetch(admin, "ALTER ROLE imhub_t_prov_a PASSWORD 'tampered'")
        await prov.ensure(names["prov-a"], password="pw-prov-a-0123456789", owner_uid="prov-a")
        await _fetch(a_dsn, "SELECT 1")

        # Another object claiming the same tenant id is refused.
        with pytest.raises(database.DatabaseConflict):
            await prov.ensure(names["prov-a"], password="x" * 20, owner_uid="someone-else")

        assert await prov.retain(names["prov-b"], "prov-b", "ns/prov-b")
        role = await _fetch(
            admin, "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'imhub_t_prov_b'"
        )
        assert role[0]["rolcanlogin"] is False
        # A retained schema can be claimed again (the tenant is re-created).
        await prov.ensure(
            names["prov-b"],
            password="pw-prov-b-0123456789",
            owner_uid="new-uid",
            owner_ref="ns/prov-b",
        )
    finally:
        await asyncio.gather(*(prov.drop(names[t]) for t in ids))
    left = await _fetch(admin, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_prov\\_%'")
    assert left == []


async def test_database_claim_is_atomic_and_guards_every_change(services: ServiceSet) -> None:
    admin = services.get("postgres")["DATABASE_URL"]
    prov = database.DatabaseProvisioner(admin)
    names = tenancy.names_for("prov-claim")
    pw = "pw-claim-0123456789"
    try:
        # Two objects with the same tenant id at once: exactly one gets it.
        results = await asyncio.gather(
            *(
                prov.ensure(names, password=pw, owner_uid=f"uid-{i}", owner_ref=f"ns{i}/claim")
                for i in range(2)
            ),
            return_exceptions=True,
        )
        conflicts = [r for r in results if isinstance(r, database.DatabaseConflict)]
        assert len(conflicts) == 1, results
        win = 0 if not isinstance(results[0], BaseException) else 1
        lose = 1 - win
        assert await prov.owns(names, f"uid-{win}")
        assert not await prov.owns(names, f"uid-{lose}")
        # The loser can neither drop nor retain (disable) the winner's tenant.
        assert await prov.drop(names, f"uid-{lose}") is False
        assert await prov.retain(names, f"uid-{lose}", f"ns{lose}/claim") is False
        dsn = _tenant_dsn(admin, names, pw)
        await _fetch(dsn, "SELECT count(*) FROM t_prov_claim.messages")
        # The tenant role uses its schema but cannot plant objects in it.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _fetch(dsn, "CREATE TABLE t_prov_claim.planted (x int)")

        # Retained data goes back only to the same namespace/name.
        assert await prov.retain(names, f"uid-{win}", f"ns{win}/claim")
        with pytest.raises(database.DatabaseConflict, match=f"ns{win}/claim"):
            await prov.ensure(names, password="y" * 20, owner_uid="thief", owner_ref="x/thief")
        role = await _fetch(
            admin, "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", names.db_role
        )
        assert role[0]["rolcanlogin"] is False
        await prov.ensure(names, password=pw, owner_uid="reborn", owner_ref=f"ns{win}/claim")

        # A claim whose holder no longer exists counts as retained for its namespace/name.
        async def gone(namespace: str, name: str, uid: str) -> bool:
            return False

        with pytest.raises(database.DatabaseConflict):
            await prov.ensure(names, password=pw, owner_uid="u2", owner_ref="x/thief", alive=gone)
        await prov.ensure(
            names, password=pw, owner_uid="u3", owner_ref=f"ns{win}/claim", alive=gone
        )
        # A live holder keeps it, whoever asks.
        with pytest.raises(database.DatabaseConflict):
            await prov.ensure(names, password=pw, owner_uid="u4", owner_ref=f"ns{win}/claim")
    finally:
        await prov.drop(names)


async def test_database_down_is_unavailable() -> None:
    prov = database.DatabaseProvisioner(
        f"postgresql://imhub:imhub@127.0.0.1:{free_port()}/imhub", timeout=2
    )
    with pytest.raises(database.DatabaseUnavailable):
        await prov.ensure(tenancy.names_for("nowhere"), password="p" * 20, owner_uid="u")


# -- Kafka ------------------------------------------------------------------------


async def test_topics_create_grow_retention_and_delete(services: ServiceSet) -> None:
    bootstrap = services.get("kafka")["KAFKA_BOOTSTRAP"]
    prov = topics.TopicProvisioner(bootstrap)
    names = tenancy.names_for("prov-topics").topics
    try:
        created = await prov.ensure(names, partitions=2, retention_ms=3_600_000)
        assert sorted(created.created) == sorted(names)
        same = await prov.ensure(names, partitions=2, retention_ms=3_600_000)
        assert not (same.created or same.grown or same.reconfigured)
        grown = await prov.ensure(names, partitions=4, retention_ms=7_200_000)
        assert sorted(grown.grown) == sorted(names)
        assert sorted(grown.reconfigured) == sorted(names)
        assert set(grown.partitions.values()) == {4}
        fewer = await prov.ensure(names, partitions=1, retention_ms=7_200_000)
        assert sorted(fewer.too_many_partitions) == sorted(names)
        assert await prov.missing(names) == []
    finally:
        deleted = await prov.delete(names)
    assert sorted(deleted) == sorted(names)


async def test_kafka_down_is_unavailable() -> None:
    prov = topics.TopicProvisioner(f"127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(topics.TopicsUnavailable):
        await prov.ensure(["imhub.x.im-events"], partitions=1, retention_ms=1000)


# -- S3 ---------------------------------------------------------------------------


async def test_bucket_policy_cors_and_repair(services: ServiceSet) -> None:
    s3 = services.get("s3")
    prov = storage.StorageProvisioner(
        endpoint=s3["S3_ENDPOINT"],
        access_key=s3["S3_ACCESS_KEY"],
        secret_key=s3["S3_SECRET_KEY"],
        region=s3["S3_REGION"],
    )
    bucket = tenancy.names_for("prov-bucket").bucket
    try:
        first = await prov.ensure(bucket, cors_origins=["https://app.example"])
        assert first.created and first.policy_updated and first.cors_updated
        again = await prov.ensure(bucket, cors_origins=["https://app.example"])
        assert not (again.created or again.policy_updated or again.cors_updated)
        # CORS removed by hand comes back.
        prov._client.delete_bucket_cors(Bucket=bucket)
        repaired = await prov.ensure(bucket, cors_origins=["https://app.example"])
        assert repaired.cors_updated and not repaired.policy_updated
        prov._client.put_object(Bucket=bucket, Key="acme/x.txt", Body=b"x")
    finally:
        assert await prov.delete(bucket)
    assert not await prov.delete(bucket)


async def test_s3_down_is_unavailable() -> None:
    prov = storage.StorageProvisioner(
        endpoint=f"http://127.0.0.1:{free_port()}", access_key="a", secret_key="b", timeout=1
    )
    with pytest.raises(storage.StorageUnavailable):
        await prov.ensure("imhub-nowhere", cors_origins=["*"])


# -- coturn -----------------------------------------------------------------------


async def test_turn_secret_add_and_revoke(services: ServiceSet) -> None:
    coturn = services.get("coturn")
    prov = turn.TurnProvisioner(coturn["TURN_DB"], coturn["TURN_REALM"])
    secret = "prov-turn-secret-0123456789"
    assert await prov.ensure(secret)
    assert not await prov.ensure(secret)
    with contextlib.closing(sqlite3.connect(coturn["TURN_DB"])) as db:
        rows = db.execute("SELECT realm FROM turn_secret WHERE value = ?", (secret,)).fetchall()
    assert rows == [(coturn["TURN_REALM"],)]
    assert await prov.remove(secret)
    assert not await prov.remove(secret)
    assert not await prov.present(secret)


async def test_turn_db_missing_is_unavailable(tmp_path: Any) -> None:
    prov = turn.TurnProvisioner(str(tmp_path / "nope" / "turndb"), "imhub")
    with pytest.raises(turn.TurnUnavailable):
        await prov.ensure("s" * 20)
