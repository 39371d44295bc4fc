"""The SQL store on a real PostgreSQL: one schema per tenant, constraints, recovery."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from imhub.runtime import errors, models, tenancy
from imhub.runtime.adapters import store
from tests.harness import REPO

pytestmark = pytest.mark.services


def _msgs(sender: str, seqs: range | list[int], *, prefix: str = "c") -> list[models.NewMessage]:
    now = datetime.now(UTC)
    return [
        models.NewMessage(
            msg_id=uuid.uuid4().hex,
            seq=seq,
            sender_id=sender,
            type="text",
            content={"text": f"hello {seq}", "nested": {"emoji": "\N{GRINNING FACE}", "n": seq}},
            client_msg_id=f"{prefix}{seq}",
            created_at=now + timedelta(microseconds=seq),
        )
        for seq in seqs
    ]


async def _group(db: store.SqlStore, tenant: str, *members: str) -> str:
    conv, created = await db.create_conversation(
        tenant,
        conv_type="group",
        member_ids=list(members),
        created_by=members[0],
        name="g",
        direct_key=None,
    )
    assert created
    return conv.conv_id


async def _rows(db: store.SqlStore, sql: str, **params: Any) -> list[Any]:
    async with db.engine.connect() as conn:
        return list((await conn.execute(sa.text(sql), params)).all())


async def test_migrate_cli_creates_tenant_schema(pg_url: str, pg_store: store.SqlStore) -> None:
    tenant = f"cli{uuid.uuid4().hex[:6]}"
    schema = tenancy.names_for(tenant).db_schema
    for _ in range(2):  # idempotent
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "imhub",
                "migrate",
                "--database-url",
                pg_url,
                "--tenant",
                tenant,
            ],
            capture_output=True,
            text=True,
            cwd=str(REPO),
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"migrated schema {schema}" in proc.stdout

    tables = {
        r[0]
        for r in await _rows(
            pg_store,
            "select table_name from information_schema.tables where table_schema = :s",
            s=schema,
        )
    }
    assert {"conversations", "members", "messages", "media", "alembic_version"} <= tables
    # Nothing leaked into public.
    public = await _rows(
        pg_store,
        "select table_name from information_schema.tables "
        "where table_schema = 'public' and table_name in ('messages', 'conversations')",
    )
    assert public == []
    version = await _rows(pg_store, f'select version_num from "{schema}".alembic_version')
    assert version and version[0][0]

    # Message content is JSONB; the indexes the queries rely on exist.
    col = await _rows(
        pg_store,
        "select data_type from information_schema.columns "
        "where table_schema = :s and table_name = 'messages' and column_name = 'content'",
        s=schema,
    )
    assert col == [("jsonb",)]
    indexes = {
        r[0]: r[1]
        for r in await _rows(
            pg_store, "select indexname, indexdef from pg_indexes where schemaname = :s", s=schema
        )
    }
    assert "(tenant_id, conv_id, seq)" in indexes["pk_messages"]
    assert "UNIQUE" in indexes["uq_messages_client"]
    assert "(tenant_id, conv_id, sender_id, client_msg_id)" in indexes["uq_messages_client"]
    assert "(tenant_id, user_id)" in indexes["ix_members_user"]
    assert "UNIQUE" in indexes["uq_conversations_direct"]


async def test_rows_live_in_the_tenant_schema_and_jsonb_round_trips(
    pg_store: store.SqlStore, migrated: Callable[..., Any], tenant_ids: Callable[[], str]
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    conv_id = await _group(pg_store, tenant, "alice", "bob")
    await pg_store.insert_messages(tenant, {conv_id: _msgs("alice", range(1, 4))})

    schema = tenancy.names_for(tenant).db_schema
    rows = await _rows(
        pg_store,
        f"""select seq, content->'nested'->>'emoji', jsonb_typeof(content)
            from "{schema}".messages where conv_id = :c order by seq""",
        c=conv_id,
    )
    assert rows == [(s, "\N{GRINNING FACE}", "object") for s in (1, 2, 3)]
    history = await pg_store.history(tenant, conv_id, before_seq=None, after_seq=0, limit=10)
    assert [m.content["nested"]["n"] for m in history] == [1, 2, 3]
    conv = await pg_store.get_conversation(tenant, conv_id)
    assert conv is not None and conv.last_seq == 3
    assert conv.last_message is not None and conv.last_message.seq == 3
    # The sender's read point moved with the send; the other member has 3 unread.
    assert await pg_store.unread_count(tenant, conv_id, "alice") == 0
    assert await pg_store.unread_count(tenant, conv_id, "bob") == 3


async def test_tenants_are_isolated_even_with_each_others_ids(
    pg_store: store.SqlStore, migrated: Callable[..., Any], tenant_ids: Callable[[], str]
) -> None:
    a, b = tenant_ids(), tenant_ids()
    await migrated(a, b)
    conv_a = await _group(pg_store, a, "alice", "bob")
    await pg_store.insert_messages(a, {conv_a: _msgs("alice", range(1, 6))})
    await pg_store.record_media(
        a,
        models.MediaObject(
            key=f"{a}/{conv_a}/k/x.png",
            conv_id=conv_a,
            uploader_id="alice",
            content_type="image/png",
            size=10,
            created_at=datetime.now(UTC),
        ),
    )

    # Tenant b asks for a's conversation, messages, members and media by id.
    assert await pg_store.get_conversation(b, conv_a) is None
    assert await pg_store.members(b, conv_a) == []
    assert await pg_store.history(b, conv_a, before_seq=None, after_seq=0, limit=100) == []
    assert await pg_store.max_seq(b, conv_a) == 0
    assert await pg_store.find_by_client_ids(b, [(conv_a, "alice", "c1")]) == {}
    assert await pg_store.list_conversations(b, "alice", before=None, limit=10) == []
    assert await pg_store.unread_count(b, conv_a, "bob") == 0
    assert await pg_store.get_media(b, f"{a}/{conv_a}/k/x.png") is None
    with pytest.raises(errors.NotFound):
        await pg_store.mark_read(b, conv_a, "bob", 5)
    assert await pg_store.add_members(b, conv_a, ["mallory"]) == ["mallory"]

    # b's writes under a's conversation id land in b's schema only.
    await pg_store.insert_messages(b, {conv_a: _msgs("mallory", [1])})
    schema_a, schema_b = tenancy.names_for(a).db_schema, tenancy.names_for(b).db_schema
    in_a = await _rows(
        pg_store, f'select sender_id, count(*) from "{schema_a}".messages group by sender_id'
    )
    in_b = await _rows(
        pg_store, f'select sender_id, count(*) from "{schema_b}".messages group by sender_id'
    )
    assert in_a == [("alice", 5)]
    assert in_b == [("mallory", 1)]
    members_a = await pg_store.members(a, conv_a)
    assert sorted(m.user_id for m in members_a) == ["alice", "bob"]
    assert [
        m.seq for m in await pg_store.history(a, conv_a, before_seq=None, after_seq=0, limit=9)
    ] == [
        1,
        2,
        3,
        4,
        5,
    ]


async def test_dedupe_constraint_rejects_the_whole_batch(
    pg_store: store.SqlStore, migrated: Callable[..., Any], tenant_ids: Callable[[], str]
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    conv_id = await _group(pg_store, tenant, "alice", "bob")
    await pg_store.insert_messages(tenant, {conv_id: _msgs("alice", [1, 2])})

    # A retry of client_msg_id "c2" under a new seq, together with a new message.
    dup = models.NewMessage(
        msg_id=uuid.uuid4().hex,
        seq=7,
        sender_id="alice",
        type="text",
        content={"text": "again"},
        client_msg_id="c2",
        created_at=datetime.now(UTC),
    )
    with pytest.raises(errors.Conflict):
        await pg_store.insert_messages(tenant, {conv_id: [*_msgs("alice", [3]), dup]})
    # Same seq twice: also a conflict.
    with pytest.raises(errors.Conflict):
        await pg_store.insert_messages(tenant, {conv_id: _msgs("alice", [2], prefix="other")})

    # A batch over two conversations is one transaction: a clash in one stores neither.
    other = await _group(pg_store, tenant, "alice", "bob")
    with pytest.raises(errors.Conflict):
        await pg_store.insert_messages(
            tenant, {other: _msgs("alice", [1]), conv_id: _msgs("alice", [1], prefix="x")}
        )
    assert await pg_store.max_seq(tenant, other) == 0

    stored = await pg_store.history(tenant, conv_id, before_seq=None, after_seq=0, limit=10)
    assert [(m.seq, m.client_msg_id) for m in stored] == [(1, "c1"), (2, "c2")]
    conv = await pg_store.get_conversation(tenant, conv_id)
    assert conv is not None and conv.last_seq == 2  # the failed batches moved nothing
    # The same client_msg_id from another sender is a different message.
    await pg_store.insert_messages(tenant, {conv_id: _msgs("bob", [3], prefix="c")})
    found = await pg_store.find_by_client_ids(
        tenant, [(conv_id, "alice", "c3"), (conv_id, "bob", "c3")]
    )
    assert list(found) == [(conv_id, "bob", "c3")]


async def test_mark_read_never_moves_backwards(
    pg_store: store.SqlStore, migrated: Callable[..., Any], tenant_ids: Callable[[], str]
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    conv_id = await _group(pg_store, tenant, "alice", "bob")
    await pg_store.insert_messages(tenant, {conv_id: _msgs("alice", range(1, 21))})

    assert await pg_store.mark_read(tenant, conv_id, "bob", 10) == (10, True)
    assert await pg_store.mark_read(tenant, conv_id, "bob", 4) == (10, False)
    assert await pg_store.mark_read(tenant, conv_id, "bob", 10) == (10, False)
    # Clamped to the last stored seq.
    assert await pg_store.mark_read(tenant, conv_id, "bob", 999) == (20, True)
    assert await pg_store.unread_count(tenant, conv_id, "bob") == 0

    # Many concurrent marks from several connections: the maximum wins.
    await pg_store.insert_messages(tenant, {conv_id: _msgs("alice", range(21, 61))})
    targets = [23, 59, 30, 41, 60, 25, 33, 58, 22, 47] * 3
    await asyncio.gather(*(pg_store.mark_read(tenant, conv_id, "bob", s) for s in targets))
    members = {m.user_id: m.last_read_seq for m in await pg_store.members(tenant, conv_id)}
    assert members["bob"] == 60
    assert await pg_store.unread_count(tenant, conv_id, "bob") == 0
    with pytest.raises(errors.NotFound):
        await pg_store.mark_read(tenant, conv_id, "stranger", 1)


async def test_direct_conversation_race_creates_one(
    pg_store: store.SqlStore, migrated: Callable[..., Any], tenant_ids: Callable[[], str]
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    results = await asyncio.gather(
        *(
            pg_store.create_conversation(
                tenant,
                conv_type="direct",
                member_ids=["alice", "bob"],
                created_by="alice",
                name=None,
                direct_key="alice\nbob",
            )
            for _ in range(8)
        )
    )
    assert len({conv.conv_id for conv, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_lost_connection_is_unavailable_and_the_store_recovers(
    pg_store: store.SqlStore, migrated: Callable[..., Any], tenant_ids: Callable[[], str]
) -> None:
    tenant = tenant_ids()
    await migrated(tenant)
    conv_id = await _group(pg_store, tenant, "alice", "bob")

    # The server ends the session in the middle of a transaction.
    with pytest.raises(errors.Unavailable):
        async with pg_store._begin(tenant) as conn:
            pid = await conn.scalar(sa.text("select pg_backend_pid()"))
            await _rows(pg_store, "select pg_terminate_backend(:p)", p=pid)
            await conn.execute(sa.text("select 1"))

    # Terminate every pooled connection: the next calls still work (pre-ping).
    await _rows(
        pg_store,
        "select pg_terminate_backend(pid) from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid()",
    )
    await pg_store.insert_messages(tenant, {conv_id: _msgs("alice", [1])})
    assert await pg_store.max_seq(tenant, conv_id) == 1


async def test_unreachable_server_is_unavailable_fast(tenant_ids: Callable[[], str]) -> None:
    from tests.harness import free_port

    db = store.SqlStore(
        store.make_engine(f"postgresql://imhub:imhub@127.0.0.1:{free_port()}/imhub")
    )
    started = asyncio.get_running_loop().time()
    with pytest.raises(errors.Unavailable):
        await db.ping()
    with pytest.raises(errors.Unavailable):
        await db.max_seq(tenant_ids(), "c_x")
    with pytest.raises(errors.Unavailable):
        await db.insert_messages(tenant_ids(), {"c_x": _msgs("a", [1])})
    assert asyncio.get_running_loop().time() - started < 10
    await db.close()
