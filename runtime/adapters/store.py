"""The database adapter: SQLAlchemy 2 async on SQLite (embedded) or PostgreSQL.

On PostgreSQL each tenant's tables live in the tenant's own schema (from
:mod:`imhub.runtime.tenancy`); statements are written without a schema and
translated per tenant. On SQLite all tenants share one file and are kept
apart by ``tenant_id``, which every statement filters on in both cases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from imhub.runtime import errors, models, tenancy
from imhub.runtime.adapters import tables as t

__all__ = ["SqlStore", "make_engine", "normalize_url"]

logger = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """The async-driver form of a database URL.

    Deployment tools print plain DSNs (``postgresql://...``, ``sqlite:///...``);
    the runtime always talks through asyncpg or aiosqlite.
    """
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine with the per-dialect settings imhub relies on."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, pool_pre_ping=False)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL lets REST reads run while the message service writes; NORMAL
            # sync in WAL mode survives a process crash (not a power cut).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # A connection the server dropped (restart, failover) is replaced at
        # checkout instead of failing the first statement on it.
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=10,
        # asyncpg: give up connecting after 5 s and on a statement after 30 s,
        # so an unreachable server surfaces as Unavailable, not as a hang.
        connect_args={"timeout": 5, "command_timeout": 30},
    )


def _is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` means "the database is not usable right now" (retry later)."""
    if isinstance(err, OSError | TimeoutError | exc.OperationalError | exc.InterfaceError):
        return True
    if isinstance(err, exc.DBAPIError):
        if err.connection_invalidated:
            return True
        # SQLSTATE class 08 (connection exception), 57P (operator intervention:
        # shutdown, cannot connect now) and 40 (serialization failure, deadlock:
        # the transaction was rolled back and may simply be retried).
        state = str(getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", "") or "")
        return state.startswith(("08", "57P", "40"))
    return False


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _message(row: Any) -> models.Message:
    return models.Message(
        msg_id=row.msg_id,
        conv_id=row.conv_id,
        seq=int(row.seq),
        sender_id=row.sender_id,
        type=row.type,
        content=row.content,
        client_msg_id=row.client_msg_id,
        created_at=_utc(row.created_at),
    )


def _member(row: Any) -> models.Member:
    return models.Member(
        user_id=row.user_id,
        role=row.role,
        last_read_seq=int(row.last_read_seq),
        joined_at=_utc(row.joined_at),
    )


class SqlStore:
    """:class:`~imhub.runtime.ports.Store` on SQLAlchemy."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        schema_for: Callable[[str], str | None] | None = None,
    ) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        if schema_for is None:
            schema_for = (
                (lambda tid: tenancy.names_for(tid).db_schema)
                if self._postgres
                else (lambda _: None)
            )
        self._schema_for = schema_for

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def write_concurrency(self) -> int:
        """How many write transactions are worth running at once. SQLite has one
        writer: concurrent transactions only queue in its busy handler, which
        sleeps in steps of up to 100 ms, so callers serialize instead."""
        return 1 if self._engine.dialect.name == "sqlite" else 8

    async def start(self) -> None:
        await self.ping()

    async def close(self) -> None:
        await self._engine.dispose()

    async def ping(self) -> None:
        try:
            async with self._engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (OSError, exc.SQLAlchemyError) as err:
            raise errors.Unavailable("database is not reachable") from err

    # -- plumbing -----------------------------------------------------------------

    def _opts(self, tenant_id: str) -> dict[str, Any]:
        schema = self._schema_for(tenant_id)
        return {"schema_translate_map": {None: schema}} if schema else {}

    def _connect(self, tenant_id: str) -> _TenantConn:
        return _TenantConn(self._engine, self._opts(tenant_id), write=False)

    def _begin(self, tenant_id: str) -> _TenantConn:
        return _TenantConn(self._engine, self._opts(tenant_id), write=True)

    # -- conversations ------------------------------------------------------------

    async def create_conversation(
        self,
        tenant_id: str,
        *,
        conv_type: str,
        member_ids: Sequence[str],
        created_by: str,
        name: str | None,
        direct_key: str | None,
        conv_id: str | None = None,
    ) -> tuple[models.Conversation, bool]:
        import uuid

        conv_id = conv_id or f"c_{uuid.uuid4().hex}"
        now = datetime.now(UTC)
        if direct_key is not None:
            existing = await self._direct(tenant_id, direct_key)
            if existing is not None:
                return existing, False
        try:
            async with self._begin(tenant_id) as conn:
                await conn.execute(
                    t.conversations.insert().values(
                        tenant_id=tenant_id,
                        conv_id=conv_id,
                        type=conv_type,
                        name=name,
                        direct_key=direct_key,
                        created_by=created_by,
                        created_at=now,
                        last_seq=0,
                        last_activity_at=now,
                    )
                )
                await conn.execute(
                    t.members.insert(),
                    [
                        {
                            "tenant_id": tenant_id,
                            "conv_id": conv_id,
                            "user_id": uid,
                            "role": "owner" if uid == created_by else "member",
                            "last_read_seq": 0,
                            "joined_at": now,
                        }
                        for uid in dict.fromkeys(member_ids)
                    ],
                )
        except exc.IntegrityError:
            # Two requests raced to create the same direct conversation.
            if direct_key is not None:
                existing = await self._direct(tenant_id, direct_key)
                if existing is not None:
                    return existing, False
            raise errors.Conflict("conversation already exists") from None
        conv = await self.get_conversation(tenant_id, conv_id)
        assert conv is not None
        return conv, True

    async def _direct(self, tenant_id: str, direct_key: str) -> models.Conversation | None:
        async with self._connect(tenant_id) as conn:
            conv_id = await conn.scalar(
                sa.select(t.conversations.c.conv_id).where(
                    t.conversations.c.tenant_id == tenant_id,
                    t.conversations.c.direct_key == direct_key,
                )
            )
        return await self.get_conversation(tenant_id, conv_id) if conv_id else None

    async def get_conversation(self, tenant_id: str, conv_id: str) -> models.Conversation | None:
        c = t.conversations.c
        async with self._connect(tenant_id) as conn:
            row = (
                await conn.execute(
                    sa.select(t.conversations).where(c.tenant_id == tenant_id, c.conv_id == conv_id)
                )
            ).first()
            if row is None:
                return None
            member_rows = await self._members(conn, tenant_id, [conv_id])
            last = None
            if row.last_seq:
                msg_row = (
                    await conn.execute(
                        sa.select(t.messages).where(
                            t.messages.c.tenant_id == tenant_id,
                            t.messages.c.conv_id == conv_id,
                            t.messages.c.seq == row.last_seq,
                        )
                    )
                ).first()
                last = _message(msg_row) if msg_row else None
        return self._conversation(row, member_rows.get(conv_id, []), last)

    @staticmethod
    def _conversation(
        row: Any, members: list[models.Member], last: models.Message | None
    ) -> models.Conversation:
        return models.Conversation(
            conv_id=row.conv_id,
            type=row.type,
            name=row.name,
            created_by=row.created_by,
            created_at=_utc(row.created_at),
            last_seq=int(row.last_seq),
            last_activity_at=_utc(row.last_activity_at),
            members=tuple(members),
            last_message=last,
        )

    @staticmethod
    async def _members(
        conn: AsyncConnection, tenant_id: str, conv_ids: Sequence[str]
    ) -> dict[str, list[models.Member]]:
        m = t.members.c
        rows = await conn.execute(
            sa.select(t.members)
            .where(m.tenant_id == tenant_id, m.conv_id.in_(list(conv_ids)))
            .order_by(m.conv_id, m.joined_at, m.user_id)
        )
        out: dict[str, list[models.Member]] = {}
        for row in rows:
            out.setdefault(row.conv_id, []).append(_member(row))
        return out

    async def list_conversations(
        self, tenant_id: str, user_id: str, *, before: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[models.Conversation, int]]:
        c, m, msg = t.conversations.c, t.members.c, t.messages
        unread = (
            sa.select(sa.func.count())
            .select_from(msg)
            .where(
                msg.c.tenant_id == c.tenant_id,
                msg.c.conv_id == c.conv_id,
                msg.c.seq > m.last_read_seq,
                msg.c.sender_id != user_id,
            )
            .scalar_subquery()
        )
        query = (
            sa.select(t.conversations, unread.label("unread"))
            .join(t.members, sa.and_(m.tenant_id == c.tenant_id, m.conv_id == c.conv_id))
            .where(c.tenant_id == tenant_id, m.user_id == user_id)
            .order_by(c.last_activity_at.desc(), c.conv_id.desc())
            .limit(limit)
        )
        if before is not None:
            ts, conv_id = before
            query = query.where(
                sa.or_(
                    c.last_activity_at < ts,
                    sa.and_(c.last_activity_at == ts, c.conv_id < conv_id),
                )
            )
        async with self._connect(tenant_id) as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            conv_ids = [r.conv_id for r in rows]
            member_rows = await self._members(conn, tenant_id, conv_ids)
            wanted = [(r.conv_id, r.last_seq) for r in rows if r.last_seq]
            last: dict[str, models.Message] = {}
            if wanted:
                last_rows = await conn.execute(
                    sa.select(msg).where(
                        msg.c.tenant_id == tenant_id,
                        sa.tuple_(msg.c.conv_id, msg.c.seq).in_(wanted),
                    )
                )
                last = {r.conv_id: _message(r) for r in last_rows}
        return [
            (
                self._conversation(r, member_rows.get(r.conv_id, []), last.get(r.conv_id)),
                max(0, int(r.unread)),
            )
            for r in rows
        ]

    async def add_members(self, tenant_id: str, conv_id: str, user_ids: Sequence[str]) -> list[str]:
        m = t.members.c
        now = datetime.now(UTC)
        async with self._begin(tenant_id) as conn:
            present = set(
                (
                    await conn.execute(
                        sa.select(m.user_id).where(
                            m.tenant_id == tenant_id,
                            m.conv_id == conv_id,
                            m.user_id.in_(list(user_ids)),
                        )
                    )
                ).scalars()
            )
            # New members start reading from now: history is visible, unread is not.
            last_seq = await conn.scalar(
                sa.select(t.conversations.c.last_seq).where(
                    t.conversations.c.tenant_id == tenant_id,
                    t.conversations.c.conv_id == conv_id,
                )
            )
            added = [u for u in dict.fromkeys(user_ids) if u not in present]
            if added:
                await conn.execute(
                    t.members.insert(),
                    [
                        {
                            "tenant_id": tenant_id,
                            "conv_id": conv_id,
                            "user_id": uid,
                            "role": "member",
                            "last_read_seq": int(last_seq or 0),
                            "joined_at": now,
                        }
                        for uid in added
                    ],
                )
        return added

    async def remove_member(self, tenant_id: str, conv_id: str, user_id: str) -> bool:
        m = t.members.c
        mine = (m.tenant_id == tenant_id, m.conv_id == conv_id)
        async with self._begin(tenant_id) as conn:
            result = await conn.execute(t.members.delete().where(*mine, m.user_id == user_id))
            # A group never stays without an owner: the longest-standing member
            # takes over when the last owner leaves.
            owners = await conn.scalar(
                sa.select(sa.func.count()).select_from(t.members).where(*mine, m.role == "owner")
            )
            if result.rowcount and not owners:
                heir = await conn.scalar(
                    sa.select(m.user_id).where(*mine).order_by(m.joined_at, m.user_id).limit(1)
                )
                if heir is not None:
                    await conn.execute(
                        t.members.update().where(*mine, m.user_id == heir).values(role="owner")
                    )
        return bool(result.rowcount)

    async def members(self, tenant_id: str, conv_id: str) -> list[models.Member]:
        async with self._connect(tenant_id) as conn:
            return (await self._members(conn, tenant_id, [conv_id])).get(conv_id, [])

    # -- messages -----------------------------------------------------------------

    async def max_seq(self, tenant_id: str, conv_id: str) -> int:
        msg = t.messages.c
        async with self._connect(tenant_id) as conn:
            value = await conn.scalar(
                sa.select(sa.func.max(msg.seq)).where(
                    msg.tenant_id == tenant_id, msg.conv_id == conv_id
                )
            )
        return int(value or 0)

    async def load_batch(
        self, tenant_id: str, conv_ids: Sequence[str], keys: Sequence[tuple[str, str, str]]
    ) -> tuple[dict[str, list[models.Member]], dict[tuple[str, str, str], models.Message]]:
        """Members of the conversations and already stored messages, in one
        round trip to the pool: what the message service needs per batch."""
        async with self._connect(tenant_id) as conn:
            members = await self._members(conn, tenant_id, conv_ids)
            stored = await self._find(conn, tenant_id, keys)
        return members, stored

    async def find_by_client_ids(
        self, tenant_id: str, keys: Sequence[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], models.Message]:
        async with self._connect(tenant_id) as conn:
            return await self._find(conn, tenant_id, keys)

    @staticmethod
    async def _find(
        conn: AsyncConnection, tenant_id: str, keys: Sequence[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], models.Message]:
        if not keys:
            return {}
        msg = t.messages.c
        wanted = set(keys)
        # The unique index (tenant, conv, sender, client_msg_id) serves this;
        # the broad IN lists are narrowed to exact keys below.
        rows = await conn.execute(
            sa.select(t.messages).where(
                msg.tenant_id == tenant_id,
                msg.conv_id.in_(sorted({k[0] for k in keys})),
                msg.client_msg_id.in_(sorted({k[2] for k in keys})),
            )
        )
        return {
            (r.conv_id, r.sender_id, r.client_msg_id): _message(r)
            for r in rows
            if (r.conv_id, r.sender_id, r.client_msg_id) in wanted
        }

    async def insert_messages(
        self, tenant_id: str, batches: Mapping[str, Sequence[models.NewMessage]]
    ) -> None:
        batches = {conv_id: rows for conv_id, rows in batches.items() if rows}
        if not batches:
            return
        c, m = t.conversations.c, t.members.c
        convs, read_points = [], []
        for conv_id, rows in batches.items():
            convs.append(
                {
                    "b_conv": conv_id,
                    "b_top": max(row.seq for row in rows),
                    "b_at": max(row.created_at for row in rows),
                }
            )
            senders: dict[str, int] = {}
            for row in rows:
                senders[row.sender_id] = max(senders.get(row.sender_id, 0), row.seq)
            read_points += [
                {"b_conv": conv_id, "b_user": u, "b_seq": s} for u, s in senders.items()
            ]
        try:
            async with self._begin(tenant_id) as conn:
                await conn.execute(
                    t.messages.insert(),
                    [
                        {
                            "tenant_id": tenant_id,
                            "conv_id": conv_id,
                            "seq": row.seq,
                            "msg_id": row.msg_id,
                            "sender_id": row.sender_id,
                            "client_msg_id": row.client_msg_id,
                            "type": row.type,
                            "content": row.content,
                            "created_at": row.created_at,
                        }
                        for conv_id, rows in batches.items()
                        for row in rows
                    ],
                )
                top: sa.BindParameter[int] = sa.bindparam("b_top", type_=sa.BigInteger)
                await conn.execute(
                    t.conversations.update()
                    .where(c.tenant_id == tenant_id, c.conv_id == sa.bindparam("b_conv"))
                    .values(
                        last_seq=sa.case((c.last_seq < top, top), else_=c.last_seq),
                        last_activity_at=sa.bindparam("b_at"),
                    ),
                    convs,
                )
                # Sending moves the sender's own read point up to the message.
                await conn.execute(
                    t.members.update()
                    .where(
                        m.tenant_id == tenant_id,
                        m.conv_id == sa.bindparam("b_conv"),
                        m.user_id == sa.bindparam("b_user"),
                        m.last_read_seq < sa.bindparam("b_seq"),
                    )
                    .values(last_read_seq=sa.bindparam("b_seq")),
                    read_points,
                )
        except exc.IntegrityError as err:
            raise errors.Conflict("seq or client_msg_id already stored") from err
        except (OSError, exc.OperationalError, exc.InterfaceError) as err:
            raise errors.Unavailable("database is not reachable") from err

    async def history(
        self,
        tenant_id: str,
        conv_id: str,
        *,
        before_seq: int | None,
        after_seq: int | None,
        limit: int,
    ) -> list[models.Message]:
        msg = t.messages.c
        query = sa.select(t.messages).where(msg.tenant_id == tenant_id, msg.conv_id == conv_id)
        if after_seq is not None:
            query = query.where(msg.seq > after_seq)
        if before_seq is not None:
            query = query.where(msg.seq < before_seq)
        if after_seq is not None:
            query = query.order_by(msg.seq.asc()).limit(limit)
        else:
            query = query.order_by(msg.seq.desc()).limit(limit)
        async with self._connect(tenant_id) as conn:
            rows = [_message(r) for r in await conn.execute(query)]
        rows.sort(key=lambda r: r.seq)
        return rows

    async def mark_read(
        self, tenant_id: str, conv_id: str, user_id: str, seq: int
    ) -> tuple[int, bool]:
        c, m = t.conversations.c, t.members.c
        async with self._begin(tenant_id) as conn:
            last_seq = await conn.scalar(
                sa.select(c.last_seq).where(c.tenant_id == tenant_id, c.conv_id == conv_id)
            )
            current = await conn.scalar(
                sa.select(m.last_read_seq).where(
                    m.tenant_id == tenant_id, m.conv_id == conv_id, m.user_id == user_id
                )
            )
            if last_seq is None or current is None:
                raise errors.NotFound("conversation not found")
            target = min(seq, int(last_seq))
            if target <= int(current):
                return int(current), False
            await conn.execute(
                t.members.update()
                .where(
                    m.tenant_id == tenant_id,
                    m.conv_id == conv_id,
                    m.user_id == user_id,
                    m.last_read_seq < target,
                )
                .values(last_read_seq=target)
            )
        return target, True

    async def unread_count(self, tenant_id: str, conv_id: str, user_id: str) -> int:
        m, msg = t.members.c, t.messages.c
        async with self._connect(tenant_id) as conn:
            read = await conn.scalar(
                sa.select(m.last_read_seq).where(
                    m.tenant_id == tenant_id, m.conv_id == conv_id, m.user_id == user_id
                )
            )
            if read is None:
                return 0
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(t.messages)
                .where(
                    msg.tenant_id == tenant_id,
                    msg.conv_id == conv_id,
                    msg.seq > read,
                    msg.sender_id != user_id,
                )
            )
        return max(0, int(count or 0))

    # -- media --------------------------------------------------------------------

    async def record_media(self, tenant_id: str, obj: models.MediaObject) -> None:
        async with self._begin(tenant_id) as conn:
            await conn.execute(
                t.media.insert().values(
                    tenant_id=tenant_id,
                    key=obj.key,
                    conv_id=obj.conv_id,
                    uploader_id=obj.uploader_id,
                    content_type=obj.content_type,
                    size=obj.size,
                    created_at=obj.created_at,
                )
            )

    async def get_media(self, tenant_id: str, key: str) -> models.MediaObject | None:
        md = t.media.c
        async with self._connect(tenant_id) as conn:
            row = (
                await conn.execute(
                    sa.select(t.media).where(md.tenant_id == tenant_id, md.key == key)
                )
            ).first()
        if row is None:
            return None
        return models.MediaObject(
            key=row.key,
            conv_id=row.conv_id,
            uploader_id=row.uploader_id,
            content_type=row.content_type,
            size=int(row.size),
            created_at=_utc(row.created_at),
        )


class _TenantConn:
    """``async with``: a connection (optionally in a transaction) bound to a tenant schema.

    Connection failures surface as :class:`~imhub.runtime.errors.Unavailable`.
    """

    __slots__ = ("_cm", "_engine", "_opts", "_write")

    def __init__(self, engine: AsyncEngine, opts: dict[str, Any], *, write: bool) -> None:
        self._engine = engine
        self._opts = opts
        self._write = write
        self._cm: Any = None

    async def __aenter__(self) -> AsyncConnection:
        self._cm = self._engine.begin() if self._write else self._engine.connect()
        try:
            conn: AsyncConnection = await self._cm.__aenter__()
        except Exception as err:
            if _is_connection_error(err):
                raise errors.Unavailable("database is not reachable") from err
            raise
        if self._opts:
            await conn.execution_options(**self._opts)
        return conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, err: BaseException | None, tb: Any
    ) -> None:
        try:
            await self._cm.__aexit__(exc_type, err, tb)
        except Exception as close_err:
            if _is_connection_error(close_err):
                raise errors.Unavailable("database connection lost") from close_err
            raise
        # A statement inside the block lost its connection (server restart
        # mid-transaction): the transaction is gone, the caller may retry.
        if err is not None and _is_connection_error(err):
            raise errors.Unavailable("database connection lost") from err
