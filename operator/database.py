"""PostgreSQL provisioning: a schema and a login role that can use only that schema.

Runs with the operator's admin DSN (a role with CREATEROLE that may create
schemas in the database). Order, for each reconcile:

1. claim the tenant id (schema comment names the owning ``ImTenant`` uid, so
   two objects with the same ``tenantId`` cannot share a schema);
2. create or update the role (LOGIN, password from the tenant Secret);
3. create the schema, owned by the admin, closed to ``PUBLIC``, usable by the
   tenant role;
4. apply the runtime migrations into the schema;
5. grant the tenant role DML on the tables and read-only on ``alembic_version``.

Every statement is idempotent, so the drift timer simply runs it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
from alembic.script import ScriptDirectory

from imhub import migrations
from imhub.runtime import tenancy

__all__ = ["DatabaseConflict", "DatabaseProvisioner", "DatabaseUnavailable"]

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key serialising changes to shared ACLs (any constant
# works; this one is "imhub" in ASCII).
_SHARED_ACL_LOCK = 0x696D687562
_CLAIM_PREFIX = "imhub-tenant:"
_RETAINED = "imhub-tenant:retained"


class DatabaseUnavailable(Exception):
    """The database did not answer (down, unreachable, refused the login)."""


class DatabaseConflict(Exception):
    """The schema belongs to another ``ImTenant`` with the same tenant id."""


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` -> ``postgresql://...`` for asyncpg itself."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: scheme {parts.scheme!r}")
    return urlunsplit(("postgresql", *parts[1:]))


def sqlalchemy_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(("postgresql+asyncpg", *parts[1:]))


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseResult:
    schema: str
    role: str
    revision: str
    migrated: bool


class DatabaseProvisioner:
    def __init__(self, admin_url: str, *, timeout: float = 5.0) -> None:
        self._dsn = asyncpg_dsn(admin_url)
        self._sa_url = sqlalchemy_url(admin_url)
        self._timeout = timeout
        self._head_revision: str | None = None
        self._migrate_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self._timeout)

    async def _exec(self, conn: asyncpg.Connection, template: str, *args: str) -> None:
        """Run DDL built server-side by ``format()`` (%I identifiers, %L literals)."""
        sql = await conn.fetchval(f"SELECT format($${template}$$, {_params(len(args))})", *args)
        await conn.execute(sql)

    def _head(self) -> str:
        if self._head_revision is None:
            scripts = ScriptDirectory.from_config(migrations.alembic_config(self._sa_url))
            self._head_revision = scripts.get_current_head() or "base"
        return self._head_revision

    async def ensure(
        self, names: tenancy.TenantNames, *, password: str, owner_uid: str
    ) -> DatabaseResult:
        schema, role = names.db_schema, names.db_role
        head = self._head()
        try:
            async with self._connect() as conn:
                await self._claim(conn, schema, owner_uid)
                await self._ensure_role(conn, role, password)
                await self._ensure_schema(conn, schema, role)
                current = await self._revision(conn, schema)
            # Alembic only when behind: the drift timer runs this every minute.
            # One at a time: Alembic's context is process-global state.
            if current != head:
                async with self._migrate_lock:
                    await migrations.upgrade_async(self._sa_url, schema=schema)
            async with self._connect() as conn:
                await self._grant_tables(conn, schema, role)
                await self._exec(
                    conn, "COMMENT ON SCHEMA %I IS %L", schema, _CLAIM_PREFIX + owner_uid
                )
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError) as exc:
            raise DatabaseUnavailable(f"PostgreSQL connection lost: {exc}") from exc
        except (DatabaseUnavailable, DatabaseConflict):
            raise
        except Exception as exc:
            # Alembic wraps driver errors in SQLAlchemy's; a refused connection
            # is still "unavailable", anything else is a real failure.
            if _is_connection_error(exc):
                raise DatabaseUnavailable(f"PostgreSQL not reachable: {exc}") from exc
            raise
        return DatabaseResult(schema=schema, role=role, revision=head, migrated=current != head)

    async def _revision(self, conn: asyncpg.Connection, schema: str) -> str | None:
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'alembic_version'",
            schema,
        )
        if not exists:
            return None
        sql = await conn.fetchval(
            "SELECT format('SELECT version_num FROM %I.alembic_version', $1::text)", schema
        )
        value = await conn.fetchval(sql)
        return str(value) if value is not None else None

    async def _claim(self, conn: asyncpg.Connection, schema: str, owner_uid: str) -> None:
        comment = await conn.fetchval(
            "SELECT obj_description(n.oid, 'pg_namespace') FROM pg_namespace n WHERE nspname = $1",
            schema,
        )
        if not comment or comment == _RETAINED or not comment.startswith(_CLAIM_PREFIX):
            return
        holder = comment[len(_CLAIM_PREFIX) :]
        if holder != owner_uid:
            raise DatabaseConflict(
                f"schema {schema} belongs to another ImTenant (uid {holder}); "
                "tenantId must be unique across the cluster"
            )

    async def _ensure_role(self, conn: asyncpg.Connection, role: str, password: str) -> None:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        verb = "ALTER" if exists else "CREATE"
        # The password is set on every pass: the Secret is the source of truth,
        # so a password changed by hand is put back.
        await self._exec(
            conn,
            f"{verb} ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT "
            "NOREPLICATION NOBYPASSRLS PASSWORD %L",
            role,
            password,
        )

    async def _ensure_schema(self, conn: asyncpg.Connection, schema: str, role: str) -> None:
        database = await conn.fetchval("SELECT current_database()")
        async with conn.transaction():
            # The grants below also rewrite shared catalog rows (the public
            # schema's and the database's ACL); concurrent passes for two
            # tenants would fail with "tuple concurrently updated".
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SHARED_ACL_LOCK)
            await self._exec(conn, "CREATE SCHEMA IF NOT EXISTS %I", schema)
            await self._exec(conn, "REVOKE ALL ON SCHEMA %I FROM PUBLIC", schema)
            await self._exec(conn, "GRANT USAGE, CREATE ON SCHEMA %I TO %I", schema, role)
            # The tenant role sees its own schema and nothing else of ours:
            # nothing in public, and its search_path is its schema.
            await self._exec(conn, "REVOKE ALL ON SCHEMA public FROM %I", role)
            await self._exec(conn, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            await self._exec(conn, "GRANT CONNECT ON DATABASE %I TO %I", database, role)
            await self._exec(conn, "ALTER ROLE %I SET search_path = %I", role, schema)

    async def _grant_tables(self, conn: asyncpg.Connection, schema: str, role: str) -> None:
        async with conn.transaction():
            await self._exec(
                conn,
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO %I",
                schema,
                role,
            )
            await self._exec(
                conn,
                "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %I TO %I",
                schema,
                role,
            )
            await self._exec(
                conn,
                "ALTER DEFAULT PRIVILEGES IN SCHEMA %I "
                "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %I",
                schema,
                role,
            )
            has_version_table = await conn.fetchval(
                "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'alembic_version'",
                schema,
            )
            if has_version_table:
                await self._exec(
                    conn,
                    "REVOKE INSERT, UPDATE, DELETE ON TABLE %I.alembic_version FROM %I",
                    schema,
                    role,
                )

    async def retain(self, names: tenancy.TenantNames) -> None:
        """Keep the data, lock the door: the role can no longer log in."""
        async with self._connect() as conn:
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", names.db_role):
                await self._exec(conn, "ALTER ROLE %I NOLOGIN", names.db_role)
                await _terminate(conn, names.db_role)
            if await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", names.db_schema
            ):
                await self._exec(conn, "COMMENT ON SCHEMA %I IS %L", names.db_schema, _RETAINED)

    async def drop(self, names: tenancy.TenantNames) -> None:
        """Drop the schema with everything in it, then the role."""
        async with self._connect() as conn:
            role_exists = await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", names.db_role
            )
            if role_exists:
                await self._exec(conn, "ALTER ROLE %I NOLOGIN", names.db_role)
                await _terminate(conn, names.db_role)
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SHARED_ACL_LOCK)
                await self._exec(conn, "DROP SCHEMA IF EXISTS %I CASCADE", names.db_schema)
                if role_exists:
                    # DROP OWNED also removes the role's grants in this database.
                    await self._exec(conn, "DROP OWNED BY %I", names.db_role)
                    await self._exec(conn, "DROP ROLE IF EXISTS %I", names.db_role)


async def _terminate(conn: asyncpg.Connection, role: str) -> None:
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
    )


def _params(count: int) -> str:
    return ", ".join(f"${i}::text" for i in range(1, count + 1)) if count else "''"


def _is_connection_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current, OSError | asyncio.TimeoutError | asyncpg.PostgresConnectionError
        ) or type(current).__name__ in ("CannotConnectNowError", "ConnectionDoesNotExistError"):
            return True
        current = current.__cause__ or current.__context__
    return False
